"""GGUF export: a pruned Llama-family decoder as a llama.cpp model file.

llama.cpp keeps one head count, KV-head count and feed-forward width per layer in its hyper-
parameters (``<arch>.attention.head_count``, ``.head_count_kv`` and ``.feed_forward_length`` may be
arrays), but only some of its architectures *build* each layer with its own widths. Its ``llama``
architecture reads the arrays and then creates every layer's tensors and graph with layer 0's
values (``hparams.n_head()``, ``n_head_kv()``, ``n_ff()`` in ``src/models/llama.cpp``), so a
non-uniform pruned model fails to load there with a tensor-shape error. Its ``deci`` architecture
(written for NVIDIA's Nemotron-NAS models, Llama layers of different widths) uses
``hparams.n_head(il)`` / ``n_head_kv(il)`` / ``n_ff(il)`` per layer with the same RMSNorm, RoPE and
SwiGLU as ``llama``. So: every layer the same shape → ``general.architecture = "llama"`` (runs in
any llama.cpp); otherwise ``"deci"``. Both load the optional ``attn_output.bias`` and
``ffn_down.bias`` tensors a STAT correction with an intercept adds.

Layout follows llama.cpp's ``convert_hf_to_gguf.py``: tensor names ``token_embd``, ``blk.N.attn_q``,
…, weights as stored by torch (``(out, in)``; GGUF lists the shape reversed), Q and K rows permuted
from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one, norms and biases in
float32. Tokenizer: byte-level BPE (GPT-2 style: Llama 3, SmolLM, Qwen) as ``tokenizer.ggml.model =
"gpt2"`` with tokens, token types, merges, special ids and the chat template.

Types: ``f32``, ``f16`` (2-D weights in float16) and ``q8_0`` (2-D weights whose rows are a multiple
of 32 long in Q8_0, the rest in float16 — a pruned MLP width such as 1013 cannot be split into
32-value blocks, so that ``ffn_down`` stays float16).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stat_core.adapters import get_adapter
from stat_core.adapters.registry import families_where
from stat_core.export.common import (
    ExportError,
    ExportInfo,
    _is_uniform,
    atomic_output_dir,
    card_head,
)

log = logging.getLogger(__name__)

GGUF_TYPES = ("f16", "q8_0", "f32")
#: llama.cpp's architectures (``general.architecture``, not model families): every layer the same
#: shape, or per-layer widths.
UNIFORM_ARCH, PER_LAYER_ARCH = "llama", "deci"

#: ``model_type`` values whose decoder layer is llama.cpp's llama layer (RMSNorm, RoPE, SwiGLU, no q/k norms).
GGUF_MODEL_TYPES = families_where(gguf=True)  # from the family descriptions

# llama.cpp names its byte-level BPE pre-tokenizers by a hash of the token ids of one check text
# (convert_hf_to_gguf.py, get_vocab_base_pre; MIT licence). The entries for Llama-architecture models:
_CHKTXT = ('\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ '
           '🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ '
           '------======= нещо на Български \'\'\'\'\'\'```````""""......!!!!!!?????? I\'ve been \'told he\'s there, '
           '\'RE you sure? \'M not sure I\'ll make it, \'D you like some tea? We\'Ve a\'lL')
_PRE_TOKENIZERS = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",     # Meta-Llama-3-8B
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",     # Smaug-Llama-3-70B
    "d353350c764d8c3b39c763113960e4fb4919bea5fbf208a0e3b22e8469dc7406": "llama4",        # Llama-4-Scout
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",        # SmolLM / SmolLM2
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",         # gpt2
    "0fe1cf6eda062318a1af7270f3331a85c539a01778ff948e24388e949c5282f4": "gpt-2",         # ruGPT3XL
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",         # Qwen1.5-7B
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",         # Qwen3-Embedding-0.6B
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",        # Mistral-Nemo
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",  # deepseek-llm-7b
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": "falcon3",       # Falcon3-7B
    "ccc2ef013c104be7bae2965776d611e1d7a8a2a9c547dd93a682c9a9fc80352e": "gpt-4o",        # Xenova/gpt-4o
}


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    arch: str                      # "llama" (uniform) or "deci" (per-layer widths)
    qtype: str
    size_bytes: int
    tokenizer_pre: str
    kept_f16: tuple[str, ...] = field(default=())   # q8_0: tensors whose rows do not split into 32-blocks


