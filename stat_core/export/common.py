"""What every export format shares: errors, the atomic output folder, configs, the model card's head."""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stat_core.adapters import get_adapter
from stat_core.surgery.plan import PrunePlan

log = logging.getLogger(__name__)

MODELING_FILE = "modeling_stat.py"
TOKENIZER_CONFIG = "tokenizer_config.json"


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


REPORT_FILE = "pruning_report.json"  # the mark of a folder this tool wrote (the only kind overwrite replaces)

# The hidden folders atomic_output_dir writes in (see _fresh_dir): ``.<out>-partial-<pid>-<8 hex>`` beside
# a new folder, ``.stat-partial-<pid>-<8 hex>`` / ``.stat-old-<pid>-<8 hex>`` inside one filled in place.
PARTIAL_NAME = re.compile(r"^\.(?:.+-partial|stat-old)-(\d+)-[0-9a-f]{8}$")


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (another user's counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_partials(folder: str | Path) -> list[Path]:
    """Delete the hidden partial folders an export killed outright (SIGKILL, power loss) left in
    ``folder``: only real folders named as :func:`atomic_output_dir` names them whose process is gone.
    Returns what was removed; a folder that cannot be listed or removed is left alone."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = PARTIAL_NAME.match(entry.name)
        if not match or entry.is_symlink() or not entry.is_dir() or pid_alive(int(match.group(1))):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
    return removed


def check_output_dir(out: str | Path, overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Refuse, in one sentence and before any work: a path that is a file or lies under one; the model's
    own folder ``source`` or a folder that contains it; an existing non-empty folder unless
    ``overwrite`` and it is a folder this tool wrote (it holds ``pruning_report.json``); a location
    that cannot be written (a write is tried). Partial folders a killed export left in ``out`` or
    beside it are removed first (:func:`remove_stale_partials`)."""
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
    for folder in (full, full.parent):
        if folder.is_dir():
            remove_stale_partials(folder)
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
    old, swapped = None, False
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
            swapped = True
        else:
            old = _fresh_dir(out, ".stat-old-")
            _swap_into(out, tmp, old)
            swapped = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            if swapped:
                shutil.rmtree(old, ignore_errors=True)
            else:  # everything was put back: only the empty helper folder goes
                try:
                    old.rmdir()
                except OSError:
                    log.error("Could not put every old file of %s back; what is left is in %s", out, old)


def _swap_into(out: Path, new: Path, old: Path) -> None:
    """Move ``out``'s files into ``old``, then ``new``'s files into ``out``. If any move fails (a child
    that cannot be renamed: a mount point, a read-only folder, an interrupt), every file moved so far
    goes back where it was and the failure is raised as one sentence: the old export is left as it
    was, never half replaced."""
    moved_old, moved_new = [], []
    try:
        for child in list(out.iterdir()):
            if child != new and child != old:
                os.replace(child, old / child.name)
                moved_old.append(child.name)
        for child in list(new.iterdir()):
            os.replace(child, out / child.name)
            moved_new.append(out / child.name)
    except BaseException as exc:
        for path in moved_new:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for name in moved_old:
            os.replace(old / name, out / name)
        if isinstance(exc, OSError):
            raise ExportError(f"Could not replace the export in '{out}': "
                              f"{exc.strerror or exc} ({Path(exc.filename or '').name or 'a file'}); the old export "
                              "was left as it was (make every file in it movable, or export to a new folder).") from exc
        raise


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


def stock_class_name(model) -> str:
    """The transformers class ``model`` is, or extends (a model :func:`~stat_core.export.hf.load_pruned`
    read is a ``StatPruned…`` subclass): the name configs and modeling files refer to."""
    for cls in type(model).__mro__:
        if cls.__module__.startswith("transformers."):
            return cls.__name__
    return type(model).__name__


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
    if getattr(adapter.config, "stat_output_prior", False):
        return False  # a vocabulary bias no stock class builds: loads through modeling_stat.py
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
    if hasattr(config, "auto_map"):   # the source model's own code is not copied: its entries would dangle
        del config.auto_map
    arch = stock_class_name(model)
    config.architectures = [arch]
    if uniform:
        flags = adapter.stock_bias_flags()
        for kind in _added_bias_kinds(adapter):
            setattr(config, flags[kind][0], True)  # the stock class builds these biases (zeros filled in)
        shape = adapter.layer_shape(0)
        setattr(config, adapter.ffn_config_field, shape.intermediate_size)  # the family's own field name
        if adapter.stock_config_can_drop_heads:
            config.head_dim = adapter.head_dim  # stated explicitly: no longer hidden_size / heads
            config.num_attention_heads = shape.num_heads
            config.num_key_value_heads = shape.num_kv_heads
    else:
        config.auto_map = {_auto_class(arch): f"modeling_stat.StatPruned{arch}"}   # the one entry: our modeling file
    return config


def drop_tokenizer_auto_map(folder: Path) -> None:
    """Remove ``auto_map`` from ``folder``'s tokenizer_config.json: it points at the source model's
    tokenizer code, which an export never copies (the tokenizer was loaded with stock classes)."""
    file = Path(folder) / TOKENIZER_CONFIG
    try:
        settings = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    if isinstance(settings, dict) and "auto_map" in settings:
        del settings["auto_map"]
        file.write_text(json.dumps(settings, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) >= 1e-3 else f"{value:.2e}"
    return str(value)


def card_head(model, plan: PrunePlan | None, report: dict | None, uniform: bool,
              library: str = "transformers") -> list[str]:
    """The model card's front matter, what was removed and the before/after metrics (every format)."""
    report = report or {}
    arch = stock_class_name(model)
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
