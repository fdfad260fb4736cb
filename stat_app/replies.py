"""How the app's handlers answer: a :class:`Reply` (``ok``, one sentence, named results), the
:func:`guarded` wrapper that turns every exception into one readable sentence (tracebacks go to
the server log only), the session's cancel flag turned into a ``stat_core`` progress callback, the
"do this first" preconditions, and :data:`DEVICE_LOCK`, which lets one heavy job at a time use the
device whatever the number of users. Nothing here computes anything; :mod:`stat_app.handlers`
re-exports what tests and the page use (``H.Reply``, ``H.DEVICE_LOCK``).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from stat_app.sessions import Cancelled, Session
from stat_core.adapters import UnsupportedModelError
from stat_core.data.sources import DataError
from stat_core.models import ModelLoadError

log = logging.getLogger("stat_app")

DEVICE_LOCK = threading.RLock()
EXPECTED = (ModelLoadError, UnsupportedModelError, DataError, ValueError, FileExistsError, FileNotFoundError,
            NotADirectoryError, Cancelled)

ProgressFn = Callable[[str, int, int], None]
CANCELLED = "Cancelled; the loaded model is unchanged."


@dataclass
class Reply:
    """What a handler returns: ``ok``, one human sentence, and named results."""

    ok: bool
    message: str
    data: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.data[key]


def fail(exc: BaseException) -> Reply:
    """``Reply(ok=False)`` with the first line of ``exc``'s message as one sentence."""
    if isinstance(exc, Cancelled):
        return Reply(False, str(exc) or "Cancelled.")
    text = str(exc).strip() or exc.__class__.__name__
    text = text.splitlines()[0]
    return Reply(False, text if text.endswith((".", "!", "?")) else text + ".")


def guarded(fn):
    """Turn any exception into ``Reply(ok=False, ...)`` (tracebacks go to the server log only); the
    session passed first is marked busy meanwhile, so the store does not evict it."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Reply:
        session = args[0] if args and isinstance(args[0], Session) else None
        try:
            with session.in_use() if session is not None else contextlib.nullcontext():  # not evicted meanwhile
                return fn(*args, **kwargs)
        except EXPECTED as exc:
            log.info("%s: %s", fn.__name__, exc)
            return fail(exc)
        except torch.cuda.OutOfMemoryError:
            log.exception("%s ran out of GPU memory", fn.__name__)
            return Reply(False, "The device ran out of memory; try fewer samples, a shorter sequence length or the CPU.")
        except Exception as exc:  # noqa: BLE001 - the UI must never show a traceback
            log.exception("unexpected error in %s", fn.__name__)
            return Reply(False, f"Unexpected error ({exc.__class__.__name__}): {str(exc).splitlines()[0] if str(exc) else ''}"
                         .rstrip(": ") + " — see the server log.")
    return wrapper


def check_cancel(cancel_event: threading.Event | None) -> None:
    """Raise :class:`Cancelled` once the session's cancel flag is set."""
    if cancel_event is not None and cancel_event.is_set():
        raise Cancelled(CANCELLED)


def core_progress(progress: ProgressFn | None, cancel_event: threading.Event | None) -> ProgressFn:
    """The callback handed to ``stat_core``: reports ``(stage, done, total)`` and raises
    :class:`Cancelled` between layers once the session's cancel flag is set."""

    def callback(stage: str, done: int, total: int) -> None:
        check_cancel(cancel_event)
        if progress is not None:
            progress(stage, done, total)
    return callback


def require_model(session: Session) -> None:
    if session.model is None:
        raise ValueError("Load a model first.")


def require_calibration(session: Session) -> None:
    require_model(session)
    if session.calibration is None:
        raise ValueError("Calibrate first: pruning needs statistics from calibration text.")


def require_pruned(session: Session) -> None:
    require_model(session)
    if session.plan is None:
        raise ValueError("Prune the model first.")
