"""Group-sparse channel selection on the layer-wise reconstruction objective (pure NumPy).

A channel group is read by one or more consumer layers.  For consumer ``ℓ`` with input rows ``ã``
(its columns: every input channel × kernel offset, plus a constant 1 for the bias), dense target
outputs ``y`` and trained weights ``W₀`` (as a q × out matrix), the statistics are
``H_ℓ = Σ ã ãᵀ``, ``G_ℓ = Σ ã yᵀ`` and ``yy_ℓ = Σ ‖y‖²``.  Keeping the channel set ``S`` (all columns
of those channels, plus the columns that are not up for selection) and re-fitting the consumer costs

    E_ℓ(S) = min_B ‖Y − Ã_S B‖² + λ_ℓ ‖B − W₀,S‖²
           = yy_ℓ + λ_ℓ‖W₀,S‖² − tr(G̃_Sᵀ (H_SS + λ_ℓ I)⁻¹ G̃_S),   G̃ = G + λ_ℓ W₀,

the group-sparse (channel-structured) version of CHITA's objective — a quadratic with a trust
region around the trained weights — in the layer-wise form of OSSCAR (Meng et al., ICML 2024).
The objective is ``f(S) = Σ_ℓ w_ℓ E_ℓ(S)`` (``w_ℓ`` normalises each consumer, e.g. 1/yy_ℓ) subject
to ``|S| = k``.  It is minimised combinatorially:

1. **backward elimination**: starting from all channels, repeatedly remove the channels whose exact
   removal cost ``tr(B_Jᵀ (M_JJ)⁻¹ B_J) − λ‖W₀,J‖²`` (``M = (H_SS + λI)⁻¹``, ``B = M G̃_S``, ``J`` the
   channel's columns) is smallest, with an exact rank-|J| downdate of ``M`` and ``B``;
2. **swap local search**: for the removed channels with the largest exact gain and every kept
   channel, evaluate exactly the objective after the swap (bordered-inverse update, then the
   removal cost) and apply the best improving swap, until none improves.

The result carries the re-fitted ``B`` of every consumer on its kept columns.  With many rows the
trust region hardly matters; with fewer rows than columns (a layer after global pooling sees one
row per image) it keeps the re-fit near the trained weights instead of near zero.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..errors import SolverError

#: Relative damping λ = DAMP · mean(diag H), the value SparseGPT and OBC use for layer-wise Hessians.
DAMP = 0.01

Index = list[tuple[NDArray[np.int64], NDArray[np.int64]]]  # [(which channels, column positions (n_c, m))]


@dataclass(frozen=True)
class ChannelProblem:
    """One consumer's statistics.

    ``channel[j]`` is the channel (0..n_channels-1) of column ``j`` of ``H``, or -1 for a column that
    always stays (the intercept, or input channels outside the group).  ``W0`` (q × out) are the
    trained weights the re-fit is pulled towards (``None``: towards zero).  ``weight`` scales the error.
    """

    H: NDArray[np.float64]
    G: NDArray[np.float64]
    yy: float
    channel: NDArray[np.int64]
    weight: float = 1.0
    W0: NDArray[np.float64] | None = None


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
    """``M = (H_SS + λI)⁻¹`` and ``B = M G̃_S`` of one problem on its current column set ``cols``."""

    def __init__(self, p: ChannelProblem, damp: float) -> None:
        self.p = p
        diag = np.diag(p.H)
        mean = float(np.mean(diag)) if diag.size else 0.0
        self.lam = damp * mean if mean > 0 else damp
        w0 = np.zeros_like(p.G) if p.W0 is None else np.asarray(p.W0, np.float64)
        self.Gt = p.G + self.lam * w0
        self.w0sq = np.sum(w0 * w0, axis=1)
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
        self.B = self.M @ self.Gt[self.cols]

    def error(self) -> float:
        """``E(S)`` at the re-fit."""
        return float(self.p.yy + self.lam * self.w0sq[self.cols].sum() - np.sum(self.Gt[self.cols] * self.B))

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


def _batches(channel_of: NDArray[np.int64], channels: NDArray[np.int64]) -> Index:
    """Positions (in ``channel_of``) of each channel's columns, batched by count."""
    if not channels.size:
        return []
    order = np.argsort(channel_of, kind="stable")
    sorted_ch = channel_of[order]
    starts = np.searchsorted(sorted_ch, channels, side="left")
    stops = np.searchsorted(sorted_ch, channels, side="right")
    sizes = stops - starts
    out = []
    for m in np.unique(sizes[sizes > 0]):
        which = np.flatnonzero(sizes == m)
        out.append((which, np.stack([order[starts[w] : stops[w]] for w in which])))
    return out


