"""Self-generated chat calibration text: disjoint from the suite, cached by fingerprint, mixed with
Wikipedia so every prefix of the windows sees both."""

import json

import pytest
import torch

from conftest import tiny_model
from test_suite import _byte_tokenizer
from stat_core.data import mix as cm
from stat_core.data.sources import CalibrationConfig, DataError, calibration_windows, wikipedia_split
from stat_core.evaluation.suite import analogy_questions, instruction_prompts
from stat_core.data.chat import chat_prompt_ids


def test_seed_prompts_never_overlap_the_evaluation_suite():
    seeds = cm.seed_prompts()
    assert len(seeds) >= 100 and len(set(seeds)) == len(seeds)
    assert not set(seeds) & set(instruction_prompts())
    lowered = " ".join(seeds).lower()
    assert " is to " not in lowered  # not the analogy format at all, let alone its lines
    for q in analogy_questions(per_category=25):
        assert q.line(q.words).lower() not in lowered
    from stat_core.data.labelled import movie_reviews

    assert not any(t[:60].lower() in lowered for t in movie_reviews().texts if len(t) >= 60)


@pytest.fixture
def tiny_chat(tmp_path, monkeypatch):
    monkeypatch.setenv("STAT_CACHE_DIR", str(tmp_path / "cache"))
    tokenizer = _byte_tokenizer()
    return tiny_model(vocab_size=len(tokenizer), max_position_embeddings=2048), tokenizer


def test_transcripts_are_the_models_own_chat_and_are_cached(tiny_chat):
    model, tokenizer = tiny_chat
    prompts = cm.seed_prompts()[:5]
    settings = cm.GenerationSettings(max_new_tokens=3, batch_size=2)
    calls = []
    transcripts, seconds = cm.generate_transcripts(model, tokenizer, prompts, settings,
                                                   progress=lambda *a: calls.append(a))
    assert seconds > 0 and len(transcripts) == 5
    # the bar shows its total before the first batch (minutes on a real model), then one step per batch
    assert [c[1:] for c in calls] == [(0, 3), (1, 3), (2, 3), (3, 3)]
    for prompt, t in zip(prompts, transcripts):
        head = chat_prompt_ids(tokenizer, prompt)
        assert t[:len(head)] == head and 1 <= len(t) - len(head) <= 3
    again, seconds_again = cm.generate_transcripts(model, tokenizer, prompts, settings)
    assert again == transcripts and seconds_again == 0.0  # the cache, not a second sampling
    cached = list((cm.cache_dir() / "self_generated").glob("*.json"))
    assert len(cached) == 1 and json.loads(cached[0].read_text())["transcripts"] == transcripts
    # Other weights, other text: the fingerprint covers the parameters.
    other = tiny_model(seed=1, vocab_size=len(tokenizer), max_position_embeddings=2048)
    cm.generate_transcripts(other, tokenizer, prompts, settings)
    assert len(list((cm.cache_dir() / "self_generated").glob("*.json"))) == 2


def test_mix_interleaves_wikipedia_and_self_generated_windows(tiny_chat):
    model, tokenizer = tiny_chat
    prompts = cm.seed_prompts()[:6]
    settings = cm.GenerationSettings(max_new_tokens=4, batch_size=3)
    config = CalibrationConfig(num_samples=4, seq_len=16, seed=0)
    cal = cm.decoder_calibration(model, tokenizer, "mix", config, settings, prompts=prompts)
    assert cal.windows.shape == (4, 16)
    assert cal.info["self_generated_windows"] == 2 and cal.info["wikipedia_windows"] == 2
    wiki = calibration_windows(tokenizer, wikipedia_split("calibration"), CalibrationConfig(num_samples=2, seq_len=16))
    transcripts, _ = cm.generate_transcripts(model, tokenizer, prompts, settings)
    own = cm.transcript_windows(tokenizer, transcripts, 2, 16, 0)
    # Wikipedia, own chat, Wikipedia, own chat: the gradient pass's first windows see both.
    torch.testing.assert_close(cal.windows, torch.stack([wiki[0], own[0], wiki[1], own[1]]))
    im_start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert (own == im_start).any()  # the chat template's tokens are part of the calibration text


def test_sources_refuse_clearly(tiny_chat):
    model, tokenizer = tiny_chat
    with pytest.raises(DataError, match="Unknown calibration source"):
        cm.decoder_calibration(model, tokenizer, "reddit")
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="no chat template"):
        cm.decoder_calibration(model, tokenizer, "mix", CalibrationConfig(num_samples=2, seq_len=16))


def test_in_context_source_is_demonstrations_from_the_calibration_articles_and_prose(tiny_chat):
    """``in-context``: windows of few-shot demonstrations (one task each, every task present) written
    from the Wikipedia calibration split, interleaved with that split's prose; deterministic; none of
    the suite's tasks or label words."""
    from stat_core.data.in_context import TASKS, in_context_windows

    model, tokenizer = tiny_chat
    demo = in_context_windows(tokenizer, 10, 600, seed=3)  # bytes: a few demonstrations each
    assert demo.shape == (10, 600) and torch.equal(demo, in_context_windows(tokenizer, 10, 600, seed=3))
    texts = [tokenizer.decode(row) for row in demo]
    fields = {"topic": "\nTopic: ", "first-word": "\nFirst word: ", "last-word": "\nLast word: ",
              "count": "\nNumber of words: ", "upper": "\nOutput: "}
    assert {task for task in TASKS for t in texts if fields[task] in t} == set(TASKS)
    evaluation = " ".join(wikipedia_split("evaluation"))
    for t in texts:
        assert "positive" not in t.lower().split() and " is to " not in t
        if "\nTopic: " in t:  # titles and sentences of calibration articles only
            sentence = t.split("Text: ")[1].split("\n")[0]
            assert sentence not in evaluation
    out = cm.decoder_calibration(model, tokenizer, "in-context", CalibrationConfig(num_samples=6, seq_len=96, seed=3))
    assert out.windows.shape == (6, 96)
    assert out.info["in_context_windows"] == 3 and out.info["wikipedia_windows"] == 3
    wiki = calibration_windows(tokenizer, wikipedia_split("calibration"),
                               CalibrationConfig(num_samples=3, seq_len=96, seed=3))
    assert torch.equal(out.windows[0::2], wiki)  # prose first, then demonstrations, alternating
    assert torch.equal(out.windows[1::2], in_context_windows(tokenizer, 3, 96, seed=3))
