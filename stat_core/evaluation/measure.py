"""Before / after measurements that the app and the CLI share: quick quality (perplexity and KL to
the dense model for decoders, held-out accuracy and KL for classifiers), sizes and latency, the
before/after table, greedy continuations of a prompt, and several methods compared at one budget
from one cached calibration.

The dense side is measured once (:func:`baseline`) and every pruned model is compared with it
(:func:`quality`); nothing here keeps a model alive beyond the call that received it.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch

from stat_core.adapters.registry import is_encoder
from stat_core.evaluation.classifier import accuracy, class_log_probs, kl_to_reference
from stat_core.evaluation.perplexity import evaluation_windows
from stat_core.evaluation.report import size_summary

#: Quick perplexity: 4 windows of 512 tokens (the full protocol, ``stat_core.evaluation.perplexity``, uses 16,384).
QUICK_EVAL_TOKENS = 2048
#: Quality keys that compare with the dense model and so exist only after pruning.
AFTER_ONLY = ("kl_to_dense",)

ProgressFn = Callable[[str, int, int], None]


# --- quality ---------------------------------------------------------------------------------------

def quick_windows(tokenizer, eval_tokens: int = QUICK_EVAL_TOKENS) -> torch.Tensor:
    """The first ``eval_tokens`` evaluation tokens in windows of ``min(512, eval_tokens // 2)`` (at least 16)."""
    window = min(512, max(16, int(eval_tokens) // 2))
    return evaluation_windows(tokenizer, n_tokens=int(eval_tokens), window=window)


@torch.no_grad()
def perplexity_and_kl(model, windows: torch.Tensor, dense=None, batch_size: int = 1) -> tuple[float, float | None]:
    """``(perplexity, KL)`` of ``model`` on ``windows (n, T)``: ``exp`` of the mean next-token NLL
    (the first position is never a target) and, if ``dense`` is given, the mean
    KL(dense ‖ model) per predicted position in nats (None otherwise). One window batch of each
    model's logits is alive at a time; no dense log-probabilities are stored."""
    device = next(model.parameters()).device
    nll, kl, count = 0.0, 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(device)
        logp = model(input_ids=ids, use_cache=False).logits[:, :-1].float().log_softmax(-1)
        targets = ids[:, 1:]
        nll -= float(logp.gather(-1, targets[..., None]).sum())
        count += targets.numel()
        if dense is not None:
            d_ids = ids.to(next(dense.parameters()).device)
            d = dense(input_ids=d_ids, use_cache=False).logits[:, :-1].float().log_softmax(-1).to(device)
            p = d.exp()
            kl += float(torch.where(p > 0, p * (d - logp), torch.zeros((), device=device)).sum())
        del logp
    return math.exp(nll / count), (kl / count if dense is not None else None)


@dataclass
class Baseline:
    """The dense model's side of a comparison, measured once: its ``quality`` and what a pruned
    model is compared on (decoders: the evaluation ``windows``; classifiers: the ``held_out`` set
    and the dense class log-probabilities on it)."""

    quality: dict
    eval_tokens: int
    windows: torch.Tensor | None = None
    held_out: object | None = None
    class_logprobs: torch.Tensor | None = None


def baseline(dense, tokenizer=None, held_out=None, eval_tokens: int = QUICK_EVAL_TOKENS) -> Baseline:
    """Measure the dense model: quick perplexity on ``eval_tokens`` evaluation tokens (decoders) or
    accuracy on ``held_out`` (classifiers; without a held-out set there is nothing to measure)."""
    if is_encoder(dense):
        if held_out is None:
            return Baseline({}, int(eval_tokens))
        return Baseline({"accuracy": accuracy(dense, held_out)}, int(eval_tokens), held_out=held_out,
                        class_logprobs=class_log_probs(dense, held_out))
    windows = quick_windows(tokenizer, eval_tokens)
    ppl, _ = perplexity_and_kl(dense, windows)
    return Baseline({"perplexity": ppl}, int(eval_tokens), windows=windows)


def quality(model, base: Baseline, dense=None) -> dict:
    """The same quality numbers for ``model`` as ``base`` holds for the dense one, plus
    ``kl_to_dense`` (classifiers: always; decoders: when the ``dense`` model is given)."""
    if base.held_out is not None:
        return {"accuracy": accuracy(model, base.held_out),
                "kl_to_dense": kl_to_reference(base.class_logprobs, model, base.held_out)}
    if base.windows is None:
        return {}
    ppl, kl = perplexity_and_kl(model, base.windows, dense)
    return {"perplexity": ppl} if kl is None else {"perplexity": ppl, "kl_to_dense": kl}


@torch.no_grad()
def latency_ms(model, n_tokens: int = 128, repeats: int = 3) -> float:
    """Median wall time in ms of one forward pass over ``n_tokens`` tokens (batch 1, after a warm-up)."""
    device = next(model.parameters()).device
    vocab = min(getattr(model.config, "vocab_size", 1000), 1000)
    ids = torch.randint(3, max(vocab, 4), (1, n_tokens), generator=torch.Generator().manual_seed(0)).to(device)
    kwargs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if not is_encoder(model):
        kwargs["use_cache"] = False
    model(**kwargs)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(**kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def model_metrics(model, seq_len: int) -> dict:
    """Sizes (:func:`stat_core.evaluation.report.size_summary` at ``seq_len``) and ``latency_ms`` of ``model``."""
    return {**size_summary(model, seq_len), "latency_ms": latency_ms(model)}


def record(report: dict, before: dict, after: dict, eval_tokens: int | None = None) -> dict:
    """Write measured quality and latency into a prune report as ``<metric>_before`` / ``_after``
    (``kl_to_dense`` only after)."""
    for k in ("perplexity", "accuracy", "latency_ms", "kl_to_dense"):
        if k in after:
            if k not in AFTER_ONLY:
                report[f"{k}_before"] = before[k]
            report[f"{k}_after"] = after[k]
    if "perplexity" in after and eval_tokens is not None:
        report["perplexity_eval_tokens"] = int(eval_tokens)
    return report


# --- tables ----------------------------------------------------------------------------------------

METRIC_HEADERS = ["metric", "before", "after", "after ÷ before"]


def _ratio(before, after) -> str:
    if before in (None, 0) or after is None:
        return ""
    return f"{after / before:.2f}×"


def before_after_rows(before: dict, after: dict, eval_tokens: int, seq_len: int,
                      held_out_examples: int | None = None) -> list[list[str]]:
    """The before/after table (:data:`METRIC_HEADERS`) from :func:`quality` + :func:`model_metrics` dicts."""
    rows = []
    if "perplexity" in after:
        rows.append([f"perplexity (quick: {int(eval_tokens):,} eval tokens)", f"{before['perplexity']:.2f}",
                     f"{after['perplexity']:.2f}", _ratio(before["perplexity"], after["perplexity"])])
    if "accuracy" in after:
        rows.append([f"held-out accuracy ({held_out_examples} examples)", f"{before['accuracy']:.1%}",
                     f"{after['accuracy']:.1%}", f"{100 * (after['accuracy'] - before['accuracy']):+.1f} pt"])
    if "kl_to_dense" in after:
        rows.append(["KL to dense (nats per prediction)", "0", f"{after['kl_to_dense']:.4f}", ""])
    for label, key, fmt in (("parameters (all)", "params", "{:,}"), ("block parameters", "block_params", "{:,}"),
                            (f"block FLOPs / token (MACs, seq {seq_len})", "block_macs_per_token", "{:,.0f}"),
                            ("latency, 1×128 tokens (ms)", "latency_ms", "{:.1f}"),
                            ("size (MB, weights in memory)", "bytes", None)):
        b, a = before[key], after[key]
        text = (lambda v: f"{v / 1e6:.1f}") if fmt is None else fmt.format
        rows.append([label, text(b), text(a), _ratio(b, a)])
    return rows


def headline(before: dict, after: dict, eval_tokens: int) -> str:
    """One sentence: the quality change."""
    if "perplexity" in after:
        return (f"Perplexity {before['perplexity']:.2f} → {after['perplexity']:.2f} (quick estimate on "
                f"{int(eval_tokens):,} tokens).")
    return f"Held-out accuracy {before.get('accuracy', 0):.1%} → {after.get('accuracy', 0):.1%}."


# --- generation --------------------------------------------------------------------------------------

#: The longest prompt the app generates from (characters; about 2,000 tokens of English).
MAX_PROMPT_CHARS = 8000


def check_generation(model, prompt: str, max_new_tokens, tokenizer=None) -> int:
    """``max_new_tokens`` as an int, or ValueError with one sentence (classifier, empty or overlong
    prompt, count; with ``tokenizer``: prompt and new tokens beyond the model's positions)."""
    if is_encoder(model):
        raise ValueError("Generation is for decoders; a classifier is compared by accuracy.")
    if not (prompt or "").strip():
        raise ValueError("Type a prompt first.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"The prompt has {len(prompt):,} characters; prompts here are limited to "
                         f"{MAX_PROMPT_CHARS:,}: shorten it.")
    try:
        n = int(max_new_tokens)
    except (TypeError, ValueError):
        raise ValueError(f"Generate between 1 and 512 new tokens, got {max_new_tokens!r}.") from None
    if not 1 <= n <= 512:
        raise ValueError("Generate between 1 and 512 new tokens.")
    positions = getattr(model.config, "max_position_embeddings", None)
    if tokenizer is not None and positions:
        used = len(tokenizer(prompt).input_ids)
        if used + n > positions:
            raise ValueError(f"The prompt's {used:,} tokens and {n} new ones exceed the model's {positions:,} "
                             "positions; shorten the prompt or generate fewer tokens.")
    return n


@torch.no_grad()
def greedy_continuation(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """``prompt`` continued by greedy decoding: the new text only, special tokens dropped."""
    device = next(model.parameters()).device
    enc = tokenizer(prompt, return_tensors="pt").to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = model.generate(**enc, max_new_tokens=int(max_new_tokens), do_sample=False, pad_token_id=pad)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


# --- several methods at one budget ----------------------------------------------------------------------


#: The evaluation suite's columns in a comparison: (suite field, header, higher is better).
SUITE_COLUMNS = (("fewshot_accuracy", "few-shot acc", True), ("fewshot_bias_free", "few-shot AUC", True),
                 ("fewshot_majority_share", "one-label share", None), ("analogy_accuracy", "analogies", True),
                 ("instruction_agreement", "chat agreement", True), ("instruction_kl", "chat KL", False))


def _suite_columns(results: list[dict]) -> list[tuple[str, str, bool | None]]:
    """The suite columns every result has (none without a suite run)."""
    return [c for c in SUITE_COLUMNS if results and all(c[0] in r.get("suite", {}) for r in results)]


def compare_rows(results: list[dict], dense: dict, metric: str, label: Callable[[str], str] = str,
                 suite_dense: dict | None = None) -> list[list[str]]:
    """Rows of a comparison table (method, removed, ``metric``: ``perplexity`` or ``accuracy``, vs
    dense, KL to dense, then the suite's columns when the results have them); ``label`` names a
    method. With ``suite_dense`` (the reference's dense metrics) a first row shows the dense model."""
    rows = []
    suite_cols = _suite_columns(results)
    if suite_cols and suite_dense:
        shown = f"{dense[metric]:.2f}" if dense and metric == "perplexity" else ""
        rows.append(["dense", "0.0%", shown, "", "0"] + [_suite_value(suite_dense.get(k), k) for k, _, _ in suite_cols])
    for r in results:
        value = r.get(metric)
        if value is None:
            shown, rel = "n/a", ""
        elif metric == "perplexity":
            shown, rel = f"{value:.2f}", (f"{value / dense[metric]:.2f}× dense" if dense else "")
        else:
            shown, rel = f"{value:.1%}", (f"{100 * (value - dense[metric]):+.1f} pt" if dense else "")
        kl = r.get("kl_to_dense")
        row = [label(r["method"]), f"{r['achieved']:.1%}", shown, rel, "n/a" if kl is None else f"{kl:.4f}"]
        rows.append(row + [_suite_value(r["suite"].get(k), k) for k, _, _ in suite_cols])
    return rows


def _suite_value(v, key: str) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{v:.3f}" if key in ("fewshot_bias_free", "instruction_kl") else f"{v:.1%}"


def compare_best(results: list[dict], metric: str, label: Callable[[str], str] = str) -> str:
    """One sentence naming the best method per column (ties listed); the one-label share is not
    ranked (lower is not better by itself: dense answers one label for part of the prompts too)."""
    columns = [(metric, metric, metric == "accuracy", False), ("kl_to_dense", "KL", False, False)]
    columns += [(k, h, up, True) for k, h, up in _suite_columns(results) if up is not None]
    parts = []
    for key, header, higher, in_suite in columns:  # (the suite has its own perplexity and KL: not these columns)
        values = [((r["suite"] if in_suite else r).get(key), r["method"]) for r in results]
        values = [(v, m) for v, m in values if v is not None and v == v]
        if not values:
            continue
        best = max(v for v, _ in values) if higher else min(v for v, _ in values)
        winners = [label(m) for v, m in values if abs(v - best) <= 1e-12 * max(1.0, abs(best))]
        parts.append(f"{header} {', '.join(winners)}")
    return ("Best: " + "; ".join(parts) + ".") if parts else ""


def compare_summary(dense: dict, metric: str, eval_tokens: int, n_methods: int) -> tuple[str, str]:
    """``(column label, sentence)`` for a comparison of ``n_methods`` against the ``dense`` quality."""
    label = f"quick perplexity ({int(eval_tokens):,} tokens)" if metric == "perplexity" else "held-out accuracy"
    dense_txt = (f"{dense[metric]:.2f}" if metric == "perplexity" else f"{dense[metric]:.1%}") if dense else "n/a"
    return label, f"Dense {label}: {dense_txt}. Same budget, same calibration, {n_methods} methods."


# --- a before/after measurement, put together ----------------------------------------------------------

def dense_side(dense, tokenizer, held_out, eval_tokens: int, seq_len: int) -> tuple[Baseline, dict]:
    """``(baseline, before)``: the dense model's :func:`baseline` (what pruned models are compared
    with) and its quality, sizes and latency, measured once per evaluation size."""
    base = baseline(dense, tokenizer, held_out, eval_tokens)
    return base, {**base.quality, **model_metrics(dense, seq_len)}


def pruned_side(pruned, base: Baseline, dense, seq_len: int) -> dict:
    """The pruned model's quality against ``base`` (with KL to ``dense``), sizes and latency."""
    return {**quality(pruned, base, dense=dense), **model_metrics(pruned, seq_len)}


def before_after(report: dict, before: dict, after: dict, eval_tokens: int, seq_len: int,
                 held_out_examples: int | None = None) -> tuple[list[list[str]], str]:
    """``(rows, sentence)``: the measurement :func:`record`-ed into the prune's ``report``, the
    before/after table (:data:`METRIC_HEADERS`) and its :func:`headline`."""
    record(report, before, after, eval_tokens)
    return (before_after_rows(before, after, eval_tokens, seq_len, held_out_examples),
            headline(before, after, eval_tokens))


def compare_table(results: list[dict], dense: dict, metric: str, eval_tokens: int,
                  label: Callable[[str], str] = str, suite_dense: dict | None = None,
                  short_label: Callable[[str], str] | None = None) -> tuple[list[list[str]], list[str], str]:
    """``(rows, headers, sentence)`` of a :func:`compare_methods` result (with the suite's columns
    when it ran; ``suite_dense``: the dense model's suite metrics, shown as a first row). The
    sentence names the best method per column with ``short_label`` (default ``label``)."""
    column, sentence = compare_summary(dense, metric, eval_tokens, len(results))
    headers = ["method", "removed", column, "vs dense", "KL to dense"] + [h for _, h, _ in _suite_columns(results)]
    best = compare_best(results, metric, short_label or label)
    return (compare_rows(results, dense, metric, label, suite_dense), headers,
            f"{sentence} {best}".strip())
