"""The method interface, and the helpers every unit-removal method shares.

A pruning method is one module in this package with one :class:`PruningMethod` subclass,
registered in :mod:`stat_core.methods.registry`. It supplies two things:

- *which units to keep per layer*: :meth:`PruningMethod.plan` returns a :class:`PrunePlan`
  (kept heads, KV heads and neurons per layer) from the dense model's cached calibration;
- *what correction to fold in*: the plan's ``correction`` field, one of :data:`CORRECTIONS`,
  which :func:`stat_core.surgery.apply.apply_plan_` applies from the calibration statistics.

A method that needs statistics beyond the Grams and column sums (e.g. weight gradients) computes
them in :meth:`PruningMethod.prepare` and keeps them in ``calibration.extras``. A method that does
not remove heads and neurons at all (SliceGPT rotates and shrinks the hidden size) sets
``whole_model = True`` and implements :meth:`PruningMethod.prune_` instead of ``plan``.

Grouped-query attention, for every method: a layer keeps ``g`` whole KV groups and the same number
``r`` of query heads in each (so stock attention code runs); :func:`select_heads` turns any per-head
score into such a choice. No method ever empties a layer (at least one head and one neuron stay).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from stat_core.adapters import ModelAdapter, get_adapter
from stat_core.calibration.statistics import CalibrationSet
from stat_core.methods.registry import get_method
from stat_core.surgery.budget import block_geometry, heads_prunable, new_bias_kinds
from stat_core.surgery.plan import LayerPlan, PrunePlan

if TYPE_CHECKING:  # pragma: no cover
    from stat_core.calibration.statistics import CalibrationSet
    from stat_core.config import PruneConfig
    from stat_core.calibration.stage import Calibration

#: How a plan's removed units are compensated (applied by ``stat_core.surgery.apply.apply_layer_``):
#: ``least-squares``: ``W_out ← W_out Tᵀ`` with ``T = G_II⁻¹ G_I:`` (STAT; with a relative ridge
#: ``plan.correction_ridge`` this is also the OBS update of SlimGPT); ``mean-bias``: kept columns
#: only, plus ``W_out[:, removed] · mean(z_removed)`` added to the output bias (FLAP);
#: ``affine``: least-squares with an intercept, ``Z ≈ Z_I T + 1cᵀ`` fitted on the centred statistics,
#: ``W_out Tᵀ`` plus the bias ``W_out c`` (STAT with ``PruneConfig.intercept``);
#: ``none``: kept columns only.
CORRECTIONS = ("affine", "least-squares", "mean-bias", "none")


class MethodNotApplicable(ValueError):
    """The method cannot prune this architecture (one sentence saying why)."""


class PruningMethod:
    """One pruning method. Subclasses set the class attributes and implement ``plan``."""

    name: str = ""
    label: str = ""          # short name for tables and the app
    summary: str = ""        # one line: what it scores, how it allocates, its correction
    correction: str = "none"
    correction_ridge: float | None = None
    whole_model: bool = False    # True: implements prune_ (changes more than heads and neurons)
    decoder_only: bool = False
    needs_data: bool = False     # prepare() must see the calibration windows (e.g. a gradient pass)
    #: trains the model (minutes, not seconds): the app and benchmarks run it only when asked by name
    needs_training: bool = False
    #: a whole-model method whose ``prune_`` ends in a head/neuron plan (``info["plan"]``, a dict):
    #: its model exports like any plan-based method's
    returns_plan: bool = False
    #: which parts of the shared calibration the method uses (the benchmarks charge their time):
    #: the dense block statistics (Grams, sums), and STAT's sensitivity pass + decompositions
    uses_block_stats: bool = True
    uses_stat_analysis: bool = False

    @property
    def calibration_needs(self) -> frozenset[str]:
        """What the shared calibration stage computes for this method (:func:`stat_core.pipeline.calibrate`):
        ``"block_stats"`` (the Grams and sums the corrections and most scores read; not for a method that
        reads neither, e.g. one scoring weights alone: it calibrates nothing), ``"sensitivity"`` (the
        gradient pass) and ``"analyses"`` (STAT's per-layer decompositions) only for methods that read
        STAT's analysis. FLAP, Wanda-sp and SlimGPT skip the gradient pass and the decompositions;
        LLM-Pruner needs only its own gradient pass (its ``prepare``)."""
        needs = {"block_stats"} if self.uses_block_stats else set()
        if self.uses_stat_analysis:
            needs |= {"sensitivity", "analyses"}
        return frozenset(needs)
    #: plans from what each layer gives while it is in memory (:meth:`layer_summary`, then
    #: :meth:`plan_from_summaries`), so streaming (``--offload``) can run it one block at a time
    streams: bool = False
    #: Streaming: its settings read one layer at a time too, so ``--offload`` accepts any of them (else
    #: only the defaults)
    streamed_settings: bool = False
    #: the method's own settings: a frozen dataclass whose fields all have defaults (None: it has none).
    #: The CLI makes one flag per field (``--<method>-<field>``); configs carry an instance.
    Settings: type | None = None

    def settings_of(self, config) -> object | None:
        """The settings ``config`` carries for this method, or the defaults; ValueError (one sentence)
        when they belong to another method."""
        given = getattr(config, "settings", None)
        if self.Settings is None:
            if given is not None:
                raise ValueError(f"{self.label} has no settings of its own; drop the settings "
                                 f"({type(given).__name__}) or choose the method they belong to")
            return None
        if given is None:
            return self.Settings()
        if not isinstance(given, self.Settings):
            raise ValueError(f"{self.label} takes {self.Settings.__name__} settings, got {type(given).__name__}")
        return given

    def check_config(self, config) -> None:
        """One sentence (ValueError) when ``config`` asks this method for something it cannot do."""
        self.check_settings(self.settings_of(config))

    def quick_settings(self, settings) -> tuple[object | None, str]:
        """``(settings, note)`` for an instant re-plan (the app's slider): this method's settings with
        whatever takes minutes left out, and a phrase saying what was left out ("" when nothing)."""
        return settings, ""

    def check_settings(self, settings) -> None:
        """One sentence (ValueError) when a number in ``settings`` is not finite (``nan``, ``inf``): the
        range checks of a settings class compare numbers, and NaN passes every comparison that is
        written as ``not x > 0`` but none of the others, so it is refused here for every method."""
        if settings is None:
            return
        for field in dataclasses.fields(settings):
            value = getattr(settings, field.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{self.label}'s {field.name} must be a finite number, got {value}.")

    def correction_ridge_for(self, config) -> float | None:
        """The relative ridge of the plan's least-squares correction under ``config``."""
        return self.correction_ridge

    def adds_output_bias(self, config) -> bool:
        """Whether the correction gives a pruned block's output projection a bias (the budget
        charges it where the family has none)."""
        return self.correction in ("affine", "mean-bias")

    def check_applicable(self, model) -> None:
        """Raise :class:`MethodNotApplicable` (one sentence) when the method cannot run on ``model``."""
        adapter = get_adapter(model)
        if self.decoder_only and not adapter.is_decoder:
            raise MethodNotApplicable(f"{self.label} applies to decoder language models only; "
                                      f"choose another method for this {adapter.family} encoder")

    def prepare(self, model, data: "CalibrationSet | None", calibration: "Calibration") -> None:
        """Extra statistics this method needs, stored in ``calibration.extras`` (idempotent)."""

    def plan(self, model, calibration: "Calibration", config: "PruneConfig", model_name: str = "",
             calibration_info: dict | None = None) -> PrunePlan:
        raise NotImplementedError

    def layer_summary(self, adapter: ModelAdapter, layer: int, stats, config: "PruneConfig",
                      reload: Callable | None = None, drop_weights: Callable | None = None):
        """Streaming methods: what :meth:`plan_from_summaries` needs of one layer, from its dense
        ``stats`` while its two output projections are in memory (``drop_weights()`` may free them once
        read; ``reload()`` reads the statistics back from disk)."""
        raise NotImplementedError

    def plan_from_summaries(self, adapter: ModelAdapter, summaries: list, config: "PruneConfig",
                            model_name: str = "", calibration_info: dict | None = None) -> PrunePlan:
        """Streaming methods: the plan from every layer's :meth:`layer_summary`."""
        raise NotImplementedError

    #: runs the layer-wise modes (``propagate``, ``sequential``: :meth:`prune_layerwise_`); the others
    #: run one-shot only
    layerwise: bool = False

    def prune_layerwise_(self, model, runner, calibration: "Calibration", config: "PruneConfig",
                         model_name: str = "", calibration_info: dict | None = None,
                         progress=None) -> tuple[PrunePlan, list]:
        """Layer-wise modes: prune ``model`` in place one layer at a time (``runner`` holds the
        calibration windows' hidden states); returns the final plan and the statistics each layer's
        correction used."""
        raise NotImplementedError

    def finish_(self, model, calibration: "Calibration", config: "PruneConfig") -> dict:
        """After the plan is applied: whatever else the method changes in the pruned ``model`` (STAT's
        output prior); returns a summary for ``PruneResult.info`` (empty: nothing)."""
        return {}

    def prune_(self, model, data: "CalibrationSet", config: "PruneConfig", progress=None) -> dict:
        """Whole-model methods only: prune ``model`` in place, return a summary dict."""
        raise NotImplementedError


class ScoredMethod(PruningMethod):
    """A method that scores each layer's heads and neurons on their own (:meth:`layer_scores`) and
    plans from all the scores (:meth:`plan_from_summaries`): it streams."""

    streams = True

    def layer_scores(self, adapter: ModelAdapter, layer: int, stats, settings=None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(head scores, neuron scores)`` of one layer; ``settings``: the method's own (its defaults
        when it has some and none are given)."""
        raise NotImplementedError

    def layer_summary(self, adapter, layer, stats, config, reload=None, drop_weights=None):
        return self.layer_scores(adapter, layer, stats, self.settings_of(config))

    def plan(self, model, calibration, config, model_name="", calibration_info=None):
        adapter = get_adapter(model)
        stats = calibration.dense_stats or [None] * adapter.num_layers  # a method that reads none: no statistics
        summaries = [self.layer_summary(adapter, i, st, config) for i, st in enumerate(stats)]
        return self.plan_from_summaries(adapter, summaries, config, model_name, calibration_info)


# --- shared helpers --------------------------------------------------------------------------------

def attention_options(n_heads: int, n_kv: int) -> list[tuple[int, int]]:
    """Every feasible ``(kept query heads, kept KV heads)`` of one layer, smallest first: ``g`` whole
    KV groups with the same ``r`` query heads each (any head count when every head has its own KV)."""
    group = n_heads // n_kv
    if group == 1:
        return [(m, m) for m in range(1, n_heads + 1)]
    return sorted({(r * g, g) for r in range(1, group + 1) for g in range(1, n_kv + 1)})


def select_heads(head_scores: torch.Tensor, n_heads: int, n_kv: int, keep_heads: int, keep_kv: int,
                 kv_scores: torch.Tensor | None = None) -> tuple[list[int], list[int]]:
    """The ``keep_heads`` query heads in ``keep_kv`` whole KV groups with the highest scores.

    Within every group its best ``r = keep_heads / keep_kv`` heads; groups ranked by the summed
    score of those heads (plus ``kv_scores[g]``, a score for the group's own key/value rows).
    Without GQA (one query head per KV head) this is simply the top ``keep_heads`` heads.
    """
    group = n_heads // n_kv
    scores = head_scores.detach().double().cpu()
    if group == 1:
        top = sorted(torch.argsort(scores, descending=True)[:keep_heads].tolist())
        return top, top
    r = keep_heads // keep_kv
    best = {g: sorted(range(g * group, (g + 1) * group), key=lambda h: -float(scores[h]))[:r] for g in range(n_kv)}
    value = {g: float(scores[best[g]].sum()) + (0.0 if kv_scores is None else float(kv_scores[g])) for g in best}
    groups = sorted(sorted(best, key=lambda g: -value[g])[:keep_kv])
    return sorted(h for g in groups for h in best[g]), groups


@dataclass
class LayerCosts:
    """One layer's full widths and its cost functions in the budget's unit (params or MACs)."""

    n_heads: int
    n_kv: int
    d_ff: int
    attn: Callable[[int, int], float]
    mlp: Callable[[int], float]

    @property
    def full(self) -> float:
        return self.attn(self.n_heads, self.n_kv) + self.mlp(self.d_ff)


def layer_costs(adapter: ModelAdapter, config: "PruneConfig") -> list[LayerCosts]:
    out = []
    for layer in range(adapter.num_layers):
        attn, mlp = _unit_costs(adapter, layer, config)
        shape = adapter.layer_shape(layer)
        out.append(LayerCosts(shape.num_heads, shape.num_kv_heads, shape.intermediate_size, attn, mlp))
    return out


def neurons_for_budget(costs: list[LayerCosts], attn_kept: list[tuple[int, int]], target: float,
                       neuron_scores: list[torch.Tensor] | None = None, uniform: bool = False) -> list[int]:
    """Neurons to keep per layer so that, with the attention choices ``attn_kept``, the blocks lose
    ``target`` of their full cost (within one neuron).

    ``uniform``: the same count in every layer (methods with one ratio for all layers). Otherwise
    ``neuron_scores[l]`` (comparable across layers) are ranked globally and the lowest go first.
    Every layer keeps at least one neuron.
    """
    total = sum(c.full for c in costs)
    budget_left = (1 - target) * total - sum(c.attn(*a) for c, a in zip(costs, attn_kept))
    per_neuron = [c.mlp(1) - c.mlp(0) for c in costs]
    fixed = sum(c.mlp(0) for c in costs)
    if uniform:
        k = int(round((budget_left - fixed) / sum(per_neuron)))
        return [int(min(max(k, 1), c.d_ff)) for c in costs]
    # Global ranking: keep the highest-scored neurons until the remaining budget is spent.
    scores = torch.cat([s.detach().double().cpu() for s in neuron_scores])
    owner = torch.cat([torch.full((c.d_ff,), i) for i, c in enumerate(costs)])
    order = torch.argsort(scores, descending=True).tolist()
    keep = [1] * len(costs)  # never empty a layer: the best neuron of each layer is kept first
    spent = fixed + sum(per_neuron)
    firsts = {int(torch.argmax(s)) + sum(c.d_ff for c in costs[:i]) for i, (s, c) in enumerate(zip(neuron_scores, costs))}
    for j in order:
        if j in firsts:
            continue
        layer = int(owner[j])
        if spent + per_neuron[layer] / 2 > budget_left:
            break
        keep[layer] += 1
        spent += per_neuron[layer]
    return keep


def build_plan(adapter: ModelAdapter, config: "PruneConfig", method: PruningMethod,
               layers: list[tuple[list[int], list[int], list[int]]], model_name: str = "",
               calibration_info: dict | None = None, head_orders: list[list[int]] | None = None,
               extra_budget: dict | None = None) -> PrunePlan:
    """A :class:`PrunePlan` from each layer's ``(kept heads, kept KV heads, kept neurons)``;
    the achieved budget is counted in the config's unit."""
    costs = layer_costs(adapter, config)
    total = sum(c.full for c in costs)
    kept_cost = sum(c.attn(len(h), len(kv)) + c.mlp(len(n)) for c, (h, kv, n) in zip(costs, layers))
    plans = []
    for i, (heads, kv, neurons) in enumerate(layers):
        c = costs[i]
        if not heads or not neurons:
            raise AssertionError(f"{method.name} emptied layer {i}")  # internal bug, never user input
        geo = block_geometry(adapter, i)
        plans.append(LayerPlan(layer=i, num_heads=c.n_heads, num_kv_heads=c.n_kv, intermediate_size=c.d_ff,
                               kept_heads=sorted(int(h) for h in heads), kept_kv_heads=sorted(int(g) for g in kv),
                               kept_neurons=sorted(int(j) for j in neurons),
                               head_order=list(head_orders[i]) if head_orders else [],
                               attn_options=[{"heads": h, "kv_heads": g, "params": geo.attn_params(h, g), "damage": None}
                                             for h, g in attention_options(c.n_heads, c.n_kv)]))
    budget = {"kind": config.budget_kind, "target": config.sparsity, "flops_seq_len": config.flops_seq_len,
              "achieved": 1 - kept_cost / total if total else 0.0, "predicted_damage": None,
              "uniform": config.uniform, **(extra_budget or {})}
    if getattr(config, "settings", None) is not None:  # only when given: default plans stay as they were
        budget["settings"] = dataclasses.asdict(method.settings_of(config))
    return PrunePlan(model=model_name, method=method.name, mode=config.mode, budget=budget,
                     calibration=calibration_info or {}, layers=plans, correction=method.correction,
                     correction_ridge=method.correction_ridge_for(config))


def plan_from_scores(adapter: ModelAdapter, config: "PruneConfig", method: PruningMethod,
                     counts: list[tuple[int, int, int]], head_scores: list[torch.Tensor],
                     neuron_scores: list[torch.Tensor], model_name: str = "",
                     calibration_info: dict | None = None) -> PrunePlan:
    """The plan that keeps, in every layer, ``counts[l] = (heads, KV heads, neurons)`` units with
    the highest scores (whole KV groups by :func:`select_heads`); heads ordered by score."""
    layers = []
    for layer, ((h, g, k), hs, ns) in enumerate(zip(counts, head_scores, neuron_scores)):
        kept_heads, kept_kv = select_heads(hs, len(hs), adapter.layer_shape(layer).num_kv_heads, h, g)
        layers.append((kept_heads, kept_kv, top_k(ns, k)))
    orders = [torch.argsort(hs, descending=True).tolist() for hs in head_scores]
    return build_plan(adapter, config, method, layers, model_name, calibration_info, orders)


def with_units(plan: PrunePlan, method: PruningMethod, layers: list[tuple[list[int], list[int], list[int]]]) -> PrunePlan:
    """``plan`` (same counts and budget) with other kept units, relabelled as ``method``."""
    new_layers = [LayerPlan(**{**lp.__dict__, "kept_heads": sorted(h), "kept_kv_heads": sorted(kv),
                               "kept_neurons": sorted(n)}) for lp, (h, kv, n) in zip(plan.layers, layers)]
    return PrunePlan(**{**plan.__dict__, "layers": new_layers, "method": method.name,
                        "correction": method.correction, "correction_ridge": method.correction_ridge})


def split_scores(pairs) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-layer ``(head scores, neuron scores)`` pairs as two lists: heads, neurons."""
    return [h for h, _ in pairs], [n for _, n in pairs]


def top_k(scores: torch.Tensor, k: int) -> list[int]:
    return sorted(torch.argsort(scores.detach().double().cpu(), descending=True)[:k].tolist())


def standardize(x: torch.Tensor) -> torch.Tensor:
    """``(x − mean) / std`` over the last axis (FLAP's per-layer standardization)."""
    std = x.std(dim=-1, keepdim=True)
    return (x - x.mean(dim=-1, keepdim=True)) / torch.where(std > 0, std, torch.ones_like(std))


def nearest_attention_at_least(costs: LayerCosts, keep_fraction: float) -> tuple[int, int]:
    """The cheapest feasible attention choice that keeps at least ``keep_fraction`` of the attention
    cost (one ratio for every layer, rounded towards keeping, as FLAP's uniform baselines do)."""
    full = costs.attn(costs.n_heads, costs.n_kv)
    options = [(costs.attn(h, g), h, g) for h, g in attention_options(costs.n_heads, costs.n_kv)]
    ok = [o for o in options if o[0] >= keep_fraction * full - 1e-9]
    _, h, g = min(ok)
    return h, g


def _unit_costs(adapter: ModelAdapter, layer: int, config: PruneConfig):
    """``(attn_cost(n_heads, n_kv), mlp_cost(n_neurons))`` of one layer in the config's budget unit.

    Parameters include the output bias a correction creates in a pruned block of a family without
    one (STAT's intercept, FLAP's mean bias): ``hidden`` more parameters once any unit is removed.
    """

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
