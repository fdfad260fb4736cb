"""Layer streaming (stat_core.streaming): a streamed prune equals the in-memory one and its export
reloads; bad checkpoints are refused in one sentence with nothing written."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, BertConfig,
                          BertForSequenceClassification, LlamaConfig, LlamaForCausalLM)

from stat_core.calibration.statistics import CalibrationSet
from stat_core.export.hf import load_pruned
from stat_core.config import PruneConfig
from stat_core.methods.settings import settings_from_text
from stat_core.pipeline import stat_prune_
from stat_core import streaming
from stat_core.streaming import StreamingError, streamed_prune


def _llama_dir(tmp_path, shard: str | None = "40KB"):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path / "llama"
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, safe_serialization=True, **kwargs)
    return path


def _bert_dir(tmp_path):
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=128, max_position_embeddings=64, num_labels=2)
    model = BertForSequenceClassification(cfg).eval()
    path = tmp_path / "bert"
    model.save_pretrained(path, safe_serialization=True)
    return path


def _windows(n=12, t=16, vocab=128):
    return torch.randint(0, vocab, (n, t), generator=torch.Generator().manual_seed(1))


def _same_plan(a, b):
    assert len(a.layers) == len(b.layers)
    for la, lb in zip(a.layers, b.layers):
        assert la.kept_heads == lb.kept_heads
        assert la.kept_kv_heads == lb.kept_kv_heads
        assert la.kept_neurons == lb.kept_neurons
    assert a.correction == b.correction
    assert a.budget["achieved"] == pytest.approx(b.budget["achieved"])


def _same_weights(reference, loaded):
    ref, got = reference.state_dict(), loaded.state_dict()
    for k, v in ref.items():
        assert k in got, k
        assert got[k].shape == v.shape, k
        torch.testing.assert_close(got[k], v, rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("uniform,intercept,shard", [(False, False, "40KB"), (True, True, None)])
def test_streamed_llama_equals_in_memory(tmp_path, uniform, intercept, shard):
    src = _llama_dir(tmp_path, shard)
    if shard:
        assert (src / "model.safetensors.index.json").exists()  # really sharded
    windows = _windows()
    cfg = PruneConfig(sparsity=0.3, sensitivity_samples=0, batch_size=4, uniform=uniform, intercept=intercept)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    dense_logits = model(windows[:2]).logits
    expected = stat_prune_(model, windows, cfg)
    seen = []
    out = tmp_path / "out"
    result = streamed_prune(src, windows, cfg, out, progress=lambda s, d, t: seen.append(s))
    _same_plan(expected.plan, result.plan)
    assert {"embed", "calibrate", "apply"} <= set(seen)
    assert json.loads((out / "plan.json").read_text())["layers"][0]["kept_neurons"] == \
        expected.plan.layers[0].kept_neurons
    report = json.loads((out / "pruning_report.json").read_text())
    assert report["streaming"]["sensitivity"].startswith("skipped")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]  # no temporary folder left

    # way 1: our loader; same weights and logits as the in-memory prune
    loaded, _ = load_pruned(out, with_tokenizer=False)
    _same_weights(model, loaded)
    with torch.no_grad():
        want = model(windows[:2]).logits
        torch.testing.assert_close(loaded(windows[:2]).logits, want, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(want, dense_logits)  # something was really removed
    # way 2 / 3: transformers, through modeling_stat.py or (uniform) stock
    kwargs = {} if uniform else {"trust_remote_code": True}
    assert result.export.uniform == uniform
    assert (out / "modeling_stat.py").exists() != uniform
    hf = AutoModelForCausalLM.from_pretrained(out, **kwargs).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(windows[:2]).logits, want, rtol=1e-5, atol=1e-5)


def test_streamed_bert_classifier_equals_in_memory(tmp_path):
    src = _bert_dir(tmp_path)
    ids = _windows(10, 16)
    mask = torch.ones_like(ids)
    mask[::2, 11:] = 0  # padded examples: padding never enters a statistic
    data = CalibrationSet(ids, mask, torch.randint(0, 2, (10,), generator=torch.Generator().manual_seed(2)))
    cfg = PruneConfig(sparsity=0.3, sensitivity_samples=0, batch_size=4)
    model = AutoModelForSequenceClassification.from_pretrained(src, dtype=torch.float32).eval()
    expected = stat_prune_(model, data, cfg)
    result = streamed_prune(src, data, cfg, tmp_path / "out")
    _same_plan(expected.plan, result.plan)
    loaded, _ = load_pruned(tmp_path / "out", with_tokenizer=False)
    _same_weights(model, loaded)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids, attention_mask=mask).logits,
                                   model(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-5)


def test_streamed_bfloat16_checkpoint_keeps_its_dtype(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=128, max_position_embeddings=64, tie_word_embeddings=True)
    src = tmp_path / "bf16"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src, safe_serialization=True)
    result = streamed_prune(src, _windows(), PruneConfig(sparsity=0.3, sensitivity_samples=0), tmp_path / "out")
    loaded, _ = load_pruned(tmp_path / "out", with_tokenizer=False)
    assert loaded.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    assert result.plan.budget["achieved"] > 0.2
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()  # still tied


def test_float32_compute_bfloat16_export(tmp_path):
    """Compute in float32 (fast on CPUs), write the checkpoint's bfloat16: the in-memory float32
    prune of the same (bfloat16-valued) weights, cast to bfloat16."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=128, max_position_embeddings=64)
    src = tmp_path / "bf16"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(src, safe_serialization=True)
    prune_cfg = PruneConfig(sparsity=0.3, sensitivity_samples=0)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    expected = stat_prune_(model, _windows(), prune_cfg)
    result = streamed_prune(src, _windows(), prune_cfg, tmp_path / "out", dtype=torch.float32,
                            save_dtype=torch.bfloat16)
    _same_plan(expected.plan, result.plan)
    loaded, _ = load_pruned(tmp_path / "out", with_tokenizer=False)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    got = loaded.state_dict()
    for k, v in model.state_dict().items():
        assert got[k].dtype == torch.bfloat16, k
        torch.testing.assert_close(got[k], v.to(torch.bfloat16), rtol=0, atol=0, msg=k)


