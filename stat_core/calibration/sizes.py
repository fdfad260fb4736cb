"""How much calibration text is enough: sensitivity windows and the size warning."""

from __future__ import annotations

import numpy as np

from stat_core.adapters import get_adapter
from stat_core.calibration.statistics import CalibrationSet

# Windows per batch of the gradient pass. One: its logits and their gradient (vocabulary × tokens,
# float32) are the largest tensors of a prune, and on SmolLM2 one window per batch took the same
# time as four (benchmarks/memory.py: 31.0 vs 31.8 s) at a third of the memory.
SENSITIVITY_BATCH = 1


# Real tokens the gradient pass sees by default: 8 windows of 512 for decoders; for short
# classifier inputs that is ~36 windows of 128 (8 short windows gave a visibly worse allocation).
SENSITIVITY_TOKENS = 4096


# Below this many real calibration tokens per MLP neuron the least-squares corrections start to fit
# the calibration text rather than the model: measured on the demo classifier (8 per neuron made the
# corrected model worse than no correction at 30-40%, 28 per neuron did not) and on SmolLM2 (2,048
# tokens for 1,536 neurons: STAT lost to activation-norm selection; 64 × 512 = 21 per neuron is fine).
MIN_TOKENS_PER_NEURON = 16


def calibration_size_warning(model, n_tokens: int) -> str | None:
    """One sentence when ``n_tokens`` real calibration tokens are too few for reliable corrections."""
    adapter = get_adapter(model)
    width = max(adapter.layer_shape(i).intermediate_size for i in range(adapter.num_layers))
    needed = MIN_TOKENS_PER_NEURON * width
    if n_tokens >= needed:
        return None
    return (f"Only {n_tokens:,} calibration tokens for MLPs {width:,} neurons wide: the corrections may fit the "
            f"calibration text rather than the model; give at least {needed:,} tokens "
            f"(the default 64 × 512 = 32,768 is enough for most small models).")


def sensitivity_windows(data: CalibrationSet, requested: int | None) -> int:
    if requested is not None:
        return min(requested, len(data))
    per_window = (float(data.attention_mask.sum()) / len(data) if data.attention_mask is not None
                  else data.input_ids.shape[1])
    return min(len(data), max(1, int(np.ceil(SENSITIVITY_TOKENS / max(per_window, 1.0)))))


def statistics_bytes(model) -> int:
    """Bytes of the float64 Gram statistics an in-memory calibration keeps for every block (the MLP's
    ``d_ff × d_ff`` and the attention output's ``(heads·head_dim)²``): what re-budgeting reads later."""
    adapter = get_adapter(model)
    total = 0
    for i in range(adapter.num_layers):
        attn = adapter.attn_out_proj(i).in_features
        mlp = adapter.mlp_out_proj(i).in_features
        total += 8 * (attn * attn + mlp * mlp)
    return total


def statistics_memory_problem(model, available: int | None = None) -> str | None:
    """One sentence when the in-memory calibration's statistics cannot fit beside the model in this
    machine's available memory (``available``: bytes; default: what the system reports), else None."""
    if available is None:
        try:
            import psutil
        except ImportError:  # no way to ask: no refusal
            return None
        available = psutil.virtual_memory().available
    need = statistics_bytes(model)
    if need <= 0.8 * available:
        return None
    return (f"Calibrating this model in memory needs about {need / 2**30:.1f} GiB of statistics beside the "
            f"model, but only {available / 2**30:.1f} GiB is free; prune it streamed with --offload (statistics "
            "on disk, one block in memory) or on a machine with more memory.")
