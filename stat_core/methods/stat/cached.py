"""STAT's part of a calibration: its per-layer analyses (the decompositions), made once from the
stage's statistics, and their form in the on-disk calibration cache (with the inspect views'
spectra, which come from the same decompositions)."""

from __future__ import annotations

import torch

from stat_core.adapters import ModelAdapter
from stat_core.calibration import distributed
from stat_core.methods.stat.analysis import LayerAnalysis, analyse_layer
from stat_core.methods.stat.explain import Spectrum, calibration_spectra
from stat_core.progress import ProgressFn, notify


def analyse_(adapter: ModelAdapter, calibration, config, progress: ProgressFn | None = None) -> None:
    """Fill ``calibration.analyses`` (STAT's decomposition of every layer, on centred statistics with
    ``config.intercept``) from its statistics and sensitivities; timed in ``timings["analyse"]``.
    One-shot under ``torch.distributed``: only rank 0 plans, so the other ranks leave them out."""
    import time
    t = time.perf_counter()
    analyses = []
    if distributed.is_main() or config.mode != "one-shot":
        sens = calibration.sensitivity
        for i, stats in enumerate(calibration.dense_stats):
            analyses.append(analyse_layer(adapter, i, stats, None if sens is None else sens[i], config.intercept))
            notify(progress, "analyse", i + 1, adapter.num_layers)
    calibration.analyses, calibration.centered = analyses, config.intercept
    calibration.needs = calibration.needs | {"analyses"}
    calibration.timings["analyse"] = time.perf_counter() - t


def spectra_(model, calibration, progress: ProgressFn | None = None) -> None:
    """The inspect views' singular values, computed now and timed in ``timings["spectra"]``."""
    import time
    t = time.perf_counter()
    notify(progress, "spectra", 0, 1)
    calibration_spectra(model, calibration)
    calibration.timings["spectra"] = time.perf_counter() - t


def to_cache(model, calibration, spectra: bool) -> tuple[dict, dict]:
    """The analyses (and with ``spectra`` the spectra) as tensors and JSON for a cache entry."""
    tensors = {}
    for i, an in enumerate(calibration.analyses):
        tensors[f"analysis.{i}.neuron_order"] = an.neuron_order
        tensors[f"analysis.{i}.mlp_damage"] = an.mlp_damage
    heads = [{"head_configs": an.head_configs, "head_order": [int(h) for h in an.head_order]}
             for an in calibration.analyses]
    if spectra:
        for i, layer in enumerate(calibration_spectra(model, calibration)):  # computed already: read back
            for kind, sp in layer.items():
                for name in ("singular_values", "id_residual", "svd_residual"):
                    tensors[f"spectra.{i}.{kind}.{name}"] = torch.tensor(getattr(sp, name), dtype=torch.float64)
                tensors[f"spectra.{i}.{kind}.unit_width"] = torch.tensor([sp.unit_width], dtype=torch.int64)
    return tensors, {"analyses": heads}


def from_cache(adapter: ModelAdapter, entry, calibration, with_analyses: bool, spectra: bool) -> bool:
    """Put a cache entry's analyses (``with_analyses``) and spectra (``spectra``) into
    ``calibration``; False when the entry has no spectra to give (recompute). ValueError when the
    entry does not fit the model."""
    heads = entry.info["analyses"]
    if len(heads) != (adapter.num_layers if with_analyses else 0):
        raise ValueError(f"{len(heads)} layers' analyses cached for a {adapter.num_layers}-layer model")
    calibration.analyses = [LayerAnalysis(h["head_configs"], h["head_order"],
                                          entry.tensors[f"analysis.{i}.neuron_order"],
                                          entry.tensors[f"analysis.{i}.mlp_damage"]) for i, h in enumerate(heads)]
    if spectra:
        if "spectra.0.attn.singular_values" not in entry.tensors:
            return False
        calibration.extras[f"spectra_centered={calibration.centered}"] = [
            {kind: Spectrum(layer=i, kind=kind, unit_width=int(entry.tensors[f"spectra.{i}.{kind}.unit_width"][0]),
                            **{name: entry.tensors[f"spectra.{i}.{kind}.{name}"].tolist()
                               for name in ("singular_values", "id_residual", "svd_residual")})
             for kind in ("attn", "mlp")} for i in range(adapter.num_layers)]
    return True
