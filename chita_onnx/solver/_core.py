"""Shared pieces of all solvers: the problem, the sparsity budget, the projection and the result.

Every solver in this package works on the same quadratic model of the loss around the trained weights
``w̄`` (the *empirical-Fisher* model of CHITA):

    f(w) = ½‖X (w − w̄)‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)        subject to  ‖w‖₀ ≤ k

* ``X``  — ``(n, p)`` float32 or float64: per-sample gradients, **already scaled by 1/√n**, so that
  ``XᵀX`` is the empirical Fisher.  It is never multiplied out to a ``(p, p)`` matrix.
* ``w̄`` — ``(p,)`` the trained (current) weights.
* ``λ``  — ``ridge`` ≥ 0, the damping of the Fisher; it acts as a trust region around ``w̄``.
* ``α``  — ``(p,)`` optional first-order term (the mean gradient), ``None`` means zero.

This module imports NumPy only; the solvers never import onnx or onnxruntime.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray

from ..errors import SolverError

FloatArray = NDArray[np.floating]
IntArray = NDArray[np.int64]


@dataclass(frozen=True)
class Budget:
    """How many weights may stay nonzero, globally and per segment.

    ``segments`` are the column offsets of the contiguous parts of ``w`` (one per prunable tensor),
    ``(0, p_1, p_1 + p_2, ..., p)``.  ``lower[t] ≤ nnz(segment t) ≤ upper[t]`` and
    ``Σ nnz = k`` exactly.  ``scope="layer"`` is expressed as ``lower = upper = k_t``; a protected
    tensor as ``lower = upper = size``; a minimum density ``d`` as ``lower = ceil(d · size)``.
    """

    k: int
    segments: tuple[int, ...]
    lower: tuple[int, ...]
    upper: tuple[int, ...]

    @property
    def p(self) -> int:
        return self.segments[-1]

    @staticmethod
    def global_(k: int, p: int) -> Budget:
        """A single global budget of ``k`` nonzeros over ``p`` weights."""
        return Budget(k=k, segments=(0, p), lower=(0,), upper=(p,)).validated()

    def validated(self) -> Budget:
        """Return ``self`` after checking consistency; raises :class:`SolverError`."""
        seg = self.segments
        if len(seg) < 2 or seg[0] != 0 or any(b < a for a, b in itertools.pairwise(seg)):
            raise SolverError(f"budget segments must be increasing offsets starting at 0, got {seg}")
        if len(self.lower) != len(seg) - 1 or len(self.upper) != len(seg) - 1:
            raise SolverError("budget lower/upper need one entry per segment")
        sizes = np.diff(seg)
        for t, (lo, hi, sz) in enumerate(zip(self.lower, self.upper, sizes, strict=True)):
            if not 0 <= lo <= hi <= sz:
                raise SolverError(f"budget segment {t}: need 0 ≤ lower={lo} ≤ upper={hi} ≤ size={sz}")
        if not sum(self.lower) <= self.k <= min(sum(self.upper), self.p):
            raise SolverError(f"budget k={self.k} is outside [Σlower={sum(self.lower)}, Σupper={sum(self.upper)}]")
        return self

    def segment_ids(self) -> IntArray:
        """``(p,)`` int64: the segment index of every coordinate."""
        return np.repeat(np.arange(len(self.segments) - 1, dtype=np.int64), np.diff(self.segments))


#: Budgets with at most this many segments (one per tensor) are thresholded segment by segment with
#: linear-time selections instead of sorting all ``p`` entries (the N:M budgets have one per group).
FEW_SEGMENTS = 4096


def _top(a: NDArray[np.floating], k: int) -> NDArray[np.bool_]:
    """Mask of the ``k`` largest entries of ``a`` (no NaN), ties broken towards the smaller index:
    exactly the first ``k`` of a stable descending sort, in O(len(a))."""
    n = a.shape[0]
    mask: NDArray[np.bool_] = np.zeros(n, dtype=bool)
    if k <= 0:
        return mask
    if k >= n:
        mask[:] = True
        return mask
    v = np.partition(a, n - k)[n - k]  # the k-th largest value
    mask = np.greater(a, v)
    need = k - int(np.count_nonzero(mask))
    mask[np.flatnonzero(a == v)[:need]] = True
    return mask


def _threshold_few_segments(a: NDArray[np.floating], budget: Budget) -> IntArray:
    """:func:`hard_threshold` for budgets with few segments: each segment's ``lower`` largest, then
    the ``k − Σlower`` largest of the entries ranked in ``[lower, upper)`` of their segment (the same
    set as the sorting path, ties by index)."""
    chosen = np.zeros(a.shape[0], dtype=bool)
    eligible = np.zeros(a.shape[0], dtype=bool)
    seg = budget.segments
    for t in range(len(seg) - 1):
        lo, hi = int(seg[t]), int(seg[t + 1])
        part = a[lo:hi]
        first = _top(part, int(budget.lower[t]))
        chosen[lo:hi] = first
        eligible[lo:hi] = _top(part, int(budget.upper[t])) & ~first
    rest = budget.k - int(np.count_nonzero(chosen))
    if rest > 0:
        cand = np.flatnonzero(eligible)
        chosen[cand[_top(a[cand], rest)]] = True
    return np.flatnonzero(chosen).astype(np.int64)


def hard_threshold(v: FloatArray, budget: Budget) -> IntArray:
    """Indices of the ``budget.k`` entries of largest ``|v|`` that respect the per-segment bounds.

    Greedy and exact for these (partition-matroid) constraints: first every segment takes its
    ``lower`` largest entries, then the remaining budget goes to the largest remaining entries whose
    segment has not reached ``upper``.  Ties are broken by index (stable).  Returns sorted int64
    indices, shape ``(k,)``.
    """
    a = np.abs(np.asarray(v))
    p = a.shape[0]
    if p != budget.p:
        raise SolverError(f"vector has {p} entries but the budget covers {budget.p}")
    k = budget.k
    if len(budget.segments) == 2 and budget.lower[0] == 0 and budget.upper[0] == p:
        if k >= p:
            return np.arange(p, dtype=np.int64)
        if k == 0:
            return np.empty(0, dtype=np.int64)
        idx = np.argpartition(-a, k - 1)[:k]
        return np.sort(idx).astype(np.int64)
    if len(budget.segments) - 1 <= FEW_SEGMENTS and not np.isnan(a).any():
        return _threshold_few_segments(a, budget)
    # Rank of every entry within its own segment in descending |v| (stable: ties by index).  The first
    # `lower` of each segment are taken; the remaining budget goes to the largest entries ranked in
    # [lower, upper) of their segment.  Vectorised, so budgets with very many segments (one per N:M
    # group) cost O(p log p) rather than a Python loop over the segments.
    order = np.argsort(-a, kind="stable")
    seg_of = budget.segment_ids()[order]
    by_seg = np.argsort(seg_of, kind="stable")
    first = np.searchsorted(seg_of[by_seg], seg_of[by_seg], side="left")
    ranks = np.empty_like(order)
    ranks[by_seg] = np.arange(order.shape[0], dtype=np.int64) - first
    lower = np.asarray(budget.lower, dtype=np.int64)[seg_of]
    upper = np.asarray(budget.upper, dtype=np.int64)[seg_of]
    chosen = np.zeros(p, dtype=bool)
    chosen[order[ranks < lower]] = True
    rest = k - int(chosen.sum())
    if rest > 0:
        eligible = order[(ranks >= lower) & (ranks < upper)]
        chosen[eligible[:rest]] = True
    return np.flatnonzero(chosen).astype(np.int64)


def objective(X: FloatArray, w: FloatArray, w_bar: FloatArray, ridge: float, alpha: FloatArray | None = None) -> float:
    """``f(w) = ½‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)`` in float64.  X: (n, p); w, w̄, α: (p,)."""
    d = np.asarray(w, dtype=np.float64) - np.asarray(w_bar, dtype=np.float64)
    r = X @ d.astype(X.dtype, copy=False)
    val = 0.5 * float(np.dot(r, r)) + 0.5 * ridge * float(np.dot(d, d))
    if alpha is not None:
        val += float(np.dot(alpha, d))
    return val


@dataclass(frozen=True)
class SolverResult:
    """What every pruning solver returns.

    * ``w`` — ``(p,)`` float32: the pruned and updated weights (zero outside ``support``).
    * ``support`` — ``(k,)`` int64 sorted indices of the kept weights.
    * ``objective`` — final value of the quadratic model ``f`` (NaN when a method does not evaluate it).
    * ``trace`` — objective after each iteration (non-increasing for CHITA).
    * ``iterations`` / ``converged`` — non-convergence is reported here (and logged), never raised.
    * ``info`` — method-specific scalars (timings, swaps, blocks, ...).
    """

    w: NDArray[np.float32]
    support: IntArray
    objective: float
    trace: tuple[float, ...]
    iterations: int
    converged: bool
    method: str
    info: Mapping[str, float | int | str] = field(default_factory=dict)


def check_problem(
    X: FloatArray, w_bar: FloatArray, budget: Budget, ridge: float, alpha: FloatArray | None = None
) -> None:
    """Validate the shapes and values of a problem; raises :class:`SolverError` with the bad value."""
    if X.ndim != 2:
        raise SolverError(f"X must be 2-D (n, p), got shape {X.shape}")
    p = X.shape[1]
    if w_bar.shape != (p,):
        raise SolverError(f"w̄ must have shape ({p},) to match X {X.shape}, got {w_bar.shape}")
    if alpha is not None and alpha.shape != (p,):
        raise SolverError(f"alpha must have shape ({p},), got {alpha.shape}")
    if budget.p != p:
        raise SolverError(f"budget covers {budget.p} weights but X has {p} columns")
    if not np.isfinite(ridge) or ridge < 0:
        raise SolverError(f"ridge must be a finite number ≥ 0, got {ridge}")
    if not np.all(np.isfinite(w_bar)):
        raise SolverError("w̄ contains NaN or infinity")
