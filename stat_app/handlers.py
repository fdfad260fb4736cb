"""Plain functions behind the app's buttons (testable without Gradio or a browser).

Every public handler takes a :class:`~stat_app.sessions.Session` plus plain values and returns a
:class:`~stat_app.replies.Reply`; none lets an exception escape (:func:`~stat_app.replies.guarded`).
Expected problems (missing folder, unsupported architecture, too little text, impossible budget,
cancellation) come back as ``Reply(ok=False, message=...)`` with one readable sentence from
``stat_core``; anything unexpected is logged with its traceback on the server and reported as one line.

The work itself is ``stat_core``'s, the same functions the CLI calls (:mod:`stat_core.pipeline` for
data, configs, pruned copies, recovery and reports, :mod:`stat_core.evaluation.measure`, :mod:`stat_core.methods.stat.explain`,
:mod:`stat_core.export.hf`); a handler reads its arguments, keeps the session's state, reports progress
and honours Cancel. Heavy work (loading, calibration, pruning, measuring, export) holds
:data:`DEVICE_LOCK`, so one job at a time uses the device whatever the number of users; Gradio's
queue also runs those events with ``concurrency_limit=1``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

from stat_app.access import ModelAccess
from stat_app.choices import (  # noqa: F401 (re-exported)
    COMPARE_METHODS,
    DECODER_SOURCES,
    SAME_TEXT,
    SENSITIVITY_LABELS,
    ENCODER_SOURCES,
    EXPORT_CHOICES,
    architecture_markdown,
    method_choices,
    method_label,
    plan_method_choices,
)
from stat_app.replies import (  # noqa: F401
    DEVICE_LOCK,
    EXPECTED,
    ProgressFn,
    Reply,
    check_cancel,
    core_progress,
    guarded,
    require_calibration,
    require_model,
    require_pruned,
)
from stat_app.sessions import Cancelled, Outcome, Session
from stat_core import pipeline
from stat_core.adapters.registry import is_encoder
from stat_core.config import PruneConfig
from stat_core.data.mix import default_source  # noqa: F401 (the app's default source)
from stat_core.calibration.sizes import statistics_memory_problem
from stat_core.calibration import cache as calibration_cache
from stat_core.data.sources import check_calibration_sizes
from stat_core.evaluation import measure as core_measure
from stat_core.evaluation.html_report import write_report_html
from stat_core.evaluation.measure import METRIC_HEADERS, QUICK_EVAL_TOKENS  # noqa: F401 (the app's table, default)
from stat_core.evaluation.perplexity import evaluation_windows
from stat_core.evaluation.report import architecture_summary as architecture
from stat_core.evaluation.report import recovery_sentence, removed_sentence
from stat_core.evaluation.suite import SuiteConfig, build_reference
from stat_core.export.api import check_format, export_zip_with_report
from stat_core.methods.registry import get_method
from stat_core.methods.settings import (  # noqa: F401 (the app's settings box and controls)
    setting_choices,
    setting_fields,
    setting_kind,
    settings_from_text,
    settings_help,
    settings_text,
)
from stat_core.methods.stat import explain, lesson as core_lesson
from stat_core.models import DEMO_MODELS, demo_model_installed, download_hub_model, load_model, prepare_demo_model
from stat_core.recover import RecoveryCancelled

# --- load ----------------------------------------------------------------------------------------

@guarded
def load(session: Session, source: str, name: str, device: str = "auto", dtype: str = "float32",
         access: ModelAccess | None = None, progress: ProgressFn | None = None) -> Reply:
    """Load a demo model, a local folder or a hub id into the session (replacing what it held).
    ``access`` (a shared app's :class:`~stat_app.access.ModelAccess`) refuses sources and folders the
    operator did not allow, before anything is read. A hub model is downloaded first, without the
    device lock (other users' jobs go on meanwhile), then loaded from its local copy."""
    if access is not None:
        name = access.check(source, name)
    name = pipeline.model_reference(source, name)
    t = time.perf_counter()
    folder = str(download_hub_model(name)) if source == "hub" else name
    if source == "demo" and DEMO_MODELS[name].get("on_request") and not demo_model_installed(name):
        prepare_demo_model(name, progress)  # a real model installed on first use: download + convert, once
    with DEVICE_LOCK:
        model, tokenizer = load_model(folder, device=device, dtype=dtype)
        seconds = time.perf_counter() - t
        session.clear_model()
        session.model, session.tokenizer, session.model_name = model, tokenizer, name
        session.encoder = is_encoder(model)
        session.arch = architecture(model)
    a = session.arch
    return Reply(True, f"Loaded {name} ({a['family']}, {a['layers']} layers, {a['parameters'] / 1e6:.1f}M parameters) "
                       f"on {a['device']} in {seconds:.1f} s.", {"arch": a, "seconds": seconds})


# --- calibration ---------------------------------------------------------------------------------

@guarded
def calibrate(session: Session, source: str = "builtin", builtin: str = "wikipedia", file_path: str | None = None,
              pasted: str = "", num_samples: int = 64, seq_len: int = 512, seed: int = 0,
              progress: ProgressFn | None = None, cancel_event: threading.Event | None = None,
              force: bool = False, sensitivity_labels: str = "data", correct_on: str = SAME_TEXT) -> Reply:
    """Collect dense statistics once (the expensive step); re-budgeting later reuses them.
    ``sensitivity_labels``: ``"data"`` or ``"model"`` (the gradient pass on the model's own
    distribution); ``correct_on``: a built-in decoder text whose statistics every correction is
    fitted on (units are still chosen on this text), or :data:`SAME_TEXT`."""
    require_model(session)
    calibration_cache.check_settings()  # a bad STAT_CALIBRATION_CACHE_GB: one sentence before any work
    if sensitivity_labels not in SENSITIVITY_LABELS:
        raise ValueError(f"Sensitivity labels are one of {', '.join(SENSITIVITY_LABELS)}, not '{sensitivity_labels}'.")
    correct_on = correct_on or SAME_TEXT
    if correct_on not in (SAME_TEXT, *DECODER_SOURCES):
        raise ValueError(f"Corrections can be fitted on {', '.join(DECODER_SOURCES)} or {SAME_TEXT}, "
                         f"not '{correct_on}'.")
    num_samples, seq_len = check_calibration_sizes(session.model, num_samples, seq_len,
                                                   None if session.encoder else session.tokenizer)
    problem = statistics_memory_problem(session.model, n_tokens=0 if session.encoder else num_samples * seq_len)
    if problem:
        raise ValueError(problem.replace("with --offload", "with the command line's --offload"))
    key = pipeline.calibration_request_key(session.model_name, source, builtin, file_path, pasted, num_samples,
                                           seq_len, seed, sensitivity_labels, correct_on)
    if not force and session.calibration is not None and session.calib_key == key:
        return Reply(True, "Calibration statistics for this text are cached; nothing to recompute.",
                     {"cached": True, "warning": session.calib_warning})
    with DEVICE_LOCK:  # a self-generated source runs the model
        prepared = pipeline.calibration_data(session.model, session.tokenizer, session.model_name, source, builtin,
                                             file_path, pasted, num_samples, seq_len, seed, progress=progress)
        warning = " ".join(f"Warning: {w}" for w in prepared.warnings)
        check_cancel(cancel_event)
        t = time.perf_counter()
        correction = None
        if correct_on != SAME_TEXT:  # the second text, as the CLI's --correct-on builds it
            correction, prepared.info = pipeline.correction_data(session.model, session.tokenizer, session.model_name,
                                                                 correct_on, prepared.info, num_samples, seq_len, seed,
                                                                 progress)
        calib = pipeline.calibrate_statistics(session.model, prepared.data, core_progress(progress, cancel_event),
                                              sensitivity_labels=sensitivity_labels,
                                              correction_data=None if correction is None else correction.data)
        seconds = time.perf_counter() - t
    session.calibration, session.calib_data, session.held_out = calib, prepared.data, prepared.held_out
    session.calib_key, session.calib_info, session.calib_warning = key, prepared.info, warning
    session.clear_results()
    on_disk = calib.extras.get("disk_cache", {}).get("hit", False)  # computed before: read from the cache
    msg = (f"Read the statistics of these {prepared.info['tokens']:,} tokens from the calibration cache in "
           f"{seconds:.1f} s." if on_disk else f"Calibrated on {prepared.info['tokens']:,} tokens in {seconds:.1f} s.")
    if correct_on != SAME_TEXT:
        msg = msg[:-1] + f"; corrections are fitted on {correct_on}."
    return Reply(True, (warning + " " + msg) if warning else msg,
                 {"cached": False, "disk_cache": on_disk, "warning": warning, "seconds": seconds,
                  "timings": calib.timings})


# --- pruning -------------------------------------------------------------------------------------

def make_config(session: Session, sparsity: float, budget_kind: str = "params", uniform: bool = False,
                mode: str = "one-shot", method: str = "stat", settings: str | None = None) -> PruneConfig:
    """``settings``: the method's own, as ``name=value`` text (the app's method-settings box)."""
    return pipeline.prune_config(session.model, session.calib_data, sparsity, budget_kind, uniform, mode, method,
                                 settings=settings_from_text(method, settings))


def _install_plan(session: Session, config: PruneConfig, progress: ProgressFn | None = None) -> tuple:
    """A one-shot plan of ``config`` from the session's cached statistics, installed as its outcome
    (no pruned copy yet); ``(plan, report)``. ``progress`` (with the request's cancel event): a budget
    search reports through it and stops at Cancel."""
    plan, report = pipeline.plan_with_report(session.model, session.calibration, config, session.model_name,
                                             session.calib_info, session.calib_data, progress=progress)
    session.set_outcome(Outcome(plan, config, report))
    return plan, report


@guarded
def replan(session: Session, sparsity: float, budget_kind: str = "params", uniform: bool = False,
           method: str = "stat", settings: str | None = None) -> Reply:
    """Re-budget from the cached statistics: a new one-shot plan in well under a second, no
    calibration and no surgery (the pruned copy is built when something needs it). A budget search
    in the settings is left out here (it takes minutes): Prune runs it."""
    require_calibration(session)
    config = make_config(session, sparsity, budget_kind, uniform, "one-shot", method, settings)
    quick, note = get_method(config.method).quick_settings(config.settings)  # what takes minutes waits for Prune
    config = dataclasses.replace(config, settings=quick)
    plan, report = _install_plan(session, config)
    return Reply(True, removed_sentence(report, "Planned to remove", report["seconds_plan"])[:-1] + note +
                 ". The pruned copy is built when you measure, generate or export.",
                 {"plan": plan, "report": report, "seconds": report["seconds_plan"]})


def ensure_pruned(session: Session, cancel_event: threading.Event | None = None) -> Outcome:
    """The session's current :class:`Outcome` with its pruned copy, built (surgery on a deep copy
    of the dense model, for *that* outcome's plan) if it has none yet. Callers use the returned
    outcome's plan, report and model together: a re-budget landing meanwhile installs a new
    outcome and cannot change this one."""
    require_pruned(session)
    outcome = session.outcome
    if outcome.pruned is None:
        outcome.pruned = pipeline.cut_planned(session.model, session.calibration, session.calib_data, outcome.config,
                                              outcome.plan, outcome.report, session.model_name, session.calib_info,
                                              progress=core_progress(None, cancel_event))
    return outcome


def _check_mode_fits(mode: str, corrections_from_another_text: bool) -> None:
    if mode != "one-shot" and corrections_from_another_text:
        raise ValueError(f"{mode.capitalize()} re-fits every correction on the calibration text itself; set 'fit "
                         f"corrections on' to '{SAME_TEXT}' or use one-shot.")


@guarded
def prune(session: Session, sparsity: float, budget_kind: str = "params", uniform: bool = False,
          mode: str = "one-shot", method: str = "stat", recover_steps: int = 0, progress: ProgressFn | None = None,
          cancel_event: threading.Event | None = None, settings: str | None = None, cut: bool = True) -> Reply:
    """Prune a copy of the dense model to ``sparsity``: from cached statistics (one-shot) or with
    layer-by-layer propagation (``mode="propagate"``: a full calibration pass on the copy); then,
    if ``recover_steps`` > 0, distil the copy towards the dense model on the calibration text
    (:func:`stat_core.pipeline.recover`, as ``stat-prune --recover``). A cancelled recovery keeps the
    pruned copy as it was before recovery. ``cut=False`` (one-shot, no recovery): the plan only, its
    copy built later by :func:`cut_copy` or on demand — the app shows the plan's figures first."""
    require_calibration(session)
    steps = pipeline.recovery_steps(recover_steps, limit=pipeline.MAX_APP_RECOVERY_STEPS)
    _check_mode_fits(mode, session.calibration.correction_stats is not None)
    config = make_config(session, sparsity, budget_kind, uniform, mode, method, settings)
    if not cut and mode == "one-shot" and not steps:
        with DEVICE_LOCK:   # a budget search in the settings runs here (the device's work)
            check_cancel(cancel_event)
            plan, report = _install_plan(session, config, core_progress(progress, cancel_event))
        return Reply(True, removed_sentence(report, "Removed", report["seconds_plan"]),
                     {"plan": plan, "report": report, "seconds": report["seconds_plan"]})
    with DEVICE_LOCK:
        check_cancel(cancel_event)
        pruned, plan, report = pipeline.prune_with_report(session.model, session.calibration, session.calib_data,
                                                          config, session.model_name, session.calib_info,
                                                          progress=core_progress(progress, cancel_event))
        outcome = Outcome(plan, config, report, pruned)
        message = removed_sentence(report, "Removed", report["seconds_prune"])
        if steps:
            try:
                pipeline.recover(pruned, session.model, session.calib_data, steps, report,
                                 progress=core_progress(progress, cancel_event), cancel_event=cancel_event)
            except (Cancelled, RecoveryCancelled):
                session.set_outcome(outcome)
                return Reply(False, message[:-1] + "; recovery cancelled, so the pruned model is kept as it was "
                                                   "before recovery.", {"plan": plan, "report": report})
            message += " " + recovery_sentence(report)
    session.set_outcome(outcome)
    return Reply(True, message, {"plan": plan, "report": report, "seconds": report["seconds_prune"]})


@guarded
def cut_copy(session: Session, cancel_event: threading.Event | None = None) -> Reply:
    """Build the pruned copy of the current plan now (surgery on a deep copy of the dense model), so
    measuring, generating and exporting start at once; nothing to do when it exists."""
    outcome = session.outcome
    if outcome is None or outcome.pruned is not None:
        return Reply(True, "", {})
    t = time.perf_counter()
    with DEVICE_LOCK:
        check_cancel(cancel_event)
        ensure_pruned(session, cancel_event)
    return Reply(True, f"The pruned copy is ready (cut in {time.perf_counter() - t:.1f} s).", {})


@guarded
def calibrate_and_prune(session: Session, calib_kwargs: dict, prune_kwargs: dict,
                        progress: ProgressFn | None = None, cancel_event: threading.Event | None = None) -> Reply:
    """The app's main button: calibrate if the text or sizes changed, then prune (and recover)."""
    mode = prune_kwargs.get("mode", "one-shot")
    require_model(session)
    pipeline.check_budget_early(session.model, prune_kwargs.get("sparsity", 0.0),  # before minutes of calibration
                                prune_kwargs.get("budget_kind", "params"), prune_kwargs.get("uniform", False))
    pipeline.recovery_steps(prune_kwargs.get("recover_steps", 0), limit=pipeline.MAX_APP_RECOVERY_STEPS)
    _check_mode_fits(mode, calib_kwargs.get("correct_on", SAME_TEXT) not in (SAME_TEXT, None, ""))
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


def tab_statuses(session: Session | None) -> tuple[str, str, str, str]:
    """The Inspect, Learn, Compare and Export tabs' status lines for the session's current plan, so a
    tab opened after a prune, a re-budget or a new model says what it shows, not what it said before."""
    if session is None or session.plan is None:
        return ("Prune a model, then inspect what went and why.", "Prune a model, pick a layer and press Explain.",
                "Measure the pruned model, or compare methods at the slider's budget.",
                "Prune a model, then export it or write a report.")
    plan = removed_sentence(session.report, "Showing the plan that removes")
    return (f"{plan} Click a square of the heads heatmap to explore that head.",
            f"{plan} Pick a layer and press Explain to follow STAT's steps on it.",
            f"{plan} Measure it, generate side by side, or compare methods at this budget.",
            f"{plan} Export it (the pruned copy is built first if the slider only re-planned) or write a report.")


# --- measurements (stat_core.evaluation.measure) --------------------------------------------------------------

@guarded
def measure(session: Session, eval_tokens: int = QUICK_EVAL_TOKENS, cancel_event: threading.Event | None = None) -> Reply:
    """Before/after table: quick perplexity and KL to dense (decoders) or held-out accuracy and KL
    (classifiers), parameters, block FLOPs, latency, size."""
    require_pruned(session)
    eval_tokens = int(eval_tokens)
    with DEVICE_LOCK:
        check_cancel(cancel_event)
        outcome = ensure_pruned(session, cancel_event)
        seq = outcome.config.flops_seq_len
        if session.dense_metrics.get("key") != (eval_tokens, seq):   # the dense side, once per evaluation size
            base, before = core_measure.dense_side(session.model, session.tokenizer, session.held_out, eval_tokens, seq)
            session.dense_metrics = {"key": (eval_tokens, seq), "baseline": base, "before": before}
        check_cancel(cancel_event)
        after = core_measure.pruned_side(outcome.pruned, session.dense_metrics["baseline"], session.model, seq)
    before = session.dense_metrics["before"]
    # into the measured outcome's own report, even if a re-budget replaced it since
    rows, sentence = core_measure.before_after(outcome.report, before, after, eval_tokens, seq,
                                               len(session.held_out) if session.held_out is not None else None)
    outcome.measured_rows = rows   # for the HTML report of this very outcome
    return Reply(True, sentence, {"rows": rows, "before": before, "after": after})


@guarded
def generate(session: Session, prompt: str, max_new_tokens: int = 40) -> Reply:
    """The same prompt continued greedily by the dense and the pruned decoder."""
    require_pruned(session)
    n = core_measure.check_generation(session.model, prompt, max_new_tokens, session.tokenizer)
    with DEVICE_LOCK:
        before = core_measure.greedy_continuation(session.model, session.tokenizer, prompt, n)
        after = core_measure.greedy_continuation(ensure_pruned(session).pruned, session.tokenizer, prompt, n)
    return Reply(True, "Generated with greedy decoding.", {"before": before, "after": after})


@guarded
def compare(session: Session, sparsity: float, budget_kind: str = "params", uniform: bool = False,
            eval_tokens: int = QUICK_EVAL_TOKENS, methods=COMPARE_METHODS, suite: bool = False,
            suite_config=None, progress: ProgressFn | None = None,
            cancel_event: threading.Event | None = None) -> Reply:
    """Every chosen method (STAT, the published peers, the simple baselines; see
    ``stat_core.methods``) at the same budget from the same cached calibration: quick perplexity
    (or held-out accuracy) and KL to dense; with ``suite`` (decoders) also the evaluation suite
    (``stat_core.evaluation.suite``: few-shot, analogies, chat agreement; ``suite_config`` defaults to
    ``SuiteConfig.quick()``), whose dense reference is built once per model and kept in the session."""
    require_calibration(session)
    if suite and session.encoder:
        raise ValueError("The evaluation suite (few-shot, analogies, chat) is for decoders; a classifier is compared "
                         "on held-out accuracy and KL. Untick the suite.")
    configs = pipeline.compare_configs(session.model, session.calib_data, sparsity, methods, budget_kind, uniform)
    report = core_progress(progress, cancel_event)
    with DEVICE_LOCK:
        reference = suite_reference(session, suite_config, report) if suite else None
        base = core_measure.baseline(session.model, session.tokenizer, session.held_out, int(eval_tokens))
        results = pipeline.compare_methods(session.model, session.calibration, session.calib_data, configs, base,
                                               session.model_name, session.calib_info, report,
                                               suite_reference=reference, tokenizer=session.tokenizer)
    dense, metric = base.quality, ("accuracy" if session.encoder else "perplexity")
    suite_dense = None if reference is None else reference.dense_metrics
    rows, headers, sentence = core_measure.compare_table(results, dense, metric, int(eval_tokens), method_label,
                                                         suite_dense, short_label=lambda m: get_method(m).label)
    session.last_compare = (headers, rows)   # for the HTML report
    return Reply(True, sentence, {"rows": rows, "headers": headers, "results": results, "dense": dense,
                                  "metric": metric, "suite_dense": suite_dense})


def suite_reference(session: Session, config=None, progress: ProgressFn | None = None):
    """The evaluation suite's dense reference for the session's model (built on first use with
    ``config``, default ``SuiteConfig.quick()``, then kept until another model is loaded)."""

    config = config or SuiteConfig.quick()
    key = (session.model_name, config)
    if session.suite_reference is None or session.suite_key != key:
        session.suite_reference = None  # the old one goes before the new one is built
        session.suite_reference = build_reference(session.model, session.tokenizer, config, progress=progress)
        session.suite_key = key
    return session.suite_reference


# --- export --------------------------------------------------------------------------------------

@guarded
def export(session: Session, fmt: str = "safetensors (transformers)",
           cancel_event: threading.Event | None = None) -> Reply:
    """Write the pruned model in ``fmt`` (a key of :data:`EXPORT_CHOICES` or a plain format name) as a
    zip with its report beside it (``stat_core.export.api.export_zip_with_report``). Cancel stops it
    between steps (and between files of the zip) and leaves nothing half-written."""
    require_pruned(session)
    fmt, gguf_type = EXPORT_CHOICES.get(fmt, (fmt, None))
    check_format(session.model, fmt, session.tokenizer)  # one sentence before the surgery, not after
    with DEVICE_LOCK:
        check_cancel(cancel_event)
        outcome = ensure_pruned(session, cancel_event)   # plan, report and weights of one and the same prune
        check_cancel(cancel_event)
        info, zip_path, report_path = export_zip_with_report(
            outcome.pruned, session.tokenizer, session.workdir, session.model_name, outcome.config.method,
            outcome.config.sparsity, fmt, plan=outcome.plan, report=outcome.report, gguf_type=gguf_type,
            check=lambda: check_cancel(cancel_event))
        for old in (*session.workdir.glob("*.zip"), *session.workdir.glob("*-pruning_report.json")):
            if old not in (zip_path, report_path):   # one export per session on disk (Gradio serves its own
                old.unlink(missing_ok=True)          # copy), the previous one removed once this one is complete
    size = getattr(info, "size_bytes", None)
    size_txt = f"{size / 2**20:.1f} MiB model" if size else "model"   # MiB, as the download shows sizes
    return Reply(True, f"Exported a {size_txt} to {Path(getattr(info, 'path', zip_path.stem)).name}.zip "
                       f"({zip_path.stat().st_size / 2**20:.1f} MiB).",
                 {"zip": str(zip_path), "report": str(report_path), "files": list(getattr(info, "files", ()))})


# --- explanations ---------------------------------------------------------------------------------

def plan_explanations(session: Session) -> dict:
    """:func:`stat_core.methods.stat.explain.plan_explanations` for the session's plan (``{}`` before a prune)."""
    if session.outcome is None or session.calibration is None:
        return {}
    return explain.plan_explanations(session.model, session.calibration, session.outcome.plan)


@guarded
def head_view(session: Session, layer, head, text: str) -> Reply:
    """The head explorer: one head's attention pattern on ``text`` (dense model), its rank, the
    layer's predicted damage, whether it was kept and, if removed, how much of its output the kept
    heads reconstruct."""
    require_pruned(session)
    with DEVICE_LOCK:
        pattern, details = explain.head_view(session.model, session.tokenizer, session.calibration,
                                             session.outcome.plan, layer, head, text)
    return Reply(True, explain.head_sentence(details), {"pattern": pattern, "details": details})


def head_reasons(session: Session) -> list | None:
    """:func:`stat_core.methods.stat.explain.head_reasons` for the session's plan (None before a prune)."""
    if session.outcome is None or session.calibration is None:
        return None
    return explain.head_reasons(session.model, session.calibration, session.outcome.plan)


LESSON_STEPS = ("activations", "spectrum", "selection", "correction", "allocation", "effect")


@guarded
def lesson(session: Session, layer, prompt: str = "The history of the city", max_new_tokens: int = 24) -> Reply:
    """The Learn view for one layer (:mod:`stat_core.methods.stat.lesson`): every step's numbers and
    sentences, on the loaded model, its calibration and the current plan; the last step (dense and
    pruned generations) builds the pruned copy if needed (decoders only)."""
    require_pruned(session)
    plan = session.outcome.plan
    layer = core_lesson.check_layer(plan, layer)
    with DEVICE_LOCK:
        steps = {"activations": core_lesson.activation_step(session.model, session.calibration, session.calib_data,
                                                            plan, layer),
                 "spectrum": core_lesson.spectrum_step(session.model, session.calibration, plan, layer),
                 "selection": core_lesson.selection_step(session.model, session.calibration, plan, layer)}
        held = session.held_out if session.held_out is not None else evaluation_windows(
            session.tokenizer, n_tokens=1024, window=256)   # Wikipedia's evaluation split: never calibrated on
        steps["correction"] = core_lesson.correction_step(session.model, session.calibration, plan, layer, held)
        steps["allocation"] = core_lesson.allocation_step(plan, layer)
        if session.encoder:
            steps["effect"] = None
        else:
            n = core_measure.check_generation(session.model, prompt, max_new_tokens, session.tokenizer)
            outcome = ensure_pruned(session)
            steps["effect"] = core_lesson.effect_step(session.model, outcome.pruned, session.tokenizer, prompt, n)
    return Reply(True, f"Lesson for layer {layer} computed on {session.model_name}'s own numbers.",
                 {"layer": layer, **steps})


@guarded
def report_html(session: Session) -> Reply:
    """One self-contained HTML report of the current prune (:mod:`stat_core.evaluation.html_report`)
    in the session's folder: configuration, figures, before / after (when measured), the last
    comparison, the plan."""
    require_pruned(session)
    outcome = session.outcome
    name = Path(str(session.model_name)).name or "model"
    path = session.workdir / f"{name}-{outcome.config.method}-{round(100 * outcome.config.sparsity)}pct-report.html"
    why = plan_explanations(session)
    rows = getattr(outcome, "measured_rows", None)
    write_report_html(path, outcome.plan, outcome.report, explanations=why, reasons=head_reasons(session),
                      measures=(list(METRIC_HEADERS), rows) if rows else None,
                      comparison=getattr(session, "last_compare", None))
    return Reply(True, f"Wrote the report ({path.stat().st_size / 2**20:.1f} MiB, one HTML file that works "
                       "offline).", {"path": str(path)})


def cancel(session: Session) -> Reply:
    session.cancel()
    return Reply(True, "Cancelling after the current layer…")
