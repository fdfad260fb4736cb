"""Why STAT keeps what it keeps: the numbers behind the app's explanation views.

Everything here reads the calibration statistics already collected (the Grams ``G = ZᵀZ`` of each
block's per-head attention outputs and MLP activations) and the dense model's weights; nothing
needs another pass over the data except :func:`attention_pattern`, which runs the dense model on a
short sample text.

- :func:`layer_spectrum`: the singular values of the activations ``Z`` (from the eigenvalues of
  ``G``, no SVD of ``Z``), the interpolative decomposition's residual ``‖Z − Z_I T‖²`` at every
  kept count along the order STAT keeps units in, and the SVD's optimal residual at the same count
  (``Σ_{j>k} σ_j²``: the best *any* rank-``k`` approximation can do). The gap between the two is
  what keeping whole units — real heads and neurons, not abstract directions — costs.
- :func:`head_details`: one head's rank, the predicted damage of its layer's kept set, whether it
  was kept, and for a removed head the share of its output the kept heads reconstruct (what the
  correction folded into the output projection recovers).
- :func:`neuron_importance` / :func:`massive_units`: each neuron's output energy
  ``E[z_j²]·‖W_out[:, j]‖²`` — the index of a neuron means nothing, its energy does — and the
  "massive" units that alone carry a large share of a layer's output energy.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import scipy.linalg
import torch

from stat_core.adapters import get_adapter
from stat_core.calibration.statistics import BlockStats
from stat_core.linalg import cholesky_with_ridge, ridge_of
from stat_core.surgery.apply import head_columns
from stat_core.methods.stat.analysis import analyses_for
from stat_core.methods.stat.induction import induction_scores

MASSIVE_SHARE = 0.10  # a "massive" unit alone carries ≥ 10% of its layer's output energy


@dataclass
class Spectrum:
    """One layer's block (``kind`` ``"attn"`` or ``"mlp"``), energies relative to ``‖Z‖²_F``.

    ``singular_values[j]`` = σ_j of the activations ``Z`` (descending, absolute);
    ``id_residual[k]`` / ``svd_residual[k]``: fraction of the activation energy not captured when
    keeping ``k`` units (heads or neurons), ``k = 0 … n_units``; ``unit_width`` columns per unit;
    ``kept`` = the plan's kept count (``None`` without a plan).
    """

    layer: int
    kind: str
    singular_values: list[float]
    id_residual: list[float]
    svd_residual: list[float]
    unit_width: int
    kept: int | None = None

    @property
    def n_units(self) -> int:
        return len(self.id_residual) - 1

    def gap_at(self, k: int) -> float:
        """ID residual minus the SVD optimum at ``k`` kept units (≥ 0 up to rounding)."""
        return self.id_residual[k] - self.svd_residual[k]


def _captured_along(gram: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """Cumulative energy ``‖P_{Z[:, c_1..c_i]} Z‖²`` captured by the first ``i`` columns of ``columns``:
    the squared column norms of the Cholesky factor of the Gram permuted to that order (a tiny
    scale-aware ridge keeps rank-deficient Grams factorable, raised until it factors: a Gram summed in
    float32 from fewer tokens than columns can have eigenvalues slightly below zero)."""
    g = gram[columns][:, columns].to(torch.float64)
    chol = cholesky_with_ridge(g, ridge_of(g))
    # Z[:, cols] = Q R with R = Lᵀ: the energy of Z along the i-th new direction q_i is ‖R[i, :]‖² = ‖L[:, i]‖²
    return torch.cumsum((chol ** 2).sum(dim=0), dim=0)


def layer_spectrum(stats: BlockStats, kind: str, unit_order, head_dim: int = 1, centered: bool = False,
                   kept: int | None = None, layer: int = 0) -> Spectrum:
    """The singular-value view of one block (see the module docstring). ``unit_order``: the units in
    the order STAT keeps them (``LayerAnalysis.head_order`` or ``.neuron_order``); ``head_dim``: the
    columns per unit (1 for neurons)."""
    gram = stats.second_moment(kind, centered).to(torch.float64)
    order = [int(u) for u in (unit_order.tolist() if torch.is_tensor(unit_order) else unit_order)]
    width = head_dim if kind == "attn" else 1
    n_cols = gram.shape[0]
    if len(order) * width != n_cols:
        raise ValueError(f"unit order covers {len(order) * width} columns, the statistics have {n_cols}")
    total = float(torch.trace(gram))
    if total <= 0:
        raise ValueError(f"layer {layer} {kind}: the calibration activations are all zero")
    # σ_j² descending; LAPACK's relatively robust representation driver, eigenvalues only (3× faster
    # than torch.linalg.eigvalsh's divide-and-conquer here)
    eig = torch.from_numpy(scipy.linalg.eigh(gram.cpu().numpy(), eigvals_only=True, driver="evr",
                                             check_finite=False).copy()).clamp_min(0).flip(0)
    columns = head_columns(order, width) if width > 1 else torch.tensor(order)
    captured = _captured_along(gram, columns)                        # along STAT's order
    captured = torch.cat([captured.new_zeros(1), captured])
    id_res = (1.0 - captured[::width] / total).clamp_min(0.0)        # after k whole units
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(eig, [0]), 0), [0]), eig.new_zeros(1)])
    svd_res = (tail[::width] / total).clamp_min(0.0)                 # Σ_{j ≥ k·width} σ_j²
    svd_res = svd_res.clamp_max(1.0)
    id_res = torch.maximum(id_res, svd_res)                          # the optimum is a floor (ridge rounding)
    return Spectrum(layer=layer, kind=kind, singular_values=eig.sqrt().tolist(), id_residual=id_res.tolist(),
                    svd_residual=svd_res.tolist(), unit_width=width, kept=kept)


def calibration_spectra(model, calibration, centered: bool | None = None) -> list[dict[str, Spectrum]]:
    """``[{"attn": Spectrum, "mlp": Spectrum}]`` per layer, computed once per calibration (an
    eigendecomposition and a Cholesky per block) and kept in ``calibration.extras``."""
    adapter = get_adapter(model)
    centered = calibration.centered if centered is None else centered
    key = f"spectra_centered={centered}"
    if key not in calibration.extras:
        analyses = analyses_for(calibration, adapter, centered)
        calibration.extras[key] = [
            {"attn": layer_spectrum(stats, "attn", an.head_order, adapter.head_dim, centered, layer=i),
             "mlp": layer_spectrum(stats, "mlp", an.neuron_order, 1, centered, layer=i)}
            for i, (stats, an) in enumerate(zip(calibration.dense_stats, analyses))]
    return calibration.extras[key]


def plan_spectra(model, calibration, plan, centered: bool | None = None) -> list[dict[str, Spectrum]]:
    """:func:`calibration_spectra` with the plan's kept head and neuron counts marked."""
    spectra = calibration_spectra(model, calibration, centered)
    return [{"attn": replace(sp["attn"], kept=len(lp.kept_heads)), "mlp": replace(sp["mlp"], kept=len(lp.kept_neurons))}
            for sp, lp in zip(spectra, plan.layers)]


