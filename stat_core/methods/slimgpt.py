"""SlimGPT — layer-wise structured pruning by Optimal Brain Surgeon (Ling et al., NeurIPS 2024).

Paper: "SlimGPT: Layer-wise Structured Pruning for Large Language Models", arXiv 2412.18110. No
official repository; read from the copy of the authors' code in aden9460/EdgeVAR ``slimgpt_pub/``
(``slim_utils/slimgpt.py``: ``SlimGPT.add_batch`` / ``struct_prune``; ``model_slimming.py`` and
``prune.py``: the per-layer loop and the ``log_increase`` schedule; ``README.md``: the LLaMA-7B
recipe). This is our own implementation on our statistics.

What it scores. For an output projection ``W: (d_out, n)`` (``o_proj`` for heads, ``down_proj``
for MLP channels) and its input ``Z`` (N tokens × n), the layer-wise Hessian is ``H = 2 ZᵀZ / N``
plus damping ``percdamp · mean(diag H)`` (``percdamp`` = 0.01, the default of their argument parser;
their README's LLaMA recipe passes 0 and the EdgeVAR scripts 1e-3 — we need it positive; columns that
are never active are zeroed in ``W`` first, so they go first). The OBS error of removing column ``j`` is
``‖W[:, j]‖² / [H⁻¹]_jj``. Heads ("grouped Cholesky"): each head's diagonal block of ``H⁻¹`` is
Cholesky-factored, and a head's error is ``Σ_{j ∈ head} ‖W[:, j]‖² / L_jj²`` with ``L`` that block's
factor. Heads go one at a time, greedily: remove the cheapest head, apply the OBS update to the
remaining columns (``W ← W − W_R (H⁻¹_RR)⁻¹ H⁻¹_R:``, and ``H⁻¹`` restricted to the survivors),
re-score, repeat. Channels ("dynamic group size"): score every remaining channel, remove the
cheapest batch at once with the OBS update, re-score; batch sizes shrink as in their code —
``min(left, max(b, 64), 1024)`` with ``b = (n_remove − 512) // 2`` and ``b ← (b − 512) // 2`` after
each batch (for LLaMA-7B at 20%: 845, 166, then 64s). Scores use the already-updated weights.

How it allocates across layers ("incremental pruning ratio"). Layer ``i`` of ``L`` removes the
fraction ``r_i = r_min + (r_max − r_min) · ln(1 + i) / ln(L)`` of *both* its attention heads and its
MLP channels (their code passes the same ``sparsity[i]`` to ``o_proj`` and ``down_proj``, and hard-codes
``ln 32``, i.e. ``ln L`` for LLaMA-7B). ``r_min`` and ``r_max`` are inputs there; their README recipe
for 20% on LLaMA-7B is ``r_min = 0.0625, r_max = 0.25``: one quarter, and exactly a 20% mean over 32
layers. We keep that shape (``r_min = r_max / 4``, :data:`FIRST_TO_LAST`) and solve ``r_max`` so the
cost-weighted mean of ``r_i`` is the requested budget. ``config.uniform``: the same ratio in every
layer (their non-``non_uniform`` mode).

Correction. For a fixed kept set, OBS compensation (sequential or in batches, it composes) gives
``W_I + W_R H_RI H_II⁻¹`` — exactly the least-squares refit of the output projection from the kept
columns with ridge ``percdamp · mean(diag G)`` on ``G = ZᵀZ`` (``H`` is ``2G/N``; the scale cancels).
So the plan's correction is ``least-squares`` with ``correction_ridge = percdamp``
(:func:`stat_core.linalg.ridge_of` is ``rel · trace(G)/n``): the difference from STAT is only which
units are kept and how many per layer.

Our adaptations, each needed to meet this project's rules:

1. Grouped-query attention. A layer must keep ``g`` whole KV groups with the same number ``r`` of
   query heads in each. The layer's attention target is the feasible ``(r·g, g)`` whose cost is
   nearest to ``(1 − r_i)`` of the full attention cost (ties: keep more). SlimGPT's greedy then runs
   unchanged except that the cheapest head is taken among the heads whose removal keeps that target
   reachable: a head may go if its group stays at ``≥ r`` heads, or its group is already below
   ``r`` (it will be emptied), or more than ``g`` groups still hold ``≥ r`` heads. At the end exactly
   ``g`` groups hold ``r`` heads each and the others are empty (their KV heads go). Without GQA the
   rule allows every head: plain SlimGPT.
2. The budget is the fraction of block parameters (or FLOPs) removed, counted with each layer's
   real costs; SlimGPT rounds per module (``round(heads · r_i)`` heads, ``round(d_ff · r_i)``
   channels). We round the heads to the nearest feasible configuration, then give the MLPs the same
   logarithmic shape with its scale re-solved for what the heads left, and fill whole neurons so the
   total is met to within one neuron. Heads-only or neurons-only configs put the whole budget on the
   allowed module with the same schedule.
3. No layer is emptied: at least one KV group with one query head, and one neuron, stay.
4. One-shot: the statistics are the dense model's (``calibration.dense_stats``), the same every
   method gets. The authors propagate layer by layer (each layer calibrated on the already pruned
   and compensated outputs of the layers before it); we do not.
5. Encoders (BERT family, every head its own KV head) work unchanged; attention output biases are
   left as they are, as in their code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from stat_core.adapters import get_adapter
from stat_core.linalg import cholesky_with_ridge, ridge_of
from stat_core.methods.base import (
    LayerCosts,
    PruningMethod,
    attention_options,
    build_plan,
    layer_costs,
    neurons_for_budget,
)
from stat_core.surgery.budget import heads_prunable

#: Their damping, relative to the mean Hessian diagonal (``--percdamp`` default in ``model_slimming.py``).
PERCDAMP = 0.01
#: ``r_min / r_max`` of the logarithmic schedule (README recipe for 20% on LLaMA-7B: 0.0625 / 0.25).
FIRST_TO_LAST = 0.25


@dataclass(frozen=True)
class SlimGPTSettings:
    """SlimGPT's knobs: ``percdamp``, the damping of the Hessian relative to its mean diagonal (also
    the ridge of the final correction); ``first_to_last``, ``r_min / r_max`` of the logarithmic
    layer schedule."""

    percdamp: float = PERCDAMP
    first_to_last: float = FIRST_TO_LAST

    def __post_init__(self):
        if not self.percdamp > 0:
            raise ValueError(f"SlimGPT's percdamp must be > 0 (their default is {PERCDAMP}), got {self.percdamp}")
        if not 0 < self.first_to_last <= 1:
            raise ValueError(f"SlimGPT's first_to_last (r_min / r_max) must be in (0, 1], got {self.first_to_last}")


# --- the schedule -----------------------------------------------------------------------------------

def log_schedule_shape(num_layers: int, first_to_last: float = FIRST_TO_LAST) -> list[float]:
    """``r_i / r_max`` of SlimGPT's logarithmic increase: ``a + (1 − a)·ln(1 + i)/ln(L)``, ``a = r_min/r_max``."""
    if num_layers <= 1:
        return [1.0] * num_layers
    return [first_to_last + (1 - first_to_last) * math.log(1 + i) / math.log(num_layers) for i in range(num_layers)]


