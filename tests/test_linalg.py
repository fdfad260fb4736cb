"""Numerical truths of the decomposition kernels."""

import numpy as np
import scipy.linalg
import torch

from stat_core.linalg import (GramAccumulator, greedy_block_order, interpolation_matrix, interpolative_decomposition, output_error, output_error_curve, pivoted_cholesky_order)


def _z(n=200, m=12, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, m, generator=g, dtype=torch.float64)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, m, generator=g, dtype=torch.float64)


def test_streaming_gram_equals_full_batch():
    z = _z(300, 10).float()
    acc = GramAccumulator(10)
    for chunk in z.split(37):
        acc.add(chunk)
    full = z.double().T @ z.double()
    assert acc.n_rows == 300
    torch.testing.assert_close(acc.gram, full, rtol=1e-5, atol=1e-4)
    assert torch.equal(acc.gram, acc.gram.T)


def test_gram_mask_drops_padding_rows():
    z = _z(20, 6).float()
    mask = torch.zeros(20, dtype=torch.bool)
    mask[:13] = True
    acc = GramAccumulator(6)
    acc.add(torch.cat([z[:13], torch.full((7, 6), 1e3)]), row_mask=mask)
    torch.testing.assert_close(acc.gram, z[:13].double().T @ z[:13].double(), rtol=1e-5, atol=1e-4)


def test_full_rank_id_reconstructs_exactly_and_kept_columns_are_identity():
    z = _z()
    gram = z.T @ z
    dec = interpolative_decomposition(gram, 12)
    torch.testing.assert_close(z[:, dec.kept] @ dec.interp, z)
    dec = interpolative_decomposition(gram, 5)
    torch.testing.assert_close(dec.interp[:, dec.kept], torch.eye(5, dtype=torch.float64))


def test_low_rank_id_is_exact():
    z = _z(rank=4)
    dec = interpolative_decomposition(z.T @ z, 4)
    # Exact up to the tiny relative ridge (1e-6 · mean diagonal) that keeps solves stable.
    rel = (z[:, dec.kept] @ dec.interp - z).norm() / z.norm()
    assert rel < 1e-5


def test_pivots_and_residuals_match_pivoted_qr():
    z = _z(100, 9, seed=3)
    _, r, perm = scipy.linalg.qr(z.numpy(), pivoting=True, mode="economic")
    order = pivoted_cholesky_order(z.T @ z, ridge=0.0)
    assert order.tolist() == perm.tolist()
    # With W = I, the output residual of the first k pivots is ‖R22‖²_F.
    curve = output_error_curve(z.T @ z, torch.eye(9, dtype=torch.float64), order, ridge=1e-12)
    for k in range(10):
        np.testing.assert_allclose(curve[k].item(), (r[k:, k:] ** 2).sum(), rtol=1e-6, atol=1e-8)


def test_output_error_curve_matches_least_squares_refit():
    z = _z(150, 8, seed=4)
    w = torch.randn(5, 8, dtype=torch.float64)
    gram = z.T @ z
    order = pivoted_cholesky_order(gram)
    curve = output_error_curve(gram, w, order, ridge=1e-12)
    y = z @ w.T
    for k in [1, 3, 6]:
        kept = order[:k]
        coef = torch.linalg.lstsq(z[:, kept], y).solution
        direct = float(((y - z[:, kept] @ coef) ** 2).sum())
        np.testing.assert_allclose(curve[k].item(), direct, rtol=1e-6)
        np.testing.assert_allclose(output_error(gram, w, kept, ridge=1e-12), direct, rtol=1e-6)
    assert curve[0] >= curve[1] >= curve[-1] == 0


def test_correction_is_least_squares_optimal():
    z = _z(150, 8, seed=5)
    w = torch.randn(5, 8, dtype=torch.float64)
    kept = torch.tensor([0, 2, 5])
    interp = interpolation_matrix(z.T @ z, kept, ridge=1e-12)
    coef = torch.linalg.lstsq(z[:, kept], z @ w.T).solution
    torch.testing.assert_close(interp @ w.T, coef, rtol=1e-6, atol=1e-8)


