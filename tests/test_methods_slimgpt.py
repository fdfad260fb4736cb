"""SlimGPT (structured OBS, greedy heads, dynamic channel batches, logarithmic layer ratios):
its defining properties on constructed matrices and tiny random models."""

import copy
import math

import pytest
import torch

from conftest import tiny_model
from test_encoders import padded_set, tiny_classifier
from stat_core.adapters import get_adapter
from stat_core.surgery.budget import block_geometry, block_parameter_count
from stat_core.linalg import interpolation_matrix, output_error, ridge_of
from stat_core.methods.slimgpt import (PERCDAMP, SlimGPT, dynamic_group_sizes, log_schedule, log_schedule_shape, prune_channels_obs, prune_heads_obs)
from stat_core.config import PruneConfig
from stat_core.surgery.apply import apply_plan_
from stat_core.surgery.apply import head_columns
from stat_core.pipeline import stat_prune_


def _gram(z: torch.Tensor) -> torch.Tensor:
    z = z.double()
    return z.T @ z


def _refit(gram, weight, kept_cols):
    """The least-squares refit with SlimGPT's damping as a relative ridge (what the plan applies)."""
    t = interpolation_matrix(gram, kept_cols, ridge_of(gram, PERCDAMP))
    return weight.double() @ t.T


