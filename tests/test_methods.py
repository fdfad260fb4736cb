"""The method registry and the peers implemented in this file's scope (FLAP, Wanda-sp): each
method's defining property on tiny random models."""

import copy

import pytest
import torch

from conftest import tiny_model
from test_encoders import padded_set, tiny_classifier
from stat_core.adapters import get_adapter
from stat_core.surgery.budget import block_parameter_count
from stat_core.export.hf import export_pruned, load_pruned
from stat_core.methods.registry import PEERS, get_method, method_names
from stat_core.methods.base import attention_options, select_heads
from stat_core.methods.flap import flap_scores
from stat_core.methods.wanda_sp import wanda_scores
from stat_core.config import PruneConfig
from stat_core.pipeline import calibrate, stat_prune_


def _calibration(model, windows):
    return calibrate(model, windows, PruneConfig(sparsity=0.3, sensitivity_samples=2, batch_size=4))


def test_registry_lists_stat_peers_and_baselines():
    names = method_names()
    assert names[0] == "stat"
    assert set(PEERS) <= set(names)
    assert {"no-correction", "magnitude", "activation-norm"} <= set(names)
    for name in names:
        m = get_method(name)
        assert m.name == name and m.label and m.summary


def test_unknown_method_lists_the_methods():
    with pytest.raises(ValueError, match="choose one of: stat, .*flap"):
        PruneConfig(sparsity=0.3, method="sparsegpt")


def test_attention_options_keep_whole_groups():
    assert attention_options(9, 3) == [(1, 1), (2, 1), (2, 2), (3, 1), (3, 3), (4, 2), (6, 2), (6, 3), (9, 3)]
    assert attention_options(4, 4) == [(m, m) for m in range(1, 5)]
    heads, groups = select_heads(torch.tensor([0., 5., 1., 2., 9., 9.]), 6, 3, 2, 2)  # r = 1 per group
    assert groups == [0, 2] and heads == [1, 4]  # group 2's best (9) and group 0's best (5)


def _outputs(model, windows, kind: str, layer: int) -> torch.Tensor:
    """Every calibration token's output of the attention (``kind="attn"``, after o_proj) or MLP
    (``"mlp"``, after down_proj) at ``layer``: ``(tokens, d)`` float64."""
    adapter = get_adapter(model)
    proj = adapter.attn_out_proj(layer) if kind == "attn" else adapter.mlp_out_proj(layer)
    outs = []
    h = proj.register_forward_hook(lambda _m, _a, o: outs.append(o.reshape(-1, o.shape[-1])))
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        h.remove()
    return torch.cat(outs).double()


def test_flap_bias_compensation_keeps_the_mean_output(windows):
    """FLAP's defining property: the compensated block's mean output over the calibration tokens
    equals the dense block's (the removed units are replaced by their mean contribution)."""
    dense = tiny_model("llama")
    # heads only: the first layer's attention sees the same inputs in both models
    heads_only = copy.deepcopy(dense)
    stat_prune_(heads_only, windows, PruneConfig(sparsity=0.15, method="flap", prune_neurons=False,
                                                  sensitivity_samples=0, batch_size=4))
    assert get_adapter(heads_only).layer_shape(0).num_heads < 4
    mean_dense = _outputs(dense, windows, "attn", 0).mean(0)
    mean_pruned = _outputs(heads_only, windows, "attn", 0).mean(0)
    torch.testing.assert_close(mean_pruned, mean_dense, rtol=1e-4, atol=1e-5)
    # without the bias the mean moves (the property is not vacuous)
    no_bias = copy.deepcopy(heads_only)
    get_adapter(no_bias).attn_out_proj(0).bias = None
    assert (_outputs(no_bias, windows, "attn", 0).mean(0) - mean_dense).abs().max() > 1e-3
    # neurons only: the first layer's MLP sees the same inputs
    neurons_only = copy.deepcopy(dense)
    stat_prune_(neurons_only, windows, PruneConfig(sparsity=0.3, method="flap", prune_heads=False,
                                                    sensitivity_samples=0, batch_size=4))
    assert get_adapter(neurons_only).layer_shape(0).intermediate_size < 64
    torch.testing.assert_close(_outputs(neurons_only, windows, "mlp", 0).mean(0),
                               _outputs(dense, windows, "mlp", 0).mean(0), rtol=1e-4, atol=1e-5)


