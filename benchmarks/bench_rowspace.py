"""One layer, both layer-wise routes side by side: the Gram route against the row-space solver.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_rowspace.py [--rounds 2]

For each layer shape ``N rows × d inputs × M outputs`` at a kept fraction, seeded Gaussian rows (float32,
as the pass gathers them) and weights, dense targets from slightly perturbed inputs:

* ``Gram s``: forming ``H = AᵀA`` and ``B = AᵀY`` from the float32 rows as the pass does, then
  :func:`~chita_onnx.solver.layerwise.prune_layer`;
* ``rows s``: :func:`~chita_onnx.solver.rowspace.prune_layer_rows` on the same rows;
* which route :func:`~chita_onnx.solver.rowspace.cheaper` picks, the masks that differ, and each
  result's damped objective ``Σ_i ‖A w_i − y_i‖² + λ‖w_i − w̄_i‖²`` evaluated exactly (float64) on
  the rows.

Times are the minimum over ``--rounds`` alternating rounds, in one process.  Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from chita_onnx.solver.layerwise import DAMP, prune_layer
from chita_onnx.solver.rowspace import cheaper, prune_layer_rows, row_error

#: (N rows, d inputs, M outputs, kept fraction): the audit heads of BENCHMARKS.md stop 33, and shapes
#: on both sides of the cost rule's line.
SHAPES = [
    (205, 6272, 10, 0.46),
    (205, 3136, 128, 0.47),
    (205, 1344, 10, 0.5),
    (64, 1280, 2, 0.5),
    (200, 1024, 1000, 0.5),
    (410, 1568, 64, 0.45),
    (600, 1568, 64, 0.45),
    (500, 1024, 10, 0.5),
    (900, 1024, 10, 0.5),
]


def damped(Wk: np.ndarray, A: np.ndarray, Y: np.ndarray, W_bar: np.ndarray) -> float:
    """``Σ_i ‖A w_i − y_i‖² + λ‖w_i − w̄_i‖²`` in float64, ``λ = DAMP · ‖A‖²_F / d``."""
    A64, Y64 = A.astype(np.float64), Y.astype(np.float64)
    lam = DAMP * float(np.einsum("ij,ij->", A64, A64)) / A.shape[1]
    return row_error(Wk, A64, Y64, W_bar) + lam * float(np.sum((Wk - W_bar) ** 2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    print("| N × d × M, kept | rule picks | Gram s | rows s | masks differing | damped objective: Gram / rows |")
    print("|---|---|---:|---:|---:|---|")
    for n, d, m, f in SHAPES:
        rng = np.random.default_rng(n * 7 + d + m)
        A = rng.standard_normal((n, d)).astype(np.float32)
        W = rng.standard_normal((m, d))
        Y = ((A + 0.1 * rng.standard_normal((n, d)).astype(np.float32)) @ W.T.astype(np.float32)).astype(np.float32)
        keep = int(f * m * d)
        t_gram, t_rows = [], []
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            H = (A.T @ A).astype(np.float64)[None]
            B = (A.T @ Y).astype(np.float64)[None]
            yy = (Y.astype(np.float64) ** 2).sum(axis=0)[None]
            g = prune_layer(W[None], H, B, yy, keep=keep)
            t_gram.append(time.perf_counter() - t0)
            del H
            t0 = time.perf_counter()
            r = prune_layer_rows(W, A, Y, keep=keep)
            t_rows.append(time.perf_counter() - t0)
        pick = "rows" if cheaper(n, d, m, f) else "Gram"
        diff = int(np.count_nonzero(g.mask != r.mask))
        print(
            f"| {n} × {d:,} × {m:,}, {f} | {pick} | {min(t_gram):.2f} | {min(t_rows):.2f} | {diff} | "
            f"{damped(g.W[0], A, Y, W):.6g} / {damped(r.W[0], A, Y, W):.6g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
