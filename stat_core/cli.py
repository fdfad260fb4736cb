"""``stat-prune MODEL --sparsity S --out DIR``: prune from the shell and write a report."""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path

import torch

from stat_core.adapters import UnsupportedModelError
from stat_core.adapters.registry import is_encoder
from stat_core.calibration import distributed
from stat_core.calibration.statistics import CalibrationSet
from stat_core.config import BUDGET_KINDS, MODES, PruneConfig
from stat_core.data.sources import DataError
from stat_core.evaluation.html_report import check_report_path, write_report_html
from stat_core.evaluation.report import prune_report, size_summary
from stat_core.export.api import EXPORT_FORMATS, check_format, export_model
from stat_core.export.common import (
    ExportError,
    atomic_output_dir,
    check_output_dir,
)
from stat_core.export.gguf import GGUF_TYPES
from stat_core.methods.base import check_budget_feasible
from stat_core.methods.registry import get_method, method_names
from stat_core.methods.settings import setting_kind
from stat_core.calibration.sizes import statistics_memory_problem
from stat_core.calibration import cache as calibration_cache
from stat_core.data.recipe import resolve_recipe
from stat_core.models import DEMO_MODELS, ModelLoadError, load_model
from stat_core.pipeline import (
    Measure,
    calibration_data,
    correction_data,
    default_flops_seq_len,
    prune_in_place,
    recover,
    resolve_source,
)
from stat_core.progress import TqdmProgress
from stat_core.streaming import run_offload

log = logging.getLogger("stat_core")


def _setting_dest(method: str, field: str) -> str:
    return f"setting__{method.replace('-', '_')}__{field}"


def add_method_settings(p: argparse.ArgumentParser) -> None:
    """One flag per field of every method's settings (``--slimgpt-percdamp``, ...), from the dataclasses
    themselves: a method's settings reach the CLI without editing it."""
    for name in method_names():
        method = get_method(name)
        if method.Settings is None:
            continue
        group = p.add_argument_group(f"{method.label} settings (with --method {name})",
                                     (method.Settings.__doc__ or "").split("\n\n")[0].replace("``", "'"))
        for field in dataclasses.fields(method.Settings):
            flag, kind = f"--{name}-{field.name.replace('_', '-')}", setting_kind(field)
            helptext = f"default: {field.default}"
            if kind is bool:
                group.add_argument(flag, dest=_setting_dest(name, field.name), action=argparse.BooleanOptionalAction,
                                   default=None, help=helptext)
            else:
                group.add_argument(flag, dest=_setting_dest(name, field.name), type=kind, default=None,
                                   metavar=kind.__name__.upper(), help=helptext)


