"""Write a pruned model to a folder that loads wherever the original did, and read it back.

A folder holds ``model.safetensors``, ``config.json`` (every layer's head / KV-head / MLP widths in
``stat_layer_shapes``), the tokenizer, ``plan.json``, ``pruning_report.json`` and a model card
(``README.md``). It loads three ways:

1. :func:`load_pruned` — stock classes resized by our own code, nothing from the folder executed;
2. ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` — through ``modeling_stat.py``
   written into the folder (a copy of :mod:`stat_core.remote_modeling`) and an ``auto_map`` entry;
   needs stock transformers only;
3. when every layer has the same shape (``PruneConfig(uniform=True)``), the config's own fields say
   it all and stock ``from_pretrained`` loads it with no custom code; no modeling file is written.

Writes go to a hidden temporary sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

from .adapters import get_adapter
from .plan import PrunePlan
from . import remote_modeling

MODELING_FILE = "modeling_stat.py"
# Stock auto class for each head type the export knows how to name in ``auto_map``.
_AUTO_CLASSES = (("ForCausalLM", "AutoModelForCausalLM"),
                 ("LMHeadModel", "AutoModelForCausalLM"),  # GPT2LMHeadModel
                 ("ForSequenceClassification", "AutoModelForSequenceClassification"),
                 ("ForTokenClassification", "AutoModelForTokenClassification"),
                 ("ForQuestionAnswering", "AutoModelForQuestionAnswering"),
                 ("ForMaskedLM", "AutoModelForMaskedLM"),
                 ("Model", "AutoModel"))


class ExportError(ValueError):
    """The export folder cannot be written, or a folder is not a loadable (pruned) model."""


@dataclass(frozen=True)
class ExportInfo:
    path: Path
    size_bytes: int          # weights on disk (safetensors files)
    uniform: bool            # safetensors: loads with stock transformers, no custom code
    files: tuple[str, ...]
    format: str = "safetensors"


# --- atomic folders -----------------------------------------------------------------------------

REPORT_FILE = "pruning_report.json"  # the mark of a folder this tool wrote (the only kind overwrite replaces)


def check_output_dir(out: str | Path, overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Refuse, in one sentence and before any work: a path that is a file or lies under one; the model's
    own folder ``source`` or a folder that contains it; an existing non-empty folder unless
    ``overwrite`` and it is a folder this tool wrote (it holds ``pruning_report.json``); a location
    that cannot be written (a write is tried)."""
    if not str(out).strip():
        raise ExportError("Give an output folder path.")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ExportError(f"Output path '{out}' is a file; give a folder path.")
    full = path.resolve()  # '.' and '..' by their real names
    existing = full
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ExportError(f"Cannot write to '{out}': '{existing}' is a file, not a folder; give a folder path.")
    if source is not None and str(source).strip() and Path(source).expanduser().exists():
        src = Path(source).expanduser().resolve()
        if src == full or full in src.parents:
            raise ExportError(f"Output folder '{out}' {'is' if src == full else 'contains'} the model being pruned; "
                              "choose another folder (the source model is never overwritten).")
    if path.exists() and any(path.iterdir()):
        if not overwrite:
            raise ExportError(f"Output folder '{out}' already exists and is not empty; choose a new folder "
                              "or allow overwriting.")
        if not (path / REPORT_FILE).is_file():
            raise ExportError(f"Output folder '{out}' was not written by this tool (it has no {REPORT_FILE}), so "
                              "it is not replaced; choose a new or empty folder.")
    try:  # the folder the export will be written in (the nearest one that exists: the rest is created)
        fd, probe = tempfile.mkstemp(prefix=".stat-write-check-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ExportError(f"Cannot write to '{existing}' ({exc.strerror or exc}); choose a folder you can write "
                          "to.") from None
    return path


