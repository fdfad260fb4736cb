"""SliceGPT — being implemented (placeholder so the registry imports)."""

from __future__ import annotations

from .base import PruningMethod


class SliceGPT(PruningMethod):
    name = "slicegpt"
    label = "SliceGPT"
    summary = "not implemented yet"