def _removal_costs(state: _State, index: Index, n: int) -> NDArray[np.float64]:
    """Exact increase of ``E`` when each channel's columns are dropped (0 if it has none here)."""
    costs = np.zeros(n)
    for which, idx in index:
        Mjj = state.M[idx[:, :, None], idx[:, None, :]]
        Bj = state.B[idx]  # (n_c, m, out)
        costs[which] = np.einsum("cmo,cmo->c", Bj, np.linalg.solve(Mjj, Bj))
        costs[which] -= state.lam * state.w0sq[state.cols[idx]].sum(axis=1)
    return costs


@dataclass
class _Adds:
    """Everything about adding each absent channel back: its columns (as positions in ``cols``),
    ``U = M H_{S,J'}``, ``Q⁻¹`` (Schur complements), ``R = G̃_J' − H_J'S B`` and the exact gain."""

    cols: NDArray[np.int64]  # all absent columns considered
    U: NDArray[np.float64]  # (q_S, len(cols))
    R: NDArray[np.float64]  # (len(cols), out)
    pos: dict[int, NDArray[np.int64]]  # channel -> positions in cols
    Qinv: dict[int, NDArray[np.float64]]
    gain: dict[int, float]


def _add_terms(state: _State, channels: NDArray[np.int64]) -> _Adds:
    p = state.p
    absent = np.ones(p.H.shape[0], dtype=bool)
    absent[state.cols] = False
    cand = np.flatnonzero(absent & np.isin(p.channel, channels))
    Hsj = p.H[np.ix_(state.cols, cand)]
    U = state.M @ Hsj
    R = state.Gt[cand] - Hsj.T @ state.B
    adds = _Adds(cand, U, R, {}, {}, {})
    for which, idx in _batches(p.channel[cand], channels):
        Hjj = p.H[cand[idx][:, :, None], cand[idx][:, None, :]]
        Q = Hjj + state.lam * np.eye(idx.shape[1]) - np.einsum("sci,scj->cij", Hsj[:, idx], U[:, idx])
        Qinv = np.linalg.inv(Q)
        Rj = R[idx]
        gains = np.einsum("cmo,cmo->c", Rj, Qinv @ Rj) - state.lam * state.w0sq[cand[idx]].sum(axis=1)
        for k, w in enumerate(which):
            c = int(channels[w])
            adds.pos[c], adds.Qinv[c], adds.gain[c] = idx[k], Qinv[k], float(gains[k])
    return adds


def _removal_costs_after_add(state: _State, adds: _Adds, c_new: int, index: Index, n: int) -> NDArray[np.float64]:
    """Removal costs of the channels in ``index`` once channel ``c_new`` was added (bordered inverse:
    ``M'_JJ = M_JJ + U_J Q⁻¹ U_Jᵀ`` and ``B'_J = B_J − U_J Q⁻¹ R``)."""
    if c_new not in adds.pos:
        return _removal_costs(state, index, n)
    pos = adds.pos[c_new]
    U, Qinv, R = adds.U[:, pos], adds.Qinv[c_new], adds.R[pos]
    QR = Qinv @ R
    costs = np.zeros(n)
    for which, idx in index:
        Uj = U[idx]  # (n_c, m, m')
        Mjj = state.M[idx[:, :, None], idx[:, None, :]] + Uj @ Qinv @ np.swapaxes(Uj, 1, 2)
        Bj = state.B[idx] - Uj @ QR
        costs[which] = np.einsum("cmo,cmo->c", Bj, np.linalg.solve(Mjj, Bj))
        costs[which] -= state.lam * state.w0sq[state.cols[idx]].sum(axis=1)
    return costs


