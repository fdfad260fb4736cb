"""Pure linear-algebra kernels for STAT: Gram accumulation, interpolative decompositions, errors.

Nothing here knows about transformers. Every routine works on a Gram matrix ``G = Zᵀ Z`` of an
activation matrix ``Z: (n_tokens, n_units)`` instead of ``Z`` itself, so calibration statistics
stream batch by batch and memory is ``n_units²`` whatever the number of tokens.

Error convention: a unit block (an MLP or an attention block) writes ``Y = Z Wᵀ`` into the residual
stream, where ``W: (d_out, n_units)`` is its output projection. Keeping units ``I`` and refitting
the output projection by least squares leaves the *output* residual

    err(I) = ‖Y − Z_I M*‖²_F = tr(W (G − G[:, I] G[I, I]⁻¹ G[I, :]) Wᵀ),

which is what the budget allocator compares across layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from scipy.linalg import blas, lapack

# Relative ridge added to Gram diagonals before any solve: rank-deficient activations (dead
# neurons, duplicated heads) are common in real models and must not break the factorizations.
DEFAULT_RIDGE = 1e-6


class GramAccumulator:
    """Streaming ``Zᵀ Z`` over row batches, accumulated in float64.

    Each batch product is formed in float32 on the CPU (BLAS ``ssyrk``: only one triangle, half the
    work of a matmul; a few thousand rows per batch keep its rounding far below what pruning cares
    about) or float64 on a GPU, and added to a float64 total so the sum over many batches does not
    drift. Read the symmetric result from :attr:`gram`.
    """

    def __init__(self, n_units: int, device: torch.device | str = "cpu"):
        self._sum = torch.zeros(n_units, n_units, dtype=torch.float64, device=device)
        self._upper_only = False
        self.col_sum = torch.zeros(n_units, dtype=torch.float64, device=device)  # Σ_t z_t (exact means)
        self.n_rows = 0

    def add(self, z: torch.Tensor, row_mask: torch.Tensor | None = None) -> None:
        """Add rows of ``z: (..., n_units)``; ``row_mask: (...)`` bool keeps only True rows (padding out)."""
        z = z.detach().reshape(-1, z.shape[-1])
        if row_mask is not None:
            z = z[row_mask.reshape(-1).to(z.device)]
        if z.shape[0] == 0:
            return
        # Summed in float64 without a float64 copy of the batch (the same sums, bit for bit).
        self.col_sum += z.sum(0, dtype=torch.float64).to(self.col_sum.device)
        if z.device.type == "cpu":
            a = z.to(torch.float32).numpy()
            # a.T is Fortran-ordered (n_units, rows): syrk forms a.T @ a without a copy.
            upper = blas.ssyrk(1.0, a.T, trans=0, lower=0)
            # Added a band of rows at a time: the float32 → float64 promotion makes a temporary
            # of the band only, not of the whole n_units² (the same sums, bit for bit).
            upper = torch.from_numpy(upper)
            for i0 in range(0, upper.shape[0], 1024):
                self._sum[i0:i0 + 1024].add_(upper[i0:i0 + 1024])
            del upper
            self._upper_only = True
        else:
            z64 = z.to(torch.float64)
            self._sum += z64.T @ z64
        self.n_rows += int(z.shape[0])

    @property
    def gram(self) -> torch.Tensor:
        """``(n_units, n_units)`` float64, symmetric."""
        if self._upper_only:
            _mirror_upper_(self._sum)
            self._upper_only = False
        return self._sum


def _mirror_upper_(s: torch.Tensor, rows: int = 1024) -> None:
    """Copy the strict upper triangle of ``s: (n, n)`` onto its lower one, in place, a band of
    ``rows`` rows at a time (no n² temporary: on a 7B MLP's float64 Gram each is ~1 GB)."""
    n = s.shape[0]
    for i0 in range(0, n, rows):
        i1 = min(i0 + rows, n)
        if i0:
            s[i0:i1, :i0] = s[:i0, i0:i1].T
        d = s[i0:i1, i0:i1]
        d.copy_(torch.triu(d) + torch.triu(d, 1).T)


def ridge_of(gram: torch.Tensor, rel: float = DEFAULT_RIDGE) -> float:
    """Absolute ridge ``rel · trace(G) / n`` (tiny but scale-aware); never exactly zero."""
    n = gram.shape[0]
    scale = float(torch.trace(gram)) / max(n, 1)
    return rel * scale if scale > 0 else rel


def pivoted_cholesky_order(gram: torch.Tensor, ridge: float | None = None, scale: torch.Tensor | None = None,
                           overwrite: bool = False) -> torch.Tensor:
    """Greedy pivot order of ``G: (n, n)`` by LAPACK's pivoted Cholesky (``dpstrf``).

    Identical, in exact arithmetic, to the column order of a pivoted QR of ``Z``: each step takes
    the unit with the largest residual energy. Returns ``order: (n,)`` long, a permutation.

    ``scale: (n,)``: order the Gram of ``Z diag(scale)`` instead (:func:`column_scaled_gram`, the
    same numbers bit for bit), scaled on the one working copy. ``overwrite``: the working copy is
    ``gram`` itself (a C-contiguous, exactly symmetric float64 CPU tensor, as the calibration
    accumulates them; it is destroyed): the same order without any n×n copy.
    """
    if overwrite and gram.device.type == "cpu" and gram.dtype == torch.float64 and gram.is_contiguous():
        g = gram.detach().numpy().T  # column-major view of the transpose: equal to gram when symmetric
    else:
        g = np.array(gram.detach().to("cpu", torch.float64).numpy(), order="F")  # the one working copy
    if scale is not None:
        s = scale.detach().to("cpu", torch.float64).numpy()
        g *= s[:, None]  # (g_ij · s_i) · s_j, exactly as column_scaled_gram computes it
        g *= s[None, :]
    if ridge is None:
        ridge = ridge_of(torch.from_numpy(g) if scale is not None or overwrite else gram)
    g[np.diag_indices_from(g)] += ridge
    _, piv, rank, info = lapack.dpstrf(g, tol=-1.0, lower=1, overwrite_a=1)
    if info < 0:
        raise ValueError(f"dpstrf rejected argument {-info}")
    order = piv.astype(np.int64) - 1
    return torch.from_numpy(order)


def cholesky_with_ridge(gram: torch.Tensor | None, ridge: float, *, overwrite: bool = False,
                        rebuild: "Callable[[], torch.Tensor] | None" = None) -> torch.Tensor:
    """Lower Cholesky factor of ``G + ridge·I``, raising the ridge until it factors.

    ``overwrite``: factor ``gram`` in its own storage when it is a column-major CPU matrix (as
    :func:`permuted_gram` makes them): no n×n copy and no separate n×n factor, the same numbers bit
    for bit (the same LAPACK call on the same column-major data). A failed attempt has then
    destroyed the matrix: ``rebuild()`` must give it again (else the error is raised at once).
    With ``gram=None`` the matrix is ``rebuild()``'s from the start: holding no reference to it, the
    caller lets a failed attempt's matrix be freed before the next is built (on float32-accumulated,
    rank-deficient Grams the first ridge does fail at times).
    """
    if gram is None:
        gram = rebuild()
    n = gram.shape[-1]
    in_place = (overwrite and gram.device.type == "cpu" and gram.dim() == 2 and n > 1
                and gram.stride() == (1, n))
    # The ridge goes onto the diagonal: no n×n identity and no second n×n sum (on a 7B MLP's
    # 11,008² float64 Gram each is ~1 GB).
    shifted = gram if in_place else gram.clone()
    steps: list[float] = []  # the diagonal increments so far, replayed on a rebuilt matrix
    added = 0.0
    for attempt in range(8):
        if attempt and in_place:
            if rebuild is None:
                break
            gram = shifted = factor = None  # the spent matrix goes before the next is built
            shifted = rebuild()
            for step in steps:
                shifted.diagonal().add_(step)
        steps.append(ridge - added)
        shifted.diagonal().add_(steps[-1])
        added = ridge
        if in_place:
            info = torch.empty((), dtype=torch.int32)
            factor, info = torch.linalg.cholesky_ex(shifted, out=(shifted, info))
        else:
            factor, info = torch.linalg.cholesky_ex(shifted)
        if int(info) == 0:
            return factor
        ridge *= 100.0
    raise torch.linalg.LinAlgError("Gram matrix is not positive semi-definite (NaN/Inf activations?)")


def permute_symmetric_(a: torch.Tensor, order: torch.Tensor, band: int = 256) -> torch.Tensor:
    """``a[order][:, order]`` in ``a``'s own storage (a C-contiguous square CPU tensor): the columns
    a band of rows at a time, then the rows along the permutation's cycles with one row of
    scratch. Pure data movement: the same numbers as the gather, without its n² copy."""
    x = a.numpy()
    o = order.cpu().numpy()
    n = x.shape[0]
    for i0 in range(0, n, band):
        x[i0:i0 + band] = x[i0:i0 + band][:, o]
    done = np.zeros(n, dtype=bool)
    for start in range(n):
        if done[start]:
            continue
        scratch = x[start].copy()
        i = start
        while True:  # new row i is old row o[i]
            done[i] = True
            j = int(o[i])
            if j == start:
                x[i] = scratch
                break
            x[i] = x[j]
            i = j
    return a


def permuted_gram(gram: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``gram[index][:, index]`` gathered once (no intermediate ``gram[index]``), laid out
    column-major: the layout :func:`cholesky_with_ridge` factors in place."""
    index = index.to(gram.device)
    return gram.T[index[:, None], index[None, :]].T


def output_error_curve(gram: torch.Tensor, out_weight: torch.Tensor, order: torch.Tensor,
                       ridge: float | None = None) -> torch.Tensor:
    """Output-space residual of keeping the first ``k`` units of ``order``, for every k.

    ``gram: (n, n)``, ``out_weight: (d_out, n)``, ``order: (n,)``.
    Returns ``err: (n + 1,)`` float64 with ``err[k] = tr(W S_k Wᵀ)``, ``S_k`` the Schur complement
    of the first k pivots, so ``err[0]`` is the block's total output energy and ``err[n] = 0``.
    With ``G[p, p] = L Lᵀ`` the residual is ``Σ_{j ≥ k} ‖W_p L[:, j]‖²``.
    """
    g = gram.to(torch.float64)
    ridge = ridge_of(g) if ridge is None else ridge
    wp = out_weight.detach().to(g.device, torch.float64)[:, order]
    return error_curve_of_permuted(None, wp, ridge, rebuild=lambda: permuted_gram(g, order))


def error_curve_of_permuted(gp: torch.Tensor | None, wp: torch.Tensor, ridge: float,
                            rebuild: "Callable[[], torch.Tensor] | None" = None) -> torch.Tensor:
    """:func:`output_error_curve` from the already permuted ``gp = G[order][:, order]`` (factored in
    place when column-major: it is consumed; ``rebuild`` gives it again if a ridge must grow; with
    ``gp=None`` it is ``rebuild()``'s) and ``wp = W[:, order]``."""
    factor = cholesky_with_ridge(gp, ridge, overwrite=True, rebuild=rebuild)
    del gp
    contrib = (wp @ factor).square_().sum(0)  # energy each pivot adds, in order
    del factor
    tail = torch.flip(torch.cumsum(torch.flip(contrib, [0]), 0), [0])
    return torch.cat([tail, tail.new_zeros(1)]).cpu()


def interpolation_matrix(gram: torch.Tensor, kept: torch.Tensor, ridge: float | None = None) -> torch.Tensor:
    """Least-squares interpolation ``T: (k, n)`` with ``Z ≈ Z[:, kept] @ T`` and ``T[:, kept] = I``.

    ``T = G[kept, kept]⁻¹ G[kept, :]`` (ridge-regularized); the kept columns are then set to the
    identity exactly, since a kept unit reproduces itself.
    """
    g = gram.to(torch.float64)
    ridge = ridge_of(g) if ridge is None else ridge
    kept = kept.to(g.device)
    return interpolation_from_rows(kept_rows(g, kept), kept, ridge)


def kept_rows(gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """``gram[kept]: (k, n)`` gathered in column-major layout (what interpolation_from_rows solves
    in place)."""
    return gram.T[:, kept.to(gram.device)].T


def interpolation_from_rows(rows: torch.Tensor, kept: torch.Tensor, ridge: float) -> torch.Tensor:
    """:func:`interpolation_matrix` from the kept rows ``G[kept, :]: (k, n)`` alone (the caller may
    free the n×n Gram first): ``G[kept, kept]`` is gathered column-major and factored in place."""
    kept = kept.to(rows.device)
    factor = cholesky_with_ridge(None, ridge, overwrite=True, rebuild=lambda: rows.T[kept].T)
    if rows.device.type == "cpu" and rows.dim() == 2 and rows.stride() == (1, rows.shape[0]):
        # Column-major rows (as kept_rows gives them): the two triangular solves of cholesky_solve
        # run in the rows' own storage (no k×n result beside them; the same numbers).
        interp = torch.linalg.solve_triangular(factor, rows, upper=False, out=rows)
        interp = torch.linalg.solve_triangular(factor.mH, interp, upper=True, out=interp)
    else:
        interp = torch.cholesky_solve(rows, factor)
    del factor
    interp[:, kept] = 0.0  # a kept unit reproduces itself: identity columns, without a k×k eye
    interp[torch.arange(len(kept), device=interp.device), kept] = 1.0
    return interp


def output_energy(gram: torch.Tensor, out_weight: torch.Tensor) -> float:
    """``tr(W G Wᵀ)``: the block's whole output energy (what :func:`output_error` subtracts from)."""
    g = gram.to(torch.float64)
    w = out_weight.detach().to(g.device, torch.float64)
    return float(torch.einsum("ij,jk,ik->", w, g, w))


def output_error(gram: torch.Tensor, out_weight: torch.Tensor, kept: torch.Tensor,
                 ridge: float | None = None, total: float | None = None) -> float:
    """``tr(W (G − G[:, I] G[I, I]⁻¹ G[I, :]) Wᵀ)`` for one kept set ``I``; see module docstring.
    ``total``: :func:`output_energy` of the same ``gram`` and ``out_weight`` when the caller has it
    (it does not depend on ``I``; many calls on one layer need it once)."""
    g = gram.to(torch.float64)
    w = out_weight.detach().to(g.device, torch.float64)
    if total is None:
        total = output_energy(g, w)
    if len(kept) == 0:
        return total
    ridge = ridge_of(g) if ridge is None else ridge
    kept = kept.to(g.device)
    b = g[kept] @ w.T  # (k, d_out)
    factor = cholesky_with_ridge(g[kept][:, kept], ridge)
    explained = float((torch.linalg.solve_triangular(factor, b, upper=False) ** 2).sum())
    return max(total - explained, 0.0)


@dataclass(frozen=True)
class InterpolativeDecomposition:
    """``Z ≈ Z[:, kept] @ interp``; ``kept: (k,)`` sorted ascending, ``interp: (k, n)``."""

    kept: torch.Tensor
    interp: torch.Tensor


def interpolative_decomposition(gram: torch.Tensor, k: int, order: torch.Tensor | None = None,
                                ridge: float | None = None) -> InterpolativeDecomposition:
    """Rank-``k`` ID from a Gram matrix: the first k pivots of ``order`` (pivoted Cholesky if None)."""
    n = gram.shape[0]
    if not 0 < k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    if order is None:
        order = pivoted_cholesky_order(gram, ridge)
    kept = torch.sort(order[:k]).values
    return InterpolativeDecomposition(kept=kept, interp=interpolation_matrix(gram, kept, ridge))


def column_scaled_gram(gram: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Gram of ``Z diag(scale)``: the authors weight neuron j by ‖W_out[:, j]‖ before the ID."""
    s = scale.to(gram.device, torch.float64)
    return gram * s[:, None] * s[None, :]


def greedy_block_order(gram: torch.Tensor, out_weight: torch.Tensor, block_size: int,
                       ridge: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy forward selection of column blocks (attention heads) by output-error reduction.

    ``gram: (n, n)`` with ``n = n_blocks · block_size``, ``out_weight: (d_out, n)``. Each step adds
    the block whose least-squares inclusion lowers ``err`` most (a block-pivoted Cholesky with an
    output-aware pivot rule), updating the residual Gram ``S`` and ``A = S Wᵀ`` in place.
    Returns ``(order: (n_blocks,), err: (n_blocks + 1,))``, ``err[k]`` after keeping k blocks.
    """
    s = gram.to(torch.float64).clone()
    w = out_weight.detach().to(s.device, torch.float64)
    n = s.shape[0]
    n_blocks = n // block_size
    ridge = ridge_of(s) if ridge is None else ridge
    a = s @ w.T
    eye = torch.eye(block_size, dtype=s.dtype, device=s.device)
    errs = [float(torch.einsum("ij,jk,ik->", w, s, w))]
    remaining = list(range(n_blocks))
    order: list[int] = []
    while remaining:
        best, best_gain, best_factor = None, -1.0, None
        for b in remaining:
            sl = slice(b * block_size, (b + 1) * block_size)
            factor, _ = torch.linalg.cholesky_ex(s[sl, sl] + ridge * eye)
            gain = float((torch.linalg.solve_triangular(factor, a[sl], upper=False) ** 2).sum())
            if gain > best_gain:
                best, best_gain, best_factor = b, gain, factor
        sl = slice(best * block_size, (best + 1) * block_size)
        # Eliminate the chosen block: S -= S[:, b] S[b, b]⁻¹ S[b, :], and the same for A.
        left = torch.linalg.solve_triangular(best_factor, s[sl], upper=False)  # (bs, n)
        a_b = torch.linalg.solve_triangular(best_factor, a[sl], upper=False)  # (bs, d_out)
        s -= left.T @ left
        a -= left.T @ a_b
        order.append(best)
        remaining.remove(best)
        errs.append(max(errs[-1] - best_gain, 0.0))
    errs[-1] = 0.0
    return torch.tensor(order, dtype=torch.long), torch.tensor(errs, dtype=torch.float64)
