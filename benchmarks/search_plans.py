"""STAT's budget search with many candidates, for a machine with a GPU: saves the plans it finds.

One candidate of the search (:mod:`stat_core.methods.stat.search`) is a forward pass over its fitness
windows plus the re-cut of the layers that changed. On the 2-core CPU box that is ~25 s, so a search
of the size the papers use (hundreds of candidates) runs here on a GPU, and the plans it returns are
then measured on the quick suite on the CPU box with the same calibration protocol
(``benchmarks.stat_experiments settings --variants plan:FILE``; the corrections are re-fitted there
from that box's own statistics, so only the kept heads and neurons travel).

    python3 -m benchmarks.search_plans --device cuda --budgets 0.2,0.3 --candidates 400 --out plans/

Calibration: the protocol of ``benchmarks.stat_experiments`` (64 × 512 Wikipedia windows, seed 0).
Writes ``plan_<budget>_search<N>.json`` (a :class:`PrunePlan`) and ``search_summary.json`` (per
budget: the search's start and best KL, candidates accepted, seconds, the fitness after each
generation, and the calibration's seconds) after every search, so a run cut short keeps what it found.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default="auto")
    p.add_argument("--budgets", default="0.2,0.3")
    p.add_argument("--candidates", default="400", help="one count, or one per budget (comma-separated)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--runs", default=None,
                   help="instead of --budgets/--seed: searches as BUDGET[:FITNESS[:SEED]], comma-separated, in order "
                        "(FITNESS: wikipedia, the calibration windows, or in-context, the in-context source's "
                        "windows; e.g. 0.2:in-context:0,0.2:wikipedia:1)")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds from the start: a probe of 16 candidates times one candidate, and each search "
                        "gets at most the candidates that fit before the deadline (the plans found so far are kept)")
    p.add_argument("--search-windows", type=int, default=None, help="fitness windows (default: STAT's)")
    p.add_argument("--search-tokens", type=int, default=None, help="tokens of each fitness window (default: STAT's)")
    p.add_argument("--out", default="search_plans")
    args = p.parse_args(argv)

    import stat_core.pipeline as P
    from stat_core.data.mix import decoder_calibration
    from stat_core.data.sources import CalibrationConfig
    from stat_core.methods.stat.method import StatSettings
    from stat_core.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # STAT's settings with the fitness size asked for; each search sets its candidates and seed on them
    shape = StatSettings(**{k: v for k, v in (("search_windows", args.search_windows),
                                              ("search_tokens", args.search_tokens)) if v is not None})
    if args.runs:  # BUDGET[:FITNESS[:SEED]], the missing parts from the defaults
        runs = []
        for spec in args.runs.split(","):
            parts = spec.split(":")
            runs.append((float(parts[0]), parts[1] if len(parts) > 1 else "wikipedia",
                         int(parts[2]) if len(parts) > 2 else args.seed))
    else:
        runs = [(float(b), "wikipedia", args.seed) for b in args.budgets.split(",")]
    if any(f not in ("wikipedia", "in-context") for _, f, _ in runs):
        raise SystemExit("a run's fitness is wikipedia or in-context")
    budgets = [b for b, _, _ in runs]
    counts = [int(c) for c in args.candidates.split(",")]
    counts = counts * len(budgets) if len(counts) == 1 else counts
    if len(counts) != len(budgets):
        raise SystemExit("--candidates takes one count or one per budget (or run)")

    began = t = time.perf_counter()
    model, tokenizer = load_model(args.model, device=None if args.device == "auto" else args.device)
    seconds_load = time.perf_counter() - t
    windows = decoder_calibration(model, tokenizer, "wikipedia",
                                  CalibrationConfig(num_samples=64, seq_len=512, seed=0)).windows
    fitness = {"wikipedia": windows}
    if any(f == "in-context" for _, f, _ in runs):  # demonstrations + Wikipedia, never the suite's prompts
        fitness["in-context"] = decoder_calibration(
            model, tokenizer, "in-context",
            CalibrationConfig(num_samples=shape.search_windows, seq_len=max(512, shape.search_tokens), seed=1)).windows
    t = time.perf_counter()
    calibration = P.calibrate(model, windows, P.PruneConfig(sparsity=0.2))
    seconds_calibration = time.perf_counter() - t
    device = str(next(model.parameters()).device)
    summary = {"model": args.model, "device": device,
               "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None,
               "torch": torch.__version__, "seconds_load": seconds_load,
               "seconds_calibration": seconds_calibration,
               "fitness": f"{shape.search_windows} × {shape.search_tokens} tokens",
               "seed": args.seed, "runs": []}
    print(json.dumps({k: v for k, v in summary.items() if k != "runs"}), flush=True)
    per_candidate = None
    if args.deadline is not None:  # a short probe sizes the searches to the time left
        probe_config = P.PruneConfig(sparsity=budgets[0], settings=dataclasses.replace(shape, search=16))
        probe = P.prune_from_calibration_(copy.deepcopy(model), calibration, probe_config,
                                          data=windows).plan.budget["search"]
        per_candidate = probe["seconds"] / 16
        summary["probe"] = probe
        print(json.dumps({"probe_seconds_per_candidate": per_candidate}), flush=True)
    for (budget, source, seed), n in zip(runs, counts):
        if per_candidate is not None:
            left = args.deadline - (time.perf_counter() - began)
            n = min(n, int(0.85 * left / per_candidate) // 8 * 8)
            if n < 16:
                print(f"deadline: no time left for the search at {budget:g}", flush=True)
                break
        pruned, t = copy.deepcopy(model), time.perf_counter()
        result = P.prune_from_calibration_(pruned, calibration,
                                           P.PruneConfig(sparsity=budget,
                                                         settings=dataclasses.replace(shape, search=n,
                                                                                      search_seed=seed)),
                                           data=fitness[source])
        seconds = time.perf_counter() - t
        name = (f"plan_{budget:g}_search{n}" + ("" if source == "wikipedia" else f"_fit-{source}")
                + ("" if seed == 0 else f"_seed{seed}") + ".json")
        result.plan.to_json(out / name)
        run = {"budget": budget, "candidates": n, "fitness_source": source, "seed": seed, "plan": name,
               "seconds_prune": seconds,
               **result.plan.budget["search"]}
        summary["runs"].append(run)
        (out / "search_summary.json").write_text(json.dumps(summary, indent=1))
        print(json.dumps(run), flush=True)
        del pruned
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
