"""The factorisations of a wide Gram in blocks, with the second core: Cholesky, triangular inverse and
``L⁻ᵀL⁻¹``.

Pure NumPy/SciPy; never imports onnx.  LAPACK's ``dpotrf``, ``dtrtri`` and ``dlauum`` run on one thread
in the layer-wise pass (BLAS is held to one thread per call there), and on a layer with a few
thousand inputs they are its longest serial stretch: about 1.3 s, 0.7 s and 0.7 s at ``d = 4096`` on
the benchmark machine, while the other core waits.  Here each is a blocked algorithm whose pieces are
fixed by the shape alone (blocks of :data:`NB` rows or columns): every step's independent pieces go to
:func:`.parallel.tasks`, which runs them on both cores when the second one is free and in turn on this
thread otherwise.  Each piece is the same single-threaded BLAS or LAPACK call either way, so the
values never depend on the other core; they differ from LAPACK's own blocking by rounding only.

Per step ``k`` of the right-looking Cholesky of ``A`` (``d × d``, lower):

* ``L_kk = chol(A_kk)`` (LAPACK, ``NB × NB``),
* the panel below it, ``L_ik = A_ik L_kk⁻ᵀ``, a triangular solve per block of :data:`NB` rows,
* the trailing lower part, ``A_ij −= L_ik L_jkᵀ``, a product per block of :data:`NB` columns ``j``
  (rows ``i ≥ j``).

The inverse of a lower triangular ``L`` is computed a block of columns at a time,
``L⁻¹[J₀:, J] = L[J₀:, J₀:]⁻¹ I[J₀:, J]``, and ``C = L⁻ᵀL⁻¹`` likewise, ``C[J₀:, J] = L⁻¹[J₀:, J₀:]ᵀ
L⁻¹[J₀:, J]`` (``L⁻¹`` is zero above row ``J₀`` in those columns).  All three cost what LAPACK's do:
``d³/3`` multiply-adds each.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Any

import numpy as np
import scipy.linalg as sla
from numpy.typing import NDArray

from . import parallel
from .batched_spd import _INT, _entry

F64 = NDArray[np.float64]

#: Wide Grams from this many inputs on are factored, inverted and multiplied here rather than by one
#: LAPACK call (below it, one call is short and the hand-offs would not pay).
MIN_D = 2048
#: Block size (rows or columns) of every piece (``nb=None`` in the functions below).
NB = 256

_DBL = ctypes.POINTER(ctypes.c_double)


@functools.cache
def _kernels() -> dict[str, Any] | None:
    """BLAS ``dtrsm``, ``dtrmm``, ``dgemm`` and LAPACK ``dpotrf`` through ctypes on SciPy's Cython entry
    points (the library SciPy's wrappers call): a ctypes call releases the GIL, so two pieces run at
    once, and it works in place on a block of a larger Fortran-ordered array (its leading dimension),
    so nothing is copied.  None when the entry points cannot be had (then SciPy's wrappers, in turn)."""
    try:
        import scipy.linalg.cython_blas as cblas
        import scipy.linalg.cython_lapack as clapack

        c, p = ctypes.c_char_p, ctypes.c_void_p
        tr = (c, c, c, c, _INT, _INT, _DBL, p, _INT, p, _INT)  # side uplo trans diag m n alpha a lda b ldb
        return {
            "trsm": _entry(cblas, "dtrsm", *tr),
            "trmm": _entry(cblas, "dtrmm", *tr),
            # transa transb m n k alpha a lda b ldb beta c ldc
            "gemm": _entry(cblas, "dgemm", c, c, _INT, _INT, _INT, _DBL, p, _INT, p, _INT, _DBL, p, _INT),
            "potrf": _entry(clapack, "dpotrf", c, _INT, p, _INT, _INT),  # uplo n a lda info
        }
    except Exception:  # any SciPy/ctypes mismatch
        return None


def _at(A: F64, i: int, j: int) -> int:
    """The address of ``A[i, j]`` in a Fortran-ordered float64 ``A``."""
    return int(A.ctypes.data) + 8 * (i + j * int(A.shape[0]))


def _i(v: int) -> Any:
    return ctypes.byref(ctypes.c_int(v))


def _d(v: float) -> Any:
    return ctypes.byref(ctypes.c_double(v))


def _blocks(a: int, b: int, nb: int) -> list[tuple[int, int]]:
    """``[a, b)`` cut into consecutive ranges of ``nb`` (the last may be shorter)."""
    return [(s, min(b, s + nb)) for s in range(a, b, nb)]


def cholesky(A: F64, nb: int | None = None) -> tuple[F64, int]:
    """The lower Cholesky factor of a symmetric ``A (d, d)`` (only its lower triangle is read), and
    LAPACK's ``info``: 0, or ``k > 0`` when the leading minor of order ``k`` is not positive definite
    (the factor is then incomplete).

    ``A`` is factored in place when it is a Fortran-ordered float64 array (as ``dpotrf(...,
    overwrite_a=1)`` does), else a Fortran-ordered copy is.  The factor's strictly upper triangle is
    zero (``dpotrf(clean=1)``)."""
    nb = nb or NB
    L = A if (A.dtype == np.float64 and A.flags.f_contiguous) else np.array(A, dtype=np.float64, order="F")
    d = L.shape[0]
    k = _kernels()
    for k0, k1 in _blocks(0, d, nb):
        w = k1 - k0
        if k is None:
            Lkk, info = sla.lapack.dpotrf(L[k0:k1, k0:k1], lower=1, clean=1)
            if info == 0:
                L[k0:k1, k0:k1] = Lkk
        else:
            got = ctypes.c_int(0)
            k["potrf"](b"L", _i(w), _at(L, k0, k0), _i(d), ctypes.byref(got))
            info = got.value
        if info != 0:
            return L, (k0 + info if info > 0 else info)
        if k1 == d:
            break

        def panel(r0: int, r1: int, k0: int = k0, k1: int = k1, w: int = w) -> None:
            if k is None:
                L[r0:r1, k0:k1] = sla.blas.dtrsm(1.0, L[k0:k1, k0:k1], L[r0:r1, k0:k1], side=1, lower=1, trans_a=1)
                return
            k["trsm"](b"R", b"L", b"T", b"N", _i(r1 - r0), _i(w), _d(1.0), _at(L, k0, k0), _i(d),
                      _at(L, r0, k0), _i(d))  # fmt: skip

        rows = _blocks(k1, d, nb)
        parallel.tasks([functools.partial(panel, *r) for r in rows], [float(r1 - r0) * w * w for r0, r1 in rows])

        def update(c0: int, c1: int, k0: int = k0, k1: int = k1, w: int = w) -> None:
            if k is None:
                L[c0:, c0:c1] -= L[c0:, k0:k1] @ L[c0:c1, k0:k1].T
                return
            k["gemm"](b"N", b"T", _i(d - c0), _i(c1 - c0), _i(w), _d(-1.0), _at(L, c0, k0), _i(d),
                      _at(L, c0, k0), _i(d), _d(1.0), _at(L, c0, c0), _i(d))  # fmt: skip

        cols = _blocks(k1, d, nb)
        parallel.tasks(
            [functools.partial(update, *c) for c in cols], [float(d - c0) * (c1 - c0) * w for c0, c1 in cols]
        )
    _clean_upper(L, nb)
    return L, 0


def _clean_upper(L: F64, nb: int) -> None:
    """Zero the strictly upper triangle of ``L`` (the trailing updates wrote into the diagonal blocks')."""
    for j0, j1 in _blocks(0, L.shape[0], nb):
        L[:j0, j0:j1] = 0.0
        D = L[j0:j1, j0:j1]
        D[...] = np.tril(D)


def _by_column_blocks(T: F64, nb: int | None, solve: bool) -> F64:
    """``X (d, d)``, Fortran-ordered, a block ``J = [J₀, J₁)`` of :data:`NB` columns at a time (one job
    each): with ``solve``, ``X[J₀:, J] = T[J₀:, J₀:]⁻¹ I[J₀:, J]`` (``dtrsm``), else ``X[J₀:, J] =
    T[J₀:, J₀:]ᵀ T[J₀:, J]`` (``dtrmm``), for a lower triangular ``T`` (only its lower triangle is
    read).  The rows above ``J₀`` stay zero."""
    nb = nb or NB
    d = T.shape[0]
    Tf = np.asfortranarray(T, dtype=np.float64)
    X = np.zeros((d, d), order="F")
    k = _kernels()

    def columns(j0: int, j1: int) -> None:
        if solve:
            X[np.arange(j0, j1), np.arange(j0, j1)] = 1.0
        else:
            X[j0:, j0:j1] = Tf[j0:, j0:j1]
        if k is not None:
            k["trsm" if solve else "trmm"](b"L", b"L", b"N" if solve else b"T", b"N", _i(d - j0), _i(j1 - j0),
                                           _d(1.0), _at(Tf, j0, j0), _i(d), _at(X, j0, j0), _i(d))  # fmt: skip
        elif solve:
            X[j0:, j0:j1] = sla.blas.dtrsm(1.0, Tf[j0:, j0:], X[j0:, j0:j1], side=0, lower=1)
        else:
            X[j0:, j0:j1] = np.tril(Tf[j0:, j0:]).T @ Tf[j0:, j0:j1]

    cols = _blocks(0, d, nb)
    parallel.tasks([functools.partial(columns, *c) for c in cols], [float(d - j0) ** 2 * (j1 - j0) for j0, j1 in cols])
    return X


def tri_inverse(L: F64, nb: int | None = None) -> F64:
    """``L⁻¹`` (``d × d``, lower triangular, Fortran-ordered) of a lower triangular ``L`` with a nonzero
    diagonal (only the lower triangle is read)."""
    return _by_column_blocks(L, nb, solve=True)


def lower_gram(Linv: F64, nb: int | None = None) -> F64:
    """The lower triangle of ``C = Linvᵀ Linv`` (``d × d``, Fortran-ordered; the strictly upper
    triangle is zero) for a lower triangular ``Linv``: what LAPACK's ``dlauum(Linv, lower=1)``
    returns."""
    C = _by_column_blocks(Linv, nb, solve=False)
    _clean_upper(C, nb or NB)
    return C


__all__ = ["MIN_D", "NB", "cholesky", "lower_gram", "tri_inverse"]
