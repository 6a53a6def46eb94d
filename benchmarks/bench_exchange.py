"""CHITA's exchange search against its IHT and magnitude + backsolve: objective and time, side by side.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_exchange.py [--n 1000] [--json out.json]

Two problems, each with one X shared by every solver (issue 9, "k ≫ n"):

* **ResNet-20** (CIFAR size, random weights, 270,896 prunable weights, ``n`` random samples and
  labels): X is computed with the gradient engine and timed, so each solve is also reported as a
  multiple of the time to compute X (the budget of issue 4: solve ≤ X).
* **The paper's MLPNet** (``/work/shared/data/mlpnet_paper.onnx`` with the first 1,000 MNIST training
  images and their labels, empirical Fisher; skipped if the file is missing): real gradients.

Per sparsity: magnitude + backsolve (the exact re-fit on the magnitude support), CHITA with the IHT
search (``method="iht"``, what CHITA used for ``k`` > 500 before the exchange search) and CHITA with
the exchange search (``method="exchange"``, the default for ``k`` > 500 when λ > 0).  Objective =
``f`` on the shared X at λ = 1e-3; ``moved`` = kept weights not in the magnitude support.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chita import cpu_name, peak_rss_mb
from bench_gradients import resnet20

from chita_onnx.data import ArraySource
from chita_onnx.gradients import per_sample_gradients
from chita_onnx.graph import find_prunable, get_weights, load_model
from chita_onnx.layout import Layout
from chita_onnx.solver import chita_iht, hard_threshold, magnitude
from chita_onnx.solver.budgets import make_budget

log = logging.getLogger("bench_exchange")
PAPER = Path("/work/shared/data/mlpnet_paper.onnx")
MNIST = Path("/work/shared/data/mnist.npz")


def gradients(
    model: object, inputs: dict[str, np.ndarray], labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray, Layout, float]:
    """Scaled X (n × p float32), w̄, the layout and the seconds it took to compute X."""
    tensors = find_prunable(model)  # type: ignore[arg-type]
    layout = Layout.from_shapes((t.name, t.shape) for t in tensors)
    source = ArraySource(inputs, labels, batch_size=64)
    t0 = time.perf_counter()
    g = per_sample_gradients(model, source, layout.names)  # type: ignore[arg-type]
    t_x = time.perf_counter() - t0
    X = g.X
    X *= np.float32(1 / np.sqrt(g.n))
    w_bar = layout.flatten(get_weights(model, layout.names))  # type: ignore[arg-type]
    return X, w_bar, layout, t_x


def solve_all(
    name: str, X: np.ndarray, w_bar: np.ndarray, layout: Layout, t_x: float, levels: list[float], ridge: float
) -> list[dict[str, object]]:
    records: list[dict[str, object]] = []
    for s in levels:
        budget = make_budget([sl.size for sl in layout.slots], s)
        start = set(hard_threshold(w_bar, budget).tolist())
        for label in ("magnitude+backsolve", "chita iht", "chita exchange"):
            t0 = time.perf_counter()
            if label == "magnitude+backsolve":
                res = magnitude(w_bar, budget, X=X, ridge=ridge, update="obs")
            else:
                res = chita_iht(X, w_bar, budget, ridge, method=label.split()[1])  # type: ignore[arg-type]
            secs = time.perf_counter() - t0
            moved = len(set(res.support.tolist()) - start)
            rec = {
                "problem": name,
                "sparsity": s,
                "k": budget.k,
                "solver": label,
                "objective": res.objective,
                "seconds": secs,
                "x_seconds": t_x,
                "ratio_to_x": secs / t_x,
                "moved": moved,
                "peak_rss_mb": peak_rss_mb(),
            }
            records.append(rec)
            log.info(
                "%s s=%.2f %-20s f=%.6g %.2fs (%.2fx X) moved %d",
                name,
                s,
                label,
                res.objective,
                secs,
                secs / t_x,
                moved,
            )
    return records


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="gradient rows (samples)")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9,0.95", help="comma-separated")
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for noisy in ("chita_onnx",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    levels = [float(v) for v in args.sparsities.split(",")]
    records: list[dict[str, object]] = []

    model = resnet20()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, 3, 32, 32)).astype(np.float32)
    X, w_bar, layout, t_x = gradients(model, {model.graph.input[0].name: x}, rng.integers(0, 10, args.n))
    log.info("ResNet-20: X %d x %d in %.2f s", X.shape[0], X.shape[1], t_x)
    records += solve_all("ResNet-20", X, w_bar, layout, t_x, levels, args.ridge)
    del X

    if PAPER.is_file() and MNIST.is_file():
        d = np.load(MNIST)
        xs = ((d["x_train"][:1000].astype(np.float32) / 255 - 0.1307) / 0.3081)[:, None]
        paper = load_model(PAPER)
        X, w_bar, layout, t_x = gradients(paper, {paper.graph.input[0].name: xs}, d["y_train"][:1000].astype(np.int64))
        records += solve_all("paper MLPNet", X, w_bar, layout, t_x, [*levels, 0.98], args.ridge)

    print(f"\n{cpu_name()}, {os.cpu_count()} cores, one BLAS thread\n")
    print("| problem | sparsity | k | solver | objective | seconds | solve / X time | moved |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for r in records:
        print(
            f"| {r['problem']} | {r['sparsity']} | {r['k']:,} | {r['solver']} | {r['objective']:.6g} | "
            f"{r['seconds']:.2f} | {r['ratio_to_x']:.2f} | {r['moved']:,} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "records": records}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
