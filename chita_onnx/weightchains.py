"""Weights that reach their layer through value-preserving ops on constants.

A Conv/Gemm/MatMul (or LSTM/GRU/RNN) weight slot is often fed not by the stored tensor itself but by
a short chain of ops that only re-lay or re-type it: a ``Transpose`` (a weight stored ``[out, in]``
and read by a MatMul, or one tensor shared by tied layers), a ``Cast`` (float16 storage computed in
float32), ``Reshape``/``Flatten``/``Squeeze``/``Unsqueeze`` with constant shapes, ``Identity``.
Such weights used to be invisible to :func:`~chita_onnx.graph.find_prunable`: a model with them
was pruned to the requested sparsity over the *other* tensors and the chained ones silently stayed
dense (or, with every weight behind a Cast, refused as having no prunable weights).

:func:`fold_weight_chains` folds every such chain into one initializer that the weight slots read
directly (named after the stored tensor, so reports name what the file holds), and records the
chain; :func:`unfold_weight_chains` puts the chain back into a written model, with the stored
tensor re-derived from the folded one by the inverse ops (inverse permutation, reshape to the
stored shape, cast back to the stored type), so the output keeps the input's layout and dtypes.
A chain is folded only when the stored tensor feeds nothing but the chain, every op of the chain
feeds only the next, and its output feeds only weight slots; anything else is left as it is.
Pure re-layout and re-typing: no arithmetic (a float16 round trip of a pruned zero stays zero).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from .graph import _constant_values, _to_sparse, _weight_slots, subgraphs, walk_graphs

log = logging.getLogger(__name__)

#: Ops a chain may consist of (each has one data input; other inputs must be constants).
CHAIN_OPS = frozenset({"Identity", "Transpose", "Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze"})
#: Types a chained Cast may convert between (numpy has no bfloat16).
_CASTABLE = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


@dataclass(frozen=True)
class WeightChain:
    """One folded chain: the stored tensor ``source`` (dtype ``source_type``, shape
    ``source_shape``), the chain's ``nodes`` in order, and ``result``, the name its output had."""

    source: str
    source_type: int
    source_shape: tuple[int, ...]
    nodes: tuple[onnx.NodeProto, ...]
    result: str
    #: the shape of each node's data input, in chain order (for the inverse reshapes)
    in_shapes: tuple[tuple[int, ...], ...]


def _int(node: onnx.NodeProto, name: str, default: int) -> int:
    for a in node.attribute:
        if a.name == name:
            return int(a.i)
    return default


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    for a in node.attribute:
        if a.name == name:
            return [int(v) for v in a.ints]
    return None


def _step(
    node: onnx.NodeProto, x: NDArray[np.generic], consts: dict[str, NDArray[np.generic]]
) -> NDArray[np.generic] | None:
    """``node`` applied to ``x``, or None when it is not a pure re-layout/re-type with constant
    arguments."""
    op = node.op_type
    extra = [consts.get(i) for i in node.input[1:] if i]
    if any(e is None for e in extra):
        return None
    if op == "Identity":
        return x
    if op == "Transpose":
        return np.transpose(x, _ints(node, "perm"))
    if op == "Cast":
        to = _int(node, "to", 0)
        if to not in _CASTABLE or x.dtype not in (np.float16, np.float32, np.float64):
            return None
        return x.astype(helper.tensor_dtype_to_np_dtype(to))
    if op == "Reshape":
        if not extra:
            return None
        shape = [int(v) for v in np.asarray(extra[0]).reshape(-1)]
        if not _int(node, "allowzero", 0):
            shape = [x.shape[i] if v == 0 and i < x.ndim else v for i, v in enumerate(shape)]
        try:
            return x.reshape(shape)
        except ValueError:
            return None
    if op == "Flatten":
        axis = _int(node, "axis", 1)
        axis = axis + x.ndim if axis < 0 else axis
        return x.reshape(int(np.prod(x.shape[:axis])), -1)
    if op in ("Squeeze", "Unsqueeze"):
        axes = _ints(node, "axes")
        if axes is None and extra:
            axes = [int(v) for v in np.asarray(extra[0]).reshape(-1)]
        if op == "Squeeze":
            return np.squeeze(x) if axes is None else np.squeeze(x, axis=tuple(axes))
        if axes is None:
            return None
        out_rank = x.ndim + len(axes)
        return np.expand_dims(x, tuple(a + out_rank if a < 0 else a for a in axes))
    return None


def _inverse(chain: WeightChain, value: NDArray[np.floating]) -> NDArray[np.floating]:
    """The stored tensor whose chain gives ``value``."""
    for node, shape in zip(reversed(chain.nodes), reversed(chain.in_shapes), strict=True):
        if node.op_type == "Transpose":
            perm = _ints(node, "perm") or list(range(value.ndim))[::-1]
            value = np.transpose(value, np.argsort(perm))
        value = value.reshape(shape)
    return np.ascontiguousarray(value, dtype=helper.tensor_dtype_to_np_dtype(chain.source_type))


