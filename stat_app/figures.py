"""The app's plotly figures: the prune's figures come from :mod:`stat_core.evaluation.figures` (the
HTML report draws the same ones); the head explorer's attention pattern and the Learn view's figures
live here."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from stat_core.evaluation.figures import (  # noqa: F401 (the app's figures, re-exported)
    COMPARE_CAPTION,
    DECAY_CAPTION,
    HEAD_CAPTION,
    HEADS_CAPTION,
    KEPT,
    NEURON_CAPTION,
    REMOVED,
    SPECTRUM_ALL_CAPTION,
    SPECTRUM_CAPTION,
    compare_figure,
    decay_curves,
    empty_figure,
    head_heatmap,
    neuron_profile,
    spectrum_figure,
)


def attention_figure(pattern: dict, details: dict | None = None) -> go.Figure:
    """Tokens × tokens attention weights of one head (dense model)."""
    tokens = [t.replace(" ", "·") or "∅" for t in pattern["tokens"]]
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=pattern["weights"], x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="%{y} → %{x}: %{z:.2f}<extra></extra>", colorbar={"title": "weight"}))
    title = "Attention pattern"
    if details:
        title = (f"Layer {details['layer']}, head {details['head']}: "
                 f"{'kept' if details['kept'] else 'removed'}, rank {details['rank']} of {details['num_heads']}")
    n = len(labels)
    fig.update_layout(title=title, height=max(360, 14 * n + 140), margin={"l": 90, "r": 20, "t": 50, "b": 90},
                      title_font_size=13, xaxis_title="attended token", yaxis_title="reading token")
    fig.update_yaxes(autorange="reversed")
    return fig
