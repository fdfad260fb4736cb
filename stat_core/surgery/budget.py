"""Counting parameters/FLOPs of transformer blocks, and allocating a global budget across blocks.

Every block (one attention or one MLP of one layer) offers a list of options: a kept width, its
cost (parameters or MACs per token) and its predicted damage (loss-weighted output residual).
The allocator picks one option per block so that the total cost removed meets the target while
the summed damage is smallest: a Lagrangian sweep (``damage + λ·cost`` per block, bisection on
λ) followed by a neuron-by-neuron top-up so the budget is met to within one unit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from stat_core.config import PruneConfig

import heapq
from dataclasses import dataclass, field

import numpy as np

from stat_core.adapters import ModelAdapter, get_adapter


@dataclass(frozen=True)
class BlockGeometry:
    """Per-unit costs of one layer, read off its modules (biases included)."""

    hidden: int
    head_dim: int
    q_params_per_head: int   # q_proj rows + bias of one query head
    kv_params_per_head: int  # k_proj + v_proj rows + biases of one KV head
    o_params_per_head: int   # o_proj columns of one query head
    attn_fixed: int          # o_proj bias
    mlp_params_per_neuron: int
    mlp_fixed: int           # down_proj bias

    def attn_params(self, n_heads: int, n_kv: int) -> int:
        return (n_heads * (self.q_params_per_head + self.o_params_per_head)
                + n_kv * self.kv_params_per_head + self.attn_fixed)

    def mlp_params(self, n_neurons: int) -> int:
        return n_neurons * self.mlp_params_per_neuron + self.mlp_fixed

    def attn_macs(self, n_heads: int, n_kv: int, seq_len: int, causal: bool = True) -> float:
        """MACs per token: projections plus scores and weighted values over the (causal) context."""
        context = (seq_len + 1) / 2 if causal else seq_len
        proj = n_heads * 2 * self.hidden * self.head_dim + n_kv * 2 * self.hidden * self.head_dim
        return proj + n_heads * 2 * self.head_dim * context

    def mlp_macs(self, n_neurons: int) -> float:
        return n_neurons * self.mlp_params_per_neuron  # one MAC per weight (biases: negligible)


def _numel(linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def block_geometry(adapter: ModelAdapter, layer: int) -> BlockGeometry:
    shape = adapter.layer_shape(layer)
    o = adapter.attn_out_proj(layer)
    down = adapter.mlp_out_proj(layer)
    ins = adapter.mlp_in_projs(layer)
    kv_modules = adapter.key_value_projs(layer)
    q_mod = adapter.query_proj(layer)
    return BlockGeometry(
        hidden=adapter.hidden_size,
        head_dim=adapter.head_dim,
        q_params_per_head=_numel(q_mod) // shape.num_heads,
        # Encoders: every head owns its key and value; counted with the KV "group" of one head.
        kv_params_per_head=sum(_numel(m) for m in kv_modules) // shape.num_kv_heads,
        o_params_per_head=o.weight.numel() // shape.num_heads,
        attn_fixed=o.bias.numel() if o.bias is not None else 0,
        mlp_params_per_neuron=sum(_numel(m) for m in ins) // shape.intermediate_size
        + down.weight.numel() // shape.intermediate_size,
        mlp_fixed=down.bias.numel() if down.bias is not None else 0,
    )


def block_parameter_count(adapter: ModelAdapter) -> int:
    """Parameters of all attention + MLP weights of the transformer blocks (norms, embeddings excluded)."""
    total = 0
    for i in range(adapter.num_layers):
        geo = block_geometry(adapter, i)
        shape = adapter.layer_shape(i)
        total += geo.attn_params(shape.num_heads, shape.num_kv_heads) + geo.mlp_params(shape.intermediate_size)
    return total


def block_macs(adapter: ModelAdapter, seq_len: int) -> float:
    """MACs per token of the transformer blocks' attention + MLP at ``seq_len``."""
    total = 0.0
    for i in range(adapter.num_layers):
        geo = block_geometry(adapter, i)
        shape = adapter.layer_shape(i)
        total += geo.attn_macs(shape.num_heads, shape.num_kv_heads, seq_len, adapter.is_decoder)
        total += geo.mlp_macs(shape.intermediate_size)
    return total


