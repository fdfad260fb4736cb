"""What the app's widgets offer and how it names things: method labels, calibration sources,
export formats, the architecture table. No work happens here; :mod:`stat_app.handlers` re-exports
all of it (``H.EXPORT_CHOICES``, ``H.method_choices()``, ...)."""

from __future__ import annotations

from stat_core.data.labelled import BUILTIN_SETS
from stat_core.data.mix import SOURCES as CALIBRATION_SOURCES
from stat_core.methods.registry import get_method, method_names

DECODER_SOURCES = CALIBRATION_SOURCES  # mix, wikipedia, self-generated (stat_core.data.mix)
ENCODER_SOURCES = tuple(BUILTIN_SETS)
#: "fit corrections on": the calibration text itself, or one of DECODER_SOURCES (stat-prune --correct-on).
SAME_TEXT = "the same text"
#: The gradient pass's next tokens: the text's ("data") or sampled from the dense model ("model").
SENSITIVITY_LABELS = ("data", "model")
# Every method comes from the registry; Compare runs these by default (the plan-based ones: each
# is cut from the cached calibration in seconds; SliceGPT needs its own pass and is opt-in).
COMPARE_METHODS = tuple(m for m in method_names() if not get_method(m).whole_model)

#: The app's export formats: label → (stat_core.export.hf format, GGUF weight type).
EXPORT_CHOICES = {
    "safetensors (transformers)": ("safetensors", None),
    "GGUF float16 (llama.cpp)": ("gguf", "f16"),
    "GGUF Q8_0 (llama.cpp, 8-bit)": ("gguf", "q8_0"),
    "ONNX (onnxruntime)": ("onnx", None),
}


def method_label(name: str) -> str:
    m = get_method(name)
    return f"{m.label} — {m.summary}"


def plan_method_choices() -> list[tuple[str, str]]:
    """(label, name) of the methods that produce a head/neuron plan (the main Prune step)."""
    return [(get_method(m).label, m) for m in method_names() if not get_method(m).whole_model]


def method_choices() -> list[tuple[str, str]]:
    """(label, name) of every registered method (Compare says in one sentence if one cannot apply)."""
    return [(get_method(m).label, m) for m in method_names()]


def architecture_markdown(arch: dict) -> str:
    """The loaded model's :func:`stat_core.evaluation.report.architecture_summary` as a markdown table."""
    if not arch:
        return "*No model loaded.*"
    rows = [("family", arch["family"]), ("kind", arch["kind"]), ("layers", arch["layers"]),
            ("hidden size", arch["hidden"]),
            ("attention heads / KV heads", f"{arch['heads']} / {arch['kv_heads']} (head dim {arch['head_dim']})"),
            ("MLP width", arch["mlp_width"]), ("parameters", f"{arch['parameters']:,}"),
            ("device / dtype", f"{arch['device']} / {arch['dtype']}")]
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
