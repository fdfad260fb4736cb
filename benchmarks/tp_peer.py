"""The peer library Torch-Pruning (``torch_pruning`` 1.6) cutting the same numbers of heads and
neurons per layer as a STAT plan, with its own importance criteria and its own pruning functions.

Workaround (documented in the README): ``tp.DependencyGraph().build_dependency`` does not finish
tracing a transformers-5 Llama — on a 2-layer, 32-wide random Llama it was still running after 10
minutes (with ``output_transform=lambda o: o.logits``; without it, it fails at once because the
model returns a ``ModelOutput``, not a tensor). So the dependency groups are written down by hand,
exactly the groups its graph would produce for one layer, as ``tp.dependency.Group`` objects of
``Dependency`` edges with TP's own handlers:

- MLP neurons of layer l: ``[(gate_proj, prune_linear_out_channels), (up_proj, prune_linear_out_channels),
  (down_proj, prune_linear_in_channels)]`` (BERT: ``intermediate.dense`` out, ``output.dense`` in);
- query heads: ``[(q_proj, out), (o_proj, in)]`` over each head's ``head_dim`` channels;
- KV heads (grouped-query attention): ``[(k_proj, out), (v_proj, out)]``.

TP's importance objects score those groups (``tp.importance.MagnitudeImportance`` — group L2 norm
— and ``tp.importance.ActivationImportance`` — mean |input| of the layers whose *input* channels
the group prunes, i.e. ``o_proj`` / ``down_proj`` inputs: the activations of heads and neurons);
channel scores are summed per head as TP's ``MetaPruner`` does for ``num_heads``. Its
``ActivationImportance`` hook overwrites the statistic on every forward call (only the last batch
would count), so the scores are accumulated here over all calibration batches. ``Group.prune()``
then runs TP's ``prune_linear_*_channels`` on every member. The per-layer counts are STAT's; under
GQA a layer keeps ``g`` KV groups with the same ``r`` query heads in each, ranked by TP's scores
(query heads within a group, then groups by KV score plus their kept heads' scores). Finally the
attention/MLP modules' head-count attributes are updated (TP does not know about them), as the
project's own adapters do.
"""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch_pruning import _helpers
from torch_pruning.dependency.dependency import Dependency
from torch_pruning.dependency.group import Group
from torch_pruning.dependency.node import Node

from stat_core.adapters import get_adapter
from stat_core.calibration.statistics import CalibrationSet
from stat_core.adapters.modeling_stat import set_attention_counts

IMPORTANCES = ("magnitude", "activation")
OUT, IN = tp.prune_linear_out_channels, tp.prune_linear_in_channels


def make_group(members, idxs) -> Group:
    """A TP pruning group over ``idxs`` (root = member 0) for ``members = [(linear, handler), ...]``."""
    group = Group()
    idxs = [int(i) for i in idxs]
    root = Node(members[0][0], None, "root")
    for module, handler in members:
        dep = Dependency(members[0][1], handler, root, Node(module, None, type(module).__name__))
        group.add_dep(dep, [_helpers._HybridIndex(idx=i, root_idx=i) for i in idxs])
    for i, item in enumerate(group.items):
        group[i] = _helpers.GroupItem(item.dep, idxs)
        group[i].root_idxs = list(idxs)
    return group


def head_members(adapter, layer):
    return [(adapter.query_proj(layer), OUT), (adapter.attn_out_proj(layer), IN)]


def kv_members(adapter, layer):
    return [(p, OUT) for p in adapter.key_value_projs(layer)]


def mlp_members(adapter, layer):
    return [(p, OUT) for p in adapter.mlp_in_projs(layer)] + [(adapter.mlp_out_proj(layer), IN)]


def importance_object(kind: str):
    if kind == "magnitude":
        return tp.importance.MagnitudeImportance(p=2, group_reduction="mean", normalizer=None)
    if kind == "activation":
        return tp.importance.ActivationImportance(p=2, group_reduction="mean", normalizer=None)
    raise ValueError(kind)


