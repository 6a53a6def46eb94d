"""One layer's whole solve (``prune_layer``: damping, factorisation, OBS sweep to 50 %, re-fit,
diagnostics) on the shapes that dominate issue 9's time bar, for two source trees side by side.

    git worktree add /tmp/before <commit>
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_layer_solve.py \\
        --trees /tmp/before,. [--rounds 3]

Each measurement is a fresh process importing ``chita_onnx`` from one tree; the trees alternate
round by round (a shared machine's load then falls on both alike) and the best time of each is kept.
The layer: ``R`` input rows of ``d`` correlated features with decaying scale (float32, as the pass
accumulates them), dense targets from slightly different inputs (the cross term ``B``), ``M``
outputs.  Shapes (``M × d``, rows):

* 400 × 4096, 2,040 rows: captcha-whisperer's LSTM input weights (20 steps × 102 samples);
* 8210 × 1024, 2,600 rows: ddddocr-common's output layer;
* 2048 × 1024, 6,000 rows: one direction of ddddocr-common's bidirectional LSTM (``[W R]``).

Prints a markdown table: seconds per tree, their ratio, and the summed output error of each (the
same to the printed digits when the two trees compute the same solution).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

SHAPES = [(400, 4096, 2040), (8210, 1024, 2600), (2048, 1024, 6000)]

CHILD = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[1])
from chita_onnx.solver.layerwise import prune_layer
M, d, R = (int(a) for a in sys.argv[2:5])
rng = np.random.default_rng(M * d + R)
X = (rng.standard_normal((R, d)) * np.geomspace(1.0, 0.05, d)).astype(np.float32)
W = rng.standard_normal((M, d)) / np.sqrt(d)
Xd = X + np.float32(0.05) * rng.standard_normal((R, d)).astype(np.float32)
Y = Xd @ W.T.astype(np.float32)
H = (X.T @ X).astype(np.float64)[None]
B = (X.T @ Y).astype(np.float64)[None]
yy = (Y.astype(np.float64) ** 2).sum(0)[None]
t0 = time.perf_counter()
sol = prune_layer(W[None], H, B, yy, keep=M * d // 2)
print(json.dumps({"s": time.perf_counter() - t0, "error": sol.error, "refit": sol.info["refit"]}))
"""


def run(tree: Path, shape: tuple[int, int, int]) -> dict[str, float | str]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), *map(str, shape)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    result: dict[str, float | str] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", required=True, help="two source trees, comma-separated: before,after")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    if len(trees) != 2:
        ap.error("--trees: give exactly two source trees")
    print(f"| layer (M × d, rows) | re-fit | {trees[0].name} s | {trees[1].name} s | ratio | error before / after |")
    print("|---|---|---:|---:|---:|---|")
    for shape in SHAPES:
        best: list[dict[str, float | str]] = [{}, {}]
        for _ in range(args.rounds):
            for k, tree in enumerate(trees):
                r = run(tree, shape)
                if not best[k] or float(r["s"]) < float(best[k]["s"]):
                    best[k] = r
        a, b = float(best[0]["s"]), float(best[1]["s"])
        M, d, R = shape
        print(
            f"| {M} × {d}, {R:,} | {best[1]['refit']} | {a:.2f} | {b:.2f} | {b / a:.2f} | "
            f"{float(best[0]['error']):.6g} / {float(best[1]['error']):.6g} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
