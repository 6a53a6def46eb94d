"""Softmax heads: finding the logits of a model output, and adding per-class offsets to them.

Graph code only (no math beyond reshapes).  Two small passes:

* :func:`softmax_head` — the ``Softmax``/``LogSoftmax`` node that produces an output (through
  ``Identity`` nodes), with its logits tensor and axis;
* :func:`add_class_offset` — the model with ``logits + β`` (``β`` one value per class, broadcast along
  the softmax axis): added into the constant operand of the ``Add`` that produces the logits when
  nothing else reads that sum (the usual ``MatMul → Add(bias) → Softmax`` head), else as a new ``Add``
  node in front of the softmax.

The offsets themselves are fitted by :func:`chita_onnx.solver.offsets.fit_class_offsets`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx.shape_inference
from numpy.typing import NDArray
from onnx import helper, numpy_helper

from .errors import ModelError
from .graph import opset_version

_SOFTMAX = ("Softmax", "LogSoftmax")


@dataclass(frozen=True)
class SoftmaxHead:
    """A softmax producing a model output: its node's output ``probs``, input ``logits`` and ``axis``
    (as written; ``opset`` says whether it is the opset-13 per-axis softmax or the older one over the
    flattened trailing dimensions)."""

    op_type: str
    logits: str
    probs: str
    output: str
    axis: int
    opset: int
    #: The output is the softmax's own values (through ``Identity`` only), not a reshaped view of them.
    direct: bool = True

    def class_axis(self, rank: int) -> int | None:
        """The axis of the classes for a logits tensor of ``rank`` dimensions, or None when the softmax
        is not over one axis (before opset 13 it runs over all the dimensions from ``axis`` on)."""
        a = self.axis + rank if self.axis < 0 else self.axis
        if not 0 <= a < rank:
            return None
        if self.opset < 13 and a != rank - 1:
            return None
        return a


#: Nodes between a softmax and the model output that only move its values (looked through).
_VIEWS = ("Identity", "Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten")


def softmax_head(model: onnx.ModelProto, output: str | None = None) -> SoftmaxHead | None:
    """The softmax that produces graph output ``output`` (default: the first output), looking through
    nodes that only move values (``Identity``, ``Transpose``, ``Reshape``, ``Squeeze``,
    ``Unsqueeze``, ``Flatten``); None when that output is not a softmax's."""
    g = model.graph
    if not g.output:
        return None
    name = output or g.output[0].name
    producer = {o: n for n in g.node for o in n.output}
    node = producer.get(name)
    direct = True
    while node is not None and node.op_type in _VIEWS and node.domain in ("", "ai.onnx"):
        direct = direct and node.op_type == "Identity"
        node = producer.get(node.input[0])
    if node is None or node.op_type not in _SOFTMAX or node.domain not in ("", "ai.onnx"):
        return None
    opset = opset_version(model)
    axes = [helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"]
    axis = int(axes[0]) if axes else (-1 if opset >= 13 else 1)
    return SoftmaxHead(node.op_type, node.input[0], node.output[0], name, axis, opset, direct)


def offset_shape(classes: int, rank: int, axis: int) -> tuple[int, ...]:
    """The shape of a per-class offset that broadcasts along ``axis`` of a rank-``rank`` tensor."""
    return (classes, *([1] * (rank - 1 - axis)))


def logits_type(model: onnx.ModelProto, head: SoftmaxHead) -> int:
    """Element type of the softmax input (declared, else from onnx's shape inference; float32 when
    neither tells)."""
    name = head.logits

    def declared(m: onnx.ModelProto) -> int | None:
        g = m.graph
        for v in (*g.input, *g.output, *g.value_info):
            if v.name == name and v.type.tensor_type.elem_type:
                return int(v.type.tensor_type.elem_type)
        return next((int(t.data_type) for t in g.initializer if t.name == name), None)

    found = declared(model)
    if found is None:
        try:
            found = declared(onnx.shape_inference.infer_shapes(model))
        except Exception:  # an inconsistent graph: the default below
            found = None
    return found or onnx.TensorProto.FLOAT


def _fold_site(
    model: onnx.ModelProto, head: SoftmaxHead, shape: tuple[int, ...], elem: int = onnx.TensorProto.FLOAT
) -> tuple[str, float] | None:
    """The initializer that an offset of ``shape`` can be added into, and the factor the node applies
    to it: the constant of the ``Add`` producing the logits (factor 1), or the bias ``C`` of a
    ``Gemm`` producing them (its ``beta``, which must not be 0).  It broadcasts exactly like the
    offset, and neither it nor the result (nor any ``Identity`` on the way to the softmax) is read
    by anything else or is a graph output."""
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    uses = Counter(i for n in g.node for i in n.input)
    outputs = {o.name for o in g.output}
    inits = {t.name: t for t in g.initializer}
    name = head.logits
    node = producer.get(name)
    while True:
        if node is None or uses[name] != 1 or name in outputs:
            return None
        if node.op_type != "Identity":
            break
        name = node.input[0]
        node = producer.get(name)
    if node.domain not in ("", "ai.onnx"):
        return None
    factor = 1.0
    if node.op_type == "Gemm" and len(node.input) == 3 and node.input[2]:
        factor = next((a.f for a in node.attribute if a.name == "beta"), 1.0)
        if factor == 0.0:
            return None
        candidates = [node.input[2]]
    elif node.op_type == "Add" and len(node.input) == 2:
        candidates = list(node.input)
    else:
        return None
    for cand in candidates:
        t = inits.get(cand)
        if t is None or uses[cand] != 1 or cand in outputs or t.data_type != elem:
            continue
        dims = list(t.dims)
        while dims and dims[0] == 1 and len(dims) > len(shape):
            dims.pop(0)
        if tuple(dims) == shape:
            return str(cand), float(factor)
    return None


def add_class_offset(
    model: onnx.ModelProto, head: SoftmaxHead, beta: NDArray[np.floating], rank: int
) -> onnx.ModelProto:
    """A copy of ``model`` whose softmax ``head`` reads ``logits + β`` (``β (C,)``; the logits have
    ``rank`` dimensions).  ``model`` is not modified."""
    axis = head.class_axis(rank)
    if axis is None:
        raise ModelError(f"softmax {head.probs!r}: axis {head.axis} of a rank-{rank} input is not one class axis")
    elem = logits_type(model, head)  # β in the logits' own type (a float16 classifier stays float16)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    b = np.asarray(beta, np.float64).reshape(-1)
    shape = offset_shape(b.size, rank, axis)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    site = _fold_site(m, head, shape, elem)
    if site is not None:
        name, factor = site
        for t in g.initializer:
            if t.name == name:
                old = numpy_helper.to_array(t).astype(np.float64)
                new = (old + b.reshape(shape) / factor).reshape(old.shape).astype(dtype)
                t.CopyFrom(numpy_helper.from_array(new, name))
        return m
    taken = {t.name for t in g.initializer} | {v for n in g.node for v in (*n.input, *n.output)}
    taken |= {i.name for i in g.input}
    init_name, out_name = f"{head.logits}_class_offset", f"{head.logits}_offset"
    while init_name in taken or out_name in taken:
        init_name, out_name = init_name + "_", out_name + "_"
    g.initializer.append(numpy_helper.from_array(b.reshape(shape).astype(dtype), init_name))
    if m.ir_version < 4:  # before IR 4 every initializer is also a graph input
        g.input.append(helper.make_tensor_value_info(init_name, elem, list(shape)))
    pos = next(i for i, n in enumerate(g.node) if head.probs in n.output)
    g.node[pos].input[0] = out_name
    g.node.insert(pos, helper.make_node("Add", [head.logits, init_name], [out_name], name=f"{init_name}_add"))
    return m
