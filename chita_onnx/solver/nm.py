"""N:M semi-structured sparsity (2:4, 4:8, ...) for every solver: pure NumPy, no onnx imports.

**The rule.**  A weight tensor is cut into *groups* of ``M`` consecutive entries along one axis (the
reduction axis of its layer: input channels of a Conv, ``K`` of a MatMul/Gemm); each group may hold at
most ``N`` nonzeros.  Which axis belongs to which tensor is the graph layer's business; this module
only sees the groups as index arrays into the flat weight vector ``w`` (``(G, M)`` int64), built with
:func:`group_indices` from a shape and an axis.

**Why the existing solvers need no change.**  "at most ``u`` nonzeros in each group, ``k`` in all" is
a partition matroid, which is exactly the kind of constraint a :class:`~._core.Budget` describes —
one segment per group with ``lower = 0, upper = u`` — except that budget segments are *contiguous*.
:class:`NMStructure` therefore permutes the coordinates so that every group is contiguous (groups stay
inside their tensor, tensors keep their column ranges), and the solvers run unchanged on the permuted
problem: their projection :func:`~._core.hard_threshold` keeps the top ``u`` of every group (exact),
CHITA's support-changing search only exchanges coordinates inside a full group, the backsolve re-fits
the chosen support, CBS swaps only inside a group.  Coordinates in no group (tensors left dense) form
segments with ``lower = upper = size``: always kept, still re-fitted.

**The objective** is unchanged: ``f(w) = ½‖X(w − w̄)‖² + (λ/2)‖w − w̄‖² + αᵀ(w − w̄)`` with
``X`` ``(n, p)``; permuting the columns of ``X`` and the entries of ``w̄``, ``α`` the same way leaves
every value of ``f`` as it is.

Helpers for other solvers (e.g. a layer-wise SparseGPT-style sweep): :func:`nm_mask` (keep the ``N``
largest scores of every group of a weight matrix along an axis), :func:`nm_project` (the exact
projection of a flat vector), :func:`count_violations`.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
from numpy.typing import NDArray

from ..errors import SolverError
from ._core import Budget, FloatArray, IntArray, SolverResult
from .budgets import keep_count

__all__ = [
    "NMPattern",
    "NMStructure",
    "count_violations",
    "group_indices",
    "nm_mask",
    "nm_project",
    "permuted_columns",
    "solve_nm",
]

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
#: Largest group size M: no tensor axis is longer (the count-like flags stop at the same value), and
#: arrays of M columns must stay allocatable.
MAX_GROUP = 2**31 - 1


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` nonzeros in every group of ``m`` consecutive weights (``0 < n < m ≤ MAX_GROUP``)."""

    n: int
    m: int

    def __post_init__(self) -> None:
        if not (isinstance(self.n, int) and isinstance(self.m, int) and 0 < self.n < self.m <= MAX_GROUP):
            raise SolverError(f"an N:M pattern needs integers 0 < N < M ≤ {MAX_GROUP}, got {self.n}:{self.m}")

    @staticmethod
    def parse(text: str) -> NMPattern | None:
        """``"2:4"`` → ``NMPattern(2, 4)``; ``"unstructured"`` → ``None``; anything else raises."""
        if text.strip().lower() == "unstructured":
            return None
        match = _PATTERN.match(text)
        if not match:
            raise SolverError(f"pattern must be 'unstructured' or N:M such as 2:4, got {text!r}")
        return NMPattern(int(match.group(1)), int(match.group(2)))

    @property
    def sparsity(self) -> float:
        """The sparsity of a tensor that satisfies the pattern with exactly ``n`` per group."""
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


# ------------------------------------------------------------------------------------------ groups


def group_indices(shape: Sequence[int], axis: int, m: int, offset: int = 0) -> IntArray:
    """Flat (row-major) indices of the groups of ``m`` consecutive entries along ``axis``.

    Returns ``(G, m)`` int64 with ``G = size / m``: row ``g`` lists the ``m`` indices of one group, in
    order along ``axis``, plus ``offset`` (the tensor's first column in the flat vector).  Raises
    :class:`SolverError` when ``shape[axis]`` is not a multiple of ``m``.
    """
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise SolverError("group_indices needs a tensor with at least one axis")
    ax = axis % len(shape)
    if m < 1 or shape[ax] % m:
        raise SolverError(f"axis {axis} of shape {shape} has length {shape[ax]}, not a multiple of {m}")
    idx = np.arange(math.prod(shape), dtype=np.int64).reshape(shape) + offset
    moved = np.moveaxis(idx, ax, -1)  # (..., L): the group axis last
    return np.ascontiguousarray(moved.reshape(-1, m))


