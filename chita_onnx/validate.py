"""Validation of untrusted models and data, shared by every command (``compress``, ``inspect``, ...).

Everything here runs before the work it protects and raises a one-line
:class:`~chita_onnx.errors.ChitaError` naming the file, tensor, node or sample and the bad value:

* :func:`validate_header` — a model as parsed, before its external data is read or a sparse tensor
  is densified: declared tensor sizes against :func:`~chita_onnx.limits.model_limit`, data lengths
  against dims, sparse indices in range; :func:`check_external_file` — external-data offsets and
  lengths against the file; :func:`validate_graph` — a cycle in the graph (named), then
  ``onnx.checker``;

The checks of weights, data and gradients that need no onnx are in :mod:`chita_onnx.checks`.
"""

from __future__ import annotations

import heapq
import logging
import os
import stat
from collections.abc import Iterable
from math import prod
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto

from .errors import ModelError, ResourceError
from .limits import BOMB_MIN_BYTES, SPARSE_RATIO, gib, model_limit
from .paths import file_kind

log = logging.getLogger(__name__)

#: Bits per element of each ONNX tensor type (strings have no fixed size).
_BITS: dict[int, int] = {
    TensorProto.FLOAT: 32, TensorProto.UINT8: 8, TensorProto.INT8: 8, TensorProto.UINT16: 16,
    TensorProto.INT16: 16, TensorProto.INT32: 32, TensorProto.INT64: 64, TensorProto.BOOL: 8,
    TensorProto.FLOAT16: 16, TensorProto.DOUBLE: 64, TensorProto.UINT32: 32, TensorProto.UINT64: 64,
    TensorProto.COMPLEX64: 64, TensorProto.COMPLEX128: 128, TensorProto.BFLOAT16: 16,
    TensorProto.FLOAT8E4M3FN: 8, TensorProto.FLOAT8E4M3FNUZ: 8, TensorProto.FLOAT8E5M2: 8,
    TensorProto.FLOAT8E5M2FNUZ: 8, TensorProto.UINT4: 4, TensorProto.INT4: 4,
}  # fmt: skip
_KNOWN_TYPES = frozenset(v for v in TensorProto.DataType.values() if v != TensorProto.UNDEFINED)
#: Typed repeated field and entries per element, where that is one to one (or two for complex).
_TYPED: dict[int, tuple[str, int]] = {
    TensorProto.FLOAT: ("float_data", 1), TensorProto.DOUBLE: ("double_data", 1),
    TensorProto.INT64: ("int64_data", 1), TensorProto.INT32: ("int32_data", 1),
    TensorProto.INT16: ("int32_data", 1), TensorProto.INT8: ("int32_data", 1),
    TensorProto.UINT16: ("int32_data", 1), TensorProto.UINT8: ("int32_data", 1),
    TensorProto.BOOL: ("int32_data", 1), TensorProto.FLOAT16: ("int32_data", 1),
    TensorProto.BFLOAT16: ("int32_data", 1), TensorProto.UINT32: ("uint64_data", 1),
    TensorProto.UINT64: ("uint64_data", 1), TensorProto.COMPLEX64: ("float_data", 2),
    TensorProto.COMPLEX128: ("double_data", 2), TensorProto.STRING: ("string_data", 1),
}  # fmt: skip


def _dtype_name(data_type: int) -> str:
    try:
        return str(TensorProto.DataType.Name(data_type)).lower()
    except ValueError:
        return f"data type {data_type}"


