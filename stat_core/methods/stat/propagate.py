"""STAT's layer-by-layer modes: re-select and correct each layer on the pruned path (propagate) or against the dense targets (sequential)."""

from __future__ import annotations

import copy

from stat_core.adapters import ModelAdapter
from stat_core.calibration import distributed
from stat_core.calibration.statistics import BlockStats, LayerwiseRunner
from stat_core.methods.stat.analysis import analyse_layer, plan_from_analyses, stat_correction
from stat_core.progress import ProgressFn, notify
from stat_core.surgery.apply import _apply_kind_, apply_layer_
from stat_core.surgery.plan import PrunePlan


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
        notify(progress, "propagate", layer + 1, adapter.num_layers)
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
        notify(progress, "propagate", layer + 1, adapter.num_layers)
    adapter.record_shapes_in_config_()
    return used




def layerwise_plan(adapter: ModelAdapter, calibration, config, model_name: str = "",
                   calibration_info: dict | None = None) -> PrunePlan:
    """The counts a layer-wise mode keeps: STAT's allocation on the dense analyses (the units are
    re-chosen layer by layer on the pruned path)."""
    plan = plan_from_analyses(adapter, calibration.analyses, config, model_name, calibration_info or {})
    plan.correction = stat_correction(config)
    return plan


def run_layerwise_(model, adapter: ModelAdapter, runner: LayerwiseRunner, plan: PrunePlan, fisher, mode: str,
                   progress: ProgressFn | None) -> list[BlockStats]:
    """``mode`` "propagate" (:func:`_propagate_`) or "sequential" (:func:`_sequential_`) on ``model``."""
    step = _sequential_ if mode == "sequential" else _propagate_
    return step(model, adapter, runner, plan, fisher, progress)
