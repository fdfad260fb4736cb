"""Per-user state: one :class:`Session` per browser session, never shared.

Models are not deep-copyable inside ``gr.State`` and must not live in module globals shared by all
users, so the app keeps them here, keyed by Gradio's ``request.session_hash``. A session holds the
dense model it loaded (never modified), the cached calibration and the latest pruned copy.
Sessions are dropped when the page unloads, and the least recently used *idle* ones are evicted
when there are more than ``max_sessions`` or they have been idle for ``idle_seconds``: each holds
at most its dense model, the calibration statistics and one pruned copy, so memory is bounded by
``max_sessions`` of those. An evicted session lets go of its models (and the GPU cache is emptied);
a session with a handler running on it is never evicted (its job keeps the models alive until it
ends, so evicting it would free nothing and lose the user's work); it is considered again on the
next request once the job is done.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stat_core.export.common import pid_alive

MAX_SESSIONS = 4
IDLE_SECONDS = 2 * 3600
#: A session used within this many seconds is never evicted to make room for another: a new model is
#: refused instead (four anonymous demo loads must not throw out a person who paused to read).
GRACE_SECONDS = 15 * 60
#: A page that was reloaded or closed leaves its session here this long, for the reloaded page (the
#: same browser, by the token it keeps in its local storage) to take it back in one step.
RESUME_SECONDS = 10 * 60


# A session's folder: ``stat-app-<pid>-<mkdtemp's 8 characters>`` (the PID tells a stale one from a live one).
WORKDIR_NAME = re.compile(r"^stat-app-(\d+)-[a-z0-9_]{8}$")
_LIVE_WORKDIRS: set[Path] = set()     # this process's session folders, removed at exit


def workdir_root() -> Path:
    """Where session folders go: Gradio's own cache folder (``gradio.utils.get_upload_folder``'s rule),
    so the exports the app returns are served from there as they are, not copied into the cache
    (where a copy would outlive the session by up to 1.5 h); removing the session's folder removes
    the only copy."""
    root = Path(os.environ.get("GRADIO_TEMP_DIR") or (Path(tempfile.gettempdir()) / "gradio").resolve())
    root.mkdir(parents=True, exist_ok=True)
    return root


def remove_own_workdirs() -> None:
    """Delete every session folder this process made (runs at exit)."""
    for path in list(_LIVE_WORKDIRS):
        shutil.rmtree(path, ignore_errors=True)
        _LIVE_WORKDIRS.discard(path)


atexit.register(remove_own_workdirs)


def remove_stale_workdirs() -> list[Path]:
    """Delete session folders left by app processes that are gone (SIGKILL, power loss): only folders
    named ``stat-app-<pid>-…`` whose PID is dead, in the cache folder and the system temp folder."""
    removed = []
    for root in {workdir_root(), Path(tempfile.gettempdir())}:
        try:
            entries = list(root.iterdir())
        except OSError:
            continue
        for entry in entries:
            match = WORKDIR_NAME.match(entry.name)
            if match and entry.is_dir() and not entry.is_symlink() and not pid_alive(int(match.group(1))):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


class Cancelled(Exception):
    """The user pressed Cancel; raised from the core's progress callback between layers."""


@dataclass
class Outcome:
    """One prune: its plan, config and report, and the pruned copy built for exactly that plan.

    A re-budget never edits an outcome; it installs a new one (:meth:`Session.set_outcome`). A job
    that started on an older outcome (building its pruned copy, measuring, exporting) keeps working
    on that object, so a plan is never paired with another plan's weights, whatever the
    interleaving of a re-budget and a long job.
    """

    plan: Any
    config: Any
    report: dict
    pruned: Any = None