def solve_scale(shape: list[float], weights: list[float], caps: list[float], budget: float) -> float:
    """The ``c`` with ``Σ min(c·shape_i, cap_i) · weights_i = budget`` (bisection; the largest useful
    ``c`` when the budget is beyond the caps)."""
    def removed(c):
        return sum(min(c * s, cap) * w for s, cap, w in zip(shape, caps, weights))

    if budget <= 0:
        return 0.0
    hi = 1.0
    while removed(hi) < budget and hi < 1e6:
        hi *= 2
    lo = 0.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if removed(mid) < budget:
            lo = mid
        else:
            hi = mid
    return hi


def log_schedule(num_layers: int, target: float, weights: list[float] | None = None,
                 caps: list[float] | None = None, first_to_last: float = FIRST_TO_LAST) -> list[float]:
    """Per-layer pruning ratios ``r_i = r_max·(a + (1 − a)·ln(1 + i)/ln L)`` whose ``weights``-weighted
    mean is ``target`` (each capped at ``caps[i]``, the excess spread over the other layers)."""
    weights = [1.0] * num_layers if weights is None else list(weights)
    caps = [1.0] * num_layers if caps is None else list(caps)
    shape = log_schedule_shape(num_layers, first_to_last)
    c = solve_scale(shape, weights, caps, target * sum(weights))
    return [min(c * s, cap) for s, cap in zip(shape, caps)]


def dynamic_group_sizes(n_remove: int) -> list[int]:
    """SlimGPT's channel batch sizes for removing ``n_remove`` channels (``struct_prune``, headsize 1)."""
    sizes, block, done = [], (n_remove - 512) // 2, 0
    while done < n_remove:
        cnt = min(n_remove - done, max(block, 64), 1024)
        sizes.append(cnt)
        done += cnt
        block = (block - 512) // 2
    return sizes


