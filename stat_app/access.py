"""Which model sources a shared (``--expose``) app allows: the demo models always; local folders
only under the roots the operator lists (``--allow-model-root``); the hub only with ``--allow-hub``.

A refusal is one sentence that never depends on whether the path exists: the path is resolved
(``~``, ``..`` and symlinks) and compared with the roots before anything reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from stat_core.models import ModelLoadError


@dataclass(frozen=True)
class ModelAccess:
    roots: tuple[Path, ...] = ()
    hub: bool = False

    @classmethod
    def of(cls, roots=(), hub: bool = False) -> "ModelAccess":
        return cls(tuple(Path(os.path.realpath(os.path.expanduser(str(r)))) for r in roots), bool(hub))

    def check(self, source: str, name: str | None) -> str:
        """``name`` as it may be loaded (a folder: its resolved path), or ModelLoadError saying why not."""
        name = (name or "").strip()
        if source == "hub" and not self.hub:
            raise ModelLoadError("Loading from the model hub is switched off on this shared server; choose a demo "
                                 "model, or ask its operator to start the app with --allow-hub.")
        if source != "folder":
            return name
        if not self.roots:
            raise ModelLoadError("Loading local folders is switched off on this shared server; choose a demo model, "
                                 "or ask its operator to allow a folder with --allow-model-root.")
        if not name:
            raise ModelLoadError("Give the path of a model folder under "
                                 f"{' or '.join(str(r) for r in self.roots)}.")
        path = Path(os.path.realpath(os.path.expanduser(name)))
        if not any(path == root or root in path.parents for root in self.roots):
            raise ModelLoadError(f"This server loads model folders only from under "
                                 f"{' or '.join(str(r) for r in self.roots)}; give a folder there or choose a demo "
                                 "model.")
        return str(path)
