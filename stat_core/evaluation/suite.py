"""The evaluation suite for decoders (docs/evaluation.md): how close a pruned model stays to its dense
original, beyond perplexity.

Fields (``SUITE_FIELDS``):

- ``perplexity``: the fixed Wikipedia protocol (``evaluation_windows`` + next-token NLL).
- ``kl_to_dense``: mean KL(dense ‖ pruned) of the next-token distributions on the same windows (nats
  per predicted position), computed in the same forward pass as the perplexity.
- ``fewshot_accuracy`` / ``fewshot_bias_free`` / ``fewshot_majority_share``: few-shot sentiment of the
  movie-review sentences (prompts and label words from ``evaluate.py``). ``fewshot_bias_free`` is the
  ROC AUC of the label log-odds ``log p(" positive") - log p(" negative")`` against the true labels:
  a model that answers one label to every prompt but still ranks the reviews keeps it high; a model
  that lost the task scores about 0.5. ``fewshot_majority_share`` is the share of prompts given the
  more frequent answer (1.0 = the same label every time).
- ``analogy_accuracy``: three-shot word analogies from gensim's ``questions-words.txt`` (nine
  categories), scored teacher-forced: every answer token must be the argmax at its position, which
  is exactly "greedy decoding produces the answer".
- ``instruction_agreement`` / ``instruction_kl``: chat prompts written for this project
  (``assets/instruction_prompts.json``); the dense model's greedy answers are computed once, then a
  pruned model is teacher-forced on prompt + dense answer: the share of answer tokens where its argmax
  is the dense token, and the mean KL(dense ‖ pruned) over those tokens.

The dense model runs once: ``build_reference`` caches everything the comparisons need in a
``DenseReference`` (the dense log-probabilities on the evaluation windows in float16, the dense
answers and their log-probabilities, the prompts as token ids) and the dense model's own values
(``reference.dense_metrics``). ``evaluate_suite(model, tokenizer, reference)`` then needs one pass of
the pruned model per part.

The scoring functions take token ids (``kl_and_perplexity``, ``last_token_logprobs``,
``teacher_forced``, ``teacher_forced_agreement``), so they work (and are tested) without a tokenizer.

Exactness for the dense model: both sides of every KL go through the same float16 rounding and
renormalisation, and the reference is scored with the same batches as ``evaluate_suite`` uses, so
the dense model against its own reference gives KL 0 and agreement 1 exactly (not just nearly).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stat_core.adapters.registry import is_encoder
from stat_core.data.chat import (
    chat_prompt_ids,
    chat_template_problem,
    end_token_ids,
    has_chat_template,
    left_pad,
)
from stat_core.data.labelled import movie_reviews
from stat_core.data.sources import DataError
from stat_core.evaluation.perplexity import (
    EVAL_TOKENS,
    EVAL_WINDOW,
    FEWSHOT_LABEL_WORDS,
    evaluation_windows,
    fewshot_prompts,
)
from stat_core.paths import ASSETS_DIR

log = logging.getLogger(__name__)

SUITE_FIELDS = ("perplexity", "kl_to_dense", "fewshot_accuracy", "fewshot_bias_free", "fewshot_majority_share",
                "analogy_accuracy", "instruction_agreement", "instruction_kl")
#: The fields that compare with the dense model, so a report has them only after pruning.
AFTER_ONLY = ("kl_to_dense", "instruction_agreement", "instruction_kl")

ANALOGY_FILE = "test/test_data/questions-words.txt"
ANALOGY_CATEGORIES = ("capital-common-countries", "currency", "city-in-state", "family",
                      "gram1-adjective-to-adverb", "gram2-opposite", "gram3-comparative", "gram4-superlative",
                      "gram5-present-participle")
ANALOGY_SHOTS = 3
INSTRUCTION_PROMPTS_FILE = ASSETS_DIR / "instruction_prompts.json"
# Dense window log-probabilities larger than this live in an unlinked temporary file (memory-mapped)
# instead of RAM: Gemma-3's 262k vocabulary makes the default protocol about 8.6 GB in float16.
IN_MEMORY_LIMIT_BYTES = 4 * 2**30
_TOKENIZER_PROBE = "The quick brown fox jumps over the lazy dog. 12 + 30 = 42; naïve café."

Progress = Callable[[str, int, int], None] | None


@dataclass(frozen=True)
class SuiteConfig:
    """What the suite measures and how much of it. ``quick()`` is a cheaper variant for interactive use.

    ``max_fewshot_prompts`` / ``max_instruction_prompts`` cap those parts (``None`` = all: 196
    few-shot prompts, every prompt of the asset file); a capped few-shot set is an evenly spaced
    subset, so both labels stay represented.
    """

    eval_tokens: int = EVAL_TOKENS
    window: int = EVAL_WINDOW
    analogies_per_category: int = 25
    instruction_new_tokens: int = 48
    batch_size: int = 8
    fewshot: bool = True
    analogies: bool = True
    instructions: bool = True
    max_fewshot_prompts: int | None = None
    max_instruction_prompts: int | None = None
    seed: int = 0

    def __post_init__(self):
        if self.window < 2:
            raise ValueError("window must be at least 2 tokens")
        if self.eval_tokens < self.window:
            raise ValueError(f"eval_tokens ({self.eval_tokens}) must be at least one window ({self.window})")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if self.analogies_per_category < 1:
            raise ValueError("analogies_per_category must be at least 1")
        if self.instruction_new_tokens < 1:
            raise ValueError("instruction_new_tokens must be at least 1")
        if self.max_fewshot_prompts is not None and self.max_fewshot_prompts < 2:
            raise ValueError("max_fewshot_prompts must be at least 2 (one per label) or None")
        if self.max_instruction_prompts is not None and self.max_instruction_prompts < 1:
            raise ValueError("max_instruction_prompts must be at least 1 or None")

    @classmethod
    def quick(cls) -> "SuiteConfig":
        """A quarter of the perplexity text, 10 analogies per category, 24-token answers, 96 few-shot
        prompts (about a third of the full suite's cost)."""
        return cls(eval_tokens=4096, analogies_per_category=10, instruction_new_tokens=24, max_fewshot_prompts=96)

    @classmethod
    def tiny(cls) -> "SuiteConfig":
        """Seconds on a tiny random model (CI smoke runs): 4 windows of 128 tokens, one analogy per
        category, 8 few-shot prompts, 4 chat prompts with 4-token answers. Not a quality measurement."""
        return cls(eval_tokens=512, window=128, analogies_per_category=1, instruction_new_tokens=4,
                   max_fewshot_prompts=8, max_instruction_prompts=4)


# --- batching helpers ------------------------------------------------------------------------------

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _report(progress: Progress, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)


def _logits(model, ids: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None,
            keep: int = 0) -> torch.Tensor:
    """``(B, keep or W, V)`` logits of one scoring forward (no KV cache)."""
    device = _device(model)
    kwargs = {"input_ids": ids.to(device), "use_cache": False}
    if mask is not None:
        kwargs["attention_mask"] = mask.to(device)
        kwargs["position_ids"] = positions.to(device)
    if keep:
        kwargs["logits_to_keep"] = keep
    return model(**kwargs).logits


def _length_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length (less padding); deterministic."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _renormalised(logprobs16: torch.Tensor) -> torch.Tensor:
    """float16 log-probabilities ``(..., V)`` -> float32, renormalised so they sum to one again."""
    x = logprobs16.float()
    return x - torch.logsumexp(x, dim=-1, keepdim=True)


def kl_rows(dense16: torch.Tensor, other16: torch.Tensor) -> torch.Tensor:
    """KL(dense ‖ other) per row, in nats: ``(..., V)`` float16 log-probabilities -> ``(...)`` float32.

    Both sides get the same rounding and renormalisation, so identical inputs give exactly 0."""
    d, o = _renormalised(dense16), _renormalised(other16)
    p = d.exp()
    return torch.where(p > 0, p * (d - o), torch.zeros((), device=p.device)).sum(-1)


def _allocate_float16(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float16 tensor; above ``IN_MEMORY_LIMIT_BYTES`` backed by a memory-mapped
    temporary file that is unlinked at once (freed with the tensor)."""
    nbytes = math.prod(shape) * 2
    if nbytes <= IN_MEMORY_LIMIT_BYTES:
        return torch.empty(shape, dtype=torch.float16)
    fd, path = tempfile.mkstemp(prefix="stat-dense-logprobs-", suffix=".f16")
    os.close(fd)
    try:
        array = np.memmap(path, dtype=np.float16, mode="w+", shape=shape)
    finally:
        os.unlink(path)
    log.info("dense log-probabilities (%.1f GB) are kept in a memory-mapped temporary file", nbytes / 1e9)
    return torch.from_numpy(array)


# --- perplexity and KL on the evaluation windows ---------------------------------------------------

@torch.no_grad()
def _window_pass(model, windows: torch.Tensor, batch_size: int, reference: torch.Tensor | None,
                 store: bool, progress: Progress, stage: str) -> tuple[float, float | None, torch.Tensor | None]:
    """One forward over ``windows (n, T)``: perplexity, KL to ``reference (n, T-1, V)`` and/or the
    float16 log-probabilities ``(n, T-1, V)`` of this model."""
    device = _device(model)
    n, width = windows.shape
    stored = None
    nll_sum, kl_sum, count = 0.0, 0.0, 0
    for start in range(0, n, batch_size):
        ids = windows[start:start + batch_size]
        logits = _logits(model, ids, None, None)  # (B, T, V)
        vocab = logits.shape[-1]
        if reference is not None and reference.shape[-1] != vocab:
            raise ValueError(f"the model predicts {vocab} tokens, the dense reference {reference.shape[-1]}")
        if store and stored is None:
            stored = _allocate_float16((n, width - 1, vocab))
        targets = ids[:, 1:].to(device)
        for row in range(len(ids)):
            logprobs = torch.log_softmax(logits[row, :-1].float(), dim=-1)  # (T-1, V)
            nll_sum -= float(logprobs.gather(-1, targets[row, :, None]).sum())
            rounded = logprobs.to(torch.float16)
            if store:
                stored[start + row] = rounded.cpu()
            if reference is not None:
                kl_sum += float(kl_rows(reference[start + row].to(device), rounded).sum())
            del logprobs, rounded
        count += targets.numel()
        del logits
        _report(progress, stage, min(start + batch_size, n), n)
    return math.exp(nll_sum / count), (kl_sum / count if reference is not None else None), stored


def dense_window_logprobs(model, windows: torch.Tensor, batch_size: int = 8, progress: Progress = None
                          ) -> tuple[torch.Tensor, float]:
    """The model's next-token log-probabilities on ``windows (n, T)`` as float16 ``(n, T-1, V)`` (position
    t predicts token t+1), and its perplexity there."""
    ppl, _, stored = _window_pass(model, windows, batch_size, None, True, progress, "dense windows")
    return stored, ppl


def kl_and_perplexity(model, windows: torch.Tensor, reference_logprobs: torch.Tensor, batch_size: int = 8,
                      progress: Progress = None) -> tuple[float, float]:
    """``(mean KL(dense ‖ model) per predicted position in nats, perplexity)`` over ``windows (n, T)``
    in one forward pass; ``reference_logprobs (n, T-1, V)`` from ``dense_window_logprobs``."""
    if tuple(reference_logprobs.shape[:2]) != (windows.shape[0], windows.shape[1] - 1):
        raise ValueError(f"reference log-probabilities {tuple(reference_logprobs.shape)} do not match "
                         f"windows {tuple(windows.shape)}")
    ppl, kl, _ = _window_pass(model, windows, batch_size, reference_logprobs, False, progress, "perplexity + KL")
    return kl, ppl


# --- prompt scoring ------------------------------------------------------------------------------

@torch.no_grad()
def last_token_logprobs(model, sequences: Sequence[torch.Tensor | list[int]], token_ids: Sequence[int],
                        batch_size: int = 8, pad_id: int = 0, progress: Progress = None,
                        stage: str = "last token") -> torch.Tensor:
    """``(n, k)`` float32 log-probabilities of ``token_ids`` (k of them) as the next token after each
    sequence (left-padded batches, one forward each)."""
    wanted = torch.as_tensor(list(token_ids), dtype=torch.long)
    out = torch.empty((len(sequences), len(wanted)), dtype=torch.float32)
    batches = _length_batches([len(s) for s in sequences], batch_size)
    for b, index in enumerate(batches):
        ids, mask, positions = left_pad([sequences[i] for i in index], pad_id)
        last = _logits(model, ids, mask, positions, keep=1)[:, -1].float()  # (B, V)
        logprobs = torch.log_softmax(last, dim=-1)[:, wanted.to(last.device)]
        out[torch.as_tensor(index)] = logprobs.cpu()
        _report(progress, stage, b + 1, len(batches))
    return out


@dataclass
class TeacherForced:
    """Per sequence, for its answer tokens (``a_i`` of them): ``predicted (a_i,)`` argmax tokens,
    ``matches (a_i,)`` bool (argmax == answer token), ``kl (a_i,)`` KL(dense ‖ model) in nats when
    dense log-probabilities were given, ``logprobs (a_i, V)`` float16 when asked for."""

    predicted: list[torch.Tensor]
    matches: list[torch.Tensor]
    kl: list[torch.Tensor] | None = None
    logprobs: list[torch.Tensor] | None = None


@torch.no_grad()
def teacher_forced(model, sequences: Sequence[torch.Tensor | list[int]], answer_spans: Sequence[tuple[int, int]],
                   dense_logprobs: Sequence[torch.Tensor] | None = None, batch_size: int = 8, pad_id: int = 0,
                   keep_logprobs: bool = False, progress: Progress = None,
                   stage: str = "teacher-forced") -> TeacherForced:
    """Feed each whole sequence once and score the tokens in its answer span ``[start, end)`` (the logits
    at positions ``start-1 .. end-2`` predict them). ``dense_logprobs[i]`` is ``(end_i - start_i, V)``
    float16 when KL is wanted. Batches are left-padded; only the logits that are needed are kept."""
    seqs = [torch.as_tensor(s, dtype=torch.long) for s in sequences]
    if len(answer_spans) != len(seqs):
        raise ValueError("one answer span per sequence is needed")
    for s, (start, end) in zip(seqs, answer_spans):
        if not 1 <= start < end <= len(s):
            raise ValueError(f"answer span ({start}, {end}) does not fit a sequence of {len(s)} tokens")
    n = len(seqs)
    predicted: list = [None] * n
    matches: list = [None] * n
    kls: list | None = [None] * n if dense_logprobs is not None else None
    kept: list | None = [None] * n if keep_logprobs else None
    batches = _length_batches([len(s) for s in seqs], batch_size)
    for b, index in enumerate(batches):
        ids, mask, positions = left_pad([seqs[i] for i in index], pad_id)
        keep = max(len(seqs[i]) - answer_spans[i][0] + 1 for i in index)
        logits = _logits(model, ids, mask, positions, keep=keep)  # (B, keep, V)
        for row, i in enumerate(index):
            start, end = answer_spans[i]
            lo = start - 1 - len(seqs[i]) + logits.shape[1]
            rows = logits[row, lo:lo + end - start].float()  # (a_i, V)
            answer = seqs[i][start:end].to(rows.device)
            predicted[i] = rows.argmax(-1)
            matches[i] = (predicted[i] == answer).cpu()
            predicted[i] = predicted[i].cpu()
            if kls is not None or kept is not None:
                rounded = torch.log_softmax(rows, dim=-1).to(torch.float16)
                if kls is not None:
                    dense = dense_logprobs[i]
                    if tuple(dense.shape) != tuple(rounded.shape):
                        raise ValueError(f"dense log-probabilities {tuple(dense.shape)} do not match the "
                                         f"answer's {tuple(rounded.shape)}")
                    kls[i] = kl_rows(dense.to(rounded.device), rounded).cpu()
                if kept is not None:
                    kept[i] = rounded.cpu()
        del logits
        _report(progress, stage, b + 1, len(batches))
    return TeacherForced(predicted, matches, kls, kept)


def teacher_forced_agreement(model, sequences: Sequence[torch.Tensor | list[int]],
                             answer_spans: Sequence[tuple[int, int]], dense_logprobs: Sequence[torch.Tensor],
                             batch_size: int = 8, pad_id: int = 0, progress: Progress = None) -> tuple[float, float]:
    """``(agreement, mean KL)`` over all answer tokens: the share whose argmax under ``model`` is the
    answer token, and the mean KL(dense ‖ model) in nats (see ``teacher_forced``)."""
    tf = teacher_forced(model, sequences, answer_spans, dense_logprobs, batch_size, pad_id, progress=progress,
                        stage="instructions")
    matches = torch.cat(tf.matches)
    return float(matches.float().mean()), float(torch.cat(tf.kl).mean())


# --- scores --------------------------------------------------------------------------------------

def rank_auc(scores, labels) -> float:
    """ROC AUC as the Mann-Whitney statistic with average ranks for ties; NaN if a class is missing."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s, method="average")
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_auc(scores, labels) -> float:
    """ROC AUC of ``scores`` against binary ``labels`` (sklearn's when installed, else ``rank_auc``);
    NaN if only one class is present."""
    y = np.asarray(labels)
    if len(np.unique(y)) < 2:
        return float("nan")
    try:
        from sklearn.metrics import roc_auc_score
    except ImportError:
        return rank_auc(scores, labels)
    return float(roc_auc_score(y, np.asarray(scores, dtype=np.float64)))


def majority_share(predictions) -> float:
    """Share of the predictions that are the most frequent predicted value (1.0: always the same)."""
    p = np.asarray(predictions)
    if p.size == 0:
        return float("nan")
    _, counts = np.unique(p, return_counts=True)
    return float(counts.max() / p.size)


def fewshot_metrics(logodds: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Few-shot fields from label log-odds ``(n,)`` (positive minus negative) and labels ``(n,)`` in {0, 1}.
    The predicted label is the likelier label word (a tie counts as negative, as in ``fewshot_accuracy``)."""
    predicted = (logodds > 0).long()
    return {"fewshot_accuracy": float((predicted == labels).float().mean()),
            "fewshot_bias_free": roc_auc(logodds.numpy(), labels.numpy()),
            "fewshot_majority_share": majority_share(predicted.numpy())}


# --- data: few-shot, analogies, instructions -------------------------------------------------------

def _fewshot_data(tokenizer, max_prompts: int | None) -> tuple[list[list[int]], torch.Tensor, tuple[int, int]]:
    """Token ids of the few-shot prompts, their labels ``(n,)`` and the two label tokens."""

    prompts, labels = fewshot_prompts(movie_reviews())
    if max_prompts is not None and max_prompts < len(prompts):
        keep = sorted(set(np.linspace(0, len(prompts) - 1, max_prompts).round().astype(int).tolist()))
        prompts, labels = [prompts[i] for i in keep], [labels[i] for i in keep]
    label_ids = tuple(tokenizer(w, add_special_tokens=False).input_ids[0] for w in FEWSHOT_LABEL_WORDS)
    if label_ids[0] == label_ids[1]:
        raise ValueError(f"the label words {FEWSHOT_LABEL_WORDS} start with the same token for this tokenizer")
    sequences = [tokenizer(p, add_special_tokens=True).input_ids for p in prompts]
    return sequences, torch.tensor(labels, dtype=torch.long), label_ids


@dataclass(frozen=True)
class AnalogyQuestion:
    """``a : b :: c : d`` with the few-shot example lines shown before it."""

    category: str
    words: tuple[str, str, str, str]
    examples: tuple[tuple[str, str, str, str], ...]

    @staticmethod
    def line(words: tuple[str, str, str, str]) -> str:
        a, b, c, d = words
        return f"{a} is to {b} as {c} is to {d}."

    def prompt(self) -> str:
        """The example lines, then ``"A is to B as C is to"``; the answer follows as ``answer``."""
        a, b, c, _ = self.words
        return "".join(self.line(e) + "\n" for e in self.examples) + f"{a} is to {b} as {c} is to"

    @property
    def answer(self) -> str:
        return " " + self.words[3]


def analogy_file() -> Path:
    spec = importlib.util.find_spec("gensim")  # locate only; gensim is slow to import
    if spec is None or spec.origin is None:
        raise DataError("The analogy questions need the 'gensim' package (`pip install gensim==4.4.0`).")
    return Path(spec.origin).parent / ANALOGY_FILE


def read_analogies(path: Path | None = None) -> dict[str, list[tuple[str, str, str, str]]]:
    """Every section of ``questions-words.txt``: ``{category: [(a, b, c, d), ...]}`` in file order."""
    sections: dict[str, list[tuple[str, str, str, str]]] = {}
    current = None
    for line in (path or analogy_file()).read_text(encoding="utf-8").splitlines():
        if line.startswith(": "):
            current = sections.setdefault(line[2:].strip(), [])
        elif line.strip() and current is not None:
            words = line.split()
            if len(words) == 4:
                current.append(tuple(words))
    return sections


def analogy_questions(per_category: int = 25, seed: int = 0, path: Path | None = None) -> list[AnalogyQuestion]:
    """A fixed sample of ``per_category`` questions from each of ``ANALOGY_CATEGORIES``.

    Per category a seeded permutation picks ``ANALOGY_SHOTS`` example lines first; the asked questions
    follow in the same order, skipping any whose ``c`` or ``d`` word appears in an example (the answer
    is never shown). A smaller ``per_category`` gives a prefix of a larger one's questions."""
    sections = read_analogies(path)
    missing = [c for c in ANALOGY_CATEGORIES if c not in sections]
    if missing:
        raise DataError(f"questions-words.txt lacks the categories {', '.join(missing)}")
    questions = []
    for k, category in enumerate(ANALOGY_CATEGORIES):
        lines = sections[category]
        order = np.random.default_rng([seed, k]).permutation(len(lines)).tolist()
        examples = tuple(lines[i] for i in order[:ANALOGY_SHOTS])
        shown = {w.lower() for e in examples for w in e}
        picked = []
        for i in order[ANALOGY_SHOTS:]:
            if len(picked) == per_category:
                break
            words = lines[i]
            if words[2].lower() in shown or words[3].lower() in shown or words in examples:
                continue
            picked.append(AnalogyQuestion(category, words, examples))
        if len(picked) < per_category:
            log.warning("analogy category %s has only %d usable questions", category, len(picked))
        questions.extend(picked)
    return questions


def encode_with_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], int]:
    """``(ids, start)``: the prompt's tokens (special tokens added as the tokenizer does) followed by the
    answer's; ``start`` is where the answer begins. The answer is tokenized in context when the prompt's
    tokens are a prefix of the whole text's, else on its own."""
    prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
    joint = tokenizer(prompt + answer, add_special_tokens=True).input_ids
    if joint[:len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        return joint, len(prompt_ids)
    return prompt_ids + tokenizer(answer, add_special_tokens=False).input_ids, len(prompt_ids)


def instruction_prompts(path: Path | None = None) -> list[str]:
    """The suite's chat prompts (``assets/instruction_prompts.json``), in file order."""
    path = path or INSTRUCTION_PROMPTS_FILE
    if not path.exists():
        raise DataError(f"The instruction prompts file {path} is missing (it ships in the repository's assets/).")
    prompts = json.loads(path.read_text(encoding="utf-8"))["prompts"]
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise DataError(f"{path.name} must hold a non-empty list of prompt strings under 'prompts'")
    return prompts


@torch.no_grad()
def greedy_answers(model, prompt_ids: Sequence[list[int]], max_new_tokens: int, end_ids: Sequence[int],
                   pad_id: int, batch_size: int = 8, progress: Progress = None) -> list[list[int]]:
    """Greedy continuations (KV-cached ``generate``, left-padded batches), each cut after its first end
    token (which is kept)."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                              eos_token_id=list(end_ids) or None, pad_token_id=pad_id)
    device = _device(model)
    answers: list = [None] * len(prompt_ids)
    batches = _length_batches([len(p) for p in prompt_ids], batch_size)
    ends = set(end_ids)
    for b, index in enumerate(batches):
        ids, mask, _ = left_pad([prompt_ids[i] for i in index], pad_id)
        mask = torch.ones_like(ids) if mask is None else mask
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        for row, i in enumerate(index):
            new = out[row, ids.shape[1]:].tolist()
            cut = next((j + 1 for j, t in enumerate(new) if t in ends), len(new))
            answers[i] = new[:cut]
        _report(progress, "dense answers", b + 1, len(batches))
    return answers


# --- the reference and the suite -----------------------------------------------------------------

@dataclass
class DenseReference:
    """What the suite needs from the dense model, computed once by ``build_reference``.

    ``windows (n, T)`` and ``window_logprobs (n, T-1, V)`` float16; few-shot prompt ids with
    ``fewshot_labels (m,)`` and the dense ``fewshot_logodds (m,)``; analogy sequences (prompt + answer
    ids) with answer spans and the dense ``analogy_correct (q,)``; instruction sequences (chat prompt +
    dense greedy answer) with answer spans, the decoded answers and ``instruction_logprobs[i]
    (a_i, V)`` float16. Parts that were not built are ``None``. ``dense_metrics`` holds the dense model's
    own suite values."""

    config: SuiteConfig
    pad_id: int
    tokenizer_check: str
    windows: torch.Tensor
    window_logprobs: torch.Tensor
    dense_metrics: dict[str, float] = field(default_factory=dict)
    fewshot_sequences: list[list[int]] | None = None
    fewshot_labels: torch.Tensor | None = None
    fewshot_label_ids: tuple[int, int] | None = None
    fewshot_logodds: torch.Tensor | None = None
    analogy_questions: list[AnalogyQuestion] | None = None
    analogy_sequences: list[list[int]] | None = None
    analogy_spans: list[tuple[int, int]] | None = None
    analogy_correct: torch.Tensor | None = None
    instruction_prompts: list[str] | None = None
    instruction_answers: list[str] | None = None
    instruction_sequences: list[list[int]] | None = None
    instruction_spans: list[tuple[int, int]] | None = None
    instruction_logprobs: list[torch.Tensor] | None = None
    build_seconds: float = 0.0

    @property
    def vocab_size(self) -> int:
        return int(self.window_logprobs.shape[-1])

    def nbytes(self) -> int:
        """Approximate size of the cached tensors."""
        total = self.window_logprobs.numel() * self.window_logprobs.element_size()
        for t in self.instruction_logprobs or []:
            total += t.numel() * t.element_size()
        return total


def _tokenizer_check(tokenizer) -> str:
    ids = tokenizer(_TOKENIZER_PROBE, add_special_tokens=True).input_ids
    return hashlib.sha256(repr((len(tokenizer), ids)).encode()).hexdigest()[:16]


def _require_decoder(model) -> None:
    if is_encoder(model) or getattr(model.config, "is_encoder_decoder", False) \
            or getattr(model, "get_output_embeddings", lambda: None)() is None:
        raise ValueError(f"the evaluation suite is for decoder language models; "
                         f"'{getattr(model.config, 'model_type', type(model).__name__)}' is not one")


def _pad_id(tokenizer) -> int:
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


@torch.no_grad()
def build_reference(dense_model, tokenizer, config: SuiteConfig = SuiteConfig(), progress: Progress = None
                    ) -> DenseReference:
    """Run the dense model once over everything the suite compares against; fill ``dense_metrics``
    (its own suite values: ``kl_to_dense`` 0, ``instruction_agreement`` 1, ``instruction_kl`` 0)."""
    _require_decoder(dense_model)
    began = time.perf_counter()
    bs = config.batch_size
    pad_id = _pad_id(tokenizer)
    windows = evaluation_windows(tokenizer, n_tokens=config.eval_tokens, window=config.window)
    window_logprobs, ppl = dense_window_logprobs(dense_model, windows, bs, progress)
    ref = DenseReference(config=config, pad_id=pad_id, tokenizer_check=_tokenizer_check(tokenizer),
                         windows=windows, window_logprobs=window_logprobs)
    metrics = {"perplexity": ppl, "kl_to_dense": 0.0}  # KL of a distribution to itself

    if config.fewshot:
        sequences, labels, label_ids = _fewshot_data(tokenizer, config.max_fewshot_prompts)
        logprobs = last_token_logprobs(dense_model, sequences, label_ids, bs, pad_id, progress, "dense few-shot")
        ref.fewshot_sequences, ref.fewshot_labels, ref.fewshot_label_ids = sequences, labels, label_ids
        ref.fewshot_logodds = logprobs[:, 1] - logprobs[:, 0]
        metrics.update(fewshot_metrics(ref.fewshot_logodds, labels))

    if config.analogies:
        questions = analogy_questions(config.analogies_per_category, config.seed)
        encoded = [encode_with_answer(tokenizer, q.prompt(), q.answer) for q in questions]
        ref.analogy_questions = questions
        ref.analogy_sequences = [ids for ids, _ in encoded]
        ref.analogy_spans = [(start, len(ids)) for ids, start in encoded]
        tf = teacher_forced(dense_model, ref.analogy_sequences, ref.analogy_spans, batch_size=bs, pad_id=pad_id,
                            progress=progress, stage="dense analogies")
        ref.analogy_correct = torch.tensor([bool(m.all()) for m in tf.matches])
        metrics["analogy_accuracy"] = float(ref.analogy_correct.float().mean())

    template_problem = chat_template_problem(tokenizer) if config.instructions and has_chat_template(tokenizer) \
        else None
    if template_problem:
        log.warning("the chat template cannot be used (%s): the instruction check is skipped", template_problem)
    elif config.instructions and has_chat_template(tokenizer):
        metrics["instruction_agreement"] = _build_instructions(ref, dense_model, tokenizer, progress)
        metrics["instruction_kl"] = 0.0  # KL of a distribution to itself
    elif config.instructions:
        log.info("the tokenizer has no chat template: the instruction check is skipped")

    ref.dense_metrics = {k: metrics[k] for k in SUITE_FIELDS if k in metrics}
    ref.build_seconds = time.perf_counter() - began
    log.info("dense reference built in %.1f s (%.2f GB cached): %s", ref.build_seconds, ref.nbytes() / 1e9,
             ref.dense_metrics)
    return ref


def _build_instructions(ref: DenseReference, model, tokenizer, progress: Progress) -> float:
    """Dense greedy answers to the chat prompts, and their teacher-forced dense log-probabilities;
    returns the dense model's own agreement (1.0 unless a near-tie could not be resolved).

    KV-cached generation and the full teacher-forced forward can disagree at a near-tie of two logits;
    an answer is cut before the first token where the teacher-forced argmax differs, so the stored
    answers are exactly what the teacher-forced dense model predicts (agreement 1 for the dense model)."""
    config = ref.config
    prompts = instruction_prompts()[:config.max_instruction_prompts]
    prompt_ids = [chat_prompt_ids(tokenizer, p) for p in prompts]
    answers = greedy_answers(model, prompt_ids, config.instruction_new_tokens, end_token_ids(model, tokenizer),
                             ref.pad_id, config.batch_size, progress)
    for attempt in range(6):
        keep = [i for i, a in enumerate(answers) if a]
        prompts = [prompts[i] for i in keep]
        prompt_ids = [prompt_ids[i] for i in keep]
        answers = [answers[i] for i in keep]
        if not answers:
            raise RuntimeError("the dense model gave an empty answer to every instruction prompt")
        sequences = [p + a for p, a in zip(prompt_ids, answers)]
        spans = [(len(p), len(p) + len(a)) for p, a in zip(prompt_ids, answers)]
        tf = teacher_forced(model, sequences, spans, batch_size=config.batch_size, pad_id=ref.pad_id,
                            keep_logprobs=True, progress=progress, stage="dense instructions")
        bad = [i for i, m in enumerate(tf.matches) if not bool(m.all())]
        if not bad or attempt == 5:
            break
        log.info("%d dense answer(s) cut where the teacher-forced argmax differs from generation", len(bad))
        for i in bad:
            answers[i] = answers[i][:int((~tf.matches[i]).nonzero()[0])]
    if bad:
        log.warning("%d dense answer(s) still differ from the teacher-forced argmax", len(bad))
    ref.instruction_prompts = prompts
    ref.instruction_answers = [tokenizer.decode(a, skip_special_tokens=True) for a in answers]
    ref.instruction_sequences = sequences
    ref.instruction_spans = spans
    ref.instruction_logprobs = tf.logprobs
    return float(torch.cat(tf.matches).float().mean())


@torch.no_grad()
def evaluate_suite(model, tokenizer, reference: DenseReference, progress: Progress = None) -> dict[str, float]:
    """The suite's fields for ``model`` against the dense ``reference`` (keys in ``SUITE_FIELDS`` order;
    parts the reference was built without are left out)."""
    _require_decoder(model)
    if _tokenizer_check(tokenizer) != reference.tokenizer_check:
        raise ValueError("this tokenizer is not the one the dense reference was built with")
    began = time.perf_counter()
    bs, pad_id = reference.config.batch_size, reference.pad_id
    kl, ppl = kl_and_perplexity(model, reference.windows, reference.window_logprobs, bs, progress)
    results = {"perplexity": ppl, "kl_to_dense": kl}
    if reference.fewshot_sequences is not None:
        logprobs = last_token_logprobs(model, reference.fewshot_sequences, reference.fewshot_label_ids, bs, pad_id,
                                       progress, "few-shot")
        results.update(fewshot_metrics(logprobs[:, 1] - logprobs[:, 0], reference.fewshot_labels))
    if reference.analogy_sequences is not None:
        tf = teacher_forced(model, reference.analogy_sequences, reference.analogy_spans, batch_size=bs,
                            pad_id=pad_id, progress=progress, stage="analogies")
        results["analogy_accuracy"] = float(np.mean([bool(m.all()) for m in tf.matches]))
    if reference.instruction_sequences is not None:
        agreement, instruction_kl = teacher_forced_agreement(
            model, reference.instruction_sequences, reference.instruction_spans, reference.instruction_logprobs,
            bs, pad_id, progress)
        results["instruction_agreement"], results["instruction_kl"] = agreement, instruction_kl
    log.info("suite evaluated in %.1f s", time.perf_counter() - began)
    return {k: results[k] for k in SUITE_FIELDS if k in results}
