"""The one list of model families: one :class:`Family` description per ``config.model_type``.

Everything that depends on the family asks this table: which adapter slices it, whether it is an
encoder (classifier) or a decoder, whether llama.cpp's GGUF can hold it, whether SliceGPT's rotation
applies, where its layers and projections are (``layout``: the modeling file shipped inside exports
reads it, and the declarative adapter of the families without an adapter class). Adding a family is
adding one record here (and, for a test, its tiny config); ``tests/test_families.py`` checks every
family against its record.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from stat_core.adapters import modeling_stat as remote_modeling
from stat_core.adapters.base import ModelAdapter
from stat_core.adapters.bert import BertLikeAdapter, DistilBertAdapter
from stat_core.adapters.declarative import LayoutAdapter
from stat_core.adapters.llama import LlamaLikeAdapter


# Where each family keeps its layers and projections (paths relative to the base model / a layer): the
# ``layout`` of its record below. The shipped modeling file reads the exported model's one entry.
_LLAMA = {"layers": "layers", "attn": "self_attn", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
          "v": "self_attn.v_proj", "o": "self_attn.o_proj", "mlp": "mlp", "w_in": ("mlp.gate_proj", "mlp.up_proj"),
          "w_out": "mlp.down_proj"}
_BERT = {"layers": "encoder.layer", "attn": "attention.self", "q": "attention.self.query",
         "k": "attention.self.key", "v": "attention.self.value", "o": "attention.output.dense",
         "mlp": "intermediate", "w_in": ("intermediate.dense",), "w_out": "output.dense"}
_DISTILBERT = {"layers": "transformer.layer", "attn": "attention", "q": "attention.q_lin", "k": "attention.k_lin",
               "v": "attention.v_lin", "o": "attention.out_lin", "mlp": "ffn", "w_in": ("ffn.lin1",),
               "w_out": "ffn.lin2"}
# Families described only here: ``stat_core.adapters.declarative.LayoutAdapter`` reads the entry
# (no adapter class of their own). Extra keys: ``config`` names the stock config fields (``heads``,
# ``ffn``: the MLP width); ``bias_flag`` is the stock flag that gives every projection a bias.
_OPT = {"layers": "decoder.layers", "attn": "self_attn", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
        "v": "self_attn.v_proj", "o": "self_attn.out_proj", "mlp": "", "w_in": ("fc1",), "w_out": "fc2",
        "config": {"heads": "num_attention_heads", "ffn": "ffn_dim"}, "bias_flag": "enable_bias"}
# GPT-2: ``transformers`` ``Conv1D`` projections (weight stored ``(in, out)``, the transpose of
# nn.Linear's) and one fused ``c_attn`` whose output is ``[q | k | v]``, each ``heads·head_dim`` wide
# (``qkv`` replaces the q/k/v keys; ``split_size`` is the attention's record of that width).
_GPT2 = {"layers": "h", "attn": "attn", "qkv": "attn.c_attn", "o": "attn.c_proj", "mlp": "mlp",
         "w_in": ("mlp.c_fc",), "w_out": "mlp.c_proj", "config": {"heads": "n_head", "ffn": "n_inner"}}
# GPT-NeoX / Pythia: ``query_key_value`` is fused *per head*: its output rows are
# ``[q_h0; k_h0; v_h0; q_h1; k_h1; v_h1; ...]`` (``qkv_layout: "interleaved"``; the attention views
# them as ``(..., heads, 3·head_size)`` and chunks the last axis), so it works for any head count.
# ``attention_bias`` governs the two attention projections only (the MLP always has biases).
_GPT_NEOX = {"layers": "layers", "attn": "attention", "qkv": "attention.query_key_value",
             "qkv_layout": "interleaved", "o": "attention.dense", "mlp": "mlp", "w_in": ("mlp.dense_h_to_4h",),
             "w_out": "mlp.dense_4h_to_h", "config": {"heads": "num_attention_heads", "ffn": "intermediate_size"},
             "bias_flag": "attention_bias", "bias_flag_kinds": ("attn",)}
# Phi-3: ``qkv_proj`` fused ``[q | k | v]`` with grouped-query attention (q ``heads·head_dim`` rows,
# k and v ``kv_heads·head_dim`` each) and ``gate_up_proj`` fused ``[gate | up]`` (``w_in_parts``: the
# one in-projection holds that many stacked copies of the neuron axis). Its attention finds the
# query width from ``config.num_attention_heads`` (``attn_config_heads``): a pruned layer's
# attention gets a :class:`LayerConfig` stating its own count. No biases.
_PHI3 = {"layers": "layers", "attn": "self_attn", "qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj", "mlp": "mlp",
         "w_in": ("mlp.gate_up_proj",), "w_in_parts": 2, "w_out": "mlp.down_proj",
         "config": {"heads": "num_attention_heads", "ffn": "intermediate_size"}, "attn_config_heads": True}


@dataclass(frozen=True)
class Family:
    """What the project knows about one ``model_type``."""

    model_type: str
    adapter: type[ModelAdapter]
    #: where its layers and projections are (one of the layouts above, or a new dict of the same keys);
    #: the modeling file shipped in exports reads it
    layout: dict
    #: an encoder (loaded as a sequence classifier) rather than a causal decoder
    encoder: bool = False
    #: llama.cpp's layer matches this family's (RMSNorm, RoPE, SwiGLU, no q/k norms): GGUF export possible
    gguf: bool = False
    #: pre-norm blocks with plain RMSNorm scales, so SliceGPT's rotation can be folded through them
    rotatable: bool = False
    #: why SliceGPT's rotation does not apply, when that is not obvious
    rotation_note: str = ""
    #: Llama-like families: the stock config flags that give the output projections a bias
    #: (``("attn", "attention_bias")``, ``("mlp", "mlp_bias")``; transformers' modeling files say which
    #: exist). A family without them exports a correction's output biases only in per-layer form.
    bias_flags: tuple[tuple[str, str], ...] = ()


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", LlamaLikeAdapter, _LLAMA, gguf=True, rotatable=True,
           bias_flags=(("attn", "attention_bias"), ("mlp", "mlp_bias"))),
    Family("mistral", LlamaLikeAdapter, _LLAMA, gguf=True, rotatable=True),
    Family("qwen2", LlamaLikeAdapter, _LLAMA, rotatable=True),
    Family("qwen3", LlamaLikeAdapter, _LLAMA, rotatable=True, bias_flags=(("attn", "attention_bias"),)),
    Family("gemma3_text", LlamaLikeAdapter, _LLAMA, bias_flags=(("attn", "attention_bias"),),
           rotation_note="its norms after each sub-block scale the output by a learned vector that cannot be "
                         "folded through a rotation"),
    Family("granite", LlamaLikeAdapter, _LLAMA, bias_flags=(("attn", "attention_bias"), ("mlp", "mlp_bias"))),
    Family("bert", BertLikeAdapter, _BERT, encoder=True),
    Family("roberta", BertLikeAdapter, _BERT, encoder=True),
    Family("distilbert", DistilBertAdapter, _DISTILBERT, encoder=True),
    Family("opt", LayoutAdapter, _OPT),
    Family("gpt2", LayoutAdapter, _GPT2),
    Family("gpt_neox", LayoutAdapter, _GPT_NEOX),
    Family("phi3", LayoutAdapter, _PHI3),
)}

remote_modeling.LAYOUTS.update({name: f.layout for name, f in FAMILIES.items()})  # the library's copy reads all

#: ``{model_type: adapter class}`` (read from :data:`FAMILIES`).
ADAPTERS: dict[str, type[ModelAdapter]] = {name: f.adapter for name, f in FAMILIES.items()}
ENCODER_TYPES = tuple(name for name, f in FAMILIES.items() if f.encoder)


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


def supported_model_types() -> list[str]:
    return sorted(FAMILIES)


def family_of(model_or_type) -> Family | None:
    """The family description of a model, a config or a ``model_type`` string (None: unsupported)."""
    if isinstance(model_or_type, str):
        return FAMILIES.get(model_or_type)
    config = getattr(model_or_type, "config", model_or_type)
    return FAMILIES.get(getattr(config, "model_type", None))


def families_where(**flags) -> tuple[str, ...]:
    """The ``model_type`` of every family whose description has all ``flags`` (e.g. ``gguf=True``)."""
    return tuple(name for name, f in FAMILIES.items() if all(getattr(f, k) == v for k, v in flags.items()))


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModelError(
            f"Model type '{model_type}' is not supported; supported types are: "
            f"{', '.join(supported_model_types())}.")
    family = FAMILIES[model_type]
    adapter = family.adapter(model)
    adapter.bias_flags = family.bias_flags  # what the family record says, for adapters that ask
    return adapter


def is_encoder(model) -> bool:
    family = family_of(model)
    return family is not None and family.encoder
