"""Hypotheses about STAT's allocation, measured on the evaluation suite without changing the library.

These experiments ask whether head removal, specific layers or the allocator drive the few-shot loss and
what else could close the gap to dense. Each experiment here changes one thing *around* the library
(a re-weighting of the allocator's damage, a re-calibration between stages, another shrinkage of
the loss-sensitivity matrix) over one cached calibration of the protocol's 64 × 512 Wikipedia
windows, and measures the quick suite against the same dense reference as
``benchmarks/stat_ablation.py``. Nothing here became a default; the README says why.

    .venv/bin/python -m benchmarks.stat_experiments alloc  --budgets 0.2,0.3 --variants base,attn:3,cap:2
    .venv/bin/python -m benchmarks.stat_experiments stages --budgets 0.2,0.3      # 10% first, then each
    .venv/bin/python -m benchmarks.stat_experiments shrink --budgets 0.2,0.3 --variants 0.01,0.5,0.9
    .venv/bin/python -m benchmarks.stat_experiments mix --budgets 0.2,0.3 --variants 0.125,0.25
    .venv/bin/python -m benchmarks.stat_experiments settings --budgets 0.2,0.3 --variants prior,search:96,search:96+prior
    .venv/bin/python -m benchmarks.stat_experiments source --budgets 0.2,0.3 --variants in-context
    .venv/bin/python -m benchmarks.stat_experiments split --budgets 0.2,0.3 --variants mix-fisher/wikipedia

Allocation variants (``alloc``): ``base`` (the library's), ``attn:G`` (attention options' damage × G),
``cap:C`` (no block loses more than C × the target of its cost), ``depth:A`` (layer l's damage ×
1 + A·(L−1−l)/(L−1): early layers protected), ``late:A`` (× 1 + A·l/(L−1): late layers protected),
``keep-last:K`` (the last K layers not pruned at all, as LLM-Pruner skips the last layers).
``stages``: prune the first budget from the dense calibration, then re-calibrate the pruned model
(gradient pass, statistics, decompositions) before each next budget. ``shrink``: the loss-sensitivity matrix shrunk as ``(1−λ)F + λ·tr(F)/d·I``
(the library uses λ = 0.1) before the decompositions. ``mix``: the ``mix`` calibration source with
another share of self-generated chat windows than the library's half (its own calibration; the
generated text comes from the cache of ``stat_core.data.mix``). ``source``: another built-in calibration
source (e.g. ``in-context``: few-shot demonstrations written from the Wikipedia calibration articles,
half and half with prose), its own calibration, the library's defaults otherwise. ``split``: the units
selected (analyses, allocation, plan) on one calibration and the corrections fitted on another's
statistics, ``SELECT/CORRECT`` with each of ``wikipedia``, ``mix``, ``mix-fisher`` (``mix`` with the
model-label sensitivity; for selection only), ``in-context``, or two joined with ``+`` for CORRECT
(their statistics summed), each optionally ``:sN`` (windows of seed N); SELECT may be ``GRAMS@SENSITIVITY`` (one calibration's statistics with another's
loss sensitivity, e.g. ``wikipedia@mix-fisher``; GRAMS may join texts with ``+``) and ``UNITS#COUNTS`` (each layer's head and neuron
counts allocated on COUNTS, the units at those counts chosen on UNITS). ``settings``: STAT's own options
(``StatSettings``) over the same cached calibration: ``prior`` (the output prior bias), ``search:N`` (a
budget search of N candidates on the KL to dense), ``protect:N`` (the N strongest induction heads kept),
``plan:FILE`` (a saved plan's heads and neurons, e.g. from ``benchmarks.search_plans`` on a GPU, cut
with this box's corrections; run at the plan's own budget only), joined with ``+``. The first run caches the calibration and the
dense reference in the project's cache dir (``--cache``; about 1 GB, safetensors + JSON, one folder per model,
windows and suite config: nothing is unpickled).
"""

from __future__ import annotations

