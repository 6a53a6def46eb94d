"""Consumer layers as linear maps ``y = W a + b``: their weight matrices, input rows and write-back.

A :class:`LayerView` turns one consumer node (Conv — one view per conv group —, Gemm, MatMul with
its bias ``Add``, LSTM/GRU/RNN input projection) into the ``(out, q)`` matrix ``W`` acting on ``q``
input columns, with the channel unit of every column, and writes re-fitted ``W``/``b`` back as
constant overrides of the original (unsliced) shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper

from .graphutil import Constants
from .groups import Analysis, Consumer
from .stats import ConvGeometry, conv_rows, linear_rows

Key = tuple[int, int]


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def conv_geometry(node: onnx.NodeProto, kernel: tuple[int, ...], in_spatial: tuple[int, ...]) -> ConvGeometry:
    nd = len(kernel)
    strides = tuple(int(v) for v in _attr(node, "strides", [1] * nd))  # type: ignore[attr-defined]
    dil = tuple(int(v) for v in _attr(node, "dilations", [1] * nd))  # type: ignore[attr-defined]
    pads = [int(v) for v in _attr(node, "pads", [0] * (2 * nd))]  # type: ignore[attr-defined]
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        pads = [0] * (2 * nd)
        for i in range(nd):
            out = -(-in_spatial[i] // strides[i])
            total = max(0, (out - 1) * strides[i] + dil[i] * (kernel[i] - 1) + 1 - in_spatial[i])
            small, big = total // 2, total - total // 2
            pads[i], pads[nd + i] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * (2 * nd)
    return ConvGeometry(kernel, strides, tuple(pads), dil)


@dataclass
class LayerView:
    """One linear map ``y = W a + b`` of a consumer.

    ``W`` (out, q); ``col_units`` (q,) the unit of every input column; ``bias`` (out,) or ``None``
    when the layer has nowhere to put an intercept; ``geom`` for Conv (rows are im2col patches of
    the channel block ``in_slice``), ``None`` for linear layers (rows along ``axis``).
    """

    consumer: Consumer
    W: NDArray[np.float64]
    col_units: NDArray[np.int64]
    bias: NDArray[np.float64] | None
    geom: ConvGeometry | None
    in_slice: slice
    out_slice: slice
    part: int = 0

    def rows(self, x: NDArray[np.floating], rows: NDArray[np.int64]) -> NDArray[np.float32]:
        if self.geom is not None:
            return conv_rows(np.asarray(x)[:, self.in_slice], self.geom, rows)
        return linear_rows(x, self.consumer.axis, rows)

    def target(self, a_dense: NDArray[np.floating]) -> NDArray[np.float64]:
        y = np.asarray(a_dense, dtype=np.float64) @ self.W.T
        return y + self.bias if self.bias is not None else y


def views(analysis: Analysis, consumer: Consumer, input_shape: tuple[int, ...]) -> list[LayerView]:
    """The linear maps of ``consumer`` (several for a grouped Conv)."""
    graph = analysis.model.graph
    consts = Constants(graph)
    node = graph.node[consumer.node]
    w = np.asarray(consts.value(node.input[1]), dtype=np.float64)
    units = consumer.units
    bias: NDArray[np.float64] | None
    if consumer.kind == "conv":
        group = int(_attr(node, "group", 1))  # type: ignore[call-overload]
        cout, cin_g = w.shape[:2]
        kernel = tuple(int(k) for k in w.shape[2:])
        per_out = cout // group
        ksize = int(np.prod(kernel))
        geom = conv_geometry(node, kernel, tuple(input_shape[2:]))
        b = consts.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        bias = np.zeros(cout) if b is None else np.asarray(b, dtype=np.float64)
        out = []
        for g in range(group):
            ins, outs = slice(g * cin_g, (g + 1) * cin_g), slice(g * per_out, (g + 1) * per_out)
            out.append(
                LayerView(
                    consumer, w[outs].reshape(per_out, -1), np.repeat(units[ins], ksize), bias[outs], geom, ins, outs, g
                )
            )
        return out
    if consumer.kind == "gemm":
        alpha = float(_attr(node, "alpha", 1.0))  # type: ignore[arg-type]
        beta = float(_attr(node, "beta", 1.0))  # type: ignore[arg-type]
        trans_b = int(_attr(node, "transB", 0))  # type: ignore[call-overload]
        W = alpha * (w if trans_b else w.T)
        c = consts.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        n_out = W.shape[0]
        bias = np.zeros(n_out) if c is None else beta * np.broadcast_to(np.asarray(c, np.float64).reshape(-1), n_out)
        if c is None and beta == 0.0:
            bias = None
        return [LayerView(consumer, W, units, bias, None, slice(None), slice(None))]
    if consumer.kind == "matmul":
        W = w.T
        add = matmul_bias(analysis, consumer.node)
        bias = (
            None if add is None else np.asarray(consts.value(graph.node[add[0]].input[add[1]]), np.float64).reshape(-1)
        )
        if bias is not None:
            bias = np.broadcast_to(bias, W.shape[0]).copy()
        return [LayerView(consumer, W, units, bias, None, slice(None), slice(None))]
    # rnn: the input projections of all gates and directions
    d, gh, _ = w.shape
    W = w.reshape(d * gh, -1)
    b = consts.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    bias = np.zeros(d * gh) if b is None else np.asarray(b, np.float64)[:, :gh].reshape(-1)
    return [LayerView(consumer, W, units, bias, None, slice(None), slice(None))]


def matmul_bias(analysis: Analysis, index: int) -> tuple[int, int] | None:
    """``(Add node, slot)`` of the constant bias added right after MatMul ``index``, if any."""
    graph = analysis.model.graph
    consts = Constants(graph)
    out = graph.node[index].output[0]
    readers = [(i, n) for i, n in enumerate(graph.node) if out in n.input]
    if len(readers) != 1 or readers[0][1].op_type != "Add" or out in {o.name for o in graph.output}:
        return None
    i, add = readers[0]
    other = 1 if add.input[0] == out else 0
    value = consts.value(add.input[other])
    w = consts.value(graph.node[index].input[1])
    if value is None or w is None or value.size != w.shape[1] or value.ndim == 0 or value.shape[-1] != w.shape[1]:
        return None
    return i, other


def write(
    analysis: Analysis,
    consumer: Consumer,
    parts: list[tuple[LayerView, NDArray[np.float64], NDArray[np.float64] | None]],
    base: dict[Key, NDArray[np.generic]],
) -> dict[Key, NDArray[np.generic]]:
    """Constant overrides holding the re-fitted ``(view, W_new (out, q), b_new)`` of ``consumer``.

    ``base`` holds earlier overrides (a consumer re-fitted for several groups keeps its latest).
    """
    graph = analysis.model.graph
    consts = Constants(graph)
    node = graph.node[consumer.node]
    i = consumer.node
    w0 = np.asarray(base.get((i, 1), consts.value(node.input[1])))
    dtype = w0.dtype
    out: dict[Key, NDArray[np.generic]] = {}
    if consumer.kind == "conv":
        w = np.array(w0, copy=True)
        b_old = base.get((i, 2), consts.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None)
        b = np.zeros(w.shape[0], dtype) if b_old is None else np.array(b_old, dtype=dtype, copy=True)
        for view, W_new, b_new in parts:
            w[view.out_slice] = W_new.reshape(w[view.out_slice].shape).astype(dtype)
            if b_new is not None:
                b[view.out_slice] = b_new.astype(dtype)
        out[(i, 1)] = w
        if any(p[2] is not None for p in parts):
            out[(i, 2)] = b
        return out
    view, W_new, b_new = parts[0]
    if consumer.kind == "gemm":
        alpha = float(_attr(node, "alpha", 1.0))  # type: ignore[arg-type]
        beta = float(_attr(node, "beta", 1.0))  # type: ignore[arg-type]
        trans_b = int(_attr(node, "transB", 0))  # type: ignore[call-overload]
        B = W_new / alpha
        out[(i, 1)] = (B if trans_b else B.T).astype(dtype)
        if b_new is not None and beta != 0.0:
            c_old = consts.value(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            shape = (b_new.size,) if c_old is None else c_old.shape
            out[(i, 2)] = (b_new / beta).reshape(shape).astype(dtype)
        return out
    if consumer.kind == "matmul":
        out[(i, 1)] = W_new.T.astype(dtype)
        add = matmul_bias(analysis, i)
        if add is not None and b_new is not None:
            old = consts.value(graph.node[add[0]].input[add[1]])
            out[add] = b_new.reshape(old.shape).astype(old.dtype)  # type: ignore[union-attr]
        return out
    d, gh, n_in = w0.shape
    out[(i, 1)] = W_new.reshape(d, gh, n_in).astype(dtype)
    if b_new is not None:
        b_old = base.get((i, 3), consts.value(node.input[3]) if len(node.input) > 3 and node.input[3] else None)
        b = np.zeros((d, 2 * gh), dtype) if b_old is None else np.array(b_old, dtype=dtype, copy=True)
        b[:, :gh] = b_new.reshape(d, gh)
        out[(i, 3)] = b
    return out