def _reconstructed_share(gram: torch.Tensor, w_out: torch.Tensor, kept_cols: torch.Tensor,
                         target_cols: torch.Tensor) -> float:
    """Share of the target columns' output energy ``‖W_t z_t‖²`` that the best linear map from the
    kept columns reproduces: ``1 − tr(W_t S W_tᵀ) / tr(W_t G_tt W_tᵀ)`` with ``S`` the Schur
    complement ``G_tt − G_tk G_kk⁻¹ G_kt`` (exactly what the least-squares correction leaves)."""
    g = gram.to(torch.float64)
    w = w_out[:, target_cols].to(torch.float64)
    g_tt = g[target_cols][:, target_cols]
    full = float(torch.einsum("ij,jk,ik->", w, g_tt, w))
    if full <= 0:
        return 0.0
    if len(kept_cols) == 0:
        return 0.0
    g_kk = g[kept_cols][:, kept_cols]
    g_kt = g[kept_cols][:, target_cols]
    ridge = ridge_of(g_kk)
    sol = torch.linalg.solve(g_kk + ridge * torch.eye(len(kept_cols), dtype=g.dtype), g_kt)
    schur = g_tt - g_kt.T @ sol
    left = float(torch.einsum("ij,jk,ik->", w, schur, w))
    return max(0.0, min(1.0, 1.0 - left / full))


