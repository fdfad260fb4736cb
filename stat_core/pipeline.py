"""What the CLI and the app both do around a prune: name the model to load, turn a calibration
source into the data the model calibrates on (and, for classifiers, the held-out half it is
measured on), read a sparsity, build the prune's config, and cut a pruned copy from cached
statistics. One set of functions, so the two shells cannot drift apart; warnings come back as
sentences instead of being caught from a logger. The report every prune writes is
:mod:`stat_core.evaluation.report`; before/after measurements are :mod:`stat_core.evaluation.measure`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from stat_core.adapters import get_adapter
from stat_core.adapters.registry import is_encoder
from stat_core.calibration import cache as calibration_cache
from stat_core.calibration import distributed
from stat_core.calibration.sizes import calibration_size_warning
from stat_core.calibration.stage import ALL_NEEDS, Calibration, collect
from stat_core.calibration.statistics import BlockStats, CalibrationSet, LayerwiseRunner
from stat_core.config import PruneConfig, parse_sparsity  # noqa: F401 (parse_sparsity: part of the API)
from stat_core.data.labelled import BUILTIN_SETS, load_labelled
from stat_core.data.mix import SOURCES as DECODER_SOURCES
from stat_core.data.mix import decoder_calibration, default_source
from stat_core.data.sources import (
    CalibrationConfig,
    DataError,
    calibration_windows,
    check_calibration_sizes,
    fingerprint,
    text_documents,
)
from stat_core.evaluation.classifier import CLASSIFIER_MAX_LEN, encode, encode_chunks
from stat_core.evaluation import measure as quality_measure
from stat_core.evaluation import suite as quality_suite
from stat_core.evaluation.measure import Baseline, baseline, quality
from stat_core.evaluation.perplexity import count_parameters
from stat_core.evaluation.report import (
    plan_sizes,
    prune_report,
    set_after_sizes,
    size_summary,
)
from stat_core.evaluation.suite import SuiteConfig, build_reference, evaluate_suite
from stat_core.export.common import state_dict_bytes
from stat_core.methods.base import check_budget_feasible
from stat_core.methods.registry import get_method
from stat_core.methods.settings import settings_from_text
from stat_core.methods.stat import cached as stat_cached
from stat_core.methods.stat import explain
from stat_core.models import (
    DEMO_CLASSIFIER,
    DEMO_MODELS,
    ModelLoadError,
    demo_classifier_split,
)
from stat_core.progress import notify
from stat_core.recover import RecoveryConfig, recover_
from stat_core.surgery.apply import apply_plan_
from stat_core.surgery.plan import PrunePlan

ProgressFn = Callable[[str, int, int], None]
log = logging.getLogger(__name__)

#: Calibration windows (decoders) and tokens per window / example when the caller gives none.
DEFAULT_DECODER_SAMPLES, DEFAULT_DECODER_SEQ_LEN = 64, 512

SOURCE_KINDS = ("builtin", "file", "pasted")


@dataclass
class CalibrationData:
    """``data``: decoder windows ``(n, T)`` or a classifier :class:`CalibrationSet`; ``held_out``:
    the classifier's evaluation half (None for decoders); ``info``: what went into the report;
    ``warnings``: sentences for the user (the run goes on). ``info`` holds the real ``tokens`` and
    a ``fingerprint`` of the model name and token ids."""

    data: object
    held_out: object | None
    info: dict
    warnings: list[str] = field(default_factory=list)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def pasted_documents(text: str) -> list[str]:
    docs = [d.strip() for d in (text or "").split("\n\n") if d.strip()]
    if not docs:
        raise DataError("The pasted text is empty; paste some text or pick the built-in sample.")
    return docs


def model_reference(source: str, name: str | None) -> str:
    """What :func:`stat_core.models.load_model` should load for a ``source`` (``"demo"``, ``"folder"``
    or ``"hub"``) and a ``name``; ModelLoadError / ValueError with one sentence if it cannot be."""
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
    return name


def resolve_source(model, tokenizer, name: str | None) -> tuple[str, str | None, str | None]:
    """A CLI-style source (a built-in name, or a file path; None: the default) as ``(kind, builtin,
    file_path)`` for :func:`calibration_data`."""
    builtin_names = BUILTIN_SETS if is_encoder(model) else DECODER_SOURCES
    if name is None:
        name = "newsgroups" if is_encoder(model) else default_source(tokenizer)
    if name in builtin_names:
        return "builtin", name, None
    return "file", None, name


def calibration_data(model, tokenizer, model_name: str, source: str = "builtin", builtin: str | None = None,
                     file_path: str | None = None, pasted: str = "", num_samples: int | None = None,
                     seq_len: int | None = None, seed: int = 0, text_columns: tuple[str, ...] = ("text",),
                     label_column: str = "label",
                     progress: Callable[[str, int, int], None] | None = None) -> CalibrationData:
    """The calibration data for ``model`` from ``source`` (``"builtin"`` with ``builtin`` a name,
    ``"file"`` with ``file_path``, or ``"pasted"`` text split at blank lines).

    Warnings (overlapping windows, fewer examples than asked, too few tokens for the model's MLP
    width) come back in ``warnings``. Decoders: ``num_samples`` windows of ``seq_len`` tokens (default 64 × 512); a built-in source is
    one of ``calibration_mix.SOURCES``. Classifiers: labelled examples split in half — calibration on
    one half (``num_samples`` of it; default all), accuracy on the other; the demo classifier's
    newsgroups split is exactly the one it was trained on. Raises :class:`DataError` /
    ``ValueError`` with one readable sentence.
    """
    encoder = is_encoder(model)
    if source not in SOURCE_KINDS:
        raise ValueError(f"Unknown calibration source '{source}'; use one of {', '.join(SOURCE_KINDS)}.")
    if source == "file" and not file_path:
        raise DataError("Upload a calibration file first (.txt, .json, .jsonl, .csv or .parquet).")
    if source == "builtin" and builtin is None:
        builtin = "newsgroups" if encoder else default_source(tokenizer)
    if encoder:  # num_samples None: the whole training half
        checked, seq_len = check_calibration_sizes(model, 1 if num_samples is None else num_samples,
                                                   CLASSIFIER_MAX_LEN if seq_len is None else seq_len)
        num_samples = None if num_samples is None else checked
    else:
        num_samples, seq_len = check_calibration_sizes(
            model, DEFAULT_DECODER_SAMPLES if num_samples is None else num_samples,
            DEFAULT_DECODER_SEQ_LEN if seq_len is None else seq_len, tokenizer)
    seed = int(seed)
    info = {"source": {"builtin": builtin, "file": Path(file_path).name if file_path else None,
                       "pasted": "pasted text"}[source], "num_samples": num_samples, "seq_len": seq_len, "seed": seed}
    if not encoder:
        prepared = _decoder_data(model, tokenizer, source, builtin, file_path, pasted, num_samples, seq_len, seed,
                                 info, progress)
    else:
        prepared = _classifier_data(tokenizer, model_name, source, builtin, file_path, num_samples, seq_len, seed,
                                    info, text_columns, label_column, getattr(model.config, "num_labels", None))
    prepared.info["fingerprint"] = fingerprint(model_name, CalibrationSet.wrap(prepared.data).input_ids)
    size_warning = calibration_size_warning(model, prepared.info["tokens"])
    if size_warning:
        prepared.warnings.append(size_warning)
    return prepared


def correction_data(model, tokenizer, model_name: str, name: str, info: dict, num_samples: int | None = None,
                    seq_len: int | None = None, seed: int = 0,
                    progress: Callable[[str, int, int], None] | None = None) -> tuple[CalibrationData, dict]:
    """The second text whose statistics every correction is fitted on (a built-in decoder text or a
    file, at the same sizes and seed as the calibration text), and the calibration ``info`` with it
    recorded as ``corrections_fitted_on``. Decoders only: a classifier's corrections are fitted on
    its labelled examples."""
    if is_encoder(model):
        raise ValueError("A classifier's corrections are fitted on its labelled examples; fit them on the "
                         "calibration text itself.")
    kind, builtin, path = resolve_source(model, tokenizer, name)
    prepared = calibration_data(model, tokenizer, model_name, kind, builtin, path, num_samples=num_samples,
                                seq_len=seq_len, seed=seed, progress=progress)
    return prepared, {**info, "corrections_fitted_on": prepared.info}


def _decoder_data(model, tokenizer, source, builtin, file_path, pasted, num_samples, seq_len, seed, info, progress):
    config = CalibrationConfig(num_samples=num_samples, seq_len=seq_len, seed=seed)
    if source == "builtin":
        if builtin not in DECODER_SOURCES:
            raise DataError(f"'{builtin}' is a labelled set for classifiers; decoders calibrate on "
                            f"{', '.join(DECODER_SOURCES)}, a file or pasted text.")
        cal = decoder_calibration(model, tokenizer, builtin, config, progress=progress)
        info.update({k: v for k, v in cal.info.items() if k not in info}, tokens=int(cal.windows.numel()))
        return CalibrationData(cal.windows, None, info)
    docs = text_documents(file_path) if source == "file" else pasted_documents(pasted)  # read lazily
    catcher = _Collect()
    data_log = logging.getLogger("stat_core.data.sources")
    data_log.addHandler(catcher)
    try:
        windows = calibration_windows(tokenizer, docs, config)
    finally:
        data_log.removeHandler(catcher)
    warnings = []
    if catcher.messages:
        warnings.append(f"The calibration text is shorter than {num_samples} × {seq_len} tokens, so the windows "
                        "overlap; statistics from repeated text are less reliable — give more text or ask for "
                        "fewer samples.")
    info["tokens"] = int(windows.numel())
    return CalibrationData(windows, None, info, warnings)


def _classifier_data(tokenizer, model_name, source, builtin, file_path, num_samples, seq_len, seed, info,
                     text_columns, label_column, num_labels=None):
    if source == "pasted":
        raise DataError("A classifier calibrates on labelled examples; pick a built-in labelled set or upload "
                        "a .csv/.json/.jsonl/.parquet file with 'text' and 'label' columns.")
    if source == "builtin":
        if builtin not in BUILTIN_SETS:
            raise DataError(f"'{builtin}' is not a labelled set; classifiers calibrate on "
                            f"{', '.join(BUILTIN_SETS)} or an uploaded labelled file.")
        if builtin == "newsgroups" and model_name == DEMO_CLASSIFIER:
            train, held = demo_classifier_split()  # exactly the split the demo classifier was trained on
        else:
            train, held = load_labelled(builtin).split(seed=seed)
    else:
        labelled = load_labelled(file_path, tuple(text_columns), label_column)
        if num_labels and len(labelled.label_names) > num_labels:
            raise DataError(f"'{Path(file_path).name}' has {len(labelled.label_names)} classes but the model's "
                            f"classification head has {num_labels} labels; give data with at most {num_labels} "
                            "classes or a model whose head matches it.")
        train, held = labelled.split(seed=seed)
    if len(train) == 0 or len(held) == 0:
        raise DataError("The labelled set is too small to split into calibration and held-out halves.")
    warnings = []
    if num_samples is not None and num_samples > len(train):
        warnings.append(f"Only {len(train)} labelled examples are available for calibration "
                        f"({num_samples} requested); using all of them.")
    train = train.take(range(min(num_samples or len(train), len(train))))
    # All the training side's text feeds the statistics (long posts give several windows);
    # accuracy reads each held-out example once, as the classifier is used.
    data, held_set = encode_chunks(tokenizer, train, seq_len), encode(tokenizer, held, seq_len)
    info.update(num_samples=len(train), seq_len=seq_len, held_out_examples=len(held),
                tokens=int(CalibrationSet.wrap(data).attention_mask.sum()))
    return CalibrationData(data, held_set, info, warnings)


# --- the stages of one prune: calibrate → plan → cut (every shell runs these) -----------------------

@dataclass
class PruneResult:
    plan: PrunePlan | None
    stats: list[BlockStats]          # statistics the corrections were computed from
    dense_stats: list[BlockStats]    # dense-model statistics (re-budget without recalibrating)
    sensitivity: list[dict] | None
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # whole-model methods: what they changed


def calibrate(model, windows: "torch.Tensor | CalibrationSet", config: PruneConfig,
              progress: ProgressFn | None = None, runner: LayerwiseRunner | None = None,
              needs: frozenset[str] = ALL_NEEDS) -> Calibration:
    """The calibration stage (:func:`stat_core.calibration.stage.collect`: dense statistics and, with
    ``"sensitivity"`` in ``needs``, the gradient pass) plus, with ``"analyses"``, STAT's per-layer
    decompositions (:func:`stat_core.methods.stat.cached.analyse_`); the model is not changed.
    ``needs``: a method's ``calibration_needs`` (FLAP, Wanda-sp, SlimGPT: the statistics alone)."""
    calibration = collect(model, windows, config, progress, runner, needs)
    if "analyses" in needs:
        stat_cached.analyse_(get_adapter(model), calibration, config, progress)
    return calibration


