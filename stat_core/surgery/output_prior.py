"""The output prior correction: a vocabulary bias that gives a pruned model back its dense original's
average next-token distribution.

Pruning shifts what a model predicts *on average* as well as per context: a pruned SmolLM2 answers
" negative" to most few-shot sentiment prompts while still ranking the reviews nearly as well as
dense (its bias-free AUC stays high). A bias ``b`` on the LM head, fitted on the calibration text as

    b = log mean_t p_dense(· | x_<t) − log mean_t p_pruned(· | x_<t)

(means over the calibration positions, refined for a few rounds because the bias changes the pruned
mean it is measured against), restores the average distribution without touching any per-context
ranking. It is carried as ``lm_head.bias`` with ``config.stat_output_prior = True``; exports that
cannot hold a vocabulary bias (stock Hugging Face classes, GGUF) load it through the project's
modeling file or refuse in one sentence (``stat_core.export``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# The fit reads this many calibration windows, cut to this many tokens (about 4k positions: a few
# seconds of forward passes for a 135M model on two cores).
PRIOR_WINDOWS = 16
PRIOR_TOKENS = 256
PRIOR_ROUNDS = 3
# |b| is capped: a token the calibration text never predicts has a mean probability set by noise.
PRIOR_CLAMP = 4.0


def prior_windows(windows: torch.Tensor) -> torch.Tensor:
    """The calibration windows the fit reads: the first :data:`PRIOR_WINDOWS`, cut to :data:`PRIOR_TOKENS`."""
    return windows[:PRIOR_WINDOWS, :PRIOR_TOKENS]


@torch.no_grad()
def mean_log_distribution(model, windows: torch.Tensor, batch_size: int = 4, mask: torch.Tensor | None = None
                          ) -> torch.Tensor:
    """``log mean_t softmax(logits_t)`` over every real position of ``windows: (n, T)`` (``mask``: 1 =
    real token; float64, ``(V,)``)."""
    device = next(model.parameters()).device
    total, count = None, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(device)
        m = None if mask is None else mask[start:start + batch_size].to(device)
        logits = model(input_ids=ids, attention_mask=m, use_cache=False).logits.float()
        probs = torch.softmax(logits, dim=-1)
        if m is not None:
            probs = probs[m.bool()]
        probs = probs.reshape(-1, probs.shape[-1])
        total = probs.sum(0, dtype=torch.float64) if total is None else total + probs.sum(0, dtype=torch.float64)
        count += probs.shape[0]
    return (total / max(count, 1)).clamp_min(1e-30).log().cpu()


def output_layer(model) -> nn.Linear:
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError("This model has no linear output layer to carry an output prior bias.")
    return head


def set_output_prior_(model, bias: torch.Tensor) -> None:
    """Give the LM head the vocabulary bias ``bias: (V,)`` (tied weights stay tied) and mark the config."""
    head = output_layer(model)
    value = bias.to(device=head.weight.device, dtype=head.weight.dtype)
    if head.bias is None:
        head.bias = nn.Parameter(value.clone(), requires_grad=False)
    else:
        head.bias.data.copy_(value)
    model.config.stat_output_prior = True


def output_prior(model) -> torch.Tensor | None:
    """The model's output prior bias, or None."""
    if not getattr(model.config, "stat_output_prior", False):
        return None
    head = model.get_output_embeddings()
    return None if head is None or head.bias is None else head.bias.detach()


def fit_output_prior_(model, dense_log_mean: torch.Tensor, windows: torch.Tensor, rounds: int = PRIOR_ROUNDS,
                      clamp: float = PRIOR_CLAMP, mask: torch.Tensor | None = None) -> dict:
    """Fit and set the vocabulary bias that restores ``dense_log_mean`` (from
    :func:`mean_log_distribution` of the dense model on the same ``windows``) on the pruned ``model``.

    Returns ``{"rounds", "kl_before", "kl_after", "max_abs_bias"}``: KL(dense mean ‖ pruned mean) of
    the average distributions before the first and after the last round."""
    head = output_layer(model)
    start = head.bias.detach().double().cpu() if head.bias is not None else torch.zeros_like(dense_log_mean)
    bias = start.clone()
    p_dense = dense_log_mean.exp()
    kl_first = None
    for _ in range(rounds):
        set_output_prior_(model, bias)
        pruned = mean_log_distribution(model, windows, mask=mask)
        kl = float((p_dense * (dense_log_mean - pruned)).sum())
        kl_first = kl if kl_first is None else kl_first
        bias = (bias + dense_log_mean - pruned).clamp(-clamp, clamp)
    set_output_prior_(model, bias)
    final = mean_log_distribution(model, windows, mask=mask)
    kl_after = float((p_dense * (dense_log_mean - final)).sum())
    log.info("output prior: KL of the mean distributions %.4f → %.4f in %d rounds", kl_first, kl_after, rounds)
    return {"rounds": rounds, "kl_before": kl_first, "kl_after": kl_after,
            "max_abs_bias": float((bias - start).abs().max())}
