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