def fold_weight_chains(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[WeightChain, ...]]:
    """A copy of ``model`` in which every foldable weight chain of the main graph is one initializer
    named after its stored tensor, read directly by the weight slots; and the chains folded.

    Returns ``model`` itself (not a copy) and ``()`` when there is nothing to fold.
    """
    g = model.graph
    graph_inputs = {i.name for i in g.input}
    inits = {t.name: t for t in g.initializer if t.name not in graph_inputs}
    const_nodes = _constant_values(g)
    stored = set(inits) | set(const_nodes)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in g.node:
        for i, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((node, i))
    outputs = {o.name for o in g.output}
    small: dict[str, NDArray[np.generic]] = {}  # constant shape/axes arguments (int64)
    for name in stored:
        t = inits[name] if name in inits else const_nodes[name][1]
        if t.data_type == TensorProto.INT64 and int(np.prod(t.dims)) <= 16:
            small[name] = numpy_helper.to_array(t)

    found: list[tuple[WeightChain, NDArray[np.generic]]] = []
    for source in sorted(stored):
        uses = consumers.get(source, [])
        if len(uses) != 1 or source in outputs:
            continue
        node, slot = uses[0]
        if node.op_type not in CHAIN_OPS or node.domain not in ("", "ai.onnx") or slot != 0:
            continue
        tensor = inits[source] if source in inits else const_nodes[source][1]
        if tensor.data_type not in _CASTABLE or len(tensor.dims) < 1:
            continue
        value: NDArray[np.generic] | None = numpy_helper.to_array(tensor)
        nodes: list[onnx.NodeProto] = []
        shapes: list[tuple[int, ...]] = []
        while True:
            assert value is not None
            nxt = _step(node, value, small)
            if nxt is None:
                break
            nodes.append(node)
            shapes.append(tuple(value.shape))
            value = nxt
            readers = consumers.get(node.output[0], [])
            if node.output[0] in outputs or len(readers) != 1:
                break
            cand, cslot = readers[0]
            if cand.op_type not in CHAIN_OPS or cand.domain not in ("", "ai.onnx") or cslot != 0:
                break
            node = cand
        if not nodes or value is None:
            continue
        result = nodes[-1].output[0]
        readers = consumers.get(result, [])
        if (
            result in outputs
            or not readers
            or value.dtype not in (np.float16, np.float32, np.float64)
            or value.ndim < 2
        ):
            continue
        if not all(i in _weight_slots(n, stored | {result}) for n, i in readers):
            continue
        chain = WeightChain(
            source, tensor.data_type, tuple(int(d) for d in tensor.dims), tuple(nodes), result, tuple(shapes)
        )
        found.append((chain, value))
    if not found:
        return model, ()

    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    drop_nodes = {n.output[0] for c, _ in found for n in c.nodes}
    drop_nodes |= {c.source for c, _ in found if c.source in const_nodes}
    renamed = {c.result: c.source for c, _ in found}
    keep = [n for n in g.node if not (n.output and n.output[0] in drop_nodes)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in renamed:
                n.input[i] = renamed[name]
    del g.node[:]
    g.node.extend(keep)
    sources = {c.source for c, _ in found}
    kept_inits = [t for t in g.initializer if t.name not in sources]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    g.initializer.extend(numpy_helper.from_array(np.require(v, requirements="C"), c.source) for c, v in found)
    # shape annotations of the stored tensors and of the chains' values no longer hold (a transposed
    # tensor now carries the stored name): dropped, so strict shape inference sees no conflict
    stale = sources | drop_nodes
    kept_vi = [vi for vi in g.value_info if vi.name not in stale]
    del g.value_info[:]
    g.value_info.extend(kept_vi)
    return out, tuple(c for c, _ in found)


#: Ops that read only the type or shape of an input: ``{op: input slot}``.
_METADATA_READS = {"Shape": 0, "Size": 0, "CastLike": 1}


def detach_metadata_reads(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which ``Shape``/``Size`` of a constant tensor of the main graph are
    replaced by their int64 values and ``CastLike(x, constant)`` by ``Cast(x, to=its type)``.

    These ops read a tensor's shape or type, never its values, but they made a weight look shared
    with a non-layer op, so it was not prunable: torch's dynamo exporter without its optimizer
    (``optimize=False``) builds each bias-less Conv's zero bias from ``Shape(weight)``, which left every
    such Conv weight dense.  The rewrite is exact for any values of the tensor.  Returns ``model``
    itself when nothing matches.
    """
    g = model.graph
    graph_inputs = {i.name for i in g.input}
    stored: dict[str, TensorProto] = {t.name: t for t in g.initializer if t.name not in graph_inputs}
    stored.update({k: t for k, (_, t) in _constant_values(g).items()})
    hits = [
        k
        for k, n in enumerate(g.node)
        if n.op_type in _METADATA_READS
        and n.domain in ("", "ai.onnx")
        and len(n.input) > _METADATA_READS[n.op_type]
        and n.input[_METADATA_READS[n.op_type]] in stored
    ]
    if not hits:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = list(out.graph.node)
    for k in hits:
        n = nodes[k]
        t = stored[n.input[_METADATA_READS[n.op_type]]]
        dims = [int(d) for d in t.dims]
        if n.op_type == "CastLike":
            nodes[k] = helper.make_node("Cast", [n.input[0]], list(n.output), name=n.name, to=t.data_type)
            continue
        if n.op_type == "Size":
            value = np.array(int(np.prod(dims)), dtype=np.int64)
        else:
            rank = len(dims)
            start, end = _int(n, "start", 0), _int(n, "end", rank)
            start, end = (max(0, min(rank, v + rank if v < 0 else v)) for v in (start, end))
            value = np.array(dims[start:end], dtype=np.int64)
        nodes[k] = helper.make_node("Constant", [], list(n.output), name=n.name, value=numpy_helper.from_array(value))
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


#: Ops a computed weight is never folded through (random values, subgraphs).
_NO_FOLD = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
    | {"If", "Loop", "Scan", "SequenceMap"}
)
#: At most this many nodes are folded into one weight (a weight is a few Slices and Concats).
MAX_FOLD_NODES = 256


#: Element-wise ops whose constant operands channel pruning slices as per-channel parameters.
_PARAM_OPS = frozenset({"PRelu", "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "Where"})


#: Ops that only move values of their data input(s) (no arithmetic): the ops a group of computed
#: weights sharing a stored tensor may consist of (:func:`_disjoint_pieces`).
_MOVE_OPS = CHAIN_OPS | {"Split", "Slice", "Concat", "Gather", "Expand"}


def _sharing_groups(
    wanted: list[str], computation: dict[str, tuple[set[int], set[str]]], g: onnx.GraphProto, floats: set[str]
) -> list[list[str]]:
    """``wanted`` split into groups whose computations share a node (other than a ``Constant``) or a
    stored float tensor: a weight ``Split`` (or ``Slice``d) into the pieces that several layers read."""
    groups: list[tuple[list[str], set[int], set[str]]] = []
    for v in wanted:
        nodes = {k for k in computation[v][0] if g.node[k].op_type != "Constant"}
        leaves = computation[v][1] & floats
        touching = [grp for grp in groups if grp[1] & nodes or grp[2] & leaves]
        merged = ([v], nodes, leaves)
        for grp in touching:
            groups.remove(grp)
            merged = (grp[0] + merged[0], grp[1] | merged[1], grp[2] | merged[2])
        groups.append(merged)
    return [sorted(grp[0], key=wanted.index) for grp in groups]


def _carrying(g: onnx.GraphProto, nodes: set[int], leaves: set[str]) -> tuple[set[str], set[int]]:
    """The values among ``nodes``' outputs that carry elements of the tensors ``leaves`` (not shape or
    index arithmetic), with ``leaves`` themselves, and the nodes that make them."""
    values, makers = set(leaves), set()
    for k in sorted(nodes):  # node order is topological
        n = g.node[k]
        if any(i in values for i in n.input):
            values.update(o for o in n.output if o)
            makers.add(k)
    return values, makers


def _disjoint_pieces(
    group: list[str],
    mine: set[int],
    leaves: set[str],
    g: onnx.GraphProto,
    model: onnx.ModelProto,
    static: dict[str, NDArray[np.int64]] | None = None,
) -> bool:
    """Whether the values of ``group``, computed by the nodes ``mine`` from the stored float tensors
    ``leaves``, are disjoint pieces of them: only value-moving ops (:data:`_MOVE_OPS`) on the leaves'
    elements (their slice bounds may be computed), and with each leaf replaced by the indices of its
    elements, no index reaches two places."""
    if any(g.node[k].op_type not in _MOVE_OPS for k in _carrying(g, mine, leaves)[1]):
        return False
    graph_inputs = {i.name for i in g.input}
    consts = {t.name: t for t in g.initializer if t.name not in graph_inputs}
    offset = 0
    probes: list[TensorProto] = []
    for name in sorted(leaves):
        if name not in consts:  # a Constant node's float value: not probed
            return False
        shape = tuple(int(d) for d in consts[name].dims)
        size = int(np.prod(shape, dtype=np.int64))
        probes.append(numpy_helper.from_array(np.arange(offset, offset + size, dtype=np.float64).reshape(shape), name))
        offset += size
    if not probes or offset >= 2**53:
        return False
    used = {i for k in mine for i in g.node[k].input if i}
    inits = [t for t in g.initializer if t.name in used and t.name not in leaves and t.name not in graph_inputs]
    inits += [numpy_helper.from_array(v, k) for k, v in (static or {}).items() if k in used]
    nodes = []
    for k in sorted(mine):
        n = onnx.NodeProto()
        n.CopyFrom(g.node[k])
        if n.op_type == "Cast":  # the probe is float64 throughout
            del n.attribute[:]
            n.attribute.extend([helper.make_attribute("to", TensorProto.DOUBLE)])
        nodes.append(n)
    sub = helper.make_graph(nodes, "probe", [], [helper.make_empty_tensor_value_info(v) for v in group], inits + probes)
    try:
        from onnx.reference import ReferenceEvaluator

        values = ReferenceEvaluator(helper.make_model(sub, opset_imports=list(model.opset_import))).run(None, {})
    except Exception as exc:  # an op the reference runtime lacks: not shown to be pieces
        log.debug("pieces %s not probed: %s", group, exc)
        return False
    index = np.concatenate([np.asarray(x, dtype=np.float64).reshape(-1) for x in values])
    return bool(np.all(index == np.round(index)) and np.unique(index).size == index.size)


def _computable(g: onnx.GraphProto, known: set[str], *, shapes: bool = False) -> set[str]:
    """The values of ``g`` computed from ``known`` alone by default-domain ops without subgraphs or
    randomness; with ``shapes``, ``Shape``/``Size`` of any tensor count as known too."""
    out = set(known)
    for n in g.node:  # topological order
        if n.domain not in ("", "ai.onnx") or n.op_type in _NO_FOLD or n.op_type == "Constant" or _has_graph(n):
            continue
        if (shapes and n.op_type in ("Shape", "Size")) or (
            any(i for i in n.input) and all(i in out for i in n.input if i)
        ):
            out.update(o for o in n.output if o)
    return out


def _static_shape_values(model: onnx.ModelProto, stored: set[str]) -> tuple[dict[str, NDArray[np.int64]], set[int]]:
    """int64 values that the model's static axes fix although the tensors they come from do not:
    ``Shape(x)`` where shape inference gives every selected axis of ``x`` a size, and a ``Gather``
    or ``Slice`` (constant arguments) of ``Shape(x)`` whose selected axes all have one (TorchScript's
    ``nn.MultiheadAttention`` slices its packed weight at bounds from the embedding axis of a
    batch-dynamic input).  Returns the values by name and the indices of the nodes that make them
    (the ``Shape`` nodes included: dropped after the fold if nothing else reads them).  ONNX shapes
    are a model's contract (onnxruntime refuses an input whose fixed axis differs)."""
    g = model.graph
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as exc:  # too large for in-memory inference, or an op it rejects
        log.debug("no static shape values: %s", exc)
        return {}, set()
    dims: dict[str, list[int | None]] = {}
    for vi in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tt = vi.type.tensor_type
        if vi.type.HasField("tensor_type") and tt.HasField("shape"):
            dims[vi.name] = [int(d.dim_value) if d.HasField("dim_value") else None for d in tt.shape.dim]
    consts: dict[str, NDArray[np.generic]] = {}
    for t in g.initializer:
        if t.name in stored and t.data_type == TensorProto.INT64 and int(np.prod(t.dims)) <= 16:
            consts[t.name] = numpy_helper.to_array(t)
    for name, (_, t) in _constant_values(g).items():
        if t.data_type == TensorProto.INT64 and int(np.prod(t.dims)) <= 16:
            consts[name] = numpy_helper.to_array(t)
    partial: dict[str, list[int | None]] = {}
    values: dict[str, NDArray[np.int64]] = {}
    nodes: set[int] = set()
    for k, n in enumerate(g.node):
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type == "Shape" and n.input and n.input[0] in dims:
            d = dims[n.input[0]]
            start, end = _int(n, "start", 0), _int(n, "end", len(d))
            sel = d[start:end]  # ONNX's start/end: negative from the back, clamped, as Python slices
            if all(x is not None for x in sel):
                values[n.output[0]] = np.asarray(sel, dtype=np.int64)
                nodes.add(k)
            else:
                partial[n.output[0]] = sel
                nodes.add(k)  # dropped only if nothing reads it after the fold
        elif n.op_type in ("Gather", "Slice") and n.input and n.input[0] in partial:
            src = np.array(partial[n.input[0]], dtype=object)
            found = [consts.get(i) for i in n.input[1:]]
            args = [a for a in found if a is not None and np.issubdtype(a.dtype, np.integer)]
            if len(args) != len(found):
                continue
            try:
                if n.op_type == "Gather" and len(args) == 1 and _int(n, "axis", 0) == 0:
                    got = src[np.asarray(args[0], dtype=np.int64)]
                elif n.op_type == "Slice" and len(args) >= 2 and all(np.size(a) == 1 for a in args):
                    b, e = int(np.ravel(args[0])[0]), int(np.ravel(args[1])[0])
                    axis = int(np.ravel(args[2])[0]) if len(args) > 2 else 0
                    step = int(np.ravel(args[3])[0]) if len(args) > 3 else 1
                    if axis not in (0, -1) or step == 0:
                        continue
                    got = src[slice(b, e, step)]
                else:
                    continue
            except IndexError:
                continue
            if any(x is None for x in np.ravel(got)):
                if np.ndim(got) == 1:
                    partial[n.output[0]] = list(got)
                continue
            values[n.output[0]] = np.asarray(got, dtype=np.int64)
            nodes.add(k)
    return values, nodes


def fold_computed_weights(model: onnx.ModelProto, *, params: bool = False) -> onnx.ModelProto:
    """A copy of ``model`` in which every weight slot fed by a value computed from constants alone
    (in the main graph, by default-domain ops) reads an initializer holding that value instead; the
    nodes and stored tensors that only served it are dropped.  With ``params``, so does every
    operand of an element-wise op (PRelu, Add, Mul, ...) that is such a value with more than one
    element: channel pruning slices those as per-channel parameters, which it can only do to a
    stored tensor (TorchScript writes a ``PReLU(C)`` slope as ``Unsqueeze(weight, [1, 2])``).

    torch's dynamo exporter writes an LSTM's ``W``/``R`` as ``Concat``s of ``Slice``s of the PyTorch
    weights (the gate order differs), which its optimizer leaves unfolded: the LSTM's weights were
    not prunable.  The folded tensor holds the same number of values as the slices it replaces, so
    the written model is no larger.  Values are computed with ``onnx.reference``; a subgraph it cannot
    run is left alone.  Returns ``model`` itself when nothing matches.
    """
    g = model.graph
    graph_inputs = {i.name for i in g.input}
    stored = {t.name for t in g.initializer if t.name not in graph_inputs} | set(_constant_values(g))
    producer = {o: k for k, n in enumerate(g.node) for o in n.output if o}
    static: dict[str, NDArray[np.int64]] = {}  # int64 values from tensors' static axes (see below)
    static_nodes: set[int] = set()
    computable = _computable(g, stored)
    slot_values = {n.input[i] for n in g.node for i in _layer_slots(n) if i < len(n.input) and n.input[i]}
    near = {v for v in slot_values - computable - stored if v in _computable(g, stored, shapes=True)}
    if near:  # a weight whose computation reads a tensor's shape: its static axes may settle it
        static, static_nodes = _static_shape_values(model, stored)
        if static:
            computable = _computable(g, stored | set(static))
    outputs = {o.name for o in g.output}
    wanted: list[str] = []
    operands: set[str] = set()  # wanted as element-wise operands (params), not as layer weights
    for n in g.node:
        slots = {"Conv": [1], "Gemm": [1], "LSTM": [1, 2], "GRU": [1, 2], "RNN": [1, 2]}.get(n.op_type, [])
        if n.op_type == "MatMul" and len(n.input) == 2:
            c = [i for i in (0, 1) if n.input[i] in computable]
            slots = c if len(c) == 1 else []
        if params and n.op_type in _PARAM_OPS and n.domain in ("", "ai.onnx"):
            fresh = [i for i, x in enumerate(n.input) if x and x in computable and x not in stored and x not in wanted]
            operands.update(n.input[i] for i in fresh)
            slots = slots + fresh
        for i in slots:
            v = n.input[i] if i < len(n.input) else ""
            if v and v in computable and v not in stored and v not in outputs and v not in wanted:
                wanted.append(v)
    if not wanted:
        return model
    float_stored = {t.name for t in g.initializer if t.data_type in _CASTABLE} | {
        k for k, (_, t) in _constant_values(g).items() if t.data_type in _CASTABLE
    }
    readers: dict[str, set[int]] = {}
    for k, n in enumerate(g.node):
        for i in n.input:
            readers.setdefault(i, set()).add(k)
    computation: dict[str, tuple[set[int], set[str]]] = {}  # wanted value: (its nodes, its stored leaves)
    for v in wanted:
        mine: set[int] = set()
        leaves: set[str] = set()
        stack = [v]
        while stack:
            name = stack.pop()
            at = producer.get(name)
            if name in static:  # known from the shapes: given to the evaluation as a constant
                continue
            if name in stored:
                leaves.add(name)
                if at is not None:  # a Constant node: dropped with the rest when nothing else reads it
                    mine.add(at)
                continue
            if at is None or at in mine:
                continue
            mine.add(at)
            stack.extend(i for i in g.node[at].input if i)
        computation[v] = (mine, leaves)

    def outside(group: list[str]) -> tuple[set[int], bool]:
        """The nodes of ``group``'s computation, and whether a float tensor it reads or an inner value
        it makes is also read elsewhere (then folding would store it twice)."""
        mine = set().union(*(computation[v][0] for v in group))
        leaves = set().union(*(computation[v][1] for v in group)) & float_stored
        carried = _carrying(g, mine, leaves)[0] - set(group)  # the leaves and what carries their elements
        return mine, any(readers.get(x, set()) - mine for x in carried)

    # a float tensor also read outside a value's computation (a weight shared with another layer, as
    # is or transposed) would be stored twice and its copies pruned apart: left alone, unless the
    # values that share it are disjoint pieces of it (a weight Split for several layers), folded together
    needed: set[int] = set()
    accepted: set[str] = set()
    shared_values: list[str] = []
    for v in wanted:
        mine, shared = outside([v])
        if shared:
            shared_values.append(v)
        elif len(mine) <= MAX_FOLD_NODES:
            needed |= mine
            accepted.add(v)
    for group in _sharing_groups(shared_values, computation, g, float_stored):
        mine, shared = outside(group)
        leaves = set().union(*(computation[v][1] for v in group)) & float_stored
        if (
            len(group) > 1
            and not shared
            and len(mine) <= MAX_FOLD_NODES
            and _disjoint_pieces(group, mine, leaves, g, model, static)
        ):
            needed |= mine
            accepted.update(group)
    wanted = [v for v in wanted if v in accepted]
    if not wanted:
        return model
    order = sorted(needed)
    used = {i for k in order for i in g.node[k].input if i}
    inits = [t for t in g.initializer if t.name in used and t.name not in graph_inputs]
    inits += [numpy_helper.from_array(v, k) for k, v in static.items() if k in used]
    sub = helper.make_graph(
        [g.node[k] for k in order], "fold", [], [helper.make_empty_tensor_value_info(v) for v in wanted], inits
    )
    try:
        from onnx.reference import ReferenceEvaluator

        sub_model = helper.make_model(sub, opset_imports=list(model.opset_import))
        values = ReferenceEvaluator(sub_model).run(None, {})
    except Exception as exc:  # an op the reference runtime lacks: leave the model as it is
        log.debug("computed weights %s not folded: %s", wanted, exc)
        return model
    folded = {
        v: np.asarray(x)
        for v, x in zip(wanted, values, strict=True)
        if np.asarray(x).dtype in (np.float16, np.float32, np.float64)
        and (np.asarray(x).ndim >= 2 or (v in operands and np.asarray(x).size > 1))
    }
    if not folded:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    nodes = [n for n in g.node if not any(o in folded for o in n.output)]
    # drop what only served the folded values: nodes whose outputs nobody reads, then stored tensors
    while True:
        read = {i for n in nodes for i in n.input if i} | outputs
        dead = [n for n in nodes if all(o not in read for o in n.output if o) and any(n.output)]
        dead = [n for n in dead if producer.get(n.output[0]) in needed | static_nodes]
        if not dead:
            break
        ids = {id(n) for n in dead}
        nodes = [n for n in nodes if id(n) not in ids]
    read = {i for n in nodes for i in n.input if i} | outputs
    kept = [t for t in g.initializer if t.name in read or t.name not in used]
    del g.node[:]
    g.node.extend(nodes)
    del g.initializer[:]
    made = [numpy_helper.from_array(np.require(x, requirements="C"), v) for v, x in folded.items()]
    g.initializer.extend(kept + made)
    log.info("folded %d computed weight(s) into initializers: %s", len(folded), ", ".join(folded))
    return out


def _linear_einsum(eq: str, weight_first: bool) -> tuple[tuple[int, ...], int, int] | None:
    """For an ``Einsum`` equation of an activation and a stored weight that is a linear layer
    (contract the activation's last axes with weight axes, put the other weight axes last in the
    output, in any order): ``(perm, n_in, n_lead)``, the weight axes in the order (contracted axes as
    the activation has them, kept axes as the output has them), how many are contracted, and how many
    activation axes come before them (without an ellipsis); None otherwise.  ``"bi,io->bo"`` gives
    ``((0, 1), 1, 1)``, a multi-head projection ``"btd,dhe->bthe"`` ``((0, 1, 2), 1, 2)``."""
    eq = eq.replace(" ", "")
    if eq.count("->") != 1:
        return None
    lhs, out = eq.split("->")
    terms = lhs.split(",")
    if len(terms) != 2:
        return None
    tw, tx = (terms[0], terms[1]) if weight_first else (terms[1], terms[0])
    ell = tx.startswith("...")
    if ell != out.startswith("...") or "." in tw or "." in tx.removeprefix("...") or "." in out.removeprefix("..."):
        return None
    tx, out = tx.removeprefix("..."), out.removeprefix("...")
    if len(tw) < 2 or len(set(tw)) != len(tw) or not tx or len(set(tx)) != len(tx):
        return None
    shared = "".join(c for c in tx if c in tw)
    lead = tx[: len(tx) - len(shared)]
    kept = out[len(lead) :]
    if not shared or not tx.endswith(shared) or not out.startswith(lead) or len(set(out)) != len(out):
        return None
    if sorted(kept) != sorted(set(tw) - set(shared)) or not kept:
        return None
    if ell and len(tw) > 2:  # the reshapes around the MatMul need the activation's rank
        return None
    return tuple(tw.index(c) for c in shared + kept), len(shared), len(lead)


def einsums_as_matmuls(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` in which every ``Einsum`` of an activation and a stored float tensor that
    is a linear layer (``"bi,io->bo"``, ``"...i,oi->...o"``, either operand order; a multi-head
    projection ``"btd,dhe->bthe"`` or its inverse ``"bthe,hed->btd"``) is a ``MatMul``, its weight
    behind a ``Transpose`` when its axes are not in (contracted, kept) order and a ``Reshape`` to 2-D
    when it has more than two (which :func:`fold_weight_chains` then folds), with ``Reshape`` of the
    activation (several contracted axes) and of the output (several kept axes).  Exporters write
    dense layers as such Einsums (tf2onnx's ``EinsumDense``, torch.einsum), and an Einsum is not a
    prunable slot (nor has onnxruntime-training a gradient for it), so their weights were left
    dense.  Exact.  Returns ``model`` itself when nothing matches."""
    g = model.graph
    graph_inputs = {i.name for i in g.input}
    stored = {t.name: t for t in g.initializer if t.name not in graph_inputs}
    stored.update({k: t for k, (_, t) in _constant_values(g).items()})
    names = {o for n in g.node for o in n.output} | set(stored) | graph_inputs

    def fresh(name: str) -> str:
        while name in names:
            name += "_"
        names.add(name)
        return name

    def shape_const(label: str, values: list[int]) -> str:
        name = fresh(f"{label}_shape")
        value = numpy_helper.from_array(np.array(values, dtype=np.int64), name)
        new.append(helper.make_node("Constant", [], [name], value=value, name=name))
        return name

    new: list[onnx.NodeProto] = []
    changed = False
    for n in g.node:
        eq = next((a.s.decode() for a in n.attribute if a.name == "equation"), "")
        if n.op_type != "Einsum" or n.domain not in ("", "ai.onnx") or len(n.input) != 2:
            new.append(n)
            continue
        first = n.input[0] in stored and n.input[1] not in stored
        second = n.input[1] in stored and n.input[0] not in stored
        w = n.input[0] if first else n.input[1]
        t = stored.get(w)
        plan = _linear_einsum(eq, weight_first=first) if (first or second) else None
        if t is None or plan is None or len(t.dims) != len(plan[0]) or t.data_type not in _CASTABLE:
            new.append(n)
            continue
        perm, n_in, n_lead = plan
        dims = [int(d) for d in t.dims]
        kept = [dims[a] for a in perm[n_in:]]
        x = n.input[1] if first else n.input[0]
        label = n.name or f"einsum_{len(new)}"
        if perm != tuple(range(len(perm))):
            wt = fresh(f"{w}_t")
            new.append(helper.make_node("Transpose", [w], [wt], perm=list(perm), name=f"{label}_weight_t"))
            w = wt
        if len(perm) > 2:
            w2 = fresh(f"{w}_2d")
            size_in = int(np.prod([dims[a] for a in perm[:n_in]]))
            shape = shape_const(f"{label}_weight", [size_in, int(np.prod(kept))])
            new.append(helper.make_node("Reshape", [w, shape], [w2], name=f"{label}_weight_2d"))
            w = w2
        if n_in > 1:
            x2 = fresh(f"{label}_in")
            shape = shape_const(f"{label}_in", [0] * n_lead + [-1])
            new.append(helper.make_node("Reshape", [x, shape], [x2], name=f"{label}_in"))
            x = x2
        y = n.output[0] if len(kept) == 1 else fresh(f"{label}_mm")
        new.append(helper.make_node("MatMul", [x, w], [y], name=label))
        if len(kept) > 1:
            shape = shape_const(f"{label}_out", [0] * n_lead + kept)
            new.append(helper.make_node("Reshape", [y, shape], list(n.output), name=f"{label}_out"))
        changed = True
    if not changed:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    out.graph.node.extend(new)
    return out


def expose_weights(model: onnx.ModelProto) -> tuple[onnx.ModelProto, tuple[WeightChain, ...]]:
    """Every rewrite that lets :func:`~chita_onnx.graph.find_prunable` see the weights a layer reads
    through constant ops: :func:`einsums_as_matmuls`, :func:`detach_metadata_reads`,
    :func:`fold_weight_chains` (restored on writing by :func:`unfold_weight_chains`), then
    :func:`fold_computed_weights`."""
    model, chains = fold_weight_chains(detach_metadata_reads(einsums_as_matmuls(model)))
    return fold_computed_weights(model), chains


#: Input slots that hold a layer's weight, by op (whether or not chita-onnx can prune it there).
_LAYER_SLOTS = {
    "Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "Einsum": (0, 1),
    "LSTM": (1, 2), "GRU": (1, 2), "RNN": (1, 2),
}  # fmt: skip
#: The same for onnxruntime's own layers (``com.microsoft``) that stay after
#: :func:`~chita_onnx.standardize.unfuse_contrib_layers` (an activation with no standard op, an
#: attention block): never pruned, and named.
_CONTRIB_SLOTS = {
    "FusedConv": (1,), "FusedGemm": (0, 1), "FusedMatMul": (0, 1), "NhwcConv": (1,), "Attention": (1,),
    "GemmFastGelu": (1,),
}  # fmt: skip


def _layer_slots(node: onnx.NodeProto) -> tuple[int, ...]:
    if node.domain in ("", "ai.onnx"):
        return _LAYER_SLOTS.get(node.op_type, ())
    return _CONTRIB_SLOTS.get(node.op_type, ()) if node.domain == "com.microsoft" else ()


def _has_graph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _computed_reads(g: onnx.GraphProto, values: set[str], stored: set[str]) -> list[tuple[str, str]]:
    """``(stored tensor, "op via producer op")`` for the stored tensors that the layer-slot ``values``
    are computed from, where such a value depends on nothing but stored tensors and tensor shapes
    (``Shape``/``Size``): a weight a layer reads through ops that were not folded."""
    producer = {o: n for n in g.node for o in n.output if o}
    const_like = _computable(g, stored, shapes=True)
    slot_op: dict[str, str] = {}
    for n in g.node:
        slots = [i for i in _layer_slots(n) if i < len(n.input) and n.input[i]]
        for i in slots:
            others = [n.input[j] for j in slots if j != i]
            # of a MatMul/Gemm whose other operand is the stored weight, this one is the activation side
            # (a learned query broadcast over the batch, say): not a weight left dense
            if not (n.op_type in ("MatMul", "Gemm") and any(o in stored for o in others)):
                slot_op.setdefault(n.input[i], n.op_type)
    out: list[tuple[str, str]] = []
    for v in sorted(values & const_like & set(slot_op)):
        first = producer.get(v)
        stack, seen = [v], set[str]()
        while stack and len(seen) < MAX_FOLD_NODES:
            name = stack.pop()
            if name in seen:
                continue
            seen.add(name)
            if name in stored:
                out.append((name, f"{slot_op[v]} via {first.op_type if first else '?'}"))
                continue
            n = producer.get(name)
            if n is not None and n.op_type not in ("Shape", "Size"):
                stack.extend(i for i in n.input if i)
    return out


def unprunable_layer_weights(
    model: onnx.ModelProto, prunable: set[str], *, min_size: int = 16
) -> list[tuple[str, str, int]]:
    """``(tensor, op, size)`` of the stored float tensors of ≥ 2 dims and ``min_size`` values that
    a layer reads as its weight but that are not among ``prunable`` (a ``ConvTranspose`` weight, an
    Einsum that is not a linear layer, a weight also read by another op, one sliced into overlapping
    pieces or with bounds from a tensor's shape; :func:`_computed_reads`): they stay dense, which
    the report says instead of leaving it silent."""
    g = model.graph
    graph_inputs = {i.name for i in g.input}
    stored = {t.name: t for t in g.initializer if t.name not in graph_inputs}
    stored.update({k: t for k, (_, t) in _constant_values(g).items()})
    reads = [(n.input[i] if i < len(n.input) else "", n.op_type) for n in g.node for i in _layer_slots(n)]
    reads += _computed_reads(g, {name for name, _ in reads if name and name not in stored}, set(stored))
    out: dict[str, tuple[str, str, int]] = {}
    looped = [(name, op, t) for name, (op, t) in _loop_layer_reads(g).items()]
    for name, op, t in [*((name, op, None) for name, op in reads), *looped]:
        t = t if t is not None else stored.get(name)
        if t is None or name in prunable or name in out or t.data_type not in _CASTABLE | {TensorProto.BFLOAT16}:
            continue
        size = int(np.prod(t.dims)) if t.dims else 1
        if len(t.dims) >= 2 and size >= min_size:
            out[name] = (name, op, size)
    return list(out.values())


def embedding_tables(model: onnx.ModelProto, prunable: set[str], *, min_size: int = 1024) -> list[tuple[str, int]]:
    """``(tensor, size)`` of the stored float tables of ≥ 2 dims and ``min_size`` values that a
    ``Gather`` reads as its data (token or position embeddings), in the main graph or, from the outer
    scope, in a Loop or Scan body (torch's TorchScript export of ``nn.EmbeddingBag`` loops over the
    bags): no layer reads them, so they stay dense and outside the sparsity budget, which the report
    says."""
    from .gradients.subgraphs import defined_names

    g = model.graph
    graph_inputs = {i.name for i in g.input}
    stored = {t.name: t for t in g.initializer if t.name not in graph_inputs}
    stored.update({k: t for k, (_, t) in _constant_values(g).items()})
    out: dict[str, tuple[str, int]] = {}
    gathers: list[onnx.NodeProto] = []
    for path, sub in walk_graphs(g):
        local = defined_names(sub) if path else set()  # a body's own names shadow the main graph's
        gathers += [n for n in sub.node if n.op_type == "Gather" and n.input and n.input[0] not in local]
    for n in gathers:
        if n.input[0] in prunable:
            continue
        t = stored.get(n.input[0])
        if t is None or t.data_type not in _CASTABLE | {TensorProto.BFLOAT16} or len(t.dims) < 2:
            continue
        size = int(np.prod(t.dims))
        if size >= min_size:
            out.setdefault(n.input[0], (n.input[0], size))
    return list(out.values())


def _loop_layer_reads(graph: onnx.GraphProto) -> dict[str, tuple[str, TensorProto | None]]:
    """``{tensor: ("MatMul in Loop <node>", stored)}`` for the tensors a layer inside a Loop or Scan
    body reads as its weight: from the outer scope, as a loop operand that the body passes on
    unchanged (tf2onnx carries a Keras GRU's kernels into its ``Loop`` as loop state: Loop operand
    ``i ≥ 2`` is body input ``i`` and body output ``i − 1``; a Scan state operand ``i`` is body
    input and output ``i``), or stored in the body itself (an initializer or ``Constant`` there, as
    tf2onnx writes a TFLite ``WHILE``'s kernels).  ``stored`` is the body's own tensor, or ``None``
    for a main-graph name.  A loop-carried value the body changes (a hidden state) is no weight."""
    out: dict[str, tuple[str, TensorProto | None]] = {}
    for n in graph.node:
        if n.op_type not in ("Loop", "Scan"):
            continue
        for _, body in subgraphs(n):
            produced = {x: nd for nd in body.node for x in nd.output}
            body_inputs = {v.name for v in body.input}
            shift = 0  # node input of body input i: i + shift
            if n.op_type == "Loop":
                carried = range(2, min(len(n.input), len(body.input)))
                passed = {i for i in carried if i - 1 < len(body.output) and _passes_on(body, produced, i, i - 1)}
            else:
                shift = 1 if len(n.input) == len(body.input) + 1 else 0  # Scan-8: sequence_lens comes first
                scans = next((a.i for a in n.attribute if a.name == "num_scan_inputs"), 0)
                states = range(0, max(0, min(len(n.input) - shift, len(body.input)) - scans))
                passed = {i for i in states if i < len(body.output) and _passes_on(body, produced, i, i)}
            alias = {body.input[i].name: n.input[i + shift] for i in passed}
            where = f"{n.op_type} {n.name or '<unnamed>'}"
            for _, sub in walk_graphs(body):
                local = {t.name: t for t in sub.initializer}
                local.update({k: t for k, (_, t) in _constant_values(sub).items()})
                for b in sub.node:
                    for i in _layer_slots(b):
                        name = b.input[i] if i < len(b.input) else ""
                        if not name:
                            continue
                        if name in local:
                            out.setdefault(name, (f"{b.op_type} in {where}", local[name]))
                        elif name in alias:
                            out.setdefault(alias[name], (f"{b.op_type} in {where}", None))
                        elif name not in body_inputs:
                            out.setdefault(name, (f"{b.op_type} in {where}", None))  # outer scope
    return out


def _passes_on(body: onnx.GraphProto, produced: dict[str, onnx.NodeProto], i: int, o: int) -> bool:
    """Whether body output ``o`` is body input ``i`` unchanged (directly or through ``Identity``);
    ``produced`` maps each body tensor to its node."""
    name = body.output[o].name
    while name in produced and produced[name].op_type == "Identity":
        name = produced[name].input[0]
    return bool(name == body.input[i].name)


def unfold_weight_chains(model: onnx.ModelProto, chains: tuple[WeightChain, ...]) -> onnx.ModelProto:
    """``model`` (written from a folded model) with every chain restored: the stored tensor in its
    own layout and dtype, re-derived from the folded tensor, and the chain's nodes before the first
    node that reads the chain's output.  Storage follows the folded tensor's (dense or sparse)."""
    if not chains:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    g = out.graph
    dense = {t.name: i for i, t in enumerate(g.initializer)}
    sparse = {s.values.name: i for i, s in enumerate(g.sparse_initializer)}
    from .graph import _dense_from_sparse

    new_sparse: list[onnx.SparseTensorProto] = []
    drop_dense: set[str] = set()
    drop_sparse: set[str] = set()
    new_dense: list[TensorProto] = []
    for c in chains:
        if c.source in dense:
            folded = numpy_helper.to_array(g.initializer[dense[c.source]])
            drop_dense.add(c.source)
            as_sparse = False
        elif c.source in sparse:
            folded = numpy_helper.to_array(_dense_from_sparse(g.sparse_initializer[sparse[c.source]]))
            drop_sparse.add(c.source)
            as_sparse = True
        else:
            continue
        stored = _inverse(c, folded)
        if as_sparse:
            new_sparse.append(_to_sparse(c.source, stored))
        else:
            new_dense.append(numpy_helper.from_array(stored, c.source))
    kept = [t for t in g.initializer if t.name not in drop_dense]
    del g.initializer[:]
    g.initializer.extend(kept + new_dense)
    kept_sp = [s for s in g.sparse_initializer if s.values.name not in drop_sparse]
    del g.sparse_initializer[:]
    g.sparse_initializer.extend(kept_sp + new_sparse)

    nodes = list(g.node)
    for c in chains:
        readers = [k for k, n in enumerate(nodes) if c.source in n.input]
        for k in readers:
            n = nodes[k]
            for i, name in enumerate(n.input):
                if name == c.source:
                    n.input[i] = c.result
        at = readers[0] if readers else len(nodes)
        chain_inputs = {i for n in c.nodes for i in n.input[1:] if i}
        moved = [n for n in nodes[at:] if n.op_type == "Constant" and n.output and n.output[0] in chain_inputs]
        ids = {id(n) for n in moved}
        nodes = nodes[:at] + moved + [_copy(n) for n in c.nodes] + [n for n in nodes[at:] if id(n) not in ids]
    del g.node[:]
    g.node.extend(nodes)
    return out


def _copy(node: onnx.NodeProto) -> onnx.NodeProto:
    n = onnx.NodeProto()
    n.CopyFrom(node)
    return n
