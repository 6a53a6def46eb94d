"""The block approximation of CHITA, for when ``X`` does not fit in memory (CHITA-BSO Alg. 6).

The Fisher ``XᵀX`` is taken block-diagonal over contiguous blocks of weights, so the problem splits
into independent block problems

    min ½‖X_b(w_b − w̄_b)‖² + (λ/2)‖w_b − w̄_b‖² + α_bᵀ(w_b − w̄_b)     s.t. ‖w_b‖₀ ≤ k_b

solved one after the other while only one *group* of consecutive blocks' columns is in memory.

* **Blocks** are contiguous parts of one budget segment (a block never straddles two tensors):
  a segment of ``size`` weights is cut into ``max(1, round(size / block_size))`` near-equal blocks.
* **Columns** are requested once per group through ``columns(a, b) → X[:, a:b]``, with groups of
  consecutive blocks sized to ``max_memory_bytes / 2``.  The other half is for the per-block work:
  a block is narrowed below ``block_size`` when its float64 columns and (for CHITA) its
  :data:`BLOCK_WORK_SQUARES` square matrices would not fit there.  The full ``X`` is never held:
  peak memory is one group, one block's work and ``O(p)`` vectors.
* **Budget allocation** (``k_b``) precedes any column request: a global threshold on the magnitude of
  the first unconstrained step ``|w̄ − α/L|`` (``|w̄|`` when α = 0, i.e. the counts of global
  magnitude pruning, exactly as the reference's ``split_type=1``), taken with the exact
  :func:`hard_threshold` projection of the whole budget.  That *is* the exact rounding: ``Σ k_b = k``
  and every segment's lower/upper bounds hold because blocks nest inside segments.  Why this rule:
  under a block-diagonal Fisher the first IHT step from ``w̄`` is ``w̄ − α/L`` for all blocks at once,
  so ranking its magnitudes globally is the one allocation that needs no columns; ``L = λ +
  max_b σ_max(X_b)²`` (the block-diagonal Lipschitz constant) is estimated by power iteration on
  the first group's blocks unless given.
* **Per-block solve**: CHITA-IHT (:func:`chita_iht` machinery, default), ``"backsolve"`` (ridge re-fit
  of the allocated magnitude support — the reference's shipped ``Heuristic_LSBlock``), or any callable
  with the signature of :func:`chita_iht`.

Block size (measured with ``benchmarks/bench_solver.py --block-sizes``: synthetic MLP-structured
gradients ``δᵢaᵢᵀ``, n = 1,000, p = 32,360 in three tensors as MLPNet, λ = 1e-4, one core).  Cells:
the objective of the block solution evaluated on the *full* X, relative to unblocked CHITA, and the
wall time of the whole block solve:

==========  ====================  ====================  ====================  ====================
block size  backsolve, s = 0.9    CHITA, s = 0.9        backsolve, s = 0.98   CHITA, s = 0.98
==========  ====================  ====================  ====================  ====================
250         6.67×  0.09 s         3.75×  0.97 s         7.75×  0.34 s         5.13×  0.99 s
500 (ref.)  5.28×  0.10 s         2.75×  1.03 s         7.05×  0.07 s         3.57×  0.55 s
1000        3.81×  0.10 s         2.17×  1.22 s         5.40×  0.07 s         2.25×  0.62 s
**2000**    3.19×  0.12 s         1.81×  1.63 s         4.64×  0.07 s         1.91×  0.61 s
4000        2.74×  0.19 s         1.53×  3.77 s         4.25×  0.07 s         1.71×  0.56 s
8000        2.24×  0.17 s         1.56×  1.19 s         3.86×  0.08 s         1.47×  0.72 s
per tensor  1.66×  0.21 s         1.25×  1.01 s         2.78×  0.25 s         1.06×  1.50 s
==========  ====================  ====================  ====================  ====================

(Unblocked magnitude + backsolve: 1.02× at 0.9, 1.29× at 0.98.)  Dropping the cross-block Fisher
costs a lot in this objective and the loss shrinks steadily with the block size, while the time
barely moves up to 2,000; beyond that the per-block cost grows (the swap search is ``O(k_b³)`` per
candidate, so 4,000 at s = 0.9 — ``k_b`` = 400 — is the slowest cell; at 8,000 ``k_b`` exceeds the
swap threshold and the cheaper IHT takes over).  :data:`DEFAULT_BLOCK_SIZE` = 2000 halves the
reference's (500) loss gap at the same order of time.  Caveat from the real-model measurements in
the docs: the block approximation also acts as a regulariser in multi-stage pruning, so accuracy
need not follow this objective — tune on the model.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable
from typing import Literal

import numpy as np
from numpy.typing import NDArray

from ..errors import ResourceError, SolverError
from ._core import Budget, FloatArray, IntArray, SolverResult, hard_threshold, objective
from .backsolve import ridge_backsolve
from .chita import Method, _solve, _validate_options

__all__ = ["DEFAULT_BLOCK_SIZE", "BlockSolver", "Columns", "chita_blocked", "make_blocks"]

log = logging.getLogger(__name__)

#: ``columns(a, b)`` returns the scaled gradient columns ``X[:, a:b]``, shape ``(n, b − a)``.
Columns = Callable[[int, int], NDArray[np.floating]]
#: A per-block solver with :func:`chita_iht`'s positional signature.
BlockSolver = Callable[[FloatArray, FloatArray, Budget, float, FloatArray | None], SolverResult]

#: Default block size; see the module docstring for the measurement behind it.
DEFAULT_BLOCK_SIZE = 2000
#: Default cap on the memory of one group of columns plus the per-block work (1 GiB).
DEFAULT_MAX_MEMORY = 1 << 30
#: Square float64 matrices of a block's width that one CHITA block solve holds at once, at most (the
#: active set's Gram, the support's copy of it, its Cholesky factor, that factor's inverse and one
#: temporary; measured with tracemalloc at 4–5 on a 2,000-wide block).  Blocks are narrowed so that
#: these fit in half of ``max_memory_bytes`` next to the block's columns.
BLOCK_WORK_SQUARES = 5


def make_blocks(segments: tuple[int, ...], block_size: int) -> NDArray[np.int64]:
    """Block boundaries ``(nblocks + 1,)``: each segment cut into near-equal blocks of ~``block_size``."""
    bounds: list[int] = [0]
    for a, b in itertools.pairwise(segments):
        size = b - a
        if size == 0:
            continue
        nb = max(1, round(size / block_size))
        bounds.extend((a + (np.arange(1, nb + 1, dtype=np.int64) * size) // nb).tolist())
    return np.asarray(bounds, dtype=np.int64)


#: The narrowings already warned about (every stage of chita++ would repeat the same one).
_NARROWED: set[tuple[int, int, int, int]] = set()


def _widest_block(n: int, squares: int, room: int) -> int:
    """The widest block ``b ≥ 1`` whose work fits in ``room`` bytes: ``8 · (1.5 · n · b + squares · b²)``."""
    lin, quad = 12.0 * n, 8.0 * squares
    if quad == 0:
        return max(1, int(room // lin))
    return max(1, int((-lin + math.sqrt(lin * lin + 4.0 * quad * room)) / (2.0 * quad)))


def _sigma_max_sq(Xb: FloatArray, steps: int = 20, seed: int = 0) -> float:
    """``σ_max(X_b)²`` by power iteration on ``X_bᵀX_b`` (a few steps, a lower estimate)."""
    v = np.asarray(np.random.default_rng(seed).standard_normal(Xb.shape[1]), dtype=Xb.dtype)
    est = 0.0
    for _ in range(steps):
        nv = float(np.linalg.norm(v))
        if nv == 0.0:
            return 0.0
        v /= nv
        u = Xb @ v
        est = float(u @ u)
        v = Xb.T @ u
    return est


def chita_blocked(
    columns: Columns,
    w_bar: FloatArray,
    budget: Budget,
    ridge: float,
    alpha: FloatArray | None = None,
    *,
    n: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
    max_memory_bytes: int = DEFAULT_MAX_MEMORY,
    solve: Literal["chita", "backsolve"] | BlockSolver = "chita",
    lipschitz: float | None = None,
    max_iter: int = 300,
    tol: float = 1e-6,
    method: Method = "auto",
) -> SolverResult:
    """CHITA with a block-diagonal Fisher, reading the gradient columns group by group.

    Minimises ``Σ_b ½‖X_b(w_b − w̄_b)‖² + (λ/2)‖w_b − w̄_b‖² + α_bᵀ(w_b − w̄_b)`` under ``budget``.

    Args:
        columns: ``columns(a, b)`` → ``(n, b − a)`` float32/float64 scaled gradient columns; called
            once per group, in increasing order, never for the whole of ``X`` (unless it fits).
        w_bar: ``(p,)`` trained weights.
        budget: sparsity budget; blocks never straddle its segments.
        ridge: ``λ ≥ 0``.
        alpha: ``(p,)`` first-order term or ``None``.
        n: number of rows of ``X``.
        block_size: target block width (blocks are cut evenly inside each segment).
        max_memory_bytes: cap for one group of columns (half) plus per-block work (half).
        solve: ``"chita"`` (IHT per block), ``"backsolve"`` (ridge re-fit of the magnitude support)
            or a callable ``solve(X_b, w̄_b, budget_b, ridge, α_b) → SolverResult``.
        lipschitz: ``L`` for the allocation when ``alpha`` is given (default: estimated).
        max_iter, tol, method: passed to the per-block CHITA (:func:`chita_iht`).

    Returns:
        :class:`SolverResult`; ``objective`` is the block-diagonal model's value ``Σ_b f_b`` (the
        full-Fisher value needs all of ``X``), ``trace`` is ``(Σ f_b at the magnitude mask, final)``.
    """
    t0 = time.perf_counter()
    wb = np.array(w_bar, dtype=np.float64)
    if not isinstance(budget, Budget):
        raise SolverError(f"budget must be a Budget, got {type(budget).__name__}")
    budget.validated()
    p = budget.p
    if wb.shape != (p,):
        raise SolverError(f"w̄ must have shape ({p},) to match the budget, got {wb.shape}")
    if not np.all(np.isfinite(wb)):
        raise SolverError("w̄ contains NaN or infinity")
    a64 = None if alpha is None else np.array(alpha, dtype=np.float64)
    if a64 is not None and (a64.shape != (p,) or not np.all(np.isfinite(a64))):
        raise SolverError(f"alpha must be a finite array of shape ({p},), got shape {a64.shape}")
    ridge = float(ridge)
    if not np.isfinite(ridge) or ridge < 0:
        raise SolverError(f"ridge must be a finite number ≥ 0, got {ridge}")
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
        raise SolverError(f"n must be a positive integer, got {n!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int | np.integer) or block_size < 1:
        raise SolverError(f"block_size must be a positive integer, got {block_size!r}")
    if not isinstance(max_memory_bytes, int | np.integer) or max_memory_bytes <= 0:
        raise SolverError(f"max_memory_bytes must be a positive integer, got {max_memory_bytes!r}")
    if not (callable(solve) or solve in ("chita", "backsolve")):
        raise SolverError(f"solve must be 'chita', 'backsolve' or a callable, got {solve!r}")
    _validate_options(max_iter=max_iter, tol=tol, method=method)
    n = int(n)

    # Blocks, sized so that one block's work fits in the half of the memory cap that the column group
    # leaves: its float64 columns (1.5 × n × b, with slack) and, for CHITA, its square matrices.
    cap_cols = int(max_memory_bytes) // (2 * n * 8)
    if cap_cols < 1:
        raise ResourceError(f"max_memory_bytes={max_memory_bytes} cannot hold even one column of {n} rows")
    bsize = int(block_size)
    squares = BLOCK_WORK_SQUARES if solve == "chita" else 0
    fit = _widest_block(n, squares, int(max_memory_bytes) // 2)
    if bsize > fit:
        bsize = fit
        said = (int(block_size), int(max_memory_bytes), n, bsize)
        (log.debug if said in _NARROWED else log.warning)(
            "block_size %d does not fit max_memory_bytes=%d with n=%d; using %d", *said
        )
        _NARROWED.add(said)
    bounds = make_blocks(budget.segments, bsize)
    nblocks = bounds.shape[0] - 1

    def fetch(a: int, b: int) -> FloatArray:
        Xg = np.asarray(columns(a, b))
        if Xg.shape != (n, b - a):
            raise SolverError(f"columns({a}, {b}) returned shape {Xg.shape}, expected ({n}, {b - a})")
        if not np.issubdtype(Xg.dtype, np.floating):
            raise SolverError(f"columns({a}, {b}) returned dtype {Xg.dtype}, expected floating point")
        if Xg.dtype not in (np.float32, np.float64):
            Xg = Xg.astype(np.float32)
        return Xg

    def group_end(first: int, itemsize: int) -> int:
        """One past the last block of the group starting at block ``first``."""
        limit = bounds[first] + max(1, int(max_memory_bytes) // (2 * n * itemsize))
        last = int(np.searchsorted(bounds, limit, side="right")) - 1
        return int(max(first + 1, min(last, nblocks)))

    # The first group is fetched before the allocation (it may be needed for L).
    fetch_s = 0.0
    g_end = group_end(0, 8) if nblocks else 0
    tf = time.perf_counter()
    Xg = fetch(int(bounds[0]), int(bounds[g_end])) if nblocks else np.zeros((n, 0), np.float32)
    fetch_s += time.perf_counter() - tf

    if a64 is None:
        score = np.abs(wb)
        L = math.nan
    else:
        if lipschitz is None:
            sig = max(
                (_sigma_max_sq(Xg[:, bounds[j] - bounds[0] : bounds[j + 1] - bounds[0]]) for j in range(g_end)),
                default=0.0,
            )
            L = ridge + sig
        else:
            L = float(lipschitz)
        if not (np.isfinite(L) and L > 0):
            raise SolverError(f"the Lipschitz constant for the allocation must be > 0, got {L}")
        score = np.abs(wb - a64 / L)
    alloc = hard_threshold(score, budget)
    del score
    k_of = np.diff(np.searchsorted(alloc, bounds, side="left"))

    w = np.zeros(p, dtype=np.float32)
    supports: list[IntArray] = []
    f_mask = f_final = 0.0
    iterations = 0
    converged = True
    groups = 0
    solve_s = 0.0
    peak_group = 0
    first = 0
    itemsize = Xg.dtype.itemsize
    while first < nblocks:
        if groups:
            g_end = group_end(first, itemsize)
            tf = time.perf_counter()
            Xg = fetch(int(bounds[first]), int(bounds[g_end]))
            fetch_s += time.perf_counter() - tf
        groups += 1
        peak_group = max(peak_group, Xg.nbytes)
        g0 = int(bounds[first])
        ts = time.perf_counter()
        for j in range(first, g_end):
            a, b = int(bounds[j]), int(bounds[j + 1])
            Xb = Xg[:, a - g0 : b - g0]
            if not np.isfinite(Xb).all():
                raise SolverError(f"columns({a}, {b}) contain NaN or infinity")
            wbb = wb[a:b]
            ab = None if a64 is None else a64[a:b]
            kb = int(k_of[j])
            sup_b = alloc[(alloc >= a) & (alloc < b)] - a if kb else np.empty(0, dtype=np.int64)
            mask_w = np.zeros(b - a, dtype=np.float64)
            mask_w[sup_b] = wbb[sup_b]
            f_mask += objective(Xb, mask_w, wbb, ridge, ab)
            if solve == "backsolve":
                wb_res = ridge_backsolve(Xb, wbb, sup_b, ridge, ab)
                f_b = objective(Xb, wb_res, wbb, ridge, ab)
                w[a:b] = wb_res
                supports.append(sup_b + a)
            else:
                bud = Budget.global_(kb, b - a)
                if solve == "chita":
                    res = _solve(
                        Xb,
                        wbb,
                        bud,
                        ridge,
                        ab,
                        max_iter=max_iter,
                        tol=tol,
                        active_set=True,
                        active_factor=1.5,
                        max_outer=10,
                        search_steps=5,
                        grow=0.25,
                        init="backsolve",
                        method=method,
                        warn=False,
                    )
                else:
                    res = solve(Xb, wbb, bud, ridge, ab)
                if res.w.shape != (b - a,):
                    raise SolverError(f"block solver returned w of shape {res.w.shape}, expected ({b - a},)")
                w[a:b] = res.w
                supports.append(np.asarray(res.support, dtype=np.int64) + a)
                f_b = res.objective
                iterations += res.iterations
                converged &= res.converged
            f_final += f_b
            del Xb  # a view: it would keep this group's columns alive through the next fetch
        solve_s += time.perf_counter() - ts
        del Xg
        first = g_end

    if not converged:
        log.warning("CHITA (blocked): some of the %d block solves hit an iteration cap", nblocks)
    support = np.concatenate(supports).astype(np.int64) if supports else np.empty(0, dtype=np.int64)
    info: dict[str, float | int | str] = {
        "time_s": time.perf_counter() - t0,
        "fetch_s": fetch_s,
        "solve_s": solve_s,
        "blocks": nblocks,
        "groups": groups,
        "block_size": bsize,
        "peak_group_bytes": peak_group,
        "objective_model": "block-diagonal",
        "allocation_L": L,
        "block_solver": solve if isinstance(solve, str) else getattr(solve, "__name__", "callable"),
    }
    return SolverResult(
        w=w,
        support=support,
        objective=f_final,
        trace=(f_mask, f_final),
        iterations=iterations,
        converged=converged,
        method="chita-block" if solve != "backsolve" else "chita-bso-block",
        info=info,
    )