# --- which models apply -----------------------------------------------------------------------------

def gguf_problem(model) -> str | None:
    """Why ``model`` cannot be written as GGUF (one sentence), or ``None`` if it can."""
    config = model.config
    model_type = getattr(config, "model_type", "?")
    adapter = get_adapter(model)
    if not adapter.is_decoder or not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
        return (f"GGUF (llama.cpp) holds causal language models; '{type(model).__name__}' is "
                f"{'an encoder' if not adapter.is_decoder else 'not a causal LM'}")
    if model_type not in GGUF_MODEL_TYPES:
        return (f"GGUF export supports Llama-architecture decoders ({', '.join(GGUF_MODEL_TYPES)}), "
                f"not '{model_type}' (its layers differ from llama.cpp's llama layer)")
    if getattr(config, "stat_output_prior", False):
        return ("llama.cpp's llama architecture has no bias on the output layer to hold the output prior; prune "
                "without the output prior to write GGUF")
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"llama.cpp's llama layer uses SiLU; this model uses '{config.hidden_act}'"
    window = getattr(config, "sliding_window", None)
    if window is not None and window < getattr(config, "max_position_embeddings", 0):
        return (f"this model uses sliding-window attention ({window} tokens), which llama.cpp's llama "
                "architecture does not apply")
    rope = _rope(config)
    if rope.get("rope_type", "default") not in ("default", "linear", "llama3"):
        return f"RoPE scaling '{rope.get('rope_type')}' is not one this export writes (default, linear, llama3)"
    for i in range(adapter.num_layers):
        shape = adapter.layer_shape(i)
        if shape.num_heads == 0 or shape.intermediate_size == 0:
            return f"layer {i} has no attention heads or no MLP neurons left, which llama.cpp cannot run here"
    return None


def _rope(config) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "full_attention" in params:
        params = params["full_attention"]
    return dict(params)


# --- tokenizer ------------------------------------------------------------------------------------

def _tokenizer_json(tokenizer) -> dict:
    import json

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        raise ExportError("GGUF export needs a fast (tokenizers) tokenizer to read its vocabulary and merges.")
    return json.loads(backend.to_str())


def tokenizer_problem(tokenizer) -> str | None:
    if tokenizer is None:
        return "GGUF export needs the model's tokenizer (llama.cpp reads it from the file)"
    try:
        tj = _tokenizer_json(tokenizer)
    except ExportError as exc:
        return str(exc).rstrip(".")
    if tj.get("model", {}).get("type") != "BPE" or "ByteLevel" not in repr(tj.get("pre_tokenizer")):
        return ("GGUF export writes byte-level BPE tokenizers (GPT-2 style, as Llama 3, SmolLM and Qwen use); "
                f"this one is {tj.get('model', {}).get('type')} with pre-tokenizer "
                f"{(tj.get('pre_tokenizer') or {}).get('type')}")
    return None


def tokenizer_pre(tokenizer) -> str:
    """llama.cpp's name for this tokenizer's pre-tokenizer; ``"default"`` if it is not one it names."""
    digest = hashlib.sha256(str(tokenizer.encode(_CHKTXT, add_special_tokens=True)).encode()).hexdigest()
    name = _PRE_TOKENIZERS.get(digest)
    if name is None:
        log.warning("GGUF: pre-tokenizer not recognised (hash %s); writing 'default' — llama.cpp may split "
                    "text differently from the Hugging Face tokenizer", digest[:12])
        return "default"
    return name


