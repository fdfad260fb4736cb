"""SlimGPT — being implemented (placeholder so the registry imports)."""

from __future__ import annotations

from .base import PruningMethod


class SlimGPT(PruningMethod):
    name = "slimgpt"
    label = "SlimGPT"
    summary = "not implemented yet"
