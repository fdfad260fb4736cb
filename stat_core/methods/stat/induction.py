"""Induction-head scores: which attention heads do in-context copying (Olsson et al. 2022).

On a random token sequence repeated twice, ``r_0 … r_{T−1} r_0 … r_{T−1}``, an induction head at the
second copy's ``r_i`` attends to ``r_{i+1}`` of the first copy: the token that followed the previous
occurrence of the current token (prefix matching). A head's score is its mean attention weight on
that position over the second copy, so 1 means it always looks exactly there and a head attending
uniformly scores about ``1/position``. Heads that do this carry much of a model's few-shot ability
(Bansal et al., ACL 2023, found in-context learning concentrated in a few such heads).
"""

from __future__ import annotations

import torch

from stat_core.adapters import get_adapter

INDUCTION_SEQUENCES = 8
INDUCTION_LENGTH = 48


@torch.no_grad()
def induction_scores(model, n_sequences: int = INDUCTION_SEQUENCES, length: int = INDUCTION_LENGTH,
                     seed: int = 0) -> list[list[float]]:
    """Prefix-matching score of every head: ``scores[layer][head]`` in [0, 1] (a decoder's own heads,
    pruned or not). Random tokens are drawn from the upper half of the vocabulary (no special tokens)."""
    adapter = get_adapter(model)
    if not adapter.is_decoder:
        raise ValueError("Induction scores are measured on causal attention; this model is an encoder.")
    vocab = model.get_input_embeddings().num_embeddings
    gen = torch.Generator().manual_seed(seed)
    half = torch.randint(vocab // 2, vocab, (n_sequences, length), generator=gen)
    ids = torch.cat([half, half], dim=1).to(next(model.parameters()).device)
    previous = model.config._attn_implementation
    model.config._attn_implementation = "eager"  # attention weights come back only from the eager kernel
    try:
        out = model(input_ids=ids, output_attentions=True, use_cache=False)
    finally:
        model.config._attn_implementation = previous
    query = torch.arange(length + 1, 2 * length)  # r_1 … r_{T−1} of the second copy …
    key = query - length + 1                      # … attend to the token after their first occurrence
    scores = []
    for att in out.attentions:  # (batch, heads, T, T) per layer
        scores.append(att[:, :, query, key].float().mean(dim=(0, 2)).tolist())
    return scores
