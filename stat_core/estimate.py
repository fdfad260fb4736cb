"""A time estimate for the first calibration, before it starts (the app shows it under the button).

Rule of thumb, fitted to the app's own timings on the 2-core reference machine
(``benchmarks/results/app_timings.md``: SmolLM2-135M, 64 × 512 tokens, about 165 s until the
heatmaps show): calibration passes cost about ``3.5e-11`` s per token × block parameter (the
forward passes, the gradient-sensitivity pass and the Gram accumulation all scale with both), and
the per-layer decompositions about 1.5 s per layer for a 1,536-wide MLP, growing with the cube of
the width (eigendecompositions and Cholesky factorisations). Both terms shrink with more CPU
threads (linearly, a rough assumption); on a GPU the token term is taken 30× faster. A rough
figure: the app says so, and gives a range (0.7× to 1.5×).
"""

from __future__ import annotations

import torch

from stat_core.adapters import get_adapter

SECONDS_PER_TOKEN_PARAM = 3.5e-11   # 2 CPU threads
SECONDS_PER_LAYER = 1.5              # a 1,536-wide MLP, 2 CPU threads
REFERENCE_THREADS = 2
GPU_SPEEDUP = 30.0


def calibration_seconds(model, num_samples: int, seq_len: int, threads: int | None = None) -> dict:
    """``{"seconds", "low", "high", "tokens", "block_params"}``: the estimated first calibration."""
    adapter = get_adapter(model)
    block_params = sum(p.numel() for layer in adapter.layers for p in layer.parameters())
    tokens = int(num_samples) * int(seq_len)
    threads = threads or torch.get_num_threads()
    scale = REFERENCE_THREADS / max(threads, 1)
    gpu = next(model.parameters()).device.type == "cuda"
    width = adapter.layer_shape(0).intermediate_size
    token_part = SECONDS_PER_TOKEN_PARAM * tokens * block_params * scale / (GPU_SPEEDUP if gpu else 1.0)
    layer_part = SECONDS_PER_LAYER * adapter.num_layers * (width / 1536) ** 3 * scale
    seconds = token_part + layer_part
    return {"seconds": seconds, "low": 0.7 * seconds, "high": 1.5 * seconds, "tokens": tokens,
            "block_params": block_params, "threads": threads, "gpu": gpu}


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 90 else f"{s / 60:.0f} min" if s < 5400 else f"{s / 3600:.1f} h"


def estimate_sentence(model, num_samples, seq_len) -> str:
    """One or two sentences for the user: the estimate, and how it was made."""
    try:
        n, t = int(num_samples), int(seq_len)
    except (TypeError, ValueError):
        return ""
    if n < 1 or t < 1:
        return ""
    e = calibration_seconds(model, n, t)
    where = "a GPU" if e["gpu"] else f"{e['threads']} CPU thread{'s' if e['threads'] != 1 else ''}"
    return (f"First calibration: about {_duration(e['low'])}–{_duration(e['high'])} on {where} "
            f"({e['tokens']:,} tokens × {e['block_params'] / 1e6:.0f}M block parameters; a rule of thumb from the "
            "app's measured timings). Cached statistics are reused, and moving the slider afterwards re-plans in "
            "about a second.")
