"""Quality and size measurements: perplexity with the fixed protocol (DESIGN §6), parameter counts."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .data import bos_prefix, token_stream, wikipedia_split

EVAL_TOKENS = 16_384
EVAL_WINDOW = 512


def evaluation_windows(tokenizer, documents: list[str] | None = None, n_tokens: int = EVAL_TOKENS,
                       window: int = EVAL_WINDOW) -> torch.Tensor:
    """First ``n_tokens`` of the evaluation split in non-overlapping windows, BOS prepended if the
    tokenizer uses one: ``(n_tokens // window, window [+1])``."""
    docs = wikipedia_split("evaluation") if documents is None else documents
    stream = token_stream(tokenizer, docs, max_tokens=n_tokens)
    n_windows = len(stream) // window
    if n_windows == 0:
        raise ValueError(f"evaluation text has {len(stream)} tokens, fewer than one window of {window}")
    windows = stream[: n_windows * window].view(n_windows, window)
    prefix = bos_prefix(tokenizer)
    if prefix:
        windows = torch.cat([torch.full((n_windows, 1), prefix[0]), windows], dim=1)
    return windows


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, batch_size: int = 8, progress: bool = False) -> float:
    """``exp(mean next-token NLL)`` over all windows ``(n, T)``; the BOS position is never a target."""
    device = next(model.parameters()).device
    total_nll, total_count = 0.0, 0
    batches = range(0, len(windows), batch_size)
    for start in tqdm(batches, desc="perplexity", disable=not progress, leave=False):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                ids[:, 1:].reshape(-1), reduction="sum")
        total_nll += float(nll)
        total_count += ids[:, 1:].numel()
    return math.exp(total_nll / total_count)


def count_parameters(model) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total
