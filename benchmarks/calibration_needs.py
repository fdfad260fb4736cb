"""Calibration seconds per method: what each method's calibration costs now that it computes only
what the method declares (``PruningMethod.calibration_needs``), beside what it cost when every
method paid STAT's whole calibration (gradient pass + statistics + decompositions).

    .venv/bin/python -m benchmarks.calibration_needs                 # SmolLM2-135M, 16 × 512 Wikipedia tokens
    .venv/bin/python -m benchmarks.calibration_needs --tiny --out-dir /tmp/c   # seconds (the test)

Per method, on the same windows: "before" = the full calibration (``needs=ALL_NEEDS``) plus the
method's own ``prepare`` (LLM-Pruner's weight gradients); "after" = ``calibrate(needs=method's)`` plus
``prepare``. The two are timed alternately (before, after, before, after, …) and medians reported,
because the 2-core box is shared; the ratio is the number to read. Writes ``calibration_needs.json``
and ``.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks._common import RESULTS, load_at_start, machine_note, median, random_windows, tiny_llama, write_results
from stat_core.calibration.stage import ALL_NEEDS
from stat_core.calibration.statistics import CalibrationSet
from stat_core.config import PruneConfig
from stat_core.methods.registry import get_method
from stat_core.pipeline import calibrate

METHODS = ("stat", "flap", "wanda-sp", "slimgpt", "llm-pruner")


def _seconds(model, windows, config, method, needs) -> float:
    t = time.perf_counter()
    calibration = calibrate(model, windows, config, needs=needs)
    method.prepare(model, CalibrationSet.wrap(windows), calibration)
    return time.perf_counter() - t


def measure(model, windows, methods, repeats: int) -> list[dict]:
    rows = []
    for name in methods:
        method = get_method(name)
        config = PruneConfig(sparsity=0.2, method=name)
        before, after = [], []
        for _ in range(repeats):
            before.append(_seconds(model, windows, config, method, ALL_NEEDS))
            after.append(_seconds(model, windows, config, method, method.calibration_needs))
        rows.append({"method": name, "needs": sorted(method.calibration_needs), "before_s": median(before),
                     "after_s": median(after), "ratio": median(after) / median(before),
                     "before_all": before, "after_all": after})
        print(f"{name:12s} before {median(before):7.1f} s  after {median(after):7.1f} s  "
              f"× {median(after) / median(before):.2f}", flush=True)
    return rows


def markdown(payload: dict) -> str:
    meta = payload["meta"]
    lines = [f"Calibration seconds per method on **{meta['model']}**, {meta['windows']} calibration windows "
             f"× {meta['seq_len']} tokens, medians of {meta['repeats']} alternated repeats on "
             f"{meta['machine']['cpu_count']} CPU cores (load average at start {load_at_start(meta)}). "
             "Before: every method paid STAT's whole calibration (gradient pass, statistics, decompositions); "
             "after: only what the method declares it needs, plus its own preparation.", "",
             "| method | computes now | before | after | after ÷ before |", "|---|---|---|---|---|"]
    for r in payload["rows"]:
        needs = ", ".join(r["needs"]) or "nothing (its own gradient pass only)"
        lines.append(f"| {r['method']} | {needs} | {r['before_s']:.1f} s | {r['after_s']:.1f} s | "
                     f"{r['ratio']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--num-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--tiny", action="store_true", help="a random tiny Llama (seconds; the test)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.tiny:
        model, name = tiny_llama(layers=3), "tiny-llama"
        windows = random_windows(8, 32, 128)
    else:
        from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
        from stat_core.models import load_model

        model, tokenizer = load_model(args.model)
        name = args.model
        windows = calibration_windows(tokenizer, wikipedia_split("calibration"),
                                      CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len))
    meta = {"model": name, "windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]),
            "repeats": args.repeats, "machine": machine_note()}
    rows = measure(model, windows, args.methods.split(","), args.repeats)
    payload = {"meta": meta, "rows": rows}
    write_results(args.out_dir, "calibration_needs", payload, markdown(payload))
    print(markdown(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
