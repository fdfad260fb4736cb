"""Held-out accuracy of the demo classifier pruned by STAT vs its baselines over a range of budgets.

    .venv/bin/python -m benchmarks.classifier_sweep            # S = 0.2 .. 0.5, about 3 min on 2 cores
    .venv/bin/python -m benchmarks.classifier_sweep --quick    # S = 0.3 only

Calibration on all text of the training half of the newsgroup sample (the classifier's own
training data; long posts cut into 128-token windows), accuracy on the held-out half (100 posts),
plus accuracy over all held-out windows and the KL divergence to the dense model's predictions. Same baselines as prune_sweep.py. Writes
``benchmarks/results/classifier_sweep.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from stat_core.evaluation.classifier import accuracy, encode, encode_chunks
from stat_core.models import demo_classifier_split
from stat_core.models import load_model
from stat_core.methods.baselines import magnitude_plan
from stat_core.config import PruneConfig
from stat_core.surgery.apply import apply_plan_
from stat_core.surgery.budget import budget_summary
from stat_core.pipeline import stat_prune_

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
    calib, ev, ev_chunks = encode_chunks(tok, train), encode(tok, held), encode_chunks(tok, held)
    dense_params = budget_summary(model)["block_params"]
    dense_acc = accuracy(model, ev)
    ref = log_probs(model, ev_chunks)
    records = [{"method": "dense", "budget": 0.0, "removed_fraction": 0.0, "accuracy": dense_acc,
                "accuracy_windows": accuracy(model, ev_chunks), "kl_to_dense": 0.0}]
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
                apply_plan_(m, magnitude_plan(m, plan), stats=None)
            rec = {"method": "stat-one-shot" if method == "stat" else method, "budget": s,
                   "removed_fraction": 1 - budget_summary(m)["block_params"] / dense_params,
                   "accuracy": accuracy(m, ev), "accuracy_windows": accuracy(m, ev_chunks),
                   "kl_to_dense": kl(ref, log_probs(m, ev_chunks))}
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


@torch.no_grad()
def log_probs(model, data) -> torch.Tensor:
    return torch.cat([model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.log_softmax(-1)
                      for b in data.batches(32)])


def kl(ref: torch.Tensor, other: torch.Tensor) -> float:
    """Mean KL(dense ‖ pruned) of the class distributions: fidelity, finer than accuracy."""
    return float((ref.exp() * (ref - other)).sum(-1).mean())


def markdown_table(records: list[dict], n_held: int) -> str:
    dense = next(r["accuracy"] for r in records if r["method"] == "dense")
    rows: dict[float, dict] = {}
    for r in records:
        if r["method"] != "dense":
            rows.setdefault(r["budget"], {})[r["method"]] = r
    dense_w = next(r["accuracy_windows"] for r in records if r["method"] == "dense")
    lines = [f"Demo classifier (MiniLM-L6, newsgroups). Dense held-out accuracy **{dense:.1%}** on {n_held} posts "
             f"(first 128 tokens, as the classifier is used), {dense_w:.1%} on all 128-token windows of those posts. "
             "Budget = fraction of encoder block parameters removed. Cells: post accuracy / window accuracy / "
             "KL(dense‖pruned) over windows.", "",
             "| target | removed | STAT | no-correction | magnitude |", "|---|---|---|---|---|"]

    def cell(r):
        return f"{r['accuracy']:.0%} / {r['accuracy_windows']:.1%} / {r['kl_to_dense']:.4f}"

    for s, row in sorted(rows.items()):
        st = row["stat-one-shot"]
        lines.append(f"| {s:.0%} | {st['removed_fraction']:.1%} | {cell(st)} | {cell(row['no-correction'])} "
                     f"| {cell(row['magnitude'])} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
