"""Two load-time passes that put models from older or function-based exporters in the form the
rest of chita-onnx reads.  Each keeps the model's outputs identical for every input it accepts.

* :func:`detach_initializer_inputs`: an initializer that is also listed as a graph input (IR 3
  required it; caffe2-era converters and torch's ``keep_initializers_as_inputs=True`` still write it)
  is only a default value that a caller may override, so nothing treats it as a constant: such a
  model had "no prunable weights".  The pass removes those names from the graph inputs, which is
  also what onnxruntime recommends for them (it cannot constant-fold them).  IR 3 is raised to 4,
  the first version that allows initializers outside the inputs.
* :func:`inline_functions`: a layer inside a model-local function (``FunctionProto``, written by
  onnxscript, spox and torch's ``export_modules_as_functions``) reads its weight as a formal
  parameter, never as a constant.  The pass inlines every local function call.
* :func:`unfuse_contrib_layers`: a model saved by onnxruntime after its graph optimizations
  (``SessionOptions.optimized_model_filepath``) holds its layers as ``com.microsoft`` ``FusedConv``,
  ``FusedGemm`` and ``FusedMatMul`` nodes, which nothing else reads as layers: their weights stayed
  dense without a word.  The pass writes each back as the standard layer followed by its activation
  (onnxruntime fuses them again when it loads the written model).

* :func:`decompose_early_layer_norms`: onnxruntime's optimizer also writes ``LayerNormalization``
  into models of opsets below 17, where ONNX has no such op and onnx.checker refuses the file; the
  pass writes each as its primitive ops (:func:`~chita_onnx.graph.load_model` runs it before the
  checker).

* :func:`replace_image_scaler`: the experimental ``ImageScaler`` (removed from ONNX; the classic
  zoo's Tiny YOLOv2 and FER+ open with it) stops onnx's version converter, so no gradients could be
  built.  The pass writes it as ``Mul`` and ``Add``.

* :func:`reshape_open_squeezes`: before opset 13, a ``Squeeze`` without ``axes`` on a tensor with a
  dim of unknown size (torch 1.x's ``x.squeeze()`` after a dynamic batch; AECMOS's head) gets a
  rank-0 shape from onnxruntime 1.19's shape inference, which then refuses the whole model ("rank
  must be greater than axis" at the next ``Concat``).  When onnxruntime refuses the model, the pass
  writes each as ``Reshape`` to the input's shape with its 1s removed (``Shape``, ``Equal``, ``Not``,
  ``Compress``).

* :func:`split_attention_projections`: onnxruntime's transformer optimizer folds a BERT layer's
  Q/K/V projections into one ``com.microsoft.Attention``, whose weight no layer reads.  The pass
  computes the projection as a ``MatMul`` in front of the node (which then reads an identity); the
  writer puts the fused node back (:func:`restore_attention_projections`).

:func:`standardize` runs them all; :func:`~chita_onnx.graph.load_model` calls it, so every command sees
(and writes) the same graph.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx.inliner
import onnx.shape_inference
from onnx import helper, numpy_helper

from . import runtime
from .errors import ModelError, first_line
from .graph import _dense_from_sparse, opset_version, walk_graphs

log = logging.getLogger(__name__)

#: First IR version that lets an initializer stay out of the graph inputs.
IR_INITIALIZERS_AS_CONSTANTS = 4


@dataclass(frozen=True)
class SplitProjection:
    """One onnxruntime ``Attention`` whose input projection :func:`split_attention_projections` took
    out: the node now reads ``projected = MatMul(source, weight)`` through an ``identity`` weight."""

    source: str
    weight: str
    identity: str
    projected: str


@dataclass
class DetachedInputs:
    """What the load-time passes took apart, for the writer to put back: the original graph inputs
    (in order) and IR version (:func:`detach_initializer_inputs`, :func:`restore_initializer_inputs`),
    and the split ``Attention`` projections (:func:`split_attention_projections`,
    :func:`restore_attention_projections`)."""

    inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    ir_version: int = 0
    projections: list[SplitProjection] = field(default_factory=list)


def detach_initializer_inputs(
    model: onnx.ModelProto, *, in_place: bool = False, record: DetachedInputs | None = None
) -> onnx.ModelProto:
    """``model`` without the main-graph inputs that an initializer of the same name backs.

    Returns ``model`` itself when there are none, else a copy (``model`` itself, changed, with
    ``in_place``: no second copy of the weights), with IR raised to at least 4.  ``record``, when
    given, receives the original inputs and IR version (the writer puts them back)."""
    g = model.graph
    stored = {t.name for t in g.initializer} | {s.values.name for s in g.sparse_initializer}
    backed = [i.name for i in g.input if i.name in stored]
    if not backed:
        return model
    if record is not None:
        record.inputs = [_copy_value_info(v) for v in g.input]
        record.ir_version = model.ir_version
    out = _target(model, in_place)
    keep = [i for i in out.graph.input if i.name not in stored]
    del out.graph.input[:]
    out.graph.input.extend(keep)
    if out.ir_version < IR_INITIALIZERS_AS_CONSTANTS:
        out.ir_version = IR_INITIALIZERS_AS_CONSTANTS
    log.info(
        "%d initializer(s) listed as graph inputs are treated as constants and no longer listed as inputs",
        len(backed),
    )
    return out


def _copy_value_info(v: onnx.ValueInfoProto) -> onnx.ValueInfoProto:
    out = onnx.ValueInfoProto()
    out.CopyFrom(v)
    return out


def restore_initializer_inputs(model: onnx.ModelProto, record: DetachedInputs) -> onnx.ModelProto:
    """Put back, in place, the graph inputs and IR version that :func:`detach_initializer_inputs`
    recorded, so that a written model keeps the input's interface.  An input whose initializer is
    gone is left out; at IR 3 every initializer is listed (as IR 3 requires, new ones included), and
    a listed initializer stored sparse is stored dense again (an overridable input cannot be sparse).
    Each restored input is typed from the tensor now stored under its name.  Returns ``model``."""
    if not record.inputs:
        return model
    g = model.graph
    sparse = {sp.values.name: sp for sp in g.sparse_initializer}
    typed = {t.name: (t.data_type, list(t.dims)) for t in g.initializer}
    typed |= {name: (sp.values.data_type, list(sp.dims)) for name, sp in sparse.items()}  # the dense shape

    def value_info(name: str) -> onnx.ValueInfoProto:
        elem, dims = typed[name]
        return helper.make_tensor_value_info(name, elem, dims)

    current = {v.name: v for v in g.input}
    listed: list[onnx.ValueInfoProto] = []
    for v in record.inputs:
        if v.name in current:
            listed.append(current.pop(v.name))
        elif v.name in typed:
            listed.append(value_info(v.name))
    listed += current.values()
    if record.ir_version < IR_INITIALIZERS_AS_CONSTANTS:
        names = {v.name for v in listed}
        listed += [value_info(name) for name in typed if name not in names]
        model.ir_version = record.ir_version
    inputs = {v.name for v in listed}
    back = [sp for name, sp in sparse.items() if name in inputs]
    if back:
        keep = [sp for sp in g.sparse_initializer if sp.values.name not in inputs]
        g.initializer.extend(_dense_from_sparse(sp) for sp in back)
        del g.sparse_initializer[:]
        g.sparse_initializer.extend(keep)
    del g.input[:]
    g.input.extend(listed)
    return model


def _called(graph: onnx.GraphProto, local: set[tuple[str, str]]) -> int:
    """How many nodes of ``graph`` and its subgraphs call a function in ``local``."""
    return sum((n.domain, n.op_type) in local for g in _graphs(graph) for n in g.node)


def inline_functions(model: onnx.ModelProto, where: str = "model") -> onnx.ModelProto:
    """``model`` with every call of a model-local function replaced by the function's body.

    Returns ``model`` itself when it defines no local function.  Raises :class:`ModelError` (naming
    ``where``) when onnx's inliner rejects the model (a malformed function)."""
    if not model.functions:
        return model
    local = {(f.domain, f.name) for f in model.functions}
    calls = _called(model.graph, local)
    try:
        out = onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # the C++ inliner raises plain exceptions on malformed functions
        names = ", ".join(f"{d}.{n}" if d else n for d, n in sorted(local))
        raise ModelError(f"{where}: cannot inline the model's local functions ({names}): {first_line(exc)}") from None
    if calls:
        log.info("inlined %d call(s) of %d local function(s)", calls, len(local))
    return out


