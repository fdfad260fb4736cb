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

import copy
import functools
import hashlib
import logging
import shutil
import statistics
import threading
import time
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from stat_core import prune as core_prune
from stat_core.adapters import UnsupportedModelError, get_adapter
from stat_core import explain
from stat_core.calibrate import CalibrationSet
from stat_core.classifier import accuracy
from stat_core.calibration_mix import SOURCES as CALIBRATION_SOURCES, default_source
from stat_core.data import DataError, check_calibration_sizes, fingerprint
from stat_core.evaluate import count_parameters, evaluation_windows, perplexity
from stat_core.labelled import BUILTIN_SETS
from stat_core.methods import get_method, method_names
from stat_core.models import DEMO_MODELS, ModelLoadError, is_encoder, load_model
from stat_core.pipeline import calibration_data
from stat_core.prune import PruneConfig
from stat_core.report import plan_sizes, prune_report, set_after_sizes, size_summary

from .sessions import Cancelled, Outcome, Session

log = logging.getLogger("stat_app")

DEVICE_LOCK = threading.RLock()
QUICK_EVAL_TOKENS = 2048          # quick perplexity: 4 windows of 512 (the full protocol uses 16,384)
# Every method comes from the registry; Compare runs these by default (the plan-based ones: each
# is cut from the cached calibration in seconds; SliceGPT needs its own pass and is opt-in).
COMPARE_METHODS = tuple(m for m in method_names() if not get_method(m).whole_model)


def method_label(name: str) -> str:
    m = get_method(name)
    return f"{m.label} — {m.summary}"


def plan_method_choices() -> list[tuple[str, str]]:
    """(label, name) of the methods that produce a head/neuron plan (the main Prune step)."""
    return [(get_method(m).label, m) for m in method_names() if not get_method(m).whole_model]


def method_choices() -> list[tuple[str, str]]:
    """(label, name) of every registered method (Compare says in one sentence if one cannot apply)."""
    return [(get_method(m).label, m) for m in method_names()]
DECODER_SOURCES = CALIBRATION_SOURCES  # mix, wikipedia, self-generated (stat_core.calibration_mix)
ENCODER_SOURCES = tuple(BUILTIN_SETS)
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
        try:
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

def architecture(model) -> dict:
    adapter = get_adapter(model)
    shapes = [adapter.layer_shape(i) for i in range(adapter.num_layers)]
    first = shapes[0]
    p = next(model.parameters())
    return {"family": str(model.config.model_type), "kind": "decoder" if adapter.is_decoder else "classifier",
            "layers": adapter.num_layers, "hidden": adapter.hidden_size,
            "heads": first.num_heads, "kv_heads": first.num_kv_heads, "head_dim": adapter.head_dim,
            "mlp_width": first.intermediate_size, "parameters": count_parameters(model),
            "device": str(p.device), "dtype": str(p.dtype).replace("torch.", "")}


@guarded
def load(session: Session, source: str, name: str, device: str = "auto", dtype: str = "float32") -> Reply:
    """Load a demo model, a local folder or a hub id into the session (replacing what it held)."""
    name = (name or "").strip()
    if source == "demo":
        if name not in DEMO_MODELS:
            raise ModelLoadError(f"Unknown demo model '{name}'; demo models: {', '.join(DEMO_MODELS)}.")
    elif source == "folder":
        if not name:
            raise ModelLoadError("Give the path of a local model folder.")
        path = Path(name).expanduser()
        if not path.exists():
            raise ModelLoadError(f"Folder '{name}' does not exist.")
        if not path.is_dir():
            raise ModelLoadError(f"'{name}' is a file, not a model folder.")
        name = str(path)
    elif source == "hub":
        if not name or name.count("/") > 1 or name.startswith((".", "/", "~")):
            raise ModelLoadError("Give a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'.")
    else:
        raise ValueError(f"Unknown model source '{source}'; use demo, folder or hub.")
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


