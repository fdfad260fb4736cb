"""Pruning methods as plug-ins: STAT, the published retraining-free peers and simple baselines."""

from .base import CORRECTIONS, MethodNotApplicable, PruningMethod
from .registry import BASELINES, PEERS, get_method, method_names

__all__ = ["CORRECTIONS", "MethodNotApplicable", "PruningMethod", "BASELINES", "PEERS", "get_method", "method_names"]
