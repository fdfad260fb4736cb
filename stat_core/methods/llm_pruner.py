"""LLM-Pruner without recovery (Ma et al., NeurIPS 2023; horseee/LLM-Pruner).

Paper: "LLM-Pruner: On the Structural Pruning of Large Language Models", arXiv 2305.11627.
Read from the authors' code (``hf_prune.py`` and ``llama3.py`` with ``--block_wise --pruner_type
taylor --taylor param_first``, ``LLMPruner/pruner/hf_llama_pruner.py: TaylorImportance``,
``LLMPruner/torch_pruning/pruner/algorithms/metapruner.py: prune_local``); this is our own
implementation. The LoRA recovery stage is not part of it.

Score (first-order Taylor, "param_first"): one backward pass of the calibration loss gives every
weight's gradient; a weight's importance is ``|w · ∂L/∂w|`` (element-wise), and a coupled group's
importance is the sum over all its weights (``grouping_strategy="sum"``). The groups are the
block-wise ones: a head is its ``q``/``k``/``v`` rows and its ``o_proj`` columns; an MLP channel is
its gate/up rows (BERT: the ``W1`` row) and its ``down_proj`` (``W2``) column. Biases and norms do not
enter (their importance reads ``.weight`` only). The loss: decoders, the mean next-token
cross-entropy over the calibration windows (theirs: 10 BookCorpus excerpts of 64 tokens; ours: the
first windows holding the project's gradient-pass budget of ``SENSITIVITY_TOKENS`` real tokens,
see :func:`stat_core.calibration.sizes.sensitivity_windows`); classifiers, the cross-entropy against the
model's *own argmax prediction* (label-free like the project's other gradient pass; the
predictive-Fisher form used there has a zero expected first-order gradient, so it cannot rank by
``|w·g|``), over windows spread across the set.

Allocation: their recipe (``--block_attention_layer_start 4 --block_attention_layer_end 30``, the
same for the MLP, on 32-layer LLaMA; the argparse defaults are 3 and 31) prunes neither the first
four nor the last two layers, and removes the same ratio of heads and of channels in every other
layer (local pruning: ``global_pruning`` is off by default; each layer drops its lowest-scored
``ratio`` of groups). We scale that rule to the model's depth ``L``: layers
``[max(1, round(4L/32)), L − max(1, round(2L/32)))`` (rounded half up) are pruned (at least the first and the last
layer are always skipped), all others keep everything. Their ``pruning_ratio`` is a ratio of groups
in the pruned layers; this project's budget is a fraction of all block parameters (or FLOPs), so we
raise the pruned layers' ratio until the total removed equals the target: the attention of every
pruned layer keeps the cheapest feasible configuration holding at least ``1 − ratio`` of its cost,
and every pruned layer keeps the same number of channels, chosen so the budget is met (within one
channel per pruned layer; without channel pruning, the attention fraction whose total comes
nearest the target). When the pruned layers cannot carry the target alone (a high target or
a shallow model), the first and last layers are included too, with a log message. With
``uniform=True`` (the same counts in every layer) every layer is pruned.

Correction: none (LLM-Pruner relies on its LoRA recovery stage, which is not run here).

Our adaptations: (1) grouped-query attention — LLM-Pruner's LLaMA-1 code had none; their later
``llama3.py`` removes whole KV groups only. Here a layer keeps ``g`` whole KV groups with the same
number ``r`` of query heads in each (stock attention code runs), which also allows removing query
heads inside groups: within a group the ``r`` heads with the highest ``q``+``o`` score stay, and
groups are ranked by those heads' scores plus the group's own ``k``/``v`` score
(:func:`select_heads`); without GQA a head's score is simply ``q+k+v+o``; (2) the budget mapping
above (their ratio is per pruned layer, ours is global); (3) BERT-family encoders (the classifier
loss above); (4) no layer is ever emptied; heads are left alone where ``heads_prunable`` says so.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from stat_core.adapters import get_adapter
from stat_core.calibration.sizes import sensitivity_windows
from stat_core.methods.base import (
    LayerCosts,
    PruningMethod,
    attention_options,
    build_plan,
    layer_costs,
    nearest_attention_at_least,
    neurons_for_budget,
    select_heads,
    top_k,
)
from stat_core.surgery.budget import heads_prunable

log = logging.getLogger(__name__)

#: Their recipe on 32-layer LLaMA: layers 4..29 pruned (skip the first 4 and the last 2).
RECIPE_DEPTH, RECIPE_SKIP_FIRST, RECIPE_SKIP_LAST = 32, 4, 2
#: Windows per backward pass (memory bound; the gradient is that of the whole subset's mean loss).
GRAD_BATCH = 4


@dataclass(frozen=True)
class LLMPrunerSettings:
    """Which layers LLM-Pruner leaves whole: ``skip_first`` / ``skip_last`` layers at each end
    (None: their recipe scaled to the model's depth, see :func:`pruned_layer_range`)."""

    skip_first: int | None = None
    skip_last: int | None = None

    def __post_init__(self):
        for name in ("skip_first", "skip_last"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"LLM-Pruner's {name} is a number of layers ≥ 0, got {value!r}")


def pruned_layer_range(num_layers: int, skip_first: int | None = None, skip_last: int | None = None) -> range:
    """The layers LLM-Pruner's recipe prunes, scaled to ``num_layers``: the first
    ``round(4L/32)`` and the last ``round(2L/32)`` layers are skipped, at least one at each end
    (32 layers → 4..29, as their scripts; 4 layers → 1..2; 2 layers → none). ``skip_first`` /
    ``skip_last`` override the two counts."""
    first = max(1, int(num_layers * RECIPE_SKIP_FIRST / RECIPE_DEPTH + 0.5)) if skip_first is None else skip_first
    last = max(1, int(num_layers * RECIPE_SKIP_LAST / RECIPE_DEPTH + 0.5)) if skip_last is None else skip_last
    return range(first, max(first, num_layers - last))


def _block_linears(adapter, layer: int) -> list[nn.Linear]:
    return [adapter.query_proj(layer), *adapter.key_value_projs(layer), adapter.attn_out_proj(layer),
            *adapter.mlp_in_projs(layer), adapter.mlp_out_proj(layer)]


def _parameter(linear) -> torch.Tensor:
    """The leaf weight behind ``linear`` (an adapter's LinearView: the Conv1D / fused weight it views)."""
    return getattr(linear, "parameter", linear.weight)


def _salience(linear: nn.Linear, grad: torch.Tensor, dim: int) -> torch.Tensor:
    """``Σ |w ⊙ g|`` over ``dim`` (1: per output row, 0: per input column), float64 on the CPU."""
    return (linear.weight.detach().float() * grad.float()).abs().sum(dim).double().cpu()


def _loss_batches(model, adapter, data):
    """One loss per batch; their sum is the mean loss over the whole subset (see the module doc)."""
    device = next(model.parameters()).device
    if adapter.is_decoder:
        masks = [None if b.attention_mask is None else b.attention_mask[:, 1:].bool() for b in data.batches(GRAD_BATCH)]
        n_targets = sum(b.input_ids[:, 1:].numel() if m is None else int(m.sum())
                        for b, m in zip(data.batches(GRAD_BATCH), masks))
        for batch, mask in zip(data.batches(GRAD_BATCH), masks):
            ids = batch.input_ids.to(device)
            logits = model(**batch.model_inputs(device), use_cache=False).logits[:, :-1]
            losses = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                                                 reduction="none")
            if mask is not None:
                losses = losses * mask.to(device).reshape(-1)
            yield losses.sum() / max(n_targets, 1)
    else:
        for batch in data.batches(GRAD_BATCH):
            logits = model(**batch.model_inputs(device)).logits.float()
            # The model's own prediction as the target (label-free; see the module docstring).
            yield nn.functional.cross_entropy(logits, logits.detach().argmax(-1), reduction="sum") / len(data)