# --- bad input: one sentence, nothing written --------------------------------------------------------

def _refused(tmp_path, src, cfg=None, match=""):
    out = tmp_path / "out"
    with pytest.raises(StreamingError, match=match) as info:
        streamed_prune(src, _windows(), cfg or PruneConfig(sparsity=0.3, sensitivity_samples=0), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    message = str(info.value)
    assert "\n" not in message
    return message


def test_refuses_a_path_that_is_not_a_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    _refused(tmp_path, tmp_path / "file.txt", match="is not a folder")
    _refused(tmp_path, tmp_path / "nowhere", match="is not a folder")


def test_refuses_pickled_weights(tmp_path):
    src = _llama_dir(tmp_path, None)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"not really a pickle")
    msg = _refused(tmp_path, src, match="pickled weights")
    assert "convert" in msg and "safe_serialization=True" in msg


def test_refuses_a_missing_shard(tmp_path):
    src = _llama_dir(tmp_path, "40KB")
    shards = sorted(src.glob("model-*.safetensors"))
    shards[1].unlink()
    msg = _refused(tmp_path, src, match="is missing")
    assert shards[1].name in msg


def test_refuses_other_methods_and_modes(tmp_path):
    src = _llama_dir(tmp_path, None)
    needle = r"one-shot methods that plan layer by layer \(stat, [a-z, -]+\)"
    _refused(tmp_path, src, PruneConfig(sparsity=0.3, method="llm-pruner"), match=needle)
    _refused(tmp_path, src, PruneConfig(sparsity=0.3, mode="propagate"), match=needle)


