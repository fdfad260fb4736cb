"""Every pruning method in the registry, at equal budget, from one shared calibration, on the whole
evaluation suite (``stat_core.evaluation.suite``): what perplexity sees and what it hides.

    .venv/bin/python -m benchmarks.suite            # SmolLM2 at 10..50% (64 × 512 calibration, full suite)
                                                    #   + the demo classifier at 20..50%
    .venv/bin/python -m benchmarks.suite --quick    # the same budgets, the quick suite (4,096 eval tokens,
                                                    #   fewer analogies, shorter chat answers)
    .venv/bin/python -m benchmarks.suite --tiny     # random tiny models, seconds (CI)
    .venv/bin/python -m benchmarks.suite --quick --classifier '' --budgets 0.2,0.3 --seeds 0,1,2 --append
                                                    # every method at the default calibration, three seeds
    .venv/bin/python -m benchmarks.suite --quick --calibration wikipedia --append   # the Wikipedia rows
    .venv/bin/python -m benchmarks.suite --methods slicegpt --append   # add or redo methods in suite.json
    .venv/bin/python -m benchmarks.suite --quick --classifier '' --budgets 0.5 --methods stat,slimgpt \
        --recover 10 --recover-lr 5e-5 --recover-only --plain-from benchmarks/results/suite.json \
        --name finetune_ref_smollm2   # each method + recovery, next to its plain cell of suite.json
    .venv/bin/python -m benchmarks.suite --quick --classifier '' --methods 'flap,flap[metric=WIFN]' \
        --name flap_metrics   # a method with its own settings is a row of its own

One ``calibrate()`` of the dense model per seed serves every plan-based method and budget: the
protocol's 64 × 512 windows of ``--calibration`` (``default``: the recipe that follows the model,
exactly as the CLI and the app choose it — for a chat model the units are chosen on its own chat
text with its own Fisher and the corrections fitted on Wikipedia; ``wikipedia``: plain Wikipedia,
the text of the tables before the default changed), at each of ``--seeds`` (the tables show the mean
and half the range); each cell is a fresh copy of the dense model cut by the method's
plan (and its correction) in seconds. Whole-model methods (SliceGPT) run their own pass over the
same windows. ``seconds_prune`` charges each method the parts of the shared calibration it uses
(the block statistics pass; STAT's gradient pass and decompositions only for STAT and the
baselines that reuse its counts; LLM-Pruner's gradient pass) plus its own planning and surgery.

``--recover STEPS``: after a method's cell is measured, the same pruned model is distilled towards
the dense one (:func:`stat_core.recover.recover_`, on the calibration windows only, never the
evaluation text) and measured again as method ``<name>+recovery``; its ``seconds_prune`` adds the
recovery's wall-clock to the method's, ``seconds_recover`` is the recovery alone.

Writes ``benchmarks/results/suite.{json,md}`` (``--name`` for another file name): a list of records, one per model × method × budget
(the dense model as method ``dense``, budget 0), written after every cell so a stopped run keeps
what it measured.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from benchmarks._common import RESULTS, load_at_start, machine_note

from stat_core.adapters import get_adapter
from stat_core.surgery.budget import block_parameter_count
from stat_core.calibration.statistics import CalibrationSet
from stat_core.methods.registry import get_method, method_names
from stat_core.methods.settings import settings_from_text
from stat_core.config import PruneConfig
from stat_core.pipeline import calibrate, prune_from_calibration_, stat_prune_, with_corrections_from

log = logging.getLogger("suite")

DECODER_FIELDS = ("perplexity", "kl_to_dense", "fewshot_accuracy", "fewshot_bias_free", "fewshot_majority_share",
                  "analogy_accuracy", "instruction_agreement", "instruction_kl", "code_pass_at_1")
CLASSIFIER_FIELDS = ("accuracy", "accuracy_windows", "kl_to_dense")
# Which way is better, per field (the markdown bolds the best method per budget).
LOWER_IS_BETTER = {"perplexity", "kl_to_dense", "instruction_kl", "fewshot_majority_share"}


def _seconds_for(method, calib_timings: dict, prepare_seconds: float) -> float:
    """The shared calibration's stages this method uses (see the module docstring)."""
    seconds = prepare_seconds
    if method.uses_block_stats:
        seconds += calib_timings.get("calibrate", 0.0)
    if method.uses_stat_analysis:
        seconds += calib_timings.get("sensitivity", 0.0) + calib_timings.get("analyse", 0.0)
    return seconds


