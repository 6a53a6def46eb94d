"""Shared kit of the rewrite, static-shape and support tests: seeded model chains around one op, the
per-sample gradients of the engine, and finite differences of the *original* model.

Two references, both independent of the rewrites:

* float64 ``onnx.reference`` (:class:`Ref64`), with Erf evaluated in float64 (onnx.reference's own
  rounds it to float32) and numpy implementations of the com.microsoft ops used here;
* float32 onnxruntime on the original model (:func:`ort_fd_check`), for attributes ``onnx.reference``
  ignores (the recurrent ops' ``activations``, ``clip``, ``input_forget``, ``sequence_lens``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper
from onnx.reference.op_run import OpRun
from scipy.special import erf
from test_gradients import Init, Reference, ce, ce_loss, check_fd, node, row_feeds, vi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from check_zoo_gradients import float64_copy

from chita_onnx.data import ArraySource
from chita_onnx.data_types import Batch
from chita_onnx.gradients import GradientEngine, GradientMatrix
from chita_onnx.graph import write_weights

F = TensorProto.FLOAT
MS = "com.microsoft"

__all__ = [
    "MS",
    "F",
    "Init",
    "Ref64",
    "ce",
    "check_fd",
    "engine_grads",
    "img_chain",
    "model_of",
    "node",
    "ort_fd_check",
    "row_feeds",
    "seq_chain",
    "vec_chain",
    "vi",
]


# ------------------------------------------------------------------------------ float64 reference


class Erf(OpRun):
    op_domain = ""

    def _run(self, x: NDArray[Any]) -> tuple[NDArray[Any]]:
        return (np.asarray(erf(x), x.dtype),)


def _gelu(x: NDArray[Any]) -> NDArray[Any]:
    return np.asarray(0.5 * x * (1 + erf(x / math.sqrt(2))), x.dtype)


def _gelu_tanh(x: NDArray[Any]) -> NDArray[Any]:
    return np.asarray(0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3))), x.dtype)


class Gelu(OpRun):
    op_domain = MS

    def _run(self, x: NDArray[Any], approximate: str = "none") -> tuple[NDArray[Any]]:
        return (_gelu(x),)


class BiasGelu(OpRun):
    op_domain = MS

    def _run(self, x: NDArray[Any], b: NDArray[Any]) -> tuple[NDArray[Any]]:
        return (_gelu(x + b),)


class FastGelu(OpRun):
    op_domain = MS

    def _run(self, x: NDArray[Any], b: NDArray[Any] | None = None) -> tuple[NDArray[Any]]:
        return (_gelu_tanh(x if b is None else x + b),)


class QuickGelu(OpRun):
    op_domain = MS

    def _run(self, x: NDArray[Any], alpha: float = 1.702) -> tuple[NDArray[Any]]:
        return (np.asarray(x / (1 + np.exp(-alpha * x)), x.dtype),)


class FusedMatMul(OpRun):
    op_domain = MS

    def _run(
        self,
        a: NDArray[Any],
        b: NDArray[Any],
        alpha: float = 1.0,
        transA: int = 0,
        transB: int = 0,
        transBatchA: int = 0,
        transBatchB: int = 0,
    ) -> tuple[NDArray[Any]]:
        a2 = np.swapaxes(a, -1, -2) if transA else a
        b2 = np.swapaxes(b, -1, -2) if transB else b
        return (np.asarray(alpha * (a2 @ b2), a.dtype),)


class SkipLayerNormalization(OpRun):
    op_domain = MS

    def _run(
        self,
        x: NDArray[Any],
        skip: NDArray[Any],
        gamma: NDArray[Any],
        beta: NDArray[Any] | None = None,
        bias: NDArray[Any] | None = None,
        epsilon: float = 1e-12,
    ) -> tuple[NDArray[Any], ...]:
        s = x + skip + (0 if bias is None else bias)
        mu = s.mean(-1, keepdims=True)
        var = ((s - mu) ** 2).mean(-1, keepdims=True)
        y = (s - mu) / np.sqrt(var + epsilon) * gamma + (0 if beta is None else beta)
        return (np.asarray(y, x.dtype),)


_NEW_OPS = [Erf, Gelu, BiasGelu, FastGelu, QuickGelu, FusedMatMul, SkipLayerNormalization]


def to_f64(model: onnx.ModelProto, weights: Sequence[str], outputs: Sequence[str]) -> onnx.ModelProto:
    """A float64 copy of ``model`` whose ``weights`` (initializers or Constant nodes, in any scope)
    are main-graph inputs, with ``outputs`` as its outputs (benchmarks/check_zoo_gradients.py)."""
    m = float64_copy(model, list(weights))
    del m.graph.output[:]
    m.graph.output.extend(helper.make_tensor_value_info(o, TensorProto.DOUBLE, None) for o in outputs)
    return m


class Ref64(Reference):
    """:class:`test_gradients.Reference` with float64 Erf and the com.microsoft ops above."""

    def __init__(self, model: onnx.ModelProto, weights: Sequence[str], head: str) -> None:
        from onnx.reference import ReferenceEvaluator

        from chita_onnx.graph import get_weights

        self.head = head
        self.ev = ReferenceEvaluator(to_f64(model, list(weights), [head]), new_ops=_NEW_OPS)
        self.w = {k: v.astype(np.float64) for k, v in get_weights(model, weights).items()}


# ---------------------------------------------------------------------------------------- models


def model_of(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    inits: Sequence[onnx.TensorProto],
    opset: int = 17,
    ms: bool = False,
    check: bool = True,
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "t", list(inputs), list(outputs), list(inits))
    ops = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(MS, 1)] if ms else [])
    model = helper.make_model(graph, opset_imports=ops)
    model.ir_version = 10 if opset <= 21 else 11
    # onnx's checker rejects opset-18 GroupNormalization (deprecated by 21), which exporters still write
    if check and not ms and not any(n.op_type == "GroupNormalization" for n in nodes):
        onnx.checker.check_model(model)
    return model


def vec_chain(
    op_nodes: list[onnx.NodeProto], w: Init, d_out: int = 6, opset: int = 17, ms: bool = False
) -> onnx.ModelProto:
    """x[N,5] → MatMul W1[5,6] → z → OPS → y[N,d_out] → Gemm W2 → logits[N,3]."""
    nodes = [
        node("MatMul", ["x", w("W1", 5, 6)], ["z"]),
        *op_nodes,
        node("Gemm", ["y", w("W2", 3, d_out)], ["logits"], transB=1),
    ]
    return model_of(nodes, [vi("x", ["N", 5])], [vi("logits", ["N", 3])], w.items, opset, ms)


def img_chain(
    op_nodes: list[onnx.NodeProto],
    w: Init,
    flat: int,
    *,
    cin: int = 2,
    cout: int = 3,
    hw: tuple[int, ...] = (4, 4),
    opset: int = 17,
) -> onnx.ModelProto:
    """x[N,cin,*hw] → Conv C1 (pads keep the size) → z[N,cout,*hw] → OPS → y → Flatten → Gemm W2."""
    k = [3] * len(hw)
    nodes = [
        node("Conv", ["x", w("C1", cout, cin, *k, scale=0.4)], ["z"], pads=[1] * (2 * len(hw))),
        *op_nodes,
        node("Flatten", ["y"], ["f"]),
        node("Gemm", ["f", w("W2", 3, flat, scale=0.3)], ["logits"], transB=1),
    ]
    return model_of(nodes, [vi("x", ["N", cin, *hw])], [vi("logits", ["N", 3])], w.items, opset)


def seq_chain(
    rnn: onnx.NodeProto, w: Init, *, T: int, n_in: int, flat: int, layout: int = 0, extra: Sequence[onnx.NodeProto] = ()
) -> onnx.ModelProto:
    """x[1,5] → MatMul W1 → a sequence (T, 1, n_in), or (1, T, n_in) with ``layout=1`` → RNN → ``extra``
    (which turns its outputs into ``y[1, flat]``) → Gemm W2 → logits[1,3]."""
    shape = [1, T, n_in] if layout else [T, 1, n_in]
    nodes = [
        node("MatMul", ["x", w("W1", 5, T * n_in)], ["z"]),
        node("Reshape", ["z", w.const("seq_shape", shape, np.int64)], ["seq"]),
        rnn,
        *extra,
        node("Gemm", ["y", w("W2", 3, flat, scale=0.3)], ["logits"], transB=1),
    ]
    return model_of(nodes, [vi("x", [1, 5])], [vi("logits", [1, 3])], w.items, 14)


# ------------------------------------------------------------------------------------ gradients


def engine_grads(
    model: onnx.ModelProto, weights: Sequence[str], n: int = 2, seed: int = 1, **kw: Any
) -> tuple[GradientEngine, GradientMatrix, dict[str, NDArray[Any]], NDArray[np.int64]]:
    """Per-sample gradients (one-sample path) on ``n`` seeded samples with labels in [0, 3)."""
    rng = np.random.default_rng(seed)
    inp = model.graph.input[0]
    dims = [d.dim_value if d.HasField("dim_value") else n for d in inp.type.tensor_type.shape.dim]
    feeds = {inp.name: rng.standard_normal(dims).astype(np.float32)}
    labels = rng.integers(0, 3, dims[0]).astype(np.int64)
    e = GradientEngine(model, list(weights), example=Batch(feeds, labels), method="single", **kw)
    gm = e.compute(ArraySource(feeds, labels, batch_size=dims[0]))
    return e, gm, feeds, labels


def ort_fd_check(
    gm: GradientMatrix,
    model: onnx.ModelProto,
    feeds: dict[str, NDArray[Any]],
    labels: NDArray[np.int64],
    rows: Sequence[int] = (0,),
    *,
    h: float = 1e-3,
    rtol: float = 3e-3,
) -> None:
    """Central differences of the cross-entropy of the original model in float32 onnxruntime, along
    one random unit direction per weight tensor and row."""
    from chita_onnx.graph import get_weights

    rng = np.random.default_rng(321)
    base = get_weights(model, [s.name for s in gm.layout.slots])

    def loss(name: str, value: NDArray[Any], i: int) -> float:
        m, _ = write_weights(model, {name: value.astype(np.float32)}, storage="dense")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        s = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        z = s.run(None, {k: v[i : i + 1] for k, v in feeds.items()})[0]
        return ce(np.asarray(z, np.float64), int(labels[i]))

    for i in rows:
        for s in gm.layout.slots:
            g = gm.X[i, s.offset : s.stop].astype(np.float64)
            v = rng.standard_normal(s.size)
            v /= np.linalg.norm(v)
            V = v.reshape(s.shape)
            fd = (loss(s.name, base[s.name] + h * V, i) - loss(s.name, base[s.name] - h * V, i)) / (2 * h)
            assert abs(fd - g @ v) <= rtol * max(np.linalg.norm(g), 1e-3), (i, s.name, fd, g @ v)


def fd_check(
    gm: GradientMatrix,
    model: onnx.ModelProto,
    feeds: dict[str, NDArray[Any]],
    labels: NDArray[np.int64],
    *,
    h: float = 1e-5,
    rtol: float = 2e-5,
) -> None:
    """float64 finite differences of the original model (``onnx.reference``) on every row."""
    check_fd(
        gm,
        Ref64(model, [s.name for s in gm.layout.slots], "logits"),
        row_feeds(feeds),
        ce_loss(labels),
        rows=tuple(range(gm.n)),
        dirs=2,
        h=h,
        rtol=rtol,
    )


__all__ += ["fd_check", "numpy_helper"]
