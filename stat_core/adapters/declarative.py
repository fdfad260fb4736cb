"""Families described by data alone: one entry in ``stat_core.remote_modeling.LAYOUTS``.

The entry says where the layers and each projection live and which stock config fields hold the
head count and the MLP width. The same entry drives the surgery here and the resizing in the
shipped ``modeling_stat.py`` (which loads non-uniform exports), so a family added this way is one
description, not an adapter class plus a loader.

Covered: **OPT** (``model.decoder.layers[i].self_attn.{q,k,v,out}_proj``, ``fc1``/``fc2``; every
projection has a bias under the default ``enable_bias``) and **GPT-2** (``transformer.h[i].attn.c_attn``
fused ``[q | k | v]``, ``attn.c_proj``, ``mlp.c_fc``/``mlp.c_proj``, all ``Conv1D``: weights stored
``(in, out)``, always with a bias). Multi-head attention only (every head its own key and value), so
heads are removed freely. The head size is derived by the stock config (``hidden_size /
num_attention_heads``): a stock config cannot say "fewer heads of the same size", so uniform
(stock-loadable) plans keep every head, as for BERT; per-layer head counts load through the shipped
``modeling_stat.py`` / ``load_pruned``.

The rest of stat_core reads projections as ``nn.Linear`` (``weight: (out, in)``, ``in_features``,
forward hooks). For ``Conv1D`` and for the q/k/v parts of a fused projection the adapter hands out
a :class:`LinearView` instead: the same storage seen through that convention (reads and in-place
writes go to the real weights); the surgery itself works on the real modules.

GPT-2 with ``attn_implementation="eager"``: ``GPT2Model`` hands each block its causal mask as a
positional argument, which ``calibrate.LayerwiseRunner`` (keyword arguments only, for unpadded
windows) does not replay; with the default ``sdpa`` the mask is ``None`` and causality is implied,
which ``tests/test_families.py`` checks block by block.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import remote_modeling
from .base import LayerShape, ModelAdapter, slice_linear_


class LinearView:
    """``nn.Linear``-shaped view of a ``Conv1D`` (weight ``(in, out)``), or of output features
    ``rows`` of a projection (one of q/k/v in a fused one). ``weight`` is ``(out, in)`` sharing storage."""

    def __init__(self, module: nn.Module, rows: slice | None = None):
        self.module = module
        self.rows = rows
        self._conv = remote_modeling.is_conv1d(module)

    @property
    def parameter(self) -> nn.Parameter:
        """The stored weight (a leaf: what gradients land on)."""
        return self.module.weight

    def as_linear(self, tensor: torch.Tensor) -> torch.Tensor:
        """A tensor shaped like :attr:`parameter` (its gradient, say) seen like :attr:`weight`."""
        t = tensor.T if self._conv else tensor
        return t if self.rows is None else t[self.rows]

    @property
    def weight(self) -> torch.Tensor:
        return self.as_linear(self.module.weight)

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.module.bias
        return b if b is None or self.rows is None else b[self.rows]

    @bias.setter
    def bias(self, value) -> None:
        if self.rows is not None:
            raise TypeError("cannot replace the bias of part of a fused projection")
        self.module.bias = value

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

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
    """An adapter that reads ``remote_modeling.LAYOUTS[config.model_type]``."""

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
        # One flag governs every projection of both kinds: turning it on for either creates all.
        projs = [self.layout[k] for k in ("q", "k", "v", "o") if k in self.layout] + list(self.layout["w_in"]) + [self.layout["w_out"]]
        return {"attn": (flag, projs), "mlp": (flag, projs)}

    # --- where things are -------------------------------------------------------------------
    def _get(self, layer: int, key: str) -> nn.Module:
        return remote_modeling._get(self.layers[layer], self.layout[key])

    def _qkv_parts(self, layer: int) -> list:
        """q, k, v as Linear-shaped objects (views into a fused projection where there is one)."""
        if "qkv" not in self.layout:
            return [_view(self._get(layer, key)) for key in ("q", "k", "v")]
        fused = self._get(layer, "qkv")
        width = LinearView(fused).out_features // 3
        return [LinearView(fused, slice(i * width, (i + 1) * width)) for i in range(3)]

    @property
    def layers(self) -> nn.ModuleList:
        return remote_modeling._layers(self.model, self.layout)

    @property
    def head_dim(self) -> int:
        return int(self.attention(0).head_dim)

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
        return [_view(m) for m in self._mlp_in_modules(layer)]

    def query_proj(self, layer: int) -> nn.Linear:
        return self._qkv_parts(layer)[0]

    def key_value_projs(self, layer: int) -> list[nn.Linear]:
        return self._qkv_parts(layer)[1:]

    def layer_shape(self, layer: int) -> LayerShape:
        heads = self.query_proj(layer).out_features // self.head_dim
        return LayerShape(num_heads=heads, num_kv_heads=heads,
                          intermediate_size=self.mlp_out_proj(layer).in_features)

    # --- surgery ----------------------------------------------------------------------------
    def prune_heads_(self, layer: int, kept_heads: list[int], kept_kv_heads: list[int],
                     new_out_weight: torch.Tensor | None) -> None:
        if sorted(kept_heads) != sorted(kept_kv_heads):
            raise ValueError(f"{self.family} heads own their keys and values: kept_kv_heads must equal kept_heads")
        hd = self.head_dim
        cols = torch.tensor([h * hd + j for h in sorted(kept_heads) for j in range(hd)], dtype=torch.long)
        attn = self.attention(layer)
        if "qkv" in self.layout:  # the same heads out of each of q, k, v
            width = self.query_proj(layer).out_features
            slice_projection_(self._get(layer, "qkv"), rows=torch.cat([cols, cols + width, cols + 2 * width]))
            attn.split_size = len(cols)
        else:
            for key in ("q", "k", "v"):
                slice_projection_(self._get(layer, key), rows=cols)
        out = self._get(layer, "o")
        if new_out_weight is None:
            slice_projection_(out, cols=cols)
        else:
            slice_projection_(out, new_weight=new_out_weight)
        n = len(kept_heads)
        remote_modeling.set_attention_counts(attn, n, n, hd)

    def prune_neurons_(self, layer: int, kept: list[int], new_out_weight: torch.Tensor | None) -> None:
        rows = torch.tensor(sorted(kept), dtype=torch.long)
        for module in self._mlp_in_modules(layer):
            slice_projection_(module, rows=rows)
        out = self._get(layer, "w_out")
        if new_out_weight is None:
            slice_projection_(out, cols=rows)
        else:
            slice_projection_(out, new_weight=new_out_weight)