class Recorder:
    """Records written to JSON + markdown after every cell; ``append`` keeps other methods' records."""

    def __init__(self, out_dir: Path, meta: dict, append: bool, name: str = "suite"):
        self.out_dir = Path(out_dir)
        self.name = name
        self.meta = meta
        self.records: list[dict] = []
        path = self.out_dir / f"{name}.json"
        if append and path.exists():
            old = json.loads(path.read_text())
            self.records = old["records"]
            self.meta = {**old.get("meta", {}), "appended": meta}

    def add(self, rec: dict) -> None:
        self.records = [r for r in self.records if record_key(r) != record_key(rec)] + [rec]
        self.write()
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in rec.items()
                          if k != "kept"}), flush=True)

    def write(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"{self.name}.json").write_text(json.dumps({"meta": self.meta, "records": self.records}, indent=1))
        (self.out_dir / f"{self.name}.md").write_text(markdown(self.records, self.meta))


def record_key(r: dict) -> tuple:
    """One cell: model × method × budget × calibration × seed (records written before calibrations and
    seeds were recorded are Wikipedia, seed 0)."""
    return r["model"], r["method"], r["budget"], r.get("calibration", "wikipedia"), r.get("seed", 0)


# --- decoders ---------------------------------------------------------------------------------------

def method_variant(spec: str):
    """``(method name, its settings)`` from ``NAME`` or ``NAME[field=value;...]`` (e.g.
    ``flap[metric=WIFN]``): a method with non-default settings is its own row, named by ``spec``."""
    name, _, rest = spec.partition("[")
    return name, settings_from_text(name, rest.rstrip("]").replace(";", ",")) if rest else None


def shared_calibration(model, windows, config: PruneConfig, correction_windows=None):
    """The one calibration every plan-based method of a run is cut from (everything any of them needs:
    the statistics, the gradient pass with ``config``'s sensitivity settings and STAT's analyses), with
    the corrections fitted on ``correction_windows`` when given."""
    calib = calibrate(model, windows, PruneConfig(sparsity=config.sparsity, sensitivity_samples=config.sensitivity_samples,
                                                  sensitivity_labels=config.sensitivity_labels))
    if correction_windows is not None:
        calib = with_corrections_from(model, calib, correction_windows, cache=False)
    return calib


def prune_cell(model, windows, config: PruneConfig, calib, model_name: str = ""):
    """``(pruned copy, plan or None, info)`` of one cell: a whole-model method by the library's
    :func:`stat_core.pipeline.stat_prune_` on ``windows``; the others by the library's one-shot path
    from the shared ``calib`` (plan, cut, the method's finishing step such as STAT's output prior), so
    a row measures exactly what the CLI and the app produce. ``model`` is not changed."""
    pruned = copy.deepcopy(model)
    if get_method(config.method).whole_model:
        result = stat_prune_(pruned, windows, config, model_name=model_name)
        return pruned, None, result.info
    result = prune_from_calibration_(pruned, calib, config, model_name, {}, windows)
    return pruned, result.plan, result.info


