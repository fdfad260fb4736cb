"""The app's plotly figures: the prune's figures come from :mod:`stat_core.evaluation.figures` (the
HTML report draws the same ones); the head explorer's attention pattern and the Learn view's figures
live here."""

from __future__ import annotations

import html as _html

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
    # plotly draws a subset of HTML in labels (links, line breaks): the text's tokens are escaped
    tokens = [_html.escape(t.replace(" ", "·"), quote=False) or "∅" for t in pattern["tokens"]]
    labels = [f"{i}:{t}" for i, t in enumerate(tokens)]
    fig = go.Figure(go.Heatmap(z=pattern["weights"], x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="%{y} → %{x}: %{z:.2f}<extra></extra>", colorbar={"title": "weight"}))
    title = "Attention pattern"
    if details:
        title = (f"Layer {details['layer']}, head {details['head']}: "
                 f"{'kept' if details['kept'] else 'removed'}, rank {details['rank']} of {details['num_heads']}")
    n = len(labels)
    fig.update_layout(title=title, height=max(600, 16 * n + 200), margin={"l": 110, "r": 20, "t": 50, "b": 110},
                      title_font_size=13, xaxis_title="attended token", yaxis_title="reading token")
    fig.update_yaxes(autorange="reversed")
    return fig


# --- the Learn view (numbers from stat_core.methods.stat.lesson) ------------------------------------

def lesson_text(number: int, step: dict | None) -> str:
    """A step's sentences as markdown (computed from the model's numbers, never canned)."""
    if step is None:
        return "Generation is for decoders; a classifier's effect is its held-out accuracy (Compare tab)."
    return " ".join(_inert(s) for s in step["sentences"])


def _inert(text: str) -> str:
    """Text that Markdown shows as written: the sentences quote model-generated tokens, which must
    never become HTML, images or links on the page (escaped tags, brackets as entities)."""
    return _html.escape(text, quote=False).replace("[", "&#91;").replace("]", "&#93;")


def _lesson_layout(fig: go.Figure, title: str, height: int = 380) -> go.Figure:
    fig.update_layout(title=title, height=height, margin={"l": 70, "r": 30, "t": 50, "b": 50}, title_font_size=13)
    return fig


def lesson_activations(step: dict, layer: int) -> go.Figure:
    z = np.asarray(step["values"])
    lim = float(np.quantile(np.abs(z), 0.99)) or 1.0
    labels = [f"n{j}{'' if k else ' (removed)'}" for j, k in zip(step["neurons"], step["kept"])]
    fig = go.Figure(go.Heatmap(z=z, x=list(range(z.shape[1])), y=list(range(z.shape[0])), colorscale="RdBu",
                               zmid=0, zmin=-lim, zmax=lim, customdata=np.array([labels] * z.shape[0]),
                               colorbar={"title": {"text": "activation"}},
                               hovertemplate="token %{y}, %{customdata}: %{z:.3g}<extra></extra>"))
    fig.update_xaxes(title_text=f"{len(labels)} of {step['n_neurons']:,} neurons, by output energy (most left)")
    fig.update_yaxes(title_text="token", autorange="reversed")
    return _lesson_layout(fig, f"Layer {layer}: a sample of the MLP activations Z", 440)


def lesson_spectrum(step: dict, layer: int) -> go.Figure:
    sv = np.asarray(step["singular_values"])
    fig = go.Figure(go.Scatter(x=np.arange(1, len(sv) + 1), y=np.where(sv > 0, sv, np.nan), mode="lines",
                               line={"color": "#495057"}, hovertemplate="σ_%{x} = %{y:.3g}<extra></extra>"))
    for k, label in ((step["k90"], "90% of the energy"), (step["k99"], "99%")):
        fig.add_vline(x=k, line_dash="dot", line_color="#1c7ed6", annotation_text=f"{label}: {k}")
    fig.update_yaxes(type="log", title_text="singular value (log scale)")
    fig.update_xaxes(title_text="direction j")
    return _lesson_layout(fig, f"Layer {layer}: singular values of Z")


