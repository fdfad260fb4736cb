"""Applying a plan: slicing heads and neurons and folding the corrections into the output projections."""

from __future__ import annotations

import torch

from stat_core.adapters import ModelAdapter, get_adapter
from stat_core.calibration.statistics import BlockStats
from stat_core.linalg import (
    cholesky_with_ridge,
    interpolation_from_rows,
    kept_rows,
    ridge_of,
)
from stat_core.surgery.budget import new_bias_kinds
from stat_core.surgery.plan import LayerPlan, PrunePlan

_WITHOUT_BIAS = {"affine": "least-squares", "mean-bias": "none"}


def apply_layer_(adapter: ModelAdapter, lp: LayerPlan, stats: BlockStats | None, correction: str = "least-squares",
                 ridge_rel: float | None = None, uniform: bool = False, release: bool = False) -> None:
    """Cut one layer to ``lp`` and compensate the removed units as ``correction`` says (see
    ``stat_core.methods.CORRECTIONS``); ``stats=None`` means no correction. ``uniform``: create
    output biases only where a stock config can declare them (see :func:`new_bias_kinds`).
    ``release``: each Gram of ``stats`` is freed as soon as its correction has read the rows it
    needs (layer streaming: do not use ``stats`` afterwards); the same results."""
    for kind in ("attn", "mlp"):
        _apply_kind_(adapter, lp, kind, stats, correction, uniform, None, ridge_rel, release)


def _apply_kind_(adapter: ModelAdapter, lp: LayerPlan, kind: str, stats: BlockStats | None, correction: str,
                 uniform: bool, paired=None, ridge_rel: float | None = None, release: bool = False) -> None:
    """Cut the ``kind`` block (``"attn"`` or ``"mlp"``) of one layer to ``lp`` with its correction;
    with ``paired`` (:class:`~stat_core.calibration.statistics.PairedStats`) least-squares and affine corrections
    reproduce the dense path's activations (:func:`dense_target_correction`)."""
    layer = lp.layer
    shape = adapter.layer_shape(layer)
    if stats is None:
        correction = "none"
    stats = on_compute_device(adapter, layer, stats)
    if paired is not None and stats is not None and stats.attn_gram.device.type == "cuda":
        paired = paired.to(stats.attn_gram.device)
    proj = adapter.attn_out_proj(layer) if kind == "attn" else adapter.mlp_out_proj(layer)
    if proj.bias is None and kind not in new_bias_kinds(adapter, uniform):
        correction = _WITHOUT_BIAS.get(correction, correction)
    if kind == "attn":
        if len(lp.kept_heads) == shape.num_heads:
            return
        cols = head_columns(lp.kept_heads, adapter.head_dim)
    else:
        if len(lp.kept_neurons) == shape.intermediate_size:
            return
        cols = torch.tensor(lp.kept_neurons, dtype=torch.long)
    dense_w = proj.weight.detach()
    if paired is not None and correction in ("least-squares", "affine"):
        new_w, bias = dense_target_correction(dense_w, stats, paired, kind, cols, correction == "affine", ridge_rel)
    else:
        new_w, bias = _correction(dense_w, stats, kind, cols, correction, ridge_rel, release)
    if kind == "attn":
        adapter.prune_heads_(layer, lp.kept_heads, lp.kept_kv_heads, new_w)
    else:
        adapter.prune_neurons_(layer, lp.kept_neurons, new_w)
    if bias is not None:
        adapter.add_out_bias_(layer, kind, bias)