CONTRIB = "com.microsoft"

#: Activations of onnxruntime's fused layers that have a standard op, with that op's float attributes
#: in the order ``FusedConv``'s ``activation_params`` lists them, and their ONNX defaults.
_ACTIVATIONS: dict[str, tuple[tuple[str, float], ...]] = {
    "Relu": (),
    "Tanh": (),
    "Sigmoid": (),
    "LeakyRelu": (("alpha", 0.01),),
    "HardSigmoid": (("alpha", 0.2), ("beta", 0.5)),
    "Clip": (("min", float(np.finfo(np.float32).min)), ("max", float(np.finfo(np.float32).max))),
}


_CONV_ATTRS = {"auto_pad", "dilations", "group", "kernel_shape", "pads", "strides"}
_GEMM_ATTRS = {"alpha", "beta", "transA", "transB"}
_MATMUL_ATTRS = {"alpha", "transA", "transB", "transBatchA", "transBatchB"}


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    return (g for _, g in walk_graphs(graph))


def _target(model: onnx.ModelProto, in_place: bool) -> onnx.ModelProto:
    """``model`` itself (``in_place``) or a copy of it to change."""
    if in_place:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


Rewrite = Callable[
    [onnx.NodeProto, dict[str, onnx.TensorProto], Callable[[str], str]],
    "tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None",
]


