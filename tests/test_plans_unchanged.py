"""Plans are data: the same model, windows and config give the same plan as the code did before the
package was reorganised (tests/data/plans_before_restructure.json, written by that code): the same kept units exactly,
the same damages up to rounding."""

import json
from pathlib import Path

import pytest
import torch

from conftest import assert_same_data, tiny_model
from stat_core.config import PruneConfig
from stat_core.pipeline import calibrate, plan_pruning

STORED = json.loads((Path(__file__).parent / "data" / "plans_before_restructure.json").read_text())


@pytest.fixture(scope="module")
def calibrated():
    model = tiny_model(num_hidden_layers=3)
    windows = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(1))
    return model, windows, calibrate(model, windows, PruneConfig(sparsity=0.0))


@pytest.mark.parametrize("key", sorted(STORED))
def test_plan_equals_the_stored_one(calibrated, key):
    model, windows, calib = calibrated
    method, kind = key.split("/")
    plan = plan_pruning(model, calib, PruneConfig(sparsity=0.3, method=method, uniform=kind == "uniform"), "tiny", {},
                        data=windows)
    # Kept units, counts and options exactly; damages within 1e-4 of the plan's predicted damage (float
    # sums in another order on another CPU, or with another thread count, move the smallest option
    # damages, ~1e-7, by ~1e-11: 1e-4 relative to themselves, 2e-6 relative to the plan's total).
    assert_same_data(plan.to_dict(), STORED[key], where=key, abs_=1e-4 * (STORED[key]["budget"].get("predicted_damage") or 0) + 1e-12)


def test_the_comparison_tolerates_rounding_but_not_a_different_plan():
    stored = STORED["stat/free"]
    rounded = json.loads(json.dumps(stored))
    rounded["budget"]["predicted_damage"] *= 1 + 3e-6   # as far off as measured between two machines
    rounded["layers"][0]["mlp_damage"][0] *= 1 - 1e-8
    assert_same_data(rounded, stored)
    for change in (lambda d: d["layers"][0]["kept_neurons"].__setitem__(0, 0),
                   lambda d: d["layers"][0]["kept_heads"].pop(),
                   lambda d: d["budget"].__setitem__("predicted_damage", d["budget"]["predicted_damage"] * 1.01)):
        changed = json.loads(json.dumps(stored))
        change(changed)
        with pytest.raises(AssertionError):
            assert_same_data(changed, stored)
