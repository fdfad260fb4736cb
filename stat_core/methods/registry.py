"""Every pruning method, by name: the one list the CLI, the app and the benchmarks read.

Add a method by writing one module with a :class:`~stat_core.methods.base.PruningMethod` subclass
and one line in ``_METHODS``. Entries name the class by its import path and are loaded on first
use, so the list itself imports nothing (configs can validate a name without loading every method).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from stat_core.methods.base import PruningMethod

#: name -> "module:Class", STAT first.
_METHODS: dict[str, str] = {
    "stat": "stat_core.methods.stat.method:Stat",
    "no-correction": "stat_core.methods.baselines:NoCorrection",
    "magnitude": "stat_core.methods.baselines:Magnitude",
    "activation-norm": "stat_core.methods.baselines:ActivationNorm",
    "flap": "stat_core.methods.flap:Flap",
    "wanda-sp": "stat_core.methods.wanda_sp:WandaSP",
    "slimgpt": "stat_core.methods.slimgpt:SlimGPT",
    "llm-pruner": "stat_core.methods.llm_pruner:LLMPruner",
    "slicegpt": "stat_core.methods.slicegpt:SliceGPT",
    "block-movement": "stat_core.methods.block_movement:BlockMovement",
}

#: The project's own method (tables and figures single it out).
OWN_METHOD = "stat"
#: The published peers, then the simple baselines.
PEERS = ("flap", "wanda-sp", "slimgpt", "llm-pruner", "slicegpt")
BASELINES = ("no-correction", "magnitude", "activation-norm")
#: Methods that fine-tune (minutes): run only when asked for by name.
TRAINED = ("block-movement",)

_loaded: dict[str, "PruningMethod"] = {}


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def check_method_name(name: str) -> None:
    """ValueError listing the methods when ``name`` is not one."""
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(_METHODS)}")


def get_method(name: str) -> "PruningMethod":
    check_method_name(name)
    if name not in _loaded:
        module, _, cls = _METHODS[name].partition(":")
        method = getattr(import_module(module), cls)()
        if method.name != name:
            raise RuntimeError(f"registry entry {name!r} loads a method named {method.name!r}")
        _loaded[name] = method
    return _loaded[name]
