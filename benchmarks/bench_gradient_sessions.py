"""What a second onnxruntime session would give the per-sample gradients (measured, not adopted).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_gradient_sessions.py \\
        --models ddddocr-common,captcha-whisperer,PATH/resnet18_ts.onnx [--repeat 2] [--json out.json]

chita-onnx computes per-sample gradients on one onnxruntime-training session with one intra-op
thread: chita's X and the default's OBD allocation (its Fisher diagonal) both run on one core while
the second one idles. This measures, per model (a zoo entry name, or an audit-set ``.onnx`` next to
its ``_calib.npz``), the Fisher diagonal's gradient runs on the calibration samples the default's
allocation uses (at most ``--allocation-samples``):

* ``one``: one engine over all samples, in chunks of 8 (as ``GradientOracle.fisher_diagonal`` reads them);
* ``two``: two engines built from the same model, each over half of the samples, in two threads
  (onnxruntime releases the GIL while it runs);

alternating, ``--repeat`` rounds, the seconds of the runs alone (the second engine's build is
reported apart). Both give the same diagonal up to float summation order (the largest relative
difference is printed). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "zoo"))

import numpy as np  # noqa: E402

CHUNK = 8


def _model(name: str) -> tuple[str, Path, Any]:
    if name.endswith(".onnx"):
        path = Path(name).expanduser()
        return path.stem, path, path.with_name(path.stem + "_calib.npz")
    import entries  # type: ignore[import-not-found]
    import run as zoo  # type: ignore[import-not-found]

    e = entries.BY_NAME[name]
    return name, e.path(), zoo.datasets(e, None)[0].inputs


def measure(name: str, repeat: int) -> dict[str, Any]:
    from chita_onnx import CompressConfig
    from chita_onnx.data import materialize
    from chita_onnx.gradients.engine import GradientEngine
    from chita_onnx.pipeline import GradientOracle, _column_squares, initial_weights, prepare

    label, path, calib = _model(name)
    cfg = CompressConfig(sparsity=0.5)
    prep = prepare(path, calib, cfg)
    w = initial_weights(prep)
    oracle = GradientOracle(prep, cfg)
    n = min(cfg.allocation_samples or oracle.n, oracle.n)
    samples = materialize(prep.calib, prep.specs, batch_size=cfg.batch_size)
    example = next(iter(prep.calib))

    def build() -> tuple[GradientEngine, float]:
        t = time.perf_counter()
        eng = GradientEngine(
            prep.model, list(prep.layout.names), example=example, loss=cfg.loss, output=cfg.output,
            mini_batch=cfg.mini_batch,
        )  # fmt: skip
        eng.set_weights(prep.layout.unflatten(w))
        return eng, time.perf_counter() - t

    engines = [build(), build()]

    def run(eng: GradientEngine, lo: int, hi: int, out: list[np.ndarray]) -> None:
        d = np.zeros(prep.layout.p)
        for r0 in range(lo, hi, CHUNK):
            r1 = min(hi, r0 + CHUNK)
            g = eng.compute(
                samples.take(np.arange(r0, r1)), fisher=oracle.fisher, seed=cfg.seed,
                fisher_rows=oracle.fisher_rows, first_sample=r0,
            )  # fmt: skip
            d += _column_squares(g.X)
        out.append(d)

    ones: list[float] = []
    twos: list[float] = []
    diff = 0.0
    for _ in range(repeat):
        one: list[np.ndarray] = []
        t = time.perf_counter()
        run(engines[0][0], 0, n, one)
        ones.append(time.perf_counter() - t)
        halves: list[list[np.ndarray]] = [[], []]
        threads = [
            threading.Thread(target=run, args=(engines[i][0], lo, hi, halves[i]))
            for i, (lo, hi) in enumerate(((0, n // 2), (n // 2, n)))
        ]
        t = time.perf_counter()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        twos.append(time.perf_counter() - t)
        both = halves[0][0] + halves[1][0]
        diff = max(diff, float(np.max(np.abs(both - one[0])) / max(float(np.max(one[0])), 1e-300)))
    return {
        "model": label, "samples": n, "p": prep.layout.p, "build_s": [round(b, 3) for _, b in engines],
        "one_s": ones, "two_s": twos, "speedup": [a / b for a, b in zip(ones, twos, strict=True)], "max_rel_diff": diff,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", required=True, help="comma-separated zoo entry names or .onnx paths")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    import platform

    cpu = platform.processor() or platform.machine()
    print(f"machine: {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}")
    print("| model | samples | p | engine build s | one session s | two sessions s | speed-up | max rel. diff |")
    print("|---|---:|---:|---|---|---|---|---:|")
    recs = []
    for name in args.models.split(","):
        r = measure(name.strip(), args.repeat)
        recs.append(r)
        fmt = lambda xs: " / ".join(f"{x:.2f}" for x in xs)  # noqa: E731
        print(
            f"| {r['model']} | {r['samples']} | {r['p']:,} | {fmt(r['build_s'])} | {fmt(r['one_s'])} | "
            f"{fmt(r['two_s'])} | {fmt(r['speedup'])} | {r['max_rel_diff']:.1e} |",
            flush=True,
        )
    if args.json:
        args.json.write_text(json.dumps(recs, indent=2))


if __name__ == "__main__":
    main()
