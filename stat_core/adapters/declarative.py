"""Families described by data alone: one record in ``stat_core.adapters.registry.FAMILIES`` with a ``layout``.

The entry says where the layers and each projection live and which stock config fields hold the
head count and the MLP width. The same entry drives the surgery here and the resizing in the
shipped ``modeling_stat.py`` (which loads non-uniform exports), so a family added this way is one
description, not an adapter class plus a loader.

Covered:

- **OPT** (``model.decoder.layers[i].self_attn.{q,k,v,out}_proj``, ``fc1``/``fc2``; every
  projection has a bias under the default ``enable_bias``);
- **GPT-2** (``transformer.h[i].attn.c_attn`` fused ``[q | k | v]``, ``attn.c_proj``,
  ``mlp.c_fc``/``mlp.c_proj``, all ``Conv1D``: weights stored ``(in, out)``, always with a bias);
- **GPT-NeoX / Pythia** (``gpt_neox.layers[i].attention.query_key_value`` fused and interleaved per
  head ``[q_0; k_0; v_0; q_1; ...]``, ``attention.dense``, ``mlp.dense_h_to_4h``/``dense_4h_to_h``;
  rotary on a fraction of each head, which removing whole heads leaves alone);
- **Phi-3** (``model.layers[i].self_attn.qkv_proj`` fused ``[q | k | v]`` with grouped-query
  attention, ``self_attn.o_proj``, ``mlp.gate_up_proj`` fused ``[gate | up]``, ``mlp.down_proj``).

OPT, GPT-2 and GPT-NeoX are multi-head (every head its own key and value), so heads are removed
freely; Phi-3 keeps whole KV groups with the same number of query heads in each (the Llama rule).
The stock configs derive the head size (``hidden_size / num_attention_heads``; Phi-3's has no
``head_dim`` field either): a stock config cannot say "fewer heads of the same size", so uniform
(stock-loadable) plans keep every head, as for BERT; per-layer head counts load through the shipped
``modeling_stat.py`` / ``load_pruned``.

The rest of stat_core reads projections as ``nn.Linear`` (``weight: (out, in)``, ``in_features``,
forward hooks). For ``Conv1D`` and for the parts of a fused projection the adapter hands out a
:class:`LinearView` instead: the same storage seen through that convention (reads and in-place
writes go to the real weights, except GPT-NeoX's interleaved q/k/v, which are gathered copies;
:meth:`LinearView.copy_rows_` writes through every kind); the surgery itself works on the real
modules.

GPT-2 hands each block its causal mask as a positional argument (``None`` under the default
``sdpa``, which is causal by itself; a mask tensor under ``eager``); ``calibrate.LayerwiseRunner``
replays positional arguments by name, so both calibrate alike (``tests/test_families.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from stat_core.adapters import modeling_stat as remote_modeling
from stat_core.adapters.base import LayerShape, ModelAdapter, slice_linear_


class LinearView:
    """``nn.Linear``-shaped view of a ``Conv1D`` (weight ``(in, out)``), or of output features
    ``rows`` of a projection (one of q/k/v, or gate/up, of a fused one). ``weight`` is ``(out, in)``.

    ``rows`` a ``slice`` (a contiguous part: GPT-2's q/k/v, Phi-3's): ``weight`` and ``bias`` share
    storage, so in-place writes go to the real weights. ``rows`` an index tensor (GPT-NeoX's
    per-head interleaved q/k/v): no strided view can show those rows as one matrix, so ``weight``
    and ``bias`` are *copies*, to read; :meth:`copy_rows_` writes rows through either kind."""

    def __init__(self, module: nn.Module, rows: slice | torch.Tensor | None = None):
        self.module = module
        self.rows = rows
        self._conv = remote_modeling.is_conv1d(module)

    @property
    def parameter(self) -> nn.Parameter:
        """The stored weight (a leaf: what gradients land on)."""
        return self.module.weight

    def _index(self, t: torch.Tensor) -> torch.Tensor:
        if self.rows is None:
            return t
        return t[self.rows] if isinstance(self.rows, slice) else t[self.rows.to(t.device)]

    def as_linear(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like :attr:`parameter` (its gradient, say) seen like :attr:`weight`."""
        return self._index(tensor.T if self._conv else tensor)

    @property
    def weight(self) -> torch.Tensor:
        return self.as_linear(self.module.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.module.bias
        return b if b is None else self._index(b)

    @bias.setter
    def bias(self, value) -> None:
        if self.rows is not None:
            raise TypeError("cannot replace the bias of part of a fused projection")
        self.module.bias = value

    def _row_ids(self) -> torch.Tensor:
        """Positions of this view's rows among the stored projection's output features."""
        total = self.module.weight.shape[1 if self._conv else 0]
        if self.rows is None:
            return torch.arange(total)
        if isinstance(self.rows, slice):
            return torch.arange(total)[self.rows]
        return self.rows.cpu()

    @torch.no_grad()
    def copy_rows_(self, dst, src) -> None:
        """Rows ``src`` of this view (weight and bias) written over its rows ``dst`` (any index)."""
        ids = self._row_ids()
        d, s_ = ids[dst], ids[src]
        weight = self.module.weight
        if self._conv:
            weight[:, d] = weight[:, s_]
        else:
            weight[d] = weight[s_]
        if self.module.bias is not None:
            self.module.bias[d] = self.module.bias[s_]

    @property
    def in_features(self) -> int:
        return self.module.weight.shape[0 if self._conv else 1]

    @property
    def out_features(self) -> int:
        return len(self._row_ids())

    def register_forward_pre_hook(self, hook, **kwargs):
        if self.rows is not None:
            raise TypeError("hooks see the whole fused projection, not one part")
        return self.module.register_forward_pre_hook(hook, **kwargs)

    def register_forward_hook(self, hook, **kwargs):
        if self.rows is not None:
            raise TypeError("hooks see the whole fused projection, not one part")
        return self.module.register_forward_hook(hook, **kwargs)


def _view(module: nn.Module):
    return LinearView(module) if remote_modeling.is_conv1d(module) else module


def slice_projection_(module: nn.Module, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                      new_weight: torch.Tensor | None = None) -> None:
    """:func:`slice_linear_` for a Linear or a Conv1D: ``rows`` are output features, ``cols`` input
    features and ``new_weight`` is ``(out, in)``, whatever the storage."""
    if not remote_modeling.is_conv1d(module):
        slice_linear_(module, rows=rows, cols=cols, new_weight=new_weight)
        return
    weight = module.weight  # (in, out)
    if new_weight is None:
        w = weight.data
        if rows is not None:
            w = w[:, rows.to(w.device)]
        if cols is not None:
            w = w[cols.to(w.device)]
    else:
        w = new_weight.T
    module.weight = nn.Parameter(w.to(device=weight.device, dtype=weight.dtype).contiguous(),
                                 requires_grad=weight.requires_grad)
    if rows is not None:
        module.bias = nn.Parameter(module.bias.data[rows.to(weight.device)].contiguous(),
                                   requires_grad=module.bias.requires_grad)
    module.nx, module.nf = module.weight.shape


class LayoutAdapter(ModelAdapter):
    """An adapter that reads its family record's ``layout`` (``remote_modeling.LAYOUTS[config.model_type]``,
    filled from :data:`stat_core.adapters.registry.FAMILIES`)."""

    stock_config_can_drop_heads = False

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.layout = remote_modeling.LAYOUTS[self.config.model_type]
        self.family = self.config.model_type

    # --- config fields ---------------------------------------------------------------------
    @property
    def ffn_config_field(self) -> str:
        """The stock config field holding the MLP width (written by a uniform export)."""
        return self.layout["config"]["ffn"]

    def stock_bias_flags(self) -> dict[str, tuple[str, list[str]]]:
        flag = self.layout.get("bias_flag")
        if not flag:
            return {}
        # One flag governs every projection of the kinds it covers (OPT: both kinds, GPT-NeoX:
        # attention only); turning it on for either kind creates all of them.
        kinds = self.layout.get("bias_flag_kinds", ("attn", "mlp"))
        projs = {"attn": [self.layout[k] for k in ("q", "k", "v", "qkv", "o") if k in self.layout],
                 "mlp": list(self.layout["w_in"]) + [self.layout["w_out"]]}
        governed = [p for kind in kinds for p in projs[kind]]
        return {kind: (flag, governed) for kind in kinds}

    # --- where things are -------------------------------------------------------------------
    def _get(self, layer: int, key: str) -> nn.Module:
        return remote_modeling._get(self.layers[layer], self.layout[key])

    def _counts(self, layer: int) -> tuple[int, int]:
        """(query heads, KV heads): q width from the output projection's input, the rest is k and v."""
        hd = self.head_dim
        n_heads = _view(self._get(layer, "o")).in_features // hd
        if "qkv" not in self.layout:
            return n_heads, _view(self._get(layer, "k")).out_features // hd
        fused = LinearView(self._get(layer, "qkv")).out_features
        return n_heads, (fused // hd - n_heads) // 2

    def _qkv_parts(self, layer: int) -> list:
        """q, k, v as Linear-shaped objects (views into a fused projection where there is one)."""
        if "qkv" not in self.layout:
            return [_view(self._get(layer, key)) for key in ("q", "k", "v")]
        fused = self._get(layer, "qkv")
        hd = self.head_dim
        n_heads, n_kv = self._counts(layer)
        if self.layout.get("qkv_layout") == "interleaved":  # per head [q_h; k_h; v_h]
            base = torch.arange(n_heads)[:, None] * 3 * hd + torch.arange(hd)[None, :]
            return [LinearView(fused, (base + i * hd).reshape(-1)) for i in range(3)]
        q, kv = n_heads * hd, n_kv * hd  # [q | k | v]
        return [LinearView(fused, slice(0, q)), LinearView(fused, slice(q, q + kv)),
                LinearView(fused, slice(q + kv, q + 2 * kv))]

    @property
    def layers(self) -> nn.ModuleList:
        return remote_modeling._layers(self.model, self.layout)

    @property
    def head_dim(self) -> int:
        return remote_modeling.head_dim_of(self.attention(0))

    def attention(self, layer: int) -> nn.Module:
        return self._get(layer, "attn")

    def mlp(self, layer: int) -> nn.Module:
        return self._get(layer, "mlp")

    def attn_out_proj(self, layer: int) -> nn.Linear:
        return _view(self._get(layer, "o"))

    def mlp_out_proj(self, layer: int) -> nn.Linear:
        return _view(self._get(layer, "w_out"))

    def _mlp_in_modules(self, layer: int) -> list[nn.Module]:
        return [remote_modeling._get(self.layers[layer], p) for p in self.layout["w_in"]]

    def mlp_in_projs(self, layer: int) -> list[nn.Linear]:
        parts = self.layout.get("w_in_parts", 1)
        if parts == 1:
            return [_view(m) for m in self._mlp_in_modules(layer)]
        # Fused [gate | up]: each part of the one in-projection as its own Linear-shaped view.
        (fused,) = self._mlp_in_modules(layer)
        width = LinearView(fused).out_features // parts
        return [LinearView(fused, slice(i * width, (i + 1) * width)) for i in range(parts)]

    def query_proj(self, layer: int) -> nn.Linear:
        return self._qkv_parts(layer)[0]

    def key_value_projs(self, layer: int) -> list[nn.Linear]:
        return self._qkv_parts(layer)[1:]

    def layer_shape(self, layer: int) -> LayerShape:
        heads, kv_heads = self._counts(layer)
        return LayerShape(num_heads=heads, num_kv_heads=kv_heads,
                          intermediate_size=self.mlp_out_proj(layer).in_features)

    # --- surgery ----------------------------------------------------------------------------
    def prune_heads_(self, layer: int, kept_heads: list[int], kept_kv_heads: list[int],
                     new_out_weight: torch.Tensor | None) -> None:
        """Keep ``kept_heads``; under GQA (Phi-3) whole KV groups ``kept_kv_heads``, each keeping
        the same number of its query heads (the Llama rule), so stock attention code still runs.
        Multi-head families (every head its own key and value) need ``kept_kv_heads == kept_heads``."""
        n_heads, n_kv = self._counts(layer)
        group = n_heads // n_kv
        kept_heads, kept_kv_heads = sorted(kept_heads), sorted(kept_kv_heads)
        per_group = {kv: [h for h in kept_heads if h // group == kv] for kv in kept_kv_heads}
        counts = {len(v) for v in per_group.values()}
        if len(counts) != 1 or 0 in counts or sum(len(v) for v in per_group.values()) != len(kept_heads):
            raise ValueError(f"{self.family}: each kept KV head must keep the same, non-zero number of query "
                             f"heads, and no query head may outlive its KV head (layer {layer}); families "
                             "without grouped-query attention keep kept_kv_heads equal to kept_heads")
        hd = self.head_dim
        span = torch.arange(hd)
        q_cols = (torch.tensor(kept_heads)[:, None] * hd + span).reshape(-1)
        kv_cols = (torch.tensor(kept_kv_heads)[:, None] * hd + span).reshape(-1)
        attn = self.attention(layer)
        if "qkv" not in self.layout:
            slice_projection_(self._get(layer, "q"), rows=q_cols)
            for key in ("k", "v"):
                slice_projection_(self._get(layer, key), rows=kv_cols)
        elif self.layout.get("qkv_layout") == "interleaved":  # per head [q_h; k_h; v_h]: whole 3·hd blocks
            rows = (torch.tensor(kept_heads)[:, None] * 3 * hd + torch.arange(3 * hd)).reshape(-1)
            slice_projection_(self._get(layer, "qkv"), rows=rows)
        else:  # [q | k | v]
            q, kv = n_heads * hd, n_kv * hd
            slice_projection_(self._get(layer, "qkv"), rows=torch.cat([q_cols, kv_cols + q, kv_cols + q + kv]))
        out = self._get(layer, "o")
        if new_out_weight is None:
            slice_projection_(out, cols=q_cols)
        else:
            slice_projection_(out, new_weight=new_out_weight)
        remote_modeling.set_attention_counts(attn, len(kept_heads), len(kept_kv_heads), hd, self.layout)

    def prune_neurons_(self, layer: int, kept: list[int], new_out_weight: torch.Tensor | None) -> None:
        rows = torch.tensor(sorted(kept), dtype=torch.long)
        width = self.mlp_out_proj(layer).in_features
        parts = self.layout.get("w_in_parts", 1)  # fused [gate | up]: the same neurons out of each part
        in_rows = torch.cat([rows + i * width for i in range(parts)])
        for module in self._mlp_in_modules(layer):
            slice_projection_(module, rows=in_rows)
        out = self._get(layer, "w_out")
        if new_out_weight is None:
            slice_projection_(out, cols=rows)
        else:
            slice_projection_(out, new_weight=new_out_weight)
        mlp = self.mlp(layer)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(kept)