def architecture_markdown(arch: dict) -> str:
    if not arch:
        return "*No model loaded.*"
    rows = [("family", arch["family"]), ("kind", arch["kind"]), ("layers", arch["layers"]),
            ("hidden size", arch["hidden"]),
            ("attention heads / KV heads", f"{arch['heads']} / {arch['kv_heads']} (head dim {arch['head_dim']})"),
            ("MLP width", arch["mlp_width"]), ("parameters", f"{arch['parameters']:,}"),
            ("device / dtype", f"{arch['device']} / {arch['dtype']}")]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


# --- calibration data ----------------------------------------------------------------------------

def _file_identity(path: str | None) -> tuple:
    if not path:
        return ()
    p = Path(path)
    return (str(p), p.stat().st_size, p.stat().st_mtime) if p.exists() else (str(p),)


def build_calibration_data(session: Session, source: str, builtin: str, file_path: str | None, pasted: str,
                           num_samples: int, seq_len: int, seed: int = 0, progress: ProgressFn | None = None):
    """``(data, held_out, info, warning)`` for the session's model, by the pipeline the CLI uses
    (:func:`stat_core.pipeline.calibration_data`). Raises DataError / ValueError with a readable message."""
    prepared = calibration_data(session.model, session.tokenizer, session.model_name, source, builtin, file_path,
                                pasted, num_samples, seq_len, seed, progress=progress)
    warning = " ".join(f"Warning: {w}" for w in prepared.warnings)
    return prepared.data, prepared.held_out, prepared.info, warning


def _calibration_key(session, source, builtin, file_path, pasted, num_samples, seq_len, seed) -> tuple:
    text_hash = hashlib.sha256((pasted or "").encode()).hexdigest()[:16] if source == "pasted" else ""
    return (session.model_name, source, builtin if source == "builtin" else "", _file_identity(file_path)
            if source == "file" else (), text_hash, int(num_samples), int(seq_len), int(seed))


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
        data, held, info, warning = build_calibration_data(session, source, builtin, file_path, pasted,
                                                           num_samples, seq_len, seed, progress)
    size_warning = core_prune.calibration_size_warning(session.model, info["tokens"])
    if size_warning:
        warning = f"{warning} Warning: {size_warning}".strip()
    with DEVICE_LOCK:
        _check_cancel(cancel_event)
        t = time.perf_counter()
        calib = core_prune.calibrate(session.model, data, PruneConfig(sparsity=0.0),
                                     core_progress(progress, cancel_event))
        # the inspect views' singular values, once per calibration (re-budgets only move the cut)
        t_sp = time.perf_counter()
        core_progress(progress, cancel_event)("spectra", 0, 1)
        explain.calibration_spectra(session.model, calib)
        calib.timings["spectra"] = time.perf_counter() - t_sp
        seconds = time.perf_counter() - t
    info["fingerprint"] = fingerprint(session.model_name, CalibrationSet.wrap(data).input_ids)
    session.calibration, session.calib_data, session.held_out = calib, data, held
    session.calib_key, session.calib_info, session.calib_warning = key, info, warning
    session.clear_results()
    msg = f"Calibrated on {info['tokens']:,} tokens in {seconds:.1f} s."
    return Reply(True, (warning + " " + msg) if warning else msg,
                 {"cached": False, "warning": warning, "seconds": seconds, "timings": calib.timings})


# --- pruning -------------------------------------------------------------------------------------

def _flops_seq_len(session: Session) -> int:
    data = session.calib_data
    if session.encoder and isinstance(data, CalibrationSet) and data.attention_mask is not None:
        return max(1, round(float(data.attention_mask.sum()) / len(data)))
    return 512