def declared_bytes(t: TensorProto, where: str) -> int:
    """Bytes of the dense tensor that ``t`` declares (Python ints: no overflow)."""
    if any(d < 0 for d in t.dims):
        raise ModelError(f"{where}: tensor {t.name!r} has a negative dimension {list(t.dims)}")
    if t.data_type not in _KNOWN_TYPES:
        raise ModelError(f"{where}: tensor {t.name!r} has no valid data type ({t.data_type})")
    return int(-(-prod(t.dims) * _BITS.get(int(t.data_type), 8) // 8))


def _check_inline(t: TensorProto, where: str) -> None:
    """An inline tensor's data must be exactly as long as its dims say."""
    n = prod(t.dims)
    if t.HasField("raw_data"):
        if t.data_type in _BITS and len(t.raw_data) != declared_bytes(t, where):
            raise ModelError(
                f"{where}: tensor {t.name!r} declares shape {list(t.dims)} ({_dtype_name(t.data_type)}, "
                f"{gib(declared_bytes(t, where))}) but holds {gib(len(t.raw_data))} of data"
            )
        return
    field_name, per = _TYPED.get(int(t.data_type), ("", 0))
    if field_name:
        have = len(getattr(t, field_name))
        if have != n * per:
            raise ModelError(
                f"{where}: tensor {t.name!r} declares shape {list(t.dims)} ({n:,} elements) but holds "
                f"{have // per:,} values"
            )


def _check_sparse(sp: onnx.SparseTensorProto, where: str) -> None:
    """A sparse tensor's values and indices must agree with each other and lie inside its dims."""
    name = sp.values.name or "<sparse>"
    dims = [int(d) for d in sp.dims]
    if any(d < 0 for d in dims):
        raise ModelError(f"{where}: sparse tensor {name!r} has a negative dimension {dims}")
    size = prod(dims)
    nnz = prod(sp.values.dims) if len(sp.values.dims) == 1 else -1
    if nnz < 0:
        raise ModelError(f"{where}: sparse tensor {name!r}: values must be 1-D, got shape {list(sp.values.dims)}")
    idims = [int(d) for d in sp.indices.dims]
    if idims not in ([nnz], [nnz, len(dims)]):
        raise ModelError(
            f"{where}: sparse tensor {name!r}: indices of shape {idims} do not match {nnz} values of a "
            f"{len(dims)}-D tensor (expected [{nnz}] or [{nnz}, {len(dims)}])"
        )
    if sp.indices.data_type not in (TensorProto.INT64, TensorProto.INT32, TensorProto.INT16, TensorProto.INT8):
        raise ModelError(f"{where}: sparse tensor {name!r}: indices are {_dtype_name(sp.indices.data_type)}, not int")
    dense = size * _BITS.get(int(sp.values.data_type), 8) // 8
    stored = max(1, len(sp.values.raw_data) + len(sp.indices.raw_data) + 4 * nnz)
    if dense > BOMB_MIN_BYTES and dense > SPARSE_RATIO * stored:
        raise ResourceError(
            f"{where}: sparse tensor {name!r} declares shape {dims} ({gib(dense)} dense) for {nnz:,} values: it would "
            f"densify {dense / stored:,.0f}-fold; refusing (at most {SPARSE_RATIO}-fold above {gib(BOMB_MIN_BYTES)})"
        )
    if nnz == 0:
        return
    _check_inline(sp.indices, where)
    idx = onnx.numpy_helper.to_array(sp.indices).astype(np.int64, copy=False)
    bounds = np.asarray([size]) if idx.ndim == 1 else np.asarray(dims, dtype=np.int64)
    bad = np.flatnonzero(((idx < 0) | (idx >= bounds)).reshape(idx.shape[0], -1).any(axis=1))
    if bad.size:
        i = int(bad[0])
        raise ModelError(
            f"{where}: sparse tensor {name!r} of shape {dims}: index {idx[i].tolist()} (entry {i}) is out of range"
        )


def _graphs(graph: onnx.GraphProto) -> Iterable[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            for g in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                yield from _graphs(g)


def _walk(graph: onnx.GraphProto) -> Iterable[tuple[TensorProto, str]]:
    """Every dense tensor: initializers and tensor attributes (``Constant`` values), subgraphs included."""
    for g in _graphs(graph):
        for t in g.initializer:
            yield t, "initializer"
        for node in g.node:
            for attr in node.attribute:
                for t in [attr.t] if attr.type == onnx.AttributeProto.TENSOR else attr.tensors:
                    yield t, f"node {node.name!r}"


def _sparse(graph: onnx.GraphProto) -> Iterable[onnx.SparseTensorProto]:
    """Every sparse tensor: sparse initializers and sparse attributes, subgraphs included."""
    for g in _graphs(graph):
        yield from g.sparse_initializer
        for node in g.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.SPARSE_TENSOR:
                    yield attr.sparse_tensor
                yield from attr.sparse_tensors


def _subgraph_names(node: onnx.NodeProto) -> set[str]:
    """Names a node's subgraphs read (outer-scope values are a hidden input of the node)."""
    names: set[str] = set()
    for attr in node.attribute:
        graphs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
        for g in graphs:
            for sub in g.node:
                names.update(sub.input)
                names.update(_subgraph_names(sub))
    return names


def sort_graph(graph: onnx.GraphProto, where: str) -> None:
    """Put the nodes in topological order (in place, stable) or raise naming a node on a cycle."""
    producer: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        for o in node.output:
            if o:
                producer.setdefault(o, i)
    deps: list[set[int]] = []
    for node in graph.node:
        names = set(node.input) | _subgraph_names(node)
        deps.append({producer[n] for n in names if n in producer})
    if all(d < i for i, ds in enumerate(deps) for d in ds):  # already in order (the usual case)
        return
    order: list[int] = []
    done = [False] * len(deps)
    users: dict[int, list[int]] = {}
    waiting = [len(ds) for ds in deps]
    for i, ds in enumerate(deps):
        for d in ds:
            users.setdefault(d, []).append(i)
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        done[i] = True
        for u in users.get(i, []):
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(deps):
        # walk back along unfinished dependencies until a node repeats: that loop is a cycle
        path = [next(i for i in range(len(deps)) if not done[i])]
        seen_at: dict[int, int] = {}
        while path[-1] not in seen_at:
            seen_at[path[-1]] = len(path) - 1
            path.append(min(d for d in deps[path[-1]] if not done[d]))
        loop = path[seen_at[path[-1]] :][::-1]
        chain = " -> ".join(f"{graph.node[i].name or '<unnamed>'!r} ({graph.node[i].op_type})" for i in loop)
        raise ModelError(f"{where}: the graph has a cycle: {chain}")
    nodes = [graph.node[i] for i in order]
    copies = [onnx.NodeProto() for _ in nodes]
    for c, n in zip(copies, nodes, strict=True):
        c.CopyFrom(n)
    del graph.node[:]
    graph.node.extend(copies)


def _check_strings(message: Any, where: str) -> None:
    """Every string field must be UTF-8 (protobuf hands back ``bytes`` for one that is not).

    Walks the descriptor and reads only string and message fields: a tensor's ``raw_data`` is never
    touched (reading it would copy it).
    """
    for fd in message.DESCRIPTOR.fields:
        # protobuf ≥ 6 has is_repeated; older releases only label
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        if fd.type not in (fd.TYPE_STRING, fd.TYPE_MESSAGE) or (not repeated and not message.HasField(fd.name)):
            continue
        value = getattr(message, fd.name)
        values = value if repeated else (value,)
        if fd.type == fd.TYPE_STRING:
            for v in values:
                if not isinstance(v, str):
                    kind = message.DESCRIPTOR.name
                    raise ModelError(f"{where}: the {fd.name} {v[:60]!r} of a {kind} is not UTF-8 text")
        else:
            for v in values:
                _check_strings(v, where)


def validate_header(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Check a freshly parsed model before its external data is read or anything is densified.

    Raises :class:`ModelError` for inconsistent tensors or out-of-range sparse indices, and
    :class:`ResourceError` when the declared tensors exceed :func:`~chita_onnx.limits.model_limit`.
    """
    where = str(path)
    _check_strings(model, where)
    total = 0
    for t, _ in _walk(model.graph):
        total += declared_bytes(t, where)
        if t.data_location != TensorProto.EXTERNAL:
            _check_inline(t, where)
    for sp in _sparse(model.graph):
        dense = onnx.TensorProto(dims=sp.dims, data_type=sp.values.data_type, name=sp.values.name)
        total += declared_bytes(dense, where)
        _check_sparse(sp, where)
    limit = model_limit()
    if total > limit:
        big = max(
            [(declared_bytes(t, where), t.name) for t, _ in _walk(model.graph)]
            + [
                (prod(sp.dims) * _BITS.get(int(sp.values.data_type), 8) // 8, sp.values.name)
                for sp in _sparse(model.graph)
            ]
        )
        raise ResourceError(
            f"{where}: the model declares {gib(total)} of tensors (the largest, {big[1]!r}, {gib(big[0])}), "
            f"more than the {gib(limit)} this machine can hold (half of its memory)"
        )


#: Initializers larger than this are checked by :func:`validate_header`, not copied for onnx.
_LIGHT_BYTES = 64 * 2**10


def _light(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without its bulk, for ``onnx.checker`` and shape inference.

    Every initializer larger than :data:`_LIGHT_BYTES`, every external one and every sparse one
    becomes a graph input of the same name, type and shape: the graph, its ops and its types check
    exactly as before, without serialising hundreds of MB (the tensors' own consistency is
    :func:`validate_header`'s job).  Sparse initializers also get the dense type onnx cannot infer.
    """
    g = model.graph
    light = onnx.GraphProto(name=g.name, doc_string=g.doc_string)
    light.node.extend(g.node)
    light.input.extend(g.input)
    light.output.extend(g.output)
    light.value_info.extend(g.value_info)
    declared = {i.name for i in g.input}
    for t in g.initializer:
        if t.data_location == TensorProto.EXTERNAL or declared_bytes(t, "") > _LIGHT_BYTES:
            if t.name not in declared:
                light.input.append(onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
        else:
            light.initializer.append(t)
    for sp in g.sparse_initializer:
        if sp.values.name not in declared:
            light.input.append(onnx.helper.make_tensor_value_info(sp.values.name, sp.values.data_type, list(sp.dims)))
    out = onnx.ModelProto(ir_version=model.ir_version, graph=light)
    out.opset_import.extend(model.opset_import)
    out.functions.extend(model.functions)
    version = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if version:
        _explicit_defaults(out.graph, version)
    return out


def _explicit_defaults(graph: onnx.GraphProto, version: int) -> None:
    """Write out the default attribute values of the standard ops that onnx infers through their
    function body (no inference function of their own), subgraphs included, in place.

    onnx's function-body inference does not substitute an attribute's default: a valid
    ``MeanVarianceNormalization`` without ``axes`` fails strict inference (onnx 1.16–1.23), although
    the model is valid and onnxruntime runs it with its own kernel.
    """
    for node in graph.node:
        for attr in node.attribute:
            for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                _explicit_defaults(sub, version)
        if node.domain not in ("", "ai.onnx"):
            continue
        try:
            schema = onnx.defs.get_schema(node.op_type, max_inclusive_version=version, domain="")
        except onnx.defs.SchemaError:
            continue
        if not getattr(schema, "has_function", False) or schema.has_type_and_shape_inference_function:
            continue
        present = {a.name for a in node.attribute}
        for name, spec in schema.attributes.items():
            if name not in present and spec.default_value.type != onnx.AttributeProto.UNDEFINED:
                node.attribute.append(spec.default_value)


def light_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model without the bytes of its large, external and sparse initializers (typed graph inputs
    in their place): what ``onnx.checker`` and shape inference need, at any model size."""
    return _light(model)


#: Attribute values with which onnxruntime 1.19.2 kills the process (SIGFPE) instead of raising, on
#: graphs that onnx's checker and shape inference accept: ``(op, attribute, the smallest valid value)``.
_CRASHING_ATTRIBUTES = (("GroupNormalization", "num_groups", 1),)


def refuse_crashing_attributes(graph: onnx.GraphProto, where: str) -> None:
    """Refuse the attribute values of :data:`_CRASHING_ATTRIBUTES`, in every subgraph."""
    for g in _graphs(graph):
        for node in g.node:
            for op, name, least in _CRASHING_ATTRIBUTES:
                if node.op_type != op or node.domain not in ("", "ai.onnx"):
                    continue
                for a in node.attribute:
                    if a.name == name and a.type == onnx.AttributeProto.INT and a.i < least:
                        raise ModelError(
                            f"{where}: node {node.name or node.output[0]!r} ({op}) has {name}={a.i}; it must be "
                            f"at least {least}"
                        )


def validate_graph(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Sort the nodes (or name a cycle), run ``onnx.checker`` and strict shape inference.

    Runs on the parsed model before its external data is read, on a copy without the weights'
    bytes (:func:`_light`).  Strict type and shape inference finds the inconsistent graphs that
    onnxruntime would refuse — or crash on: ORT 1.19.2 segfaults creating a session for some of
    them — so no such graph ever reaches onnxruntime.
    """
    where = str(path)
    if not len(model.graph.output):
        raise ModelError(f"{where}: the graph has no outputs")
    known = onnx.defs.onnx_opset_version()
    for op in model.opset_import:
        if op.domain in ("", "ai.onnx") and op.version > known:
            raise ModelError(
                f"{where}: uses ai.onnx opset {op.version}; the installed onnx {onnx.__version__} knows up to {known}"
            )
    names = [t.name for t in model.graph.initializer] + [sp.values.name for sp in model.graph.sparse_initializer]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ModelError(f"{where}: initializer names are not unique: {twice[:5]}")
    sort_graph(model.graph, where)
    refuse_crashing_attributes(model.graph, where)
    light = _light(model)
    try:
        onnx.checker.check_model(light)
    except (onnx.checker.ValidationError, ValueError) as exc:
        msg = " ".join(str(exc).split())
        raise ModelError(f"{where}: fails onnx.checker: {msg[:400]}") from None
    try:
        onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError) as exc:
        msg = " ".join(str(exc).split()).replace("[ShapeInferenceError] Inference error(s): ", "")
        raise ModelError(f"{where}: the graph is inconsistent (onnx shape inference): {msg[:400]}") from None


def check_external_file(tensor: TensorProto, file: Path, where: str) -> None:
    """The external-data file of ``tensor`` must be a regular file holding its declared bytes."""
    st = file.stat()
    if not stat.S_ISREG(st.st_mode):
        raise ModelError(
            f"{where}: external data {file.name!r} of tensor {tensor.name!r} is {file_kind(st.st_mode)}; "
            "refusing to read it"
        )
    info = {e.key: e.value for e in tensor.external_data}
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info["length"]) if info.get("length") else None
    except ValueError:
        raise ModelError(
            f"{where}: tensor {tensor.name!r}: external data offset/length {info.get('offset')!r}/"
            f"{info.get('length')!r} are not integers"
        ) from None
    need = declared_bytes(tensor, where)
    if offset < 0 or (length is not None and length < 0):
        raise ModelError(f"{where}: tensor {tensor.name!r}: negative external data offset {offset} or length {length}")
    if length is not None and tensor.data_type in _BITS and length != need:
        raise ModelError(
            f"{where}: tensor {tensor.name!r} declares shape {list(tensor.dims)} ({gib(need)}) but its external "
            f"data length is {gib(length)}"
        )
    if offset + (length if length is not None else need) > st.st_size:
        raise ModelError(
            f"{where}: external data {file.name!r} of tensor {tensor.name!r} is truncated: it has "
            f"{st.st_size:,} bytes, the tensor needs bytes {offset:,}..{offset + need:,}"
        )
