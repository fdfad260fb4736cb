"""The evaluation suite (stat_core/suite.py): scoring functions on a tiny random Llama, the whole
suite on a tiny model with a byte-level tokenizer built here, and one slow check on SmolLM2."""

import copy
import math

import numpy as np
import pytest
import torch
from conftest import tiny_model

from stat_core.evaluation import suite
from stat_core.evaluation.perplexity import perplexity


def _perturbed(model, scale: float = 0.05, seed: int = 1):
    """A copy of ``model`` with noise on one MLP projection (stands in for a pruned model)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        w = other.model.layers[0].mlp.down_proj.weight
        w.add_(scale * torch.randn(w.shape, generator=gen))
    return other


def _sequences(lengths, seed=0, vocab=128):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen) for n in lengths]


@torch.no_grad()
def _greedy(model, prefix: torch.Tensor, n: int) -> torch.Tensor:
    """``prefix`` extended by ``n`` greedy tokens (full forwards, no cache)."""
    seq = prefix
    for _ in range(n):
        seq = torch.cat([seq, model(input_ids=seq[None]).logits[0, -1].argmax()[None]])
    return seq


# --- perplexity and KL on windows ------------------------------------------------------------------

def test_dense_against_itself_gives_kl_zero_and_the_protocol_perplexity(windows):
    model = tiny_model()
    reference, ppl = suite.dense_window_logprobs(model, windows, batch_size=3)
    assert reference.dtype == torch.float16 and reference.shape == (8, 23, 128)
    kl, ppl2 = suite.kl_and_perplexity(model, windows, reference, batch_size=3)
    assert kl == 0.0
    assert ppl == ppl2
    assert ppl == pytest.approx(perplexity(model, windows, batch_size=3), rel=1e-5)


def test_kl_of_a_perturbed_model_is_positive_and_matches_kl_div(windows):
    dense, other = tiny_model(), _perturbed(tiny_model(), scale=1.0)
    reference, _ = suite.dense_window_logprobs(dense, windows, batch_size=4)
    kl, ppl = suite.kl_and_perplexity(other, windows, reference, batch_size=4)
    assert kl > 1e-3
    assert ppl == pytest.approx(perplexity(other, windows), rel=1e-5)
    with torch.no_grad():
        d = torch.log_softmax(dense(input_ids=windows).logits[:, :-1].float(), -1).reshape(-1, 128)
        o = torch.log_softmax(other(input_ids=windows).logits[:, :-1].float(), -1).reshape(-1, 128)
    direct = torch.nn.functional.kl_div(o, d, log_target=True, reduction="batchmean")
    assert kl == pytest.approx(float(direct), rel=2e-2, abs=1e-5)


def test_large_references_are_memory_mapped(windows, monkeypatch):
    model = tiny_model()
    in_memory, _ = suite.dense_window_logprobs(model, windows, batch_size=4)
    monkeypatch.setattr(suite, "IN_MEMORY_LIMIT_BYTES", 0)
    mapped, _ = suite.dense_window_logprobs(model, windows, batch_size=4)
    assert torch.equal(mapped, in_memory)
    assert suite.kl_and_perplexity(model, windows, mapped, batch_size=4)[0] == 0.0


def test_kl_rows_is_exact_for_identical_inputs_and_rejects_mismatched_shapes(windows):
    x = torch.log_softmax(torch.randn(5, 128), -1).half()
    assert torch.equal(suite.kl_rows(x, x), torch.zeros(5))
    y = torch.log_softmax(torch.randn(5, 128), -1).half()
    assert (suite.kl_rows(x, y) > 0).all()
    with pytest.raises(ValueError, match=r"reference log-probabilities \(8, 10, 128\) do not match windows \(8, 24\)"):
        suite.kl_and_perplexity(tiny_model(), windows, torch.zeros(8, 10, 128, dtype=torch.float16))


# --- padding and teacher forcing ------------------------------------------------------------------

def test_left_padding_gives_the_same_logits_as_no_padding():
    model = tiny_model()
    seqs = _sequences((5, 9, 12, 7))
    ids, mask, positions = suite.left_pad(seqs, pad_id=0)
    assert ids.shape == (4, 12) and mask.sum(1).tolist() == [5, 9, 12, 7]
    assert positions[0].tolist() == [0] * 7 + [0, 1, 2, 3, 4]
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits
        for row, s in enumerate(seqs):
            alone = model(input_ids=s[None], use_cache=False).logits[0]
            torch.testing.assert_close(padded[row, -len(s):], alone, atol=1e-5, rtol=1e-5)
    equal = suite.left_pad(_sequences((6, 6)), pad_id=0)
    assert equal[1] is None and equal[2] is None


def test_teacher_forced_padding_independent_and_dense_agrees_with_itself():
    dense, other = tiny_model(), _perturbed(tiny_model(), scale=0.2)
    seqs = _sequences((5, 9, 12, 7, 3))
    spans = [(3, 5), (4, 9), (10, 12), (1, 7), (2, 3)]
    alone = suite.teacher_forced(dense, seqs, spans, batch_size=1, keep_logprobs=True)
    batched = suite.teacher_forced(dense, seqs, spans, batch_size=5, keep_logprobs=True)
    for a, b, (start, end) in zip(alone.logprobs, batched.logprobs, spans):
        assert a.shape == (end - start, 128) and a.dtype == torch.float16
        torch.testing.assert_close(a.float(), b.float(), atol=2e-3, rtol=0)
    # The dense model's own greedy continuations as answers: agreement 1 and KL 0 exactly.
    greedy = [_greedy(dense, s[:start], end - start) for s, (start, end) in zip(seqs, spans)]
    tf = suite.teacher_forced(dense, greedy, spans, batch_size=5, keep_logprobs=True)
    assert all(bool(m.all()) for m in tf.matches)
    agreement, kl = suite.teacher_forced_agreement(dense, greedy, spans, tf.logprobs, batch_size=5)
    assert agreement == 1.0 and kl == 0.0
    agreement, kl = suite.teacher_forced_agreement(other, greedy, spans, tf.logprobs, batch_size=5)
    assert kl > 0 and agreement <= 1.0
    one = suite.teacher_forced_agreement(other, greedy, spans, tf.logprobs, batch_size=1)
    assert one[0] == agreement and one[1] == pytest.approx(kl, rel=1e-3, abs=1e-6)


def test_teacher_forced_scores_the_right_positions():
    model = tiny_model()
    seq = _sequences((10,))[0]
    tf = suite.teacher_forced(model, [seq], [(6, 10)], keep_logprobs=True)
    with torch.no_grad():
        logits = model(input_ids=seq[None]).logits[0]
    assert torch.equal(tf.predicted[0], logits[5:9].argmax(-1))
    torch.testing.assert_close(tf.logprobs[0].float(), torch.log_softmax(logits[5:9], -1), atol=2e-2, rtol=1e-3)
    with pytest.raises(ValueError, match=r"answer span \(0, 3\) does not fit"):
        suite.teacher_forced(model, [seq], [(0, 3)])


def test_last_token_logprobs_padding_independent():
    model = tiny_model()
    seqs = _sequences((4, 11, 7))
    batched = suite.last_token_logprobs(model, seqs, [3, 17], batch_size=3)
    with torch.no_grad():
        for row, s in enumerate(seqs):
            alone = torch.log_softmax(model(input_ids=s[None]).logits[0, -1], -1)[[3, 17]]
            torch.testing.assert_close(batched[row], alone, atol=1e-5, rtol=1e-5)


# --- scores --------------------------------------------------------------------------------------

def test_auc_ignores_a_constant_bias_and_is_half_for_noise():
    labels = np.array([0, 1] * 50)
    scores = 5.0 + labels + np.linspace(0, 0.5, 100)  # perfectly ranked, every log-odds positive
    metrics = suite.fewshot_metrics(torch.tensor(scores), torch.tensor(labels))
    assert metrics["fewshot_accuracy"] == 0.5
    assert metrics["fewshot_bias_free"] == 1.0
    assert metrics["fewshot_majority_share"] == 1.0
    rng = np.random.default_rng(0)
    noise_labels = rng.integers(0, 2, 4000)
    assert abs(suite.roc_auc(rng.normal(size=4000), noise_labels) - 0.5) < 0.03
    assert suite.rank_auc(np.zeros(10), [0, 1] * 5) == 0.5
    assert math.isnan(suite.roc_auc([1.0, 2.0], [1, 1]))


def test_rank_auc_handles_ties_like_sklearn():
    roc_auc_score = pytest.importorskip("sklearn.metrics").roc_auc_score
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 5, 200).astype(float)  # many ties
    labels = (rng.random(200) < 0.4 + 0.1 * scores).astype(int)
    assert suite.rank_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert suite.rank_auc([3, 2, 1], [1, 0, 0]) == 1.0


def test_majority_share():
    assert suite.majority_share([1] * 7) == 1.0
    assert suite.majority_share([0, 1, 0, 1]) == 0.5
    assert suite.majority_share([0, 0, 0, 1]) == 0.75


# --- data -----------------------------------------------------------------------------------------

def test_analogy_sample_is_fixed_and_never_shows_the_answer():
    questions = suite.analogy_questions(per_category=25, seed=0)
    assert len(questions) == 225
    assert [q.category for q in questions[::25]] == list(suite.ANALOGY_CATEGORIES)
    assert questions == suite.analogy_questions(per_category=25, seed=0)
    assert suite.analogy_questions(per_category=10, seed=0) == [
        q for k in range(9) for q in questions[25 * k:25 * k + 10]]
    for q in questions:
        assert len(q.examples) == 3 and q.words not in q.examples
        shown = {w.lower() for e in q.examples for w in e}
        assert q.words[3].lower() not in shown and q.words[2].lower() not in shown
    q = questions[0]
    lines = q.prompt().split("\n")
    assert len(lines) == 4 and lines[-1] == f"{q.words[0]} is to {q.words[1]} as {q.words[2]} is to"
    assert lines[0] == "{} is to {} as {} is to {}.".format(*q.examples[0])
    assert q.answer == " " + q.words[3]


def test_instruction_prompts_asset():
    prompts = suite.instruction_prompts()
    assert len(prompts) >= 36 and len(set(prompts)) == len(prompts)
    assert "What is the capital of Japan?" in prompts


def test_config_validation_and_quick():
    quick = suite.SuiteConfig.quick()
    assert quick.eval_tokens < suite.SuiteConfig().eval_tokens
    assert quick.analogies_per_category == 10 and quick.instruction_new_tokens == 24
    tiny = suite.SuiteConfig.tiny()
    assert tiny.eval_tokens // tiny.window == 4 and tiny.max_fewshot_prompts == 8
    with pytest.raises(ValueError, match=r"eval_tokens \(100\) must be at least one window \(512\)"):
        suite.SuiteConfig(eval_tokens=100, window=512)


def test_build_reference_refuses_an_encoder():
    from transformers import BertConfig, BertForSequenceClassification

    encoder = BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                                                       num_attention_heads=2, intermediate_size=32)).eval()
    with pytest.raises(ValueError, match="decoder"):
        suite.build_reference(encoder, None)


# --- the whole suite on a tiny model --------------------------------------------------------------

def _byte_tokenizer(words=("Ġnegative", "Ġpositive")):
    """Byte-level BPE with the label words as single tokens and a ChatML template (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    merges = []
    for word in words:
        for k in range(1, len(word)):
            merges.append((word[:k], word[k]))
            vocab.setdefault(word[:k + 1], len(vocab))
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>"])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


def test_whole_suite_on_a_tiny_model():
    tokenizer = _byte_tokenizer()
    dense = tiny_model(vocab_size=len(tokenizer), max_position_embeddings=2048)
    config = suite.SuiteConfig(eval_tokens=256, window=64, analogies_per_category=1, instruction_new_tokens=4,
                               batch_size=4, max_fewshot_prompts=6, max_instruction_prompts=3)
    stages = set()
    reference = suite.build_reference(dense, tokenizer, config, progress=lambda s, d, t: stages.add(s))
    assert {"dense windows", "dense few-shot", "dense analogies", "dense answers", "dense instructions"} <= stages
    assert reference.window_logprobs.shape == (4, 63, len(tokenizer))
    assert len(reference.analogy_sequences) == 9 and len(reference.fewshot_sequences) == 6
    assert sorted(reference.fewshot_labels.tolist()) == [0, 0, 0, 1, 1, 1]
    assert len(reference.instruction_answers) == 3
    for seq, (start, end), lp in zip(reference.instruction_sequences, reference.instruction_spans,
                                     reference.instruction_logprobs):
        assert 1 <= end - start <= 4 and end == len(seq) and lp.shape == (end - start, len(tokenizer))
    assert tuple(reference.dense_metrics) == suite.SUITE_FIELDS
    assert reference.dense_metrics["kl_to_dense"] == 0.0
    assert reference.dense_metrics["instruction_agreement"] == 1.0

    again = suite.evaluate_suite(dense, tokenizer, reference)
    assert again == reference.dense_metrics

    pruned = suite.evaluate_suite(_perturbed(dense, scale=0.3), tokenizer, reference)
    assert tuple(pruned) == suite.SUITE_FIELDS
    assert pruned["kl_to_dense"] > 0 and pruned["instruction_kl"] > 0
    # agreement = the share of answer tokens whose argmax (one unpadded forward per answer) is the dense token
    other = _perturbed(dense, scale=0.3)
    hits = total = 0
    with torch.no_grad():
        for seq, (start, end) in zip(reference.instruction_sequences, reference.instruction_spans):
            ids = torch.as_tensor(seq).reshape(1, -1)
            pred = other(input_ids=ids, use_cache=False).logits[0, start - 1:end - 1].argmax(-1)
            hits += int((pred == ids[0, start:end]).sum())
            total += end - start
    assert pruned["instruction_agreement"] == pytest.approx(hits / total)

    tokenizer.chat_template = None
    no_chat = suite.build_reference(dense, tokenizer, suite.SuiteConfig(
        eval_tokens=128, window=64, fewshot=False, analogies=False))
    assert tuple(no_chat.dense_metrics) == ("perplexity", "kl_to_dense")
    assert tuple(suite.evaluate_suite(dense, tokenizer, no_chat)) == ("perplexity", "kl_to_dense")
    with pytest.raises(ValueError, match="tokenizer"):
        suite.evaluate_suite(dense, _byte_tokenizer(words=("Ġnegative",)), reference)


# --- the real demo model ----------------------------------------------------------------------------

@pytest.mark.slow
def test_dense_suite_on_smollm2_is_sensible():
    from stat_core.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    config = suite.SuiteConfig(eval_tokens=1024, analogies_per_category=2, instruction_new_tokens=8,
                               max_instruction_prompts=4, max_fewshot_prompts=32)
    reference = suite.build_reference(model, tokenizer, config)
    dense = reference.dense_metrics
    assert tuple(dense) == suite.SUITE_FIELDS
    assert 5 < dense["perplexity"] < 40
    assert dense["fewshot_accuracy"] > 0.6 and dense["fewshot_bias_free"] > 0.7
    assert dense["analogy_accuracy"] > 0.2
    japan = reference.instruction_prompts.index("What is the capital of Japan?")
    assert "Tokyo" in reference.instruction_answers[japan]
    # The greedy answers are what the teacher-forced model predicts (a computed agreement, not a constant).
    # Measuring the dense model again against its own reference is checked on the tiny model above,
    # which runs the same code; a second pass here would double this test's minutes.
    assert dense["instruction_agreement"] == 1.0