def lesson_selection(step: dict, layer: int) -> go.Figure:
    k = np.arange(step["n"] + 1)
    floor = 1e-12
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=k, y=np.maximum(step["id_residual"], floor), mode="lines", name="keep k whole neurons (ID)",
                             line={"color": "#1c7ed6", "width": 2},
                             hovertemplate="keep %{x} neurons → %{y:.3%} left out<extra>ID</extra>"))
    fig.add_trace(go.Scatter(x=k, y=np.maximum(step["svd_residual"], floor), mode="lines",
                             name="best rank k (SVD floor)", line={"color": "#868e96", "width": 2, "dash": "dash"},
                             hovertemplate="rank %{x} → %{y:.3%} left out<extra>SVD</extra>"))
    fig.add_vline(x=step["kept"], line_dash="dot", line_color=REMOVED, annotation_text=f"this plan: {step['kept']}")
    fig.update_yaxes(type="log", title_text="share of Z's energy left out (log scale)")
    fig.update_xaxes(title_text="kept neurons k")
    fig.update_layout(legend={"orientation": "h", "y": -0.25})
    return _lesson_layout(fig, f"Layer {layer}: error of keeping k neurons, against the SVD bound", 420)


def lesson_correction(step: dict, layer: int) -> go.Figure:
    values = [step["error_without"], step["error_with"]]
    fig = go.Figure(go.Bar(x=["removed neurons dropped", "with the folded correction"], y=values,
                           marker_color=[REMOVED, KEPT], text=[f"{v:.2%}" for v in values], textposition="outside",
                           hovertemplate="%{x}: %{y:.3%} of the output energy<extra></extra>"))
    fig.update_yaxes(title_text="MLP output error on held-out text", tickformat=".1%",
                     range=[0, max(values + [1e-9]) * 1.25])
    return _lesson_layout(fig, f"Layer {layer}: output error without and with the correction "
                               f"({step['tokens']:,} held-out tokens)")


def lesson_allocation(step: dict, layer: int) -> go.Figure:
    kept = step["kept_neurons"]
    x = list(range(len(kept)))
    colors = ["#f08c00" if i == layer else "#adb5bd" for i in x]
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Bar(x=x, y=kept, marker_color=colors, name="neurons kept",
                         hovertemplate="layer %{x}: %{y:.0%} of neurons kept<extra></extra>"), secondary_y=False)
    fig.add_trace(go.Scatter(x=x, y=step["kept_heads"], mode="lines+markers", name="heads kept",
                             line={"color": "#1c7ed6"},
                             hovertemplate="layer %{x}: %{y:.0%} of heads kept<extra></extra>"), secondary_y=False)
    marginal = [m if m is not None and m > 0 else None for m in step["marginal"]]
    if any(m is not None for m in marginal):
        fig.add_trace(go.Scatter(x=x, y=marginal, mode="markers", name="damage of one more neuron (right, log)",
                                 marker={"color": "#495057", "symbol": "diamond"},
                                 hovertemplate="layer %{x}: %{y:.3g}<extra></extra>"), secondary_y=True)
        fig.update_yaxes(type="log", title_text="marginal damage (log scale)", secondary_y=True)
    fig.update_yaxes(title_text="share kept", tickformat=".0%", range=[0, 1.05], secondary_y=False)
    fig.update_xaxes(title_text="layer (this one in orange)", dtick=1 if len(x) <= 32 else 2)
    fig.update_layout(legend={"orientation": "h", "y": -0.25})
    return _lesson_layout(fig, "The budget across layers", 420)


def lesson_effect_html(step: dict | None) -> str:
    """Dense and pruned continuations side by side; each pruned token's background shows its KL to dense."""
    if step is None:
        return ""
    top = max(max(step["kl"], default=0.0), 1e-6)
    spans = []
    for tok, kl in zip(step["tokens"], step["kl"]):
        a = min(kl / top, 1.0)
        spans.append(f"<span title='KL {kl:.3f} nats' style='background: rgba(224,49,49,{0.08 + 0.7 * a:.2f});"
                     f"border-radius:3px;padding:0 1px'>{_html.escape(tok)}</span>")
    box = "border:1px solid #dee2e6;border-radius:6px;padding:.6em;white-space:pre-wrap;line-height:1.7"
    return (f"<div style='display:flex;gap:1em;flex-wrap:wrap'>"
            f"<div style='flex:1;min-width:18em'><b>dense</b><div style='{box}'>{_html.escape(step['dense'])}</div></div>"
            f"<div style='flex:1;min-width:18em'><b>pruned</b> (redder = larger KL to dense, up to {top:.2f} nats; "
            f"hover a token)<div style='{box}'>{''.join(spans)}</div></div></div>")