def head_details(model, calibration, plan, layer: int, head: int) -> dict:
    """What the app's head explorer shows for one head (dense statistics, the plan's choice)."""
    adapter = get_adapter(model)
    lp = plan.layers[layer]
    if not 0 <= head < lp.num_heads:
        raise ValueError(f"layer {layer} has heads 0–{lp.num_heads - 1}; head {head} does not exist")
    order = lp.head_order or analyses_for(calibration, adapter, calibration.centered)[layer].head_order
    rank = list(order).index(head) + 1 if head in order else None
    kept = head in lp.kept_heads
    stats = calibration.dense_stats[layer]
    gram = stats.second_moment("attn", calibration.centered)
    w_out = adapter.attn_out_proj(layer).weight.detach().cpu()
    hd = adapter.head_dim
    cols = head_columns([head], hd)
    g_hh = gram[cols][:, cols].to(torch.float64)
    w_h = w_out[:, cols].to(torch.float64)
    energy = float(torch.einsum("ij,jk,ik->", w_h, g_hh, w_h)) / max(stats.n_tokens, 1)
    layer_energy = 0.0
    for h in range(lp.num_heads):
        c = head_columns([h], hd)
        layer_energy += float(torch.einsum("ij,jk,ik->", w_out[:, c].to(torch.float64), gram[c][:, c].to(torch.float64),
                                           w_out[:, c].to(torch.float64))) / max(stats.n_tokens, 1)
    damage = None
    for opt in lp.attn_options:
        if opt["heads"] == len(lp.kept_heads) and opt["kv_heads"] == len(lp.kept_kv_heads):
            damage = opt["damage"]
    share = None
    if not kept:
        share = _reconstructed_share(gram, w_out, head_columns(sorted(lp.kept_heads), hd), cols)
    return {"layer": layer, "head": head, "kv_group": head // max(lp.num_heads // max(lp.num_kv_heads, 1), 1),
            "rank": rank, "num_heads": lp.num_heads, "kept": kept, "layer_damage": damage,
            "output_energy": energy, "output_energy_share": energy / layer_energy if layer_energy > 0 else 0.0,
            "reconstructed_share": share, "kept_heads": len(lp.kept_heads),
            "why": head_reason_sentence(rank, kept, head_reasons(model, calibration, plan, only=layer)[layer][head],
                                        lp.num_kv_heads, len(lp.kept_kv_heads))}


def head_sentence(details: dict) -> str:
    """:func:`head_details` in plain words: rank, energy share, kept or removed (and then how much of
    its output the kept heads reconstruct), the layer's head count and predicted damage."""
    d = details
    if d["kept"]:
        fate = "kept"
    else:
        fate = (f"removed; the kept heads of this layer reconstruct {d['reconstructed_share']:.0%} of its "
                "output (that part is folded into the output projection by the correction)")
    damage = d["layer_damage"]
    return (f"Layer {d['layer']}, head {d['head']} (KV group {d['kv_group']}): importance rank {d['rank']} of "
            f"{d['num_heads']}, {d['output_energy_share']:.0%} of the layer's attention output energy; "
            f"{fate}. The layer keeps {d['kept_heads']}/{d['num_heads']} heads"
            + (f", predicted damage {damage:.3g}." if damage is not None else ".")
            + (f" Why: {d['why']}" if d.get("why") else "")
            + (f" Induction score {d['induction_score']:.2f} (on a random token sequence shown twice, the mean "
               "attention it pays to the token after the current token's first occurrence: in-context copying "
               "heads score high, most heads near 0)." if d.get("induction_score") is not None else ""))


def neuron_importance(model, stats: list[BlockStats]) -> list[torch.Tensor]:
    """Per layer, each MLP neuron's mean output energy ``E[z_j²]·‖W_out[:, j]‖²`` (float64, CPU)."""
    adapter = get_adapter(model)
    out = []
    for i, s in enumerate(stats):
        w = adapter.mlp_out_proj(i).weight.detach().to("cpu", torch.float64)
        second = torch.diagonal(s.mlp_gram).to("cpu", torch.float64) / max(s.n_tokens, 1)
        out.append(second * (w ** 2).sum(dim=0))
    return out


