"""Explicit ``{config.model_type: Adapter}`` map; anything else is refused by name."""

from __future__ import annotations

from torch import nn

from .base import ModelAdapter
from .bert import BertLikeAdapter, DistilBertAdapter
from .declarative import LayoutAdapter
from .llama import LlamaLikeAdapter

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
