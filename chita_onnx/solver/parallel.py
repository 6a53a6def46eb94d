"""Large matrix products split by rows between the calling thread and one helper thread.

Pure NumPy; never imports onnx.  The layer-wise pass runs its solvers on one thread, and BLAS is
held to one thread per call while it does (:func:`chita_onnx.blas.leave_a_core` next to the dense
runner on a two-core machine, or the user's ``OPENBLAS_NUM_THREADS=1``).  The dense runner keeps
the second core busy only while it has segments to run; during the long solves of a wide layer
(CG's products with ``H``, the sweep's updates, the reconstruction errors) that core is idle.

``C = A·B`` is computed row block by row block: row ``i`` of ``C`` depends on row ``i`` of ``A``
only.  Inside :func:`helping`, :func:`matmul` gives the first half of the rows to this thread and the
second to a helper thread; NumPy releases the GIL inside BLAS, so both run at once.  Each half is
one single-threaded BLAS call on the same operands, so the result is the one-call product up to
rounding.  How far up to rounding depends on the BLAS kernel: with OpenBLAS's Zen kernels float32
halves came out bit for bit, with its Haswell kernels (the same wheel on another AMD EPYC) they
differ in the last places.  So a split is decided by the shapes alone: while the second core is
taken (``idle``), both halves run on this thread, and the values never depend on the timing.
No thread spins: the helper waits on a queue and the caller on the helper's result, so a busy core
costs time-sharing, never a stall.

:func:`halves` does the same for other work that splits into independent halves and releases the
GIL (the exact re-fit's per-row factorisations, :mod:`.batched_spd`).

:func:`tasks` runs whole independent jobs at once instead (the directions of a recurrent layer, the
groups of a grouped Conv): each job on one thread, start to end, with no hand-off inside it.  Its
Cholesky factorisations and triangular inverses, which :func:`halves` cannot split, then run on both
cores too, and there is one hand-off per job instead of one per product.  While they run,
:func:`halves` and :func:`matmul` do not split (the helper is taken), so every job computes what it
computes alone on one thread.

Outside :func:`helping`, or for products under :data:`MIN_MACS` multiply-adds (a thread hand-off
costs tens of microseconds), :func:`matmul` is ``np.matmul``.  Only the thread that entered
:func:`helping` splits: another thread calling :func:`matmul` meanwhile gets ``np.matmul``.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

T = TypeVar("T")

#: Products below this many multiply-adds (``rows · inner · columns``) are not split: a hand-off
#: costs tens of microseconds, and OpenBLAS runs small products (up to about 10⁶) through separate
#: small-matrix kernels; each half here stays far above that.
MIN_MACS = 1.6e7
#: Each half has at least this many rows.
MIN_ROWS = 16


class _State:
    """The helper thread and the thread that may use it (None: off)."""

    pool: ThreadPoolExecutor | None = None
    owner: int | None = None
    idle: Callable[[], bool] | None = None
    splits: int = 0
    #: :func:`tasks` has the helper: nothing else is split meanwhile.
    taken: bool = False
    shared: int = 0
    #: Splits run on the calling thread alone (the second core was taken).
    inline: int = 0


_state = _State()


@contextlib.contextmanager
def helping(enabled: bool = True, idle: Callable[[], bool] | None = None) -> Iterator[None]:
    """Within the block, :func:`matmul` called from this thread splits large products with one helper
    thread (``enabled=False``: a no-op block).  ``idle``: asked before each split whether the second
    core is free (the layer-wise pass passes its dense runner's :meth:`~chita_onnx.activations.AheadRunner.idle`);
    when it says no, the work runs on this thread alone.  Blocks nest: an inner block of the owning
    thread keeps the outer helper; the helper is shut down when the outermost block ends, also on an
    exception."""
    if not enabled or _state.owner is not None:
        yield
        return
    _state.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chita-solver")
    _state.owner = threading.get_ident()
    _state.idle = idle
    try:
        yield
    finally:
        pool, _state.pool, _state.owner, _state.idle = _state.pool, None, None, None
        pool.shutdown(wait=True)


def active() -> bool:
    """Whether :func:`matmul` splits large products on the calling thread."""
    return _state.pool is not None and not _state.taken and _state.owner == threading.get_ident()


def inline() -> int:
    """How many :func:`halves` splits have run both halves on the calling thread because the second
    core was taken (for tests and benchmarks)."""
    return _state.inline


def splits() -> int:
    """How many products (or other :func:`halves` work) have been split since the process started
    (for tests and benchmarks)."""
    return _state.splits


def halves(fn: Callable[[int, int], T], n: int, work: float, align: int = 1) -> list[T]:
    """``[fn(0, n)]``, or inside :func:`helping` (on its thread), for ``n ≥ 2`` items and ``work`` of at
    least :data:`MIN_MACS` multiply-adds: ``[fn(0, h), fn(h, n)]`` with ``h = n // 2`` rounded down to
    a multiple of ``align`` (no split when that is 0), the second on the helper thread at the same
    time, or after the first on this thread while the second core is taken (``idle``).  Whether to
    split depends on the shapes alone, never on the other core: a BLAS call on half the rows need
    not round as the one call does (OpenBLAS's Haswell kernels do not), so the values must not
    depend on the timing.  ``fn`` must release the GIL for most of its work to gain (BLAS/LAPACK
    calls do) and must not write what the other half reads."""
    pool = _state.pool
    h = (n // 2) // align * align
    if pool is None or _state.taken or _state.owner != threading.get_ident() or h < 1 or work < MIN_MACS:
        return [fn(0, n)]
    if _state.idle is not None and not _state.idle():  # the second core is taken: both halves here
        _state.inline += 1
        return [fn(0, h), fn(h, n)]
    second = pool.submit(fn, h, n)
    try:
        first = fn(0, h)
    finally:
        done = second.result()  # also when the first half failed: never leave the helper running
    _state.splits += 1
    return [first, done]


def shared() -> int:
    """How many :func:`tasks` calls have run their jobs on both threads (for tests and benchmarks)."""
    return _state.shared


def tasks(
    jobs: Sequence[Callable[[], T]],
    costs: Sequence[float],
    memory: Sequence[float] | None = None,
    budget: float | None = None,
) -> list[T]:
    """``[job() for job in jobs]``; inside :func:`helping` (on its thread), with at least two jobs, the
    second core idle and the total ``costs`` (multiply-adds) at least :data:`MIN_MACS`, the jobs are
    split into two lists of about equal cost (largest first, each to the lighter list) and run at
    once, one list on the helper thread, each job start to end on one thread, results in order.
    Meanwhile nothing else is split (:func:`halves` and :func:`matmul` run in one call on both
    threads), so each job computes exactly what it computes alone without :func:`helping`; while the
    second core is taken (``idle``) the jobs run in turn on this thread, still unsplit, so that the
    values never depend on the other core.  The jobs
    must be independent (none reads what another writes) and release the GIL for most of their work
    (BLAS and LAPACK calls do).  When a job raises (or Ctrl-C stops it), neither thread starts another
    job; once the other thread's current job has ended, the error is raised (a ``KeyboardInterrupt``
    first, else the first error in job order).  ``memory`` (bytes per job) and ``budget``: run one
    after the other when the two largest jobs together would hold more than ``budget`` at once."""
    n = len(jobs)
    if len(costs) != n or (memory is not None and len(memory) != n):
        raise ValueError(f"{n} jobs but {len(costs)} costs and {n if memory is None else len(memory)} sizes")
    if memory is not None and budget is not None and n >= 2 and sum(sorted(memory)[-2:]) > budget:
        return [job() for job in jobs]
    pool = _state.pool
    usable = pool is not None and not _state.taken and _state.owner == threading.get_ident()
    if not usable or n < 2 or float(sum(costs)) < MIN_MACS:
        return [job() for job in jobs]
    if _state.idle is not None and not _state.idle():  # the second core is taken: in turn, as the jobs would run
        _state.taken = True
        try:
            return [job() for job in jobs]
        finally:
            _state.taken = False
    assert pool is not None
    lists: tuple[list[int], list[int]] = ([], [])
    load = [0.0, 0.0]
    for i in sorted(range(n), key=lambda i: -float(costs[i])):
        side = 0 if load[0] <= load[1] else 1
        lists[side].append(i)
        load[side] += float(costs[i])
    results: list[Any] = [None] * n
    errors: dict[int, BaseException] = {}
    stop = threading.Event()  # a job failed (or Ctrl-C): neither thread starts another

    def run(which: list[int]) -> None:
        for i in sorted(which):
            if stop.is_set():
                return
            try:
                results[i] = jobs[i]()
            except BaseException as exc:  # re-raised in the caller below
                errors[i] = exc
                stop.set()
                return

    _state.taken = True
    try:
        second = pool.submit(run, lists[1])
        try:
            run(lists[0])
        finally:
            try:
                second.result()  # the helper ends its current job (it cannot be interrupted)
            except BaseException:
                stop.set()
                raise
    finally:
        _state.taken = False
    _state.shared += 1
    if errors:  # a Ctrl-C first, then the first error in job order
        raise next((e for _, e in sorted(errors.items()) if not isinstance(e, Exception)), errors[min(errors)])
    return results


def matmul(A: NDArray[Any], B: NDArray[Any], out: NDArray[Any] | None = None) -> NDArray[Any]:
    """``A @ B`` for a matrix ``A (M, K)`` and ``B (K, N)`` (``out (M, N)``: written in place and
    returned).  Inside :func:`helping` and from its thread, the rows of ``A`` are split in two halves
    computed at once; otherwise (or for small products) one ``np.matmul``."""
    if not active() or A.ndim != 2 or B.ndim != 2 or A.shape[0] < 2 * MIN_ROWS:
        return np.matmul(A, B) if out is None else np.matmul(A, B, out=out)
    (M, K), N = A.shape, B.shape[1]
    C = np.empty((M, N), dtype=np.result_type(A, B)) if out is None else out
    halves(lambda a, z: np.matmul(A[a:z], B, out=C[a:z]), M, float(M) * K * N)  # one call when small
    return C


__all__ = ["MIN_MACS", "active", "halves", "helping", "inline", "matmul", "shared", "splits", "tasks"]
