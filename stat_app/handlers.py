"""Plain functions behind the app's buttons (testable without Gradio or a browser).

Every public handler takes a :class:`~stat_app.sessions.Session` plus plain values and returns a
:class:`Reply`; none lets an exception escape. Expected problems (missing folder, unsupported
architecture, too little text, impossible budget, cancellation) come back as ``Reply(ok=False,
message=...)`` with one readable sentence from ``stat_core``; anything unexpected is logged with its
traceback on the server and reported as one line.

Heavy work (loading, calibration, pruning, measuring, export) holds :data:`DEVICE_LOCK`, so one job
at a time uses the device whatever the number of users; Gradio's queue also runs those events
with ``concurrency_limit=1``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from stat_core import explain, measure as core_measure, pipeline
from stat_core import prune as core_prune
from stat_core.adapters import UnsupportedModelError
from stat_core.calibration_mix import default_source  # noqa: F401 (the app's default source)
from stat_core.data import DataError, check_calibration_sizes
from stat_core.measure import METRIC_HEADERS, QUICK_EVAL_TOKENS  # noqa: F401 (the app's table, default)
from stat_core.methods import get_method
from stat_core.models import ModelLoadError, is_encoder, load_model
from stat_core.prune import PruneConfig
from stat_core.report import (architecture_summary as architecture, plan_sizes, prune_report, removed_sentence,
                               set_after_sizes, size_summary)

from .choices import (COMPARE_METHODS, DECODER_SOURCES, ENCODER_SOURCES, EXPORT_CHOICES,  # noqa: F401 (re-exported)
                      architecture_markdown, method_choices, method_label, plan_method_choices)
from .sessions import Cancelled, Outcome, Session

log = logging.getLogger("stat_app")

DEVICE_LOCK = threading.RLock()
EXPECTED = (ModelLoadError, UnsupportedModelError, DataError, ValueError, FileExistsError, FileNotFoundError,
            NotADirectoryError, Cancelled)

ProgressFn = Callable[[str, int, int], None]


@dataclass
class Reply:
    """What a handler returns: ``ok``, one human sentence, and named results."""

    ok: bool
    message: str
    data: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return self.data[key]


def _fail(exc: BaseException) -> Reply:
    if isinstance(exc, Cancelled):
        return Reply(False, str(exc) or "Cancelled.")
    text = str(exc).strip() or exc.__class__.__name__
    text = text.splitlines()[0]
    return Reply(False, text if text.endswith((".", "!", "?")) else text + ".")


def guarded(fn):
    """Turn any exception into ``Reply(ok=False, ...)`` (tracebacks go to the server log only)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> Reply:
        session = args[0] if args and isinstance(args[0], Session) else None
        try:
            with session.in_use() if session is not None else contextlib.nullcontext():  # not evicted meanwhile
                return fn(*args, **kwargs)
        except EXPECTED as exc:
            log.info("%s: %s", fn.__name__, exc)
            return _fail(exc)
        except torch.cuda.OutOfMemoryError:
            log.exception("%s ran out of GPU memory", fn.__name__)
            return Reply(False, "The device ran out of memory; try fewer samples, a shorter sequence length or the CPU.")
        except Exception as exc:  # noqa: BLE001 - the UI must never show a traceback
            log.exception("unexpected error in %s", fn.__name__)
            return Reply(False, f"Unexpected error ({exc.__class__.__name__}): {str(exc).splitlines()[0] if str(exc) else ''}"
                         .rstrip(": ") + " — see the server log.")
    return wrapper


def core_progress(progress: ProgressFn | None, cancel_event: threading.Event | None) -> ProgressFn:
    """The callback handed to ``stat_core``: reports ``(stage, done, total)`` and raises
    :class:`Cancelled` between layers once the session's cancel flag is set."""

    def callback(stage: str, done: int, total: int) -> None:
        if cancel_event is not None and cancel_event.is_set():
            raise Cancelled("Cancelled; the loaded model is unchanged.")
        if progress is not None:
            progress(stage, done, total)
    return callback


def _check_cancel(cancel_event: threading.Event | None) -> None:
    if cancel_event is not None and cancel_event.is_set():
        raise Cancelled("Cancelled; the loaded model is unchanged.")


