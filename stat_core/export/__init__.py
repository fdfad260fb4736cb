"""Writing pruned models: Hugging Face folders, GGUF, ONNX."""
