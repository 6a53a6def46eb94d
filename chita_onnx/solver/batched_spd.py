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

import ctypes
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import scipy.linalg as sla
from numpy.typing import NDArray

from . import parallel

F64 = NDArray[np.float64]
#: Rows of one size handled per chunk (bounds the index and right-hand-side arrays).
CHUNK_ROWS = 4096

_INT = ctypes.POINTER(ctypes.c_int)


def _entry(lib: Any, name: str, *argtypes: Any) -> Any:
    """The C function ``name`` of SciPy's Cython BLAS/LAPACK module ``lib`` as a ctypes function of
    ``argtypes`` (returning nothing); raises when SciPy does not export it."""
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    cname = ctypes.pythonapi.PyCapsule_GetName
    cname.restype, cname.argtypes = ctypes.c_char_p, [ctypes.py_object]
    cap = lib.__pyx_capi__[name]
    return ctypes.CFUNCTYPE(None, *argtypes)(get(cap, cname(cap)))


@functools.cache
def _native(single: bool) -> tuple[Any, Any, type] | None:
    """LAPACK ``posv`` and BLAS ``symv`` (float32 with ``single``, else float64) called through ctypes
    on SciPy's own Cython entry points (``scipy.linalg.cython_lapack``/``cython_blas``: the same
    library and kernels as ``scipy.linalg.lapack``), and the ctypes scalar type.  A ctypes call
    releases the GIL, where SciPy's wrappers hold it, so two threads factor at once
    (:func:`chita_onnx.solver.parallel.halves`).  None when the entry points cannot be had."""
    try:
        import scipy.linalg.cython_blas as cblas
        import scipy.linalg.cython_lapack as clapack

        p = ctypes.c_void_p
        real = ctypes.c_float if single else ctypes.c_double
        c = "s" if single else "d"
        r = ctypes.POINTER(real)
        # posv(uplo, n, nrhs, a, lda, b, ldb, info); symv(uplo, n, alpha, a, lda, x, incx, beta, y, incy)
        posv = _entry(clapack, c + "posv", ctypes.c_char_p, _INT, _INT, p, _INT, p, _INT, _INT)
        symv = _entry(cblas, c + "symv", ctypes.c_char_p, _INT, r, p, _INT, p, _INT, r, p, _INT)
    except Exception:  # any SciPy/ctypes mismatch: SciPy's wrappers, on one thread
        return None
    return posv, symv, real


@functools.cache
def _native_potrs() -> Any | None:
    """LAPACK ``dpotrs`` through ctypes on SciPy's Cython entry point, as :func:`_native` (GIL
    released); None when it cannot be had."""
    try:
        import scipy.linalg.cython_lapack as clapack

        p = ctypes.c_void_p
        # potrs(uplo, n, nrhs, a, lda, b, ldb, info)
        return _entry(clapack, "dpotrs", ctypes.c_char_p, _INT, _INT, p, _INT, p, _INT, _INT)
    except Exception:  # any SciPy/ctypes mismatch: SciPy's cho_solve, on one thread
        return None


def cho_solve_rows(L: F64, B: F64) -> None:
    """``B ← B A⁻¹`` in place for ``A = L Lᵀ`` (``L (d, d)`` lower Cholesky factor) and a C-ordered
    ``B (M, d)``: each row ``b_i ← A⁻¹ b_i``.  The rows are independent right-hand sides of one LAPACK
    ``potrs`` (a C-ordered row block is a Fortran-ordered ``(d, rows)`` block), so inside
    :func:`.parallel.helping` the two halves of the rows are solved at once, the GIL released
    (:func:`_native_potrs`); otherwise, or without the entry point, as ``scipy.linalg.cho_solve``."""
    M, d = B.shape
    fn = _native_potrs() if L.flags.f_contiguous and B.flags.c_contiguous and M and d else None
    if fn is None:
        B[...] = sla.cho_solve((L, True), B.T, check_finite=False).T
        return
    Lf = np.asarray(L, np.float64)

    def part(a: int, z: int) -> None:
        n_, k_, info = ctypes.c_int(d), ctypes.c_int(z - a), ctypes.c_int(0)
        fn(b"L", ctypes.byref(n_), ctypes.byref(k_), Lf.ctypes.data, ctypes.byref(n_), B[a:z].ctypes.data,
           ctypes.byref(n_), ctypes.byref(info))  # fmt: skip
        if info.value != 0:  # pragma: no cover - potrs only checks its arguments
            raise np.linalg.LinAlgError(f"potrs: argument {-info.value} is invalid")

    parallel.halves(part, M, float(M) * d * d)