def taylor_scores(model, data) -> dict:
    """First-order Taylor group importance of every head, KV group and MLP channel.

    One gradient of the mean calibration loss over ``data`` (a :class:`CalibrationSet`, already the
    subset to use) with ``requires_grad`` on the block linears' weights only; every parameter's
    ``requires_grad`` and ``.grad`` are restored afterwards. Returns per-layer lists ``"q_o"``
    (``(n_heads,)``: a head's ``q`` rows and ``o_proj`` columns), ``"k_v"`` (``(n_kv,)``: a KV group's
    ``k``/``v`` rows) and ``"neurons"`` (``(d_ff,)``: gate/up rows and down column), each
    ``Σ |w · ∂L/∂w|`` over those weights, float64 on the CPU.
    """
    adapter = get_adapter(model)
    weights = list({id(_parameter(lin)): _parameter(lin) for layer in range(adapter.num_layers)
                    for lin in _block_linears(adapter, layer)}.values())
    target_ids = {id(w) for w in weights}
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    saved_grads = {id(w): w.grad for w in weights}
    was_training = model.training
    # Low-precision weights: accumulate the gradient over the batches in float32 beside them.
    buffers = {id(w): torch.zeros(w.shape, dtype=torch.float32, device=w.device)
               for w in weights if w.dtype != torch.float32}
    try:
        if was_training:
            model.eval()  # no dropout in the gradient pass
        for p in params:
            p.requires_grad_(id(p) in target_ids)
        for w in weights:
            w.grad = None
        for loss in _loss_batches(model, adapter, data):
            loss.backward()
            for w in weights:
                if id(w) in buffers and w.grad is not None:
                    buffers[id(w)] += w.grad.float()
                    w.grad = None
        grads = {id(w): buffers.get(id(w), w.grad) for w in weights}
        q_o, k_v, neurons = [], [], []
        hd = adapter.head_dim
        for layer in range(adapter.num_layers):
            shape = adapter.layer_shape(layer)

            def grad(lin):
                g = grads[id(_parameter(lin))]
                if g is None:
                    return torch.zeros_like(lin.weight, dtype=torch.float32)
                return lin.as_linear(g) if hasattr(lin, "as_linear") else g

            q, o = adapter.query_proj(layer), adapter.attn_out_proj(layer)
            q_o.append((_salience(q, grad(q), 1) + _salience(o, grad(o), 0)).reshape(shape.num_heads, hd).sum(1))
            kv = sum(_salience(lin, grad(lin), 1) for lin in adapter.key_value_projs(layer))
            k_v.append(kv.reshape(shape.num_kv_heads, hd).sum(1))
            down = adapter.mlp_out_proj(layer)
            neurons.append(sum(_salience(lin, grad(lin), 1) for lin in adapter.mlp_in_projs(layer))
                           + _salience(down, grad(down), 0))
    finally:
        for w in weights:
            w.grad = saved_grads[id(w)]
        for p, r in zip(params, requires):
            p.requires_grad_(r)
        if was_training:
            model.train()
    return {"q_o": q_o, "k_v": k_v, "neurons": neurons, "n_windows": len(data)}


