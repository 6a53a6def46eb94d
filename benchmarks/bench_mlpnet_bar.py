"""The paper MLPNet at high sparsity through the command line, as a user runs it (issue 9's bar).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_mlpnet_bar.py [--sparsities 0.95,0.98]

Calibration: the first 1,000 MNIST training images with labels (the papers' setting); scores: the
full 10k test set, both from ``/work/shared/data/mnist.npz`` (or ``--mnist``), normalised as the
papers do.  ``--score-on selection`` scores on MNIST training images 1,000–14,261 instead, the
images the ``--distill`` settings were chosen on (BENCHMARKS.md; never the test set); with
``--flags "--distill --seed S"`` that is one selection run of pairing seed S.  Each sparsity is
one ``chita-onnx compress`` process (its wall time and peak RSS from ``resource``); the table
prints the report's dense and pruned top-1 accuracy.
"""

from __future__ import annotations

import argparse
import json
import resource
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MNIST = Path("/work/shared/data/mnist.npz")
MLPNET = Path("/work/shared/data/mlpnet_paper.onnx")


def normalise(x: np.ndarray) -> np.ndarray:
    """uint8 [N, 28, 28] -> float32 [N, 1, 28, 28], (x / 255 - 0.1307) / 0.3081."""
    return (((x.astype(np.float32) / 255.0) - 0.1307) / 0.3081)[:, None, :, :]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsities", default="0.95,0.98")
    ap.add_argument("--flags", default="--distill", help="extra compress flags (default: the high-sparsity switch)")
    ap.add_argument("--mnist", type=Path, default=MNIST)
    ap.add_argument("--model", type=Path, default=MLPNET)
    ap.add_argument("--score-on", choices=("test", "selection"), default="test")
    args = ap.parse_args()
    exe = Path(sys.executable).with_name("chita-onnx")
    rows = []
    with tempfile.TemporaryDirectory(prefix="mlpnet-bar-") as tmp:
        d = np.load(args.mnist)
        calib, test = Path(tmp) / "calib.npz", Path(tmp) / "test.npz"
        np.savez(calib, input=normalise(d["x_train"][:1000]), labels=d["y_train"][:1000].astype(np.int64))
        if args.score_on == "selection":
            xs, ys = d["x_train"][1000:14262], d["y_train"][1000:14262]
        else:
            xs, ys = d["x_test"], d["y_test"]
        np.savez(test, input=normalise(xs), labels=ys.astype(np.int64))
        for s in (float(v) for v in args.sparsities.split(",")):
            out, rep = Path(tmp) / f"p{s}.onnx", Path(tmp) / f"p{s}.json"
            cmd = [str(exe), "compress", str(args.model), str(out), "--sparsity", str(s), "--data", str(calib)]
            cmd += ["--eval-data", str(test), "--report", str(rep), *shlex.split(args.flags)]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            wall = time.perf_counter() - t0
            peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
            if proc.returncode != 0:
                rows.append((s, None, None, wall, peak, proc.stderr.strip().splitlines()[-1]))
                continue
            r = json.loads(rep.read_text())
            ev = r["evaluation"]
            rows.append((s, ev["dense_accuracy"], ev["pruned_accuracy"], wall, peak, r["method"]))
    scored = "13,262 selection images (train 1,000-14,261)" if args.score_on == "selection" else "10,000 test images"
    print(f"command flags: {args.flags!r}; calibration 1,000 train images, scores on {scored}\n")
    print("| sparsity | method | dense % | pruned % | wall s | peak RSS MB (max so far) |")
    print("|---:|---|---:|---:|---:|---:|")
    for s, dense, pruned, wall, peak, what in rows:
        dd = "–" if dense is None else f"{100 * dense:.2f}"
        pp = "–" if pruned is None else f"{100 * pruned:.2f}"
        print(f"| {s} | {what} | {dd} | {pp} | {wall:.0f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
