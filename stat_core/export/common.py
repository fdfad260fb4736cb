"""What every export format shares: errors, the atomic output folder, configs, the model card's head."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stat_core.adapters import get_adapter
from stat_core.surgery.plan import PrunePlan

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


def check_output_dir(out: str | Path, overwrite: bool = False) -> Path:
    """Refuse a path that is a file, or an existing non-empty folder unless ``overwrite``."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ExportError(f"Output path '{out}' is a file; give a folder path.")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ExportError(f"Output folder '{out}' already exists and is not empty; choose a new folder "
                          "or allow overwriting.")
    return path


@contextlib.contextmanager
def atomic_output_dir(out: str | Path, overwrite: bool = False):
    """Yield a temporary sibling folder; on success it replaces ``out``, on any failure (including
    an interrupt) it is deleted and ``out`` is untouched. An old ``out`` is removed only after the
    new one is in place."""
    out = check_output_dir(out, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-partial-", dir=out.parent))
    except OSError as exc:
        raise ExportError(f"Cannot write to '{out.parent}': {exc.strerror or exc}.") from exc
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
        if out.exists():
            old = out.with_name(f".{out.name}-old-{os.getpid()}")
            os.replace(out, old)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


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
