"""A real model pruned streamed (``--offload``: one block in memory at a time) and in memory, side by
side: the same plan and weights, and each run's peak resident memory.

Each run is its own process (peak RSS = ``ru_maxrss`` of that process: loading, calibration, planning,
surgery and export together). The streamed run writes its export; the in-memory run prunes the same
model on the same windows with the same settings and compares its kept units and every tensor with
the streamed export. STAT runs without the gradient pass in both (streaming weights its damages by
residual energy, see docs/scaling.md), so the two must agree.

    .venv/bin/python -m benchmarks.offload_real --model qwen2.5-coder-1.5b --methods flap,stat --budget 0.2

Writes ``benchmarks/results/offload_real.json`` (one record per model × method, appended).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks._common import RESULTS, machine_note

OUT = RESULTS / "offload_real.json"


def _windows(model_name: str, n: int, seq_len: int):
    from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
    from stat_core.models import load_tokenizer_only

    tok = load_tokenizer_only(model_name)
    return calibration_windows(tok, wikipedia_split("calibration"), CalibrationConfig(num_samples=n, seq_len=seq_len))


def _peak_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def child(mode: str, model_name: str, method: str, budget: float, n: int, seq_len: int, out: str) -> dict:
    import torch

    from stat_core.config import PruneConfig
    from stat_core.models import resolve_model_path

    torch.set_num_threads(2)
    windows = _windows(model_name, n, seq_len)
    config = PruneConfig(sparsity=budget, method=method, sensitivity_samples=0, batch_size=4)
    src = resolve_model_path(model_name)
    t = time.perf_counter()
    if mode == "streamed":
        from stat_core.streaming import streamed_prune

        result = streamed_prune(src, windows, config, Path(out))
        return {"seconds": time.perf_counter() - t, "peak_rss_mb": _peak_mb(), "plan": result.plan.to_dict()}
    from safetensors import safe_open

    from stat_core.models import load_model
    from stat_core.pipeline import stat_prune_

    model, _ = load_model(model_name)
    result = stat_prune_(model, windows, config, model_name=model_name)
    seconds = time.perf_counter() - t
    streamed_plan = json.loads((Path(out) / "plan.json").read_text())
    same_units = all(a[k] == b[k] for a, b in zip(result.plan.to_dict()["layers"], streamed_plan["layers"])
                     for k in ("kept_heads", "kept_kv_heads", "kept_neurons"))
    state = model.state_dict()
    worst, compared, missing = 0.0, 0, []
    for file in sorted(Path(out).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                if key not in state:
                    missing.append(key)
                    continue
                a, b = f.get_tensor(key).float(), state[key].float()
                if a.shape != b.shape:
                    missing.append(f"{key} (shape {tuple(a.shape)} vs {tuple(b.shape)})")
                    continue
                worst = max(worst, float((a - b).abs().max()) / max(float(b.abs().max()), 1e-12))
                compared += 1
    return {"seconds": seconds, "peak_rss_mb": _peak_mb(), "same_kept_units": same_units,
            "tensors_compared": compared, "tensors_not_matched": missing[:10],
            "max_relative_weight_difference": worst}


def in_memory_estimate(model_name: str) -> str:
    """Why an in-memory prune does not fit: float32 weights plus every block's float64 Gram statistics."""
    import json as _json

    from stat_core.models import resolve_model_path

    cfg = _json.loads((Path(resolve_model_path(model_name)) / "config.json").read_text())
    d, ff, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads_dim = cfg["num_attention_heads"] * cfg.get("head_dim", d // cfg["num_attention_heads"])
    grams = layers * (ff * ff + heads_dim * heads_dim) * 8 / 2**30
    weights = sum(f.stat().st_size for f in Path(resolve_model_path(model_name)).glob("*.safetensors")) / 2**30
    return (f"not run: the in-memory prune holds {weights:.1f} GiB of float32 weights plus {grams:.1f} GiB of "
            f"float64 Gram statistics (every block's), more than this machine's memory")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="qwen2.5-coder-1.5b")
    p.add_argument("--methods", default="flap,stat")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--streamed-only", action="store_true",
                   help="skip the in-memory run (a model whose statistics do not fit in memory: the record says so)")
    p.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        mode, model, method, budget, n, seq_len, out = args.child
        print(json.dumps(child(mode, model, method, float(budget), int(n), int(seq_len), out)))
        return 0
    from stat_core.models import prepare_demo_model

    prepare_demo_model(args.model)
    records = json.loads(OUT.read_text())["records"] if OUT.exists() else []
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory(prefix="offload-real-") as tmp:
            out = str(Path(tmp) / "streamed")
            runs = {}
            for mode in ("streamed",) if args.streamed_only else ("streamed", "in-memory"):
                cmd = [sys.executable, "-m", "benchmarks.offload_real", "--child", mode, args.model, method,
                       str(args.budget), str(args.num_samples), str(args.seq_len), out]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{mode} {method} failed:\n{proc.stderr[-3000:]}")
                runs[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{method} {mode}: {runs[mode]['seconds']:.0f} s, peak RSS {runs[mode]['peak_rss_mb']:,.0f} MB",
                      flush=True)
        record = {"model": args.model, "method": method, "budget": args.budget,
                  "calibration": f"{args.num_samples} × {args.seq_len} Wikipedia tokens, seed 0, no gradient pass",
                  "streamed": {k: v for k, v in runs["streamed"].items() if k != "plan"},
                  "in_memory": runs.get("in-memory", {"skipped": in_memory_estimate(args.model)}),
                  "machine": machine_note()}
        if "in-memory" in runs:
            record["peak_rss_ratio"] = runs["streamed"]["peak_rss_mb"] / runs["in-memory"]["peak_rss_mb"]
        records = [r for r in records if (r["model"], r["method"], r["budget"]) != (args.model, method, args.budget)]
        records.append(record)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        OUT.write_text(json.dumps({"records": records}, indent=1))
        print(json.dumps({k: v for k, v in record.items() if k != "machine"}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
