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


def publish_dir(tmp: Path, target: Path) -> Path:
    """Move the finished folder ``tmp`` to ``target`` in one rename and return ``target``.

    Several processes may build the same cache entry at once (two setups sharing one user cache):
    when ``target`` already exists -- another writer finished first -- its folder is kept ("the other
    one won, use it") and ``tmp`` is removed; never a half-merged folder, never an error."""
    import shutil

    try:
        os.replace(tmp, target)
    except OSError:
        if not target.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return target


class entry_lock:
    """An exclusive lock (``fcntl.flock``) on ``cache_dir()/locks/<name>.lock`` while one process builds
    a shared cache entry; others wait, then find the entry built. No-op where flock is unavailable."""

    def __init__(self, name: str):
        self.path = cache_dir() / "locks" / f"{name}.lock"
        self._fd = None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: publish_dir's "the other one won" still keeps entries whole
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # closing releases the lock
            self._fd = None
        return False
