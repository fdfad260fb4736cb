"""Quality and size measurements: perplexity with the fixed protocol (docs/evaluation.md), parameter counts."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from stat_core.data.labelled import movie_reviews
from stat_core.data.sources import bos_prefix, token_stream, wikipedia_split

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


# --- decoders: few-shot prompted classification of the movie-review sentences ----------------------

FEWSHOT_INSTRUCTION = "Classify the sentiment of each movie review as positive or negative.\n\n"
FEWSHOT_TEMPLATE = "Review: {text}\nSentiment:"
FEWSHOT_LABEL_WORDS = (" negative", " positive")
FEWSHOT_SHOTS_PER_CLASS = 2


def fewshot_prompts(data) -> tuple[list[str], list[int]]:
    """Fixed prompts: the first two sentences of each class are the shots (neg, pos, neg, pos);
    every other sentence is asked about once. Returns (prompts, labels)."""
    shots, used = [], set()
    for _ in range(FEWSHOT_SHOTS_PER_CLASS):
        for label in (0, 1):
            i = next(j for j, y in enumerate(data.labels) if y == label and j not in used)
            used.add(i)
            shots.append(FEWSHOT_TEMPLATE.format(text=data.texts[i]) + FEWSHOT_LABEL_WORDS[label] + "\n\n")
    prefix = FEWSHOT_INSTRUCTION + "".join(shots)
    rest = [j for j in range(len(data.texts)) if j not in used]
    return [prefix + FEWSHOT_TEMPLATE.format(text=data.texts[j]) for j in rest], [data.labels[j] for j in rest]


@torch.no_grad()
def fewshot_accuracy(model, tokenizer, data=None, batch_size: int = 8) -> float:
    """Accuracy of comparing the label words' next-token log-probabilities after each prompt
    (movie-review sentences by default; decoders get an accuracy too)."""

    data = movie_reviews() if data is None else data
    prompts, labels = fewshot_prompts(data)
    label_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in FEWSHOT_LABEL_WORDS]
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(prompts), batch_size):
        enc = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts[start:start + batch_size]]
        width = max(len(e) for e in enc)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        # Left padding puts every prompt's last token in the last column.
        ids = torch.tensor([[pad] * (width - len(e)) + e for e in enc], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits[:, -1]
        pred = logits[:, label_ids].argmax(-1).cpu()
        correct += int((pred == torch.tensor(labels[start:start + batch_size])).sum())
    return correct / len(prompts)
