"""An independent N:M checker for the tests, deliberately written without any chita_onnx code.

It reads an ONNX file with plain ``onnx`` + ``numpy_helper`` (dense and sparse initializers), finds
the consumers of every float initializer itself, applies the reduction-axis rule written out below,
and walks every group with explicit loops — no reshapes or index arrays shared with the library.

Rule (TensorRT / Polygraphy): for every output channel and kernel position, each run of M
consecutive entries along the reduction axis holds at most N nonzeros.
  Conv W[O, C/g, k...]  → axis 1;  Gemm B → axis 0 (transB=0) or 1 (transB=1);
  MatMul constant B[..., K, N] → axis rank−2;  MatMul constant A[..., M, K] → axis rank−1.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper


@dataclass
class TensorVerdict:
    name: str
    axis: int | None
    groups: int  # number of groups checked (0 when not checkable)
    bad_groups: int  # groups with more than N nonzeros
    nonzeros: int
    size: int


def _initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for sp in model.graph.sparse_initializer:
        dense = np.zeros(int(np.prod(sp.dims)), dtype=numpy_helper.to_array(sp.values).dtype)
        dense[numpy_helper.to_array(sp.indices).reshape(-1)] = numpy_helper.to_array(sp.values)
        out[sp.values.name] = dense.reshape(tuple(sp.dims))
    return out


def _axis_of(node: onnx.NodeProto, slot: int, rank: int) -> int | None:
    if node.op_type == "Conv":
        return 1 if slot == 1 else None
    if node.op_type == "Gemm":
        if slot != 1:
            return None
        trans = 0
        for a in node.attribute:
            if a.name == "transB":
                trans = a.i
        return 1 if trans else 0
    if node.op_type == "MatMul":
        return rank - 2 if slot == 1 else rank - 1
    return None


def check_file(path: str | Path, n: int, m: int) -> dict[str, TensorVerdict]:
    """Every float weight of Conv/Gemm/MatMul in ``path``: its groups and how many break N:M."""
    model = onnx.load(str(path))
    inits = _initializers(model)
    axes: dict[str, set[int | None]] = {}
    for node in model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        for slot, name in enumerate(node.input):
            if name in inits and inits[name].dtype.kind == "f" and inits[name].ndim >= 2:
                axes.setdefault(name, set()).add(_axis_of(node, slot, inits[name].ndim))
    verdicts: dict[str, TensorVerdict] = {}
    for name, found in axes.items():
        w = inits[name]
        nnz = int(np.count_nonzero(w))
        axis = next(iter(found)) if len(found) == 1 else None
        if axis is None or w.shape[axis] % m:
            verdicts[name] = TensorVerdict(name, axis, 0, 0, nnz, w.size)
            continue
        other = [range(d) for i, d in enumerate(w.shape) if i != axis]
        groups = bad = 0
        for pos in itertools.product(*other):
            for start in range(0, w.shape[axis], m):
                count = 0
                for j in range(start, start + m):
                    index = list(pos)
                    index.insert(axis, j)
                    if w[tuple(index)] != 0:
                        count += 1
                groups += 1
                bad += count > n
        verdicts[name] = TensorVerdict(name, axis, groups, bad, nnz, w.size)
    return verdicts
