"""STAT's own choices, one at a time, on the evaluation suite: which of them help and which do not.

    .venv/bin/python -m benchmarks.stat_ablation --quick                     # SmolLM2, 20% and 30%
    .venv/bin/python -m benchmarks.stat_ablation --quick --variants affine,affine-mix --append

Each variant is a calibration source (``wikipedia``: the protocol's 64 × 512 windows; ``mix``: the
default decoder mix of ``stat_core.data.mix``, same number of windows) and a ``PruneConfig``
(correction with or without an intercept, one-shot or propagate). Every variant is measured with the
same suite and the same dense reference as ``benchmarks/suite.py``; the evaluation text and the
suite's prompts never enter any calibration. Writes ``benchmarks/results/stat_ablation.{json,md}``
after every cell.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

from benchmarks._common import RESULTS, machine_note

from stat_core.adapters import get_adapter
from stat_core.surgery.budget import block_parameter_count
from stat_core.config import PruneConfig
from stat_core.pipeline import calibrate, prune_from_calibration_, stat_prune_

log = logging.getLogger("stat_ablation")

#: name -> (calibration source, PruneConfig fields, what it tests)
VARIANTS = {
    "ls": ("wikipedia", {"intercept": False}, "least squares without intercept, Wikipedia (the first wave's STAT)"),
    "affine": ("wikipedia", {"intercept": True}, "least squares with an intercept (output bias), Wikipedia"),
    "affine-mix": ("mix", {"intercept": True}, "intercept, the default decoder mix (Wikipedia + self-generated chat)"),
    "ls-mix": ("mix", {"intercept": False}, "no intercept, the default decoder mix"),
    "affine-mix-propagate": ("mix", {"intercept": True, "mode": "propagate"}, "intercept, mix, propagate mode"),
    "affine-mix-fisher": ("mix", {"intercept": True, "sensitivity_labels": "model"},
                          "intercept, mix, gradient pass on labels sampled from the dense model (true Fisher)"),
    "ls-mix-fisher": ("mix", {"intercept": False, "sensitivity_labels": "model"},
                      "no intercept, mix, true Fisher"),
    "ls-fisher": ("wikipedia", {"intercept": False, "sensitivity_labels": "model"},
                  "no intercept, Wikipedia, true Fisher"),
    "ls-fisher-16": ("wikipedia", {"sensitivity_labels": "model", "sensitivity_samples": 16},
                     "no intercept, Wikipedia, true Fisher from 16 windows (twice the default gradient pass)"),
    "ls-16": ("wikipedia", {"sensitivity_samples": 16},
              "no intercept, Wikipedia, empirical Fisher from 16 windows (twice the default gradient pass)"),
    "affine-propagate": ("wikipedia", {"intercept": True, "mode": "propagate"}, "intercept, Wikipedia, propagate"),
    "ls-propagate": ("wikipedia", {"mode": "propagate"}, "no intercept, Wikipedia, propagate (the paper's variant)"),
    "ls-seq": ("wikipedia", {"mode": "sequential"},
               "no intercept, Wikipedia, sequential: corrections fitted to the dense model's activations"),
    "affine-seq": ("wikipedia", {"intercept": True, "mode": "sequential"}, "intercept, Wikipedia, sequential"),
    "ls-mix-fisher-seq": ("mix", {"sensitivity_labels": "model", "mode": "sequential"},
                          "no intercept, mix, true Fisher, sequential"),
}
FIELDS = ("perplexity", "kl_to_dense", "fewshot_accuracy", "fewshot_bias_free", "fewshot_majority_share",
          "analogy_accuracy", "instruction_agreement", "instruction_kl")


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def markdown(records: list[dict], meta: dict) -> str:
    lines = ["# STAT ablation on the evaluation suite", "",
             f"Protocol: {meta.get('protocol', '')}", "",
             "| variant | budget | " + " | ".join(FIELDS) + " | seconds_prune |",
             "|" + "---|" * (len(FIELDS) + 3)]
    for r in sorted(records, key=lambda r: (r["budget"], r["variant"])):
        lines.append(f"| {r['variant']} | {r['budget']:.0%} | " + " | ".join(_fmt(r.get(f)) for f in FIELDS)
                     + f" | {_fmt(r.get('seconds_prune'))} |")
    lines += ["", "Variants:", ""] + [f"- `{k}`: {v[2]}" for k, v in VARIANTS.items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--budgets", default="0.2,0.3")
    p.add_argument("--variants", default="ls,affine,affine-mix")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--append", action="store_true")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    from stat_core.data.mix import decoder_calibration
    from stat_core.data.sources import CalibrationConfig
    from stat_core.models import load_model
    from stat_core.evaluation.suite import SuiteConfig, build_reference, evaluate_suite

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    out = Path(args.out_dir)
    path = out / "stat_ablation.json"
    records = json.loads(path.read_text())["records"] if args.append and path.exists() else []
    suite_config = SuiteConfig.quick() if args.quick else SuiteConfig()
    meta = {"machine": machine_note(), "model": args.model,
            "protocol": f"{args.model}, {args.num_samples} × {args.seq_len} calibration windows (seed 0), "
                        f"{'quick' if args.quick else 'full'} suite"}

    model, tokenizer = load_model(args.model)
    reference = build_reference(model, tokenizer, suite_config)
    dense = {"variant": "dense", "budget": 0.0, **reference.dense_metrics}
    records = [r for r in records if r["variant"] != "dense"] + [dense]
    calib_config = CalibrationConfig(num_samples=args.num_samples, seq_len=args.seq_len, seed=0)
    windows, calibrations, calib_seconds = {}, {}, {}
    dense_params = block_parameter_count(get_adapter(model))
    for budget in [float(b) for b in args.budgets.split(",")]:
        for name in variants:
            source, fields, _ = VARIANTS[name]
            if source not in windows:
                t = time.perf_counter()
                windows[source] = decoder_calibration(model, tokenizer, source, calib_config)
                log.info("%s calibration windows in %.0f s", source, time.perf_counter() - t)
            pruned = copy.deepcopy(model)
            config = PruneConfig(sparsity=budget, **fields)
            t = time.perf_counter()
            key = (source, config.sensitivity_labels, config.sensitivity_samples)
            if config.mode != "one-shot":
                stat_prune_(pruned, windows[source].windows, config)
                seconds = time.perf_counter() - t
            else:  # one calibration per source serves every one-shot variant and budget
                if key not in calibrations:
                    calibrations[key] = calibrate(model, windows[source].windows, config)
                    calib_seconds[key] = time.perf_counter() - t
                    t = time.perf_counter()
                prune_from_calibration_(pruned, calibrations[key], config)
                seconds = time.perf_counter() - t + calib_seconds[key]
            metrics = evaluate_suite(pruned, tokenizer, reference)
            rec = {"variant": name, "budget": budget,
                   "removed_fraction": 1 - block_parameter_count(get_adapter(pruned)) / dense_params,
                   **metrics, "seconds_prune": seconds}
            records = [r for r in records if (r["variant"], r["budget"]) != (name, budget)] + [rec]
            out.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
            (out / "stat_ablation.md").write_text(markdown(records, meta))
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()}), flush=True)
            del pruned
    return 0


if __name__ == "__main__":
    sys.exit(main())
