"""The one list of model families: one :class:`Family` description per ``config.model_type``.

Everything that depends on the family asks this table: which adapter slices it, whether it is an
encoder (classifier) or a decoder, whether llama.cpp's GGUF can hold it, whether SliceGPT's rotation
applies. The module paths of the non-Llama, non-BERT families are their layout entries in
:data:`stat_core.adapters.modeling_stat.LAYOUTS` (that file is shipped inside exports, so it stays
free of project imports); ``tests/test_families.py`` checks every family against both.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from stat_core.adapters.base import ModelAdapter
from stat_core.adapters.bert import BertLikeAdapter, DistilBertAdapter
from stat_core.adapters.declarative import LayoutAdapter
from stat_core.adapters.llama import LlamaLikeAdapter


@dataclass(frozen=True)
class Family:
    """What the project knows about one ``model_type``."""

    model_type: str
    adapter: type[ModelAdapter]
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
    Family("llama", LlamaLikeAdapter, gguf=True, rotatable=True,
           bias_flags=(("attn", "attention_bias"), ("mlp", "mlp_bias"))),
    Family("mistral", LlamaLikeAdapter, gguf=True, rotatable=True),
    Family("qwen2", LlamaLikeAdapter, rotatable=True),
    Family("qwen3", LlamaLikeAdapter, rotatable=True, bias_flags=(("attn", "attention_bias"),)),
    Family("gemma3_text", LlamaLikeAdapter, bias_flags=(("attn", "attention_bias"),),
           rotation_note="its norms after each sub-block scale the output by a learned vector that cannot be "
                         "folded through a rotation"),
    Family("bert", BertLikeAdapter, encoder=True),
    Family("roberta", BertLikeAdapter, encoder=True),
    Family("distilbert", DistilBertAdapter, encoder=True),
    Family("opt", LayoutAdapter),
    Family("gpt2", LayoutAdapter),
    Family("gpt_neox", LayoutAdapter),
    Family("phi3", LayoutAdapter),
)}

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
