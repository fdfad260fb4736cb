"""Layer streaming: prune a model that does not fit in memory, one transformer block at a time.

:func:`streamed_prune` never holds more than one block's weights. The model is built as a
skeleton on the ``meta`` device (no storage) from its ``config.json``; the weights are read by
tensor name from the checkpoint's safetensors (``model.safetensors`` or the shards named in
``model.safetensors.index.json``) only when needed:

1. the embeddings, to turn the calibration windows into block 0's inputs (then freed);
2. first pass, per block: load its weights, run the calibration hidden states through it
   collecting its statistics (:meth:`LayerwiseRunner.collect_block`), summarise it for the method
   (:meth:`PruningMethod.layer_summary`: STAT's analysis, a peer's head and neuron scores), write its
   statistics to a scratch file, free it;
3. the plan from every layer's summary (:meth:`PruningMethod.plan_from_summaries`, the same code the
   in-memory prune runs);
4. second pass, per block: load it again with its statistics, cut and correct it
   (:func:`stat_core.surgery.apply.apply_layer_`), write its tensors as one shard of the output, free it;
5. the rest (embeddings, final norm, head) copied into a last shard, the shard index, the config
   with every layer's pruned widths, ``plan.json``, ``pruning_report.json``, the model card and
   (per-layer widths) ``modeling_stat.py``: the folder loads the three ways an ordinary export does
   (:mod:`stat_core.export.hf`). Everything is written to a hidden sibling folder renamed into place
   at the end, so a failed or interrupted run leaves no half-written output.

Peak memory ≈ the interpreter + one block's weights + the calibration hidden states + one block's
float64 statistics and decompositions (``d_ff²`` doubles: the largest term for 7B shapes). The
linear algebra keeps at most two d_ff² matrices alive (the statistics wait on disk; the pivoted
Cholesky, the permutation, the factorization and the solves run in place), linear weights stay in
the checkpoint's dtype while they run: a Llama-2-7B-shaped bf16 checkpoint (13.5 GB) streams in
2.9 GB of resident memory (README, "Layer streaming").

What streaming does not do: the gradient-based sensitivity pass (which weights each layer's
damage by its effect on the loss) needs a backward pass through every block; streaming skips it
and the allocator falls back to the residual-energy weighting (``fisher=None``, the same as
``PruneConfig(sensitivity_samples=0)`` in memory). One-shot methods that plan layer by layer stream
(``PruningMethod.streams``: STAT, FLAP, Wanda-sp, SlimGPT); propagate and sequential modes and the methods
that need the whole model at once refuse ``--offload`` in one sentence.
"""

from __future__ import annotations

import json
import logging
import sys
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from stat_core.adapters import get_adapter, supported_model_types
from stat_core.adapters import modeling_stat as remote_modeling
from stat_core.adapters.registry import ENCODER_TYPES, is_encoder
from stat_core.calibration import distributed
from stat_core.calibration.statistics import (
    BlockStats,
    CalibrationSet,
    LayerwiseRunner,
    _StopForward,
    release_memory,
)
from stat_core.config import PruneConfig
from stat_core.evaluation.report import prune_report, set_after_sizes
from stat_core.export.common import (
    MODELING_FILE,
    ExportInfo,
    _is_uniform,
    atomic_output_dir,
    check_output_dir,
    drop_tokenizer_auto_map,
    export_config,
)
from stat_core.export.hf import _state_dict_for, model_card, modeling_file_text
from stat_core.methods.base import check_budget_feasible
from stat_core.methods.registry import get_method, method_names
from stat_core.models import DTYPES, check_safetensors_file, load_tokenizer_only, resolve_model_path
from stat_core.pipeline import calibration_data, resolve_source
from stat_core.progress import ProgressFn, TqdmProgress, notify
from stat_core.surgery.apply import apply_layer_
from stat_core.surgery.budget import budget_summary
from stat_core.surgery.plan import PrunePlan

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Files besides the weights that describe the model and travel with the export unchanged.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")



class StreamingError(ValueError):
    """The checkpoint cannot be streamed, or the configuration cannot run streamed (one sentence)."""


# --- the checkpoint --------------------------------------------------------------------------------

