"""FLAP — fluctuation-based adaptive structured pruning (An et al., AAAI 2024; CASIA-IVA-Lab/FLAP).

Paper: "Fluctuation-based Adaptive Structured Pruning for Large Language Models", arXiv 2312.11983.
Read from the authors' code (``lib/prune.py``: ``prune_flap`` with metric ``WIFV`` and structure
``AL-AM``, the defaults of their scripts); this is our own implementation on our statistics.

Score ("WIFV", weighted input feature variance): for input column ``j`` of the output projection
``W`` (``o_proj`` / ``down_proj``), ``Var(z_j) · ‖W[:, j]‖²``, the variance taken over the
calibration tokens (exact, from the Gram diagonal and the column sums). For attention the
authors square the per-column score before use; we do the same. Their code's other two metrics are
settings (:class:`FlapSettings`, ``--flap-metric``): ``WIFN``, weighted input feature norm,
``mean_i |W_ij| · √E[z_j²]`` (the Wanda-sp column score), and ``IFV``, ``Var(z_j)`` alone.

Allocation ("AL-AM": adaptive across layers and modules): the per-column scores of each layer are
standardized (``(x − mean) / std`` over the layer's columns) separately for attention and MLP; a
head's score is the mean of its columns' standardized scores. All heads and channels of the model
are ranked together; walking down the ranking with each head weighted by its parameter cost
relative to one channel (the authors' ``512/3`` for LLaMA-7B is exactly that ratio), the threshold
is where the kept cost reaches ``1 − ratio``.

Correction: the removed columns' mean contribution ``W[:, removed] · mean(z_removed)`` is added to
the output projection's bias ("baseline" compensation); no weights change.

Our adaptations, each needed to meet this project's rules: (1) grouped-query attention — the
threshold gives each layer a number of query heads; the layer keeps the feasible whole-KV-group
configuration (same count per group) whose head count is nearest (ties towards keeping), chosen by
the same head scores (:func:`select_heads`); (2) the budget is met exactly by then ranking the
standardized channel scores globally (FLAP's own channel ordering) against what the heads left;
(3) no layer is emptied; (4) calibration statistics come from the dense model for every layer,
as in FLAP (which also measures each layer on the dense model's outputs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from stat_core.methods.base import (
    ScoredMethod,
    attention_options,
    layer_costs,
    nearest_attention_at_least,
    neurons_for_budget,
    plan_from_scores,
    split_scores,
    standardize,
)
from stat_core.surgery.budget import heads_prunable


#: The fluctuation metrics of the authors' code (``lib/prune.py``: ``metrics``); WIFV is their default.
FLAP_METRICS = ("WIFV", "WIFN", "IFV")


@dataclass(frozen=True)
class FlapSettings:
    """FLAP's knob: ``metric``, the per-column score — ``WIFV`` (default), ``WIFN`` or ``IFV``."""

    metric: str = field(default="WIFV", metadata={"choices": ("WIFV", "WIFN", "IFV")})

    def __post_init__(self):
        object.__setattr__(self, "metric", str(self.metric).upper())
        if self.metric not in FLAP_METRICS:
            raise ValueError(f"FLAP's metric is one of {', '.join(FLAP_METRICS)} (WIFV: the authors' default), "
                             f"got {self.metric!r}")


def _column_scores(st, kind: str, weight: torch.Tensor, metric: str) -> torch.Tensor:
    """One output projection's per-input-column score by FLAP's ``metric``."""
    if metric == "WIFN":  # E[z²] from the Gram diagonal, as the authors' scaler_inp
        return (weight.abs() * torch.sqrt(torch.diagonal(st.second_moment(kind)).cpu() / max(st.n_tokens, 1))).mean(0)
    variance = st.variance(kind).cpu()
    return variance if metric == "IFV" else variance * (weight ** 2).sum(0)


def flap_layer_scores(adapter, layer: int, st, metric: str = "WIFV") -> tuple[torch.Tensor, torch.Tensor]:
    """Standardized per-head and per-neuron scores of one layer (comparable across layers)."""
    shape = adapter.layer_shape(layer)
    w_o = adapter.attn_out_proj(layer).weight.detach().to(torch.float64).cpu()
    w_d = adapter.mlp_out_proj(layer).weight.detach().to(torch.float64).cpu()
    attn = _column_scores(st, "attn", w_o, metric) ** 2
    mlp = _column_scores(st, "mlp", w_d, metric)
    return standardize(attn).reshape(shape.num_heads, adapter.head_dim).mean(1), standardize(mlp)