def _fresh_dir(parent: Path, prefix: str) -> Path:
    """A new empty folder in ``parent`` with the mode the umask gives (mkdtemp's would be 0700)."""
    for _ in range(100):
        candidate = parent / f"{prefix}{os.getpid()}-{os.urandom(4).hex()}"
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name in {parent}")


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary folder to write the export in; on success its files become ``out``, on any
    failure (including an interrupt) it is deleted and ``out`` is untouched.

    A new ``out`` is a hidden sibling folder renamed into place. An existing folder (empty, or with
    ``overwrite`` one this tool wrote) is never renamed — it may be a mount point or the working
    directory, and keeps its own mode: the export is written in a hidden folder inside it and its
    files are moved in; old files are removed only once the new ones are in place."""
    out = check_output_dir(out, overwrite).resolve()
    in_place = out.is_dir()
    try:
        if in_place:
            tmp = _fresh_dir(out, ".stat-partial-")
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = _fresh_dir(out.parent, f".{out.name}-partial-")
    except OSError as exc:
        raise ExportError(f"Cannot write to '{out if in_place else out.parent}': {exc.strerror or exc}.") from exc
    old = None
    try:
        try:
            yield tmp
        except ExportError:
            raise
        except Exception as exc:   # disk full, permissions, a file-size limit: safetensors wraps OSError
            if not isinstance(exc, OSError) and "I/O error" not in str(exc):
                raise
            detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).split("I/O error: ")[-1]
            raise ExportError(f"Could not write the export to '{out}': {detail}; nothing was written "
                              "(free some space or choose another folder).") from exc
        if not in_place:
            os.replace(tmp, out)
        else:
            old = _fresh_dir(out, ".stat-old-")
            for child in list(out.iterdir()):
                if child != tmp and child != old:
                    os.replace(child, old / child.name)
            moved = []
            try:
                for child in list(tmp.iterdir()):
                    os.replace(child, out / child.name)
                    moved.append(out / child.name)
            except BaseException:  # put the old files back, whatever stopped the move
                for path in moved:
                    shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
                for child in list(old.iterdir()):
                    os.replace(child, out / child.name)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


# --- sizes --------------------------------------------------------------------------------------

def weights_size_on_disk(folder: str | Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def state_dict_bytes(model) -> int:
    """Bytes of the model's unique parameter/buffer storage (what safetensors would hold)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.numel())
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


# --- config ---------------------------------------------------------------------------------------

def _auto_class(architecture: str) -> str:
    for suffix, auto in _AUTO_CLASSES:
        if architecture.endswith(suffix):
            return auto
    raise ExportError(f"Don't know which AutoModel class loads '{architecture}'.")


def _added_bias_kinds(adapter) -> set[str]:
    """``{"attn", "mlp"}`` subset: output projections a correction gave a bias the family lacks."""
    if not getattr(adapter.config, "stat_added_out_biases", False):
        return set()
    projs = {"attn": adapter.attn_out_proj, "mlp": adapter.mlp_out_proj}
    return {kind for kind, proj in projs.items() if any(proj(i).bias is not None for i in range(adapter.num_layers))}


def _is_uniform(adapter) -> bool:
    if not _added_bias_kinds(adapter) <= set(adapter.stock_bias_flags()):
        return False  # output biases the stock config cannot declare: loads through modeling_stat.py
    shapes = {adapter.layer_shape(i) for i in range(adapter.num_layers)}
    if len(shapes) != 1:
        return False
    shape = next(iter(shapes))
    # BERT-family configs derive the head size from hidden_size / heads: fewer heads cannot be said.
    return adapter.stock_config_can_drop_heads or shape.num_heads == _config_heads(adapter.config)


def _config_heads(config) -> int:
    return int(getattr(config, "num_attention_heads", None) or config.n_heads)


def export_config(model, uniform: bool):
    """A copy of ``model.config`` describing the pruned shapes (stock fields too when uniform)."""
    adapter = get_adapter(model)
    adapter.record_shapes_in_config_()
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    if uniform:
        flags = adapter.stock_bias_flags()
        for kind in _added_bias_kinds(adapter):
            setattr(config, flags[kind][0], True)  # the stock class builds these biases (zeros filled in)
        shape = adapter.layer_shape(0)
        if config.model_type == "distilbert":
            config.hidden_dim = shape.intermediate_size
        elif getattr(adapter, "ffn_config_field", None):  # families described in remote_modeling.LAYOUTS
            setattr(config, adapter.ffn_config_field, shape.intermediate_size)
        else:
            config.intermediate_size = shape.intermediate_size
        if adapter.stock_config_can_drop_heads:
            config.head_dim = adapter.head_dim  # stated explicitly: no longer hidden_size / heads
            config.num_attention_heads = shape.num_heads
            config.num_key_value_heads = shape.num_kv_heads
    else:
        config.auto_map = {_auto_class(type(model).__name__): f"modeling_stat.StatPruned{type(model).__name__}"}
    return config


