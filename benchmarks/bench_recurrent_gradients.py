"""Per-sample gradients (chita's ``X``) on the zoo's recurrent models, for two source trees side by side.

    git worktree add /tmp/before <commit>
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_recurrent_gradients.py \\
        --trees /tmp/before,. [--models ddddocr-common,plcmos,silero-vad] [--rows 24] [--rounds 3]

Each measurement is a fresh process importing ``chita_onnx`` from one tree.  It builds the
``GradientOracle`` of ``compress --method chita`` on the first ``--rows`` calibration samples of the
zoo entry (``benchmarks/zoo/entries.py``; the model must be in the zoo cache), then times
``matrix(w̄)`` — the engine's build and the per-sample runs — and reports the build and the runs
separately, with the matrix's checksum (the trees must agree on it to float32 rounding).  The trees
alternate round by round, so a shared machine's load falls on both alike; the best time of each is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(0, sys.argv[2])
import numpy as np
import entries, run as zoo
from chita_onnx import CompressConfig
from chita_onnx.pipeline import GradientOracle, initial_weights, prepare
name, rows = sys.argv[3], int(sys.argv[4])
e = entries.BY_NAME[name]
calib, _ = zoo.datasets(e, rows)
cfg = CompressConfig(sparsity=0.5, method="chita", num_samples=rows)
prep = prepare(e.path(), calib.inputs, cfg)
w = initial_weights(prep)
oracle = GradientOracle(prep, cfg)
t0 = time.perf_counter()
X = oracle.matrix(w)
total = time.perf_counter() - t0
eng = next(iter(oracle._engines.values()))
build = float(eng.timings.get("engine", 0.0))
print(json.dumps({"s": total, "build": build, "runs": total - build, "shape": list(X.shape),
                  "norm": float(np.linalg.norm(X.astype(np.float64)))}))
"""


def run(tree: Path, name: str, rows: int) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(tree), str(HERE / "zoo"), name, str(rows)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tree)},
    )
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trees", required=True, help="two source trees, comma-separated: before,after")
    ap.add_argument("--models", default="ddddocr-common,plcmos,silero-vad")
    ap.add_argument("--rows", type=int, default=24, help="calibration samples (gradient rows)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    trees = [Path(t).resolve() for t in args.trees.split(",")]
    if len(trees) != 2:
        ap.error("--trees: give exactly two source trees")
    print(
        f"| model | X rows × p | {trees[0].name}: build / runs s | {trees[1].name}: build / runs s "
        "| runs ratio | ‖X‖ before / after |"
    )
    print("|---|---|---|---|---:|---|")
    for name in args.models.split(","):
        best: list[dict[str, object]] = [{}, {}]
        for _ in range(args.rounds):
            for k, tree in enumerate(trees):
                r = run(tree, name, args.rows)
                if not best[k] or float(str(r["runs"])) < float(str(best[k]["runs"])):
                    best[k] = r
        a, b = ({k: v if k == "shape" else float(str(v)) for k, v in r.items()} for r in best)
        n, p = (int(v) for v in a["shape"])  # type: ignore[attr-defined]
        print(
            f"| {name} | {n} × {p:,} | {a['build']:.1f} / {a['runs']:.2f} | {b['build']:.1f} / {b['runs']:.2f} "
            f"| {float(a['runs']) / float(b['runs']):.2f} | {a['norm']:.6g} / {b['norm']:.6g} |",  # type: ignore[arg-type]
            flush=True,
        )


if __name__ == "__main__":
    main()
