"""The gradient pass keeps one block's activations (recomputation) and one chunk of log-probabilities
(chunked cross-entropy), and gives the same sums as the plain pass."""


import pytest
import torch
from torch import nn

from conftest import tiny_model
from test_encoders import padded_set, tiny_classifier
from test_families import tiny_family_model
from stat_core.calibration import statistics as calibrate
from stat_core.adapters import get_adapter


def _sums(model, windows, labels, plain):
    return calibrate.sensitivity_sums(model, get_adapter(model), windows, 2, labels, memory_savers=not plain)


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2", "opt"])
@pytest.mark.parametrize("labels", ["data", "model"])
def test_recomputed_blocks_give_the_same_sensitivity(family, labels, windows):
    model = tiny_family_model(family) if family in ("gpt2", "opt") else tiny_model(family)
    fast = _sums(model, windows, labels, False)
    plain = _sums(model, windows, labels, True)
    assert fast.n_tokens == plain.n_tokens == windows.numel()
    for f, p in zip(fast.fisher, plain.fisher):
        for kind in ("attn", "mlp"):
            assert p[kind].abs().max() > 0
            torch.testing.assert_close(f[kind], p[kind], rtol=1e-5, atol=1e-9 * float(p[kind].abs().max()))
    # The blocks are plain again afterwards: no checkpoint wrapper left behind.
    assert all("forward" not in block.__dict__ for block in get_adapter(model).layers)


def test_encoder_sensitivity_unchanged_by_recomputation():
    model = tiny_classifier("bert")
    data = padded_set()
    fast = _sums(model, data, "data", False)
    plain = _sums(model, data, "data", True)
    for f, p in zip(fast.fisher, plain.fisher):
        torch.testing.assert_close(f["mlp"], p["mlp"], rtol=1e-5, atol=1e-12)


def test_chunked_cross_entropy_equals_the_plain_one():
    torch.manual_seed(0)
    logits = torch.randn(2500, 37, requires_grad=True)
    target = torch.randint(0, 37, (2500,))
    target[::7] = -100
    a = calibrate.chunked_cross_entropy(logits, target, chunk=1000)
    (ga,) = torch.autograd.grad(a, logits)
    b = nn.functional.cross_entropy(logits, target, reduction="sum", ignore_index=-100)
    (gb,) = torch.autograd.grad(b, logits)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(ga, gb)
