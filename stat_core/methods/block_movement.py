"""Block movement pruning (Lagunas, von Platen, Sanh, Rush: "Block Pruning For Faster Transformers",
EMNLP 2021; huggingface/nn_pruning), the fine-tuning reference for encoder classifiers.

What it does here (our own code, their recipe in its "hybrid" setting: whole attention heads and
FFN rows):

- **Learned scores**, one per attention head and one per FFN row (an intermediate neuron: its row
  of the input projection and its column of the output projection), all starting at zero.
- **Masks** from the scores by top-k (hard movement pruning, Sanh et al. 2020): a head's mask
  multiplies its slice of the attention output before ``W_O``, a neuron's mask its intermediate
  activation before ``W_2`` (forward pre-hooks on the output projections; a mask of 0 is exactly
  the unit removed). The scores get the straight-through gradient ``∂L/∂S = ∂L/∂m``; since removing
  a unit changes the loss by about ``−∂L/∂m``, a unit whose removal hurts the loss sees its score rise.
- **Cubic sparsity schedule** (Zhu & Gupta 2017, as nn_pruning): no pruning for the first
  ``warmup`` fraction of the steps, then the removed fraction rises as
  ``target · (1 − (1 − t)³)`` and stays at ``target`` for the last ``cooldown`` fraction.
- **Distillation** from the dense model's logits (a frozen copy): ``α · T² · KL(teacher_T ‖
  student_T) + (1 − α) · CE(labels)`` with ``T = 2``, ``α = 0.9`` (their SQuAD setup distils
  from a fine-tuned teacher the same way); weights and scores trained together by one AdamW
  (weights: linear decay; scores: their own, larger learning rate, no weight decay). Dropout on.
- **Budget**: the same accounting as STAT (fraction of the encoder blocks' attention + MLP
  parameters, :mod:`stat_core.surgery.budget`). At every step the heads are ranked across all layers and
  the best ``(1 − s)`` of them kept, then FFN rows are ranked across all layers and kept until the
  blocks' cost is ``(1 − s)`` of the dense (:func:`~stat_core.methods.base.neurons_for_budget`,
  within one row); every layer keeps at least one head and one row.
  *Our simplification*: nn_pruning's sigmoid-threshold variant reaches its sparsity through an L1
  penalty (tuned per run); top-k hits the exact budget that every method here is compared at.
  Attention and FFN each give the same share of their cost (before the FFN rows absorb the rounding).
- **Final masks become physical removals** by the project's own surgery (a :class:`PrunePlan`
  with no correction, :func:`stat_core.surgery.apply.apply_plan_`), so the model exports and loads like any
  other pruned model; its logits equal the masked model's.

Data: the calibration set (the classifier's training half, labelled); the held-out half is never
seen. Decoders are refused in one sentence. It is a ``whole_model`` method (it trains the model it
is given, so the app never runs it on the session's dense model) that returns its plan in
``info["plan"]``; its training budget is :class:`MovementSettings` (epochs over the training set).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import threading
import time
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from stat_core.adapters import get_adapter
from stat_core.methods.base import (
    MethodNotApplicable,
    PruningMethod,
    build_plan,
    check_budget_feasible,
    layer_costs,
    neurons_for_budget,
)
from stat_core.surgery.apply import apply_plan_
from stat_core.surgery.budget import block_parameter_count, heads_prunable

log = logging.getLogger(__name__)


class TrainingCancelled(Exception):
    """Block movement training was cancelled; the model is as it was before training."""


@dataclass(frozen=True)
class MovementSettings:
    """The training budget and recipe. ``epochs`` over the training set in batches of ``batch_size``
    (``steps``, when given, overrides it); ``lr`` for the weights, ``score_lr`` for the scores."""

    epochs: float = 3.0
    steps: int | None = None
    batch_size: int = 16
    lr: float = 3e-5
    score_lr: float = 1e-2
    warmup: float = 0.1      # fraction of the steps before pruning starts (scores learn, all units on)
    cooldown: float = 0.2    # fraction of the steps at the target at the end (masks settle, weights adapt)
    temperature: float = 2.0
    alpha_distil: float = 0.9
    dropout: bool = True
    seed: int = 0

    def __post_init__(self):
        if not self.epochs > 0 or self.batch_size < 1 or not self.lr >= 0 or not self.score_lr > 0:
            raise ValueError("block movement needs epochs > 0, batch_size ≥ 1, lr ≥ 0 and score_lr > 0")
        if not (0 <= self.warmup and 0 <= self.cooldown and self.warmup + self.cooldown < 1):
            raise ValueError("warmup and cooldown are fractions of the steps with warmup + cooldown < 1")
        if not 0 <= self.alpha_distil <= 1:
            raise ValueError("alpha_distil is a weight in [0, 1]")

    def total_steps(self, n_examples: int) -> int:
        if self.steps is not None:
            return max(1, int(self.steps))
        return max(1, math.ceil(self.epochs * n_examples / self.batch_size))


def cubic_sparsity(step: int, total: int, target: float, warmup: float, cooldown: float) -> float:
    """Removed fraction at ``step`` of ``total``: 0 during warm-up, ``target·(1 − (1 − t)³)`` while
    pruning (``t`` from 0 to 1), ``target`` in the cool-down."""
    start, end = warmup * total, (1 - cooldown) * total
    if step < start:
        return 0.0
    if step >= end or end <= start:
        return target
    t = (step - start) / (end - start)
    return target * (1 - (1 - t) ** 3)


# --- masks ------------------------------------------------------------------------------------------

def select_units(adapter, config, head_scores: list[torch.Tensor], neuron_scores: list[torch.Tensor],
                 sparsity: float) -> tuple[list[list[int]], list[list[int]]]:
    """Kept ``(heads per layer, neurons per layer)`` at ``sparsity`` of the blocks' cost (see the
    module docstring): heads ranked globally, the best ``1 − s`` kept (at least one per layer),
    then neurons to the budget."""

    costs = layer_costs(adapter, replace(config, sparsity=sparsity))
    n_layers = len(costs)
    if heads_prunable(adapter, config) and sparsity > 0:
        if config.prune_neurons:
            attn_share = sparsity
        else:  # heads carry the whole target
            attn_total = sum(c.attn(c.n_heads, c.n_kv) for c in costs)
            attn_share = min(1.0, sparsity * sum(c.full for c in costs) / attn_total)
        total_heads = sum(c.n_heads for c in costs)
        n_keep = max(n_layers, int(round((1 - attn_share) * total_heads)))
        scores = torch.cat([s.detach().double().cpu() for s in head_scores])
        owner = torch.cat([torch.full((c.n_heads,), i) for i, c in enumerate(costs)])
        local = torch.cat([torch.arange(c.n_heads) for c in costs])
        kept: list[set[int]] = [{int(torch.argmax(s.detach()))} for s in head_scores]
        left = n_keep - n_layers
        for j in torch.argsort(scores, descending=True).tolist():
            if left <= 0:
                break
            layer, h = int(owner[j]), int(local[j])
            if h not in kept[layer]:
                kept[layer].add(h)
                left -= 1
        heads = [sorted(k) for k in kept]
    else:
        heads = [list(range(c.n_heads)) for c in costs]
    if config.prune_neurons and sparsity > 0:
        counts = neurons_for_budget(costs, [(len(h), len(h)) for h in heads], sparsity, neuron_scores)
        neurons = [sorted(torch.argsort(s.detach().double().cpu(), descending=True)[:k].tolist())
                   for s, k in zip(neuron_scores, counts)]
    else:
        neurons = [list(range(c.d_ff)) for c in costs]
    return heads, neurons


def hard_masks(adapter, heads: list[list[int]], neurons: list[list[int]], device) -> tuple[list, list]:
    """0/1 float masks ``(n_heads,)`` and ``(d_ff,)`` per layer from kept indices."""
    hm, nm = [], []
    for layer, (h, n) in enumerate(zip(heads, neurons)):
        shape = adapter.layer_shape(layer)
        a = torch.zeros(shape.num_heads, device=device)
        a[h] = 1
        b = torch.zeros(shape.intermediate_size, device=device)
        b[n] = 1
        hm.append(a)
        nm.append(b)
    return hm, nm


@contextlib.contextmanager
def masked(model, masks: dict):
    """Within the block, layer ``l``'s heads are multiplied by ``masks["heads"][l]`` ``(n_heads,)``
    (before the attention output projection) and its FFN rows by ``masks["neurons"][l]``
    ``(d_ff,)`` (before the MLP output projection). ``masks`` is read at every forward, so the
    caller may replace its entries between steps. Hooks removed on exit."""
    adapter = get_adapter(model)
    hd = adapter.head_dim
    handles = []

    def head_hook(layer):
        def hook(_module, args):
            m = masks["heads"][layer]
            x = args[0]
            return (x * m.to(x.dtype).repeat_interleave(hd),) + tuple(args[1:])
        return hook

    def neuron_hook(layer):
        def hook(_module, args):
            x = args[0]
            return (x * masks["neurons"][layer].to(x.dtype),) + tuple(args[1:])
        return hook

    try:
        for layer in range(adapter.num_layers):
            handles.append(adapter.attn_out_proj(layer).register_forward_pre_hook(head_hook(layer)))
            handles.append(adapter.mlp_out_proj(layer).register_forward_pre_hook(neuron_hook(layer)))
        yield model
    finally:
        for h in handles:
            h.remove()


# --- training ---------------------------------------------------------------------------------------

def train_block_movement_(model, data, config, settings: MovementSettings = MovementSettings(), progress=None,
                          cancel_event: threading.Event | None = None, teacher=None) -> dict:
    """Fine-tune ``model`` in place with learned head / FFN-row scores and the cubic schedule to
    ``config.sparsity`` (see the module docstring); the masks stay as hooks, nothing is removed.

    ``data``: a labelled :class:`~stat_core.calibration.statistics.CalibrationSet` (the training half).
    ``teacher``: the dense model to distil from (default: a frozen copy of ``model`` taken first).
    Returns ``{"head_scores", "neuron_scores": per-layer tensors, "heads", "neurons": final kept
    indices, "steps", "seconds", "loss_first", "loss_last"}``. Cancelled (``cancel_event``) or
    failed: the weights are put back as they were and :class:`TrainingCancelled` (or the error) raised.
    """
    t0 = time.perf_counter()
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    if teacher is None:
        teacher = copy.deepcopy(model)
    teacher_state = (teacher.training, [(p, p.requires_grad) for p in teacher.parameters()])
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)  # restored below: the teacher is only read
    has_labels = data.labels is not None
    alpha = settings.alpha_distil if has_labels else 1.0
    head_scores = [torch.zeros(adapter.layer_shape(i).num_heads, device=device, requires_grad=True)
                   for i in range(adapter.num_layers)]
    neuron_scores = [torch.zeros(adapter.layer_shape(i).intermediate_size, device=device, requires_grad=True)
                     for i in range(adapter.num_layers)]
    total = settings.total_steps(len(data))
    params = list(model.parameters())
    requires = [p.requires_grad for p in params]
    was_training = model.training
    snapshot = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
    masks: dict = {"heads": [torch.ones_like(s) for s in head_scores],
                   "neurons": [torch.ones_like(s) for s in neuron_scores]}
    gen = torch.Generator().manual_seed(settings.seed)
    order: list[int] = []
    losses: list[float] = []
    finished = False
    try:
        for p in params:
            p.requires_grad_(settings.lr > 0)
        groups = [{"params": head_scores + neuron_scores, "lr": settings.score_lr, "weight_decay": 0.0}]
        if settings.lr > 0:
            groups.insert(0, {"params": params, "lr": settings.lr, "weight_decay": 0.01})
        opt = torch.optim.AdamW(groups)
        decay = torch.optim.lr_scheduler.LambdaLR(
            opt, [lambda s: max(0.0, 1 - s / total)] * (len(groups) - 1) + [lambda s: 1.0])
        model.train(settings.dropout)
        T = settings.temperature
        with masked(model, masks):
            for step in range(total):
                if cancel_event is not None and cancel_event.is_set():
                    raise TrainingCancelled("block movement training cancelled; the model is as it was before")
                s = cubic_sparsity(step, total, config.sparsity, settings.warmup, settings.cooldown)
                heads, neurons = select_units(adapter, config, head_scores, neuron_scores, s)
                hm, nm = hard_masks(adapter, heads, neurons, device)
                # Straight-through: forward with the hard 0/1 masks, ∂L/∂score = ∂L/∂mask.
                masks["heads"] = [m + sc - sc.detach() for m, sc in zip(hm, head_scores)]
                masks["neurons"] = [m + sc - sc.detach() for m, sc in zip(nm, neuron_scores)]
                if len(order) < settings.batch_size:
                    order += torch.randperm(len(data), generator=gen).tolist()
                idx, order = order[:settings.batch_size], order[settings.batch_size:]
                batch = data.take(torch.tensor(idx))
                inputs = batch.model_inputs(device)
                with torch.no_grad():
                    t_logits = teacher(**inputs).logits.float()
                logits = model(**inputs).logits.float()
                loss = alpha * T * T * F.kl_div((logits / T).log_softmax(-1), (t_logits / T).log_softmax(-1),
                                                log_target=True, reduction="batchmean")
                if alpha < 1:
                    loss = loss + (1 - alpha) * F.cross_entropy(logits, batch.labels.to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                decay.step()
                losses.append(float(loss.detach()))
                if progress is not None:
                    progress("block movement", step + 1, total)
        finished = True
    finally:
        masks.clear()
        teacher.train(teacher_state[0])
        for p, r in teacher_state[1]:
            p.requires_grad_(r)
        for p, r in zip(params, requires):
            p.grad = None
            p.requires_grad_(r)
        if not finished:
            with torch.no_grad():
                for k, v in model.state_dict(keep_vars=True).items():
                    v.copy_(snapshot[k])
        del snapshot
        model.train(was_training)
    heads, neurons = select_units(adapter, config, head_scores, neuron_scores, config.sparsity)
    tenth = max(1, len(losses) // 10)
    return {"head_scores": [s.detach().cpu() for s in head_scores],
            "neuron_scores": [s.detach().cpu() for s in neuron_scores],
            "heads": heads, "neurons": neurons, "steps": len(losses), "seconds": time.perf_counter() - t0,
            "loss_first": sum(losses[:tenth]) / tenth, "loss_last": sum(losses[-tenth:]) / tenth}


def block_movement_prune_(model, data, config, settings: MovementSettings = MovementSettings(), progress=None,
                          cancel_event: threading.Event | None = None, model_name: str = "", teacher=None) -> dict:
    """Train (:func:`train_block_movement_`), then remove the masked heads and FFN rows for real.
    Returns the summary with ``"plan"`` (a :class:`PrunePlan` as a dict) and the block counts."""

    method = BlockMovement()
    method.check_applicable(model)
    _check_config(model, config)
    adapter = get_adapter(model)
    before = block_parameter_count(adapter)
    trained = train_block_movement_(model, data, config, settings, progress, cancel_event, teacher)
    plan = plan_from_masks(model, config, trained["heads"], trained["neurons"], model_name,
                           {"training": {**asdict(settings), "steps": trained["steps"]}})
    apply_plan_(model, plan, None)
    after = block_parameter_count(get_adapter(model))
    return {"method": method.name, "target": config.sparsity, "plan": plan.to_dict(),
            "removed_fraction": 1 - after / before, "block_params_before": before, "block_params_after": after,
            "train_steps": trained["steps"], "train_seconds": trained["seconds"],
            "loss_first": trained["loss_first"], "loss_last": trained["loss_last"], "settings": asdict(settings)}


def plan_from_masks(model, config, heads: list[list[int]], neurons: list[list[int]], model_name: str = "",
                    extra_budget: dict | None = None):
    """The :class:`PrunePlan` (no correction) that removes every head and FFN row not in ``heads`` /
    ``neurons``: applied with ``apply_plan_(model, plan, None)`` it reproduces the masked model."""
    layers = [(h, h, n) for h, n in zip(heads, neurons)]
    return build_plan(get_adapter(model), config, BlockMovement(), layers, model_name, extra_budget=extra_budget)


def _check_config(model, config) -> None:

    if config.uniform:
        raise ValueError("block movement learns per-layer widths; it has no uniform mode")
    if config.budget_kind != "params":
        raise ValueError("block movement's budget is counted in parameters; use budget_kind='params'")
    check_budget_feasible(model, config)


class BlockMovement(PruningMethod):
    name = "block-movement"
    label = "block movement"
    summary = ("Lagunas et al. 2021: fine-tunes with learned head / FFN-row scores, a cubic schedule to the target "
               "and distillation from the dense logits (encoder classifiers; trains for minutes)")
    correction = "none"
    whole_model = True
    returns_plan = True
    needs_training = True
    needs_data = True
    uses_block_stats = False

    Settings = MovementSettings

    def __init__(self, settings: MovementSettings | None = None):
        self.settings = settings or MovementSettings()  # used when the config carries none

    def check_applicable(self, model) -> None:
        adapter = get_adapter(model)
        if adapter.is_decoder:
            raise MethodNotApplicable(f"block movement pruning fine-tunes encoder classifiers on labelled data; "
                                      f"choose another method for this {adapter.family} decoder")

    def prune_(self, model, data, config, progress=None) -> dict:
        settings = self.settings if getattr(config, "settings", None) is None else self.settings_of(config)
        return block_movement_prune_(model, data, config, settings, progress)


__all__ = ["BlockMovement", "MovementSettings", "TrainingCancelled", "block_movement_prune_", "cubic_sparsity",
           "masked", "plan_from_masks", "select_units", "train_block_movement_"]