def method_settings(args: argparse.Namespace, method_name: str) -> object | None:
    """The chosen method's settings from its flags (None when none was given); a flag of another
    method is refused in one sentence."""
    given = {}
    for name in method_names():
        settings_type = get_method(name).Settings
        if settings_type is None:
            continue
        for field in dataclasses.fields(settings_type):
            value = getattr(args, _setting_dest(name, field.name), None)
            if value is None:
                continue
            if name != method_name:
                raise ValueError(f"--{name}-{field.name.replace('_', '-')} is a setting of --method {name}, "
                                 f"not of {method_name}; drop it or choose that method")
            given[field.name] = value
    if not given:
        return None
    settings = get_method(method_name).Settings(**given)
    get_method(method_name).check_settings(settings)  # nan / inf: one sentence before any work
    return settings


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="stat-prune",
        description="Remove attention heads and MLP neurons from a trained transformer with STAT "
                    "(interpolative decompositions + folded corrections), no fine-tuning.")
    p.add_argument("model", help=f"demo model ({', '.join(DEMO_MODELS)}), a local Hugging Face folder, or a hub id")
    p.add_argument("--sparsity", type=float, required=True, help="fraction of block parameters (or FLOPs) to remove, e.g. 0.3")
    p.add_argument("--out", required=True,
                   help="folder for the pruned model (in --format's files, with a model card, plan.json and "
                        "pruning_report.json); must not exist or be empty")
    p.add_argument("--sensitivity-labels", choices=("data", "model"), default=None,
                   help="next tokens of the gradient pass: 'data' (the text) or 'model' (sampled from the dense "
                        "model: the Fisher of its own distribution). Default: 'model' with the default calibration of a "
                        "decoder, 'data' when --calibration is given")
    p.add_argument("--intercept", action="store_true",
                   help="STAT: fit the correction with an intercept, folded into output biases (measured neutral "
                        "on SmolLM2, see benchmarks/results/stat_ablation.md)")
    p.add_argument("--uniform", action="store_true",
                   help="same head / KV-head / MLP counts in every layer: the folder then loads with stock "
                        "transformers and no custom code (BERT-family models keep all heads in this mode)")
    p.add_argument("--budget", choices=BUDGET_KINDS, default="params", help="what --sparsity counts (default: params)")
    p.add_argument("--flops-seq-len", type=int, default=None,
                   help="sequence length for FLOP counting (default: 512 for decoders, the calibration set's "
                        "average length for encoders)")
    p.add_argument("--method", choices=method_names(), default="stat", metavar="METHOD",
                   help="pruning method (default: stat): " + "; ".join(f"{m.name}: {m.summary}" for m in
                                                                        map(get_method, method_names())))
    p.add_argument("--mode", choices=MODES, default="one-shot",
                   help="one-shot: all statistics from the dense model (default); propagate: calibrate each layer on the pruned "
                        "earlier ones; sequential: like propagate, with each correction fitted to the dense model's "
                        "activations (about 3.5x the time; measured worse than one-shot on SmolLM2: README)")
    p.add_argument("--calibration", default=None,
                   help="decoders: 'wikipedia' (built-in sample, calibration split), 'mix' (half Wikipedia, half the "
                        "model's own answers to seed prompts through its chat template, generated once and cached), "
                        "'in-context', 'self-generated', or a text file (.txt/.json/.jsonl/.csv/.parquet). Default: the "
                        "recipe that follows the model — a chat model: units chosen on 'mix' with its own Fisher, "
                        "corrections fitted on 'wikipedia'; a decoder without a chat template: the same on "
                        "'in-context' (stated in the first lines of the output and in the report)")
    p.add_argument("--correct-on", default=None, metavar="SOURCE",
                   help="decoders, one-shot: fit the corrections on this calibration text's statistics ('wikipedia', "
                        "'mix', 'in-context' or a text file; same --num-samples / --seq-len / --seed) while units "
                        "are chosen on --calibration's. With --calibration mix --sensitivity-labels model "
                        "--correct-on wikipedia SmolLM2 kept its few-shot, analogy and chat answers best "
                        "(docs/experiments.md)")
    p.add_argument("--labelled", default="newsgroups",
                   help="encoders: labelled data, 'newsgroups', 'movie-reviews' or a .csv/.json/.jsonl/.parquet file; "
                        "split in half: calibration on the training half, accuracy on the held-out half")
    p.add_argument("--text-column", action="append", default=None, help="text column(s) of a labelled file (default: text)")
    p.add_argument("--label-column", default="label", help="label column of a labelled file (default: label)")
    p.add_argument("--num-samples", type=int, default=None,
                   help="calibration windows (decoders, default 64) or examples (encoders, default: the whole training half)")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per calibration window (decoders, default 512) or per example (encoders, default 128)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sensitivity-samples", type=int, default=None,
                   help="windows for the gradient pass that weights layers by their effect on the loss "
                        "(default: enough for 4096 real tokens, 8 windows of 512; 0: off)")
    p.add_argument("--no-heads", action="store_true", help="keep every attention head")
    p.add_argument("--no-neurons", action="store_true", help="keep every MLP neuron")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="weights' dtype while pruning and in the export (default: float32; with --offload, float32 "
                        "while pruning and the checkpoint's own dtype in the export)")
    p.add_argument("--offload", action="store_true",
                   help="stream a local safetensors folder block by block (for models larger than memory: about "
                        "one block + the calibration hidden states in memory); one-shot STAT, FLAP or Wanda-sp on the "
                        "CPU, no gradient sensitivity pass and no quality evaluation (stat_core.streaming)")
    p.add_argument("--work-dir", default=None,
                   help="with --offload: where the per-block statistics wait between the two passes (default: the "
                        "system's temporary folder; several GB for 7B models, in a folder of the run's own, removed "
                        "at the end)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--skip-eval", action="store_true", help="do not measure quality before/after")
    p.add_argument("--quick-eval", action="store_true",
                   help="decoders: the short evaluation suite (4,096 perplexity tokens, fewer analogies and "
                        "shorter chat answers) instead of the full one")
    p.add_argument("--measure-floor", action="store_true",
                   help="also time one plain forward pass over the calibration set (the cost floor)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing --out folder (only once the new folder is complete)")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors",
                   help="how the pruned model is written: safetensors (default: a transformers folder), gguf "
                        "(llama.cpp, Llama-family decoders) or onnx (onnxruntime)")
    p.add_argument("--gguf-type", choices=GGUF_TYPES, default="f16",
                   help="GGUF weight type (default f16; q8_0: 8-bit blocks where a row splits into 32s)")
    p.add_argument("--no-model", action="store_true",
                   help="write only pruning_report.json and plan.json, not the model")
    p.add_argument("--recover", type=int, default=0, metavar="STEPS",
                   help="after pruning, distil the pruned model towards the dense one for STEPS steps on the "
                        "calibration data (KL on the output distributions + block-output MSE; shapes unchanged; "
                        "default 0: off; needs memory for a dense copy and AdamW's state)")
    p.add_argument("--report-html", default=None, metavar="FILE",
                   help="also write one self-contained HTML report (configuration, heads heatmap, decay curves, "
                        "before / after, the plan; interactive figures that work offline) to FILE")
    p.add_argument("--quiet", action="store_true")
    add_method_settings(p)
    return p


