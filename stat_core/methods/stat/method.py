"""STAT (Flynn et al., arXiv 2406.00061): the project's own method.

Scores: interpolative decompositions of the calibration activations (pivoted Cholesky on the
Gram of each MLP's intermediate activations, columns weighted by their outgoing norm; greedy
output-aware block selection of attention heads), so each layer has an exact damage curve.
Allocation: one global budget over all layers' damage curves, each weighted by a gradient second
moment of the loss at the block's output (``stat_core.prune.calibrate``), Lagrangian + top-up.
Correction: the least-squares interpolation of the removed units from the kept ones, folded into
the output projection (``W_out ← W_out Tᵀ``); with ``PruneConfig.intercept`` (off by default: neutral on
the suite, see benchmarks/results/stat_ablation.md) the fit
has an intercept, ``Z ≈ Z_I T + 1cᵀ``, whose part ``W_out c`` becomes an output bias, and the
decompositions rank units on the centred statistics (the damage left after that affine fit).
"""

from __future__ import annotations

from stat_core.adapters import get_adapter
from stat_core.methods.base import PruningMethod
from stat_core.methods.stat.analysis import plan_from_analyses, stat_correction


class Stat(PruningMethod):
    name = "stat"
    label = "STAT"
    summary = "interpolative decompositions, loss-weighted global allocation, least-squares correction"
    correction = "least-squares"  # "affine" with PruneConfig.intercept
    uses_stat_analysis = True

    def adds_output_bias(self, config):
        return config.intercept

    def plan(self, model, calibration, config, model_name="", calibration_info=None):

        adapter = get_adapter(model)
        analyses = calibration.analyses_for(adapter, config.intercept)
        plan = plan_from_analyses(adapter, analyses, config, model_name, calibration_info or {})
        plan.method, plan.correction = self.name, stat_correction(config)
        return plan
