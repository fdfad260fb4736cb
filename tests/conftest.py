import os

import pytest
import torch

# Two cores: one pytest process uses both; under pytest-xdist (addopts: -n 2) each worker gets one,
# and so do the subprocesses its tests start (the clean-interpreter loaders, torch.distributed ranks).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)
# Every test calibrates for itself: the on-disk calibration cache (stat_core.calibration.cache) is off
# unless a test turns it on (tests/test_calibration_cache.py, the real-model tests for the demo's).
os.environ.setdefault("STAT_CALIBRATION_CACHE", "off")


# pytest-xdist (pyproject's addopts: -n 2 --dist loadfile --no-loadscope-reorder) hands out whole
# files, so module fixtures (a served app and Chromium, SmolLM2 loaded and evaluated, torch.distributed
# ranks) are built once, in the collection order below.


def pytest_collection_modifyitems(config, items):
    """Real-model (``slow``) tests first (their files go out first under xdist), so the minutes-long
    ones do not start last on one worker while the other waits."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise


def tiny_config(family: str = "llama", **overrides):
    """Tiny random decoder configs, one per supported family (no downloads)."""
    from transformers import (Gemma3TextConfig, GraniteConfig, LlamaConfig, MistralConfig, Qwen2Config,
                              Qwen3Config)

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=64, vocab_size=128, max_position_embeddings=128)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "mistral":
        return MistralConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common)
    if family == "qwen3":
        return Qwen3Config(head_dim=8, **common)
    if family == "granite":  # Llama's layout with scalar multipliers on the embedding, residuals and logits
        return GraniteConfig(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.25,
                             logits_scaling=2.0, **common)
    if family in ("gemma3", "gemma3_text"):
        return Gemma3TextConfig(head_dim=8, sliding_window=8, query_pre_attn_scalar=8,
                                layer_types=["sliding_attention", "full_attention"], **common)
    raise ValueError(family)


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, **overrides))
    return model.eval()


FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma3"]


@pytest.fixture
def windows():
    gen = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (8, 24), generator=gen)


def save_tiny_llama_with_demo_tokenizer(path):
    """A tiny random Llama (2 layers × 4 heads) saved to ``path`` with the SmolLM2 tokenizer: a real
    tokenizer for the app's text paths, a model that runs in seconds. Fails if setup has not run."""
    import shutil

    from stat_core.models import demo_model_dir

    src = demo_model_dir("smollm2-135m")
    if not (src / "tokenizer.json").exists():
        pytest.fail(f"the demo model cache {src} has no tokenizer; run scripts/setup.sh")
    tiny_model("llama", vocab_size=49152, max_position_embeddings=512).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, path / name)
    return path


def mask_units(model, plan):
    """A copy of the dense ``model`` with the plan's removed heads' and neurons' output columns zeroed."""
    import copy

    from stat_core.adapters import get_adapter

    masked = copy.deepcopy(model)
    adapter = get_adapter(masked)
    hd = adapter.head_dim
    with torch.no_grad():
        for lp in plan.layers:
            for h in set(range(lp.num_heads)) - set(lp.kept_heads):
                adapter.attn_out_proj(lp.layer).weight[:, h * hd:(h + 1) * hd] = 0
            for j in set(range(lp.intermediate_size)) - set(lp.kept_neurons):
                adapter.mlp_out_proj(lp.layer).weight[:, j] = 0
    return masked


def assert_same_data(actual, expected, rel: float = 1e-4, abs_: float = 1e-12, where: str = "plan"):
    """Plain data (a plan's ``to_dict()``, a report) equal in every discrete part -- keys, ints, strings,
    bools, list lengths, kept indices -- and equal within ``rel`` in every float. Floats computed on
    another machine of the same kind can differ in the last bits (BLAS sums in another order), so a
    stored float is never compared with ``==``; everything a user would see change is."""
    if isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: {type(actual).__name__} instead of a dict"
        assert sorted(actual) == sorted(expected), f"{where}: keys {sorted(actual)} != {sorted(expected)}"
        for key in expected:
            assert_same_data(actual[key], expected[key], rel, abs_, f"{where}.{key}")
    elif isinstance(expected, list):
        assert isinstance(actual, list) and len(actual) == len(expected), f"{where}: lists differ in length"
        for i, (a, e) in enumerate(zip(actual, expected)):
            assert_same_data(a, e, rel, abs_, f"{where}[{i}]")
    elif isinstance(expected, float) and not isinstance(actual, bool) and isinstance(actual, (int, float)):
        assert actual == pytest.approx(expected, rel=rel, abs=abs_, nan_ok=True), f"{where}: {actual} != {expected}"
    else:
        assert type(actual) is type(expected) and actual == expected, f"{where}: {actual!r} != {expected!r}"
