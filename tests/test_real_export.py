"""The real SmolLM2 export reloads every applicable way and generates the same tokens (slow)."""

import copy

import pytest
import torch

from test_export import _load_in_clean_interpreter
from stat_core.data.sources import CalibrationConfig, calibration_windows, wikipedia_split
from stat_core.export.hf import export_pruned, load_pruned
from stat_core.models import load_model
from stat_core.config import PruneConfig
from stat_core.pipeline import cached_calibration, prune_from_calibration_

pytestmark = pytest.mark.slow

PROMPT = "The history of the city begins"



@pytest.fixture(scope="module")
def pruned_pair():
    """SmolLM2 pruned 30% twice from one calibration: per-layer shapes and uniform. The app's default
    windows and settings, which scripts/setup.sh calibrated into the calibration cache: read in
    seconds (computed here, and stored, when the cache has no current entry)."""
    dense, tok = load_model("smollm2-135m", device="cpu")
    windows = calibration_windows(tok, wikipedia_split("calibration"), CalibrationConfig())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STAT_CALIBRATION_CACHE", "on")
        calib = cached_calibration(dense, windows, PruneConfig(sparsity=0.3))
    models = {}
    for uniform in (False, True):
        model = copy.deepcopy(dense)
        result = prune_from_calibration_(model, calib, PruneConfig(sparsity=0.3, uniform=uniform), "smollm2-135m")
        models[uniform] = (model, result.plan)
    return models, tok


def _generate(model, tok):
    ids = tok(PROMPT, return_tensors="pt").input_ids
    return model.generate(ids, max_new_tokens=12, do_sample=False)


@pytest.mark.parametrize("uniform", [False, True])
def test_smollm2_export_reloads_and_generates_the_same_tokens(pruned_pair, uniform, tmp_path):
    from transformers import AutoModelForCausalLM

    models, tok = pruned_pair
    model, plan = models[uniform]
    if not uniform:
        assert len({(len(lp.kept_heads), len(lp.kept_neurons)) for lp in plan.layers}) > 1
    expected = _generate(model, tok)
    info = export_pruned(model, tok, tmp_path / "smollm2-30", plan=plan)
    assert info.uniform is uniform
    reloaded, reloaded_tok = load_pruned(info.path)
    assert torch.equal(_generate(reloaded, reloaded_tok), expected)
    # Stock transformers, in a clean interpreter without stat_core: logits over the generated text.
    with torch.no_grad():
        ref_logits = model(input_ids=expected).logits
    remote = _load_in_clean_interpreter(info.path, "AutoModelForCausalLM", {"input_ids": expected}, tmp_path)
    torch.testing.assert_close(remote["logits"], ref_logits, rtol=0, atol=0)
    if uniform:
        stock = AutoModelForCausalLM.from_pretrained(info.path).eval()
        assert type(stock).__name__ == "LlamaForCausalLM"
        assert torch.equal(_generate(stock, tok), expected)
