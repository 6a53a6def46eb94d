"""The exact ridge re-fit of the kept weights on a fixed support ("backsolve", CHITA-BSO).

For a support ``S`` (``s = |S|`` indices) the minimiser of

    f(w) = ½‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)      with  w_j = 0 for j ∉ S

is ``w_S = w̄_S + u`` where, with ``A = X[:, S]`` (``n × s``) and ``c = X_{S^c} w̄_{S^c}`` (``n``),

    (AᵀA + λI_s) u = Aᵀc − α_S.

* ``s ≤ n``: the ``s × s`` system is formed in float64 and solved by Cholesky.
* ``s > n``: Woodbury / push-through in the ``n × n`` space, never an ``s × s`` matrix:
  ``u = Aᵀ(G + λI_n)⁻¹c − (α_S − Aᵀ(G + λI_n)⁻¹Aα_S)/λ`` with ``G = AAᵀ``.  The ``c`` part has no
  division by λ, so it stays accurate as λ → 0.  ``G`` is accumulated in float64 from float64 copies of
  column chunks of ``A``: a float32 ``G`` (or a float32 solve) breaks down when ``s > n`` and λ is
  small (see ``docs``: objective 70.3 in float32 against 0.011 in float64).
* λ = 0: Cholesky when the matrix is safely positive definite, otherwise (with a logged warning) the
  minimum-norm least-squares solution through a symmetric eigendecomposition (pseudo-inverse).  For
  λ > 0 a numerically indefinite matrix gets escalating extra damping, also with a warning.

Memory: ``O(n² + n·chunk)`` beyond ``X`` — columns of ``A`` are gathered in chunks of at most
``_CHUNK_BYTES`` of float64, so neither ``A`` nor ``XᵀX`` is ever held whole.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import numpy as np
import scipy.linalg as sla
from numpy.typing import NDArray

from ..errors import SolverError
from ._core import FloatArray, IntArray

__all__ = ["ridge_backsolve"]

log = logging.getLogger(__name__)

F64 = NDArray[np.float64]

#: Size of one float64 temporary column chunk (32 MiB).
_CHUNK_BYTES = 1 << 25
#: Condition number above which a λ = 0 Cholesky solve is replaced by the pseudo-inverse.
_MAX_COND = 1e12


def _chunks(total: int, rows: int, itemsize: int = 8) -> Iterator[tuple[int, int]]:
    """Consecutive ``(start, stop)`` ranges of ``total`` columns of ``rows`` entries each, ≤ 32 MiB."""
    step = max(1, _CHUNK_BYTES // max(1, rows * itemsize))
    for a in range(0, total, step):
        yield a, min(total, a + step)


def matvec(X: FloatArray, v: FloatArray) -> F64:
    """``X @ v`` computed in ``X``'s precision (no float64 copy of a float32 X), returned as float64."""
    return np.asarray(X @ np.asarray(v, dtype=X.dtype), dtype=np.float64)


def rmatvec(X: FloatArray, r: FloatArray) -> F64:
    """``Xᵀ r`` computed in ``X``'s precision, returned as float64 ``(p,)``."""
    return np.asarray(X.T @ np.asarray(r, dtype=X.dtype), dtype=np.float64)


def _cho_solver(factor: tuple[F64, bool]) -> Callable[[F64], F64]:
    """``rhs ↦ M⁻¹ rhs`` from a ``scipy.linalg.cho_factor`` result."""

    def solve(rhs: F64) -> F64:
        return np.asarray(sla.cho_solve(factor, rhs, check_finite=False), dtype=np.float64)

    return solve