def _calibrate_with(model, windows, config: PruneConfig, progress: ProgressFn | None,
                    runner: LayerwiseRunner | None, spectra: bool, needs: frozenset = ALL_NEEDS) -> Calibration:
    """:func:`calibrate`, and with ``spectra`` the inspect views' spectra (timed in ``timings["spectra"]``)."""
    calibration = calibrate(model, windows, config, progress, runner, needs)
    if spectra:
        stat_cached.spectra_(model, calibration, progress)
    return calibration


def cached_calibration(model, windows: "torch.Tensor | CalibrationSet", config: PruneConfig,
                       progress: ProgressFn | None = None, runner: LayerwiseRunner | None = None,
                       spectra: bool = False, needs: frozenset[str] = ALL_NEEDS) -> Calibration:
    """:func:`calibrate`, read from the on-disk cache (:mod:`stat_core.calibration.cache`) when this
    model, these windows and ``config``'s calibration settings were calibrated before, else computed
    and stored there. A hit gives the same numbers bit for bit (statistics, sensitivities and
    analyses: re-analysing SmolLM2-135M's 30 layers would take 1–3 minutes on two cores) and notes
    ``extras["disk_cache"] = {"hit": True, "file": ..., "computed_timings": ...}``; a stale or
    damaged entry is a miss (logged). With ``spectra`` the inspect views' singular values
    (:func:`stat_core.methods.stat.explain.calibration_spectra`) are computed on a miss and kept in
    the entry too. Under ``torch.distributed``, or with the cache turned off
    (``STAT_CALIBRATION_CACHE=off``), this is :func:`calibrate`. ``needs`` smaller than everything
    (a method that skips the gradient pass): a whole entry is used when there is one, else the part is
    computed and kept under its own key."""
    needs = frozenset(needs)
    if needs != ALL_NEEDS:
        spectra = False  # the inspect views' spectra come with STAT's analyses only
    if not needs or not calibration_cache.enabled() or distributed.is_distributed():  # nothing to keep
        return _calibrate_with(model, windows, config, progress, runner, spectra, needs)
    calibration_cache.check_settings()  # a bad size bound: one sentence before the work, not after
    t0 = time.perf_counter()
    data = CalibrationSet.wrap(windows)
    notify(progress, "calibration cache", 0, 1)  # fingerprint and read: about a second
    try:
        full_key = calibration_cache.key_for(model, data, config)
        key = full_key if needs == ALL_NEEDS else calibration_cache.key_for(model, data, config, sorted(needs))
    except Exception:  # a model the cache cannot fingerprint is calibrated as usual
        log.warning("Cannot fingerprint this model for the calibration cache; calibrating without it", exc_info=True)
        notify(progress, "calibration cache", 1, 1)
        return _calibrate_with(model, windows, config, progress, runner, spectra, needs)
    calibration = None
    for candidate, candidate_needs in dict.fromkeys([(full_key, ALL_NEEDS), (key, needs)]):
        entry = calibration_cache.read(candidate)
        calibration = None if entry is None else _calibration_from_entry(model, entry, config, candidate, spectra,
                                                                         candidate_needs)
        if calibration is not None:
            break
    notify(progress, "calibration cache", 1, 1)
    if calibration is not None:
        calibration.timings = {"cache_read": time.perf_counter() - t0}
        return calibration
    calibration = _calibrate_with(model, windows, config, progress, runner, spectra, needs)
    tensors, info = stat_cached.to_cache(model, calibration, spectra)
    path = calibration_cache.write(key, calibration.dense_stats, calibration.sensitivity, calibration.timings,
                                   tensors, info)
    calibration.extras["disk_cache"] = {"hit": False, "file": None if path is None else str(path)}
    return calibration