class SafetensorsCheckpoint:
    """Tensor names → files of a safetensors checkpoint folder; reads tensors by name on demand.

    Each read opens the files it needs and closes them again, so no mapping of the whole
    checkpoint stays in the process.
    """

    def __init__(self, folder: str | Path):
        folder = Path(folder).expanduser()
        if not folder.is_dir():
            raise StreamingError(f"'{folder}' is not a folder; streaming reads a local model folder "
                                 "(config.json and .safetensors weights).")
        if not (folder / "config.json").is_file():
            raise StreamingError(f"'{folder}' has no config.json; it is not a model folder.")
        self.folder = folder

        for file in sorted(folder.glob("*.safetensors")):  # a damaged file: one sentence, not a SafetensorError
            problem = check_safetensors_file(file)
            if problem:
                raise StreamingError(f"'{file.name}' in '{folder}' is not a readable safetensors file ({problem}); "
                                     "copy or download the weights again.")
        index = folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, UnicodeDecodeError) as exc:
                raise StreamingError(f"'{index}' is not a valid safetensors index (no readable weight_map).") from exc
            missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
            if missing:
                raise StreamingError(f"The shard '{missing[0]}' named in '{index.name}' is missing from '{folder}'"
                                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                                     + "; copy every shard into the folder.")
            self.files = dict(weight_map)
        else:
            files = sorted(folder.glob("*.safetensors"))
            if not files:
                if any(any(folder.glob(p)) for p in ("*.bin", "*.pt", "*.pth", "*.ckpt")):
                    raise StreamingError(
                        f"'{folder}' has only pickled weights (e.g. pytorch_model.bin); streaming reads safetensors: "
                        "convert them once (load the model and save_pretrained(..., safe_serialization=True)).")
                raise StreamingError(f"'{folder}' has no .safetensors weights to stream.")
            self.files = {}
            from safetensors import safe_open

            for f in files:
                with safe_open(str(f), framework="pt") as handle:
                    for name in handle.keys():
                        self.files[name] = f.name

    def names(self) -> set[str]:
        return set(self.files)

    def size_on_disk(self) -> int:
        return sum((self.folder / f).stat().st_size for f in set(self.files.values()))

    def dtype(self) -> torch.dtype | None:
        """The dtype of the checkpoint's first floating-point tensor (None if it has none)."""
        from safetensors import safe_open

        for f in sorted(set(self.files.values())):
            with safe_open(str(self.folder / f), framework="pt") as handle:
                for name in handle.keys():
                    sl = handle.get_slice(name)
                    dt = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                          "F64": torch.float64}.get(sl.get_dtype())
                    if dt is not None:
                        return dt
        return None

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` (on CPU) for checkpoint tensor ``names``."""
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.files[n], []).append(n)
        out = {}
        for f, group in by_file.items():
            with safe_open(str(self.folder / f), framework="pt") as handle:
                for n in group:
                    out[n] = handle.get_tensor(n)
        return out


# --- the skeleton ----------------------------------------------------------------------------------

def _auto_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if config.model_type in ENCODER_TYPES else AutoModelForCausalLM


def build_skeleton(folder: str | Path, dtype: torch.dtype):
    """The model of ``folder``'s config with every parameter on ``meta`` (no storage); buffers that
    are no checkpoint's business (rotary frequencies, position ids) are real, on the CPU. The same
    class the CLI loads in memory: a causal LM, or a sequence classifier for encoder families."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise StreamingError(f"The config.json in '{folder}' cannot be read: {str(exc).splitlines()[0]}") from exc
    if config.model_type not in supported_model_types():
        raise StreamingError(f"Model type '{config.model_type}' is not supported; supported types are: "
                             f"{', '.join(supported_model_types())}.")
    with init_empty_weights(include_buffers=False):
        model = _auto_class(config).from_config(config, dtype=dtype)
        if getattr(config, "stat_layer_shapes", None):  # this tool's per-layer export: each layer its own widths
            remote_modeling.resize_to_layer_shapes_(model, config.stat_layer_shapes)
    model.tie_weights()  # under init_empty_weights tied parameters start as two meta tensors
    return model.eval()


def _layers_prefix(model, adapter) -> str:
    for name, module in model.named_modules():
        if module is adapter.layers:
            return name
    raise StreamingError("could not find the transformer blocks in the model")


def _tensor_names(module: nn.Module) -> list[str]:
    """Names of ``module``'s parameters and persistent buffers (what a state dict holds), tied
    parameters once."""
    names = [n for n, _ in module.named_parameters()]
    persistent = set(module.state_dict(keep_vars=True))
    names += [n for n, _ in module.named_buffers() if n in persistent]
    return names


class _NameMap:
    """Model tensor name → checkpoint tensor name (the same, or with/without the base model prefix)."""

    def __init__(self, model, checkpoint: SafetensorsCheckpoint):
        self.available = checkpoint.names()
        self.prefix = getattr(model, "base_model_prefix", "") or ""

    def __call__(self, name: str) -> str | None:
        if name in self.available:
            return name
        p = self.prefix + "."
        alt = name[len(p):] if name.startswith(p) else p + name
        return alt if alt in self.available else None


def _load_module_(module: nn.Module, prefix: str, checkpoint: SafetensorsCheckpoint, names: _NameMap,
                  dtype: torch.dtype, skip: set[str] = frozenset(),
                  keep_stored: "Callable[[str, torch.dtype], bool] | None" = None) -> None:
    """Give ``module``'s meta parameters (and persistent buffers found in the checkpoint) their
    values from the checkpoint, floating-point ones cast to ``dtype`` unless
    ``keep_stored(local name, stored dtype)`` says to keep the checkpoint's dtype."""
    wanted = {}
    params = dict(module.named_parameters())
    for local in _tensor_names(module):
        full = prefix + local
        if full in skip:
            continue
        source = names(full)
        if source is None:
            if local in params:
                raise StreamingError(f"The checkpoint in '{checkpoint.folder}' has no tensor '{full}'; its weights "
                                     "do not match its config.json.")
            continue  # a buffer the checkpoint does not carry keeps its constructed value
        wanted[local] = source
    values = checkpoint.read(list(wanted.values()))
    for local, source in wanted.items():
        t = values.pop(source)
        if t.is_floating_point() and not (keep_stored is not None and keep_stored(local, t.dtype)):
            t = t.to(dtype)
        owner_name, _, attr = local.rpartition(".")
        owner = module.get_submodule(owner_name) if owner_name else module
        if attr in owner._parameters:
            expected = owner._parameters[attr].shape
            if t.shape != expected:
                raise StreamingError(f"The checkpoint's '{source}' has shape {tuple(t.shape)}, the config says "
                                     f"{tuple(expected)}; its weights do not match its config.json.")
            owner._parameters[attr] = nn.Parameter(t, requires_grad=False)
        else:
            owner._buffers[attr] = t


def _free_(module: nn.Module) -> None:
    """Back to ``meta``: the module keeps its (possibly pruned) shapes and no storage."""
    module.to("meta")


# --- the runner ------------------------------------------------------------------------------------

class _StreamedRunner(LayerwiseRunner):
    """A :class:`LayerwiseRunner` over a skeleton whose blocks are on ``meta``: the per-block call
    arguments are captured with every block replaced by the identity (the real runner runs the
    whole model once for them)."""

    def __init__(self, model, adapter, windows, batch_size, device):
        self._device = device
        super().__init__(model, adapter, windows, batch_size)
        self.device = device

    @torch.no_grad()
    def _capture_layer_kwargs(self, one_window: torch.Tensor) -> list[dict]:
        layers = self.adapter.layers
        captured: list[dict | None] = [None] * len(layers)

        def make_hook(idx):
            def hook(_module, args, kwargs):
                captured[idx] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            return hook

        def identity(hidden_states=None, *args, **kwargs):
            return hidden_states

        def stop(*_args, **_kwargs):
            raise _StopForward

        handles = [layer.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
        handles.append(layers[len(layers) - 1].register_forward_hook(stop))
        for layer in layers:
            layer.forward = identity
        try:
            self.model(input_ids=one_window.to(self._device), use_cache=False)
        except _StopForward:
            pass
        finally:
            for h in handles:
                h.remove()
            for layer in layers:
                del layer.forward
        for kw in captured:
            kw["use_cache"] = False
            kw.pop("past_key_values", None)
            kw.pop("past_key_value", None)
        return captured


# --- the pipeline -----------------------------------------------------------------------------------

@dataclass
class StreamedResult:
    plan: PrunePlan
    export: ExportInfo
    timings: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def streaming_methods() -> list[str]:
    """The methods that plan layer by layer, so ``--offload`` can run them."""
    return [name for name in method_names() if get_method(name).streams]


def check_streamable_method(method: str, mode: str) -> None:
    if mode != "one-shot" or method not in streaming_methods():
        raise StreamingError(f"Streaming (--offload) runs one-shot methods that plan layer by layer "
                             f"({', '.join(streaming_methods())}); got method '{method}', mode '{mode}': drop "
                             f"--offload or choose one of those with --mode one-shot.")


def check_default_settings(method: str, settings) -> None:
    """Streaming runs a method with its default settings (its options need the whole model), unless
    the method's settings read one layer at a time (``PruningMethod.streamed_settings``)."""
    if get_method(method).streamed_settings:
        return
    if settings is not None and settings != type(settings)():
        raise StreamingError(f"Streaming (--offload) runs {get_method(method).label} with its default "
                             f"settings; drop the --{method}-* options or --offload.")


def check_streamable(config: PruneConfig) -> None:
    """One sentence when ``config`` asks for something streaming does not do."""
    check_streamable_method(config.method, config.mode)
    if distributed.is_distributed():
        raise StreamingError("Streaming (--offload) runs in one process; start it without torchrun.")
    check_default_settings(config.method, config.settings)




def streamed_prune(model_dir: str | Path, windows, config: PruneConfig, out_dir: str | Path,
                   progress: ProgressFn | None = None, *, dtype: torch.dtype | None = None, model_name: str = "",
                   calibration_info: dict | None = None, report: dict | None = None, overwrite: bool = False,
                   work_dir: str | Path | None = None, save_dtype: torch.dtype | None = None) -> StreamedResult:
    """Prune the model in ``model_dir`` (a local folder with safetensors weights) one-shot with
    ``config.method`` (STAT, or a peer that plans layer by layer: :func:`streaming_methods`) on calibration ``windows: (n, T)`` (or a :class:`CalibrationSet`), block by block, and write the
    pruned model to ``out_dir`` like :func:`stat_core.export.hf.export_pruned` does.

    ``dtype``: the compute and output dtype (default: the checkpoint's). The gradient sensitivity
    pass is skipped (``fisher=None``, residual-energy weighting): the plan and weights equal an
    in-memory ``stat_prune_`` with ``sensitivity_samples=0``. ``save_dtype``: the exported weights'
    dtype when it should differ from ``dtype`` (e.g. compute in float32 on a CPU, whose bfloat16
    matrix products are slow, and write bfloat16 like the checkpoint). ``work_dir``: where the per-block
    statistics wait between the passes, in a folder of this run's own (default: the system's temporary
    folder); it is removed at the end, also on failure or interrupt.
    """
    t0 = time.perf_counter()
    check_streamable(config)
    checkpoint = SafetensorsCheckpoint(model_dir)
    check_output_dir(out_dir, overwrite, source=model_dir)  # before minutes of work
    dtype = dtype or checkpoint.dtype() or torch.float32
    save_dtype = save_dtype or dtype

    def saved(t: torch.Tensor) -> torch.Tensor:
        return (t.to(save_dtype) if t.is_floating_point() else t).detach().contiguous()
    model = build_skeleton(checkpoint.folder, dtype)
    adapter = get_adapter(model)

    method = get_method(config.method)
    method.check_applicable(model)
    check_budget_feasible(model, config)
    names = _NameMap(model, checkpoint)
    layers_prefix = _layers_prefix(model, adapter) + "."
    # What the export writes outside the blocks, named now while tied parameters are still one
    # object (loading gives the embeddings their own storage and unties them in the skeleton).
    rest_names = [n for n in _tensor_names(model) if not n.startswith(layers_prefix)]
    before = model_sizes(model, config.flops_seq_len)
    check_disk_space(model, before, config.sparsity, save_dtype, out_dir, work_dir)  # before any work, one sentence
    n_layers = adapter.num_layers
    block_prefix = [f"{layers_prefix}{i}." for i in range(n_layers)]
    data = CalibrationSet.wrap(windows)
    if config.sensitivity_samples not in (None, 0):
        log.warning("streaming skips the gradient sensitivity pass; layers are weighted by residual energy")
    timings: dict[str, float] = {}
    info = {"streamed": True, "sensitivity": "skipped (streaming): residual-energy weighting",
            "checkpoint_bytes": checkpoint.size_on_disk(), "dtype": str(dtype).replace("torch.", "")}

    # Everything outside the blocks except an untied output head (only the embeddings run here).
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_names = set()
    if head is not None:
        head_names = {n for n, m in model.named_modules() if m is head}
    notify(progress, "embed", 0, 1)
    t = time.perf_counter()
    skip_blocks = set()
    for i, _ in enumerate(adapter.layers):
        skip_blocks.update(block_prefix[i] + n for n in _tensor_names(adapter.layers[i]))
    skip_head = {f"{h}.{n}" for h in head_names for n in _tensor_names(head)}
    _load_module_(model, "", checkpoint, names, dtype, skip=skip_blocks | skip_head)
    device = torch.device("cpu")
    runner = _StreamedRunner(model, adapter, data, config.batch_size, device)
    _free_outside_blocks_(model, adapter)  # the embeddings are done: their storage goes
    timings["embed"] = time.perf_counter() - t
    notify(progress, "embed", 1, 1)

    # A private folder per run, inside ``work_dir`` when given: two runs sharing one --work-dir never read
    # each other's statistics, and the folder goes at the end whatever happened.
    if work_dir is not None:
        Path(work_dir).expanduser().mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="stat-stream-", dir=None if work_dir is None else Path(work_dir).expanduser()))
    try:
        # First pass: statistics and the method's summary (STAT's analysis, a peer's scores), block by block.
        t = time.perf_counter()
        summaries, hidden = [], runner.hidden
        runner.hidden = None
        t_analyse = 0.0
        for i in range(n_layers):
            block = adapter.layers[i]
            linears = {n for n, m in block.named_modules() if type(m) is nn.Linear}

            def keep_linear(local: str, stored: torch.dtype) -> bool:
                return stored != dtype and _widens(stored, dtype) and local.rpartition(".")[0] in linears

            # Linear weights stay as stored (e.g. bfloat16: half a float32 block) and are widened to
            # ``dtype`` one matrix at a time as each runs: the same products as a float32 block.
            _load_module_(block, block_prefix[i], checkpoint, names, dtype, keep_stored=keep_linear)
            restore = _widen_linears_on_the_fly_(block, dtype)
            stats, hidden = runner.collect_block(i, hidden)
            restore()
            release_memory()
            # The analysis reads only the two output projections: the rest of the block goes now,
            # and those two once the analysis has its float64 copies of them (drop_weights).
            _free_except_(block, [adapter.attn_out_proj(i), adapter.mlp_out_proj(i)])
            # The statistics wait on disk from now on; the analysis consumes the in-memory copy
            # and reads the MLP Gram back once (at most two d_ff² float64 matrices alive).
            stats_file = scratch / f"block-{i:05d}"
            _save_block_stats(stats_file, stats)
            ta = time.perf_counter()
            summaries.append(method.layer_summary(adapter, i, stats, config,
                                                  reload=lambda f=stats_file: _load_block_stats(f),
                                                  drop_weights=lambda b=block: _free_(b)))
            t_analyse += time.perf_counter() - ta
            del stats
            _free_(block)
            release_memory()
            notify(progress, "calibrate", i + 1, n_layers)
        del hidden
        runner.batches = []
        timings["calibrate"] = time.perf_counter() - t - t_analyse
        timings["analyse"] = t_analyse

        t = time.perf_counter()
        plan = method.plan_from_summaries(adapter, summaries, config, model_name, calibration_info or {})
        del summaries
        timings["allocate"] = time.perf_counter() - t

        # Second pass: cut, correct and write each block; then the rest of the model.
        t = time.perf_counter()
        uniform_plan = bool(plan.budget.get("uniform"))
        n_files = n_layers + 1
        weight_map: dict[str, str] = {}
        total = 0
        report = dict(report or {})
        from safetensors.torch import save_file

        # The second pass only slices the tensors other than the two output projections (which the
        # correction recomputes in ``dtype``): where the checkpoint already stores them in the
        # export's dtype and ``dtype`` is at least as precise, they stay as stored (half the
        # memory of a float32 block; the same exported bits, since the cast would round-trip).
        out_projs = {n for n, m in adapter.layers[0].named_modules()
                     if m is getattr(adapter.attn_out_proj(0), "module", adapter.attn_out_proj(0))
                     or m is getattr(adapter.mlp_out_proj(0), "module", adapter.mlp_out_proj(0))}

        def keep_stored(local: str, stored: torch.dtype) -> bool:
            return (stored == save_dtype and _widens(stored, dtype)
                    and local.rpartition(".")[0] not in out_projs)

        with atomic_output_dir(out_dir, overwrite) as tmp:
            for i in range(n_layers):
                block = adapter.layers[i]
                _load_module_(block, block_prefix[i], checkpoint, names, dtype, keep_stored=keep_stored)
                stats = _load_block_stats(scratch / f"block-{i:05d}")
                # release: each Gram goes as soon as its correction has the kept rows
                apply_layer_(adapter, plan.layers[i], stats, plan.correction, plan.correction_ridge, uniform_plan,
                             release=True)
                del stats
                tensors = {block_prefix[i] + k: saved(v) for k, v in block.state_dict().items()}
                fname = f"model-{i + 1:05d}-of-{n_files:05d}.safetensors"
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(tensors, fname))
                total += sum(v.numel() * v.element_size() for v in tensors.values())
                del tensors
                _free_(block)
                release_memory()
                notify(progress, "apply", i + 1, n_layers)
            adapter.record_shapes_in_config_()
            timings["apply"] = time.perf_counter() - t
            after = model_sizes(model, config.flops_seq_len)
            info.update(sizes_before=before, sizes_after=after)
            if "block_params_before" in report:  # a report from stat_core.evaluation.report.prune_report
                set_after_sizes(report, after)
                report["predicted_damage"] = plan.budget.get("predicted_damage")
                report["layers"] = plan.kept_summary()
                report["seconds_prune"] = time.perf_counter() - t0
                report["seconds_prune_stages"] = dict(timings)

            t = time.perf_counter()
            uniform = _is_uniform(adapter)
            rest = _rest_tensors(model, rest_names, checkpoint, names, save_dtype, set(weight_map), uniform,
                                 layers_prefix)
            rest = {k: saved(v) for k, v in rest.items()}
            fname = f"model-{n_files:05d}-of-{n_files:05d}.safetensors"
            save_file(rest, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(rest, fname))
            total += sum(v.numel() * v.element_size() for v in rest.values())
            del rest
            (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2))
            out_config = export_config(model, uniform)
            out_config.dtype = str(save_dtype).removeprefix("torch.")
            out_config.to_json_file(tmp / "config.json")
            for f in TOKENIZER_FILES:
                if (checkpoint.folder / f).is_file():
                    shutil.copyfile(checkpoint.folder / f, tmp / f)
            drop_tokenizer_auto_map(tmp)
            if not uniform:
                (tmp / MODELING_FILE).write_text(modeling_file_text(model))
            size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
            report["size_on_disk_after_bytes"] = size
            report.setdefault("size_on_disk_before_bytes", info["checkpoint_bytes"])
            report["export"] = {"uniform": uniform, "streamed": True, "loads_with": ["stat_core.load_pruned"]
                                + (["stock from_pretrained"] if uniform else ["from_pretrained(trust_remote_code=True)"])}
            report["streaming"] = info
            plan.to_json(tmp / "plan.json")
            (tmp / "pruning_report.json").write_text(json.dumps(report, indent=1))
            (tmp / "README.md").write_text(model_card(model, plan, report, uniform, size))
            files = tuple(sorted(p.name for p in tmp.iterdir()))
            timings["export"] = time.perf_counter() - t
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    timings["total"] = time.perf_counter() - t0
    export = ExportInfo(path=Path(out_dir).expanduser(), size_bytes=size, uniform=uniform, files=files)
    return StreamedResult(plan=plan, export=export, timings=timings, info=info)


def _widens(src: torch.dtype, dst: torch.dtype) -> bool:
    """Whether every ``src`` value survives a cast to ``dst`` and back unchanged."""
    if src == dst:
        return True
    return dst in (torch.float32, torch.float64) and src in (torch.bfloat16, torch.float16, torch.float32) \
        and torch.finfo(dst).bits > torch.finfo(src).bits


def _widen_linears_on_the_fly_(block: nn.Module, dtype: torch.dtype) -> Callable[[], None]:
    """Make every ``nn.Linear`` of ``block`` whose weight is not ``dtype`` compute in ``dtype`` (its
    weight and bias cast for each call, then dropped); returns the undo."""
    from torch.nn import functional as F

    patched = []
    for m in block.modules():
        if type(m) is nn.Linear and m.weight.dtype != dtype:
            m.forward = (lambda x, m=m: F.linear(x, m.weight.to(dtype), None if m.bias is None else m.bias.to(dtype)))
            patched.append(m)

    def restore() -> None:
        for m in patched:
            del m.forward

    return restore


def disk_needs(model: nn.Module, sizes: dict, sparsity: float, save_dtype: torch.dtype) -> tuple[int, int]:
    """``(scratch_bytes, output_bytes)`` a streamed prune of ``model`` (a skeleton: shapes only; ``sizes``
    its :func:`model_sizes`) writes: every block's float64 statistics (two Grams and two sums) wait on
    disk between the passes, and the output holds the model without ``sparsity`` of its block
    parameters, in ``save_dtype`` (a FLOPs budget is counted as that share of parameters: an estimate)."""
    adapter = get_adapter(model)
    widths = [proj.in_features for i in range(adapter.num_layers)
              for proj in (adapter.attn_out_proj(i), adapter.mlp_out_proj(i))]
    scratch = sum(8 * (n * n + n) for n in widths)
    return scratch, int((sizes["params"] - sparsity * sizes["block_params"]) * save_dtype.itemsize)


def check_disk_space(model: nn.Module, sizes: dict, sparsity: float, save_dtype: torch.dtype,
                     out_dir: str | Path, work_dir: str | Path | None) -> None:
    """StreamingError (one sentence) when the disks holding the scratch statistics and the output
    have less free space than the streamed prune will write (10% margin), before any of it starts."""
    scratch_bytes, out_bytes = disk_needs(model, sizes, sparsity, save_dtype)

    def existing(path: Path) -> Path:
        path = path.resolve()
        while not path.exists() and path != path.parent:
            path = path.parent
        return path

    scratch_at = existing(Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir()))
    out_at = existing(Path(out_dir).parent)
    needs: dict[int, list] = {}  # device id -> [bytes, path, free]
    for at, nbytes in ((scratch_at, scratch_bytes), (out_at, out_bytes)):
        dev = os.stat(at).st_dev
        entry = needs.setdefault(dev, [0, at, shutil.disk_usage(at).free])
        entry[0] += nbytes
    for nbytes, at, free in needs.values():
        if free < 1.1 * nbytes:
            gb = 1024 ** 3
            raise StreamingError(
                f"Not enough free disk space: the streamed prune writes about {scratch_bytes / gb:.1f} GiB of "
                f"statistics to '{scratch_at}' and a {out_bytes / gb:.1f} GiB pruned model next to '{out_dir}', "
                f"but '{at}' has {free / gb:.1f} GiB free; free some space or choose another --out or --work-dir.")


def _save_block_stats(path: Path, stats: BlockStats) -> None:
    """One block's statistics as raw ``.npy`` files in the folder ``path`` (written straight from the
    tensors' memory and read back into fresh ones: no copy in between, no mapping of the file, so a
    d_ff² float64 Gram costs its own bytes only; the same numbers bit for bit)."""
    import numpy as np

    path.mkdir(parents=True, exist_ok=True)
    for name in ("attn_gram", "mlp_gram", "attn_sum", "mlp_sum"):
        t = getattr(stats, name)
        if t is not None:
            np.save(path / f"{name}.npy", t.detach().cpu().contiguous().numpy())
    (path / "scalars.json").write_text(json.dumps({"n_tokens": stats.n_tokens,
                                                   "resid_energy": float(stats.resid_energy)}))


def _load_block_stats(path: Path) -> BlockStats:
    import numpy as np

    def read(name):
        f = path / f"{name}.npy"
        return torch.from_numpy(np.load(f)) if f.is_file() else None

    scalars = json.loads((path / "scalars.json").read_text())
    return BlockStats(read("attn_gram"), read("mlp_gram"), int(scalars["n_tokens"]), float(scalars["resid_energy"]),
                      read("attn_sum"), read("mlp_sum"))


def model_sizes(model, seq_len: int) -> dict:
    """:func:`stat_core.evaluation.report.size_summary` for a skeleton (parameters on ``meta`` have no storage
    to tell tied ones apart by: ``named_parameters`` names each tensor once)."""

    params = dict(model.named_parameters())
    s = budget_summary(model, seq_len)
    return {"params": sum(p.numel() for p in params.values()), "block_params": s["block_params"],
            "block_macs_per_token": s["block_macs_per_token"],
            "bytes": sum(p.numel() * p.element_size() for p in params.values())}


def _free_except_(block: nn.Module, keep: list) -> None:
    """Every parameter of ``block`` back to ``meta`` except those of the ``keep`` projections."""
    kept = {id(p) for proj in keep for p in getattr(proj, "module", proj).parameters()}
    for module in block.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and id(p) not in kept and p.device.type != "meta":
                module._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _free_outside_blocks_(model, adapter) -> None:
    """Every parameter outside the blocks back to ``meta`` (buffers stay: they are small and the
    runner's captured arguments may refer to them)."""
    in_blocks = {id(p) for p in adapter.layers.parameters()}
    for module in model.modules():
        for attr, p in list(module._parameters.items()):
            if p is not None and id(p) not in in_blocks and p.device.type != "meta":
                module._parameters[attr] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)


def _rest_tensors(model, rest_names: list[str], checkpoint, names, dtype, written: set[str], uniform: bool,
                  layers_prefix: str) -> dict[str, torch.Tensor]:
    """The tensors outside the blocks, read from the checkpoint in ``dtype`` (tied parameters once),
    plus the zero biases a uniform export declares through a stock flag (see export._state_dict_for)."""
    out = {}
    for name in rest_names:
        source = names(name)
        if source is None:
            buf = dict(model.named_buffers()).get(name)
            if buf is not None and buf.device.type != "meta":
                out[name] = buf.detach().contiguous()
                continue
            raise StreamingError(f"The checkpoint in '{checkpoint.folder}' has no tensor '{name}'; its weights do "
                                 "not match its config.json.")
        t = checkpoint.read([source])[source]
        out[name] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    if uniform:
        for key, t in _state_dict_for(model, uniform).items():
            if key not in written and key not in out and key.startswith(layers_prefix):
                out[key] = torch.zeros(t.shape, dtype=t.dtype)
    return out


# --- the command line (stat-prune --offload) ----------------------------------------------------------

def run_offload(args, settings=None) -> dict:
    """``stat-prune MODEL --offload ...``: the streamed prune of a local safetensors folder, with the
    CLI's calibration sources and report. No quality evaluation (it needs the whole model in memory:
    evaluate the exported folder afterwards)."""

    if args.no_model or args.format != "safetensors":
        raise StreamingError("--offload writes the pruned model block by block as a safetensors folder; drop "
                             "--no-model / --format with --offload.")
    if args.recover:
        raise StreamingError("--recover trains the whole model in memory, which --offload avoids; drop one of them.")
    check_streamable_method(args.method, args.mode)
    check_default_settings(args.method, settings)
    if args.device not in ("auto", "cpu"):
        raise StreamingError(f"--offload runs on the CPU for now; drop --device {args.device} (or --offload).")
    path = resolve_model_path(args.model)
    checkpoint = SafetensorsCheckpoint(path)
    check_output_dir(args.out, args.overwrite, source=path)
    # Default: compute in float32 (CPUs multiply bfloat16 slowly), export in the checkpoint's dtype.
    stored = checkpoint.dtype() or torch.float32
    dtype = DTYPES[args.dtype] if args.dtype else torch.float32
    skeleton = build_skeleton(checkpoint.folder, dtype)
    tokenizer = load_tokenizer_only(str(checkpoint.folder))
    encoder = is_encoder(skeleton)
    source = args.labelled if encoder else (args.calibration or "wikipedia")
    if not encoder and args.calibration is None and not getattr(args, "quiet", False):
        from stat_core.data.recipe import resolve_recipe

        print(resolve_recipe(skeleton, tokenizer, offload=True).sentence, file=sys.stderr, flush=True)
    if not encoder and source in ("mix", "self-generated"):
        raise StreamingError(f"--calibration {source} generates text with the whole model, which --offload never "
                             "holds in memory; use --calibration wikipedia or a text file.")
    kind, builtin, file_path = resolve_source(skeleton, tokenizer, source)
    prepared = calibration_data(skeleton, tokenizer, args.model, kind, builtin, file_path,
                                num_samples=args.num_samples, seq_len=args.seq_len, seed=args.seed,
                                text_columns=tuple(args.text_column or ["text"]), label_column=args.label_column)
    for warning in prepared.warnings:
        log.warning(warning)
    data = CalibrationSet.wrap(prepared.data)
    info = prepared.info
    n_tokens = int(data.attention_mask.sum()) if data.attention_mask is not None else int(data.input_ids.numel())
    info.setdefault("tokens", n_tokens)
    flops_seq_len = args.flops_seq_len or (max(1, round(n_tokens / len(data))) if encoder else 512)
    config = PruneConfig(sparsity=args.sparsity, budget_kind=args.budget, flops_seq_len=flops_seq_len,
                         method=args.method, mode="one-shot", prune_heads=not args.no_heads,
                         prune_neurons=not args.no_neurons, sensitivity_samples=0, batch_size=args.batch_size,
                         uniform=args.uniform, intercept=args.intercept, settings=settings)
    report = prune_report(args.model, skeleton, config, info, model_sizes(skeleton, flops_seq_len))
    report.update(device="cpu (streamed block by block)", dtype=str(dtype).removeprefix("torch."),
                  evaluation="skipped: --offload never holds the whole model; evaluate the exported folder")
    del skeleton
    progress = None
    if not args.quiet:

        progress = TqdmProgress(True)
    result = streamed_prune(checkpoint.folder, data, config, args.out, progress, dtype=dtype, model_name=args.model,
                            calibration_info=info, report=report, overwrite=args.overwrite,
                            save_dtype=None if args.dtype else stored, work_dir=args.work_dir)
    report = json.loads((Path(args.out) / "pruning_report.json").read_text())
    report["export"] = {"uniform": result.export.uniform, "format": "safetensors", "files": list(result.export.files)}
    return report