def run_decoder(model, tokenizer, windows, model_name: str, methods: list[str], budgets: list[float],
                suite_config, rec: Recorder, sensitivity_samples: int | None = None,
                recovery=None, recovery_only: bool = False, code: bool = False, recipe=None,
                correction_windows=None, labels: dict | None = None, reference=None) -> None:
    """``windows``: the calibration text every method gets. ``recipe`` (a
    :class:`stat_core.data.recipe.Recipe`, or None: plain ``windows`` with data labels): its sensitivity
    labels for the gradient pass and, with ``correction_windows``, the corrections fitted on those
    (:func:`stat_core.pipeline.with_corrections_from`) for the methods that correct from statistics;
    whole-model methods get ``windows`` alone. ``labels``: fields added to every record (calibration
    name, seed). ``reference``: the dense reference of an earlier call (the dense row is then not
    measured again). ``recovery``: a :class:`stat_core.recover.RecoveryConfig` (or ``None``): each cell is then also
    measured after recovery on ``windows``, as method ``<name>+recovery`` (``recovery_only``: only then,
    the plain cell is not measured). ``code``: every cell also gets the code measure
    (:mod:`stat_core.evaluation.code`, greedy pass@1)."""
    from stat_core.evaluation.suite import build_reference, evaluate_suite

    def evaluate(m, ref):
        t_eval = time.perf_counter()
        from stat_core.progress import TqdmProgress

        progress = TqdmProgress(True)
        metrics = evaluate_suite(m, tokenizer, ref, progress) if ref is not None else dict(reference.dense_metrics)
        if code:
            from stat_core.evaluation.code import code_pass_at_1

            result = code_pass_at_1(m, tokenizer, progress=progress)
            metrics["code_pass_at_1"] = result["code_pass_at_1"]
            metrics["code_failed"] = sorted(k for k, v in result["code_results"].items() if v["status"] != "passed")
            failed = [(k, v) for k, v in result["code_results"].items() if v["status"] != "passed"]
            metrics["code_failure_samples"] = {k: {"detail": v["detail"], "completion": v["completion"]}
                                               for k, v in failed[:3]}
        metrics["seconds_evaluate"] = time.perf_counter() - t_eval
        return metrics

    labels = labels or {}
    if reference is None:
        t = time.perf_counter()
        log.info("dense reference (perplexity, few-shot, analogies, chat answers%s) ...", ", code" if code else "")
        from stat_core.progress import TqdmProgress

        reference = build_reference(model, tokenizer, suite_config, TqdmProgress(True))
        log.info("dense reference in %.0f s", time.perf_counter() - t)
        rec.add({"model": model_name, "method": "dense", "budget": 0.0, "removed_fraction": 0.0,
                 **evaluate(model, None), "seconds_prune": 0.0})
    sensitivity_labels = recipe.sensitivity_labels if recipe is not None else "data"
    dense_params = block_parameter_count(get_adapter(model))
    calib = None
    prepare_seconds: dict[str, float] = {}
    for budget in budgets:
        for name in methods:
            base, settings = method_variant(name)
            method = get_method(base)
            config = PruneConfig(sparsity=budget, method=base, sensitivity_samples=sensitivity_samples,
                                 settings=settings, sensitivity_labels=sensitivity_labels)
            if not method.whole_model and calib is None:
                calib = shared_calibration(model, windows, config, correction_windows)
                log.info("shared calibration: %s", {k: round(v, 1) for k, v in calib.timings.items()})
            if not method.whole_model and name not in prepare_seconds:
                t = time.perf_counter()
                method.prepare(model, CalibrationSet.wrap(windows), calib)
                prepare_seconds[name] = time.perf_counter() - t
            t = time.perf_counter()
            pruned, plan, info = prune_cell(model, windows, config, calib, model_name)
            seconds = time.perf_counter() - t
            if method.whole_model:
                removed = info.get("removed_fraction")
                extra = {"info": info}
            else:
                seconds += _seconds_for(method, calib.timings, prepare_seconds[name])
                if correction_windows is not None and method.uses_block_stats:
                    seconds += calib.timings.get("correction_calibration", 0.0)
                removed = 1 - block_parameter_count(get_adapter(pruned)) / dense_params
                extra = {"kept": plan.kept_summary()}
            if not (recovery_only and recovery is not None):
                metrics = evaluate(pruned, reference)
                rec.add({"model": model_name, "method": name, "budget": budget, "removed_fraction": removed,
                         **metrics, "seconds_prune": seconds, **extra, **labels})
            if recovery is not None and recovery.steps > 0:
                from stat_core.recover import recover_

                info = recover_(pruned, model, windows, recovery)
                log.info("%s at %.0f%%: recovery %s", name, 100 * budget,
                         {k: (round(v, 4) if isinstance(v, float) else v) for k, v in info.items()})
                metrics = evaluate(pruned, reference)
                rec.add({"model": model_name, "method": f"{name}+recovery", "budget": budget,
                         "removed_fraction": 1 - block_parameter_count(get_adapter(pruned)) / dense_params,
                         **metrics, "seconds_prune": seconds + info["seconds"], "seconds_recover": info["seconds"],
                         "recover": info, **extra, **labels})
            del pruned
    return reference


