"""CHITA solver time against the time to compute X, in one run, on a CIFAR-size ResNet-20.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_chita.py [--n 1000] [--json out.json]

Builds ResNet-20 (random weights, 3×32×32 input, about 270k prunable Conv/Gemm weights) with
onnx.helper, computes the n × p per-sample gradient matrix X with the project's gradient engine, then
runs the CHITA solver (one-shot, global budget) at each sparsity on that X, and reports wall times
side by side plus the peak resident memory of the process.  Target (issue 4): solver time ≤ the
time to compute X.  Each sparsity is one solve on the same X, so the ratios are measured in one run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradients import resnet20

from chita_onnx.data import ArraySource
from chita_onnx.gradients import per_sample_gradients
from chita_onnx.graph import find_prunable, get_weights
from chita_onnx.layout import Layout
from chita_onnx.solver import chita_iht, magnitude, objective
from chita_onnx.solver.budgets import make_budget

log = logging.getLogger("bench_chita")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="gradient rows (samples)")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9,0.95", help="comma-separated")
    ap.add_argument("--ridge", type=float, default=1e-3)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--json", type=Path, help="write the records here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)

    model = resnet20()
    tensors = find_prunable(model)
    layout = Layout.from_shapes((t.name, t.shape) for t in tensors)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, 3, 32, 32)).astype(np.float32)
    labels = rng.integers(0, 10, args.n)
    source = ArraySource({model.graph.input[0].name: x}, labels, batch_size=64)
    rss0 = peak_rss_mb()

    t0 = time.perf_counter()
    g = per_sample_gradients(model, source, layout.names)
    t_x = time.perf_counter() - t0
    X = g.X
    X *= np.float32(1 / np.sqrt(g.n))
    w_bar = layout.flatten(get_weights(model, layout.names))
    rss_x = peak_rss_mb()
    log.info("X: %d x %d in %.2f s (peak RSS %.0f MB)", g.n, layout.p, t_x, rss_x)

    records = []
    for s in [float(v) for v in args.sparsities.split(",")]:
        budget = make_budget([sl.size for sl in layout.slots], s)
        t1 = time.perf_counter()
        res = chita_iht(X, w_bar, budget, args.ridge, max_iter=args.max_iter)
        t_solve = time.perf_counter() - t1
        mp = magnitude(w_bar, budget)
        rec = {
            "sparsity": s,
            "k": budget.k,
            "solve_s": t_solve,
            "x_s": t_x,
            "ratio": t_solve / t_x,
            "iterations": res.iterations,
            "converged": res.converged,
            "objective": res.objective,
            "objective_magnitude": objective(X, mp.w, w_bar, args.ridge),
            "peak_rss_mb": peak_rss_mb(),
        }
        records.append(rec)
        log.info(
            "s=%.2f: solve %.2f s (%.2fx X), objective %.4g vs magnitude %.4g",
            s,
            t_solve,
            rec["ratio"],
            res.objective,
            rec["objective_magnitude"],
        )

    print(
        f"\nResNet-20, p = {layout.p:,}, n = {g.n}; {cpu_name()}, {os.cpu_count()} cores; "
        f"X computed in {t_x:.2f} s; RSS before X {rss0:.0f} MB, after X {rss_x:.0f} MB\n"
    )
    print(
        "| sparsity | k | solve (s) | solve / X time | iterations | converged | objective | magnitude objective "
        "| peak RSS (MB) |"
    )
    print("|---|---:|---:|---:|---:|---|---:|---:|---:|")
    for r in records:
        print(
            f"| {r['sparsity']} | {r['k']:,} | {r['solve_s']:.2f} | {r['ratio']:.2f} | {r['iterations']} | "
            f"{r['converged']} | {r['objective']:.4g} | {r['objective_magnitude']:.4g} | {r['peak_rss_mb']:.0f} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"p": layout.p, "n": g.n, "x_s": t_x, "cpu": cpu_name(), "records": records}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