@pytest.mark.parametrize("method,settings", [("flap", None), ("wanda-sp", None), ("slimgpt", None),
                                             ("flap", "metric=WIFN"), ("slimgpt", "percdamp=0.05")])
def test_streamed_peer_equals_in_memory(tmp_path, method, settings):
    """A peer that scores (FLAP, Wanda-sp) or selects (SlimGPT's OBS) each layer's units from that
    layer alone streams like STAT: the same plan and weights as its in-memory prune (whose calibration
    has no gradient pass either)."""
    src = _llama_dir(tmp_path, "40KB")
    windows = _windows()
    cfg = PruneConfig(sparsity=0.3, sensitivity_samples=0, batch_size=4, method=method,
                      settings=settings_from_text(method, settings))
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    expected = stat_prune_(model, windows, cfg)
    out = tmp_path / "out"
    result = streamed_prune(src, windows, cfg, out)
    _same_plan(expected.plan, result.plan)
    assert result.plan.method == method
    assert json.loads((out / "plan.json").read_text())["method"] == method
    loaded, _ = load_pruned(out, with_tokenizer=False)
    _same_weights(model, loaded)
    with torch.no_grad():
        torch.testing.assert_close(loaded(windows[:2]).logits, model(windows[:2]).logits, rtol=1e-5, atol=1e-5)


def test_refuses_weights_that_do_not_match_the_config(tmp_path):
    src = _llama_dir(tmp_path, None)
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (src / "config.json").write_text(json.dumps(cfg))
    _refused(tmp_path, src, match="do not match its config.json")


def test_a_failure_half_way_leaves_nothing(tmp_path, monkeypatch):
    src = _llama_dir(tmp_path, "40KB")
    import stat_core.streaming as streaming

    calls = {"n": 0}
    real = streaming.apply_layer_

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(streaming, "apply_layer_", failing)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="nothing was written"):
        streamed_prune(src, _windows(), PruneConfig(sparsity=0.3, sensitivity_samples=0), out)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_disk_needs_match_what_is_written(tmp_path, monkeypatch):
    """The pre-check's estimate: the scratch statistics exactly, the output within 10% of the files."""
    import stat_core.streaming as streaming

    src = _llama_dir(tmp_path, None)
    model = streaming.build_skeleton(src, torch.float32)
    config = PruneConfig(sparsity=0.3, sensitivity_samples=0)
    sizes = streaming.model_sizes(model, config.flops_seq_len)
    scratch_bytes, out_bytes = streaming.disk_needs(model, sizes, config.sparsity, torch.float32)
    work = tmp_path / "work"
    seen = {}
    real_load = streaming._load_block_stats

    def measuring(path):  # the scratch folder holds every block's statistics after the first pass
        seen["scratch"] = max(seen.get("scratch", 0), sum(f.stat().st_size for f in work.rglob("*.npy")))
        return real_load(path)

    monkeypatch.setattr(streaming, "_load_block_stats", measuring)
    streamed_prune(src, _windows(), config, tmp_path / "out", work_dir=work)
    written = sum(f.stat().st_size for f in (tmp_path / "out").glob("*.safetensors"))
    assert out_bytes == pytest.approx(written, rel=0.1)
    # the statistics are exactly the estimate, besides the 128-byte header of each of the 4 .npy files per block
    assert seen["scratch"] - 3 * 4 * 128 == scratch_bytes


def test_refuses_when_the_disk_is_too_small(tmp_path, monkeypatch):
    import shutil as _shutil

    src = _llama_dir(tmp_path, None)
    real = _shutil.disk_usage
    monkeypatch.setattr(_shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    out = tmp_path / "out"
    with pytest.raises(StreamingError, match="Not enough free disk space") as err:
        streamed_prune(src, _windows(), PruneConfig(sparsity=0.3, sensitivity_samples=0), out,
                       work_dir=tmp_path / "work")
    assert "\n" not in str(err.value) and "0.0 GiB free" in str(err.value)
    assert not out.exists() and not (tmp_path / "work").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


# --- the command line: stat-prune --offload -------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random Llama with the demo model's real tokenizer, saved in three shards."""
    from transformers import AutoTokenizer

    from conftest import tiny_model
    from stat_core.models import prepare_demo_model

    tok = AutoTokenizer.from_pretrained(prepare_demo_model("smollm2-135m"))
    model = tiny_model("llama", vocab_size=len(tok))
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path, safe_serialization=True, max_shard_size="1MB")
    tok.save_pretrained(path)
    return path


