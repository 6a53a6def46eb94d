"""Support search by batched exchanges scored in the Woodbury form (CHITA for ``k`` ≫ ``n``).

The problem is CHITA's (:mod:`._core`),

    f(w) = ½‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)        s.t. w respects the budget,

with ``X`` ``(n, p)``, ``λ > 0``.  Write ``m = w̄ − α/λ`` (the centre of the ridge term once the
linear term is folded in) and ``y = Xw̄``.  For a support ``S`` (pruned set ``P``) the exact re-fit
("backsolve") has a closed form in the ``n``-dimensional row space:

    c = y − X_S m_S,   K = λI_n + X_S X_Sᵀ,   z = K⁻¹c,
    w_S = m_S + X_Sᵀz,            f*(S) = (λ/2)(‖m_P‖² + cᵀz) − ‖α‖²/(2λ).

No cancellation happens in this form (both terms are non-negative), which is what makes it usable
with float32 gradients and a small λ.  With ``v = m + Xᵀz`` (``v_S = w_S``; for ``i ∈ P`` it is the
weight ``i`` would take after one exact step) and the leverages ``s_j = x_jᵀK⁻¹x_j`` the *exact*
change of ``f*`` for a single move is (Sherman–Morrison on ``K``):

    prune j ∈ S:   + (λ/2)·v_j² / (1 − s_j)        (the OBS cost: ½w_j² / [H_S⁻¹]_jj)
    keep  i ∈ P:   − (λ/2)·v_i² / (1 + s_i)        (½ g_i² / Schur_i with g_i = −λv_i)

When ``k ≫ n`` almost every leverage is tiny (they sum to at most ``n`` over ``S``), so magnitude
pruning plus backsolve is close to a fixed point of plain IHT — the reason IHT "barely moves the
support" — but the scores above still see every swap that pays off *after* the re-fit.

One iteration (``O(n·p)`` for ``Xᵀz`` plus ``O(n²·r + n³)``):

1. ``z``, ``v`` as above.  Since ``v_j² ≤ cost`` and ``gain ≤ v_i²`` (up to the factor λ/2), the ``r``
   kept weights of smallest ``v²`` and the ``r`` pruned ones of largest ``v²`` contain every
   favourable single move that involves the cheapest removals and the best additions; their exact
   leverages come from one triangular solve with the Cholesky factor of ``K``.  If the best bound
   gain does not beat the smallest bound cost, no single swap pays off anywhere: stop.
2. Candidate supports: the budget-feasible top-k of (exact cost on ``S``, exact gain outside)
   with only the ``q`` best additions allowed, for ``q`` halving from "every individually
   favourable swap" down to one.  Each candidate is scored *exactly* — ``K`` is updated by the
   swapped columns (``O(n²q)``) and re-factored (``O(n³)``) — and the best one that lowers ``f*`` is
   kept (the halving stops once candidates get worse).
3. Stop when nothing lowers ``f*``, the relative decrease is below ``tol``, or after ``max_iter``
   iterations.

Every accepted step lowers ``f*`` exactly, so the result is never worse than the backsolve on the
starting support (magnitude pruning + backsolve with the default start).  Identically zero
gradient columns need no special case: their leverage is 0 and their pruning cost is the ridge
term ``(λ/2)m_j²``, exactly as ``f`` counts it.  Memory: ``O(n² + n·r)`` float64 beyond ``X``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import scipy.linalg as sla
from numpy.typing import NDArray

from ..errors import SolverError
from ._core import Budget, FloatArray, IntArray
from .backsolve import _chunks, matvec, rmatvec

__all__ = ["ExchangeResult", "exchange_search"]

log = logging.getLogger(__name__)

F64 = NDArray[np.float64]

#: Default shortlist size ``r`` (kept and pruned candidates per iteration; see exchange_search).
DEFAULT_SHORTLIST = 512
#: Relative decrease of ``f*`` below which a candidate is not counted as an improvement (rounding).
_NOISE = 1e-11


@dataclass(frozen=True)
class ExchangeResult:
    """The support found, its exact re-fit and how the search went.

    ``w`` — ``(p,)`` float64, zero outside ``support`` (sorted int64); ``trace`` — ``f*`` after every
    accepted step (the first entry is the start); ``swaps`` — coordinates moved in total.
    """

    support: IntArray
    w: F64
    trace: tuple[float, ...]
    iterations: int
    converged: bool
    swaps: int
    info: dict[str, float | int | str] = field(default_factory=dict)


def _gram_update(G: F64, X: FloatArray, cols: IntArray, sign: float) -> None:
    """``G += sign · X[:, cols] X[:, cols]ᵀ`` in float64, **upper triangle only** (BLAS ``syrk``).

    ``G`` must be Fortran-ordered float64 for the update to happen in place."""
    n = X.shape[0]
    for a, b in _chunks(int(cols.shape[0]), n):
        Xc = np.asarray(X[:, cols[a:b]], dtype=np.float64)
        # Xcᵀ is Fortran-ordered (b × n): syrk with trans=1 computes (Xcᵀ)ᵀ(Xcᵀ) = Xc Xcᵀ without a copy.
        out = sla.blas.dsyrk(sign, Xc.T, beta=1.0, c=G, trans=1, lower=0, overwrite_c=1)
        if out is not G:  # pragma: no cover - f2py copied (G not Fortran-ordered float64)
            G[...] = out


def _factor(G: F64, lam: float) -> F64:
    """Lower Cholesky factor ``L`` of ``G + λI`` from ``G``'s upper triangle (jitter only if rounding
    made it indefinite)."""
    K = G.copy()
    K[np.diag_indices_from(K)] += lam
    scale = max(float(np.trace(K)) / max(K.shape[0], 1), 1e-300)
    jitter = 0.0
    for attempt in range(8):
        try:
            if jitter:
                K[np.diag_indices_from(K)] += jitter
            U = sla.cholesky(K, lower=False, check_finite=False)
            return np.asarray(U.T, dtype=np.float64)
        except np.linalg.LinAlgError:
            jitter = scale * 10.0 ** (attempt - 14)
    raise SolverError("exchange search: λI + X_S X_Sᵀ is not positive definite (NaN in X?)")


def _lsolve(L: F64, b: F64) -> F64:
    """``L⁻¹ b`` for the lower-triangular ``L``."""
    return np.asarray(sla.solve_triangular(L, b, lower=True, check_finite=False), dtype=np.float64)


@dataclass
class _Dual:
    """The exact re-fit on one support in the ``n``-dimensional row space (for ``k ≥ n``).

    ``G`` — upper triangle of ``X_S X_Sᵀ``; ``c = y − X_S m_S``; ``L`` — Cholesky factor of
    ``K = λI + G``; ``ch = L⁻¹c``; ``F = ‖m_P‖² + ‖ch‖²`` (``= ‖m_P‖² + cᵀK⁻¹c``, i.e. ``2(f* − const)/λ``).
    """

    kept: NDArray[np.bool_]
    G: F64
    c: F64
    mp2: float
    L: F64
    ch: F64
    F: float

    @staticmethod
    def build(X: FloatArray, kept: NDArray[np.bool_], c: F64, mp2: float, lam: float) -> _Dual:
        n = X.shape[0]
        G = np.zeros((n, n), dtype=np.float64, order="F")  # Fortran order: syrk updates it in place
        _gram_update(G, X, np.flatnonzero(kept), 1.0)
        return _Dual.make(kept, G, c, mp2, lam)

    @staticmethod
    def make(kept: NDArray[np.bool_], G: F64, c: F64, mp2: float, lam: float) -> _Dual:
        L = _factor(G, lam)
        ch = _lsolve(L, c)
        return _Dual(kept, G, c, mp2, L, ch, mp2 + float(ch @ ch))

    @property
    def z(self) -> F64:
        """``K⁻¹c`` (n,)."""
        return np.asarray(sla.solve_triangular(self.L, self.ch, lower=True, trans=1, check_finite=False))

    def gram(self, X: FloatArray, C: IntArray) -> F64:
        """``X_CᵀK⁻¹X_C`` (|C| × |C|)."""
        W = _lsolve(self.L, np.asarray(X[:, C], dtype=np.float64))
        return np.asarray(W.T @ W)

    def apply(self, X: FloatArray, out: IntArray, inn: IntArray, m: F64, lam: float) -> _Dual:
        """The exact system after pruning ``out`` and keeping ``inn`` (``O(n²·moves + n³)``)."""
        G = self.G.copy(order="F")
        _gram_update(G, X, out, -1.0)
        _gram_update(G, X, inn, 1.0)
        kept, c, mp2 = _moved(X, self.kept, self.c, self.mp2, out, inn, m)
        return _Dual.make(kept, G, c, mp2, lam)


@dataclass
class _Primal:
    """The exact re-fit on one support in the ``k``-dimensional weight space (for ``k < n``).

    ``S`` — the kept columns in the order of ``XS = X[:, S]`` (float64 copy) and of ``H = XSᵀXS``;
    ``L`` — Cholesky factor of ``H + λI``; ``delta = (H + λI)⁻¹XSᵀc``, ``r = c − XS·delta``, so that
    ``K⁻¹c = r/λ`` and ``F = ‖m_P‖² + ‖r‖²/λ + ‖delta‖²`` (no cancellation).
    """

    kept: NDArray[np.bool_]
    S: IntArray
    XS: F64
    H: F64
    c: F64
    mp2: float
    L: F64
    r: F64
    F: float
    lam: float

    @staticmethod
    def build(X: FloatArray, kept: NDArray[np.bool_], c: F64, mp2: float, lam: float) -> _Primal:
        S = np.flatnonzero(kept).astype(np.int64)
        XS = np.asarray(X[:, S], dtype=np.float64)
        return _Primal.make(kept, S, XS, XS.T @ XS, c, mp2, lam)

    @staticmethod
    def make(kept: NDArray[np.bool_], S: IntArray, XS: F64, H: F64, c: F64, mp2: float, lam: float) -> _Primal:
        L = _factor(H, lam)
        delta = np.asarray(sla.cho_solve((L, True), XS.T @ c, check_finite=False), dtype=np.float64)
        r = c - XS @ delta
        return _Primal(kept, S, XS, H, c, mp2, L, r, mp2 + float(r @ r) / lam + float(delta @ delta), lam)

    @property
    def z(self) -> F64:
        return self.r / self.lam

    def gram(self, X: FloatArray, C: IntArray) -> F64:
        """``X_CᵀK⁻¹X_C = (X_CᵀX_C − AᵀH_λ⁻¹A)/λ`` with ``A = XSᵀX_C``."""
        XC = np.asarray(X[:, C], dtype=np.float64)
        W = _lsolve(self.L, self.XS.T @ XC)
        return np.asarray((XC.T @ XC - W.T @ W) / self.lam)

    def apply(self, X: FloatArray, out: IntArray, inn: IntArray, m: F64, lam: float) -> _Primal:
        """The exact system after the moves: ``H`` updated by the moved rows/columns (``O(n·k·moves + k³)``)."""
        keep = ~np.isin(self.S, out)
        XI = np.asarray(X[:, inn], dtype=np.float64)
        XS = np.concatenate([self.XS[:, keep], XI], axis=1)
        cross = XS[:, : int(keep.sum())].T @ XI
        H = np.block([[self.H[np.ix_(keep, keep)], cross], [cross.T, XI.T @ XI]])
        S = np.concatenate([self.S[keep], inn])
        kept, c, mp2 = _moved(X, self.kept, self.c, self.mp2, out, inn, m)
        return _Primal.make(kept, S, XS, H, c, mp2, lam)


def _moved(
    X: FloatArray, kept: NDArray[np.bool_], c: F64, mp2: float, out: IntArray, inn: IntArray, m: F64
) -> tuple[NDArray[np.bool_], F64, float]:
    """``(kept, c, ‖m_P‖²)`` after pruning ``out`` and keeping ``inn``."""
    c = c.copy()
    if out.size:
        c += np.asarray(X[:, out], dtype=np.float64) @ m[out]
    if inn.size:
        c -= np.asarray(X[:, inn], dtype=np.float64) @ m[inn]
    kept = kept.copy()
    kept[out] = False
    kept[inn] = True
    return kept, c, mp2 + float(m[out] @ m[out]) - float(m[inn] @ m[inn])


def exchange_search(
    X: FloatArray,
    w_bar: F64,
    budget: Budget,
    ridge: float,
    alpha: F64 | None,
    start: IntArray,
    *,
    max_iter: int = 50,
    tol: float = 1e-6,
    shortlist: int = DEFAULT_SHORTLIST,
    offset: F64 | None = None,
    form: Literal["auto", "dual", "primal"] = "auto",
) -> ExchangeResult:
    """Improve the support ``start`` by exact exchanges (see the module docstring).

    Args:
        X: ``(n, p)`` float32/float64 scaled gradients (never copied whole).
        w_bar: ``(p,)`` float64 trained weights; ``alpha``: ``(p,)`` float64 first-order term or None.
        budget: the budget; ``start`` must satisfy it (sorted int64 indices, ``budget.k`` of them).
        ridge: ``λ > 0`` (the closed form needs it; CHITA uses its IHT for λ = 0).
        max_iter: cap on outer iterations (each one: a full gradient, a shortlist, a run of
            exchanges, an exact re-factorisation); tol: stop when an outer iteration lowers ``f*``
            by less than ``tol·f*``; shortlist: ``r``, the candidates per side of one run.
        offset: ``(n,)`` row offsets ``b``: the problem is then ``½‖X(w − w̄) + b‖² + (λ/2)‖w − w̄‖²
            + αᵀ(w − w̄)`` (its linear part ``Xᵀb`` stays in the row space, and ``f*`` is reported
            without the constant ``½‖b‖²``, i.e. as ``f`` with first-order term ``α + Xᵀb``).
        form: the exact re-fit in the ``n × n`` row space ("dual", ``O(n²k + n³)``) or the ``k × k``
            weight space ("primal", ``O(nk² + k³)``); "auto" takes the cheaper (primal when ``k < n``).

    Returns:
        :class:`ExchangeResult`; ``w`` is the exact minimiser of ``f`` on the returned support.
    """
    if not ridge > 0:
        raise SolverError(f"exchange search needs ridge > 0, got {ridge}")
    n, p = X.shape
    lam = float(ridge)
    m = w_bar if alpha is None else w_bar - alpha / lam
    const = 0.0 if alpha is None else -float(alpha @ alpha) / (2.0 * lam)
    if offset is not None:
        const -= 0.5 * float(offset @ offset)
    kept = np.zeros(p, dtype=bool)
    kept[start] = True
    S = np.flatnonzero(kept).astype(np.int64)
    mS = np.zeros(p, dtype=np.float64)
    mS[S] = m[S]
    c = matvec(X, w_bar - mS) if offset is None else matvec(X, w_bar - mS) - offset
    mP = m[~kept]
    # the cheaper exact form: n × n (cost n²k + n³) or k × k (cost nk² + k³)
    primal = form == "primal" or (form == "auto" and S.size < n)
    system: type[_Dual] | type[_Primal] = _Primal if primal else _Dual
    sys_: _Dual | _Primal = system.build(X, kept, c, float(mP @ mP), lam)
    seg_of = budget.segment_ids()
    lower = np.asarray(budget.lower, dtype=np.int64)
    upper = np.asarray(budget.upper, dtype=np.int64)
    free_segments = bool(np.all(lower == 0) and np.all(upper == np.diff(np.asarray(budget.segments))))

    def value(F: float) -> float:
        return 0.5 * lam * F + const

    trace = [value(sys_.F)]
    r = max(1, int(shortlist))
    iters = swaps = 0
    converged = False
    v = m + rmatvec(X, sys_.z)
    for it in range(max_iter):
        iters = it + 1
        kept = sys_.kept
        S = np.flatnonzero(kept).astype(np.int64)
        P = np.flatnonzero(~kept).astype(np.int64)
        if S.size == 0 or P.size == 0:
            converged = True
            break
        v2 = v * v
        rs, re = min(r, S.size), min(r, P.size)
        R = S[np.argpartition(v2[S], rs - 1)[:rs]] if rs < S.size else S
        E = P[np.argpartition(-v2[P], re - 1)[:re]] if re < P.size else P
        if float(v2[E].max()) <= float(v2[R].min()):
            converged = True  # no single exchange can pay off, even by the bounds
            break
        C = np.concatenate([R, E])
        M0 = sys_.gram(X, C)  # (|C|, |C|): X_CᵀK⁻¹X_C
        run = _Exchanges(M0, v[C], m[C], kept[C], seg_of[C], np.bincount(seg_of[S], minlength=lower.size))
        moves = run.search(sys_.F, lower, upper, free_segments, max_steps=min(re, rs))
        del M0
        if not moves:
            converged = True
            break
        was = kept[C]
        out, inn = np.sort(C[was & ~run.kept]), np.sort(C[~was & run.kept])  # net moves
        cand = sys_.apply(X, out, inn, m, lam)
        if not cand.F < sys_.F:  # the exact value disagrees with the rank-one updates (rounding): stop
            log.debug("exchange %d: exact f* %.12g ≥ %.12g, stopping", iters, cand.F, sys_.F)
            converged = True
            break
        rel = (sys_.F - cand.F) / max(abs(sys_.F), 1e-300)
        log.debug(
            "exchange %d: %d swaps (r %d), f* %.9g (predicted %.9g)",
            iters,
            inn.size,
            r,
            value(cand.F),
            value(run.F),
        )
        sys_ = cand
        swaps += int(inn.size)
        trace.append(value(sys_.F))
        v = m + rmatvec(X, sys_.z)
        if rel <= tol:
            converged = True
            break
    S = np.flatnonzero(sys_.kept).astype(np.int64)
    w = np.zeros(p, dtype=np.float64)
    w[S] = v[S]
    return ExchangeResult(S, w, tuple(trace), iters, converged, swaps, {})


class _Exchanges:
    """Exact sequential exchanges among the shortlisted columns ``C`` by rank-one updates.

    With ``K = λI + X_S X_Sᵀ`` the quantities that decide a move are
    ``s_j = x_jᵀK⁻¹x_j`` (leverage), ``t_j = x_jᵀK⁻¹c`` and ``v_j = m_j + t_j``.  Keeping (``σ = +1``)
    or pruning (``σ = −1``) a column ``a`` changes ``K`` by ``σx_ax_aᵀ`` and ``c`` by ``−σm_ax_a``;
    with ``M = X_CᵀK⁻¹X_C``:

        F  ← F − σ·v_a²/(1 + σs_a)
        s_j ← s_j − σ·M_ja²/(1 + σs_a),     t_j ← t_j − σ·M_ja·v_a/(1 + σs_a),

    and ``M ← M − σ·M_{:,a}M_{a,:}/(1 + σs_a)``, kept implicitly as ``M₀ − Σ coef·col colᵀ`` (a column
    costs ``O((n + steps)·|C|)``).  Every step is exact, interactions between the exchanges included.
    """

    def __init__(
        self, M0: F64, v: F64, m: F64, kept: NDArray[np.bool_], seg: IntArray, counts: NDArray[np.int64]
    ) -> None:
        self.M0 = M0  # (|C|, |C|) = X_CᵀK⁻¹X_C at the start of the run
        self.m = m
        self.t = v - m
        self.s = np.diag(self.M0).copy()
        self.kept = kept.copy()
        self.seg = seg
        self.counts = counts.copy()
        self.U = np.empty((M0.shape[0], 0), dtype=np.float64)  # columns of the updates so far
        self.coefs = np.empty(0, dtype=np.float64)
        self.q = 0
        self.F = 0.0

    def column(self, a: int) -> F64:
        """``M_{:,a}`` under the updates so far."""
        col = self.M0[:, a].copy()
        if self.q:
            U = self.U[:, : self.q]
            col -= U @ (self.coefs[: self.q] * U[a])
        return np.asarray(col, dtype=np.float64)

    def apply(self, a: int, sign: float, col: F64) -> None:
        va = self.m[a] + self.t[a]
        den = 1.0 + sign * self.s[a]
        self.F -= sign * va * va / den
        self.s -= sign * col * col / den
        self.t -= sign * col * (va / den)
        if self.q == self.U.shape[1]:  # grow the update store geometrically
            grow = max(16, self.q)
            self.U = np.concatenate([self.U, np.empty((self.U.shape[0], grow))], axis=1)
            self.coefs = np.concatenate([self.coefs, np.empty(grow)])
        self.U[:, self.q] = col
        self.coefs[self.q] = sign / den
        self.q += 1
        self.kept[a] = sign > 0
        self.counts[self.seg[a]] += 1 if sign > 0 else -1

    def search(
        self,
        F0: float,
        lower: NDArray[np.int64],
        upper: NDArray[np.int64],
        free: bool,
        *,
        max_steps: int,
        tries: int = 3,
    ) -> list[tuple[int, float]]:
        """Greedy exchanges while one lowers ``F``; returns the moves ``(position, σ)`` in order."""
        self.F = F0
        moves: list[tuple[int, float]] = []
        noise = _NOISE * max(abs(F0), 1e-300)
        for _ in range(max_steps):
            v = self.m + self.t
            cost = np.where(self.kept, v * v / np.maximum(1.0 - self.s, 1e-300), np.inf)
            out_order = np.argsort(cost)[:tries]
            done = False
            for j in out_order.tolist():
                if not np.isfinite(cost[j]):
                    break
                sj = int(self.seg[j])
                if not free and self.counts[sj] <= lower[sj]:
                    ok = (~self.kept) & (self.seg == sj)  # only a swap inside j's segment keeps its count
                else:
                    ok = ~self.kept
                    if not free:
                        ok = ok & ((self.seg == sj) | (self.counts[self.seg] < upper[self.seg]))
                if not ok.any():
                    continue
                col = self.column(j)
                den = 1.0 - self.s[j]
                # leverage and residual of every candidate after pruning j (σ = −1), without applying it
                s2 = self.s + col * col / den
                v2 = self.m + self.t + col * (v[j] / den)
                gain = np.where(ok, v2 * v2 / (1.0 + s2), -np.inf)
                i = int(np.argmax(gain))
                if cost[j] - gain[i] < -noise:
                    self.apply(j, -1.0, col)
                    self.apply(i, 1.0, self.column(i))
                    moves += [(j, -1.0), (i, 1.0)]
                    done = True
                    break
            if not done:
                break
        return moves
