"""Shared helpers of the benchmark scripts: result files, tiny random models, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def machine_note() -> dict:
    """Where a number was measured. The project's CPU box is shared (2 cores, other jobs running):
    absolute times are noisy, which is why every timing is taken side by side and reported as a ratio."""
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "platform": platform.platform(), "load_average": load,
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def write_results(out_dir: Path, name: str, payload: dict, markdown: str) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=1))
    (out_dir / f"{name}.md").write_text(markdown)


def tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2,
               d_ff: int = 64, vocab: int = 128):
    """A random Llama (no downloads) for smoke runs and the width scan of the cost benchmark."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=d_ff, vocab_size=vocab,
                      max_position_embeddings=4096)
    return AutoModelForCausalLM.from_config(cfg).eval()


def random_windows(n: int, seq_len: int, vocab: int, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, seq_len), generator=gen)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def forward_seconds(model, windows: torch.Tensor, batch_size: int = 8) -> float:
    """One plain forward pass (with the LM head) over ``windows``: the floor any data-driven pruning pays."""
    from stat_core.adapters import get_adapter
    from stat_core.calibrate import CalibrationSet

    device = next(model.parameters()).device
    extra = {"use_cache": False} if get_adapter(model).is_decoder else {}
    sync(device)
    t = time.perf_counter()
    for batch in CalibrationSet.wrap(windows).batches(batch_size):
        model(**batch.model_inputs(device), **extra)
    sync(device)
    return time.perf_counter() - t


def median(xs):
    return statistics.median(xs) if xs else float("nan")