def _require_model(session: Session) -> None:
    if session.model is None:
        raise ValueError("Load a model first.")


def _require_calibration(session: Session) -> None:
    _require_model(session)
    if session.calibration is None:
        raise ValueError("Calibrate first: pruning needs statistics from calibration text.")


def _require_pruned(session: Session) -> None:
    _require_model(session)
    if session.plan is None:
        raise ValueError("Prune the model first.")


# --- load ----------------------------------------------------------------------------------------

@guarded
def load(session: Session, source: str, name: str, device: str = "auto", dtype: str = "float32") -> Reply:
    """Load a demo model, a local folder or a hub id into the session (replacing what it held)."""
    name = pipeline.model_reference(source, name)
    with DEVICE_LOCK:
        t = time.perf_counter()
        model, tokenizer = load_model(name, device=device, dtype=dtype)
        seconds = time.perf_counter() - t
        session.clear_model()
        session.model, session.tokenizer, session.model_name = model, tokenizer, name
        session.encoder = is_encoder(model)
        session.arch = architecture(model)
    a = session.arch
    return Reply(True, f"Loaded {name} ({a['family']}, {a['layers']} layers, {a['parameters'] / 1e6:.1f}M parameters) "
                       f"on {a['device']} in {seconds:.1f} s.", {"arch": a, "seconds": seconds})


# --- calibration ---------------------------------------------------------------------------------

def _calibration_key(session, source, builtin, file_path, pasted, num_samples, seq_len, seed) -> tuple:
    text_hash = hashlib.sha256((pasted or "").encode()).hexdigest()[:16] if source == "pasted" else ""
    p = Path(file_path) if source == "file" and file_path else None
    file_id = () if p is None else (str(p), p.stat().st_size, p.stat().st_mtime) if p.exists() else (str(p),)
    return (session.model_name, source, builtin if source == "builtin" else "", file_id, text_hash,
            int(num_samples), int(seq_len), int(seed))


@guarded
def calibrate(session: Session, source: str = "builtin", builtin: str = "wikipedia", file_path: str | None = None,
              pasted: str = "", num_samples: int = 64, seq_len: int = 512, seed: int = 0,
              progress: ProgressFn | None = None, cancel_event: threading.Event | None = None,
              force: bool = False) -> Reply:
    """Collect dense statistics once (the expensive step); re-budgeting later reuses them."""
    _require_model(session)
    num_samples, seq_len = check_calibration_sizes(session.model, num_samples, seq_len)
    key = _calibration_key(session, source, builtin, file_path, pasted, num_samples, seq_len, seed)
    if not force and session.calibration is not None and session.calib_key == key:
        return Reply(True, "Calibration statistics for this text are cached; nothing to recompute.",
                     {"cached": True, "warning": session.calib_warning})
    with DEVICE_LOCK:  # a self-generated source runs the model
        prepared = pipeline.calibration_data(session.model, session.tokenizer, session.model_name, source, builtin,
                                             file_path, pasted, num_samples, seq_len, seed, progress=progress)
        warning = " ".join(f"Warning: {w}" for w in prepared.warnings)
        _check_cancel(cancel_event)
        t = time.perf_counter()
        calib = pipeline.calibrate_statistics(session.model, prepared.data, core_progress(progress, cancel_event))
        seconds = time.perf_counter() - t
    session.calibration, session.calib_data, session.held_out = calib, prepared.data, prepared.held_out
    session.calib_key, session.calib_info, session.calib_warning = key, prepared.info, warning
    session.clear_results()
    msg = f"Calibrated on {prepared.info['tokens']:,} tokens in {seconds:.1f} s."
    return Reply(True, (warning + " " + msg) if warning else msg,
                 {"cached": False, "warning": warning, "seconds": seconds, "timings": calib.timings})


# --- pruning -------------------------------------------------------------------------------------

def make_config(session: Session, sparsity: float, budget_kind: str = "params", uniform: bool = False,
                mode: str = "one-shot", method: str = "stat") -> PruneConfig:
    return pipeline.prune_config(session.model, session.calib_data, sparsity, budget_kind, uniform, mode, method)