def _cholesky_inverse(M: F64, ridge: float, what: str) -> tuple[Callable[[F64], F64], float]:
    """Return ``rhs ↦ (M + λ_eff I)⁻¹ rhs`` and ``λ_eff`` for symmetric PSD ``M`` (float64, m × m).

    ``λ_eff = λ`` unless ``M + λI`` is numerically indefinite (λ below the rounding of ``M``); the
    damping is then raised tenfold from ``1e-12·mean(diag M)`` until Cholesky succeeds (logged).
    With λ = 0 a badly conditioned (or singular) ``M`` gets the pseudo-inverse instead (logged).
    """
    m = M.shape[0]
    scale = float(np.trace(M)) / max(m, 1)
    if scale <= 0.0 or not np.isfinite(scale):
        scale = 1.0
    if ridge == 0.0:
        try:
            factor = sla.cho_factor(M, lower=True, check_finite=False)
            d = np.abs(np.diag(factor[0]))
            if d.min() > 0 and (d.max() / d.min()) ** 2 < _MAX_COND:
                return _cho_solver(factor), 0.0
        except np.linalg.LinAlgError:
            pass
        evals, V = np.linalg.eigh(M)
        cut = max(float(evals[-1]), 0.0) * max(m, 1) * np.finfo(np.float64).eps
        inv = np.where(evals > cut, 1.0 / np.where(evals > cut, evals, 1.0), 0.0)
        rank = int(np.count_nonzero(evals > cut))
        log.warning(
            "%s: ridge = 0 and the %d×%d system is singular or ill-conditioned (rank %d); "
            "using the minimum-norm (pseudo-inverse) solution",
            what,
            m,
            m,
            rank,
        )
        return (lambda rhs: V @ (inv.reshape((-1,) + (1,) * (rhs.ndim - 1)) * (V.T @ rhs))), 0.0
    lam = ridge
    for attempt in range(12):
        A = M.copy()
        A[np.diag_indices_from(A)] += lam
        try:
            factor = sla.cho_factor(A, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            lam = max(lam * 10.0, 1e-12 * scale * 10.0**attempt)
            continue
        if lam != ridge:
            log.warning(
                "%s: the %d×%d system was not positive definite with ridge %g; used damping %g", what, m, m, ridge, lam
            )
        return _cho_solver(factor), lam
    raise SolverError(f"{what}: the {m}×{m} system stays indefinite even with damping {lam:g} (NaN in X?)")


def _pinv_squared_apply(G: F64, rhs: F64) -> F64:
    """``G⁺² rhs`` for symmetric PSD ``G`` (used only with λ = 0 and α ≠ 0)."""
    evals, V = np.linalg.eigh(G)
    cut = max(float(evals[-1]), 0.0) * G.shape[0] * np.finfo(np.float64).eps
    inv = np.where(evals > cut, 1.0 / np.where(evals > cut, evals, 1.0), 0.0)
    return np.asarray(V @ (inv**2 * (V.T @ rhs)), dtype=np.float64)


def solve_on_support(X: FloatArray, S: IntArray, c: F64, ridge: float, alpha_s: F64 | None) -> F64:
    """``u = argmin ½‖X_S u − c‖² + (λ/2)‖u‖² + α_Sᵀu`` (float64, shape ``(|S|,)``).

    ``X``: (n, p) float32/float64 (not copied), ``S``: sorted int64 column indices, ``c``: (n,).
    """
    n = X.shape[0]
    s = int(S.shape[0])
    if s == 0:
        return np.zeros(0, dtype=np.float64)
    if s <= n:
        A = np.asarray(X[:, S], dtype=np.float64)
        H = A.T @ A
        b = A.T @ c
        if alpha_s is not None:
            b = b - alpha_s
        inv, _ = _cholesky_inverse(H, ridge, "backsolve")
        return np.asarray(inv(b), dtype=np.float64)
    # Woodbury in the n × n space: G = A Aᵀ accumulated in float64 over column chunks.
    G = np.zeros((n, n), dtype=np.float64)
    a_img = np.zeros(n, dtype=np.float64) if alpha_s is not None else None
    for a, b_ in _chunks(s, n):
        Ac = np.asarray(X[:, S[a:b_]], dtype=np.float64)
        G += Ac @ Ac.T
        if a_img is not None and alpha_s is not None:
            a_img += Ac @ alpha_s[a:b_]
    inv, lam = _cholesky_inverse(G, ridge, "backsolve (Woodbury)")
    rhs = c[:, None] if a_img is None else np.column_stack([c, a_img])
    Z = inv(rhs)
    if a_img is not None and lam == 0.0:
        log.warning(
            "backsolve: ridge = 0 with a first-order term: the part of α outside the row space "
            "of X_S is ignored (the problem is unbounded along it)"
        )
        Z = np.column_stack([Z[:, 0], _pinv_squared_apply(G, a_img)])
    u = np.empty(s, dtype=np.float64)
    for a, b_ in _chunks(s, n):
        Ac = np.asarray(X[:, S[a:b_]], dtype=np.float64)
        t = Ac.T @ Z
        u[a:b_] = t[:, 0]
        if alpha_s is not None:
            if lam > 0.0:
                u[a:b_] -= (alpha_s[a:b_] - t[:, 1]) / lam
            else:
                u[a:b_] -= t[:, 1]
    return u


def ridge_backsolve(
    X: FloatArray,
    w_bar: FloatArray,
    support: IntArray,
    ridge: float,
    alpha: FloatArray | None = None,
) -> NDArray[np.float32]:
    """The exact minimiser of ``f`` over weights supported on ``support`` (zeros elsewhere).

    ``f(w) = ½‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)``.

    Args:
        X: ``(n, p)`` float32 or float64 scaled gradients (never copied whole, never ``XᵀX``).
        w_bar: ``(p,)`` trained weights ``w̄``.
        support: ``(s,)`` integer indices of the weights kept (any order, no duplicates).
        ridge: ``λ ≥ 0``.
        alpha: ``(p,)`` first-order term or ``None`` (zero).

    Returns:
        ``(p,)`` float32: ``w̄_S + u`` on the support, 0 elsewhere.  Costs ``O(n·s² + s³)`` when
        ``s ≤ n`` and ``O(n²·s + n³)`` otherwise.
    """
    if X.ndim != 2:
        raise SolverError(f"X must be 2-D (n, p), got shape {X.shape}")
    n, p = X.shape
    wb = np.asarray(w_bar, dtype=np.float64)
    if wb.shape != (p,):
        raise SolverError(f"w̄ must have shape ({p},) to match X {X.shape}, got {wb.shape}")
    if not np.isfinite(ridge) or ridge < 0:
        raise SolverError(f"ridge must be a finite number ≥ 0, got {ridge}")
    S = np.asarray(support)
    if S.ndim != 1 or (S.size and not np.issubdtype(S.dtype, np.integer)):
        raise SolverError(f"support must be a 1-D integer array, got dtype {S.dtype} shape {S.shape}")
    S = np.sort(S.astype(np.int64))
    if S.size and (S[0] < 0 or S[-1] >= p):
        raise SolverError(f"support indices must lie in [0, {p}), got range [{S[0]}, {S[-1]}]")
    if S.size > 1 and np.any(S[1:] == S[:-1]):
        raise SolverError("support contains duplicate indices")
    a64 = None if alpha is None else np.asarray(alpha, dtype=np.float64)
    if a64 is not None and a64.shape != (p,):
        raise SolverError(f"alpha must have shape ({p},), got {a64.shape}")
    w = np.zeros(p, dtype=np.float32)
    if S.size == 0:
        return w
    outside = wb.copy()
    outside[S] = 0.0
    c = matvec(X, outside) if np.any(outside) else np.zeros(n, dtype=np.float64)
    alpha_s = None if a64 is None or not np.any(a64[S]) else a64[S]
    u = solve_on_support(X, S, c, float(ridge), alpha_s)
    w[S] = (wb[S] + u).astype(np.float32)
    return w
