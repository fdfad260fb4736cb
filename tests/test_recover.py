"""Recovery after pruning (stat_core.recover) and block movement pruning (stat_core.methods.block_movement)."""

import copy
import threading

import pytest
import torch

from conftest import tiny_model
from stat_core.calibration.statistics import CalibrationSet
from stat_core.config import PruneConfig
from stat_core.pipeline import stat_prune_
from stat_core.recover import RecoveryCancelled, RecoveryConfig, distillation_loss, recover_
from test_encoders import padded_set


def sharp_classifier(seed: int = 0):
    """A tiny random BERT classifier whose class probabilities depend on the input (a random head's
    logits are all near zero: every KL would be ~0)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=64, num_labels=2, initializer_range=0.2)
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        model.classifier.weight.mul_(5)
    return model


def _kl(dense, model, data: CalibrationSet, decoder: bool) -> float:
    with torch.no_grad():
        kw = data.model_inputs("cpu")
        if decoder:
            kw["use_cache"] = False
        _, kl, _ = distillation_loss(model(**kw), dense(**kw), data.attention_mask, 0.0, decoder)
    return float(kl)


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_recovery_lowers_kl_to_dense_and_keeps_shapes(kind, windows):
    if kind == "llama":
        dense, data = tiny_model(), CalibrationSet(windows)
    else:
        dense, data = sharp_classifier(), padded_set(n=16)
    dense_state = _state(dense)
    pruned = copy.deepcopy(dense)
    stat_prune_(pruned, data, PruneConfig(sparsity=0.5, method="no-correction", sensitivity_samples=2, batch_size=4))
    shapes = {k: v.shape for k, v in pruned.state_dict().items()}
    before = _kl(dense, pruned, data, kind == "llama")
    seen = []
    info = recover_(pruned, dense, data, RecoveryConfig(steps=30, lr=3e-3, batch_size=4),
                    progress=lambda stage, done, total: seen.append((stage, done, total)))
    after = _kl(dense, pruned, data, kind == "llama")
    assert after < 0.5 * before, (before, after)
    assert info["steps"] == 30 and info["hidden_mse"] and info["seconds"] > 0
    assert seen[-1] == ("recover", 30, 30) and len(seen) == 30
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shapes
    for k, v in dense.state_dict().items():  # the dense model is never modified
        assert torch.equal(v, dense_state[k]), k
    assert not pruned.training and all(p.grad is None for p in pruned.parameters())


def test_cancel_leaves_the_pruned_model_as_it_was(windows):
    dense, data = tiny_model(), CalibrationSet(windows)
    pruned = copy.deepcopy(dense)
    stat_prune_(pruned, data, PruneConfig(sparsity=0.4, sensitivity_samples=2, batch_size=4))
    before = _state(pruned)
    cancel = threading.Event()

    def progress(stage, done, total):
        if done == 3:
            cancel.set()  # three steps have changed the weights by now

    with pytest.raises(RecoveryCancelled, match="recovery cancelled; the pruned model is as it was"):
        recover_(pruned, dense, data, RecoveryConfig(steps=10, lr=1e-2, batch_size=2), progress, cancel)
    after = pruned.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k
    assert all(p.grad is None for p in pruned.parameters())


def test_zero_steps_and_bad_settings():
    dense = tiny_model()
    assert recover_(copy.deepcopy(dense), dense, torch.zeros(2, 4, dtype=torch.long), 0)["steps"] == 0
    with pytest.raises(ValueError, match="whole number"):
        RecoveryConfig(steps=-1)


# --- block movement pruning -------------------------------------------------------------------------

from stat_core.adapters import get_adapter
from stat_core.methods.base import MethodNotApplicable
from stat_core.methods.registry import get_method
from stat_core.methods.block_movement import (MovementSettings, block_movement_prune_, cubic_sparsity, hard_masks, masked, plan_from_masks, train_block_movement_)
from stat_core.surgery.apply import apply_plan_


def _labelled(n=32, seed=3):
    return padded_set(n=n, seed=seed)


def _loss(model, data, masks=None) -> float:
    import torch.nn.functional as F

    ctx = masked(model, masks) if masks is not None else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        return float(F.cross_entropy(model(**data.model_inputs("cpu")).logits, data.labels))


import contextlib  # noqa: E402


def test_movement_scores_rise_for_units_whose_removal_hurts():
    """Weights frozen (lr 0), no pruning (target 0), loss = cross-entropy on the labels, full batch:
    every unit's score moves by −∂L/∂mask. Removing a unit (its mask 0) for real: the units whose
    removal raises the loss most end with the highest scores, those whose removal lowers it the lowest."""
    model, data = sharp_classifier(), _labelled()
    adapter = get_adapter(model)
    settings = MovementSettings(steps=3, batch_size=len(data), lr=0.0, score_lr=1e-2, alpha_distil=0.0,
                                dropout=False, warmup=0.0, cooldown=0.0)
    out = train_block_movement_(model, data, PruneConfig(sparsity=0.0, method="block-movement"), settings)
    base = _loss(model, data)
    ones = {"heads": [torch.ones(adapter.layer_shape(i).num_heads) for i in range(2)],
            "neurons": [torch.ones(adapter.layer_shape(i).intermediate_size) for i in range(2)]}
    for kind, scores in (("heads", out["head_scores"]), ("neurons", out["neuron_scores"])):
        deltas, flat = [], []
        for layer in range(2):
            for u in range(len(scores[layer])):
                m = {k: [t.clone() for t in v] for k, v in ones.items()}
                m[kind][layer][u] = 0
                deltas.append(_loss(model, data, m) - base)
                flat.append(float(scores[layer][u]))
        deltas, flat = torch.tensor(deltas), torch.tensor(flat)
        hurt, helps = int(torch.argmax(deltas)), int(torch.argmin(deltas))
        assert deltas[hurt] > 0 > deltas[helps], kind
        assert flat[hurt] > 0 > flat[helps], (kind, flat[hurt], flat[helps])
        # the clear cases (largest |ΔL|, a quarter of the units) all move the right way
        clear = torch.argsort(deltas.abs(), descending=True)[:max(2, len(deltas) // 4)]
        assert (torch.sign(flat[clear]) == torch.sign(deltas[clear])).all(), kind


def test_cubic_schedule():
    vals = [cubic_sparsity(s, 100, 0.5, 0.1, 0.2) for s in range(100)]
    assert vals[:10] == [0.0] * 10 and vals[80:] == [0.5] * 20
    assert all(a <= b for a, b in zip(vals, vals[1:]))
    assert vals[30] > 0.5 * 0.5  # cubic: most of the pruning early in the ramp


def test_final_masks_become_physical_removals_with_identical_logits():
    model, data = sharp_classifier(), _labelled()
    config = PruneConfig(sparsity=0.4, method="block-movement")
    out = train_block_movement_(model, data, config, MovementSettings(steps=12, batch_size=8, dropout=False))
    hm, nm = hard_masks(get_adapter(model), out["heads"], out["neurons"], "cpu")
    with torch.no_grad(), masked(model, {"heads": hm, "neurons": nm}):
        want = model(**data.model_inputs("cpu")).logits
    plan = plan_from_masks(model, config, out["heads"], out["neurons"])
    assert abs(plan.budget["achieved"] - 0.4) < 0.02
    assert any(len(lp.kept_heads) < lp.num_heads for lp in plan.layers)
    apply_plan_(model, plan, None)
    with torch.no_grad():
        got = model(**data.model_inputs("cpu")).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_block_movement_through_the_registry_meets_the_budget():
    from stat_core.surgery.budget import block_parameter_count

    model, data = sharp_classifier(), _labelled()
    method = get_method("block-movement")
    assert method.needs_training and method.whole_model and method.returns_plan
    before = block_parameter_count(get_adapter(model))
    info = block_movement_prune_(model, data, PruneConfig(sparsity=0.3, method="block-movement"),
                                 MovementSettings(steps=8, batch_size=8))
    after = block_parameter_count(get_adapter(model))
    assert abs(info["removed_fraction"] - 0.3) < 0.02 and info["block_params_after"] == after < before
    assert info["plan"]["method"] == "block-movement" and info["train_steps"] == 8
    with pytest.raises(MethodNotApplicable, match="decoder"):
        stat_prune_(tiny_model(), torch.zeros(2, 8, dtype=torch.long), PruneConfig(sparsity=0.3, method="block-movement"))


def test_cli_block_movement_and_recovery(tmp_path):
    import json

    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from stat_core.models import _minilm_source
    from stat_core.cli import main
    from stat_core.export.hf import load_pruned

    tok = AutoTokenizer.from_pretrained(_minilm_source())
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64, num_labels=2))
    folder = tmp_path / "tiny"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "bm"
    assert main([str(folder), "--sparsity", "0.3", "--out", str(out), "--labelled", "movie-reviews", "--seq-len", "32",
                 "--method", "block-movement", "--recover", "3", "--quiet"]) == 0
    report = json.loads((out / "pruning_report.json").read_text())
    assert abs(report["block_params_removed_fraction"] - 0.3) < 0.02
    assert report["recover"]["steps"] == 3 and report["seconds_recover"] > 0 and "kl_to_dense_after" in report
    loaded = load_pruned(out)[0]
    assert sum(p.numel() for p in loaded.parameters()) == report["params_after"]