def prune_copy(session: Session, config: PruneConfig, progress: ProgressFn | None = None,
               cancel_event: threading.Event | None = None, plan=None):
    """``(pruned, plan)`` from the session's cached calibration (:func:`stat_core.pipeline.prune_copy`)."""
    _require_calibration(session)
    return pipeline.prune_copy(session.model, session.calibration, session.calib_data, config, session.model_name,
                               session.calib_info, plan=plan, progress=core_progress(progress, cancel_event))


def _report(session: Session, config: PruneConfig, plan, after: dict, seconds: float) -> dict:
    """The shared report (:func:`stat_core.report.prune_report`) plus what only the app shows."""
    return prune_report(session.model_name, session.model, config, session.calib_info,
                        size_summary(session.model, config.flops_seq_len), after, plan=plan, seconds_plan=seconds,
                        calibration_timings=getattr(session.calibration, "timings", {}))


@guarded
def replan(session: Session, sparsity: float, budget_kind: str = "params", uniform: bool = False,
           method: str = "stat") -> Reply:
    """Re-budget from the cached statistics: a new one-shot plan in well under a second, no
    calibration and no surgery (the pruned copy is built when something needs it)."""
    _require_calibration(session)
    config = make_config(session, sparsity, budget_kind, uniform, "one-shot", method)
    t = time.perf_counter()
    plan = core_prune.plan_pruning(session.model, session.calibration, config, session.model_name, session.calib_info)
    seconds = time.perf_counter() - t
    report = _report(session, config, plan, plan_sizes(session.model, plan, config.flops_seq_len), seconds)
    session.set_outcome(Outcome(plan, config, report))
    return Reply(True, removed_sentence(report, "Planned to remove", seconds) +
                 " The pruned copy is built when you measure, generate or export.",
                 {"plan": plan, "report": report, "seconds": seconds})


def ensure_pruned(session: Session, cancel_event: threading.Event | None = None) -> Outcome:
    """The session's current :class:`Outcome` with its pruned copy, built (surgery on a deep copy
    of the dense model, for *that* outcome's plan) if it has none yet. Callers use the returned
    outcome's plan, report and model together: a re-budget landing meanwhile installs a new
    outcome and cannot change this one."""
    _require_pruned(session)
    outcome = session.outcome
    if outcome.pruned is None:
        t = time.perf_counter()
        pruned, _ = prune_copy(session, outcome.config, None, cancel_event, plan=outcome.plan)
        set_after_sizes(outcome.report, size_summary(pruned, outcome.config.flops_seq_len))
        outcome.report["seconds_surgery"] = time.perf_counter() - t
        outcome.pruned = pruned
    return outcome


@guarded
def prune(session: Session, sparsity: float, budget_kind: str = "params", uniform: bool = False,
          mode: str = "one-shot", method: str = "stat", progress: ProgressFn | None = None,
          cancel_event: threading.Event | None = None) -> Reply:
    """Prune a copy of the dense model to ``sparsity``: from cached statistics (one-shot) or with
    layer-by-layer propagation (``mode="propagate"``: a full calibration pass on the copy)."""
    _require_calibration(session)
    config = make_config(session, sparsity, budget_kind, uniform, mode, method)
    with DEVICE_LOCK:
        _check_cancel(cancel_event)
        t = time.perf_counter()
        pruned, plan = prune_copy(session, config, progress, cancel_event)
        seconds = time.perf_counter() - t
        report = _report(session, config, plan, size_summary(pruned, config.flops_seq_len), seconds)
    report["seconds_prune"] = seconds
    session.set_outcome(Outcome(plan, config, report, pruned))
    return Reply(True, removed_sentence(report, "Removed", seconds), {"plan": plan, "report": report, "seconds": seconds})


