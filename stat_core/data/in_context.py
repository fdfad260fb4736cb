"""In-context calibration text: few-shot demonstrations built from the Wikipedia calibration split.

A model prompted with examples must read the demonstrations' labels and copy the pattern; windows of
running prose never exercise that. This source writes, from the calibration articles only, windows
of demonstrations of one small task each, in a plain ``Field: value`` layout:

- ``topic``: a sentence and the title of the article it comes from (3 titles per window);
- ``first-word`` / ``last-word``: a sentence and its first / last word;
- ``count``: a short phrase and its number of words;
- ``upper``: a word and the same word in capitals.

None of these is a task, prompt or label set of the evaluation suite (sentiment, word analogies,
chat instructions, news perplexity): the suite measures whether in-context skills survive, this
text only exercises the same kind of computation. ``in-context`` mixes such windows half and half
with Wikipedia's calibration windows (``IN_CONTEXT_SHARE``); the result is measured in
``docs/experiments.md``.
"""

from __future__ import annotations

import random
import re

import torch

from stat_core.data.sources import (
    CalibrationConfig,
    bos_prefix,
    calibration_windows,
    interleave_windows,
    wikipedia_split,
)

TASKS = ("topic", "first-word", "last-word", "count", "upper")
#: Share of the ``in-context`` source's windows made of demonstrations (the rest: Wikipedia prose).
IN_CONTEXT_SHARE = 0.5

_TITLE = re.compile(r"'''(.+?)'''")
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")
_PUNCT = ',;:()"'



def _sentences(article: str) -> list[str]:
    text = article.replace("'''", "").replace("''", "")
    out = []
    for line in text.splitlines():
        for s in re.split(r"(?<=[.!?])\s+", line.strip()):
            words = s.split()
            if 6 <= len(words) <= 30 and s[0].isupper() and s.endswith("."):
                out.append(s)
    return out


def _articles() -> list[tuple[str, list[str]]]:
    """(title, sentences) of each calibration article with a bold title and enough sentences."""
    out = []
    for article in wikipedia_split("calibration"):
        match = _TITLE.search(article[:400])
        sentences = _sentences(article)
        if match and len(sentences) >= 8 and len(match.group(1)) <= 40:
            out.append((match.group(1).strip("' "), sentences))
    return out


def _demonstration(task: str, rng: random.Random, articles, chosen) -> str:
    title, sentences = chosen[rng.randrange(len(chosen))] if task == "topic" else articles[rng.randrange(len(articles))]
    sentence = sentences[rng.randrange(len(sentences))]
    words = sentence.rstrip(".").split()
    if task == "topic":
        return f"Text: {sentence}\nTopic: {title}\n\n"
    if task == "first-word":
        return f"Sentence: {sentence}\nFirst word: {words[0].strip(_PUNCT)}\n\n"
    if task == "last-word":
        return f"Sentence: {sentence}\nLast word: {words[-1].strip(_PUNCT)}\n\n"
    if task == "count":
        start = rng.randrange(max(1, len(words) - 3))
        n = rng.randint(2, min(7, len(words) - start))
        return f"Phrase: {' '.join(words[start:start + n])}\nNumber of words: {n}\n\n"
    plain = [w.strip(_PUNCT) for w in words]
    plain = [w for w in plain if _WORD.match(w) and len(w) > 3] or ["word"]
    w = plain[rng.randrange(len(plain))].lower()
    return f"Input: {w}\nOutput: {w.upper()}\n\n"


def in_context_windows(tokenizer, num_samples: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``(num_samples, seq_len [+1 with BOS])`` windows of demonstrations, one task per window
    (cycling through :data:`TASKS` from a seeded start), each starting at a demonstration."""
    articles = _articles()
    rng = random.Random(seed)
    prefix = bos_prefix(tokenizer)
    rows = []
    for i in range(num_samples):
        task = TASKS[(i + seed) % len(TASKS)]
        chosen = rng.sample(articles, 3)
        ids: list[int] = []
        while len(ids) < seq_len:
            ids += tokenizer(_demonstration(task, rng, articles, chosen), add_special_tokens=False)["input_ids"]
        rows.append(prefix[:1] + ids[:seq_len])
    return torch.tensor(rows)


def in_context_calibration(tokenizer, config: CalibrationConfig,
                           share: float = IN_CONTEXT_SHARE) -> tuple[torch.Tensor, dict]:
    """The ``in-context`` source: demonstration windows (``share`` of them) and Wikipedia calibration
    windows, interleaved so any prefix of the set sees both."""
    n_demo = max(1, round(config.num_samples * share))
    demo = in_context_windows(tokenizer, n_demo, config.seq_len, config.seed)
    n_wiki = config.num_samples - n_demo
    info = {"in_context_windows": n_demo, "wikipedia_windows": n_wiki, "in_context_tasks": list(TASKS)}
    if not n_wiki:
        return demo, info
    wiki = calibration_windows(tokenizer, wikipedia_split("calibration"),
                               CalibrationConfig(num_samples=n_wiki, seq_len=config.seq_len, seed=config.seed))
    return interleave_windows(wiki, demo), info
