"""Wanda-sp — the structured variant of Wanda that FLAP's authors use as a baseline
(An et al., AAAI 2024, code ``lib/prune.py: prune_wanda_sp``; Wanda: Sun et al., ICLR 2024).

Score: for input column ``j`` of the output projection ``W``, ``mean_i |W_ij| · ‖z_j‖`` with
``‖z_j‖`` the root mean square of the column over the calibration tokens (``√(G_jj / N)``);
a head's score is the sum over its columns.

Allocation: the same ratio in every layer — each layer's attention keeps the cheapest feasible
configuration holding at least ``1 − ratio`` of its attention cost (FLAP's code removes
``int(ratio · heads)`` heads per layer: rounding towards keeping), and every layer keeps the same
number of neurons, chosen so the global budget is met. Under grouped-query attention whole KV
groups go, with the same number of query heads kept in each (:func:`select_heads`).

Correction: none (FLAP's code calls ``compress(..., bias=False)`` for Wanda-sp).
"""

from __future__ import annotations

import torch

from stat_core.methods.base import (
    ScoredMethod,
    layer_costs,
    nearest_attention_at_least,
    neurons_for_budget,
    plan_from_scores,
    split_scores,
)
from stat_core.surgery.budget import heads_prunable


def wanda_layer_scores(adapter, layer: int, st) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-head and per-neuron Wanda-sp scores of one layer."""
    shape = adapter.layer_shape(layer)
    n = max(st.n_tokens, 1)
    w_o = adapter.attn_out_proj(layer).weight.detach().to(torch.float64).cpu()
    w_d = adapter.mlp_out_proj(layer).weight.detach().to(torch.float64).cpu()
    attn = w_o.abs().mean(0) * torch.sqrt(torch.diagonal(st.attn_gram).cpu() / n)
    mlp = w_d.abs().mean(0) * torch.sqrt(torch.diagonal(st.mlp_gram).cpu() / n)
    return attn.reshape(shape.num_heads, adapter.head_dim).sum(1), mlp


def wanda_scores(adapter, stats) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-head and per-neuron Wanda-sp scores of every layer."""
    return split_scores([wanda_layer_scores(adapter, layer, st) for layer, st in enumerate(stats)])


class WandaSP(ScoredMethod):
    name = "wanda-sp"
    label = "Wanda-sp"
    summary = "|W|·‖z‖ per unit, the same ratio in every layer, no correction"
    correction = "none"

    def layer_scores(self, adapter, layer, stats, settings=None):
        return wanda_layer_scores(adapter, layer, stats)

    def plan_from_summaries(self, adapter, summaries, config, model_name="", calibration_info=None):
        costs = layer_costs(adapter, config)
        head_scores, neuron_scores = split_scores(summaries)
        attn = [nearest_attention_at_least(c, 1 - config.sparsity) if heads_prunable(adapter, config)
                else (c.n_heads, c.n_kv) for c in costs]
        keep_n = neurons_for_budget(costs, attn, config.sparsity, uniform=True) if config.prune_neurons \
            else [c.d_ff for c in costs]
        return plan_from_scores(adapter, config, self, [(h, g, k) for (h, g), k in zip(attn, keep_n)],
                                head_scores, neuron_scores, model_name, calibration_info)
