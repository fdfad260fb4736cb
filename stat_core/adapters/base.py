"""The adapter interface: where a model family keeps its layers, heads and neurons.

Adapters hold paths and slicing, never math. The pruning code talks to a model only through
:class:`ModelAdapter`, so a new family is one small file plus a registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerShape:
    """Inner widths of one transformer block (the only sizes STAT changes)."""

    num_heads: int
    num_kv_heads: int
    intermediate_size: int

    def to_dict(self) -> dict:
        return {"num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
                "intermediate_size": self.intermediate_size}


class ModelAdapter:
    """One model family. Subclasses fill in module paths; everything else is shared."""

    family: str = "base"
    #: causal decoders score perplexity; encoders score accuracy.
    is_decoder: bool = True
    #: whether a stock config can hold fewer heads without changing the head size (decoders
    #: store ``head_dim``; BERT derives it as ``hidden_size / num_attention_heads``).
    stock_config_can_drop_heads: bool = True
    #: the stock config field holding the MLP width (a uniform export writes the pruned width there)
    ffn_config_field: str = "intermediate_size"
    #: the family record's stock output-bias flags (``Family.bias_flags``; set by ``get_adapter``)
    bias_flags: tuple = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    def stock_bias_flags(self) -> dict[str, tuple[str, list[str]]]:
        """Config flags of the stock family that give output projections a bias: ``{"attn" |
        "mlp": (flag, [projection names the flag governs, relative to a layer])}``. A correction's
        output biases export stock-loadable when every kind it added has a flag (the other
        projections the flag governs then get zero biases)."""
        return {}

    # --- where things are -------------------------------------------------------------------
    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def head_dim(self) -> int:
        raise NotImplementedError

    def attention(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def mlp(self, layer: int) -> nn.Module:
        raise NotImplementedError

    def attn_out_proj(self, layer: int) -> nn.Linear:
        """Linear whose input is the concatenated per-head outputs ``(..., heads·head_dim)``."""
        raise NotImplementedError

    def mlp_out_proj(self, layer: int) -> nn.Linear:
        """Linear whose input is the MLP intermediate activation ``(..., d_ff)``."""
        raise NotImplementedError

    def mlp_in_projs(self, layer: int) -> list[nn.Linear]:
        """Linears whose output rows are MLP neurons (up, gate)."""
        raise NotImplementedError

    def query_proj(self, layer: int) -> nn.Linear:
        """Linear whose output rows are the query heads."""
        raise NotImplementedError

    def key_value_projs(self, layer: int) -> list[nn.Linear]:
        """Linears whose output rows are the key/value heads."""
        raise NotImplementedError

    def layer_shape(self, layer: int) -> LayerShape:
        raise NotImplementedError

    # --- surgery ----------------------------------------------------------------------------
    def prune_heads_(self, layer: int, kept_heads: list[int], kept_kv_heads: list[int],
                     new_out_weight: torch.Tensor | None) -> None:
        raise NotImplementedError

    def prune_neurons_(self, layer: int, kept: list[int], new_out_weight: torch.Tensor | None) -> None:
        """Keep rows ``kept`` of the in-projections; the out-projection gets the kept columns or
        ``new_out_weight`` (the corrected ``W_out Tᵀ``)."""
        rows = torch.tensor(sorted(kept), dtype=torch.long)
        for proj in self.mlp_in_projs(layer):
            slice_linear_(proj, rows=rows)
        if new_out_weight is None:
            slice_linear_(self.mlp_out_proj(layer), cols=rows)
        else:
            slice_linear_(self.mlp_out_proj(layer), new_weight=new_out_weight)

    def add_out_bias_(self, layer: int, kind: str, bias: torch.Tensor) -> None:
        """Add ``bias: (d_out,)`` to the attention (``kind="attn"``) or MLP (``"mlp"``) output
        projection, creating the bias (zeros) where the family has none. Created biases are
        recorded in the config's per-layer shapes so every loader rebuilds them."""
        linear = self.attn_out_proj(layer) if kind == "attn" else self.mlp_out_proj(layer)
        w = linear.weight
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device),
                                       requires_grad=w.requires_grad)
            self.config.stat_added_out_biases = True
        with torch.no_grad():
            linear.bias += bias.to(device=w.device, dtype=w.dtype)

    def record_shapes_in_config_(self) -> None:
        """Write every layer's widths (and which output projections carry a bias, when a correction
        added biases the stock family lacks) into the config so the model describes itself."""
        shapes = [self.layer_shape(i).to_dict() for i in range(self.num_layers)]
        if getattr(self.config, "stat_added_out_biases", False):
            for i, shape in enumerate(shapes):
                shape["attn_out_bias"] = self.attn_out_proj(i).bias is not None
                shape["mlp_out_bias"] = self.mlp_out_proj(i).bias is not None
        self.config.stat_layer_shapes = shapes


def slice_linear_(linear: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                  new_weight: torch.Tensor | None = None) -> None:
    """Replace ``linear``'s parameters in place by a row/column slice (or a given weight).

    Keeps dtype, device and ``requires_grad``; the bias follows the rows.
    """
    weight = linear.weight
    if new_weight is None:
        w = weight.data
        if rows is not None:
            w = w[rows.to(w.device)]
        if cols is not None:
            w = w[:, cols.to(w.device)]
        new_weight = w
    new_weight = new_weight.to(device=weight.device, dtype=weight.dtype).contiguous()
    linear.weight = nn.Parameter(new_weight, requires_grad=weight.requires_grad)
    if linear.bias is not None and rows is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows.to(weight.device)].contiguous(),
                                   requires_grad=linear.bias.requires_grad)
    linear.out_features, linear.in_features = new_weight.shape
