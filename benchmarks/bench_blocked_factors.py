"""Where the blocked factorisations start to pay: LAPACK's one call against ``chita_onnx.solver.blocked``.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_blocked_factors.py \\
        [--widths 512,768,1024,1280,1536,1792,2048] [--repeat 3]

For each width ``d``, a random symmetric positive definite ``H`` (``d × d``, the Gram of ``d + 500``
Gaussian rows) goes through what :class:`~chita_onnx.solver.layerwise.Damped` does with a layer's
damped Gram: the Cholesky factor ``L``, its inverse ``L⁻¹`` and ``L⁻ᵀL⁻¹``.  Once by SciPy's LAPACK
(``dpotrf``, ``dtrtri``, ``dlauum``; BLAS on one thread, as in the layer-wise pass) and once by
:mod:`chita_onnx.solver.blocked`, the latter both with the helper thread (the second core free) and
without it (the core taken by the dense runner, or a ``parallel.tasks`` job).  The rounds alternate;
the minimum of each is kept.  ``blocked.MIN_D`` should sit where the blocked route is no slower even
without the helper.  Also prints the largest difference between the two routes' ``L⁻ᵀL⁻¹``,
relative to its largest entry.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time
from collections.abc import Callable

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import scipy.linalg as sla

from chita_onnx.solver import blocked, parallel


def lapack(H: np.ndarray) -> np.ndarray:
    L, info = sla.lapack.dpotrf(H, lower=1, clean=1)
    assert info == 0
    Li, info = sla.lapack.dtrtri(L, lower=1)
    assert info == 0
    C, info = sla.lapack.dlauum(Li, lower=1)
    assert info == 0
    return np.tril(C)


def by_blocks(H: np.ndarray) -> np.ndarray:
    L, info = blocked.cholesky(np.array(H, order="F", copy=True))  # factored in place
    assert info == 0
    return np.tril(blocked.lower_gram(blocked.tri_inverse(L)))


def best(fn: Callable[[], np.ndarray], helper: bool, times: list[float]) -> np.ndarray:
    with parallel.helping(enabled=helper):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--widths", default="512,768,1024,1280,1536,1792,2048")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}; blocked.MIN_D = {blocked.MIN_D}\n"
    )
    head = (
        "| d | LAPACK ms | blocked, one thread ms | blocked, helper ms | speed-up one thread / helper | max rel. diff |"
    )
    print(head)
    print("|---:|---:|---:|---:|---|---:|")
    for d in (int(w) for w in args.widths.split(",")):
        A = rng.standard_normal((d + 500, d))
        H = np.asfortranarray(A.T @ A)
        t_l: list[float] = []
        t_1: list[float] = []
        t_2: list[float] = []
        ref = out = H
        for _ in range(args.repeat):
            ref = best(functools.partial(lapack, H), False, t_l)
            out = best(functools.partial(by_blocks, H), False, t_1)
            out = best(functools.partial(by_blocks, H), True, t_2)
        diff = float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))
        lo, o1, o2 = min(t_l), min(t_1), min(t_2)
        ms = " | ".join(f"{t * 1e3:.0f}" for t in (lo, o1, o2))
        print(f"| {d} | {ms} | {lo / o1:.2f} / {lo / o2:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