def _top_in_rows(a: NDArray[np.floating], keep: int) -> NDArray[np.bool_]:
    """Boolean mask of the ``keep`` largest entries of every row of ``a`` (ties: lower column first)."""
    rows, m = a.shape
    mask = np.zeros((rows, m), dtype=bool)
    if keep >= m:
        mask[:] = True
    elif keep > 0:
        order = np.argsort(-a, axis=1, kind="stable")[:, :keep]
        np.put_along_axis(mask, order, True, axis=1)
    return mask


def nm_mask(scores: NDArray[np.floating], n: int, m: int, axis: int) -> NDArray[np.bool_]:
    """Keep-mask of the ``n`` largest ``scores`` in every group of ``m`` consecutive entries along ``axis``.

    ``scores`` has the weight's shape (e.g. ``|W|``, or SparseGPT's ``W²/[H⁻¹]_jj²`` for one column
    block); larger means more important.  Returns a boolean array of the same shape with exactly
    ``n`` ``True`` per group.  Ties go to the lower index.  Raises when ``shape[axis] % m != 0``.

    Example — the mask a layer-wise solver applies to a ``[K, N]`` MatMul weight for 2:4::

        keep = nm_mask(np.abs(W), 2, 4, axis=0)
    """
    s = np.asarray(scores)
    if s.ndim == 0:
        raise SolverError("nm_mask needs an array with at least one axis")
    NMPattern(n, m)
    ax = axis % s.ndim
    if s.shape[ax] % m:
        raise SolverError(f"axis {axis} of shape {s.shape} has length {s.shape[ax]}, not a multiple of {m}")
    moved = np.moveaxis(s, ax, -1)
    rows = moved.reshape(-1, m)
    keep = _top_in_rows(np.asarray(rows, dtype=np.float64), n).reshape(moved.shape)
    return np.moveaxis(keep, -1, ax)


def nm_project(v: FloatArray, groups: IntArray, n: int) -> IntArray:
    """The support of the Euclidean projection of ``v`` onto "≤ ``n`` nonzeros in every group".

    ``v``: ``(p,)``; ``groups``: ``(G, m)`` disjoint indices into ``v``.  Returns sorted int64 indices:
    the ``n`` largest ``|v|`` of every group plus every coordinate that is in no group.
    """
    a = np.abs(np.asarray(v, dtype=np.float64))
    g = np.asarray(groups, dtype=np.int64)
    keep = np.ones(a.shape[0], dtype=bool)
    if g.size:
        keep[g.reshape(-1)] = False
        top = _top_in_rows(a[g], n)
        keep[g[top]] = True
    return np.flatnonzero(keep).astype(np.int64)


def count_violations(w: FloatArray, groups: IntArray, n: int) -> int:
    """How many groups (rows of ``groups``) of ``w`` hold more than ``n`` nonzeros."""
    g = np.asarray(groups, dtype=np.int64)
    if g.size == 0:
        return 0
    return int(np.count_nonzero(np.count_nonzero(np.asarray(w)[g], axis=1) > n))


# ------------------------------------------------------------------------------- permuted problem


