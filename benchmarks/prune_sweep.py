"""Perplexity and pruning time of STAT vs its baselines over a range of budgets (the fixed protocol of docs/evaluation.md).

    .venv/bin/python -m benchmarks.prune_sweep                     # S = 0.1 .. 0.5 on SmolLM2-135M
    .venv/bin/python -m benchmarks.prune_sweep --quick             # S = 0.2 on 16 windows (minutes)

For every budget: STAT (the CLI's default configuration) prunes a fresh copy of the model; the
same plan is applied without correction ("no-correction"), and the same per-layer counts are
filled by weight magnitude ("magnitude"). One plain forward pass over the same calibration set is
timed in the same run: pruning time is reported as a multiple of it. Writes
``benchmarks/results/prune_sweep.json`` and ``prune_sweep.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from stat_core.cli import time_forward
from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
from stat_core.evaluation.perplexity import evaluation_windows, perplexity
from stat_core.models import load_model
from stat_core.methods.baselines import magnitude_plan
from stat_core.config import PruneConfig
from stat_core.surgery.apply import apply_plan_
from stat_core.surgery.budget import budget_summary
from stat_core.pipeline import stat_prune_

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--mode", default="one-shot")
    p.add_argument("--sensitivity-samples", type=int, default=8)
    p.add_argument("--quick", action="store_true", help="S=0.2, 16 calibration windows, 8 evaluation windows")
    p.add_argument("--out", default=str(RESULTS / "prune_sweep"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sparsities = [0.2] if args.quick else [float(s) for s in args.sparsities.split(",")]
    n_samples = 16 if args.quick else args.num_samples

    model, tok = load_model(args.model)
    windows = calibration_windows(tok, wikipedia_split("calibration"), CalibrationConfig(num_samples=n_samples))
    ev = evaluation_windows(tok, n_tokens=4096 if args.quick else 16_384)
    dense_ppl = perplexity(model, ev)
    dense_params = budget_summary(model)["block_params"]
    floor = [time_forward(model, windows, 8) for _ in range(1 if args.quick else 2)]
    records = [{"method": "dense", "budget": 0.0, "removed_fraction": 0.0, "perplexity": dense_ppl}]
    print(f"dense perplexity {dense_ppl:.2f}; forward over calibration set {statistics.median(floor):.1f} s", flush=True)

    for s in sparsities:
        model, _ = load_model(args.model)
        cfg = PruneConfig(sparsity=s, mode=args.mode, sensitivity_samples=args.sensitivity_samples)
        t = time.perf_counter()
        result = stat_prune_(model, windows, cfg, model_name=args.model)
        seconds = time.perf_counter() - t
        # The floor is re-timed next to every prune so the ratio compares like with like.
        fresh, _ = load_model(args.model)
        floor_now = time_forward(fresh, windows, 8)
        floor.append(floor_now)
        removed = 1 - budget_summary(model)["block_params"] / dense_params
        rec = {"method": f"stat-{args.mode}", "budget": s, "removed_fraction": removed,
               "perplexity": perplexity(model, ev), "seconds_prune": seconds,
               "seconds_forward": floor_now, "time_over_forward": seconds / floor_now,
               "stages": result.timings, "kept": result.plan.kept_summary()}
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in ("kept", "stages")}), flush=True)
        apply_plan_(fresh, result.plan, stats=None)
        records.append({"method": "no-correction", "budget": s, "removed_fraction": removed,
                        "perplexity": perplexity(fresh, ev)})
        print(json.dumps(records[-1]), flush=True)
        mag, _ = load_model(args.model)
        apply_plan_(mag, magnitude_plan(mag, result.plan), stats=None)
        records.append({"method": "magnitude", "budget": s,
                        "removed_fraction": 1 - budget_summary(mag)["block_params"] / dense_params,
                        "perplexity": perplexity(mag, ev)})
        print(json.dumps(records[-1]), flush=True)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "calibration_windows": n_samples, "eval_tokens": int(ev.numel()),
            "mode": args.mode, "forward_seconds_median": statistics.median(floor), "torch_threads": torch.get_num_threads()}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    out.with_suffix(".md").write_text(markdown_table(records, meta))
    print(markdown_table(records, meta))
    return 0


def markdown_table(records: list[dict], meta: dict) -> str:
    dense = next(r["perplexity"] for r in records if r["method"] == "dense")
    by_budget: dict[float, dict] = {}
    for r in records:
        if r["method"] != "dense":
            by_budget.setdefault(r["budget"], {})[r["method"]] = r
    lines = [f"Model `{meta['model']}`, dense perplexity **{dense:.2f}** ({meta['eval_tokens']} eval tokens), "
             f"{meta['calibration_windows']} calibration windows × 512, mode {meta['mode']}; "
             f"one forward pass over the calibration set: {meta['forward_seconds_median']:.1f} s (median).", "",
             "| target | removed | STAT ppl (×dense) | no-correction ppl | magnitude ppl | prune time | ÷ forward |",
             "|---|---|---|---|---|---|---|"]
    for s, row in sorted(by_budget.items()):
        st = next(v for k, v in row.items() if k.startswith("stat"))
        lines.append(f"| {s:.0%} | {st['removed_fraction']:.1%} | {st['perplexity']:.2f} ({st['perplexity'] / dense:.2f}×) "
                     f"| {row['no-correction']['perplexity']:.2f} | {row['magnitude']['perplexity']:.1f} "
                     f"| {st['seconds_prune']:.0f} s | {st['time_over_forward']:.2f}× |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
