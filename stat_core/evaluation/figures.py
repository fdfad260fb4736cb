"""Plotly figures of a prune (plain data in, figures out): the heads heatmap, neurons by importance,
decay curves, the singular-value view and the comparison bars. The app (:mod:`stat_app.figures`) and
the HTML report (:mod:`stat_core.evaluation.html_report`) draw the same figures from here."""

from __future__ import annotations

import math
from textwrap import wrap

import numpy as np
import plotly.graph_objects as go
from plotly.colors import sample_colorscale
from plotly.subplots import make_subplots

from stat_core.methods.registry import OWN_METHOD, get_method
from stat_core.methods.stat.explain import head_reason_sentence

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


def head_heatmap(plan, reasons: list[list[dict]] | None = None) -> go.Figure:
    """Layers × heads: kept (green) or removed (red), shaded by importance; hover shows the head's
    rank in the decomposition, the predicted damage of the layer's chosen head set and, with
    ``reasons`` (:func:`stat_core.methods.stat.explain.head_reasons`), why it was kept or removed."""
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
                                  f"predicted damage of this head set: {dmg}"
                                  + (_wrap_reason(r, h in kept, reasons[lp.layer][h], lp)
                                     if reasons and reasons[lp.layer] else ""))
    colorscale = [[0.0, "#c92a2a"], [0.325, "#ffc9c9"], [0.5, "#f8f9fa"], [0.675, "#b2f2bb"], [1.0, "#2b8a3e"]]
    fig = go.Figure(go.Heatmap(z=z, x=[f"h{h}" for h in range(n_heads)], y=list(range(n_layers)), zmin=-1, zmax=1,
                               colorscale=colorscale, text=text, texttemplate="%{text}", hovertext=hover,
                               hoverinfo="text", xgap=1, ygap=1, showscale=False))
    kept_total = sum(len(lp.kept_heads) for lp in plan.layers)
    total = sum(lp.num_heads for lp in plan.layers)
    gqa = any(lp.num_kv_heads < lp.num_heads for lp in plan.layers)
    note = " · a KV group goes only with all its heads" if gqa else ""
    fig.update_layout(title=f"Attention heads: {kept_total}/{total} kept<br><sup>green kept · red removed · "
                            f"number = importance rank (1 = most important){note} · hover: why</sup>",
                      xaxis_title="head", yaxis_title="layer", height=max(320, 18 * n_layers + 120),
                      margin={"l": 60, "r": 20, "t": 60, "b": 50}, title_font_size=13)
    fig.update_yaxes(autorange="reversed", dtick=1 if n_layers <= 32 else 2)
    return fig


def _wrap_reason(rank: int, kept: bool, reason: dict, lp) -> str:
    """The hover's "why" line(s), wrapped at about 60 characters."""
    text = head_reason_sentence(rank, kept, reason, lp.num_kv_heads, len(lp.kept_kv_heads))
    return "<br>" + "<br>".join(wrap(text, 60))


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
    # one colour per layer from a continuous scale (a colour bar reads it), not a repeating palette
    n_max = max(len(plan.layers) - 1, 1)
    colors = sample_colorscale("Viridis", [lp.layer / n_max for lp in layers]) if many else ["#1c7ed6"]
    for i, lp in enumerate(layers):
        color = colors[i]
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
    if many:   # the colour bar that names the layers (an invisible trace carrying the scale)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", showlegend=False, hoverinfo="skip",
                                 marker={"colorscale": "Viridis", "cmin": 0, "cmax": n_max, "color": [0],
                                         "showscale": True,
                                         "colorbar": {"title": {"text": "layer"}, "thickness": 12, "len": 0.85}}),
                      row=1, col=1)
    fig.update_yaxes(type="log", title_text="predicted damage (Δ loss, log scale)", row=1, col=1)
    fig.update_yaxes(type="log", title_text="predicted damage (log scale)", row=1, col=2)
    fig.update_xaxes(title_text="kept neurons k", row=1, col=1)
    fig.update_xaxes(title_text="kept query heads (▼ = all kept)", row=1, col=2, dtick=1)
    title = "All layers" if many else f"Layer {layers[0].layer}" if layers else ""
    fig.update_layout(title=f"{title}: predicted damage vs kept units (× = chosen cut)", height=420,
                      margin={"l": 60, "r": 20, "t": 70, "b": 50}, title_font_size=13,
                      showlegend=False)
    return fig


