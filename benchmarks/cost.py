"""Pruning cost: wall time and peak memory of STAT vs one plain forward pass over the same
calibration set (the floor of any data-driven method), and how time grows with calibration tokens
and with model width (power-law exponents).

    .venv/bin/python -m benchmarks.cost            # random Llamas (width 128..768, 4 layers) + SmolLM2-135M
    .venv/bin/python -m benchmarks.cost --quick    # widths 64..256, no SmolLM2 (a few minutes)
    .venv/bin/python -m benchmarks.cost --tiny --out-dir /tmp/c    # seconds (the test)
    .venv/bin/python -m benchmarks.cost --device cuda               # same on a GPU (peak = max_memory_allocated)

"Prune" is the whole one-shot ``stat_prune_`` (sensitivity gradient pass on 4096 tokens, the
block-by-block statistics pass, decompositions, allocation, surgery) on a fresh copy of the dense
model; "forward" is one ``model(...)`` pass with ``torch.no_grad`` over the same windows, batch 8.
The two are timed alternately (forward, prune, forward, prune, …) and medians are reported, because
the project's CPU box is shared with other jobs (see ``machine`` in the JSON). Peak memory is the
peak resident set size above the level just before the phase, sampled every 5 ms by a thread
after ``gc.collect()`` and glibc ``malloc_trim(0)`` (otherwise freed pages kept by the allocator hide
a phase's peak), (CUDA: ``torch.cuda.max_memory_allocated`` above the level before). Writes ``cost.json`` / ``cost.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks._common import RESULTS, forward_seconds, load_at_start, machine_note, median, random_windows, sync, tiny_llama, write_results

from stat_core.config import PruneConfig
from stat_core.pipeline import stat_prune_


def _malloc_trim() -> None:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the starting level during a ``with`` block (RSS on CPU, allocator on CUDA)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"
        self.peak_mb = 0.0

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        import gc

        import psutil

        gc.collect()
        _malloc_trim()  # hand freed heap pages back, or the allocator's reuse hides the phase's peak
        self.proc = psutil.Process()
        self.base = self.proc.memory_info().rss
        self.top = self.base
        self.stop = threading.Event()

        def sample():
            while not self.stop.is_set():
                self.top = max(self.top, self.proc.memory_info().rss)
                time.sleep(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.stop.set()
            self.thread.join()
            self.top = max(self.top, self.proc.memory_info().rss)
            self.peak_mb = (self.top - self.base) / 2**20
        return False


def measure(dense, windows, device: str, repeats: int, batch_size: int = 8) -> dict:
    """Alternate forward / prune ``repeats`` times on fresh copies; medians of time and peak memory."""
    fwd_t, fwd_m, pr_t, pr_m, stages = [], [], [], [], []
    forward_seconds(dense, windows[:1], 1)  # warm-up (first-call allocations, thread pools)
    for _ in range(repeats):
        with PeakMemory(device) as mem:
            fwd_t.append(forward_seconds(dense, windows, batch_size))
        fwd_m.append(mem.peak_mb)
        model = copy.deepcopy(dense)
        sync(device)
        with PeakMemory(device) as mem:
            t = time.perf_counter()
            result = stat_prune_(model, windows, PruneConfig(sparsity=0.3, batch_size=batch_size))
            sync(device)
            pr_t.append(time.perf_counter() - t)
        pr_m.append(mem.peak_mb)
        stages.append(result.timings)
        del model, result
    st = {k: median([s[k] for s in stages if k in s]) for k in stages[0]}
    return {"seconds_prune": median(pr_t), "seconds_forward": median(fwd_t),
            "time_ratio": median(pr_t) / median(fwd_t), "time_ratios": [p / f for p, f in zip(pr_t, fwd_t)],
            "peak_mb_prune": median(pr_m), "peak_mb_forward": median(fwd_m),
            "memory_ratio": median(pr_m) / max(median(fwd_m), 1e-9), "stages": st, "repeats": repeats}


def fit_exponent(xs, ys) -> float:
    """Slope of log y against log x (the power-law exponent)."""
    if len(xs) < 2:
        return float("nan")
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def compute_fits(records: list[dict], fits: dict) -> None:
    """Exponents per scan: tokens (one fit per model width), width (at fixed tokens), SmolLM2 tokens."""
    groups: dict = {}
    for r in records:
        if r["scan"] == "tokens":
            groups.setdefault((f"random Llama d={r['hidden']}, vs calibration tokens", "tokens"), []).append(r)
        elif r["scan"] == "width":
            groups.setdefault((f"random Llama, {r['tokens']} tokens, vs width d", "hidden"), []).append(r)
        else:
            groups.setdefault((f"{r['model']}, vs calibration tokens", "tokens"), []).append(r)
    for (label, key), rs in groups.items():
        rs = sorted(rs, key=lambda r: r[key])
        if len(rs) > 1:
            fits[label] = {"x": [r[key] for r in rs],
                           "prune": fit_exponent([r[key] for r in rs], [r["seconds_prune"] for r in rs]),
                           "forward": fit_exponent([r[key] for r in rs], [r["seconds_forward"] for r in rs])}


def random_model(width: int, layers: int, device: str):
    heads = max(2, width // 64)
    model = tiny_llama(hidden=width, layers=layers, heads=heads, kv_heads=max(1, heads // 2), d_ff=3 * width,
                       vocab=1024)
    return model.to(device)


def markdown(records: list[dict], fits: dict, meta: dict) -> str:
    lines = ["Pruning = the whole one-shot STAT run at 30% (sensitivity pass, statistics pass, decompositions, "
             "allocation, surgery); floor = one plain forward pass over the same calibration windows. Medians of "
             f"alternated repeats on {meta['device']} ({meta['machine']['cpu_count']} cores, "
             f"load average at start {load_at_start(meta)}); "
             "peak memory above the level before the phase.", "",
             "| model | width (d, d_ff) | layers | calibration tokens | prune | forward | time ÷ forward | "
             "peak MB prune | peak MB forward | stages: sensitivity / statistics / decompositions / surgery |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        st = r.get("stages", {})
        stages = " / ".join(f"{st.get(k, float('nan')):.1f}" for k in ("sensitivity", "calibrate", "analyse", "apply"))
        lines.append(f"| {r['model']} ({r['scan']}) | {r['hidden']}, {r['d_ff']} | {r['layers']} | {r['tokens']} "
                     f"| {r['seconds_prune']:.2f} s | {r['seconds_forward']:.2f} s | {r['time_ratio']:.1f}× "
                     f"| {r['peak_mb_prune']:.0f} | {r['peak_mb_forward']:.0f} | {stages} s |")
    lines += ["", "Power-law fits `time ∝ x^k` (least squares in log-log):", ""]
    for name, f in fits.items():
        lines.append(f"- {name}: prune k = **{f['prune']:.2f}**, forward k = {f['forward']:.2f} "
                     f"(points: {', '.join(str(x) for x in f['x'])})")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--widths", default="128,256,512,768")
    p.add_argument("--token-windows", default="8,16,32,64", help="windows of --seq-len for the token scan")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--scan-width", type=int, default=256, help="width of the model in the token scan")
    p.add_argument("--width-windows", type=int, default=16, help="windows in the width scan")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--smollm2-windows", default="16,64", help="windows × 512 for SmolLM2-135M ('' to skip)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out-dir", default=str(RESULTS))
    p.add_argument("--name", default="cost")
    p.add_argument("--refit", action="store_true", help="recompute fits and markdown from the saved .json")
    p.add_argument("--merge", default="", help="with --refit: add these result files' records (comma list)")
    args = p.parse_args(argv)
    if args.quick:
        args.widths, args.token_windows, args.seq_len, args.scan_width = "64,128,256", "4,8,16", 128, 128
        args.width_windows, args.repeats, args.smollm2_windows = 8, 2, ""
    if args.tiny:
        args.widths, args.token_windows, args.seq_len, args.scan_width = "32,64", "2,4", 32, 32
        args.width_windows, args.repeats, args.smollm2_windows, args.layers = 2, 1, "", 2
    device = args.device
    meta = {"machine": machine_note(), "device": device, "sparsity": 0.3, "repeats": args.repeats}
    records: list[dict] = []
    out_dir = Path(args.out_dir)
    fits: dict = {}

    def save():
        write_results(out_dir, args.name, {"meta": meta, "records": records, "fits": fits}, markdown(records, fits, meta))

    def add(rec):
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("stages", "time_ratios")}), flush=True)
        save()

    vocab = 1024
    # 1. calibration tokens (fixed width)
    if args.refit:
        data = json.loads((out_dir / f"{args.name}.json").read_text())
        records[:] = data["records"]
        meta.update(data["meta"])
        for other in filter(None, args.merge.split(",")):
            extra = json.loads((out_dir / f"{other}.json").read_text())
            records.extend(extra["records"])
            meta.setdefault("merged_from", []).append({"name": other, "machine": extra["meta"]["machine"]})
        compute_fits(records, fits)
        save()
        print(markdown(records, fits, meta))
        return 0
    dense = random_model(args.scan_width, args.layers, device)
    for n in [int(x) for x in filter(None, args.token_windows.split(","))]:
        w = random_windows(n, args.seq_len, vocab)
        add({"model": "random-llama", "scan": "tokens", "hidden": args.scan_width, "d_ff": 3 * args.scan_width,
             "layers": args.layers, "tokens": n * args.seq_len, **measure(dense, w, device, args.repeats)})
    # 2. width (fixed tokens)
    w = random_windows(args.width_windows, args.seq_len, vocab)
    for width in [int(x) for x in filter(None, args.widths.split(","))]:
        dense = random_model(width, args.layers, device)
        add({"model": "random-llama", "scan": "width", "hidden": width, "d_ff": 3 * width, "layers": args.layers,
             "tokens": args.width_windows * args.seq_len, **measure(dense, w, device, args.repeats)})
    compute_fits(records, fits)
    save()
    # 3. the real model
    if args.smollm2_windows:
        from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
        from stat_core.models import load_model

        dense, tok = load_model("smollm2-135m")
        dense.to(device)
        for n in [int(x) for x in args.smollm2_windows.split(",")]:
            w = calibration_windows(tok, wikipedia_split("calibration"), CalibrationConfig(num_samples=n))
            add({"model": "smollm2-135m", "scan": "real", "hidden": dense.config.hidden_size,
                 "d_ff": dense.config.intermediate_size, "layers": dense.config.num_hidden_layers,
                 "tokens": int(w.numel()), **measure(dense, w, device, 1)})
        compute_fits(records, fits)
    meta["machine_end"] = machine_note()
    save()
    print(markdown(records, fits, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