CLI_ARGS = ["--sparsity", "0.3", "--num-samples", "4", "--seq-len", "64", "--quiet"]


@pytest.mark.parametrize("method", ["stat", "flap"])
def test_cli_offload_streams_the_in_memory_plan(tiny_folder, tmp_path, capsys, method):
    from stat_core.cli import main

    assert (tiny_folder / "model.safetensors.index.json").exists()
    streamed, in_memory = tmp_path / "streamed", tmp_path / "in-memory"
    report_html = tmp_path / "report.html"
    assert main([str(tiny_folder), "--out", str(streamed), "--offload", "--method", method, *CLI_ARGS,
                 "--report-html", str(report_html)]) == 0
    assert "wrote the pruned model" in capsys.readouterr().out
    assert "Plotly.newPlot" in report_html.read_text()  # the report it announces is written
    # Streaming cannot write chat text, so its default is Wikipedia; in memory, Wikipedia is asked for.
    assert main([str(tiny_folder), "--out", str(in_memory), "--sensitivity-samples", "0", "--skip-eval",
                 "--calibration", "wikipedia", "--method", method, *CLI_ARGS]) == 0
    plan_s = json.loads((streamed / "plan.json").read_text())
    plan_m = json.loads((in_memory / "plan.json").read_text())
    assert [l["kept_neurons"] for l in plan_s["layers"]] == [l["kept_neurons"] for l in plan_m["layers"]]
    assert [l["kept_heads"] for l in plan_s["layers"]] == [l["kept_heads"] for l in plan_m["layers"]]
    report = json.loads((streamed / "pruning_report.json").read_text())
    report_m = json.loads((in_memory / "pruning_report.json").read_text())
    for key in ("block_params_before", "block_params_after", "params_before", "params_after", "calibration_tokens"):
        assert report[key] == report_m[key], key
    assert report["streaming"]["sensitivity"].startswith("skipped")
    model, tokenizer = load_pruned(streamed)
    assert tokenizer is not None
    with torch.no_grad():
        model(**tokenizer("The cat sat on", return_tensors="pt"))


@pytest.mark.parametrize("case,needle", [
    ("not-a-folder", "not a model folder"), ("pickles", "pickled weights"), ("missing-shard", "is missing"),
    ("method", "plan layer by layer"), ("mix", "whole model"), ("settings", "runs STAT with its default settings")])
