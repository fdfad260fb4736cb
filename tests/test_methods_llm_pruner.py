"""LLM-Pruner (no recovery): Taylor group scores, the skip-first/last allocation, end to end."""

import logging

import pytest
import torch
from torch import nn

from conftest import tiny_model
from stat_core.adapters import get_adapter
from stat_core.surgery.budget import block_parameter_count
from stat_core.calibration.statistics import CalibrationSet
from stat_core.methods.registry import get_method
from stat_core.methods.base import layer_costs
from stat_core.methods.llm_pruner import pruned_layer_range, taylor_scores
from stat_core.pipeline import Calibration, plan_pruning, stat_prune_
from stat_core.config import PruneConfig
from test_encoders import padded_set, tiny_classifier


def _empty_calibration():
    return Calibration(dense_stats=[], sensitivity=None, analyses=[])


def _plan(model, data, config):
    return plan_pruning(model, _empty_calibration(), config, data=data)


def _direct_salience(model, loss_fn):
    """``|w · ∂L/∂w|`` of every parameter, by plain autograd on one loss over the whole set."""
    model.zero_grad(set_to_none=True)
    loss_fn().backward()
    out = {name: (p.detach() * p.grad).abs().double() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_taylor_group_scores_equal_a_direct_computation(windows):
    model = tiny_model()  # 4 heads sharing 2 KV heads, head_dim 8, d_ff 64
    data = CalibrationSet(windows)
    scores = taylor_scores(model, data)  # two backward batches of 4 windows

    def loss():
        logits = model(input_ids=windows, use_cache=False).logits
        targets = windows[:, 1:].reshape(-1)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets)

    sal = _direct_salience(model, loss)
    hd = 8
    for layer in range(2):
        pre = f"model.layers.{layer}."
        for h in range(4):
            rows = slice(h * hd, (h + 1) * hd)
            expected = (sal[pre + "self_attn.q_proj.weight"][rows].sum()
                        + sal[pre + "self_attn.o_proj.weight"][:, rows].sum())
            torch.testing.assert_close(scores["q_o"][layer][h], expected, rtol=1e-4, atol=1e-9)
        for g in range(2):
            rows = slice(g * hd, (g + 1) * hd)
            expected = (sal[pre + "self_attn.k_proj.weight"][rows].sum()
                        + sal[pre + "self_attn.v_proj.weight"][rows].sum())
            torch.testing.assert_close(scores["k_v"][layer][g], expected, rtol=1e-4, atol=1e-9)
        for j in (0, 17, 63):
            expected = (sal[pre + "mlp.gate_proj.weight"][j].sum() + sal[pre + "mlp.up_proj.weight"][j].sum()
                        + sal[pre + "mlp.down_proj.weight"][:, j].sum())
            torch.testing.assert_close(scores["neurons"][layer][j], expected, rtol=1e-4, atol=1e-9)


def test_low_precision_weights_accumulate_the_same_gradient(windows):
    """Non-float32 weights take the float32 accumulation path; float64 must agree with float32."""
    a = taylor_scores(tiny_model(), CalibrationSet(windows))
    b = taylor_scores(tiny_model().double(), CalibrationSet(windows))
    for key in ("q_o", "k_v", "neurons"):
        for x, y in zip(a[key], b[key]):
            torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-8)


def test_classifier_scores_use_the_models_own_prediction():
    model = tiny_classifier("bert")
    data = padded_set()
    scores = taylor_scores(model, data)

    def loss():
        logits = model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits
        return nn.functional.cross_entropy(logits, logits.detach().argmax(-1))  # not data.labels

    sal = _direct_salience(model, loss)
    pre = "bert.encoder.layer.1."
    h, hd = 2, 8
    rows = slice(h * hd, (h + 1) * hd)
    qkv = sum(sal[pre + f"attention.self.{n}.weight"][rows].sum() for n in ("query", "key", "value"))
    expected = qkv + sal[pre + "attention.output.dense.weight"][:, rows].sum()
    torch.testing.assert_close(scores["q_o"][1][h] + scores["k_v"][1][h], expected, rtol=1e-4, atol=1e-10)
    j = 5
    expected = sal[pre + "intermediate.dense.weight"][j].sum() + sal[pre + "output.dense.weight"][:, j].sum()
    torch.testing.assert_close(scores["neurons"][1][j], expected, rtol=1e-4, atol=1e-10)


def test_zeroed_units_score_lowest_and_go_first(windows):
    model = tiny_model(num_hidden_layers=4)
    adapter = get_adapter(model)
    hd, layer, j = 8, 1, 11
    with torch.no_grad():
        for lin in adapter.mlp_in_projs(layer):
            lin.weight[j] = 0
        adapter.mlp_out_proj(layer).weight[:, j] = 0
        # The whole KV group 0 of layer 2: its k/v rows, its query heads 0 and 1 and their o columns.
        for lin in [adapter.query_proj(2), *adapter.key_value_projs(2)]:
            lin.weight[: 2 * hd if lin is adapter.query_proj(2) else hd] = 0
        adapter.attn_out_proj(2).weight[:, : 2 * hd] = 0
    data = CalibrationSet(windows)
    scores = taylor_scores(model, data)
    assert int(torch.argmin(scores["neurons"][layer])) == j and float(scores["neurons"][layer][j]) == 0.0
    assert float(scores["q_o"][2][:2].sum() + scores["k_v"][2][0]) == 0.0
    light = _plan(model, data, PruneConfig(sparsity=0.03, method="llm-pruner"))
    assert j not in light.layers[layer].kept_neurons
    assert len(light.layers[layer].kept_neurons) > 32  # only a few went, and this one first
    heavy = _plan(model, data, PruneConfig(sparsity=0.3, method="llm-pruner"))
    assert heavy.layers[2].kept_kv_heads == [1] and heavy.layers[2].kept_heads == [2, 3]


