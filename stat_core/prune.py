"""STAT end to end: calibrate, allocate the budget, choose units, fold corrections, cut the model.

``stat_prune_`` is the one call most users need. Underneath, the steps are separable:
``calibrate`` (dense statistics, sensitivities and per-layer decompositions: the expensive part,
independent of the budget) → ``plan_pruning`` (allocate a budget over the layers) → ``apply_plan_``.
``prune_from_calibration_`` re-plans and cuts a fresh dense copy from a cached ``Calibration`` in
seconds, which is how the app re-budgets without re-calibrating.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .adapters import ModelAdapter, get_adapter
from .budget import BlockOptions, allocate, allocate_uniform, block_geometry, block_macs, block_parameter_count
from . import distributed
from .calibrate import BlockStats, CalibrationSet, LayerwiseRunner, release_memory, sensitivity_sums
from .linalg import (ridge_of, cholesky_with_ridge, error_curve_of_permuted, greedy_block_order,
                     interpolation_from_rows, interpolation_matrix, kept_rows, output_energy, output_error,
                     output_error_curve, permute_symmetric_, pivoted_cholesky_order)
from .plan import LayerPlan, PrunePlan

log = logging.getLogger(__name__)

def method_names() -> tuple[str, ...]:
    """Every registered method (``stat_core.methods``), STAT first."""
    from .methods import method_names as names

    return names()


# one-shot: every statistic from the dense model (the app re-budgets from them instantly).
# propagate: each layer re-selected and corrected on the pruned path, reproducing the pruned path's
#   own activations (the paper's layer-by-layer variant).
# sequential: like propagate, but each correction maps the pruned path's kept units onto the *dense*
#   model's activations (cross products of the two paths), so it also undoes the error the earlier
#   pruned layers let through; attention is cut before the MLP's statistics are taken.
MODES = ("propagate", "one-shot", "sequential")
BUDGET_KINDS = ("params", "flops")

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)

# Windows per batch of the gradient pass. One: its logits and their gradient (vocabulary × tokens,
# float32) are the largest tensors of a prune, and on SmolLM2 one window per batch took the same
# time as four (benchmarks/memory.py: 31.0 vs 31.8 s) at a third of the memory.
SENSITIVITY_BATCH = 1

# Real tokens the gradient pass sees by default: 8 windows of 512 for decoders; for short
# classifier inputs that is ~36 windows of 128 (8 short windows gave a visibly worse allocation).
SENSITIVITY_TOKENS = 4096


# Below this many real calibration tokens per MLP neuron the least-squares corrections start to fit
# the calibration text rather than the model: measured on the demo classifier (8 per neuron made the
# corrected model worse than no correction at 30-40%, 28 per neuron did not) and on SmolLM2 (2,048
# tokens for 1,536 neurons: STAT lost to activation-norm selection; 64 × 512 = 21 per neuron is fine).
MIN_TOKENS_PER_NEURON = 16


def calibration_size_warning(model, n_tokens: int) -> str | None:
    """One sentence when ``n_tokens`` real calibration tokens are too few for reliable corrections."""
    adapter = get_adapter(model)
    width = max(adapter.layer_shape(i).intermediate_size for i in range(adapter.num_layers))
    needed = MIN_TOKENS_PER_NEURON * width
    if n_tokens >= needed:
        return None
    return (f"Only {n_tokens:,} calibration tokens for MLPs {width:,} neurons wide: the corrections may fit the "
            f"calibration text rather than the model; give at least {needed:,} tokens "
            f"(the default 64 × 512 = 32,768 is enough for most small models).")


def sensitivity_windows(data: CalibrationSet, requested: int | None) -> int:
    if requested is not None:
        return min(requested, len(data))
    per_window = (float(data.attention_mask.sum()) / len(data) if data.attention_mask is not None
                  else data.input_ids.shape[1])
    return min(len(data), max(1, int(np.ceil(SENSITIVITY_TOKENS / max(per_window, 1.0)))))


@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how. ``sparsity``: fraction of block parameters (or FLOPs) to remove."""

    sparsity: float
    budget_kind: str = "params"
    flops_seq_len: int = 512
    method: str = "stat"
    mode: str = "one-shot"
    prune_heads: bool = True
    prune_neurons: bool = True
    sensitivity_samples: int | None = None  # None: enough windows for SENSITIVITY_TOKENS real tokens
    batch_size: int = 8
    uniform: bool = False  # same head / KV-head / neuron counts in every layer (stock-loadable export)
    # STAT's correction with an intercept: Z ≈ Z_I T + 1cᵀ, the mean part folded into an output bias;
    # the decompositions then run on the centred statistics (see BlockStats.second_moment). Off by
    # default: on SmolLM2 it measured neutral-to-slightly-worse on the suite (benchmarks/stat_ablation.py).
    intercept: bool = False
    # Next-token labels of the gradient pass: "data" (the text: empirical Fisher) or "model" (sampled
    # from the dense model: the Fisher of its own distribution, i.e. the curvature of KL to dense).
    sensitivity_labels: str = "data"

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or self.sparsity != self.sparsity:
            raise ValueError(f"The sparsity must be a number in [0, 1) (0.3 removes 30%), got {self.sparsity!r}.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"The sparsity must be a fraction in [0, 1) (0.3 removes 30%), got {self.sparsity}.")
        if self.budget_kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {BUDGET_KINDS}, got {self.budget_kind!r}")
        from .methods import get_method

        get_method(self.method)  # ValueError listing the methods for an unknown name
        if self.sensitivity_labels not in ("data", "model"):
            raise ValueError(f"sensitivity_labels must be 'data' or 'model', got {self.sensitivity_labels!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (self.prune_heads or self.prune_neurons):
            raise ValueError("With every head and every neuron kept nothing can be removed; allow heads or neurons "
                             "to be pruned.")
        if self.batch_size < 1 or (self.sensitivity_samples is not None and self.sensitivity_samples < 0):
            raise ValueError("batch_size must be ≥ 1 and sensitivity_samples ≥ 0")
        if isinstance(self.flops_seq_len, bool) or not isinstance(self.flops_seq_len, (int, float)) \
                or not self.flops_seq_len >= 1:
            raise ValueError(f"The FLOP-counting sequence length must be a whole number of tokens ≥ 1, got "
                             f"{self.flops_seq_len!r}.")


@dataclass
class PruneResult:
    plan: PrunePlan
    stats: list[BlockStats]          # statistics the corrections were computed from
    dense_stats: list[BlockStats]    # dense-model statistics (re-budget without recalibrating)
    sensitivity: list[dict] | None
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # whole-model methods: what they changed


# --- damage weighting ---------------------------------------------------------------------------

def effective_out_weight(weight: torch.Tensor, fisher: torch.Tensor | None, resid_energy: float,
                         n_tokens: int) -> torch.Tensor:
    """Output projection ``W: (d, n)`` premultiplied so that ``tr(W_eff S W_effᵀ)`` is a predicted
    loss increase per token.

    With a gradient second moment ``F = C Cᵀ`` (see ``output_sensitivity``), ``W_eff = Cᵀ W`` so
    that ``tr(W_eff S W_effᵀ) = tr(F W S Wᵀ)``; a little shrinkage towards ``tr(F)/d · I`` keeps directions the few gradient
    samples missed from looking free. Without ``F``, the residual is measured relative to the
    energy of the residual stream it is added to.
    """
    w = weight.detach().to(torch.float64)
    if fisher is None:
        return w / np.sqrt(max(resid_energy, 1e-30))
    f = fisher.to(w.device, torch.float64)
    d = f.shape[0]
    f = 0.9 * f + 0.1 * torch.trace(f) / d * torch.eye(d, dtype=f.dtype, device=f.device)
    factor = cholesky_with_ridge(f, 1e-12 * float(torch.trace(f)) / d + 1e-30)
    return factor.T @ w / np.sqrt(max(n_tokens, 1))


# --- head configurations under grouped-query attention -----------------------------------------

def head_columns(heads, head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + j for h in heads for j in range(head_dim)], dtype=torch.long)


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


# --- per-layer analysis --------------------------------------------------------------------------

@dataclass
class LayerAnalysis:
    """Everything the allocator and the plan need about one layer."""

    head_configs: list[dict]
    head_order: list[int]
    neuron_order: torch.Tensor
    mlp_damage: torch.Tensor  # (d_ff + 1,)


def analyse_layer(adapter: ModelAdapter, layer: int, stats: BlockStats, fisher: dict | None,
                  centered: bool = False, *, reload: Callable[[], BlockStats] | None = None,
                  drop_weights: Callable[[], None] | None = None) -> LayerAnalysis:
    """Head configurations and the neuron order of one layer with their damage curves; with
    ``centered`` on the scatter matrices (the damage left after an affine correction).

    Memory (layer streaming, where the d_ff² float64 matrices are the peak): ``reload`` is a callable
    giving ``stats`` again (e.g. from the file they were just saved to); with it the analysis
    consumes ``stats`` (its Grams are freed or overwritten: do not use it afterwards), runs the
    pivoted Cholesky in the MLP Gram's own storage and reads the Gram once more for the damage
    curve, so at most two d_ff² matrices are alive at once. ``drop_weights`` is called once the two
    output projections are read (streaming frees the block there). The results are the same."""
    shape = adapter.layer_shape(layer)
    stats = _on_compute_device(adapter, layer, stats)
    w_attn = effective_out_weight(adapter.attn_out_proj(layer).weight, None if fisher is None else fisher["attn"],
                                  stats.resid_energy, stats.n_tokens)
    w_mlp = effective_out_weight(adapter.mlp_out_proj(layer).weight, None if fisher is None else fisher["mlp"],
                                 stats.resid_energy, stats.n_tokens)
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


def _on_compute_device(adapter: ModelAdapter, layer: int, stats: BlockStats | None) -> BlockStats | None:
    """The statistics on the layer's GPU when the model is on one (they are kept on the CPU between
    blocks): the float64 decompositions and corrections then run there. On a Llama-2-7B shape the
    host-side analysis was 73% of an H100 prune (benchmarks/results/scale.json)."""
    dev = adapter.attn_out_proj(layer).weight.device
    return stats.to(dev) if stats is not None and dev.type == "cuda" else stats


def heads_prunable(adapter: ModelAdapter, config: PruneConfig) -> bool:
    """Uniform (stock-loadable) pruning keeps every head where the stock config cannot say
    fewer heads of the same size (BERT family)."""
    return config.prune_heads and (not config.uniform or adapter.stock_config_can_drop_heads)


def stat_correction(config: PruneConfig) -> str:
    """STAT's correction kind for ``config``: ``affine`` with an intercept, else ``least-squares``."""
    return "affine" if config.intercept else "least-squares"


def new_bias_kinds(adapter: ModelAdapter, uniform: bool) -> set[str]:
    """Block kinds (``"attn"``, ``"mlp"``) whose output projection a correction may give a bias it
    lacks. Any, normally (the export then loads through modeling_stat.py unless the stock config
    can declare it); for a uniform (stock-loadable) plan only those a stock config flag declares.
    Where a bias may not be created, an intercept correction falls back to plain least squares and
    a mean-bias correction to none."""
    return set(adapter.stock_bias_flags()) if uniform else {"attn", "mlp"}


def _unit_costs(adapter: ModelAdapter, layer: int, config: PruneConfig):
    """``(attn_cost(n_heads, n_kv), mlp_cost(n_neurons))`` of one layer in the config's budget unit.

    Parameters include the output bias a correction creates in a pruned block of a family without
    one (STAT's intercept, FLAP's mean bias): ``hidden`` more parameters once any unit is removed.
    """
    from .methods import get_method

    geo = block_geometry(adapter, layer)
    if config.budget_kind == "params":
        shape = adapter.layer_shape(layer)
        if not get_method(config.method).adds_output_bias(config):
            return geo.attn_params, geo.mlp_params
        allowed = new_bias_kinds(adapter, config.uniform)
        attn_bias = geo.hidden if geo.attn_fixed == 0 and "attn" in allowed else 0
        mlp_bias = geo.hidden if geo.mlp_fixed == 0 and "mlp" in allowed else 0

        def attn_params(n_h, n_kv):
            return geo.attn_params(n_h, n_kv) + (attn_bias if n_h < shape.num_heads else 0)

        def mlp_params(n):
            return geo.mlp_params(n) + (mlp_bias if n < shape.intermediate_size else 0)

        return attn_params, mlp_params

    def attn_macs(n_h, n_kv):
        return geo.attn_macs(n_h, n_kv, config.flops_seq_len, adapter.is_decoder)
    return attn_macs, geo.mlp_macs


def max_removable_fraction(model, config: PruneConfig) -> float:
    """The most any plan can remove, from the layer shapes alone: every layer keeps at least one KV
    group with one query head (all heads when heads are not pruned) and one neuron (all when neurons
    are not pruned). Lets callers refuse an impossible budget before minutes of calibration."""
    adapter = get_adapter(model)
    heads = heads_prunable(adapter, config)
    total = removable = 0.0
    for layer in range(adapter.num_layers):
        attn_cost, mlp_cost = _unit_costs(adapter, layer, config)
        shape = adapter.layer_shape(layer)
        full_attn, full_mlp = attn_cost(shape.num_heads, shape.num_kv_heads), mlp_cost(shape.intermediate_size)
        total += full_attn + full_mlp
        if heads:
            removable += full_attn - attn_cost(1, 1)
        if config.prune_neurons:
            removable += full_mlp - mlp_cost(1)
    return removable / total if total else 0.0


def check_budget_feasible(model, config: PruneConfig) -> None:
    """ValueError (one sentence) when ``config.sparsity`` is more than the layer shapes allow."""
    bound = max_removable_fraction(model, config)
    if config.sparsity > bound + 1e-9:
        heads = "one head" if heads_prunable(get_adapter(model), config) else "every head"
        neurons = "one neuron" if config.prune_neurons else "every neuron"
        same = " with the same counts in every layer" if config.uniform else ""
        raise ValueError(f"cannot remove {config.sparsity:.0%}: keeping at least {heads} and {neurons} per layer{same} "
                         f"allows at most {bound:.1%}; lower the target")


def build_block_options(adapter: ModelAdapter, analyses: list[LayerAnalysis], config: PruneConfig) -> list[BlockOptions]:
    """Two blocks per layer (attention, MLP), each with its feasible kept widths, cost and damage."""
    blocks = []
    for layer, an in enumerate(analyses):
        attn_cost, mlp_cost = _unit_costs(adapter, layer, config)
        shape = adapter.layer_shape(layer)
        full_attn = {"heads": list(range(shape.num_heads)), "kv_heads": list(range(shape.num_kv_heads)),
                     "damage": 0.0}
        attn_payload = (an.head_configs if heads_prunable(adapter, config) else []) + [full_attn]
        blocks.append(BlockOptions(
            name=f"layer{layer}.attn",
            cost=[attn_cost(len(c["heads"]), len(c["kv_heads"])) for c in attn_payload],
            damage=[c["damage"] for c in attn_payload], payload=attn_payload))
        ks = np.arange(1, shape.intermediate_size + 1) if config.prune_neurons else np.array([shape.intermediate_size])
        blocks.append(BlockOptions(
            name=f"layer{layer}.mlp", cost=[mlp_cost(int(k)) for k in ks],
            damage=an.mlp_damage.numpy()[ks], fine_grained=True, payload=[int(k) for k in ks]))
    return blocks


# --- the pipeline ---------------------------------------------------------------------------------

def _notify(progress: ProgressFn | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


@dataclass
class Calibration:
    """Everything the dense model's calibration pass produced; enough to plan and apply any
    one-shot budget (STAT or a baseline) without touching the data again."""

    dense_stats: list[BlockStats]
    sensitivity: list[dict] | None
    analyses: list[LayerAnalysis]
    timings: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # statistics only some methods need (see PruningMethod.prepare)
    centered: bool = False  # analyses made on the centred statistics (PruneConfig.intercept)

    def analyses_for(self, adapter: ModelAdapter, centered: bool) -> list[LayerAnalysis]:
        """The per-layer analyses on centred or plain statistics (the other kind computed once, kept)."""
        if centered == self.centered:
            return self.analyses
        key = f"analyses_centered={centered}"
        if key not in self.extras:
            self.extras[key] = [analyse_layer(adapter, i, s, None if self.sensitivity is None else self.sensitivity[i],
                                              centered) for i, s in enumerate(self.dense_stats)]
        return self.extras[key]


def calibrate(model, windows: "torch.Tensor | CalibrationSet", config: PruneConfig,
              progress: ProgressFn | None = None, runner: LayerwiseRunner | None = None) -> Calibration:
    """Dense statistics, loss sensitivities and per-layer decompositions (the model is not changed).

    Only ``config.sensitivity_samples``, ``config.batch_size`` and ``config.intercept`` (which
    statistics the decompositions use) matter here.

    Under ``torch.distributed`` (see :mod:`stat_core.distributed`) every rank passes the *whole*
    ``windows`` and calibrates on its shard (a given ``runner`` must hold that shard); the sums
    are all-reduced (each block's as soon as it is done) and normalised once, so every rank ends
    with the statistics one process would compute. In one-shot mode only rank 0 needs the
    per-layer analyses: the other ranks leave them out.
    """
    adapter = get_adapter(model)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fisher = None
    data = CalibrationSet.wrap(windows)
    distributed.check_shardable(len(data))  # one sentence before any work
    n_sens = sensitivity_windows(data, config.sensitivity_samples)
    if n_sens > 0:
        _notify(progress, "sensitivity", 0, 1)
        chosen = data.spread(n_sens) if data.labels is not None else data.subset(n_sens)
        # Plain sums on each rank's share of the chosen windows (a rank may get none), divided once.
        local, first = distributed.shard(chosen, SENSITIVITY_BATCH, allow_empty=True)
        sums = sensitivity_sums(model, adapter, local, SENSITIVITY_BATCH, config.sensitivity_labels, first_index=first)
        fisher = distributed.all_reduce_sensitivity(sums).normalised()
        del sums
        release_memory()  # the backward pass's freed blocks, before the statistics stack on them
        _notify(progress, "sensitivity", 1, 1)
    timings["sensitivity"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    runner = runner or LayerwiseRunner(model, adapter, distributed.shard(data, config.batch_size)[0], config.batch_size)
    dense_stats = []
    hidden = runner.hidden
    for layer in range(adapter.num_layers):
        stats, hidden = runner.collect_block(layer, hidden)
        dense_stats.append(distributed.all_reduce_stats([stats])[0])
        _notify(progress, "calibrate", layer + 1, adapter.num_layers)
    del hidden  # the last block's outputs: nothing reads them
    release_memory()
    timings["calibrate"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    analyses = []
    to_analyse = dense_stats if distributed.is_main() or config.mode != "one-shot" else []  # one-shot: rank 0 plans
    for i, s in enumerate(to_analyse):
        analyses.append(analyse_layer(adapter, i, s, None if fisher is None else fisher[i], config.intercept))
        _notify(progress, "analyse", i + 1, adapter.num_layers)
    timings["analyse"] = time.perf_counter() - t2
    return Calibration(dense_stats=dense_stats, sensitivity=fisher, analyses=analyses, timings=timings,
                       centered=config.intercept)


def plan_pruning(model, calibration: Calibration, config: PruneConfig, model_name: str = "",
                 calibration_info: dict | None = None, data: "CalibrationSet | None" = None) -> PrunePlan:
    """The plan for ``config`` (budget, method, uniform) from cached statistics of the dense ``model``.

    ``data``: the calibration windows, for methods that need more than the cached statistics
    (e.g. LLM-Pruner's weight gradients); computed once and kept in ``calibration.extras``.
    """
    from .methods import get_method

    method = get_method(config.method)
    method.check_applicable(model)
    if method.whole_model:
        raise ValueError(f"{method.label} does not produce a head/neuron plan; run it with stat_prune_")
    method.prepare(model, None if data is None else CalibrationSet.wrap(data), calibration)
    return method.plan(model, calibration, config, model_name, calibration_info or {})


def prune_from_calibration_(model, calibration: Calibration, config: PruneConfig, model_name: str = "",
                            calibration_info: dict | None = None, data=None) -> PruneResult:
    """One-shot prune of the dense ``model`` in place from a cached :class:`Calibration`."""
    if config.mode != "one-shot":
        raise ValueError("re-planning from cached statistics is one-shot only; propagate mode re-calibrates each layer")
    t0 = time.perf_counter()
    plan = plan_pruning(model, calibration, config, model_name, calibration_info, data)
    t1 = time.perf_counter()
    apply_plan_(model, plan, calibration.dense_stats)
    timings = {**calibration.timings, "allocate": t1 - t0, "apply": time.perf_counter() - t1}
    return PruneResult(plan=plan, stats=calibration.dense_stats, dense_stats=calibration.dense_stats,
                       sensitivity=calibration.sensitivity, timings=timings)


def stat_prune_(model, windows: "torch.Tensor | CalibrationSet", config: PruneConfig, model_name: str = "",
                progress: ProgressFn | None = None, calibration_info: dict | None = None) -> PruneResult:
    """Prune ``model`` in place with ``config.method`` (STAT by default; any registered method) on
    calibration ``windows: (n, T)`` token ids (or a :class:`CalibrationSet` with padding masks and
    labels).

    Returns the plan and the statistics behind it. With ``mode="propagate"`` each layer is
    re-calibrated on the outputs of the already pruned and corrected layers before it.
    Whole-model methods (SliceGPT) return ``plan=None`` and their summary in ``info``.

    Under ``torch.distributed`` every rank calls this with the same model and the whole ``windows``;
    the calibration is sharded (:mod:`stat_core.distributed`). One-shot: rank 0 plans and prunes
    its model; the other ranks return right after the calibration with ``plan=None``, their model
    dense, and ``info["distributed_rank"]``. Propagate: every rank prunes its model identically
    (each needs the pruned path's hidden states of its shard). Whole-model methods run in one process.
    """
    from .methods import get_method

    method = get_method(config.method)
    method.check_applicable(model)  # one sentence before any calibration
    t0 = time.perf_counter()
    if method.whole_model:
        if distributed.is_distributed():
            raise ValueError(f"{method.label} calibrates inside its own rotation pass and cannot be spread over "
                             "processes; run it in one process")
        if config.mode != "one-shot":
            raise ValueError(f"{method.label} has no propagate mode; use one-shot")
        info = method.prune_(model, CalibrationSet.wrap(windows), config, progress)
        return PruneResult(plan=None, stats=[], dense_stats=[], sensitivity=None,
                           timings={"total": time.perf_counter() - t0}, info=info)
    check_budget_feasible(model, config)  # before minutes of calibration, not after
    if config.mode != "one-shot" and not hasattr(method, "relabel") and method.name != "stat":
        raise ValueError(f"{config.mode} mode re-fits STAT's corrections layer by layer; {method.label} runs one-shot")
    adapter = get_adapter(model)
    # Under torch.distributed each rank runs its shard of the windows (one process: all of them).
    runner = LayerwiseRunner(model, adapter, distributed.shard(windows, config.batch_size)[0], config.batch_size)
    calib = calibrate(model, windows, config, progress, runner)
    if config.mode == "one-shot":
        if not distributed.is_main():  # rank 0 plans, applies and exports; this rank's model stays dense
            return PruneResult(plan=None, stats=calib.dense_stats, dense_stats=calib.dense_stats,
                               sensitivity=calib.sensitivity, timings=calib.timings,
                               info={"distributed_rank": distributed.rank(), "world_size": distributed.world_size()})
        result = prune_from_calibration_(model, calib, config, model_name, calibration_info, windows)
        result.timings["total"] = time.perf_counter() - t0
        return result
    t2 = time.perf_counter()
    plan = plan_from_analyses(adapter, calib.analyses, config, model_name, calibration_info or {})
    timings = {**calib.timings, "allocate": time.perf_counter() - t2}
    t3 = time.perf_counter()
    if config.method == "stat":
        plan.correction = stat_correction(config)
        propagate = _sequential_ if config.mode == "sequential" else _propagate_
        used_stats = propagate(model, adapter, runner, plan, calib.sensitivity, progress)
    else:
        # Baselines use the units STAT would keep (or its counts): run STAT's propagation on a
        # scratch copy, then cut this model by that plan without any correction.
        scratch = copy.deepcopy(model)
        plan.correction = stat_correction(config)
        scratch_runner = copy.copy(runner)
        scratch_runner.model, scratch_runner.adapter = scratch, get_adapter(scratch)
        propagate = _sequential_ if config.mode == "sequential" else _propagate_
        propagate(scratch, scratch_runner.adapter, scratch_runner, plan, calib.sensitivity, progress)
        del scratch
        plan = method.relabel(model, plan, calib)
        apply_plan_(model, plan, None)
        used_stats = calib.dense_stats
    timings["apply"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    del runner
    return PruneResult(plan=plan, stats=used_stats, dense_stats=calib.dense_stats, sensitivity=calib.sensitivity,
                       timings=timings)


def plan_from_analyses(adapter: ModelAdapter, analyses: list[LayerAnalysis], config: PruneConfig,
                       model_name: str, calibration_info: dict) -> PrunePlan:
    """Allocate the budget over the layers' options and write down what each layer keeps."""
    blocks = build_block_options(adapter, analyses, config)
    if config.uniform:
        keys = [[(len(c["heads"]), len(c["kv_heads"])) if i % 2 == 0 else c for c in b.payload]
                for i, b in enumerate(blocks)]
        alloc = allocate_uniform(blocks, [list(range(0, len(blocks), 2)), list(range(1, len(blocks), 2))],
                                 keys, config.sparsity)
    else:
        alloc = allocate(blocks, config.sparsity)
    layers = []
    for layer, an in enumerate(analyses):
        shape = adapter.layer_shape(layer)
        head_choice = blocks[2 * layer].payload[alloc.choice[2 * layer]]
        k = blocks[2 * layer + 1].payload[alloc.choice[2 * layer + 1]]
        geo = block_geometry(adapter, layer)
        layers.append(LayerPlan(
            layer=layer, num_heads=shape.num_heads, num_kv_heads=shape.num_kv_heads,
            intermediate_size=shape.intermediate_size,
            kept_heads=list(head_choice["heads"]), kept_kv_heads=list(head_choice["kv_heads"]),
            kept_neurons=sorted(an.neuron_order[:k].tolist()),
            head_order=list(an.head_order),
            attn_options=[{"heads": len(c["heads"]), "kv_heads": len(c["kv_heads"]),
                           "params": geo.attn_params(len(c["heads"]), len(c["kv_heads"])), "damage": c["damage"]}
                          for c in analyses[layer].head_configs],
            mlp_damage=[float(x) for x in an.mlp_damage]))
    budget = {"kind": config.budget_kind, "target": config.sparsity, "flops_seq_len": config.flops_seq_len,
              "achieved": alloc.fraction_removed, "predicted_damage": alloc.damage, "uniform": config.uniform}
    return PrunePlan(model=model_name, method=config.method, mode=config.mode, budget=budget,
                     calibration=calibration_info, layers=layers)


def _propagate_(model, adapter: ModelAdapter, runner: LayerwiseRunner, plan: PrunePlan, fisher,
                progress: ProgressFn | None) -> list[BlockStats]:
    """Re-select and correct each layer on the pruned path, keeping the allocated counts."""
    hidden = runner.hidden
    used = []
    centered = plan.correction == "affine"
    for layer in range(adapter.num_layers):
        stats, _ = runner.collect_block(layer, hidden, adapter)
        stats = distributed.all_reduce_stats([stats])[0]  # every rank: the whole set's statistics
        an = analyse_layer(adapter, layer, stats, None if fisher is None else fisher[layer], centered)
        lp = plan.layers[layer]
        match = next((c for c in an.head_configs if len(c["heads"]) == len(lp.kept_heads)
                      and len(c["kv_heads"]) == len(lp.kept_kv_heads)), None)
        if match is not None:
            lp.kept_heads, lp.kept_kv_heads = match["heads"], match["kv_heads"]
        lp.kept_neurons = sorted(an.neuron_order[: len(lp.kept_neurons)].tolist())
        lp.head_order = an.head_order
        apply_layer_(adapter, lp, stats, plan.correction, uniform=bool(plan.budget.get("uniform")))
        hidden = runner.run_block(layer, hidden, adapter)
        used.append(stats)
        _notify(progress, "propagate", layer + 1, adapter.num_layers)
    adapter.record_shapes_in_config_()
    return used


def _sequential_(model, adapter: ModelAdapter, runner: LayerwiseRunner, plan: PrunePlan, fisher,
                 progress: ProgressFn | None) -> list[BlockStats]:
    """Like :func:`_propagate_`, but every correction reproduces the *dense* model's activations.

    Two paths run side by side: the pruned model on its own hidden states and an untouched copy of
    each block on the dense hidden states. Per layer: attention heads are chosen on the pruned path
    and their output projection is fitted so that ``W' z_kept ≈ W z_dense``; then, with the pruned
    attention in place, the same for the MLP's neurons. A layer thus also corrects what the earlier
    pruned layers got wrong, as far as its kept units can express it.
    """
    hidden = runner.hidden
    dense_hidden = [h.clone() for h in hidden]
    used = []
    centered = plan.correction == "affine"
    uniform = bool(plan.budget.get("uniform"))
    for layer in range(adapter.num_layers):
        dense_block = copy.deepcopy(adapter.layers[layer])
        lp = plan.layers[layer]
        shape = adapter.layer_shape(layer)
        fisher_l = None if fisher is None else fisher[layer]
        for kind in ("attn", "mlp"):
            if kind == "attn" and len(lp.kept_heads) == shape.num_heads:
                continue  # nothing to cut: the MLP's pass below also advances the dense path
            stats, paired, dense_out = runner.collect_paired(layer, hidden, dense_hidden, dense_block, (kind,))
            stats, paired = distributed.all_reduce_stats([stats])[0], distributed.all_reduce_paired(paired)
            if kind == "attn":
                an = analyse_layer(adapter, layer, stats, fisher_l, centered)
                match = next((c for c in an.head_configs if len(c["heads"]) == len(lp.kept_heads)
                              and len(c["kv_heads"]) == len(lp.kept_kv_heads)), None)
                if match is not None:
                    lp.kept_heads, lp.kept_kv_heads = match["heads"], match["kv_heads"]
                lp.head_order = an.head_order
            else:
                dense_hidden = dense_out
                used.append(stats)
                if len(lp.kept_neurons) == shape.intermediate_size:
                    continue
                an = analyse_layer(adapter, layer, stats, fisher_l, centered)
                lp.kept_neurons = sorted(an.neuron_order[: len(lp.kept_neurons)].tolist())
            _apply_kind_(adapter, lp, kind, stats, plan.correction, uniform, paired)
        del dense_block
        hidden = runner.run_block(layer, hidden)
        _notify(progress, "propagate", layer + 1, adapter.num_layers)
    adapter.record_shapes_in_config_()
    return used


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
    with ``paired`` (:class:`~stat_core.calibrate.PairedStats`) least-squares and affine corrections
    reproduce the dense path's activations (:func:`dense_target_correction`)."""
    layer = lp.layer
    shape = adapter.layer_shape(layer)
    if stats is None:
        correction = "none"
    stats = _on_compute_device(adapter, layer, stats)
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


def apply_plan_(model, plan: PrunePlan, stats: list[BlockStats] | None) -> None:
    """Apply ``plan`` to a dense ``model`` in place; ``stats=None`` means no correction."""
    adapter = get_adapter(model)
    if len(plan.layers) != adapter.num_layers:
        raise ValueError(f"plan has {len(plan.layers)} layers, model has {adapter.num_layers}")
    for lp in plan.layers:
        shape = adapter.layer_shape(lp.layer)
        if (shape.num_heads, shape.intermediate_size) != (lp.num_heads, lp.intermediate_size):
            raise ValueError(f"layer {lp.layer} of the model is already pruned or differs from the plan")
        apply_layer_(adapter, lp, None if stats is None else stats[lp.layer], plan.correction, plan.correction_ridge,
                     bool(plan.budget.get("uniform")))
    adapter.record_shapes_in_config_()


def budget_summary(model, seq_len: int = 512) -> dict:
    adapter = get_adapter(model)
    return {"block_params": block_parameter_count(adapter), "block_macs_per_token": block_macs(adapter, seq_len)}
