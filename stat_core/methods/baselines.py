"""Simple baselines that keep STAT's per-layer counts and differ in *which* units go.

- ``no-correction``: exactly STAT's units, no correction folded in (isolates the correction);
- ``magnitude``: units with the largest weight norms (in-projection rows + out-projection columns;
  KV groups by their key/value rows too), no correction;
- ``activation-norm``: units with the largest mean squared activation on the calibration set
  (diagonal of the Gram), no correction.
"""

from __future__ import annotations

import copy
import dataclasses

import torch

from stat_core.adapters import get_adapter
from stat_core.methods.base import PruningMethod, select_heads, top_k, with_units
from stat_core.methods.stat.method import Stat
from stat_core.methods.stat.propagate import layerwise_plan, run_layerwise_
from stat_core.surgery.apply import apply_plan_


def _stat_plan(model, calibration, config, model_name, calibration_info):
    """STAT's plan, counts and costs exactly as STAT computes them (its output biases included)."""
    return Stat().plan(model, calibration, dataclasses.replace(config, method="stat"), model_name, calibration_info)


class _StatCounts(PruningMethod):
    """A baseline that keeps STAT's per-layer counts: ``relabel`` picks its own units in a STAT plan
    (one-shot, or the plan STAT's propagation produced)."""

    uses_stat_analysis = True

    def plan(self, model, calibration, config, model_name="", calibration_info=None):
        return self.relabel(model, _stat_plan(model, calibration, config, model_name, calibration_info), calibration)

    def relabel(self, model, plan, calibration):
        raise NotImplementedError

    layerwise = True

    def prune_layerwise_(self, model, runner, calibration, config, model_name="", calibration_info=None,
                         progress=None):
        """The units STAT's layer-wise mode keeps (or its counts): STAT's propagation on a scratch
        copy, then this model cut by that plan, relabelled, without any correction."""
        plan = layerwise_plan(get_adapter(model), calibration, config, model_name, calibration_info)
        scratch = copy.deepcopy(model)
        scratch_runner = copy.copy(runner)
        scratch_runner.model, scratch_runner.adapter = scratch, get_adapter(scratch)
        run_layerwise_(scratch, scratch_runner.adapter, scratch_runner, plan, calibration.sensitivity, config.mode,
                       progress)
        del scratch
        plan = self.relabel(model, plan, calibration)
        apply_plan_(model, plan, None)
        return plan, calibration.dense_stats


class NoCorrection(_StatCounts):
    name = "no-correction"
    label = "no-correction"
    summary = "STAT's units without the folded correction"

    def relabel(self, model, plan, calibration):
        return with_units(plan, self, [(lp.kept_heads, lp.kept_kv_heads, lp.kept_neurons) for lp in plan.layers])


def magnitude_scores(adapter, layer: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(head_scores, kv_scores, neuron_scores)``: squared weight norms of each unit's rows/columns."""
    shape = adapter.layer_shape(layer)
    hd = adapter.head_dim
    q = adapter.query_proj(layer).weight.detach().float().view(shape.num_heads, hd, -1)
    o = adapter.attn_out_proj(layer).weight.detach().float().view(-1, shape.num_heads, hd)
    kv = torch.cat([p.weight.detach().float() for p in adapter.key_value_projs(layer)], 1)
    head = (q ** 2).sum((1, 2)) + (o ** 2).sum((0, 2))
    kv_score = (kv.view(shape.num_kv_heads, hd, -1) ** 2).sum((1, 2))
    neuron = (adapter.mlp_out_proj(layer).weight.detach().float() ** 2).sum(0)
    for proj in adapter.mlp_in_projs(layer):
        neuron = neuron + (proj.weight.detach().float() ** 2).sum(1)
    return head, kv_score, neuron


class Magnitude(_StatCounts):
    name = "magnitude"
    label = "magnitude"
    summary = "STAT's per-layer counts, largest weight norms kept, no correction"

    def relabel(self, model, plan, calibration=None):
        adapter = get_adapter(model)
        layers = []
        for lp in plan.layers:
            head, kv, neuron = magnitude_scores(adapter, lp.layer)
            heads, groups = select_heads(head, lp.num_heads, lp.num_kv_heads, len(lp.kept_heads),
                                         len(lp.kept_kv_heads), kv if lp.num_heads != lp.num_kv_heads else None)
            layers.append((heads, groups, top_k(neuron, len(lp.kept_neurons))))
        return with_units(plan, self, layers)


class ActivationNorm(_StatCounts):
    name = "activation-norm"
    label = "activation-norm"
    summary = "STAT's per-layer counts, largest calibration activations kept, no correction"

    def relabel(self, model, plan, calibration):
        adapter = get_adapter(model)
        layers = []
        for lp in plan.layers:
            st = calibration.dense_stats[lp.layer]
            head = torch.diagonal(st.attn_gram).reshape(lp.num_heads, adapter.head_dim).sum(1)
            heads, groups = select_heads(head, lp.num_heads, lp.num_kv_heads, len(lp.kept_heads), len(lp.kept_kv_heads))
            layers.append((heads, groups, top_k(torch.diagonal(st.mlp_gram), len(lp.kept_neurons))))
        return with_units(plan, self, layers)


def magnitude_plan(model, plan):
    """``plan``'s per-layer counts with units chosen by weight magnitude (no correction)."""
    return Magnitude().relabel(model, plan)
