"""Peak memory of a whole STAT prune of SmolLM2-135M vs one plain forward pass over the same
calibration windows, with the gradient pass's memory savers on (block recomputation + chunked
cross-entropy + one window per gradient batch, the default) and as before them (every block's
activations and three full logit-sized tensors of 4 windows kept for the backward pass). Each variant runs in its own process; peak = RSS rise above
the level just before the phase (``benchmarks/cost.py``'s sampler). Writes ``results/memory.json``.

    .venv/bin/python -m benchmarks.memory [--windows 16]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "memory.json"


def child(variant: str, windows: int) -> dict:
    import copy

    import torch
    from torch import nn

    from benchmarks.cost import PeakMemory, forward_seconds
    from stat_core.calibration import statistics as calibrate
    from stat_core.adapters import get_adapter
    from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
    from stat_core.models import load_model
    from stat_core.config import PruneConfig
    from stat_core.prune import stat_prune_

    torch.set_num_threads(2)
    if variant.startswith("batch-"):  # the default savers with another gradient-pass batch
        import stat_core.prune as core_prune

        core_prune.SENSITIVITY_BATCH = int(variant.split("-")[1])
    if variant == "before":  # this project before the savers: 4 windows per batch, everything kept
        import stat_core.prune as core_prune

        core_prune.SENSITIVITY_BATCH = 4
    if variant in ("keep-all-activations", "before"):
        calibrate.recomputed_blocks = lambda layers: contextlib.nullcontext()
        calibrate.chunked_cross_entropy = lambda x, y: nn.functional.cross_entropy(
            x.float(), y, reduction="sum", ignore_index=-100)
    model, tok = load_model("smollm2-135m")
    w = calibration_windows(tok, wikipedia_split("calibration"), CalibrationConfig(num_samples=windows, seq_len=512))
    forward_seconds(model, w[:1], 1)  # warm-up
    with PeakMemory("cpu") as fwd:
        forward_seconds(model, w, 8)
    with PeakMemory("cpu") as sens:
        t = time.perf_counter()
        import stat_core.prune as core_prune

        calibrate.sensitivity_sums(model, get_adapter(model), w[:8], core_prune.SENSITIVITY_BATCH)
        sens_s = time.perf_counter() - t
    pruned = copy.deepcopy(model)
    with PeakMemory("cpu") as pr:
        result = stat_prune_(pruned, w, PruneConfig(sparsity=0.3))
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
