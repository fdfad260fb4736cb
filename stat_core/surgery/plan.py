"""PrunePlan: what to keep in every layer, and why. Plain data; round-trips through JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

PLAN_VERSION = 1


@dataclass
class LayerPlan:
    """One layer's decision.

    ``attn_options``: the head configurations the allocator could choose from, each
    ``{"heads": n, "kv_heads": g, "params": p, "damage": d}``; ``mlp_damage[k]``: predicted damage of
    keeping k neurons (k = 0..d_ff), the per-layer decay curve; ``head_order``: heads in the order
    the decomposition picked them (most important first).
    """

    layer: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_neurons: list[int]
    head_order: list[int] = field(default_factory=list)
    attn_options: list[dict] = field(default_factory=list)
    mlp_damage: list[float] = field(default_factory=list)


#: The correction of a plan written before plans named theirs: STAT's least squares, else none.
_CORRECTION_BEFORE_THE_FIELD = {"stat": "least-squares"}


@dataclass
class PrunePlan:
    model: str
    method: str
    mode: str
    budget: dict
    calibration: dict
    layers: list[LayerPlan]
    version: int = PLAN_VERSION
    #: how removed units are compensated (``stat_core.methods.CORRECTIONS``); plans written before
    #: this field existed: least squares for STAT, nothing for the baselines
    correction: str | None = None
    correction_ridge: float | None = None  # relative ridge of a least-squares correction (None: tiny default)

    def __post_init__(self):
        if self.correction is None:
            self.correction = _CORRECTION_BEFORE_THE_FIELD.get(self.method, "none")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "PrunePlan":
        if data.get("version") != PLAN_VERSION:
            raise ValueError(f"plan version {data.get('version')} is not supported (expected {PLAN_VERSION})")
        layers = [LayerPlan(**layer) for layer in data["layers"]]
        return cls(**{**data, "layers": layers})

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=1)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "PrunePlan":
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))

    def kept_summary(self) -> list[dict]:
        return [{"layer": lp.layer, "heads": len(lp.kept_heads), "kv_heads": len(lp.kept_kv_heads),
                 "neurons": len(lp.kept_neurons)} for lp in self.layers]
