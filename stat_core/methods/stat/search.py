"""Budget search on the network's own output: per-layer head and neuron counts evolved for the KL
to the dense model (after EvoPress, Sieberling et al. 2025, and Týr-the-Pruner, 2025).

STAT's allocator spreads the budget by summed per-block damage predictions, which treat the
blocks' errors as independent. The search starts from that allocation and tries level switches
(one block gives up a step of its width, another gets one back, the budget re-met exactly with the
allocator's own damage-aware neuron top-up), scoring each candidate by what it does to the whole
network: the mean KL(dense ‖ candidate) of the next-token distributions on a few calibration
windows. A (1 + λ) evolution keeps a candidate only when it beats its parent on the same windows.

A candidate is cut from the cached statistics and scored in a fraction of a second to a few
seconds: only the layers whose counts changed are re-cut (from the dense layer, with STAT's
correction) and swapped into one working copy of the model, and cut layers are kept for reuse.
The result is a plan like any other; nothing is searched when the app re-budgets.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from stat_core.adapters import get_adapter
from stat_core.surgery.apply import apply_layer_
from stat_core.surgery.budget import (
    Allocation,
    BlockOptions,
    _max_fine_step,
    _neighbour,
    _step_fine,
)

log = logging.getLogger(__name__)

SEARCH_WINDOWS = 8       # fitness: this many calibration windows …
SEARCH_TOKENS = 256      # … cut to this many tokens
OFFSPRING = 8            # candidates per generation
MLP_STEPS = 32           # an MLP level switch moves d_ff / MLP_STEPS neurons
LAYER_CACHE = 96         # cut layers kept for reuse


@dataclass
class SearchResult:
    alloc: Allocation
    start_kl: float
    best_kl: float
    candidates: int
    accepted: int
    seconds: float
    history: list[float] = field(default_factory=list)  # the parent's KL after each generation
    fitness: tuple[int, int] = (0, 0)  # the fitness set: windows × tokens

    def summary(self) -> dict:
        return {"candidates": self.candidates, "accepted": self.accepted, "start_kl": self.start_kl,
                "best_kl": self.best_kl, "seconds": self.seconds, "fitness": list(self.fitness),
                "history": [round(k, 6) for k in self.history]}


class _Fitness:
    """KL(dense ‖ candidate) on fixed windows, with candidates built by swapping re-cut layers into
    one working copy of the dense model."""

    def __init__(self, dense, plans, stats, windows: torch.Tensor, mask: torch.Tensor | None,
                 correction: str, ridge: float | None, batch_size: int = 2):
        self.dense, self.stats, self.plans = dense, stats, plans
        self.correction, self.ridge = correction, ridge
        device = next(dense.parameters()).device  # the windows go where the model is (a GPU search)
        self.windows = windows.to(device)
        self.mask = None if mask is None else mask.to(device)
        self.batch_size = batch_size
        self.work = copy.deepcopy(dense)
        self.dense_layers = get_adapter(dense).layers
        self.work_adapter = get_adapter(self.work)
        self.current: list[tuple | None] = [None] * len(self.dense_layers)
        self.cache: OrderedDict = OrderedDict()
        self.reference = [self._logprobs(dense, i) for i in range(0, len(windows), batch_size)]

    @torch.no_grad()
    def _logprobs(self, model, start: int) -> torch.Tensor:
        ids = self.windows[start:start + self.batch_size]
        mask = None if self.mask is None else self.mask[start:start + self.batch_size]
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        return torch.log_softmax(logits, dim=-1)

    def _set_layer(self, layer: int, key: tuple) -> None:
        if self.current[layer] == key:
            return
        module = self.cache.get((layer, key))
        if module is None:
            self.work_adapter.layers[layer] = copy.deepcopy(self.dense_layers[layer])
            apply_layer_(self.work_adapter, self.plans(layer, key), self.stats[layer], self.correction, self.ridge)
            module = self.work_adapter.layers[layer]
            self.cache[(layer, key)] = module
            if len(self.cache) > LAYER_CACHE:
                self.cache.popitem(last=False)
        else:
            self.cache.move_to_end((layer, key))
            self.work_adapter.layers[layer] = module
        self.current[layer] = key

    @torch.no_grad()
    def __call__(self, choice: list[int]) -> float:
        for layer in range(len(self.dense_layers)):
            self._set_layer(layer, (choice[2 * layer], choice[2 * layer + 1]))
        total, count = 0.0, 0
        for ref, start in zip(self.reference, range(0, len(self.windows), self.batch_size)):
            logp = self._logprobs(self.work, start)
            kl = (ref.exp() * (ref - logp)).sum(-1)  # (b, T-1)
            if self.mask is not None:
                keep = self.mask[start:start + self.batch_size, 1:].bool()
                kl = kl[keep]
            total += float(kl.sum())
            count += kl.numel()
        return total / max(count, 1)


def _mlp_step(block: BlockOptions) -> int:
    return max(1, len(block.cost) // MLP_STEPS)


def _move(block: BlockOptions, current: int, smaller: bool) -> int | None:
    """The option one level below (``smaller``) or above ``current``: ``d_ff / MLP_STEPS`` neurons for an
    MLP, the next head configuration by cost for attention."""
    if block.fine_grained:
        nxt = current + (-1 if smaller else 1) * _mlp_step(block)
        return nxt if 0 <= nxt < len(block.cost) else None
    return _neighbour(block, current, smaller)


def search_allocation(dense, blocks: list[BlockOptions], start: Allocation, target_fraction: float, plans,
                      stats, windows: torch.Tensor, candidates: int, seed: int = 0, mask: torch.Tensor | None = None,
                      correction: str = "least-squares", ridge: float | None = None, progress=None) -> SearchResult:
    """Evolve ``start`` (an allocation of ``blocks``) for ``candidates`` candidates; returns the best.

    ``plans(layer, (attn option, mlp option))`` gives the :class:`LayerPlan` of one layer's choice;
    ``stats`` are the dense statistics the corrections are computed from; ``windows`` the fitness
    windows (token ids). Every candidate removes at least ``target_fraction`` of the full cost and
    overshoots it by less than one neuron's cost. Deterministic for a ``seed``."""
    began = time.perf_counter()
    if not any(b.fine_grained for b in blocks):
        raise ValueError("The budget search needs prunable MLP neurons to meet the budget exactly; allow neurons "
                         "to be pruned or turn the search off.")
    rng = np.random.default_rng(seed)
    full = np.array([b.cost.max() for b in blocks])
    total = float(full.sum())
    target = target_fraction * total
    unit = _max_fine_step(blocks)

    def removed(choice):
        return total - float(sum(b.cost[c] for b, c in zip(blocks, choice)))

    def damage(choice):
        return float(sum(b.damage[c] for b, c in zip(blocks, choice)))

    def repair(choice):
        gap = target - removed(choice)
        if gap > 0:
            choice = _step_fine(blocks, choice, gap, remove=True)
            if target - removed(choice) > unit / 2 + 1e-9:
                choice = _step_fine(blocks, choice, target - removed(choice) + unit / 2, remove=True)
        elif -gap > unit:
            choice = _step_fine(blocks, choice, -gap, remove=False)
        ok = removed(choice) >= target - unit / 2 - 1e-9 and removed(choice) <= target + unit + 1e-9
        return choice if ok else None

    def mutate(parent):
        for _ in range(20):  # a few tries for a feasible child
            child = list(parent)
            for _ in range(int(rng.integers(1, 3))):
                give, take = rng.choice(len(blocks), size=2, replace=False)
                smaller, larger = _move(blocks[give], child[give], True), _move(blocks[take], child[take], False)
                if smaller is None or larger is None:
                    continue
                child[give], child[take] = smaller, larger
            child = repair(child)
            if child is not None and child != list(parent):
                return child
        return None

    on_gpu = next(dense.parameters()).device.type == "cuda"  # larger batches where memory is plenty
    fitness = _Fitness(dense, plans, stats, windows, mask, correction, ridge, batch_size=8 if on_gpu else 2)
    parent = list(start.choice)
    parent_kl = start_kl = fitness(parent)
    history, evaluated, accepted = [parent_kl], 0, 0
    if progress is not None:
        progress("search", 0, candidates)
    while evaluated < candidates:
        best_child, best_kl = None, parent_kl
        for _ in range(min(OFFSPRING, candidates - evaluated)):
            child = mutate(parent)
            evaluated += 1
            if child is not None:
                kl = fitness(child)
                if kl < best_kl:
                    best_child, best_kl = child, kl
            if progress is not None:
                progress("search", evaluated, candidates)
        if best_child is not None:
            parent, parent_kl, accepted = best_child, best_kl, accepted + 1
        history.append(parent_kl)
    del fitness
    seconds = time.perf_counter() - began
    log.info("budget search: KL to dense %.4f → %.4f over %d candidates (%d accepted) in %.0f s",
             start_kl, parent_kl, candidates, accepted, seconds)
    alloc = Allocation(choice=parent, cost_removed=removed(parent), cost_total=total, damage=damage(parent))
    return SearchResult(alloc=alloc, start_kl=start_kl, best_kl=parent_kl, candidates=candidates, accepted=accepted,
                        seconds=seconds, history=history, fitness=tuple(windows.shape))
