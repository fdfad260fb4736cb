"""Families described only by their layout (``remote_modeling.LAYOUTS``): the same truths as the
Llama and BERT families: keep-all identity, masked equivalence, exact low-rank reproduction,
export and reload three ways. Tiny random configs; no weights are downloaded."""

import copy
import json

import pytest
import torch

from conftest import mask_units
from stat_core.adapters import UnsupportedModelError, get_adapter, supported_model_types
from stat_core.budget import block_geometry, block_parameter_count
from stat_core.calibrate import LayerwiseRunner
from stat_core.export import export_pruned, load_pruned
from stat_core.prune import PruneConfig, apply_plan_, stat_prune_
from test_export import _decoder_inputs, _load_in_clean_interpreter

NEW_FAMILIES = ["opt"]


def tiny_family_model(family: str = "opt", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, OPTConfig

    if family != "opt":
        raise ValueError(family)
    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64, vocab_size=128,
                  max_position_embeddings=128, word_embed_proj_dim=32)
    common.update(overrides)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(OPTConfig(**common)).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _final_norm(model):
    return model.model.decoder.final_layer_norm


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_adapter_reads_the_layout(family, windows):
    model = tiny_family_model(family)
    adapter = get_adapter(model)
    assert adapter.family == family and adapter.num_layers == 2 and adapter.head_dim == 8
    shape = adapter.layer_shape(1)
    assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (4, 4, 64)
    # Block-by-block outputs, through the final norm, equal the model's own last hidden state.
    runner = LayerwiseRunner(model, adapter, windows, batch_size=4)
    hidden = runner.hidden
    for layer in range(adapter.num_layers):
        hidden = runner.run_block(layer, hidden)
    with torch.no_grad():
        torch.testing.assert_close(_final_norm(model)(torch.cat(hidden)),
                                   model.model(input_ids=windows).last_hidden_state, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_keep_all_is_identity(family, windows):
    model = tiny_family_model(family)
    ref = _logits(model, windows)
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.0, sensitivity_samples=2, batch_size=4))
    assert all(len(lp.kept_neurons) == lp.intermediate_size and len(lp.kept_heads) == lp.num_heads
               for lp in result.plan.layers)
    torch.testing.assert_close(_logits(model, windows), ref)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("mode", ["one-shot", "propagate"])