def compare_figure(results: list[dict], dense: dict, metric: str) -> go.Figure:
    """One bar per method (log scale for perplexity), the dense model as a dashed line."""

    x = [get_method(r["method"]).label for r in results]
    y = [r.get(metric) for r in results]
    colors = ["#2b8a3e" if r["method"] == OWN_METHOD else "#adb5bd" for r in results]
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


# --- explanation views (numbers from stat_core.methods.stat.explain) -----------------------------------------

HEADS_CAPTION = ("Each square is one attention head: green kept, red removed; the number is its importance rank in "
                 "its layer (1 = the head whose loss would hurt the output most). With grouped-query attention every "
                 "kept KV group keeps the same number of its query heads (so stock code runs the result) and a KV "
                 "group is removed only with all its heads: a high-ranked head can go with its whole group, a "
                 "low-ranked one inside a kept group. Hover a square for why (its share of the layer's output "
                 "energy, and how much of a removed head's output the kept heads reproduce).")
DECAY_CAPTION = ("Predicted damage (the increase in loss STAT's correction cannot undo, log scale) against how many "
                 "units a layer keeps; × marks the chosen cut. All layers: colour = layer (colour bar). Steep curves "
                 "are layers where every unit counts.")
SPECTRUM_CAPTION = ("How much of each block's activation energy is lost when keeping k units: the interpolative "
                    "decomposition keeps whole heads/neurons (solid), the SVD keeps the best k abstract directions "
                    "(dashed, the floor no method can beat); the gap is the price of removing real units, the "
                    "dotted line is the cut this plan chose. Top: the singular values themselves.")
SPECTRUM_ALL_CAPTION = ("Per layer, the activation energy left out at the chosen cut: interpolative decomposition "
                        "(whole units, what STAT does) beside the SVD optimum for the same count. Pick a layer "
                        "above to see its whole curve.")
NEURON_CAPTION = ("Neurons sorted by how much output energy each carries (left = most), binned by percentile; colour = "
                  "the fraction of the bin kept (colour bar). A neuron's index means nothing, its energy does. ★ = a massive neuron (alone ≥10% of its "
                  "layer's MLP output energy).")
COMPARE_CAPTION = ("One bar per method at the same budget from the same calibration (STAT green): quick perplexity "
                   "on a log scale (lower is better) or held-out accuracy (higher is better); the dashed line is "
                   "the dense model. The table adds KL to the dense model's predictions and, with the suite "
                   "ticked, what perplexity hides: few-shot accuracy and AUC (the ranking of the two labels), the "
                   "share of prompts given the same label (dense: about 59% on SmolLM2; near 100% means the model "
                   "answers one label whatever the text), analogies, and agreement with the dense model's chat answers.")
HEAD_CAPTION = ("Where the chosen head looks on the sample text, in the dense model: row = the token reading, column "
                "= the token read, darker = more attention (rows sum to 1).")


