"""Sparsity schedules for multi-stage pruning (CHITA++), ``docs/chita-algorithm.md`` §3.

For ``N`` stages, ``t = 0 … N−1``, start ``b`` and target ``S``:

=========  ==========================================================
``poly``   ``S + (b − S)(1 − t/(N−1))³``
``exp``    ``b + (S − b)·2^{N−1}/(2^{N−1} − 1)·(2^t − 1)/2^t``
``linear`` ``b + t(S − b)/(N − 1)``
``const``  ``S``
``geom``   ``1 − (1 − b)((1 − S)/(1 − b))^{(t+1)/N}``: the density falls by the same factor in
           every stage (the reference's "MFAC" schedule; the first stage already prunes)
=========  ==========================================================

``N = 1`` always gives ``(S,)``.  Every schedule is non-decreasing and ends at exactly ``S``.
"""

from __future__ import annotations

import math
from typing import Literal

from ..errors import SolverError

__all__ = ["ScheduleKind", "sparsity_schedule"]

ScheduleKind = Literal["poly", "exp", "linear", "const", "geom"]
_KINDS = ("poly", "exp", "linear", "const", "geom")


def sparsity_schedule(stages: int, target: float, kind: ScheduleKind = "poly", start: float = 0.0) -> tuple[float, ...]:
    """The per-stage sparsity levels ``(s_1, …, s_N)``.

    Args:
        stages: ``N ≥ 1``.
        target: final sparsity ``S`` in ``[0, 1)``.
        kind: ``"poly"``, ``"exp"``, ``"linear"``, ``"const"`` or ``"geom"``.
        start: first-stage sparsity ``b`` in ``[0, S]`` (ignored by ``"const"`` and when ``N = 1``).

    Raises:
        SolverError: naming the bad value.
    """
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise SolverError(f"stages must be an integer ≥ 1, got {stages!r}")
    if not isinstance(target, int | float) or not math.isfinite(target) or not 0.0 <= target < 1.0:
        raise SolverError(f"target sparsity must be in [0, 1), got {target!r}")
    if kind not in _KINDS:
        raise SolverError(f"schedule kind must be one of {', '.join(_KINDS)}, got {kind!r}")
    if not isinstance(start, int | float) or not math.isfinite(start) or not 0.0 <= start <= target:
        raise SolverError(f"start sparsity must be in [0, target={target}], got {start!r}")
    n = stages
    S, b = float(target), float(start)
    if n == 1 or kind == "const":
        return (S,) * n
    levels: list[float] = []
    for t in range(n):
        if kind == "poly":
            s = S + (b - S) * (1.0 - t / (n - 1)) ** 3
        elif kind == "linear":
            s = b + t * (S - b) / (n - 1)
        elif kind == "geom":
            s = 1.0 - (1.0 - b) * ((1.0 - S) / (1.0 - b)) ** ((t + 1) / n)
        else:  # exp
            # = b + (S − b)·2^{N−1}/(2^{N−1} − 1)·(2^t − 1)/2^t, written without 2^N (overflows past N ≈ 1024)
            s = b + (S - b) * (1.0 - 2.0**-t) / (1.0 - 2.0 ** -(n - 1))
        levels.append(min(S, max(b, s)))
    levels[-1] = S
    for t in range(1, n):  # guard monotonicity against rounding
        levels[t] = max(levels[t], levels[t - 1])
    return tuple(levels)
