"""Graph preparation for the gradient engine: a differentiable, inference-semantics working copy.

The user's model is never modified: every function here works on a copy.  The steps, in order:

1. :func:`normalize` — copy; convert the opset into the range onnxruntime-training 1.19.2 handles for
   gradients (13 ≤ opset ≤ 21, IR ≤ 10); inline local functions; turn ``Constant`` nodes into
   initializers (same names); drop initializers from the graph inputs (old IR).
2. :func:`select_output` and :func:`find_head` — the model output to differentiate and, walking back
   through ``ZipMap``/``Identity``/``Cast``, the tensor the loss attaches to (logits before a softmax,
   a probability tensor, or the output itself for a regression head).
3. :func:`build_forward` — cut the graph to that tensor, fix every input dim to the calibration shape
   (batch = rows fed per call) and build the :func:`working_copy`: static shapes and inlined If
   nodes (:mod:`.static`), exact rewrites of the ops without a usable gradient on the path
   (:mod:`.rewrites`: Resize, ConvTranspose, LSTM/GRU/RNN, ReduceMax/Min, Gelu, ...), legalize
   (eval-mode BatchNormalization, Dropout, HardSigmoid, HardSwish, Elu, Sum, LayerNormalization
   outputs, GlobalMaxPool, InstanceNormalization, a grouped 1-D Conv as a 2-D one) and a check that
   the copy reproduces the model's output on the calibration example; then check that every op
   between a requested weight and the loss has a gradient (:class:`UnsupportedOpError` otherwise),
   and turn the updatable weights into graph inputs so that their values can change without rebuilding anything.
4. :func:`attach_loss` — the loss ``ReduceSum(T ⊙ f(h))`` with a float target tensor ``T`` fed at run
   time: ``f = LogSoftmax`` (cross-entropy on logits), ``f = log ∘ clip(·, 1e-30, 1)`` (NLL on
   probabilities) or ``f = id`` (a Gauss-Newton probe, see the engine).  The loss is linear in ``T``,
   so scaling ``T`` scales the gradient, and any Fisher flavour is only a choice of ``T``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import numpy as np
import onnx
import onnx.inliner
import onnx.version_converter
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from ..errors import ConfigError, DataError, FixedBatchError, ModelError, UnsupportedOpError, first_line
from ..graph import densify, expand_newer_ops, label_scores
from .static import StaticInfo
from .subgraphs import node_inputs

log = logging.getLogger(__name__)

#: Opset range used for gradient graphs.  13 gives single-axis Softmax/LogSoftmax semantics and
#: ``axes`` as an input of ReduceSum; 21 is the newest opset onnxruntime 1.19.2 accepts.
MIN_OPSET = 13
MAX_OPSET = 21
MAX_IR = 10

HeadKind = Literal["logits", "probabilities", "regression", "binary"]

#: Ops (default domain) whose gradient onnxruntime-training 1.19.2 builds and computes correctly on
#: CPU after :func:`legalize` (see docs/ort-gradients.md §7; each one is checked against float64
#: finite differences in tests/test_gradients.py).  Ops not listed here are refused when they sit
#: between a requested weight and the loss.
GRADIENT_OPS = frozenset(
    {
        # layers
        "Conv", "Gemm", "MatMul",
        # activations
        "Relu", "LeakyRelu", "Sigmoid", "Tanh", "Clip", "Softmax", "LogSoftmax", "Erf",
        # arithmetic
        "Add", "Sub", "Mul", "Div", "Neg", "Pow", "Sqrt", "Exp", "Log", "Min", "Max", "Where",
        # shape and data movement
        "Identity", "Cast", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Split",
        "Slice", "Pad", "Expand", "Gather", "GatherElements",
        # pooling and reductions
        "GlobalAveragePool", "AveragePool", "MaxPool", "ReduceMean", "ReduceSum",
        # measured to have correct gradients too (tests/test_rewrites.py)
        "Abs", "Sin", "Cos", "Tile", "TopK", "Trilu", "ScatterElements", "GatherND", "ReduceL2",
        "ReduceLogSumExp", "ScatterND",
        # normalisation (with its optional outputs declared by legalize)
        "LayerNormalization",
    }
)  # fmt: skip

#: Ops that carry no gradient but only route it (integer/bool outputs) are never "on the path";
#: these float-producing ops are known to have no usable gradient, to name them in error messages.
_NO_GRADIENT_HINT = {
    "Einsum": (
        "ORT-training has no gradient builder for Einsum, and this one (a repeated index, more than two "
        "operands or broadcast sizes) has no exact rewrite; re-export it as MatMul/Transpose/Reshape"
    ),
    "BatchNormalization": "its statistics are not constant initializers",
    "GlobalMaxPool": "the input's spatial size is unknown",
    "Loop": (
        "onnxruntime-training cannot differentiate through an ONNX loop; re-export the model with the loop "
        "unrolled (a fixed sequence length), or pass --output to differentiate a tensor before it"
    ),
    "Scan": (
        "onnxruntime-training cannot differentiate through an ONNX scan; re-export the model with the scan "
        "unrolled (a fixed sequence length), or pass --output to differentiate a tensor before it"
    ),
    "If": "its condition could not be fixed from constants, shapes or the calibration data",
    "ReduceProd": "ORT-training has no gradient builder for ReduceProd, and no exact rewrite exists for signed inputs",
}

_DEFAULT_DOMAINS = ("", "ai.onnx")
_FLOAT_ELEM = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


# ---------------------------------------------------------------------------------------- helpers


def opset_of(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) opset (0 when absent)."""
    for op in model.opset_import:
        if op.domain in _DEFAULT_DOMAINS:
            return int(op.version)
    return 0