import argparse
import copy
import gzip
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import stat_core.pipeline as P
from benchmarks._common import RESULTS, machine_note
from stat_core.adapters import get_adapter
from stat_core.methods.registry import get_method
from stat_core.methods.stat import analysis as A
from stat_core.surgery.budget import allocate, block_parameter_count
from stat_core.surgery.plan import PrunePlan

FIELDS = ("perplexity", "kl_to_dense", "fewshot_accuracy", "fewshot_bias_free", "fewshot_majority_share",
          "analogy_accuracy", "instruction_agreement", "instruction_kl")


CACHE_VERSION = "1"


def cache_folder(model, windows, suite_config, root: Path | None = None) -> Path:
    """The cache of one (model, calibration windows, suite config): ``root`` (default: the project's
    cache dir) / ``experiments`` / a fingerprint of the three, so another model's or another text's
    statistics are never reused."""
    from stat_core.data.mix import model_fingerprint
    from stat_core.data.sources import fingerprint
    from stat_core.paths import cache_dir

    key = fingerprint(model_fingerprint(model), windows, repr(suite_config), CACHE_VERSION)
    return (Path(root) if root is not None else cache_dir() / "experiments") / key


def save_cache(folder: Path, calibration, reference) -> Path:
    """The dense statistics and sensitivities (``stat_core.calibrate.save_stats``) and the dense
    reference (its tensors in safetensors, everything else in JSON); nothing is pickled. Written in
    a temporary sibling folder renamed into place."""
    import dataclasses
    import os
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from stat_core.calibration.statistics import SensitivitySums, save_stats

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        sens = None if calibration.sensitivity is None else SensitivitySums(list(calibration.sensitivity), 1)
        save_stats(tmp / "statistics.safetensors", calibration.dense_stats, sens)
        tensors, plain = {}, {}
        for f in dataclasses.fields(reference):
            value = getattr(reference, f.name)
            if isinstance(value, torch.Tensor):
                tensors[f.name] = value.contiguous()
            elif isinstance(value, list) and value and isinstance(value[0], torch.Tensor):
                tensors.update({f"{f.name}.{i}": t.contiguous() for i, t in enumerate(value)})
                plain[f.name] = {"tensors": len(value)}
            elif dataclasses.is_dataclass(value):
                plain[f.name] = dataclasses.asdict(value)
            elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
                plain[f.name] = [dataclasses.asdict(v) for v in value]
            else:
                plain[f.name] = value
        save_file(tensors, str(tmp / "reference.safetensors"))
        (tmp / "reference.json").write_text(json.dumps({"version": CACHE_VERSION, "fields": plain}))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load_cache(folder: Path, model):
    """``(calibration, reference)`` from :func:`save_cache`'s folder, or None if there is none or it is
    of another version; the per-layer analyses are recomputed from the statistics (deterministic)."""
    from safetensors.torch import load_file

    from stat_core.calibration.statistics import load_stats
    from stat_core.evaluation.suite import AnalogyQuestion, DenseReference, SuiteConfig

    folder = Path(folder)
    if not (folder / "reference.json").is_file():
        return None
    meta = json.loads((folder / "reference.json").read_text())
    if meta.get("version") != CACHE_VERSION:
        return None
    stats, sens = load_stats(folder / "statistics.safetensors")
    fisher = None if sens is None else sens.normalised()
    adapter = get_adapter(model)
    analyses = [A.analyse_layer(adapter, i, st, None if fisher is None else fisher[i], False)
                for i, st in enumerate(stats)]
    calibration = P.Calibration(dense_stats=stats, sensitivity=fisher, analyses=analyses)
    tensors = load_file(str(folder / "reference.safetensors"))
    fields = dict(meta["fields"])
    for name, value in list(fields.items()):
        if isinstance(value, dict) and set(value) == {"tensors"}:
            fields[name] = [tensors[f"{name}.{i}"] for i in range(value["tensors"])]
    fields.update({k: v for k, v in tensors.items() if "." not in k})
    fields["config"] = SuiteConfig(**fields["config"])
    if fields.get("fewshot_label_ids") is not None:
        fields["fewshot_label_ids"] = tuple(fields["fewshot_label_ids"])
    for name in ("analogy_spans", "instruction_spans"):
        if fields.get(name) is not None:
            fields[name] = [tuple(x) for x in fields[name]]
    if fields.get("analogy_questions") is not None:
        fields["analogy_questions"] = [AnalogyQuestion(q["category"], tuple(q["words"]),
                                                       tuple(tuple(e) for e in q["examples"]))
                                       for q in fields["analogy_questions"]]
    return calibration, DenseReference(**fields)