@dataclass(frozen=True)
class NMStructure:
    """The solvers' view of an N:M-constrained problem: a column permutation and its budgets.

    * ``perm`` ``(p,)``: position ``i`` of the permuted vector holds coordinate ``perm[i]``; every group
      occupies ``m`` consecutive positions, and coordinates stay inside their tensor's column range.
    * ``segments``: budget segment offsets over the permuted positions — one per group, one per run
      of ungrouped (dense) coordinates; ``is_group[t]`` says which.
    * ``blocks``: the tensors' column ranges (the same before and after the permutation), for
      solvers that approximate the Fisher block-diagonally per tensor (WoodFisher).
    """

    pattern: NMPattern
    perm: IntArray
    segments: tuple[int, ...]
    is_group: tuple[bool, ...]
    blocks: tuple[tuple[int, int], ...]

    @property
    def p(self) -> int:
        return int(self.perm.shape[0])

    @property
    def groups(self) -> int:
        """Number of groups ``G``."""
        return sum(self.is_group)

    @property
    def grouped(self) -> int:
        """Number of coordinates that belong to a group (``G·m``)."""
        return self.groups * self.pattern.m

    @property
    def dense(self) -> int:
        """Number of coordinates in no group (always kept)."""
        return self.p - self.grouped

    @staticmethod
    def build(
        p: int, groups: IntArray, pattern: NMPattern, tensor_segments: Sequence[int] | None = None
    ) -> NMStructure:
        """The structure for ``p`` coordinates of which ``groups`` (``(G, m)``, disjoint) are constrained.

        ``tensor_segments`` (``(0, p_1, ..., p)``) are the tensors' column offsets; every group must
        lie inside one tensor.  Ungrouped coordinates keep their order.
        """
        g = np.asarray(groups, dtype=np.int64).reshape(-1, pattern.m) if np.size(groups) else None
        tseg = tuple(int(s) for s in (tensor_segments if tensor_segments is not None else (0, p)))
        if tseg[0] != 0 or tseg[-1] != p or any(b < a for a, b in itertools.pairwise(tseg)):
            raise SolverError(f"tensor segments must be increasing offsets from 0 to p={p}, got {tseg}")
        # sort key of every coordinate: (first index of its group, place in the group); a coordinate in
        # no group sorts as itself — so groups become contiguous and stay inside their tensor.
        head = np.arange(p, dtype=np.int64)
        place = np.zeros(p, dtype=np.int64)
        member = np.zeros(p, dtype=bool)
        if g is not None:
            flat = g.reshape(-1)
            if flat.min() < 0 or flat.max() >= p:
                raise SolverError(f"group indices must lie in [0, {p})")
            if np.unique(flat).shape[0] != flat.shape[0]:
                raise SolverError("groups overlap: an index appears in more than one group")
            tensor_of = np.searchsorted(np.asarray(tseg[1:]), g, side="right")
            if np.any(tensor_of != tensor_of[:, :1]):
                raise SolverError("a group straddles two tensors")
            first = g.min(axis=1)
            head[flat] = np.repeat(first, pattern.m)
            place[flat] = np.tile(np.arange(pattern.m, dtype=np.int64), g.shape[0])
            # the order inside a group is the order given in `groups` (along the axis)
            member[flat] = True
        perm = np.lexsort((place, head)).astype(np.int64)
        is_member = member[perm]
        # segment starts: every m-th member (groups are contiguous runs of m), and every dense run
        rank = np.cumsum(is_member) - 1
        group_start = is_member & (rank % pattern.m == 0)
        prev_member = np.concatenate([[True], is_member[:-1]])
        dense_start = ~is_member & prev_member
        starts = np.flatnonzero(group_start | dense_start)
        segments = (*(int(s) for s in starts), p) if p else (0,)
        flags = tuple(bool(b) for b in is_member[starts])
        blocks = tuple((a, b) for a, b in itertools.pairwise(tseg) if b > a)
        return NMStructure(pattern, perm, segments, flags, blocks)

    def cap(self, sparsity: float) -> int:
        """The per-group cap ``u`` at a stage of the given sparsity of the grouped coordinates:
        ``⌈m(1 − s)⌉`` clipped to ``[n, m]``, the tightest cap that still admits ``(1 − s)·G·m`` weights."""
        m = self.pattern.m
        return int(min(m, max(self.pattern.n, math.ceil(m * (1.0 - sparsity) - 1e-9))))

    def budget(self, sparsity: float | None = None) -> Budget:
        """The budget over the permuted coordinates.

        ``sparsity=None`` (or the pattern's own sparsity ``1 − n/m``): exactly ``n`` in every group.
        A lower sparsity ``s`` (a CHITA++ stage on the way to the pattern): ``round((1 − s)·G·m)``
        grouped weights, at least ``n`` and at most :meth:`cap` per group — no group is pruned below
        what the final pattern keeps anyway.  Dense coordinates are always all kept.
        """
        target = self.pattern.sparsity
        s = target if sparsity is None else float(sparsity)
        if not 0.0 <= s <= target + 1e-12:
            raise SolverError(f"stage sparsity must be in [0, {target:g}] under the {self.pattern} pattern, got {s}")
        cap = self.cap(s)
        k_grouped = self.groups * self.pattern.n if s >= target - 1e-12 else keep_count(s, self.grouped)
        k_grouped = max(k_grouped, self.groups * self.pattern.n)
        sizes = np.diff(np.asarray(self.segments, dtype=np.int64))
        flags = np.asarray(self.is_group, dtype=bool)
        lower = np.where(flags, self.pattern.n, sizes)
        upper = np.where(flags, cap, sizes)
        return Budget(
            k=int(k_grouped + self.dense),
            segments=self.segments,
            lower=tuple(int(x) for x in lower),
            upper=tuple(int(x) for x in upper),
        ).validated()

    def permute(self, v: FloatArray) -> FloatArray:
        """``v`` ``(p,)`` in the permuted order (a copy)."""
        return np.asarray(v)[self.perm]

    def unpermute(self, v: NDArray[np.generic]) -> NDArray[np.generic]:
        """Inverse of :meth:`permute`: ``out[perm] = v``."""
        out = np.empty_like(v)
        out[self.perm] = v
        return out

    def result(self, res: SolverResult) -> SolverResult:
        """A solver result on the permuted problem, in the original coordinate order."""
        w = np.asarray(self.unpermute(np.asarray(res.w, dtype=np.float32)), dtype=np.float32)
        support = np.sort(self.perm[res.support]).astype(np.int64)
        info = {**dict(res.info), "pattern": str(self.pattern), "groups": self.groups, "dense_weights": self.dense}
        return replace(res, w=w, support=support, info=info)


