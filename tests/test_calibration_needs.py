"""Calibration as a stage: each method gets what it declares it needs, and nothing more; the plan is
the one a full calibration gives; the benchmark suite's path prunes exactly as the library does."""

import copy

import pytest
import torch

from conftest import assert_same_data, tiny_model
from stat_core.config import PruneConfig
from stat_core.methods.registry import get_method, method_names
from stat_core.pipeline import ALL_NEEDS, calibrate, plan_pruning, prune_from_calibration_, stat_prune_

WINDOWS = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
PLAN_METHODS = [m for m in method_names() if not get_method(m).whole_model and not get_method(m).needs_training]


def test_methods_without_stat_analysis_skip_the_gradient_pass_and_decompositions():
    for name in ("flap", "wanda-sp", "slimgpt", "llm-pruner"):
        assert get_method(name).calibration_needs == {"block_stats"}, name
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


@pytest.mark.parametrize("name", PLAN_METHODS + ["stat[output_prior=true]"])
def test_the_suite_path_prunes_exactly_as_the_library(name):
    """benchmarks/suite.py cuts each cell from one shared calibration; stat_prune_ calibrates for the
    method alone. Same windows, same settings: the same logits (a missing finishing step, such as
    STAT's output prior, would show here)."""
    from benchmarks import suite

    model = tiny_model(num_hidden_layers=3)
    base, settings = suite.method_variant(name)
    config = PruneConfig(sparsity=0.3, method=base, settings=settings)
    library = copy.deepcopy(model)
    stat_prune_(library, WINDOWS, config, model_name="tiny")
    shared = calibrate(model, WINDOWS, PruneConfig(sparsity=0.3))
    bench = copy.deepcopy(model)
    prune_from_calibration_(bench, shared, config, "tiny", {}, WINDOWS)
    assert suite.prune_from_calibration_ is prune_from_calibration_  # the suite calls this very function
    with torch.no_grad():
        torch.testing.assert_close(bench(WINDOWS).logits, library(WINDOWS).logits, rtol=1e-5, atol=1e-5)
