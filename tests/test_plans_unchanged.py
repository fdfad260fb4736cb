"""Plans are data: the same model, windows and config give the same plan as the code did before the
package was reorganised (tests/data/plans_before_restructure.json, written by that code)."""

import json
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from stat_core.config import PruneConfig
from stat_core.prune import calibrate, plan_pruning

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
    assert plan.to_dict() == STORED[key]
