"""Progress reporting shared by the library, the CLI and the app.

Long work reports through one callback, ``progress(stage, done, total)``; the CLI draws it with
:class:`TqdmProgress`, the app with ``gr.Progress``.
"""

from __future__ import annotations

import sys
from typing import Callable

from tqdm.auto import tqdm

ProgressFn = Callable[[str, int, int], None]  # (stage, done, total)

#: What one step of a stage counts (the bar's unit); anything else counts layers.
STAGE_UNITS = {"sensitivity": "window", "windows": "window", "few-shot": "prompt", "analogies": "question",
               "instructions": "prompt", "answers": "prompt", "recover": "step", "generate": "prompt",
               "embed": "step", "methods": "method", "batches": "batch", "calibration cache": "step",
               "search": "candidate", "download": "part"}


def notify(progress: ProgressFn | None, stage: str, done: int, total: int) -> None:
    """Call ``progress`` when there is one."""
    if progress is not None:
        progress(stage, done, total)


def stage_unit(stage: str) -> str:
    """The unit one step of ``stage`` counts, for progress bars and messages."""
    for key, unit in STAGE_UNITS.items():
        if key in stage:
            return unit
    return "layer"


class TqdmProgress:
    """tqdm bars per stage, fed by the core's progress callback."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(total=total, desc=stage, unit=stage_unit(stage),
                                          leave=False, file=sys.stderr)
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()
