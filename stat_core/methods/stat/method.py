"""STAT (Flynn et al., arXiv 2406.00061): the project's own method.

Scores: interpolative decompositions of the calibration activations (pivoted Cholesky on the
Gram of each MLP's intermediate activations, columns weighted by their outgoing norm; greedy
output-aware block selection of attention heads), so each layer has an exact damage curve.
Allocation: one global budget over all layers' damage curves, each weighted by a gradient second
moment of the loss at the block's output (``stat_core.pipeline.calibrate``), Lagrangian + top-up;
optionally refined by a search on the network's own KL to dense (:mod:`.search`).
Correction: the least-squares interpolation of the removed units from the kept ones, folded into
the output projection (``W_out ← W_out Tᵀ``); with ``PruneConfig.intercept`` (off by default: neutral on
the suite, see benchmarks/results/stat_ablation.md) the fit
has an intercept, ``Z ≈ Z_I T + 1cᵀ``, whose part ``W_out c`` becomes an output bias, and the
decompositions rank units on the centred statistics (the damage left after that affine fit).
Optionally a vocabulary bias restores the dense model's average next-token distribution
(:mod:`stat_core.surgery.output_prior`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from stat_core.adapters import get_adapter
from stat_core.adapters.registry import is_encoder
from stat_core.methods.base import PruningMethod
from stat_core.methods.stat.analysis import (
    analyse_layer,
    analyses_for,
    build_block_options,
    layer_plans,
    plan_from_analyses,
    plan_from_choice,
    stat_correction,
)
from stat_core.methods.stat.explain import calibration_induction_scores
from stat_core.methods.stat.propagate import layerwise_plan, run_layerwise_
from stat_core.methods.stat.search import (
    SEARCH_TOKENS,
    SEARCH_WINDOWS,
    search_allocation,
)
from stat_core.surgery.budget import allocate
from stat_core.surgery.output_prior import (
    fit_output_prior_,
    mean_log_distribution,
    prior_windows,
)


@dataclass(frozen=True)
class StatSettings:
    """STAT's options: ``search``, candidates of a budget search on the KL to the dense model (0: the
    allocator's counts as they are); ``search_seed``; ``output_prior``, a vocabulary bias restoring the
    dense model's average next-token distribution (decoders); ``protect_induction``, heads kept for
    their induction score; ``search_windows`` × ``search_tokens``, the calibration windows (and their
    first tokens) the search scores candidates on."""

    search: int = 0
    search_seed: int = 0
    output_prior: bool = False
    protect_induction: int = 0
    search_windows: int = SEARCH_WINDOWS
    search_tokens: int = SEARCH_TOKENS

    def __post_init__(self):
        for name in ("search_windows", "search_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"STAT's {name} takes a whole number ≥ 1, got {value!r}")
        if isinstance(self.search, bool) or not isinstance(self.search, int) or self.search < 0:
            raise ValueError(f"STAT's search takes a whole number of candidates ≥ 0 (0: off), got {self.search!r}")
        if isinstance(self.protect_induction, bool) or not isinstance(self.protect_induction, int) \
                or self.protect_induction < 0:
            raise ValueError(f"STAT's protect_induction takes a whole number of heads ≥ 0 (0: off), got "
                             f"{self.protect_induction!r}")


class Stat(PruningMethod):
    name = "stat"
    label = "STAT"
    summary = "interpolative decompositions, loss-weighted global allocation, least-squares correction"
    correction = "least-squares"  # "affine" with PruneConfig.intercept
    uses_stat_analysis = True
    streams = True
    Settings = StatSettings

    def adds_output_bias(self, config):
        return config.intercept

    def quick_settings(self, settings):
        if settings is not None and settings.search:
            return (dataclasses.replace(settings, search=0),
                    " (without the budget search, which takes minutes: press Prune to search at this budget)")
        return settings, ""

    def check_config(self, config) -> None:
        settings = self.settings_of(config)
        if (settings.search or settings.output_prior) and config.mode != "one-shot":
            raise ValueError(f"STAT's search and output prior run in one-shot mode only; use --mode one-shot "
                             f"(this is {config.mode})")

    def prepare(self, model, data, calibration) -> None:
        # The windows a search scores candidates on and the output prior is fitted on (cheap: no compute).
        if data is not None:
            calibration.extras["stat_windows"] = data

    def _windows(self, calibration, what: str):
        data = calibration.extras.get("stat_windows")
        if data is None:
            raise ValueError(f"STAT's {what} needs the calibration windows; pass them (data=...) when planning "
                             "from a cached calibration")
        return data

    def plan(self, model, calibration, config, model_name="", calibration_info=None):
        settings = self.settings_of(config)
        adapter = get_adapter(model)
        if (settings.search or settings.output_prior or settings.protect_induction) and is_encoder(model):
            raise ValueError("STAT's search, output prior and induction protection score next-token behaviour: they "
                             "apply to decoder language models only; turn them off for this encoder")
        analyses = analyses_for(calibration, adapter, config.intercept)
        protected = self._protected(model, calibration, settings.protect_induction)
        if settings.output_prior:  # the dense model's average distribution, before it is cut
            key = "stat_dense_prior"
            data = self._windows(calibration, "output prior")
            if key not in calibration.extras:
                calibration.extras[key] = mean_log_distribution(model, prior_windows(data.input_ids),
                                                                mask=_mask(prior_windows, data))
        if not settings.search:
            plan = plan_from_analyses(adapter, analyses, config, model_name, calibration_info or {}, protected)
        else:
            if config.uniform:
                raise ValueError("STAT's search varies the counts per layer, which a uniform plan cannot; "
                                 "turn off uniform or the search")
            data = self._windows(calibration, "search")
            blocks = build_block_options(adapter, analyses, config, protected)
            start = allocate(blocks, config.sparsity)
            rows, tokens = settings.search_windows, settings.search_tokens
            windows = data.input_ids[:rows, :tokens]
            mask = None if data.attention_mask is None else data.attention_mask[:rows, :tokens]
            result = search_allocation(
                model, blocks, start, config.sparsity,
                lambda layer, key: layer_plans(adapter, analyses, blocks, _choice_with(len(blocks), layer, key),
                                               [layer])[0],
                calibration.fit_stats, windows, settings.search, settings.search_seed, mask,
                stat_correction(config), None, calibration.extras.get("progress"))
            plan = plan_from_choice(adapter, analyses, blocks, result.alloc, config, model_name,
                                    calibration_info or {}, {"search": result.summary()})
        plan.method, plan.correction = self.name, stat_correction(config)
        return plan

    layerwise = True

    def prune_layerwise_(self, model, runner, calibration, config, model_name="", calibration_info=None,
                         progress=None):
        adapter = get_adapter(model)
        plan = layerwise_plan(adapter, calibration, config, model_name, calibration_info)
        return plan, run_layerwise_(model, adapter, runner, plan, calibration.sensitivity, config.mode, progress)

    def layer_summary(self, adapter, layer, stats, config, reload=None, drop_weights=None):
        """Streaming: the layer's analysis from its dense statistics alone (no gradient sensitivity:
        residual-energy weighting)."""
        return analyse_layer(adapter, layer, stats, None, config.intercept, reload=reload, drop_weights=drop_weights)

    def plan_from_summaries(self, adapter, summaries, config, model_name="", calibration_info=None):
        plan = plan_from_analyses(adapter, summaries, config, model_name, calibration_info or {})
        plan.method, plan.correction = self.name, stat_correction(config)
        return plan

    @staticmethod
    def _protected(model, calibration, n: int) -> dict[int, set[int]] | None:
        """The ``n`` heads with the highest induction scores of the dense ``model``, by layer."""
        if not n:
            return None
        scores = calibration_induction_scores(model, calibration)
        ranked = sorted(((s, layer, head) for layer, row in enumerate(scores) for head, s in enumerate(row)),
                        reverse=True)[:n]
        protected: dict[int, set[int]] = {}
        for _, layer, head in ranked:
            protected.setdefault(layer, set()).add(head)
        return protected

    def finish_(self, model, calibration, config) -> dict:
        settings = self.settings_of(config)
        if not settings.output_prior:
            return {}
        data = self._windows(calibration, "output prior")
        return {"output_prior": fit_output_prior_(model, calibration.extras["stat_dense_prior"],
                                                  prior_windows(data.input_ids), mask=_mask(prior_windows, data))}


def _mask(cut, data):
    return None if data.attention_mask is None else cut(data.attention_mask)


def _choice_with(n_blocks: int, layer: int, key: tuple) -> list[int]:
    """A choice vector whose ``layer`` blocks are ``key`` (the others are not read)."""
    choice = [0] * n_blocks
    choice[2 * layer], choice[2 * layer + 1] = key
    return choice
