"""Audit set of models *saved by onnxruntime after its graph optimizations*, as deployment pipelines
ship them (``SessionOptions.optimized_model_filepath``): the layers become ``com.microsoft``
``FusedConv`` / ``FusedGemm`` / ``FusedMatMul``, attention and GELU blocks contrib ops.

    .venv/bin/python benchmarks/make_unseen_ortopt.py [--models a,b] [--level extended]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \\
        --dir ~/.cache/chita-onnx/unseen-ortopt

Reads the torch audit set (``benchmarks/make_unseen.py``, ``~/.cache/chita-onnx/unseen``) and writes
each chosen model optimized at ``--level`` (onnxruntime's CPU provider, one thread), with the same
data splits and manifest entry, to ``--out``.  Runs in the project's environment: the training
wheel's onnxruntime is the optimizer (1.19.2).
"""

from __future__ import annotations

import argparse
import collections
import json
import shutil
import sys
from pathlib import Path

import onnx
import onnxruntime as ort

SRC = Path.home() / ".cache" / "chita-onnx" / "unseen"
OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-ortopt"
LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", type=Path, default=SRC)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--models", default="resnet20_bn,transformer,crnn_gru,tcn1d")
    ap.add_argument("--level", choices=sorted(LEVELS), default="extended")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((args.src / "manifest.json").read_text())
    mine: dict[str, object] = {}
    for name in [m for m in args.models.split(",") if m]:
        so = ort.SessionOptions()
        so.graph_optimization_level = LEVELS[args.level]
        so.intra_op_num_threads = 1
        so.optimized_model_filepath = str(args.out / f"{name}.onnx")
        ort.InferenceSession(str(args.src / f"{name}.onnx"), so, providers=["CPUExecutionProvider"])
        for split in ("calib", "select", "test"):
            shutil.copyfile(args.src / f"{name}_{split}.npz", args.out / f"{name}_{split}.npz")
        ops = collections.Counter(
            n.op_type for n in onnx.load(str(args.out / f"{name}.onnx")).graph.node if n.domain == "com.microsoft"
        )
        mine[name] = {**manifest[name], "optimized_by": f"onnxruntime {ort.__version__} ({args.level})",
                      "contrib_ops": dict(ops)}  # fmt: skip
        print(f"{name}: {dict(ops)}", flush=True)
    (args.out / "manifest.json").write_text(json.dumps(mine, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
