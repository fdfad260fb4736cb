"""The same numerical truths for post-LN encoders (BERT, RoBERTa, DistilBERT classifiers), plus padding."""

import copy

import pytest
import torch

from conftest import mask_units
from stat_core.adapters import get_adapter
from stat_core.surgery.budget import block_geometry, block_parameter_count
from stat_core.calibration.statistics import CalibrationSet, LayerwiseRunner
from stat_core.config import PruneConfig
from stat_core.surgery.apply import apply_plan_
from stat_core.pipeline import stat_prune_

ENCODERS = ["bert", "roberta", "distilbert"]


def tiny_classifier(family: str, seed: int = 0):
    from transformers import (BertConfig, BertForSequenceClassification, DistilBertConfig,
                              DistilBertForSequenceClassification, RobertaConfig, RobertaForSequenceClassification)

    torch.manual_seed(seed)
    if family == "distilbert":
        cfg = DistilBertConfig(vocab_size=128, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=64,
                               num_labels=2)
        return DistilBertForSequenceClassification(cfg).eval()
    common = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  max_position_embeddings=64, num_labels=2)
    if family == "bert":
        return BertForSequenceClassification(BertConfig(**common)).eval()
    return RobertaForSequenceClassification(RobertaConfig(pad_token_id=1, **common)).eval()


def padded_set(n=8, length=20, seed=2):
    """Variable-length sequences right-padded with token 1, with labels."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (n, length), generator=gen)
    lengths = torch.randint(6, length + 1, (n,), generator=gen)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    ids = torch.where(mask.bool(), ids, torch.ones_like(ids))
    return CalibrationSet(ids, mask, torch.randint(0, 2, (n,), generator=gen))


def _logits(model, data):
    with torch.no_grad():
        return model(input_ids=data.input_ids, attention_mask=data.attention_mask).logits


def _hidden(model, data):
    with torch.no_grad():
        base = getattr(model, model.base_model_prefix)
        out = base(input_ids=data.input_ids, attention_mask=data.attention_mask).last_hidden_state
    return out[data.attention_mask.bool()]


@pytest.mark.parametrize("family", ENCODERS)
def test_layerwise_runner_reproduces_the_encoder(family):
    model = tiny_classifier(family)
    data = padded_set()
    runner = LayerwiseRunner(model, get_adapter(model), data, batch_size=4)
    hidden = runner.hidden
    for layer in range(get_adapter(model).num_layers):
        hidden = runner.run_block(layer, hidden)
    final = torch.cat(hidden)[data.attention_mask.bool()]
    torch.testing.assert_close(final, _hidden(model, data), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ENCODERS)
def test_padding_does_not_change_statistics(family):
    model = tiny_classifier(family)
    data = padded_set()
    more = CalibrationSet(torch.cat([data.input_ids, torch.ones(8, 7, dtype=torch.long)], 1),
                          torch.cat([data.attention_mask, torch.zeros(8, 7, dtype=torch.long)], 1), data.labels)
    a = LayerwiseRunner(model, get_adapter(model), data, batch_size=4)
    b = LayerwiseRunner(model, get_adapter(model), more, batch_size=4)
    sa, _ = a.collect_block(1, a.run_block(0, a.hidden))
    sb, _ = b.collect_block(1, b.run_block(0, b.hidden))
    assert sa.n_tokens == sb.n_tokens == int(data.attention_mask.sum())
    torch.testing.assert_close(sa.mlp_gram, sb.mlp_gram, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sa.attn_gram, sb.attn_gram, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_keep_all_is_identity(family):
    model = tiny_classifier(family)
    data = padded_set()
    ref = _logits(model, data)
    stat_prune_(model, data, PruneConfig(sparsity=0.0, sensitivity_samples=4, batch_size=4))
    torch.testing.assert_close(_logits(model, data), ref)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_prunes_to_budget_and_runs(family):
    model = tiny_classifier(family)
    data = padded_set()
    before = block_parameter_count(get_adapter(model))
    result = stat_prune_(model, data, PruneConfig(sparsity=0.4, sensitivity_samples=4, batch_size=4))
    adapter = get_adapter(model)
    assert abs((before - block_parameter_count(adapter)) - 0.4 * before) <= block_geometry(adapter, 0).mlp_params_per_neuron
    for lp in result.plan.layers:
        assert adapter.layer_shape(lp.layer).num_heads == len(lp.kept_heads) >= 1
    assert torch.isfinite(_logits(model, data)).all()


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_uncorrected_equals_masked(family):
    model = tiny_classifier(family)
    data = padded_set()
    plan = stat_prune_(copy.deepcopy(model), data, PruneConfig(sparsity=0.4, sensitivity_samples=0, batch_size=4)).plan
    masked = mask_units(model, plan)
    apply_plan_(model, plan, stats=None)
    torch.testing.assert_close(_logits(model, data), _logits(masked, data), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ENCODERS)
def test_encoder_exact_low_rank_is_reproduced(family):
    model = tiny_classifier(family)
    adapter = get_adapter(model)
    with torch.no_grad():  # second half of the neurons copy the first half
        for i in range(adapter.num_layers):
            w1 = adapter.mlp_in_projs(i)[0]
            half = w1.weight.shape[0] // 2
            w1.weight[half:] = w1.weight[:half]
            w1.bias[half:] = w1.bias[:half]
    data = padded_set()
    ref = _logits(model, data)
    geo = block_geometry(adapter, 0)
    sparsity = 0.95 * adapter.num_layers * geo.mlp_params_per_neuron * 32 / block_parameter_count(adapter)
    stat_prune_(model, data, PruneConfig(sparsity=sparsity, prune_heads=False, sensitivity_samples=4, batch_size=4))
    assert (_logits(model, data) - ref).norm() / ref.norm() < 1e-4
