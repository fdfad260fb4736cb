"""Plotly figures from a :class:`~stat_core.plan.PrunePlan` (plain data in, figures out)."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

KEPT = "#2b8a3e"
REMOVED = "#e03131"


def empty_figure(message: str = "Prune a model to see this view.") -> go.Figure:
    fig = go.Figure()
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                       font={"size": 14, "color": "#868e96"})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_layout(height=260, margin={"l": 20, "r": 20, "t": 20, "b": 20})
    return fig


def _attn_damage(lp, n_heads: int, n_kv: int) -> float | None:
    for opt in lp.attn_options:
        if opt["heads"] == n_heads and opt["kv_heads"] == n_kv:
            return None if opt["damage"] is None else float(opt["damage"])  # peers predict no damage
    return 0.0 if n_heads == lp.num_heads else None


def head_heatmap(plan) -> go.Figure:
    """Layers × heads: kept (green) or removed (red), shaded by importance; hover shows the head's
    rank in the decomposition and the predicted damage of the layer's chosen head set."""
    n_layers = len(plan.layers)
    n_heads = max(lp.num_heads for lp in plan.layers)
    z = np.full((n_layers, n_heads), np.nan)
    text = [[""] * n_heads for _ in range(n_layers)]
    hover = [[""] * n_heads for _ in range(n_layers)]
    for lp in plan.layers:
        kept = set(lp.kept_heads)
        order = lp.head_order or list(range(lp.num_heads))
        rank = {h: i + 1 for i, h in enumerate(order)}
        group = lp.num_heads // max(lp.num_kv_heads, 1)
        damage = _attn_damage(lp, len(lp.kept_heads), len(lp.kept_kv_heads))
        dmg = "n/a" if damage is None else f"{damage:.3g}"
        for h in range(lp.num_heads):
            r = rank.get(h, lp.num_heads)
            importance = 1.0 - (r - 1) / max(lp.num_heads, 1)   # 1 = most important
            z[lp.layer, h] = (0.35 + 0.65 * importance) * (1 if h in kept else -1)
            text[lp.layer][h] = str(r)
            hover[lp.layer][h] = (f"layer {lp.layer}, head {h} (KV group {h // group})<br>"
                                  f"{'kept' if h in kept else 'removed'}; importance rank {r} of {lp.num_heads}<br>"
                                  f"layer keeps {len(lp.kept_heads)}/{lp.num_heads} heads, "
                                  f"{len(lp.kept_kv_heads)}/{lp.num_kv_heads} KV heads<br>"
                                  f"predicted damage of this head set: {dmg}")
    colorscale = [[0.0, "#c92a2a"], [0.325, "#ffc9c9"], [0.5, "#f8f9fa"], [0.675, "#b2f2bb"], [1.0, "#2b8a3e"]]
    fig = go.Figure(go.Heatmap(z=z, x=[f"h{h}" for h in range(n_heads)], y=list(range(n_layers)), zmin=-1, zmax=1,
                               colorscale=colorscale, text=text, texttemplate="%{text}", hovertext=hover,
                               hoverinfo="text", xgap=1, ygap=1, showscale=False))
    kept_total = sum(len(lp.kept_heads) for lp in plan.layers)
    total = sum(lp.num_heads for lp in plan.layers)
    fig.update_layout(title=f"Attention heads: {kept_total}/{total} kept<br><sup>green kept · red removed · "
                            "number = importance rank (1 = most important) · whole KV groups go together</sup>",
                      xaxis_title="head", yaxis_title="layer", height=max(320, 18 * n_layers + 120),
                      margin={"l": 60, "r": 20, "t": 60, "b": 50}, title_font_size=13)
    fig.update_yaxes(autorange="reversed", dtick=1 if n_layers <= 32 else 2)
    return fig


