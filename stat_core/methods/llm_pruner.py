"""LLM-Pruner — being implemented (placeholder so the registry imports)."""

from __future__ import annotations

from .base import PruningMethod


class LLMPruner(PruningMethod):
    name = "llm-pruner"
    label = "LLM-Pruner"
    summary = "not implemented yet"
