"""GGUF (llama.cpp) and ONNX (onnxruntime) exports of pruned models with per-layer widths."""

import json

import numpy as np
import pytest
import torch

from conftest import tiny_model
from test_cli import tiny_bert_folder, tiny_folder  # noqa: F401  (fixtures)
from test_encoders import padded_set, tiny_classifier
from stat_core.adapters import get_adapter
from stat_core.cli import main
from stat_core.export.common import ExportError
from stat_core.export.api import applicable_formats, export_model
from stat_core.export.gguf import permute_rope, write_gguf
from stat_core.export.onnx import onnx_session
from stat_core.models import prepare_demo_model
from stat_core.config import PruneConfig
from stat_core.pipeline import stat_prune_

# Per layer: kept query heads (of 8, in 2 KV groups of 4), kept MLP neurons (of 64). Every layer differs
# in heads, KV heads and width; 2 and 1 heads leave a Q8_0-unfriendly MLP width (37 is not a multiple of 32).
SHAPES = [([0, 1, 2, 3, 4, 5, 6, 7], 64), ([4, 6], 37), ([0, 5], 48)]


@pytest.fixture(scope="module")
def smol_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepare_demo_model("smollm2-135m"))


def hand_pruned_llama(vocab_size: int = 128, bias: bool = True):
    """A tiny Llama cut by hand to SHAPES (layers of different head, KV-head and MLP widths), with the
    output biases a STAT correction with an intercept adds (random, so a dropped bias shows)."""
    model = tiny_model("llama", vocab_size=vocab_size, num_hidden_layers=3, num_attention_heads=8,
                       num_key_value_heads=2, hidden_size=64, intermediate_size=64)
    adapter = get_adapter(model)
    gen = torch.Generator().manual_seed(3)
    for layer, (heads, n_ff) in enumerate(SHAPES):
        kv = sorted({h // 4 for h in heads})
        if len(heads) < 8:
            adapter.prune_heads_(layer, heads, kv, None)
        if n_ff < 64:
            adapter.prune_neurons_(layer, sorted(torch.randperm(64, generator=gen)[:n_ff].tolist()), None)
        if bias:
            for kind in ("attn", "mlp"):
                adapter.add_out_bias_(layer, kind, 0.1 * torch.randn(64, generator=gen))
    assert [adapter.layer_shape(i).intermediate_size for i in range(3)] == [n for _, n in SHAPES]
    return model.eval()


def _counts(model):
    adapter = get_adapter(model)
    shapes = [adapter.layer_shape(i) for i in range(adapter.num_layers)]
    return [s.num_heads for s in shapes], [s.num_kv_heads for s in shapes], [s.intermediate_size for s in shapes]


# --- GGUF -------------------------------------------------------------------------------------------

def test_rope_permutation_turns_rotate_half_into_llama_cpp_pairs():
    """HF rotates dims (i, i + d/2) by frequency i; llama.cpp's 'norm' RoPE rotates (2i, 2i + 1). The
    permuted projection under llama.cpp's RoPE must give the permuted HF result."""
    from transformers.models.llama.modeling_llama import rotate_half

    n_heads, d, pos = 3, 8, 5.0
    q = torch.randn(n_heads * d, 7, dtype=torch.float64)
    freqs = 10000.0 ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.cat([freqs, freqs]) * pos
    hf = (q.view(n_heads, d, 7) * angle.cos()[:, None] + rotate_half(q.view(n_heads, d, 7).transpose(1, 2)).transpose(1, 2)
          * angle.sin()[:, None]).reshape(n_heads * d, 7)
    p = torch.from_numpy(permute_rope(q.numpy(), n_heads)).view(n_heads, d // 2, 2, 7)
    c, s = (freqs * pos).cos()[:, None], (freqs * pos).sin()[:, None]
    ours = torch.stack([p[:, :, 0] * c - p[:, :, 1] * s, p[:, :, 0] * s + p[:, :, 1] * c], dim=2).reshape(n_heads * d, 7)
    torch.testing.assert_close(ours, torch.from_numpy(permute_rope(hf.numpy(), n_heads)))


@pytest.mark.parametrize("qtype", ["f16", "q8_0"])
def test_gguf_reads_back_with_per_layer_shapes(qtype, smol_tokenizer, tmp_path):
    import gguf

    tok = smol_tokenizer
    model = hand_pruned_llama(vocab_size=len(tok))
    info = write_gguf(model, tok, tmp_path / "m.gguf", qtype)
    assert info.arch == "deci" and info.tokenizer_pre == "smollm"
    reader = gguf.GGUFReader(info.path)
    field = {k: v.contents() for k, v in reader.fields.items()}
    heads, kv, ff = _counts(model)
    assert (heads, kv, ff) == ([8, 2, 2], [2, 1, 2], [64, 37, 48])
    assert field["general.architecture"] == "deci"
    assert field["deci.attention.head_count"] == heads
    assert field["deci.attention.head_count_kv"] == kv
    assert field["deci.feed_forward_length"] == ff
    assert field["deci.block_count"] == 3 and field["deci.embedding_length"] == 64
    assert field["deci.attention.key_length"] == field["deci.rope.dimension_count"] == 8
    assert field["general.file_type"] == {"f16": 1, "q8_0": 7}[qtype]
    # Tokenizer: every id's token, merges, special ids and "no BOS added" as the HF tokenizer does.
    assert field["tokenizer.ggml.model"] == "gpt2" and field["tokenizer.ggml.pre"] == "smollm"
    tokens = field["tokenizer.ggml.tokens"]
    vocab = tok.get_vocab()
    assert len(tokens) == len(tok) and all(tokens[i] == t for t, i in vocab.items())
    assert len(field["tokenizer.ggml.merges"]) > 40000
    assert field["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and field["tokenizer.ggml.add_bos_token"] is False

    tensors = {t.name: t for t in reader.tensors}
    adapter = get_adapter(model)
    unsplittable = []
    for i, layer in enumerate(adapter.layers):
        attn, mlp = layer.self_attn, layer.mlp
        expected = {"attn_q": (attn.q_proj, heads[i]), "attn_k": (attn.k_proj, kv[i]), "attn_v": (attn.v_proj, None),
                    "attn_output": (attn.o_proj, None), "ffn_gate": (mlp.gate_proj, None),
                    "ffn_up": (mlp.up_proj, None), "ffn_down": (mlp.down_proj, None)}
        for name, (linear, rope_heads) in expected.items():
            t = tensors[f"blk.{i}.{name}.weight"]
            w = linear.weight.detach().numpy()
            assert tuple(int(x) for x in t.shape) == w.shape[::-1]  # GGUF lists (in, out)
            got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(w.shape)
            want = permute_rope(w, rope_heads) if rope_heads else w
            quantized = t.tensor_type == gguf.GGMLQuantizationType.Q8_0
            assert quantized == (qtype == "q8_0" and w.shape[1] % 32 == 0)
            if w.shape[1] % 32:
                unsplittable.append(t.name)
            np.testing.assert_allclose(got, want, atol=np.abs(w).max() / (100 if quantized else 1000), rtol=0)
        for name, linear in (("attn_output", attn.o_proj), ("ffn_down", mlp.down_proj)):
            t = tensors[f"blk.{i}.{name}.bias"]
            assert t.tensor_type == gguf.GGMLQuantizationType.F32
            np.testing.assert_array_equal(t.data, linear.bias.detach().numpy())
    # Rows of 37 neurons or 2 heads × 8 dims do not split into Q8_0's 32-value blocks: float16 there.
    assert "blk.1.ffn_down.weight" in unsplittable and "blk.1.attn_output.weight" in unsplittable
    assert info.kept_f16 == (tuple(unsplittable) if qtype == "q8_0" else ())
    # Tied embeddings: llama.cpp reuses token_embd, no output.weight is written.
    assert model.config.tie_word_embeddings is False or "output.weight" not in tensors


def test_uniform_model_is_plain_llama_arch(smol_tokenizer, tmp_path):
    import gguf

    model = tiny_model("llama", vocab_size=len(smol_tokenizer), hidden_size=64, intermediate_size=64)
    info = write_gguf(model, smol_tokenizer, tmp_path / "u.gguf", "f16")
    fields = {k: v.contents() for k, v in gguf.GGUFReader(info.path).fields.items()}
    assert info.arch == "llama" and fields["llama.attention.head_count"] == 4
    assert fields["llama.feed_forward_length"] == 64 and "output.weight" in {t.name for t in gguf.GGUFReader(info.path).tensors}


def test_gguf_refuses_llama_arch_for_layers_of_different_widths(smol_tokenizer, tmp_path):
    model = hand_pruned_llama(vocab_size=len(smol_tokenizer))
    with pytest.raises(ExportError, match="layer 0's head and MLP widths"):
        write_gguf(model, smol_tokenizer, tmp_path / "m.gguf", arch="llama")
    assert list(tmp_path.iterdir()) == []


def test_gguf_file_is_never_half_written(smol_tokenizer, tmp_path, monkeypatch):
    import gguf

    model = hand_pruned_llama(vocab_size=len(smol_tokenizer))
    target = tmp_path / "m.gguf"
    target.write_bytes(b"an older file")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", disk_full)
    with pytest.raises(ExportError, match="No space left"):
        write_gguf(model, smol_tokenizer, target)
    assert target.read_bytes() == b"an older file" and [p.name for p in tmp_path.iterdir()] == ["m.gguf"]


def test_formats_that_do_not_apply_say_which_do(smol_tokenizer, tmp_path):
    bert = tiny_classifier("bert")
    assert applicable_formats(bert) == ["safetensors", "onnx"]
    with pytest.raises(ExportError) as exc:
        export_model(bert, None, tmp_path / "x", "gguf")
    msg = str(exc.value)
    assert "encoder" in msg and msg.endswith("formats that apply to this model: safetensors, onnx.") and msg.count(". ") == 0
    qwen = tiny_model("qwen3")
    with pytest.raises(ExportError, match="not 'qwen3'.*formats that apply to this model: safetensors, onnx"):
        export_model(qwen, smol_tokenizer, tmp_path / "x", "gguf")
    mistral = tiny_model("mistral", sliding_window=16)
    with pytest.raises(ExportError, match="sliding-window"):
        export_model(mistral, smol_tokenizer, tmp_path / "x", "gguf")
    with pytest.raises(ExportError, match="needs the model's tokenizer"):
        export_model(tiny_model("llama"), None, tmp_path / "x", "gguf")
    assert not (tmp_path / "x").exists()


def test_gguf_runs_in_llama_cpp_like_transformers(smol_tokenizer, tmp_path):
    """Where llama-cpp-python is installed (it builds from source in ~10 minutes, so CI skips this;
    benchmarks/gguf_check.py runs it on SmolLM2): llama.cpp's logits from the GGUF match PyTorch's."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = smol_tokenizer
    model = hand_pruned_llama(vocab_size=len(tok))
    text = "The quick brown fox jumps over the lazy dog because"
    ids = tok.encode(text)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    for qtype, atol in (("f32", 1e-3), ("f16", 5e-3), ("q8_0", 5e-2)):
        info = write_gguf(model, tok, tmp_path / f"m-{qtype}.gguf", qtype)
        llm = llama_cpp.Llama(model_path=str(info.path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        llm.eval(ids)
        got = np.asarray(llm.scores[: len(ids)])
        np.testing.assert_allclose(got, ref, atol=atol * np.abs(ref).max(), rtol=0)
        llm.close()


def test_gguf_export_folder_and_card(smol_tokenizer, tmp_path, windows):
    model = tiny_model("llama", vocab_size=len(smol_tokenizer))
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.4, sensitivity_samples=2, batch_size=4, intercept=True))
    info = export_model(model, smol_tokenizer, tmp_path / "g", "gguf", plan=result.plan, gguf_type="q8_0",
                        report={"model": "tiny", "perplexity_before": 3.0, "perplexity_after": 4.0})
    assert info.format == "gguf" and set(info.files) == {"model-q8_0.gguf", "plan.json", "pruning_report.json", "README.md"}
    card = (info.path / "README.md").read_text()
    for name in info.files:
        assert f"`{name}`" in card
    assert "llama-completion -m model-q8_0.gguf" in card and "from llama_cpp import Llama" in card
    report = json.loads((info.path / "pruning_report.json").read_text())
    assert report["export"]["format"] == "gguf" and report["size_on_disk_after_bytes"] == info.size_bytes


# --- ONNX -------------------------------------------------------------------------------------------

def _ort_run(folder, feed):
    sess = onnx_session(folder / "model.onnx")
    return sess.run(["logits"], {k: v.numpy().astype(np.int64) for k, v in feed.items()})[0]


def test_onnx_decoder_with_per_layer_widths_matches_pytorch(tmp_path):
    model = hand_pruned_llama()
    info = export_model(model, None, tmp_path / "o", "onnx")
    assert info.format == "onnx" and {"model.onnx", "config.json", "README.md", "pruning_report.json"} <= set(info.files)
    config = json.loads((info.path / "config.json").read_text())
    assert [s["num_attention_heads"] for s in config["stat_layer_shapes"]] == [8, 2, 2] and "auto_map" not in config
    for shape, seed in (((1, 5), 0), ((4, 31), 1)):  # shapes other than the traced one
        ids = torch.randint(0, 128, shape, generator=torch.Generator().manual_seed(seed))
        mask = torch.ones_like(ids)
        with torch.no_grad():
            ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
        np.testing.assert_allclose(_ort_run(info.path, {"input_ids": ids, "attention_mask": mask}), ref, atol=1e-5, rtol=0)
    card = (info.path / "README.md").read_text()
    for name in info.files:
        assert f"`{name}`" in card
    assert "ort.InferenceSession" in card


def test_onnx_encoder_classifier_matches_pytorch_with_padding(tmp_path):
    model = tiny_classifier("bert")
    result = stat_prune_(model, padded_set(), PruneConfig(sparsity=0.4, sensitivity_samples=4, batch_size=4, intercept=True))
    info = export_model(model, None, tmp_path / "o", "onnx", plan=result.plan)
    data = padded_set(n=5, length=13, seed=9)
    feed = {"input_ids": data.input_ids, "attention_mask": data.attention_mask,
            "token_type_ids": torch.zeros_like(data.input_ids)}
    with torch.no_grad():
        ref = model(**feed).logits.numpy()
    np.testing.assert_allclose(_ort_run(info.path, feed), ref, atol=1e-5, rtol=0)
    assert json.loads((info.path / "pruning_report.json").read_text())["export"]["max_abs_diff_vs_pytorch"] < 1e-5


def test_onnx_export_that_does_not_match_is_not_kept(tmp_path, monkeypatch):
    """The export checks onnxruntime against PyTorch; a graph that disagrees leaves nothing behind."""
    from stat_core.export import onnx as export_onnx

    model = tiny_model("llama")
    real = export_onnx.onnx_session

    def perturbed(path, threads=None):
        sess = real(path, threads)

        class Wrong:
            def run(self, names, feed):
                return [sess.run(names, feed)[0] + 1e-2]

        return Wrong()

    monkeypatch.setattr(export_onnx, "onnx_session", perturbed)
    with pytest.raises(ExportError, match="differ from PyTorch's"):
        export_model(model, None, tmp_path / "o", "onnx")
    assert list(tmp_path.iterdir()) == []


# --- CLI --------------------------------------------------------------------------------------------

# Wikipedia calibration: the tiny model has SmolLM2's chat template, and the default chat recipe would
# generate its own chat answers first (minutes; tests/test_cli.py covers that path)
FAST = ["--num-samples", "4", "--seq-len", "64", "--sensitivity-samples", "0", "--quiet", "--skip-eval",
        "--calibration", "wikipedia"]


def test_cli_format_gguf_and_onnx(tiny_folder, tmp_path, capsys):  # noqa: F811
    import gguf

    rc = main([str(tiny_folder), "--sparsity", "0.3", "--out", str(tmp_path / "g"), "--format", "gguf", *FAST])
    assert rc == 0 and "llama.cpp" in capsys.readouterr().out
    fields = {k: v.contents() for k, v in gguf.GGUFReader(tmp_path / "g" / "model-f16.gguf").fields.items()}
    plan = json.loads((tmp_path / "g" / "plan.json").read_text())
    arch = fields["general.architecture"]
    ff = fields[f"{arch}.feed_forward_length"]
    assert (ff if isinstance(ff, list) else [ff] * 2) == [len(lp["kept_neurons"]) for lp in plan["layers"]]
    assert json.loads((tmp_path / "g" / "pruning_report.json").read_text())["export"]["format"] == "gguf"

    rc = main([str(tiny_folder), "--sparsity", "0.3", "--out", str(tmp_path / "o"), "--format", "onnx", *FAST])
    assert rc == 0
    assert {"model.onnx", "tokenizer.json", "README.md"} <= {p.name for p in (tmp_path / "o").iterdir()}


def test_cli_format_that_does_not_apply_fails_before_any_work(tiny_bert_folder, tmp_path, capsys):  # noqa: F811
    rc = main([str(tiny_bert_folder), "--sparsity", "0.2", "--out", str(tmp_path / "x"), "--format", "gguf", *FAST])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    line = next(l for l in err.splitlines() if l.startswith("stat-prune: error:"))
    assert "Cannot export as gguf" in line and line.endswith("formats that apply to this model: safetensors, onnx.")
    assert not (tmp_path / "x").exists()
    rc = main([str(tiny_bert_folder), "--sparsity", "0.2", "--out", str(tmp_path / "x"), "--format", "onnx",
               "--no-model", *FAST])
    assert rc == 2 and "--no-model" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_speed_benchmark_times_onnxruntime_next_to_pytorch(tmp_path):
    from benchmarks import speed
    assert speed.main(["--tiny", "--onnx", "--out-dir", str(tmp_path)]) == 0
    dense, pruned = json.loads((tmp_path / "speed.json").read_text())["records"]
    assert dense["ort_prefill_b1_s"] > 0 and pruned["ort_prefill_b8_s"] > 0
    assert pruned["ort_speedup_prefill_b1"] == dense["ort_prefill_b1_s"] / pruned["ort_prefill_b1_s"]
    assert "ORT prefill b1" in (tmp_path / "speed.md").read_text()


@pytest.mark.parametrize("family", ["gemma3", "qwen2"])
def test_onnx_other_decoder_families_match_pytorch(family, windows, tmp_path):
    """Gemma-3 (q/k norms, sliding-window layers, checked past the window) and Qwen2 (q/k/v biases), pruned."""
    model = tiny_model(family)
    stat_prune_(model, windows, PruneConfig(sparsity=0.4, sensitivity_samples=2, batch_size=4))
    info = export_model(model, None, tmp_path / "o", "onnx")
    ids = torch.randint(0, 128, (2, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(_ort_run(info.path, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}), ref,
                               atol=1e-5, rtol=0)


# --- the declaratively described families (GPT-2, OPT, GPT-NeoX, Phi-3) --------------------------------

DECLARATIVE = ["gpt2", "opt", "gpt_neox", "phi3"]


@pytest.mark.parametrize("family", DECLARATIVE)
def test_gguf_refuses_declarative_families_in_one_sentence(family, smol_tokenizer, tmp_path):
    """Their layers are not llama.cpp's llama layer: one sentence naming the family and the formats
    that do apply, before any work (GPT2LMHeadModel is a causal LM too, not 'not a causal LM')."""
    from test_families import tiny_family_model

    model = tiny_family_model(family)
    assert applicable_formats(model) == ["safetensors", "onnx"]
    with pytest.raises(ExportError) as exc:
        export_model(model, smol_tokenizer, tmp_path / "x", "gguf")
    msg = str(exc.value)
    assert f"not '{family}'" in msg and "not a causal LM" not in msg
    assert msg.endswith("formats that apply to this model: safetensors, onnx.") and msg.count(". ") == 0
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family", DECLARATIVE)
def test_onnx_declarative_families_match_pytorch(family, windows, tmp_path):
    """Pruned per layer (GPT-2's Conv1D and fused c_attn, GPT-NeoX's interleaved query_key_value,
    Phi-3's fused qkv/gate_up with fewer KV heads), exported with `logits` (GPT2LMHeadModel's name
    ends in "Model" but it is a causal LM) and run in onnxruntime at a shape other than the traced one."""
    from test_families import tiny_family_model

    model = tiny_family_model(family)
    plan = stat_prune_(model, windows, PruneConfig(sparsity=0.4, sensitivity_samples=2, batch_size=4)).plan
    assert any(len(lp.kept_heads) < lp.num_heads for lp in plan.layers)
    info = export_model(model, None, tmp_path / "o", "onnx", plan=plan)
    assert json.loads((info.path / "pruning_report.json").read_text())["export"]["output"] == "logits"
    ids = torch.randint(0, 128, (2, 29), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = model(input_ids=ids).logits.numpy()
    np.testing.assert_allclose(_ort_run(info.path, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}), ref,
                               atol=1e-5, rtol=0)


def test_onnx_bare_gpt2_model_writes_last_hidden_state(tmp_path):
    from transformers import GPT2Config, GPT2Model

    from stat_core.export.onnx import write_onnx

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=128, n_positions=128)).eval()
    get_adapter(model).prune_heads_(1, [0, 2], [0, 2], None)
    info = write_onnx(model, tmp_path / "model.onnx")
    assert info.output == "last_hidden_state" and info.max_abs_diff < 1e-5