def _eliminate(
    states: list[_State],
    weights: NDArray[np.float64],
    kept: NDArray[np.bool_],
    block_of: NDArray[np.int64],
    per_block: int,
    stops: list[int],
    record: dict[int, float],
    sets: dict[int, NDArray[np.int64]] | None = None,
) -> None:
    """Remove channels (cheapest exact removal cost first, a shrinking number per step) until
    ``min(stops)`` remain, landing exactly on every count in ``stops`` and recording the objective
    there in ``record``.  ``per_block`` is the final count per block."""
    n_blocks = int(block_of.max()) + 1 if block_of.size else 1
    target = min(stops)
    pending = sorted({s for s in stops if s < int(kept.sum())}, reverse=True)
    while kept.sum() > target:
        alive = np.flatnonzero(kept)
        counts = np.bincount(block_of[alive], minlength=n_blocks)
        room = counts - per_block
        eligible = alive[room[block_of[alive]] > 0]
        cost = np.zeros(eligible.size)
        for w, s in zip(weights, states, strict=True):
            cost += w * _removal_costs(s, _batches(s.p.channel[s.cols], eligible), eligible.size)
        excess = int(kept.sum()) - target
        step = max(1, int(np.ceil(excess / 4))) if excess > 8 else 1
        while pending and pending[0] >= kept.sum():
            pending.pop(0)
        if pending:
            step = min(step, int(kept.sum()) - pending[0])
        chosen: list[int] = []
        taken = np.zeros(n_blocks, np.int64)
        for c in eligible[np.argsort(cost, kind="stable")]:
            b = block_of[c]
            if taken[b] < room[b]:
                chosen.append(int(c))
                taken[b] += 1
            if len(chosen) == step:
                break
        kept[chosen] = False
        for s in states:
            s.remove(np.flatnonzero(np.isin(s.p.channel[s.cols], chosen)))
        now = int(kept.sum())
        if now in stops:
            record[now] = float(sum(w * s.error() for w, s in zip(weights, states, strict=True)))
            if sets is not None:
                sets[now] = np.flatnonzero(kept).astype(np.int64)


def elimination_path(
    problems: Sequence[ChannelProblem],
    n_channels: int,
    counts: Sequence[int],
    *,
    damp: float = DAMP,
    sets: dict[int, NDArray[np.int64]] | None = None,
) -> dict[int, float]:
    """The objective ``Σ w_ℓ E_ℓ`` along backward elimination, at each kept count in ``counts``
    (for allocating channels between groups; no swaps).  ``n_channels`` maps to the start value.
    ``sets`` (optional) receives the kept channels at each count."""
    states = [_State(p, damp) for p in problems]
    weights = np.array([p.weight for p in problems])
    record = {n_channels: float(sum(w * s.error() for w, s in zip(weights, states, strict=True)))}
    stops = sorted({int(c) for c in counts if 0 < c < n_channels})
    if stops:
        kept = np.ones(n_channels, dtype=bool)
        _eliminate(states, weights, kept, np.zeros(n_channels, np.int64), min(stops), stops, record, sets)
    return record


def unfitted_error(problems: Sequence[ChannelProblem], kept: NDArray[np.int64]) -> float:
    """``Σ w_ℓ ‖Y − Ã_S W₀,S‖²``: the error of keeping ``kept`` *without* re-fit (trained weights)."""
    total = 0.0
    for p in problems:
        if p.W0 is None:
            continue
        cols = np.flatnonzero((p.channel < 0) | np.isin(p.channel, kept))
        W = p.W0[cols]
        err = p.yy - 2.0 * np.sum(W * p.G[cols]) + np.sum(W * (p.H[np.ix_(cols, cols)] @ W))
        total += p.weight * float(err)
    return total


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

    # 1. backward elimination, a shrinking number of channels per step
    _eliminate(states, weights, kept, block_of, per_block, [k], {})
    for s in states:  # one exact refresh after the downdates
        s.refresh()

    # 2. swap local search, every candidate swap evaluated exactly
    swaps = 0
    tol = max(1e-9 * abs(start), 1e-12)
    for _ in range(max_swaps):
        alive, dead = np.flatnonzero(kept), np.flatnonzero(~kept)
        if not dead.size or not alive.size:
            break
        adds = [_add_terms(s, dead) for s in states]
        gains = np.array([sum(w * a.gain.get(int(c), 0.0) for w, a in zip(weights, adds, strict=True)) for c in dead])
        index = [_batches(s.p.channel[s.cols], alive) for s in states]
        best = (tol, -1, -1)
        for i in np.argsort(-gains)[:candidates]:
            if gains[i] <= tol:
                break
            c_new = int(dead[i])
            after = np.zeros(alive.size)
            for w, s, a, ix in zip(weights, states, adds, index, strict=True):
                after += w * _removal_costs_after_add(s, a, c_new, ix, alive.size)
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
