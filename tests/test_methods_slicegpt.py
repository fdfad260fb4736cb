"""SliceGPT (stat_core.methods.slicegpt) on tiny random decoders: invariance, budget, quality floor."""

import copy

import pytest
import torch

from conftest import tiny_model
from stat_core.adapters import get_adapter
from stat_core.surgery.budget import block_parameter_count
from stat_core.calibration.statistics import CalibrationSet
from stat_core.methods.base import MethodNotApplicable
from stat_core.methods.registry import get_method
from stat_core.methods.slicegpt import (FixedWidthRMSNorm, SliceGPT, fold_norms_, rotate_and_slice_, sliced_block_params)
from stat_core.config import PruneConfig
from stat_core.pipeline import stat_prune_

SUPPORTED = ["llama", "mistral", "qwen2", "qwen3"]


def _random_norms_(model, seed: int = 3) -> None:
    """Give every RMSNorm a non-trivial scale (random inits leave them at 1, which folds trivially)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if type(module).__name__.endswith("RMSNorm") and not name.endswith(("q_norm", "k_norm")):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))


def _kl(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(dense ‖ sliced) of the next-token distributions."""
    lp, lq = ref_logits.float().log_softmax(-1), logits.float().log_softmax(-1)
    return float((lp.exp() * (lp - lq)).sum(-1).mean())


@torch.no_grad()
@pytest.mark.parametrize("family", SUPPORTED)
def test_folding_norms_preserves_logits(family, windows):
    model = tiny_model(family)
    _random_norms_(model)
    ref = model(windows).logits
    folded = copy.deepcopy(model)
    info = fold_norms_(folded)
    assert not info["untied_lm_head"]
    layer = get_adapter(folded).layers[0]
    assert isinstance(layer.input_layernorm, FixedWidthRMSNorm)
    assert isinstance(layer, type(get_adapter(model).layers[0]))  # still the family's layer class
    torch.testing.assert_close(folded(windows).logits, ref, atol=1e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("family,tied", [(f, False) for f in SUPPORTED] + [("llama", True)])
def test_rotation_without_slicing_reproduces_dense_logits(family, tied, windows):
    """Slicing fraction 0: the rotated model (shortcuts, rotated embeddings and head) is the dense one."""
    model = tiny_model(family, tie_word_embeddings=tied)
    _random_norms_(model)
    ref = model(windows).logits
    d = get_adapter(model).hidden_size
    for slice_head in (False, True):
        rotated = copy.deepcopy(model)
        info = rotate_and_slice_(rotated, windows[:4], d, slice_head=slice_head)
        assert info["untied_lm_head"] == tied
        assert rotated.get_output_embeddings().weight is not rotated.get_input_embeddings().weight
        layer = get_adapter(rotated).layers[0]
        assert layer.attn_shortcut_Q.shape == (d, d)
        # The shortcuts are products of orthogonal matrices, and not the identity (a real rotation).
        eye = torch.eye(d)
        torch.testing.assert_close(layer.attn_shortcut_Q @ layer.attn_shortcut_Q.T, eye, atol=1e-5, rtol=0)
        assert (layer.attn_shortcut_Q - eye).abs().max() > 0.1
        torch.testing.assert_close(rotated(windows).logits, ref, atol=2e-5, rtol=1e-4)


@torch.no_grad()
@pytest.mark.parametrize("slice_head", [False, True])
def test_budget_with_shortcuts_met_and_model_generates(slice_head, windows):
    model = tiny_model("llama", hidden_size=64, intermediate_size=128)
    dense_adapter = get_adapter(model)
    dense = block_parameter_count(dense_adapter)
    d = dense_adapter.hidden_size
    assert sliced_block_params(dense_adapter, d) == dense + 2 * 2 * d * d  # the linears, plus 2 shortcuts per layer
    # Half of one hidden direction's cost: the tolerance of a nearest-integer width.
    step = (sliced_block_params(dense_adapter, 40, slice_head) - sliced_block_params(dense_adapter, 39, slice_head)) / dense
    calls = []
    method = get_method("slicegpt") if not slice_head else SliceGPT(slice_head=True)
    config = PruneConfig(sparsity=0.3, method="slicegpt")
    method.check_applicable(model)
    info = method.prune_(model, CalibrationSet.wrap(windows), config, progress=lambda *a: calls.append(a))
    adapter = get_adapter(model)
    width = info["hidden_size_after"]
    assert abs(info["removed_fraction"] - 0.3) <= step / 2 + 1e-9
    shortcuts = sum(lay.attn_shortcut_Q.numel() + lay.mlp_shortcut_Q.numel() for lay in adapter.layers)
    assert info["block_params_before"] == dense
    assert info["block_params_after"] == block_parameter_count(adapter) + shortcuts  # shortcuts count in the budget
    assert info["shortcut_params"] == shortcuts > 0
    assert info["slicing_fraction"] == pytest.approx(1 - width / d)
    assert info["embeddings_sliced"] and info["lm_head_sliced"] == slice_head
    assert info["embedding_params_after"] == 128 * width
    assert info["lm_head_params_after"] == 128 * (width if slice_head else d)
    assert info["seconds"] > 0 and "not counted" in info["budget_note"]
    assert calls[-1] == ("slicegpt", 2, 2) and len(calls) == 2
    assert model.get_input_embeddings().weight.shape == (128, width)
    assert adapter.query_proj(0).in_features == width and adapter.attn_out_proj(1).out_features == width
    assert adapter.mlp_out_proj(1).out_features == (width if slice_head else d)
    assert model.config.slicegpt["hidden_size"] == width

    logits = model(windows).logits
    assert logits.shape == (*windows.shape, 128) and torch.isfinite(logits).all()
    prompt = windows[:1, :6]
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                         pad_token_id=0)
    assert out.shape == (1, 10)
    # Greedy decoding with the KV cache equals re-running the whole prefix each step.
    ids = prompt
    for _ in range(4):
        ids = torch.cat([ids, model(ids, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, ids)

    with pytest.raises(MethodNotApplicable, match="already been sliced"):
        method.check_applicable(model)


@torch.no_grad()
def test_stat_prune_dispatches_and_reports(windows):
    model = tiny_model("qwen2", tie_word_embeddings=True)
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.3, method="slicegpt"))
    assert result.plan is None
    info = result.info
    for key in ("slicing_fraction", "hidden_size_after", "block_params_before", "block_params_after",
                "removed_fraction", "seconds"):
        assert key in info
    assert info["lm_head_untied"] and info["lm_head_params_before"] == 0
    assert len(info["kept_energy"]["attention"]) == 2 and 0 < info["kept_energy"]["embeddings"] <= 1
    assert torch.isfinite(model(windows).logits).all()
    with pytest.raises(ValueError, match="params"):
        stat_prune_(tiny_model("llama"), windows, PruneConfig(sparsity=0.3, method="slicegpt", budget_kind="flops"))
    with pytest.raises(ValueError, match="one-shot"):
        stat_prune_(tiny_model("llama"), windows, PruneConfig(sparsity=0.3, method="slicegpt", mode="propagate"))