def _state_dict_for(model, uniform: bool) -> dict:
    """The weights to write: the model's own, plus zero biases for every projection a stock bias
    flag turned on (a stock Llama with ``attention_bias`` has q/k/v/o biases; only o's is ours)."""
    state = model.state_dict()
    adapter = get_adapter(model)
    kinds = _added_bias_kinds(adapter) if uniform else set()
    if not kinds:
        return state
    flags = adapter.stock_bias_flags()
    names = {id(m): n for n, m in model.named_modules()}
    for layer in adapter.layers:
        for kind in kinds:
            for path in flags[kind][1]:
                linear = layer.get_submodule(path)
                key = f"{names[id(linear)]}.bias"
                if key not in state:
                    w = linear.weight
                    state[key] = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
    return state


def modeling_file_text(model) -> str:
    """``remote_modeling.py`` plus the one line that names the stock class it extends."""
    source = Path(remote_modeling.__file__).read_text()
    base = type(model).__name__
    return (source + f"\n\nfrom transformers import {base} as _StockBase  # noqa: E402\n\n"
            f"StatPruned{base} = pruned_class(_StockBase)\n")


# --- model card -------------------------------------------------------------------------------------

def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def card_head(model, plan: PrunePlan | None, report: dict | None, uniform: bool,
              library: str = "transformers") -> list[str]:
    """The model card's front matter, what was removed and the before/after metrics (every format)."""
    report = report or {}
    arch = type(model).__name__
    lines = ["---", f"library_name: {library}", "tags:", "- pruned", "- stat", "- structured-pruning", "---", "",
             f"# {report.get('model') or (plan.model if plan else '') or arch} — pruned with STAT", "",
             "Attention heads and MLP neurons were removed with STAT (Shrinking Transformers After Training, "
             "arXiv 2406.00061): units chosen by interpolative decompositions of calibration activations, "
             "with a least-squares correction folded into the next layer. No fine-tuning.", ""]
    if plan is not None:
        b = plan.budget
        lines += ["## What was removed", "",
                  f"- method: `{plan.method}` ({plan.mode}); budget: {b.get('target', 0):.0%} of block "
                  f"{'parameters' if b.get('kind') == 'params' else 'FLOPs'} requested, "
                  f"{b.get('achieved', 0):.2%} removed; uniform layers: {'yes' if uniform else 'no'}",
                  f"- calibration: {json.dumps(plan.calibration)}", "",
                  "| layer | heads kept | KV heads kept | MLP neurons kept |", "|---|---|---|---|"]
        for lp in plan.layers:
            lines.append(f"| {lp.layer} | {len(lp.kept_heads)}/{lp.num_heads} | {len(lp.kept_kv_heads)}/"
                         f"{lp.num_kv_heads} | {len(lp.kept_neurons)}/{lp.intermediate_size} |")
        lines.append("")
    metrics = [(k[: -len("_before")], report[k], report.get(k[: -len("_before")] + "_after"))
               for k in report if k.endswith("_before") and not isinstance(report[k], (dict, list))]
    if metrics:
        lines += ["## Before and after", "", "| metric | before | after |", "|---|---|---|"]
        lines += [f"| {name} | {_fmt(before)} | {_fmt(after)} |" for name, before, after in metrics]
        lines.append("")
    return lines


def model_card(model, plan: PrunePlan | None, report: dict | None, uniform: bool, size_after: int) -> str:
    adapter = get_adapter(model)
    report = report or {}
    auto = _auto_class(type(model).__name__)
    lines = card_head(model, plan, report, uniform)
    lines += ["## Loading", "", "```python",
              "import stat_core; model, tokenizer = stat_core.load_pruned(PATH)   # no code from the folder runs"]
    if uniform:
        lines += [f"from transformers import {auto}", f"model = {auto}.from_pretrained(PATH)  # stock, every layer the same shape"]
    else:
        lines += [f"from transformers import {auto}",
                  f"model = {auto}.from_pretrained(PATH, trust_remote_code=True)  # runs modeling_stat.py from this folder"]
    lines += ["```", "", f"Weights on disk: {size_after / 1e6:.1f} MB"
              + (f" (dense: {report['size_on_disk_before_bytes'] / 1e6:.1f} MB)." if "size_on_disk_before_bytes" in report
                 else "."), f"Layers: {adapter.num_layers}; family `{model.config.model_type}`.", ""]
    return "\n".join(lines)


# --- export -----------------------------------------------------------------------------------------