def _calibration_from_entry(model, entry, config: PruneConfig, key, spectra: bool = False,
                            needs: frozenset = ALL_NEEDS) -> Calibration | None:
    """The :class:`Calibration` a cache entry holds, or None (logged) when it does not fit ``model``
    (or lacks the ``spectra`` asked for)."""
    adapter = get_adapter(model)
    try:
        if len(entry.dense_stats) != adapter.num_layers:
            raise ValueError(f"{len(entry.dense_stats)} blocks cached for a {adapter.num_layers}-layer model")
        for i, stats in enumerate(entry.dense_stats):
            if stats.attn_gram.shape[0] != adapter.attn_out_proj(i).in_features or \
                    stats.mlp_gram.shape[0] != adapter.mlp_out_proj(i).in_features:
                raise ValueError(f"layer {i}'s cached statistics do not fit its projections")
        calibration = Calibration(dense_stats=entry.dense_stats, sensitivity=entry.sensitivity,
                                  centered=config.intercept, needs=needs,
                                  extras={"disk_cache": {"hit": True, "file": str(key.path),
                                                         "computed_timings": entry.timings}})
        if not stat_cached.from_cache(adapter, entry, calibration, "analyses" in needs, spectra):
            log.info("The cached calibration %s has no spectra; recomputing it with them", key.path.name)
            return None
    except Exception as exc:  # whatever does not fit is recomputed
        log.warning("Ignoring the cached calibration %s and recomputing it: %s", key.path.name, exc)
        return None
    return calibration


