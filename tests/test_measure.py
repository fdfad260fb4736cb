"""stat_core.evaluation.measure and the orchestration in stat_core.pipeline that the app and the CLI share:
numbers checked against hand computations on tiny random models."""

import copy
import math
import types
import zipfile

import pytest
import torch

from stat_core.evaluation import measure as M
from stat_core import pipeline as P
from stat_core.calibration.statistics import CalibrationSet

from conftest import tiny_model


def tiny_classifier(seed: int = 0):
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=100, max_position_embeddings=64, num_labels=3)
    return AutoModelForSequenceClassification.from_config(cfg).eval()


def labelled_set(n: int = 12, length: int = 10, seed: int = 0) -> CalibrationSet:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 100, (n, length), generator=g)
    mask = torch.ones_like(ids)
    mask[::3, length // 2:] = 0     # some padded examples
    return CalibrationSet(ids, mask, torch.randint(0, 3, (n,), generator=g))


def hand_logprobs(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits[:, :-1].double().log_softmax(-1)


# --- decoder quality -----------------------------------------------------------------------------

def test_perplexity_and_kl_equal_hand_computations(windows):
    dense, other = tiny_model(seed=0), tiny_model(seed=1)
    d, o = hand_logprobs(dense, windows), hand_logprobs(other, windows)
    targets = windows[:, 1:, None]
    hand_ppl = math.exp(-float(o.gather(-1, targets).mean()))
    hand_kl = float((d.exp() * (d - o)).sum(-1).mean())

    ppl, kl = M.perplexity_and_kl(other, windows, dense)
    assert ppl == pytest.approx(hand_ppl, rel=1e-5) and kl == pytest.approx(hand_kl, rel=1e-4)
    assert hand_kl > 1e-3      # the two random models do differ
    ppl3, kl3 = M.perplexity_and_kl(other, windows, dense, batch_size=3)   # batching changes nothing
    assert ppl3 == pytest.approx(ppl, rel=1e-6) and kl3 == pytest.approx(kl, rel=1e-5)
    # the same model: zero KL, and the perplexity of stat_core.evaluation.perplexity
    from stat_core.evaluation.perplexity import perplexity

    ppl_d, kl_d = M.perplexity_and_kl(dense, windows, dense)
    assert kl_d == 0.0 and ppl_d == pytest.approx(perplexity(dense, windows), rel=1e-6)
    assert M.perplexity_and_kl(dense, windows) == (pytest.approx(ppl_d), None)


def test_quality_against_a_decoder_baseline(windows):
    dense, other = tiny_model(seed=0), tiny_model(seed=1)
    base = M.Baseline({"perplexity": M.perplexity_and_kl(dense, windows)[0]}, windows.numel(), windows=windows)
    q = M.quality(other, base, dense=dense)
    assert set(q) == {"perplexity", "kl_to_dense"}
    assert (q["perplexity"], q["kl_to_dense"]) == pytest.approx(M.perplexity_and_kl(other, windows, dense))
    assert set(M.quality(other, base)) == {"perplexity"}          # no dense model given: no KL
    assert M.quality(dense, base, dense=dense)["perplexity"] == pytest.approx(base.quality["perplexity"])


def test_decoder_baseline_reads_the_evaluation_split():
    from stat_core.data.sources import bos_prefix

    tok = smollm2_tokenizer()
    model = tiny_model(vocab_size=49152, max_position_embeddings=512)
    base = M.baseline(model, tok, eval_tokens=256)
    bos = len(bos_prefix(tok))
    assert base.windows.shape == (2, 128 + bos) and base.eval_tokens == 256
    assert base.quality["perplexity"] == pytest.approx(M.perplexity_and_kl(model, base.windows)[0])


# --- classifier quality ----------------------------------------------------------------------------

def test_classifier_baseline_and_quality_equal_hand_computations():
    dense, other = tiny_classifier(0), tiny_classifier(1)
    with torch.no_grad():   # confident heads: a random BERT's class distributions are almost uniform
        dense.classifier.weight.mul_(30)
        other.classifier.weight.mul_(30)
    data = labelled_set()

    def logp(model):
        with torch.no_grad():
            return model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits.double().log_softmax(-1)

    d, o = logp(dense), logp(other)
    base = M.baseline(dense, held_out=data)
    assert base.quality == {"accuracy": pytest.approx(float((d.argmax(-1) == data.labels).double().mean()))}
    q = M.quality(other, base)
    assert q["accuracy"] == pytest.approx(float((o.argmax(-1) == data.labels).double().mean()))
    assert q["kl_to_dense"] == pytest.approx(float((d.exp() * (d - o)).sum(-1).mean()), rel=1e-4)
    assert q["kl_to_dense"] > 1e-2
    assert M.quality(dense, base)["kl_to_dense"] == pytest.approx(0.0, abs=1e-7)
    assert M.baseline(dense).quality == {} and M.quality(dense, M.baseline(dense)) == {}   # nothing held out


# --- latency, tables, report ---------------------------------------------------------------------------

def test_latency_is_the_median_of_timed_forwards(monkeypatch):
    model = tiny_model()
    calls = []
    real_forward = model.forward
    monkeypatch.setattr(model, "forward", lambda *a, **k: calls.append(k["input_ids"].shape) or real_forward(*a, **k))
    ticks = iter([0.0, 1.0, 10.0, 13.0, 20.0, 22.0])          # three timed passes of 1 s, 3 s, 2 s
    monkeypatch.setattr(M, "time", types.SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert M.latency_ms(model, n_tokens=16, repeats=3) == pytest.approx(2000.0)
    assert calls == [(1, 16)] * 4                                # a warm-up and three timed passes


def test_before_after_rows_and_record():
    before = {"perplexity": 10.0, "params": 1000, "block_params": 800, "block_macs_per_token": 600.0,
              "latency_ms": 4.0, "bytes": 4_000_000}
    after = {"perplexity": 12.5, "kl_to_dense": 0.12345, "params": 700, "block_params": 500,
             "block_macs_per_token": 300.0, "latency_ms": 3.0, "bytes": 2_800_000}
    rows = M.before_after_rows(before, after, 2048, 512)
    assert rows[0] == ["perplexity (quick: 2,048 eval tokens)", "10.00", "12.50", "1.25×"]
    assert rows[1] == ["KL to dense (nats per prediction)", "0", "0.1235", ""]
    assert rows[2] == ["parameters (all)", "1,000", "700", "0.70×"]
    assert rows[4] == ["block FLOPs / token (MACs, seq 512)", "600", "300", "0.50×"]
    assert rows[5][1:] == ["4.0", "3.0", "0.75×"] and rows[6][1:] == ["4.0", "2.8", "0.70×"]
    acc = M.before_after_rows({**before, "accuracy": 0.8}, {**after, "accuracy": 0.75}, 0, 128, held_out_examples=40)
    assert ["held-out accuracy (40 examples)", "80.0%", "75.0%", "-5.0 pt"] in acc
    report = M.record({}, before, after, 2048)
    assert report == {"perplexity_before": 10.0, "perplexity_after": 12.5, "latency_ms_before": 4.0,
                      "latency_ms_after": 3.0, "kl_to_dense_after": 0.12345, "perplexity_eval_tokens": 2048}
    assert M.headline(before, after, 2048).startswith("Perplexity 10.00 → 12.50")


# --- generation ----------------------------------------------------------------------------------------

class CharTokenizer:
    """Just enough of a tokenizer for generate(): one id per character (ids 3..127), no special tokens."""

    pad_token_id, eos_token_id = 0, 1

    def __call__(self, text, return_tensors=None):
        from transformers import BatchEncoding

        ids = torch.tensor([[3 + (ord(c) % 120) for c in text]])
        return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

    def decode(self, ids, skip_special_tokens=False):
        return ",".join(str(int(i)) for i in ids if not (skip_special_tokens and int(i) in (0, 1)))


def test_greedy_continuation_is_argmax_decoding():
    model, tok = tiny_model(), CharTokenizer()
    ids = tok("The river")["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            new.append(nxt)
            if nxt == tok.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    assert M.greedy_continuation(model, tok, "The river", 6) == tok.decode(new, skip_special_tokens=True)


def test_check_generation_says_what_is_wrong():
    assert M.check_generation(tiny_model(), "hi", "12") == 12
    for prompt, n, fragment in (("  ", 5, "Type a prompt"), ("hi", 0, "between 1 and 512"),
                                ("hi", 513, "between 1 and 512"), ("hi", "many", "between 1 and 512")):
        with pytest.raises(ValueError, match=fragment):
            M.check_generation(tiny_model(), prompt, n)
    with pytest.raises(ValueError, match="for decoders"):
        M.check_generation(tiny_classifier(), "hi", 5)


# --- pipeline: sparsity, config, pruned copies, comparisons -----------------------------------------------

def test_parse_sparsity_and_flops_seq_len():
    assert P.parse_sparsity(0.3) == 0.3 and P.parse_sparsity("30") == pytest.approx(0.3) and P.parse_sparsity("1") == 1
    with pytest.raises(ValueError, match="must be a number"):
        P.parse_sparsity("lots")
    data = labelled_set(n=6, length=10)        # rows 0 and 3 have 5 real tokens: (2 * 5 + 4 * 10) / 6
    assert P.default_flops_seq_len(tiny_classifier(), data) == round(50 / 6)
    assert P.default_flops_seq_len(tiny_model(), torch.zeros(4, 24, dtype=torch.long)) == 512
    config = P.prune_config(tiny_classifier(), data, "25", "flops", uniform=1, method="magnitude")
    assert (config.sparsity, config.budget_kind, config.flops_seq_len, config.uniform, config.method) == \
        (0.25, "flops", 8, True, "magnitude")


@pytest.fixture(scope="module")
def calibrated_tiny():
    model = tiny_model()
    data = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
    stages = []
    calibration = P.calibrate_statistics(model, data, lambda stage, done, total: stages.append(stage))
    assert "spectra" in stages and calibration.timings["spectra"] > 0.0
    return model, data, calibration


def test_prune_copy_cuts_a_copy_and_leaves_the_dense_model(calibrated_tiny):
    from stat_core import pipeline

    model, data, calibration = calibrated_tiny
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    config = P.prune_config(model, data, 0.3)
    pruned, plan = P.prune_copy(model, calibration, data, config, "tiny")
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    assert abs(plan.budget["achieved"] - 0.3) < 0.05
    by_hand = copy.deepcopy(model)
    pipeline.apply_plan_(by_hand, plan, calibration.dense_stats)
    with torch.no_grad():
        assert torch.equal(pruned(input_ids=data).logits, by_hand(input_ids=data).logits)

    def stop(stage, done, total):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="^stop$"):          # a progress callback that raises stops before the copy
        P.prune_copy(model, calibration, data, config, "tiny", plan=plan, progress=stop)


def test_compare_methods_measures_each_pruned_copy(calibrated_tiny, windows):
    model, data, calibration = calibrated_tiny
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    base = M.Baseline({"perplexity": M.perplexity_and_kl(model, windows)[0]}, windows.numel(), windows=windows)
    configs = [P.prune_config(model, data, 0.3, method=m) for m in ("stat", "magnitude")]
    seen = []
    results = P.compare_methods(model, calibration, data, configs, base, "tiny", progress=lambda *a: seen.append(a))
    assert [r["method"] for r in results] == ["stat", "magnitude"]
    assert seen[0] == ("compare", 0, 2) and seen[-1] == ("compare", 2, 2)
    assert all(torch.equal(v, dense[k]) for k, v in model.state_dict().items())
    for r, config in zip(results, configs):
        pruned, plan = P.prune_copy(model, calibration, data, config, "tiny")
        assert r["achieved"] == plan.budget["achieved"] and abs(r["achieved"] - 0.3) < 0.05
        assert r["perplexity"] == pytest.approx(M.perplexity_and_kl(pruned, windows)[0], rel=1e-6)
        assert r["block_params"] < sum(p.numel() for p in model.model.layers.parameters())
    assert results[0]["perplexity"] != results[1]["perplexity"]
    rows = M.compare_rows(results, base.quality, "perplexity", str.upper)
    assert rows[0][0] == "STAT" and rows[0][3] == f"{results[0]['perplexity'] / base.quality['perplexity']:.2f}× dense"


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from stat_core.models import demo_model_dir

    src = demo_model_dir("smollm2-135m")
    if not (src / "tokenizer.json").exists():
        pytest.fail(f"the demo model cache {src} has no tokenizer; run scripts/setup.sh")
    return AutoTokenizer.from_pretrained(src)


def test_calibration_data_reports_fingerprint_and_too_few_tokens():
    from stat_core.data.sources import fingerprint
    from stat_core.calibration.sizes import MIN_TOKENS_PER_NEURON

    model = tiny_model(vocab_size=49152)
    pasted = ("a river runs through the valley. " * 20 + "\n\n") * 3
    prepared = P.calibration_data(model, smollm2_tokenizer(), "tiny", "pasted", pasted=pasted, num_samples=2,
                                  seq_len=16)
    assert prepared.info["tokens"] == 32 < MIN_TOKENS_PER_NEURON * 64
    assert prepared.info["fingerprint"] == fingerprint("tiny", prepared.data)
    assert any("calibration tokens for MLPs 64 neurons wide" in w for w in prepared.warnings)


# --- export: zip ---------------------------------------------------------------------------------------

def test_zip_folder_and_a_check_that_raises(tmp_path):
    from stat_core.export.api import zip_folder

    folder = tmp_path / "model"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.safetensors").write_bytes(b"\0" * 1000)
    (folder / "sub" / "card.md").write_text("hello " * 100)
    z = zip_folder(folder, tmp_path / "model.zip")
    with zipfile.ZipFile(z) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        assert set(infos) == {"model/a.safetensors", "model/sub/card.md"}
        assert infos["model/a.safetensors"].compress_type == zipfile.ZIP_STORED
        assert infos["model/sub/card.md"].compress_type == zipfile.ZIP_DEFLATED
        assert zf.read("model/sub/card.md") == b"hello " * 100
    calls = []

    def check():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError, match="^cancelled$"):
        zip_folder(folder, tmp_path / "other.zip", check)
    assert not (tmp_path / "other.zip").exists() and not list(tmp_path.glob("*.part"))


def test_compare_best_reads_each_column_from_where_it_is_shown():
    """The quick columns come from the quick windows, the suite's from the suite (which has its own
    perplexity and KL); ties are listed; the one-label share is not ranked."""
    suite_a = {"perplexity": 50.0, "kl_to_dense": 0.9, "fewshot_accuracy": 0.6, "fewshot_bias_free": 0.8,
               "fewshot_majority_share": 0.5, "analogy_accuracy": 0.3, "instruction_agreement": 0.5,
               "instruction_kl": 1.0}
    suite_b = {**suite_a, "perplexity": 5.0, "kl_to_dense": 0.1, "fewshot_accuracy": 0.7,
               "fewshot_majority_share": 1.0, "instruction_kl": 2.0}
    results = [{"method": "a", "perplexity": 10.0, "kl_to_dense": 0.3, "achieved": 0.3, "suite": suite_a},
               {"method": "b", "perplexity": 12.0, "kl_to_dense": 0.2, "achieved": 0.3, "suite": suite_b}]
    assert M.compare_best(results, "perplexity", str.upper) == (
        "Best: perplexity A; KL B; few-shot acc B; few-shot AUC A, B; analogies A, B; chat agreement A, B; "
        "chat KL A.")
    rows, headers, sentence = M.compare_table(results, {"perplexity": 8.0}, "perplexity", 256, str.upper,
                                              suite_dense={**suite_a, "fewshot_majority_share": 0.59})
    assert headers[4:] == ["KL to dense", "few-shot acc", "few-shot AUC", "one-label share", "analogies",
                           "chat agreement", "chat KL"]
    assert rows[0][:5] == ["dense", "0.0%", "8.00", "", "0"] and rows[0][7] == "59.0%"
    assert rows[1][:5] == ["A", "30.0%", "10.00", "1.25× dense", "0.3000"] and rows[2][7] == "100.0%"
    assert sentence.endswith("chat KL A.")
    plain = [{k: v for k, v in r.items() if k != "suite"} for r in results]
    assert M.compare_best(plain, "perplexity", str.upper) == "Best: perplexity A; KL B."
    assert len(M.compare_table(plain, {"perplexity": 8.0}, "perplexity", 256)[1]) == 5