def make_config(session: Session, sparsity: float, budget_kind: str = "params", uniform: bool = False,
                mode: str = "one-shot", method: str = "stat") -> PruneConfig:
    try:
        sparsity = float(sparsity)
    except (TypeError, ValueError):
        raise ValueError(f"The sparsity must be a number such as 0.3 (or 30 for percent), got {sparsity!r}.") from None
    if sparsity > 1.0:  # accept percentages
        sparsity /= 100.0
    return PruneConfig(sparsity=sparsity, budget_kind=budget_kind, flops_seq_len=_flops_seq_len(session),
                       method=method, mode=mode, uniform=bool(uniform))


def prune_copy(session: Session, config: PruneConfig, progress: ProgressFn | None = None,
               cancel_event: threading.Event | None = None, plan=None):
    """A pruned deep copy of the session's dense model and its plan (the dense model is never
    touched). One-shot re-plans from the cached calibration (or applies ``plan``); propagate
    re-calibrates every layer on the pruned ones."""
    _require_calibration(session)
    if config.mode == "one-shot":
        if plan is None:  # plan first: an impossible budget fails before any copying
            plan = core_prune.plan_pruning(session.model, session.calibration, config, session.model_name,
                                           session.calib_info, data=session.calib_data)
        _check_cancel(cancel_event)
        pruned = copy.deepcopy(session.model)
        core_prune.apply_plan_(pruned, plan, session.calibration.dense_stats)
        return pruned, plan
    pruned = copy.deepcopy(session.model)
    result = core_prune.stat_prune_(pruned, session.calib_data, config, session.model_name,
                                    core_progress(progress, cancel_event), session.calib_info)
    return pruned, result.plan


def _report(session: Session, config: PruneConfig, plan, after: dict, seconds: float) -> dict:
    """The shared report (:func:`stat_core.report.prune_report`) plus what only the app shows."""
    return prune_report(session.model_name, session.model, config, session.calib_info,
                        size_summary(session.model, config.flops_seq_len), after, plan=plan, seconds_plan=seconds,
                        calibration_timings=getattr(session.calibration, "timings", {}))


