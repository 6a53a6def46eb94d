"""Exact ridge re-fit: one ``spd_solve`` per row (reference) against the size-bucketed batched solve.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_refit.py

Both paths run in one process on the same seeded layers (a damped Gram of correlated ReLU features,
``(M, d)`` weights, a random mask keeping each weight with probability 1/2 — per-row supports of
every size around d/2 — and the complement path with ``H_λ⁻¹`` as in :func:`prune_layer`).  Prints
the best of ``--repeats`` wall times of each, their ratio and the largest difference relative to
``max |W|``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np

from chita_onnx.solver import layerwise as L  # noqa: N812

SHAPES = [(2048, 512), (8210, 1024), (256, 2304), (64, 144), (512, 64)]
#: Whole-layer runs (``prune_layer``: OBS sweep to 50 % + re-fit) on the sweep's own masks.
LAYERS = [(2048, 512), (256, 2304), (64, 144)]


def whole_layer(M: int, d: int, repeats: int) -> tuple[float, float, float]:
    """``prune_layer`` to 50 % with the per-row and the batched re-fit: (old s, new s, max rel diff)."""
    dh, _, _, _, _ = problem(M, d, seed=M * d)
    H = dh.H - dh.lam * np.eye(d)
    W_bar = np.random.default_rng(M).standard_normal((1, M, d))
    out = []
    for flag in (False, True):
        L.BATCHED_REFIT = flag
        out.append(best(lambda: L.prune_layer(W_bar, H[None], keep=M * d // 2).W, repeats))
    L.BATCHED_REFIT = True
    (t_old, W_old), (t_new, W_new) = out
    return t_old, t_new, float(np.abs(W_new - W_old).max() / np.abs(W_old).max())


def problem(M: int, d: int, seed: int) -> tuple[L.Damped, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    mix = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    X = np.maximum(rng.standard_normal((2 * d, d)) @ mix, 0.0)
    dh = L.damp_gram(X.T @ X)
    W_bar = rng.standard_normal((M, d))
    rhs, W_star = L.targets(W_bar, dh, None)
    mask = rng.random((M, d)) < 0.5
    return dh, rhs, mask, L.inverse(dh), W_star


def best(fn: Callable[[], np.ndarray], repeats: int) -> tuple[float, np.ndarray]:
    out, t = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        t = min(t, time.perf_counter() - t0)
    assert out is not None
    return t, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--shapes", default=",".join(f"{m}x{d}" for m, d in SHAPES))
    ap.add_argument("--layers", default=",".join(f"{m}x{d}" for m, d in LAYERS))
    args = ap.parse_args()
    print(f"{'M x d':>12} {'rows':>6} {'per-row s':>10} {'batched s':>10} {'speed-up':>9} {'max rel diff':>13}")
    for spec in args.shapes.split(","):
        M, d = (int(v) for v in spec.split("x"))
        dh, rhs, mask, inv, W_star = problem(M, d, seed=M + d)
        t_old, W_old = best(partial(L._exact_refit, dh, rhs, mask, inv, W_star, batched=False), args.repeats)
        t_new, W_new = best(partial(L._exact_refit, dh, rhs, mask, inv, W_star, batched=True), args.repeats)
        diff = float(np.abs(W_new - W_old).max() / max(np.abs(W_old).max(), 1e-300))
        print(f"{spec:>12} {M:>6} {t_old:>10.3f} {t_new:>10.3f} {t_old / t_new:>8.2f}x {diff:>13.2e}", flush=True)
    print("\nprune_layer to 50 % (sweep + exact re-fit), the re-fit per row vs batched")
    print(f"{'M x d':>12} {'rows':>6} {'per-row s':>10} {'batched s':>10} {'speed-up':>9} {'max rel diff':>13}")
    for spec in filter(None, args.layers.split(",")):
        M, d = (int(v) for v in spec.split("x"))
        t_old, t_new, diff = whole_layer(M, d, args.repeats)
        print(f"{spec:>12} {M:>6} {t_old:>10.3f} {t_new:>10.3f} {t_old / t_new:>8.2f}x {diff:>13.2e}", flush=True)


if __name__ == "__main__":
    main()
