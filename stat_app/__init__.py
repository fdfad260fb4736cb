"""The Gradio app over ``stat_core`` (its own issue). The library never imports this package."""
