"""Group-sparse channel selection on the layer-wise reconstruction objective (pure NumPy).

A channel group is read by one or more consumer layers.  For consumer ``ℓ`` with input rows ``ã``
(its columns: every input channel × kernel offset, plus a constant 1 for the bias) and dense target
outputs ``y``, the statistics are ``H_ℓ = Σ ã ãᵀ``, ``G_ℓ = Σ ã yᵀ`` and ``yy_ℓ = Σ ‖y‖²``.  Keeping the
channel set ``S`` (all columns of those channels, plus the columns that are not up for selection)
and re-fitting the consumer costs

    E_ℓ(S) = min_B ‖Y − Ã_S B‖² + λ_ℓ‖B‖² = yy_ℓ − tr(G_Sᵀ (H_SS + λ_ℓ I)⁻¹ G_S),

and the objective is ``f(S) = Σ_ℓ w_ℓ E_ℓ(S)`` (``w_ℓ`` normalises each consumer, e.g. 1/yy_ℓ) subject
to ``|S| = k`` — the group-sparse (channel-structured) version of CHITA's quadratic objective, in the
layer-wise form of OSSCAR (Meng et al., ICML 2024).  It is minimised combinatorially:

1. **backward elimination**: starting from all channels, repeatedly remove the channels whose exact
   removal cost ``tr(B_Jᵀ (M_JJ)⁻¹ B_J)`` (``M = (H_SS + λI)⁻¹``, ``B = M G_S``, ``J`` = the channel's
   columns) is smallest, with an exact rank-|J| downdate of ``M`` and ``B``;
2. **swap local search**: evaluate exactly, for the most promising removed channels ``c'`` and every
   kept channel ``c``, the objective after adding ``c'`` and removing ``c`` (bordered-inverse update
   then removal cost), and apply the best improving swap until none improves.

The result carries the re-fitted coefficients ``B`` of every consumer on its kept columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..errors import SolverError

#: Relative damping λ = DAMP · mean(diag H), the value SparseGPT and OBC use for layer-wise Hessians.
DAMP = 0.01


@dataclass(frozen=True)
class ChannelProblem:
    """One consumer's statistics.

    ``channel[j]`` is the channel (0..n_channels-1) of column ``j`` of ``H``, or -1 for a column that
    always stays (the intercept, or input channels outside the group).  ``weight`` scales its error.
    """

    H: NDArray[np.float64]
    G: NDArray[np.float64]
    yy: float
    channel: NDArray[np.int64]
    weight: float = 1.0


@dataclass(frozen=True)
class ChannelSelection:
    """Kept channels (sorted), and for each problem its kept columns and re-fitted ``B`` (q_S × out).

    ``objective`` is ``Σ w_ℓ E_ℓ`` at the result; ``start_objective`` with every channel kept.
    """

    kept: NDArray[np.int64]
    columns: tuple[NDArray[np.int64], ...]
    coefs: tuple[NDArray[np.float64], ...]
    objective: float
    start_objective: float
    swaps: int


class _State:
    """Inverse ``M = (H_SS + λI)⁻¹`` and ``B = M G_S`` of one problem on its current column set."""

    def __init__(self, p: ChannelProblem, damp: float) -> None:
        self.p = p
        diag = np.diag(p.H)
        self.lam = damp * float(np.mean(diag)) if diag.size and np.mean(diag) > 0 else damp
        self.cols = np.arange(p.H.shape[0], dtype=np.int64)
        self.refresh()

    def refresh(self) -> None:
        H = self.p.H[np.ix_(self.cols, self.cols)] + self.lam * np.eye(self.cols.size)
        try:
            L = np.linalg.cholesky(H)
            Linv = np.linalg.solve(L, np.eye(self.cols.size))
            self.M = Linv.T @ Linv
        except np.linalg.LinAlgError:
            self.M = np.linalg.pinv(H)
        self.B = self.M @ self.p.G[self.cols]

    def error(self) -> float:
        """``E(S) = yy − tr(G_Sᵀ B)`` (ridge-regularised residual)."""
        return float(self.p.yy - np.sum(self.p.G[self.cols] * self.B))

    def positions(self, channel: int) -> NDArray[np.int64]:
        return np.flatnonzero(self.p.channel[self.cols] == channel)

    def remove(self, pos: NDArray[np.int64]) -> None:
        """Drop the columns at positions ``pos`` of ``cols`` (exact downdate)."""
        if pos.size == 0:
            return
        keep = np.setdiff1d(np.arange(self.cols.size), pos)
        Mrr = self.M[np.ix_(pos, pos)]
        Mkr = self.M[np.ix_(keep, pos)]
        X = np.linalg.solve(Mrr, np.hstack([Mkr.T, self.B[pos]]))
        self.M = self.M[np.ix_(keep, keep)] - Mkr @ X[:, : keep.size]
        self.B = self.B[keep] - Mkr @ X[:, keep.size :]
        self.cols = self.cols[keep]

    def add(self, cols: NDArray[np.int64]) -> None:
        self.cols = np.sort(np.concatenate([self.cols, cols]))
        self.refresh()


def _index(state: _State, channels: NDArray[np.int64]) -> list[tuple[NDArray[np.int64], NDArray[np.int64]]]:
    """Column positions of each channel, batched by count: ``[(which channels, positions (n_c, m))]``."""
    ch = state.p.channel[state.cols]
    if not channels.size:
        return []
    order = np.argsort(ch, kind="stable")
    sorted_ch = ch[order]
    starts = np.searchsorted(sorted_ch, channels, side="left")
    stops = np.searchsorted(sorted_ch, channels, side="right")
    sizes = stops - starts
    out = []
    for m in np.unique(sizes[sizes > 0]):
        which = np.flatnonzero(sizes == m)
        out.append((which, np.stack([order[starts[w] : stops[w]] for w in which])))
    return out


def _removal_costs(state: _State, channels: NDArray[np.int64]) -> NDArray[np.float64]:
    """Exact increase of ``E`` when each channel's columns are dropped (0 if it has none here)."""
    costs = np.zeros(channels.size)
    for which, idx in _index(state, channels):
        Mjj = state.M[idx[:, :, None], idx[:, None, :]]
        Bj = state.B[idx]  # (n_c, m, out)
        costs[which] = np.einsum("cmo,cmo->c", Bj, np.linalg.solve(Mjj, Bj))
    return costs


