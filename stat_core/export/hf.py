"""Write a pruned model to a folder that loads wherever the original did, and read it back.

A folder holds ``model.safetensors``, ``config.json`` (every layer's head / KV-head / MLP widths in
``stat_layer_shapes``), the tokenizer, ``plan.json``, ``pruning_report.json`` and a model card
(``README.md``). It loads three ways:

1. :func:`load_pruned` — stock classes resized by our own code, nothing from the folder executed;
2. ``AutoModel*.from_pretrained(folder, trust_remote_code=True)`` — through ``modeling_stat.py``
   written into the folder (a copy of :mod:`stat_core.adapters.modeling_stat`) and an ``auto_map`` entry;
   needs stock transformers only;
3. when every layer has the same shape (``PruneConfig(uniform=True)``), the config's own fields say
   it all and stock ``from_pretrained`` loads it with no custom code; no modeling file is written.

Writes go to a hidden temporary sibling folder that is renamed into place only when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError

from stat_core.adapters import get_adapter
from stat_core.adapters.registry import family_of
from stat_core.adapters import modeling_stat as remote_modeling
from stat_core.export.common import (
    MODELING_FILE,
    ExportError,
    ExportInfo,
    _added_bias_kinds,
    _auto_class,
    _is_uniform,
    atomic_output_dir,
    card_head,
    check_output_dir,
    drop_tokenizer_auto_map,
    export_config,
    stock_class_name,
    weights_size_on_disk,
)
from stat_core.surgery.plan import PrunePlan

# --- atomic folders -----------------------------------------------------------------------------


# --- sizes --------------------------------------------------------------------------------------


# --- config ---------------------------------------------------------------------------------------


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
    base = stock_class_name(model)
    model_type = model.config.model_type
    layout = family_of(model).layout  # this model's family record, written out as data
    return (source + f"\n\nLAYOUTS[{model_type!r}] = {layout!r}\n"
            f"\nfrom transformers import {base} as _StockBase  # noqa: E402\n\n"
            f"StatPruned{base} = pruned_class(_StockBase)\n")


# --- model card -------------------------------------------------------------------------------------


def model_card(model, plan: PrunePlan | None, report: dict | None, uniform: bool, size_after: int) -> str:
    adapter = get_adapter(model)
    report = report or {}
    auto = _auto_class(stock_class_name(model))
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
            drop_tokenizer_auto_map(tmp)
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
    :mod:`stat_core.adapters.modeling_stat`; nothing from the folder is executed and only safetensors
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


