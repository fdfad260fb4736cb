"""The fine-tuning reference on the demo classifier: STAT, STAT + recovery, block movement pruning.

    nice -n 19 .venv/bin/python -m benchmarks.finetune_ref                # 30/40/50%, ~30 min on 2 idle cores
    .venv/bin/python -m benchmarks.finetune_ref --quick                   # 30% only, a handful of steps
    nice -n 19 .venv/bin/python -m benchmarks.finetune_ref --sparsities 0.5 --methods stat+recovery --append
                                                                          # redo one cell, keep the others

At each budget (fraction of encoder block parameters removed, STAT's accounting):

- ``stat``: STAT one-shot, no training (calibration on all 128-token windows of the training half);
- ``stat+recovery``: that model distilled towards the dense one for ``--recover-steps`` steps
  (:func:`stat_core.recover.recover_`: class KL + block-output MSE, AdamW) on the same windows;
- ``block-movement``: Lagunas et al. 2021 (:mod:`stat_core.methods.block_movement`) for
  ``--epochs`` epochs over the same windows (cubic schedule, distillation from the dense logits),
  then the masked units removed.

All three see only the training half; accuracy on the 100 held-out posts (first 128 tokens) and on
all their 128-token windows, KL(dense ‖ pruned) over those windows. Wall-clock on the shared CPU box.
Writes ``benchmarks/results/finetune_ref.{json,md}`` (after every record, so a cut run keeps its rows;
``--append`` keeps the records of the methods and budgets not rerun).

The same comparison on SmolLM2 with the evaluation suite (STAT and a peer, each with and without
recovery) is ``python -m benchmarks.suite --recover STEPS`` (results in ``finetune_ref_smollm2.{json,md}``).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks._common import RESULTS, machine_note
from benchmarks.classifier_sweep import kl, log_probs

from stat_core.surgery.budget import block_parameter_count
from stat_core.adapters import get_adapter
from stat_core.evaluation.classifier import accuracy, encode, encode_chunks
from stat_core.models import demo_classifier_split
from stat_core.methods.block_movement import MovementSettings, block_movement_prune_
from stat_core.models import load_model
from stat_core.config import PruneConfig
from stat_core.pipeline import calibrate, prune_from_calibration_
from stat_core.recover import RecoveryConfig, recover_

METHODS = ("stat", "stat+recovery", "block-movement")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minilm-classifier")
    p.add_argument("--sparsities", default="0.3,0.4,0.5")
    p.add_argument("--recover-steps", type=int, default=100)
    p.add_argument("--recover-lr", type=float, default=1e-5)
    p.add_argument("--recover-batch", type=int, default=8)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--bm-lr", type=float, default=1e-4)
    p.add_argument("--bm-batch", type=int, default=16)
    p.add_argument("--methods", default=",".join(METHODS), help="a subset of " + ", ".join(METHODS))
    p.add_argument("--append", action="store_true", help="keep the other records already in the results file")
    p.add_argument("--quick", action="store_true", help="30%% only, 5 recovery steps, 6 block movement steps")
    p.add_argument("--out", default=str(RESULTS / "finetune_ref"))
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        p.error(f"--methods: a subset of {', '.join(METHODS)}")
    torch.manual_seed(0)
    sparsities = [0.3] if args.quick else [float(s) for s in args.sparsities.split(",")]
    rec_cfg = RecoveryConfig(steps=5 if args.quick else args.recover_steps, lr=args.recover_lr,
                             batch_size=args.recover_batch)
    bm = MovementSettings(epochs=args.epochs, steps=6 if args.quick else None, batch_size=args.bm_batch, lr=args.bm_lr)

    dense, tok = load_model(args.model)
    train, held = demo_classifier_split()
    calib, ev, ev_chunks = encode_chunks(tok, train), encode(tok, held), encode_chunks(tok, held)
    dense_params = block_parameter_count(get_adapter(dense))
    ref = log_probs(dense, ev_chunks)
    meta = {"model": args.model, "held_out_posts": len(held), "held_out_windows": len(ev_chunks),
            "training_windows": len(calib), "training_tokens": int(calib.attention_mask.sum()),
            "recovery": asdict(rec_cfg), "block_movement": {**asdict(bm), "steps": bm.total_steps(len(calib))},
            "machine": machine_note(), "quick": args.quick}
    records = [{"method": "dense", "budget": 0.0, "removed_fraction": 0.0, "accuracy": accuracy(dense, ev),
                "accuracy_windows": accuracy(dense, ev_chunks), "kl_to_dense": 0.0, "seconds": 0.0}]
    out = Path(args.out)
    kept: list[dict] = []
    if args.append and out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        redo = {(m, s) for m in methods for s in sparsities}
        kept = [r for r in old["records"][1:] if (r["method"], r["budget"]) not in redo]
        meta = {**old["meta"], "appended": {k: meta[k] for k in ("recovery", "machine")} | {"methods": methods}}

    def add(method, budget, model, seconds, **extra):
        r = {"method": method, "budget": budget,
             "removed_fraction": 1 - block_parameter_count(get_adapter(model)) / dense_params,
             "accuracy": accuracy(model, ev), "accuracy_windows": accuracy(model, ev_chunks),
             "kl_to_dense": kl(ref, log_probs(model, ev_chunks)), "seconds": seconds, **extra}
        records.append(r)
        print(json.dumps(r), flush=True)
        write(out, meta, records[:1] + sorted(kept + records[1:], key=lambda r: (r["budget"], METHODS.index(r["method"]))))

    t = time.perf_counter()
    stat_calibration = calibrate(dense, calib, PruneConfig(sparsity=sparsities[0]))  # budget-independent, once
    t_calib = time.perf_counter() - t
    meta["stat_calibration_seconds"] = t_calib
    for s in sparsities:
        m = copy.deepcopy(dense)
        t = time.perf_counter()
        prune_from_calibration_(m, stat_calibration, PruneConfig(sparsity=s), model_name=args.model, data=calib)
        t_stat = t_calib + time.perf_counter() - t  # every budget is charged the whole calibration
        if "stat" in methods:
            add("stat", s, m, t_stat)
        if "block-movement" in methods:
            bm_model = copy.deepcopy(dense)
            t = time.perf_counter()
            info = block_movement_prune_(bm_model, calib, PruneConfig(sparsity=s, method="block-movement"), bm,
                                         model_name=args.model, teacher=dense)
            add("block-movement", s, bm_model, time.perf_counter() - t, train_steps=info["train_steps"],
                train_loss=[info["loss_first"], info["loss_last"]],
                kept=[{"heads": len(lp["kept_heads"]), "neurons": len(lp["kept_neurons"])} for lp in info["plan"]["layers"]])
            del bm_model
        if "stat+recovery" in methods:
            t = time.perf_counter()
            info = recover_(m, dense, calib, rec_cfg)
            add("stat+recovery", s, m, t_stat + time.perf_counter() - t, recovery_seconds=info["seconds"],
                recovery_loss=[info["loss_first"], info["loss_last"]])
        del m
    print(out.with_suffix(".md").read_text() if records[1:] else markdown(meta, records))
    return 0


def write(out: Path, meta: dict, records: list[dict]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
    out.with_suffix(".md").write_text(markdown(meta, records))


def markdown(meta: dict, records: list[dict]) -> str:
    dense = records[0]
    rc, bm = meta["recovery"], meta["block_movement"]
    lines = [f"Demo classifier ({meta['model']}: MiniLM-L6, newsgroups). Dense: **{dense['accuracy']:.0%}** on "
             f"{meta['held_out_posts']} held-out posts, {dense['accuracy_windows']:.1%} on their "
             f"{meta['held_out_windows']} 128-token windows. Training side: {meta['training_windows']} windows "
             f"({meta['training_tokens']:,} tokens) of the training half, for all three methods. "
             f"Recovery: {rc['steps']} steps × {rc['batch_size']} windows, AdamW lr {rc['lr']:g}. "
             f"Block movement: {bm['epochs']:g} epochs = {bm['steps']} steps × {bm['batch_size']} windows, "
             f"weights lr {bm['lr']:g}, scores lr {bm['score_lr']:g}, warm-up {bm['warmup']:.0%}, "
             f"cool-down {bm['cooldown']:.0%}, distillation α {bm['alpha_distil']} at T {bm['temperature']:g}. "
             f"Cells: post accuracy / window accuracy / KL(dense‖pruned) over windows / wall-clock "
             f"(2 shared CPU cores, nice 19).", "",
             "| target | STAT | STAT + recovery | block movement | STAT − block movement (posts / windows) |",
             "|---|---|---|---|---|"]
    rows: dict[float, dict] = {}
    for r in records[1:]:
        rows.setdefault(r["budget"], {})[r["method"]] = r

    def cell(r):
        if r is None:
            return "–"
        return (f"{r['accuracy']:.0%} / {r['accuracy_windows']:.1%} / {r['kl_to_dense']:.4f} / "
                f"{r['seconds']:.0f} s")

    for s, row in sorted(rows.items()):
        st, bmr = row.get("stat"), row.get("block-movement")
        diff = (f"{100 * (st['accuracy'] - bmr['accuracy']):+.0f} / {100 * (st['accuracy_windows'] - bmr['accuracy_windows']):+.1f} pt"
                if st and bmr else "–")
        lines.append(f"| {s:.0%} | {cell(st)} | {cell(row.get('stat+recovery'))} | {cell(bmr)} | {diff} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