def export_pruned(model, tokenizer, out_dir: str | Path, *, plan: PrunePlan | None = None,
                  report: dict | None = None, overwrite: bool = False) -> ExportInfo:
    """Write ``model`` (pruned or not), its tokenizer, plan, report and model card to ``out_dir``.

    Atomic: nothing appears at ``out_dir`` unless everything was written; an existing non-empty
    folder is replaced only with ``overwrite=True``. ``report`` gets ``size_on_disk_after_bytes``.
    """
    check_output_dir(out_dir, overwrite, source=getattr(model, "name_or_path", None))  # never the model's own folder
    adapter = get_adapter(model)
    uniform = _is_uniform(adapter)
    config = export_config(model, uniform)
    report = dict(report or {})
    with atomic_output_dir(out_dir, overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=_state_dict_for(model, uniform))
        config.to_json_file(tmp / "config.json")  # our config: per-layer shapes, auto_map or stock fields
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if not uniform:
            (tmp / MODELING_FILE).write_text(modeling_file_text(model))
        size = weights_size_on_disk(tmp)
        report["size_on_disk_after_bytes"] = size
        report["export"] = {"uniform": uniform, "loads_with": ["stat_core.load_pruned"]
                            + (["stock from_pretrained"] if uniform else ["from_pretrained(trust_remote_code=True)"])}
        if plan is not None:
            plan.to_json(tmp / "plan.json")
        (tmp / "pruning_report.json").write_text(json.dumps(report, indent=1))
        (tmp / "README.md").write_text(model_card(model, plan, report, uniform, size))
        files = tuple(sorted(p.name for p in tmp.iterdir()))
    return ExportInfo(path=Path(out_dir).expanduser(), size_bytes=size, uniform=uniform, files=files)


# --- other formats -----------------------------------------------------------------------------------

EXPORT_FORMATS = ("safetensors", "gguf", "onnx")


def format_problem(model, fmt: str, tokenizer=None) -> str | None:
    """Why ``model`` cannot be exported as ``fmt`` (one sentence, no full stop), or ``None``."""
    if fmt == "safetensors":
        return None
    if fmt == "gguf":
        from .export_gguf import gguf_problem, tokenizer_problem

        return gguf_problem(model) or tokenizer_problem(tokenizer)
    if fmt == "onnx":
        from .export_onnx import onnx_problem

        return onnx_problem(model)
    return f"unknown export format '{fmt}' (choose from {', '.join(EXPORT_FORMATS)})"


def applicable_formats(model, tokenizer=None) -> list[str]:
    return [f for f in EXPORT_FORMATS if format_problem(model, f, tokenizer) is None]


def check_format(model, fmt: str, tokenizer=None) -> None:
    """Refuse, in one sentence naming the formats that do apply, a format that does not fit ``model``."""
    problem = format_problem(model, fmt, tokenizer)
    if problem:
        raise ExportError(f"Cannot export as {fmt}: {problem}; formats that apply to this model: "
                          f"{', '.join(applicable_formats(model, tokenizer))}.")


def export_model(model, tokenizer, out_dir: str | Path, fmt: str = "safetensors", *, plan: PrunePlan | None = None,
                 report: dict | None = None, overwrite: bool = False, gguf_type: str = "f16") -> ExportInfo:
    """Write ``model`` in format ``fmt`` (``safetensors`` folder, ``gguf`` for llama.cpp, ``onnx`` for
    onnxruntime) with its plan, report and model card; atomic, like :func:`export_pruned`."""
    check_format(model, fmt, tokenizer)
    check_output_dir(out_dir, overwrite, source=getattr(model, "name_or_path", None))  # never the model's own folder
    if fmt == "gguf":
        from .export_gguf import export_gguf

        return export_gguf(model, tokenizer, out_dir, plan=plan, report=report, overwrite=overwrite, qtype=gguf_type)
    if fmt == "onnx":
        from .export_onnx import export_onnx

        return export_onnx(model, tokenizer, out_dir, plan=plan, report=report, overwrite=overwrite)
    return export_pruned(model, tokenizer, out_dir, plan=plan, report=report, overwrite=overwrite)


# --- loading (way 1: no code from the folder) ---------------------------------------------------------

def _stock_class(config):
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    raise ExportError(f"The folder's config names no transformers class ({names}); cannot tell which model to build.")