@torch.no_grad()
def test_pca_directions_beat_random_directions_at_the_same_width():
    gen = torch.Generator().manual_seed(5)
    calib = torch.randint(0, 128, (8, 24), generator=gen)
    held_out = torch.randint(0, 128, (8, 24), generator=gen)
    model = tiny_model("llama")
    _random_norms_(model)
    ref = model(held_out).logits
    pca = copy.deepcopy(model)
    rotate_and_slice_(pca, calib, 20)
    kl_pca = _kl(ref, pca(held_out).logits)
    kl_random = []
    for seed in range(3):
        rand = copy.deepcopy(model)
        rotate_and_slice_(rand, calib, 20, basis="random", seed=seed)
        kl_random.append(_kl(ref, rand(held_out).logits))
    # Measured: PCA ≈ 5× smaller KL than random directions on these tiny models.
    assert 0 < kl_pca < 0.5 * min(kl_random)


@torch.no_grad()
def test_dtype_device_and_padding_mask(windows):
    model = tiny_model("llama").to(torch.bfloat16)
    mask = torch.ones_like(windows)
    mask[:3, -5:] = 0  # right padding on three windows: never enters a PCA
    data = CalibrationSet(windows, attention_mask=mask)
    info = SliceGPT().prune_(model, data, PruneConfig(sparsity=0.2, method="slicegpt"))
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert info["hidden_size_after"] < 32
    assert torch.isfinite(model(windows).logits.float()).all()


def test_unsupported_families_refused_in_one_sentence(windows):
    method = get_method("slicegpt")
    with pytest.raises(MethodNotApplicable, match="gemma3_text") as err:
        method.check_applicable(tiny_model("gemma3"))
    assert str(err.value).count(". ") == 0
    with pytest.raises(MethodNotApplicable, match="not gemma3_text"):
        stat_prune_(tiny_model("gemma3"), windows, PruneConfig(sparsity=0.3, method="slicegpt"))