def posv(G: NDArray[np.floating], b: NDArray[np.floating]) -> tuple[NDArray[np.floating], int]:
    """``G⁻¹ b`` for a symmetric positive definite ``G (m, m)`` by LAPACK ``posv`` on its lower
    triangle, as ``scipy.linalg.lapack.?posv(G, b, lower=1)`` computes it (on a Fortran-ordered copy
    of ``G``; ``G`` and ``b`` are left alone), with the GIL released where :func:`_native` allows.
    Returns ``(x (m,), info)``; ``info > 0``: ``G`` is not positive definite."""
    single = G.dtype == np.float32
    native = _native(bool(single)) if G.shape[0] > 0 else None
    if native is None:
        f = sla.lapack.sposv if single else sla.lapack.dposv
        _, x, info = f(G, b, lower=1, overwrite_a=0, overwrite_b=0)
        return x, int(info)
    m = G.shape[0]
    F = np.array(G, order="F", copy=True)
    x = np.array(b, dtype=G.dtype, copy=True)
    n_, one, info_ = ctypes.c_int(m), ctypes.c_int(1), ctypes.c_int(0)
    native[0](b"L", ctypes.byref(n_), ctypes.byref(one), F.ctypes.data, ctypes.byref(n_), x.ctypes.data,
              ctypes.byref(n_), ctypes.byref(info_))  # fmt: skip
    return x, int(info_.value)


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
    G = np.empty((m, m), dtype=A.dtype)
    Gf = G.T  # Fortran-ordered view of the same (symmetric) system: LAPACK works on it in place
    diag = G.reshape(m * m)[:: m + 1]
    buf = np.empty((m, A.shape[1]), dtype=A.dtype)
    x = np.empty_like(b)
    ok = np.ones(r, dtype=bool)
    res = b.copy() if residual else None
    native = _native(bool(single)) if m > 0 else None
    if native is not None:  # the same LAPACK calls through ctypes, without the GIL
        posv_c, symv_c, real = native
        x[...] = b
        n_, one, info = ctypes.c_int(m), ctypes.c_int(1), ctypes.c_int(0)
        minus, plus = real(-1.0), real(1.0)
        g, step = G.ctypes.data, m * x.itemsize
        xp, rp = x.ctypes.data, (0 if res is None else res.ctypes.data)

        def factor(k: int) -> int:
            posv_c(b"L", ctypes.byref(n_), ctypes.byref(one), g, ctypes.byref(n_), xp + k * step, ctypes.byref(n_),
                   ctypes.byref(info))  # fmt: skip
            return info.value

        def residual_of(k: int) -> None:
            symv_c(b"U", ctypes.byref(n_), ctypes.byref(minus), g, ctypes.byref(n_), xp + k * step,
                   ctypes.byref(one), ctypes.byref(plus), rp + k * step, ctypes.byref(one))  # fmt: skip

    else:
        posv = sla.lapack.sposv if single else sla.lapack.dposv
        symv = sla.blas.ssymv if single else sla.blas.dsymv

        def factor(k: int) -> int:
            _, x[k], info_ = posv(Gf, b[k], lower=1, overwrite_a=1, overwrite_b=0)  # factor in Gf's lower
            return int(info_)

        def residual_of(k: int) -> None:
            assert res is not None
            res[k] = symv(-1.0, Gf, x[k], beta=1.0, y=res[k], lower=0, overwrite_y=1)

    for k in range(r):
        np.take(A, idx[k], axis=0, out=buf, mode="clip")  # "clip": no bounds-check buffering of out
        np.take(buf, idx[k], axis=1, out=G, mode="clip")
        d0 = diag.copy() if residual else None
        ok[k] = factor(k) == 0
        if res is not None:  # Gf's upper triangle is still A_II's; so is the diagonal once restored
            diag[:] = d0
            residual_of(k)
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
        """Solve ``rows`` (float32 with the residual check, or float64); returns the rows that failed.

        The rows of one size form pieces (a chunk of :data:`CHUNK_ROWS`, halved when it has two rows
        or more); :func:`.parallel.tasks` deals the pieces out to the two threads by cost,
        ``r·(m³/3 + m·d)`` (factorisations and gathers), each piece start to end on one thread.  A
        layer's rows have hundreds of sizes, most with a row or two: split size by size, they would
        leave one thread waiting at every size.  Each system is solved alone by the same LAPACK
        call whichever thread takes it, so the values do not depend on the split."""
        nonlocal A32
        if single and A32 is None:
            A32 = A.astype(np.float32, order="C")
        M = A32 if single and A32 is not None else A
        pieces: list[NDArray[np.int64]] = []
        for m in np.unique(sizes[rows]):
            group = rows[sizes[rows] == m]
            for c0 in range(0, group.size, CHUNK_ROWS):
                part = group[c0 : c0 + CHUNK_ROWS]
                pieces.extend(np.array_split(part, 2) if part.size >= 2 else [part])

        def solve(part: NDArray[np.int64]) -> tuple[NDArray[np.intp], NDArray[np.floating], NDArray[np.bool_]]:
            m = int(sizes[part[0]])
            idx = np.nonzero(sel[part])[1].reshape(part.size, m)
            b: NDArray[np.floating] = np.take_along_axis(R[part], idx, axis=1).astype(M.dtype)
            x, ok, res = _gather_solve(M, idx, b, residual=single)
            ok &= np.all(np.isfinite(x), axis=1)
            if res is not None:
                ok &= np.linalg.norm(res, axis=1) <= tol * np.linalg.norm(b, axis=1)
            return idx, x, ok

        costs = [float(part.size) * (float(sizes[part[0]]) ** 3 / 3.0 + float(sizes[part[0]]) * d) for part in pieces]
        jobs = [functools.partial(solve, part) for part in pieces]
        # without the GIL-free LAPACK entry points the solves hold the GIL: one thread, in order
        done = parallel.tasks(jobs, costs) if _native(M.dtype == np.float32) is not None else [j() for j in jobs]
        failed: list[NDArray[np.int64]] = []
        for part, (idx, x, ok) in zip(pieces, done, strict=True):
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