def load_pruned(path: str | Path, device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                with_tokenizer: bool = True):
    """Load an exported (pruned) folder with stock transformers classes resized by
    :mod:`stat_core.remote_modeling`; nothing from the folder is executed and only safetensors
    weights are read. Returns ``(model, tokenizer)`` (tokenizer ``None`` if absent or not asked)."""
    from transformers import AutoConfig, AutoTokenizer

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise ExportError(f"'{path}' is not a folder; give the folder an export wrote.")
    if not (folder / "config.json").exists():
        raise ExportError(f"'{path}' has no config.json; it is not a model folder.")
    if not any(folder.glob("*.safetensors")):
        raise ExportError(f"'{path}' has no .safetensors weights (pickled weights are never loaded).")
    try:
        config = AutoConfig.from_pretrained(folder)  # model_type is stock; auto_map is ignored here
    except (OSError, ValueError) as exc:
        raise ExportError(f"The config.json in '{path}' cannot be read: {exc}") from exc
    cls = remote_modeling.pruned_class(_stock_class(config))
    kwargs = {"use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = cls.from_pretrained(folder, config=config, **kwargs)
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise ExportError(f"The weights in '{path}' do not match its config or are damaged: {exc}") from exc
    if device is not None:
        model.to(device)
    model.eval()
    tokenizer = None
    if with_tokenizer and any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        tokenizer = AutoTokenizer.from_pretrained(folder)
    return model, tokenizer


def export_name(model_name: str | None, method: str, sparsity: float, fmt: str, gguf_type: str | None = None) -> str:
    """A folder name that says what it holds and cannot collide: ``<model>-<method>-<pct>pct-<format>[-<type>]-<time>-<rand>``."""
    import time
    import uuid

    base = Path(str(model_name)).name.replace(" ", "_") or "model"
    return (f"{base}-{method}-{round(100 * sparsity)}pct-{fmt}{'-' + gguf_type if gguf_type else ''}"
            f"-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}")


def zip_folder(folder: str | Path, zip_path: str | Path, check=None) -> Path:
    """Zip ``folder`` as ``<folder name>/...`` (weights stored as they are: they barely compress and
    deflating them is slow). ``check()`` runs before each file; if it raises, no partial zip is left."""
    folder, zip_path = Path(folder), Path(zip_path)
    tmp = zip_path.with_suffix(".zip.part")
    try:
        with zipfile.ZipFile(tmp, "w") as zf:
            for f in sorted(folder.rglob("*")):
                if check is not None:
                    check()
                if f.is_file():
                    method = zipfile.ZIP_STORED if f.suffix in (".safetensors", ".bin") else zipfile.ZIP_DEFLATED
                    zf.write(f, f"{folder.name}/{f.relative_to(folder)}", compress_type=method)
        tmp.replace(zip_path)
    finally:
        tmp.unlink(missing_ok=True)
    return zip_path


def export_zip(model, tokenizer, workdir: str | Path, name: str, fmt: str = "safetensors", *,
               plan: PrunePlan | None = None, report: dict | None = None, gguf_type: str = "f16",
               check=None) -> tuple[ExportInfo, Path]:
    """:func:`export_model` into ``workdir/name``, zipped to ``workdir/name.zip``; the folder is removed
    (the zip is the one copy kept). ``check()`` runs between the steps and the zip's files; if it
    (or anything) raises, neither the folder nor a partial zip is left."""
    out_dir = Path(workdir) / name
    try:
        info = export_model(model, tokenizer, out_dir, fmt, plan=plan, report=report, overwrite=False,
                            gguf_type=gguf_type)
        if check is not None:
            check()
        zip_path = zip_folder(Path(getattr(info, "path", out_dir)), Path(workdir) / f"{name}.zip", check)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return info, zip_path


def export_zip_with_report(model, tokenizer, workdir: str | Path, model_name: str | None, method: str,
                           sparsity: float, fmt: str = "safetensors", *, plan: PrunePlan | None = None,
                           report: dict | None = None, gguf_type: str | None = None,
                           check=None) -> tuple[ExportInfo, Path, Path]:
    """``(info, zip_path, report_path)``: :func:`export_zip` under :func:`export_name`'s name, and the
    prune's report beside the zip as ``<name>-pruning_report.json`` (the same report the folder holds)."""
    name = export_name(model_name, method, sparsity, fmt, gguf_type)
    info, zip_path = export_zip(model, tokenizer, workdir, name, fmt, plan=plan, report=report,
                                gguf_type=gguf_type or "f16", check=check)
    report_path = Path(workdir) / f"{name}-pruning_report.json"
    report_path.write_text(json.dumps(report or {}, indent=1, default=str))
    return info, zip_path, report_path
