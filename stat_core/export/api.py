"""One verb over every format: check, export, name and zip."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

from stat_core.export.common import ExportError, ExportInfo, check_output_dir
from stat_core.export.gguf import export_gguf, gguf_problem, tokenizer_problem
from stat_core.export.hf import export_pruned
from stat_core.export.onnx import export_onnx, onnx_problem
from stat_core.surgery.plan import PrunePlan

EXPORT_FORMATS = ("safetensors", "gguf", "onnx")


def format_problem(model, fmt: str, tokenizer=None) -> str | None:
    """Why ``model`` cannot be exported as ``fmt`` (one sentence, no full stop), or ``None``."""
    if fmt == "safetensors":
        return None
    if fmt == "gguf":

        return gguf_problem(model) or tokenizer_problem(tokenizer)
    if fmt == "onnx":

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

        return export_gguf(model, tokenizer, out_dir, plan=plan, report=report, overwrite=overwrite, qtype=gguf_type)
    if fmt == "onnx":

        return export_onnx(model, tokenizer, out_dir, plan=plan, report=report, overwrite=overwrite)
    return export_pruned(model, tokenizer, out_dir, plan=plan, report=report, overwrite=overwrite)


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