def copy_plain_records(rec: Recorder, path: Path, model_name: str, methods: list[str], budgets: list[float]) -> int:
    """Copy the plain cells of ``methods`` × ``budgets`` measured earlier (``path``: a suite.json) into
    ``rec``, marked ``"from": path`` (with ``--recover-only``: the same protocol's cells, not re-measured;
    compare their ``kept`` with the recovered records' to check the plans are the same)."""
    old = json.loads(Path(path).read_text())["records"]
    rows = [r for r in old if r["model"] == model_name and (r["method"] == "dense" or
                                                           (r["method"] in methods and r["budget"] in budgets))]
    for r in rows:
        if r["method"] != "dense":
            rec.records = [x for x in rec.records if record_key(x) != record_key(r)]
            rec.records.append({**r, "from": Path(path).name})
    rec.write()
    return len(rows)


# --- encoders ---------------------------------------------------------------------------------------

def run_classifier(model, calib_set, held, held_windows, model_name: str, methods: list[str],
                   budgets: list[float], rec: Recorder) -> None:
    from stat_core.evaluation.classifier import accuracy, class_log_probs, kl_to_reference

    ref = class_log_probs(model, held_windows)
    rec.add({"model": model_name, "method": "dense", "budget": 0.0, "removed_fraction": 0.0,
             "accuracy": accuracy(model, held), "accuracy_windows": accuracy(model, held_windows),
             "kl_to_dense": 0.0, "seconds_prune": 0.0})
    dense_params = block_parameter_count(get_adapter(model))
    calib = calibrate(model, calib_set, PruneConfig(sparsity=0.3))
    prepare_seconds: dict[str, float] = {}
    for budget in budgets:
        for name in methods:
            base, settings = method_variant(name)
            method = get_method(base)
            if method.decoder_only:
                continue
            if name not in prepare_seconds:
                t = time.perf_counter()
                method.prepare(model, calib_set, calib)
                prepare_seconds[name] = time.perf_counter() - t
            pruned = copy.deepcopy(model)
            t = time.perf_counter()
            plan = prune_from_calibration_(pruned, calib, PruneConfig(sparsity=budget, method=base, settings=settings),
                                           model_name, {}, calib_set).plan  # the library's one-shot path
            seconds = time.perf_counter() - t + _seconds_for(method, calib.timings, prepare_seconds[name])
            rec.add({"model": model_name, "method": name, "budget": budget,
                     "removed_fraction": 1 - block_parameter_count(get_adapter(pruned)) / dense_params,
                     "accuracy": accuracy(pruned, held), "accuracy_windows": accuracy(pruned, held_windows),
                     "kl_to_dense": kl_to_reference(ref, pruned, held_windows), "seconds_prune": seconds,
                     "kept": plan.kept_summary()})
            del pruned


# --- tables -----------------------------------------------------------------------------------------