def _rewrite_nodes(model: onnx.ModelProto, rewrite: Rewrite, in_place: bool) -> tuple[onnx.ModelProto, int]:
    """Replace every node for which ``rewrite(node, initializers of its graph, fresh)`` returns
    ``(nodes, new initializers)``, in every graph; the model (``model`` itself when nothing was
    rewritten) and how many nodes were."""
    out = _target(model, in_place)
    fresh = _fresh_names(out)
    count = 0
    for g in _graphs(out.graph):
        stored = {t.name: t for t in g.initializer}
        nodes: list[onnx.NodeProto] = []
        for node in g.node:
            done = rewrite(node, stored, fresh)
            if done is None:
                nodes.append(node)
                continue
            new, consts = done
            nodes.extend(new)
            g.initializer.extend(consts)
            count += 1
        del g.node[:]
        g.node.extend(nodes)
    return (out if count else model), count


def fresh_namer(taken: set[str]) -> Callable[[str], str]:
    """``fresh(base)``: ``base``, or ``base_1``, ``base_2``, … — the first name not in ``taken``
    (which it then joins)."""

    def fresh(base: str) -> str:
        name, k = base, 0
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return name

    return fresh


def _fresh_names(model: onnx.ModelProto) -> Callable[[str], str]:
    taken: set[str] = set()
    for g in _graphs(model.graph):
        taken.update(t.name for t in g.initializer)
        taken.update(v.name for v in (*g.input, *g.output, *g.value_info))
        for n in g.node:
            taken.update((*n.input, *n.output, n.name))
    return fresh_namer(taken)