def calibration_neuron_importance(model, calibration) -> list[torch.Tensor]:
    """:func:`neuron_importance` of the dense statistics, kept in ``calibration.extras``."""
    if "neuron_importance" not in calibration.extras:
        calibration.extras["neuron_importance"] = neuron_importance(model, calibration.dense_stats)
    return calibration.extras["neuron_importance"]


def massive_units(energy: torch.Tensor, share: float = MASSIVE_SHARE) -> list[int]:
    """Units each carrying at least ``share`` of their layer's total output energy (a uniform unit
    carries ``1/n``: with 1,536 neurons 10% is 150× its fair share), sorted by index."""
    total = float(energy.sum())
    if total <= 0:
        return []
    return torch.nonzero(energy >= share * total).flatten().tolist()


@torch.no_grad()
def attention_pattern(model, tokenizer, text: str, layer: int, head: int, max_tokens: int = 48) -> dict:
    """The dense model's attention weights of one head on ``text``: ``{"tokens", "weights"}`` with
    ``weights[i][j]`` = how much token ``i`` attends to token ``j`` (rows sum to 1). Runs once with
    the eager attention implementation (the fused kernels do not return weights), then restores it."""
    if not (text or "").strip():
        raise ValueError("Type a short sample text to see where the head attends.")
    adapter = get_adapter(model)
    n_layers = len(adapter.layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"the model has layers 0–{n_layers - 1}; layer {layer} does not exist")
    n_heads = adapter.layer_shape(layer).num_heads
    if not 0 <= head < n_heads:
        raise ValueError(f"layer {layer} has heads 0–{n_heads - 1}; head {head} does not exist")
    device = next(model.parameters()).device
    enc = tokenizer(text, return_tensors="pt", truncation=True, max_length=max_tokens)
    enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    previous = getattr(model.config, "_attn_implementation", None)
    model.set_attn_implementation("eager")
    try:
        out = model(**enc, output_attentions=True)
    finally:
        if previous and previous != "eager":
            model.set_attn_implementation(previous)
    weights = out.attentions[layer][0, head].float().cpu()
    ids = enc["input_ids"][0].tolist()
    tokens = [tokenizer.decode([t]) for t in ids]
    return {"tokens": tokens, "weights": weights.tolist()}


def plan_explanations(model, calibration, plan) -> dict:
    """What the inspect views draw beside a plan: per-layer spectra with the plan's cuts
    (``spectra``), neuron output energies (``importance``) and the massive neurons of each layer
    (``massive``); computed once per calibration, after that only the cuts move."""
    importance = calibration_neuron_importance(model, calibration)
    return {"spectra": plan_spectra(model, calibration, plan),
            "importance": importance, "massive": [massive_units(e) for e in importance]}


def head_view(model, tokenizer, calibration, plan, layer, head, text: str) -> tuple[dict, dict]:
    """``(pattern, details)`` of the head explorer: :func:`attention_pattern` on ``text`` and
    :func:`head_details`; ``layer`` and ``head`` may be strings or floats from a form (ValueError
    with one sentence if they are not numbers in range)."""
    try:
        layer, head = int(layer), int(head)
    except (TypeError, ValueError):
        raise ValueError("Pick a layer and a head by number (e.g. layer 3, head 0).") from None
    n_layers = len(plan.layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"The model has layers 0–{n_layers - 1}; pick one of those.")
    details = head_details(model, calibration, plan, layer, head)
    if get_adapter(model).is_decoder:
        details["induction_score"] = calibration_induction_scores(model, calibration)[layer][details["head"]]
    return attention_pattern(model, tokenizer, text, layer, head), details


def calibration_induction_scores(model, calibration) -> list[list[float]]:
    """:func:`stat_core.methods.stat.induction.induction_scores` of the dense ``model``, computed once
    per calibration (``calibration.extras``, the key STAT's induction protection reads too)."""
    if "induction_scores" not in calibration.extras:
        calibration.extras["induction_scores"] = induction_scores(model)
    return calibration.extras["induction_scores"]