def flap_scores(adapter, stats, metric: str = "WIFV") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Standardized per-head and per-neuron scores of every layer (comparable across layers)."""
    return split_scores([flap_layer_scores(adapter, layer, st, metric) for layer, st in enumerate(stats)])


class Flap(ScoredMethod):
    name = "flap"
    label = "FLAP"
    summary = "fluctuation score Var(z)·‖W‖², standardized, one global ranking; mean-bias compensation"
    correction = "mean-bias"
    Settings = FlapSettings
    streamed_settings = True  # the metric scores one layer at a time

    def layer_scores(self, adapter, layer, stats, settings=None):
        return flap_layer_scores(adapter, layer, stats, (settings or FlapSettings()).metric)

    def plan_from_summaries(self, adapter, summaries, config, model_name="", calibration_info=None):
        costs = layer_costs(adapter, config)
        head_scores, neuron_scores = split_scores(summaries)
        prune_heads = heads_prunable(adapter, config)
        if config.uniform:  # FLAP's "UL-UM": one ratio in every layer
            attn = [nearest_attention_at_least(c, 1 - config.sparsity) if prune_heads else (c.n_heads, c.n_kv)
                    for c in costs]
            keep_n = neurons_for_budget(costs, attn, config.sparsity, uniform=True) if config.prune_neurons \
                else [c.d_ff for c in costs]
        else:
            attn = self._global_heads(costs, head_scores, neuron_scores, config.sparsity, config.prune_neurons) \
                if prune_heads \
                else [(c.n_heads, c.n_kv) for c in costs]
            keep_n = neurons_for_budget(costs, attn, config.sparsity, neuron_scores) if config.prune_neurons \
                else [c.d_ff for c in costs]
        return plan_from_scores(adapter, config, self, [(h, g, k) for (h, g), k in zip(attn, keep_n)],
                                head_scores, neuron_scores, model_name, calibration_info)

    @staticmethod
    def _global_heads(costs, head_scores, neuron_scores, ratio, rank_neurons: bool = True) -> list[tuple[int, int]]:
        """FLAP's joint threshold over heads and channels, each weighted by its cost (a head's share
        of its layer's attention cost, a channel's cost): walking down the ranking, the cut is where
        the kept cost is nearest ``(1 − ratio)`` of the blocks' full cost (units that are not ranked,
        e.g. neurons when only heads may go, count as kept). Heads kept per layer, rounded to the
        nearest feasible grouped-query configuration."""
        scores, weights, owner = [], [], []
        always_kept = 0.0
        for i, (c, hs, ns) in enumerate(zip(costs, head_scores, neuron_scores)):
            head_cost = c.attn(c.n_heads, c.n_kv) / c.n_heads
            scores.append(hs)
            weights.append(torch.full_like(hs, head_cost))
            owner.append(torch.full((len(hs),), i))
            if rank_neurons:
                scores.append(ns)
                weights.append(torch.full_like(ns, c.mlp(1) - c.mlp(0)))
                owner.append(torch.full((len(ns),), -1))
                always_kept += c.mlp(0)
            else:
                always_kept += c.mlp(c.d_ff)
        scores, weights, owner = torch.cat(scores), torch.cat(weights), torch.cat(owner)
        target_kept = (1 - ratio) * sum(c.full for c in costs) - always_kept
        order = torch.argsort(scores, descending=True)
        cum = torch.cumsum(weights[order], 0)
        cut = int(torch.argmin((cum - target_kept).abs()))
        kept = order[: cut + 1]
        out = []
        for i, c in enumerate(costs):
            m = int((owner[kept] == i).sum())
            options = attention_options(c.n_heads, c.n_kv)
            out.append(min(options, key=lambda o: (abs(o[0] - m), -o[0])))
        return out


__all__ = ["FLAP_METRICS", "Flap", "FlapSettings", "flap_scores"]
