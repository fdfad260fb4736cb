"""Real speedup of STAT-pruned models vs the dense one, next to the ideal implied by the FLOPs removed.

    .venv/bin/python -m benchmarks.speed            # SmolLM2-135M, STAT at 10..50%, CPU
    .venv/bin/python -m benchmarks.speed --quick    # 30% and 50%, fewer repeats (a few minutes)
    .venv/bin/python -m benchmarks.speed --tiny --out-dir /tmp/s   # random tiny Llama, seconds (the test)

Measured, for the dense model and each pruned one (all loaded side by side, timed in alternation —
dense, 10%, 20%, …, dense, 10%, … — medians over ``--repeats`` rounds, because the CPU box is shared):

- prefill latency for a 512-token prompt at batch 1 and batch 8 (``use_cache=False``,
  ``logits_to_keep=1`` as ``generate`` does) and the throughput it implies (prompt tokens/s);
- decode tokens/s at batch 1: 32 greedy single-token steps on the KV cache of a 512-token prompt.

With ``--onnx``, each model is also exported with ``stat_core.export.onnx`` (last position's logits
only, as ``logits_to_keep=1``; checked against PyTorch at export) and its prefill is timed in
onnxruntime (CPU, the same threads) in the same alternated rounds: the export has no KV cache, so
onnxruntime's numbers are prefill only.

Ideal speedup = dense MACs / pruned MACs per token: transformer blocks at a 512 causal context for
prefill; blocks with 512 tokens of context plus the LM head (which pruning does not touch) for
decode. "of ideal" = measured speedup / ideal speedup. The pruned models' shapes come from one
calibration (``--num-samples`` windows × 512; 16 by default — speed depends on the shapes only, and
the allocation barely moves between 16 and 64 windows). Writes ``speed.json`` / ``speed.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, load_at_start, machine_note, median, random_windows, sync, tiny_llama, write_results

from stat_core.adapters import get_adapter
from stat_core.surgery.budget import block_macs
from stat_core.config import PruneConfig
from stat_core.surgery.budget import budget_summary
from stat_core.pipeline import calibrate, prune_from_calibration_


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    sync(ids.device)
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    sync(ids.device)
    return time.perf_counter() - t


@torch.no_grad()
def decode_seconds(model, ids: torch.Tensor, steps: int) -> float:
    """Seconds for ``steps`` greedy single-token steps after prefilling ``ids`` (prefill not timed)."""
    out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(ids.device)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, past_key_values=past, use_cache=True)
        past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
    sync(ids.device)
    return time.perf_counter() - t


def onnx_sessions(models: dict, out_dir: str) -> dict:
    """Each model exported to ONNX (last-position logits, checked against PyTorch) in a temporary
    folder, as an onnxruntime session with torch's thread count."""
    import tempfile

    from stat_core.export.onnx import onnx_session, write_onnx

    import atexit
    import shutil

    sessions, folder = {}, Path(tempfile.mkdtemp(prefix="speed-onnx-"))
    atexit.register(shutil.rmtree, folder, True)
    for k, (_, m) in models.items():
        t = time.perf_counter()
        info = write_onnx(m, folder / f"{k}.onnx", last_only=True)
        print(f"onnx export {k}: {time.perf_counter() - t:.0f} s, max |ort - torch| {info.max_abs_diff:.2g}", flush=True)
        sessions[k] = onnx_session(info.path, threads=torch.get_num_threads())
    return sessions


def ort_prefill_seconds(session, ids: torch.Tensor) -> float:
    feed = {"input_ids": ids.cpu().numpy(), "attention_mask": torch.ones_like(ids).cpu().numpy()}
    t = time.perf_counter()
    session.run(["logits"], feed)
    return time.perf_counter() - t


def macs(model, prompt: int) -> dict:
    adapter = get_adapter(model)
    head = model.config.hidden_size * model.config.vocab_size
    return {"prefill": block_macs(adapter, prompt), "decode": block_macs(adapter, 2 * prompt - 1) + head}


