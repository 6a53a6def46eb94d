"""ONNX graph I/O and surgery: loading safely, finding prunable weights, writing the pruned model.

No math happens here beyond reshapes: the solvers get flat arrays through :mod:`chita_onnx.layout`
and hand flat arrays back.

Prunable weights are the floating-point tensors (initializers or ``Constant`` node values) that feed

* input 1 (``W``) of ``Conv``, grouped and depthwise included,
* input 1 (``B``) of ``Gemm``, with either ``transB``,
* a constant operand of ``MatMul``,

and nothing else.  A tensor that also feeds any other input (a bias slot, a ``Gather``, a ``Reshape``
shape, ...) is never pruned; a tensor shared by several prunable nodes counts once.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx.inliner
import onnx.version_converter
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from .batching import infer_batch_axes, is_batch_name
from .data_types import InputSpec
from .errors import ModelError, OutputError, first_line
from .paths import regular_file
from .validate import check_external_file, validate_graph, validate_header

if TYPE_CHECKING:
    from .standardize import DetachedInputs

log = logging.getLogger(__name__)

#: The metadata key under which a pruned model records what was done to it.
METADATA_KEY = "chita_onnx"

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
_PROTOBUF_LIMIT = 2**31 - 1
#: Leave room for the graph itself when deciding whether a model needs external data.
_EXTERNAL_THRESHOLD = int(1.8 * 2**30)


@dataclass(frozen=True)
class PrunableTensor:
    """A weight tensor the pruner may zero.

    ``op_type`` is the op of its first consumer; ``nodes`` names every consuming node (a shared weight
    lists several); ``source`` says whether it lives in an initializer or a ``Constant`` node.
    """

    name: str
    op_type: str
    nodes: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    source: str
    #: ``""`` for the main graph, else the subgraph holding the tensor (``"If_0/then_branch"``)
    scope: str = ""
    #: the layer (source module) of the first consumer, as the exporter recorded it
    #: (:func:`layer_name`); for reports, where a weight's own name may be generated (``val_12``)
    layer: str = ""

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


#: The metadata key under which torch's dynamo exporter records a node's module scopes
#: (``"['', 'blocks.0', 'blocks.0.qkv', 'linear_1']"``: the last entry is the op itself).
NAME_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def layer_name(node: onnx.NodeProto) -> str:
    """The layer a node belongs to, as its exporter recorded it: the innermost module of torch's
    dynamo scopes (``blocks.0.qkv``), else the node's name without its last ``/`` part (TorchScript's
    ``/blocks.0/qkv/MatMul`` → ``/blocks.0/qkv``, tf2onnx's ``model/dense/MatMul`` → ``model/dense``),
    else the node's name (``""`` without one)."""
    for prop in node.metadata_props:
        if prop.key == NAME_SCOPES_KEY:
            scopes = [p.strip().strip("'\"") for p in prop.value.strip().strip("[]").split(",")]
            named: list[str] = [str(p) for p in scopes if p]
            if len(named) >= 2:
                return named[-2]
            break
    head, sep, _ = node.name.rpartition("/")
    return head if sep and head.strip("/") else node.name


def kept_tensors(tensors: Iterable[PrunableTensor], keep: Iterable[str]) -> tuple[frozenset[str], list[str]]:
    """``--keep``: the names of the tensors it protects, and its entries that match nothing.  An entry
    matches a tensor by the tensor's name, its layer (:attr:`PrunableTensor.layer`, e.g. ``blocks.0.qkv``
    for a dynamo export whose weight is ``val_12``) or the name of a node that reads it."""
    tensors = list(tensors)
    kept: set[str] = set()
    unknown: list[str] = []
    for entry in keep:
        hit = [t.name for t in tensors if entry in (t.name, t.layer) or entry in t.nodes]
        if hit:
            kept.update(hit)
        else:
            unknown.append(entry)
    return frozenset(kept), unknown


# --------------------------------------------------------------------------------------------- load


def _check_external_location(tensor: TensorProto, base: Path, model_path: Path) -> None:
    """Refuse external-data paths that are absolute or escape the model's folder."""
    location = next((e.value for e in tensor.external_data if e.key == "location"), "")
    if not location or "\0" in location:
        raise ModelError(f"{model_path}: tensor {tensor.name!r} uses external data without a valid location")
    resolved = (base / location).resolve()
    if Path(location).is_absolute() or not resolved.is_relative_to(base.resolve()):
        raise ModelError(
            f"{model_path}: tensor {tensor.name!r} points to external data {location!r} outside the "
            "model's folder; refusing to read it"
        )
    if not resolved.exists():
        raise ModelError(f"{model_path}: external data file {location!r} of tensor {tensor.name!r} is missing")
    check_external_file(tensor, resolved, str(model_path))


def _all_tensors(graph: onnx.GraphProto) -> Iterable[TensorProto]:
    yield from graph.initializer
    for sp in graph.sparse_initializer:
        yield sp.values
        yield sp.indices
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_tensors(g)


