"""How many BLAS threads NumPy/SciPy may use while a solver runs.

OpenBLAS starts one thread per CPU it sees and its threads spin while they wait.  When the cores
are busy with other work (other processes, onnxruntime's own threads) those spinning threads fight
for the same cores, and the solvers' matrix-vector products and factorizations get many times
slower: ``X.T @ (X @ w)`` on a 1000 x 20000 matrix ran 1.4-2.1x and a 1500 x 1500 Cholesky
2.3-10x slower with 2 threads than with 1, measured on the team's 2-core machine while the fuzz
suite ran.

The policy (:func:`solver_threads`):

* the user decides when they set any of :data:`USER_VARIABLES` (``OPENBLAS_NUM_THREADS=4`` is
  obeyed as is: nothing is limited);
* otherwise BLAS gets the physical cores this process may run on (:func:`physical_cores`, from
  ``os.sched_getaffinity`` and the kernel's CPU topology; hyper-threads share a core's arithmetic
  units and do not speed up BLAS), minus the cores other work keeps busy (the 1-minute load
  average, less the one core this process uses itself), and at least 1.  The load average is
  system-wide: in a container on a busy host it gives 1 thread, the safe side (one thread is never
  more than the core count slower; spinning threads on busy cores were up to 10x slower).

The limit is applied with ``threadpoolctl`` for the duration of a ``with`` block and the previous
limits are restored afterwards.  This module has no other dependency (the solver may use it).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping

from threadpoolctl import threadpool_info, threadpool_limits

log = logging.getLogger(__name__)

#: Environment variables by which the user sets BLAS threading themselves (then it is left alone).
USER_VARIABLES = (
    "OPENBLAS_NUM_THREADS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def _cpus() -> set[int]:
    if hasattr(os, "sched_getaffinity"):
        return set(os.sched_getaffinity(0))
    return set(range(os.cpu_count() or 1))  # pragma: no cover - not Linux


def physical_cores(cpus: set[int] | None = None, sysfs: str = "/sys/devices/system/cpu") -> int:
    """Distinct physical cores among ``cpus`` (default: the CPUs this process may run on); each CPU
    whose topology is not readable counts as a core of its own."""
    cores: set[tuple[str, ...]] = set()
    for cpu in _cpus() if cpus is None else cpus:
        try:
            with open(f"{sysfs}/cpu{cpu}/topology/physical_package_id") as f:
                package = f.read().strip()
            with open(f"{sysfs}/cpu{cpu}/topology/core_id") as f:
                core = f.read().strip()
            cores.add((package, core))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def solver_thread_limit(
    environ: Mapping[str, str] | None = None, *, cores: int | None = None, load: float | None = None
) -> int | None:
    """The BLAS thread count for solver work, or ``None`` when the user set their own (see the
    module's policy).  ``cores`` and ``load`` (1-minute load average) default to the machine's."""
    env = os.environ if environ is None else environ
    if any(env.get(v, "").strip() for v in USER_VARIABLES):
        return None
    cores = physical_cores() if cores is None else cores
    if load is None:
        try:
            load = os.getloadavg()[0]
        except OSError:  # pragma: no cover - no load average on this system
            load = 0.0
    busy_elsewhere = max(0, round(load - 1.0))
    return max(1, min(cores, cores - busy_elsewhere))


@contextlib.contextmanager
def limit_blas_threads(limit: int | None) -> Iterator[None]:
    """At most ``limit`` BLAS threads inside the block (``None``: leave them as they are); the
    previous limits come back when it ends, also on an exception."""
    if limit is None:
        yield
        return
    with threadpool_limits(limits=max(1, int(limit)), user_api="blas"):
        yield


@contextlib.contextmanager
def solver_threads() -> Iterator[None]:
    """The policy of this module around solver calls."""
    limit = solver_thread_limit()
    log.debug("BLAS threads for the solver: %s", "as the environment sets them" if limit is None else limit)
    with limit_blas_threads(limit):
        yield


def blas_threads() -> int:
    """The most threads any loaded BLAS library runs one call with now (1 when none is loaded)."""
    counts = [int(lib.get("num_threads") or 1) for lib in threadpool_info() if lib.get("user_api") == "blas"]
    return max(counts, default=1)


@contextlib.contextmanager
def leave_a_core() -> Iterator[None]:
    """Around solver work that runs next to a busy thread of our own (the layer-wise pass's dense
    runner, :class:`~chita_onnx.activations.AheadRunner`): the policy's limit less one core, at least
    1, so that no BLAS thread spins on the core that thread uses.  A limit the user set is kept."""
    limit = solver_thread_limit()
    limit = None if limit is None else max(1, limit - 1)
    log.debug("BLAS threads next to the dense runner: %s", "as the environment sets them" if limit is None else limit)
    with limit_blas_threads(limit):
        yield


__all__ = [
    "USER_VARIABLES",
    "blas_threads",
    "leave_a_core",
    "limit_blas_threads",
    "physical_cores",
    "solver_thread_limit",
    "solver_threads",
]
