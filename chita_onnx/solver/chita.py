"""CHITA: sparse re-fitting of the weights on the empirical-Fisher model, with an active set.

Minimises the empirical-Fisher model of the loss under a sparsity budget,

    f(w) = ½‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)     s.t.  w respects ``budget`` (‖w‖₀ ≤ k, ...)

with ``X`` ``(n, p)`` float32/float64 already scaled by 1/√n, ``n ≪ p``.  No ``p × p`` matrix is formed.

The algorithm (CHITA's Active-IHT, ``docs/chita-algorithm.md`` §2.2, with the reference's quirks fixed
and its cost removed):

0. **Exchange search** (``method="exchange"``, and ``"auto"`` when ``k > swap_max_k`` and λ > 0): the
   default for large supports, in :mod:`.exchange` — exact single-move scores in the Woodbury form,
   sequential exchanges with exact rank-one updates, exact re-fit after every round; it works for
   ``k ≫ n``, where the IHT below stays at the magnitude support.  Steps 1–5 are the IHT/swap path
   (λ = 0, ``k ≤ swap_max_k`` or ``method="iht"``/``"swap"``).
1. **Preprocess.**  With λ > 0 an identically zero gradient column still costs ``(λ/2)(w̄ − α/λ)²``
   when pruned, so it competes for the budget like any other weight (the reference drops such
   weights up front, which minimises a different objective than the ``f`` reported).  With λ = 0
   they get no budget unless it would otherwise go unspent (then they are taken by ``|w̄|``).
2. **Start.**  ``S₀`` = the budget-feasible top-k of ``|v₀|`` with ``v₀ = w̄`` (α = 0) or the exact
   Cauchy step ``w̄ − τα`` (α ≠ 0).  By default the iterate starts at the exact backsolve on ``S₀``,
   so the result is never worse than magnitude pruning + backsolve (``init="magnitude"`` starts at
   ``w̄`` masked to ``S₀`` as the reference does).
3. **Active set** ``A`` = ``S₀`` plus the next ``⌈(factor−1)·k⌉`` largest ``|v₀|`` (factor 1.5); the inner
   search only touches ``X_A`` (a copy, ``O(n·|A|)`` memory).
4. **Inner search** on ``A``, one of two kinds (``method``; ``"auto"`` = swap for ``k ≤ swap_max_k``,
   IHT for larger ``k`` when λ = 0):

   * **IHT** (``O(n·|A|)`` per iteration), each iteration with one gradient ``g``: a fixed-support
     step along a conjugate-gradient direction on the current support (steepest descent after a
     support change) with the exact step ``τ = −gᵀd / (‖Xd‖² + λ‖d‖²)``; and a support-changing
     search from ``L_change``, the smallest step at which ``HT(w − τg)`` changes support (exact
     per-segment exchange rule for the budget's partition-matroid constraints), doubling ``τ`` while
     the objective decreases (the "aggressive" step; each candidate costs ``O(n·#swaps)``).  The
     better of the two is taken only if it decreases ``f``.  No Lipschitz constant or σ_max estimate
     is needed: every step is an exact line search or checked by exact evaluation.
   * **Swap** (small ``k``): ``G = X_AᵀX_A`` once per active set; every candidate support is scored by
     its exact re-fitted objective (a ``k × k`` Cholesky).  Candidates are the budget-feasible top-k
     of OBS-style scores — removal cost ``w_j²/(2[H_S⁻¹]_jj)``, entering gain
     ``γ·g_i²/(2·Schur_i)`` — for growing ``γ`` until the re-fitted value stops improving.  Much
     better supports than IHT (which cannot see that a swap pays off only after re-fitting — the
     reference's "IHT barely moves the support"), at ``O(k³)`` per candidate.

5. **Outer loop.**  The exact residual, one full gradient ``Xᵀr`` (``O(n·p)``); IHT also tries the
   support-changing search over all coordinates and keeps the best strictly improving candidate
   (fixing the reference, which adds the coordinates of the last *evaluated* — possibly rejected —
   candidate and can drop an accepted one).  Up to ``⌈grow·k⌉`` outside coordinates with the largest
   single-coordinate gain ``g_i²/(2(‖X_i‖²+λ))`` also join ``A``.  Stops when nothing is added or the
   coordinates added by screening alone were not used.
6. **Backsolve** on the final support (:func:`ridge_backsolve`); kept only if it does not increase
   ``f`` (it is the exact minimiser on the support, so it only loses to rounding).

The trace (objective per accepted step) never increases, up to float rounding (float32 ``X``: ~1e-6
relative at the outer-round boundaries, where the residual is recomputed).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.linalg as sla
from numpy.typing import NDArray

from ..errors import SolverError
from ._core import Budget, FloatArray, IntArray, SolverResult, check_problem, hard_threshold, objective
from .backsolve import _chunks, matvec, ridge_backsolve, rmatvec
from .exchange import exchange_search

__all__ = ["chita_iht"]

log = logging.getLogger(__name__)

F64 = NDArray[np.float64]
Init = Literal["backsolve", "magnitude"]
Start = Literal["magnitude", "obd"]
Method = Literal["auto", "iht", "swap", "exchange"]

#: Fraction of the columns above which the active set is the whole matrix (no copy is made).
_FULL_SPACE_FRACTION = 0.5
#: The exchange search stops once an outer round (a full gradient, a run of exchanges, an exact
#: re-factorisation) lowers f by less than this fraction: on ResNet-20 at sparsity 0.9 the rounds
#: after that gain 5e-5, 8e-6, 3e-7 (relative) at ~1.5 s each.
EXCHANGE_TOL = 1e-4


# --------------------------------------------------------------------------------------------------
# Budget helpers


def restrict_budget(budget: Budget, idx: IntArray, k: int | None = None) -> Budget:
    """The budget for the sub-vector ``v[idx]`` (``idx`` sorted column indices).

    Same ``k`` (or the given one) and lower bounds; upper bounds clipped to what ``idx`` holds of each
    segment.  Raises :class:`SolverError` when ``idx`` cannot satisfy the budget.
    """
    k = budget.k if k is None else k
    if len(budget.segments) == 2 and budget.lower[0] == 0:
        return Budget.global_(k, int(idx.shape[0]))
    seg = np.searchsorted(idx, np.asarray(budget.segments, dtype=np.int64), side="left")
    counts = np.diff(seg)
    upper = tuple(int(min(u, c)) for u, c in zip(budget.upper, counts, strict=True))
    return Budget(k=k, segments=tuple(int(s) for s in seg), lower=budget.lower, upper=upper).validated()


def split_zero_columns(budget: Budget, nonzero: NDArray[np.bool_], w_bar: F64) -> tuple[Budget, IntArray]:
    """Split the budget between the nonzero columns and the identically-zero ones.

    Zero columns only take what the nonzero ones cannot absorb (per-segment lower bounds beyond the
    segment's nonzero count, or a global ``k`` beyond ``Σ min(upper, nonzero count)``), chosen by
    ``|w̄|``.  Returns the budget over all ``p`` coordinates for the nonzero part (its upper bounds
    never exceed a segment's nonzero count) and the sorted zero-column indices to keep.
    """
    seg = np.asarray(budget.segments, dtype=np.int64)
    cum = np.concatenate([[0], np.cumsum(nonzero, dtype=np.int64)])
    nz_counts = cum[seg[1:]] - cum[seg[:-1]]
    lower = np.asarray(budget.lower, dtype=np.int64)
    upper = np.asarray(budget.upper, dtype=np.int64)
    lower_nz = np.minimum(lower, nz_counts)
    upper_nz = np.minimum(upper, nz_counts)
    z_lower = lower - lower_nz
    k_zero = int(max(int(z_lower.sum()), budget.k - int(upper_nz.sum())))
    nz_budget = Budget(
        k=budget.k - k_zero,
        segments=budget.segments,
        lower=tuple(int(x) for x in lower_nz),
        upper=tuple(int(x) for x in upper_nz),
    ).validated()
    if k_zero == 0:
        return nz_budget, np.empty(0, dtype=np.int64)
    zero_idx = np.flatnonzero(~nonzero).astype(np.int64)
    zseg = np.searchsorted(zero_idx, seg, side="left")
    z_budget = Budget(
        k=k_zero,
        segments=tuple(int(s) for s in zseg),
        lower=tuple(int(x) for x in z_lower),
        upper=tuple(int(x) for x in (upper - upper_nz)),
    ).validated()
    keep = zero_idx[hard_threshold(w_bar[zero_idx], z_budget)]
    log.info("%d weights with identically zero gradient columns keep budget that would go unspent", k_zero)
    return nz_budget, keep


def fill_idle_slots(w: NDArray[np.float32], support: IntArray, w_bar: F64, budget: Budget) -> IntArray:
    """The support with slots whose weight came out exactly zero given to the largest ``|w̄|`` outside it.

    In late CHITA++ stages dead units make many gradient columns identically zero and few weights
    remain, so some support slots can end up holding weights that are already zero.  Any support that
    contains the nonzero part of ``w`` admits ``w`` itself, so the exact backsolve on the refilled
    support can only lower the objective, and the budget is spent on weights that exist.  Slots are
    moved only where the per-segment lower and upper bounds allow it.  Returns ``support`` unchanged
    (the same object) when there is nothing to do.
    """
    idle = support[w[support] == 0]
    if idle.size == 0:
        return support
    taken = np.zeros(w.shape[0], dtype=bool)
    taken[support] = True
    spare = np.flatnonzero(~taken & (w_bar != 0))
    if spare.size == 0:
        return support
    seg_of = budget.segment_ids()
    counts = np.bincount(seg_of[support], minlength=len(budget.segments) - 1)
    lower, upper = np.asarray(budget.lower), np.asarray(budget.upper)
    free: dict[int, list[int]] = {}
    for i, t in zip(idle.tolist(), seg_of[idle].tolist(), strict=True):
        free.setdefault(t, []).append(i)
    drop: list[int] = []
    add: list[int] = []
    for j in spare[np.argsort(-np.abs(w_bar[spare]), kind="stable")].tolist():
        if not free:
            break
        t = int(seg_of[j])
        if counts[t] >= upper[t] and t not in free:
            continue
        # an idle slot of j's own segment, else one of a segment that may shrink
        s_from = t if t in free else next((s for s in free if counts[s] > lower[s]), None)
        if s_from is None:
            continue
        drop.append(free[s_from].pop())
        if not free[s_from]:
            del free[s_from]
        counts[s_from] -= 1
        counts[t] += 1
        add.append(j)
    if not add:
        return support
    kept = np.setdiff1d(support, np.asarray(drop, dtype=np.int64), assume_unique=True)
    return np.union1d(kept, np.asarray(add, dtype=np.int64)).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# The problem restricted to a set of columns


@dataclass
class _Space:
    """The problem seen through the columns ``cols`` of ``X`` (vectors below are over positions).

    * ``mat`` — ``(n, m)``: ``X[:, cols]`` (a copy) or ``X`` itself when ``cols`` is all columns.
    * ``free`` — sorted positions that may be kept (``None``: all); the others stay 0.
    * ``budget`` — the budget over the free positions, in order; ``seg_free`` their segment ids.
    * ``wb``, ``alpha`` — ``w̄`` and ``α`` at ``cols``; ``const`` — the contribution of every
      coordinate outside ``cols`` (all pruned): ``Σ (λ/2)w̄_j² − α_j w̄_j``.
    """

    cols: IntArray
    mat: FloatArray
    free: IntArray | None
    budget: Budget
    seg_free: IntArray
    wb: F64
    alpha: F64 | None
    const: float
    ridge: float
    tau_floor: float

    @property
    def m(self) -> int:
        return int(self.cols.shape[0])

    def value(self, r: F64, w: F64) -> float:
        """``f`` from the residual ``r = X(w − w̄)`` (n,) and the weights ``w`` (m,)."""
        d = w - self.wb
        val = 0.5 * float(r @ r) + 0.5 * self.ridge * float(d @ d) + self.const
        if self.alpha is not None:
            val += float(self.alpha @ d)
        return val

    def grad(self, r: F64, w: F64) -> F64:
        """``∇f`` at ``w`` restricted to ``cols``: ``X_colsᵀ r + λ(w − w̄) + α``, shape (m,)."""
        g = rmatvec(self.mat, r)
        g += self.ridge * (w - self.wb)
        if self.alpha is not None:
            g += self.alpha
        return g

    def mv(self, pos: IntArray, v: F64) -> F64:
        """``X[:, cols[pos]] @ v`` (n,): dense product when ``pos`` is most of the columns."""
        if pos.shape[0] == 0:
            return np.zeros(self.mat.shape[0], dtype=np.float64)
        if pos.shape[0] * 2 > self.m:
            full = np.zeros(self.m, dtype=np.float64)
            full[pos] = v
            return matvec(self.mat, full)
        return matvec(self.mat[:, pos], v)

    def ht(self, v: F64) -> IntArray:
        """Sorted positions of the budget-feasible largest ``|v|`` among the free positions."""
        if self.free is None:
            return hard_threshold(v, self.budget)
        return self.free[hard_threshold(v[self.free], self.budget)]

    def l_change(self, w: F64, g: F64, supp: IntArray) -> float:
        """Smallest ``τ > 0`` at which ``HT(w − τg)`` can leave the support ``supp`` (``inf``: never).

        A kept ``j`` and a non-kept ``i`` (``w_i = 0``) trade places when ``|w_j − τg_j| = τ|g_i|``;
        the pair must be exchangeable: same segment, or ``j``'s segment above its lower bound and
        ``i``'s below its upper bound.
        """
        ag = np.abs(g if self.free is None else g[self.free])
        rank = supp if self.free is None else np.searchsorted(self.free, supp)
        kept = np.zeros(ag.shape[0], dtype=bool)
        kept[rank] = True
        b = self.budget
        nseg = len(b.segments) - 1
        M: float | F64
        if nseg == 1:
            if kept.all():
                return math.inf
            M = float(ag[~kept].max())
        else:
            vals = np.where(kept, 0.0, ag)
            starts = np.asarray(b.segments[:-1], dtype=np.int64)
            nonempty = np.diff(np.asarray(b.segments)) > 0
            m_in = np.zeros(nseg, dtype=np.float64)
            if nonempty.any():
                m_in[nonempty] = np.maximum.reduceat(vals, starts[nonempty])
            counts = np.bincount(self.seg_free[rank], minlength=nseg)
            room = counts < np.asarray(b.upper)
            give = counts > np.asarray(b.lower)
            m_elig = float(m_in[room].max()) if room.any() else 0.0
            M = np.where(give, np.maximum(m_in, m_elig), m_in)[self.seg_free[rank]]
        wk = w[supp]
        gk = g[supp]
        same = (np.sign(wk) == np.sign(gk)) & (gk != 0)
        den = np.where(same, np.abs(gk) + M, M - np.abs(gk))
        ok = den > 0
        if not ok.any():
            return math.inf
        return float((np.abs(wk[ok]) / den[ok]).min())


def _make_space(
    X: FloatArray,
    cols: IntArray | None,
    free: IntArray | None,
    budget_nz: Budget,
    wb: F64,
    alpha: F64 | None,
    ridge: float,
    colsq: F64,
) -> _Space:
    """The space over ``cols`` (``None``: all columns, no copy) with the nonzero-part budget."""
    p = X.shape[1]
    if cols is None:
        cols_a = np.arange(p, dtype=np.int64)
        mat = X
        const = 0.0
        sub = budget_nz if free is None else restrict_budget(budget_nz, free)
    else:
        cols_a = cols
        mat = np.asarray(X[:, cols])
        mask = np.ones(p, dtype=bool)
        mask[cols] = False
        out = wb[mask]
        const = 0.5 * ridge * float(out @ out)
        if alpha is not None:
            const -= float(alpha[mask] @ out)
        sub = restrict_budget(budget_nz, cols)
        free = None
    cmax = float(colsq[cols_a].max()) if cols_a.size else 1.0
    return _Space(
        cols=cols_a,
        mat=mat,
        free=free,
        budget=sub,
        seg_free=sub.segment_ids(),
        wb=wb[cols_a],
        alpha=None if alpha is None else alpha[cols_a],
        const=const,
        ridge=ridge,
        tau_floor=1e-6 / (cmax + ridge) if cmax + ridge > 0 else 1e-6,
    )


@dataclass
class _State:
    w: F64  # (m,) weights over the space's positions
    supp: IntArray  # sorted positions of the kept weights
    r: F64  # (n,) residual X(w − w̄) over the FULL problem
    f: float


def _search(sp: _Space, st: _State, g: F64, tau0: float, steps: int, h: F64 | None) -> _State | None:
    """Support-changing candidates ``HT(w − τg)``, ``τ = τ₀·2ʲ``, while ``f`` keeps decreasing.

    Returns the best candidate that beats ``st.f`` (or ``None``).  ``h = X_S g_S`` if known.
    """
    if not math.isfinite(tau0):  # no step size changes the support (l_change = inf)
        return None
    best: _State | None = None
    f_ref = st.f
    gS = g[st.supp]
    for j in range(steps):
        tau = tau0 * 2.0**j
        u = st.w - tau * g
        new = sp.ht(u)
        if np.array_equal(new, st.supp):
            continue
        if h is None:
            h = sp.mv(st.supp, gS)
        out = np.setdiff1d(st.supp, new, assume_unique=True)
        inn = np.setdiff1d(new, st.supp, assume_unique=True)
        r = st.r - tau * h
        if out.size:
            r += sp.mv(out, tau * g[out] - st.w[out])
        if inn.size:
            r -= tau * sp.mv(inn, g[inn])
        w = np.zeros(sp.m, dtype=np.float64)
        w[new] = u[new]
        f = sp.value(r, w)
        if f < f_ref:
            best, f_ref = _State(w, new, r, f), f
        else:
            break
    return best


def _inner(
    space: _Space, st: _State, max_iter: int, tol: float, steps: int, trace: list[float]
) -> tuple[_State, int, bool]:
    """IHT with exact line searches on one space; returns (state, iterations, converged)."""
    direction: F64 | None = None
    g2_prev = 0.0
    ridge = space.ridge
    for it in range(max_iter):
        g = space.grad(st.r, st.w)
        gS = g[st.supp]
        g2 = float(gS @ gS)
        d = -gS
        steepest = True
        if direction is not None and g2_prev > 0:
            cand = -gS + (g2 / g2_prev) * direction
            if float(cand @ gS) < 0:
                d, steepest = cand, False
        q = space.mv(st.supp, d)
        h = -q if steepest else None
        slope = float(gS @ d)
        curv = float(q @ q) + ridge * float(d @ d)
        best: _State | None = None
        if slope < 0 and curv > 0:
            tau = -slope / curv
            w = st.w.copy()
            w[st.supp] += tau * d
            r = st.r + tau * q
            best = _State(w, st.supp, r, space.value(r, w))
        cand_state = None
        lc = space.l_change(st.w, g, st.supp)
        if math.isfinite(lc):
            cand_state = _search(space, st, g, max(lc * (1 + 1e-6), space.tau_floor), steps, h)
        changed = False
        if cand_state is not None and (best is None or cand_state.f < best.f):
            best, changed = cand_state, True
        if best is None or not best.f < st.f:
            return st, it + 1, True
        rel = (st.f - best.f) / max(abs(st.f), 1e-300)
        if changed:
            direction, g2_prev = None, 0.0
        else:
            direction, g2_prev = d, g2
        st = best
        trace.append(st.f)
        if not changed and rel <= tol:
            return st, it + 1, True
    return st, max_iter, False


def _gram(mat: FloatArray) -> F64:
    """``matᵀmat`` (m × m) accumulated in float64 over row chunks.  mat: (n, m)."""
    n, m = mat.shape
    G = np.zeros((m, m), dtype=np.float64)
    for a, b in _chunks(n, m):
        Xc = np.asarray(mat[a:b], dtype=np.float64)
        G += Xc.T @ Xc
    return G


def _cholesky(H: F64) -> F64:
    """Lower Cholesky factor of the SPD ``H``, with escalating jitter if it is numerically singular."""
    jitter = 0.0
    scale = max(float(np.trace(H)) / max(H.shape[0], 1), 1e-300)
    for attempt in range(8):
        try:
            M = H if jitter == 0.0 else H + jitter * np.eye(H.shape[0])
            return np.asarray(np.linalg.cholesky(M), dtype=np.float64)
        except np.linalg.LinAlgError:
            jitter = scale * 10.0 ** (attempt - 12)
    raise SolverError("CHITA swap step: the support system is not positive definite (NaN in X?)")


def _inner_swap(
    space: _Space, st: _State, max_iter: int, tol: float, steps: int, trace: list[float], y: F64
) -> tuple[_State, int, bool]:
    """Swap search with exact re-fits on the Gram of the space (for small supports).

    Every candidate support is scored by its exact re-fitted objective ``f*(S)`` (a k × k Cholesky
    on ``G = X_AᵀX_A``).  Candidates: the budget-feasible top-k of OBS-style scores — removal cost
    ``w_j²/(2[H_S⁻¹]_jj)`` for kept ``j``, entering gain ``γ·g_i²/(2·Schur_i)`` for the others — for
    ``γ`` log-spaced from the first support change up to 1 (all individually favourable swaps).
    """
    lam = space.ridge
    G = _gram(space.mat)
    wb = space.wb
    al = space.alpha
    q = rmatvec(space.mat, y)  # y = X w̄ (n,), the same for every space so values stay comparable
    yy = float(y @ y)
    pen = 0.5 * lam * wb**2 - (0.0 if al is None else al * wb)  # cost of pruning each coordinate
    pen_total = float(pen.sum()) + space.const
    free = np.arange(space.m, dtype=np.int64) if space.free is None else space.free

    def refit(S: IntArray) -> tuple[float, F64, F64]:
        GSS = G[np.ix_(S, S)]
        wbS = wb[S]
        Gw = GSS @ wbS
        b = q[S] - Gw - (0.0 if al is None else al[S])
        c2 = yy - 2.0 * float(wbS @ q[S]) + float(wbS @ Gw)
        H = GSS.copy()
        H[np.diag_indices_from(H)] += lam
        L = _cholesky(H)
        z = sla.solve_triangular(L, b, lower=True, check_finite=False)
        u = sla.solve_triangular(L.T, z, lower=False, check_finite=False)
        f = 0.5 * c2 - 0.5 * float(z @ z) + pen_total - float(pen[S].sum())
        return f, wbS + u, L

    def adopt(S: IntArray, wS: F64) -> None:
        w_new = np.zeros(space.m, dtype=np.float64)
        w_new[S] = wS
        ch = np.flatnonzero(w_new != st.w)
        st.r = st.r + space.mv(ch, w_new[ch] - st.w[ch])
        st.w, st.supp = w_new, S

    # Values here are the re-fitted f* (Gram-based); the trace only records decreases of it.
    f, wS, L = refit(st.supp)
    noise = 1e-13 * (abs(yy) + abs(pen_total))
    adopt(st.supp, wS)
    st.f = f
    if not trace or f < trace[-1]:
        trace.append(f)
    for it in range(max_iter):
        S = st.supp
        g = G[:, S] @ st.w[S] - q + lam * (st.w - wb) + (0.0 if al is None else al)
        Linv = sla.solve_triangular(L, np.eye(S.size), lower=True, check_finite=False)
        hinv = np.einsum("ij,ij->j", Linv, Linv)
        kept = np.zeros(space.m, dtype=bool)
        kept[S] = True
        N = free[~kept[free]]
        if N.size == 0:
            return st, it, True
        # Entering gains need the Schur complement G_ii + λ − G_iS H⁻¹ G_Si; compute it only for the
        # most promising non-kept coordinates (by the un-refitted gain, a lower bound).
        cheap = g[N] ** 2 / np.maximum(np.diag(G)[N] + lam, 1e-300)
        top = max(32, S.size // 4)
        if N.size > top:
            N = N[np.argpartition(-cheap, top - 1)[:top]]
        Z = sla.solve_triangular(L, G[np.ix_(S, N)], lower=True, check_finite=False)
        schur = np.maximum(G[N, N] + lam - np.einsum("ij,ij->j", Z, Z), 1e-300)
        remove = np.zeros(space.m, dtype=np.float64)
        remove[S] = st.w[S] ** 2 / (2.0 * hinv)
        enter = np.zeros(space.m, dtype=np.float64)
        enter[N] = g[N] ** 2 / (2.0 * schur)
        g0 = space.l_change(remove, enter, S)
        if not math.isfinite(g0):
            return st, it, True
        g0 = max(g0, 1e-12)
        hi = max(1.0, 2.0 * g0)
        gammas = np.geomspace(g0 * (1 + 1e-9), hi, num=max(steps, 2))
        best: tuple[float, IntArray, F64, F64] | None = None
        last: IntArray | None = None
        for gam in gammas:  # growing swap sets; stop once the re-fitted value gets worse
            S2 = space.ht(remove + gam * enter)
            if np.array_equal(S2, S) or (last is not None and np.array_equal(S2, last)):
                continue
            last = S2
            f2, w2, L2 = refit(S2)
            if best is None or f2 < best[0]:
                best = (f2, S2, w2, L2)
            else:
                break
        if best is None or not best[0] < st.f - noise:
            return st, it + 1, True
        rel = (st.f - best[0]) / max(abs(st.f), 1e-300)
        adopt(best[1], best[2])
        st.f, L = best[0], best[3]
        trace.append(st.f)
        if rel <= tol:
            return st, it + 1, True
    return st, max_iter, False


@dataclass
class _Context:
    """What the active-set driver needs besides the iterate."""

    X: FloatArray
    full: _Space
    budget_nz: Budget
    wb: F64
    alpha: F64 | None
    ridge: float
    colsq: F64
    nonzero: NDArray[np.bool_]
    tol: float
    steps: int
    grow: float
    swap: bool

    def space(self, A: IntArray) -> _Space:
        return _make_space(self.X, A, None, self.budget_nz, self.wb, self.alpha, self.ridge, self.colsq)


def _screen(ctx: _Context, A: IntArray, fs: _State, g: F64, count: int) -> IntArray:
    """Up to ``count`` coordinates outside ``A`` with the largest single-coordinate gain
    ``g_i²/2(‖X_i‖²+λ)``; for the IHT only those above the cheapest single removal
    ``min_j (½(‖X_j‖²+λ)w_j² − g_j w_j)`` (the swap search re-fits, so it takes the top ones)."""
    if count <= 0 or fs.supp.size == 0:
        return np.empty(0, dtype=np.int64)
    ws = fs.w[fs.supp]
    cost = -math.inf if ctx.swap else float(np.min(0.5 * (ctx.colsq[fs.supp] + ctx.ridge) * ws**2 - g[fs.supp] * ws))
    outside = ctx.nonzero.copy()
    outside[A] = False
    idx = np.flatnonzero(outside)
    den = ctx.colsq[idx] + ctx.ridge
    gain = 0.5 * g[idx] ** 2 / np.where(den > 0, den, 1.0)
    keep = gain > cost
    idx, gain = idx[keep], gain[keep]
    if idx.size > count:
        idx = idx[np.argpartition(-gain, count - 1)[:count]]
    return np.sort(idx).astype(np.int64)


def _iht(
    ctx: _Context,
    A: IntArray | None,
    w_start: F64,
    supp0: IntArray,
    max_iter: int,
    max_outer: int,
    trace: list[float],
) -> tuple[IntArray, F64, int, int, bool, int]:
    """Inner IHT on the active set ``A`` (``None``: all columns) and the outer growth rounds.

    Returns ``(support columns, w (p,), iterations, outer rounds, converged, final |A|)``.
    """
    X, full = ctx.X, ctx.full
    p = X.shape[1]
    k = int(supp0.shape[0])
    r = matvec(X, w_start - ctx.wb)
    space = full if A is None else ctx.space(A)
    pos = supp0 if A is None else np.searchsorted(A, supp0).astype(np.int64)
    st = _State(w_start[space.cols], pos, r, 0.0)
    st.f = space.value(st.r, st.w)
    y = matvec(X, ctx.wb) if ctx.swap else r
    if not ctx.swap:
        trace.append(st.f)
    iters = outer = 0
    screened_only = False
    while True:
        before = space.cols[st.supp]
        if ctx.swap:
            st, it, conv = _inner_swap(space, st, max_iter - iters, ctx.tol, ctx.steps, trace, y)
        else:
            st, it, conv = _inner(space, st, max_iter - iters, ctx.tol, ctx.steps, trace)
        iters += it
        w_full = np.zeros(p, dtype=np.float64)
        w_full[space.cols] = st.w
        supp_cols = space.cols[st.supp]
        if A is None:
            return supp_cols, w_full, iters, outer, conv, space.m
        if screened_only and np.array_equal(before, supp_cols):
            # The coordinates added by screening alone were not taken: stop growing.
            return supp_cols, w_full, iters, outer, conv, space.m
        if iters >= max_iter or outer >= max_outer:
            return supp_cols, w_full, iters, outer, conv and iters < max_iter and max_outer == 0, space.m
        # Outer round over every coordinate: exact residual, one full gradient (O(n·p)).
        outer += 1
        r_full = matvec(X, w_full - ctx.wb)
        fs = _State(w_full, supp_cols, r_full, full.value(r_full, w_full))
        g = full.grad(fs.r, fs.w)
        cand = None
        if not ctx.swap:  # (the swap search re-fits; an un-refitted HT candidate rarely beats it)
            lc = full.l_change(fs.w, g, fs.supp)
            cand = _search(full, fs, g, max(lc * (1 + 1e-6), full.tau_floor), max(ctx.steps, 10), None)
        new_cols = np.empty(0, dtype=np.int64) if cand is None else np.setdiff1d(cand.supp, A)
        grown = np.union1d(A, new_cols)
        screened = _screen(ctx, grown, fs, g, math.ceil(ctx.grow * k))
        log.debug(
            "CHITA outer %d: candidate %s, %d + %d new coordinates",
            outer,
            "none" if cand is None else f"f {fs.f:.6g} → {cand.f:.6g}",
            new_cols.size,
            screened.size,
        )
        if cand is None and screened.size == 0:
            return supp_cols, w_full, iters, outer, conv, space.m
        screened_only = cand is None
        A = np.union1d(grown, screened).astype(np.int64)
        space = ctx.space(A)
        nxt = fs if cand is None else cand
        st = _State(nxt.w[A], np.searchsorted(A, nxt.supp).astype(np.int64), nxt.r, 0.0)
        st.f = space.value(st.r, st.w)
        if not ctx.swap:
            trace.append(st.f)


# --------------------------------------------------------------------------------------------------
# The solver


def column_scan(X: FloatArray) -> tuple[NDArray[np.bool_], F64]:
    """``(nonzero, ‖X_j‖²)`` per column in one chunked pass; raises on NaN/inf.  X: (n, p)."""
    n, p = X.shape
    nonzero = np.zeros(p, dtype=bool)
    colsq = np.zeros(p, dtype=np.float64)
    for a, b in _chunks(p, n):
        Xc = X[:, a:b]
        if not np.isfinite(Xc).all():
            bad = a + int(np.flatnonzero(~np.isfinite(Xc).all(axis=0))[0])
            raise SolverError(f"X contains NaN or infinity (column {bad})")
        nonzero[a:b] = (Xc != 0).any(axis=0)
        colsq[a:b] = np.einsum("ij,ij->j", Xc, Xc, dtype=np.float64)
    return nonzero, colsq


def _solve(
    X: FloatArray,
    wb: F64,
    budget: Budget,
    ridge: float,
    alpha: F64 | None,
    *,
    max_iter: int,
    tol: float,
    active_set: bool,
    active_factor: float,
    max_outer: int,
    search_steps: int,
    grow: float,
    init: Init,
    start: Start = "magnitude",
    method: Method = "auto",
    swap_max_k: int = 500,
    warn: bool = True,
    offset: F64 | None = None,
    alpha_own: F64 | None = None,
    max_rounds: int | None = None,
) -> SolverResult:
    """The solver proper on validated inputs (``wb``, ``alpha`` float64; X float32/float64).

    With row offsets ``b`` (``offset``), ``alpha`` is the whole first-order term ``α + Xᵀb`` and
    ``alpha_own`` the ``α`` part (the exchange search keeps ``Xᵀb`` in its least-squares form)."""
    t0 = time.perf_counter()
    p = X.shape[1]
    k = budget.k
    if k == 0 or k == p:
        w = np.zeros(p, dtype=np.float32)
        supp = np.arange(p, dtype=np.int64) if k == p else np.empty(0, dtype=np.int64)
        if k == p:
            w = wb.astype(np.float32) if alpha is None else ridge_backsolve(X, wb, supp, ridge, alpha)
        f = objective(X, w, wb, ridge, alpha)
        return SolverResult(w, supp, f, (f,), 0, True, "chita", {"time_s": time.perf_counter() - t0})

    use_exchange = ridge > 0 and (method == "exchange" or (method == "auto" and k > swap_max_k))
    if use_exchange and start != "obd":
        # The exchange search needs neither the column norms nor the zero-column split: one pass
        # (a column sum) is enough to refuse NaN/inf, and the full scan only runs to name the column.
        if not np.all(np.isfinite(rmatvec(X, np.ones(X.shape[0])))):
            column_scan(X)
            raise SolverError("X contains NaN or infinity")
        nonzero, colsq, zero_columns = np.ones(p, dtype=bool), np.zeros(p), -1
    else:
        nonzero, colsq = column_scan(X)
        zero_columns = int(p - np.count_nonzero(nonzero))
    if ridge > 0:
        # An identically zero gradient column still costs (λ/2)(w̄ − α/λ)² in f when its weight is
        # pruned: with λ > 0 it competes for the budget like any other weight (the reference drops
        # such weights up front, which minimises a different objective than the f reported).
        nonzero = np.ones(p, dtype=bool)
    budget_nz, zkeep = split_zero_columns(budget, nonzero, wb)
    k_nz = budget_nz.k
    elig = np.flatnonzero(nonzero).astype(np.int64)
    all_nonzero = elig.shape[0] == p
    # Zero columns kept: their optimum is w̄ − α/λ, independent of everything else.
    w_zero = wb[zkeep].copy()
    if alpha is not None and ridge > 0:
        w_zero -= alpha[zkeep] / ridge

    full = _make_space(X, None, None if all_nonzero else elig, budget_nz, wb, alpha, ridge, colsq)
    if alpha is None:
        v0 = wb
    else:
        qa = matvec(X, alpha)
        den = float(qa @ qa) + ridge * float(alpha @ alpha)
        v0 = wb - (float(alpha @ alpha) / den if den > 0 else 0.0) * alpha
    # The starting support and the active set rank coordinates by |v0| ("magnitude") or by the OBD
    # saliency (‖X_j‖² + λ)·v0_j², the model's loss increase when j alone is pruned ("obd").
    score0 = np.sqrt(colsq + ridge) * np.abs(v0) if start == "obd" else v0
    supp0 = full.ht(score0) if k_nz else np.empty(0, dtype=np.int64)

    trace: list[float] = []
    mode = "none"
    iters = outer = a_size = 0
    converged = True
    w_first: F64 | None = None  # the backsolve on the starting support, reused if the support never moves
    first_support = supp0
    exchange_info: dict[str, float | int | str] = {}
    if k_nz in (0, elig.shape[0]):
        supp_cols = supp0
    elif use_exchange:
        # Exchange search in the Woodbury form: exact scores and exact re-fits, any k (see exchange.py).
        mode = "exchange"
        ex = exchange_search(
            X,
            wb,
            budget_nz,
            ridge,
            alpha if offset is None else alpha_own,
            supp0,
            max_iter=max_iter if max_rounds is None else min(max_iter, max_rounds),
            tol=max(tol, EXCHANGE_TOL),
            offset=offset,
        )
        iters, converged, a_size, supp_cols, w_iter = ex.iterations, ex.converged, p, ex.support, ex.w
        converged = converged or (max_rounds is not None and iters >= max_rounds)  # a cap asked for
        trace.extend(ex.trace)
        w_first, first_support = ex.w, supp_cols  # the exact minimiser on the support found
        exchange_info = {"swaps": ex.swaps, **ex.info}
    else:
        if method == "exchange":
            log.warning("CHITA: the exchange search needs ridge > 0; using IHT")
        if init == "backsolve":
            w_start = ridge_backsolve(X, wb, supp0, ridge, alpha).astype(np.float64)
            w_first = w_start
        else:
            w_start = np.zeros(p, dtype=np.float64)
            w_start[supp0] = v0[supp0]
        m0 = min(elig.shape[0], max(k_nz, math.ceil(active_factor * k_nz)))
        A: IntArray | None = None
        if active_set and m0 <= _FULL_SPACE_FRACTION * p:
            rest = np.setdiff1d(elig, supp0, assume_unique=True)
            extra = m0 - k_nz
            rest = rest[np.argpartition(-np.abs(score0[rest]), extra - 1)[:extra]] if extra > 0 else rest[:0]
            A = np.union1d(supp0, rest).astype(np.int64)
        # The swap search holds the Gram of its space: only for small supports and spaces.
        space_size = p if A is None else A.shape[0]
        swap = (method == "swap" or (method != "iht" and k_nz <= swap_max_k)) and (
            space_size <= 8 * max(swap_max_k, 1)
        )
        if method == "swap" and not swap:
            log.warning("CHITA: the swap search would need a %d² Gram matrix; using IHT", space_size)
        ctx = _Context(X, full, budget_nz, wb, alpha, ridge, colsq, nonzero, tol, search_steps, grow, swap)
        mode = "swap" if swap else "iht"
        st_cols, w_iter, iters, outer, converged, a_size = _iht(ctx, A, w_start, supp0, max_iter, max_outer, trace)
        supp_cols = st_cols

    support = np.union1d(supp_cols, zkeep).astype(np.int64)
    if w_first is not None and zkeep.shape[0] == 0 and np.array_equal(support, np.sort(first_support)):
        w_bs = w_first.astype(np.float32)  # the exact minimiser on this very support, already computed
    else:
        w_bs = ridge_backsolve(X, wb, support, ridge, alpha)
    f_bs = objective(X, w_bs, wb, ridge, alpha)
    if trace:
        w_pre = w_iter.astype(np.float32)
        w_pre[zkeep] = w_zero
        f_pre = objective(X, w_pre, wb, ridge, alpha)
        # The IHT ran with the kept zero columns pruned: shift its trace by their (constant) gain.
        shift = f_pre - trace[-1]
        trace = [t + shift for t in trace]
        if not f_bs <= f_pre:
            # Only rounding can do this (the backsolve is the exact minimiser on the support), unless
            # the linear algebra broke down: then say so.
            level = logging.WARNING if f_bs > f_pre + 1e-6 * abs(f_pre) else logging.DEBUG
            log.log(level, "CHITA: backsolve raised f from %.9g to %.9g; keeping the iterate", f_pre, f_bs)
            w_bs, f_bs = w_pre, f_pre
    filled = fill_idle_slots(np.asarray(w_bs, dtype=np.float32), support, wb, budget)
    if filled is not support:
        w_fill = ridge_backsolve(X, wb, filled, ridge, alpha)
        f_fill = objective(X, w_fill, wb, ridge, alpha)
        if f_fill <= f_bs + 1e-9 * max(1.0, abs(f_bs)):
            log.info("CHITA: %d idle support slots refilled with existing weights", np.setdiff1d(filled, support).size)
            w_bs, support, f_bs = w_fill, filled, min(f_fill, f_bs)
    trace.append(f_bs)
    if not converged and warn:
        log.warning("CHITA did not converge in %d iterations / %d outer rounds (f = %.6g)", iters, outer, f_bs)
    info: dict[str, float | int | str] = {
        "time_s": time.perf_counter() - t0,
        "mode": mode,
        "outer_iterations": outer,
        "active_set_size": a_size,
        "zero_columns": zero_columns,  # -1: not counted (exchange search)
        "zero_columns_kept": int(zkeep.shape[0]),
        "new_vs_start": int(np.setdiff1d(supp_cols, supp0, assume_unique=True).shape[0]),
        "objective_before_backsolve": trace[-2] if len(trace) > 1 else f_bs,
        **exchange_info,
    }
    return SolverResult(
        w=np.asarray(w_bs, dtype=np.float32),
        support=support,
        objective=f_bs,
        trace=tuple(trace),
        iterations=iters,
        converged=converged,
        method="chita",
        info=info,
    )


def chita_iht(
    X: FloatArray,
    w_bar: FloatArray,
    budget: Budget,
    ridge: float,
    alpha: FloatArray | None = None,
    *,
    max_iter: int = 300,
    tol: float = 1e-6,
    active_set: bool = True,
    active_factor: float = 1.5,
    max_outer: int = 10,
    grow: float = 0.25,
    search_steps: int = 5,
    init: Init = "backsolve",
    start: Start = "magnitude",
    method: Method = "auto",
    swap_max_k: int = 500,
    offset: FloatArray | None = None,
    max_rounds: int | None = None,
) -> SolverResult:
    """Prune with CHITA-IHT: minimise ``f`` under ``budget``, then backsolve on the chosen support.

    ``f(w) = ½‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)``.

    Args:
        X: ``(n, p)`` float32 or float64 gradients scaled by 1/√n.  Used in place (a float32 X is
            never copied to float64); other float dtypes are converted to float32.
        w_bar: ``(p,)`` trained weights.
        budget: the sparsity budget (``k`` and per-segment bounds).
        ridge: ``λ ≥ 0``.
        alpha: ``(p,)`` first-order term or ``None``.
        max_iter: cap on inner IHT iterations (all active-set rounds together).
        tol: stop an inner loop when the support is stable and ``f`` drops by less than ``tol·|f|``.
        active_set: restrict the inner loop to an active set (otherwise all columns, no copy).
        active_factor: initial active-set size as a multiple of ``k``.
        max_outer: cap on active-set growth rounds.
        grow: each growth round also adds up to ``⌈grow·k⌉`` outside coordinates whose
            single-coordinate gain beats the cheapest single removal (gradient screening).
        search_steps: step doublings tried by the support-changing search.
        init: ``"backsolve"`` (start at the exact fit on the starting support) or ``"magnitude"``.
        start: how the starting support and the active set are ranked: ``"magnitude"`` (``|w̄|``;
            the result is then never worse than magnitude pruning + backsolve) or ``"obd"`` (the
            saliency ``(‖X_j‖² + λ)·w̄_j²``, the model's loss increase of pruning ``j`` alone).
        method: support search — ``"exchange"`` (exact exchanges in the Woodbury form, any ``k``,
            needs λ > 0; :mod:`.exchange`), ``"iht"`` (step-size IHT, ``O(n·|A|)`` per iteration),
            ``"swap"`` (exact re-fit of every candidate support on the Gram of the active set,
            ``O(n·|A|²)`` once plus ``O(k³)`` per candidate), or ``"auto"``: swap when
            ``k ≤ swap_max_k``, otherwise exchange (IHT when λ = 0).
        swap_max_k: largest ``k`` for which ``"auto"`` uses the swap search.
        offset: ``(n,)`` row offsets ``b``: minimise ``½‖X(w − w̄) + b‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)``
            instead, i.e. ``f`` with the first-order term ``α + Xᵀb`` (reported that way).  This is
            the Gauss-Newton form of a least-squares model (e.g. the KL to a reference model, see
            ``--distill``): its linear term lies in the row space of ``X``.
        max_rounds: cap on the exchange search's outer rounds (``None``: ``max_iter``); each round is
            a full gradient, a run of exchanges and an exact re-fit.

    Returns:
        :class:`SolverResult` with ``w`` ``(p,)`` float32, sorted ``support``, final ``objective``,
        the non-increasing ``trace`` (last entry after the backsolve), ``converged`` (``False`` plus
        a logged warning when a cap was hit) and ``info`` (timing, active-set size, swaps, ...).

    Cost: ``O(n·|A|)`` per inner iteration, ``O(n·p)`` per outer round, ``O(n²k + n³)`` per backsolve
    when ``k > n``; memory ``O(n·|A| + n²)`` beyond ``X``.
    """
    Xa, wb, a64, ridge_f = _validate(X, w_bar, budget, ridge, alpha)
    _validate_options(
        max_iter=max_iter,
        tol=tol,
        max_outer=max_outer,
        search_steps=search_steps,
        grow=grow,
        active_factor=active_factor,
        init=init,
        method=method,
        swap_max_k=swap_max_k,
    )
    if start not in ("magnitude", "obd"):
        raise SolverError(f"start must be 'magnitude' or 'obd', got {start!r}")
    b64: F64 | None = None
    a_all = a64
    if offset is not None:
        b64 = np.array(offset, dtype=np.float64)
        if b64.shape != (Xa.shape[0],) or not np.all(np.isfinite(b64)):
            raise SolverError(f"offset must be a finite ({Xa.shape[0]},) vector, got shape {b64.shape}")
        a_all = rmatvec(Xa, b64) if a64 is None else a64 + rmatvec(Xa, b64)
    return _solve(
        Xa,
        wb,
        budget,
        ridge_f,
        a_all,
        max_iter=int(max_iter),
        tol=float(tol),
        active_set=bool(active_set),
        active_factor=float(active_factor),
        max_outer=int(max_outer),
        search_steps=int(search_steps),
        grow=float(grow),
        init=init,
        start=start,
        method=method,
        swap_max_k=int(swap_max_k),
        offset=b64,
        alpha_own=a64,
        max_rounds=max_rounds,
    )


def _validate_options(
    *,
    max_iter: int = 0,
    tol: float = 0.0,
    max_outer: int = 0,
    search_steps: int = 1,
    grow: float = 0.0,
    active_factor: float = 1.0,
    init: str = "backsolve",
    method: str = "auto",
    swap_max_k: int = 0,
) -> None:
    """Check the solver options; raises :class:`SolverError` naming the bad value."""

    def is_int(v: object) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    if not is_int(max_iter) or max_iter < 0:
        raise SolverError(f"max_iter must be an integer ≥ 0, got {max_iter!r}")
    if not is_int(max_outer) or max_outer < 0:
        raise SolverError(f"max_outer must be an integer ≥ 0, got {max_outer!r}")
    if not is_int(search_steps) or search_steps < 1:
        raise SolverError(f"search_steps must be an integer ≥ 1, got {search_steps!r}")
    for name, val, lo in (("tol", tol, 0.0), ("grow", grow, 0.0), ("active_factor", active_factor, 1.0)):
        if not isinstance(val, int | float | np.floating) or not (np.isfinite(val) and val >= lo):
            raise SolverError(f"{name} must be a finite number ≥ {lo:g}, got {val!r}")
    if init not in ("backsolve", "magnitude"):
        raise SolverError(f"init must be 'backsolve' or 'magnitude', got {init!r}")
    if method not in ("auto", "iht", "swap", "exchange"):
        raise SolverError(f"method must be 'auto', 'iht', 'swap' or 'exchange', got {method!r}")
    if not is_int(swap_max_k) or swap_max_k < 0:
        raise SolverError(f"swap_max_k must be an integer ≥ 0, got {swap_max_k!r}")


def _validate(
    X: FloatArray, w_bar: FloatArray, budget: Budget, ridge: float, alpha: FloatArray | None
) -> tuple[FloatArray, F64, F64 | None, float]:
    """Shared input checks; returns X (float32/float64, not copied if already so), w̄, α, λ."""
    if not isinstance(budget, Budget):
        raise SolverError(f"budget must be a Budget, got {type(budget).__name__}")
    Xa = np.asarray(X)
    if not np.issubdtype(Xa.dtype, np.floating):
        raise SolverError(f"X must be a floating-point array, got dtype {Xa.dtype}")
    if Xa.dtype not in (np.float32, np.float64):
        Xa = Xa.astype(np.float32)
    wb = np.array(w_bar, dtype=np.float64)
    a64 = None if alpha is None else np.array(alpha, dtype=np.float64)
    try:
        ridge_f = float(ridge)
    except (TypeError, ValueError):
        raise SolverError(f"ridge must be a number, got {ridge!r}") from None
    budget.validated()
    check_problem(Xa, wb, budget, ridge_f, a64)
    if a64 is not None and not np.all(np.isfinite(a64)):
        raise SolverError("alpha contains NaN or infinity")
    return Xa, wb, a64, ridge_f