def load_model(path: str | os.PathLike[str], *, record: DetachedInputs | None = None) -> onnx.ModelProto:
    """Load an ONNX model with its external data, refusing anything unsafe or malformed.

    Raises :class:`ModelError` for a missing or non-regular file, a file that is not ONNX,
    external-data paths that point outside the model's folder (models come from untrusted sources),
    and anything :func:`~chita_onnx.validate.validate_header` or
    :func:`~chita_onnx.validate.validate_graph` refuses — before external data is read or a sparse
    tensor densified.  Every command loads through here, so every command validates alike; and
    every command sees the model in the form :func:`~chita_onnx.standardize.standardize` gives
    (``record`` receives the graph inputs it detaches, for the writer to put back).
    """
    from .standardize import decompose_early_layer_norms, inline_functions, standardize  # (uses our helpers)

    p = Path(path)
    regular_file(p, error=ModelError)  # missing, a folder, a FIFO or a device: refused without opening it
    try:
        model = onnx.load(str(p), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError, onnx raises various
        raise ModelError(f"{p}: not a valid ONNX model ({type(exc).__name__}: {first_line(exc)})") from None
    if not model.HasField("graph") or not model.opset_import:
        raise ModelError(f"{p}: not a valid ONNX model (no graph or no opset_import)")
    validate_header(model, p)
    base = p.parent
    external = [t for t in _all_tensors(model.graph) if t.data_location == TensorProto.EXTERNAL]
    for t in external:
        _check_external_location(t, base, p)
    model = decompose_early_layer_norms(model, in_place=True)  # before onnx.checker, which refuses them
    validate_graph(model, p)
    # before the external data is read: onnx's inliner serializes the model (2 GB protobuf limit)
    model = inline_functions(model, str(p))
    if external:
        try:
            onnx.external_data_helper.load_external_data_for_model(model, str(base))
        except Exception as exc:
            raise ModelError(f"{p}: cannot read external data ({first_line(exc)})") from None
    if len(model.graph.sparse_initializer):
        # e.g. a model pruned before: every layer works on dense initializers, the writer re-sparsifies
        model = densify(model)
    return standardize(model, str(p), in_place=True, record=record)  # the loaded copy is ours


def opset_version(model: onnx.ModelProto) -> int:
    """The version of the default (``ai.onnx``) opset."""
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx"):
            return int(op.version)
    return 0


# ------------------------------------------------------------------------------------ prunable set


def _constant_values(graph: onnx.GraphProto) -> dict[str, tuple[onnx.NodeProto, TensorProto]]:
    """Outputs of ``Constant`` nodes that carry a full tensor (``value`` attribute)."""
    out: dict[str, tuple[onnx.NodeProto, TensorProto]] = {}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    out[node.output[0]] = (node, attr.t)
    return out


def _weight_slots(node: onnx.NodeProto, constant: set[str]) -> list[int]:
    """Which inputs of ``node`` are weight positions."""
    if node.domain not in ("", "ai.onnx"):
        return []
    if node.op_type in ("Conv", "ConvTranspose") and len(node.input) > 1:
        return [1]
    if node.op_type == "Gemm" and len(node.input) > 1:
        return [1]
    if node.op_type in ("LSTM", "GRU", "RNN") and len(node.input) > 2:
        return [1, 2]  # W and R (layer-wise: chita_onnx.rnnlayers; gradients: the unrolled working copy)
    if node.op_type == "MatMul" and len(node.input) == 2:
        # the constant operand(s); a MatMul of two constants is constant-folding material, not a layer
        slots = [i for i in (1, 0) if node.input[i] in constant]
        return slots if len(slots) == 1 else []
    return []


def subgraphs(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """The ``(attribute name, graph)`` pairs of a node (If branches, Loop/Scan bodies)."""
    out: list[tuple[str, onnx.GraphProto]] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append((a.name, a.g))
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend((a.name, g) for g in a.graphs)
    return out


def _scope(path: str, node: onnx.NodeProto, k: int, attr: str) -> str:
    """The scope path of attribute ``attr``'s subgraph of node ``k`` in the graph at ``path``."""
    label = node.name or f"{node.op_type}#{k}"
    return f"{path}/{label}/{attr}" if path else f"{label}/{attr}"


def walk_graphs(graph: onnx.GraphProto, path: str = "") -> Iterable[tuple[str, onnx.GraphProto]]:
    """``graph`` and every nested subgraph, with a readable scope path (``""`` for the main graph,
    ``"If_0/then_branch"`` for a branch of node ``If_0``)."""
    yield path, graph
    for k, node in enumerate(graph.node):
        for attr, sub in subgraphs(node):
            yield from walk_graphs(sub, _scope(path, node, k, attr))


def loop_scopes(graph: onnx.GraphProto, path: str = "", inside: bool = False) -> set[str]:
    """The :func:`walk_graphs` scope paths of every subgraph that runs inside a Loop or Scan body (at
    any depth)."""
    out: set[str] = set()
    for k, node in enumerate(graph.node):
        for attr, sub in subgraphs(node):
            scope, looped = _scope(path, node, k, attr), inside or node.op_type in ("Loop", "Scan")
            if looped:
                out.add(scope)
            out |= loop_scopes(sub, scope, looped)
    return out


@dataclass(frozen=True)
class _Stored:
    """Where a constant tensor lives: its graph, scope path, and the Constant node (None for an
    initializer)."""

    graph: onnx.GraphProto
    scope: str
    node: onnx.NodeProto | None
    tensor: TensorProto


def _stored_constants(model: onnx.ModelProto) -> tuple[dict[str, _Stored], set[str]]:
    """Every constant tensor in every scope (initializers not listed as graph inputs, and Constant
    nodes with a ``value``), and the names defined in more than one scope (ambiguous, never pruned)."""
    found: dict[str, _Stored] = {}
    twice: set[str] = set()
    for scope, g in walk_graphs(model.graph):
        ins = {i.name for i in g.input}
        here = [(t.name, _Stored(g, scope, None, t)) for t in g.initializer if t.name not in ins]
        here += [(name, _Stored(g, scope, node, t)) for name, (node, t) in _constant_values(g).items()]
        for name, st in here:
            if name in found:
                twice.add(name)
            found[name] = st
    return found, twice


#: Values at the head of a tensor checked before the whole of it, so that a learned weight (whose
#: first values are never all integers) costs nothing.
_FIXED_PEEK = 64
#: Largest tensor that can count as a fixed operator.  Fixed operators are small (the DFL Conv holds
#: 16 values, a stencil a few dozen); a whole layer of integer values is more likely a quantized
#: layer stored as float with its scale applied after it, whose weights are learned and prunable.
FIXED_MAX_SIZE = 1024


def is_fixed_operator(tensor: TensorProto) -> bool:
    """Whether a float weight holds a fixed operator rather than learned values: every value an exact
    integer, not all of them in {−1, 0, 1}, and at most :data:`FIXED_MAX_SIZE` values.  YOLOv8's DFL
    head reads the expectation of a 16-bin softmax through a 1×1 Conv whose weight is ``arange(16)``
    (re-fitting it shifts every box); difference and Sobel stencils are alike.  Tensors of only 0
    and ±1 (binary or ternary weights, selection matrices) are not told apart from learned ones and
    stay prunable."""
    if tensor.data_type not in _FLOAT_TYPES or int(np.prod(tensor.dims, dtype=np.int64)) > FIXED_MAX_SIZE:
        return False
    if tensor.raw_data and tensor.data_type != TensorProto.BFLOAT16:  # a look at the head before a full copy
        dtype = helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = min(_FIXED_PEEK, len(tensor.raw_data) // dtype.itemsize)
        head = np.frombuffer(tensor.raw_data, dtype=dtype.newbyteorder("<"), count=count).astype(np.float64)
        if not np.array_equal(head, np.round(head)):
            return False
    try:
        a = numpy_helper.to_array(tensor)
    except Exception:  # external data not loaded, or an unreadable tensor: not ours to judge here
        return False
    flat = np.asarray(a, dtype=np.float64).reshape(-1)
    return bool(flat.size and np.array_equal(flat, np.round(flat)) and np.abs(flat).max() > 1)


def find_prunable(model: onnx.ModelProto) -> list[PrunableTensor]:
    """The prunable weight tensors of ``model``, in the order of their first consumer.

    Weights stored inside subgraphs (``Constant`` nodes or initializers of If branches, as spox and
    torch's exporters write them) count too; their ``scope`` names the subgraph.  A name defined in
    more than one scope cannot be addressed and is left alone, and so is a fixed operator
    (:func:`is_fixed_operator`: YOLOv8's DFL ``arange(16)`` Conv), which :func:`fixed_weights` lists.
    """
    stored, twice = _stored_constants(model)
    constant = set(stored)
    uses: dict[str, list[tuple[onnx.NodeProto, bool, int]]] = {}
    outputs: set[str] = set()
    looped = loop_scopes(model.graph)
    for scope, g in walk_graphs(model.graph):
        outputs.update(o.name for o in g.output)
        for k, node in enumerate(g.node):
            # a layer run once per Loop/Scan iteration: neither gradients nor layer inputs reach it
            slots = set() if scope in looped else set(_weight_slots(node, constant))
            for i, name in enumerate(node.input):
                if name in constant:
                    uses.setdefault(name, []).append((node, i in slots, k))

    found: list[PrunableTensor] = []
    for name, use in uses.items():
        if not use or not all(is_weight for _, is_weight, _ in use) or name in outputs or name in twice:
            continue
        st = stored[name]
        tensor = st.tensor
        if tensor.data_type not in _FLOAT_TYPES or len(tensor.dims) < 2 or is_fixed_operator(tensor):
            continue
        found.append(
            PrunableTensor(
                name=name,
                op_type=use[0][0].op_type,
                nodes=tuple(n.name or f"<{n.op_type} #{k}>" for n, _, k in use),
                shape=tuple(int(d) for d in tensor.dims),
                dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type).name,
                source="initializer" if st.node is None else "constant",
                scope=st.scope,
                layer=layer_name(use[0][0]),
            )
        )
    if any(t.scope for t in found):
        log.debug("%d prunable tensors live inside subgraphs", sum(1 for t in found if t.scope))
    return found


def fixed_weights(model: onnx.ModelProto) -> list[str]:
    """Names of the layer weights (Conv, Gemm, MatMul, ... weight inputs, in any scope) that
    :func:`find_prunable` leaves alone because they hold a fixed operator (:func:`is_fixed_operator`)."""
    stored, _ = _stored_constants(model)
    constant = set(stored)
    out: dict[str, None] = {}
    for _, g in walk_graphs(model.graph):
        for node in g.node:
            for i in _weight_slots(node, constant):
                name = node.input[i] if i < len(node.input) else ""
                st = stored.get(name)
                if st is not None and len(st.tensor.dims) >= 2 and is_fixed_operator(st.tensor):
                    out[name] = None
    return list(out)


def materialize_constants(model: onnx.ModelProto, names: Iterable[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` in which ``Constant`` nodes that hold prunable weights became initializers.

    ``names`` restricts the conversion to those tensors (default: every prunable ``Constant``).
    The initializer keeps the Constant's output name, so tensor names do not change.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    wanted = set(names) if names is not None else {t.name for t in find_prunable(model) if t.source == "constant"}
    keep: list[onnx.NodeProto] = []
    for node in out.graph.node:
        if node.op_type == "Constant" and node.output and node.output[0] in wanted:
            tensor = next(a.t for a in node.attribute if a.name == "value")
            init = out.graph.initializer.add()
            init.CopyFrom(tensor)
            init.name = node.output[0]
        else:
            keep.append(node)
    if len(keep) != len(out.graph.node):
        del out.graph.node[:]
        out.graph.node.extend(keep)
    return out


def get_weights(model: onnx.ModelProto, names: Iterable[str]) -> dict[str, NDArray[np.floating]]:
    """The values of the named initializers or Constant-node tensors, in any scope (external data
    already loaded)."""
    inits = {t.name: t for t in model.graph.initializer}
    consts = _constant_values(model.graph)
    stored: dict[str, _Stored] | None = None
    out: dict[str, NDArray[np.floating]] = {}
    for name in names:
        if name in inits:
            tensor = inits[name]
        elif name in consts:
            tensor = consts[name][1]
        else:
            if stored is None:
                stored = _stored_constants(model)[0]
            if name not in stored:
                raise ModelError(f"tensor {name!r} is neither an initializer nor a Constant node of the model")
            tensor = stored[name].tensor
        out[name] = np.array(numpy_helper.to_array(tensor), copy=True)
    return out


# ------------------------------------------------------------------------------------------- write


@dataclass(frozen=True)
class StoredTensor:
    """How one pruned tensor was written: ``"sparse"`` (sparse_initializer) or ``"dense"``."""

    name: str
    storage: str
    nnz: int
    size: int
    dense_bytes: int
    sparse_bytes: int


def _to_sparse(name: str, array: NDArray[np.floating]) -> onnx.SparseTensorProto:
    """A ``sparse_initializer`` with int64 *linear* indices (other index types fail ``onnx.checker``)."""
    flat = array.reshape(-1)
    idx = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(flat[idx], name)
    indices = numpy_helper.from_array(idx, f"{name}_indices")
    return helper.make_sparse_tensor(values, indices, list(array.shape))


def _keep_wider(init: TensorProto, array: NDArray[np.floating]) -> NDArray[np.floating]:
    """``array`` (in ``init``'s dtype), with every value that is the original float64 value rounded
    to float32 (the solvers' precision) set back to the original: a float64 weight a method kept
    unchanged is written bit for bit."""
    if init.data_type != TensorProto.DOUBLE:
        return array
    orig = numpy_helper.to_array(init).reshape(array.shape)
    same = array == orig.astype(np.float32).astype(np.float64)
    return np.where(same & (array != 0), orig, array)


def write_weights(
    model: onnx.ModelProto,
    weights: Mapping[str, NDArray[np.floating]],
    *,
    storage: str = "auto",
    metadata: Mapping[str, object] | None = None,
) -> tuple[onnx.ModelProto, list[StoredTensor]]:
    """A copy of ``model`` with ``weights`` replaced, each stored dense or as a sparse initializer.

    ``storage="auto"`` writes a ``sparse_initializer`` only where it is smaller than the dense tensor
    (int64 linear indices: above 2/3 sparsity for fp32, 80% for fp16); ``"sparse"`` does so for every
    pruned initializer; ``"dense"`` keeps dense tensors with zeros.  Constant-node weights and weights
    inside subgraphs are always written back where they live, dense.  Opset, IR version, inputs,
    outputs and metadata are kept; ``metadata`` is recorded as JSON under the ``chita_onnx`` key.
    """
    if storage not in ("auto", "sparse", "dense"):
        raise ValueError(f"storage must be auto, sparse or dense, got {storage!r}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    graph_inputs = {i.name for i in graph.input}
    consts = _constant_values(graph)
    stored: list[StoredTensor] = []
    keep_inits: list[TensorProto] = []
    pending = dict(weights)
    for init in graph.initializer:
        array = pending.pop(init.name, None)
        if array is None:
            keep_inits.append(init)
            continue
        array = _keep_wider(init, np.ascontiguousarray(array, dtype=helper.tensor_dtype_to_np_dtype(init.data_type)))
        nnz = int(np.count_nonzero(array))
        item = array.dtype.itemsize
        dense_b, sparse_b = array.size * item, nnz * (item + 8)
        sparse = storage == "sparse" or (storage == "auto" and sparse_b < dense_b)
        if init.name in graph_inputs:  # an overridable initializer (old IR) must stay dense
            sparse = False
        if sparse:
            graph.sparse_initializer.append(_to_sparse(init.name, array))
        else:
            keep_inits.append(numpy_helper.from_array(array, init.name))
        stored.append(StoredTensor(init.name, "sparse" if sparse else "dense", nnz, array.size, dense_b, sparse_b))
    del graph.initializer[:]
    graph.initializer.extend(keep_inits)
    scoped: dict[str, _Stored] | None = None
    for name in list(pending):
        array = pending.pop(name)
        node: onnx.NodeProto | None
        if name in consts:
            node, tensor = consts[name]
        else:  # a weight inside a subgraph: written back where it lives, dense
            if scoped is None:
                scoped = _stored_constants(out)[0]
            if name not in scoped:
                raise ModelError(f"tensor {name!r} is neither an initializer nor a Constant node of the model")
            node, tensor = scoped[name].node, scoped[name].tensor
        array = np.ascontiguousarray(array, dtype=helper.tensor_dtype_to_np_dtype(tensor.data_type))
        if node is None:
            tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
        else:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(numpy_helper.from_array(array, tensor.name))
        nnz = int(np.count_nonzero(array))
        item = array.dtype.itemsize
        stored.append(StoredTensor(name, "dense", nnz, array.size, array.size * item, nnz * (item + 8)))
    if metadata is not None:
        entries = [e for e in out.metadata_props if e.key != METADATA_KEY]
        del out.metadata_props[:]
        out.metadata_props.extend(entries)
        helper.set_model_props(out, {**{e.key: e.value for e in entries}, METADATA_KEY: json.dumps(metadata)})
    return out, stored


def _tensor_bytes(model: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) + 4 * len(t.float_data) + 8 * len(t.int64_data) for t in _all_tensors(model.graph))


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], *, input_path: str | os.PathLike[str] | None = None
) -> list[Path]:
    """Write ``model`` to ``path`` atomically (temporary file, then rename); return the files written.

    Models over ~1.8 GB of tensor data are written with one external data file ``<name>.data`` next
    to the model (the protobuf limit is 2 GB).  Sparse initializers cannot be external (onnx ignores
    them), so a model that large is densified first.  Refuses to overwrite ``input_path``.
    """
    dest = Path(path)
    if input_path is not None:
        src = Path(input_path)
        if dest.resolve() == src.resolve() or (dest.exists() and src.exists() and dest.samefile(src)):
            raise OutputError(f"{dest}: the output path is the input model; choose another output file")
    if dest.is_dir():
        raise OutputError(f"{dest}: the output path is a directory")
    folder = dest.parent if str(dest.parent) else Path(".")
    if not folder.is_dir():
        raise OutputError(f"{dest}: the output folder {folder} does not exist")
    if any(e.key == BATCH_AXES_KEY for e in model.metadata_props):  # a working copy's note, not the user's
        model = _without_key(model, BATCH_AXES_KEY)
    external = _tensor_bytes(model) > _EXTERNAL_THRESHOLD
    if external and len(model.graph.sparse_initializer):
        log.warning("model over 2 GB: sparse initializers cannot use external data, writing them dense")
        model = densify(model)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=folder))
    try:
        tmp_model = tmpdir / dest.name
        written = [dest]
        if external:
            data_name = f"{dest.name}.data"
            onnx.save_model(
                model,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            os.replace(tmpdir / data_name, folder / data_name)
            written.append(folder / data_name)
        else:
            with open(tmp_model, "wb") as fh:
                fh.write(model.SerializeToString())
        os.replace(tmp_model, dest)
        return written
    except OSError as exc:
        raise OutputError(f"{dest}: cannot write the output ({exc.strerror or exc})") from None
    finally:
        for leftover in tmpdir.iterdir() if tmpdir.exists() else []:
            leftover.unlink()
        with contextlib.suppress(OSError):
            tmpdir.rmdir()


def _dense_from_sparse(sp: onnx.SparseTensorProto) -> TensorProto:
    """The dense ``TensorProto`` of a sparse tensor (linear ``[NNZ]`` or COO ``[NNZ, rank]`` indices)."""
    shape = tuple(int(d) for d in sp.dims)
    dense = np.zeros(int(np.prod(shape)), dtype=helper.tensor_dtype_to_np_dtype(sp.values.data_type))
    indices = numpy_helper.to_array(sp.indices)
    flat = np.ravel_multi_index(indices.T, shape) if indices.ndim == 2 else indices.reshape(-1)
    dense[flat] = numpy_helper.to_array(sp.values)
    return numpy_helper.from_array(dense.reshape(shape), sp.values.name)


def densify(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with every ``sparse_initializer`` turned into a dense initializer."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.initializer.extend(_dense_from_sparse(sp) for sp in out.graph.sparse_initializer)
    del out.graph.sparse_initializer[:]
    return out


def check_model(path: str | os.PathLike[str]) -> None:
    """Run ``onnx.checker`` on a written model file (path-based, so external data is fine)."""
    try:
        onnx.checker.check_model(str(path))
    except onnx.checker.ValidationError as exc:
        raise ModelError(f"{path}: the written model fails onnx.checker: {first_line(exc)}") from None


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real (non-initializer) inputs of ``model`` with their shapes, dtypes and batch axes
    (:func:`chita_onnx.batching.infer_batch_axes`)."""
    inits = {t.name for t in model.graph.initializer} | {s.values.name for s in model.graph.sparse_initializer}
    specs: list[InputSpec] = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type"):
            raise ModelError(f"model input {vi.name!r} is not a tensor; only tensor inputs are supported")
        dims: list[int | str | None] = []
        for d in tt.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        specs.append(InputSpec(vi.name, tuple(dims), np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type))))
    axes = infer_batch_axes([s.shape for s in specs], _batch_hints(model.graph, specs))
    decided = decided_batch_axes(model)
    axes = [decided.get(s.name, a) for s, a in zip(specs, axes, strict=True)]
    return [s._replace(batch_axis=a) for s, a in zip(specs, axes, strict=True)]


#: Metadata key of a working copy whose batch axes the data decided (:mod:`chita_onnx.batchprobe`):
#: JSON ``{input: axis}``.  Never written out (:func:`save_model` drops it).
BATCH_AXES_KEY = "chita_onnx.batch_axes"


def decided_batch_axes(model: onnx.ModelProto) -> dict[str, int | None]:
    """The batch axes recorded in ``model`` by :func:`with_batch_axes` (none: ``{}``)."""
    for e in model.metadata_props:
        if e.key == BATCH_AXES_KEY:
            return {str(k): (None if v is None else int(v)) for k, v in json.loads(e.value).items()}
    return {}


def _without_key(model: onnx.ModelProto, key: str) -> onnx.ModelProto:
    """A copy of ``model`` without the metadata entry ``key``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    kept = [e for e in out.metadata_props if e.key != key]
    del out.metadata_props[:]
    out.metadata_props.extend(kept)
    return out


def with_batch_axes(model: onnx.ModelProto, axes: Mapping[str, int | None]) -> onnx.ModelProto:
    """A copy of ``model`` whose inputs ``axes`` names are batched on the given axes, whatever the
    rules of :func:`model_inputs` say: every later reading of the copy's inputs (the gradient engine,
    the layer-wise pass, the opened fixed batch) agrees."""
    out = _without_key(model, BATCH_AXES_KEY)
    entry = out.metadata_props.add()
    entry.key, entry.value = BATCH_AXES_KEY, json.dumps(dict(axes))
    return out


def _batch_hints(graph: onnx.GraphProto, specs: Sequence[InputSpec]) -> list[int | None]:
    """Per input, the batch axis the graph shows (a recurrent layer's ``X``, else the outputs), or None."""
    rnn = _recurrent_batch_axes(graph, [s.name for s in specs], [len(s.shape) for s in specs])
    outs = _output_batch_hints(graph, [s.shape for s in specs])
    return [a if a is not None else b for a, b in zip(rnn, outs, strict=True)]


def guessed_batch_names(model: onnx.ModelProto) -> list[str]:
    """The symbolic dim names that could each be the batch where :func:`model_inputs` only guesses:
    no dim name says batch, the graph shows no input's batch axis, and an input has two or more
    named unknown axes (a sequence-first ``[s77, s27, F]`` export with a per-position output).  In
    the order they first appear; empty where the batch axis is known or already decided.  Only
    running the model can tell them apart (:func:`chita_onnx.batchprobe.probe_batch_name`)."""
    if decided_batch_axes(model):
        return []
    specs = model_inputs(model)
    if any(is_batch_name(d) for s in specs for d in s.shape):
        return []
    if any(h is not None for h in _batch_hints(model.graph, specs)):
        return []
    names: list[str] = []
    for s in specs:
        named = [d for d in s.shape if isinstance(d, str) and d]
        if len(set(named)) >= 2:
            names.extend(d for d in named if d not in names)
    return names if len(names) >= 2 else []


def _output_batch_hints(graph: onnx.GraphProto, shapes: Sequence[tuple[int | str | None, ...]]) -> list[int | None]:
    """Per input with two or more named dynamic axes: the one axis whose name also names a dim of
    the model's outputs (a sequence-first ``[seq, batch, F]`` classifier's output is ``[batch, C]``),
    else ``None``.  Nothing is decided where several of them (a per-position output) or none reach
    the outputs."""
    named_out = {
        d.dim_param for o in graph.output if o.type.HasField("tensor_type") for d in o.type.tensor_type.shape.dim
        if d.HasField("dim_param") and d.dim_param
    }  # fmt: skip
    hints: list[int | None] = []
    for shape in shapes:
        named = [(axis, d) for axis, d in enumerate(shape) if isinstance(d, str) and d]
        if len({d for _, d in named}) < 2:
            hints.append(None)
            continue
        hit = [axis for axis, d in named if d in named_out]
        hints.append(hit[0] if len(hit) == 1 else None)
    return hints


_RNN_OPS = frozenset({"LSTM", "GRU", "RNN"})
#: Ops that pass a tensor on with its axes unchanged; the binary ones only with a stored operand of
#: no higher rank (a normalisation's scale and shift).
_SAME_AXES = frozenset({"Identity", "Cast"})
_BINARY = frozenset({"Mul", "Add", "Sub", "Div"})


def _recurrent_batch_axes(graph: onnx.GraphProto, names: Sequence[str], ranks: Sequence[int]) -> list[int | None]:
    """Per input: its batch axis where it reaches the sequence input ``X`` of an LSTM, GRU or RNN
    node through axis-preserving ops and ``Transpose`` only (ONNX fixes ``X`` as ``[seq, batch, in]``,
    or ``[batch, seq, in]`` with ``layout=1``), else ``None``.  A sequence-first ``[T, N, F]`` export
    with unnamed dims is batched on axis 1 this way, not on axis 0."""
    stored = {t.name: len(t.dims) for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for i in n.input:
            if i:
                consumers.setdefault(i, []).append(n)
    out: list[int | None] = []
    for name, rank in zip(names, ranks, strict=True):
        found: set[int] = set()
        stack: list[tuple[str, tuple[int, ...]]] = [(name, tuple(range(rank)))]
        seen: set[str] = set()
        while stack:
            tensor, src = stack.pop()
            if tensor in seen:
                continue
            seen.add(tensor)
            for n in consumers.get(tensor, ()):
                if n.op_type in _RNN_OPS and n.input[0] == tensor and len(src) == 3:
                    layout = next((a.i for a in n.attribute if a.name == "layout"), 0)
                    found.add(src[0 if layout else 1])
                elif n.op_type == "Transpose":
                    perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
                    perm = perm if perm is not None else list(reversed(range(len(src))))
                    if sorted(perm) == list(range(len(src))):
                        stack.append((n.output[0], tuple(src[k] for k in perm)))
                elif n.op_type in _SAME_AXES or (
                    n.op_type in _BINARY
                    and all(i == tensor or stored.get(i, len(src) + 1) <= len(src) for i in n.input)
                ):
                    stack.append((n.output[0], src))
        out.append(found.pop() if len(found) == 1 else None)
    return out


def output_names(model: onnx.ModelProto) -> list[str]:
    return [o.name for o in model.graph.output]


#: Ops that only move or re-type values between a classifier's ``ArgMax``/``TopK`` and its output.
_LABEL_MOVES = frozenset({"Identity", "Cast", "Squeeze", "Unsqueeze", "Reshape", "Flatten"})


#: Producers of the scores a ``TopK`` reads for it to be a classifier's top k.
_CLASS_SCORE_OPS = frozenset({"Softmax", "LogSoftmax", "Gemm", "MatMul", "Add"})


@dataclass(frozen=True)
class LabelHead:
    """An output read from the class scores ``scores`` along ``axis`` by the node ``node`` (behind moves
    of its values): ``ArgMax(scores)``, a class label per sample or per position, or one of the two
    outputs of ``TopK(scores)`` (largest first), ``values`` and ``indices`` (``""`` for ArgMax)."""

    scores: str
    axis: int
    node: str
    values: str = ""
    indices: str = ""


def label_scores(model: onnx.ModelProto, name: str) -> LabelHead | None:
    """The class scores behind ``name`` when it is ``ArgMax(scores)`` or an output of a sorted
    ``TopK(scores, largest=1)`` whose scores a softmax or a linear layer makes (:data:`_CLASS_SCORE_OPS`),
    through :data:`_LABEL_MOVES`: as exporters write a classifier or a segmenter that returns labels or
    its top k.  ``None`` when ``name`` is not such a tensor or the scores are not (known to be)
    floating point."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output if o}
    t = name
    while (node := prod.get(t)) is not None and node.op_type in _LABEL_MOVES and node.domain in ("", "ai.onnx"):
        t = node.input[0]
    node = prod.get(t)
    if node is None or node.domain not in ("", "ai.onnx") or not node.input:
        return None
    attrs = {a.name: int(a.i) for a in node.attribute if a.type == onnx.AttributeProto.INT}
    if node.op_type == "ArgMax":
        axis = attrs.get("axis", 0)
    elif node.op_type == "TopK" and attrs.get("largest", 1) == 1 and attrs.get("sorted", 1) == 1:
        # a classifier's top k: of class probabilities or of a linear head's logits (a detector's
        # TopK over its anchors' sigmoid or max scores is no class head)
        if getattr(prod.get(node.input[0]), "op_type", "") not in _CLASS_SCORE_OPS:
            return None
        axis = attrs.get("axis", -1)
    else:
        return None
    scores = node.input[0]
    declared = {v.name: v.type.tensor_type.elem_type for v in [*g.input, *g.value_info, *g.output]}
    declared.update({i.name: i.data_type for i in g.initializer})
    if declared.get(scores, TensorProto.FLOAT) not in _FLOAT_TYPES:
        return None
    label = node.name or f"<{node.op_type} of {scores}>"
    if node.op_type == "TopK":
        outs = [*node.output, "", ""]
        return LabelHead(str(scores), axis, label, outs[0], outs[1])
    return LabelHead(str(scores), axis, label)


def model_files(path: str | os.PathLike[str]) -> list[Path]:
    """The model file followed by the external-data files it references (for size accounting)."""
    p = Path(path)
    model = onnx.load(str(p), load_external_data=False)
    seen: dict[str, None] = {}
    for t in _all_tensors(model.graph):
        if t.data_location == TensorProto.EXTERNAL:
            for e in t.external_data:
                if e.key == "location":
                    seen.setdefault(e.value, None)
    return [p, *(p.parent / loc for loc in seen)]


#: The newest IR version and ai.onnx opset that the bundled onnxruntime (1.19.2) loads.
RUNTIME_MAX_IR = 10
RUNTIME_MAX_OPSET = 21


#: the domain of the temporary functions through which :func:`expand_newer_ops` inlines op bodies
_EXPAND_DOMAIN = "chita_onnx.expand"


def expand_newer_ops(model: onnx.ModelProto, target: int) -> onnx.ModelProto:
    """``model``, or a copy in which every node (in any graph) of an ``ai.onnx`` op that does not exist at
    opset ``target`` (``Attention``, ``RMSNormalization``, ``RotaryEmbedding`` of opset 23, ...) is
    replaced by the op's own ONNX function body (for the node's input types and attributes), so that
    onnx's version converter, which has no earlier version to adapt such a node to, can take the copy
    down to ``target``.  The same math in standard ops: for working copies only (a written model keeps
    the input's ops).  A node whose op defines no function body is left for the converter to refuse."""
    from onnx import defs

    opset = opset_version(model)
    if opset <= target:
        return model

    def newer(n: onnx.NodeProto) -> bool:
        if n.domain not in ("", "ai.onnx"):
            return False
        try:
            defs.get_schema(n.op_type, target)
        except defs.SchemaError:
            return True
        return False

    if not any(newer(n) for _, sub in walk_graphs(model.graph) for n in sub.node):
        return model
    try:  # the input types a context-dependent body is built for (subgraphs get theirs too)
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # (a model past protobuf's 2 GB limit): bodies that need no types still build
        inferred = model
    types: dict[str, onnx.TypeProto] = {}
    for _, sub in walk_graphs(inferred.graph):
        types.update({v.name: v.type for v in [*sub.value_info, *sub.input, *sub.output]})
        types.update({t.name: helper.make_tensor_type_proto(t.data_type, list(t.dims)) for t in sub.initializer})
    out = onnx.ModelProto()
    out.CopyFrom(model)
    functions: list[onnx.FunctionProto] = []
    for _, sub in walk_graphs(out.graph):
        for node in sub.node:
            if not newer(node):
                continue
            schema: Any = defs.get_schema(node.op_type, opset)  # (onnx's stubs lack the function accessors)
            body = onnx.FunctionProto()
            if schema.has_function:
                body.ParseFromString(schema.get_function_with_opset_version(opset))
            elif schema.has_context_dependent_function:
                empty = onnx.TypeProto()
                ins = [(types.get(i, empty) if i else empty).SerializeToString() for i in node.input]
                body.ParseFromString(
                    schema.get_context_dependent_function_with_opset_version(opset, node.SerializeToString(), ins)
                )
            else:
                continue
            body.domain, body.name = _EXPAND_DOMAIN, f"{node.op_type}_{len(functions)}"
            node.domain, node.op_type = _EXPAND_DOMAIN, body.name
            functions.append(body)
    if not functions:
        return model
    out.functions.extend(functions)
    out.opset_import.append(helper.make_opsetid(_EXPAND_DOMAIN, 1))
    try:
        out = onnx.inliner.inline_local_functions(out)
    except Exception as exc:
        names = sorted({f.name for f in functions})
        raise ModelError(f"cannot expand the opset-{opset} ops {names}: {first_line(exc)}") from None
    keep = [o for o in out.opset_import if o.domain != _EXPAND_DOMAIN]
    del out.opset_import[:]
    out.opset_import.extend(keep)
    log.info("expanded %d node(s) of ops newer than opset %d into their ONNX function bodies", len(functions), target)
    return out


def for_runtime(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model``, or a copy converted down to IR ≤ 10 / opset ≤ 21 so that onnxruntime 1.19.2 loads it.

    Used for the accuracy check only; written models always keep the input's versions.
    """
    opset = opset_version(model)
    if model.ir_version <= RUNTIME_MAX_IR and opset <= RUNTIME_MAX_OPSET:
        return model
    out = model
    if opset > RUNTIME_MAX_OPSET:
        try:
            out = onnx.version_converter.convert_version(expand_newer_ops(model, RUNTIME_MAX_OPSET), RUNTIME_MAX_OPSET)
        except Exception as exc:
            raise ModelError(
                f"the model uses opset {opset}; the bundled onnxruntime loads opset ≤ {RUNTIME_MAX_OPSET} and "
                f"onnx's version converter failed: {first_line(exc)}"
            ) from None
    else:
        out = onnx.ModelProto()
        out.CopyFrom(model)
    out.ir_version = min(out.ir_version, RUNTIME_MAX_IR)
    return out
