"""STAT's per-layer analysis: damage curves of heads and neurons, budget options and the plan they allocate."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from stat_core.config import PruneConfig

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from stat_core.adapters import ModelAdapter
from stat_core.calibration.statistics import BlockStats
from stat_core.linalg import (
    cholesky_with_ridge,
    error_curve_of_permuted,
    greedy_block_order,
    output_energy,
    output_error,
    output_error_curve,
    permute_symmetric_,
    pivoted_cholesky_order,
    ridge_of,
)
from stat_core.methods.base import _unit_costs
from stat_core.surgery.apply import head_columns, on_compute_device
from stat_core.surgery.budget import (
    Allocation,
    BlockOptions,
    allocate,
    allocate_uniform,
    block_geometry,
    heads_prunable,
)
from stat_core.surgery.plan import LayerPlan, PrunePlan


SENSITIVITY_SHRINKAGE = 0.1  # λ in (1 − λ)F + λ·tr(F)/d·I (benchmarks/stat_experiments.py shrink varies it)


def effective_out_weight(weight: torch.Tensor, fisher: torch.Tensor | None, resid_energy: float,
                         n_tokens: int, shrinkage: float = SENSITIVITY_SHRINKAGE) -> torch.Tensor:
    """Output projection ``W: (d, n)`` premultiplied so that ``tr(W_eff S W_effᵀ)`` is a predicted
    loss increase per token.

    With a gradient second moment ``F = C Cᵀ`` (see ``output_sensitivity``), ``W_eff = Cᵀ W`` so
    that ``tr(W_eff S W_effᵀ) = tr(F W S Wᵀ)``; a little ``shrinkage`` towards ``tr(F)/d · I`` keeps
    directions the few gradient samples missed from looking free. Without ``F``, the residual is
    measured relative to the energy of the residual stream it is added to.
    """
    w = weight.detach().to(torch.float64)
    if fisher is None:
        return w / np.sqrt(max(resid_energy, 1e-30))
    f = fisher.to(w.device, torch.float64)
    d = f.shape[0]
    f = (1 - shrinkage) * f + shrinkage * torch.trace(f) / d * torch.eye(d, dtype=f.dtype, device=f.device)
    factor = cholesky_with_ridge(f, 1e-12 * float(torch.trace(f)) / d + 1e-30)
    return factor.T @ w / np.sqrt(max(n_tokens, 1))


def head_configurations(gram: torch.Tensor, w_eff: torch.Tensor, n_heads: int, n_kv: int,
                        head_dim: int) -> tuple[list[dict], list[int]]:
    """All feasible kept-head sets of one layer with their damage.

    A configuration keeps ``g`` KV heads and the same ``r`` query heads in each (so stock GQA code
    runs). Heads are ranked by a greedy output-aware block decomposition; within a KV group the
    ``r`` best-ranked heads stay, and groups are added greedily by exact least-squares damage.
    Returns ``(configs, head_order)``; each config is ``{"heads", "kv_heads", "damage"}``.
    """
    order, curve = greedy_block_order(gram, w_eff, head_dim)
    order = order.tolist()
    rank = {h: i for i, h in enumerate(order)}
    group = n_heads // n_kv
    configs = []
    if group == 1:
        for m in range(1, n_heads + 1):
            kept = sorted(order[:m])
            configs.append({"heads": kept, "kv_heads": kept, "damage": float(curve[m])})
        return configs, order
    total = output_energy(gram, w_eff)  # the same for every kept set: once per layer
    for r in range(1, group + 1):
        best_in_group = {g: sorted(range(g * group, (g + 1) * group), key=rank.get)[:r] for g in range(n_kv)}
        chosen: list[int] = []
        while len(chosen) < n_kv:
            scored = []
            for g in range(n_kv):
                if g in chosen:
                    continue
                heads = sorted(h for c in chosen + [g] for h in best_in_group[c])
                scored.append((output_error(gram, w_eff, head_columns(heads, head_dim), total=total), g, heads))
            damage, g, heads = min(scored)
            chosen.append(g)
            configs.append({"heads": heads, "kv_heads": sorted(chosen), "damage": damage})
    return configs, order


@dataclass
class LayerAnalysis:
    """Everything the allocator and the plan need about one layer."""

    head_configs: list[dict]
    head_order: list[int]
    neuron_order: torch.Tensor
    mlp_damage: torch.Tensor  # (d_ff + 1,)


def analyses_for(calibration, adapter: ModelAdapter, centered: bool) -> list[LayerAnalysis]:
    """``calibration``'s per-layer analyses on centred or plain statistics (the other kind computed
    once from its statistics and kept in ``calibration.extras``)."""
    if centered == calibration.centered and calibration.analyses:
        return calibration.analyses
    key = f"analyses_centered={centered}"
    if key not in calibration.extras:
        sens = calibration.sensitivity
        calibration.extras[key] = [analyse_layer(adapter, i, s, None if sens is None else sens[i], centered)
                                   for i, s in enumerate(calibration.dense_stats)]
    return calibration.extras[key]


def analyse_layer(adapter: ModelAdapter, layer: int, stats: BlockStats, fisher: dict | None,
                  centered: bool = False, *, reload: Callable[[], BlockStats] | None = None,
                  drop_weights: Callable[[], None] | None = None,
                  shrinkage: float = SENSITIVITY_SHRINKAGE) -> LayerAnalysis:
    """Head configurations and the neuron order of one layer with their damage curves; with
    ``centered`` on the scatter matrices (the damage left after an affine correction); ``shrinkage``
    of the loss-sensitivity matrix as in :func:`effective_out_weight`.

    Memory (layer streaming, where the d_ff² float64 matrices are the peak): ``reload`` is a callable
    giving ``stats`` again (e.g. from the file they were just saved to); with it the analysis
    consumes ``stats`` (its Grams are freed or overwritten: do not use it afterwards), runs the
    pivoted Cholesky in the MLP Gram's own storage and reads the Gram once more for the damage
    curve, so at most two d_ff² matrices are alive at once. ``drop_weights`` is called once the two
    output projections are read (streaming frees the block there). The results are the same."""
    shape = adapter.layer_shape(layer)
    stats = on_compute_device(adapter, layer, stats)
    w_attn = effective_out_weight(adapter.attn_out_proj(layer).weight, None if fisher is None else fisher["attn"],
                                  stats.resid_energy, stats.n_tokens, shrinkage)
    w_mlp = effective_out_weight(adapter.mlp_out_proj(layer).weight, None if fisher is None else fisher["mlp"],
                                 stats.resid_energy, stats.n_tokens, shrinkage)
    if drop_weights is not None:
        drop_weights()
    attn_gram = stats.second_moment("attn", centered)
    configs, head_order = head_configurations(attn_gram, w_attn, shape.num_heads, shape.num_kv_heads,
                                              adapter.head_dim)
    del attn_gram, w_attn
    # Neurons: pivoted Cholesky with each column weighted by its (loss-weighted) outgoing norm,
    # as the authors do; the damage curve is exact along that order.
    mlp_gram = stats.second_moment("mlp", centered)
    scale = w_mlp.norm(dim=0)
    if reload is None or mlp_gram.device.type != "cpu":
        neuron_order = pivoted_cholesky_order(mlp_gram, scale=scale)
        mlp_damage = output_error_curve(mlp_gram, w_mlp, neuron_order)
        return LayerAnalysis(configs, head_order, neuron_order, mlp_damage)
    stats.attn_gram = stats.mlp_gram = None
    ridge = ridge_of(mlp_gram.to(torch.float64))  # the curve's ridge, before dpstrf spends the Gram
    neuron_order = pivoted_cholesky_order(mlp_gram, scale=scale, overwrite=True)  # mlp_gram is spent
    del mlp_gram
    wp = w_mlp.to(torch.float64)[:, neuron_order]
    del w_mlp

    def permuted() -> torch.Tensor:
        # The Gram read back, permuted in its own storage; its transpose is the column-major
        # G[order][:, order] (the Gram is exactly symmetric), which the curve factors in place.
        return permute_symmetric_(reload().second_moment("mlp", centered).to(torch.float64), neuron_order).T

    mlp_damage = error_curve_of_permuted(None, wp, ridge, rebuild=permuted)
    return LayerAnalysis(configs, head_order, neuron_order, mlp_damage)


def build_block_options(adapter: ModelAdapter, analyses: list[LayerAnalysis], config: PruneConfig,
                        protected: dict[int, set[int]] | None = None) -> list[BlockOptions]:
    """Two blocks per layer (attention, MLP), each with its feasible kept widths, cost and damage.
    ``protected``: heads (by layer) that every attention option must keep."""
    blocks = []
    for layer, an in enumerate(analyses):
        attn_cost, mlp_cost = _unit_costs(adapter, layer, config)
        shape = adapter.layer_shape(layer)
        full_attn = {"heads": list(range(shape.num_heads)), "kv_heads": list(range(shape.num_kv_heads)),
                     "damage": 0.0}
        configs = an.head_configs if heads_prunable(adapter, config) else []
        keep = (protected or {}).get(layer)
        if keep:
            configs = [c for c in configs if keep <= set(c["heads"])]
        attn_payload = configs + [full_attn]
        blocks.append(BlockOptions(
            name=f"layer{layer}.attn",
            cost=[attn_cost(len(c["heads"]), len(c["kv_heads"])) for c in attn_payload],
            damage=[c["damage"] for c in attn_payload], payload=attn_payload))
        ks = np.arange(1, shape.intermediate_size + 1) if config.prune_neurons else np.array([shape.intermediate_size])
        blocks.append(BlockOptions(
            name=f"layer{layer}.mlp", cost=[mlp_cost(int(k)) for k in ks],
            damage=an.mlp_damage.numpy()[ks], fine_grained=True, payload=[int(k) for k in ks]))
    return blocks


def plan_from_analyses(adapter: ModelAdapter, analyses: list[LayerAnalysis], config: PruneConfig,
                       model_name: str, calibration_info: dict, protected: dict[int, set[int]] | None = None
                       ) -> PrunePlan:
    """Allocate the budget over the layers' options and write down what each layer keeps
    (``protected``: heads every option keeps, see :func:`build_block_options`)."""
    blocks = build_block_options(adapter, analyses, config, protected)
    if config.uniform:
        keys = [[(len(c["heads"]), len(c["kv_heads"])) if i % 2 == 0 else c for c in b.payload]
                for i, b in enumerate(blocks)]
        alloc = allocate_uniform(blocks, [list(range(0, len(blocks), 2)), list(range(1, len(blocks), 2))],
                                 keys, config.sparsity)
    else:
        alloc = allocate(blocks, config.sparsity)
    return plan_from_choice(adapter, analyses, blocks, alloc, config, model_name, calibration_info)


def layer_plans(adapter: ModelAdapter, analyses: list[LayerAnalysis], blocks: list[BlockOptions],
                choice: list[int], layers: "list[int] | None" = None) -> list[LayerPlan]:
    """What each layer keeps under ``choice`` (one option index per block of ``blocks``, two blocks
    per layer); ``layers``: only these layers' plans."""
    plans = []
    for layer in (range(len(analyses)) if layers is None else layers):
        an = analyses[layer]
        shape = adapter.layer_shape(layer)
        head_choice = blocks[2 * layer].payload[choice[2 * layer]]
        k = blocks[2 * layer + 1].payload[choice[2 * layer + 1]]
        geo = block_geometry(adapter, layer)
        plans.append(LayerPlan(
            layer=layer, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
            intermediate_size=shape.intermediate_size,
            kept_heads=list(head_choice["heads"]), kept_kv_heads=list(head_choice["kv_heads"]),
            kept_neurons=sorted(an.neuron_order[:k].tolist()),
            head_order=list(an.head_order),
            attn_options=[{"heads": len(c["heads"]), "kv_heads": len(c["kv_heads"]),
                           "params": geo.attn_params(len(c["heads"]), len(c["kv_heads"])), "damage": c["damage"]}
                          for c in an.head_configs],
            mlp_damage=[float(x) for x in an.mlp_damage]))
    return plans


def plan_from_choice(adapter: ModelAdapter, analyses: list[LayerAnalysis], blocks: list[BlockOptions],
                     alloc: Allocation, config: PruneConfig, model_name: str, calibration_info: dict,
                     extra_budget: dict | None = None) -> PrunePlan:
    """The plan of one allocation (``alloc.choice``: an option per block of ``blocks``)."""
    budget = {"kind": config.budget_kind, "target": config.sparsity, "flops_seq_len": config.flops_seq_len,
              "achieved": alloc.fraction_removed, "predicted_damage": alloc.damage, "uniform": config.uniform,
              **(extra_budget or {})}
    return PrunePlan(model=model_name, method=config.method, mode=config.mode, budget=budget,
                     calibration=calibration_info, layers=layer_plans(adapter, analyses, blocks, alloc.choice))


def stat_correction(config: PruneConfig) -> str:
    """STAT's correction kind for ``config``: ``affine`` with an intercept, else ``least-squares``."""
    return "affine" if config.intercept else "least-squares"