@torch.no_grad()
def time_forward(model, windows, batch_size: int) -> float:
    """Seconds of one plain forward pass over the calibration set (the cost floor of pruning)."""
    device = next(model.parameters()).device
    t = time.perf_counter()
    for batch in CalibrationSet.wrap(windows).batches(batch_size):
        model(**batch.model_inputs(device))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _calibration(args, model, tokenizer):
    """The calibration data (and a classifier's held-out half) from ``--calibration`` / ``--labelled``,
    by the pipeline the app uses too; its warnings go to the log."""
    encoder = is_encoder(model)
    kind, builtin, path = resolve_source(model, tokenizer, args.labelled if encoder else args.calibration)
    prepared = calibration_data(model, tokenizer, args.model, kind, builtin, path, num_samples=args.num_samples,
                                seq_len=args.seq_len, seed=args.seed, text_columns=tuple(args.text_column or ["text"]),
                                label_column=args.label_column, progress=TqdmProgress(not args.quiet))
    for warning in prepared.warnings:
        log.warning(warning)
    return prepared


def _report_protect(args) -> tuple:
    """Folders the HTML report may not be written into: the local model being pruned."""
    model = Path(args.model).expanduser()
    return (model if model.is_dir() else model.parent if model.is_file() else None,)


def run(args: argparse.Namespace) -> dict:
    if getattr(args, "offload", False):  # the checkpoint streamed block by block (stat_core.streaming)
        if getattr(args, "correct_on", None) is not None:
            raise ValueError("--offload fits each block's correction from the one calibration text it streams; "
                             "drop --correct-on or --offload")
        if getattr(args, "report_html", None):
            check_report_path(args.report_html, protect=_report_protect(args))
        report = run_offload(args, method_settings(args, args.method))
        if getattr(args, "report_html", None):
            from stat_core.surgery.plan import PrunePlan

            write_report_html(args.report_html, PrunePlan.from_json(Path(args.out) / "plan.json"), report)
        return report
    args.dtype = args.dtype or "float32"
    settings = method_settings(args, args.method)  # a bad setting: one sentence before any work
    calibration_cache.check_settings()  # STAT_CALIBRATION_CACHE_GB=nan: one sentence before any work
    if args.flops_seq_len is not None and args.flops_seq_len < 1:  # 0 or less: refused before any work
        raise ValueError(f"--flops-seq-len takes a number of tokens ≥ 1, got {args.flops_seq_len}")
    if distributed.is_main():  # the output folder is rank 0's (torchrun: see stat_core.calibration.distributed)
        check_output_dir(args.out, args.overwrite, source=args.model)  # fail before minutes of work, not after
        if getattr(args, "report_html", None):
            check_report_path(args.report_html, protect=_report_protect(args))
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    method = get_method(args.method)
    method.check_applicable(model)  # one sentence before any data, evaluation or calibration
    if args.no_model and args.format != "safetensors":
        raise ValueError(f"--format {args.format} writes a model; --no-model writes none: drop one of them")
    if not args.no_model:
        check_format(model, args.format, tokenizer)  # a format that does not fit says so before any work
    if args.recover < 0:
        raise ValueError(f"--recover takes a number of steps ≥ 0, got {args.recover}")
    if method.whole_model and not method.returns_plan and not args.no_model:
        raise ValueError(f"{method.label} changes the hidden size and adds rotation matrices to the residual path; "
                         "its models cannot be exported yet: add --no-model to measure it")
    if getattr(args, "report_html", None) and method.whole_model and not method.returns_plan:
        raise ValueError(f"{method.label} gives no head / neuron plan, so there is no HTML report to draw; "
                         "drop --report-html")
    recipe = resolve_recipe(model, tokenizer, args.calibration, args.sensitivity_labels,
                            getattr(args, "correct_on", None), one_shot=args.mode == "one-shot",
                            single_process=not distributed.is_distributed(), whole_model=method.whole_model,
                            labelled=args.labelled)
    if distributed.is_main() and not args.quiet:
        print(recipe.sentence, file=sys.stderr, flush=True)
    if not is_encoder(model):
        args.calibration, args.correct_on = recipe.source, recipe.correct_on
    args.sensitivity_labels = recipe.sensitivity_labels
    correct_on = getattr(args, "correct_on", None)
    if correct_on is not None:  # one sentence before any data, evaluation or calibration
        if args.mode != "one-shot" or method.whole_model:
            raise ValueError("--correct-on fits one-shot corrections from a second text; use --mode one-shot with "
                             "a method that corrects from statistics (not " + (method.label if method.whole_model
                                                                                 else f"--mode {args.mode}") + ")")
        if distributed.is_distributed():
            raise ValueError("--correct-on runs in one process; drop torchrun or --correct-on")
    tokens = 0
    if not is_encoder(model):  # the hidden states of every window are held at once, beside the statistics
        from stat_core.data.sources import check_calibration_sizes
        from stat_core.pipeline import DEFAULT_DECODER_SAMPLES, DEFAULT_DECODER_SEQ_LEN

        n, length = check_calibration_sizes(model, DEFAULT_DECODER_SAMPLES if args.num_samples is None else args.num_samples,
                                            DEFAULT_DECODER_SEQ_LEN if args.seq_len is None else args.seq_len, tokenizer)
        tokens = n * length
    problem = statistics_memory_problem(model, n_tokens=tokens)  # what cannot fit: one sentence before any work
    if problem:
        raise ValueError(problem)
    prepared = distributed.from_main(_calibration, args, model, tokenizer)  # rank 0 builds, all get it
    calib, held, calib_info = prepared.data, prepared.held_out, prepared.info  # info: tokens, fingerprint
    calib_info["recipe"] = recipe.sentence  # the report and the model card say which calibration it was
    correction = None
    if correct_on is not None:
        correction, calib_info = correction_data(model, tokenizer, args.model, correct_on, calib_info, args.num_samples,
                                                 args.seq_len, args.seed, TqdmProgress(not args.quiet))
        for warning in correction.warnings:
            log.warning(warning)
    flops_seq_len = args.flops_seq_len or default_flops_seq_len(model, calib)
    distributed.check_shardable(len(calib))  # more processes than windows: one sentence before any work
    config = PruneConfig(sparsity=args.sparsity, budget_kind=args.budget, flops_seq_len=flops_seq_len,
                         method=args.method, mode=args.mode, prune_heads=not args.no_heads,
                         prune_neurons=not args.no_neurons, sensitivity_samples=args.sensitivity_samples,
                         batch_size=args.batch_size, uniform=args.uniform, intercept=args.intercept,
                         sensitivity_labels=args.sensitivity_labels,
                         settings=settings)
    check_budget_feasible(model, config)  # fail before the dense evaluation and calibration
    before = size_summary(model, flops_seq_len)
    report = prune_report(args.model, model, config, calib_info, before)  # the schema every export shares
    if distributed.is_distributed():
        report["distributed"] = {"processes": distributed.world_size(), "backend": distributed.backend_for(args.device)}

    # Decoders: the evaluation suite, its dense side computed once before pruning; encoders:
    # held-out accuracy and KL to dense (stat_core.pipeline.Measure).
    measure = Measure(tokenizer, held, quick=args.quick_eval, progress=TqdmProgress(not args.quiet))
    if not args.skip_eval:
        report.update(measure(model))
    if args.measure_floor:
        report["seconds_forward_calibration"] = time_forward(model, calib, args.batch_size)

    dense_copy = copy.deepcopy(model) if args.recover else None  # recovery's teacher, never modified
    # one-shot: the on-disk calibration cache; the report gets the times, sizes after and kept units
    result = prune_in_place(model, calib, config, report, args.model, calib_info, TqdmProgress(not args.quiet),
                            correction_data=None if correction is None else correction.data)
    if not distributed.is_main():  # this rank calibrated its shard; rank 0 reports and exports
        return report
    if args.measure_floor:
        report["prune_time_over_forward"] = report["seconds_prune"] / report["seconds_forward_calibration"]
    if args.recover:
        # the app's recovery checkbox runs the same function (report keys recover, seconds_recover)
        recover(model, dense_copy, calib, args.recover, report, seed=args.seed, progress=TqdmProgress(not args.quiet))
        del dense_copy
    if not args.skip_eval:
        report.update(measure(model))
    if args.no_model:
        with atomic_output_dir(args.out, args.overwrite) as tmp:
            (tmp / "pruning_report.json").write_text(json.dumps(report, indent=1))
            if result.plan is not None:
                result.plan.to_json(tmp / "plan.json")
        if getattr(args, "report_html", None) and result.plan is not None:
            write_report_html(args.report_html, result.plan, report)
        return report
    info = export_model(model, tokenizer, args.out, args.format, plan=result.plan, report=report,
                        overwrite=args.overwrite, gguf_type=args.gguf_type)
    report["size_on_disk_after_bytes"] = info.size_bytes
    report["export"] = {"uniform": info.uniform, "format": info.format, "files": list(info.files)}
    if getattr(args, "report_html", None) and result.plan is not None:
        write_report_html(args.report_html, result.plan, report)
    return report


