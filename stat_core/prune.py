"""STAT end to end: calibrate, allocate the budget, choose units, fold corrections, cut the model.

``stat_prune_`` is the one call most users need. Underneath, the steps are separable:
``calibrate`` (dense statistics, sensitivities and per-layer decompositions: the expensive part,
independent of the budget) → ``plan_pruning`` (allocate a budget over the layers) → ``apply_plan_``.
``prune_from_calibration_`` re-plans and cuts a fresh dense copy from a cached ``Calibration`` in
seconds, which is how the app re-budgets without re-calibrating.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from stat_core.adapters import ModelAdapter, get_adapter
from stat_core.calibration import cache as calibration_cache
from stat_core.calibration import distributed
from stat_core.calibration.sizes import sensitivity_windows
from stat_core.calibration.statistics import (
    BlockStats,
    CalibrationSet,
    LayerwiseRunner,
    release_memory,
    sensitivity_sums,
)
from stat_core.config import PruneConfig
from stat_core.methods.base import check_budget_feasible
from stat_core.methods.registry import get_method
from stat_core.methods.stat.analysis import (
    LayerAnalysis,
    analyse_layer,
    plan_from_analyses,
    stat_correction,
)
from stat_core.methods.stat.explain import Spectrum, calibration_spectra
from stat_core.methods.stat.propagate import _propagate_, _sequential_
from stat_core.progress import ProgressFn, notify
from stat_core.surgery.apply import apply_plan_
from stat_core.surgery.plan import PrunePlan

log = logging.getLogger(__name__)


@dataclass
class PruneResult:
    plan: PrunePlan
    stats: list[BlockStats]          # statistics the corrections were computed from
    dense_stats: list[BlockStats]    # dense-model statistics (re-budget without recalibrating)
    sensitivity: list[dict] | None
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)  # whole-model methods: what they changed


# --- damage weighting ---------------------------------------------------------------------------


# --- head configurations under grouped-query attention -----------------------------------------


# --- per-layer analysis --------------------------------------------------------------------------


# --- the pipeline ---------------------------------------------------------------------------------



@dataclass
class Calibration:
    """Everything the dense model's calibration pass produced; enough to plan and apply any
    one-shot budget (STAT or a baseline) without touching the data again."""

    dense_stats: list[BlockStats]
    sensitivity: list[dict] | None
    analyses: list[LayerAnalysis]
    timings: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # statistics only some methods need (see PruningMethod.prepare)
    centered: bool = False  # analyses made on the centred statistics (PruneConfig.intercept)
    #: Statistics of another calibration text that the corrections are fitted on (``None``: the same
    #: text the units were selected on). See :func:`with_corrections_from`.
    correction_stats: list[BlockStats] | None = None
    #: What was computed (``ALL_NEEDS`` or a method's ``calibration_needs``).
    needs: frozenset = frozenset({"block_stats", "sensitivity", "analyses"})

    @property
    def fit_stats(self) -> list[BlockStats]:
        """The statistics every correction is fitted on: ``correction_stats`` or the selection's own."""
        return self.dense_stats if self.correction_stats is None else self.correction_stats

    def analyses_for(self, adapter: ModelAdapter, centered: bool) -> list[LayerAnalysis]:
        """The per-layer analyses on centred or plain statistics (the other kind computed once, kept)."""
        if centered == self.centered:
            return self.analyses
        key = f"analyses_centered={centered}"
        if key not in self.extras:
            self.extras[key] = [analyse_layer(adapter, i, s, None if self.sensitivity is None else self.sensitivity[i],
                                              centered) for i, s in enumerate(self.dense_stats)]
        return self.extras[key]


#: Everything a calibration can compute (see ``PruningMethod.calibration_needs``).
ALL_NEEDS = frozenset({"block_stats", "sensitivity", "analyses"})


