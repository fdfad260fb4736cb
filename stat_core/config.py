"""What to remove and how: the prune verb's configuration."""

from __future__ import annotations

from dataclasses import dataclass

from stat_core.calibration.sizes import SENSITIVITY_BATCH
from stat_core.methods.registry import check_method_name

# one-shot: every statistic from the dense model (the app re-budgets from them instantly).
# propagate: each layer re-selected and corrected on the pruned path, reproducing the pruned path's
#   own activations (the paper's layer-by-layer variant).
# sequential: like propagate, but each correction maps the pruned path's kept units onto the *dense*
#   model's activations (cross products of the two paths), so it also undoes the error the earlier
#   pruned layers let through; attention is cut before the MLP's statistics are taken.
MODES = ("propagate", "one-shot", "sequential")


BUDGET_KINDS = ("params", "flops")


@dataclass(frozen=True)
class PruneConfig:
    """What to remove and how. ``sparsity``: fraction of block parameters (or FLOPs) to remove."""

    sparsity: float
    budget_kind: str = "params"
    flops_seq_len: int = 512
    method: str = "stat"
    mode: str = "one-shot"
    prune_heads: bool = True
    prune_neurons: bool = True
    sensitivity_samples: int | None = None  # None: enough windows for SENSITIVITY_TOKENS real tokens
    batch_size: int = 8
    uniform: bool = False  # same head / KV-head / neuron counts in every layer (stock-loadable export)
    # STAT's correction with an intercept: Z ≈ Z_I T + 1cᵀ, the mean part folded into an output bias;
    # the decompositions then run on the centred statistics (see BlockStats.second_moment). Off by
    # default: on SmolLM2 it measured neutral-to-slightly-worse on the suite (benchmarks/stat_ablation.py).
    intercept: bool = False
    # Next-token labels of the gradient pass: "data" (the text: empirical Fisher) or "model" (sampled
    # from the dense model: the Fisher of its own distribution, i.e. the curvature of KL to dense).
    sensitivity_labels: str = "data"
    # The gradient pass's windows per backward pass, and its memory savers (each block's activations
    # recomputed, the cross-entropy in chunks: one block and one chunk alive instead of all of them).
    sensitivity_batch: int = SENSITIVITY_BATCH
    memory_savers: bool = True
    # The method's own settings: an instance of ``get_method(method).Settings`` (a frozen dataclass,
    # e.g. ``SlimGPTSettings(percdamp=0.05)``); None: the method's defaults. The method checks the type.
    settings: object | None = None

    def __post_init__(self):
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or self.sparsity != self.sparsity:
            raise ValueError(f"The sparsity must be a number in [0, 1) (0.3 removes 30%), got {self.sparsity!r}.")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"The sparsity must be a fraction in [0, 1) (0.3 removes 30%), got {self.sparsity}.")
        if self.budget_kind not in BUDGET_KINDS:
            raise ValueError(f"budget kind must be one of {BUDGET_KINDS}, got {self.budget_kind!r}")
        check_method_name(self.method)
        if self.sensitivity_labels not in ("data", "model"):
            raise ValueError(f"sensitivity_labels must be 'data' or 'model', got {self.sensitivity_labels!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (self.prune_heads or self.prune_neurons):
            raise ValueError("With every head and every neuron kept nothing can be removed; allow heads or neurons "
                             "to be pruned.")
        if self.batch_size < 1 or self.sensitivity_batch < 1 or \
                (self.sensitivity_samples is not None and self.sensitivity_samples < 0):
            raise ValueError("batch_size and sensitivity_batch must be ≥ 1 and sensitivity_samples ≥ 0")
        if isinstance(self.flops_seq_len, bool) or not isinstance(self.flops_seq_len, (int, float)) \
                or not self.flops_seq_len >= 1:
            raise ValueError(f"The FLOP-counting sequence length must be a whole number of tokens ≥ 1, got "
                             f"{self.flops_seq_len!r}.")


def parse_sparsity(value, percent: bool | None = None, max_percent: float | None = None) -> float:
    """The one reading of a share to remove, as a fraction (the range [0, 1) is checked by
    :class:`PruneConfig`): ``percent=None`` reads a fraction such as 0.3, or a percentage above 1
    (30 → 0.3; the API and the app's handlers); ``percent=True`` reads percent only (the app's slider:
    0 < value < 1 is refused, since 0.99 would be under 1%), up to ``max_percent``. ValueError with one
    sentence."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError("Type the share to remove in percent, e.g. 30." if percent else
                         f"The sparsity must be a number such as 0.3 (or 30 for percent), got {value!r}.") from None
    if v != v:
        raise ValueError(f"The sparsity must be a number such as 0.3 (or 30 for percent), got {value!r}.")
    if not percent:
        return v / 100.0 if v > 1.0 else v
    if 0 < v < 1:
        raise ValueError(f"The slider counts percent: type {100 * v:.0f} for {100 * v:.0f}% ({v} would be under 1%).")
    if not 0 <= v <= (100 if max_percent is None else max_percent):
        raise ValueError(f"Pick between 0 and {100 if max_percent is None else max_percent:g} percent, got {v:g}.")
    return v / 100.0