def with_corrections_from(model, calibration: Calibration, windows: "torch.Tensor | CalibrationSet",
                          progress: ProgressFn | None = None, cache: bool = True) -> Calibration:
    """A copy of ``calibration`` whose corrections are fitted on the statistics of other ``windows``
    (another calibration text); the units are still selected and the budget allocated on
    ``calibration``'s own text and sensitivities. One more statistics pass over ``windows``, read from
    the on-disk cache with ``cache`` when these windows were calibrated before (the demo model's
    default Wikipedia windows are, after setup). Measured on SmolLM2 (docs/experiments.md): units
    chosen on the ``mix`` source with the model's own Fisher and corrections fitted on Wikipedia keep
    most of the few-shot, analogy and chat gains of ``mix`` at about half of its perplexity cost."""
    if distributed.is_distributed():
        raise ValueError("corrections fitted on another calibration text run in one process; drop torchrun "
                         "or the second calibration text")
    t = time.perf_counter()
    config = PruneConfig(sparsity=0.0)  # statistics only; the settings the app's and setup's calibrations use
    stats_only = frozenset({"block_stats"})  # a whole entry is read when there is one; else no gradient pass
    other = cached_calibration(model, windows, config, progress, needs=stats_only) if cache else \
        calibrate(model, windows, config, progress, needs=stats_only)
    return dataclasses.replace(calibration, correction_stats=other.dense_stats,
                               timings={**calibration.timings, "correction_calibration": time.perf_counter() - t})


def check_one_shot(config: PruneConfig, what: str) -> None:
    """ValueError (one sentence) when ``what`` (something only a one-shot prune does) is asked of a
    layer-wise ``config``: the one place this rule is written."""
    if config.mode != "one-shot":
        raise ValueError(f"{what} is one-shot only; {config.mode} mode re-fits each layer on the pruned model's "
                         "own calibration text (use --mode one-shot)")


def plan_pruning(model, calibration: Calibration, config: PruneConfig, model_name: str = "",
                 calibration_info: dict | None = None, data: "CalibrationSet | None" = None,
                 progress: ProgressFn | None = None) -> PrunePlan:
    """The plan for ``config`` (budget, method, uniform) from cached statistics of the dense ``model``.

    ``data``: the calibration windows, for methods that need more than the cached statistics
    (e.g. LLM-Pruner's weight gradients); computed once and kept in ``calibration.extras``.
    ``progress``: long planning (STAT's budget search) reports through it, and stops when it raises
    (the app's Cancel).
    """

    method = get_method(config.method)
    method.settings_of(config)  # settings of another method: one sentence before any work
    method.check_applicable(model)
    if method.whole_model:
        raise ValueError(f"{method.label} does not produce a head/neuron plan; run it with stat_prune_")
    missing = method.calibration_needs - calibration.needs
    if missing:
        raise ValueError(f"{method.label} needs {' and '.join(sorted(missing))} that this calibration did not "
                         "compute (it was made for another method); calibrate again for this method")
    method.prepare(model, None if data is None else CalibrationSet.wrap(data), calibration)
    calibration.extras["progress"] = progress  # a budget search reports through it
    try:
        return method.plan(model, calibration, config, model_name, calibration_info or {})
    finally:
        calibration.extras.pop("progress", None)