@guarded
def calibrate_and_prune(session: Session, calib_kwargs: dict, prune_kwargs: dict,
                        progress: ProgressFn | None = None, cancel_event: threading.Event | None = None) -> Reply:
    """The app's main button: calibrate if the text or sizes changed, then prune."""
    mode = prune_kwargs.get("mode", "one-shot")
    _require_model(session)
    if prune_kwargs.get("budget_kind", "params") == "params":  # FLOPs bounds of encoders need the text's length
        config = pipeline.prune_config(session.model, None, prune_kwargs.get("sparsity", 0.0), "params",
                                       prune_kwargs.get("uniform", False), flops_seq_len=512)
        core_prune.check_budget_feasible(session.model, config)  # before minutes of calibration
    c = calibrate(session, **calib_kwargs, progress=progress, cancel_event=cancel_event)
    if not c.ok:
        return c
    p = prune(session, **prune_kwargs, progress=progress, cancel_event=cancel_event)
    if not p.ok:
        return p
    note = "re-used cached statistics" if c.data.get("cached") and mode == "one-shot" else c.message
    warning = session.calib_warning
    msg = f"{p.message} ({note})" if not warning or warning in note else f"{warning} {p.message} ({note})"
    return Reply(True, msg, {**p.data, "calibration": c.data})


# --- measurements (stat_core.measure) --------------------------------------------------------------

def _baseline(session: Session, eval_tokens: int) -> core_measure.Baseline:
    return core_measure.baseline(session.model, session.tokenizer, session.held_out, eval_tokens)


@guarded
def measure(session: Session, eval_tokens: int = QUICK_EVAL_TOKENS, cancel_event: threading.Event | None = None) -> Reply:
    """Before/after table: quick perplexity and KL to dense (decoders) or held-out accuracy and KL
    (classifiers), parameters, block FLOPs, latency, size."""
    _require_pruned(session)
    eval_tokens = int(eval_tokens)
    with DEVICE_LOCK:
        _check_cancel(cancel_event)
        outcome = ensure_pruned(session, cancel_event)
        seq = outcome.config.flops_seq_len
        key = (eval_tokens, seq)
        if session.dense_metrics.get("key") != key:   # the dense side, once per evaluation size
            base = _baseline(session, eval_tokens)
            session.dense_metrics = {"key": key, "baseline": base,
                                     "before": {**base.quality, **core_measure.model_metrics(session.model, seq)}}
        _check_cancel(cancel_event)
        after = {**core_measure.quality(outcome.pruned, session.dense_metrics["baseline"], dense=session.model),
                 **core_measure.model_metrics(outcome.pruned, seq)}
    before = session.dense_metrics["before"]
    # into the measured outcome's own report, even if a re-budget replaced it since
    core_measure.record(outcome.report, before, after, eval_tokens)
    rows = core_measure.before_after_rows(before, after, eval_tokens, seq,
                                          len(session.held_out) if session.held_out is not None else None)
    return Reply(True, core_measure.headline(before, after, eval_tokens), {"rows": rows, "before": before, "after": after})


@guarded
def generate(session: Session, prompt: str, max_new_tokens: int = 40) -> Reply:
    """The same prompt continued greedily by the dense and the pruned decoder."""
    _require_pruned(session)
    n = core_measure.check_generation(session.model, prompt, max_new_tokens)
    with DEVICE_LOCK:
        before = core_measure.greedy_continuation(session.model, session.tokenizer, prompt, n)
        after = core_measure.greedy_continuation(ensure_pruned(session).pruned, session.tokenizer, prompt, n)
    return Reply(True, "Generated with greedy decoding.", {"before": before, "after": after})


@guarded
def compare(session: Session, sparsity: float, budget_kind: str = "params", uniform: bool = False,
            eval_tokens: int = QUICK_EVAL_TOKENS, methods=COMPARE_METHODS,
            progress: ProgressFn | None = None, cancel_event: threading.Event | None = None) -> Reply:
    """Every chosen method (STAT, the published peers, the simple baselines; see
    ``stat_core.methods``) at the same budget from the same cached calibration."""
    _require_calibration(session)
    methods = list(methods or ())
    if not methods:
        raise ValueError("Pick at least one method to compare.")
    for name in methods:
        get_method(name).check_applicable(session.model)  # one sentence before any work
    configs = [make_config(session, sparsity, budget_kind, uniform, "one-shot", name) for name in methods]
    with DEVICE_LOCK:
        base = _baseline(session, int(eval_tokens))
        results = core_measure.compare_methods(session.model, session.calibration, session.calib_data, configs, base,
                                               session.model_name, session.calib_info,
                                               core_progress(progress, cancel_event))
    dense, metric = base.quality, ("accuracy" if session.encoder else "perplexity")
    rows = core_measure.compare_rows(results, dense, metric, method_label)
    label, sentence = core_measure.compare_summary(dense, metric, int(eval_tokens), len(methods))
    return Reply(True, sentence, {"rows": rows, "headers": ["method", "removed", label, "vs dense"], "results": results,
                  "dense": dense, "metric": metric})