def _correction(weight: torch.Tensor, stats: BlockStats | None, kind: str, kept_cols: torch.Tensor,
                correction: str, ridge_rel: float | None, release: bool = False
                ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(new output weight, bias to add)`` for one block, from the dense ``W: (d_out, n_units)``.

    ``least-squares``: ``W Tᵀ`` with ``Z ≈ Z_I T`` (no bias). ``affine``: ``Z ≈ Z_I T + 1cᵀ``, ``T``
    from the centred statistics, ``c = μ − Tᵀ μ_I``, giving ``W Tᵀ`` and the bias ``W c``.
    ``mean-bias`` (FLAP): the kept columns and the bias ``W[:, removed] μ_removed``. ``none``: the
    kept columns. ``None`` for the weight means "keep the kept columns as they are".
    """
    if correction == "none":
        return None, None
    if correction == "mean-bias":
        return None, removed_mean_contribution(weight, stats.mean(kind), kept_cols)
    if correction not in ("least-squares", "affine"):
        raise ValueError(f"unknown correction {correction!r}")
    centered = correction == "affine"
    gram = stats.second_moment(kind, centered).to(torch.float64)
    ridge = ridge_of(gram) if ridge_rel is None else ridge_of(gram, ridge_rel)
    kept = kept_cols.to(gram.device)
    rows = kept_rows(gram, kept)  # all interpolation_matrix reads: with release the n×n Gram goes now
    del gram
    if release:
        setattr(stats, f"{kind}_gram", None)
    interp = interpolation_from_rows(rows, kept, ridge)
    del rows
    w64 = weight.to(interp.device, torch.float64)
    new_w = (w64 @ interp.T).to(weight.dtype)
    if not centered:
        return new_w, None
    mu = stats.mean(kind).to(interp.device, torch.float64)
    c = mu - interp.T @ mu[kept_cols.to(interp.device)]
    return new_w, (w64 @ c).cpu()


def removed_mean_contribution(weight: torch.Tensor, mean: torch.Tensor, kept_cols: torch.Tensor) -> torch.Tensor:
    """``W[:, removed] · mean(z_removed)``: ``(d_out,)``, the removed columns' average output (FLAP's
    bias compensation), from the dense ``W: (d_out, n_units)`` and the column means ``(n_units,)``."""
    removed = torch.ones(weight.shape[1], dtype=torch.bool)
    removed[kept_cols.cpu()] = False
    return weight.to("cpu", torch.float64)[:, removed] @ mean.to("cpu", torch.float64)[removed]


def apply_plan_(model, plan: PrunePlan, stats: list[BlockStats] | None, progress=None) -> None:
    """Apply ``plan`` to a dense ``model`` in place; ``stats=None`` means no correction.
    ``progress(stage, done, total)``: ``("surgery", layers done, layers)`` after each layer."""
    adapter = get_adapter(model)
    if len(plan.layers) != adapter.num_layers:
        raise ValueError(f"plan has {len(plan.layers)} layers, model has {adapter.num_layers}")
    for lp in plan.layers:
        shape = adapter.layer_shape(lp.layer)
        if (shape.num_heads, shape.intermediate_size) != (lp.num_heads, lp.intermediate_size):
            raise ValueError(f"layer {lp.layer} of the model is already pruned or differs from the plan")
        apply_layer_(adapter, lp, None if stats is None else stats[lp.layer], plan.correction, plan.correction_ridge,
                     bool(plan.budget.get("uniform")))
        if progress is not None:
            progress("surgery", lp.layer + 1, len(plan.layers))
    adapter.record_shapes_in_config_()


def head_columns(heads, head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


def on_compute_device(adapter: ModelAdapter, layer: int, stats: BlockStats | None) -> BlockStats | None:
    """The statistics on the layer's GPU when the model is on one (they are kept on the CPU between
    blocks): the float64 decompositions and corrections then run there. On a Llama-2-7B shape the
    host-side analysis was 73% of an H100 prune (benchmarks/results/scale.json)."""
    dev = adapter.attn_out_proj(layer).weight.device
    return stats.to(dev) if stats is not None and dev.type == "cuda" else stats


def dense_target_correction(weight: torch.Tensor, stats: BlockStats, paired, kind: str, kept_cols: torch.Tensor,
                            affine: bool, ridge_rel: float | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(new output weight, bias or None)`` mapping the pruned path's kept units onto the dense
    path's activations: ``Z_d ≈ Z[:, I] T (+ 1cᵀ)``, ``T = G[I, I]⁻¹ X[I, :]`` with the pruned
    path's Gram ``G = ZᵀZ`` and the cross products ``X = ZᵀZ_d`` (centred for ``affine``), so the
    new weight is ``W Tᵀ`` and the bias ``W c`` with ``c = μ_d − Tᵀ μ_I``."""
    gram = stats.second_moment(kind).to(torch.float64)
    cross = paired.cross[kind].to(gram.device, torch.float64)
    n = max(paired.n_tokens, 1)
    if affine:
        mu = stats.mean(kind).to(gram.device, torch.float64)
        mu_d = paired.dense_sum[kind].to(gram.device, torch.float64) / n
        gram = gram - n * torch.outer(mu, mu)
        cross = cross - n * torch.outer(mu, mu_d)
    kept = kept_cols.to(gram.device)
    ridge = ridge_of(gram) if ridge_rel is None else ridge_of(gram, ridge_rel)
    factor = cholesky_with_ridge(gram[kept][:, kept], ridge)
    interp = torch.cholesky_solve(cross[kept], factor)  # (k, n)
    w64 = weight.to(interp.device, torch.float64)
    new_w = (w64 @ interp.T).to(weight.dtype)
    if not affine:
        return new_w, None
    c = mu_d - interp.T @ mu[kept]
    return new_w, (w64 @ c).cpu()
