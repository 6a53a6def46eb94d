"""The block path end to end: a 25-million-weight model pruned through the real pipeline in bounded memory.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_block.py [--n 1000] [--max-memory 3G]

Builds an MLP 784-4096-4096-1216-10 (24.98 M prunable MatMul weights; random weights, random data),
then runs ``chita_onnx.compress`` with ``--method chita`` and ``--max-memory`` far below the
n × p × 4 bytes that X would need (100 GB at n = 1,000), so the gradient columns are computed block
group by block group (row chunks for tensors that are larger than the memory budget) and never held
whole.  Reports wall time per phase and the peak resident memory of the process (``ru_maxrss``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig

DIMS = (784, 4096, 4096, 1216, 10)


def big_mlp(dims: tuple[int, ...] = DIMS, seed: int = 0) -> onnx.ModelProto:
    """MatMul → Relu → ... → MatMul, He-initialised, no biases; output ``logits``."""
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    x = "image"
    last = len(dims) - 2
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        w = rng.standard_normal((a, b), dtype=np.float32) * np.float32(np.sqrt(2.0 / a))
        inits.append(numpy_helper.from_array(w, f"fc{i}.weight"))
        z = "logits" if i == last else f"z{i}"
        nodes.append(helper.make_node("MatMul", [x, f"fc{i}.weight"], [z], name=f"fc{i}"))
        if i < last:
            nodes.append(helper.make_node("Relu", [z], [f"h{i}"], name=f"relu{i}"))
            x = f"h{i}"
    graph = helper.make_graph(
        nodes,
        "big_mlp",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", dims[0]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", dims[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def parse_bytes(text: str) -> int:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return int(float(text[:-1]) * units[text[-1].upper()]) if text[-1].upper() in units else int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="calibration samples (gradient rows)")
    ap.add_argument("--max-memory", default="3G", help="CompressConfig.max_memory, e.g. 3G")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block-size", type=int, default=2000)
    ap.add_argument("--method", default="chita", help="chita or chita++ (the methods with a block path)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        model = big_mlp()
        p = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
        path = Path(tmp) / "big_mlp.onnx"
        onnx.save(model, path)
        del model
        rng = np.random.default_rng(1)
        data = {"image": rng.standard_normal((args.n, DIMS[0]), dtype=np.float32),
                "labels": rng.integers(0, DIMS[-1], args.n)}  # fmt: skip
        cfg = CompressConfig(sparsity=args.sparsity, max_memory=parse_bytes(args.max_memory), method=args.method,
                             block_size=args.block_size, num_samples=args.n)  # fmt: skip
        rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
        t0 = time.perf_counter()
        report = chita_onnx.compress(path, Path(tmp) / "out.onnx", data, cfg, eval_data=data)
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    x_gb = args.n * p * 4 / 2**30
    print(f"p = {p:,} prunable weights, n = {args.n}: X would be {x_gb:.1f} GiB; --max-memory {args.max_memory}")
    print(f"kept {report.nnz:,} = k {report.k:,}; wall {wall:.0f} s; phases: "
          + ", ".join(f"{k} {v:.0f} s" for k, v in report.timings.items()))  # fmt: skip
    print(f"peak RSS {peak:.0f} MB (before the run {rss0:.0f} MB); solver: {report.solver.get('objective_model')}")
    if args.json:
        args.json.write_text(json.dumps({"p": p, "n": args.n, "x_gib": x_gb, "max_memory": args.max_memory,
                                         "wall_s": wall, "timings": report.timings, "peak_rss_mb": peak,
                                         "nnz": report.nnz, "k": report.k}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