def _fmt(field: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if field == "perplexity":
        return f"{value:.3g}" if value >= 1000 else f"{value:.2f}"
    if field in ("kl_to_dense", "instruction_kl"):
        return f"{value:.4f}" if value < 1 else f"{value:.3g}"
    if field in ("seconds_prune", "seconds_recover"):
        return f"{value:.0f}"
    return f"{value:.1%}" if field != "fewshot_bias_free" else f"{value:.3f}"


HEADERS = {"perplexity": "ppl (×dense)", "kl_to_dense": "KL", "fewshot_accuracy": "few-shot acc",
           "fewshot_bias_free": "few-shot AUC", "fewshot_majority_share": "majority share",
           "analogy_accuracy": "analogies", "instruction_agreement": "chat agree", "instruction_kl": "chat KL",
           "code_pass_at_1": "code pass@1",
           "accuracy": "post acc", "accuracy_windows": "window acc", "seconds_prune": "prune s",
           "seconds_recover": "of which recovery s"}


def best_methods(rows: list[dict], field: str) -> set[str]:
    values = [(r[field], r["method"]) for r in rows if r.get(field) is not None and not math.isnan(r[field])]
    if not values:
        return set()
    if field == "fewshot_majority_share":  # not a quality to maximise: closest to the dense share is not
        return set()                       # "best" either; shown, never bolded
    best = min(v for v, _ in values) if field in LOWER_IS_BETTER else max(v for v, _ in values)
    return {m for v, m in values if v == best}


def seed_means(records: list[dict]) -> list[dict]:
    """Several seeds of one cell as one row: the mean of every number, ``seeds`` (how many) and
    ``spread`` (half the range per field) where there is more than one."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault(record_key(r)[:4], []).append(r)
    out = []
    for rows in groups.values():
        if len(rows) == 1:
            out.append(rows[0])
            continue
        row = dict(rows[0])
        row["seeds"] = sorted(r.get("seed", 0) for r in rows)
        row["spread"] = {}
        for f, v in rows[0].items():
            if f in ("budget", "seed"):  # the cell's key: the same in every seed (a mean would drift by 1e-17)
                continue
            values = [r.get(f) for r in rows]
            if isinstance(v, (int, float)) and not isinstance(v, bool) and all(
                    isinstance(x, (int, float)) and not math.isnan(x) for x in values):
                row[f] = sum(values) / len(values)
                row["spread"][f] = (max(values) - min(values)) / 2
        out.append(row)
    return out


def markdown(records: list[dict], meta: dict) -> str:
    lines = []
    order = {m: i for i, m in enumerate(method_names())}
    order.update({f"{m}+recovery": i + 0.5 for m, i in list(order.items())})
    tables = list(dict.fromkeys((r["model"], r.get("calibration", "wikipedia")) for r in records
                                if r["method"] != "dense"))
    for model in dict.fromkeys(r["model"] for r in records):  # a model with its dense row only
        if not any(t[0] == model for t in tables):
            tables.append((model, "wikipedia"))
    for model, calibration in tables:
        rs = seed_means([r for r in records if r["model"] == model and (
            r["method"] == "dense" or r.get("calibration", "wikipedia") == calibration)])
        dense = next((r for r in rs if r["method"] == "dense"), None)
        fields = DECODER_FIELDS if "perplexity" in (dense or {}) else CLASSIFIER_FIELDS
        fields = [f for f in fields if any(r.get(f) is not None for r in rs)] + ["seconds_prune"]
        if any(r.get("seconds_recover") is not None for r in rs):
            fields.append("seconds_recover")
        about = meta.get("calibrations", {}).get(f"{model} / {calibration}", "")
        seeds = sorted({s for r in rs for s in r.get("seeds", [r.get("seed", 0)]) if r["method"] != "dense"})
        lines += [f"**{model}**, calibration **{calibration}**" + (f" ({about})" if about else "")
                  + (", each row the mean over the calibration seeds it names (± half the range)"
                     if len(seeds) > 1 else "")
                  + (f" — {meta.get('protocol', {}).get(model, '')}" if meta.get("protocol") else ""),
                  "", "| budget | method | " + ("seeds | " if len(seeds) > 1 else "") + "removed | "
                  + " | ".join(HEADERS[f] for f in fields) + " |",
                  "|---|---|" + ("---|" if len(seeds) > 1 else "") + "---|" + "---|" * len(fields)]
        if dense:
            lines.append("| 0% | dense | " + ("– | " if len(seeds) > 1 else "") + "0% | "
                         + " | ".join(_fmt(f, dense.get(f)) for f in fields) + " |")
        summary = []
        for budget in sorted({r["budget"] for r in rs if r["method"] != "dense"}):
            row = sorted((r for r in rs if r["budget"] == budget and r["method"] != "dense"),
                         key=lambda r: order.get(r["method"], 99))
            best = {f: best_methods(row, f) for f in fields if not f.startswith("seconds")}
            summary.append((budget, best))
            for r in row:
                cells = []
                for f in fields:
                    text = _fmt(f, r.get(f))
                    if f == "perplexity" and dense and r.get(f) is not None:
                        text += f" ({r[f] / dense[f]:.2f}×)"
                    if r.get("spread", {}).get(f) and not f.startswith("seconds"):
                        text += f" ±{_fmt(f, r['spread'][f])}"
                    cells.append(f"**{text}**" if r["method"] in best.get(f, ()) else text)
                removed = r.get("removed_fraction")
                named = (", ".join(map(str, r.get("seeds", [r.get("seed", 0)]))) + " | ") if len(seeds) > 1 else ""
                lines.append(f"| {budget:.0%} | {r['method']} | {named}{_fmt('fraction', removed)} | "
                             + " | ".join(cells) + " |")
        lines.append("")
        shown = [f for f in fields if not f.startswith("seconds") and f != "fewshot_majority_share"]
        lines += [f"Best per budget on **{model}**, calibration {calibration} (ties listed):", "",
                  "| budget | " + " | ".join(HEADERS[f] for f in shown) + " |", "|---|" + "---|" * len(shown)]
        for budget, best in summary:
            n_methods = len({r["method"] for r in rs if r["budget"] == budget})

            def names(f):
                if len(best[f]) == n_methods > 1:
                    return "all tie"
                return ", ".join(sorted(best[f], key=lambda m: order.get(m, 99))) or "–"
            lines.append(f"| {budget:.0%} | " + " | ".join(names(f) for f in shown) + " |")
        lines.append("")
    machine = meta.get("machine") or meta.get("appended", {}).get("machine")
    if machine:
        lines.append(f"Measured on {machine.get('cpu_count')} CPU cores (load {load_at_start({'machine': machine})} at "
                     f"the start), torch {machine.get('torch')}.")
    return "\n".join(lines) + "\n"


# --- main -------------------------------------------------------------------------------------------

def _tiny_decoder():
    """A random Llama with SmolLM2's vocabulary, so the real tokenizer and prompts apply."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from stat_core.models import load_tokenizer_only

    tokenizer = load_tokenizer_only("smollm2-135m")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                      intermediate_size=96, vocab_size=len(tokenizer), max_position_embeddings=1024,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg).eval(), tokenizer