def neuron_view(plan, bins: int = 48) -> go.Figure:
    """Left: which neurons survive, binned by index (fraction kept per bin); right: kept fraction per layer."""
    n_layers = len(plan.layers)
    d_ff = max(lp.intermediate_size for lp in plan.layers)
    bins = max(1, min(bins, d_ff))
    z = np.zeros((n_layers, bins))
    edges = np.linspace(0, d_ff, bins + 1)
    for lp in plan.layers:
        mask = np.zeros(lp.intermediate_size)
        mask[lp.kept_neurons] = 1.0
        idx = np.minimum((np.arange(lp.intermediate_size) * bins) // lp.intermediate_size, bins - 1)
        counts = np.bincount(idx, minlength=bins)
        z[lp.layer] = np.bincount(idx, weights=mask, minlength=bins) / np.maximum(counts, 1)
    frac = [len(lp.kept_neurons) / lp.intermediate_size for lp in plan.layers]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.75, 0.25], shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=("kept fraction per neuron bin (darker = more kept)", "kept per layer"))
    centers = [f"{int(edges[i])}–{int(edges[i + 1]) - 1}" for i in range(bins)]
    fig.add_trace(go.Heatmap(z=z, x=list(range(bins)), y=list(range(n_layers)), zmin=0, zmax=1, colorscale="Greens",
                             customdata=np.array([centers] * n_layers),
                             hovertemplate="layer %{y}, neurons %{customdata}<br>kept %{z:.0%}<extra></extra>",
                             showscale=False), row=1, col=1)
    fig.add_trace(go.Bar(x=frac, y=list(range(n_layers)), orientation="h", marker_color=KEPT,
                         hovertemplate="layer %{y}: %{x:.1%} of neurons kept<extra></extra>", showlegend=False),
                  row=1, col=2)
    kept_total = sum(len(lp.kept_neurons) for lp in plan.layers)
    total = sum(lp.intermediate_size for lp in plan.layers)
    fig.update_layout(title=f"MLP neurons: {kept_total:,}/{total:,} kept ({kept_total / total:.0%})",
                      height=max(320, 18 * n_layers + 120), margin={"l": 60, "r": 20, "t": 70, "b": 50},
                      title_font_size=13)
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text=f"neuron index bin ({d_ff // bins}/bin)", row=1, col=1)
    fig.update_xaxes(range=[0, 1], tickformat=".0%", row=1, col=2)
    return fig


def _positive(values) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    pos = v[v > 0]
    floor = pos.min() * 0.5 if len(pos) else 1e-12
    return np.where(v > 0, v, floor)