def test_greedy_block_order_errors_are_exact():
    z = _z(300, 12, seed=6)
    w = torch.randn(4, 12, dtype=torch.float64)
    gram = z.T @ z
    order, errs = greedy_block_order(gram, w, block_size=3, ridge=1e-12)
    assert sorted(order.tolist()) == [0, 1, 2, 3]
    for k in range(1, 4):
        cols = torch.tensor([b * 3 + j for b in order[:k].tolist() for j in range(3)])
        np.testing.assert_allclose(errs[k].item(), output_error(gram, w, cols, ridge=1e-12), rtol=1e-6)
    # Greedy's first pick is the single best block.
    singles = [output_error(gram, w, torch.arange(b * 3, b * 3 + 3), ridge=1e-12) for b in range(4)]
    assert order[0].item() == int(np.argmin(singles))


def _reference_gram(n_rows=300, n=40, seed=3):
    """A float32-accumulated Gram as calibration makes them (exactly symmetric, rank-deficient)."""
    z = _z(n_rows, n, rank=25, seed=seed).float()
    acc = GramAccumulator(n)
    for chunk in z.split(64):
        acc.add(chunk)
    return acc.gram


def test_memory_lean_kernels_give_the_same_bits():
    """The in-place variants the layer streaming relies on (one working copy scaled in place and
    factored by LAPACK in its own storage, the Gram's own storage destroyed by dpstrf, the permuted
    Gram gathered once column-major and factored in place, the interpolation from the kept rows
    alone) give exactly the numbers of the plain formulas."""
    from stat_core.linalg import (column_scaled_gram, cholesky_with_ridge, error_curve_of_permuted, interpolation_from_rows, permuted_gram, ridge_of)

    gram = _reference_gram()
    assert torch.equal(gram, gram.T)
    w = _z(7, 40, seed=4)
    scale = w.norm(dim=0)
    order = pivoted_cholesky_order(column_scaled_gram(gram, scale))
    assert torch.equal(pivoted_cholesky_order(gram, scale=scale), order)
    spent = gram.clone()
    assert torch.equal(pivoted_cholesky_order(spent, scale=scale, overwrite=True), order)
    assert not torch.equal(spent, gram)  # really overwritten
    gp = permuted_gram(gram, order)
    assert torch.equal(gp, gram[order][:, order]) and gp.stride() == (1, 40)
    ridge = ridge_of(gram)
    want = cholesky_with_ridge(gram[order][:, order], ridge)
    assert torch.equal(cholesky_with_ridge(gp, ridge, overwrite=True), want)
    curve = output_error_curve(gram, w, order)
    assert torch.equal(error_curve_of_permuted(permuted_gram(gram, order), w[:, order], ridge), curve)
    kept = torch.sort(order[:20]).values
    assert torch.equal(interpolation_from_rows(gram[kept], kept, ridge), interpolation_matrix(gram, kept))


def test_in_place_cholesky_rebuilds_to_grow_the_ridge():
    """A matrix that needs a larger ridge: the in-place factorization starts again from ``rebuild``
    and ends exactly where the copying one does; without ``rebuild`` it says so."""
    from stat_core.linalg import cholesky_with_ridge, permuted_gram

    gram = _reference_gram()
    bad = gram - 1e-3 * gram.diagonal().mean() * torch.eye(40, dtype=torch.float64)  # indefinite
    order = torch.arange(40)
    want = cholesky_with_ridge(bad, 1e-9)
    got = cholesky_with_ridge(permuted_gram(bad, order), 1e-9, overwrite=True, rebuild=lambda: permuted_gram(bad, order))
    assert torch.equal(got, want)
    try:
        cholesky_with_ridge(permuted_gram(bad, order), 1e-9, overwrite=True)
    except torch.linalg.LinAlgError:
        pass
    else:
        raise AssertionError("an in-place factorization without rebuild cannot grow the ridge")