def markdown(records: list[dict], meta: dict) -> str:
    dense = next(r for r in records if r["method"] == "dense")
    lines = [f"Model `{meta['model']}` on {meta['device']} ({meta['machine']['torch_threads']} threads; the box's "
             f"{meta['machine']['cpu_count']} cores, load average "
             f"{load_at_start(meta)} at start), prompt "
             f"{meta['prompt']} tokens, medians of {meta['repeats']} alternated rounds. Dense: prefill "
             f"{dense['prefill_b1_s'] * 1000:.0f} ms at batch 1 ({dense['prefill_b1_tok_s']:.0f} tok/s), "
             f"{dense['prefill_b8_s'] * 1000:.0f} ms at batch 8 ({dense['prefill_b8_tok_s']:.0f} tok/s), decode "
             f"{dense['decode_tok_s']:.1f} tok/s. Cells: measured speedup over dense (÷ ideal from MACs).", "",
             "| STAT budget | params removed | MACs removed (prefill) | prefill b1 | prefill b8 | decode b1 | ideal prefill | ideal decode |",
             "|---|---|---|---|---|---|---|---|"]
    onnx = "ort_prefill_b1_s" in dense
    if onnx:
        lines[0] += (f" onnxruntime (same threads, exported graphs): dense prefill {dense['ort_prefill_b1_s'] * 1000:.0f} ms "
                     f"at batch 1, {dense['ort_prefill_b8_s'] * 1000:.0f} ms at batch 8.")
        lines[2] = lines[2][:-len(" ideal prefill | ideal decode |")] + " ORT prefill b1 | ORT prefill b8 | ideal prefill | ideal decode |"
        lines[3] += "---|---|"
    for r in records:
        if r["method"] == "dense":
            continue
        ort = (f"| {r['ort_speedup_prefill_b1']:.2f}× ({r['ort_speedup_prefill_b1'] / r['ideal_prefill']:.0%}) "
               f"| {r['ort_speedup_prefill_b8']:.2f}× ({r['ort_speedup_prefill_b8'] / r['ideal_prefill']:.0%}) " if onnx else "")
        lines.append(
            f"| {r['budget']:.0%} | {r['removed_fraction']:.1%} | {1 - 1 / r['ideal_prefill']:.1%} "
            f"| {r['speedup_prefill_b1']:.2f}× ({r['speedup_prefill_b1'] / r['ideal_prefill']:.0%}) "
            f"| {r['speedup_prefill_b8']:.2f}× ({r['speedup_prefill_b8'] / r['ideal_prefill']:.0%}) "
            f"| {r['speedup_decode']:.2f}× ({r['speedup_decode'] / r['ideal_decode']:.0%}) " + ort +
            f"| {r['ideal_prefill']:.2f}× | {r['ideal_decode']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--decode-steps", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--onnx", action="store_true", help="also time prefill of each model exported to onnxruntime")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--name", default="speed")
    args = p.parse_args(argv)
    budgets = [float(s) for s in args.budgets.split(",")]
    if args.quick:
        budgets, args.repeats, args.num_samples = [0.3, 0.5], 3, 8
    torch.manual_seed(0)
    if args.tiny:
        dense = tiny_llama(hidden=64, heads=4, kv_heads=2, d_ff=192, vocab=256)
        windows = random_windows(8, 64, 256)
        args.prompt, args.batch, args.decode_steps, args.repeats, budgets = 32, 2, 4, 2, [0.3]
        name = "tiny-llama"
    else:
        from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
        from stat_core.models import load_model

        dense, tok = load_model(args.model)
        windows = calibration_windows(tok, wikipedia_split("calibration"), CalibrationConfig(num_samples=args.num_samples))
        name = args.model
    dense.to(args.device)
    calib = calibrate(dense, windows, PruneConfig(sparsity=0.0, batch_size=8))
    models = {"dense": (0.0, dense)}
    for b in budgets:
        m = copy.deepcopy(dense)
        prune_from_calibration_(m, calib, PruneConfig(sparsity=b))
        models[f"stat-{b}"] = (b, m)
    vocab = dense.config.vocab_size
    ids1 = random_windows(1, args.prompt, vocab, seed=3).to(args.device)
    idsb = random_windows(args.batch, args.prompt, vocab, seed=4).to(args.device)
    meta = {"model": name, "device": args.device, "prompt": args.prompt, "batch": args.batch,
            "decode_steps": args.decode_steps, "repeats": args.repeats, "calibration_windows": int(windows.shape[0]),
            "machine": machine_note()}
    times = {k: {"b1": [], "b8": [], "dec": []} for k in models}
    sessions = onnx_sessions(models, args.out_dir) if args.onnx else {}
    for k in sessions:
        times[k].update(ort_b1=[], ort_b8=[])
    for k, (_, m) in models.items():  # warm-up
        prefill_seconds(m, ids1)
        decode_seconds(m, ids1[:, :8], 2)
        if k in sessions:
            ort_prefill_seconds(sessions[k], ids1)
    for rnd in range(args.repeats):
        for k, (_, m) in models.items():
            times[k]["b1"].append(prefill_seconds(m, ids1))
            times[k]["b8"].append(prefill_seconds(m, idsb))
            times[k]["dec"].append(decode_seconds(m, ids1, args.decode_steps))
            if k in sessions:
                times[k]["ort_b1"].append(ort_prefill_seconds(sessions[k], ids1))
                times[k]["ort_b8"].append(ort_prefill_seconds(sessions[k], idsb))
        print(f"round {rnd + 1}/{args.repeats}: " + ", ".join(f"{k} {median(v['b1']) * 1000:.0f} ms" for k, v in times.items()),
              flush=True)
    dense_params = budget_summary(dense)["block_params"]
    dm = macs(dense, args.prompt)
    records = []
    for k, (b, m) in models.items():
        t = {x: median(v) for x, v in times[k].items()}
        mm = macs(m, args.prompt)
        rec = {"model": name, "method": "dense" if k == "dense" else "stat", "budget": b,
               "removed_fraction": 1 - budget_summary(m)["block_params"] / dense_params,
               "prefill_b1_s": t["b1"], "prefill_b8_s": t["b8"], "decode_s": t["dec"],
               "prefill_b1_tok_s": args.prompt / t["b1"], "prefill_b8_tok_s": args.batch * args.prompt / t["b8"],
               "decode_tok_s": args.decode_steps / t["dec"], "raw_seconds": times[k],
               "ideal_prefill": dm["prefill"] / mm["prefill"], "ideal_decode": dm["decode"] / mm["decode"]}
        d = times["dense"]
        if sessions:
            rec.update(ort_prefill_b1_s=t["ort_b1"], ort_prefill_b8_s=t["ort_b8"],
                       ort_speedup_prefill_b1=median(d["ort_b1"]) / t["ort_b1"],
                       ort_speedup_prefill_b8=median(d["ort_b8"]) / t["ort_b8"],
                       ort_over_torch_prefill_b1=t["b1"] / t["ort_b1"])
        rec["speedup_prefill_b1"] = median(d["b1"]) / t["b1"]
        rec["speedup_prefill_b8"] = median(d["b8"]) / t["b8"]
        rec["speedup_decode"] = median(d["dec"]) / t["dec"]
        records.append(rec)
        print(json.dumps({x: v for x, v in rec.items() if x != "raw_seconds"}), flush=True)
    meta["machine_end"] = machine_note()
    write_results(Path(args.out_dir), args.name, {"meta": meta, "records": records}, markdown(records, meta))
    print(markdown(records, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
