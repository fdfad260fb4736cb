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

NEW_FAMILIES = ["opt", "gpt2"]


def tiny_family_model(family: str = "opt", seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

    if family == "opt":
        config = OPTConfig(**{**dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=64,
                                     vocab_size=128, max_position_embeddings=128, word_embed_proj_dim=32),
                              **overrides})
    elif family == "gpt2":  # Conv1D projections, fused c_attn
        config = GPT2Config(**{**dict(n_embd=32, n_layer=2, n_head=4, n_inner=64, vocab_size=128, n_positions=128,
                                      bos_token_id=0, eos_token_id=0), **overrides})
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _final_norm(model):
    return model.model.decoder.final_layer_norm if model.config.model_type == "opt" else model.transformer.ln_f


def _base(model):
    return model.model if model.config.model_type == "opt" else model.transformer


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
                                   _base(model)(input_ids=windows).last_hidden_state, rtol=1e-4, atol=1e-5)


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


@pytest.mark.parametrize("family, overrides", [("opt", {}), ("opt", {"enable_bias": False}), ("gpt2", {})])
def test_uniform_export_keeps_heads_and_loads_stock(family, overrides, windows, tmp_path):
    """The stock config derives the head size from hidden_size / heads: uniform plans prune
    neurons only, and the width goes into the family's own field (OPT: ``ffn_dim``, GPT-2:
    ``n_inner``). OPT without biases (``enable_bias=False``): the intercept turns the stock flag on;
    the other biases are zeros."""
    from transformers import AutoModelForCausalLM

    model = tiny_family_model(family, **overrides)
    enable_bias = overrides.get("enable_bias", True)
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
    ffn_field = {"opt": "ffn_dim", "gpt2": "n_inner"}[family]
    assert "auto_map" not in config and config[ffn_field] == len(plan.layers[0].kept_neurons)
    assert family != "opt" or config["enable_bias"] is True
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
    from transformers import BloomConfig, BloomForCausalLM

    assert {"opt", "gpt2", "llama", "bert"} <= set(supported_model_types())
    model = BloomForCausalLM(BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError) as err:
        stat_prune_(model, windows % 64, PruneConfig(sparsity=0.2))
    message = str(err.value)
    assert "'bloom'" in message
    assert message.endswith(", ".join(supported_model_types()) + ".")
    listed = message.split("supported types are:")[1]
    assert "opt" in listed and "gpt2" in listed


def test_conv1d_views_share_storage_and_read_as_linear():
    """GPT-2's Conv1D weights are (in, out): the adapter's views are (out, in), write through, and
    the fused c_attn splits into q, k, v of heads·head_dim rows each."""
    model = tiny_family_model("gpt2")
    adapter = get_adapter(model)
    c_attn = model.transformer.h[0].attn.c_attn
    q, (k, v) = adapter.query_proj(0), adapter.key_value_projs(0)
    assert q.weight.shape == k.weight.shape == v.weight.shape == (32, 32)
    torch.testing.assert_close(v.weight, c_attn.weight[:, 64:].T, rtol=0, atol=0)
    torch.testing.assert_close(v.bias, c_attn.bias[64:], rtol=0, atol=0)
    down = adapter.mlp_out_proj(0)
    assert (down.out_features, down.in_features) == (32, 64)
    x = torch.randn(5, 64)
    torch.testing.assert_close(model.transformer.h[0].mlp.c_proj(x), x @ down.weight.T + down.bias)
    with torch.no_grad():
        k.weight[3, 7] = 11.0
    assert c_attn.weight[7, 32 + 3] == 11.0


@pytest.mark.parametrize("family", NEW_FAMILIES)
def test_every_method_runs_or_refuses_by_name(family, windows):
    """The peers and baselines read projections through the adapter (GPT-2: Conv1D views; LLM-Pruner's
    gradients land on the stored Conv1D weights); SliceGPT refuses families it does not rotate."""
    from stat_core.methods import MethodNotApplicable, method_names

    for name in method_names():
        model = tiny_family_model(family)
        config = PruneConfig(sparsity=0.3, method=name, sensitivity_samples=2, batch_size=4)
        if name in ("slicegpt", "block-movement"):  # block movement: encoder classifiers only
            with pytest.raises(MethodNotApplicable, match=family):
                stat_prune_(model, windows, config)
            continue
        plan = stat_prune_(model, windows, config).plan
        adapter = get_adapter(model)
        assert sum(len(lp.kept_neurons) for lp in plan.layers) < sum(lp.intermediate_size for lp in plan.layers), name
        for lp in plan.layers:
            shape = adapter.layer_shape(lp.layer)
            assert (shape.num_heads, shape.intermediate_size) == (len(lp.kept_heads), len(lp.kept_neurons)), name
        assert torch.isfinite(_logits(model, windows)).all(), name