def prune_from_calibration_(model, calibration: Calibration, config: PruneConfig, model_name: str = "",
                            calibration_info: dict | None = None, data=None,
                            progress: ProgressFn | None = None) -> PruneResult:
    """One-shot prune of the dense ``model`` in place from a cached :class:`Calibration`: plan,
    surgery, and the method's finishing step (STAT's output prior)."""
    check_one_shot(config, "re-planning from cached statistics")
    t0 = time.perf_counter()
    plan = plan_pruning(model, calibration, config, model_name, calibration_info, data, progress)
    t1 = time.perf_counter()
    apply_plan_(model, plan, calibration.fit_stats or None, progress)  # none computed: no correction to fit
    t2 = time.perf_counter()
    info = get_method(config.method).finish_(model, calibration, config)
    timings = {**calibration.timings, "allocate": t1 - t0, "apply": t2 - t1}
    if "search" in plan.budget:
        timings["search"] = plan.budget["search"]["seconds"]
    if info:
        timings["finish"] = time.perf_counter() - t2
    return PruneResult(plan=plan, stats=calibration.fit_stats, dense_stats=calibration.dense_stats,
                       sensitivity=calibration.sensitivity, timings=timings, info=info)


def stat_prune_(model, windows: "torch.Tensor | CalibrationSet", config: PruneConfig, model_name: str = "",
                progress: ProgressFn | None = None, calibration_info: dict | None = None,
                cache: bool = False, correction_windows: "torch.Tensor | CalibrationSet | None" = None
                ) -> PruneResult:
    """Prune ``model`` in place with ``config.method`` (STAT by default; any registered method) on
    calibration ``windows: (n, T)`` token ids (or a :class:`CalibrationSet` with padding masks and
    labels): the one sequence of stages every shell runs. ``correction_windows``: one-shot only, the
    corrections fitted on these windows' statistics instead (:func:`with_corrections_from`).

    Returns the plan and the statistics behind it. With ``mode="propagate"`` each layer is
    re-calibrated on the outputs of the already pruned and corrected layers before it (the method's
    :meth:`~stat_core.methods.base.PruningMethod.prune_layerwise_`). Whole-model methods (SliceGPT)
    return ``plan=None`` and their summary in ``info``. With ``cache`` a one-shot prune reads (or
    stores) the dense calibration in the on-disk cache (:func:`cached_calibration`).

    Under ``torch.distributed`` every rank calls this with the same model and the whole ``windows``;
    the calibration is sharded (:mod:`stat_core.calibration.distributed`). One-shot: rank 0 plans and prunes
    its model; the other ranks return right after the calibration with ``plan=None``, their model
    dense, and ``info["distributed_rank"]``. Propagate: every rank prunes its model identically
    (each needs the pruned path's hidden states of its shard). Whole-model methods run in one process.
    """

    method = get_method(config.method)
    method.check_config(config)  # settings of another method, or not for this mode: one sentence before any work
    method.check_applicable(model)  # one sentence before any calibration
    t0 = time.perf_counter()
    if method.whole_model:
        if distributed.is_distributed():
            raise ValueError(f"{method.label} calibrates inside its own rotation pass and cannot be spread over "
                             "processes; run it in one process")
        if config.mode != "one-shot":
            raise ValueError(f"{method.label} has no propagate mode; use one-shot")
        if correction_windows is not None:
            raise ValueError(f"{method.label} fits its own rotation on one calibration text; drop the second text")
        info = method.prune_(model, CalibrationSet.wrap(windows), config, progress)
        return PruneResult(plan=None, stats=[], dense_stats=[], sensitivity=None,
                           timings={"total": time.perf_counter() - t0}, info=info)
    check_budget_feasible(model, config)  # before minutes of calibration, not after
    if correction_windows is not None and distributed.is_distributed():
        raise ValueError("corrections fitted on another calibration text run in one process; drop torchrun "
                         "or the second calibration text")
    if correction_windows is not None:
        check_one_shot(config, "fitting the corrections on a second calibration text")
    if config.mode != "one-shot" and not method.layerwise:
        raise ValueError(f"{config.mode} mode re-fits STAT's corrections layer by layer; {method.label} runs one-shot")
    adapter = get_adapter(model)
    needs = method.calibration_needs if config.mode == "one-shot" else ALL_NEEDS  # layer-wise modes run STAT's
    if cache and config.mode == "one-shot" and not distributed.is_distributed():
        calib = cached_calibration(model, windows, config, progress, needs=needs)
        if correction_windows is not None:
            calib = with_corrections_from(model, calib, correction_windows, progress)
        result = prune_from_calibration_(model, calib, config, model_name, calibration_info, windows, progress)
        result.timings["total"] = time.perf_counter() - t0
        return result
    # Under torch.distributed each rank runs its shard of the windows (one process: all of them).
    runner = LayerwiseRunner(model, adapter, distributed.shard(windows, config.batch_size)[0], config.batch_size)
    calib = calibrate(model, windows, config, progress, runner, needs)
    if correction_windows is not None:
        calib = with_corrections_from(model, calib, correction_windows, progress, cache=False)
    if config.mode == "one-shot":
        if not distributed.is_main():  # rank 0 plans, applies and exports; this rank's model stays dense
            return PruneResult(plan=None, stats=calib.dense_stats, dense_stats=calib.dense_stats,
                               sensitivity=calib.sensitivity, timings=calib.timings,
                               info={"distributed_rank": distributed.rank(), "world_size": distributed.world_size()})
        result = prune_from_calibration_(model, calib, config, model_name, calibration_info, windows, progress)
        result.timings["total"] = time.perf_counter() - t0
        return result
    t2 = time.perf_counter()
    plan, used_stats = method.prune_layerwise_(model, runner, calib, config, model_name, calibration_info, progress)
    timings = {**calib.timings, "apply": time.perf_counter() - t2, "total": time.perf_counter() - t0}
    del runner
    return PruneResult(plan=plan, stats=used_stats, dense_stats=calib.dense_stats, sensitivity=calib.sensitivity,
                       timings=timings)