def _activation(
    kind: str,
    params: dict[str, float],
    x: str,
    y: str,
    opset: int,
    fresh: Callable[[str], str],
    dtype: np.dtype[Any] | None = None,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """Standard nodes computing ``y = kind(x)``; Clip's bounds as scalar initializers of ``dtype``
    (the layer's; default float32) from opset 11 on (before: attributes)."""
    name = fresh(f"{y}_{kind.lower()}")
    if kind == "Clip" and opset >= 11:
        lo, hi = fresh(f"{y}_clip_min"), fresh(f"{y}_clip_max")
        dt = np.dtype(np.float32) if dtype is None else dtype
        consts = [
            numpy_helper.from_array(np.array(params["min"], dt), lo),
            numpy_helper.from_array(np.array(params["max"], dt), hi),
        ]
        return [helper.make_node("Clip", [x, lo, hi], [y], name=name)], consts
    kw: dict[str, Any] = dict(params)
    return [helper.make_node(kind, [x], [y], name=name, **kw)], []


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _as_text(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _unfused(
    node: onnx.NodeProto, opset: int, fresh: Callable[[str], str], stored: dict[str, onnx.TensorProto]
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
    """The standard nodes (and new scalar initializers) equal to one fused node, or None to leave it."""
    attrs = _attrs(node)
    kind = _as_text(attrs.pop("activation", ""))
    if kind and kind not in _ACTIVATIONS:
        return None
    names = [n for n, _ in _ACTIVATIONS.get(kind, ())]
    defaults = dict(_ACTIVATIONS.get(kind, ()))
    y = node.output[0]
    if node.op_type == "FusedConv":
        listed = [float(v) for v in attrs.pop("activation_params", [])]
        if len(listed) > len(names):
            return None
        params = {**defaults, **dict(zip(names, listed, strict=False))}
        if not set(attrs) <= _CONV_ATTRS:
            return None
        ins = list(node.input)
        z = ins[3] if len(ins) > 3 and ins[3] else ""
        layer = helper.make_node("Conv", [i for i in ins[:3]], [fresh(f"{y}_conv") if (kind or z) else y],
                                 name=node.name or fresh(f"{y}_conv"), **attrs)  # fmt: skip
        nodes = [layer]
        last = layer.output[0]
        if z:
            summed = fresh(f"{y}_sum") if kind else y
            nodes.append(helper.make_node("Add", [last, z], [summed], name=fresh(f"{y}_add")))
            last = summed
    elif node.op_type == "FusedGemm":
        params = {}
        for n in names:
            v = attrs.pop(f"activation_{n}", None)
            params[n] = float(v) if v is not None else defaults[n]
        if not set(attrs) <= _GEMM_ATTRS or kind == "Clip":
            return None
        ins = list(node.input)
        extra: list[onnx.TensorProto] = []
        if opset < 11 and (len(ins) < 3 or not ins[2]):  # C is optional from opset 11 on
            weight = stored.get(ins[1]) or stored.get(ins[0])
            if weight is None:
                return None
            c = fresh(f"{y}_no_bias")
            extra.append(numpy_helper.from_array(np.zeros((), helper.tensor_dtype_to_np_dtype(weight.data_type)), c))
            ins = [*ins[:2], c]
        layer = helper.make_node("Gemm", ins, [fresh(f"{y}_gemm") if kind else y],
                                 name=node.name or fresh(f"{y}_gemm"), **attrs)  # fmt: skip
        nodes, last = [layer], layer.output[0]
        if not kind:
            return nodes, extra
        act, consts = _activation(kind, params, last, y, opset, fresh)
        return nodes + act, extra + consts
    else:  # FusedMatMul: alpha · op(A) @ op(B), op a transpose of the last two axes
        if attrs.get("transBatchA", 0) or attrs.get("transBatchB", 0) or kind or not set(attrs) <= _MATMUL_ATTRS:
            return None
        ins, pre = list(node.input), []
        for i, flag in ((0, "transA"), (1, "transB")):
            if attrs.get(flag, 0):
                t = stored.get(ins[i])
                if t is None or len(t.dims) < 2:
                    return None  # the rank of an activation is not known here
                r = len(t.dims)
                out = fresh(f"{ins[i]}_t")
                perm = [*range(r - 2), r - 1, r - 2]
                pre.append(helper.make_node("Transpose", [ins[i]], [out], name=fresh(f"{out}_node"), perm=perm))
                ins[i] = out
        alpha = float(attrs.get("alpha", 1.0))
        weight = next((stored[n] for n in node.input if n in stored), None)
        if alpha != 1.0 and weight is None:
            return None
        mm = helper.make_node("MatMul", ins, [fresh(f"{y}_matmul") if alpha != 1.0 else y],
                              name=node.name or fresh(f"{y}_matmul"))  # fmt: skip
        scale: list[onnx.TensorProto] = []
        nodes = [*pre, mm]
        if alpha != 1.0:
            assert weight is not None
            a = fresh(f"{y}_alpha")
            dtype = helper.tensor_dtype_to_np_dtype(weight.data_type)
            scale.append(numpy_helper.from_array(np.array(alpha, dtype), a))
            nodes.append(helper.make_node("Mul", [mm.output[0], a], [y], name=fresh(f"{y}_scale")))
        return nodes, scale
    if not kind:
        return nodes, []
    w = stored.get(node.input[1]) if len(node.input) > 1 else None
    act, consts = _activation(
        kind, params, last, y, opset, fresh, None if w is None else helper.tensor_dtype_to_np_dtype(w.data_type)
    )
    return nodes + act, consts


def unfuse_contrib_layers(model: onnx.ModelProto, *, in_place: bool = False) -> onnx.ModelProto:
    """``model`` with onnxruntime's ``FusedConv`` / ``FusedGemm`` / ``FusedMatMul`` written back as
    ``Conv`` (``+ Z``) / ``Gemm`` / ``MatMul`` (behind ``Transpose``, times ``alpha``) and a standard
    activation node.  Fused nodes with an activation or attribute that has no standard equivalent
    are left as they are.  Returns ``model`` itself when nothing changes (and, with ``in_place``,
    when something does: changed)."""
    fused = ("FusedConv", "FusedGemm", "FusedMatMul")
    if not any(n.domain == CONTRIB and n.op_type in fused for g in _graphs(model.graph) for n in g.node):
        return model
    opset = opset_version(model)
    if not opset:
        return model  # no standard opset to write the layers in

    def rewrite(
        node: onnx.NodeProto, stored: dict[str, onnx.TensorProto], fresh: Callable[[str], str]
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
        if node.domain != CONTRIB or node.op_type not in fused:
            return None
        return _unfused(node, opset, fresh, stored)

    out, count = _rewrite_nodes(model, rewrite, in_place)
    if count:
        log.info("wrote %d onnxruntime fused layer(s) back as standard layers and activations", count)
    return out


def split_attention_projections(
    model: onnx.ModelProto, *, in_place: bool = False, record: DetachedInputs | None = None
) -> onnx.ModelProto:
    """``model`` with the Q/K/V projection of every onnxruntime ``com.microsoft.Attention`` taken out
    of the node: ``Attention(x, W, b, …)`` becomes ``Attention(MatMul(x, W), I, b, …)`` with ``I``
    the identity (``x·W·I + b`` is ``x·W + b``).  onnxruntime's transformer optimizer folds a BERT
    layer's three projections into that node, whose weight no Gemm/MatMul reads, so a third of the
    layer weights stayed dense; as a MatMul weight it is a layer like any other.  ``record`` receives
    each split so that the writer puts the fused node back (:func:`restore_attention_projections`).
    Returns ``model`` itself when there is nothing to split."""
    if not any(n.domain == CONTRIB and n.op_type == "Attention" for g in _graphs(model.graph) for n in g.node):
        return model
    splits: list[SplitProjection] = []

    def rewrite(
        node: onnx.NodeProto, stored: dict[str, onnx.TensorProto], fresh: Callable[[str], str]
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
        if node.domain != CONTRIB or node.op_type != "Attention" or len(node.input) < 2 or not node.input[0]:
            return None
        w = stored.get(node.input[1])
        if w is None or len(w.dims) != 2 or w.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16):
            return None
        label = node.name or "Attention"
        projected, identity = fresh(f"{label}_projected"), fresh(f"{node.input[1]}_identity")
        eye = np.eye(int(w.dims[1]), dtype=helper.tensor_dtype_to_np_dtype(w.data_type))
        matmul = helper.make_node(
            "MatMul", [node.input[0], node.input[1]], [projected], name=fresh(f"{label}_projection")
        )
        fused = onnx.NodeProto()
        fused.CopyFrom(node)
        fused.input[0], fused.input[1] = projected, identity
        splits.append(SplitProjection(node.input[0], node.input[1], identity, projected))
        return [matmul, fused], [numpy_helper.from_array(eye, identity)]

    out, count = _rewrite_nodes(model, rewrite, in_place)
    if count:
        log.info("took the input projection out of %d onnxruntime Attention node(s)", count)
        if record is not None:
            record.projections.extend(splits)
    return out


def restore_attention_projections(model: onnx.ModelProto, record: DetachedInputs) -> onnx.ModelProto:
    """Put each split ``Attention`` back together, in place: the node reads ``source`` and the (now
    pruned) ``weight`` again, and the MatMul and identity go.  A constant ``Add`` that the bias
    correction put on the projection is folded into the node's bias.  A split whose pieces are no
    longer as the pass left them (a channel surgery renamed or sliced them) stays split: the same
    outputs, one extra product.  Returns ``model``."""
    if not record.projections:
        return model
    by_identity = {r.identity: r for r in record.projections}
    for g in _graphs(model.graph):
        stored = {t.name: t for t in g.initializer}
        # the pruned weight may already be a sparse_initializer (--storage sparse/auto): the node only names it
        weights = set(stored) | {sp.values.name for sp in g.sparse_initializer}
        prod = {o: n for n in g.node for o in n.output if o}
        readers: dict[str, int] = {}
        for n in g.node:
            for i in n.input:
                readers[i] = readers.get(i, 0) + 1
        drop_nodes: set[int] = set()
        drop_inits: set[str] = set()
        for node in g.node:
            rec = by_identity.get(node.input[1]) if node.domain == CONTRIB and node.op_type == "Attention" else None
            if rec is None or rec.identity not in stored or rec.weight not in weights:
                continue
            if node.input[0] != rec.projected or readers.get(rec.projected, 0) != 1:
                continue
            mm, add, c = prod.get(rec.projected), None, None
            if mm is not None and mm.op_type == "Add":  # the bias correction's Add(projection, shift)
                add = mm
                ins = list(add.input)
                c = stored.get(ins[1]) if ins[1] in stored else stored.get(ins[0])
                inner = ins[0] if c is not None and ins[1] == c.name else ins[1]
                mm = prod.get(inner) if c is not None and readers.get(inner, 0) == 1 else None
                if not (len(node.input) > 2 and node.input[2] in stored and readers.get(node.input[2], 0) == 1):
                    mm = None  # no constant bias of this node's own to fold the shift into: stay split
            if mm is None or mm.op_type != "MatMul" or list(mm.input) != [rec.source, rec.weight]:
                continue
            if add is not None and c is not None:
                b = stored[node.input[2]]
                shift = numpy_helper.to_array(c).reshape(-1).astype(helper.tensor_dtype_to_np_dtype(b.data_type))
                b.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(b) + shift, b.name))
                drop_nodes.add(id(add))
                if readers.get(c.name, 0) == 1:
                    drop_inits.add(c.name)
            node.input[0], node.input[1] = rec.source, rec.weight
            drop_nodes.add(id(mm))
            drop_inits.add(rec.identity)
        if drop_nodes or drop_inits:
            keep = [n for n in g.node if id(n) not in drop_nodes]
            del g.node[:]
            g.node.extend(keep)
            inits = [t for t in g.initializer if t.name not in drop_inits]
            del g.initializer[:]
            g.initializer.extend(inits)
    return model


def replace_image_scaler(model: onnx.ModelProto, *, in_place: bool = False) -> onnx.ModelProto:
    """``model`` with every ``ImageScaler`` (an experimental op of opsets 1–9, removed from ONNX; the
    classic zoo's Tiny YOLOv2 and FER+ start with it) written as ``Mul`` by its scale and ``Add`` of
    its per-channel bias ``[1, C, 1, …]``: the same values, in ops that onnx's version converter and
    the gradient engine know.  Returns ``model`` itself when there is none."""
    if not any(
        n.op_type == "ImageScaler" and n.domain in ("", "ai.onnx") for g in _graphs(model.graph) for n in g.node
    ):
        return model
    if opset_version(model) < 7:  # Mul/Add broadcast by attribute before opset 7
        return model
    types = _elem_types(model)

    def rewrite(
        n: onnx.NodeProto, stored: dict[str, onnx.TensorProto], fresh: Callable[[str], str]
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
        elem = types.get(n.input[0]) if n.input else None
        if n.op_type != "ImageScaler" or n.domain not in ("", "ai.onnx") or elem is None:
            return None
        dtype = helper.tensor_dtype_to_np_dtype(elem)  # the scale and bias in the image's own type
        attrs = _attrs(n)
        bias = np.asarray(attrs.get("bias", []), dtype)
        x, y = n.input[0], n.output[0]
        scale = fresh(f"{y}_scale")
        consts = [numpy_helper.from_array(np.array(float(attrs.get("scale", 1.0)), dtype), scale)]
        if bias.size == 0:
            return [helper.make_node("Mul", [x, scale], [y], name=n.name or fresh(f"{y}_mul"))], consts
        scaled, b = fresh(f"{y}_scaled"), fresh(f"{y}_bias")
        consts.append(numpy_helper.from_array(bias.reshape(1, -1, 1, 1), b))
        mul = helper.make_node("Mul", [x, scale], [scaled], name=fresh(f"{y}_mul"))
        return [mul, helper.make_node("Add", [scaled, b], [y], name=n.name or fresh(f"{y}_add"))], consts

    out, count = _rewrite_nodes(model, rewrite, in_place)
    if count:
        log.info("replaced %d ImageScaler node(s), an experimental op, by Mul and Add", count)
    return out


#: The first ai.onnx opset whose ``Squeeze`` onnxruntime 1.19 infers right without ``axes``.
SQUEEZE_INFERRED_FROM = 13


def open_squeezes(model: onnx.ModelProto) -> bool:
    """Whether the model (before opset 13) has a ``Squeeze`` without ``axes`` (cheap: no inference)."""
    return opset_version(model) < SQUEEZE_INFERRED_FROM and any(
        n.op_type == "Squeeze" and n.domain in ("", "ai.onnx") and not any(a.name == "axes" for a in n.attribute)
        for g in _graphs(model.graph)
        for n in g.node
    )


def _runtime_loads(model: onnx.ModelProto) -> bool:
    """Whether the bundled onnxruntime builds a session for ``model`` (its shape inference runs at load)."""
    try:
        runtime.session(model, what="the model as loaded", optimize=False, check=False)
    except Exception:  # a load failure, or a model too large to serialize: rewrite (the values stay)
        return False
    return True


def reshape_open_squeezes(model: onnx.ModelProto, *, in_place: bool = False) -> onnx.ModelProto:
    """``model`` with every ``Squeeze`` without ``axes`` whose input is not of a fully known shape
    written as ``Reshape(x, Compress(Shape(x), Not(Equal(Shape(x), 1))))`` (models of opsets below 13).

    The same values for every input (all the 1s removed, at run time); only an input that has a
    zero-size dim after a kept one can differ (``Reshape`` before opset 14 reads a 0 as "copy").
    onnxruntime 1.19's shape inference gives such a ``Squeeze`` a rank-0 output and then refuses
    the model at the next op that checks ranks; newer ones load it, and load the rewrite too.
    Returns ``model`` itself when there is none, or when onnxruntime loads the model as it is
    (plcmos's squeezes: nothing after them checks a rank)."""
    if not open_squeezes(model) or _runtime_loads(model):
        return model
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an inconsistent graph: treat every shape as unknown
        inferred = model
    known: set[str] = set()
    for g in _graphs(inferred.graph):
        for v in (*g.input, *g.output, *g.value_info):
            t = v.type.tensor_type
            if (
                v.type.HasField("tensor_type")
                and t.HasField("shape")
                and all(d.HasField("dim_value") for d in t.shape.dim)
            ):
                known.add(v.name)
        known.update(t.name for t in g.initializer)

    def rewrite(
        n: onnx.NodeProto, stored: dict[str, onnx.TensorProto], fresh: Callable[[str], str]
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
        if (
            n.op_type != "Squeeze"
            or n.domain not in ("", "ai.onnx")
            or any(a.name == "axes" for a in n.attribute)
            or not n.input
            or n.input[0] in known
        ):
            return None
        x, y = n.input[0], n.output[0]
        shape, one, ones, keep, kept = (fresh(f"{y}_{k}") for k in ("shape", "one", "is_one", "keep", "squeezed_shape"))
        nodes = [
            helper.make_node("Shape", [x], [shape], name=fresh(f"{y}_Shape")),
            helper.make_node("Equal", [shape, one], [ones], name=fresh(f"{y}_Equal")),
            helper.make_node("Not", [ones], [keep], name=fresh(f"{y}_Not")),
            helper.make_node("Compress", [shape, keep], [kept], axis=0, name=fresh(f"{y}_Compress")),
            helper.make_node("Reshape", [x, kept], [y], name=n.name or fresh(f"{y}_Reshape")),
        ]
        return nodes, [numpy_helper.from_array(np.array(1, np.int64), one)]

    out, count = _rewrite_nodes(model, rewrite, in_place)
    if count:
        log.info("wrote %d Squeeze node(s) without axes as Reshape (onnxruntime 1.19 cannot infer their rank)", count)
    return out


def decompose_early_layer_norms(model: onnx.ModelProto, *, in_place: bool = False) -> onnx.ModelProto:
    """``model`` with every ``LayerNormalization`` of a model whose ``ai.onnx`` opset is below 17
    written as ``ReduceMean``/``Sub``/``Mul``/``Add``/``Sqrt``/``Div`` (the op joined ONNX at 17).

    onnxruntime's graph optimizer writes that op at any opset (``SessionOptions.optimized_model_filepath``
    on a BERT exported at opset 11: its runtime registers it there as an extension), so onnx.checker
    refused such files.  The same function, exactly: ``(x − mean) / sqrt(var + ε) · scale (+ bias)``
    over the axes from ``axis`` on, in the input's type; onnxruntime fuses it back when it loads the
    written model.  A node whose mean/inverse-deviation outputs are used, or whose positive ``axis``
    needs a rank that is not known, is left as it is (and refused as before).  Returns ``model`` itself
    when there is nothing to do."""
    from .graph import opset_version

    if opset_version(model) >= 17 or not any(
        n.op_type == "LayerNormalization" and n.domain in ("", "ai.onnx") for g in _graphs(model.graph) for n in g.node
    ):
        return model
    types, ranks = _inferred(model)
    read = {i for g in _graphs(model.graph) for n in g.node for i in n.input}

    def rewrite(
        n: onnx.NodeProto, stored: dict[str, onnx.TensorProto], fresh: Callable[[str], str]
    ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]] | None:
        if n.op_type != "LayerNormalization" or n.domain not in ("", "ai.onnx") or len(n.input) < 2:
            return None
        if any(o and o in read for o in n.output[1:]):
            return None
        x, y = n.input[0], n.output[0]
        elem = stored[n.input[1]].data_type if n.input[1] in stored else types.get(x)
        if elem is None:
            return None
        attrs = _attrs(n)
        axis = int(attrs.get("axis", -1))
        if axis >= 0:
            rank = ranks.get(x)
            if rank is None:
                return None
            axis -= rank
        axes = list(range(axis, 0))
        dtype = helper.tensor_dtype_to_np_dtype(elem)
        eps = fresh(f"{y}_epsilon")
        consts = [numpy_helper.from_array(np.array(float(attrs.get("epsilon", 1e-5)), dtype), eps)]
        mean, d, d2, var, ve, sd, norm = (
            fresh(f"{y}_{k}") for k in ("mean", "centered", "sq", "var", "var_eps", "std", "norm")
        )
        bias = n.input[2] if len(n.input) > 2 and n.input[2] else ""
        scaled = fresh(f"{y}_scaled") if bias else y
        nodes = [
            helper.make_node("ReduceMean", [x], [mean], axes=axes, keepdims=1, name=fresh(f"{y}_mean_op")),
            helper.make_node("Sub", [x, mean], [d], name=fresh(f"{y}_sub")),
            helper.make_node("Mul", [d, d], [d2], name=fresh(f"{y}_square")),
            helper.make_node("ReduceMean", [d2], [var], axes=axes, keepdims=1, name=fresh(f"{y}_var_op")),
            helper.make_node("Add", [var, eps], [ve], name=fresh(f"{y}_add_eps")),
            helper.make_node("Sqrt", [ve], [sd], name=fresh(f"{y}_sqrt")),
            helper.make_node("Div", [d, sd], [norm], name=fresh(f"{y}_div")),
            helper.make_node("Mul", [norm, n.input[1]], [scaled], name=n.name or fresh(f"{y}_scale")),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [scaled, bias], [y], name=fresh(f"{y}_bias")))
        return nodes, consts

    out, count = _rewrite_nodes(model, rewrite, in_place)
    if count:
        log.info(
            "wrote %d LayerNormalization node(s) of an opset-%d model (onnxruntime's optimizer writes them; "
            "ONNX has them from opset 17) as their primitive ops",
            count,
            opset_version(model),
        )
    return out


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the values onnx's shape inference can tell (every graph, declared or inferred)."""
    return _inferred(model)[0]


def _inferred(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """The element types and the ranks of the values onnx's shape inference can tell (every graph,
    declared or inferred; an inconsistent graph: the declared ones only)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an inconsistent graph: the declared types only
        inferred = model
    types: dict[str, int] = {}
    ranks: dict[str, int] = {}
    for g in _graphs(inferred.graph):
        for v in (*g.input, *g.output, *g.value_info):
            if v.type.HasField("tensor_type"):
                if v.type.tensor_type.elem_type:
                    types[v.name] = v.type.tensor_type.elem_type
                if v.type.tensor_type.HasField("shape"):
                    ranks[v.name] = len(v.type.tensor_type.shape.dim)
        types.update({t.name: t.data_type for t in g.initializer})
        ranks.update({t.name: len(t.dims) for t in g.initializer})
    return types, ranks


def standardize(
    model: onnx.ModelProto, where: str = "model", *, in_place: bool = False, record: DetachedInputs | None = None
) -> onnx.ModelProto:
    """:func:`inline_functions`, :func:`unfuse_contrib_layers`, :func:`split_attention_projections`,
    :func:`replace_image_scaler`, :func:`reshape_open_squeezes`, then :func:`detach_initializer_inputs`
    (``in_place``: change ``model`` rather than copy its weights; inlining still makes a new model;
    ``record``: see :func:`detach_initializer_inputs`)."""
    m = unfuse_contrib_layers(inline_functions(model, where), in_place=in_place)
    m = split_attention_projections(m, in_place=in_place, record=record)
    m = reshape_open_squeezes(replace_image_scaler(m, in_place=in_place), in_place=in_place)
    return detach_initializer_inputs(m, in_place=in_place, record=record)
