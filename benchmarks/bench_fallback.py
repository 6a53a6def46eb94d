"""Per-weight fallback in the default: one weight the layer-wise pass cannot reconstruct no longer
sends the whole model to one-shot ``chita``.

The bundled ``digits_cnn.onnx`` with its 1×1 ``conv3`` rewritten as the same function through a MatMul
with a 3-D constant weight ``[1, 16, 32]`` (Transpose → MatMul → Transpose; 512 of the 10,336 prunable
weights), which the layer-wise pass does not reconstruct.  Rows, every one through
:func:`chita_onnx.compress` (calibration ``digits_calib.npz``, 256 images; accuracy on the 500 held-out
images of ``digits_test.npz``, which nothing is selected on):

* ``before``: ``--method chita`` on the rewritten model (what ``auto`` ran there before this change);
* ``after``: the default (``auto``) on the rewritten model (layer-wise, ``conv3`` pruned by its
  allocation saliency and not re-fitted);
* ``reference``: the default on the original model (every weight reconstructed).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_fallback.py \
        --sparsities 0.5 0.7 0.9
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.graph import find_prunable, get_weights, load_model

MODELS = Path(__file__).resolve().parent.parent / "models"
CNN, CALIB, TEST = MODELS / "digits_cnn.onnx", MODELS / "digits_calib.npz", MODELS / "digits_test.npz"


def with_grouped_conv3(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with the 1×1 Conv ``conv3`` as ``Transpose → MatMul(x, W [1, Cin, Cout]) → Transpose``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    w = numpy_helper.to_array(inits["conv3.weight"])  # (Cout, Cin, 1, 1)
    pos, node = next((i, n) for i, n in enumerate(g.node) if n.input[1:2] == ["conv3.weight"])
    new = [
        helper.make_node("Transpose", [node.input[0]], ["conv3_nhwc"], perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["conv3_nhwc", "conv3.weight"], ["conv3_mm"], name="conv3_matmul"),
        helper.make_node("Transpose", ["conv3_mm"], [node.output[0]], perm=[0, 3, 1, 2]),
    ]
    nodes = list(g.node)
    del g.node[:]
    g.node.extend([*nodes[:pos], *new, *nodes[pos + 1 :]])
    inits["conv3.weight"].CopyFrom(numpy_helper.from_array(w[:, :, 0, 0].T[None].copy(), "conv3.weight"))
    onnx.checker.check_model(m)
    return m


def nnz(path: Path) -> int:
    m = load_model(path)
    return sum(int(np.count_nonzero(v)) for v in get_weights(m, [t.name for t in find_prunable(m)]).values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9])
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        variant = Path(tmp) / "digits_cnn_grouped.onnx"
        onnx.save(with_grouped_conv3(onnx.load(CNN)), variant)
        print("| sparsity | row | method run | accuracy | nnz / k | not reconstructed | seconds |")
        print("|---|---|---|---|---|---|---|")
        for s in args.sparsities:
            rows = (
                ("before", variant, CompressConfig(sparsity=s, method="chita")),
                ("after", variant, CompressConfig(sparsity=s)),
                ("reference", CNN, CompressConfig(sparsity=s)),
            )
            for label, src, cfg in rows:
                out = Path(tmp) / f"{label}_{s}.onnx"
                t0 = time.perf_counter()
                r = chita_onnx.compress(src, out, CALIB, cfg, eval_data=TEST)
                dt = time.perf_counter() - t0
                assert r.evaluation is not None
                left = r.solver.get("not_reconstructed", "") if r.method == "layerwise" else "(all)"
                print(
                    f"| {s} | {label} | {r.method} | {r.evaluation.pruned_accuracy:.4f} "
                    f"(dense {r.evaluation.dense_accuracy:.4f}) | {nnz(out):,} / {r.k:,} | {left or '-'} | {dt:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
