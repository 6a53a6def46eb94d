"""Runs onnxsim's ONNX-native pruning inside onnxsim's own virtual environment (a subprocess).

Used by :mod:`chita_onnx.peers`; it imports only onnx, numpy and onnxsim (never chita_onnx), because
onnxsim's dependencies may clash with onnxruntime-training.  Usage::

    python _onnxsim_runner.py MODEL OUT --method sparsegpt|wanda|magnitude --sparsity S --data CALIB.npz

``CALIB.npz`` holds one array per model input per batch, keyed ``b<index>/<input name>``.  Prints one
JSON line with the onnxsim version and the seconds spent.
"""

from __future__ import annotations

import argparse
import json
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--method", choices=["sparsegpt", "wanda", "magnitude"], required=True)
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--data", default=None)
    args = ap.parse_args()

    import numpy as np
    import onnx
    import onnxsim

    batches: list[dict[str, object]] = []
    if args.data:
        with np.load(args.data, allow_pickle=False) as npz:
            grouped: dict[int, dict[str, object]] = {}
            for key in npz.files:
                idx, name = key.split("/", 1)
                grouped.setdefault(int(idx[1:]), {})[name] = npz[key]
            batches = [grouped[i] for i in sorted(grouped)]
    model = onnx.load(args.model)
    t0 = time.perf_counter()
    if args.method == "magnitude":
        out = onnxsim.apply_magnitude_pruning(model, sparsity=args.sparsity)
    elif args.method == "wanda":
        out = onnxsim.apply_wanda_pruning(model, calibration_data=batches, sparsity=args.sparsity)
    else:
        out = onnxsim.apply_sparsegpt_pruning(model, calibration_data=batches, sparsity=args.sparsity)
    seconds = time.perf_counter() - t0
    onnx.save(out, args.out)
    print(json.dumps({"onnxsim": getattr(onnxsim, "__version__", "?"), "seconds": seconds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