def run_calibrations(model, tokenizer, model_name: str, args, methods, budgets, suite_config, rec: Recorder, recovery,
                     num_samples: int, seq_len: int, sensitivity_samples: int | None, protocol: str) -> None:
    """Every method at every budget from ``args.calibration`` (``default``: the recipe that follows the
    model, :func:`stat_core.data.recipe.resolve_recipe`, built by the same pipeline as the CLI's) at
    each of ``args.seeds``; the dense reference is measured once."""
    from stat_core import pipeline
    from stat_core.data.recipe import resolve_recipe
    from stat_core.progress import TqdmProgress

    named = None if args.calibration == "default" else args.calibration
    recipe = resolve_recipe(model, tokenizer, named)
    print(recipe.sentence, file=sys.stderr, flush=True)
    rec.meta.setdefault("calibrations", {})[f"{model_name} / {args.calibration}"] = (
        f"units on '{recipe.source}' with {recipe.sensitivity_labels} labels"
        + (f", corrections fitted on '{recipe.correct_on}'; whole-model methods on '{recipe.source}' alone"
           if recipe.correct_on else ""))
    rec.meta.setdefault("protocol", {})[model_name] = protocol
    reference = None
    progress = TqdmProgress(True)
    for seed in [int(x) for x in str(args.seeds).split(",")]:
        kind, builtin, path = pipeline.resolve_source(model, tokenizer, recipe.source)
        prepared = pipeline.calibration_data(model, tokenizer, model_name, kind, builtin, path, num_samples=num_samples,
                                             seq_len=seq_len, seed=seed, progress=progress)
        correction = None
        if recipe.correct_on:
            correction, _ = pipeline.correction_data(model, tokenizer, model_name, recipe.correct_on, prepared.info,
                                                     num_samples, seq_len, seed, progress)
        reference = run_decoder(model, tokenizer, prepared.data, model_name, methods, budgets, suite_config, rec,
                                recovery=recovery, recovery_only=args.recover_only, code=args.code,
                                sensitivity_samples=sensitivity_samples, recipe=recipe,
                                correction_windows=None if correction is None else correction.data,
                                labels={"calibration": args.calibration, "seed": seed}, reference=reference)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--classifier", default="minilm-classifier", help="'' to skip the classifier")
    p.add_argument("--budgets", default="0.1,0.2,0.3,0.4,0.5")
    p.add_argument("--classifier-budgets", default="0.2,0.3,0.4,0.5")
    p.add_argument("--methods", default=",".join(m for m in method_names() if not get_method(m).needs_training))
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--quick", action="store_true", help="the quick suite (fewer evaluation tokens and prompts)")
    p.add_argument("--tiny", action="store_true", help="random tiny models (seconds; what CI runs)")
    p.add_argument("--append", action="store_true", help="keep the other records already in suite.json")
    p.add_argument("--recover", type=int, default=0, metavar="STEPS",
                   help="also measure every cell after STEPS steps of recovery (distillation towards the dense "
                        "model on the calibration windows); 0: off")
    p.add_argument("--recover-lr", type=float, default=1e-5)
    p.add_argument("--recover-only", action="store_true",
                   help="with --recover: measure only the recovered models (the plain cells cost a suite each)")
    p.add_argument("--plain-from", default=None, metavar="SUITE_JSON",
                   help="copy the plain cells of these methods and budgets from an earlier suite.json")
    p.add_argument("--code", action="store_true",
                   help="also measure code pass@1 on the project's Python problems (code models)")
    p.add_argument("--sensitivity-samples", type=int, default=None,
                   help="windows of the shared calibration's gradient pass (default: the library's)")
    p.add_argument("--calibration", default="default",
                   help="the text every method is calibrated on: 'default' (the recipe that follows the model, "
                        "as the CLI and the app choose it: a chat model's units on 'mix' with its own Fisher, "
                        "corrections on Wikipedia), 'wikipedia', or any other built-in source or file")
    p.add_argument("--seeds", default="0", help="calibration window seeds, comma-separated (each a full run; "
                                                "the tables show the mean and half the range)")
    p.add_argument("--name", default="suite", help="results file name (<out-dir>/<name>.json and .md)")
    p.add_argument("--out-dir", default=str(RESULTS))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    from stat_core.evaluation.suite import SuiteConfig

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        method_variant(m)  # unknown names and settings fail here, in one sentence
    budgets = [float(b) for b in args.budgets.split(",")]
    protocol = {}
    meta = {"machine": machine_note(), "methods": methods, "protocol": protocol}
    recovery = None
    if args.recover:
        from dataclasses import asdict

        from stat_core.recover import RecoveryConfig

        recovery = RecoveryConfig(steps=args.recover, lr=args.recover_lr)
        meta["recovery"] = {**asdict(recovery), "only": args.recover_only}
    rec = Recorder(Path(args.out_dir), meta, args.append, name=args.name)
    if args.tiny:
        model, tokenizer = _tiny_decoder()
        run_calibrations(model, tokenizer, "tiny-llama", args, methods, [0.2, 0.4], SuiteConfig.tiny(), rec, recovery,
                         num_samples=8, seq_len=64, sensitivity_samples=2,
                         protocol="random tiny Llama, 8 × 64 calibration tokens, tiny suite")
        return 0

    from stat_core.models import load_model

    if args.model:
        model, tokenizer = load_model(args.model)
        suite_config = SuiteConfig.quick() if args.quick else SuiteConfig()
        run_calibrations(model, tokenizer, args.model, args, methods, budgets, suite_config, rec, recovery,
                         num_samples=args.num_samples, seq_len=args.seq_len,
                         sensitivity_samples=args.sensitivity_samples,
                         protocol=(f"calibration {args.num_samples} × {args.seq_len} tokens; "
                                   f"{'quick' if args.quick else 'full'} suite: {suite_config.eval_tokens:,} evaluation "
                                   f"tokens, {suite_config.analogies_per_category} analogies per category, chat answers "
                                   f"of {suite_config.instruction_new_tokens} tokens"))
        if args.plain_from:
            copy_plain_records(rec, Path(args.plain_from), args.model, methods, budgets)
        del model
    if args.classifier:
        from stat_core.models import demo_classifier_split
        from stat_core.evaluation.classifier import encode, encode_chunks

        model, tokenizer = load_model(args.classifier)
        train, held = demo_classifier_split()
        calib_set, held_set, held_windows = encode_chunks(tokenizer, train), encode(tokenizer, held), encode_chunks(tokenizer, held)
        rec.meta.setdefault("protocol", {})[args.classifier] = (
            f"calibration: all text of the {len(train)} training posts in 128-token windows ({len(calib_set)}); "
            f"post accuracy on {len(held)} held-out posts, window accuracy and KL on their {len(held_windows)} windows")
        run_classifier(model, calib_set, held_set, held_windows, args.classifier, methods,
                       [float(b) for b in args.classifier_budgets.split(",")], rec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