def reweighted(blocks, variant: str, config):
    """STAT's per-block options (``build_block_options``) with their damage re-weighted by ``variant``."""
    kind, _, arg = variant.partition(":")
    if kind not in ("attn", "cap", "depth", "late", "keep-last"):
        raise SystemExit(f"unknown allocation variant {variant!r}: base, attn:G, cap:C, depth:A, late:A or keep-last:K")
    value = float(arg)
    n_layers = len(blocks) // 2
    for i, b in enumerate(blocks):
        layer, attention = i // 2, i % 2 == 0
        if kind == "attn" and attention:
            b.damage = b.damage * value
        elif kind == "cap":
            full = b.cost.max()
            b.damage = np.where(full - b.cost > value * config.sparsity * full + 1e-9, np.inf, b.damage)
        elif kind == "depth":
            b.damage = b.damage * (1 + value * (n_layers - 1 - layer) / max(n_layers - 1, 1))
        elif kind == "late":
            b.damage = b.damage * (1 + value * layer / max(n_layers - 1, 1))
        elif kind == "keep-last" and layer >= n_layers - value:
            b.damage = np.where(b.cost < b.cost.max(), np.inf, b.damage)
    return blocks


def shrunk_analyses(adapter, calibration, lam: float):
    """The per-layer analyses with the sensitivity matrix shrunk by ``lam`` instead of the library's 0.1."""
    return [A.analyse_layer(adapter, i, s, calibration.sensitivity[i], False, shrinkage=lam)
            for i, s in enumerate(calibration.dense_stats)]


def stat_settings(variant: str):
    """``StatSettings`` from ``prior``, ``search:N``, ``protect:N`` (the N strongest induction heads kept),
    joined with ``+`` (``base``: the defaults)."""
    from stat_core.methods.stat.method import StatSettings

    given = {}
    for part in filter(None, variant.split("+")):
        kind, _, arg = part.partition(":")
        if kind == "prior":
            given["output_prior"] = True
        elif kind == "search":
            given["search"] = int(arg)
        elif kind == "protect":
            given["protect_induction"] = int(arg)
        elif kind != "base":
            raise SystemExit(f"unknown settings variant {part!r}: base, prior, search:N, protect:N (joined with +)")
    return StatSettings(**given)


