"""Held-out accuracy of the demo classifier pruned by STAT vs its baselines over a range of budgets.

    .venv/bin/python benchmarks/classifier_sweep.py            # S = 0.2 .. 0.5, about 3 min on 2 cores
    .venv/bin/python benchmarks/classifier_sweep.py --quick    # S = 0.3 only

Calibration on the training half of the newsgroup sample (the classifier's own training data),
accuracy on the held-out half (100 posts). Same baselines as prune_sweep.py. Writes
``benchmarks/results/classifier_sweep.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from stat_core.adapters import get_adapter
from stat_core.classifier import accuracy, demo_classifier_split, encode
from stat_core.models import load_model
from stat_core.prune import PruneConfig, apply_plan_, budget_summary, magnitude_plan, stat_prune_

RESULTS = Path(__file__).parent / "results"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-classifier")
    p.add_argument("--sparsities", default="0.2,0.3,0.4,0.5")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(RESULTS / "classifier_sweep"))
    args = p.parse_args(argv)
    torch.manual_seed(0)
    sparsities = [0.3] if args.quick else [float(s) for s in args.sparsities.split(",")]
    model, tok = load_model(args.model)
    train, held = demo_classifier_split()
    calib, ev = encode(tok, train), encode(tok, held)
    dense_params = budget_summary(model)["block_params"]
    dense_acc = accuracy(model, ev)
    records = [{"method": "dense", "budget": 0.0, "removed_fraction": 0.0, "accuracy": dense_acc}]
    print(f"dense accuracy {dense_acc:.1%}", flush=True)
    for s in sparsities:
        for method in ("stat", "no-correction", "magnitude"):
            m, _ = load_model(args.model)
            if method == "stat":
                result = stat_prune_(m, calib, PruneConfig(sparsity=s), model_name=args.model)
                plan = result.plan
            elif method == "no-correction":
                apply_plan_(m, plan, stats=None)
            else:
                apply_plan_(m, magnitude_plan(get_adapter(m), plan), stats=None)
            rec = {"method": "stat-one-shot" if method == "stat" else method, "budget": s,
                   "removed_fraction": 1 - budget_summary(m)["block_params"] / dense_params,
                   "accuracy": accuracy(m, ev)}
            if method == "stat":
                rec["kept"] = plan.kept_summary()
            records.append(rec)
            print(json.dumps({k: v for k, v in rec.items() if k != "kept"}), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": {"model": args.model, "held_out": len(held),
                                                             "calibration_examples": len(train)},
                                                    "records": records}, indent=1))
    table = markdown_table(records, len(held))
    out.with_suffix(".md").write_text(table)
    print(table)
    return 0


def markdown_table(records: list[dict], n_held: int) -> str:
    dense = next(r["accuracy"] for r in records if r["method"] == "dense")
    rows: dict[float, dict] = {}
    for r in records:
        if r["method"] != "dense":
            rows.setdefault(r["budget"], {})[r["method"]] = r
    lines = [f"Demo classifier (MiniLM-L6, newsgroups), dense held-out accuracy **{dense:.1%}** on {n_held} posts; "
             "budget = fraction of encoder block parameters removed.", "",
             "| target | removed | STAT | no-correction | magnitude |", "|---|---|---|---|---|"]
    for s, row in sorted(rows.items()):
        st = row["stat-one-shot"]
        lines.append(f"| {s:.0%} | {st['removed_fraction']:.1%} | {st['accuracy']:.1%} | "
                     f"{row['no-correction']['accuracy']:.1%} | {row['magnitude']['accuracy']:.1%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
