"""Layer-wise reconstruction: prune one layer so that its outputs stay close to the dense layer's.

Pure NumPy/SciPy; never imports onnx.  For one layer (per group ``g`` of a grouped Conv) with input
statistics from :mod:`chita_onnx.layerstats`:

* ``H`` ``(d, d)`` — Gram of the input rows ``x_p`` that the (already pruned) upstream model produces,
* ``B`` ``(d, M)`` — cross term ``Σ x_p (W̄ x_d)ᵀ`` with the dense layer's outputs on dense inputs
  (``None``: the targets are ``W̄ x_p``, i.e. ``B = H W̄ᵀ``, as in SparseGPT),
* ``W̄`` ``(M, d)`` — the dense weight, rows = outputs,

row ``i`` of the pruned weight minimises, over the kept support ``S_i``,

    E_i(w) + λ‖w − w̄_i‖²,   E_i(w) = Σ_rows (x_pᵀ w − x_dᵀ w̄_i)² = wᵀHw − 2wᵀB_i + yy_i,

with ``λ = damp · mean(diag H)`` (SparseGPT's damping, here a ridge toward the dense weight).  With
``H_λ = H + λI`` and the unconstrained optimum ``w*_i = H_λ⁻¹(B_i + λ w̄_i)`` this is the quadratic
``(w − w*_i)ᵀ H_λ (w − w*_i) + const``, so:

* :func:`sparsegpt_sweep` selects and updates by an OBS column sweep over ``w*`` with adaptive mask
  selection per block of columns (Frantar & Alistarh 2023), for an exact keep count;
* :func:`ridge_refit` re-fits every row exactly on its support: ``w_S = (H_λ)_SS⁻¹ (B_i + λ w̄_i)_S``
  (Cholesky per row, or batched conjugate gradients from the current weights for very large layers —
  both never increase the objective).
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.linalg as sla
from numpy.typing import NDArray

from ..errors import SolverError
from . import blocked, parallel
from .batched_spd import cho_solve_rows, solve_subsystems

log = logging.getLogger(__name__)

F64 = NDArray[np.float64]
Select = Literal["sparsegpt", "magnitude", "mask"]

#: Default relative damping: ``λ = DAMP · mean(diag H)`` (SparseGPT's 1%).
DAMP = 0.01
#: Column block of the sweep (SparseGPT's 128).
BLOCK = 128
#: Multiply-adds up to which a layer's re-fit is exact (:func:`refit_cost`; about 10–20 s on one core).
#: Above it (a layer of thousands of outputs with inputs of thousands of features), batched CG
#: started from the sweep's weights runs for :data:`CG_FLOPS`: on such layers the exact re-fit alone
#: took several times as long as computing CHITA's whole X (issue 9's time bar), and CG reaches
#: most of its gain in the first 10–20 iterations (BENCHMARKS.md, "The layer-wise default against
#: issue 9's time bar").
EXACT_FLOPS = 2e11
#: Multiply-adds of the batched CG re-fit of one layer when the exact one costs more.
CG_FLOPS = 2e11
#: Systems of the exact re-fit with at least this many unknowns are factored in float32 and refined
#: once in float64 (:func:`spd_solve`).
SINGLE_MIN = 128
#: A float32 solution whose residual exceeds ``RESIDUAL_TOL·‖b‖`` (a system ill-conditioned beyond
#: float32) is recomputed in float64.
RESIDUAL_TOL = 1e-3
CG_MIN_ITERATIONS = 5
#: Solve the exact re-fit's per-row systems bucketed by size and batched (:mod:`.batched_spd`);
#: ``False``: one :func:`spd_solve` per row (the reference path; the same results up to rounding).
BATCHED_REFIT = True
CG_MAX_ITERATIONS = 300
#: The OBS sweep's column loop splits its rows at a multiple of this: OpenBLAS's GEMV rounds the
#: rows of a partial row block differently, so a split elsewhere can change the last place.
ROW_ALIGN = 64
#: A layer's solve holds about this many float64 ``d × d`` matrices per group at once (the Gram, its
#: damped copy, the Cholesky factor and inverse, the OBS sweep's factor) ...
GRAM_COPIES = 5
#: ... and this many float64 copies of its ``M × d`` weight (dense, target, sweep, re-fit, errors).
WEIGHT_COPIES = 6


def solve_cost(M: int, d: int) -> float:
    """Multiply-adds of one ``M × d`` solve that depend on its shape alone (the Gram's factorisations,
    the targets and the sweep): what :func:`.parallel.tasks` balances independent solves by."""
    return float(d) ** 3 + float(M) * d * d


def solve_bytes(M: int, d: int) -> float:
    """Bytes one ``M × d`` solve holds at once: :data:`GRAM_COPIES` float64 ``d × d`` matrices and
    :data:`WEIGHT_COPIES` float64 copies of the weight."""
    return 8.0 * (GRAM_COPIES * float(d) * d + WEIGHT_COPIES * float(M) * d)


@dataclass(frozen=True)
class Damped:
    """``H_λ = H + λI`` with its Cholesky factor; ``damp`` is the relative damping actually used.

    ``factor`` is the lower Cholesky factor ``L`` of ``P H_λ P``, ``P`` the reversal of the ``d``
    coordinates (``H_λ = (PLP)(PLP)ᵀ``, a "UL" factorisation).  Its point: ``U = P L⁻¹ P`` is upper
    triangular with ``H_λ⁻¹ = UᵀU``, the factor SparseGPT's sweep runs on.  The usual route factors
    ``H_λ``, inverts it and factors the inverse again (``4/3·d³``); from ``L`` it takes one triangular
    inversion (``2/3·d³`` in all), and ``H_λ⁻¹`` itself one more product (:meth:`inverse`), formed
    only when a re-fit needs it.  The three are cached.
    """

    H: F64
    lam: float
    damp: float
    factor: F64
    _cache: dict[str, F64] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def of(cls, Hl: F64, lam: float = 0.0, damp: float = 0.0) -> Damped:
        """Factor an already damped ``Hl`` (d × d, symmetric); raises ``LinAlgError`` when it is not
        positive definite."""
        L = _reversed_cholesky(np.asarray(Hl, np.float64))
        if L is None:
            raise np.linalg.LinAlgError("not positive definite")
        return cls(np.asarray(Hl, np.float64), lam, damp, L)

    def solve_rows(self, R: F64) -> F64:
        """``R H_λ⁻¹`` for rows ``R (M, d)`` (a new C-ordered array): ``H_λ⁻¹ r_i`` for every row, the
        halves of the rows on two threads inside :func:`.parallel.helping`."""
        # a copy in the factor's reversed coordinates (never a view of R: with d = 1 the reversed view
        # is already contiguous, and the solve writes in place)
        B = np.array(np.asarray(R, np.float64)[:, ::-1], order="C", copy=True)
        cho_solve_rows(self.factor, B)
        return np.ascontiguousarray(B[:, ::-1])

    def _linv(self) -> F64:
        if "linv" not in self._cache:
            if self.factor.shape[0] >= blocked.MIN_D:  # in blocks, on both cores
                singular = not np.all(np.diag(self.factor) != 0)
                inv = self.factor if singular else blocked.tri_inverse(self.factor)
            else:
                inv, info = sla.lapack.dtrtri(self.factor, lower=1)
                singular = info != 0
            if singular:
                raise SolverError("the Cholesky factor of H_λ is singular; raise the damping")
            self._cache["linv"] = inv  # lower triangular: dpotrf(clean=1) zeroed the rest, dtrtri keeps it
        return self._cache["linv"]

    def inverse_factor(self) -> F64:
        """``U`` (d × d, upper triangular, Fortran-ordered) with ``H_λ⁻¹ = UᵀU``: ``L⁻¹`` with both
        axes reversed (:func:`_reversed_copy`)."""
        if "u" not in self._cache:
            self._cache["u"] = _reversed_copy(self._linv())
        return self._cache["u"]

    def inverse_diag(self) -> F64:
        """``diag(H_λ⁻¹)`` ``(d,)``: the squared column norms of ``U``."""
        if "diag" not in self._cache:
            self._cache["diag"] = np.einsum("ij,ij->j", self.inverse_factor(), self.inverse_factor())
        return self._cache["diag"]

    def inverse(self) -> F64:
        """``H_λ⁻¹`` (d × d, symmetric, C-ordered): ``P L⁻ᵀL⁻¹ P`` (LAPACK ``lauum``)."""
        if "inv" not in self._cache:
            if self.factor.shape[0] >= blocked.MIN_D:  # in blocks, on both cores
                A, info = blocked.lower_gram(self._linv()), 0
            else:
                A, info = sla.lapack.dlauum(self._linv(), lower=1)
            if info != 0:  # pragma: no cover - lauum of a valid triangle does not fail
                raise SolverError("H_λ⁻¹ could not be formed")
            A = np.asarray(A, np.float64)
            _mirror(A, lower=True)
            # symmetric: the Fortran-ordered reversal, transposed, is the same matrix in C order
            self._cache["inv"] = _reversed_copy(A).T
        return self._cache["inv"]


def _reversed_copy(A: F64) -> F64:
    """``A[::-1, ::-1]`` as a new Fortran-ordered array, for a square ``A`` in either order.

    Reversing both axes reverses the memory of a contiguous square matrix, so this is one flat
    reversed copy (a stream backwards through memory), several times faster than NumPy's strided
    copy of the reversed view.  The values are the same: a Fortran-ordered ``A`` gives exactly
    ``A[::-1, ::-1]``; a C-ordered one gives its transpose, the same matrix when ``A`` is symmetric
    (the only C-ordered use: :class:`Damped`'s Gram)."""
    d = A.shape[0]
    src = A if A.flags.f_contiguous else np.ascontiguousarray(A)
    flat = src.T.reshape(-1) if A.flags.f_contiguous else src.reshape(-1)  # the memory, in order
    out = np.empty(d * d, dtype=A.dtype)
    np.copyto(out, flat[::-1])
    return out.reshape(d, d).T  # Fortran-ordered: [a, b] at a + b·d of the reversed memory


def _reversed_cholesky(Hl: F64) -> F64 | None:
    """The lower Cholesky factor of ``Hl`` (symmetric) with its coordinates reversed (see
    :class:`Damped`), or None when ``Hl`` is not positive definite (a failed or non-finite
    factorisation).  LAPACK factors a reversed copy in place (:func:`_reversed_copy`); from
    :data:`.blocked.MIN_D` inputs on, in blocks on both cores (:func:`.blocked.cholesky`)."""
    if Hl.shape[0] >= blocked.MIN_D:
        L, info = blocked.cholesky(_reversed_copy(Hl))
    else:
        L, info = sla.lapack.dpotrf(_reversed_copy(Hl), lower=1, clean=1, overwrite_a=1)
    if info != 0 or not np.all(np.isfinite(np.diag(L))) or np.any(np.diag(L) <= 0):
        return None
    return np.asarray(L, np.float64)


def damp_gram(H: F64, damp: float = DAMP, *, name: str = "layer", max_tries: int = 8) -> Damped:
    """Damp ``H`` (d × d, symmetric PSD up to rounding) until it is positive definite.

    ``λ = damp · mean(diag H)`` (``damp`` itself when the diagonal is all zero: every input dead).
    When the Cholesky factorisation fails, ``damp`` is multiplied by 10 (at most ``max_tries``
    times) with a warning naming the layer; a Gram with NaN/inf raises :class:`SolverError`.
    """
    H = np.asarray(H, dtype=np.float64)
    if H.ndim != 2 or H.shape[0] != H.shape[1]:
        raise SolverError(f"{name}: the input Gram must be square, got shape {H.shape}")
    if not np.all(np.isfinite(H)):
        raise SolverError(f"{name}: the input Gram contains NaN or infinity (the layer's inputs overflow)")
    if damp < 0:
        raise SolverError(f"{name}: damping must be ≥ 0, got {damp}")
    H = _symmetrized(H)
    scale = float(np.mean(np.diag(H))) if H.size else 0.0
    if scale <= 0.0:
        scale = 1.0
    d0 = damp
    cur = damp if damp > 0 else 1e-8
    diag = np.einsum("ii->i", H)  # a view: the damping is added in place
    base = diag.copy()
    for _ in range(max_tries + 1):
        lam = cur * scale
        diag[:] = base + lam
        L = _reversed_cholesky(H)
        if L is None:
            nxt = cur * 10
            log.warning(
                "%s: H + λI is not positive definite with damping %.3g·mean(diag H); retrying with %.3g",
                name,
                cur,
                nxt,
            )
            cur = nxt
            continue
        if cur != d0:
            log.warning("%s: used damping %.3g·mean(diag H) instead of %.3g", name, cur, d0)
        return Damped(H, lam, cur, L)
    raise SolverError(
        f"{name}: the input Gram is not positive definite even with damping {cur:.3g}·mean(diag H); "
        "its inputs are degenerate"
    )


def targets(W_bar: F64, dh: Damped, B: F64 | None) -> tuple[F64, F64]:
    """``(rhs, W*)``: ``rhs_i = B_i + λ w̄_i`` and ``w*_i = H_λ⁻¹ rhs_i`` (rows = outputs, ``(M, d)``).

    Without ``B`` (targets from the pruned inputs) ``rhs = H_λ w̄`` and ``W* = W̄``.
    """
    if B is None:
        return parallel.matmul(W_bar, dh.H), W_bar.copy()
    rhs = B.T + dh.lam * W_bar
    return rhs, dh.solve_rows(rhs)


def inverse(dh: Damped) -> F64:
    """``H_λ⁻¹`` (d × d, C-ordered; :meth:`Damped.inverse`)."""
    return dh.inverse()


def _symmetrized(H: F64, block: int = 256) -> F64:
    """``(H + Hᵀ)/2`` (d × d, a new C-ordered array), block by block: the transposed read of
    ``H + H.T`` walks memory across rows, several times slower on wide Grams.  Each block row (the
    pairs ``(i, j ≥ i)``) is a job of :func:`.parallel.tasks`, on both cores when it can: no two rows
    touch the same blocks, and every block is computed the same way on either thread."""
    d = H.shape[0]
    A = np.array(H, dtype=np.float64, order="C", copy=True)

    def row(i: int) -> None:
        i2 = min(d, i + block)
        D = A[i:i2, i:i2]
        D[...] = 0.5 * (D + D.T)
        for j in range(i2, d, block):
            j2 = min(d, j + block)
            avg = 0.5 * (A[i:i2, j:j2] + A[j:j2, i:i2].T)
            A[i:i2, j:j2] = avg
            A[j:j2, i:i2] = avg.T

    starts = range(0, d, block)
    # a memory-bound stream: a few "multiply-adds" per element, so that only wide Grams split
    parallel.tasks([functools.partial(row, i) for i in starts], [4.0 * block * (d - i) for i in starts])
    return A


def _mirror(A: F64, lower: bool, block: int = 256) -> None:
    """Make ``A (d, d)`` symmetric in place from its ``lower`` (else upper) triangle, a block column
    at a time (no ``d × d`` temporaries)."""
    d = A.shape[0]
    for j in range(0, d, block):
        j2 = min(d, j + block)
        if lower:  # the strictly upper part of column block j..j2 from the lower rows
            A[:j, j:j2] = A[j:j2, :j].T
        else:
            A[j2:, j:j2] = A[j:j2, j2:].T
        D = A[j:j2, j:j2]
        D[...] = np.tril(D) + np.tril(D, -1).T if lower else np.triu(D) + np.triu(D, 1).T

def obs_saliency(W_star: F64, Hinv_diag: F64) -> F64:
    """OBS cost of zeroing each weight alone: ``w*_ij² / [H_λ⁻¹]_jj`` (``(M, d)``)."""
    return np.asarray(W_star**2 / np.maximum(Hinv_diag, 1e-300)[None, :])


def objective(W: F64, dh: Damped, rhs: F64) -> float:
    """``Σ_i wᵢᵀH_λwᵢ − 2wᵢᵀrhsᵢ`` (the damped objective up to a constant that does not depend on W)."""
    return float(np.einsum("ij,ij->", W @ dh.H, W) - 2.0 * np.einsum("ij,ij->", W, rhs))


#: A layer's two diagnostic errors (the dense weights under the mask, and unpruned) take float32
#: products with ``H`` from this many multiply-adds (``M·d²``) on: they are only reported.
DIAGNOSTIC_SINGLE_MACS = 1e8


def reconstruction_error(
    W: F64, H: F64, B: F64 | None, yy: F64 | None, W_bar: F64, *, single: bool = False
) -> float:
    """``Σ_i E_i(w_i)``: the summed squared output error against the dense layer (no damping).
    ``single``: the product with ``H`` in float32 (for reported diagnostics; rounding ~1e-7 of the
    layer's output energy)."""

    def quad(V: F64) -> float:  # Σ_i v_iᵀ H v_i
        if single:
            VH = parallel.matmul(V.astype(np.float32), H.astype(np.float32)).astype(np.float64)
        else:
            VH = parallel.matmul(V, H)
        return float(np.einsum("ij,ij->", VH, V))

    if B is None or yy is None:
        return max(0.0, quad(W - W_bar))
    return float(max(0.0, quad(W) - 2.0 * np.einsum("ij,ji->", W, B) + float(np.sum(yy))))


def _block_counts(prune: int, d: int, block: int, saliency: F64) -> list[int]:
    """How many of the ``prune`` weights each column block removes: as many as the block holds among
    the layer's ``prune`` smallest OBS saliencies ``(M, d)``, so that blocks of unimportant columns
    (dead pixels, say) give more (SparseGPT itself removes the same fraction in every block)."""
    edges = [*range(0, d, block), d]
    if prune <= 0:
        return [0] * (len(edges) - 1)
    flat = saliency.reshape(-1)
    low = np.zeros(flat.size, dtype=bool)
    low[np.argpartition(flat, min(prune, flat.size) - 1)[:prune]] = True
    per_col = low.reshape(saliency.shape).sum(axis=0)
    return [int(per_col[a:b].sum()) for a, b in itertools.pairwise(edges)]


def sparsegpt_sweep(
    W_star: F64,
    Hinv: F64 | None,
    keep: int | None = None,
    mask: NDArray[np.bool_] | None = None,
    *,
    block: int = BLOCK,
    row_weight: F64 | None = None,
    U: F64 | None = None,
    u_rows: Callable[[int, int], tuple[F64, Callable[[F64], F64]]] | None = None,
    hinv_diag: F64 | None = None,
) -> tuple[F64, NDArray[np.bool_]]:
    """SparseGPT's OBS column sweep on ``Σ_i ρ_i (w_i − w*_i)ᵀ H_λ (w_i − w*_i)``, keeping exactly
    ``keep`` weights.

    ``Hinv`` is ``H_λ⁻¹``.  Columns are processed left to right in blocks; within a block the weights
    of smallest ``ρ_i w² / [U]_jj²`` (``U`` the upper Cholesky factor of ``H_λ⁻¹``) across all rows
    are removed (the block's share of the budget), and every removal is compensated on the columns
    to its right.  ``row_weight`` ``ρ`` ``(M,)`` (default all ones) weighs the output rows: the rows
    are independent, so it changes which weights are removed, not how a row is compensated.  With
    ``mask`` (True = kept) the selection is given and only the updates run.  Returns ``(W, mask)``,
    ``(M, d)`` each.  ``U`` (optional): that factor, given (:meth:`Damped.inverse_factor`); then
    ``Hinv`` may be None.  ``u_rows`` (optional, instead of both): for the column block ``i1:i2``, its
    diagonal block ``U[i1:i2, i1:i2]`` and the product ``E ↦ E·U[i1:i2, i2:]`` (``E (M, i2 − i1)``),
    asked for block by block in order (the row-space factor,
    :meth:`chita_onnx.solver.rowspace.RowGram.factor_block`), with ``hinv_diag = diag(H_λ⁻¹)``
    ``(d,)`` when ``keep`` is given.
    """
    M, d = W_star.shape
    if (keep is None) == (mask is None):
        raise SolverError("give exactly one of keep and mask")
    if u_rows is None:
        if U is None:
            if Hinv is None:
                raise SolverError("give H_λ⁻¹ or its factor U")
            try:
                U = sla.cholesky(Hinv, lower=False, check_finite=False)
            except np.linalg.LinAlgError:
                raise SolverError("H_λ⁻¹ is not positive definite; raise the damping") from None
        Uf = U

        def u_rows(i1: int, i2: int) -> tuple[F64, Callable[[F64], F64]]:
            return Uf[i1:i2, i1:i2], lambda E: np.asarray(parallel.matmul(E, Uf[i1:i2, i2:]))

        if hinv_diag is None and keep is not None:
            hinv_diag = np.diag(Hinv) if Hinv is not None else np.einsum("ij,ij->j", U, U)
    elif keep is not None and hinv_diag is None:
        raise SolverError("the row-block factor needs diag(H_λ⁻¹) to select")
    W = W_star.copy()
    kept = np.ones((M, d), dtype=bool) if mask is None else mask.astype(bool, copy=True)
    counts: list[int] = []
    rho = np.ones((M, 1)) if row_weight is None else np.asarray(row_weight, np.float64).reshape(M, 1)
    if keep is not None:
        assert hinv_diag is not None
        sal = rho * W_star**2 / np.maximum(hinv_diag, 1e-300)[None, :]
        counts = _block_counts(M * d - int(keep), d, block, sal)
    for bi, i1 in enumerate(range(0, d, block)):
        i2 = min(d, i1 + block)
        W1 = np.asfortranarray(W[:, i1:i2])  # columns contiguous: the loop below works column by column
        U1, rest = u_rows(i1, i2)
        err = np.zeros(W1.shape, order="F")
        if keep is not None:
            q = counts[bi]
            if q > 0:
                score = rho * W1**2 / (np.diag(U1)[None, :] ** 2)
                flat = np.argpartition(score, q - 1, axis=None)[:q] if q < score.size else np.arange(score.size)
                blk = np.ones(score.size, dtype=bool)
                blk[flat] = False
                kept[:, i1:i2] = blk.reshape(score.shape)
        # row halves on two threads (:mod:`.parallel`), split at a multiple of ROW_ALIGN rows so that
        # every row meets the GEMV kernel's row blocking as in one call: the same values bit for bit
        columns = functools.partial(_sweep_block, W1, err, U1, kept[:, i1:i2])
        parallel.halves(columns, M, M * (i2 - i1) ** 2 / 2, align=ROW_ALIGN)
        W[:, i1:i2] = W1
        if i2 < d:
            W[:, i2:] -= rest(err)
    W[~kept] = 0.0
    return W, kept


def _sweep_block(W1: F64, err: F64, U1: F64, k1: NDArray[np.bool_], lo: int, hi: int) -> None:
    """One column block of :func:`sparsegpt_sweep`, left to right, for rows ``lo:hi`` (the rows never
    mix): ``W1`` ``(M, b)`` (compensated in place, zeros where ``k1`` is False), ``err`` ``(M, b)`` the
    scaled removal errors, ``U1`` ``(b, b)`` the block's diagonal block of ``U``."""
    for j in range(W1.shape[1]):
        # left-looking: column j's compensated value from the errors of the columns before it (one
        # GEMV), instead of updating every column to its right after each removal
        w = W1[lo:hi, j] - err[lo:hi, :j] @ U1[:j, j] if j else W1[lo:hi, j]
        kj = k1[lo:hi, j]
        err[lo:hi, j] = np.where(kj, 0.0, w) / U1[j, j]
        W1[lo:hi, j] = np.where(kj, w, 0.0)


def refit_cost(mask: NDArray[np.bool_], complement: bool = True) -> tuple[float, float]:
    """Estimated multiply-adds of the exact re-fit on ``mask (M, d)`` and of one batched CG iteration.

    Exact: a Cholesky of ``m = min(|S_i|, d − |S_i|)`` per row (the kept set, or with ``H_λ⁻¹``
    the pruned one; ``m = |S_i|`` without ``complement``), ``m³/3`` each, plus the ``d·m`` update.
    CG: one product of the ``(M, d)`` weights with ``H``, ``2·M·d²``.
    """
    M, d = mask.shape
    kept = mask.sum(axis=1).astype(np.float64)
    m = np.minimum(kept, d - kept) if complement else kept
    return float(np.sum(m**3) / 3.0 + np.sum(m) * d), 2.0 * M * d * d


def ridge_refit(
    dh: Damped,
    rhs: F64,
    mask: NDArray[np.bool_],
    W0: F64 | None = None,
    Hinv: F64 | None = None,
    W_star: F64 | None = None,
) -> tuple[F64, str]:
    """Re-fit every row on its support: ``w_S = (H_λ)_SS⁻¹ rhs_S`` (``(M, d)``, zeros off ``S``).

    Exact when it costs at most :data:`EXACT_FLOPS` (:func:`refit_cost`): per row, whichever system
    is smaller — the kept set ``S`` (Cholesky of ``(H_λ)_SS``) or, given ``Hinv = H_λ⁻¹`` and the
    unconstrained optimum ``W_star = rhs·H_λ⁻¹``, the pruned set ``T``:
    ``w = w* − H_λ⁻¹[:, T] (H_λ⁻¹)_TT⁻¹ w*_T`` (the OBS removal of all of ``T`` at once; the same
    minimiser; ``Hinv`` defaults to :meth:`Damped.inverse`, formed only when some row needs it).
    Otherwise batched Jacobi-preconditioned conjugate gradients from ``W0`` (the
    objective falls at every iteration), as many iterations as :data:`CG_FLOPS` pays for (at least
    :data:`CG_MIN_ITERATIONS`, at most 300, stopping early at convergence).  Returns ``(W, how)``.
    """
    complement = W_star is not None
    exact_cost, cg_step = refit_cost(mask, complement)
    if exact_cost > EXACT_FLOPS:
        iters = cg_iterations(cg_step)
        return _cg_refit(dh.H, rhs, mask, W0, iters=iters), f"cg{iters}"
    return _exact_refit(dh, rhs, mask, Hinv, W_star, batched=BATCHED_REFIT), "cholesky"


def _exact_refit(
    dh: Damped, rhs: F64, mask: NDArray[np.bool_], Hinv: F64 | None, W_star: F64 | None, *, batched: bool
) -> F64:
    """The exact branch of :func:`ridge_refit`: every row solved on ``S`` or (with ``Hinv`` and
    ``W_star``) on the smaller ``T``.  ``batched``: the systems bucketed by size and solved together
    (:func:`chita_onnx.solver.batched_spd.solve_subsystems`); otherwise one :func:`spd_solve` per row
    (the reference; the same results up to rounding)."""
    M, d = rhs.shape
    sizes = mask.sum(axis=1)
    complement = W_star is not None
    W = np.zeros((M, d))
    Hl = dh.H
    full = sizes == d
    if np.any(full):
        W[full] = dh.solve_rows(rhs[full])
    rows = np.flatnonzero(~full & (sizes > 0))
    by_t = rows[2 * sizes[rows] > d] if complement else rows[:0]
    by_s = np.setdiff1d(rows, by_t, assume_unique=True)
    if by_t.size:  # w = w* − H_λ⁻¹ z with z_T = (H_λ⁻¹)_TT⁻¹ w*_T: the products in one GEMM
        assert W_star is not None
        if Hinv is None:
            Hinv = dh.inverse()
        if batched:
            Z = _solve_rows(Hinv, ~mask[by_t], W_star[by_t])
        else:
            Hinv32 = Hinv.astype(np.float32)
            Z = np.zeros((by_t.size, d))
            for r, i in enumerate(by_t):
                T = np.flatnonzero(~mask[i])
                Z[r, T] = spd_solve(Hinv, Hinv32, T, W_star[i, T])
        W[by_t] = W_star[by_t] - parallel.matmul(Z, Hinv)
        W[by_t] *= mask[by_t]
    if batched:
        if by_s.size:
            W[by_s] = _solve_rows(Hl, mask[by_s], rhs[by_s])
        return W
    H32 = Hl.astype(np.float32)
    for i in by_s:
        S = np.flatnonzero(mask[i])
        W[i, S] = spd_solve(Hl, H32, S, rhs[i, S])
    return W


def _solve_rows(A: F64, sel: NDArray[np.bool_], R: F64) -> F64:
    """:func:`spd_solve` for every row of ``sel``/``R`` at once (zeros off each row's set)."""
    return solve_subsystems(
        A, sel, R, single_min=SINGLE_MIN, tol=RESIDUAL_TOL, fallback=lambda idx, b: _spd_solve64(A, idx, b)
    )


def spd_solve(A: F64, A32: NDArray[np.float32], idx: NDArray[np.int64], b: F64) -> F64:
    """``A_II⁻¹ b`` for ``I = idx`` and a symmetric positive definite ``A (d, d)`` (``A32``: the same
    in float32).  Systems of at least :data:`SINGLE_MIN` unknowns are solved in float32 (half the
    time and half the bytes gathered of float64): on damped Grams the objective moves by ~1e-9
    relative (the weights are written in float32 in the end; refinement against ``A32``'s values
    would not remove the rounding of ``A`` itself).  When the float32 factorisation fails or its
    residual exceeds :data:`RESIDUAL_TOL`: float64 Cholesky of ``A``, as below the size."""
    m = idx.shape[0]
    if m >= SINGLE_MIN:
        G = A32.take(idx, axis=0).take(idx, axis=1)  # faster than A32[np.ix_(idx, idx)]
        try:
            c = sla.cho_factor(G, lower=False, check_finite=False)
            ok = bool(np.all(np.diag(c[0]) > 0)) and bool(np.all(np.isfinite(c[0])))
        except (np.linalg.LinAlgError, ValueError):
            ok = False
        if ok:
            b32 = b.astype(np.float32)
            x32 = sla.cho_solve(c, b32, check_finite=False)
            r = b32 - G @ x32
            if np.all(np.isfinite(x32)) and float(np.linalg.norm(r)) <= RESIDUAL_TOL * float(np.linalg.norm(b32)):
                return np.asarray(x32, dtype=np.float64)
    return _spd_solve64(A, idx, b)


def _spd_solve64(A: F64, idx: NDArray[np.int64], b: F64) -> F64:
    """``A_II⁻¹ b`` by float64 Cholesky (raises ``LinAlgError`` when ``A_II`` is not positive definite)."""
    c64 = sla.cho_factor(A[np.ix_(idx, idx)], lower=False, check_finite=False)
    out: F64 = sla.cho_solve(c64, b, check_finite=False)
    return out


def _cg_refit(
    H: F64 | None,
    rhs: F64,
    mask: NDArray[np.bool_],
    W0: F64 | None,
    tol: float = 1e-6,
    iters: int = 300,
    *,
    times: Callable[[F64], F64] | None = None,
    diag: F64 | None = None,
    times_rows: Callable[[F64], F64] | None = None,
    times_cost: float = 0.0,
) -> F64:
    """Batched preconditioned CG on ``min ½wᵀHw − rhsᵀw`` restricted to each row's support.

    With ``d ≥`` :data:`SINGLE_MIN` the products with ``H`` (all the arithmetic) are float32 and the
    iteration's vectors float64.  Each row ends at the better of its start ``W0`` and its last
    iterate, by ``f_i(w) = wᵀH_λw − 2wᵀrhs_i = −wᵀ(rhs_i + r)`` with the explicit residual
    ``r = (rhs_i − H_λw)`` on the support (``w`` is zero off it): one product with ``H`` for the end,
    the start's is the iteration's first.  The iteration works in preallocated ``(M, d)`` buffers:
    on a wide layer a fresh temporary per operation costs more in page faults than the product.
    Inside :func:`.parallel.helping`, a float32 iteration gives half of its rows (their products and
    vector updates) to the helper thread: the rows are independent systems, so the iterates are those
    of one thread bit for bit.
    ``times`` and ``diag`` (instead of ``H``): the product ``V ↦ V H_λ`` and ``diag(H_λ)`` ``(d,)``;
    ``times_rows``: the same product for a block of rows that never splits its own work (row ``i`` of
    ``V H_λ`` depends on row ``i`` of ``V`` only), and ``times_cost`` its multiply-adds for all ``M``
    rows: then the iteration splits its rows between the threads as the float32 ``H`` path does, each
    half's products computed as ``times`` computes that half."""
    if H is None:
        if times is None or diag is None:
            raise SolverError("give H or its product and diagonal")
        op, hdiag = times, diag
    else:
        op, hdiag = None, np.diag(H)
    H32 = H.astype(np.float32) if H is not None and H.shape[0] >= SINGLE_MIN else None
    V32 = np.empty(rhs.shape, np.float32) if H32 is not None else None
    HV32 = np.empty(rhs.shape, np.float32) if H32 is not None else None

    def times_h(V: F64, out: F64) -> F64:
        """``V H`` into ``out``."""
        if op is not None:
            np.copyto(out, op(V))
            return out
        if H32 is None:
            assert H is not None
            return parallel.matmul(V, H, out=out)
        assert V32 is not None and HV32 is not None
        np.copyto(V32, V, casting="same_kind")
        parallel.matmul(V32, H32, out=HV32)
        np.copyto(out, HV32)
        return out

    P = mask.astype(np.float64)
    X = np.zeros_like(rhs) if W0 is None else W0 * P
    hd = np.maximum(hdiag, 1e-300)[None, :]
    R = np.empty_like(rhs)
    tmp = np.empty_like(rhs)
    times_h(X, R)
    np.subtract(rhs, R, out=R)
    R *= P
    X0 = X.copy()
    np.add(rhs, R, out=tmp)
    f0 = -np.einsum("ij,ij->i", X0, tmp)
    Z = R / hd
    Pd = Z.copy()
    Ap = np.empty_like(rhs)
    rz = np.einsum("ij,ij->i", R, Z)
    np.multiply(rhs, P, out=tmp)
    stop2 = (tol * np.maximum(np.sqrt(np.einsum("ij,ij->i", tmp, tmp)), 1e-300)) ** 2
    rr = np.einsum("ij,ij->i", R, R)
    M, d = rhs.shape

    def step(lo: int, hi: int) -> None:
        """One CG iteration of rows ``lo:hi`` (each row its own system: the rows never mix)."""
        sl = slice(lo, hi)
        if times_rows is not None:  # this half's rows of the product, on this thread
            Ap[sl] = times_rows(Pd[sl])
        elif op is not None or H32 is None:  # whole-matrix products (rows stay together: one call)
            times_h(Pd, Ap)
        else:  # this half's rows of the float32 product, as the one call computes them
            assert V32 is not None and HV32 is not None
            np.copyto(V32[sl], Pd[sl], casting="same_kind")
            np.matmul(V32[sl], H32, out=HV32[sl])
            np.copyto(Ap[sl], HV32[sl])
        ap, pd, r, z, t = Ap[sl], Pd[sl], R[sl], Z[sl], tmp[sl]
        ap *= P[sl]
        denom = np.einsum("ij,ij->i", pd, ap)
        alpha = np.where(denom > 0, rz[sl] / np.where(denom > 0, denom, 1.0), 0.0)
        np.multiply(pd, alpha[:, None], out=t)
        X[sl] += t
        np.multiply(ap, alpha[:, None], out=t)
        r -= t
        np.divide(r, hd, out=z)
        rz_new = np.einsum("ij,ij->i", r, z)
        beta = np.where(rz[sl] > 0, rz_new / np.where(rz[sl] > 0, rz[sl], 1.0), 0.0)
        pd *= beta[:, None]
        pd += z
        rz[sl] = rz_new
        rr[sl] = np.einsum("ij,ij->i", r, r)

    # the float32 path splits its rows between two threads (:mod:`.parallel`), products and vector
    # updates alike; the per-row arithmetic is the same as in one call
    if times_rows is not None:
        split, work = M >= 2 * parallel.MIN_ROWS, float(times_cost)
    else:
        split = op is None and H32 is not None and M >= 2 * parallel.MIN_ROWS  # as parallel.matmul splits
        work = float(M) * d * d
    if not split:
        work = 0.0
    for _ in range(iters):
        if np.all(rr <= stop2):  # ‖r_i‖ ≤ tol·‖rhs_i‖ on the support
            break
        parallel.halves(step, M, work)
    times_h(X, tmp)
    np.subtract(rhs, tmp, out=tmp)
    tmp *= P
    tmp += rhs
    f = -np.einsum("ij,ij->i", X, tmp)
    worse = ~(f <= f0)  # a NaN iterate is worse
    X[worse] = X0[worse]
    return X


def warm_refit(
    W_bar: F64,
    H: F64,
    B: F64 | None,
    mask: NDArray[np.bool_],
    W0: F64,
    *,
    damp: float = DAMP,
    iterations: int = CG_MIN_ITERATIONS,
    name: str = "layer",
) -> F64:
    """Move ``W0`` ``(M, d)`` toward the exact re-fit of its rows on the support ``mask``: the objective
    of :func:`prune_layer`'s re-fit, ``Σ_i (w_i − w̄_i)ᵀ H (w_i − w̄_i)`` with cross term ``B``
    ``(d, M)`` (``‖w_iᵀX − ȳ_i‖²`` up to a constant) plus ``λ‖w_i − w̄_i‖²``, by ``iterations`` of
    batched preconditioned CG from ``W0``; each row ends at the better of ``W0`` and its last iterate.
    For a support that barely moves the optimum: a few products with ``H`` instead of the factorisations."""
    dh = damp_gram(H, damp, name=name)
    rhs = parallel.matmul(W_bar, dh.H) if B is None else B.T + dh.lam * W_bar
    return _cg_refit(dh.H, rhs, mask, W0, iters=iterations)


@dataclass(frozen=True)
class LayerSolution:
    """The pruned rows of one layer, ``(g, M_g, d)``, with what it cost.

    ``error`` / ``masked_error`` / ``dense_error``: the summed squared output error against the dense
    layer (undamped) of the result, of the dense weights under the same mask, and of the unpruned
    dense weights on the pruned inputs (the last two are reported only, NaN when not computed).
    ``damp``: the largest relative damping used.
    """

    W: F64
    mask: NDArray[np.bool_]
    error: float
    masked_error: float
    dense_error: float
    damp: float
    info: dict[str, float | int | str] = field(default_factory=dict)


def split_budget(scores: F64, keep: int) -> NDArray[np.int64]:
    """Per-group keep counts (summing to exactly ``keep``) from the ``keep`` largest ``scores (g, M, d)``."""
    flat = scores.reshape(-1)
    if keep >= flat.size:
        return np.full(scores.shape[0], flat.size // max(1, scores.shape[0]), dtype=np.int64)
    if scores.shape[0] == 1:  # one group holds them all (no need to find them: 0.08 s per 10⁷ scores)
        return np.array([max(keep, 0)], dtype=np.int64)
    chosen = np.zeros(flat.size, dtype=bool)
    if keep > 0:
        chosen[np.argpartition(-flat, keep - 1)[:keep]] = True
    counts: NDArray[np.int64] = chosen.reshape(scores.shape[0], -1).sum(axis=1).astype(np.int64)
    return counts


#: Added to the normalised output-row weights (mean 1) of :func:`output_row_weights`: every row then
#: weighs between 1 and 1 + √s_i/mean(√s).
ROW_WEIGHT_FLOOR = 1.0


def output_row_weights(
    F: NDArray[np.floating], H: NDArray[np.floating] | None, *, energy: NDArray[np.floating] | None = None
) -> NDArray[np.float64] | None:
    """Output-row weights ``ρ (g, M)`` of one layer from the Fisher diagonal of its weights ``F (g, M, d)``
    (as :func:`~chita_onnx.layerstats.weight_rows`) and its input Gram ``H (g, d, d)``.

    With the Kronecker-factored view of the Fisher of a linear layer, ``F_(i,j),(i,j) ≈ s_i·H_jj/N``:
    the sensitivity ``s_i`` of the loss to output ``i`` times the input energy.  So
    ``s_i ∝ Σ_j F_ij / Σ_j H_jj`` per group, and the layer-wise objective ``Σ_i s_i ‖Δw_iᵀX‖²``
    follows the loss instead of counting every output alike (a classifier over thousands of
    classes, most of which the calibration data never come near, spends its budget on the classes
    the data do use).  The weights are tempered, as the estimate comes from a few dozen samples and
    the factorisation is itself approximate: ``ρ_i = √s_i / mean(√s) +`` :data:`ROW_WEIGHT_FLOOR`
    (the square root and the floor were chosen on selection data, BENCHMARKS.md "Output-row
    weights").  None when ``F`` carries no information (all zero).  ``energy`` ``(g,)`` (instead of
    ``H``): the input energy ``Σ_j H_jj`` per group (the squared norm of the input rows).
    """
    Fs = np.asarray(F, np.float64).sum(axis=2)
    if energy is None:
        if H is None:
            raise SolverError("give H or the input energy")
        energy = np.einsum("gii->g", np.asarray(H, np.float64))
    s = np.sqrt(np.maximum(Fs, 0.0) / np.maximum(energy, 1e-300)[:, None])
    mean = float(s.mean()) if s.size else 0.0
    if not np.isfinite(mean) or mean <= 0:
        return None
    rho: NDArray[np.float64] = s / mean + ROW_WEIGHT_FLOOR
    return rho


#: Every class keeps at least this fraction of an even share ``keep/M`` of a softmax head's weights
#: in :func:`class_weighted_mask` (classes the calibration data never come near are not emptied).
HEAD_CLASS_FLOOR = 0.25


def class_weighted_mask(W_bar: F64, energy: F64, keep: int, *, floor: float = HEAD_CLASS_FLOOR) -> NDArray[np.bool_]:
    """Which of a softmax head's weights to keep: ``keep`` of them, by the saliency
    ``s_cj = w̄_cj² · E_cj``.

    ``W_bar (M, d)``: the dense weight, one row per class ``c``; ``energy (M, d)``:
    ``E_cj = Σ_n q_nc x_nj²`` over the input rows ``x_n`` with the dense model's class probabilities
    ``q_n`` (plus a small prior, see the caller).  The Gauss-Newton matrix of the KL divergence to
    the dense output in the head's weights is ``Σ_n x_n x_nᵀ ⊗ (diag q_n − q_n q_nᵀ)``; with the
    coupling ``q_n q_nᵀ`` dropped it is bounded above by ``Σ_n x_n x_nᵀ ⊗ diag q_n``, whose diagonal
    is ``E``: removing ``w_cj`` costs what class ``c`` weighs on the inputs that use feature ``j``.
    A class the data rarely predict gives up weights for the classes they do, across rows (the
    layer's own selection keeps a share per row that the tempered row weights move only a little).
    Each class first keeps its ``⌊floor · keep / M⌋`` most salient weights (largest, for a class
    with no energy at all).  Returns a boolean mask ``(M, d)`` with exactly ``keep`` True entries.
    """
    W = np.asarray(W_bar, np.float64)
    E = np.asarray(energy, np.float64)
    if W.ndim != 2 or E.shape != W.shape:
        raise SolverError(f"energy has shape {E.shape}, the weight {W.shape}: they must be one (M, d) shape")
    if not 0 <= keep <= W.size:
        raise SolverError(f"keep={keep} is outside [0, {W.size}]")
    if not 0.0 <= floor <= 1.0:
        raise SolverError(f"floor={floor} is outside [0, 1]")
    M, d = W.shape
    s = W**2 * np.where(np.isfinite(E), np.maximum(E, 0.0), 0.0)
    mask = np.zeros((M, d), dtype=bool)
    per = min(d, int(floor * keep / max(1, M)))
    if per > 0:
        dead = ~(s.max(axis=1) > 0)  # a class with no energy at all: its floor by magnitude
        floor_s = np.where(dead[:, None], W**2, s)
        top = np.argpartition(-floor_s, per - 1, axis=1)[:, :per]
        mask[np.arange(M)[:, None], top] = True
    rest = keep - int(mask.sum())
    if rest > 0:
        flat = np.where(mask, -np.inf, s).ravel()
        mask.ravel()[np.argpartition(-flat, rest - 1)[:rest]] = True
    return mask


def check_budget(
    name: str,
    shape: tuple[int, ...],
    keep: int | None,
    mask: NDArray[np.bool_] | None,
    row_weight: NDArray[np.floating] | None,
) -> F64:
    """Validate one layer's budget for a weight of ``shape`` (``(..., M, d)``): exactly one of
    ``keep`` (in ``[0, size]``) and ``mask`` (of ``shape``), and ``row_weight`` of shape
    ``shape[:-1]`` (finite, ≥ 0).  Returns the row weights ``ρ`` (all ones by default)."""
    size = int(np.prod(shape))
    if (mask is None) == (keep is None):
        raise SolverError(f"{name}: give exactly one of keep and mask")
    if keep is not None and not 0 <= keep <= size:
        raise SolverError(f"{name}: keep={keep} is outside [0, {size}]")
    if mask is not None and mask.shape != tuple(shape):
        raise SolverError(f"{name}: mask has shape {mask.shape}, expected {tuple(shape)}")
    rows = tuple(shape[:-1])
    rho: F64 = np.ones(rows) if row_weight is None else np.asarray(row_weight, np.float64)
    if rho.shape != rows or not np.all(np.isfinite(rho)) or np.any(rho < 0):
        raise SolverError(f"{name}: row_weight must be finite, non-negative, of shape {rows}")
    return rho


def cg_iterations(cg_step: float) -> int:
    """Iterations of the batched CG re-fit that :data:`CG_FLOPS` pays for at ``cg_step`` multiply-adds
    each (at least :data:`CG_MIN_ITERATIONS`, at most :data:`CG_MAX_ITERATIONS`)."""
    return int(min(CG_MAX_ITERATIONS, max(CG_MIN_ITERATIONS, CG_FLOPS / max(cg_step, 1.0))))


def prune_layer(
    W_bar: F64,
    H: F64,
    B: F64 | None = None,
    yy: F64 | None = None,
    *,
    keep: int | None = None,
    mask: NDArray[np.bool_] | None = None,
    select: Select = "sparsegpt",
    refit: bool = True,
    damp: float = DAMP,
    block: int = BLOCK,
    name: str = "layer",
    row_weight: F64 | None = None,
    diagnostics: bool = True,
) -> LayerSolution:
    """Prune one layer (all its groups) to exactly ``keep`` weights, or re-fit it on ``mask``.

    ``W_bar (g, M, d)``, ``H (g, d, d)``, ``B (g, d, M)`` or None, ``yy (g, M)`` or None,
    ``mask (g, M, d)`` bool (True = kept).  ``select``: ``"sparsegpt"`` (OBS sweep, adaptive mask),
    ``"magnitude"`` (largest ``|w*|``, then the updates), or ``"mask"`` (use ``mask``).  ``refit``
    adds the exact ridge re-fit of every row on the final support.  The budget is split over the
    groups of a grouped Conv by the OBS saliency of all its weights.  ``row_weight`` ``(g, M)`` (≥ 0;
    default all ones): how much each output row's error counts in the selection — the layer's
    objective becomes ``Σ_i ρ_i ‖(w_i − w̄_i)ᵀ X‖²``; each row's re-fit does not depend on it.
    ``diagnostics=False`` skips the two reported-only errors (:attr:`LayerSolution.masked_error` and
    :attr:`~LayerSolution.dense_error` are then NaN): two more products with ``H`` on a wide layer.
    """
    W_bar = np.ascontiguousarray(W_bar, dtype=np.float64)
    g, M, d = W_bar.shape
    if H.shape != (g, d, d):
        raise SolverError(f"{name}: H has shape {H.shape}, expected {(g, d, d)}")
    if B is not None and B.shape != (g, d, M):
        raise SolverError(f"{name}: B has shape {B.shape}, expected {(g, d, M)}")
    rho = check_budget(name, W_bar.shape, keep, mask, row_weight)
    if g >= 8 and d <= 64 and d <= block:
        fast = _prune_groups_batched(W_bar, H, B, yy, keep, mask, select, refit, damp, rho, diagnostics)
        if fast is not None:
            return fast
    # the groups are independent until the budget is split, and again after: each group's
    # factorisations, then its sweep and re-fit, are one job of parallel.tasks (both cores at once)
    cost = solve_cost(M, d)

    def factor(k: int) -> tuple[Damped, tuple[F64, F64]]:
        dh = damp_gram(H[k], damp, name=f"{name} group {k}" if g > 1 else name)
        tgk = targets(W_bar[k], dh, None if B is None else B[k])
        if g > 1:
            dh.inverse_diag()  # (cached, with the sweep's factor) on this job's thread
        return dh, tgk

    first = parallel.tasks([functools.partial(factor, k) for k in range(g)], [cost] * g)
    damped = [dh for dh, _ in first]
    tg = [t for _, t in first]
    if keep is not None:
        if select == "magnitude":
            scores = np.stack([np.abs(w) for _, w in tg])
        else:
            scores = np.stack([obs_saliency(w, dh.inverse_diag()) for (_, w), dh in zip(tg, damped, strict=True)])
        scores = scores * rho[:, :, None]
        counts = split_budget(scores, keep)
        if select == "magnitude":
            mask = np.zeros(W_bar.shape, dtype=bool)
            for k in range(g):
                flat = (rho[k][:, None] * np.abs(tg[k][1])).reshape(-1)
                c = int(counts[k])
                chosen = np.zeros(flat.size, dtype=bool)
                if c:
                    chosen[np.argpartition(-flat, c - 1)[:c]] = True
                mask[k] = chosen.reshape(M, d)
    single = M * d * d >= DIAGNOSTIC_SINGLE_MACS

    def fit(k: int) -> tuple[F64, NDArray[np.bool_], str, tuple[float, float, float]]:
        rhs, W_star = tg[k]
        how = ""
        if mask is None:
            Wk, mk = sparsegpt_sweep(
                W_star, None, keep=int(counts[k]), block=block, row_weight=rho[k], U=damped[k].inverse_factor()
            )
        else:
            Wk, mk = sparsegpt_sweep(W_star, None, mask=mask[k], block=block, U=damped[k].inverse_factor())
        if refit:
            Wk, how = ridge_refit(damped[k], rhs, mk, Wk, None, W_star)  # CG keeps each row's better end
        Bk = None if B is None else B[k]
        yk = None if yy is None else yy[k]
        errors = (reconstruction_error(Wk, H[k], Bk, yk, W_bar[k]), math.nan, math.nan)
        if diagnostics:
            errors = (
                errors[0],
                reconstruction_error(W_bar[k] * mk, H[k], Bk, yk, W_bar[k], single=single),
                reconstruction_error(W_bar[k], H[k], Bk, yk, W_bar[k], single=single),
            )
        return Wk, mk, how, errors

    out = np.zeros_like(W_bar)
    kept = np.zeros_like(W_bar, dtype=bool)
    how = ""
    err = masked = dense = 0.0
    for k, (Wk, mk, how_k, (e, e_masked, e_dense)) in enumerate(
        parallel.tasks([functools.partial(fit, k) for k in range(g)], [cost] * g)
    ):
        out[k], kept[k], how = Wk, mk, how_k
        err, masked, dense = err + e, masked + e_masked, dense + e_dense
    return LayerSolution(
        out,
        kept,
        err,
        masked,
        dense,
        max(dh.damp for dh in damped) if damped else damp,
        {"refit": how or "none", "select": select if mask is None or keep is not None else "mask"},
    )


def _errors(W: F64, H: F64, B: F64 | None, yy: F64 | None, W_bar: F64) -> float:
    """:func:`reconstruction_error` summed over groups, batched: ``W (g, M, d)``."""
    if B is None or yy is None:
        D = W - W_bar
        return float(max(0.0, np.einsum("gmd,gde,gme->", D, H, D)))
    WH = np.einsum("gmd,gde,gme->", W, H, W)
    return float(max(0.0, WH - 2.0 * np.einsum("gmd,gdm->", W, B) + float(np.sum(yy))))


def _prune_groups_batched(
    W_bar: F64,
    H: F64,
    B: F64 | None,
    yy: F64 | None,
    keep: int | None,
    mask: NDArray[np.bool_] | None,
    select: Select,
    refit: bool,
    damp: float,
    rho: F64 | None = None,
    diagnostics: bool = True,
) -> LayerSolution | None:
    """:func:`prune_layer` for many small groups at once (a depthwise Conv): the same math, with every
    factorisation and solve batched over the groups and rows.  Returns None (use the per-group path)
    when some group's damped Gram is not positive definite or has NaN."""
    g, M, d = W_bar.shape
    if not np.all(np.isfinite(H)):
        return None
    Hs = 0.5 * (H + np.swapaxes(H, 1, 2))
    scale = np.einsum("gii->g", Hs) / d
    scale = np.where(scale > 0, scale, 1.0)
    lam = (damp if damp > 0 else 1e-8) * scale
    eye = np.eye(d)
    Hl = Hs + lam[:, None, None] * eye
    try:
        np.linalg.cholesky(Hl)
        Hinv = np.linalg.inv(Hl)
        Hinv = 0.5 * (Hinv + np.swapaxes(Hinv, 1, 2))
        U = np.swapaxes(np.linalg.cholesky(Hinv), 1, 2)  # upper: H_λ⁻¹ = UᵀU
    except np.linalg.LinAlgError:
        return None
    if B is None:
        rhs = W_bar @ Hl
        W_star = W_bar.copy()
    else:
        rhs = np.swapaxes(B, 1, 2) + lam[:, None, None] * W_bar
        W_star = rhs @ Hinv
    if keep is not None:
        diag = np.einsum("gii->gi", Hinv)
        r = np.ones((g, M, 1)) if rho is None else rho[:, :, None]
        score = r * (np.abs(W_star) if select == "magnitude" else W_star**2 / np.maximum(diag, 1e-300)[:, None, :])
        counts = split_budget(score, keep)
        udiag = np.einsum("gii->gi", U) ** 2
        sweep_score = r * (np.abs(W_star) if select == "magnitude" else W_star**2 / udiag[:, None, :])
        flat = sweep_score.reshape(g, -1)
        rank = np.empty_like(flat, dtype=np.int64)
        order = np.argsort(-flat, axis=1, kind="stable")
        np.put_along_axis(rank, order, np.arange(M * d)[None, :].repeat(g, 0), axis=1)
        kept = (rank < counts[:, None]).reshape(g, M, d)
    else:
        assert mask is not None
        kept = mask.astype(bool, copy=True)
    W = W_star.copy()
    for j in range(d):
        w = W[:, :, j]
        q = np.where(kept[:, :, j], w, 0.0)
        e = (w - q) / U[:, j, j][:, None]
        W[:, :, j:] -= e[:, :, None] * U[:, None, j, j:]
        W[:, :, j] = q
    W[~kept] = 0.0
    if refit:
        m = kept.astype(np.float64)
        A = Hl[:, None, :, :] * (m[..., :, None] * m[..., None, :]) + (1.0 - m)[..., :, None] * eye
        W = np.linalg.solve(A, (rhs * m)[..., None])[..., 0] * m
    return LayerSolution(
        W,
        kept,
        _errors(W, H, B, yy, W_bar),
        _errors(W_bar * kept, H, B, yy, W_bar) if diagnostics else math.nan,
        _errors(W_bar, H, B, yy, W_bar) if diagnostics else math.nan,
        damp,
        {"refit": "batched" if refit else "none", "select": select if keep is not None else "mask"},
    )


def relative(err: float, energy: float) -> float:
    """``err / energy`` guarded against an all-zero layer output."""
    return err / energy if energy > 0 and math.isfinite(energy) else 0.0
