"""The layer-wise pass with one of its two-core switches on, against the same pass with it off,
side by side in one process.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice python benchmarks/bench_dense_ahead.py \\
        --models nudenet-320n,captcha-whisperer --rounds 4 [--switch ahead|helper|tasks|diagnostics|gram]

``--switch ahead`` (the default): the dense model's segments run ahead of the pass on a worker thread
(:attr:`~chita_onnx.sequential.LayerwiseOptions.ahead`).  ``--switch helper``: the solvers' large
matrix products are split by rows with a helper thread
(:attr:`~chita_onnx.sequential.LayerwiseOptions.helper`, :mod:`chita_onnx.solver.parallel`).
``--switch tasks``: independent solves (the directions of a recurrent node, the groups of a grouped
Conv) run as whole jobs on both threads (:func:`chita_onnx.solver.parallel.tasks`; off: one after
the other, each with its products split).  ``--switch diagnostics``: each layer also computes its
two reported-only errors (:attr:`~chita_onnx.sequential.LayerwiseOptions.diagnostics`; on is the
old behaviour, off the default).  ``--switch gram``: the wide layers' Gram updates split by their
triangle into two jobs (:func:`chita_onnx.layerstats.add_gram`; off: one product each, as before
stop 38).

For each zoo model (``benchmarks/zoo/entries.py``, its own calibration data), ``compress`` with the
default configuration at ``--sparsity`` in alternating rounds (on, off, off, on, ...), with the
switch forced on or off.  Prints, per round, the allocation's gradients and the pass (the
``layerwise`` phase less them), the pass's forward, statistics and solve seconds, and the peak RSS;
then whether the two settings wrote the same weights (``ahead`` must: the same segments run in the
same order; ``helper`` may differ in the last place of float64 products, so the largest relative
difference of any weight is printed too).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "zoo"))
sys.path.insert(0, str(HERE))

import entries  # type: ignore[import-not-found]  # noqa: E402
import numpy as np  # noqa: E402
import onnx  # noqa: E402
import run as zoo  # type: ignore[import-not-found]  # noqa: E402
from bench_layerwise_time import peak_rss  # noqa: E402
from onnx import numpy_helper  # noqa: E402


def one_run(
    name: str, calib: Any, sparsity: float, on: bool, switch: str = "ahead"
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from chita_onnx import CompressConfig, compress, layerstats
    from chita_onnx import reconstruct as rc
    from chita_onnx.solver import parallel

    e = entries.BY_NAME[name]
    real, real_tasks, real_split = rc.options, parallel.tasks, layerstats.SPLIT_GRAM_MACS
    if switch == "tasks":
        if not on:
            parallel.tasks = lambda jobs, costs, *a: [job() for job in jobs]  # type: ignore[assignment]
    elif switch == "gram":
        if not on:
            layerstats.SPLIT_GRAM_MACS = float("inf")
    else:
        rc.options = lambda config: dataclasses.replace(real(config), **{switch: on})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pruned.onnx"
            report, _, peak = peak_rss(lambda: compress(e.path(), out, calib.inputs, CompressConfig(sparsity=sparsity)))
            weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    finally:
        rc.options, parallel.tasks, layerstats.SPLIT_GRAM_MACS = real, real_tasks, real_split
    t = report.timings
    info: dict[str, Any] = dict(report.solver)
    alloc = float(info.get("allocation_s", t.get("gradients", 0.0)))
    row = {
        "on": on,
        "allocation_s": alloc,
        "pass_s": float(t.get("layerwise", 0.0)) + float(t.get("statistics", 0.0)),
        "forward_s": float(info.get("layer_forward_s", 0.0)),
        "statistics_s": float(info.get("layer_statistics_s", 0.0)),
        "solve_s": float(info.get("layer_solve_s", 0.0)),
        "peak_mb": peak,
    }
    return row, weights


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="nudenet-320n,captcha-whisperer")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--rounds", type=int, default=4, help="runs of each setting, alternating")
    switches = ["ahead", "helper", "tasks", "diagnostics", "gram"]
    ap.add_argument("--switch", choices=switches, default="ahead", help="which option is compared")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(f"Machine: {zoo.machine_line()}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}\n")
    print(f"| model | round | {args.switch} | pass s (allocation s) | forward / statistics / solve s | peak RSS MB |")
    print("|---|---:|---|---:|---|---:|")
    for name in args.models.split(","):
        e = entries.BY_NAME[name]
        calib, _ = zoo.datasets(e, None)
        first: dict[bool, dict[str, np.ndarray]] = {}
        passes: dict[bool, list[float]] = {True: [], False: []}
        for r in range(args.rounds):
            for on in (True, False) if r % 2 == 0 else (False, True):
                row, w = one_run(name, calib, args.sparsity, on, args.switch)
                first.setdefault(on, w)
                passes[on].append(row["pass_s"])
                peak = "–" if row["peak_mb"] is None else f"{row['peak_mb']:,.0f}"
                setting = "on" if on else "off"
                print(
                    f"| {name} | {r + 1} | {setting} | {row['pass_s']:.1f} ({row['allocation_s']:.1f}) "
                    f"| {row['forward_s']:.1f} / {row['statistics_s']:.1f} / {row['solve_s']:.1f} | {peak} |",
                    flush=True,
                )
        same = first[True].keys() == first[False].keys() and all(
            np.array_equal(first[True][k], first[False][k]) for k in first[True]
        )
        diff = max(
            (_relative_difference(first[True][k], first[False][k]) for k in first[True] if k in first[False]),
            default=0.0,
        )
        on_s, off_s = float(np.median(passes[True])), float(np.median(passes[False]))
        print(
            f"| {name} | median | on / off | {on_s:.1f} / {off_s:.1f} = {on_s / off_s:.2f} "
            f"| same weights: {same} (largest relative difference {diff:.2g}) | |"
        )


def _relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """``max|a − b| / max|b|`` of two float weights (0 for other dtypes or equal arrays)."""
    if a.shape != b.shape or a.dtype.kind != "f" or np.array_equal(a, b):
        return 0.0 if a.shape == b.shape else float("inf")
    scale = float(np.abs(b).max()) or 1.0
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max()) / scale


if __name__ == "__main__":
    main()
