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


def hidden_state_bytes(model, n_tokens: int) -> int:
    """Bytes of the calibration hidden states a layer-by-layer pass holds at once (every window's
    input to the current block and its output, in the model's dtype)."""
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "d_model", None) or 0
    element = next(model.parameters()).element_size()
    return 2 * int(n_tokens) * int(hidden) * element


def statistics_memory_problem(model, available: int | None = None, n_tokens: int = 0) -> str | None:
    """One sentence when the in-memory calibration cannot fit in this machine's available memory
    (``available``: bytes; default: what the system reports): the statistics it keeps for every block
    plus the hidden states of ``n_tokens`` calibration tokens. None when it fits."""
    if available is None:
        try:
            import psutil
        except ImportError:  # no way to ask: no refusal
            return None
        available = psutil.virtual_memory().available
    need = statistics_bytes(model)
    states = hidden_state_bytes(model, n_tokens) if n_tokens else 0
    if need + states <= 0.8 * available:
        return None
    if states > need:
        per_token = states / n_tokens
        fits = max(0, int((0.8 * available - need) / per_token))
        return (f"{n_tokens:,} calibration tokens need about {states / 2**30:.1f} GiB of hidden states in memory "
                f"(plus {need / 2**30:.1f} GiB of statistics), but only {available / 2**30:.1f} GiB is free; "
                f"ask for fewer samples or shorter windows (at most about {fits:,} tokens in all here).")
    return (f"Calibrating this model in memory needs about {need / 2**30:.1f} GiB of statistics beside the "
            f"model, but only {available / 2**30:.1f} GiB is free; prune it streamed with --offload (statistics "
            "on disk, one block in memory) or on a machine with more memory.")
