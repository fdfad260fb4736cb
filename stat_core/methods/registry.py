"""Every pruning method, by name: the one list the CLI, the app and the benchmarks read.

Add a method by writing one module with a :class:`~stat_core.methods.base.PruningMethod` subclass
and one line here.
"""

from __future__ import annotations

from .base import PruningMethod
from .baselines import ActivationNorm, Magnitude, NoCorrection
from .block_movement import BlockMovement
from .flap import Flap
from .llm_pruner import LLMPruner
from .slicegpt import SliceGPT
from .slimgpt import SlimGPT
from .stat import Stat
from .wanda_sp import WandaSP

_METHODS: dict[str, PruningMethod] = {m.name: m for m in (
    Stat(), NoCorrection(), Magnitude(), ActivationNorm(),
    Flap(), WandaSP(), SlimGPT(), LLMPruner(), SliceGPT(), BlockMovement(),
)}

#: STAT first, then the published peers, then the simple baselines.
PEERS = ("flap", "wanda-sp", "slimgpt", "llm-pruner", "slicegpt")
BASELINES = ("no-correction", "magnitude", "activation-norm")
#: Methods that fine-tune (minutes): run only when asked for by name.
TRAINED = ("block-movement",)


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def get_method(name: str) -> PruningMethod:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(_METHODS)}") from None