def test_prune_forward_generate_and_budget(family, mode, windows):
    model = tiny_family_model(family)
    before = block_parameter_count(get_adapter(model))
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.4, mode=mode, sensitivity_samples=2, batch_size=4))
    adapter = get_adapter(model)
    after = block_parameter_count(adapter)
    assert abs((before - after) - 0.4 * before) <= block_geometry(adapter, 0).mlp_params_per_neuron
    assert any(len(lp.kept_heads) < lp.num_heads for lp in result.plan.layers), "no head was removed"
    for lp in result.plan.layers:
        shape = adapter.layer_shape(lp.layer)
        assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (
            len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_neurons))
        assert adapter.attention(lp.layer).num_heads == shape.num_heads
    assert torch.isfinite(_logits(model, windows)).all()
    out = model.generate(windows[:2, :5], max_new_tokens=6, do_sample=False, use_cache=True)
    out_nocache = model.generate(windows[:2, :5], max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(out, out_nocache)


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_uncorrected_pruning_equals_masked_dense(family, windows):
    model = tiny_family_model(family)
    result = stat_prune_(copy.deepcopy(model), windows, PruneConfig(sparsity=0.4, sensitivity_samples=0, batch_size=4))
    assert any(len(lp.kept_heads) < lp.num_heads for lp in result.plan.layers)
    masked = mask_units(model, result.plan)
    apply_plan_(model, result.plan, stats=None)
    torch.testing.assert_close(_logits(model, windows), _logits(masked, windows), rtol=1e-4, atol=1e-5)


def _duplicate_units(model):
    """Second half of the neurons and of the heads exact copies of the first (weights and biases):
    both activations become exactly low rank."""
    adapter = get_adapter(model)
    hd = adapter.head_dim
    with torch.no_grad():
        for i in range(adapter.num_layers):
            for proj in adapter.mlp_in_projs(i):
                half = proj.weight.shape[0] // 2
                proj.weight[half:] = proj.weight[:half]
                proj.bias[half:] = proj.bias[:half]
            half = adapter.layer_shape(i).num_heads // 2 * hd
            for proj in [adapter.query_proj(i)] + adapter.key_value_projs(i):
                proj.weight[half:2 * half] = proj.weight[:half]
                proj.bias[half:2 * half] = proj.bias[:half]
    return model


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("mode", ["one-shot", "propagate"])
def test_exactly_low_rank_activations_are_reproduced(family, mode, windows):
    model = _duplicate_units(tiny_family_model(family))
    ref = _logits(model, windows)
    adapter = get_adapter(model)
    geo = block_geometry(adapter, 0)
    shape = adapter.layer_shape(0)
    redundant = adapter.num_layers * (
        geo.mlp_params_per_neuron * (shape.intermediate_size // 2)
        + (geo.q_params_per_head + geo.kv_params_per_head + geo.o_params_per_head) * (shape.num_heads // 2))
    sparsity = 0.95 * redundant / block_parameter_count(adapter)  # slack: any subset of copies is free
    uncorrected = copy.deepcopy(model)
    result = stat_prune_(model, windows, PruneConfig(sparsity=sparsity, mode=mode, sensitivity_samples=2, batch_size=4))
    assert sum(lp.num_heads - len(lp.kept_heads) for lp in result.plan.layers) >= 1
    rel = (_logits(model, windows) - ref).norm() / ref.norm()
    assert rel < 1e-4
    # Without the correction the same cut is far off: the correction is what reproduces.
    apply_plan_(uncorrected, result.plan, stats=None)
    assert (_logits(uncorrected, windows) - ref).norm() / ref.norm() > 100 * rel


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_non_uniform_export_reloads_both_ways_with_same_logits(family, windows, tmp_path):
    from transformers import AutoModelForCausalLM

    model = tiny_family_model(family)
    plan = stat_prune_(model, windows, PruneConfig(sparsity=0.4, sensitivity_samples=2, batch_size=4,
                                                   intercept=True)).plan
    shapes = {(len(lp.kept_heads), len(lp.kept_neurons)) for lp in plan.layers}
    assert len(shapes) > 1, "the test needs layers of different shapes"
    inputs = _decoder_inputs()
    ref = _logits(model, inputs["input_ids"])
    info = export_pruned(model, None, tmp_path / "out", plan=plan)
    assert not info.uniform and "modeling_stat.py" in info.files
    reloaded, _ = load_pruned(info.path)
    torch.testing.assert_close(_logits(reloaded, inputs["input_ids"]), ref, rtol=0, atol=0)
    remote = _load_in_clean_interpreter(info.path, "AutoModelForCausalLM", inputs, tmp_path)
    assert remote["class"].startswith("StatPruned")
    torch.testing.assert_close(remote["logits"], ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        AutoModelForCausalLM.from_pretrained(info.path, trust_remote_code=False)


@pytest.mark.parametrize("family", NEW_FAMILIES)
@pytest.mark.parametrize("enable_bias", [True, False])
def test_uniform_export_keeps_heads_and_loads_stock(family, enable_bias, windows, tmp_path):
    """The stock config derives the head size from hidden_size / heads: uniform plans prune
    neurons only, and the width goes into the family's own field (OPT: ``ffn_dim``). Without
    biases (``enable_bias=False``) the intercept turns the stock flag on; the other biases are zeros."""
    from transformers import AutoModelForCausalLM

    model = tiny_family_model(family, enable_bias=enable_bias)
    plan = stat_prune_(model, windows, PruneConfig(sparsity=0.3, uniform=True, sensitivity_samples=2, batch_size=4,
                                                   intercept=True)).plan
    assert all(len(lp.kept_heads) == lp.num_heads for lp in plan.layers)
    widths = {len(lp.kept_neurons) for lp in plan.layers}
    assert len(widths) == 1 and widths.pop() < 64
    inputs = _decoder_inputs()
    ref = _logits(model, inputs["input_ids"])
    info = export_pruned(model, None, tmp_path / "out", plan=plan)
    assert info.uniform and "modeling_stat.py" not in info.files
    config = json.loads((info.path / "config.json").read_text())
    assert "auto_map" not in config and config["ffn_dim"] == len(plan.layers[0].kept_neurons)
    assert config["enable_bias"] is True
    down = get_adapter(model).mlp_out_proj(0)
    assert down.bias is not None and down.bias.abs().max() > 0
    stock = AutoModelForCausalLM.from_pretrained(info.path).eval()
    assert type(stock).__name__ == type(model).__name__
    torch.testing.assert_close(_logits(stock, inputs["input_ids"]), ref, rtol=0, atol=0)
    if not enable_bias:  # biases the flag forced onto projections the correction did not touch are zero
        q_bias = get_adapter(stock).query_proj(0).bias
        torch.testing.assert_close(q_bias, torch.zeros_like(q_bias), rtol=0, atol=0)
    reloaded, _ = load_pruned(info.path)
    torch.testing.assert_close(_logits(reloaded, inputs["input_ids"]), ref, rtol=0, atol=0)
    remote = _load_in_clean_interpreter(info.path, "AutoModelForCausalLM", inputs, tmp_path)
    torch.testing.assert_close(remote["logits"], ref, rtol=0, atol=0)


def test_unsupported_architecture_lists_every_supported_family(windows):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    assert {"opt", "llama", "bert"} <= set(supported_model_types())
    model = GPTNeoXForCausalLM(GPTNeoXConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2,
                                             intermediate_size=32, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as err:
        stat_prune_(model, windows % 64, PruneConfig(sparsity=0.2))
    message = str(err.value)
    assert "gpt_neox" in message
    assert message.endswith(", ".join(supported_model_types()) + ".")
    assert "opt" in message.split("supported types are:")[1]
