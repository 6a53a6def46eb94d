"""The time ``--head-select auto`` (the default) adds, measured side by side with ``layer``.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_head_select_time.py \\
        --dir ~/.cache/chita-onnx/unseen-torch6 --models moe_topk_ts [--dir ... --models ...] [--rounds 3]

For each audit model (``{model}.onnx`` and ``{model}_calib.npz`` in a ``--dir``; every ``--dir`` is
searched for every name), ``compress`` at 0.5 runs with ``head_select="auto"`` and ``"layer"`` in
alternating rounds in this one process, and the minimum wall time of each is kept.  Prints one
line per model: both times, their ratio, and what ``auto`` chose (empty when it made no choice).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def main() -> None:
    from chita_onnx import CompressConfig, compress

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, action="append", required=True)
    ap.add_argument("--models", required=True, help="comma-separated names")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.5)
    a = ap.parse_args()
    print("| model | auto s | layer s | auto / layer | auto chose |")
    print("|---|---:|---:|---:|---|")
    for model in a.models.split(","):
        folder = next(d for d in a.dir if (d / f"{model}.onnx").exists())
        best = {"auto": float("inf"), "layer": float("inf")}
        chose = ""
        with tempfile.TemporaryDirectory() as tmp:
            for _ in range(a.rounds):
                for how in ("auto", "layer"):
                    t0 = time.perf_counter()
                    rep = compress(
                        folder / f"{model}.onnx",
                        Path(tmp) / f"{how}.onnx",
                        folder / f"{model}_calib.npz",
                        CompressConfig(sparsity=a.sparsity, head_select=how),  # type: ignore[arg-type]
                    )
                    best[how] = min(best[how], time.perf_counter() - t0)
                    if how == "auto":
                        chose = str(rep.solver.get("head_select", ""))
        ratio = best["auto"] / best["layer"]
        print(f"| {model} | {best['auto']:.2f} | {best['layer']:.2f} | {ratio:.2f} | {chose} |", flush=True)


if __name__ == "__main__":
    main()