# --- from calibration to a pruned copy ---------------------------------------------------------------

def default_flops_seq_len(model, data) -> int:
    """Sequence length for FLOP budgets: a classifier's average real tokens per calibration example,
    512 for decoders."""
    if data is not None and is_encoder(model):
        cal = CalibrationSet.wrap(data)
        if cal.attention_mask is not None:
            return max(1, round(float(cal.attention_mask.sum()) / len(cal)))
    return 512


def prune_config(model, data, sparsity, budget_kind: str = "params", uniform: bool = False,
                 mode: str = "one-shot", method: str = "stat", flops_seq_len: int | None = None,
                 settings=None) -> PruneConfig:
    """The :class:`~stat_core.config.PruneConfig` of a prune of ``model`` calibrated on ``data``
    (FLOPs counted at :func:`default_flops_seq_len` unless ``flops_seq_len`` is given); ``settings``:
    the method's own (its ``Settings`` dataclass, or ``name=value`` text read by
    :func:`stat_core.methods.settings.settings_from_text`)."""
    if isinstance(settings, str):
        settings = settings_from_text(method, settings)
    return PruneConfig(sparsity=parse_sparsity(sparsity), budget_kind=budget_kind,
                       flops_seq_len=flops_seq_len or default_flops_seq_len(model, data), method=method, mode=mode,
                       uniform=bool(uniform), settings=settings)


#: The calibration settings of the app's and ``warm_calibration_cache``'s calibrations.
CALIBRATION_SETTINGS = PruneConfig(sparsity=0.0)


def calibrate_statistics(model, data, progress: ProgressFn | None = None, cache: bool = True,
                         sensitivity_labels: str = "data", correction_data=None):
    """Dense statistics of ``model`` on ``data`` (:func:`stat_core.pipeline.calibrate`: every later
    one-shot budget is cut from them) and the inspect views' singular values, timed in
    ``calibration.timings["spectra"]``. With ``cache`` they come from the on-disk calibration cache
    when this model and these windows were calibrated before (and are stored there otherwise):
    :func:`stat_core.pipeline.cached_calibration`; ``calibration.extras["disk_cache"]["hit"]`` says which.
    ``sensitivity_labels``: the gradient pass's next tokens, ``"data"`` or ``"model"`` (the model's own
    Fisher); ``correction_data``: other windows whose statistics every correction is fitted on
    (:func:`stat_core.pipeline.with_corrections_from`)."""
    settings = dataclasses.replace(CALIBRATION_SETTINGS, sensitivity_labels=sensitivity_labels)
    if cache:  # the spectra computed (and timed) with the statistics, or read with them
        calibration = cached_calibration(model, data, settings, progress, spectra=True)
    else:
        calibration = calibrate(model, data, settings, progress)
        t = time.perf_counter()
        if progress is not None:
            progress("spectra", 0, 1)
        explain.calibration_spectra(model, calibration)
        calibration.timings["spectra"] = time.perf_counter() - t
    if correction_data is not None:
        calibration = with_corrections_from(model, calibration, correction_data, progress, cache)
    return calibration


def prune_copy(model, calibration, data, config: PruneConfig, model_name: str | None = None,
               calib_info: dict | None = None, plan=None, progress: ProgressFn | None = None):
    """``(pruned, plan)``: a pruned deep copy of the dense ``model``, which is never touched.
    One-shot cuts ``plan`` (or a new plan from the cached ``calibration``: an impossible budget fails
    before any copying) with the dense statistics' corrections; propagate / sequential re-calibrate
    every layer of the copy on ``data``. ``progress`` is called before the copy (and by the
    layer-wise modes per layer): a callback that raises stops the work with the dense model intact."""
    if config.mode == "one-shot":
        if plan is None:
            plan = plan_pruning(model, calibration, config, model_name or "", calib_info or {}, data=data)
        if progress is not None:
            progress("surgery", 0, 1)
        pruned = copy.deepcopy(model)
        apply_plan_(pruned, plan, calibration.fit_stats)
        get_method(config.method).finish_(pruned, calibration, config)  # e.g. STAT's output prior
        if progress is not None:
            progress("surgery", 1, 1)
        return pruned, plan
    pruned = copy.deepcopy(model)
    result = stat_prune_(pruned, data, config, model_name or "", progress, calib_info or {})
    return pruned, result.plan


# --- a prune and its report, recovery, a comparison's configs ---------------------------------------

def _report(model, calibration, config: PruneConfig, plan, model_name: str | None, calib_info: dict | None,
            after: dict, **extra) -> dict:
    return prune_report(model_name or "", model, config, calib_info or {}, size_summary(model, config.flops_seq_len),
                        after, plan=plan, calibration_timings=getattr(calibration, "timings", {}), **extra)


def plan_with_report(model, calibration, config: PruneConfig, model_name: str | None = None,
                     calib_info: dict | None = None, data=None, progress: ProgressFn | None = None) -> tuple:
    """``(plan, report)``: a one-shot plan cut from the cached ``calibration`` (well under a second,
    no surgery) and its :func:`stat_core.evaluation.report.prune_report` with the sizes the plan will have
    (:func:`stat_core.evaluation.report.plan_sizes`) and ``seconds_plan``. ``data``: the calibration
    windows, for methods whose settings read them (STAT's search and output prior)."""
    t = time.perf_counter()
    plan = plan_pruning(model, calibration, config, model_name or "", calib_info or {}, data=data,
                                   progress=progress)
    seconds = time.perf_counter() - t
    report = _report(model, calibration, config, plan, model_name, calib_info,
                     plan_sizes(model, plan, config.flops_seq_len), seconds_plan=seconds)
    return plan, report


