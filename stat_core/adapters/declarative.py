"""Families described by data alone: one entry in ``stat_core.remote_modeling.LAYOUTS``.

The entry says where the layers and each projection live and which stock config fields hold the
head count and the MLP width. The same entry drives the surgery here and the resizing in the
shipped ``modeling_stat.py`` (which loads non-uniform exports), so a family added this way is one
description, not an adapter class plus a loader.

Covered: **OPT** (``model.decoder.layers[i].self_attn.{q,k,v,out}_proj``, ``fc1``/``fc2``; every
projection has a bias under the default ``enable_bias``). Multi-head attention only (every head its
own key and value), so heads are removed freely. The head size is derived by the stock config
(``hidden_size / num_attention_heads``): a stock config cannot say "fewer heads of the same size",
so uniform (stock-loadable) plans keep every head, as for BERT.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import remote_modeling
from .base import LayerShape, ModelAdapter, slice_linear_


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
        projs = [self.layout[k] for k in ("q", "k", "v", "o")] + list(self.layout["w_in"]) + [self.layout["w_out"]]
        return {"attn": (flag, projs), "mlp": (flag, projs)}

    # --- where things are -------------------------------------------------------------------
    def _get(self, layer: int, key: str) -> nn.Module:
        return remote_modeling._get(self.layers[layer], self.layout[key])

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
        return self._get(layer, "o")

    def mlp_out_proj(self, layer: int) -> nn.Linear:
        return self._get(layer, "w_out")

    def mlp_in_projs(self, layer: int) -> list[nn.Linear]:
        return [remote_modeling._get(self.layers[layer], p) for p in self.layout["w_in"]]

    def query_proj(self, layer: int) -> nn.Linear:
        return self._get(layer, "q")

    def key_value_projs(self, layer: int) -> list[nn.Linear]:
        return [self._get(layer, "k"), self._get(layer, "v")]

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
        for proj in [self.query_proj(layer)] + self.key_value_projs(layer):
            slice_linear_(proj, rows=cols)
        if new_out_weight is None:
            slice_linear_(self.attn_out_proj(layer), cols=cols)
        else:
            slice_linear_(self.attn_out_proj(layer), new_weight=new_out_weight)
        n = len(kept_heads)
        remote_modeling.set_attention_counts(self.attention(layer), n, n, hd)