def calibrate(model, windows: "torch.Tensor | CalibrationSet", config: PruneConfig,
              progress: ProgressFn | None = None, runner: LayerwiseRunner | None = None,
              needs: frozenset[str] = ALL_NEEDS) -> Calibration:
    """Dense statistics, loss sensitivities and per-layer decompositions (the model is not changed).

    ``needs``: the parts to compute (a method's ``calibration_needs``): without ``"sensitivity"`` the
    gradient pass is skipped, without ``"analyses"`` STAT's per-layer decompositions; the block
    statistics are always computed.

    Only ``config.sensitivity_samples``, ``config.batch_size`` and ``config.intercept`` (which
    statistics the decompositions use) matter here.

    Under ``torch.distributed`` (see :mod:`stat_core.calibration.distributed`) every rank passes the *whole*
    ``windows`` and calibrates on its shard (a given ``runner`` must hold that shard); the sums
    are all-reduced (each block's as soon as it is done) and normalised once, so every rank ends
    with the statistics one process would compute. In one-shot mode only rank 0 needs the
    per-layer analyses: the other ranks leave them out.
    """
    adapter = get_adapter(model)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    fisher = None
    data = CalibrationSet.wrap(windows)
    distributed.check_shardable(len(data))  # one sentence before any work
    n_sens = sensitivity_windows(data, config.sensitivity_samples) if "sensitivity" in needs else 0
    if n_sens > 0:
        chosen = data.spread(n_sens) if data.labels is not None else data.subset(n_sens)
        # Plain sums on each rank's share of the chosen windows (a rank may get none), divided once.
        local, first = distributed.shard(chosen, config.sensitivity_batch, allow_empty=True)
        notify(progress, "sensitivity", 0, max(len(local), 1))
        sums = sensitivity_sums(model, adapter, local, config.sensitivity_batch, config.sensitivity_labels,
                                first_index=first, memory_savers=config.memory_savers, progress=progress)
        fisher = distributed.all_reduce_sensitivity(sums).normalised()
        del sums
        release_memory()  # the backward pass's freed blocks, before the statistics stack on them
        notify(progress, "sensitivity", max(len(local), 1), max(len(local), 1))
    timings["sensitivity"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    runner = runner or LayerwiseRunner(model, adapter, distributed.shard(data, config.batch_size)[0], config.batch_size)
    dense_stats = []
    hidden = runner.hidden
    for layer in range(adapter.num_layers):
        stats, hidden = runner.collect_block(layer, hidden)
        dense_stats.append(distributed.all_reduce_stats([stats])[0])
        notify(progress, "calibrate", layer + 1, adapter.num_layers)
    del hidden  # the last block's outputs: nothing reads them
    release_memory()
    timings["calibrate"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    analyses = []
    to_analyse = dense_stats if distributed.is_main() or config.mode != "one-shot" else []  # one-shot: rank 0 plans
    if "analyses" not in needs:
        to_analyse = []
    for i, s in enumerate(to_analyse):
        analyses.append(analyse_layer(adapter, i, s, None if fisher is None else fisher[i], config.intercept))
        notify(progress, "analyse", i + 1, adapter.num_layers)
    timings["analyse"] = time.perf_counter() - t2
    return Calibration(dense_stats=dense_stats, sensitivity=fisher, analyses=analyses, timings=timings,
                       centered=config.intercept, needs=frozenset(needs) | {"block_stats"})


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
    needs = frozenset(needs) | {"block_stats"}
    if needs != ALL_NEEDS:
        spectra = False  # the inspect views' spectra come with STAT's analyses only
    if not calibration_cache.enabled() or distributed.is_distributed():
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
    tensors, info = _analyses_payload(calibration.analyses)
    if spectra:
        tensors.update(_spectra_payload(calibration_spectra(model, calibration)))  # computed just above
    path = calibration_cache.write(key, calibration.dense_stats, calibration.sensitivity, calibration.timings,
                                   tensors, info)
    calibration.extras["disk_cache"] = {"hit": False, "file": None if path is None else str(path)}
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


def _analyses_payload(analyses: list[LayerAnalysis]) -> tuple[dict, dict]:
    """The per-layer analyses as tensors and JSON for a cache entry."""
    tensors = {}
    for i, an in enumerate(analyses):
        tensors[f"analysis.{i}.neuron_order"] = an.neuron_order
        tensors[f"analysis.{i}.mlp_damage"] = an.mlp_damage
    heads = [{"head_configs": an.head_configs, "head_order": [int(h) for h in an.head_order]} for an in analyses]
    return tensors, {"analyses": heads}


def _calibrate_with(model, windows, config: PruneConfig, progress: ProgressFn | None,
                    runner: LayerwiseRunner | None, spectra: bool, needs: frozenset = ALL_NEEDS) -> Calibration:
    """:func:`calibrate`, and with ``spectra`` the inspect views' spectra (timed in ``timings["spectra"]``)."""
    calibration = calibrate(model, windows, config, progress, runner, needs)
    if spectra:
        t = time.perf_counter()
        notify(progress, "spectra", 0, 1)
        calibration_spectra(model, calibration)
        calibration.timings["spectra"] = time.perf_counter() - t
    return calibration


def _spectra_payload(spectra: list[dict]) -> dict:
    """The inspect views' spectra as float64 tensors (their lists come back exactly)."""
    tensors = {}
    for i, layer in enumerate(spectra):
        for kind, sp in layer.items():
            for name in ("singular_values", "id_residual", "svd_residual"):
                tensors[f"spectra.{i}.{kind}.{name}"] = torch.tensor(getattr(sp, name), dtype=torch.float64)
            tensors[f"spectra.{i}.{kind}.unit_width"] = torch.tensor([sp.unit_width], dtype=torch.int64)
    return tensors


def _spectra_from(tensors: dict, n_layers: int) -> list[dict] | None:
    if "spectra.0.attn.singular_values" not in tensors:
        return None
    return [{kind: Spectrum(layer=i, kind=kind, unit_width=int(tensors[f"spectra.{i}.{kind}.unit_width"][0]),
                            **{name: tensors[f"spectra.{i}.{kind}.{name}"].tolist()
                               for name in ("singular_values", "id_residual", "svd_residual")})
             for kind in ("attn", "mlp")} for i in range(n_layers)]


def _calibration_from_entry(model, entry, config: PruneConfig, key, spectra: bool = False,
                            needs: frozenset = ALL_NEEDS) -> Calibration | None:
    """The :class:`Calibration` a cache entry holds, or None (logged) when it does not fit ``model``
    (or lacks the ``spectra`` asked for)."""
    adapter = get_adapter(model)
    try:
        heads = entry.info["analyses"]
        if len(entry.dense_stats) != adapter.num_layers or \
                len(heads) != (adapter.num_layers if "analyses" in needs else 0):
            raise ValueError(f"{len(entry.dense_stats)} blocks cached for a {adapter.num_layers}-layer model")
        analyses = []
        for i, (stats, h) in enumerate(zip(entry.dense_stats, heads)):
            if stats.attn_gram.shape[0] != adapter.attn_out_proj(i).in_features or \
                    stats.mlp_gram.shape[0] != adapter.mlp_out_proj(i).in_features:
                raise ValueError(f"layer {i}'s cached statistics do not fit its projections")
            analyses.append(LayerAnalysis(h["head_configs"], h["head_order"],
                                          entry.tensors[f"analysis.{i}.neuron_order"],
                                          entry.tensors[f"analysis.{i}.mlp_damage"]))
        extras = {"disk_cache": {"hit": True, "file": str(key.path), "computed_timings": entry.timings}}
        if spectra:
            cached = _spectra_from(entry.tensors, adapter.num_layers)
            if cached is None:
                log.info("The cached calibration %s has no spectra; recomputing it with them", key.path.name)
                return None
            extras[f"spectra_centered={config.intercept}"] = cached
    except Exception as exc:  # whatever does not fit is recomputed
        log.warning("Ignoring the cached calibration %s and recomputing it: %s", key.path.name, exc)
        return None
    return Calibration(dense_stats=entry.dense_stats, sensitivity=entry.sensitivity, analyses=analyses,
                       centered=config.intercept, extras=extras, needs=needs)


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
    """One-shot prune of the dense ``model`` in place from a cached :class:`Calibration`."""
    if config.mode != "one-shot":
        raise ValueError("re-planning from cached statistics is one-shot only; propagate mode re-calibrates each layer")
    t0 = time.perf_counter()
    plan = plan_pruning(model, calibration, config, model_name, calibration_info, data, progress)
    t1 = time.perf_counter()
    apply_plan_(model, plan, calibration.fit_stats, progress)
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
    labels). ``correction_windows``: one-shot only, the corrections fitted on these windows' statistics
    instead (:func:`with_corrections_from`).

    Returns the plan and the statistics behind it. With ``mode="propagate"`` each layer is
    re-calibrated on the outputs of the already pruned and corrected layers before it.
    Whole-model methods (SliceGPT) return ``plan=None`` and their summary in ``info``. With ``cache``
    a one-shot prune reads (or stores) the dense calibration in the on-disk cache
    (:func:`cached_calibration`).

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
    if correction_windows is not None and config.mode != "one-shot":
        raise ValueError(f"{config.mode} mode re-fits each correction on the pruned model's own calibration text; "
                         "corrections from a second text are one-shot only")
    if config.mode != "one-shot" and not hasattr(method, "relabel") and method.name != "stat":
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
    plan = plan_from_analyses(adapter, calib.analyses, config, model_name, calibration_info or {})
    timings = {**calib.timings, "allocate": time.perf_counter() - t2}
    t3 = time.perf_counter()
    if config.method == "stat":
        plan.correction = stat_correction(config)
        propagate = _sequential_ if config.mode == "sequential" else _propagate_
        used_stats = propagate(model, adapter, runner, plan, calib.sensitivity, progress)
    else:
        # Baselines use the units STAT would keep (or its counts): run STAT's propagation on a
        # scratch copy, then cut this model by that plan without any correction.
        scratch = copy.deepcopy(model)
        plan.correction = stat_correction(config)
        scratch_runner = copy.copy(runner)
        scratch_runner.model, scratch_runner.adapter = scratch, get_adapter(scratch)
        propagate = _sequential_ if config.mode == "sequential" else _propagate_
        propagate(scratch, scratch_runner.adapter, scratch_runner, plan, calib.sensitivity, progress)
        del scratch
        plan = method.relabel(model, plan, calib)
        apply_plan_(model, plan, None)
        used_stats = calib.dense_stats
    timings["apply"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    del runner
    return PruneResult(plan=plan, stats=used_stats, dense_stats=calib.dense_stats, sensitivity=calib.sensitivity,
                       timings=timings)