@torch.no_grad()
def accumulate_activation_importance(model, windows, batch_size: int = 8) -> dict:
    """Run TP's ``ActivationImportance`` hooks over all calibration batches and sum their per-batch
    statistic (TP keeps only the last batch's). Returns ``{module name: summed |input|}`` (names, so
    the sums apply to any copy of the model)."""
    imp = importance_object("activation")
    device = next(model.parameters()).device
    extra = {"use_cache": False} if get_adapter(model).is_decoder else {}
    sums: dict = {}
    with imp.compute_importance(model):
        for batch in CalibrationSet.wrap(windows).batches(batch_size):
            model(**batch.model_inputs(device), **extra)
            for name, m in model.named_modules():
                if hasattr(m, "_importance"):
                    sums[name] = sums.get(name, 0) + m._importance.double()
                    del m._importance
    return sums


def _score(imp, members, n) -> torch.Tensor:
    return imp(make_group(members, range(n))).double()


def tp_prune_like_plan_(model, plan, kind: str, activation_sums: dict | None = None) -> dict:
    """Prune ``model`` (dense) in place with Torch-Pruning to the per-layer counts of ``plan``.
    Returns the kept indices per layer (to compare with a hand-built model)."""
    adapter = get_adapter(model)
    imp = importance_object(kind)
    if kind == "activation":
        if activation_sums is None:
            raise ValueError("activation importance needs accumulate_activation_importance() first")
        for name, s in activation_sums.items():
            model.get_submodule(name)._importance = s
    hd = adapter.head_dim
    kept = []
    try:
        for lp in plan.layers:
            layer = lp.layer
            shape = adapter.layer_shape(layer)
            # --- choose (TP importance, STAT's counts) ---
            n_h, n_kv = shape.num_heads, shape.num_kv_heads
            heads, kvs = list(range(n_h)), list(range(n_kv))
            if len(lp.kept_heads) < n_h:
                chan = _score(imp, head_members(adapter, layer), n_h * hd)
                head_score = chan.view(n_h, hd).sum(1)
                group = n_h // n_kv
                r = len(lp.kept_heads) // max(len(lp.kept_kv_heads), 1)
                best = {g: sorted(range(g * group, (g + 1) * group), key=lambda h: -float(head_score[h]))[:r]
                        for g in range(n_kv)}
                kv_score = torch.zeros(n_kv, dtype=torch.float64)
                if group > 1 and kind == "magnitude":
                    kv_score = _score(imp, kv_members(adapter, layer), n_kv * hd).view(n_kv, hd).sum(1)
                ranked = sorted(best, key=lambda g: -float(kv_score[g] + head_score[best[g]].sum()))
                kvs = sorted(ranked[: len(lp.kept_kv_heads)])
                heads = sorted(h for g in kvs for h in best[g])
            neurons = list(range(shape.intermediate_size))
            if len(lp.kept_neurons) < shape.intermediate_size:
                score = _score(imp, mlp_members(adapter, layer), shape.intermediate_size)
                neurons = sorted(torch.argsort(score, descending=True)[: len(lp.kept_neurons)].tolist())
            # --- cut with TP's pruning functions ---
            drop_h = [h for h in range(n_h) if h not in heads]
            if drop_h:
                chans = [h * hd + j for h in drop_h for j in range(hd)]
                if group > 1:
                    make_group(head_members(adapter, layer), chans).prune(record_history=False)
                    drop_kv = [g for g in range(n_kv) if g not in kvs]
                    if drop_kv:
                        make_group(kv_members(adapter, layer), [g * hd + j for g in drop_kv for j in range(hd)]
                                   ).prune(record_history=False)
                else:  # multi-head attention: q, k, v rows and o columns go together
                    make_group(head_members(adapter, layer) + kv_members(adapter, layer), chans
                               ).prune(record_history=False)
                set_attention_counts(adapter.attention(layer), len(heads), len(kvs), adapter.head_dim)
            drop_n = [j for j in range(shape.intermediate_size) if j not in set(neurons)]
            if drop_n:
                make_group(mlp_members(adapter, layer), drop_n).prune(record_history=False)
                try:  # decoders' MLP modules record their width (encoders' adapters have no mlp())
                    mlp = adapter.mlp(layer)
                except NotImplementedError:
                    mlp = None
                if hasattr(mlp, "intermediate_size"):
                    mlp.intermediate_size = len(neurons)
            kept.append({"heads": heads, "kv_heads": kvs, "neurons": neurons})
    finally:
        for m in model.modules():
            if hasattr(m, "_importance"):
                del m._importance
    adapter.record_shapes_in_config_()
    return {"layers": kept}