def head_reasons(model, calibration, plan, only: int | None = None) -> list[list[dict]]:
    """Per layer, per head, the numbers behind "why was this head kept or removed":
    ``energy_share`` (its share of the layer's attention output energy through the output
    projection, ``tr(W_h G_hh W_hᵀ)`` over the sum for all heads), ``kv_group``, ``group_kept``
    (whether its KV group survives), ``group_heads_kept`` (query heads kept in that group) and, for a
    removed head, ``reconstructed_share`` (the share of its output the kept heads reproduce through
    the least-squares correction: the Schur complement, as :func:`head_details`). One joint solve
    per layer; the energies are computed once per calibration (``calibration.extras``). ``only``: one
    layer's list (the others empty)."""
    adapter = get_adapter(model)
    hd = adapter.head_dim
    key = f"head_energy_centered={calibration.centered}"
    if key not in calibration.extras:
        energies = []
        for lp, stats in zip(plan.layers, calibration.dense_stats):
            gram = stats.second_moment("attn", calibration.centered).to(torch.float64)
            w = adapter.attn_out_proj(lp.layer).weight.detach().to("cpu", torch.float64)
            e = []
            for h in range(lp.num_heads):
                c = head_columns([h], hd)
                e.append(float(torch.einsum("ij,jk,ik->", w[:, c], gram[c][:, c], w[:, c])))
            energies.append(e)
        calibration.extras[key] = energies
    energies = calibration.extras[key]
    out = []
    for lp, stats, e in zip(plan.layers, calibration.dense_stats, energies):
        if only is not None and lp.layer != only:
            out.append([])
            continue
        group = lp.num_heads // max(lp.num_kv_heads, 1)
        kept = set(lp.kept_heads)
        total = sum(e) or 1.0
        removed = [h for h in range(lp.num_heads) if h not in kept]
        shares: dict[int, float] = {}
        if removed:
            gram = stats.second_moment("attn", calibration.centered).to(torch.float64)
            w = adapter.attn_out_proj(lp.layer).weight.detach().to("cpu", torch.float64)
            r_cols = head_columns(removed, hd)
            g_rr = gram[r_cols][:, r_cols]
            if kept:
                k_cols = head_columns(sorted(kept), hd)
                g_kk = gram[k_cols][:, k_cols]
                g_kr = gram[k_cols][:, r_cols]
                sol = torch.linalg.solve(g_kk + ridge_of(g_kk) * torch.eye(len(k_cols), dtype=gram.dtype), g_kr)
                schur = g_rr - g_kr.T @ sol
            else:
                schur = g_rr
            for i, h in enumerate(removed):
                c = slice(i * hd, (i + 1) * hd)
                wh = w[:, head_columns([h], hd)]
                full = float(torch.einsum("ij,jk,ik->", wh, g_rr[c, c], wh))
                left = float(torch.einsum("ij,jk,ik->", wh, schur[c, c], wh))
                shares[h] = 0.0 if full <= 0 else max(0.0, min(1.0, 1.0 - left / full))
        rows = []
        for h in range(lp.num_heads):
            g = h // max(group, 1)
            rows.append({"energy_share": e[h] / total, "kv_group": g, "group_kept": g in lp.kept_kv_heads,
                         "group_heads_kept": sum(1 for k in kept if k // max(group, 1) == g),
                         "group_size": group, "reconstructed_share": shares.get(h)})
        out.append(rows)
    return out


def head_reason_sentence(rank: int | None, kept: bool, reason: dict, num_kv: int, kept_kv: int) -> str:
    """Why one head was kept or removed, in one or two plain sentences from :func:`head_reasons`."""
    r = reason
    energy = f"it carried {r['energy_share']:.0%} of the layer's attention output energy"
    if kept:
        return f"Kept: {energy}."
    if r["reconstructed_share"] is None:
        return f"Removed: {energy}."
    recon = (f"the kept heads reproduce {r['reconstructed_share']:.0%} of its output, and the correction folds "
             "that part into o_proj")
    if not r["group_kept"] and r["group_size"] > 1:
        why = (f"Removed with its whole KV group {r['kv_group']} (the layer keeps {kept_kv} of {num_kv} groups: "
               "the other groups gave a lower least-squares output error)")
        if rank == 1:
            why += "; even the layer's rank-1 head goes when its group does"
        return f"{why}; {energy}; {recon}."
    if r["group_size"] > 1:
        return (f"Removed (its KV group keeps its {r['group_heads_kept']} better-ranked head(s)); {energy}; "
                f"{recon}.")
    return f"Removed: {energy}; {recon} (little is lost: the layer's least-squares damage stays low)."