@dataclass
class Session:
    key: str = "local"
    # loaded model
    model_name: str | None = None
    model: Any = None              # the dense model: never modified (pruning works on deep copies)
    tokenizer: Any = None
    encoder: bool = False
    arch: dict = field(default_factory=dict)
    # calibration
    calib_key: tuple | None = None
    calib_data: Any = None         # token windows (decoders) or a CalibrationSet (encoders)
    held_out: Any = None           # held-out CalibrationSet (classifiers' accuracy)
    calib_info: dict = field(default_factory=dict)
    calibration: Any = None        # stat_core.pipeline.Calibration (dense statistics + analyses)
    calib_warning: str = ""
    # latest prune (plan, config, report and pruned copy replaced together; see Outcome)
    outcome: Outcome | None = None
    dense_metrics: dict = field(default_factory=dict)   # cached "before" numbers
    suite_reference: Any = None    # stat_core.evaluation.suite.DenseReference of the dense model (Compare's suite)
    suite_key: tuple | None = None
    # cancellation of the running job (a fresh event per job, see begin_job)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    last_used: float = field(default_factory=time.monotonic)
    detached_at: float | None = None   # when its page went away (reload, closed tab); None while a page has it
    active: int = 0                # handler calls running on this session right now (see in_use)
    _workdir: Path | None = None
    _active_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    # re-plans from the slider: one at a time per session, and only the latest request is computed
    rebudget_seq: int = 0
    rebudget_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def next_rebudget(self) -> int:
        """A number for a new re-plan request; a request whose number is no longer the latest when its
        turn comes is superseded (the slider moved on) and computes nothing."""
        with self._active_lock:
            self.rebudget_seq += 1
            return self.rebudget_seq

    @contextlib.contextmanager
    def in_use(self):
        """Mark the session busy while a handler runs on it: the store does not evict a busy session."""
        with self._active_lock:
            self.active += 1
        try:
            yield self
        finally:
            with self._active_lock:
                self.active -= 1
            self.last_used = time.monotonic()

    def begin_job(self) -> threading.Event:
        """A new cancellation flag for the job about to run; ``cancel()`` sets the current one."""
        self.cancel_event = threading.Event()
        return self.cancel_event

    def cancel(self) -> None:
        self.cancel_event.set()

    @property
    def workdir(self) -> Path:
        """A private folder in Gradio's cache folder (:func:`workdir_root`), removed when the session
        closes (unload, eviction) or the process exits."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix=f"stat-app-{os.getpid()}-", dir=workdir_root()))
            _LIVE_WORKDIRS.add(self._workdir)
        return self._workdir

    def set_outcome(self, outcome: Outcome | None) -> None:
        self.outcome = outcome   # one reference swap: readers see the old pair or the new one

    @property
    def plan(self):
        return None if self.outcome is None else self.outcome.plan

    @property
    def prune_config(self):
        return None if self.outcome is None else self.outcome.config

    @property
    def report(self) -> dict:
        return {} if self.outcome is None else self.outcome.report

    @property
    def pruned(self):
        return None if self.outcome is None else self.outcome.pruned

    def clear_results(self) -> None:
        self.set_outcome(None)

    def clear_model(self) -> None:
        self.model = self.tokenizer = None
        self.model_name = None
        self.arch = {}
        self.calib_key = self.calib_data = self.held_out = self.calibration = None
        self.calib_info = {}
        self.calib_warning = ""
        self.dense_metrics = {}
        self.suite_reference = self.suite_key = None
        self.clear_results()

    def close(self) -> None:
        self.cancel()
        self.clear_model()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            _LIVE_WORKDIRS.discard(self._workdir)
            self._workdir = None


def free_memory() -> None:
    """Collect what evicted sessions let go of and hand cached GPU memory back to the device."""
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SessionStore:
    """``session_hash → Session`` with LRU eviction of idle sessions beyond ``max_sessions`` and
    expiry of sessions idle for ``idle_seconds``; busy sessions (:meth:`Session.in_use`) and sessions
    used within ``grace_seconds`` are kept (:meth:`admission_problem` then refuses a new one).
    :meth:`get` (loading a model) creates sessions; every other request uses :meth:`find`."""

    def __init__(self, max_sessions: int = MAX_SESSIONS, idle_seconds: float = IDLE_SECONDS,
                 grace_seconds: float = GRACE_SECONDS, resume_seconds: float = RESUME_SECONDS):
        self.max_sessions = max_sessions
        self.idle_seconds = idle_seconds
        self.grace_seconds = grace_seconds
        self.resume_seconds = resume_seconds
        self._tokens: dict[str, str] = {}   # a browser's resume token → its session's key
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str | None) -> Session:
        key = key or "local"
        now = time.monotonic()
        evicted = []
        with self._lock:
            session = self._sessions.get(key)
            if session is None:
                session = self._sessions[key] = Session(key=key)
            self._sessions.move_to_end(key)
            session.last_used = now
            idle = [k for k, s in self._sessions.items() if k != key and s.active == 0]  # oldest first
            for other_key in idle:
                other = self._sessions[other_key]
                if now - other.last_used > self.idle_seconds or (
                        other.detached_at is not None and now - other.detached_at > self.resume_seconds):
                    evicted.append(self._sessions.pop(other_key))
            idle = [k for k in idle if k in self._sessions and self._evictable(self._sessions[k], now)]
            while len(self._sessions) > self.max_sessions and idle:
                evicted.append(self._sessions.pop(idle.pop(0)))
        for s in evicted:
            s.close()
        if evicted:
            free_memory()
        return session

    def _evictable(self, session: Session, now: float) -> bool:
        """An idle session may give its place to a new one: its page is gone, or it was not used
        within ``grace_seconds``."""
        return session.detached_at is not None or now - session.last_used > self.grace_seconds

    def admission_problem(self, key: str | None) -> str | None:
        """One sentence when a new session for ``key`` would need to evict someone who used the app
        within ``grace_seconds`` (or is busy); None when it fits or ``key`` already has one."""
        key = key or "local"
        now = time.monotonic()
        with self._lock:
            if key in self._sessions or len(self._sessions) < self.max_sessions:
                return None
            if any(k != key and s.active == 0 and self._evictable(s, now) for k, s in self._sessions.items()):
                return None
        return (f"The app is holding models for {len(self._sessions)} other people who used it in the last "
                f"{self.grace_seconds / 60:.0f} minutes; try again in a few minutes.")

    def find(self, key: str | None) -> Session:
        """The stored session of ``key`` (marked used), or a fresh empty one that is *not* stored: a
        request from a browser that never loaded a model creates nothing and evicts no one. Only
        loading a model (:meth:`get`) creates a session."""
        with self._lock:
            session = self._sessions.get(key or "local")
            if session is not None:
                self._sessions.move_to_end(key or "local")
                session.last_used = time.monotonic()
                return session
        return Session(key=key or "local")

    def adopt(self, session: Session) -> Session:
        """Store ``session`` (a model was just loaded into it) under its key, evicting as :meth:`get` does."""
        with self._lock:
            self._sessions[session.key] = session
        return self.get(session.key)

    def token_for(self, key: str | None) -> str:
        """The resume token of ``key``'s session (made once): the page keeps it in the browser's local
        storage, and a reloaded page hands it to :meth:`resume`. It is a random secret, not the key."""
        key = key or "local"
        with self._lock:
            for token, k in self._tokens.items():
                if k == key:
                    return token
            token = secrets.token_urlsafe(24)
            self._tokens[token] = key
            return token

    def detach(self, key: str | None) -> None:
        """The page of ``key`` went away (reload, closed tab): its session stays for
        ``resume_seconds`` for the same browser to take back, then goes (or sooner when its place is
        needed). Without a resume token (never loaded a model) it goes at once."""
        key = key or "local"
        with self._lock:
            session = self._sessions.get(key)
            keep = session is not None and key in self._tokens.values()
            if keep:
                session.detached_at = time.monotonic()
                session.cancel()  # nothing runs for a page that is gone
        if not keep:
            self.drop(key)

    def resume(self, token: str | None, key: str | None) -> Session | None:
        """The session the browser's ``token`` names, moved to this page's ``key`` (a reload gets a new
        key), or None: unknown or expired token, or this page already has a session of its own."""
        key = key or "local"
        if not token:
            return None
        with self._lock:
            old = self._tokens.get(token)
            session = self._sessions.get(old) if old is not None else None
            if session is None:
                self._tokens.pop(token, None)
                return None
            if old != key:
                if key in self._sessions:
                    return None
                del self._sessions[old]
                self._sessions[key] = session
                session.key = key
                self._tokens[token] = key
            session.detached_at = None
            session.last_used = time.monotonic()
            return session

    def drop(self, key: str | None) -> None:
        with self._lock:
            session = self._sessions.pop(key or "local", None)
            for token in [t for t, k in self._tokens.items() if k == (key or "local")]:
                del self._tokens[token]
        if session is not None:
            session.close()
            free_memory()

    def __contains__(self, key: str) -> bool:
        return key in self._sessions

    def __len__(self) -> int:
        return len(self._sessions)
