"""ONNX export: a pruned model as one graph that onnxruntime runs.

ONNX graphs carry every tensor's own shape, so per-layer head counts and MLP widths need nothing
special: the exporter (``torch.onnx.export(..., dynamo=True)``, i.e. ``torch.export`` + onnxscript)
traces the pruned PyTorch modules as they are. Inputs ``input_ids`` and ``attention_mask`` (and
``token_type_ids`` where the model takes them), int64, batch and sequence length dynamic; one
output, ``logits`` (``last_hidden_state`` for a bare encoder). Decoders are exported without a KV
cache: each call scores the whole sequence (generation re-runs the prefix).

Every export is checked before it is kept: onnxruntime runs the graph on a random batch and its
output must match PyTorch's within float tolerance, or the export fails and nothing is written.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stat_core.adapters import get_adapter
from stat_core.export.common import (
    ExportError,
    ExportInfo,
    _is_uniform,
    atomic_output_dir,
    card_head,
    drop_tokenizer_auto_map,
    export_config,
    state_dict_bytes,
)

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
ONNX_OPSET = 18
# Heads whose forward returns one tensor the graph can expose.
# GPT2LMHeadModel is a causal LM whose name ends in "Model": checked before the bare-model rule.
_LOGIT_HEADS = ("ForCausalLM", "LMHeadModel", "ForSequenceClassification", "ForTokenClassification", "ForMaskedLM")
# Protobuf files stop at 2 GB; larger models keep their weights next to the graph.
_EXTERNAL_DATA_BYTES = 1_500_000_000


@dataclass(frozen=True)
class ONNXInfo:
    path: Path
    inputs: tuple[str, ...]
    output: str
    max_abs_diff: float       # onnxruntime vs PyTorch on the check batch
    seconds: float


def _missing_packages() -> list[str]:
    import importlib.util

    return [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]


def _output_name(model) -> str | None:
    name = type(model).__name__
    if name.endswith(_LOGIT_HEADS):
        return "logits"
    if name.endswith("Model"):
        return "last_hidden_state"
    return None


def onnx_problem(model) -> str | None:
    """Why ``model`` cannot be exported as ONNX (one sentence), or ``None``."""
    get_adapter(model)  # an unsupported family says so, listing the supported ones
    if _output_name(model) is None:
        return (f"ONNX export writes models with one output (causal LM, sequence/token classification, "
                f"masked LM or a bare encoder); '{type(model).__name__}' has another head")
    missing = _missing_packages()
    if missing:
        return f"ONNX export needs the packages {', '.join(missing)} (pip install {' '.join(missing)})"
    return None


def input_names(model) -> tuple[str, ...]:
    params = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in params and getattr(model.config, "type_vocab_size", 0):
        names.append("token_type_ids")
    return tuple(names)


class _Graph(nn.Module):
    """The model as a function of ``input_ids`` and ``attention_mask`` returning one tensor (no cache)."""

    def __init__(self, model: nn.Module, output: str, last_only: bool = False):
        super().__init__()
        self.model = model
        self.output = output
        self.extra = {"use_cache": False} if get_adapter(model).is_decoder else {}
        if last_only:
            self.extra["logits_to_keep"] = 1  # generation needs only the last position's logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, **self.extra), self.output)


class _GraphWithTypes(_Graph):
    """Encoders that also take ``token_type_ids`` (BERT)."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                token_type_ids: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                                  **self.extra), self.output)