@dataclass
class BlockOptions:
    """Choices for one block. ``cost`` and ``damage`` are arrays over options; the costliest
    option is the full (unpruned) block. ``fine_grained`` marks blocks (MLP) whose consecutive
    options differ by one unit, which the allocator uses to meet the budget exactly."""

    name: str
    cost: np.ndarray
    damage: np.ndarray
    fine_grained: bool = False
    payload: list = field(default_factory=list)  # what each option keeps (adapter-specific)

    def __post_init__(self):
        self.cost = np.asarray(self.cost, dtype=np.float64)
        self.damage = np.asarray(self.damage, dtype=np.float64)


@dataclass(frozen=True)
class Allocation:
    choice: list[int]      # option index per block
    cost_removed: float
    cost_total: float
    damage: float

    @property
    def fraction_removed(self) -> float:
        return self.cost_removed / self.cost_total if self.cost_total else 0.0


def _pick(blocks: list[BlockOptions], lam: float) -> list[int]:
    return [int(np.argmin(b.damage + lam * b.cost)) for b in blocks]


def allocate(blocks: list[BlockOptions], target_fraction: float) -> Allocation:
    """Choose one option per block removing ``target_fraction`` of the full cost, least damage.

    ``full cost`` is each block's largest option. Raises ValueError when the target cannot be met
    with the options given (every block keeps at least its smallest option).
    """
    full = np.array([b.cost.max() for b in blocks])
    total = float(full.sum())
    floor = float(sum(b.cost.min() for b in blocks))
    target_removed = target_fraction * total
    if target_removed > total - floor + 1e-9:
        raise ValueError(f"cannot remove {target_fraction:.0%}: keeping at least one head and one neuron per layer (and every unit you excluded from "
                         f"pruning) allows at most {(total - floor) / total:.1%}")

    def removed(choice):
        return total - float(sum(b.cost[c] for b, c in zip(blocks, choice)))

    # Bisection on λ: larger λ favours cheaper options (more removal).
    lo, hi = 0.0, 1.0
    while removed(_pick(blocks, hi)) < target_removed and hi < 1e30:
        hi *= 4.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if removed(_pick(blocks, mid)) < target_removed:
            lo = mid
        else:
            hi = mid
    # The λ sweep only reaches points on each block's convex hull; finish from both sides with
    # single-neuron steps and keep the better: from below (remove more neurons) and from above
    # (give neurons back).
    candidates = []
    under = _pick(blocks, lo)
    candidates.append(_step_fine(blocks, under, target_removed - removed(under), remove=True))
    over = _pick(blocks, hi)
    candidates.append(_step_fine(blocks, over, removed(over) - target_removed, remove=False))

    def damage(choice):
        return float(sum(b.damage[c] for b, c in zip(blocks, choice)))

    unit = _max_fine_step(blocks)
    on_target = [c for c in candidates if abs(removed(c) - target_removed) <= unit]
    if on_target:
        choice = min(on_target, key=damage)
    else:  # coarse units only (e.g. neurons not prunable): the closest to the target
        choice = min(candidates, key=lambda c: (abs(removed(c) - target_removed), damage(c)))
    return Allocation(choice=choice, cost_removed=removed(choice), cost_total=total, damage=damage(choice))


def _max_fine_step(blocks: list[BlockOptions]) -> float:
    steps = [np.diff(np.sort(b.cost)).max() for b in blocks if b.fine_grained and len(b.cost) > 1]
    return float(max(steps)) if steps else 0.0


def _step_fine(blocks: list[BlockOptions], choice: list[int], amount: float, remove: bool) -> list[int]:
    """Move fine-grained (MLP) blocks one unit at a time, cheapest damage per cost first:
    ``remove=True`` removes until ``amount`` more cost is gone (within half a unit);
    ``remove=False`` gives back units while at least ``amount`` of excess removal remains."""
    choice = list(choice)
    heap = []

    def push(i):
        b, c = blocks[i], choice[i]
        nxt = _neighbour(b, c, smaller=remove)
        if nxt is None:
            return
        dcost = abs(b.cost[c] - b.cost[nxt])
        ddamage = b.damage[nxt] - b.damage[c]  # >0 when removing, <0 when giving back
        heapq.heappush(heap, (ddamage / dcost, i, nxt, dcost))

    for i, b in enumerate(blocks):
        if b.fine_grained:
            push(i)
    while heap:
        _, i, nxt, dcost = heapq.heappop(heap)
        if remove and amount < dcost / 2:
            break
        if not remove and amount < dcost:
            continue
        choice[i] = nxt
        amount -= dcost
        push(i)
    return choice


