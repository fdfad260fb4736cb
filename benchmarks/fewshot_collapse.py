"""What a pruned model answers when its few-shot sentiment collapses to one label.

Three hypotheses, each with its own demonstration order over the same movie reviews (the quick
suite's 96 queries): the model copies the **last demonstration's label** (then flipping the order
flips the answer), follows the **majority label** of the demonstrations (then a 3-to-1 prompt moves
it), or gives a **fixed token** (then nothing moves it). For each order the table gives the share of
" positive" answers (label words compared), the accuracy, and how often the model's top token over
the whole vocabulary is a label word at all.

    .venv/bin/python -m benchmarks.fewshot_collapse --budgets 0.2,0.3 [--variants base,prior]

Uses the calibration and dense reference cached by ``benchmarks.stat_experiments`` (run it first).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections import Counter

import torch

from benchmarks._common import RESULTS, machine_note
from benchmarks.stat_experiments import cache_folder, load_cache, stat_settings

ORDERS = {"neg,pos,neg,pos (suite)": (0, 1, 0, 1), "pos,neg,pos,neg": (1, 0, 1, 0),
          "neg,neg,neg,pos": (0, 0, 0, 1), "pos,pos,pos,neg": (1, 1, 1, 0)}


def prompts_for(order, data, queries):
    from stat_core.evaluation.perplexity import (
        FEWSHOT_INSTRUCTION,
        FEWSHOT_LABEL_WORDS,
        FEWSHOT_TEMPLATE,
    )

    pools = {0: [i for i, y in enumerate(data.labels) if y == 0], 1: [i for i, y in enumerate(data.labels) if y == 1]}
    used, shots = set(), []
    for label in order:
        i = next(j for j in pools[label] if j not in used)
        used.add(i)
        shots.append(FEWSHOT_TEMPLATE.format(text=data.texts[i]) + FEWSHOT_LABEL_WORDS[label] + "\n\n")
    prefix = FEWSHOT_INSTRUCTION + "".join(shots)
    rest = [j for j in queries if j not in used]
    return [prefix + FEWSHOT_TEMPLATE.format(text=data.texts[j]) for j in rest], [data.labels[j] for j in rest]


@torch.no_grad()
def answers(model, tokenizer, prompts, label_ids):
    out = []
    for p in prompts:
        ids = torch.tensor([tokenizer(p).input_ids])
        logits = model(input_ids=ids, use_cache=False, logits_to_keep=1).logits[0, -1]
        out.append((float(logits[label_ids[1]] - logits[label_ids[0]]), int(logits.argmax())))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--budgets", default="0.2,0.3")
    p.add_argument("--variants", default="base")
    p.add_argument("--queries", type=int, default=48)
    p.add_argument("--model", default="smollm2-135m")
    args = p.parse_args(argv)
    from stat_core.data.labelled import movie_reviews
    from stat_core.data.mix import decoder_calibration
    from stat_core.data.sources import CalibrationConfig
    from stat_core.evaluation.perplexity import FEWSHOT_LABEL_WORDS
    from stat_core.evaluation.suite import SuiteConfig
    from stat_core.models import load_model
    from stat_core.pipeline import PruneConfig, prune_from_calibration_

    model, tokenizer = load_model(args.model)
    windows = decoder_calibration(model, tokenizer, "wikipedia",
                                  CalibrationConfig(num_samples=64, seq_len=512, seed=0)).windows
    cached = load_cache(cache_folder(model, windows, SuiteConfig.quick()), model)
    if cached is None:
        raise SystemExit("run benchmarks.stat_experiments first: it caches the calibration this reads")
    calibration, _ = cached
    data = movie_reviews()
    queries = list(range(8, len(data.texts), max(1, (len(data.texts) - 8) // args.queries)))[:args.queries]
    label_ids = [tokenizer(w, add_special_tokens=False).input_ids[0] for w in FEWSHOT_LABEL_WORDS]
    from stat_core.methods.stat.induction import induction_scores

    scores = induction_scores(model)
    ranked = sorted(((s, layer, head) for layer, row in enumerate(scores) for head, s in enumerate(row)), reverse=True)
    models, lost = {"dense": model}, {}
    for budget in [float(b) for b in args.budgets.split(",")]:
        for variant in args.variants.split(","):
            pruned = copy.deepcopy(model)
            result = prune_from_calibration_(pruned, calibration,
                                             PruneConfig(sparsity=budget, settings=stat_settings(variant)), data=windows)
            name = f"{variant} {budget:.0%}"
            models[name] = pruned
            kept = {(lp.layer, h) for lp in result.plan.layers for h in lp.kept_heads}
            lost[name] = [f"L{layer}h{head} ({s:.2f})" for s, layer, head in ranked[:12] if (layer, head) not in kept]
            print(name, "removes of the 12 strongest induction heads:", lost[name], flush=True)
    rows = []
    for name, m in models.items():
        for order_name, order in ORDERS.items():
            prompts, labels = prompts_for(order, data, queries)
            got = answers(m, tokenizer, prompts, label_ids)
            positive = [lo > 0 for lo, _ in got]
            top = Counter(tokenizer.decode([t]) for _, t in got)
            rows.append({"model": name, "order": order_name, "positive_share": sum(positive) / len(got),
                         "accuracy": sum(int(pos) == y for pos, y in zip(positive, labels)) / len(got),
                         "top_is_label": sum(t in label_ids for _, t in got) / len(got),
                         "top_tokens": top.most_common(3)})
            print(json.dumps(rows[-1]), flush=True)
    lines = ["# What a collapsed few-shot model answers", "", f"{machine_note()}; {args.model}, {len(queries)} "
             "movie-review queries per order, calibration cached by benchmarks.stat_experiments", "",
             "| model | demonstrations | share ' positive' | accuracy | top token is a label word | commonest top tokens |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        tops = ", ".join(f"{t!r} ×{n}" for t, n in r["top_tokens"])
        lines.append(f"| {r['model']} | {r['order']} | {r['positive_share']:.0%} | {r['accuracy']:.0%} | "
                     f"{r['top_is_label']:.0%} | {tops} |")
    lines += ["", "The 12 strongest induction heads of the dense model (prefix-matching score): "
              + ", ".join(f"L{layer}h{head} ({s:.2f})" for s, layer, head in ranked[:12]) + ".", "",
              "| model | of those, removed |", "|---|---|"]
    lines += [f"| {name} | {', '.join(heads) or 'none'} |" for name, heads in lost.items()]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "fewshot_collapse.json").write_text(json.dumps({"machine": machine_note(), "rows": rows,
                                                               "induction_top12": ranked[:12], "removed": lost},
                                                              indent=1))
    (RESULTS / "fewshot_collapse.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