_AddTerms = tuple[NDArray[np.int64], NDArray[np.float64], NDArray[np.float64], NDArray[np.float64], float]


def _add_terms(state: _State, channel: int) -> _AddTerms | None:
    """For adding the (absent) columns of ``channel``: its columns, ``U = M H_{S,J'}``, ``Q⁻¹``, ``R``, gain."""
    p = state.p
    jn = np.flatnonzero(p.channel == channel)
    jn = jn[~np.isin(jn, state.cols)]
    if jn.size == 0:
        return None
    Hsj = p.H[np.ix_(state.cols, jn)]
    U = state.M @ Hsj
    Q = p.H[np.ix_(jn, jn)] + state.lam * np.eye(jn.size) - Hsj.T @ U
    R = p.G[jn] - Hsj.T @ state.B
    Qinv = np.asarray(np.linalg.inv(Q), dtype=np.float64)
    gain = float(np.sum(R * (Qinv @ R)))
    return jn.astype(np.int64), U, Qinv, R, gain


def select_channels(
    problems: Sequence[ChannelProblem],
    n_channels: int,
    k: int,
    *,
    blocks: NDArray[np.int64] | None = None,
    damp: float = DAMP,
    max_swaps: int = 50,
    candidates: int = 16,
) -> ChannelSelection:
    """Choose ``k`` of ``n_channels`` channels minimising ``Σ w_ℓ E_ℓ``; re-fit every consumer.

    ``blocks[c]`` (optional) puts channel ``c`` in a block; every block then keeps the same number
    of channels (grouped convolutions), so ``k`` must be a multiple of the number of blocks.
    """
    if not 0 < k <= n_channels:
        raise SolverError(f"keep k={k} of {n_channels} channels: k must be in 1..{n_channels}")
    n_blocks = 1 if blocks is None else int(blocks.max()) + 1
    if k % n_blocks:
        raise SolverError(f"k={k} is not a multiple of the {n_blocks} channel blocks")
    per_block = k // n_blocks
    block_of = np.zeros(n_channels, np.int64) if blocks is None else np.asarray(blocks, np.int64)
    states = [_State(p, damp) for p in problems]
    weights = np.array([p.weight for p in problems])
    start = float(sum(w * s.error() for w, s in zip(weights, states, strict=True)))
    kept = np.ones(n_channels, dtype=bool)

    def costs_of(chs: NDArray[np.int64]) -> NDArray[np.float64]:
        total = np.zeros(chs.size)
        for w, s in zip(weights, states, strict=True):
            total += w * _removal_costs(s, chs)
        return total

    # 1. backward elimination, a shrinking number of channels per step
    while kept.sum() > k:
        alive = np.flatnonzero(kept)
        counts = np.bincount(block_of[alive], minlength=n_blocks)
        room = counts - per_block
        eligible = alive[room[block_of[alive]] > 0]
        cost = costs_of(eligible)
        excess = int(kept.sum()) - k
        step = max(1, int(np.ceil(excess / 4))) if excess > 8 else 1
        chosen: list[int] = []
        taken = np.zeros(n_blocks, np.int64)
        for c in eligible[np.argsort(cost, kind="stable")]:
            b = block_of[c]
            if taken[b] < room[b]:
                chosen.append(int(c))
                taken[b] += 1
            if len(chosen) == step:
                break
        for c in chosen:
            kept[c] = False
        for s in states:
            pos = np.flatnonzero(np.isin(s.p.channel[s.cols], chosen))
            s.remove(pos)
    for s in states:  # one exact refresh after the downdates
        s.refresh()

    # 2. swap local search (exact evaluation of each candidate swap)
    swaps = 0
    tol = max(1e-9 * abs(start), 1e-12)
    for _ in range(max_swaps):
        alive = np.flatnonzero(kept)
        dead = np.flatnonzero(~kept)
        if not dead.size or not alive.size:
            break
        gains = np.zeros(dead.size)
        terms: list[list[_AddTerms | None]] = [[] for _ in dead]
        for w, s in zip(weights, states, strict=True):
            for i, c in enumerate(dead):
                t = _add_terms(s, int(c))
                terms[i].append(t)
                if t is not None:
                    gains[i] += w * t[4]
        index = [_index(s, alive) for s in states]
        plain = [w * _removal_costs(s, alive) for w, s in zip(weights, states, strict=True)]
        best = (tol, -1, -1)
        for i in np.argsort(-gains)[:candidates]:
            if gains[i] <= tol:
                break
            c_new = int(dead[i])
            after = np.zeros(alive.size)
            for n, (w, s, t) in enumerate(zip(weights, states, terms[i], strict=True)):
                after += plain[n] if t is None else w * _removal_costs_after_add(s, alive.size, index[n], t)
            value = np.where(block_of[alive] == block_of[c_new], gains[i] - after, -np.inf)
            j = int(np.argmax(value))
            if value[j] > best[0]:
                best = (float(value[j]), c_new, int(alive[j]))
        if best[1] < 0:
            break
        _, c_in, c_out = best
        kept[c_in], kept[c_out] = True, False
        for s in states:
            s.cols = s.cols[s.p.channel[s.cols] != c_out]
            s.add(np.flatnonzero(s.p.channel == c_in))
        swaps += 1
    objective = float(sum(w * s.error() for w, s in zip(weights, states, strict=True)))
    return ChannelSelection(
        kept=np.flatnonzero(kept).astype(np.int64),
        columns=tuple(s.cols.copy() for s in states),
        coefs=tuple(s.B.copy() for s in states),
        objective=objective,
        start_objective=start,
        swaps=swaps,
    )


