"""The float32 twin of a float16 or float64 model, for the gradient engine only.

onnxruntime-training differentiates float32 graphs.  A model computed in float16 (weights, inputs
and outputs; ``model.half()`` before export) or float64 gets its gradients from a twin in which
every such tensor, type and cast target is float32 instead: the same function evaluated in a
different precision.  The gradients steer which weights are kept (the default's OBD allocation,
CHITA's X); the pruned weights are written back into the original model in its own dtype.  Inputs
reach the twin through the engine's usual cast to the model's input type.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, numpy_helper

log = logging.getLogger(__name__)

#: Element types the twin computes in float32 (bfloat16 stays refused: onnxruntime's CPU kernels
#: cannot run most bfloat16 graphs in the first place).
WIDENED = frozenset({TensorProto.FLOAT16, TensorProto.DOUBLE})


def _tensor(t: TensorProto) -> bool:
    """Turn ``t`` into float32 in place when it is float16/float64; whether it changed."""
    if t.data_type not in WIDENED:
        return False
    value = numpy_helper.to_array(t).astype(np.float32)
    t.CopyFrom(numpy_helper.from_array(value, t.name))
    return True


def _types(values: list[onnx.ValueInfoProto]) -> None:
    for v in values:
        if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type in WIDENED:
            v.type.tensor_type.elem_type = TensorProto.FLOAT


#: INT attributes that name an element type (Cast's ``to``; ``dtype`` of the Random*/EyeLike ops;
#: ``output_datatype`` of the window and mel-matrix generators).
_TYPE_ATTRS = ("dtype", "output_datatype")


def _nodes(nodes: Iterable[onnx.NodeProto]) -> int:
    changed = 0
    for node in nodes:
        for attr in node.attribute:
            if attr.type == AttributeProto.TENSOR:
                changed += _tensor(attr.t)
            elif attr.type == AttributeProto.SPARSE_TENSOR:
                changed += _tensor(attr.sparse_tensor.values)
            elif attr.type == AttributeProto.GRAPH:
                changed += _graph(attr.g)
            elif attr.type == AttributeProto.GRAPHS:
                changed += sum(_graph(sub) for sub in attr.graphs)
            elif (
                attr.type == AttributeProto.INT
                and attr.i in WIDENED
                and ((node.op_type == "Cast" and attr.name == "to") or attr.name in _TYPE_ATTRS)
            ):
                attr.i = TensorProto.FLOAT
                changed += 1
    return changed


def _graph(g: onnx.GraphProto) -> int:
    changed = sum(_tensor(t) for t in g.initializer)
    for sp in g.sparse_initializer:
        changed += _tensor(sp.values)
    _types([*g.input, *g.output, *g.value_info])
    return changed + _nodes(g.node)


def needs_twin(model: onnx.ModelProto, weights: list[str]) -> bool:
    """Whether some of ``weights`` is a float16/float64 initializer or Constant of the main graph."""
    wanted = set(weights)
    stored = [t for t in model.graph.initializer if t.name in wanted]
    stored += [
        a.t
        for n in model.graph.node
        if n.op_type == "Constant" and n.output and n.output[0] in wanted
        for a in n.attribute
        if a.name == "value"
    ]
    return any(t.data_type in WIDENED for t in stored)


def float32_twin(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` computed in float32 wherever it computed in float16 or float64: every
    such initializer, Constant/ConstantOfShape value, graph input, output and value_info type, and
    the target type of Cast (``to``) and of the ops with a ``dtype``/``output_datatype`` attribute;
    subgraphs and local functions too."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    changed = _graph(out.graph) + sum(_nodes(f.node) for f in out.functions)
    log.info("gradients computed on a float32 twin of the model (%d tensors and types widened)", changed)
    return out
