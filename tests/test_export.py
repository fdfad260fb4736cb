"""Exported folders reload three ways and give the in-memory pruned model's logits; writes are atomic."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from test_encoders import padded_set, tiny_classifier
from stat_core.export.common import ExportError
from stat_core.export.hf import export_pruned, load_pruned
from stat_core.config import PruneConfig
from stat_core.pipeline import stat_prune_

PROJECT = Path(__file__).resolve().parents[1]

# Run in a fresh interpreter: the project is not on sys.path and importing stat_core fails, so
# only stock transformers and the folder's own modeling file can do the work.
REMOTE_LOADER = r"""
import os, sys
project, folder, auto_name, inputs_path, out_path = sys.argv[1:6]
sys.path[:] = [p for p in sys.path if "__editable__" not in p]  # the editable install's hook
sys.modules["stat_core"] = None  # and any `import stat_core` raises ImportError
assert all(os.path.realpath(p or os.getcwd()) != os.path.realpath(project) for p in sys.path), sys.path
import torch, transformers
inputs = torch.load(inputs_path)
model = getattr(transformers, auto_name).from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(**inputs).logits
torch.save({"logits": logits, "class": type(model).__name__}, out_path)
"""


def _decoder_inputs():
    return {"input_ids": torch.randint(0, 128, (3, 17), generator=torch.Generator().manual_seed(5))}


def _encoder_inputs():
    data = padded_set(n=6, seed=7)
    return {"input_ids": data.input_ids, "attention_mask": data.attention_mask}


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def _load_in_clean_interpreter(folder: Path, auto_name: str, inputs: dict, tmp_path: Path) -> dict:
    torch.save(inputs, tmp_path / "inputs.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_MODULES_CACHE"] = str(tmp_path / "hf_modules")
    proc = subprocess.run([sys.executable, "-c", REMOTE_LOADER, str(PROJECT), str(folder), auto_name,
                           str(tmp_path / "inputs.pt"), str(tmp_path / "out.pt")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(tmp_path / "out.pt")


def _pruned_decoder(family, windows, uniform=False):
    """STAT with its intercept: the exports then carry output biases the stock families lack."""
    model = tiny_model(family)
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.4, uniform=uniform, sensitivity_samples=2,
                                                     batch_size=4, intercept=True))
    return model, result.plan


def _pruned_encoder(family, uniform=False):
    model = tiny_classifier(family)
    result = stat_prune_(model, padded_set(), PruneConfig(sparsity=0.4, uniform=uniform, sensitivity_samples=4,
                                                          batch_size=4, intercept=True))
    return model, result.plan


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_decoder_export_reloads_both_ways_with_same_logits(family, windows, tmp_path):
    model, plan = _pruned_decoder(family, windows)
    shapes = {(len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_neurons)) for lp in plan.layers}
    assert len(shapes) > 1, "the test needs layers of different shapes"
    inputs = _decoder_inputs()
    ref = _logits(model, inputs)
    info = export_pruned(model, None, tmp_path / "out", plan=plan, report={"perplexity_before": 3.0,
                                                                          "perplexity_after": 4.0})
    assert not info.uniform and "modeling_stat.py" in info.files and "README.md" in info.files
    reloaded, _ = load_pruned(info.path)
    torch.testing.assert_close(_logits(reloaded, inputs), ref, rtol=0, atol=0)
    remote = _load_in_clean_interpreter(info.path, "AutoModelForCausalLM", inputs, tmp_path)
    assert remote["class"].startswith("StatPruned")
    torch.testing.assert_close(remote["logits"], ref, rtol=0, atol=0)
    # The stock loader refuses the non-uniform folder instead of loading wrong shapes silently.
    from transformers import AutoModelForCausalLM
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(info.path, trust_remote_code=False)


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen2"])
def test_uniform_decoder_export_loads_with_stock_transformers(family, windows, tmp_path):
    from transformers import AutoModelForCausalLM

    model, plan = _pruned_decoder(family, windows, uniform=True)
    inputs = _decoder_inputs()
    ref = _logits(model, inputs)
    info = export_pruned(model, None, tmp_path / "out", plan=plan)
    assert info.uniform and "modeling_stat.py" not in info.files
    config = json.loads((info.path / "config.json").read_text())
    assert "auto_map" not in config and config["num_key_value_heads"] == len(plan.layers[0].kept_kv_heads)
    stock = AutoModelForCausalLM.from_pretrained(info.path).eval()
    assert type(stock).__name__ == type(model).__name__
    torch.testing.assert_close(_logits(stock, inputs), ref, rtol=0, atol=0)
    reloaded, _ = load_pruned(info.path)
    torch.testing.assert_close(_logits(reloaded, inputs), ref, rtol=0, atol=0)
    # STAT's intercept lives in output biases wherever the stock config can declare them (Llama:
    # attention_bias + mlp_bias; Gemma-3: attention_bias only; Qwen2: neither, plain least squares).
    layer = model.model.layers[0]
    o_bias, down_bias = layer.self_attn.o_proj.bias, layer.mlp.down_proj.bias
    declarable = {"llama": (True, True), "gemma3": (True, False), "qwen2": (False, False)}[family]
    pruned = (len(plan.layers[0].kept_heads) < plan.layers[0].num_heads,
              len(plan.layers[0].kept_neurons) < plan.layers[0].intermediate_size)
    assert any(pruned)
    expected = (declarable[0] and pruned[0], declarable[1] and pruned[1])
    assert (o_bias is not None, down_bias is not None) == expected
    assert (config.get("attention_bias", False), config.get("mlp_bias", False)) == expected or family == "qwen2"
    if o_bias is not None:
        assert o_bias.abs().max() > 0  # a real intercept, not just the zero biases the flag forces
        torch.testing.assert_close(stock.model.layers[0].self_attn.q_proj.bias, torch.zeros_like(
            stock.model.layers[0].self_attn.q_proj.bias), rtol=0, atol=0)
    if family == "llama":  # and the third way: from_pretrained(trust_remote_code=True), no stat_core
        remote = _load_in_clean_interpreter(info.path, "AutoModelForCausalLM", inputs, tmp_path)
        torch.testing.assert_close(remote["logits"], ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_encoder_export_reloads_both_ways_with_same_logits(family, tmp_path):
    model, plan = _pruned_encoder(family)
    inputs = _encoder_inputs()
    ref = _logits(model, inputs)
    info = export_pruned(model, None, tmp_path / "out", plan=plan, report={"accuracy_before": 0.9,
                                                                          "accuracy_after": 0.88})
    reloaded, _ = load_pruned(info.path)
    torch.testing.assert_close(_logits(reloaded, inputs), ref, rtol=0, atol=0)
    remote = _load_in_clean_interpreter(info.path, "AutoModelForSequenceClassification", inputs, tmp_path)
    torch.testing.assert_close(remote["logits"], ref, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_uniform_encoder_keeps_heads_and_loads_stock(family, tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, plan = _pruned_encoder(family, uniform=True)
    # Stock BERT derives head size from hidden_size / heads, so uniform mode prunes neurons only.
    assert all(len(lp.kept_heads) == lp.num_heads for lp in plan.layers)
    assert len({len(lp.kept_neurons) for lp in plan.layers}) == 1 and len(plan.layers[0].kept_neurons) < 64
    inputs = _encoder_inputs()
    info = export_pruned(model, None, tmp_path / "out", plan=plan)
    assert info.uniform
    stock = AutoModelForSequenceClassification.from_pretrained(info.path).eval()
    torch.testing.assert_close(_logits(stock, inputs), _logits(model, inputs), rtol=0, atol=0)


def test_export_never_overwrites_silently_and_failures_leave_nothing(windows, tmp_path, monkeypatch):
    model, plan = _pruned_decoder("llama", windows)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(ExportError, match="already exists"):
        export_pruned(model, None, out, plan=plan)
    assert (out / "keep.txt").read_text() == "user data"

    # A failure half-way (here: the model card) leaves neither a new folder nor a partial one.
    from stat_core.export import hf as export

    def broken_card(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "model_card", broken_card)
    # a write error becomes one sentence for the user (ExportError), nothing written
    with pytest.raises(ExportError, match="No space left on device; nothing was written"):
        export_pruned(model, None, tmp_path / "fresh", plan=plan)
    with pytest.raises(ExportError, match="was not written by this tool"):  # overwrite replaces only our folders
        export_pruned(model, None, out, plan=plan, overwrite=True)
    (out / "pruning_report.json").write_text("{}")
    with pytest.raises(ExportError, match="No space left on device"):
        export_pruned(model, None, out, plan=plan, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (out / "keep.txt").read_text() == "user data"

    monkeypatch.undo()
    info = export_pruned(model, None, out, plan=plan, overwrite=True)
    assert not (info.path / "keep.txt").exists() and (info.path / "model.safetensors").exists()


def test_load_pruned_refuses_what_is_not_an_export(tmp_path):
    with pytest.raises(ExportError, match="not a folder"):
        load_pruned(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ExportError, match="safetensors"):
        load_pruned(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not really")
    with pytest.raises(ExportError, match="safetensors"):
        load_pruned(tmp_path)


def test_truncated_weights_are_reported(windows, tmp_path):
    model, plan = _pruned_decoder("llama", windows)
    info = export_pruned(model, None, tmp_path / "out", plan=plan)
    weights = info.path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ExportError, match="damaged"):
        load_pruned(info.path)


def test_report_and_card_state_sizes(windows, tmp_path):
    model, plan = _pruned_decoder("llama", windows)
    info = export_pruned(model, None, tmp_path / "out", plan=plan, report={"size_on_disk_before_bytes": 10**6})
    report = json.loads((info.path / "pruning_report.json").read_text())
    assert report["size_on_disk_after_bytes"] == info.size_bytes == (info.path / "model.safetensors").stat().st_size
    card = (info.path / "README.md").read_text()
    assert "trust_remote_code=True" in card and "| 0 |" in card and "dense: 1.0 MB" in card