def spectrum_figure(spectra: list[dict], layer: int | None = None) -> go.Figure:
    """One layer: singular values (top) and residual energy vs kept units for the ID and the SVD
    (bottom), attention and MLP side by side. All layers: both residuals at each layer's cut."""
    if layer is None:
        fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                            subplot_titles=("attention: energy left out at the cut", "MLP: energy left out at the cut"))
        for col, kind in ((1, "attn"), (2, "mlp")):
            layers = [sp[kind].layer for sp in spectra]
            cut = [sp[kind].kept if sp[kind].kept is not None else sp[kind].n_units for sp in spectra]
            idr = [sp[kind].id_residual[k] for sp, k in zip(spectra, cut)]
            svd = [sp[kind].svd_residual[k] for sp, k in zip(spectra, cut)]
            unit = "heads" if kind == "attn" else "neurons"
            fig.add_trace(go.Bar(x=layers, y=idr, name="interpolative decomposition (whole units)", marker_color="#1c7ed6",
                                 legendgroup="id", showlegend=col == 1, customdata=cut,
                                 hovertemplate=f"layer %{{x}}: keep %{{customdata}} {unit} → %{{y:.2%}} of the energy "
                                               "left out<extra>ID</extra>"), row=1, col=col)
            fig.add_trace(go.Bar(x=layers, y=svd, name="SVD optimum (same count)", marker_color="#adb5bd",
                                 legendgroup="svd", showlegend=col == 1, customdata=cut,
                                 hovertemplate=f"layer %{{x}}: best rank for %{{customdata}} {unit} → %{{y:.2%}}"
                                               "<extra>SVD</extra>"), row=1, col=col)
            fig.update_xaxes(title_text="layer", row=1, col=col)
            fig.update_yaxes(tickformat=".1%", row=1, col=col)
        fig.update_layout(barmode="group", title="Singular-value view, all layers: what the cut leaves out",
                          height=380, margin={"l": 60, "r": 20, "t": 70, "b": 50}, title_font_size=13,
                          legend={"orientation": "h", "y": -0.2})
        return fig
    sp = spectra[int(layer)]
    fig = make_subplots(rows=2, cols=2, row_heights=[0.38, 0.62], vertical_spacing=0.12, horizontal_spacing=0.09,
                        subplot_titles=("attention: singular values", "MLP: singular values",
                                        "attention: energy left out vs kept heads", "MLP: energy left out vs kept neurons"))
    for col, kind in ((1, "attn"), (2, "mlp")):
        s = sp[kind]
        sv = np.asarray(s.singular_values)
        x_sv = np.arange(1, len(sv) + 1) / s.unit_width
        unit = "heads" if kind == "attn" else "neurons"
        fig.add_trace(go.Scatter(x=x_sv, y=_positive(sv), mode="lines", line={"color": "#495057", "width": 1.5},
                                 showlegend=False, customdata=np.arange(1, len(sv) + 1),
                                 hovertemplate="σ_%{customdata} = %{y:.3g}<extra></extra>"), row=1, col=col)
        k = np.arange(s.n_units + 1)
        fig.add_trace(go.Scatter(x=k, y=_positive(s.id_residual), mode="lines", name="interpolative decomposition",
                                 legendgroup="id", showlegend=col == 1, line={"color": "#1c7ed6", "width": 2},
                                 hovertemplate=f"keep %{{x}} {unit} (STAT's order) → %{{y:.3%}} left out<extra>ID</extra>"),
                      row=2, col=col)
        fig.add_trace(go.Scatter(x=k, y=_positive(s.svd_residual), mode="lines", name="SVD optimum", legendgroup="svd",
                                 showlegend=col == 1, line={"color": "#868e96", "width": 2, "dash": "dash"},
                                 hovertemplate=f"best rank for %{{x}} {unit} → %{{y:.3%}} left out<extra>SVD</extra>"),
                      row=2, col=col)
        if s.kept is not None:
            fig.add_vline(x=s.kept, line_dash="dot", line_color=REMOVED, row=2, col=col)
            fig.add_vline(x=s.kept, line_dash="dot", line_color=REMOVED, row=1, col=col)
        fig.update_yaxes(type="log", row=1, col=col)
        fig.update_yaxes(type="log", tickformat=".1e", row=2, col=col)
        fig.update_xaxes(title_text=f"kept {unit} (directions ÷ {s.unit_width})" if s.unit_width > 1 else f"kept {unit}",
                         row=2, col=col)
    cuts = ", ".join(f"{('heads', 'neurons')[i]} {sp[k].kept}/{sp[k].n_units}" for i, k in enumerate(("attn", "mlp"))
                     if sp[k].kept is not None)
    fig.update_layout(title=f"Layer {sp['mlp'].layer}: singular-value decay and what the interpolative decomposition "
                            f"gives up{' (cut: ' + cuts + ')' if cuts else ''}", height=560,
                      margin={"l": 60, "r": 20, "t": 70, "b": 50}, title_font_size=13,
                      legend={"orientation": "h", "y": -0.12})
    return fig


