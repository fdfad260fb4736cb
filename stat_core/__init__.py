"""STAT: shrink trained transformers without fine-tuning.

The everyday entry points, importable from the package (loaded on first use, so
``import stat_core.paths`` stays light): ``stat_prune_``, ``PruneConfig``, the stages of one prune
(``calibrate``, ``cached_calibration``, ``with_corrections_from`` → ``Calibration``; ``plan_pruning``,
``prune_from_calibration_``), ``export_pruned``, ``export_model`` (safetensors / gguf / onnx), ``load_pruned``,
``load_model``; the method registry
(``method_names``, ``get_method``) and the evaluation suite (``SuiteConfig``, ``build_reference``,
``evaluate_suite``).
"""

from importlib import import_module

_EXPORTS = {
    "stat_prune_": "pipeline", "calibrate": "pipeline", "prune_from_calibration_": "pipeline", "plan_pruning": "pipeline",
    "cached_calibration": "pipeline", "with_corrections_from": "pipeline", "Calibration": "calibration.stage",
    "PruneConfig": "config", "export_pruned": "export.hf", "load_pruned": "export.hf", "export_model": "export.api",
    "load_model": "models", "get_method": "methods.registry", "method_names": "methods.registry",
    "SuiteConfig": "evaluation.suite", "build_reference": "evaluation.suite", "evaluate_suite": "evaluation.suite",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'stat_core' has no attribute {name!r}")
