"""Peak memory of a whole STAT prune of SmolLM2-135M vs one plain forward pass over the same
calibration windows, with the gradient pass's memory savers on (block recomputation + chunked
cross-entropy + one window per gradient batch, the default) and as before them (every block's
activations and three full logit-sized tensors of 4 windows kept for the backward pass). Each variant runs in its own process; peak = RSS rise above
the level just before the phase (``benchmarks/cost.py``'s sampler). Writes ``results/memory.json``.

    .venv/bin/python -m benchmarks.memory [--windows 16]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "memory.json"


def child(variant: str, windows: int) -> dict:
    import copy

    import torch

    from benchmarks.cost import PeakMemory, forward_seconds
    from stat_core.calibration import statistics as calibrate
    from stat_core.adapters import get_adapter
    from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
    from stat_core.models import load_model
    from stat_core.config import PruneConfig
    from stat_core.pipeline import stat_prune_

    torch.set_num_threads(2)
    # batch-N: the default savers with another gradient-pass batch; before: this project before the
    # savers (4 windows per batch, everything kept); keep-all-activations: the savers off
    batch = int(variant.split("-")[1]) if variant.startswith("batch-") else 4 if variant == "before" else 1
    config = PruneConfig(sparsity=0.3, sensitivity_batch=batch,
                         memory_savers=variant not in ("keep-all-activations", "before"))
    model, tok = load_model("smollm2-135m")
    w = calibration_windows(tok, wikipedia_split("calibration"), CalibrationConfig(num_samples=windows, seq_len=512))
    forward_seconds(model, w[:1], 1)  # warm-up
    with PeakMemory("cpu") as fwd:
        forward_seconds(model, w, 8)
    with PeakMemory("cpu") as sens:
        t = time.perf_counter()
        calibrate.sensitivity_sums(model, get_adapter(model), w[:8], config.sensitivity_batch,
                                   memory_savers=config.memory_savers)
        sens_s = time.perf_counter() - t
    pruned = copy.deepcopy(model)
    with PeakMemory("cpu") as pr:
        result = stat_prune_(pruned, w, config)
    return {"variant": variant, "calibration_tokens": int(w.numel()), "peak_mb_forward": round(fwd.peak_mb),
            "peak_mb_sensitivity": round(sens.peak_mb), "peak_mb_prune": round(pr.peak_mb),
            "memory_ratio": pr.peak_mb / fwd.peak_mb, "seconds_sensitivity": round(sens_s, 1),
            "stages": {k: round(v, 1) for k, v in result.timings.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", type=int, default=16, help="calibration windows of 512 tokens")
    p.add_argument("--variants", default="default,before",
                   help="default (the savers on, one window per gradient batch), keep-all-activations (savers "
                        "off), batch-N (savers on, N windows per gradient batch), before (savers off, 4 windows)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("RECORD " + json.dumps(child(args.child, args.windows)), flush=True)
        return 0
    rows = []
    for variant in args.variants.split(","):
        out = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--child", variant, "--windows", str(args.windows)],
                             stdout=subprocess.PIPE, text=True, check=True).stdout
        rows.append(json.loads([ln for ln in out.splitlines() if ln.startswith("RECORD ")][-1][7:]))
    # Merged by variant: a run of some variants keeps the others' records.
    ran = {r["variant"] for r in rows}
    kept = [r for r in json.loads(RESULTS.read_text()) if r["variant"] not in ran] if RESULTS.exists() else []
    RESULTS.write_text(json.dumps(rows + kept, indent=1) + "\n")
    print(f"{'gradient pass':22} {'forward MB':>10} {'sensitivity MB':>14} {'prune MB':>9} {'prune ÷ forward':>15} "
          f"{'sensitivity s':>13}")
    for r in rows:
        print(f"{r['variant']:22} {r['peak_mb_forward']:10} {r['peak_mb_sensitivity']:14} {r['peak_mb_prune']:9} "
              f"{r['memory_ratio']:15.2f} {r['seconds_sensitivity']:13.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
