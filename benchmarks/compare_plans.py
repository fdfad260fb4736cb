"""How far two plans (``plan.json`` files of the same model) agree: per layer and overall, the share
of kept heads and kept neurons they have in common (|A ∩ B| / |A ∪ B|), and whether the per-layer
counts match. Used for CPU vs GPU and float32 vs bfloat16 agreement.

    python -m benchmarks.compare_plans cpu/plan.json gpu/plan.json [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys


def agreement(a: dict, b: dict) -> dict:
    la, lb = a["layers"], b["layers"]
    if len(la) != len(lb):
        raise ValueError(f"the plans have {len(la)} and {len(lb)} layers: not the same model")
    out = {"layers": []}
    tot = {"heads": [0, 0], "neurons": [0, 0]}
    same_counts = 0
    for x, y in zip(la, lb):
        row = {"layer": x["layer"]}
        for key, name in (("kept_heads", "heads"), ("kept_neurons", "neurons")):
            sa, sb = set(x[key]), set(y[key])
            inter, union = len(sa & sb), len(sa | sb)
            tot[name][0] += inter
            tot[name][1] += union
            row[name] = (len(sa), len(sb), inter / union if union else 1.0)
        same_counts += row["heads"][0] == row["heads"][1] and row["neurons"][0] == row["neurons"][1]
        out["layers"].append(row)
    out["heads_jaccard"] = tot["heads"][0] / max(tot["heads"][1], 1)
    out["neurons_jaccard"] = tot["neurons"][0] / max(tot["neurons"][1], 1)
    out["layers_with_equal_counts"] = same_counts
    out["num_layers"] = len(la)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", default=None, help="also write the summary here")
    args = p.parse_args(argv)
    with open(args.a) as fa, open(args.b) as fb:
        res = agreement(json.load(fa), json.load(fb))
    print(f"{'layer':>5} {'heads A/B':>9} {'same':>6} {'neurons A/B':>11} {'same':>6}")
    for r in res["layers"]:
        h, n = r["heads"], r["neurons"]
        print(f"{r['layer']:5d} {h[0]:>4}/{h[1]:<4} {h[2]:6.1%} {n[0]:>5}/{n[1]:<5} {n[2]:6.1%}")
    print(f"kept heads in common {res['heads_jaccard']:.1%}, kept neurons in common {res['neurons_jaccard']:.1%}, "
          f"layers with the same counts {res['layers_with_equal_counts']}/{res['num_layers']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({k: v for k, v in res.items() if k != "layers"} | {"a": args.a, "b": args.b}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