def test_flap_scores_are_the_standardized_fluctuation(windows):
    model = tiny_model("llama")
    calib = _calibration(model, windows)
    adapter = get_adapter(model)
    heads, neurons = flap_scores(adapter, calib.dense_stats)
    # the fluctuation by hand: variance of the down_proj inputs times the squared column norms
    inputs = []
    h = adapter.mlp_out_proj(1).register_forward_pre_hook(lambda _m, a: inputs.append(a[0].reshape(-1, a[0].shape[-1])))
    try:
        with torch.no_grad():
            model(input_ids=windows, use_cache=False)
    finally:
        h.remove()
    z = torch.cat(inputs).double()
    raw = z.var(0, unbiased=False) * (adapter.mlp_out_proj(1).weight.double() ** 2).sum(0)
    expected = (raw - raw.mean()) / raw.std()
    torch.testing.assert_close(neurons[1], expected, rtol=1e-4, atol=1e-6)
    assert abs(float(neurons[1].mean())) < 1e-9 and heads[0].shape == (4,)


def test_flap_metric_setting_is_the_authors_three_metrics(windows):
    """FLAP's ``metric`` (the authors' WIFV / WIFN / IFV): WIFV is the default and gives the default
    plan; WIFN's per-column score is Wanda-sp's; IFV is the variance alone; a bad name is one sentence
    and every metric reaches the CLI's help."""
    from stat_core.cli import build_parser
    from stat_core.methods.flap import FlapSettings, _column_scores

    model = tiny_model("llama")
    calib = _calibration(model, windows)
    adapter = get_adapter(model)
    st, w = calib.dense_stats[1], adapter.mlp_out_proj(1).weight.detach().double()
    _, wanda = wanda_scores(adapter, calib.dense_stats)
    torch.testing.assert_close(_column_scores(st, "mlp", w, "WIFN"), wanda[1])
    torch.testing.assert_close(_column_scores(st, "mlp", w, "IFV"), st.variance("mlp"))
    plans = {}
    for metric in (None, "WIFV", "wifn", "IFV"):
        settings = None if metric is None else FlapSettings(metric=metric)
        config = PruneConfig(sparsity=0.3, method="flap", settings=settings)
        plans[metric] = get_method("flap").plan(model, calib, config).kept_summary()
    assert plans[None] == plans["WIFV"]
    assert plans["wifn"] != plans["WIFV"] and plans["IFV"] != plans["WIFV"]
    with pytest.raises(ValueError, match="FLAP's metric is one of WIFV, WIFN, IFV"):
        FlapSettings(metric="fluctuation")
    assert "--flap-metric" in build_parser().format_help()


@pytest.mark.parametrize("sparsity", [0.2, 0.4])
def test_wanda_sp_same_ratio_in_every_layer(sparsity, windows):
    model = tiny_model("llama", num_hidden_layers=3)
    before = block_parameter_count(get_adapter(model))
    result = stat_prune_(model, windows, PruneConfig(sparsity=sparsity, method="wanda-sp", sensitivity_samples=0,
                                                     batch_size=4))
    kept = result.plan.kept_summary()
    assert len({(k["heads"], k["kv_heads"], k["neurons"]) for k in kept}) == 1  # identical per layer
    removed = 1 - block_parameter_count(get_adapter(model)) / before
    assert abs(removed - sparsity) < 0.02 and result.plan.correction == "none"


def test_wanda_sp_scores_are_weight_times_input_norm(windows):
    model = tiny_model("llama")
    calib = _calibration(model, windows)
    adapter = get_adapter(model)
    heads, neurons = wanda_scores(adapter, calib.dense_stats)
    st = calib.dense_stats[0]
    w = adapter.mlp_out_proj(0).weight.double()
    torch.testing.assert_close(neurons[0], w.abs().mean(0) * (torch.diagonal(st.mlp_gram) / st.n_tokens).sqrt())
    assert len(select_heads(heads[0], 4, 2, 2, 1)[0]) == 2


@pytest.mark.parametrize("method", ["flap", "wanda-sp"])
def test_peers_prune_encoders_and_keep_every_layer(method):
    model = tiny_classifier("bert")
    data = padded_set(n=24, seed=3)
    before = block_parameter_count(get_adapter(model))
    result = stat_prune_(model, data, PruneConfig(sparsity=0.5, method=method, sensitivity_samples=0, batch_size=8))
    after = block_parameter_count(get_adapter(model))
    assert abs((1 - after / before) - 0.5) < 0.03
    assert all(k["heads"] >= 1 and k["neurons"] >= 1 for k in result.plan.kept_summary())
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits).all()


def test_flap_export_with_added_biases_reloads_identically(tmp_path, windows):
    model = tiny_model("llama")
    result = stat_prune_(model, windows, PruneConfig(sparsity=0.4, method="flap", sensitivity_samples=0, batch_size=4))
    assert get_adapter(model).mlp_out_proj(0).bias is not None  # FLAP added output biases
    export_pruned(model, None, tmp_path / "m", plan=result.plan)
    loaded, _ = load_pruned(tmp_path / "m")
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=windows).logits, model(input_ids=windows).logits, rtol=0, atol=0)