def _removed_message(report: dict, config: PruneConfig, verb: str, seconds: float) -> str:
    what = "parameters" if config.budget_kind == "params" else "FLOPs"
    removed = report["block_params_removed_fraction" if config.budget_kind == "params" else "block_flops_removed_fraction"]
    return (f"{verb} {removed:.1%} of the block {what} ({config.method}, {config.mode}"
            f"{', uniform' if config.uniform else ''}) in {seconds:.1f} s.")


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
    seq = config.flops_seq_len
    report = _report(session, config, plan, plan_sizes(session.model, plan, seq), seconds)
    session.set_outcome(Outcome(plan, config, report))
    return Reply(True, _removed_message(report, config, "Planned to remove", seconds) +
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
        seq = config.flops_seq_len
        report = _report(session, config, plan, size_summary(pruned, seq), seconds)
    report["seconds_prune"] = seconds
    session.set_outcome(Outcome(plan, config, report, pruned))
    return Reply(True, _removed_message(report, config, "Removed", seconds), {"plan": plan, "report": report,
                                                                               "seconds": seconds})


@guarded
def calibrate_and_prune(session: Session, calib_kwargs: dict, prune_kwargs: dict,
                        progress: ProgressFn | None = None, cancel_event: threading.Event | None = None) -> Reply:
    """The app's main button: calibrate if the text or sizes changed, then prune."""
    mode = prune_kwargs.get("mode", "one-shot")
    _require_model(session)
    if prune_kwargs.get("budget_kind", "params") == "params":  # FLOPs bounds of encoders need the text's length
        config = make_config(session, prune_kwargs.get("sparsity", 0.0), "params", prune_kwargs.get("uniform", False))
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


# --- measurements --------------------------------------------------------------------------------

@torch.no_grad()
def latency_ms(model, tokenizer, n_tokens: int = 128, repeats: int = 3) -> float:
    """Median wall time of one forward pass over ``n_tokens`` tokens (batch 1)."""
    device = next(model.parameters()).device
    vocab = min(getattr(model.config, "vocab_size", 1000), 1000)
    ids = torch.randint(3, max(vocab, 4), (1, n_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not is_encoder(model):
        kwargs["use_cache"] = False
    model(**kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(**kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def _quality(session: Session, model, eval_tokens: int) -> dict:
    if session.encoder:
        if session.held_out is None:
            return {}
        return {"accuracy": accuracy(model, session.held_out)}
    window = min(512, max(16, eval_tokens // 2))
    windows = evaluation_windows(session.tokenizer, n_tokens=eval_tokens, window=window)
    return {"perplexity": perplexity(model, windows)}


def _metrics(session: Session, model, eval_tokens: int, seq: int) -> dict:
    m = _quality(session, model, eval_tokens)
    m.update(size_summary(model, seq))
    m["latency_ms"] = latency_ms(model, session.tokenizer)
    return m


def _fmt_change(before, after) -> str:
    if before in (None, 0) or after is None:
        return ""
    return f"{after / before:.2f}×"


@guarded
def measure(session: Session, eval_tokens: int = QUICK_EVAL_TOKENS, cancel_event: threading.Event | None = None) -> Reply:
    """Before/after table: quick perplexity (decoders) or held-out accuracy (classifiers), parameters,
    block FLOPs, latency, size."""
    _require_pruned(session)
    with DEVICE_LOCK:
        _check_cancel(cancel_event)
        outcome = ensure_pruned(session, cancel_event)
        seq = outcome.config.flops_seq_len
        key = (int(eval_tokens), seq)
        if session.dense_metrics.get("key") != key:
            session.dense_metrics = {"key": key, **_metrics(session, session.model, int(eval_tokens), seq)}
        _check_cancel(cancel_event)
        after = _metrics(session, outcome.pruned, int(eval_tokens), seq)
    before = session.dense_metrics
    rows = []
    if "perplexity" in after:
        rows.append([f"perplexity (quick: {int(eval_tokens):,} eval tokens)", f"{before['perplexity']:.2f}",
                     f"{after['perplexity']:.2f}", _fmt_change(before["perplexity"], after["perplexity"])])
    if "accuracy" in after:
        rows.append([f"held-out accuracy ({len(session.held_out)} examples)", f"{before['accuracy']:.1%}",
                     f"{after['accuracy']:.1%}", f"{100 * (after['accuracy'] - before['accuracy']):+.1f} pt"])
    rows += [
        ["parameters (all)", f"{before['params']:,}", f"{after['params']:,}", _fmt_change(before["params"], after["params"])],
        ["block parameters", f"{before['block_params']:,}", f"{after['block_params']:,}",
         _fmt_change(before["block_params"], after["block_params"])],
        [f"block FLOPs / token (MACs, seq {seq})", f"{before['block_macs_per_token']:,}",
         f"{after['block_macs_per_token']:,}", _fmt_change(before["block_macs_per_token"], after["block_macs_per_token"])],
        ["latency, 1×128 tokens (ms)", f"{before['latency_ms']:.1f}", f"{after['latency_ms']:.1f}",
         _fmt_change(before["latency_ms"], after["latency_ms"])],
        ["size (MB, weights in memory)", f"{before['bytes'] / 1e6:.1f}", f"{after['bytes'] / 1e6:.1f}",
         _fmt_change(before["bytes"], after["bytes"])],
    ]
    for k in ("perplexity", "accuracy", "latency_ms"):
        if k in after:   # into the measured outcome's own report, even if a re-budget replaced it since
            outcome.report[f"{k}_before"], outcome.report[f"{k}_after"] = before[k], after[k]
    if "perplexity" in after:
        outcome.report["perplexity_eval_tokens"] = int(eval_tokens)
    head = (f"Perplexity {before['perplexity']:.2f} → {after['perplexity']:.2f} (quick estimate on "
            f"{int(eval_tokens):,} tokens)." if "perplexity" in after else
            f"Held-out accuracy {before.get('accuracy', 0):.1%} → {after.get('accuracy', 0):.1%}.")
    return Reply(True, head, {"rows": rows, "before": before, "after": after})


METRIC_HEADERS = ["metric", "before", "after", "after ÷ before"]


@torch.no_grad()
def _generate_text(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=int(max_new_tokens), do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


@guarded
def generate(session: Session, prompt: str, max_new_tokens: int = 40) -> Reply:
    """The same prompt continued greedily by the dense and the pruned decoder."""
    _require_pruned(session)
    if session.encoder:
        raise ValueError("Generation is for decoders; a classifier is compared by accuracy.")
    if not (prompt or "").strip():
        raise ValueError("Type a prompt first.")
    if not 1 <= int(max_new_tokens) <= 512:
        raise ValueError("Generate between 1 and 512 new tokens.")
    with DEVICE_LOCK:
        before = _generate_text(session.model, session.tokenizer, prompt, max_new_tokens)
        after = _generate_text(ensure_pruned(session).pruned, session.tokenizer, prompt, max_new_tokens)
    return Reply(True, "Generated with greedy decoding.", {"before": before, "after": after})


# --- comparison of methods -----------------------------------------------------------------------

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
    rows, results = [], []
    with DEVICE_LOCK:
        seq = _flops_seq_len(session)
        dense = _quality(session, session.model, int(eval_tokens))
        for i, name in enumerate(methods):
            _check_cancel(cancel_event)
            if progress is not None:
                progress("compare", i, len(methods))
            config = make_config(session, sparsity, budget_kind, uniform, "one-shot", name)
            if get_method(name).whole_model:
                pruned = copy.deepcopy(session.model)
                info = core_prune.stat_prune_(pruned, session.calib_data, config, session.model_name).info
                achieved, block_params = info["removed_fraction"], info["block_params_after"]
            else:
                pruned, plan = prune_copy(session, config, None, cancel_event)
                achieved, block_params = plan.budget["achieved"], size_summary(pruned, seq)["block_params"]
            q = _quality(session, pruned, int(eval_tokens))
            results.append({"method": name, **q, "achieved": achieved, "block_params": block_params})
            del pruned
        if progress is not None:
            progress("compare", len(methods), len(methods))
    metric = "perplexity" if not session.encoder else "accuracy"
    for r in results:
        value = r.get(metric)
        rel = (f"{value / dense[metric]:.2f}× dense" if metric == "perplexity" else
               f"{100 * (value - dense[metric]):+.1f} pt") if value is not None and dense else ""
        rows.append([method_label(r["method"]), f"{r['achieved']:.1%}",
                     (f"{value:.2f}" if metric == "perplexity" else f"{value:.1%}") if value is not None else "n/a", rel])
    label = f"quick perplexity ({int(eval_tokens):,} tokens)" if metric == "perplexity" else "held-out accuracy"
    dense_txt = (f"{dense[metric]:.2f}" if metric == "perplexity" else f"{dense[metric]:.1%}") if dense else "n/a"
    return Reply(True, f"Dense {label}: {dense_txt}. Same budget, same calibration, {len(methods)} methods.",
                 {"rows": rows, "headers": ["method", "removed", label, "vs dense"], "results": results,
                  "dense": dense, "metric": metric})


# --- export --------------------------------------------------------------------------------------

def _zip_folder(folder: Path, zip_path: Path, cancel_event: threading.Event | None = None) -> Path:
    """Zip ``folder`` (weights stored as is: they barely compress and deflating them is slow); a
    cancel between files leaves no partial zip behind."""
    tmp = zip_path.with_suffix(".zip.part")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for f in sorted(folder.rglob("*")):
                _check_cancel(cancel_event)
                if f.is_file():
                    method = zipfile.ZIP_STORED if f.suffix in (".safetensors", ".bin") else zipfile.ZIP_DEFLATED
                    zf.write(f, f"{folder.name}/{f.relative_to(folder)}", compress_type=method)
        tmp.replace(zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    return zip_path


#: The app's export formats: label → (stat_core.export format, GGUF weight type).
EXPORT_CHOICES = {
    "safetensors (transformers)": ("safetensors", None),
    "GGUF float16 (llama.cpp)": ("gguf", "f16"),
    "GGUF Q8_0 (llama.cpp, 8-bit)": ("gguf", "q8_0"),
    "ONNX (onnxruntime)": ("onnx", None),
}


@guarded
def export(session: Session, fmt: str = "safetensors (transformers)",
           cancel_event: threading.Event | None = None) -> Reply:
    """Write the pruned model in ``fmt`` (a key of :data:`EXPORT_CHOICES` or a plain format name) with
    ``stat_core.export.export_model``, zip the folder, and write its report. Cancel stops it between
    steps (and between files of the zip) and leaves nothing half-written."""
    import json

    from stat_core.export import check_format, export_model

    _require_pruned(session)
    if fmt in EXPORT_CHOICES:
        fmt, gguf_type = EXPORT_CHOICES[fmt]
    else:
        gguf_type = None
    check_format(session.model, fmt, session.tokenizer)  # one sentence before the surgery, not after
    with DEVICE_LOCK:
        _check_cancel(cancel_event)
        outcome = ensure_pruned(session, cancel_event)   # plan, report and weights of one and the same prune
        _check_cancel(cancel_event)
        pct = round(100 * outcome.config.sparsity)
        base = Path(str(session.model_name)).name.replace(" ", "_") or "model"
        stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{uuid.uuid4().hex[:4]}"
        name = f"{base}-{outcome.config.method}-{pct}pct-{fmt}{'-' + gguf_type if gguf_type else ''}-{stamp}"
        out_dir = session.workdir / name
        try:
            info = export_model(outcome.pruned, session.tokenizer, out_dir, fmt, plan=outcome.plan,
                                report=outcome.report, overwrite=False, gguf_type=gguf_type or "f16")
            folder = Path(getattr(info, "path", out_dir))
            _check_cancel(cancel_event)
            zip_path = _zip_folder(folder, session.workdir / f"{name}.zip", cancel_event)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)  # the zip is what gets served; keep one copy on disk
        for old in session.workdir.glob("*.zip"):  # one export per session on disk (Gradio serves its own copy),
            if old != zip_path:                    # the previous one removed only once this one is complete
                old.unlink(missing_ok=True)
    report_path = session.workdir / f"{name}-pruning_report.json"
    report_path.write_text(json.dumps(outcome.report, indent=1, default=str))
    size = getattr(info, "size_bytes", None)
    size_txt = f"{size / 1e6:.1f} MB model" if size else "model"
    return Reply(True, f"Exported a {size_txt} to {folder.name}.zip ({zip_path.stat().st_size / 1e6:.1f} MB).",
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
    if details["kept"]:
        fate = "kept"
    else:
        fate = (f"removed; the kept heads of this layer reconstruct {details['reconstructed_share']:.0%} of its "
                "output (that part is folded into the output projection by the correction)")
    damage = details["layer_damage"]
    msg = (f"Layer {layer}, head {head} (KV group {details['kv_group']}): importance rank {details['rank']} of "
           f"{details['num_heads']}, {details['output_energy_share']:.0%} of the layer's attention output energy; "
           f"{fate}. The layer keeps {details['kept_heads']}/{details['num_heads']} heads"
           + (f", predicted damage {damage:.3g}." if damage is not None else "."))
    return Reply(True, msg, {"pattern": pattern, "details": details})


def cancel(session: Session) -> Reply:
    session.cancel()
    return Reply(True, "Cancelling after the current layer…")