# --- export --------------------------------------------------------------------------------------

@guarded
def export(session: Session, fmt: str = "safetensors (transformers)",
           cancel_event: threading.Event | None = None) -> Reply:
    """Write the pruned model in ``fmt`` (a key of :data:`EXPORT_CHOICES` or a plain format name) with
    ``stat_core.export.export_zip``, and its report beside the zip. Cancel stops it between steps (and
    between files of the zip) and leaves nothing half-written."""
    from stat_core.export import check_format, export_name, export_zip

    _require_pruned(session)
    fmt, gguf_type = EXPORT_CHOICES.get(fmt, (fmt, None))
    check_format(session.model, fmt, session.tokenizer)  # one sentence before the surgery, not after
    with DEVICE_LOCK:
        _check_cancel(cancel_event)
        outcome = ensure_pruned(session, cancel_event)   # plan, report and weights of one and the same prune
        _check_cancel(cancel_event)
        name = export_name(session.model_name, outcome.config.method, outcome.config.sparsity, fmt, gguf_type)
        info, zip_path = export_zip(outcome.pruned, session.tokenizer, session.workdir, name, fmt, plan=outcome.plan,
                                    report=outcome.report, gguf_type=gguf_type or "f16",
                                    check=lambda: _check_cancel(cancel_event))
        for old in session.workdir.glob("*.zip"):  # one export per session on disk (Gradio serves its own copy),
            if old != zip_path:                    # the previous one removed only once this one is complete
                old.unlink(missing_ok=True)
    report_path = session.workdir / f"{name}-pruning_report.json"
    report_path.write_text(json.dumps(outcome.report, indent=1, default=str))
    size = getattr(info, "size_bytes", None)
    size_txt = f"{size / 1e6:.1f} MB model" if size else "model"
    return Reply(True, f"Exported a {size_txt} to {Path(getattr(info, 'path', name)).name}.zip "
                       f"({zip_path.stat().st_size / 1e6:.1f} MB).",
                 {"zip": str(zip_path), "report": str(report_path), "files": list(getattr(info, "files", ()))})


# --- explanations ---------------------------------------------------------------------------------

def plan_explanations(session: Session) -> dict:
    """What the inspect views draw beside the plan: per-layer spectra with the plan's cuts, neuron
    output energies and massive neurons (computed once per calibration, then only re-marked)."""
    outcome, calibration = session.outcome, session.calibration
    if outcome is None or calibration is None:
        return {}
    importance = explain.calibration_neuron_importance(session.model, calibration)
    return {"spectra": explain.plan_spectra(session.model, calibration, outcome.plan),
            "importance": importance, "massive": [explain.massive_units(e) for e in importance]}


@guarded
def head_view(session: Session, layer, head, text: str) -> Reply:
    """The head explorer: one head's attention pattern on ``text`` (dense model), its rank, the
    layer's predicted damage, whether it was kept and, if removed, how much of its output the kept
    heads reconstruct."""
    _require_pruned(session)
    outcome = session.outcome
    try:
        layer, head = int(layer), int(head)
    except (TypeError, ValueError):
        raise ValueError("Pick a layer and a head by number (e.g. layer 3, head 0).") from None
    n_layers = len(outcome.plan.layers)
    if not 0 <= layer < n_layers:
        raise ValueError(f"The model has layers 0–{n_layers - 1}; pick one of those.")
    details = explain.head_details(session.model, session.calibration, outcome.plan, layer, head)
    with DEVICE_LOCK:
        pattern = explain.attention_pattern(session.model, session.tokenizer, text, layer, head)
    return Reply(True, explain.head_sentence(details), {"pattern": pattern, "details": details})


def cancel(session: Session) -> Reply:
    session.cancel()
    return Reply(True, "Cancelling after the current layer…")
