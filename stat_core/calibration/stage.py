"""The calibration stage: what a method needs of the dense model, computed once into one object.

A method declares its needs (:attr:`stat_core.methods.base.PruningMethod.calibration_needs`):
``"block_stats"`` (always: each block's Grams and sums, what every correction and budget reads),
``"sensitivity"`` (the gradient pass: a loss weight per block output) and ``"analyses"`` (a
method's own per-layer analysis, made from the first two by the method: STAT's decompositions).
:func:`collect` computes the first two and nothing else; the pipeline
(:func:`stat_core.pipeline.calibrate`) adds the analyses of the method that asked for them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from stat_core.adapters import get_adapter
from stat_core.calibration import distributed
from stat_core.calibration.sizes import sensitivity_windows
from stat_core.calibration.statistics import (
    BlockStats,
    CalibrationSet,
    LayerwiseRunner,
    release_memory,
    sensitivity_sums,
)
from stat_core.progress import ProgressFn, notify

#: Everything a calibration can compute (see ``PruningMethod.calibration_needs``).
ALL_NEEDS = frozenset({"block_stats", "sensitivity", "analyses"})


@dataclass
class Calibration:
    """Everything the dense model's calibration pass produced; enough to plan and apply any
    one-shot budget (STAT or a peer) without touching the data again."""

    dense_stats: list[BlockStats]
    sensitivity: list[dict] | None
    #: the per-layer analyses of the method that needed them (STAT's :class:`LayerAnalysis`), or []
    analyses: list = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    extras: dict = field(default_factory=dict)  # statistics only some methods need (see PruningMethod.prepare)
    centered: bool = False  # analyses made on the centred statistics (PruneConfig.intercept)
    #: Statistics of another calibration text that the corrections are fitted on (``None``: the same
    #: text the units were selected on). See :func:`stat_core.pipeline.with_corrections_from`.
    correction_stats: list[BlockStats] | None = None
    #: What was computed (``ALL_NEEDS`` or a method's ``calibration_needs``).
    needs: frozenset = ALL_NEEDS

    @property
    def fit_stats(self) -> list[BlockStats]:
        """The statistics every correction is fitted on: ``correction_stats`` or the selection's own."""
        return self.dense_stats if self.correction_stats is None else self.correction_stats


def collect(model, windows: "torch.Tensor | CalibrationSet", config, progress: ProgressFn | None = None,
            runner: LayerwiseRunner | None = None, needs: frozenset[str] = ALL_NEEDS) -> Calibration:
    """The dense block statistics and, when ``needs`` has ``"sensitivity"``, the loss sensitivities
    (the gradient pass); the model is not changed. No analyses (``needs`` is recorded as computed
    without them); with neither statistics nor sensitivities asked for, nothing is run and the
    calibration is empty. Only ``config.sensitivity_samples``, ``sensitivity_batch``, ``sensitivity_labels``,
    ``memory_savers`` and ``batch_size`` are read.

    Under ``torch.distributed`` (see :mod:`stat_core.calibration.distributed`) every rank passes the
    *whole* ``windows`` and calibrates on its shard (a given ``runner`` must hold that shard); the sums
    are all-reduced (each block's as soon as it is done) and normalised once, so every rank ends with
    the statistics one process would compute."""
    if not {"block_stats", "sensitivity"} & set(needs):  # a method that reads no statistics: no pass at all
        return Calibration(dense_stats=[], sensitivity=None, centered=config.intercept, needs=frozenset())
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
    return Calibration(dense_stats=dense_stats, sensitivity=fisher, timings=timings,
                       centered=config.intercept, needs=(frozenset(needs) - {"analyses"}) | {"block_stats"})
