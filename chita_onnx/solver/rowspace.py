"""Layer-wise reconstruction of a wide layer from its input rows, without its ``d × d`` Gram.

Pure NumPy/SciPy; never imports onnx.  The same problem as :func:`chita_onnx.solver.layerwise.prune_layer`
for one group, when the layer has far fewer input rows ``N`` than inputs ``d`` (a classifier head on
thousands of flattened features, fitted on a few hundred samples).  With the rows ``A (N, d)`` (the
pruned model's inputs) and the dense layer's outputs ``Y (N, M)`` (``y_i = Y[:, i]``), row ``i``
minimises over its support

    ‖A w − y_i‖² + λ‖w − w̄_i‖²,   λ = damp · mean(diag AᵀA) = damp · ‖A‖²_F / d,

i.e. ``(w − w*_i)ᵀ H_λ (w − w*_i)`` + const with ``H_λ = λI + AᵀA``, ``w*_i = H_λ⁻¹ rhs_i`` and
``rhs_i = Aᵀy_i + λw̄_i``.  Every quantity the Gram route needs comes from the ``N × N`` matrix
``K = λI + AAᵀ`` (Woodbury): ``H_λ⁻¹ = (I − AᵀK⁻¹A)/λ``, and

* ``diag(H_λ⁻¹) = (1 − colsum(A ∘ K⁻¹A))/λ`` (the OBS saliencies);
* the upper Cholesky factor ``U`` of ``H_λ⁻¹`` that SparseGPT's sweep runs on, one block of rows at a
  time (:meth:`RowGram.factor_block`): with ``j`` the block's first column, the rows of ``U`` from
  column ``j`` on are ``chol(M₁₁)⁻ᵀ M_J,:`` where ``M = (H_λ)_{j:,j:}⁻¹ = (I − A_{:,j:}ᵀK_j⁻¹A_{:,j:})/λ``
  and ``K_j = λI + A_{:,j:}A_{:,j:}ᵀ`` loses the block's columns after it; the sweep needs only the
  diagonal block and the product of the block's errors with the rest, never the rows themselves;
* the exact re-fit on a support ``S``: ``w_S = (v − A_Sᵀ K_S⁻¹ A_S v)/λ`` with ``v = rhs_S`` and
  ``K_S = λI + A_SA_Sᵀ = K − A_TA_Tᵀ`` (``T`` the pruned set, whichever is smaller to form).

Cost: ``(d/b)·N³/3 + N²·d + M·N·d²/b`` for the sweep (``b`` its block) and ``N²·min(|S|, |T|)`` per
re-fitted row, against ``N·d²`` for the Gram and ``d³`` for its factorisations; memory ``N·d``
instead of several ``d × d`` matrices.  The two routes give the same weights and masks up to rounding
(``tests/test_rowspace.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import scipy.linalg as sla
from numpy.typing import NDArray

from ..errors import SolverError
from . import parallel
from .batched_spd import cho_solve_rows, posv
from .layerwise import (
    BLOCK,
    CG_FLOPS,
    CG_MAX_ITERATIONS,
    CG_MIN_ITERATIONS,
    DAMP,
    EXACT_FLOPS,
    SINGLE_MIN,
    LayerSolution,
    Select,
    _cg_refit,
    cg_iterations,
    check_budget,
    sparsegpt_sweep,
)

F64 = NDArray[np.float64]


@dataclass
class RowGram:
    """``H_λ = λI + AᵀA`` held as its rows ``A (N, d)`` (float64) and ``K = λI + AAᵀ`` ``(N, N)``."""

    A: F64
    lam: float
    damp: float
    K: F64
    _kc: F64 | None = field(default=None, repr=False)
    _next: tuple[int, F64] = field(default=(0, np.zeros((0, 0))), repr=False)
    _a32: NDArray[np.float32] | None = field(default=None, repr=False)

    @classmethod
    def of(cls, A: NDArray[np.floating], damp: float = DAMP, *, name: str = "layer") -> RowGram:
        """Damp the Gram of the rows ``A (N, d)``: ``λ = damp · mean(diag AᵀA)`` (``damp`` itself when
        every input is zero), as :func:`~chita_onnx.solver.layerwise.damp_gram`.  ``K`` is positive
        definite for any ``λ > 0``, so no retry is needed; NaN/inf rows raise :class:`SolverError`."""
        A64: F64 = np.ascontiguousarray(A, dtype=np.float64)
        if A64.ndim != 2:
            raise SolverError(f"{name}: the input rows must be a matrix, got shape {A64.shape}")
        if not np.all(np.isfinite(A64)):
            raise SolverError(f"{name}: the input Gram contains NaN or infinity (the layer's inputs overflow)")
        if damp < 0:
            raise SolverError(f"{name}: damping must be ≥ 0, got {damp}")
        N, d = A64.shape
        scale = float(np.einsum("ij,ij->", A64, A64)) / d if d else 0.0
        if scale <= 0.0:
            scale = 1.0
        cur = damp if damp > 0 else 1e-8
        lam = cur * scale
        K = A64 @ A64.T
        K.flat[:: N + 1] += lam
        # rows given in float32 (as the layer statistics keep them) serve the float32 products as they are
        a32 = np.asarray(A, dtype=np.float32) if A.dtype == np.float32 and A.flags.c_contiguous else None
        return cls(A64, lam, cur, K, _a32=a32)

    @property
    def d(self) -> int:
        return int(self.A.shape[1])

    def _chol(self) -> F64:
        """The lower Cholesky factor of ``K`` (:func:`_lower_factor`)."""
        if self._kc is None:
            self._kc = _lower_factor(self.K, "K")
        return self._kc

    def times(self, V: F64) -> F64:
        """``V H_λ`` for ``V (r, d)``."""
        return np.asarray(parallel.matmul(parallel.matmul(V, self.A.T), self.A) + self.lam * V)

    def times32(self, V: F64, *, split: bool = True) -> F64:
        """``V H_λ`` for ``V (r, d)`` with the two products in float32 (half the time of :meth:`times`),
        as the Gram route's CG takes its products with ``H`` (:func:`~.layerwise._cg_refit`); the
        damping term and the result stay float64.  ``split=False``: plain ``np.matmul`` products, for a
        block of rows that a thread of :func:`.parallel.halves` computes (the halves of one split
        product, computed by the same calls)."""
        if self._a32 is None:
            self._a32 = self.A.astype(np.float32)
        A32 = self._a32
        mm = parallel.matmul if split else np.matmul
        P = mm(V.astype(np.float32), A32.T)
        out: F64 = mm(P, A32).astype(np.float64)
        out += self.lam * V  # in place: one (r, d) temporary fewer per CG iteration
        return out

    def solve(self, R: F64) -> F64:
        """``R H_λ⁻¹`` for ``R (r, d)`` (rows; ``H_λ`` is symmetric)."""
        Zt = parallel.matmul(np.ascontiguousarray(R, dtype=np.float64), self.A.T)  # (r, N): rows of R Aᵀ
        cho_solve_rows(self._chol(), Zt)  # ← (K⁻¹ A Rᵀ)ᵀ
        return np.asarray((R - parallel.matmul(Zt, self.A)) / self.lam)

    def inverse_diag(self) -> F64:
        """``diag(H_λ⁻¹)`` ``(d,)``."""
        KAt = np.array(self.A.T, order="C", copy=True)  # (d, N): the rows of (K⁻¹A)ᵀ once solved
        cho_solve_rows(self._chol(), KAt)
        return np.asarray((1.0 - np.einsum("nj,jn->j", self.A, KAt)) / self.lam)

    def factor_block(self, i1: int, i2: int, outputs: int = 1) -> tuple[F64, Callable[[F64], F64]]:
        """The column block ``i1:i2`` of the sweep: ``U[i1:i2, i1:i2]`` (``U`` upper, ``H_λ⁻¹ = UᵀU``) and
        the product ``E ↦ E·U[i1:i2, i2:]`` for ``E (r, i2 − i1)``.

        With ``j = i1``, ``M = (H_λ)_{j:,j:}⁻¹ = (I − A_{:,j:}ᵀK_j⁻¹A_{:,j:})/λ`` and ``U₁₁ = chol(M_JJ)``
        (upper), the block's rows of ``U`` are ``U₁₁⁻ᵀ M_{J,j:}``; to the right of the block
        ``M_{J,i2:} = −CᵀA_{:,i2:}/λ`` with ``C = K_j⁻¹A_J``, so the product is
        ``−((E U₁₁⁻ᵀ) Cᵀ) A_{:,i2:} / λ`` (``r·N·d`` instead of forming the rows, ``b·N·d``; with more
        ``outputs`` ``r`` than the block's ``b`` columns the rows are formed once instead).  Blocks must
        be asked for in order from column 0: ``K_j`` is carried from one block to the next by
        subtracting the finished block's columns."""
        at, Kj = self._next
        if i1 == 0:
            at, Kj = 0, self.K.copy()
        if at != i1:
            raise SolverError(f"row factor blocks out of order: asked for column {i1}, at {at}")
        A, lam = self.A, self.lam
        AJ = A[:, i1:i2]
        b = i2 - i1
        # C = K_j⁻¹A_J (N, b), as the rows of Cᵀ = A_Jᵀ K_j⁻¹: their halves solved on both threads
        Ct = np.array(AJ.T, order="C", copy=True)
        cho_solve_rows(_lower_factor(Kj, "K_j"), Ct)
        C = Ct.T
        M11 = -(Ct @ AJ)
        M11 = 0.5 * (M11 + M11.T)
        M11.flat[:: b + 1] += 1.0
        M11 /= lam
        try:
            U11 = sla.cholesky(M11, lower=False, check_finite=False)
        except np.linalg.LinAlgError:
            raise SolverError("H_λ⁻¹ is not positive definite; raise the damping") from None
        Kj -= parallel.matmul(AJ, np.ascontiguousarray(AJ.T))
        self._next = (i2, Kj)
        right = A[:, i2:]
        if outputs > b:  # many rows of errors: form the block's rows of U once
            T = sla.solve_triangular(U11, Ct, trans="T", lower=False, check_finite=False)
            rows = -parallel.matmul(np.ascontiguousarray(T), right) / lam
            return np.asarray(U11), lambda E: np.asarray(parallel.matmul(E, rows))

        def rest(E: F64) -> F64:
            EU = sla.solve_triangular(U11, np.asarray(E, np.float64).T, lower=False, check_finite=False).T
            return np.asarray(-parallel.matmul(parallel.matmul(EU, C.T), right) / lam)

        return np.asarray(U11), rest

    def refit(self, rhs: F64, mask: NDArray[np.bool_]) -> F64:
        """Exact re-fit of every row on its support: ``w_S = (H_λ)_SS⁻¹ rhs_S`` (``(M, d)``, zeros off ``S``).

        Per row, ``K_S`` from the smaller of ``S`` and ``T`` (a symmetric rank-``m`` product on the
        columns gathered from a column-major copy of ``A``), then one LAPACK ``posv``."""
        M, d = rhs.shape
        W = np.zeros((M, d))
        A, lam = self.A, self.lam
        AF = np.asfortranarray(A)  # column gathers read contiguous columns
        N = A.shape[0]
        sizes = mask.sum(axis=1)
        full = sizes == d
        if np.any(full):
            W[full] = self.solve(rhs[full])
        rows = np.flatnonzero(~full & (sizes > 0))

        def fit(a: int, z: int) -> None:
            """Rows ``rows[a:z]`` (each its own systems: the halves of :func:`parallel.halves` share nothing)."""
            for i in rows[a:z]:
                S = np.flatnonzero(mask[i])
                AS = AF[:, S]
                v = rhs[i, S]
                b = AS @ v
                for attempt in (0, 1):
                    if attempt == 0 and 2 * S.size > d:  # K_S = K − A_T A_Tᵀ: the smaller product
                        AT = AF[:, np.flatnonzero(~mask[i])]
                        KS = self.K - AT @ AT.T
                    else:
                        KS = AS @ AS.T
                        KS.flat[:: N + 1] += lam
                    zi, info = posv(KS, b)
                    if info == 0:
                        break
                else:  # pragma: no cover - λI + A_SA_Sᵀ is positive definite for λ > 0
                    raise SolverError("a re-fit system of the row-space solve is not positive definite")
                W[i, S] = (v - AS.T @ zi) / lam

        m = np.minimum(sizes[rows], d - sizes[rows]).astype(np.float64)
        parallel.halves(fit, rows.size, float(np.sum(N * N * m)))
        return W

    def refit_cost(self, mask: NDArray[np.bool_]) -> tuple[float, float]:
        """Multiply-adds of :meth:`refit` on ``mask (M, d)`` and of one batched CG iteration (``4·M·N·d``)."""
        M, d = mask.shape
        N = self.A.shape[0]
        kept = mask.sum(axis=1).astype(np.float64)
        m = np.minimum(kept, d - kept)
        return float(np.sum(N * N * m + N * (kept + N * N / 3.0))), 4.0 * M * N * d


def _lower_factor(K: F64, what: str) -> F64:
    """The lower Cholesky factor of ``K`` ``(N, N)``, Fortran-ordered (as
    :func:`.batched_spd.cho_solve_rows` takes it); ``what`` names ``K`` in the error."""
    L, info = sla.lapack.dpotrf(K, lower=1, clean=1)
    if info != 0:  # λI + AAᵀ is positive definite for λ > 0: only non-finite rows get here
        raise SolverError(f"the row-space system {what} is not positive definite; raise the damping")
    return np.asfortranarray(L)


def cheaper(rows: int, d: int, outputs: int, keep_fraction: float, block: int = BLOCK) -> bool:
    """Whether :func:`prune_layer_rows` costs fewer multiply-adds than the Gram route for a layer of
    ``outputs`` rows of ``d`` weights, ``rows`` input rows and about ``keep_fraction`` of its weights
    kept (each row's re-fit system has ``m = d·min(f, 1 − f)`` unknowns), without giving a worse re-fit.
    A float32 product counts half, a symmetric one (``syrk``) half again.

    Gram route: the Gram (``N·d²/2``, float32), the factor and its inverse (``2/3·d³``), the sweep
    (``M·d²``) and the re-fit.  Row space: ``K`` (``N²·d/2``) and ``diag(H_λ⁻¹)`` (``N²·d``), a
    factorisation of ``K_j`` per block (``(d/b)·N³/3``), the sweep (``M·N·d²/(2b)`` or, with more
    outputs than ``b``, the block rows ``N·d²/2``) and the re-fit.  Each route's re-fit is costed as
    it will run (:func:`_refit_plan`): exact when its estimate is at most
    :data:`~.layerwise.EXACT_FLOPS` (Gram: ``M·m³/3`` in float32, plus ``H_λ⁻¹``, ``d³/3``, when rows
    are re-fitted on their pruned set; rows: ``M·(N²·m/2 + N³/3)``), otherwise the batched CG's
    :data:`~.layerwise.CG_FLOPS` in float32 (Gram: ``2·M·d²`` per iteration, rows: ``4·M·N·d``, so the
    rows run more iterations when ``N < d/2``).  The rows are chosen only when they are cheaper and
    their re-fit is at least as good: exact, or CG with at least as many iterations as the Gram's.
    """
    N, M, b = float(rows), float(outputs), float(block)
    f = min(max(keep_fraction, 0.0), 1.0)
    dd = float(d)
    m = dd * min(f, 1.0 - f)
    kept = dd * f
    gram_exact = M * (m**3 / 3.0 + m * dd)  # :func:`.layerwise.refit_cost` with the pruned-set systems
    gram_refit, gram_iters = _refit_plan(
        gram_exact, M * m**3 / 6.0 + (dd**3 / 3.0 if f > 0.4 else 0.0), 2.0 * M * dd * dd
    )
    gram = N * dd * dd / 4.0 + (2.0 / 3.0) * dd**3 + M * dd * dd + gram_refit
    rows_exact = M * (N * N * m + N * (kept + N * N / 3.0))  # :meth:`RowGram.refit_cost`
    row_refit, row_iters = _refit_plan(rows_exact, M * (N * N * m / 2.0 + N**3 / 3.0), 4.0 * M * N * dd)
    sweep = M * N * dd * dd / (2.0 * b) if b >= M else N * dd * dd / 2.0
    row = 1.5 * N * N * dd + (dd / b) * N**3 / 3.0 + sweep + row_refit
    return row < gram and row_iters >= gram_iters


def _refit_plan(exact_flops: float, exact_cost: float, cg_step: float) -> tuple[float, float]:
    """``(cost, iterations)`` of a re-fit as :func:`~.layerwise.ridge_refit` runs it: exact (``exact_cost``,
    infinitely many iterations) when ``exact_flops`` is at most :data:`~.layerwise.EXACT_FLOPS`, else
    :func:`~.layerwise.cg_iterations` float32 CG iterations of ``cg_step`` multiply-adds (costed at the
    budget itself, :data:`~.layerwise.CG_FLOPS` within the iteration limits, so that the rule does not
    flip back and forth with the rounding of the iteration count)."""
    if exact_flops <= EXACT_FLOPS:
        return exact_cost, math.inf
    budget = min(CG_MAX_ITERATIONS, max(CG_MIN_ITERATIONS, CG_FLOPS / max(cg_step, 1.0)))
    return budget * cg_step / 2.0, float(cg_iterations(cg_step))


def row_error(W: F64, A: F64, Y: F64 | None, W_bar: F64) -> float:
    """``Σ_i ‖A w_i − y_i‖²`` (``y_i = A w̄_i`` without ``Y``): the summed squared output error."""
    R = parallel.matmul(W, A.T) - (Y.T if Y is not None else parallel.matmul(W_bar, A.T))
    return float(np.einsum("ij,ij->", R, R))


def prune_layer_rows(
    W_bar: NDArray[np.floating],
    A: NDArray[np.floating],
    Y: NDArray[np.floating] | None = None,
    *,
    keep: int | None = None,
    mask: NDArray[np.bool_] | None = None,
    select: Select = "sparsegpt",
    refit: bool = True,
    damp: float = DAMP,
    block: int = BLOCK,
    name: str = "layer",
    row_weight: NDArray[np.floating] | None = None,
    diagnostics: bool = True,
) -> LayerSolution:
    """:func:`~chita_onnx.solver.layerwise.prune_layer` for one group given its input rows.

    ``W_bar (M, d)`` the dense weight (rows = outputs), ``A (N, d)`` the pruned model's input rows,
    ``Y (N, M)`` the dense layer's outputs on the dense inputs (None: the targets are ``A W̄ᵀ``).
    The layer's Gram is ``H = AᵀA``, its cross term ``B = AᵀY`` and ``yy = colsum(Y²)``; the result
    (``(1, M, d)`` weights and mask, the same errors) is what ``prune_layer`` gives on them up to
    rounding.  ``keep``/``mask``/``select``/``refit``/``damp``/``block``/``row_weight (M,)``/``diagnostics``
    as there.
    """
    Wb: F64 = np.ascontiguousarray(W_bar, dtype=np.float64)
    if Wb.ndim != 2:
        raise SolverError(f"{name}: the weight must be (M, d), got shape {Wb.shape}")
    M, d = Wb.shape
    if A.ndim != 2 or A.shape[1] != d:
        raise SolverError(f"{name}: the input rows have shape {A.shape}, expected (N, {d})")
    N = A.shape[0]
    Yf: F64 | None = None if Y is None else np.asarray(Y, np.float64)
    if Yf is not None and Yf.shape != (N, M):
        raise SolverError(f"{name}: the targets have shape {Yf.shape}, expected {(N, M)}")
    rho = check_budget(name, (M, d), keep, mask, row_weight)
    rg = RowGram.of(A, damp, name=name)
    if Yf is None:
        rhs = rg.times(Wb)
        W_star = Wb.copy()
    else:
        rhs = Yf.T @ rg.A + rg.lam * Wb
        W_star = rg.solve(rhs)
    blocks = functools.partial(rg.factor_block, outputs=M)
    if keep is not None and select == "magnitude":
        flat = (rho[:, None] * np.abs(W_star)).reshape(-1)
        mask = np.zeros(flat.size, dtype=bool)
        if keep:
            mask[np.argpartition(-flat, keep - 1)[:keep]] = True
        mask = mask.reshape(M, d)
    if mask is None:
        assert keep is not None
        Wk, mk = sparsegpt_sweep(
            W_star, None, keep=keep, block=block, row_weight=rho, u_rows=blocks, hinv_diag=rg.inverse_diag()
        )
    else:
        Wk, mk = sparsegpt_sweep(W_star, None, mask=mask, block=block, u_rows=blocks)
    how = "none"
    if refit:
        exact_cost, cg_step = rg.refit_cost(mk)
        if exact_cost > EXACT_FLOPS:
            iters = cg_iterations(cg_step)
            diag = np.einsum("nj,nj->j", rg.A, rg.A) + rg.lam
            if d >= SINGLE_MIN:  # float32 products, as the Gram route's CG; its rows split between the threads
                Wk = _cg_refit(
                    None, rhs, mk, Wk, iters=iters, times=rg.times32, diag=diag,
                    times_rows=functools.partial(rg.times32, split=False), times_cost=2.0 * M * N * d,
                )  # fmt: skip
            else:
                Wk = _cg_refit(None, rhs, mk, Wk, iters=iters, times=rg.times, diag=diag)
            how = f"cg{iters}"
        else:
            Wk, how = rg.refit(rhs, mk), "rowspace"
    Wk[~mk] = 0.0
    return LayerSolution(
        Wk[None],
        mk[None],
        row_error(Wk, rg.A, Yf, Wb),
        row_error(Wb * mk, rg.A, Yf, Wb) if diagnostics else math.nan,
        row_error(Wb, rg.A, Yf, Wb) if diagnostics else math.nan,
        rg.damp,
        {"refit": how, "select": select if keep is not None else "mask", "rows": N},
    )


__all__ = ["RowGram", "cheaper", "prune_layer_rows", "row_error"]