def decay_curves(plan, layer: int | None = None) -> go.Figure:
    """Predicted damage against kept units, log-scale y, chosen cut marked: MLP neurons (left) and
    attention head configurations (right), for one layer or all layers overlaid."""
    layers = plan.layers if layer is None else [plan.layers[int(layer)]]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], horizontal_spacing=0.09,
                        subplot_titles=("MLP: damage of keeping k neurons", "attention: damage per head set"))
    many = len(layers) > 1
    palette = ["#1c7ed6", "#e8590c", "#2f9e44", "#ae3ec9", "#f08c00", "#0c8599", "#c2255c", "#5c940d"]
    for i, lp in enumerate(layers):
        color = palette[i % len(palette)]
        name = f"layer {lp.layer}"
        if lp.mlp_damage:
            y = _positive(lp.mlp_damage)
            k = np.arange(len(y))
            fig.add_trace(go.Scatter(x=k, y=y, mode="lines", name=name, legendgroup=name, line={"color": color, "width": 1.5},
                                     hovertemplate=f"{name}: keep %{{x}} neurons → damage %{{y:.3g}}<extra></extra>"),
                          row=1, col=1)
            cut = len(lp.kept_neurons)
            fig.add_trace(go.Scatter(x=[cut], y=[y[min(cut, len(y) - 1)]], mode="markers", legendgroup=name,
                                     showlegend=False, marker={"color": color, "size": 9, "symbol": "x",
                                                               "line": {"width": 1, "color": "black"}},
                                     hovertemplate=f"{name}: chosen {cut} neurons<extra></extra>"), row=1, col=1)
        if lp.attn_options:
            # keeping every head costs nothing (no point on a log axis); plot the real options
            opts = sorted((o for o in lp.attn_options if o["heads"] < lp.num_heads),
                          key=lambda o: (o["heads"], o["kv_heads"]))
            x = [o["heads"] for o in opts]
            y = _positive([o["damage"] for o in opts])
            labels = [f"{o['heads']} heads / {o['kv_heads']} KV" for o in opts]
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines+markers" if not many else "markers", name=name,
                                     legendgroup=name, showlegend=not lp.mlp_damage,
                                     marker={"color": color, "size": 6}, line={"color": color, "width": 1},
                                     customdata=labels,
                                     hovertemplate=f"{name}: %{{customdata}} → damage %{{y:.3g}}<extra></extra>"),
                          row=1, col=2)
            n_kept = len(lp.kept_heads)
            chosen = _attn_damage(lp, n_kept, len(lp.kept_kv_heads))
            if n_kept < lp.num_heads and chosen is not None and chosen > 0:
                fig.add_trace(go.Scatter(x=[n_kept], y=[chosen], mode="markers", legendgroup=name, showlegend=False,
                                         marker={"color": color, "size": 12, "symbol": "x",
                                                 "line": {"width": 1, "color": "black"}},
                                         hovertemplate=f"{name}: chosen {n_kept} heads / {len(lp.kept_kv_heads)} KV"
                                                       f" → damage %{{y:.3g}}<extra></extra>"), row=1, col=2)
            elif len(y):
                # all heads kept: no damage; marked at the right edge, below the options
                fig.add_trace(go.Scatter(x=[lp.num_heads], y=[float(np.min(y))], mode="markers", legendgroup=name,
                                         showlegend=False, marker={"color": color, "size": 10,
                                                                   "symbol": "triangle-down"},
                                         hovertemplate=f"{name}: all {lp.num_heads} heads kept (no damage)"
                                                       "<extra></extra>"), row=1, col=2)
    if not many and layers:
        lp = layers[0]
        fig.add_vline(x=len(lp.kept_neurons), line_dash="dash", line_color="#495057", row=1, col=1)
    fig.update_yaxes(type="log", title_text="predicted damage (Δ loss)", row=1, col=1)
    fig.update_yaxes(type="log", row=1, col=2)
    fig.update_xaxes(title_text="kept neurons k", row=1, col=1)
    fig.update_xaxes(title_text="kept query heads (▼ = all kept)", row=1, col=2, dtick=1)
    title = "All layers" if many else f"Layer {layers[0].layer}" if layers else ""
    fig.update_layout(title=f"{title}: predicted damage vs kept units (× = chosen cut)", height=420,
                      margin={"l": 60, "r": 20, "t": 70, "b": 50}, title_font_size=13,
                      showlegend=many and len(layers) <= 40, legend={"font": {"size": 9}})
    return fig


def compare_figure(results: list[dict], dense: dict, metric: str) -> go.Figure:
    """One bar per method (log scale for perplexity), the dense model as a dashed line."""
    from stat_core.methods import get_method

    x = [get_method(r["method"]).label for r in results]
    y = [r.get(metric) for r in results]
    colors = ["#2b8a3e" if r["method"] == "stat" else "#adb5bd" for r in results]
    text = [(f"{v:.1f}" if metric == "perplexity" else f"{v:.0%}") if v is not None else "" for v in y]
    fig = go.Figure(go.Bar(x=x, y=y, marker_color=colors, text=text, textposition="outside",
                           hovertemplate="%{x}: %{y:.4g}<extra></extra>"))
    if dense and dense.get(metric) is not None:
        fig.add_hline(y=dense[metric], line_dash="dash", line_color="#495057",
                      annotation_text=f"dense {dense[metric]:.2f}" if metric == "perplexity" else f"dense {dense[metric]:.0%}")
    if metric == "perplexity":
        finite = [v for v in y if v is not None and math.isfinite(v) and v > 0]
        fig.update_yaxes(type="log", title_text="perplexity (log scale, lower is better)")
        if finite:
            fig.update_yaxes(range=[math.log10(min(finite + [dense.get(metric, min(finite))]) * 0.7),
                                    math.log10(max(finite) * 3)])
    else:
        fig.update_yaxes(title_text="held-out accuracy (higher is better)", range=[0, 1.1], tickformat=".0%")
    fig.update_layout(title="Same budget, same calibration: STAT, the published peers and simple baselines", height=380,
                      margin={"l": 60, "r": 20, "t": 60, "b": 50}, title_font_size=13)
    return fig
