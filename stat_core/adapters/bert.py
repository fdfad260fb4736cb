"""Post-LayerNorm encoders: BERT / RoBERTa / MiniLM (BERT layout) and DistilBERT (its own names).

BERT:       ``encoder.layer[i].attention.self.{query,key,value}``, ``attention.output.dense`` (W_O),
            ``intermediate.dense`` (W1), ``output.dense`` (W2)
DistilBERT: ``transformer.layer[i].attention.{q_lin,k_lin,v_lin,out_lin}``, ``ffn.lin1``, ``ffn.lin2``

Every head has its own key and value, so heads are removed freely (``num_kv_heads == num_heads``).
The correction reproduces each sub-layer's output before the residual add and LayerNorm, which is
why post-LN works unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from stat_core.adapters.base import LayerShape, ModelAdapter, slice_linear_


class _EncoderAdapter(ModelAdapter):
    is_decoder = False
    stock_config_can_drop_heads = False
    _q = _k = _v = _o = _w1 = _w2 = ""  # attribute paths relative to a layer

    def _get(self, layer: int, path: str) -> nn.Module:
        mod = self.layers[layer]
        for part in path.split("."):
            mod = getattr(mod, part)
        return mod

    @property
    def head_dim(self) -> int:
        return int(self.attention(0).attention_head_size)

    def attn_out_proj(self, layer: int) -> nn.Linear:
        return self._get(layer, self._o)

    def mlp_out_proj(self, layer: int) -> nn.Linear:
        return self._get(layer, self._w2)

    def mlp_in_projs(self, layer: int) -> list[nn.Linear]:
        return [self._get(layer, self._w1)]

    def qkv(self, layer: int) -> list[nn.Linear]:
        return [self._get(layer, p) for p in (self._q, self._k, self._v)]

    def query_proj(self, layer: int) -> nn.Linear:
        return self._get(layer, self._q)

    def key_value_projs(self, layer: int) -> list[nn.Linear]:
        return [self._get(layer, self._k), self._get(layer, self._v)]

    def layer_shape(self, layer: int) -> LayerShape:
        heads = self._get(layer, self._q).out_features // self.head_dim
        return LayerShape(num_heads=heads, num_kv_heads=heads,
                          intermediate_size=self.mlp_out_proj(layer).in_features)

    def prune_heads_(self, layer: int, kept_heads: list[int], kept_kv_heads: list[int],
                     new_out_weight: torch.Tensor | None) -> None:
        if sorted(kept_heads) != sorted(kept_kv_heads):
            raise ValueError("encoder heads own their keys and values: kept_kv_heads must equal kept_heads")
        hd = self.head_dim
        cols = torch.tensor([h * hd + j for h in sorted(kept_heads) for j in range(hd)], dtype=torch.long)
        for proj in self.qkv(layer):
            slice_linear_(proj, rows=cols)
        if new_out_weight is None:
            slice_linear_(self.attn_out_proj(layer), cols=cols)
        else:
            slice_linear_(self.attn_out_proj(layer), new_weight=new_out_weight)
        attn = self.attention(layer)
        for name in ("num_attention_heads", "n_heads"):
            if hasattr(attn, name):
                setattr(attn, name, len(kept_heads))
        if hasattr(attn, "all_head_size"):
            attn.all_head_size = len(kept_heads) * hd


class BertLikeAdapter(_EncoderAdapter):
    family = "bert"
    _q, _k, _v = "attention.self.query", "attention.self.key", "attention.self.value"
    _o, _w1, _w2 = "attention.output.dense", "intermediate.dense", "output.dense"

    @property
    def _encoder_root(self) -> nn.Module:
        # BertModel has .encoder; BertFor* wrap it as .bert / .roberta.
        base = getattr(self.model, self.model.base_model_prefix, self.model)
        return base

    @property
    def layers(self) -> nn.ModuleList:
        return self._encoder_root.encoder.layer

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].attention.self


class DistilBertAdapter(_EncoderAdapter):
    family = "distilbert"
    ffn_config_field = "hidden_dim"
    _q, _k, _v, _o = "attention.q_lin", "attention.k_lin", "attention.v_lin", "attention.out_lin"
    _w1, _w2 = "ffn.lin1", "ffn.lin2"

    @property
    def hidden_size(self) -> int:
        return int(self.config.dim)

    @property
    def layers(self) -> nn.ModuleList:
        base = getattr(self.model, self.model.base_model_prefix, self.model)
        return base.transformer.layer

    def attention(self, layer: int) -> nn.Module:
        return self.layers[layer].attention