# The permutation is done in place, row block by row block, so that no second copy of X is made.
_ROW_BYTES = 1 << 26


@contextmanager
def permuted_columns(X: FloatArray, perm: IntArray) -> Iterator[FloatArray]:
    """``X[:, perm]`` for the duration of the block, made **in place** and undone on exit.

    ``X`` ``(n, p)`` is permuted a block of rows at a time (extra memory: one row block), and restored
    exactly (a permutation moves values, it does not round them) when the block ends, also on error.
    A read-only ``X`` is copied instead.
    """
    if not X.flags.writeable:
        yield np.ascontiguousarray(X[:, perm])
        return
    inv = np.empty_like(perm)
    inv[perm] = np.arange(perm.shape[0], dtype=perm.dtype)
    step = max(1, _ROW_BYTES // max(1, X.shape[1] * X.dtype.itemsize))

    def apply(order: IntArray) -> None:
        for a in range(0, X.shape[0], step):
            b = min(X.shape[0], a + step)
            X[a:b] = X[a:b][:, order]

    apply(perm)
    try:
        yield X
    finally:
        apply(inv)


#: A solver on a (permuted) problem: ``(X or None, w̄, budget, α or None, blocks) → SolverResult``.
PatternSolver = Callable[
    [FloatArray | None, FloatArray, Budget, FloatArray | None, tuple[tuple[int, int], ...]], SolverResult
]


def solve_nm(
    solver: PatternSolver,
    X: FloatArray | None,
    w_bar: FloatArray,
    structure: NMStructure,
    alpha: FloatArray | None = None,
    sparsity: float | None = None,
) -> SolverResult:
    """Run ``solver`` under the N:M constraint of ``structure`` and return the result in original order.

    ``X`` ``(n, p)`` (or ``None`` for methods without gradients) is permuted in place for the call and
    restored afterwards; ``w_bar``, ``alpha`` ``(p,)`` are permuted copies.  ``sparsity`` is the stage
    sparsity of the grouped coordinates (``None``: the pattern itself, ``n`` per group).  The result is
    checked: no group of the returned weights may hold more than the stage's cap.
    """
    p = structure.p
    if np.asarray(w_bar).shape != (p,):
        raise SolverError(f"w̄ has shape {np.asarray(w_bar).shape}, the pattern structure covers {p} weights")
    if X is not None and X.shape[1] != p:
        raise SolverError(f"X has {X.shape[1]} columns, the pattern structure covers {p} weights")
    budget = structure.budget(sparsity)
    wp = structure.permute(w_bar)
    ap = None if alpha is None else structure.permute(alpha)
    if X is None:
        res = solver(None, wp, budget, ap, structure.blocks)
    else:
        with permuted_columns(X, structure.perm) as Xp:
            res = solver(Xp, wp, budget, ap, structure.blocks)
    # the exact check, in the permuted order where every group is a contiguous run of m
    cap = budget.upper[structure.is_group.index(True)] if structure.groups else 0
    grp = np.asarray(structure.segments[:-1], dtype=np.int64)[np.asarray(structure.is_group, dtype=bool)]
    nnz = np.count_nonzero(np.asarray(res.w)[grp[:, None] + np.arange(structure.pattern.m)], axis=1)
    if structure.groups and int(nnz.max()) > cap:
        raise SolverError(
            f"solver {res.method} broke the {structure.pattern} pattern: a group holds {nnz.max()} > {cap}"
        )
    return structure.result(res)
