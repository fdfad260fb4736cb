"""Explicit ``{config.model_type: Adapter}`` map; anything else is refused by name."""

from __future__ import annotations

from torch import nn

from stat_core.adapters.base import ModelAdapter
from stat_core.adapters.bert import BertLikeAdapter, DistilBertAdapter
from stat_core.adapters.declarative import LayoutAdapter
from stat_core.adapters.llama import LlamaLikeAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {
    "llama": LlamaLikeAdapter,
    "mistral": LlamaLikeAdapter,
    "qwen2": LlamaLikeAdapter,
    "qwen3": LlamaLikeAdapter,
    "gemma3_text": LlamaLikeAdapter,
    "bert": BertLikeAdapter,
    "roberta": BertLikeAdapter,
    "distilbert": DistilBertAdapter,
    "opt": LayoutAdapter,
    "gpt2": LayoutAdapter,
    "gpt_neox": LayoutAdapter,
    "phi3": LayoutAdapter,
}


class UnsupportedModelError(ValueError):
    """The model's architecture has no adapter."""


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> ModelAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ADAPTERS:
        raise UnsupportedModelError(
            f"Model type '{model_type}' is not supported; supported types are: "
            f"{', '.join(supported_model_types())}.")
    return ADAPTERS[model_type](model)


ENCODER_TYPES = ("bert", "roberta", "distilbert")


def is_encoder(model) -> bool:
    return getattr(model.config, "model_type", None) in ENCODER_TYPES
