"""Turning a sparsity target into an exact :class:`Budget` over the prunable tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from ..errors import SolverError
from ._core import Budget


def keep_count(sparsity: float, p: int) -> int:
    """``k = round((1 − s)·p)`` with halves rounded up (not to even), clipped to ``[0, p]``."""
    return int(min(p, max(0, math.floor((1.0 - sparsity) * p + 0.5))))


def make_budget(sizes: Sequence[int], sparsity: float, *, scope: str = "global", min_density: float = 0.0) -> Budget:
    """The budget keeping exactly ``k = round((1 − s)·p)`` of ``p = Σ sizes`` weights.

    * ``scope="global"``: one pool; the solver decides how sparse each tensor gets.
    * ``scope="layer"``: every tensor gets the same sparsity.  Per-tensor counts ``(1 − s)·size_t``
      are rounded by largest remainder so that they still add up to exactly ``k``.
    * ``min_density=d``: every tensor keeps at least ``ceil(d·size_t)`` weights (global scope).
    """
    sizes_a = np.asarray(sizes, dtype=np.int64)
    if sizes_a.ndim != 1 or sizes_a.size == 0 or np.any(sizes_a <= 0):
        raise SolverError(f"tensor sizes must be positive, got {list(sizes)}")
    p = int(sizes_a.sum())
    k = keep_count(sparsity, p)
    segments = (0, *np.cumsum(sizes_a).tolist())
    if scope == "layer":
        exact = (1.0 - sparsity) * sizes_a
        base = np.floor(exact).astype(np.int64)
        short = k - int(base.sum())
        order = np.argsort(-(exact - base), kind="stable")
        base[order[:short]] += 1
        counts = tuple(int(c) for c in base)
        return Budget(k=k, segments=segments, lower=counts, upper=counts).validated()
    if scope != "global":
        raise SolverError(f"scope must be global or layer, got {scope!r}")
    lower = tuple(int(min(s, math.ceil(min_density * s - 1e-9))) for s in sizes_a)
    if sum(lower) > k:
        raise SolverError(f"minimum density {min_density:g} needs {sum(lower)} weights but the budget keeps only {k}")
    return Budget(k=k, segments=segments, lower=lower, upper=tuple(int(s) for s in sizes_a)).validated()