def prune_with_report(model, calibration, data, config: PruneConfig, model_name: str | None = None,
                      calib_info: dict | None = None, progress: ProgressFn | None = None) -> tuple:
    """``(pruned, plan, report)``: :func:`prune_copy` and its report with the pruned copy's measured
    sizes, ``seconds_plan`` and ``seconds_prune`` (plan + surgery, or the layer-wise pass)."""
    t = time.perf_counter()
    pruned, plan = prune_copy(model, calibration, data, config, model_name, calib_info, progress=progress)
    seconds = time.perf_counter() - t
    report = _report(model, calibration, config, plan, model_name, calib_info,
                     size_summary(pruned, config.flops_seq_len), seconds_plan=seconds, seconds_prune=seconds)
    return pruned, plan, report


def cut_planned(model, calibration, data, config: PruneConfig, plan, report: dict, model_name: str | None = None,
                calib_info: dict | None = None, progress: ProgressFn | None = None):
    """The pruned copy for a ``plan`` made by :func:`plan_with_report` (surgery on a deep copy of the
    dense ``model``); its measured sizes and ``seconds_surgery`` go into that plan's ``report``."""
    t = time.perf_counter()
    pruned, _ = prune_copy(model, calibration, data, config, model_name, calib_info, plan=plan, progress=progress)
    set_after_sizes(report, size_summary(pruned, config.flops_seq_len))
    report["seconds_surgery"] = time.perf_counter() - t
    return pruned


def prune_in_place(model, data, config: PruneConfig, report: dict, model_name: str | None = None,
                   calib_info: dict | None = None, progress: ProgressFn | None = None, cache: bool = True,
                   correction_data=None):
    """Prune ``model`` itself (no copy: the way to prune a model that fills memory) with
    :func:`stat_core.pipeline.stat_prune_` (one-shot reads or stores the on-disk calibration cache with
    ``cache``) and record in ``report`` (:func:`stat_core.evaluation.report.prune_report`)
    ``seconds_prune``, its stages, the sizes after and the kept heads and neurons per layer, or a
    whole-model method's own counts. ``correction_data``: the corrections fitted on this other
    calibration text's statistics (:func:`stat_core.pipeline.with_corrections_from`; one-shot). Returns the :class:`~stat_core.pipeline.PruneResult`, whose
    ``plan`` is the final plan of a trained method too. Under ``torch.distributed`` only rank 0's
    report is filled (the other ranks calibrated their shard and return their result as it is)."""
    t = time.perf_counter()
    result = stat_prune_(model, data, config, model_name=model_name or "", progress=progress,
                                    calibration_info=calib_info or {}, cache=cache, correction_windows=correction_data)
    if not distributed.is_main():
        return result
    report["seconds_prune"] = time.perf_counter() - t
    report["seconds_prune_stages"] = result.timings
    if result.plan is None and "plan" in result.info:  # a trained method's final plan (block movement)
        result.plan = PrunePlan.from_dict(result.info.pop("plan"))
    if result.plan is not None:
        set_after_sizes(report, size_summary(model, config.flops_seq_len))
        report["predicted_damage"] = result.plan.budget.get("predicted_damage")
        report["layers"] = result.plan.kept_summary()
    else:  # a whole-model method counts its own blocks (SliceGPT: sliced linears + shortcut matrices)
        set_after_sizes(report, {"params": count_parameters(model), "block_params": result.info["block_params_after"],
                                 "bytes": state_dict_bytes(model)})
        report["block_params_removed_fraction"] = result.info["removed_fraction"]
        report["block_flops_removed_fraction"] = result.info.get("removed_fraction")
        report["method_info"] = result.info
    return result


class Measure:
    """Quality before and after one prune, as the CLI reports it: the first call measures the dense
    model and keeps it as the reference, later calls measure a pruned one against it. Decoders: the
    evaluation suite (perplexity, KL to dense, few-shot, analogies, chat agreement;
    ``quick``: :meth:`SuiteConfig.quick`); encoders: accuracy and KL to dense on the ``held_out`` half.
    Returns the fields as ``<name>_before`` / ``<name>_after``."""

    def __init__(self, tokenizer, held_out=None, quick: bool = False, progress: ProgressFn | None = None):
        self.tokenizer, self.held_out, self.quick, self.progress = tokenizer, held_out, quick, progress
        self.reference = None

    def __call__(self, model) -> dict:
        encoder = is_encoder(model)
        suffix = "before" if self.reference is None else "after"
        if encoder and self.reference is None:
            self.reference = baseline(model, held_out=self.held_out)
            values = self.reference.quality
        elif encoder:
            values = quality(model, self.reference)
        elif self.reference is None:
            config = SuiteConfig.quick() if self.quick else SuiteConfig()
            self.reference = build_reference(model, self.tokenizer, config, progress=self.progress)
            values = self.reference.dense_metrics
        else:
            values = evaluate_suite(model, self.tokenizer, self.reference, progress=self.progress)
        after_only = (quality_measure if encoder else quality_suite).AFTER_ONLY
        return {f"{name}_{suffix}": value for name, value in values.items()
                if not (suffix == "before" and name in after_only)}


def check_budget_early(model, sparsity, budget_kind: str = "params", uniform: bool = False) -> None:
    """Refuse a parameter budget that no plan can meet (heads kept ≥ 1 per layer, ...) with one
    sentence, before minutes of calibration (FLOPs bounds of encoders need the text's length, so a
    FLOPs budget is checked once the data is there)."""
    if budget_kind == "params":
        check_budget_feasible(model, prune_config(model, None, sparsity, "params", uniform,
                                                             flops_seq_len=512))


