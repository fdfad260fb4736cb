"""Calibration as a stage: each method gets what it declares it needs, and nothing more; the plan is
the one a full calibration gives (the benchmark suite's rows equal the library's models:
``tests/test_benchmarks.py::test_a_suite_row_is_the_model_the_library_prunes``)."""

import copy

import pytest
import torch

from conftest import assert_same_data, tiny_model
from stat_core.config import PruneConfig
from stat_core.methods.base import ScoredMethod
from stat_core.methods.registry import get_method, method_names
from stat_core.pipeline import ALL_NEEDS, calibrate, plan_pruning, prune_from_calibration_, stat_prune_

WINDOWS = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
PLAN_METHODS = [m for m in method_names() if not get_method(m).whole_model and not get_method(m).needs_training]


def test_methods_without_stat_analysis_skip_the_gradient_pass_and_decompositions():
    for name in ("flap", "wanda-sp", "slimgpt"):
        assert get_method(name).calibration_needs == {"block_stats"}, name
    assert get_method("llm-pruner").calibration_needs == frozenset()  # only its own gradient pass (prepare)
    for name in ("stat", "no-correction"):
        assert get_method(name).calibration_needs == ALL_NEEDS, name
    model = tiny_model(num_hidden_layers=3)
    part = calibrate(model, WINDOWS, PruneConfig(sparsity=0.3), needs=get_method("flap").calibration_needs)
    assert part.sensitivity is None and part.analyses == [] and part.needs == {"block_stats"}
    full = calibrate(model, WINDOWS, PruneConfig(sparsity=0.3))
    assert full.sensitivity is not None and len(full.analyses) == 3
    for name in ("flap", "wanda-sp", "slimgpt"):
        config = PruneConfig(sparsity=0.3, method=name)
        assert_same_data(plan_pruning(model, part, config).to_dict(), plan_pruning(model, full, config).to_dict(),
                         where=name)
    with pytest.raises(ValueError, match="did not compute"):
        plan_pruning(model, part, PruneConfig(sparsity=0.3, method="stat"))



class WeightNorm(ScoredMethod):
    """A data-free method, as a contributor would add one: each head and neuron scored by the norm of
    its output columns; no correction."""

    name = label = "weight-norm-test"
    summary = "output-column norms, no data"
    uses_block_stats = False

    def layer_scores(self, adapter, layer, stats, settings=None):
        hd = adapter.head_dim
        o = adapter.attn_out_proj(layer).weight.detach()
        heads = o.view(o.shape[0], -1, hd).norm(dim=(0, 2))
        return heads, adapter.mlp_out_proj(layer).weight.detach().norm(dim=0)

    def plan_from_summaries(self, adapter, summaries, config, model_name="", calibration_info=None):
        from stat_core.methods.base import layer_costs, neurons_for_budget, plan_from_scores, split_scores

        heads, neurons = split_scores(summaries)
        costs = layer_costs(adapter, config)
        attn = [(c.n_heads, c.n_kv) for c in costs]
        keep = neurons_for_budget(costs, attn, config.sparsity, neurons)
        return plan_from_scores(adapter, config, self, [(h, g, k) for (h, g), k in zip(attn, keep)], heads, neurons,
                                model_name, calibration_info)


def test_a_data_free_method_calibrates_nothing(monkeypatch):
    """A method that reads no statistics runs no forward pass over the calibration text (the model's
    forward raises if called) and no gradient pass; its plan cuts the model all the same."""
    from stat_core.methods import registry

    monkeypatch.setitem(registry._METHODS, WeightNorm.name, "test_calibration_needs:WeightNorm")
    method = get_method(WeightNorm.name)
    assert method.calibration_needs == frozenset()
    model = tiny_model(num_hidden_layers=3)
    width = model.model.layers[0].mlp.down_proj.weight.shape[1]

    def no_forward(*args, **kwargs):
        raise AssertionError("a data-free method ran the model")

    for layer in model.model.layers:
        monkeypatch.setattr(layer, "forward", no_forward)
    monkeypatch.setattr(model, "forward", no_forward)
    result = stat_prune_(model, WINDOWS, PruneConfig(sparsity=0.3, method=WeightNorm.name), cache=True)
    assert result.dense_stats == [] and result.sensitivity is None
    assert not {"sensitivity", "calibrate", "analyse"} & set(result.timings)
    assert sum(len(lp.kept_neurons) for lp in result.plan.layers) < sum(lp.intermediate_size for lp in result.plan.layers)
    assert model.model.layers[0].mlp.down_proj.weight.shape[1] < width
