"""Per-stage held-out KL of ``--distill`` next to the layer-wise pass's final held-out KL.

    cd benchmarks
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice ../.venv/bin/python bench_distill_curves.py \\
        OUT.jsonl 0.9 M1.onnx,M2.onnx

For each audit-set model (``_calib.npz`` beside it), the calibration samples are split exactly as
:func:`chita_onnx.escalate.escalate` splits them (the same seeded fifth held out). The layer-wise pass
and ``--distill`` are fitted on the other four fifths. After every ``--distill`` stage, the KL of
that stage's weights to the dense outputs on the held-out fifth is recorded. The question it
answers: could ``--distill`` be stopped early once its KL is well above the layer-wise pass's? Only
if the curves rise monotonically, which they do not (BENCHMARKS.md, "Stop 49"). The stage budget is
lifted (10× the rule's), so every curve is complete.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np


def curve_of(path: Path, sparsity: float) -> dict[str, Any]:
    """The layer-wise pass's held-out KL and ``--distill``'s per-stage ``(stage, sparsity, KL)``."""
    from bench_auto_distill_rule import held_out_split

    from chita_onnx.escalate import DISTILL_BUDGET_SECONDS, budget_guard
    from chita_onnx.pipeline import GradientOracle, PhaseTimer, prune
    from chita_onnx.report import StageReport
    from chita_onnx.solver import SolverResult

    split = held_out_split(path, path.with_name(path.stem + "_calib.npz"), sparsity)
    if isinstance(split, str):
        return {"model": path.stem, "sparsity": sparsity, "skipped": split}
    sub, config, timer = split.sub, split.config, PhaseTimer()
    w_lay, _, _ = prune(sub, config, GradientOracle(sub, config), timer)
    dconfig = split.requested.with_(distill=True)
    guard = budget_guard(DISTILL_BUDGET_SECONDS * 10, dconfig.stages or 1)
    curve: list[tuple[int, float, float]] = []

    def hook(t: int, level: float, res: SolverResult, wt: np.ndarray, seconds: float) -> StageReport:
        curve.append((t, float(level), split.scores(wt)[1]))
        return guard(t, level, res, wt, seconds)

    t0 = time.perf_counter()
    prune(sub, dconfig, None, timer, hook)
    return {"model": path.stem, "sparsity": sparsity, "lay_kl": split.scores(w_lay)[1], "curve": curve,
            "s": time.perf_counter() - t0}  # fmt: skip


def main() -> None:
    logging.basicConfig(level=logging.ERROR)
    out, sparsity, models = Path(sys.argv[1]), float(sys.argv[2]), sys.argv[3].split(",")
    for name in models:
        rec = curve_of(Path(name).expanduser(), sparsity)
        if "skipped" in rec:
            print(f"{rec['model']}: skipped ({rec['skipped']})", flush=True)
            continue
        ks = [c[2] for c in rec["curve"]]
        print(f"{rec['model']}: layer-wise {rec['lay_kl']:.4g}, --distill final {ks[-1]:.4g}, "
              f"largest stage {max(ks):.4g}", flush=True)  # fmt: skip
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