def test_obs_head_removal_equals_least_squares_refit():
    gen = torch.Generator().manual_seed(0)
    n_heads, hd = 6, 4
    z = torch.randn(300, n_heads * hd, generator=gen, dtype=torch.float64)
    z[:, 4:8] += 0.7 * z[:, 12:16]  # correlated heads, so the compensation is not trivial
    w = torch.randn(10, n_heads * hd, generator=gen, dtype=torch.float64)
    gram = _gram(z)
    for n_kv, keep, keep_kv in [(6, 2, 2), (3, 4, 2), (2, 3, 1)]:
        heads, kv, order, w_obs = prune_heads_obs(gram, w, n_heads, n_kv, hd, keep, keep_kv)
        group = n_heads // n_kv
        assert len(heads) == keep and len(kv) == keep_kv and sorted(order) == list(range(n_heads))
        assert all(sum(h // group == g for h in heads) == keep // keep_kv for g in kv)  # same r per kept group
        cols = head_columns(heads, hd)
        torch.testing.assert_close(w_obs[:, cols], _refit(gram, w, cols), rtol=1e-8, atol=1e-9)
        removed = torch.ones(n_heads * hd, dtype=torch.bool)
        removed[cols] = False
        assert (w_obs[:, removed] == 0).all()
        # and the compensation matters: the kept columns moved
        assert (w_obs[:, cols] - w[:, cols]).abs().max() > 1e-3


def test_obs_channel_batches_equal_least_squares_refit():
    gen = torch.Generator().manual_seed(1)
    n = 200
    basis = torch.randn(500, 120, generator=gen, dtype=torch.float64)
    z = basis @ torch.randn(120, n, generator=gen, dtype=torch.float64) + 0.1 * torch.randn(500, n, generator=gen,
                                                                                           dtype=torch.float64)
    w = torch.randn(8, n, generator=gen, dtype=torch.float64)
    gram = _gram(z)
    assert dynamic_group_sizes(150) == [64, 64, 22]  # several batches, each re-scored after the update
    removed, w_obs = prune_channels_obs(gram, w, 150)
    assert len(set(removed)) == 150
    kept = torch.tensor(sorted(set(range(n)) - set(removed)))
    torch.testing.assert_close(w_obs[:, kept], _refit(gram, w, kept), rtol=1e-7, atol=1e-8)


def test_dynamic_group_sizes_follow_their_code():
    # LLaMA-7B, 20% of 11008 channels: a large batch, a smaller one, then batches of 64
    sizes = dynamic_group_sizes(round(11008 * 0.2))
    assert sizes[:3] == [845, 166, 64] and sum(sizes) == 2202 and set(sizes[2:-1]) == {64}
    assert dynamic_group_sizes(5000)[0] == 1024  # capped
    assert dynamic_group_sizes(20) == [20]


def _duplicated_heads_case(n_heads=4, hd=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(400, n_heads * hd, generator=gen, dtype=torch.float64)
    w = torch.randn(8, n_heads * hd, generator=gen, dtype=torch.float64)
    return z, w


def test_greedy_removes_the_head_whose_output_another_head_duplicates():
    hd = 3
    z, w = _duplicated_heads_case(hd=hd)
    z[:, 3 * hd:4 * hd] = z[:, 1 * hd:2 * hd]  # head 3 repeats head 1: either can go for (almost) free
    gram = _gram(z)
    heads, _, order, _ = prune_heads_obs(gram, w, 4, 4, hd, 3, 3)
    gone = (set(range(4)) - set(heads)).pop()
    assert gone in (1, 3) and order[-1] == gone
    # it is the cheapest single removal by the exact (least-squares) output error
    exact = {h: output_error(gram, w, head_columns([k for k in range(4) if k != h], hd)) for h in range(4)}
    assert exact[gone] == min(exact.values()) and exact[gone] < 1e-2 * sorted(exact.values())[2]


def test_greedy_removal_respects_grouped_query_attention():
    hd = 3
    z, w = _duplicated_heads_case(hd=hd, seed=1)
    # 4 query heads, 2 KV groups {0,1} and {2,3}. Head 1 repeats head 0, head 3 repeats head 2:
    # one head per group can go for free; keeping (2 heads, 2 groups) must keep one of each pair.
    z[:, 1 * hd:2 * hd] = z[:, 0:hd]
    z[:, 3 * hd:4 * hd] = z[:, 2 * hd:3 * hd]
    heads, kv, _, _ = prune_heads_obs(_gram(z), w, 4, 2, hd, 2, 2)
    assert kv == [0, 1] and len({h // 2 for h in heads}) == 2
    # group 1 nearly silent: keeping (2 heads, 1 group) must keep group 0 whole
    z, w = _duplicated_heads_case(hd=hd, seed=2)
    z[:, 2 * hd:] *= 1e-3
    heads, kv, _, _ = prune_heads_obs(_gram(z), w, 4, 2, hd, 2, 1)
    assert kv == [0] and heads == [0, 1]


def test_log_schedule_increases_with_depth_and_averages_to_the_target():
    # The authors' LLaMA-7B recipe for 20%: 0.0625 in the first layer, 0.25 in the last, log in between.
    ratios = log_schedule(32, 0.2)
    assert abs(ratios[0] - 0.0625) < 1e-3 and abs(ratios[-1] - 0.25) < 1e-3
    assert all(b > a for a, b in zip(ratios, ratios[1:]))
    assert abs(sum(ratios) / 32 - 0.2) < 1e-9
    expected = [ratios[-1] * (0.25 + 0.75 * math.log(1 + i) / math.log(32)) for i in range(32)]
    assert max(abs(a - b) for a, b in zip(ratios, expected)) < 1e-9
    # cost-weighted mean with caps: a capped layer's excess goes to the others
    weights = [1.0, 2.0, 1.0, 3.0]
    capped = log_schedule(4, 0.5, weights, caps=[0.9, 0.9, 0.9, 0.6])
    assert capped[-1] == pytest.approx(0.6) and capped[0] < capped[1] < capped[2]
    assert sum(r * w for r, w in zip(capped, weights)) / sum(weights) == pytest.approx(0.5)
    assert log_schedule_shape(1) == [1.0]


def _mse(a, b):
    return float(((a - b) ** 2).mean())


def _llama_logits(model, windows):
    with torch.no_grad():
        return model(input_ids=windows, use_cache=False).logits


def test_end_to_end_on_tiny_llama_with_gqa(windows):
    dense = tiny_model("llama", num_hidden_layers=3)  # 4 query heads sharing 2 KV heads
    model = copy.deepcopy(dense)
    before = block_parameter_count(get_adapter(model))
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.3, method="slimgpt", sensitivity_samples=0,
                                                     batch_size=4))
    plan, adapter = result.plan, get_adapter(model)
    assert plan.correction == "least-squares" and plan.correction_ridge == PERCDAMP and plan.method == "slimgpt"
    removed = before - block_parameter_count(adapter)
    per_neuron = block_geometry(adapter, 0).mlp_params_per_neuron
    assert abs(removed - 0.3 * before) <= per_neuron  # budget met within one neuron
    assert abs(plan.budget["achieved"] - removed / before) < 1e-12
    ratios = plan.budget["layer_ratios"]
    assert ratios[0] < ratios[1] < ratios[2]
    kept = [len(lp.kept_neurons) for lp in plan.layers]
    assert kept[0] > kept[1] > kept[2]  # deeper layers lose more
    for lp in plan.layers:
        shape = adapter.layer_shape(lp.layer)
        assert len(lp.kept_heads) >= 1 and len(lp.kept_neurons) >= 1
        assert (shape.num_heads, shape.num_kv_heads, shape.intermediate_size) == (
            len(lp.kept_heads), len(lp.kept_kv_heads), len(lp.kept_neurons))
        assert shape.num_heads % shape.num_kv_heads == 0
    assert any(len(lp.kept_heads) < lp.num_heads for lp in plan.layers)
    logits = _llama_logits(model, windows)
    assert torch.isfinite(logits).all()
    model.generate(windows[:1, :5], max_new_tokens=3, do_sample=False)
    # the OBS compensation helps: closer to the dense model than the same cut without it
    uncorrected = copy.deepcopy(dense)
    apply_plan_(uncorrected, plan, None)
    ref = _llama_logits(dense, windows)
    assert _mse(logits, ref) < _mse(_llama_logits(uncorrected, windows), ref)


def test_end_to_end_on_tiny_bert():
    dense = tiny_classifier("bert")
    data = padded_set(n=24, seed=3)
    model = copy.deepcopy(dense)
    before = block_parameter_count(get_adapter(model))
    result = stat_prune_(model, data, PruneConfig(sparsity=0.3, method="slimgpt", sensitivity_samples=0, batch_size=8))
    adapter = get_adapter(model)
    removed = before - block_parameter_count(adapter)
    assert abs(removed - 0.3 * before) <= block_geometry(adapter, 0).mlp_params_per_neuron
    assert all(k["heads"] >= 1 and k["neurons"] >= 1 for k in result.plan.kept_summary())

    def logits(m):
        with torch.no_grad():
            return m(input_ids=data.input_ids, attention_mask=data.attention_mask).logits

    assert torch.isfinite(logits(model)).all()
    uncorrected = copy.deepcopy(dense)
    apply_plan_(uncorrected, result.plan, None)
    assert _mse(logits(model), logits(dense)) < _mse(logits(uncorrected), logits(dense))


@pytest.mark.parametrize("heads, neurons, target", [(True, False, 0.15), (False, True, 0.25)])
def test_one_module_only_takes_the_whole_budget(heads, neurons, target, windows):
    model = tiny_model("llama", num_hidden_layers=3)
    before = block_parameter_count(get_adapter(model))
    plan = stat_prune_(model, windows, PruneConfig(sparsity=target, method="slimgpt", prune_heads=heads,
                                                   prune_neurons=neurons, sensitivity_samples=0, batch_size=4)).plan
    removed = 1 - block_parameter_count(get_adapter(model)) / before
    if neurons:
        assert all(len(lp.kept_heads) == lp.num_heads for lp in plan.layers)
        assert abs(removed - target) < 0.01
    else:
        assert all(len(lp.kept_neurons) == lp.intermediate_size for lp in plan.layers)
        assert abs(removed - target) < 0.08  # head granularity only (one head here is 5.6% of the blocks)


def test_uniform_keeps_one_shape(windows):
    model = tiny_model("llama", num_hidden_layers=3)
    before = block_parameter_count(get_adapter(model))
    plan = stat_prune_(model, windows, PruneConfig(sparsity=0.3, method="slimgpt", uniform=True,
                                                   sensitivity_samples=0, batch_size=4)).plan
    adapter = get_adapter(model)
    assert len({adapter.layer_shape(i) for i in range(adapter.num_layers)}) == 1
    removed = before - block_parameter_count(adapter)
    assert abs(removed - 0.3 * before) <= adapter.num_layers * block_geometry(adapter, 0).mlp_params_per_neuron
    assert plan.budget["layer_ratios"] == [0.3] * 3


def test_flops_budget_uses_layer_costs(windows):
    from stat_core.surgery.budget import block_macs

    model = tiny_model("llama", num_hidden_layers=3)
    before = block_macs(get_adapter(model), 512)
    stat_prune_(model, windows, PruneConfig(sparsity=0.3, method="slimgpt", budget_kind="flops",
                                            sensitivity_samples=0, batch_size=4))
    assert abs((1 - block_macs(get_adapter(model), 512) / before) - 0.3) < 0.01


def test_registered_with_its_correction():
    from stat_core.methods.registry import get_method

    m = get_method("slimgpt")
    assert isinstance(m, SlimGPT) and m.label == "SlimGPT" and m.correction == "least-squares"