def _check_inputs(model, names: tuple[str, ...], batch: int, seq: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    vocab = int(model.config.vocab_size)
    out = {"input_ids": torch.randint(0, vocab, (batch, seq), generator=gen),
           "attention_mask": torch.ones(batch, seq, dtype=torch.long),
           "token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}
    if not get_adapter(model).is_decoder:
        out["attention_mask"][0, seq // 2:] = 0  # encoders: right padding, as a tokenizer pads a batch
    return tuple(out[n].to(device) for n in names)


def _tolerance(dtype: torch.dtype, scale: float) -> float:
    return (1e-4 if dtype == torch.float32 else 2e-2) * max(1.0, scale)


def write_onnx(model, path: str | Path, *, opset: int = ONNX_OPSET, check: bool = True,
               last_only: bool = False) -> ONNXInfo:
    """Export ``model`` to the ONNX file ``path`` (weights inside it, or in ``<path>.data`` beyond 1.5 GB)
    and, with ``check``, compare onnxruntime's output with PyTorch's on a random batch.
    ``last_only`` (decoders): logits of the last position only, ``(batch, 1, vocab)``, as generation uses.

    Writes into ``path``'s folder; callers that need atomicity pass a path in a temporary folder
    (:func:`export_onnx` does)."""
    problem = onnx_problem(model)
    if problem:
        raise ExportError(problem + ".")

    path = Path(path)
    names, output = input_names(model), _output_name(model)
    was_training = model.training
    model.eval()
    if last_only and not get_adapter(model).is_decoder:
        raise ExportError("last_only applies to decoders (their logits per position); this model is an encoder.")
    graph = (_GraphWithTypes if "token_type_ids" in names else _Graph)(model, output, last_only)
    example = _check_inputs(model, names, batch=2, seq=16, seed=0)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    dynamic = {n: {0: batch, 1: seq} for n in names}
    t = time.perf_counter()
    try:
        with torch.no_grad():
            torch.onnx.export(graph, example, str(path), input_names=list(names), output_names=[output],
                              dynamic_shapes=dynamic, opset_version=opset, dynamo=True,
                              external_data=state_dict_bytes(model) > _EXTERNAL_DATA_BYTES, verbose=False)
    except OSError as exc:
        raise ExportError(f"Could not write '{path}': {exc.strerror or exc}.") from exc
    except torch.onnx.errors.OnnxExporterError as exc:  # torch.export or the ONNX translation failed
        cause = exc.__cause__ or exc
        raise ExportError(f"torch.onnx could not export '{type(model).__name__}': {type(cause).__name__}: "
                          f"{(str(cause).strip().splitlines() or [''])[0]}") from exc
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - t
    diff = check_onnx(model, path, names, output, last_only) if check else float("nan")
    return ONNXInfo(path=path, inputs=names, output=output, max_abs_diff=diff, seconds=seconds)


def onnx_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(model, path: Path, names: tuple[str, ...], output: str, last_only: bool = False) -> float:
    """Max |onnxruntime − PyTorch| over a random batch of a shape other than the traced one (valid
    positions only); raises :class:`ExportError` beyond float tolerance."""
    inputs = _check_inputs(model, names, batch=3, seq=23, seed=1)
    with torch.no_grad():
        ref = getattr(model(**dict(zip(names, inputs))), output).float().cpu().numpy()
    if last_only:
        ref = ref[:, -1:]
    sess = onnx_session(path)
    got = sess.run([output], {n: x.cpu().numpy().astype(np.int64) for n, x in zip(names, inputs)})[0].astype(np.float32)
    if got.shape != ref.shape:
        raise ExportError(f"The ONNX graph returned {output} of shape {got.shape}, PyTorch {ref.shape}.")
    mask = dict(zip(names, inputs))["attention_mask"].cpu().numpy().astype(bool)
    if ref.ndim == 3 and ref.shape[:2] == mask.shape and not last_only:
        got, ref = got[mask], ref[mask]  # padded positions carry no meaning
    diff = float(np.abs(got - ref).max())
    dtype = next(model.parameters()).dtype
    if not diff <= _tolerance(dtype, float(np.abs(ref).max())):
        raise ExportError(f"onnxruntime's {output} differ from PyTorch's by up to {diff:.3g}; the export is not kept.")
    return diff


# --- export folder --------------------------------------------------------------------------------

def onnx_card(model, plan, report: dict, info: ONNXInfo, files: list[str], uniform: bool, size: int) -> str:

    decoder = get_adapter(model).is_decoder
    what = {ONNX_FILE: f"the graph with its weights (opset {ONNX_OPSET}); inputs {', '.join(f'`{n}`' for n in info.inputs)} "
                       f"(int64, batch × sequence), output `{info.output}`",
            ONNX_FILE + ".data": "the graph's weights (external data; keep next to model.onnx)",
            "config.json": "the pruned model's config (per-layer widths in `stat_layer_shapes`)",
            "plan.json": "kept attention heads, KV heads and MLP neurons per layer (`stat_core.PrunePlan`)",
            "pruning_report.json": "settings, sizes and quality before/after",
            "README.md": "this card"}
    lines = card_head(model, plan, report, uniform, library="onnx")
    lines += ["## Files", "", "| file | what |", "|---|---|"]
    for f in files:
        lines.append(f"| `{f}` | {what.get(f, 'tokenizer')} |")
    lines += ["", f"Checked at export: onnxruntime's `{info.output}` match PyTorch's within {info.max_abs_diff:.2g} "
              "(max absolute difference, random batch).", "", "## Running", "", "```python",
              "import numpy as np, onnxruntime as ort", "from transformers import AutoTokenizer", "",
              "tok = AutoTokenizer.from_pretrained(PATH)",
              f'session = ort.InferenceSession(f"{{PATH}}/{ONNX_FILE}", providers=["CPUExecutionProvider"])']
    if decoder:
        lines += ['ids = tok("The capital of France is", return_tensors="np")["input_ids"].astype(np.int64)',
                  "for _ in range(16):  # greedy; no KV cache: every step scores the whole sequence",
                  f'    logits = session.run(["{info.output}"], {{"input_ids": ids, "attention_mask": np.ones_like(ids)}})[0]',
                  "    ids = np.concatenate([ids, logits[:, -1:].argmax(-1)], axis=1)",
                  "print(tok.decode(ids[0]))"]
    else:
        feed = ", ".join(f'"{n}": enc["{n}"].astype(np.int64)' for n in info.inputs)
        lines += ['enc = tok(["a sentence to classify"], return_tensors="np", padding=True)',
                  f'out = session.run(["{info.output}"], {{{feed}}})[0]', "print(out)"]
    lines += ["```", "", f"Size on disk: {size / 1e6:.1f} MB. Layers: {get_adapter(model).num_layers}; "
              f"family `{model.config.model_type}`.", ""]
    return "\n".join(lines)


def export_onnx(model, tokenizer, out_dir, *, plan=None, report: dict | None = None, overwrite: bool = False):
    """A folder with ``model.onnx``, the tokenizer, ``config.json``, ``plan.json``, ``pruning_report.json``
    and a model card; atomic (nothing at ``out_dir`` unless all of it was written and checked)."""

    uniform = _is_uniform(get_adapter(model))
    report = dict(report or {})
    with atomic_output_dir(out_dir, overwrite) as tmp:
        info = write_onnx(model, tmp / ONNX_FILE)
        config = export_config(model, uniform)
        if hasattr(config, "auto_map"):
            del config.auto_map  # no modeling file or PyTorch weights in this folder
        config.to_json_file(tmp / "config.json")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            drop_tokenizer_auto_map(tmp)
        size = sum(p.stat().st_size for p in tmp.glob(ONNX_FILE + "*"))
        report["size_on_disk_after_bytes"] = size
        report["export"] = {"format": "onnx", "file": ONNX_FILE, "opset": ONNX_OPSET, "inputs": list(info.inputs),
                            "output": info.output, "max_abs_diff_vs_pytorch": info.max_abs_diff,
                            "seconds_export": info.seconds, "loads_with": ["onnxruntime"]}
        if plan is not None:
            plan.to_json(tmp / "plan.json")
        (tmp / "pruning_report.json").write_text(json.dumps(report, indent=1))
        files = sorted([p.name for p in tmp.iterdir()] + ["README.md"])
        (tmp / "README.md").write_text(onnx_card(model, plan, report, info, files, uniform, size))
        files = tuple(sorted(p.name for p in tmp.iterdir()))
    return ExportInfo(path=Path(out_dir).expanduser(), size_bytes=size, uniform=uniform, files=files, format="onnx")
