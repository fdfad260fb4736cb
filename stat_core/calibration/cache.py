"""The dense calibration of a (model, windows, settings) kept on disk: the second calibration of the
same model on the same text is a file read instead of minutes of forward and backward passes.

One entry is one safetensors file (:func:`~stat_core.calibration.statistics.save_stats`' format, no
pickle) in ``cache_dir()/calibration``, named by the digest of its key, which covers everything the
numbers depend on:

* the model: a SHA-256 of every tensor of its state dict (names, dtypes, shapes and bytes), its
  config, its class and the device type the statistics are computed on;
* the windows: their token ids (and padding masks and labels);
* the calibration settings (``PruneConfig.sensitivity_samples``, ``batch_size``, ``intercept``,
  ``sensitivity_labels``);
* the format: :data:`FORMAT_VERSION`, the torch and transformers versions and a hash of the source
  of the modules that compute the cached numbers (a code change never reads old numbers).

The whole key is stored inside the entry as well; reading compares it and every tensor, so a stale,
foreign, truncated or otherwise damaged file is a miss (a warning is logged and the file removed),
never a result. Writes go to a temporary file in the same folder, renamed into place when complete.
The folder is bounded (:func:`max_bytes`, oldest entries removed first).

``STAT_CALIBRATION_CACHE=off`` turns the cache off (the test suite does, so each test calibrates);
``STAT_CALIBRATION_CACHE_GB`` sets the bound (default 4); ``STAT_CALIBRATION_CACHE_DIR`` the folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from stat_core.calibration.statistics import BlockStats, SensitivitySums, read_stats_file, save_stats
from stat_core.paths import cache_dir

log = logging.getLogger(__name__)

#: Bump when what an entry holds, or how it is read, changes.
FORMAT_VERSION = "1"
ENTRY_KIND = "stat-calibration-cache"

_PACKAGE = Path(__file__).resolve().parent.parent
#: Source files whose code computes the cached numbers (their text is part of every key).
CODE_FILES = ("calibration/stage.py", "calibration/statistics.py", "calibration/sizes.py", "linalg.py",
              "methods/stat/analysis.py", "methods/stat/cached.py", "methods/stat/explain.py")

#: The PruneConfig fields that change what ``pipeline.calibrate`` returns.
SETTINGS = ("sensitivity_samples", "batch_size", "intercept", "sensitivity_labels", "sensitivity_batch",
            "memory_savers")


def enabled() -> bool:
    """False when ``STAT_CALIBRATION_CACHE`` is ``off`` / ``0`` / ``false`` / ``no``."""
    return os.environ.get("STAT_CALIBRATION_CACHE", "on").strip().lower() not in ("off", "0", "false", "no")


def cache_root() -> Path:
    """``$STAT_CALIBRATION_CACHE_DIR`` or ``cache_dir()/calibration``."""
    root = os.environ.get("STAT_CALIBRATION_CACHE_DIR")
    return Path(root) if root else cache_dir() / "calibration"


def max_bytes() -> int:
    """The folder's bound in bytes (``STAT_CALIBRATION_CACHE_GB``, default 4 GiB). A value that is not
    a finite number of gigabytes ≥ 0 raises ValueError in one sentence (called before any
    calibration work by :func:`stat_core.pipeline.cached_calibration`)."""
    text = os.environ.get("STAT_CALIBRATION_CACHE_GB", "4")
    try:
        gb = float(text)
    except ValueError:
        gb = math.nan
    if not math.isfinite(gb) or gb < 0:
        raise ValueError(f"STAT_CALIBRATION_CACHE_GB must be a number of gigabytes ≥ 0 (e.g. 4), got {text!r}; "
                         "fix or unset it.")
    return int(gb * 2 ** 30)


def check_settings() -> None:
    """ValueError in one sentence when the cache's environment settings are unusable (called before
    any work by the CLI, the app and :func:`stat_core.pipeline.cached_calibration`)."""
    if enabled():
        max_bytes()


#: The only names this cache writes: an entry (40 hex digits of its key) and its temporary file.
#: Nothing else in the folder is ever removed, whatever the folder is.
ENTRY_NAME = re.compile(r"[0-9a-f]{40}\.safetensors")
TEMP_NAME = re.compile(r"\.[0-9a-f]{40}\..+\.tmp")


def _is_entry(path: Path) -> bool:
    """``path`` has an entry's name and its header says it is one of this cache's entries."""
    if not ENTRY_NAME.fullmatch(path.name):
        return False
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("extra.kind") == ENTRY_KIND  # save_stats prefixes extras
    except Exception:  # unreadable or not safetensors: not ours to delete
        return False


# --- the key ---------------------------------------------------------------------------------------

def _tensor_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().cpu().contiguous().reshape(-1)  # 0-dim buffers too
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def model_fingerprint(model) -> str:
    """SHA-256 of the model's state dict (every name, dtype, shape and byte; a tensor shared by two
    names, like tied embeddings, is read once), its config and class, and its device type (about
    0.7 s for 135M float32 parameters on two cores)."""
    h = hashlib.sha256()
    h.update(type(model).__name__.encode())
    config = getattr(model, "config", None)
    if config is not None:
        cfg = config.to_dict()
        for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            cfg.pop(k, None)
        h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict().items():
        ident = (t.data_ptr(), tuple(t.shape), tuple(t.stride()), str(t.dtype))
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel() and ident in seen:
            h.update(f"same as {seen[ident]}".encode())
            continue
        seen[ident] = name
        h.update(_tensor_bytes(t))
    first = next(iter(model.parameters()), None)
    h.update(f"device={first.device.type if first is not None else 'cpu'}".encode())
    return h.hexdigest()


def data_fingerprint(data) -> str:
    """SHA-256 of the calibration windows: token ids, padding mask and labels (a
    :class:`~stat_core.calibration.statistics.CalibrationSet` or an ``(n, T)`` tensor)."""
    h = hashlib.sha256()
    for name in ("input_ids", "attention_mask", "labels"):
        t = getattr(data, name, None) if not torch.is_tensor(data) else (data if name == "input_ids" else None)
        if t is None:
            h.update(f"{name}=None|".encode())
            continue
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def code_fingerprint() -> str:
    """SHA-256 of the source of :data:`CODE_FILES` and the torch / transformers versions."""
    import transformers

    h = hashlib.sha256(f"torch={torch.__version__}|transformers={transformers.__version__}|".encode())
    for rel in CODE_FILES:
        path = _PACKAGE / rel
        h.update(rel.encode())
        h.update(path.read_bytes() if path.is_file() else b"missing")
    return h.hexdigest()


@dataclass(frozen=True)
class CacheKey:
    """What a cached calibration depends on (:func:`key_for`); ``digest`` names its file."""

    model: str
    data: str
    settings: tuple
    code: str
    format: str = FORMAT_VERSION

    def as_dict(self) -> dict:
        return {"format": self.format, "model": self.model, "data": self.data,
                "settings": dict(self.settings), "code": self.code}

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()

    @property
    def path(self) -> Path:
        return cache_root() / f"{self.digest[:40]}.safetensors"


def key_for(model, data, config, needs: list[str] | None = None) -> CacheKey:
    """The key of ``model`` calibrated on ``data`` with ``config``'s calibration settings; ``needs``:
    the parts computed when not everything was (a method that skips the gradient pass)."""
    settings = tuple((name, getattr(config, name)) for name in SETTINGS)
    if needs is not None:
        settings += (("needs", tuple(needs)),)
    return CacheKey(model_fingerprint(model), data_fingerprint(data), settings, code_fingerprint())


# --- an entry -------------------------------------------------------------------------------------

@dataclass
class Entry:
    """What an entry holds: the dense statistics, the normalised sensitivities (``None`` without a
    gradient pass), the timings of the run that computed them, and the extra tensors / JSON that the
    caller stored beside them (e.g. per-layer analyses)."""

    dense_stats: list[BlockStats]
    sensitivity: list[dict] | None
    timings: dict = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def read(key: CacheKey) -> Entry | None:
    """The entry stored under ``key``, or None when there is none or it cannot be trusted (another
    format or key, a truncated or damaged file: logged as a warning and removed)."""
    path = key.path
    if not path.is_file():
        return None
    try:
        stats, sens, tensors, meta = read_stats_file(path)
        if meta.get("kind") != ENTRY_KIND or meta.get("format") != FORMAT_VERSION:
            raise ValueError(f"cache format {meta.get('format')!r}, this version reads {FORMAT_VERSION!r}")
        if json.loads(meta.get("key", "null")) != key.as_dict():
            raise ValueError("its fingerprint does not match the model, windows and settings asked for")
        sensitivity = None if sens is None else sens.fisher
        entry = Entry(stats, sensitivity, json.loads(meta.get("timings", "{}")), tensors,
                      json.loads(meta.get("info", "{}")))
        _check_finite(entry)
    except Exception as exc:  # whatever is wrong with it, it is not used
        log.warning("Ignoring the cached calibration %s and recomputing it: %s", path.name, exc)
        log.debug("unreadable calibration cache entry %s", path, exc_info=True)
        _remove(path)
        return None
    try:
        os.utime(path)  # recently used: evicted last
    except OSError:
        pass
    return entry


def _check_finite(entry: Entry) -> None:
    for i, s in enumerate(entry.dense_stats):
        for t in (s.attn_gram, s.mlp_gram, s.attn_sum, s.mlp_sum):
            if t is not None and not bool(torch.isfinite(t).all()):
                raise ValueError(f"block {i} holds non-finite statistics")


def entry_bytes(dense_stats: list[BlockStats], sensitivity: list[dict] | None) -> int:
    """The size an entry of these statistics takes on disk (about)."""
    total = 0
    for s in dense_stats:
        for t in (s.attn_gram, s.mlp_gram, s.attn_sum, s.mlp_sum):
            total += 0 if t is None else t.numel() * t.element_size()
    for f in sensitivity or ():
        total += sum(t.numel() * t.element_size() for t in f.values())
    return total


def write(key: CacheKey, dense_stats: list[BlockStats], sensitivity: list[dict] | None, timings: dict,
          tensors: dict[str, torch.Tensor] | None = None, info: dict | None = None) -> Path | None:
    """Store an entry under ``key`` (atomically: a temporary file renamed into place), then trim the
    folder to :func:`max_bytes`. Returns its path, or None when it was not stored (too large for the
    bound, or the disk refused: logged, never raised: the caller has its numbers either way)."""
    size = entry_bytes(dense_stats, sensitivity)
    if size > max_bytes():
        log.info("Not caching a %.1f GB calibration (the cache holds %.1f GB; STAT_CALIBRATION_CACHE_GB)",
                 size / 2 ** 30, max_bytes() / 2 ** 30)
        return None
    path = key.path
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o644)  # as the other cached files (mkstemp makes it private)
        sens = None if sensitivity is None else SensitivitySums(sensitivity, 1)  # already normalised
        meta = {"kind": ENTRY_KIND, "format": FORMAT_VERSION, "key": json.dumps(key.as_dict(), sort_keys=True),
                "timings": json.dumps(timings), "info": json.dumps(info or {}), "written": str(time.time())}
        save_stats(tmp, dense_stats, sens, extra_tensors=tensors, extra_metadata=meta)
        os.replace(tmp, path)
        tmp = None
    except Exception:  # the caller has its numbers either way
        log.warning("Could not store the calibration in the cache %s", path.parent, exc_info=True)
        return None
    finally:
        if tmp is not None:
            _remove(Path(tmp))
    trim(keep=path)
    return path


def trim(keep: Path | None = None) -> None:
    """Remove the least recently used entries (and leftover temporary files older than an hour)
    until the folder holds at most :func:`max_bytes`; ``keep`` is never removed."""
    root = cache_root()
    if not root.is_dir():
        return
    now = time.time()
    entries = []
    for p in root.iterdir():
        try:
            st = p.stat()
        except OSError:
            continue
        if TEMP_NAME.fullmatch(p.name):
            if now - st.st_mtime > 3600:
                _remove(p)
            continue
        if _is_entry(p):
            entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries)
    for _, size, p in sorted(entries):
        if total <= max_bytes():
            break
        if keep is not None and p == keep:
            continue
        _remove(p)
        total -= size


def _remove(path: Path) -> None:
    try:
        path.unlink(missing_ok=True)
    except OSError:
        log.debug("could not remove %s", path, exc_info=True)