#: The app's bound on recovery steps (a shared page: one request must not hold the machine for hours;
#: the command line's ``--recover`` has none).
MAX_APP_RECOVERY_STEPS = 2000


def recovery_steps(value, limit: int | None = None) -> int:
    """A number of recovery steps (0: off) as an int, or ValueError with one sentence (also above
    ``limit`` when given)."""
    try:
        steps = float(value or 0)
    except (TypeError, ValueError):
        raise ValueError(f"Recovery steps must be a whole number (0: no recovery), got {value!r}.") from None
    if not math.isfinite(steps) or steps < 0 or steps != int(steps):
        raise ValueError(f"Recovery steps must be a whole number ≥ 0 (0: no recovery), got {value!r}.")
    if limit is not None and steps > limit:
        raise ValueError(f"Recovery here runs at most {limit:,} steps, got {int(steps):,}; for a longer recovery "
                         "use the command line's --recover.")
    return int(steps)


def recover(pruned, dense, data, steps, report: dict | None = None, seed: int = 0,
            progress: ProgressFn | None = None, cancel_event=None) -> dict:
    """Recovery after pruning, one mechanism for the CLI (``--recover STEPS``) and the app (its
    checkbox): ``steps`` of distillation of ``pruned`` towards ``dense`` (never modified) on the
    calibration ``data`` (:func:`stat_core.recover.recover_`; progress ``("recover", step, steps)``),
    recorded in ``report`` as ``recover`` and ``seconds_recover``. A cancel (``cancel_event`` set,
    or a ``progress`` callback that raises) leaves ``pruned`` exactly as it was before recovery and
    the report without those keys."""

    info = recover_(pruned, dense, data, RecoveryConfig(steps=recovery_steps(steps), seed=int(seed)),
                    progress=progress, cancel_event=cancel_event)
    if report is not None:
        report["recover"] = info
        report["seconds_recover"] = info["seconds"]
    return info


def compare_configs(model, data, sparsity, methods, budget_kind: str = "params", uniform: bool = False) -> list:
    """One one-shot :class:`PruneConfig` per method in ``methods`` at the same budget; ValueError
    with one sentence if none is chosen or one cannot apply to ``model`` (before any work)."""

    methods = list(methods or ())
    if not methods:
        raise ValueError("Pick at least one method to compare.")
    for name in methods:
        get_method(name).check_applicable(model)
    return [prune_config(model, data, sparsity, budget_kind, uniform, "one-shot", name) for name in methods]


def calibration_request_key(model_name: str | None, source: str, builtin: str | None, file_path: str | None,
                            pasted: str, num_samples: int, seq_len: int, seed: int, *extra) -> tuple:
    """What identifies a calibration request (the same key, the same data), for callers that cache
    statistics between requests: pasted text by its hash, a file by path, size and modification time;
    ``extra``: anything else the statistics depend on (sensitivity labels, the corrections' text)."""
    text_hash = hashlib.sha256((pasted or "").encode()).hexdigest()[:16] if source == "pasted" else ""
    p = Path(file_path) if source == "file" and file_path else None
    file_id = () if p is None else (str(p), p.stat().st_size, p.stat().st_mtime) if p.exists() else (str(p),)
    return (model_name, source, builtin if source == "builtin" else "", file_id, text_hash,
            int(num_samples), int(seq_len), int(seed), *extra)


def compare_methods(model, calibration, data, configs: Sequence, base: Baseline, model_name: str | None = None,
                    calib_info: dict | None = None, progress: ProgressFn | None = None,
                    suite_reference=None, tokenizer=None) -> list[dict]:
    """Each config's method applied to a copy of the dense ``model`` from one cached ``calibration``
    (whole-model methods run on ``data``), measured against ``base``: ``[{"method", <quality>,
    "kl_to_dense", "achieved", "block_params"}]`` (decoders: KL on the same quick windows, the dense
    ``model`` run beside each copy). With a ``suite_reference`` (:func:`stat_core.evaluation.suite.build_reference`
    of the dense ``model`` with ``tokenizer``) each result also holds ``"suite"``: the evaluation
    suite's fields (few-shot, analogies, chat agreement, ...) for that copy.
    ``progress("compare", i, n)`` is called before each method (a callback that raises stops the
    comparison there); the dense model is never modified."""

    results = []
    for i, config in enumerate(configs):
        if progress is not None:
            progress("compare", i, len(configs))
        step = None if progress is None else (lambda *_: progress("compare", i, len(configs)))  # noqa: B023
        if get_method(config.method).whole_model:
            pruned = copy.deepcopy(model)
            info = stat_prune_(pruned, data, config, model_name).info
            achieved, block_params = info["removed_fraction"], info["block_params_after"]
        else:
            pruned, plan = prune_copy(model, calibration, data, config, model_name, calib_info, progress=step)
            achieved, block_params = plan.budget["achieved"], size_summary(pruned, config.flops_seq_len)["block_params"]
        row = {"method": config.method, **quality(pruned, base, dense=model), "achieved": achieved,
               "block_params": block_params}
        if suite_reference is not None:

            row["suite"] = evaluate_suite(pruned, tokenizer, suite_reference, progress=step)  # Cancel between batches
        results.append(row)
        del pruned
    if progress is not None:
        progress("compare", len(configs), len(configs))
    return results