def test_cli_offload_refusals(tiny_folder, tmp_path, capsys, case, needle):
    import shutil

    from stat_core.cli import main

    src = tmp_path / "model"
    shutil.copytree(tiny_folder, src)
    extra = []
    if case == "not-a-folder":
        src = tmp_path / "model" / "config.json"
    elif case == "pickles":
        for f in list(src.glob("*.safetensors")) + [src / "model.safetensors.index.json"]:
            f.unlink()
        (src / "pytorch_model.bin").write_bytes(b"x")
    elif case == "missing-shard":
        sorted(src.glob("model-*.safetensors"))[0].unlink()
    elif case == "method":
        extra = ["--method", "llm-pruner"]
    elif case == "mix":
        extra = ["--calibration", "mix"]
    elif case == "settings":
        extra = ["--stat-search", "4"]
    out = tmp_path / "out"
    assert main([str(src), "--out", str(out), "--offload", *CLI_ARGS, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("stat-prune: error:") and needle in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("centered", [False, True])
def test_analysis_consuming_its_statistics_is_the_same(tmp_path, centered):
    """The memory-lean analysis streaming runs (statistics saved first, the in-memory Grams freed or
    overwritten, the MLP Gram read back once; the block dropped once its output projections are
    read) gives exactly the in-memory analysis; so does the correction that frees each Gram."""
    from stat_core.adapters import get_adapter
    from stat_core.calibration.statistics import BlockStats, GramAccumulator
    from stat_core.surgery.apply import _correction
    from stat_core.methods.stat.analysis import analyse_layer
    from stat_core.streaming import _load_block_stats, _save_block_stats

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                         num_key_value_heads=2, intermediate_size=64, vocab_size=128)).eval()
    adapter = get_adapter(model)
    accs = {}
    for name, n in (("attn", 32), ("mlp", 64)):
        accs[name] = GramAccumulator(n)
        z = torch.randn(50, 20) @ torch.randn(20, n) + 0.3  # rank-deficient, with a mean
        for chunk in z.split(16):
            accs[name].add(chunk)
    stats = BlockStats(accs["attn"].gram, accs["mlp"].gram, 50, 12.5, accs["attn"].col_sum, accs["mlp"].col_sum)
    want = analyse_layer(adapter, 0, stats, None, centered)
    path = tmp_path / "block-00000"
    _save_block_stats(path, stats)
    again = _load_block_stats(path)
    assert all(torch.equal(getattr(again, k), getattr(stats, k)) for k in ("attn_gram", "mlp_gram", "attn_sum", "mlp_sum"))
    dropped = []
    got = analyse_layer(adapter, 0, _load_block_stats(path), None, centered, reload=lambda: _load_block_stats(path),
                        drop_weights=lambda: dropped.append(True))
    assert dropped == [True]
    assert got.head_configs == want.head_configs and got.head_order == want.head_order
    assert torch.equal(got.neuron_order, want.neuron_order) and torch.equal(got.mlp_damage, want.mlp_damage)
    kept = torch.sort(want.neuron_order[:40]).values
    w = adapter.mlp_out_proj(0).weight.detach()
    kind = "affine" if centered else "least-squares"
    consumed = _load_block_stats(path)
    new_w, bias = _correction(w, consumed, "mlp", kept, kind, None, release=True)
    assert consumed.mlp_gram is None
    want_w, want_bias = _correction(w, stats, "mlp", kept, kind, None)
    assert torch.equal(new_w, want_w) and (bias is None) == (want_bias is None)
    assert bias is None or torch.equal(bias, want_bias)


def test_runs_sharing_a_work_dir_never_mix_and_leave_nothing(tmp_path, monkeypatch):
    """Two runs pointed at one --work-dir at the same time (here: a second run, on other text, runs
    whole between the first run's two passes) give each the model it would give alone, and each
    removes its own statistics; a foreign folder in the work dir is left alone."""
    from safetensors.torch import load_file

    src = _llama_dir(tmp_path, None)
    config = PruneConfig(sparsity=0.3, sensitivity_samples=0)
    alone = streamed_prune(src, _windows(), config, tmp_path / "alone")
    work = tmp_path / "work"
    (work / "someone-elses").mkdir(parents=True)
    real_load, state = streaming._load_block_stats, {"nested": False}

    def interleaved(path):
        if not state["nested"]:
            state["nested"] = True
            other = torch.randint(0, 128, (12, 16), generator=torch.Generator().manual_seed(7))
            streamed_prune(src, other, config, tmp_path / "other", work_dir=work)
        return real_load(path)

    monkeypatch.setattr(streaming, "_load_block_stats", interleaved)
    shared = streamed_prune(src, _windows(), config, tmp_path / "shared", work_dir=work)
    _same_plan(alone.plan, shared.plan)

    def weights(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = weights(tmp_path / "alone"), weights(tmp_path / "shared")
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in work.iterdir()] == ["someone-elses"]
