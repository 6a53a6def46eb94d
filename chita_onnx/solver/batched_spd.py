"""Many symmetric positive definite systems on principal submatrices of one matrix, solved together.

The exact ridge re-fit (:func:`chita_onnx.solver.layerwise.ridge_refit`) solves, for every output row
``i`` of a layer, ``A_II x = b_I`` on that row's own index set ``I`` (its kept or its pruned weights)
with one shared ``A (d, d)``.  Solved one :func:`scipy.linalg.cho_factor`/``cho_solve`` at a time, a
row spends much of its time outside the arithmetic: Python wrappers, a transposing copy of the
C-ordered system for LAPACK, a fresh ``(|I|, d)`` gather buffer and a bounds-checked ``take``.

Here the rows are grouped by ``|I|``; a group's index rows and right-hand sides are built in one
vectorised pass; each system is gathered (``take`` into reused buffers, no bounds-check buffering)
and, while still in cache, factored and solved in place by one direct LAPACK ``posv`` call (lower
factor: ~1.5× faster than ``cho_factor``'s upper one) on its transposed view, which is
Fortran-ordered, so nothing is copied; the float32 residual check is one ``symv`` on the triangle
``posv`` leaves intact.  The factorisation stays one LAPACK call per system on purpose: measured on
this project's machine (single thread), NumPy's stacked ``np.linalg.cholesky`` ran 2.7–5.8× slower
than a ``potrf`` loop for ``m`` = 128–512, and a GEMM-based blocked Cholesky written with stacked
``matmul`` at best matched it (BENCHMARKS.md, "Batched exact re-fit (stop 19)").

Precision follows :func:`chita_onnx.solver.layerwise.spd_solve`: systems of at least ``single_min``
unknowns are solved in float32 and accepted when ``‖b − A_II x‖ ≤ tol·‖b‖`` (float32 residual) and
finite; the others, and those that fail, in float64; a row whose float64 factorisation fails goes
through the caller's ``fallback`` (which raises as the per-row path does).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import scipy.linalg as sla
from numpy.typing import NDArray

F64 = NDArray[np.float64]
#: Rows of one size handled per chunk (bounds the index and right-hand-side arrays).
CHUNK_ROWS = 4096


def _gather_solve(
    A: NDArray[np.floating], idx: NDArray[np.intp], b: NDArray[np.floating], residual: bool
) -> tuple[NDArray[np.floating], NDArray[np.bool_], NDArray[np.floating] | None]:
    """Solve ``A[I_k, I_k] x_k = b_k`` for the index rows ``I_k = idx[k]`` (``idx (r, m)``, ``b (r, m)``).

    Each system is gathered into one reused ``(m, m)`` buffer and factored there in place by LAPACK
    ``posv`` while it is still in cache.  Returns ``(x (r, m), ok (r,), res)``: ``ok`` is False where
    LAPACK found a non-positive pivot; with ``residual``, ``res (r, m)`` is ``b − A_II x``, from the
    triangle ``posv`` leaves alone (``Gf``'s upper) with the diagonal restored (else None).
    """
    r, m = idx.shape
    single = A.dtype == np.float32
    posv = sla.lapack.sposv if single else sla.lapack.dposv
    symv = sla.blas.ssymv if single else sla.blas.dsymv
    G = np.empty((m, m), dtype=A.dtype)
    Gf = G.T  # Fortran-ordered view of the same (symmetric) system: LAPACK works on it in place
    diag = G.reshape(m * m)[:: m + 1]
    buf = np.empty((m, A.shape[1]), dtype=A.dtype)
    x = np.empty_like(b)
    ok = np.ones(r, dtype=bool)
    res = b.copy() if residual else None
    for k in range(r):
        np.take(A, idx[k], axis=0, out=buf, mode="clip")  # "clip": no bounds-check buffering of out
        np.take(buf, idx[k], axis=1, out=G, mode="clip")
        d0 = diag.copy() if residual else None
        _, x[k], info = posv(Gf, b[k], lower=1, overwrite_a=1, overwrite_b=0)  # factor in Gf's lower
        ok[k] = info == 0
        if res is not None:  # Gf's upper triangle is still A_II's; so is the diagonal once restored
            diag[:] = d0
            res[k] = symv(-1.0, Gf, x[k], beta=1.0, y=res[k], lower=0, overwrite_y=1)
    return x, ok, res


def solve_subsystems(
    A: F64,
    sel: NDArray[np.bool_],
    R: F64,
    *,
    single_min: int,
    tol: float,
    fallback: Callable[[NDArray[np.int64], F64], F64],
) -> F64:
    """``X (n, d)`` with ``X[i, I_i] = A_{I_i I_i}⁻¹ R[i, I_i]`` and zeros off ``I_i = {j: sel[i, j]}``.

    ``A (d, d)`` symmetric positive definite; ``sel (n, d)`` bool; ``R (n, d)``.  ``fallback(I, b)``
    solves one system in float64 (called only for rows whose float64 factorisation fails).
    """
    n, d = sel.shape
    if not A.flags.c_contiguous and A.T.flags.c_contiguous:
        A = A.T  # symmetric: the same matrix, with rows contiguous for the gathers below
    A = np.ascontiguousarray(A)
    X = np.zeros((n, d))
    sizes = sel.sum(axis=1)
    A32: NDArray[np.float32] | None = None

    def run(rows: NDArray[np.int64], single: bool) -> NDArray[np.int64]:
        """Solve ``rows`` (float32 with the residual check, or float64); returns the rows that failed."""
        nonlocal A32
        if single and A32 is None:
            A32 = A.astype(np.float32, order="C")
        M = A32 if single and A32 is not None else A
        failed: list[NDArray[np.int64]] = []
        for m in np.unique(sizes[rows]):
            group = rows[sizes[rows] == m]
            for c0 in range(0, group.size, CHUNK_ROWS):
                part = group[c0 : c0 + CHUNK_ROWS]
                idx = np.nonzero(sel[part])[1].reshape(part.size, int(m))
                b: NDArray[np.floating] = np.take_along_axis(R[part], idx, axis=1).astype(M.dtype)
                x, ok, res = _gather_solve(M, idx, b, residual=single)
                ok &= np.all(np.isfinite(x), axis=1)
                if res is not None:
                    ok &= np.linalg.norm(res, axis=1) <= tol * np.linalg.norm(b, axis=1)
                X[part[ok, None], idx[ok]] = x[ok]
                failed.append(part[~ok])
        return np.concatenate(failed) if failed else rows[:0]

    todo = np.flatnonzero(sizes > 0)
    big = todo[sizes[todo] >= single_min]
    retry = run(big, True) if big.size else big
    rows64 = np.concatenate((todo[sizes[todo] < single_min], retry))
    for i in run(rows64, False) if rows64.size else rows64:
        idx_i = np.flatnonzero(sel[i])
        X[i, idx_i] = fallback(idx_i, R[i, idx_i])
    return X