def _node_label(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"<{node.op_type} #{index}>"


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def attr_int(node: onnx.NodeProto, name: str, default: int) -> int:
    v = _attr(node, name)
    return default if v is None else int(cast(int, v))


def attr_float(node: onnx.NodeProto, name: str, default: float) -> float:
    v = _attr(node, name)
    return default if v is None else float(cast(float, v))


def attr_ints(node: onnx.NodeProto, name: str, default: Sequence[int] | None = None) -> list[int] | None:
    v = _attr(node, name)
    if v is None:
        return None if default is None else list(default)
    return [int(x) for x in cast(Sequence[int], v)]


def attr_str(node: onnx.NodeProto, name: str, default: str) -> str:
    v = _attr(node, name)
    if v is None:
        return default
    return v.decode() if isinstance(v, bytes) else str(v)


class _Names:
    """Fresh tensor/node names that collide with nothing in the graph."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.used: set[str] = {i.name for i in graph.input} | {o.name for o in graph.output}
        self.used |= {t.name for t in graph.initializer}
        for n in graph.node:
            self.used.update(n.output)
            self.used.update(n.input)
            self.used.add(n.name)

    def __call__(self, base: str) -> str:
        name, k = base, 0
        while name in self.used:
            k += 1
            name = f"{base}_{k}"
        self.used.add(name)
        return name


def _producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {o: n for n in graph.node for o in n.output if o}


def _consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                out.setdefault(i, []).append(n)
    return out


def _initializers(graph: onnx.GraphProto) -> dict[str, TensorProto]:
    return {t.name: t for t in graph.initializer}


def _shape_table(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int | None, ...] | None]]:
    """``name -> (elem_type, dims)`` from inputs, outputs, value_info and initializers."""
    table: dict[str, tuple[int, tuple[int | None, ...] | None]] = {}
    g = model.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims: tuple[int | None, ...] | None = None
        if tt.HasField("shape"):
            dims = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim)
        table[vi.name] = (int(tt.elem_type), dims)
    for t in g.initializer:
        table[t.name] = (int(t.data_type), tuple(int(d) for d in t.dims))
    return table


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference with data propagation; a failure is a :class:`ModelError`."""
    try:
        return onnx.shape_inference.infer_shapes(model, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise ModelError(f"shape inference failed on the gradient working copy: {first_line(exc)}") from None


def _const(graph: onnx.GraphProto, names: _Names, base: str, value: NDArray[np.generic]) -> str:
    name = names(base)
    graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return name


def _reduce(
    op: str,
    data: str,
    axes: Sequence[int],
    keepdims: int,
    out: str,
    opset: int,
    graph: onnx.GraphProto,
    names: _Names,
) -> onnx.NodeProto:
    """A Reduce* node in the right form for ``opset`` (``axes`` became an input in 13/18)."""
    axes_input = opset >= (13 if op == "ReduceSum" else 18)
    if axes_input:
        ax = _const(graph, names, f"{out}_axes", np.asarray(list(axes), np.int64))
        return helper.make_node(op, [data, ax], [out], keepdims=keepdims, name=names(f"{out}_node"))
    return helper.make_node(op, [data], [out], axes=list(axes), keepdims=keepdims, name=names(f"{out}_node"))


# -------------------------------------------------------------------------------------- normalize


def _constant_tensor(node: onnx.NodeProto) -> TensorProto | None:
    """The value of a ``Constant`` node as a tensor, for the attribute forms that carry numbers."""
    for a in node.attribute:
        if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
            t = TensorProto()
            t.CopyFrom(a.t)
            return t
        if a.name == "value_float":
            return numpy_helper.from_array(np.asarray(a.f, np.float32))
        if a.name == "value_floats":
            return numpy_helper.from_array(np.asarray(list(a.floats), np.float32))
        if a.name == "value_int":
            return numpy_helper.from_array(np.asarray(a.i, np.int64))
        if a.name == "value_ints":
            return numpy_helper.from_array(np.asarray(list(a.ints), np.int64))
    return None


def constants_to_initializers(graph: onnx.GraphProto) -> int:
    """Turn the graph's ``Constant`` nodes into initializers of the same names, in place."""
    keep: list[onnx.NodeProto] = []
    for node in graph.node:
        tensor = _constant_tensor(node) if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS else None
        if tensor is not None and node.output and node.output[0]:
            tensor.name = node.output[0]
            graph.initializer.append(tensor)
        else:
            keep.append(node)
    moved = len(graph.node) - len(keep)
    if moved:
        del graph.node[:]
        graph.node.extend(keep)
    return moved


def normalize(model: onnx.ModelProto) -> onnx.ModelProto:
    """A working copy in the opset/IR range the gradient builder accepts, with no Constant nodes.

    Raises :class:`ModelError` when the opset cannot be converted (with the supported range).
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if not m.HasField("graph"):
        raise ModelError("the model has no graph")
    for t in m.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            raise ModelError(
                f"initializer {t.name!r} uses external data that is not loaded; load the model with its data"
            )
    if len(m.functions):
        try:
            m = onnx.inliner.inline_local_functions(m)
        except Exception as exc:
            raise ModelError(f"cannot inline the model's local functions: {first_line(exc)}") from None
    if len(m.graph.sparse_initializer):
        m = densify(m)

    opset = opset_of(m)
    if opset == 0:
        raise ModelError("the model imports no ai.onnx opset")
    if m.ir_version > MAX_IR:
        log.debug("IR version %d > %d: lowering the gradient working copy", m.ir_version, MAX_IR)
        m.ir_version = MAX_IR
    target = MIN_OPSET if opset < MIN_OPSET else MAX_OPSET if opset > MAX_OPSET else opset
    if target != opset:
        log.info("converting the gradient working copy from opset %d to %d", opset, target)
        try:
            converted = onnx.version_converter.convert_version(expand_newer_ops(m, target), target)
        except Exception as exc:
            raise ModelError(
                f"the model uses opset {opset}; gradients need ai.onnx opset {MIN_OPSET}..{MAX_OPSET} "
                f"and IR ≤ {MAX_IR} (onnxruntime-training 1.19.2) and onnx's version converter failed: "
                f"{first_line(exc)}"
            ) from None
        m = converted
        m.ir_version = min(max(m.ir_version, 7), MAX_IR)

    # Constant nodes → initializers (same names), so that weights and BN statistics are plain data.
    g = m.graph
    constants_to_initializers(g)
    # Initializers listed as graph inputs (IR < 4 style) are constants for us.
    inits = {t.name for t in g.initializer}
    if any(i.name in inits for i in g.input):
        ins = [i for i in g.input if i.name not in inits]
        del g.input[:]
        g.input.extend(ins)
    return m


# ------------------------------------------------------------------------------ output and head


@dataclass(frozen=True)
class HeadGuess:
    """The structural reading of an output: ``kind`` is ``None`` when only the data can tell."""

    kind: HeadKind | None
    tensor: str
    class_axis: int | None
    output: str
    reason: str


def select_output(model: onnx.ModelProto, output: str | None) -> str:
    """The model output to differentiate: ``output``, else the first float tensor output, else a
    ``ZipMap`` (sequence of maps) output, else a label output ``ArgMax(scores)`` or ``TopK(scores)``'s
    indices."""
    outs = list(model.graph.output)
    if output is not None:
        if output not in {o.name for o in outs}:
            raise ConfigError(f"--output={output!r}: not an output of the model (outputs: {[o.name for o in outs]})")
        o = next(o for o in outs if o.name == output)
        elem = o.type.tensor_type.elem_type if o.type.HasField("tensor_type") else None
        maker = _producers(model.graph).get(output)
        zipmap = maker is not None and maker.op_type == "ZipMap"
        if elem is not None and elem not in _FLOAT_ELEM and not zipmap and label_scores(model, output) is None:
            raise ModelError(
                f"--output={output!r}: it is {helper.tensor_dtype_to_np_dtype(elem).name}, not floating point, and "
                "no ArgMax or TopK of class scores: no gradient flows to it; name a floating-point output"
            )
        return output
    for o in outs:
        if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in _FLOAT_ELEM:
            return str(o.name)
    prod = _producers(model.graph)
    for o in outs:
        node = prod.get(o.name)
        if node is not None and node.op_type == "ZipMap":
            return str(o.name)
    for o in outs:
        if label_scores(model, o.name) is not None:
            return str(o.name)
    raise ModelError(f"the model has no floating-point output to differentiate (outputs: {[o.name for o in outs]})")


def differentiated_tensor(model: onnx.ModelProto, output: str | None) -> str:
    """The tensor the loss is taken of: :func:`select_output`, or, for a ``ZipMap`` output (a sequence
    of maps, as skl2onnx writes class probabilities), the tensor the ZipMap reads, and for a label
    output ``ArgMax(scores)`` or an output of ``TopK(scores)`` (:func:`label_scores`), the scores."""
    name = select_output(model, output)
    zipmap = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "ZipMap" and n.output and n.input}
    while name in zipmap:
        name = zipmap[name]
    label = label_scores(model, name)
    return name if label is None else label.scores


def scored_output(model: onnx.ModelProto) -> str:
    """The tensor to compare dense and pruned models on when no ``--output`` is given: the first
    output when it is floating point, else :func:`differentiated_tensor` (a scikit-learn classifier's
    probabilities before its ZipMap, not its ``output_label``), else still the first output."""
    first = model.graph.output[0]
    if first.type.HasField("tensor_type") and first.type.tensor_type.elem_type in _FLOAT_ELEM:
        return str(first.name)
    try:
        return differentiated_tensor(model, None)
    except ModelError:
        return str(first.name)


def _is_sigmoid_or_complement(name: str, prod: Mapping[str, onnx.NodeProto]) -> bool:
    node = prod.get(name)
    if node is None:
        return False
    if node.op_type == "Sigmoid":
        return True
    return (
        node.op_type == "Sub" and len(node.input) == 2 and getattr(prod.get(node.input[1]), "op_type", "") == "Sigmoid"
    )


#: What :func:`hand_written_softmax` looks through, with ``broadcasts=True``, between a reduction
#: and the node that uses it (tf2onnx's JAX softmax: ``Reshape``/``Expand`` back to the input's shape,
#: and ``Max(c, ReduceMax(x))``, a floor on the maximum).
BROADCASTS = ("Reshape", "Expand", "Unsqueeze", "Identity", "Cast", "Max")


def _reduction(name: str, prod: Mapping[str, onnx.NodeProto], broadcasts: bool) -> onnx.NodeProto | None:
    """The node producing ``name``, past :data:`BROADCASTS` when ``broadcasts`` (through a ``Max``,
    its one operand that a node computes)."""
    node = prod.get(name)
    while broadcasts and node is not None and node.op_type in BROADCASTS:
        if node.op_type == "Max":
            ops = [m for m in (prod.get(i) for i in node.input) if m is not None and m.op_type != "Constant"]
            node = ops[0] if len(ops) == 1 else None
        else:
            node = prod.get(node.input[0])
    return node


def _max_subtraction_base(name: str, prod: Mapping[str, onnx.NodeProto], broadcasts: bool = False) -> str:
    """``x`` when ``name`` is ``Sub(x, ReduceMax(x))`` (with ``broadcasts``, also when the maximum
    comes back through :data:`BROADCASTS`), else ``name``."""
    node = prod.get(name)
    if node is not None and node.op_type == "Sub" and len(node.input) == 2:
        sub = _reduction(node.input[1], prod, broadcasts)
        if sub is not None and sub.op_type == "ReduceMax" and sub.input[0] == node.input[0]:
            return str(node.input[0])
    return name


def hand_written_softmax(
    g: onnx.GraphProto, prod: Mapping[str, onnx.NodeProto], node: onnx.NodeProto | None, broadcasts: bool = False
) -> tuple[str, int] | None:
    """``(logits, axis)`` when ``node`` is ``Div(Exp(z [− max]), ReduceSum(...))`` over one axis, else
    None.  With ``broadcasts`` the reductions may come back through :data:`BROADCASTS`, as tf2onnx
    writes JAX's softmax."""
    if node is None or node.op_type != "Div" or len(node.input) != 2:
        return None
    num, den = prod.get(node.input[0]), _reduction(node.input[1], prod, broadcasts)
    if num is None or num.op_type != "Exp" or den is None or den.op_type != "ReduceSum":
        return None
    if den.input[0] != node.input[0]:
        return None
    axes = attr_ints(den, "axes")
    if axes is None and len(den.input) > 1:
        inits = _initializers(g)
        if den.input[1] in inits:
            axes = [int(a) for a in numpy_helper.to_array(inits[den.input[1]]).reshape(-1)]
    if axes is None or len(axes) != 1:
        return None
    return _max_subtraction_base(num.input[0], prod, broadcasts), int(axes[0])


def find_head(model: onnx.ModelProto, output: str) -> HeadGuess:
    """Walk back from ``output`` through ZipMap/Identity/Cast and classify the head structurally.

    * ``Softmax``/``LogSoftmax``, or a hand-written ``Div(Exp(z [− max]), ReduceSum(...))`` →
      ``"logits"`` on the softmax input (cross-entropy).
    * ``Concat`` of ``Sigmoid``/``1 − Sigmoid`` columns (the skl2onnx binary head) → ``"probabilities"``.
    * ``Sigmoid`` (a probability map, a multi-label or detection score) → ``"binary"`` on its input:
      binary cross-entropy per element, whose sampled Fisher is the Bernoulli Fisher
      ``Jᵀ diag(p(1 − p)) J``.
    * a label output ``ArgMax(scores)`` or a ``TopK(scores)`` output (:func:`label_scores`): the
      scores as above (a softmax's input when they are probabilities), else ``"logits"`` on the
      scores themselves, over the ArgMax's or TopK's axis.
    * anything else → ``kind=None``: the engine decides from the data (rows summing to one) and the
      labels.
    """
    g = model.graph
    prod = _producers(g)
    t = output
    while (node := prod.get(t)) is not None and node.op_type in ("ZipMap", "Identity", "Cast"):
        t = node.input[0]
    label = label_scores(model, t)
    if label is not None:
        t = label.scores
    node = prod.get(t)
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        axis = attr_int(node, "axis", -1 if opset_of(model) >= 13 else 1)
        return HeadGuess("logits", node.input[0], axis, output, f"{node.op_type} node {node.name!r}")
    written = hand_written_softmax(g, prod, node)
    if written is not None:
        assert node is not None
        why = f"hand-written softmax ending in Div node {node.name!r}"
        return HeadGuess("logits", written[0], written[1], output, why)
    if (
        node is not None
        and node.op_type == "Concat"
        and len(node.input) >= 2
        and all(_is_sigmoid_or_complement(i, prod) for i in node.input)
    ):
        axis = attr_int(node, "axis", 1)
        return HeadGuess("probabilities", t, axis, output, f"sigmoid/complement columns concatenated by {node.name!r}")
    if node is not None and node.op_type == "Sigmoid":
        return HeadGuess("binary", node.input[0], None, output, f"Sigmoid node {node.name!r}: Bernoulli per element")
    if label is not None:
        return HeadGuess("logits", t, label.axis, output, f"the class scores read by {label.node!r}")
    return HeadGuess(None, t, None, output, "no softmax found")


# ------------------------------------------------------------------------------------------- cut


def cut_to(model: onnx.ModelProto, tensor: str | Sequence[str]) -> onnx.ModelProto:
    """A copy that computes only ``tensor`` (its graph output; several tensors give several outputs);
    unused inputs, initializers and opset imports are dropped."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    prod = _producers(g)
    table = _shape_table(model)
    needed: set[str] = set()
    keep_ids: set[int] = set()
    targets = [tensor] if isinstance(tensor, str) else list(tensor)
    stack = list(targets)
    while stack:
        t = stack.pop()
        if t in needed:
            continue
        needed.add(t)
        node = prod.get(t)
        if node is not None and id(node) not in keep_ids:
            keep_ids.add(id(node))
            stack.extend(i for i in node.input if i)
            for a in node.attribute:  # outer-scope names used by subgraphs
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                    for sn in sub.node:
                        stack.extend(i for i in sn.input if i)
    all_known = {i.name for i in g.input} | {t.name for t in g.initializer} | set(prod)
    for t in targets:
        if t not in all_known:
            raise ModelError(f"tensor {t!r} is not computed by the graph")
    nodes = [n for n in g.node if id(n) in keep_ids]
    del g.node[:]
    g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)
    ins = [i for i in g.input if i.name in needed]
    del g.input[:]
    g.input.extend(ins)
    del g.output[:]
    for t in targets:
        g.output.append(helper.make_tensor_value_info(t, table.get(t, (TensorProto.FLOAT, None))[0], None))
    del g.value_info[:]
    domains = {n.domain for n in g.node}
    imports = [o for o in m.opset_import if o.domain in domains or o.domain in _DEFAULT_DOMAINS]
    del m.opset_import[:]
    m.opset_import.extend(imports)
    return m


def fix_input_dims(
    model: onnx.ModelProto,
    batch: int,
    sample_shapes: Mapping[str, tuple[int, ...]],
    batch_axes: Mapping[str, int | None] | None = None,
) -> None:
    """Set every graph input to its per-sample shape with ``batch`` inserted at its batch axis
    (``batch_axes[name]``, default 0; ``None``: a static input whose ``sample_shapes`` entry is its
    whole shape), in place; check fixed dims."""
    axes = batch_axes or {}
    for vi in model.graph.input:
        if vi.name not in sample_shapes:
            raise DataError(f"the calibration data has no array for model input {vi.name!r}")
        sample = tuple(sample_shapes[vi.name])
        axis = axes.get(vi.name, 0)
        want = sample if axis is None else (*sample[:axis], batch, *sample[axis:])
        tt = vi.type.tensor_type
        if tt.HasField("shape") and len(tt.shape.dim) != len(want):
            have = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim]
            where = "no batch axis" if axis is None else f"batch on axis {axis}"
            raise DataError(
                f"model input {vi.name!r} has shape {have}, but the calibration arrays have per-sample shape "
                f"{list(sample)} ({where})"
            )
        if tt.HasField("shape"):
            for k, (d, w) in enumerate(zip(tt.shape.dim, want, strict=True)):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != w:
                    if k == axis:
                        raise FixedBatchError(
                            f"model input {vi.name!r} has a fixed batch dimension {d.dim_value}, but {w} "
                            f"sample(s) are fed per call; use --mini-batch {d.dim_value} or export the model "
                            "with a dynamic batch"
                        )
                    raise DataError(
                        f"model input {vi.name!r} has dimension {k} fixed to {d.dim_value}, but the "
                        f"calibration arrays have {w} there"
                    )
        del tt.shape.dim[:]
        for w in want:
            tt.shape.dim.add().dim_value = int(w)


# -------------------------------------------------------------------------------------- legalize


@dataclass
class _Rewriter:
    model: onnx.ModelProto
    keep_params: frozenset[str]
    opset: int = 0
    names: _Names = field(init=False)
    table: dict[str, tuple[int, tuple[int | None, ...] | None]] = field(init=False)
    inits: dict[str, TensorProto] = field(init=False)
    consumers: dict[str, list[onnx.NodeProto]] = field(init=False)
    producers: dict[str, onnx.NodeProto] = field(init=False)
    outputs: set[str] = field(init=False)

    def __post_init__(self) -> None:
        g = self.model.graph
        self.opset = opset_of(self.model)
        self.names = _Names(g)
        self.table = _shape_table(self.model)
        self.inits = _initializers(g)
        self.consumers = _consumers(g)
        self.producers = _producers(g)
        self.outputs = {o.name for o in g.output}
        self.counts: dict[str, int] = {}

    def used(self, name: str) -> bool:
        return bool(name) and (name in self.outputs or bool(self.consumers.get(name)))

    def rank(self, name: str) -> int | None:
        dims = self.table.get(name, (0, None))[1]
        return None if dims is None else len(dims)

    def dims(self, name: str) -> tuple[int | None, ...] | None:
        return self.table.get(name, (0, None))[1]

    def const(self, base: str, value: NDArray[np.generic]) -> str:
        return _const(self.model.graph, self.names, base, value)

    def node(self, op: str, inputs: Sequence[str], outputs: Sequence[str], **attrs: Any) -> onnx.NodeProto:
        return helper.make_node(op, list(inputs), list(outputs), name=self.names(f"{outputs[0]}_{op}"), **attrs)

    def tmp(self, base: str) -> str:
        return self.names(base)

    def array(self, name: str) -> NDArray[np.generic] | None:
        t = self.inits.get(name)
        return None if t is None else numpy_helper.to_array(t)

    # -- rewrites: each returns the replacement nodes, or None to keep the node -------------------

    def dropout(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if len(n.output) > 1 and self.used(n.output[1]):
            raise UnsupportedOpError(
                f"Dropout node {n.name!r}: its mask output is used; cannot run it in inference mode"
            )
        return [self.node("Identity", [n.input[0]], [n.output[0]])]

    def batch_norm(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        x, s, b, mean, var = (list(n.input) + [""] * 5)[:5]
        mu, v = self.array(mean), self.array(var)
        if mu is None or v is None:
            return None  # statistics are not constants: the coverage check names the node
        for extra in n.output[1:]:
            if self.used(extra):
                raise UnsupportedOpError(
                    f"BatchNormalization node {n.name!r}: its training-mode outputs are used; only inference "
                    "semantics are supported"
                )
        r = self.rank(x)
        if r is None:
            raise ModelError(f"BatchNormalization node {n.name!r}: the rank of its input {x!r} is unknown")
        eps = attr_float(n, "epsilon", 1e-5)
        dtype = helper.tensor_dtype_to_np_dtype(self.table.get(x, (TensorProto.FLOAT, None))[0])
        c = int(mu.size)
        bshape = [c] + [1] * (r - 2)
        inv = 1.0 / np.sqrt(v.astype(np.float64) + eps)
        y = n.output[0]
        sv, bv = self.array(s), self.array(b)
        if s not in self.keep_params and b not in self.keep_params and sv is not None and bv is not None:
            # y = a·x + c with a = s/√(v+ε), c = b − μ·a  (scale and bias are not asked for)
            a = sv.astype(np.float64) * inv
            cc = bv.astype(np.float64) - mu.astype(np.float64) * a
            an = self.const(f"{y}_bn_a", a.reshape(bshape).astype(dtype))
            cn = self.const(f"{y}_bn_c", cc.reshape(bshape).astype(dtype))
            t = self.tmp(f"{y}_bn_ax")
            return [self.node("Mul", [x, an], [t]), self.node("Add", [t, cn], [y])]
        # y = (x − μ)·inv·s + b, with s and b kept as differentiable tensors
        mn = self.const(f"{y}_bn_mean", mu.astype(np.float64).reshape(bshape).astype(dtype))
        iv = self.const(f"{y}_bn_inv", inv.reshape(bshape).astype(dtype))
        shp = self.const(f"{y}_bn_shape", np.asarray(bshape, np.int64))
        d, e, sr, f, br = (self.tmp(f"{y}_bn_{k}") for k in ("d", "e", "s", "f", "b"))
        return [
            self.node("Sub", [x, mn], [d]),
            self.node("Mul", [d, iv], [e]),
            self.node("Reshape", [s, shp], [sr]),
            self.node("Mul", [e, sr], [f]),
            self.node("Reshape", [b, shp], [br]),
            self.node("Add", [f, br], [y]),
        ]

    def standardized(
        self, x: str, axes: Sequence[int], eps: float, prefix: str, mean: str = "", inv: str = ""
    ) -> tuple[list[onnx.NodeProto], str]:
        """The nodes of ``(x − mean) · 1/√(var + eps)`` over ``axes`` (kept), and the tensor they make;
        ``mean`` / ``inv`` name the mean and ``1/√(var + eps)`` when a caller needs them."""
        dtype = helper.tensor_dtype_to_np_dtype(self.table.get(x, (TensorProto.FLOAT, None))[0])
        mean = mean or self.tmp(f"{prefix}_mean")
        inv = inv or self.tmp(f"{prefix}_inv")
        d, dd, var, ve, sd, e = (self.tmp(f"{prefix}_{k}") for k in ("d", "dd", "var", "ve", "sd", "e"))
        g = self.model.graph
        return [
            _reduce("ReduceMean", x, axes, 1, mean, self.opset, g, self.names),
            self.node("Sub", [x, mean], [d]),
            self.node("Mul", [d, d], [dd]),
            _reduce("ReduceMean", dd, axes, 1, var, self.opset, g, self.names),
            self.node("Add", [var, self.const(f"{prefix}_eps", np.asarray(eps, dtype))], [ve]),
            self.node("Sqrt", [ve], [sd]),
            self.node("Div", [self.const(f"{prefix}_one", np.asarray(1.0, dtype)), sd], [inv]),
            self.node("Mul", [d, inv], [e]),
        ], e

    def instance_norm(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        x, s, b = n.input[0], n.input[1], n.input[2]
        r = self.rank(x)
        if r is None or r < 3:
            return None
        y = n.output[0]
        nodes, e = self.standardized(x, list(range(2, r)), attr_float(n, "epsilon", 1e-5), f"{y}_in")
        sr, f, br = (self.tmp(f"{y}_in_{k}") for k in ("s", "f", "b"))
        shp = self.const(f"{y}_in_shape", np.asarray([-1] + [1] * (r - 2), np.int64))
        return [
            *nodes,
            self.node("Reshape", [s, shp], [sr]),
            self.node("Mul", [e, sr], [f]),
            self.node("Reshape", [b, shp], [br]),
            self.node("Add", [f, br], [y]),
        ]

    def _hard_sigmoid(
        self, x: str, alpha: float, beta: float, y: str, dtype: np.dtype[np.generic]
    ) -> list[onnx.NodeProto]:
        a = self.const(f"{y}_hs_alpha", np.asarray(alpha, dtype))
        bb = self.const(f"{y}_hs_beta", np.asarray(beta, dtype))
        lo = self.const(f"{y}_hs_lo", np.asarray(0.0, dtype))
        hi = self.const(f"{y}_hs_hi", np.asarray(1.0, dtype))
        t1, t2 = self.tmp(f"{y}_hs_ax"), self.tmp(f"{y}_hs_axb")
        return [
            self.node("Mul", [x, a], [t1]),
            self.node("Add", [t1, bb], [t2]),
            self.node("Clip", [t2, lo, hi], [y]),
        ]

    def _dtype(self, name: str) -> np.dtype[np.generic]:
        return np.dtype(helper.tensor_dtype_to_np_dtype(self.table.get(name, (TensorProto.FLOAT, None))[0]))

    def hard_sigmoid(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        alpha = attr_float(n, "alpha", 0.2)
        beta = attr_float(n, "beta", 0.5)
        return self._hard_sigmoid(n.input[0], alpha, beta, n.output[0], self._dtype(n.input[0]))

    def hard_swish(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        x, y = n.input[0], n.output[0]
        h = self.tmp(f"{y}_hswish_gate")
        return [*self._hard_sigmoid(x, 1.0 / 6.0, 0.5, h, self._dtype(x)), self.node("Mul", [x, h], [y])]

    def elu(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        # y = x (x > 0), α·(exp(min(x, 0)) − 1) otherwise: min() keeps exp finite, so the gradient of
        # the unselected branch is 0·finite, never 0·inf.
        x, y = n.input[0], n.output[0]
        dtype = self._dtype(x)
        alpha = attr_float(n, "alpha", 1.0)
        zero = self.const(f"{y}_elu_zero", np.asarray(0.0, dtype))
        one = self.const(f"{y}_elu_one", np.asarray(1.0, dtype))
        al = self.const(f"{y}_elu_alpha", np.asarray(alpha, dtype))
        pos, mn, ex, em, neg = (self.tmp(f"{y}_elu_{k}") for k in ("pos", "min", "exp", "em1", "neg"))
        return [
            self.node("Greater", [x, zero], [pos]),
            self.node("Min", [x, zero], [mn]),
            self.node("Exp", [mn], [ex]),
            self.node("Sub", [ex, one], [em]),
            self.node("Mul", [em, al], [neg]),
            self.node("Where", [pos, x, neg], [y]),
        ]

    def sum_(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        ins = [i for i in n.input if i]
        y = n.output[0]
        if len(ins) == 1:
            return [self.node("Identity", ins, [y])]
        out: list[onnx.NodeProto] = []
        acc = ins[0]
        for k, nxt in enumerate(ins[1:], start=1):
            dst = y if k == len(ins) - 1 else self.tmp(f"{y}_sum{k}")
            out.append(self.node("Add", [acc, nxt], [dst]))
            acc = dst
        return out

    def layer_norm(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        if len(n.output) >= 3 and all(n.output[:3]):
            return None
        outs = list(n.output) + [""] * (3 - len(n.output))
        y = outs[0]
        outs[1] = outs[1] or self.tmp(f"{y}_ln_mean")
        outs[2] = outs[2] or self.tmp(f"{y}_ln_invstd")
        new = onnx.NodeProto()
        new.CopyFrom(n)
        del new.output[:]
        new.output.extend(outs[:3])
        return [new]

    def global_max_pool(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        dims = self.dims(n.input[0])
        if dims is None or len(dims) < 3 or any(d is None for d in dims[2:]):
            return None
        kernel = [int(d) for d in dims[2:] if d is not None]
        return [self.node("MaxPool", [n.input[0]], [n.output[0]], kernel_shape=kernel)]

    def _reduce_axes(self, n: onnx.NodeProto) -> list[int] | None:
        axes = attr_ints(n, "axes")
        if axes is None and len(n.input) > 1 and n.input[1]:
            arr = self.array(n.input[1])
            if arr is None:
                return None
            axes = [int(a) for a in arr.reshape(-1)]
        return axes

    def explicit_pads(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """``auto_pad`` SAME_UPPER/SAME_LOWER/VALID → explicit ``pads``.

        onnxruntime-training 1.19.2's ConvGrad ignores ``auto_pad`` (its gradient is wrong with
        SAME_*; verified against finite differences), so the padding is spelled out.
        """
        auto = attr_str(n, "auto_pad", "NOTSET")
        if auto in ("NOTSET", ""):
            return None
        dims = self.dims(n.input[0])
        if dims is None or len(dims) < 3 or any(d is None for d in dims[2:]):
            return None
        sp = [int(d) for d in dims[2:] if d is not None]
        s = len(sp)
        k = attr_ints(n, "kernel_shape")
        if k is None and n.op_type == "Conv":
            wd = self.dims(n.input[1])
            k = None if wd is None or any(d is None for d in wd) else [int(d or 0) for d in wd[2:]]
        if k is None:
            return None
        st = attr_ints(n, "strides", [1] * s) or []
        dil = attr_ints(n, "dilations", [1] * s) or []
        begin, end = [0] * s, [0] * s
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            for i in range(s):
                out = -(-sp[i] // st[i])
                total = max(0, (out - 1) * st[i] + (k[i] - 1) * dil[i] + 1 - sp[i])
                small, big = total // 2, total - total // 2
                begin[i], end[i] = (small, big) if auto == "SAME_UPPER" else (big, small)
        new = onnx.NodeProto()
        new.CopyFrom(n)
        keep = [a for a in new.attribute if a.name not in ("auto_pad", "pads")]
        del new.attribute[:]
        new.attribute.extend(keep)
        new.attribute.append(helper.make_attribute("pads", begin + end))
        return [new]

    def conv(self, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
        """Explicit pads (:meth:`explicit_pads`); and a grouped 1-D Conv as a 2-D Conv (kernel
        ``[1, k]``) of its input and weight with an axis inserted at 2, that axis removed after: exact.

        onnxruntime-training 1.19.2's ConvGrad gives a wrong input gradient for some grouped 1-D
        convolutions (e.g. 8 channels in 4 or 8 groups, kernel 3, stride 2, pads 1; verified against
        finite differences), which corrupts the gradient of every weight upstream (a depthwise-
        separable Conv1d keyword spotter); its 2-D kernels are right on the same shapes.
        """
        padded = self.explicit_pads(n)
        base = padded[0] if padded else n
        dims = self.dims(base.input[0])
        wd = self.dims(base.input[1])
        if attr_int(base, "group", 1) <= 1 or dims is None or len(dims) != 3 or wd is None or len(wd) != 3:
            return padded
        if attr_str(base, "auto_pad", "NOTSET") not in ("NOTSET", "") or wd[2] is None:
            return padded  # padding unknown (no static shapes): left as it is
        k = attr_ints(base, "kernel_shape") or [int(wd[2])]
        pads = attr_ints(base, "pads") or [0, 0]
        axis = self.const(f"{base.output[0]}_conv1d_axis", np.asarray([2], np.int64))
        x2, w2, y2 = (self.tmp(f"{base.output[0]}_conv1d_{t}") for t in ("x", "w", "y"))
        attrs: dict[str, Any] = {
            "kernel_shape": [1, int(k[0])],
            "strides": [1, *(attr_ints(base, "strides") or [1])],
            "dilations": [1, *(attr_ints(base, "dilations") or [1])],
            "pads": [0, int(pads[0]), 0, int(pads[1])],
            "group": attr_int(base, "group", 1),
        }
        return [
            self.node("Unsqueeze", [base.input[0], axis], [x2]),
            self.node("Unsqueeze", [base.input[1], axis], [w2]),
            self.node("Conv", [x2, w2, *base.input[2:]], [y2], **attrs),
            self.node("Squeeze", [y2, axis], [base.output[0]]),
        ]

    def run(self) -> int:
        rules = {
            "Conv": self.conv,
            "MaxPool": self.explicit_pads,
            "AveragePool": self.explicit_pads,
            "Dropout": self.dropout,
            "BatchNormalization": self.batch_norm,
            "InstanceNormalization": self.instance_norm,
            "HardSigmoid": self.hard_sigmoid,
            "HardSwish": self.hard_swish,
            "Elu": self.elu,
            "Sum": self.sum_,
            "LayerNormalization": self.layer_norm,
            "GlobalMaxPool": self.global_max_pool,
        }
        g = self.model.graph
        new: list[onnx.NodeProto] = []
        changed = 0
        for n in g.node:
            rule = rules.get(n.op_type) if n.domain in _DEFAULT_DOMAINS else None
            repl = rule(n) if rule is not None else None
            if repl is None:
                new.append(n)
            else:
                new.extend(repl)
                changed += 1
                self.counts[n.op_type] = self.counts.get(n.op_type, 0) + 1
        if changed:
            nodes = [copy.deepcopy(n) for n in new]
            del g.node[:]
            g.node.extend(nodes)
        return changed


#: Ops that :func:`legalize` rewrites into differentiable ones (besides adding explicit pads and
#: LayerNormalization's optional outputs to ops that already have a gradient).
LEGALIZED_OPS = frozenset(
    {
        "Dropout",
        "BatchNormalization",
        "InstanceNormalization",
        "HardSigmoid",
        "HardSwish",
        "Elu",
        "Sum",
        "GlobalMaxPool",
    }
)


def legalize(
    model: onnx.ModelProto, keep_params: Iterable[str] = (), counts: MutableMapping[str, int] | None = None
) -> int:
    """Rewrite ops without a usable gradient into equivalent differentiable ones, in place.

    ``keep_params`` names tensors that must stay differentiable (BatchNormalization scale/bias are
    folded into constants unless listed).  Needs inferred shapes.  Returns the number of rewrites;
    ``counts`` (if given) is incremented per rewritten op type.
    """
    rw = _Rewriter(model, frozenset(keep_params))
    changed = rw.run()
    if counts is not None:
        for op, k in rw.counts.items():
            counts[op] = counts.get(op, 0) + k
    return changed


#: Ops whose onnxruntime-training gradient names the gradients of its scale and bias ``<input>_grad``
#: whether or not they are wanted: two of them reading one stored tensor define that name twice and
#: the builder refuses the graph ("Duplicate definition of name").
_PARAM_GRAD_OPS = frozenset({"LayerNormalization", "SimplifiedLayerNormalization"})


def untie_norm_params(graph: onnx.GraphProto, protect: Iterable[str] = ()) -> int:
    """Give each :data:`_PARAM_GRAD_OPS` node its own copy of a stored scale or bias that another node
    reads too, in place; returns the copies made.  Exporters store equal tensors once (dynamo's
    optimizer: every untrained LayerNorm's ones and zeros), so two LayerNorms can share one.  The
    values and the function are unchanged; the tensors in ``protect`` (differentiated) stay shared."""
    inits = {t.name: t for t in graph.initializer}
    keep = set(protect)
    readers: dict[str, int] = {}
    for n in graph.node:
        for i in node_inputs(n):
            if i in inits:
                readers[i] = readers.get(i, 0) + 1
    taken = {v for n in graph.node for v in [*n.input, *n.output]} | set(inits)
    made = 0
    for n in graph.node:
        if n.op_type not in _PARAM_GRAD_OPS:
            continue
        for slot in range(1, len(n.input)):
            name = n.input[slot]
            if name not in inits or name in keep or readers.get(name, 0) < 2:
                continue
            new = f"{name}__untied"
            k = 1
            while new in taken:
                new, k = f"{name}__untied{k}", k + 1
            taken.add(new)
            t = TensorProto()
            t.CopyFrom(inits[name])
            t.name = new
            graph.initializer.append(t)
            n.input[slot] = new
            made += 1
    used = {i for n in graph.node for i in node_inputs(n)} | {o.name for o in graph.output}
    stale = [t for t in graph.initializer if t.name in readers and t.name not in used]
    for t in stale:  # every reader now has its own copy
        graph.initializer.remove(t)
    return made


# -------------------------------------------------------------------------------------- coverage


def differentiable_nodes(
    model: onnx.ModelProto, weights: Iterable[str], target: str
) -> list[tuple[int, onnx.NodeProto]]:
    """Nodes on a float path from any of ``weights`` to ``target`` (index in graph order, node)."""
    table = _shape_table(model)

    def is_float(name: str) -> bool:
        return table.get(name, (TensorProto.FLOAT, None))[0] in _FLOAT_ELEM

    nodes, ins, nodes_back, back = _backward_cone(model, target, is_float)
    fwd: set[str] = {w for w in weights}
    for n in nodes:
        if any(i in fwd for i in ins[id(n)]):
            fwd.update(o for o in n.output if o and is_float(o))
    out = []
    for k, n in enumerate(nodes):
        if id(n) in nodes_back and any(i in fwd for i in ins[id(n)]) and any(o in back for o in n.output):
            out.append((k, n))
    return out


def _backward_cone(
    model: onnx.ModelProto, target: str, is_float: Callable[[str], bool]
) -> tuple[list[onnx.NodeProto], dict[int, list[str]], set[int], set[str]]:
    """``(nodes, inputs by node id, ids of the nodes that reach target through float tensors, those
    float tensors)``."""
    nodes = list(model.graph.node)  # keeps the node wrappers (and so their ids) alive
    ins = {id(n): node_inputs(n) for n in nodes}
    prod = {o: n for n in nodes for o in n.output if o}
    back: set[str] = {target}
    nodes_back: set[int] = set()
    stack = [target]
    while stack:
        t = stack.pop()
        node = prod.get(t)
        if node is None or id(node) in nodes_back:
            continue
        nodes_back.add(id(node))
        for i in ins[id(node)]:
            if i and i not in back and is_float(i):
                back.add(i)
                stack.append(i)
    return nodes, ins, nodes_back, back


def check_coverage(model: onnx.ModelProto, weights: Iterable[str], target: str) -> None:
    """Raise :class:`UnsupportedOpError` naming the first node between ``weights`` and ``target``
    whose op has no usable gradient in onnxruntime-training."""
    for k, n in differentiable_nodes(model, weights, target):
        if n.domain not in _DEFAULT_DOMAINS or n.op_type not in GRADIENT_OPS:
            hint = _NO_GRADIENT_HINT.get(n.op_type, "it has no gradient in onnxruntime-training 1.19.2")
            domain = f"{n.domain}." if n.domain not in _DEFAULT_DOMAINS else ""
            raise UnsupportedOpError(
                f"cannot differentiate op {domain}{n.op_type} (node {_node_label(n, k)!r}) on the path "
                f"from the prunable weights to the loss: {hint}"
            )


def weights_on_path(model: onnx.ModelProto, weights: Sequence[str], target: str) -> list[str]:
    """The subset of ``weights`` that reach ``target`` through float tensors: those with a consumer
    in the backward cone of ``target`` (the same answer as ``differentiable_nodes(model, [w],
    target)`` being non-empty: a float path from a weight enters the cone at the weight's consumer),
    in one pass over the graph instead of one per weight."""
    table = _shape_table(model)

    def is_float(name: str) -> bool:
        return table.get(name, (TensorProto.FLOAT, None))[0] in _FLOAT_ELEM

    nodes, ins, nodes_back, _ = _backward_cone(model, target, is_float)
    wanted = set(weights)
    reached = {i for n in nodes if id(n) in nodes_back for i in ins[id(n)] if i in wanted}
    return [w for w in weights if w in reached]


# ------------------------------------------------------------------------------------ the forward


@dataclass(frozen=True)
class Head:
    """The tensor the loss attaches to, with its static shape at the working batch size."""

    kind: HeadKind
    tensor: str
    class_axis: int | None
    shape: tuple[int, ...]
    elem_type: int

    @property
    def num_classes(self) -> int | None:
        return None if self.class_axis is None else self.shape[self.class_axis]

    @property
    def positions(self) -> int:
        """Per-sample number of class distributions (1 for a plain classifier)."""
        per = int(np.prod(self.shape[1:], dtype=np.int64))
        c = self.num_classes
        return per if c is None else per // max(c, 1)


@dataclass
class Forward:
    """A prepared forward graph: single output ``head.tensor``; weights are graph inputs.

    ``rewrites`` counts the exact rewrites applied per op (see :mod:`.rewrites`); ``static`` says
    what shape folding did, including the If conditions every calibration batch must reproduce."""

    model: onnx.ModelProto
    head: Head
    batch: int
    data_inputs: tuple[tuple[str, np.dtype[np.generic], tuple[int, ...]], ...]
    weight_inputs: dict[str, tuple[int, ...]]
    on_path: tuple[str, ...]
    #: per-sample sizes of the outputs combined into the head (multi-output Gauss-Newton), else ()
    segments: tuple[int, ...] = ()
    rewrites: dict[str, int] = field(default_factory=dict)
    static: StaticInfo | None = None


def build_forward(
    normalized: onnx.ModelProto,
    kind: HeadKind,
    tensor: str | Sequence[str],
    class_axis: int | None,
    *,
    batch: int,
    sample_shapes: Mapping[str, tuple[int, ...]],
    batch_axes: Mapping[str, int | None] | None = None,
    weights: Sequence[str],
    updatable: Iterable[str],
    keep_params: Iterable[str] = (),
    scales: Sequence[float] | None = None,
    feeds: Mapping[str, NDArray[Any]] | None = None,
    self_check: bool = True,
) -> Forward:
    """Cut, fix dims, fold shapes (:mod:`.static`), rewrite exactly (:mod:`.rewrites`), legalize,
    check coverage and expose weights as graph inputs.

    ``feeds`` (calibration inputs at the working shapes, in the model's own layout) let shape folding
    run the model, resolve If conditions on input values and (``self_check``) check that the working
    copy reproduces the model's output on them; without them, shape-only tensors are computed on zeros.

    Several ``tensor`` names (``kind="regression"`` only) are combined into one head scaled by
    ``1/scales`` (:func:`~chita_onnx.gradients.heads.combine_outputs`); a head whose batch is not on
    axis 0 is transposed (:func:`~chita_onnx.gradients.heads.batch_first`).
    """
    from .heads import batch_first, combine_outputs

    tensors = [tensor] if isinstance(tensor, str) else list(tensor)
    target: str | list[str] = tensors[0] if len(tensors) == 1 else tensors
    m = cut_to(normalized, target)
    fix_input_dims(m, batch, sample_shapes, batch_axes)
    updatable = list(updatable)
    protect = set(weights) | set(updatable) | set(keep_params)
    m, counts, static = working_copy(m, target, feeds=feeds, weights=weights, protect=protect, check=self_check)
    untied = untie_norm_params(m.graph, protect)
    if untied:
        counts["untied LayerNormalization parameters"] = untied
    segments: tuple[int, ...] = ()
    if len(tensors) > 1:
        if kind != "regression":
            raise ModelError(f"several outputs {tensors} can only share a Gauss-Newton (regression) head")
        m, tensor, _, segments = combine_outputs(m, tensors, batch, scales)
    else:
        tensor = tensors[0]
    table = _shape_table(m)
    elem, dims = table.get(tensor, (TensorProto.FLOAT, None))
    if dims is None or any(d is None or d <= 0 for d in dims):
        raise ModelError(f"cannot infer the static shape of the loss input {tensor!r} (got {dims})")
    shape = tuple(int(d) for d in dims if d is not None)
    if elem not in _FLOAT_ELEM:
        raise ModelError(f"the loss input {tensor!r} is not a floating-point tensor")
    if class_axis is not None and class_axis < 0:
        class_axis += len(shape)
    if shape[:1] != (batch,):  # also a scalar: a batch of one squeezed away (see batch_first)
        tensor, shape, perm = batch_first(m, tensor, shape, batch)
        class_axis = None if class_axis is None else perm.index(class_axis)
    axis = _head_axis(kind, tensor, shape, class_axis)
    inits = _initializers(m.graph)
    present = [w for w in weights if w in inits]
    check_coverage(m, present, tensor)
    on_path = weights_on_path(m, present, tensor)
    # weights → graph inputs
    upd = [w for w in dict.fromkeys([*weights, *updatable]) if w in inits]
    moved: dict[str, tuple[int, ...]] = {}
    if upd:
        keep = [t for t in m.graph.initializer if t.name not in set(upd)]
        for w in upd:
            t = inits[w]
            m.graph.input.append(helper.make_tensor_value_info(w, t.data_type, list(t.dims)))
            moved[w] = tuple(int(d) for d in t.dims)
        del m.graph.initializer[:]
        m.graph.initializer.extend(keep)
    data_inputs = []
    for vi in m.graph.input:
        if vi.name in moved:
            continue
        tt = vi.type.tensor_type
        data_inputs.append(
            (
                vi.name,
                np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)),
                tuple(int(d.dim_value) for d in tt.shape.dim),
            )
        )
    # the head tensor's shape on the graph output (the builder copies it)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(tensor, elem, list(shape)))
    head = Head(kind, tensor, axis, shape, int(elem))
    return Forward(
        m, head, batch, tuple(data_inputs), moved, tuple(on_path), segments, rewrites=dict(counts), static=static
    )


def _head_axis(kind: HeadKind, tensor: str, shape: tuple[int, ...], class_axis: int | None) -> int | None:
    """The class axis of a ``logits``/``probabilities`` head of ``shape`` (batch first; ``class_axis``
    non-negative or None for the default), None for the other kinds; :class:`ModelError` if it has none."""
    if kind not in ("logits", "probabilities"):
        return None
    axis = default_class_axis(shape) if class_axis is None else class_axis
    if axis is None or not 1 <= axis < len(shape):
        raise ModelError(f"the output {tensor!r} of shape {list(shape)} has no class axis")
    return axis


def with_head(fwd: Forward, kind: HeadKind, tensor: str, class_axis: int | None) -> Forward | None:
    """What :func:`build_forward` returns for ``tensor`` read as ``kind``, from ``fwd``, its forward for
    the same tensor and arguments read as another kind (its graph does not depend on the kind): ``fwd``
    with a copy of its model and the new head.  None where the head may differ: several outputs joined
    into one, or a class axis on a head that was transposed batch-first (then ``fwd.head.tensor`` is
    the transposed tensor, not ``tensor``, and the axis would have to be permuted)."""
    head = fwd.head
    if fwd.segments:
        return None
    if kind in ("logits", "probabilities"):
        if head.tensor != tensor:
            return None
        if class_axis is not None and class_axis < 0:
            class_axis += len(head.shape)
    axis = _head_axis(kind, head.tensor, head.shape, class_axis)
    m = onnx.ModelProto()
    m.CopyFrom(fwd.model)
    return replace(fwd, model=m, head=Head(kind, head.tensor, axis, head.shape, head.elem_type))


def working_copy(
    normalized: onnx.ModelProto,
    tensor: str | Sequence[str],
    *,
    feeds: Mapping[str, NDArray[Any]] | None = None,
    weights: Iterable[str] = (),
    protect: Iterable[str] = (),
    check: bool = True,
) -> tuple[onnx.ModelProto, dict[str, int], StaticInfo]:
    """The static, differentiable working copy of ``normalized`` computing ``tensor`` (one name or
    several).

    Steps: cut to ``tensor``; fix the input dims (to ``feeds``' shapes, else as declared) and fold
    shapes and If nodes (:func:`.static.make_static`); rewrite the ops on the path from ``weights`` to
    ``tensor`` exactly (:func:`.rewrites.apply_rewrites`); legalize; and, with ``feeds``, check that
    the copy reproduces ``tensor`` of ``normalized`` on them (:func:`check_working_copy`).
    ``protect`` names initializers that must stay tensors (never folded or rewritten into constants).
    Returns the model (weights are still initializers), the rewrite counts and the folding summary.
    """
    from .rewrites import apply_rewrites
    from .static import _infer, make_static

    targets = [tensor] if isinstance(tensor, str) else list(tensor)
    cut = cut_to(normalized, targets)
    weights = list(weights)
    protect = set(protect) | set(weights)
    m, static = make_static(cut, feeds, protect=protect)
    recorded = [v.name for v in m.graph.value_info if v.name in static.recorded_names]

    def reinfer(model: onnx.ModelProto) -> onnx.ModelProto:
        return _infer(model, recorded)

    inits = _initializers(m.graph)
    m, counts = apply_rewrites(m, [w for w in weights if w in inits], targets, reinfer)
    if legalize(m, keep_params=protect, counts=counts):
        m = reinfer(m)
    if feeds is not None and check:
        for t in targets:
            check_working_copy(cut, m, t, feeds)
    return m, dict(counts), static


#: The working copy must reproduce the model's output on the calibration example to within
#: ``RTOL·max|output| + ATOL``: float32 reassociation in the rewrites stays far below the relative
#: part; the absolute part covers onnxruntime's approximate Sigmoid/Tanh, whose error is absolute
#: (~1e-7), which matters for probabilities near 0.
SELF_CHECK_RTOL = 1e-3
SELF_CHECK_ATOL = 1e-6


def check_working_copy(
    original: onnx.ModelProto, working: onnx.ModelProto, tensor: str, feeds: Mapping[str, NDArray[Any]]
) -> None:
    """Run ``original`` (dynamic shapes) and the static, rewritten ``working`` copy on ``feeds`` and
    raise :class:`ModelError` when their ``tensor`` values differ: shape folding and every rewrite
    must be exact."""
    from .static import _run

    want = _run(original, [tensor], feeds, what="the model on the calibration example")[tensor]
    got = _run(working, [tensor], feeds, what="the gradient working copy on the calibration example")[tensor]
    if want.shape != got.shape:
        raise ModelError(
            f"the gradient working copy computes {tensor!r} with shape {list(got.shape)}, the model "
            f"{list(want.shape)}; please report this model"
        )
    a, b = np.asarray(want, np.float64), np.asarray(got, np.float64)
    scale = float(np.abs(a[np.isfinite(a)]).max(initial=0.0))
    err = float(np.abs(a - b).max(initial=0.0)) if np.isfinite(a).all() else 0.0
    if not err <= SELF_CHECK_RTOL * scale + SELF_CHECK_ATOL:
        raise ModelError(
            f"the gradient working copy does not reproduce the model's output {tensor!r} on the calibration "
            f"data (max error {err:.3g} at scale {scale:.3g}); please report this model"
        )
    log.debug("working copy reproduces %r (max error %.3g at scale %.3g)", tensor, err, scale)


def default_class_axis(shape: Sequence[int]) -> int | None:
    """Axis 1 of a ``(b, C)`` output; for higher ranks the single non-unit axis, if there is one."""
    if len(shape) == 2:
        return 1
    big = [k for k in range(1, len(shape)) if shape[k] != 1]
    return big[0] if len(big) == 1 else None


# ------------------------------------------------------------------------------------------- loss

LOSS_NAME = "chita_loss"
TARGET_NAME = "chita_target"


def attach_loss(fwd: Forward) -> tuple[onnx.ModelProto, str, str]:
    """A copy of ``fwd.model`` with the scalar loss ``ReduceSum(T ⊙ f(h))`` as its only output.

    Returns ``(model, target_input_name, loss_name)``; the target is a float32 input of the head's
    shape.  See the module docstring for ``f``.
    """
    m = onnx.ModelProto()
    m.CopyFrom(fwd.model)
    g = m.graph
    names = _Names(g)
    head = fwd.head
    target, loss = names(TARGET_NAME), names(LOSS_NAME)
    h = head.tensor
    nodes: list[onnx.NodeProto] = []
    if head.elem_type != TensorProto.FLOAT:
        hc = names(f"{h}_f32")
        nodes.append(helper.make_node("Cast", [h], [hc], to=TensorProto.FLOAT, name=names("chita_cast")))
        h = hc
    if head.kind == "logits":
        f = names("chita_log_softmax")
        nodes.append(helper.make_node("LogSoftmax", [h], [f], axis=int(head.class_axis or 1), name=names("chita_lsm")))
    elif head.kind == "probabilities":
        lo = _const(g, names, "chita_clip_lo", np.asarray(1e-30, np.float32))
        hi = _const(g, names, "chita_clip_hi", np.asarray(1.0, np.float32))
        c, f = names("chita_clipped"), names("chita_log_p")
        nodes += [
            helper.make_node("Clip", [h, lo, hi], [c], name=names("chita_clip")),
            helper.make_node("Log", [c], [f], name=names("chita_log")),
        ]
    else:
        f = h
    tf = names("chita_weighted")
    nodes.append(helper.make_node("Mul", [f, target], [tf], name=names("chita_mul")))
    nodes.append(helper.make_node("ReduceSum", [tf], [loss], keepdims=0, name=names("chita_sum")))
    g.node.extend(nodes)
    g.input.append(helper.make_tensor_value_info(target, TensorProto.FLOAT, list(head.shape)))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(loss, TensorProto.FLOAT, []))
    return m, target, loss