def _summary(report: dict) -> str:
    lines = [f"model            {report['model']}  ({report['method']}, {report['mode']}, {report['device']})",
             f"block params     {report['block_params_before']:,} -> {report['block_params_after']:,} "
             f"({report['block_params_removed_fraction']:.1%} removed; FLOPs {report['block_flops_removed_fraction']:.1%})",
             f"all params       {report['params_before']:,} -> {report['params_after']:,}"]
    if "perplexity_before" in report:
        lines.append(f"perplexity       {report['perplexity_before']:.2f} -> {report['perplexity_after']:.2f} "
                     f"({report['perplexity_after'] / report['perplexity_before']:.2f}x)")
    if "kl_to_dense_after" in report:
        lines.append(f"KL to dense      {report['kl_to_dense_after']:.4f} nats per prediction")
    for key, label in (("fewshot_accuracy", "few-shot acc"), ("fewshot_bias_free", "few-shot AUC"),
                       ("analogy_accuracy", "analogies"), ("accuracy", "accuracy (held-out)")):
        if f"{key}_before" in report and f"{key}_after" in report:
            fmt = "{:.3f}" if key == "fewshot_bias_free" else "{:.1%}"
            lines.append(f"{label:<16} {fmt.format(report[key + '_before'])} -> {fmt.format(report[key + '_after'])}")
    if "fewshot_majority_share_after" in report:
        lines.append(f"few-shot answers {report['fewshot_majority_share_after']:.0%} give the more frequent label "
                     f"(dense {report['fewshot_majority_share_before']:.0%})")
    if "instruction_agreement_after" in report:
        lines.append(f"chat answers     {report['instruction_agreement_after']:.1%} of the dense model's greedy "
                     f"tokens agree")
    if "size_on_disk_after_bytes" in report:
        lines.append(f"weights on disk  {report['size_on_disk_before_bytes'] / 1e6:.1f} MB -> "
                     f"{report['size_on_disk_after_bytes'] / 1e6:.1f} MB")
    if "recover" in report:
        lines.append(f"recovery         {report['recover']['steps']} steps in {report['seconds_recover']:.1f} s")
    lines.append(f"pruning time     {report['seconds_prune']:.1f} s"
                 + (f" ({report['prune_time_over_forward']:.2f}x one forward pass over the calibration set)"
                    if "prune_time_over_forward" in report else ""))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:  # under torchrun: join the process group; each rank gets its own device
        args.device = distributed.init_from_env(args.device)
    except ValueError as exc:
        print(f"stat-prune: error: {exc}", file=sys.stderr)
        return 2
    worker = not distributed.is_main()  # only rank 0 prints progress, evaluates and exports
    if worker:
        from transformers.utils import logging as hf_logging

        args.quiet, args.skip_eval, args.measure_floor = True, True, False
        hf_logging.disable_progress_bar()
    logging.basicConfig(level=logging.ERROR if worker else logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(message)s")
    def _stop(signum, _frame):  # SIGTERM unwinds like Ctrl-C: partial export folders are removed on the way out
        raise KeyboardInterrupt(signum)

    previous = {}  # SIGTERM and SIGHUP (a closed terminal) unwind like Ctrl-C
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        report = run(args)
    except KeyboardInterrupt as exc:
        signum = exc.args[0] if exc.args and isinstance(exc.args[0], int) else signal.SIGINT
        print(f"stat-prune: stopped by {signal.Signals(signum).name}; {args.out} was left as it was (partial "
              "output removed): run the command again to prune.", file=sys.stderr)
        return 128 + int(signum)
    except distributed.PeerError:  # another rank failed and says why
        return 2
    except PermissionError as exc:  # an unreadable input or an unwritable output, wherever it is met
        where = f"'{exc.filename}'" if exc.filename else "a file this run needs"
        print(f"stat-prune: error: permission denied on {where}; make it readable (inputs) or writable "
              "(outputs), or choose another path.", file=sys.stderr)
        return 2
    except (ModelLoadError, UnsupportedModelError, DataError, ExportError, ValueError) as exc:
        where = f" (rank {distributed.rank()})" if worker else ""
        print(f"stat-prune: error{where}: {exc}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        distributed.shutdown()
    if worker:
        return 0
    print(_summary(report))
    if args.no_model:
        print(f"wrote {Path(args.out) / 'pruning_report.json'} and plan.json")
    else:
        how = {"gguf": "llama.cpp; see its README.md", "onnx": "onnxruntime; see its README.md"}.get(
            report["export"]["format"], "stock from_pretrained" if report["export"]["uniform"]
            else "stat_core.load_pruned or from_pretrained(..., trust_remote_code=True)")
        print(f"wrote the pruned model to {args.out} (loads with {how})")
    if getattr(args, "report_html", None):
        print(f"wrote the HTML report to {args.report_html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
