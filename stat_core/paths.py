"""Where converted demo models and cleaned text are cached."""

from __future__ import annotations

import os
from pathlib import Path

#: Small static files shipped beside the package: seed prompts, suite prompts, CSS.
ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


def cache_dir() -> Path:
    """``$STAT_CACHE_DIR`` or ``~/.cache/stat-workbench``."""
    root = os.environ.get("STAT_CACHE_DIR") or Path.home() / ".cache" / "stat-workbench"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
