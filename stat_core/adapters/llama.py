"""Llama-family decoders: Llama, Mistral, Qwen2, Qwen3, Gemma-3 (text).

They share one layout: ``model.layers[i].self_attn.{q,k,v,o}_proj`` and
``model.layers[i].mlp.{gate,up,down}_proj``. Differences (q/k norms, sandwich norms, sliding
windows, biases) live outside the sliced projections and need no code here: q/k norms act per
``head_dim`` and are shared by all heads.

Grouped-query attention: a layer keeps ``g`` of its KV heads and the same number ``r`` of query
heads in each kept group, so stock attention code (``repeat_kv`` by ``num_key_value_groups``)
still runs; the layer's ``num_key_value_groups`` becomes ``r``.
"""

from __future__ import annotations

import torch
from torch import nn

from stat_core.adapters.base import LayerShape, ModelAdapter, slice_linear_


class LlamaLikeAdapter(ModelAdapter):
    family = "llama"

    @property
    def _decoder(self) -> nn.Module:
        return self.model.model if hasattr(self.model, "model") else self.model

    @property
    def layers(self) -> nn.ModuleList:
        return self._decoder.layers

    @property
    def head_dim(self) -> int:
        return int(self.attention(0).head_dim)

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].self_attn

    # Which stock configs can declare output biases is part of each family's record
    # (stat_core.adapters.registry.FAMILIES: Family.bias_flags).
    _BIAS_PROJS = {"attn": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"],
                   "mlp": ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}

    def stock_bias_flags(self) -> dict[str, tuple[str, list[str]]]:
        flags = dict(self.bias_flags)  # the family record's, set by stat_core.adapters.registry.get_adapter
        return {kind: (flag, self._BIAS_PROJS[kind]) for kind, flag in flags.items()}

    def mlp(self, layer: int) -> nn.Module:
        return self.layers[layer].mlp

    def attn_out_proj(self, layer: int) -> nn.Linear:
        return self.attention(layer).o_proj

    def mlp_out_proj(self, layer: int) -> nn.Linear:
        return self.mlp(layer).down_proj

    def mlp_in_projs(self, layer: int) -> list[nn.Linear]:
        return [self.mlp(layer).gate_proj, self.mlp(layer).up_proj]

    def query_proj(self, layer: int) -> nn.Linear:
        return self.attention(layer).q_proj

    def key_value_projs(self, layer: int) -> list[nn.Linear]:
        return [self.attention(layer).k_proj, self.attention(layer).v_proj]

    def layer_shape(self, layer: int) -> LayerShape:
        attn = self.attention(layer)
        hd = self.head_dim
        return LayerShape(num_heads=attn.q_proj.out_features // hd,
                          num_kv_heads=attn.k_proj.out_features // hd,
                          intermediate_size=self.mlp_out_proj(layer).in_features)

    def prune_heads_(self, layer: int, kept_heads: list[int], kept_kv_heads: list[int],
                     new_out_weight: torch.Tensor | None) -> None:
        attn = self.attention(layer)
        shape = self.layer_shape(layer)
        hd = self.head_dim
        group = shape.num_heads // shape.num_kv_heads
        kept_heads = sorted(kept_heads)
        kept_kv_heads = sorted(kept_kv_heads)
        per_group = {kv: [h for h in kept_heads if h // group == kv] for kv in kept_kv_heads}
        counts = {len(v) for v in per_group.values()}
        if len(counts) != 1 or 0 in counts or sum(len(v) for v in per_group.values()) != len(kept_heads):
            raise ValueError("each kept KV head must keep the same, non-zero number of query heads, "
                             f"and no query head may outlive its KV head (layer {layer})")
        q_cols = torch.tensor([h * hd + j for h in kept_heads for j in range(hd)], dtype=torch.long)
        kv_cols = torch.tensor([g * hd + j for g in kept_kv_heads for j in range(hd)], dtype=torch.long)
        slice_linear_(attn.q_proj, rows=q_cols)
        slice_linear_(attn.k_proj, rows=kv_cols)
        slice_linear_(attn.v_proj, rows=kv_cols)
        if new_out_weight is None:
            slice_linear_(attn.o_proj, cols=q_cols)
        else:
            slice_linear_(attn.o_proj, new_weight=new_out_weight)
        attn.num_key_value_groups = counts.pop()
        for name in ("num_heads", "num_attention_heads"):
            if hasattr(attn, name):
                setattr(attn, name, len(kept_heads))
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = len(kept_kv_heads)

    def prune_neurons_(self, layer: int, kept: list[int], new_out_weight: torch.Tensor | None) -> None:
        super().prune_neurons_(layer, kept, new_out_weight)
        mlp = self.mlp(layer)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(kept)