def neuron_profile(plan, importance: list, massive: list[list[int]], bins: int = 40) -> go.Figure:
    """Layers × importance percentile (most important left): fraction kept per bin, massive
    neurons starred; the kept fraction per layer on the right."""
    n_layers = len(plan.layers)
    z = np.zeros((n_layers, bins))
    star_x, star_y, star_text = [], [], []
    for lp, energy in zip(plan.layers, importance):
        e = np.asarray(energy, dtype=float)
        order = np.argsort(-e, kind="stable")
        kept = np.zeros(len(e))
        kept[lp.kept_neurons] = 1.0
        pos = np.empty(len(e), dtype=int)
        pos[order] = np.arange(len(e))
        idx = np.minimum(pos * bins // len(e), bins - 1)
        z[lp.layer] = np.bincount(idx, weights=kept, minlength=bins) / np.maximum(np.bincount(idx, minlength=bins), 1)
        total = e.sum() or 1.0
        for j in massive[lp.layer]:
            star_x.append(int(idx[j]))
            star_y.append(lp.layer)
            star_text.append(f"layer {lp.layer}, neuron {j}: {e[j] / total:.0%} of the layer's MLP output energy, "
                             f"{'kept' if kept[j] else 'REMOVED'}")
    frac = [len(lp.kept_neurons) / lp.intermediate_size for lp in plan.layers]
    fig = make_subplots(rows=1, cols=2, column_widths=[0.75, 0.25], shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=("kept fraction by importance percentile (left = most energy)",
                                        "kept per layer"))
    labels = [f"{100 * b / bins:.0f}–{100 * (b + 1) / bins:.0f}%" for b in range(bins)]
    fig.add_trace(go.Heatmap(z=z, x=list(range(bins)), y=list(range(n_layers)), zmin=0, zmax=1, colorscale="Greens",
                             customdata=np.array([labels] * n_layers),
                             hovertemplate="layer %{y}, importance percentile %{customdata}<br>kept %{z:.0%}<extra></extra>",
                             showscale=True, colorbar={"title": {"text": "kept"}, "tickformat": ".0%", "x": 1.02,
                                                       "thickness": 12, "len": 0.8}), row=1, col=1)
    if star_x:
        fig.add_trace(go.Scatter(x=star_x, y=star_y, mode="markers", marker={"symbol": "star", "size": 12,
                                                                             "color": "#f08c00",
                                                                             "line": {"width": 1, "color": "black"}},
                                 hovertext=star_text, hoverinfo="text", name="massive neuron", showlegend=False),
                      row=1, col=1)
    fig.add_trace(go.Bar(x=frac, y=list(range(n_layers)), orientation="h", marker_color=KEPT,
                         hovertemplate="layer %{y}: %{x:.1%} of neurons kept<extra></extra>", showlegend=False),
                  row=1, col=2)
    kept_total = sum(len(lp.kept_neurons) for lp in plan.layers)
    total = sum(lp.intermediate_size for lp in plan.layers)
    n_massive = sum(len(m) for m in massive)
    fig.update_layout(title=f"MLP neurons: {kept_total:,}/{total:,} kept ({kept_total / total:.0%}); "
                            f"{n_massive} massive neuron{'s' if n_massive != 1 else ''} (★)",
                      height=max(320, 18 * n_layers + 120), margin={"l": 60, "r": 80, "t": 70, "b": 50},
                      title_font_size=13)
    fig.update_yaxes(autorange="reversed", title_text="layer", row=1, col=1)
    step = max(bins // 10, 1)
    fig.update_xaxes(title_text=f"importance percentile (most output energy left; bins of {100 / bins:.1f}%)",
                     tickvals=[b - 0.5 for b in range(0, bins + 1, step)],
                     ticktext=[f"{100 * b / bins:.0f}%" for b in range(0, bins + 1, step)], row=1, col=1)
    fig.update_xaxes(range=[0, 1], tickformat=".0%", row=1, col=2)
    return fig