def markdown(records: list[dict], meta: dict) -> str:
    lines = ["# STAT experiments on the evaluation suite (not defaults)", "", f"Protocol: {meta['protocol']}", "",
             "| experiment | variant | budget | " + " | ".join(FIELDS) + " | heads kept | neurons kept | seconds |",
             "|" + "---|" * (len(FIELDS) + 6)]
    for r in sorted(records, key=lambda r: (r["experiment"], r["budget"], r["variant"])):
        cells = [f"{r[f]:.4g}" if isinstance(r.get(f), float) else "–" for f in FIELDS]
        lines.append(f"| {r['experiment']} | {r['variant']} | {r['budget']:.0%} | " + " | ".join(cells)
                     + f" | {r.get('heads', '–')} | {r.get('neurons', '–')} | {r.get('seconds', 0):.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("experiment", choices=("alloc", "stages", "shrink", "mix", "settings", "source", "split"))
    p.add_argument("--budgets", default="0.2,0.3")
    p.add_argument("--variants", default="", help="alloc: base,attn:3,...; shrink: lambdas; stages: first budget "
                                                  "(default 0.1)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--cache", default=None,
                   help="folder for the cached calibration and dense reference (default: the project's cache dir); "
                        "one sub-folder per model, windows and suite config")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    from stat_core.data.mix import decoder_calibration
    from stat_core.data.sources import CalibrationConfig
    from stat_core.evaluation.suite import SuiteConfig, build_reference, evaluate_suite
    from stat_core.models import load_model

    model, tokenizer = load_model(args.model)
    adapter = get_adapter(model)
    dense_params = block_parameter_count(adapter)
    windows = decoder_calibration(model, tokenizer, "wikipedia",
                                  CalibrationConfig(num_samples=64, seq_len=512, seed=0)).windows
    cache = cache_folder(model, windows, SuiteConfig.quick(), args.cache)
    cached = load_cache(cache, model)  # safetensors + JSON keyed by model and data: nothing is unpickled
    if cached is not None:
        calibration, reference = cached
    else:
        reference = build_reference(model, tokenizer, SuiteConfig.quick())
        calibration = P.calibrate(model, windows, P.PruneConfig(sparsity=0.2))
        save_cache(cache, calibration, reference)
    out = Path(args.out_dir)
    path = out / "stat_experiments.json"
    records = json.loads(path.read_text())["records"] if path.exists() else []
    meta = {"machine": machine_note(), "protocol": f"{args.model}, 64 × 512 Wikipedia calibration windows (seed 0), "
                                                   "quick suite, one cached calibration"}

    def measure(experiment, variant, budget, pruned, seconds, plan=None, extra=None):
        nonlocal records
        metrics = evaluate_suite(pruned, tokenizer, reference)
        rec = {"experiment": experiment, "variant": variant, "budget": budget,
               "removed_fraction": 1 - block_parameter_count(get_adapter(pruned)) / dense_params,
               **metrics, "seconds": seconds, **(extra or {})}
        if plan is not None:
            rec["heads"] = sum(len(lp.kept_heads) for lp in plan.layers)
            rec["neurons"] = sum(len(lp.kept_neurons) for lp in plan.layers)
            rec["neurons_per_layer"] = [len(lp.kept_neurons) for lp in plan.layers]
        records = [r for r in records if (r["experiment"], r["variant"], r["budget"]) != (experiment, variant, budget)]
        records.append(rec)
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "records": records}, indent=1))
        (out / "stat_experiments.md").write_text(markdown(records, meta))
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                          if k != "neurons_per_layer"}), flush=True)

    budgets = [float(b) for b in args.budgets.split(",")]
    if args.experiment == "alloc":
        for budget in budgets:
            for variant in (args.variants or "base").split(","):
                config = P.PruneConfig(sparsity=budget)
                pruned, t = copy.deepcopy(model), time.perf_counter()
                if variant == "base":
                    plan = P.prune_from_calibration_(pruned, calibration, config).plan
                else:  # STAT's own steps (options, allocation, plan, cut) with the options' damage re-weighted
                    analyses = A.analyses_for(calibration, adapter, config.intercept)
                    blocks = reweighted(A.build_block_options(adapter, analyses, config), variant, config)
                    plan = A.plan_from_choice(adapter, analyses, blocks, allocate(blocks, budget), config, args.model, {})
                    plan.method, plan.correction = "stat", A.stat_correction(config)
                    P.apply_plan_(pruned, plan, calibration.dense_stats)
                measure("alloc", variant, budget, pruned, time.perf_counter() - t, plan)
    elif args.experiment == "settings":
        for budget in budgets:
            for variant in (args.variants or "prior").split(","):
                parts = variant.split("+")
                plan_file = next((part.partition(":")[2] for part in parts if part.startswith("plan:")), None)
                settings = stat_settings("+".join(part for part in parts if not part.startswith("plan:")))
                config = P.PruneConfig(sparsity=budget, settings=settings)
                pruned, t = copy.deepcopy(model), time.perf_counter()
                if plan_file is None:
                    result = P.prune_from_calibration_(pruned, calibration, config, data=windows)
                    plan, info = result.plan, result.info
                else:  # a saved plan (e.g. a long search on a GPU): its heads and neurons, this box's corrections
                    raw = Path(plan_file).read_bytes()
                    plan = PrunePlan.from_json((gzip.decompress(raw) if plan_file.endswith(".gz") else raw).decode())
                    if abs(plan.budget["target"] - budget) > 1e-9:
                        continue
                    P.plan_pruning(model, calibration, config, data=windows)  # the output prior's dense average
                    P.apply_plan_(pruned, plan, calibration.dense_stats)
                    info = get_method("stat").finish_(pruned, calibration, config)
                    variant = "+".join([f"plan:{Path(plan_file).name.split('.json')[0]}", *[q for q in parts if not q.startswith("plan:")]])
                measure("settings", variant, budget, pruned, time.perf_counter() - t, plan,
                        {"search": plan.budget.get("search"), **info})
    elif args.experiment == "shrink":
        for lam in (args.variants or "0.5").split(","):
            shrunk = copy.copy(calibration)
            shrunk.analyses = shrunk_analyses(adapter, calibration, float(lam))
            for budget in budgets:
                pruned, t = copy.deepcopy(model), time.perf_counter()
                result = P.prune_from_calibration_(pruned, shrunk, P.PruneConfig(sparsity=budget))
                measure("shrink", f"lambda={lam}", budget, pruned, time.perf_counter() - t, result.plan)
    elif args.experiment == "mix":
        for share in (args.variants or "0.25").split(","):
            mixed = decoder_calibration(model, tokenizer, "mix", CalibrationConfig(num_samples=64, seq_len=512, seed=0),
                                        self_share=float(share)).windows
            t = time.perf_counter()
            own = P.calibrate(model, mixed, P.PruneConfig(sparsity=0.2))
            seconds = time.perf_counter() - t
            for budget in budgets:
                pruned, t = copy.deepcopy(model), time.perf_counter()
                result = P.prune_from_calibration_(pruned, own, P.PruneConfig(sparsity=budget))
                measure("mix", f"self share {share}", budget, pruned, seconds + time.perf_counter() - t, result.plan)
    elif args.experiment == "source":  # another built-in calibration source, its own calibration
        from stat_core.data.in_context import in_context_calibration

        for source in (args.variants or "in-context").split(","):
            source, _, extra = source.partition("+")  # in-context+prior: with STAT's settings (here fitted on it)
            name, _, share = source.partition(":")  # in-context:0.25 — that share of demonstration windows
            config = CalibrationConfig(num_samples=64, seq_len=512, seed=0)
            own_windows = in_context_calibration(tokenizer, config, float(share))[0] if share else \
                decoder_calibration(model, tokenizer, name, config).windows
            t = time.perf_counter()
            own = P.calibrate(model, own_windows, P.PruneConfig(sparsity=0.2))
            seconds = time.perf_counter() - t
            for budget in budgets:
                pruned, t = copy.deepcopy(model), time.perf_counter()
                result = P.prune_from_calibration_(pruned, own, P.PruneConfig(sparsity=budget,
                                                                              settings=stat_settings(extra) if extra
                                                                              else None), data=own_windows)
                measure("source", source + (f"+{extra}" if extra else ""), budget, pruned,
                        seconds + time.perf_counter() - t, result.plan, result.info)
    elif args.experiment == "split":  # units selected on one calibration, corrections fitted on another's statistics
        from stat_core.calibration.statistics import merge_stats
        from stat_core.data.in_context import in_context_calibration

        own: dict = {"wikipedia": (calibration, 0.0)}

        def named(name):
            from stat_core.calibration.statistics import SensitivitySums, load_stats, save_stats

            saved = cache / f"split-{name}.safetensors"  # beside the cached Wikipedia calibration
            if name not in own and saved.is_file():
                stats, sens = load_stats(saved)
                fisher = sens.normalised()
                own[name] = (P.Calibration(dense_stats=stats, sensitivity=fisher, analyses=[
                    A.analyse_layer(adapter, i, st, fisher[i], False) for i, st in enumerate(stats)]), 0.0)
            if name not in own:
                base, _, seed = name.partition(":s")  # NAME:sN: windows (and the sensitivity's samples) of seed N
                config = CalibrationConfig(num_samples=64, seq_len=512, seed=int(seed or 0))
                source = base.removesuffix("-fisher")
                cal_windows = in_context_calibration(tokenizer, config)[0] if source == "in-context" else \
                    decoder_calibration(model, tokenizer, source, config).windows
                t = time.perf_counter()
                labels = "model" if base.endswith("-fisher") else "data"
                torch.manual_seed(int(seed or 0))
                own[name] = (P.calibrate(model, cal_windows, P.PruneConfig(sparsity=0.2, sensitivity_labels=labels)),
                             time.perf_counter() - t)
                save_stats(saved, own[name][0].dense_stats, SensitivitySums(list(own[name][0].sensitivity), 1))
            return own[name]

        def selection(name):  # GRAMS@SENSITIVITY: one calibration's statistics, another's loss sensitivity
            grams, _, sens = name.partition("@")
            if not sens and "+" not in grams:
                return named(grams)
            parts = [named(g) for g in grams.split("+")]  # several texts: their statistics summed
            stats = parts[0][0].dense_stats if len(parts) == 1 else merge_stats(*[c.dense_stats for c, _ in parts])
            f, s2 = named(sens or grams.split("+")[0])
            analyses = [A.analyse_layer(adapter, i, st, f.sensitivity[i], False) for i, st in enumerate(stats)]
            return (P.Calibration(dense_stats=stats, sensitivity=f.sensitivity, analyses=analyses),
                    sum(sec for _, sec in parts) + s2)

        def units_at_counts(plan, cal):  # the plan's per-layer counts, the units ``cal``'s analyses choose there
            for lp, an in zip(plan.layers, cal.analyses):
                same = [c for c in an.head_configs
                        if (len(c["heads"]), len(c["kv_heads"])) == (len(lp.kept_heads), len(lp.kept_kv_heads))]
                if same:
                    lp.kept_heads, lp.kept_kv_heads = list(same[0]["heads"]), list(same[0]["kv_heads"])
                lp.kept_neurons = sorted(an.neuron_order[:len(lp.kept_neurons)].tolist())
            return plan

        for variant in (args.variants or "mix-fisher/wikipedia").split(","):
            select, _, correct = variant.partition("/")
            select, _, counts = select.partition("#")  # UNITS#COUNTS: per-layer counts from another calibration
            chosen, seconds = selection(select)
            # the statistics do not depend on the sensitivity's labels: mix and mix-fisher share them
            parts = [(own.get(c) or own.get(f"{c}-fisher") or named(c))[0].dense_stats
                     for c in (correct or select.partition("@")[0]).split("+")]
            stats = parts[0] if len(parts) == 1 else merge_stats(*parts)
            for budget in budgets:
                config = P.PruneConfig(sparsity=budget)
                pruned, t = copy.deepcopy(model), time.perf_counter()
                if counts:
                    plan = units_at_counts(P.plan_pruning(model, selection(counts)[0], config), chosen)
                else:
                    plan = P.plan_pruning(model, chosen, config)
                P.apply_plan_(pruned, plan, stats)
                measure("split", variant, budget, pruned, seconds + time.perf_counter() - t, plan)
    else:  # stages: the first budget from the dense calibration, each next one after re-calibrating
        first = float(args.variants or 0.1)
        current, name = copy.deepcopy(model), f"{first:g}"
        P.prune_from_calibration_(current, calibration, P.PruneConfig(sparsity=first))
        for budget in budgets:
            t = time.perf_counter()
            again = P.calibrate(current, windows, P.PruneConfig(sparsity=0.1))
            relative = 1 - (1 - budget) * dense_params / block_parameter_count(get_adapter(current))
            nxt = copy.deepcopy(current)
            result = P.prune_from_calibration_(nxt, again, P.PruneConfig(sparsity=relative))
            name += f"→{budget:g}"
            measure("stages", name, budget, nxt, time.perf_counter() - t, result.plan)
            current = nxt
    return 0


if __name__ == "__main__":
    sys.exit(main())