def test_layer_range_scales_their_recipe():
    assert list(pruned_layer_range(32)) == list(range(4, 30))  # --block_*_layer_start 4 --end 30
    assert list(pruned_layer_range(4)) == [1, 2]
    assert list(pruned_layer_range(2)) == []
    assert list(pruned_layer_range(12)) == list(range(2, 11))


@pytest.mark.parametrize("kind", ["params", "flops"])
def test_first_and_last_layers_kept_and_one_ratio_elsewhere(kind, windows):
    model = tiny_model(num_hidden_layers=4)
    config = PruneConfig(sparsity=0.2, method="llm-pruner", budget_kind=kind)
    plan = _plan(model, CalibrationSet(windows), config)
    full = [(lp.num_heads, lp.num_kv_heads, lp.intermediate_size) for lp in plan.layers]
    kept = [(len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_neurons)) for lp in plan.layers]
    assert kept[0] == full[0] and kept[3] == full[3]
    assert kept[1] == kept[2] and kept[1] != full[1]
    assert plan.budget["pruned_layers"] == [1, 2]
    costs = layer_costs(get_adapter(model), config)
    total = sum(c.full for c in costs)
    one_neuron = max(c.mlp(1) - c.mlp(0) for c in costs)
    assert abs(plan.budget["achieved"] - 0.2) * total <= 2 * one_neuron  # one neuron per pruned layer


def test_first_and_last_layers_join_when_the_others_cannot_carry_the_target(windows, caplog):
    model = tiny_model(num_hidden_layers=4)
    with caplog.at_level(logging.WARNING, logger="stat_core.methods.llm_pruner"):
        plan = _plan(model, CalibrationSet(windows), PruneConfig(sparsity=0.6, method="llm-pruner"))
    assert "first and last layers too" in caplog.text
    assert plan.budget["pruned_layers"] == [0, 1, 2, 3]
    assert abs(plan.budget["achieved"] - 0.6) < 0.02
    assert len({(len(lp.kept_heads), len(lp.kept_neurons)) for lp in plan.layers}) == 1


def test_uniform_and_unit_switches(windows):
    model = tiny_model(num_hidden_layers=4)
    data = CalibrationSet(windows)
    uniform = _plan(model, data, PruneConfig(sparsity=0.3, method="llm-pruner", uniform=True))
    assert len({(len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_neurons)) for lp in uniform.layers}) == 1
    assert abs(uniform.budget["achieved"] - 0.3) < 0.02
    no_heads = _plan(model, data, PruneConfig(sparsity=0.2, method="llm-pruner", prune_heads=False))
    assert all(len(lp.kept_heads) == lp.num_heads for lp in no_heads.layers)
    assert abs(no_heads.budget["achieved"] - 0.2) < 0.02
    no_neurons = _plan(model, data, PruneConfig(sparsity=0.1, method="llm-pruner", prune_neurons=False))
    assert all(len(lp.kept_neurons) == lp.intermediate_size for lp in no_neurons.layers)
    assert abs(no_neurons.budget["achieved"] - 0.1) < 0.02  # nearest feasible head count


def test_prepare_needs_data_and_is_idempotent(windows):
    model = tiny_model()
    method = get_method("llm-pruner")
    calib = _empty_calibration()
    with pytest.raises(ValueError, match="calibration windows"):
        method.prepare(model, None, calib)
    method.prepare(model, CalibrationSet(windows), calib)
    first = calib.extras["llm-pruner"]
    method.prepare(model, CalibrationSet(windows[:2]), calib)
    method.prepare(model, None, calib)
    assert calib.extras["llm-pruner"] is first


def _check_end_to_end(model, data, run):
    adapter = get_adapter(model)
    frozen = {n for i, (n, _) in enumerate(model.named_parameters()) if i % 3 == 0}
    for n, p in model.named_parameters():
        p.requires_grad_(n not in frozen)
    before = block_parameter_count(adapter)
    result = stat_prune_(model, data, PruneConfig(sparsity=0.3, method="llm-pruner"))
    assert result.plan.correction == "none"
    removed = 1 - block_parameter_count(adapter) / before
    assert abs(removed - 0.3) < 0.02 and abs(removed - result.plan.budget["achieved"]) < 1e-9
    for i in range(adapter.num_layers):
        shape = adapter.layer_shape(i)
        assert shape.num_heads >= 1 and shape.num_kv_heads >= 1 and shape.intermediate_size >= 1
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad == (n not in frozen) for n, p in model.named_parameters())
    with torch.no_grad():
        out = run(model)
    assert torch.isfinite(out).all()


def test_end_to_end_llama(windows):
    model = tiny_model(num_hidden_layers=4)
    _check_end_to_end(model, windows, lambda m: m(input_ids=windows).logits)
    assert get_adapter(model).layer_shape(0).num_heads == 4  # first layer skipped at 30%


@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_end_to_end_encoder(family):
    model = tiny_classifier(family)  # two layers: the first and last are pruned too
    data = padded_set()
    _check_end_to_end(model, data, lambda m: m(input_ids=data.input_ids, attention_mask=data.attention_mask).logits)