# --- structured OBS ---------------------------------------------------------------------------------

class StructuredOBS:
    """``W: (d_out, n)`` and ``H⁻¹`` of the damped Hessian, restricted to the columns still alive.

    ``H = G + percdamp·mean(diag G)·I`` with ``G = ZᵀZ`` (SlimGPT's ``2G/N`` up to a scale that no
    decision or update depends on). Removing a set ``R`` applies the OBS update to the surviving
    columns ``A``: ``W_A ← W_A − W_R (H⁻¹_RR)⁻¹ H⁻¹_RA`` and ``H⁻¹ ← H⁻¹_AA − H⁻¹_AR (H⁻¹_RR)⁻¹ H⁻¹_RA``
    (the inverse of ``H_AA``; their code re-inverts ``H`` with the removed rows set to identity, the
    same matrix). ``H⁻¹`` shrinks with every removal; ``cols`` maps its rows to original columns.
    """

    def __init__(self, gram: torch.Tensor, weight: torch.Tensor, percdamp: float = PERCDAMP):
        g = gram.detach().to(torch.float64)
        factor = cholesky_with_ridge(g, ridge_of(g, percdamp))
        # cholesky_solve against I, not cholesky_inverse: the latter is ~40× slower on CPU (float64)
        self.hinv = torch.cholesky_solve(torch.eye(g.shape[0], dtype=g.dtype, device=g.device), factor)
        self.w = weight.detach().to(g.device, torch.float64).clone()
        self.w[:, torch.diagonal(g) == 0] = 0  # never-active columns: free to remove (as their code does)
        self.n = g.shape[0]
        self.cols = torch.arange(self.n, device=g.device)

    def _local(self, cols: torch.Tensor) -> torch.Tensor:
        pos = torch.full((self.n,), -1, dtype=torch.long, device=self.cols.device)
        pos[self.cols] = torch.arange(len(self.cols), device=self.cols.device)
        local = pos[cols.to(self.cols.device)]
        if bool((local < 0).any()):
            raise ValueError("column already removed")
        return local

    def column_errors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alive columns, their OBS errors ‖W[:, j]‖² / [H⁻¹]_jj)``."""
        return self.cols, (self.w[:, self.cols] ** 2).sum(0) / torch.diagonal(self.hinv)

    def block_errors(self, blocks: torch.Tensor) -> torch.Tensor:
        """SlimGPT's grouped-Cholesky error of each block of alive columns ``blocks: (n_blocks, size)``:
        ``Σ_j ‖W[:, j]‖² / L_jj²`` with ``L`` the Cholesky factor of the block of ``H⁻¹``."""
        loc = self._local(blocks)
        sub = self.hinv[loc[:, :, None], loc[:, None, :]]
        diag = torch.diagonal(torch.linalg.cholesky(sub), dim1=-2, dim2=-1) ** 2
        return ((self.w[:, blocks.to(self.cols.device)] ** 2).sum(0) / diag).sum(-1)

    def remove(self, cols: torch.Tensor) -> None:
        """Remove alive columns ``cols`` and compensate the survivors."""
        cols = cols.to(self.cols.device)
        loc = self._local(cols)
        keep = torch.ones(len(self.cols), dtype=torch.bool, device=self.cols.device)
        keep[loc] = False
        h_ra = self.hinv[loc][:, keep]
        sol = torch.cholesky_solve(h_ra, torch.linalg.cholesky(self.hinv[loc][:, loc]))  # (H⁻¹_RR)⁻¹ H⁻¹_RA
        rest = self.cols[keep]
        self.w[:, rest] -= self.w[:, cols] @ sol
        self.w[:, cols] = 0
        self.hinv = self.hinv[keep][:, keep] - h_ra.T @ sol
        self.cols = rest


def prune_heads_obs(gram: torch.Tensor, weight: torch.Tensor, n_heads: int, n_kv: int, head_dim: int,
                    keep_heads: int, keep_kv: int, percdamp: float = PERCDAMP
                    ) -> tuple[list[int], list[int], list[int], torch.Tensor]:
    """SlimGPT's greedy head removal, constrained to end at ``keep_kv`` whole KV groups with
    ``keep_heads / keep_kv`` query heads each (see the module docstring).

    Returns ``(kept_heads, kept_kv, head_order, W)``: ``head_order`` most important first (kept heads
    by their final error, then the removed ones, last removed first); ``W: (d_out, n)`` the
    OBS-compensated weight with the removed heads' columns zero.
    """
    group = n_heads // n_kv
    per_group = keep_heads // keep_kv
    obs = StructuredOBS(gram, weight, percdamp)
    blocks = torch.arange(n_heads * head_dim, device=obs.w.device).reshape(n_heads, head_dim)
    count = [group] * n_kv
    alive = list(range(n_heads))
    removed: list[int] = []
    while len(alive) > keep_heads:
        full_groups = sum(c >= per_group for c in count)
        allowed = [h for h in alive if count[h // group] != per_group or full_groups > keep_kv]
        errors = obs.block_errors(blocks[allowed])
        head = allowed[int(torch.argmin(errors))]
        obs.remove(blocks[head])
        alive.remove(head)
        removed.append(head)
        count[head // group] -= 1
    final = obs.block_errors(blocks[alive]).tolist()
    order = [h for _, h in sorted(zip(final, alive), key=lambda t: -t[0])] + removed[::-1]
    kept_kv = sorted({h // group for h in alive})
    return sorted(alive), kept_kv, order, obs.w


def prune_channels_obs(gram: torch.Tensor, weight: torch.Tensor, n_remove: int, percdamp: float = PERCDAMP
                       ) -> tuple[list[int], torch.Tensor]:
    """SlimGPT's channel removal in shrinking batches (:func:`dynamic_group_sizes`).
    Returns ``(removed channels in removal order, OBS-compensated W)``."""
    obs = StructuredOBS(gram, weight, percdamp)
    removed: list[int] = []
    for cnt in dynamic_group_sizes(n_remove):
        alive, errors = obs.column_errors()
        cols = alive[torch.argsort(errors)[:cnt]]
        obs.remove(cols)
        removed += cols.tolist()
    return removed, obs.w


# --- budget ------------------------------------------------------------------------------------------

def _nearest_attention(c: LayerCosts, keep_fraction: float) -> tuple[int, int]:
    """The feasible ``(heads, kv_heads)`` whose attention cost is nearest ``keep_fraction`` of the full
    attention cost (ties: keep more), as SlimGPT removes ``round(heads · ratio)`` heads."""
    full = c.attn(c.n_heads, c.n_kv)
    return min(attention_options(c.n_heads, c.n_kv),
               key=lambda o: (abs(c.attn(*o) - keep_fraction * full), -c.attn(*o)))


def _fill_neurons(costs: list[LayerCosts], ratios: list[float], budget: float) -> list[int]:
    """Neurons to keep per layer: ``ratios[i]·d_ff`` removed (continuous, already meeting ``budget``
    in cost units), rounded so the removed cost is within half a neuron of ``budget``."""
    per = [c.mlp(1) - c.mlp(0) for c in costs]
    exact = [r * c.d_ff for r, c in zip(ratios, costs)]
    removed = [min(int(math.floor(x)), c.d_ff - 1) for x, c in zip(exact, costs)]
    left = budget - sum(n * p for n, p in zip(removed, per))
    for i in sorted(range(len(costs)), key=lambda i: -(exact[i] - removed[i])):
        if left < per[i] / 2:
            break
        if removed[i] < costs[i].d_ff - 1:
            removed[i] += 1
            left -= per[i]
    return [c.d_ff - n for c, n in zip(costs, removed)]


def slimgpt_counts(costs: list[LayerCosts], target: float, prune_heads: bool, prune_neurons: bool,
                   uniform: bool = False, first_to_last: float = FIRST_TO_LAST
                   ) -> tuple[list[tuple[int, int]], list[int], list[float]]:
    """Per-layer ``(heads, kv_heads)``, neurons to keep, and SlimGPT's layer ratios ``r_i``."""
    full_attn = [(c.n_heads, c.n_kv) for c in costs]
    if uniform:
        attn = [_nearest_attention(c, 1 - target) for c in costs] if prune_heads else full_attn
        keep_n = neurons_for_budget(costs, attn, target, uniform=True) if prune_neurons else [c.d_ff for c in costs]
        return attn, keep_n, [target] * len(costs)
    total = sum(c.full for c in costs)
    a_full = [c.attn(c.n_heads, c.n_kv) for c in costs]
    m_full = [c.mlp(c.d_ff) - c.mlp(0) for c in costs]
    weights = [(a if prune_heads else 0.0) + (m if prune_neurons else 0.0) for a, m in zip(a_full, m_full)]
    removable = [(a - c.attn(1, 1) if prune_heads else 0.0) + (m * (c.d_ff - 1) / c.d_ff if prune_neurons else 0.0)
                 for a, m, c in zip(a_full, m_full, costs)]
    caps = [r / w if w > 0 else 0.0 for r, w in zip(removable, weights)]
    ratios = log_schedule(len(costs), target * total / max(sum(weights), 1e-30), weights, caps,
                          first_to_last=first_to_last)
    attn = [_nearest_attention(c, 1 - r) for c, r in zip(costs, ratios)] if prune_heads else full_attn
    if not prune_neurons:
        return attn, [c.d_ff for c in costs], ratios
    # The MLPs take what the rounded heads left, with the same logarithmic shape.
    left = target * total - sum(a - c.attn(*o) for a, c, o in zip(a_full, costs, attn))
    shape = log_schedule_shape(len(costs), first_to_last)
    caps_m = [(c.d_ff - 1) / c.d_ff for c in costs]
    scale = solve_scale(shape, m_full, caps_m, left)
    mlp_ratios = [min(scale * s, cap) for s, cap in zip(shape, caps_m)]
    return attn, _fill_neurons(costs, mlp_ratios, max(left, 0.0)), ratios