def _removal_costs_after_add(
    state: _State, n: int, index: list[tuple[NDArray[np.int64], NDArray[np.int64]]], terms: _AddTerms
) -> NDArray[np.float64]:
    """Removal costs (for the channels batched in ``index``) once the columns of ``terms`` were added.

    Bordered inverse: ``M' = [[M + U Q⁻¹ Uᵀ, …], …]`` and ``B'_S = B − U Q⁻¹ R`` on the old columns.
    """
    _jn, U, Qinv, R, _gain = terms
    QR = Qinv @ R  # (m', out)
    costs = np.zeros(n)
    for which, idx in index:
        Uj = U[idx]  # (n_c, m, m')
        Mjj = state.M[idx[:, :, None], idx[:, None, :]] + Uj @ Qinv @ np.swapaxes(Uj, 1, 2)
        Bj = state.B[idx] - Uj @ QR
        costs[which] = np.einsum("cmo,cmo->c", Bj, np.linalg.solve(Mjj, Bj))
    return costs


def refit(problems: Sequence[ChannelProblem], kept: NDArray[np.int64], *, damp: float = DAMP) -> ChannelSelection:
    """The re-fit of every consumer on a given kept channel set (e.g. chosen by magnitude)."""
    kept = np.sort(np.asarray(kept, np.int64))
    states = [_State(p, damp) for p in problems]
    weights = [p.weight for p in problems]
    start = float(sum(w * s.error() for w, s in zip(weights, states, strict=True)))
    for s in states:
        ch = s.p.channel
        s.cols = np.flatnonzero((ch < 0) | np.isin(ch, kept))
        s.refresh()
    objective = float(sum(w * s.error() for w, s in zip(weights, states, strict=True)))
    return ChannelSelection(
        kept=kept,
        columns=tuple(s.cols.copy() for s in states),
        coefs=tuple(s.B.copy() for s in states),
        objective=objective,
        start_objective=start,
        swaps=0,
    )


def objective_of(problems: Sequence[ChannelProblem], kept: NDArray[np.int64], *, damp: float = DAMP) -> float:
    """``Σ w_ℓ E_ℓ(S)`` with the re-fit, for the channel set ``kept``."""
    return refit(problems, kept, damp=damp).objective