def head_scores(q_o: torch.Tensor, k_v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(per-head score, per-KV-group score or None)`` for :func:`select_heads`: without GQA a
    head owns its key and value, so its score is ``q+k+v+o``; with GQA the group's ``k``/``v``
    score is passed separately."""
    if len(q_o) == len(k_v):
        return q_o + k_v, None
    return q_o, k_v


class LLMPruner(PruningMethod):
    name = "llm-pruner"
    label = "LLM-Pruner"
    summary = ("first-order Taylor |w·∂L/∂w| summed over each head's / channel's coupled weights; first and last "
               "layers skipped, one ratio in the others; no correction (no LoRA recovery)")
    correction = "none"
    needs_data = True
    uses_block_stats = False  # only the gradient pass (its time is charged as prepare time)
    Settings = LLMPrunerSettings

    def prepare(self, model, data, calibration) -> None:
        if "llm-pruner" in calibration.extras:
            return
        if data is None:
            raise ValueError("LLM-Pruner needs the calibration windows for its gradient pass; pass them as data")

        n = max(1, sensitivity_windows(data, None))
        # Decoders: the first windows (as the project's other gradient pass); classifiers: spread over the set.
        subset = data.subset(n) if get_adapter(model).is_decoder else data.spread(n)
        calibration.extras["llm-pruner"] = taylor_scores(model, subset)

    def plan(self, model, calibration, config, model_name="", calibration_info=None):
        if "llm-pruner" not in calibration.extras:
            raise ValueError("LLM-Pruner needs the calibration windows for its gradient pass; pass them as data")
        adapter = get_adapter(model)
        costs = layer_costs(adapter, config)
        scores = calibration.extras["llm-pruner"]
        prune_heads = heads_prunable(adapter, config)
        n_layers = len(costs)
        if config.uniform:
            pruned = list(range(n_layers))
        else:
            settings = self.settings_of(config)
            pruned = list(pruned_layer_range(n_layers, settings.skip_first, settings.skip_last))
            if not _feasible(costs, pruned, config.sparsity, prune_heads, config.prune_neurons):
                log.warning("LLM-Pruner: layers %s alone cannot remove %.1f%% of the blocks; pruning the first and "
                            "last layers too", f"{pruned[0]}-{pruned[-1]}" if pruned else "(none)",
                            100 * config.sparsity)
                pruned = list(range(n_layers))
        attn, keep_n, ratio = allocate(costs, pruned, config.sparsity, prune_heads, config.prune_neurons)
        layers, orders = [], []
        for i, c in enumerate(costs):
            hs, kvs = head_scores(scores["q_o"][i], scores["k_v"][i])
            h, g = attn[i]
            kept_heads, kept_kv = select_heads(hs, c.n_heads, c.n_kv, h, g, kv_scores=kvs)
            layers.append((kept_heads, kept_kv, top_k(scores["neurons"][i], keep_n[i])))
            group = c.n_heads // c.n_kv
            full = scores["q_o"][i] + scores["k_v"][i].repeat_interleave(group) / group if kvs is not None else hs
            orders.append(torch.argsort(full, descending=True).tolist())
        extra = {"pruned_layers": pruned, "layer_ratio": ratio}
        return build_plan(adapter, config, self, layers, model_name, calibration_info, orders, extra)


def _feasible(costs: list[LayerCosts], pruned: list[int], target: float, heads: bool, neurons: bool) -> bool:
    """Whether ``pruned`` layers, each keeping one KV group with one query head and one channel,
    can remove ``target`` of all blocks' cost."""
    total = sum(c.full for c in costs)
    removable = 0.0
    for i in pruned:
        c = costs[i]
        if heads:
            removable += c.attn(c.n_heads, c.n_kv) - min(c.attn(h, g) for h, g in attention_options(c.n_heads, c.n_kv))
        if neurons:
            removable += c.mlp(c.d_ff) - c.mlp(1)
    return removable >= target * total - 1e-9 * total


def allocate(costs: list[LayerCosts], pruned: list[int], target: float, heads: bool, neurons: bool
             ) -> tuple[list[tuple[int, int]], list[int], float]:
    """Kept ``(heads, kv_heads)`` and neurons per layer, and the pruned layers' ratio.

    Layers outside ``pruned`` keep everything. The pruned layers share one ratio ``ρ`` (the fraction
    of their cost they must lose for the global ``target``): each keeps the cheapest feasible
    attention holding at least ``1 − ρ`` of its attention cost, and the same number of channels,
    chosen so the total removed is ``target`` (within one channel per pruned layer). When channels
    would run out, the attention keep fraction is lowered step by step. Without channel pruning the
    attention alone carries the target: the one feasible fraction whose total comes nearest.
    """
    total = sum(c.full for c in costs)
    need = target * total
    attn = [(c.n_heads, c.n_kv) for c in costs]
    keep_n = [c.d_ff for c in costs]
    sub = [costs[i] for i in pruned]
    if not sub or need <= 0:
        return attn, keep_n, 0.0
    full_sub = sum(c.full for c in sub)
    attn_sub = sum(c.attn(c.n_heads, c.n_kv) for c in sub)
    ratio = min(need / (full_sub if neurons else attn_sub), 1.0)
    keep_cost = total - need

    def kept_with_attention(f):
        return total - full_sub + sum(c.attn(*nearest_attention_at_least(c, f)) + c.mlp(c.d_ff) for c in sub)

    if not heads:
        fractions = [1.0]
    else:
        options = sorted({c.attn(h, g) / c.attn(c.n_heads, c.n_kv) for c in sub
                          for h, g in attention_options(c.n_heads, c.n_kv)}, reverse=True)
        if neurons:
            fractions = [1 - ratio] + [f for f in options if f < 1 - ratio - 1e-12]
        else:  # heads alone: the attention fraction whose total comes nearest the target (ties: remove more)
            fractions = [min(options, key=lambda f: (abs(kept_with_attention(f) - keep_cost), kept_with_attention(f)))]
    for f in fractions:
        a_sub = [nearest_attention_at_least(c, f) for c in sub] if heads else [(c.n_heads, c.n_kv) for c in sub]
        if neurons:
            k_sub = neurons_for_budget(sub, a_sub, need / full_sub, uniform=True)
        else:
            k_sub = [c.d_ff for c in sub]
        kept = total - full_sub + sum(c.attn(*a) + c.mlp(k) for c, a, k in zip(sub, a_sub, k_sub))
        slack = sum(c.mlp(1) - c.mlp(0) for c in sub) if neurons else 0.0
        if kept <= keep_cost + slack + 1e-9 * total or not neurons or f == fractions[-1]:
            break
    for i, a, k in zip(pruned, a_sub, k_sub):
        attn[i], keep_n[i] = a, k
    return attn, keep_n, ratio


__all__ = ["LLMPruner", "allocate", "head_scores", "pruned_layer_range", "taylor_scores"]
