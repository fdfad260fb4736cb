"""What the portable (uniform) export costs: perplexity and size of per-layer vs uniform STAT.

    .venv/bin/python -m benchmarks.uniform_export            # S = 0.1 .. 0.5, SmolLM2-135M, the fixed protocol
    .venv/bin/python -m benchmarks.uniform_export --quick    # S = 0.3, 16 windows, 4096 eval tokens

One calibration of the dense model; for every budget the per-layer plan and the uniform plan (same
head / KV-head / MLP counts in every layer, loadable by stock transformers) are applied to fresh
copies, exported, and scored. Writes ``benchmarks/results/uniform_export.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
from stat_core.evaluation.perplexity import evaluation_windows, perplexity
from stat_core.export.hf import export_pruned
from stat_core.export.common import state_dict_bytes
from stat_core.models import load_model
from stat_core.config import PruneConfig
from stat_core.surgery.budget import budget_summary
from stat_core.pipeline import calibrate, prune_from_calibration_

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--sparsities", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "uniform_export"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sparsities = [0.3] if args.quick else [float(s) for s in args.sparsities.split(",")]
    dense, tok = load_model(args.model, device="cpu")
    windows = calibration_windows(tok, wikipedia_split("calibration"), CalibrationConfig(num_samples=16 if args.quick else 64))
    ev = evaluation_windows(tok, n_tokens=4096 if args.quick else 16_384)
    dense_params = budget_summary(dense)["block_params"]
    records = [{"method": "dense", "budget": 0.0, "removed_fraction": 0.0, "perplexity": perplexity(dense, ev),
                "weights_mb": state_dict_bytes(dense) / 1e6}]
    print(f"dense perplexity {records[0]['perplexity']:.2f}", flush=True)
    calib = calibrate(dense, windows, PruneConfig(sparsity=0.0))
    for s in sparsities:
        for uniform in (False, True):
            model = copy.deepcopy(dense)
            result = prune_from_calibration_(model, calib, PruneConfig(sparsity=s, uniform=uniform), args.model)
            with tempfile.TemporaryDirectory() as tmp:
                info = export_pruned(model, tok, Path(tmp) / "m", plan=result.plan)
            lp = result.plan.layers[0]
            rec = {"method": "stat-uniform" if uniform else "stat", "budget": s,
                   "removed_fraction": 1 - budget_summary(model)["block_params"] / dense_params,
                   "perplexity": perplexity(model, ev), "weights_mb": info.size_bytes / 1e6,
                   "stock_loadable": info.uniform,
                   "shape": f"{len(lp.kept_heads)}q/{len(lp.kept_kv_heads)}kv/{len(lp.kept_neurons)}" if uniform else "per layer"}
            records.append(rec)
            print(json.dumps(rec), flush=True)
            del model
    write(records, Path(args.out), quick=args.quick)
    return 0


def write(records: list[dict], out: Path, quick: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(records, indent=1))
    dense = records[0]["perplexity"]
    lines = [f"Per-layer vs uniform STAT export{' (quick)' if quick else ''}: perplexity (×dense {dense:.2f}) "
             "and weights on disk.", "",
             "| target | per-layer ppl | uniform ppl | uniform ÷ per-layer | uniform shape (every layer) | MB per-layer / uniform |",
             "|---|---|---|---|---|---|"]
    by = {(r["method"], r["budget"]): r for r in records}
    for s in sorted({r["budget"] for r in records if r["method"] != "dense"}):
        a, b = by[("stat", s)], by[("stat-uniform", s)]
        lines.append(f"| {s:.0%} | {a['perplexity']:.2f} ({a['perplexity'] / dense:.2f}×) | {b['perplexity']:.2f} "
                     f"({b['perplexity'] / dense:.2f}×) | {b['perplexity'] / a['perplexity']:.2f} | {b['shape']} | "
                     f"{a['weights_mb']:.0f} / {b['weights_mb']:.0f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
