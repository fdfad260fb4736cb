"""The numbers behind the app's explanation views, checked against explicit computations."""

import torch

from stat_core.methods.stat import explain as E
from stat_core.calibration.statistics import BlockStats

from conftest import tiny_model


def _stats(z_attn: torch.Tensor, z_mlp: torch.Tensor) -> BlockStats:
    return BlockStats(attn_gram=z_attn.T @ z_attn, mlp_gram=z_mlp.T @ z_mlp, n_tokens=z_attn.shape[0],
                      resid_energy=1.0, attn_sum=z_attn.sum(0), mlp_sum=z_mlp.sum(0))


def _lstsq_residual(z: torch.Tensor, cols: list[int]) -> float:
    if not cols:
        return float((z ** 2).sum())
    zi = z[:, cols]
    t = torch.linalg.lstsq(zi, z).solution
    return float(((z - zi @ t) ** 2).sum())


def test_spectrum_matches_explicit_svd_and_least_squares():
    torch.manual_seed(0)
    n, hd, heads, d_ff = 200, 4, 5, 24
    # correlated activations with a decaying spectrum, so the curves are not trivial
    z_attn = torch.randn(n, heads * hd, dtype=torch.float64) @ torch.diag(torch.logspace(0, -2, heads * hd,
                                                                                          dtype=torch.float64))
    z_attn = z_attn @ torch.linalg.qr(torch.randn(heads * hd, heads * hd, dtype=torch.float64))[0]
    z_mlp = torch.randn(n, 8, dtype=torch.float64) @ torch.randn(8, d_ff, dtype=torch.float64) \
        + 0.01 * torch.randn(n, d_ff, dtype=torch.float64)
    stats = _stats(z_attn, z_mlp)
    total_mlp = float((z_mlp ** 2).sum())
    sv = torch.linalg.svdvals(z_mlp)

    order = torch.randperm(d_ff)
    sp = E.layer_spectrum(stats, "mlp", order, kept=10)
    # from the Gram's eigenvalues: accurate to ~sqrt(eps)·σ_max for the smallest ones
    torch.testing.assert_close(torch.tensor(sp.singular_values, dtype=torch.float64), sv, rtol=1e-6,
                               atol=1e-6 * float(sv[0]))
    for k in (0, 1, 5, 8, 15, d_ff):
        expected_id = _lstsq_residual(z_mlp, order[:k].tolist()) / total_mlp
        expected_svd = float((sv[k:] ** 2).sum()) / total_mlp
        assert abs(sp.svd_residual[k] - expected_svd) < 1e-9, k
        assert abs(sp.id_residual[k] - expected_id) < 1e-5, (k, sp.id_residual[k], expected_id)
        assert sp.id_residual[k] >= sp.svd_residual[k] - 1e-12
    assert abs(sp.id_residual[0] - 1.0) < 1e-12 and sp.id_residual[-1] < 1e-5 and sp.gap_at(8) > 0

    head_order = [3, 0, 4, 1, 2]
    sa = E.layer_spectrum(stats, "attn", head_order, head_dim=hd)
    total_attn = float((z_attn ** 2).sum())
    sva = torch.linalg.svdvals(z_attn)
    assert sa.n_units == heads and sa.unit_width == hd
    for k in range(heads + 1):
        cols = [h * hd + j for h in head_order[:k] for j in range(hd)]
        assert abs(sa.id_residual[k] - _lstsq_residual(z_attn, cols) / total_attn) < 1e-5, k
        assert abs(sa.svd_residual[k] - float((sva[k * hd:] ** 2).sum()) / total_attn) < 1e-9, k


def test_reconstructed_share_is_what_least_squares_leaves():
    torch.manual_seed(1)
    n, hd = 300, 3
    base = torch.randn(n, 6, dtype=torch.float64)
    z = torch.cat([base @ torch.randn(6, 3 * hd, dtype=torch.float64), torch.randn(n, hd, dtype=torch.float64)], 1)
    z[:, 2 * hd:3 * hd] += 0.7 * torch.randn(n, hd, dtype=torch.float64)   # head 2: partly new information
    w = torch.randn(7, 4 * hd, dtype=torch.float64)
    gram = z.T @ z
    kept, target = torch.arange(0, 2 * hd), torch.arange(2 * hd, 3 * hd)   # head 2 from heads 0, 1
    t = torch.linalg.lstsq(z[:, kept], z[:, target]).solution
    out = z[:, target] @ w[:, target].T
    left = z[:, target] - z[:, kept] @ t
    expected = 1 - float(((left @ w[:, target].T) ** 2).sum()) / float((out ** 2).sum())
    share = E._reconstructed_share(gram, w, kept, target)
    assert abs(share - expected) < 1e-4 and 0.3 < share < 0.95   # partly predictable from heads 0, 1
    independent = torch.arange(3 * hd, 4 * hd)                  # head 3 is noise: nothing to reconstruct
    assert E._reconstructed_share(gram, w, kept, independent) < 0.05


def test_massive_units_are_the_dominant_ones():
    energy = torch.ones(1000, dtype=torch.float64)
    assert E.massive_units(energy) == []
    energy[17] = 500.0   # a third of the layer's energy in one unit
    energy[900] = 200.0
    assert E.massive_units(energy) == [17, 900]
    assert E.massive_units(torch.zeros(5)) == []


def test_attention_pattern_is_causal_rows_sum_to_one_and_restores_the_kernel():
    from transformers import AutoTokenizer  # noqa: F401  (a real tokenizer is not needed: a tiny stand-in)

    model = tiny_model("llama")
    before = model.config._attn_implementation

    class Tok:
        def __call__(self, text, return_tensors, truncation, max_length):
            ids = torch.tensor([[1 + (ord(c) % 50) for c in text[:max_length]]])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def decode(self, ids):
            return chr(ids[0])

    pat = E.attention_pattern(model, Tok(), "hello world", layer=1, head=2)
    w = torch.tensor(pat["weights"])
    assert w.shape == (11, 11) and len(pat["tokens"]) == 11
    torch.testing.assert_close(w.sum(-1), torch.ones(11))
    assert torch.all(torch.triu(w, diagonal=1) == 0)          # a decoder never looks ahead
    assert model.config._attn_implementation == before
    for bad in (dict(layer=9, head=0), dict(layer=0, head=99)):
        try:
            E.attention_pattern(model, Tok(), "hi", **bad)
        except ValueError as exc:
            assert "does not exist" in str(exc)
        else:
            raise AssertionError(bad)


def test_captured_energy_of_a_gram_with_slightly_negative_eigenvalues():
    """Fewer calibration tokens than columns and float32 sums leave a Gram with eigenvalues a little
    below zero (seen on SmolLM2's MLPs at 4 × 256 tokens); the singular-value view still factors it
    (the ridge is raised until it does) instead of failing the calibration."""
    from stat_core.methods.stat.explain import _captured_along

    torch.manual_seed(0)
    z = torch.randn(10, 40, dtype=torch.float64)            # rank 10 < 40 columns
    g = z.T @ z
    g -= 1e-5 * float(torch.trace(g)) / 40 * torch.eye(40, dtype=torch.float64)   # 10× the default ridge below 0
    assert float(torch.linalg.eigvalsh(g).min()) < 0
    captured = _captured_along(g, torch.arange(40))
    assert torch.isfinite(captured).all() and (captured.diff() >= -1e-9).all()
    total = float(torch.trace(z.T @ z))
    assert abs(float(captured[9]) - total) < 1e-2 * total   # 10 columns span Z