class SlimGPT(PruningMethod):
    name = "slimgpt"
    label = "SlimGPT"
    summary = ("structured OBS: greedy heads, channels in shrinking batches; log-increasing layer ratios; "
               "OBS update (= ridge least squares)")
    correction = "least-squares"
    correction_ridge = PERCDAMP
    Settings = SlimGPTSettings
    streams = True  # the counts come from shapes alone; each layer's selection from its own statistics
    streamed_settings = True

    def correction_ridge_for(self, config) -> float:
        return self.settings_of(config).percdamp

    def _counts(self, adapter, config):
        """Every layer's kept heads, KV heads and neurons and its ratio: from the layer shapes and the
        log-increasing schedule alone (no statistics), so a streamed layer knows its counts at once."""
        costs = layer_costs(adapter, config)
        attn, keep_n, ratios = slimgpt_counts(costs, config.sparsity, heads_prunable(adapter, config),
                                              config.prune_neurons, config.uniform,
                                              self.settings_of(config).first_to_last)
        return costs, attn, keep_n, ratios

    def layer_summary(self, adapter, layer, stats, config, reload=None, drop_weights=None):
        """One layer's OBS selection ``(heads, kv heads, neurons, head order)`` from its dense Gram
        statistics and its two output projections (all a streamed layer needs)."""
        percdamp = self.settings_of(config).percdamp
        costs, attn, keep_n, _ = self._counts(adapter, config)
        c, (h, g), k = costs[layer], attn[layer], keep_n[layer]
        if h < c.n_heads:
            heads, kv, order, _ = prune_heads_obs(stats.attn_gram, adapter.attn_out_proj(layer).weight, c.n_heads,
                                                  c.n_kv, adapter.head_dim, h, g, percdamp)
        else:
            heads, kv, order = list(range(c.n_heads)), list(range(c.n_kv)), list(range(c.n_heads))
        if k < c.d_ff:
            removed, _ = prune_channels_obs(stats.mlp_gram, adapter.mlp_out_proj(layer).weight, c.d_ff - k, percdamp)
            gone = set(removed)
            neurons = [j for j in range(c.d_ff) if j not in gone]
        else:
            neurons = list(range(c.d_ff))
        return heads, kv, neurons, order

    def plan_from_summaries(self, adapter, summaries, config, model_name="", calibration_info=None):
        ratios = self._counts(adapter, config)[3]
        return build_plan(adapter, config, self, [(h, kv, n) for h, kv, n, _ in summaries], model_name,
                          calibration_info, [order for *_, order in summaries],
                          extra_budget={"layer_ratios": [float(r) for r in ratios]})

    def plan(self, model, calibration, config, model_name="", calibration_info=None):
        adapter = get_adapter(model)
        summaries = [self.layer_summary(adapter, i, st, config) for i, st in enumerate(calibration.dense_stats)]
        return self.plan_from_summaries(adapter, summaries, config, model_name, calibration_info)


__all__ = ["SlimGPT", "SlimGPTSettings", "StructuredOBS", "dynamic_group_sizes", "log_schedule", "log_schedule_shape",
           "prune_channels_obs", "prune_heads_obs", "slimgpt_counts"]