def _neighbour(block: BlockOptions, current: int, smaller: bool) -> int | None:
    if smaller:
        idx = np.where(block.cost < block.cost[current])[0]
        return None if len(idx) == 0 else int(idx[np.argmax(block.cost[idx])])
    idx = np.where(block.cost > block.cost[current])[0]
    return None if len(idx) == 0 else int(idx[np.argmin(block.cost[idx])])


def allocate_uniform(blocks: list[BlockOptions], groups: list[list[int]], keys: list[list], target_fraction: float) -> Allocation:
    """Like :func:`allocate`, but every block of a group must choose an option with the same key
    (e.g. all attention blocks keep the same (heads, KV heads), all MLPs the same width), so the
    result is expressible in a stock config. ``keys[i][j]`` is the key of option ``j`` of block ``i``.

    Removes at least ``target_fraction`` (overshooting by less than one unit per layer) with the
    least total damage. Exhaustive over the groups' shared keys: a few hundred to a few thousand
    combinations, each a vectorised sum.
    """
    full = np.array([b.cost.max() for b in blocks])
    total = float(full.sum())
    target_removed = target_fraction * total
    per_group = []  # for each group: shared keys, summed cost, summed damage, option index per block
    for members in groups:
        shared = set(keys[members[0]])
        for i in members[1:]:
            shared &= set(keys[i])
        shared = sorted(shared)
        index = [{k: j for j, k in enumerate(keys[i])} for i in members]
        cost = np.array([sum(blocks[i].cost[ix[k]] for i, ix in zip(members, index)) for k in shared])
        damage = np.array([sum(blocks[i].damage[ix[k]] for i, ix in zip(members, index)) for k in shared])
        per_group.append((shared, cost, damage, index))
    kept_cost = np.zeros(1)
    kept_damage = np.zeros(1)
    for _, cost, damage, _ in per_group:  # all combinations, as flat arrays (row-major over groups)
        kept_cost = (kept_cost[:, None] + cost[None, :]).ravel()
        kept_damage = (kept_damage[:, None] + damage[None, :]).ravel()
    feasible = np.nonzero(total - kept_cost >= target_removed - 1e-9)[0]
    if len(feasible) == 0:
        floor = float(kept_cost.min())
        raise ValueError(f"cannot remove {target_fraction:.0%} with the same counts in every layer: uniform "
                         f"pruning allows at most {(total - floor) / total:.1%}")
    best = int(feasible[np.argmin(kept_damage[feasible])])
    choice = [0] * len(blocks)
    sizes = [len(g[0]) for g in per_group]
    for g in reversed(range(len(per_group))):
        best, pos = divmod(best, sizes[g])
        shared, _, _, index = per_group[g]
        for i, ix in zip(groups[g], index):
            choice[i] = ix[shared[pos]]
    removed = total - float(sum(b.cost[c] for b, c in zip(blocks, choice)))
    return Allocation(choice=choice, cost_removed=removed, cost_total=total,
                      damage=float(sum(b.damage[c] for b, c in zip(blocks, choice))))


def heads_prunable(adapter: ModelAdapter, config: PruneConfig) -> bool:
    """Uniform (stock-loadable) pruning keeps every head where the stock config cannot say
    fewer heads of the same size (BERT family)."""
    return config.prune_heads and (not config.uniform or adapter.stock_config_can_drop_heads)


def new_bias_kinds(adapter: ModelAdapter, uniform: bool) -> set[str]:
    """Block kinds (``"attn"``, ``"mlp"``) whose output projection a correction may give a bias it
    lacks. Any, normally (the export then loads through modeling_stat.py unless the stock config
    can declare it); for a uniform (stock-loadable) plan only those a stock config flag declares.
    Where a bias may not be created, an intercept correction falls back to plain least squares and
    a mean-bias correction to none."""
    return set(adapter.stock_bias_flags()) if uniform else {"attn", "mlp"}


def budget_summary(model, seq_len: int = 512) -> dict:
    adapter = get_adapter(model)
    return {"block_params": block_parameter_count(adapter), "block_macs_per_token": block_macs(adapter, seq_len)}