def _vocab(tokenizer, vocab_size: int):
    """(tokens, token types) as llama.cpp's converter writes them (``get_vocab_base``)."""
    import gguf

    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"The tokenizer has ids up to {max(vocab.values())} but the model's vocabulary has "
                          f"{vocab_size} rows.")
    reverse = {i: t for t, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        token = reverse[i]
        if token in added:
            if not decoder[i].normalized:
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if decoder[i].special or _looks_special(token):
                types.append(gguf.TokenType.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(token)
    return tokens, types


def _looks_special(token: str) -> bool:
    return ((token.startswith("<|") and token.endswith("|>")) or (token.startswith("<｜") and token.endswith("｜>"))
            or (token.startswith("<") and token.endswith(">") and token[1:-1].strip("/").isalpha() and len(token) < 16))


def _write_tokenizer(writer, tokenizer, vocab_size: int) -> str:
    import gguf

    problem = tokenizer_problem(tokenizer)
    if problem:
        raise ExportError(problem + ".")
    tokens, types = _vocab(tokenizer, vocab_size)
    pre = tokenizer_pre(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    with tempfile.TemporaryDirectory(prefix="stat-gguf-tok-") as tmp:
        tokenizer.save_pretrained(tmp)  # SpecialVocab reads merges, special ids, add_bos and the template
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    if not special.merges:
        raise ExportError("The tokenizer has no BPE merges to write.")
    # Say whether BOS/EOS are added, as the Hugging Face tokenizer does: llama.cpp's default for some
    # pre-tokenizers (llama-bpe) is to add BOS, which would shift every prompt by one token.
    plain = tokenizer.encode("a b", add_special_tokens=False)
    full = tokenizer.encode("a b", add_special_tokens=True)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bool(bos is not None and len(full) > len(plain) and full[0] == bos)
    special.add_special_token["eos"] = bool(eos is not None and len(full) > len(plain) and full[-1] == eos)
    special.add_to_gguf(writer, quiet=True)
    return pre


# --- tensors --------------------------------------------------------------------------------------

def permute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Q/K rows (or bias) from Hugging Face's rotate-half RoPE layout to llama.cpp's interleaved one,
    head by head: ``(n_heads·head_dim, ...) -> same shape`` (``LlamaModel.permute`` in llama.cpp)."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float32).numpy()


def _gguf_tensors(model) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every tensor llama.cpp reads, Q/K already permuted."""
    adapter = get_adapter(model)
    base = adapter._decoder
    hd = adapter.head_dim
    out = [("token_embd.weight", _np(base.embed_tokens.weight))]
    for i, layer in enumerate(adapter.layers):
        attn, mlp = layer.self_attn, layer.mlp
        shape = adapter.layer_shape(i)
        blk = f"blk.{i}."
        out.append((blk + "attn_norm.weight", _np(layer.input_layernorm.weight)))
        projs = [("attn_q", attn.q_proj, shape.num_heads), ("attn_k", attn.k_proj, shape.num_kv_heads),
                 ("attn_v", attn.v_proj, None), ("attn_output", attn.o_proj, None),
                 ("ffn_gate", mlp.gate_proj, None), ("ffn_up", mlp.up_proj, None), ("ffn_down", mlp.down_proj, None)]
        for name, linear, rope_heads in projs:
            w = _np(linear.weight)
            if rope_heads is not None:
                assert w.shape[0] == rope_heads * hd
                w = permute_rope(w, rope_heads)
            out.append((f"{blk}{name}.weight", w))
            if linear.bias is not None:
                b = _np(linear.bias)
                out.append((f"{blk}{name}.bias", permute_rope(b, rope_heads) if rope_heads else b))
        out.append((blk + "ffn_norm.weight", _np(layer.post_attention_layernorm.weight)))
    out.append(("output_norm.weight", _np(base.norm.weight)))
    lm_head = model.get_output_embeddings()
    if not (getattr(model.config, "tie_word_embeddings", False)
            and lm_head.weight.data_ptr() == base.embed_tokens.weight.data_ptr()):
        out.append(("output.weight", _np(lm_head.weight)))  # absent: llama.cpp reuses token_embd
    return out


def _llama3_rope_factors(rope: dict, dim: int) -> np.ndarray:
    base = rope.get("rope_theta", 10000.0)
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _encode(name: str, data: np.ndarray, qtype: str):
    """(array, raw GGML type or None) for one tensor; 1-D tensors stay float32."""
    import gguf

    if data.ndim == 1 or qtype == "f32":
        return data.astype(np.float32), None, False
    if qtype == "q8_0":
        block = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0]
        if data.shape[-1] % block == 0:
            return gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0, False
        return data.astype(np.float16), None, True
    return data.astype(np.float16), None, False


# --- writing --------------------------------------------------------------------------------------

def write_gguf(model, tokenizer, path: str | Path, qtype: str = "f16", *, name: str | None = None,
               arch: str | None = None) -> GGUFInfo:
    """Write ``model`` (a Llama-family causal LM, pruned or not) and its tokenizer to the GGUF file ``path``.

    ``arch``: ``None`` picks ``"llama"`` when every layer has the same shape and ``"deci"`` otherwise;
    ``"llama"`` for a non-uniform model is refused (llama.cpp would build every layer with layer 0's
    widths). Atomic: written to a temporary file next to ``path`` and renamed into place.
    """

    if qtype not in GGUF_TYPES:
        raise ExportError(f"Unknown GGUF type '{qtype}'; choose one of {', '.join(GGUF_TYPES)}.")
    problem = gguf_problem(model) or tokenizer_problem(tokenizer)
    if problem:
        raise ExportError(problem + ".")
    adapter = get_adapter(model)
    shapes = [adapter.layer_shape(i) for i in range(adapter.num_layers)]
    uniform = len(set(shapes)) == 1
    arch = arch or (UNIFORM_ARCH if uniform else PER_LAYER_ARCH)
    if arch not in (UNIFORM_ARCH, PER_LAYER_ARCH):
        raise ExportError(f"GGUF architecture must be 'llama' or 'deci', not '{arch}'.")
    if arch == UNIFORM_ARCH and not uniform:
        raise ExportError("llama.cpp's 'llama' architecture builds every layer with layer 0's head and MLP widths; "
                          "a model whose layers differ needs 'deci'.")
    return _write(model, tokenizer, Path(path), qtype, name, arch, shapes)


def _write(model, tokenizer, path: Path, qtype: str, name: str | None, arch: str, shapes) -> GGUFInfo:
    import gguf

    config = model.config
    adapter = get_adapter(model)
    hd = adapter.head_dim
    rope = _rope(config)
    path = path.expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}-partial-", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    writer = None
    try:
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name or getattr(config, "_name_or_path", "") or type(model).__name__)
        writer.add_block_count(len(shapes))
        writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
        writer.add_embedding_length(int(config.hidden_size))
        heads = [s.num_heads for s in shapes]
        kv = [s.num_kv_heads for s in shapes]
        ff = [s.intermediate_size for s in shapes]
        uniform = len(set(shapes)) == 1
        writer.add_head_count(heads[0] if uniform else heads)
        writer.add_head_count_kv(kv[0] if uniform else kv)
        writer.add_feed_forward_length(ff[0] if uniform else ff)
        writer.add_key_length(hd)
        writer.add_value_length(hd)
        writer.add_rope_dimension_count(hd)
        writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
        if rope.get("rope_type") == "linear":
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(float(rope["factor"]))
        writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
        writer.add_vocab_size(int(config.vocab_size))
        ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        pre = _write_tokenizer(writer, tokenizer, int(config.vocab_size))
        kept_f16 = []
        tensors = _gguf_tensors(model)
        if rope.get("rope_type") == "llama3":
            tensors.append(("rope_freqs.weight", _llama3_rope_factors(rope, hd)))
        for tname, data in tensors:
            arr, raw, fell_back = _encode(tname, data, qtype)
            if fell_back:
                kept_f16.append(tname)
            writer.add_tensor(tname, arr, raw_dtype=raw)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        writer = None
        os.replace(tmp, path)
    except OSError as exc:
        raise ExportError(f"Could not write '{path}': {exc.strerror or exc}.") from exc
    finally:
        if writer is not None:
            writer.close()
        tmp.unlink(missing_ok=True)
    return GGUFInfo(path=path, arch=arch, qtype=qtype, size_bytes=path.stat().st_size, tokenizer_pre=pre,
                    kept_f16=tuple(kept_f16))


# --- export folder --------------------------------------------------------------------------------

def gguf_card(model, plan, report: dict, info: GGUFInfo, uniform: bool) -> str:

    f = info.path.name
    arch_note = ("`llama` (every layer the same shape: runs in any llama.cpp)" if info.arch == UNIFORM_ARCH else
                 "`deci` (llama.cpp's Llama architecture with per-layer head, KV-head and MLP widths, "
                 "written for NVIDIA's Nemotron-NAS models; llama.cpp's `llama` architecture would build "
                 "every layer with layer 0's widths)")
    lines = card_head(model, plan, report, uniform, library="gguf")
    lines += ["## Files", "", "| file | what |", "|---|---|",
              f"| `{f}` | weights ({info.qtype}) and tokenizer (`gpt2` BPE, pre-tokenizer `{info.tokenizer_pre}`) "
              f"for llama.cpp; architecture {arch_note} |"]
    if plan is not None:
        lines.append("| `plan.json` | kept attention heads, KV heads and MLP neurons per layer (`stat_core.PrunePlan`) |")
    lines += ["| `pruning_report.json` | settings, sizes and quality before/after |", "| `README.md` | this card |", ""]
    if info.kept_f16:
        lines += [f"Q8_0 needs rows that split into 32-value blocks; {len(info.kept_f16)} tensors whose pruned "
                  "width does not (" + ", ".join(f"`{n}`" for n in info.kept_f16[:6])
                  + (", …" if len(info.kept_f16) > 6 else "") + ") are stored in float16.", ""]
    if info.tokenizer_pre == "default":
        lines += ["The tokenizer's pre-tokenizer is not one llama.cpp names; the file says `default`, so llama.cpp "
                  "may split some text differently from the Hugging Face tokenizer.", ""]
    lines += ["## Running", "", "llama.cpp (greedy, 64 tokens):", "", "```sh",
              f'llama-completion -m {f} -p "The capital of France is" -n 64 --temp 0 -no-cnv',
              f"llama-server -m {f}   # OpenAI-compatible server on port 8080", "```", "",
              "Python (`pip install llama-cpp-python`):", "", "```python", "from llama_cpp import Llama",
              f'llm = Llama(model_path="{f}", n_ctx=2048)',
              'print(llm("The capital of France is", max_tokens=64, temperature=0)["choices"][0]["text"])', "```", "",
              f"File size: {info.size_bytes / 1e6:.1f} MB. Layers: {get_adapter(model).num_layers}; "
              f"family `{model.config.model_type}`.", ""]
    return "\n".join(lines)


def export_gguf(model, tokenizer, out_dir, *, plan=None, report: dict | None = None, overwrite: bool = False,
                qtype: str = "f16"):
    """A folder with ``model-<qtype>.gguf``, ``plan.json``, ``pruning_report.json`` and a model card;
    atomic (nothing at ``out_dir`` unless all of it was written)."""
    import json


    if qtype not in GGUF_TYPES:
        raise ExportError(f"Unknown GGUF type '{qtype}'; choose one of {', '.join(GGUF_TYPES)}.")
    uniform = _is_uniform(get_adapter(model))
    report = dict(report or {})
    with atomic_output_dir(out_dir, overwrite) as tmp:
        info = write_gguf(model, tokenizer, tmp / f"model-{qtype}.gguf", qtype,
                          name=report.get("model") or (plan.model if plan is not None else None))
        report["size_on_disk_after_bytes"] = info.size_bytes
        report["export"] = {"format": "gguf", "file": info.path.name, "type": qtype, "arch": info.arch,
                            "tokenizer_pre": info.tokenizer_pre, "kept_f16": list(info.kept_f16),
                            "loads_with": ["llama.cpp"]}
        if plan is not None:
            plan.to_json(tmp / "plan.json")
        (tmp / "pruning_report.json").write_text(json.dumps(report, indent=1))
        (tmp / "README.md").write_text(gguf_card(model, plan, report, info, uniform))
        files = tuple(sorted(p.name for p in tmp.iterdir()))
    return ExportInfo(path=Path(out_dir).expanduser(), size_bytes=info.size_bytes, uniform=uniform, files=files,
                      format="gguf")
