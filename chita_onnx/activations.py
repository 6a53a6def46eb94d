"""Forward passes in graph segments: layer inputs and outputs of the prunable layers, with plain
onnxruntime inference sessions (no gradients).

:class:`SegmentRunner` runs a model over a fixed list of calibration batches one *segment* of the
topologically ordered node list at a time.  Between segments it keeps, per batch, exactly the tensors
that later nodes still need (the frontier).  The caller may change initializers (pruned weights, BN
statistics, biases) between segments, and the next segment is built from the current values, so one
pass through the graph gives every layer its inputs *from the already-pruned upstream model* — the
sequential scheme of OBC/SparseGPT without one forward pass per layer.  A second runner on the dense
model, advanced in lockstep, gives the dense targets; :class:`AheadRunner` runs it ahead of the pass
on a worker thread, with the same segments.

:func:`find_layers` describes each prunable weight's consuming node (:class:`LayerSite`) with the
:class:`~chita_onnx.layerstats.LayerGeometry` that the NumPy statistics need.  No math here beyond
reshapes: the rows, Grams and solves live in :mod:`chita_onnx.layerstats` and
:mod:`chita_onnx.solver.layerwise`.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from . import runtime
from .data import to_model_layout
from .data_types import Batch, CalibrationSource, InputSpec
from .errors import ChitaError, ModelError
from .graph import _constant_values, for_runtime, materialize_constants, model_inputs
from .layerstats import LayerGeometry

log = logging.getLogger(__name__)

Arrays = dict[str, NDArray[np.generic]]


# ------------------------------------------------------------------------------------- graph helpers


def _attr(node: onnx.NodeProto, name: str, default: object = None) -> object:
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out: list[onnx.GraphProto] = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _outer_refs(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph reads from enclosing scopes."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    defined |= {s.values.name for s in graph.sparse_initializer}
    refs: set[str] = set()
    for node in graph.node:
        for name in node.input:
            if name and name not in defined:
                refs.add(name)
        for sub in _subgraphs(node):
            refs |= {r for r in _outer_refs(sub) if r not in defined}
        defined.update(o for o in node.output if o)
    for o in graph.output:
        if o.name not in defined:
            refs.add(o.name)
    return refs


def node_reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs and the outer-scope names its subgraphs use."""
    names = [n for n in node.input if n]
    for sub in _subgraphs(node):
        names.extend(sorted(_outer_refs(sub)))
    return list(dict.fromkeys(names))


def working_copy(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy the bundled onnxruntime loads, with prunable Constant-node weights as initializers and
    initializers removed from the graph inputs (old IR), so that they can be replaced by name."""
    m = materialize_constants(for_runtime(model))
    if m is model:
        m = onnx.ModelProto()
        m.CopyFrom(model)
    inits = {t.name for t in m.graph.initializer}
    if any(i.name in inits for i in m.graph.input):
        keep = [i for i in m.graph.input if i.name not in inits]
        del m.graph.input[:]
        m.graph.input.extend(keep)
    return m


def inline_fixed_ifs(model: onnx.ModelProto, batches: Sequence[Arrays], *, rounds: int = 4) -> onnx.ModelProto:
    """``model`` with every main-graph ``If`` whose condition is the same on the first and the last
    calibration batch replaced by the branch it takes (nested ones too, up to ``rounds`` levels).

    Exporters such as spox and torch put a model's layers inside ``If`` branches selected by an input
    that the calibration data fix (silero-vad's sample rate); the layer-wise passes see those layers
    only once they sit in the main graph.  Names are kept (branch weights stay addressable); any
    failure to evaluate a condition leaves the model as it is.
    """
    from .gradients.prepare import _Names
    from .gradients.subgraphs import inline_decided

    if not batches:
        return model
    probe_batches = [batches[0]] if len(batches) == 1 else [batches[0], batches[-1]]
    m = model
    for _ in range(rounds):
        ifs = [(k, n) for k, n in enumerate(m.graph.node) if n.op_type == "If" and n.input and n.input[0]]
        if not ifs:
            break
        probe = onnx.ModelProto()
        probe.CopyFrom(m)
        del probe.graph.output[:]
        conds = list(dict.fromkeys(n.input[0] for _, n in ifs))
        probe.graph.output.extend(onnx.ValueInfoProto(name=c) for c in conds)
        try:
            sess = runtime.session(probe, what="the If conditions of the model", threads=1)
            values = [
                dict(zip(conds, runtime.run(sess, conds, b, what="the If conditions of the model"), strict=True))
                for b in probe_batches
            ]
        except ChitaError as exc:
            log.info("If conditions not evaluated (%s): the model stays as it is", exc)
            return m
        decisions: dict[int, bool] = {}
        for k, n in ifs:
            vs = [np.asarray(v[n.input[0]]).reshape(-1) for v in values]
            if all(v.size == 1 for v in vs) and len({bool(v[0]) for v in vs}) == 1:
                decisions[k] = bool(vs[0][0])
        if not decisions:
            break
        out = onnx.ModelProto()
        out.CopyFrom(m)
        inline_decided(out.graph, decisions, _Names(out.graph))
        m = materialize_constants(out)
        log.info("inlined %d If node(s) whose condition the calibration data fix", len(decisions))
    return m


# --------------------------------------------------------------------------------------- layer sites


@dataclass(frozen=True)
class LayerSite:
    """A prunable weight and the node that consumes it.

    ``position``: index of the node in the graph's (topological) node list; ``input``: the layer's
    activation input; ``output``: its output.  ``bias``: the initializer added to the output per
    channel (Conv ``B``, Gemm ``C``), if any.  ``channel_axis``: the output axis of the channels.
    """

    weight: str
    node: str
    position: int
    input: str
    output: str
    geometry: LayerGeometry
    bias: str | None
    channel_axis: int
    shared: bool = False
    offset: str | None = None  # the constant the node itself adds to its output (Conv B, Gemm C)
    offset_scale: float = 1.0  # Gemm's beta
    opaque_offset: bool = False  # the node adds something that is not a usable constant
    #: Every consuming node of a shared weight (an unrolled RNN's time steps), this site first, in
    #: graph order, when all of them map the weight to the same rows (:func:`same_rows`): the
    #: layer-wise pass fits the weight once on all their inputs.  Empty for a weight used once.
    consumers: tuple[LayerSite, ...] = ()

    @property
    def last_position(self) -> int:
        """Position of the last consuming node (``position`` for a weight used once)."""
        return self.consumers[-1].position if self.consumers else self.position


def same_rows(a: LayerGeometry, b: LayerGeometry) -> bool:
    """Whether two consumers of one weight map it to the same ``(g, M_g, d)`` rows (so that their
    input rows can be stacked into one least-squares problem)."""
    key = (a.kind, a.weight_shape, a.groups, a.kind == "gemm" and a.trans_b)
    return key == (b.kind, b.weight_shape, b.groups, b.kind == "gemm" and b.trans_b)


def find_layers(model: onnx.ModelProto, weights: Iterable[str]) -> list[LayerSite]:
    """The consuming node of each weight, in graph order of the first consumer.

    A weight read by several nodes (the time steps of an unrolled RNN) gets every consumer in
    :attr:`LayerSite.consumers` when they all use it the same way (:func:`same_rows`); otherwise the
    first consumer only, with a warning.
    """
    wanted = set(weights)
    inits: dict[str, TensorProto] = {n: t for n, (_, t) in _constant_values(model.graph).items()}
    real = {t.name: t for t in model.graph.initializer}
    inits.update(real)
    sites: dict[str, list[LayerSite]] = {}
    unfit: set[str] = set()
    for pos, node in enumerate(model.graph.node):
        for slot, name in enumerate(node.input):
            if name not in wanted:
                continue
            if name not in inits:
                raise ModelError(f"weight {name!r} is neither an initializer nor a Constant node")
            if sites.get(name) and sites[name][-1].position == pos:
                continue  # the same node reads it twice (x·W·W is not a layer; first slot only)
            shape = tuple(int(d) for d in inits[name].dims)
            label = node.name or f"<{node.op_type} #{pos}>"
            if name not in sites:  # the first consumer must be a layer
                sites[name] = [_site(node, slot, name, shape, pos, label, real)]
                continue
            try:
                sites[name].append(_site(node, slot, name, shape, pos, label, real))
            except ModelError:  # a later non-layer use (a tied weight read by a Transpose, say)
                unfit.add(name)
    missing = wanted - set(sites)
    if missing:
        raise ModelError(f"no consuming Conv/Gemm/MatMul node for weight(s) {sorted(missing)}")
    out = []
    for name, found in sites.items():
        site = found[0]
        if len(found) > 1 or name in unfit:
            if name not in unfit and all(same_rows(site.geometry, c.geometry) for c in found[1:]):
                log.info("weight %r feeds %d nodes: it is fitted once on the inputs of all of them", name, len(found))
                joint = tuple(LayerSite(**{**c.__dict__, "shared": True}) for c in found)
                site = LayerSite(**{**site.__dict__, "shared": True, "consumers": joint})
            else:
                log.warning(
                    "weight %r feeds %d nodes that use it differently: it is re-fitted on the inputs of the "
                    "first one only", name, len(found),
                )  # fmt: skip
                site = LayerSite(**{**site.__dict__, "shared": True})
        out.append(site)
    return sorted(out, key=lambda s: s.position)


def _ints(node: onnx.NodeProto, name: str, default: Sequence[int]) -> tuple[int, ...]:
    v = _attr(node, name)
    return tuple(int(x) for x in v) if v is not None else tuple(default)  # type: ignore[attr-defined]


def _site(
    node: onnx.NodeProto,
    slot: int,
    name: str,
    shape: tuple[int, ...],
    pos: int,
    label: str,
    inits: Mapping[str, TensorProto],
) -> LayerSite:
    op = node.op_type
    if op in ("Conv", "ConvTranspose") and slot == 1:
        s = len(shape) - 2
        pads = _ints(node, "pads", [0] * (2 * s))
        auto = _attr(node, "auto_pad", b"NOTSET")
        auto_s = auto.decode() if isinstance(auto, bytes) else str(auto)
        transposed = op == "ConvTranspose"
        geom = LayerGeometry(
            "convt" if transposed else "conv",
            shape,
            group=int(_attr(node, "group", 1)),  # type: ignore[call-overload]
            strides=_ints(node, "strides", [1] * s),
            dilations=_ints(node, "dilations", [1] * s),
            pads_begin=pads[:s],
            pads_end=pads[s:],
            auto_pad=auto_s,
            output_padding=_ints(node, "output_padding", [0] * s) if transposed else (),
            output_shape=_ints(node, "output_shape", []) if transposed else (),
        )
        has = len(node.input) > 2 and bool(node.input[2])
        bias = node.input[2] if has and node.input[2] in inits else None
        opaque = has and bias is None
        return LayerSite(
            name, label, pos, node.input[0], node.output[0], geom, bias, 1, offset=bias, opaque_offset=opaque
        )
    if op == "Gemm" and slot == 1:
        geom = LayerGeometry(
            "gemm",
            shape,
            alpha=float(_attr(node, "alpha", 1.0)),  # type: ignore[arg-type]
            trans_a=bool(_attr(node, "transA", 0)),
            trans_b=bool(_attr(node, "transB", 0)),
        )
        beta = float(_attr(node, "beta", 1.0))  # type: ignore[arg-type]
        has = len(node.input) > 2 and bool(node.input[2])
        c = node.input[2] if has and node.input[2] in inits else None
        channels = geom.outputs_per_group
        usable = c is not None and int(np.prod(inits[c].dims)) in (1, channels)
        bias = c if usable and beta == 1.0 else None
        return LayerSite(
            name, label, pos, node.input[0], node.output[0], geom, bias, -1,
            offset=c if usable else None, offset_scale=beta, opaque_offset=has and not usable,
        )  # fmt: skip
    if op == "MatMul" and len(shape) == 2:
        if slot == 1:
            return LayerSite(
                name, label, pos, node.input[0], node.output[0], LayerGeometry("matmul_right", shape), None, -1
            )
        return LayerSite(name, label, pos, node.input[1], node.output[0], LayerGeometry("matmul_left", shape), None, -2)
    raise ModelError(f"weight {name!r} feeds input {slot} of {op} node {label!r}: not a prunable layer position")


# ------------------------------------------------------------------------------------ the batches


#: Bytes the onnxruntime runs of one layer-wise batch may use for their intermediate tensors.
BATCH_ACTIVATION_BYTES = 512 * 2**20


def largest_activation_bytes(model: onnx.ModelProto, sample_shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Bytes of the model's largest intermediate tensor for ONE sample (0 when nothing is known).

    The inputs are fixed at ``(1, *sample_shape)`` (samples on axis 0, as the calibration data hold
    them; static inputs by their own shape) and onnx's shape inference propagates them; tensors whose
    shape stays unknown are skipped, so this is a lower bound for graphs inference cannot follow.
    """
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for t in m.graph.initializer:  # big weights add nothing to shape inference; small ones may be shapes
        if int(np.prod(t.dims, dtype=np.int64)) > 4096:
            t.ClearField("raw_data")
            t.ClearField("float_data")
    for i in m.graph.input:
        shape = sample_shapes.get(i.name)
        if shape is None or not i.type.HasField("tensor_type"):
            continue
        dims = i.type.tensor_type.shape
        dims.ClearField("dim")
        for d in shape:
            dims.dim.add().dim_value = int(d)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    except Exception:
        return 0
    best = 0
    for v in [*inferred.graph.value_info, *inferred.graph.output]:
        tt = v.type.tensor_type
        if not tt.HasField("shape") or not tt.shape.dim:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else 0 for d in tt.shape.dim]
        if any(x <= 0 for x in dims):
            continue
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tt.elem_type)).itemsize if tt.elem_type else 4
        best = max(best, int(np.prod(dims, dtype=np.int64)) * itemsize)
    return best


def layerwise_batch_size(
    model: onnx.ModelProto, specs: Sequence[InputSpec], source: CalibrationSource, cap: int
) -> int:
    """Samples per layer-wise batch: at most ``cap``, and few enough that four copies of the largest
    intermediate tensor fit in :data:`BATCH_ACTIVATION_BYTES` (a segment run holds its inputs, outputs
    and a few temporaries; models on raw audio or large images need batches of a few samples)."""
    first: Batch = next(iter(source))
    shapes: dict[str, tuple[int, ...]] = {}
    for s in specs:
        a = np.asarray(first.inputs[s.name])
        shapes[s.name] = a.shape if s.batch_axis is None else (1, *a.shape[1:])
    per_sample = largest_activation_bytes(model, shapes)
    if per_sample <= 0:
        return cap
    size = max(1, min(cap, BATCH_ACTIVATION_BYTES // (4 * per_sample)))
    if size < cap:
        log.info("layer-wise batches of %d samples (largest activation %.1f MB per sample)", size, per_sample / 2**20)
    return size


def fixed_batch_size(specs: Sequence[InputSpec]) -> int | None:
    """The batch size a model input fixes (its batch axis has a number, e.g. 1), or None."""
    for s in specs:
        if s.batch_axis is None:
            continue
        dim = s.shape[s.batch_axis] if s.batch_axis < len(s.shape) else None
        if isinstance(dim, int) and dim > 0:
            return dim
    return None


def open_batch(model: onnx.ModelProto, specs: Sequence[InputSpec], name: str = "chita_batch") -> onnx.ModelProto:
    """A copy of ``model`` whose inputs leave their batch axis open (``name`` instead of the fixed
    size ``b`` the exporter wrote), with the intermediate and output shapes it recorded cleared (they
    name that size too), and every main-graph ``Reshape`` to a constant shape that starts with ``b``
    (``[1, -1]``, ``[8, 16, 4, 4]``) reshaping to ``0`` there: the size of its input's first axis.
    Whether the graph itself runs any number of samples, each as the original does, is for the caller
    to check (:func:`opened_alike`)."""
    size = fixed_batch_size(specs) or 1
    m = onnx.ModelProto()
    m.CopyFrom(model)
    axes = {s.name: s.batch_axis for s in specs}
    for vi in m.graph.input:
        axis = axes.get(vi.name)
        tt = vi.type.tensor_type
        if axis is None or not tt.HasField("shape") or axis >= len(tt.shape.dim):
            continue
        dim = tt.shape.dim[axis]
        dim.ClearField("dim_value")
        dim.dim_param = name
    del m.graph.value_info[:]
    for vi in m.graph.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    _open_reshapes(m.graph, size)
    return m


def _open_reshapes(graph: onnx.GraphProto, size: int) -> None:
    """Every main-graph ``Reshape`` to a constant shape that starts with the fixed batch ``size``
    reshapes to ``0`` there instead (the size of its input's first axis), or, with ``allowzero=1``
    (where a 0 is a 0: torch's dynamo exporter writes it for ``view``), to ``-1`` when no other
    entry is ``-1``."""
    from .gradients.prepare import _const, _Names

    reshapes = [n for n in graph.node if n.op_type == "Reshape" and len(n.input) > 1]
    wanted = {n.input[1] for n in reshapes}
    stored = {t.name: t for t in graph.initializer if t.name in wanted}
    stored.update({k: t for k, (_, t) in _constant_values(graph).items() if k in wanted})
    names = _Names(graph)
    for n in reshapes:
        t = stored.get(n.input[1])
        shape = None if t is None else numpy_helper.to_array(t)
        if shape is None or shape.ndim != 1 or shape.size < 2 or int(shape[0]) != size or np.any(shape[1:] == 0):
            continue
        literal = bool(_attr(n, "allowzero", 0))
        if literal and np.any(shape[1:] == -1):
            continue
        opened = np.array(shape, dtype=np.int64)
        opened[0] = -1 if literal else 0
        n.input[1] = _const(graph, names, f"{n.input[1]}__open_batch", opened)


#: Samples run together, and one by one, to decide whether a batch fixed to one sample can be opened
#: (:func:`opened_alike`); a fixed batch of ``b > 1`` is probed on ``b`` samples.
OPEN_PROBE_SAMPLES = 3
#: The opened model's outputs on the probe samples must equal the original's to this fraction of
#: their largest magnitude (float32 kernels for a batch block their sums differently).
OPEN_PROBE_RTOL = 1e-4


def opened_alike(
    model: onnx.ModelProto, specs: Sequence[InputSpec], alone: Sequence[Arrays], together: Arrays
) -> onnx.ModelProto | None:
    """A copy of ``model`` (a runtime working copy that fixes its batch to ``b`` samples) with the
    batch opened, when it computes every sample as the original does; else None.

    The copies tried, in turn: :func:`open_batch` (the inputs and the ``Reshape`` targets that start
    with ``b``), then :func:`chita_onnx.batchtrace.trace_open` (the batch followed through the graph:
    a static dynamo export's attention reshapes).  ``alone``: the probe samples one per feed;
    ``together``: the same samples in one feed, in the models' layout.  For ``b = 1`` the original
    runs each feed of ``alone`` and the copy ``together``; for ``b > 1`` (``len(alone) == b``) the
    original runs ``together`` and the copy each feed of ``alone`` and ``together``.  Every output
    must be the per-sample outputs stacked along one axis (to :data:`OPEN_PROBE_RTOL`).  A graph
    that bakes the batch in otherwise (a state of a fixed batch, a reduction over it) fails or mixes
    the samples: None.  Equal probe samples could not show such a graph: None."""
    from .batchtrace import trace_open

    size = fixed_batch_size(specs)
    batched = [s.name for s in specs if s.batch_axis is not None]
    if size is None or len(alone) < 2 or (size > 1 and len(alone) != size):
        return None
    if all(np.array_equal(f[n], alone[0][n]) for f in alone[1:] for n in batched):
        return None
    try:
        base = runtime.session(model, what="the model (probe of its batch)", threads=1, check=False)
        if size == 1:
            singles = [runtime.run(base, None, f, what="the model on one calibration sample") for f in alone]
        else:
            whole = runtime.run(base, None, together, what="the model on the probe samples at once")
    except ChitaError as exc:
        log.debug("the fixed batch of %d stays: %s", size, exc)
        return None
    for build in (open_batch, trace_open):
        opened = build(model, specs)
        if opened is None:
            continue
        try:
            free = runtime.session(opened, what="the model with its fixed batch opened (probe)", threads=1)
            if size == 1:
                stacked = runtime.run(free, None, together, what="the model on the probe samples at once")
            else:
                singles = [runtime.run(free, None, f, what="the opened model on one sample") for f in alone]
                stacked = whole
                again = runtime.run(free, None, together, what="the opened model on the probe samples at once")
                if any(not _close(np.asarray(w), np.asarray(a)) for w, a in zip(whole, again, strict=True)):
                    raise ModelError("the opened copy differs from the model on its own batch")
        except ChitaError as exc:
            log.debug("the fixed batch of %d stays with %s: %s", size, build.__name__, exc)
            continue
        if all(_stacked_along_one_axis([a[k] for a in singles], np.asarray(got)) for k, got in enumerate(stacked)):
            return opened
        log.debug("the fixed batch of %d stays with %s: the outputs are not the per-sample ones", size, build.__name__)
    return None


def _stacked_along_one_axis(parts: Sequence[NDArray[np.generic]], got: NDArray[np.generic]) -> bool:
    """Whether ``got`` is ``parts`` concatenated along the one axis where its size differs from theirs
    (floats to :data:`OPEN_PROBE_RTOL` of their largest magnitude, anything else exactly)."""
    first = np.asarray(parts[0])
    if got.ndim != first.ndim or any(np.asarray(p).shape != first.shape for p in parts):
        return False
    differ = [a for a in range(got.ndim) if got.shape[a] != first.shape[a]]
    if len(differ) != 1 or got.shape[differ[0]] != first.shape[differ[0]] * len(parts):
        return False
    return _close(np.concatenate([np.asarray(p) for p in parts], axis=differ[0]), got)


def _close(want: NDArray[np.generic], got: NDArray[np.generic]) -> bool:
    """Same shape, and equal (floats: to :data:`OPEN_PROBE_RTOL` of ``want``'s largest magnitude)."""
    if want.shape != got.shape:
        return False
    if not np.issubdtype(want.dtype, np.floating):
        return bool(np.array_equal(want, got))
    scale = float(np.max(np.abs(want))) if want.size else 0.0
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    return bool(
        np.all(np.isfinite(diff)) and (not diff.size or float(diff.max()) <= OPEN_PROBE_RTOL * max(scale, 1e-30))
    )


def calibration_batches(
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    num_samples: int,
    batch_size: int,
    *,
    honour_fixed: bool = True,
) -> list[Arrays]:
    """The first ``num_samples`` samples as feed dicts of ``batch_size``, in the model's layout
    (samples moved to each input's batch axis, cast to the input dtypes; static inputs as given).

    A model input with a fixed batch dimension ``b`` gets batches of exactly ``b`` (a remainder that
    does not fill one is dropped), unless ``honour_fixed`` is False (for a copy of the model whose
    batch dimension was opened, :func:`open_batch`).
    """
    batched = [s for s in specs if s.batch_axis is not None]
    fixed = fixed_batch_size(specs) if honour_fixed else None
    size = fixed if fixed is not None else batch_size
    parts: dict[str, list[NDArray[np.generic]]] = {s.name: [] for s in batched}
    static: dict[str, NDArray[np.generic]] = {}
    taken = 0
    for batch in source:
        b: Batch = batch
        take = min(b.size, num_samples - taken)
        if take <= 0:
            break
        for s in specs:
            if s.batch_axis is None:
                static.setdefault(s.name, np.asarray(b.inputs[s.name]))
            else:
                parts[s.name].append(np.asarray(b.inputs[s.name])[:take])
        taken += take
    if taken == 0:
        raise ModelError("no calibration samples")
    full = {k: np.concatenate(v) for k, v in parts.items()}
    n = taken if size == batch_size else (taken // size) * size
    if n == 0:
        raise ModelError(f"the model's fixed batch size {size} exceeds the {taken} calibration samples")
    out: list[Arrays] = []
    for i in range(0, n, size):
        feed = {s.name: to_model_layout(full[s.name][i : i + size], s) for s in batched}
        feed.update({s.name: to_model_layout(static[s.name], s) for s in specs if s.batch_axis is None})
        out.append(feed)
    return out


# --------------------------------------------------------------------------------------- the runner


def _session(model: onnx.ModelProto, threads: int, what: str) -> ort.InferenceSession:
    """A checked session for a segment graph (:func:`chita_onnx.runtime.session`)."""
    return runtime.session(model, what=what, threads=max(1, threads))


#: A runner's position and its kept tensors (:meth:`SegmentRunner.snapshot`).
_Snapshot = tuple[int, dict[str, list[NDArray[np.generic]]]]


class SegmentRunner:
    """Runs ``model`` segment by segment over ``batches``, keeping the frontier tensors per batch.

    ``advance(stop)`` runs the nodes ``[position, stop)``; afterwards :meth:`values` gives, per batch,
    any tensor that a node at index ≥ ``stop`` reads (or a graph output).  :meth:`set_initializer`
    replaces a constant; segments built later use the new value.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        batches: Sequence[Arrays],
        *,
        threads: int = 1,
        max_bytes: int | None = None,
        spill_dir: str | None = None,
    ) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self._spill_root = spill_dir
        self._spill: tempfile.TemporaryDirectory[str] | None = None
        self._spilled = 0
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.threads = threads
        self.inits: dict[str, TensorProto] = {t.name: t for t in self.graph.initializer}
        self.position = 0
        self.num_batches = len(batches)
        self.reads = [node_reads(n) for n in self.nodes]
        end = len(self.nodes)
        self.last_use: dict[str, int] = {}
        for pos, names in enumerate(self.reads):
            for name in names:
                self.last_use[name] = pos
        for o in self.graph.output:
            self.last_use[o.name] = end
        self.state: dict[str, list[NDArray[np.generic]]] = {}
        for inp in self.graph.input:
            if inp.name in self.inits:
                continue
            self.state[inp.name] = [b[inp.name] for b in batches]
        self.seconds = 0.0

    def set_initializer(self, name: str, value: NDArray[np.generic]) -> None:
        old = self.inits.get(name)
        dtype = helper.tensor_dtype_to_np_dtype(old.data_type) if old is not None else np.asarray(value).dtype
        self.inits[name] = numpy_helper.from_array(np.require(value, dtype=dtype, requirements="C"), name)

    def initializer(self, name: str) -> NDArray[np.generic]:
        return numpy_helper.to_array(self.inits[name])

    def values(self, name: str) -> list[NDArray[np.generic]]:
        if name in self.state:
            return self.state[name]
        if name in self.inits:
            return [self.initializer(name)] * self.num_batches
        raise KeyError(f"tensor {name!r} is not available at node {self.position}")

    def current_model(self) -> onnx.ModelProto:
        """The whole model with the current initializer values."""
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        del m.graph.initializer[:]
        m.graph.initializer.extend(self.inits[t.name] for t in self.model.graph.initializer)
        have = {t.name for t in self.model.graph.initializer}
        m.graph.initializer.extend(t for n, t in self.inits.items() if n not in have)
        return m

    def advance(self, stop: int, extra: Iterable[str] = ()) -> None:
        """Run nodes ``[position, stop)`` on every batch; ``extra`` tensors produced there are kept too."""
        stop = min(stop, len(self.nodes))
        if stop <= self.position:
            return
        t0 = time.perf_counter()
        seg = self.nodes[self.position : stop]
        produced: list[str] = []
        for n in seg:
            produced.extend(o for o in n.output if o)
        made = set(produced)
        reads: list[str] = []
        for names in self.reads[self.position : stop]:
            reads.extend(names)
        reads = list(dict.fromkeys(reads))
        inputs = [r for r in reads if r not in made and r not in self.inits]
        used_inits = [r for r in reads if r not in made and r in self.inits]
        keep_extra = set(extra)
        outputs = [o for o in produced if self.last_use.get(o, -1) >= stop or o in keep_extra]
        for name in inputs:
            if name not in self.state:
                raise ModelError(f"tensor {name!r} is needed at node {self.position} but was not kept")
        if outputs:
            g = helper.make_graph(
                seg,
                f"segment_{self.position}_{stop}",
                [self._value_info(n) for n in inputs],
                [onnx.ValueInfoProto(name=o) for o in outputs],
                [self.inits[n] for n in used_inits],
            )
            m = helper.make_model(g, opset_imports=list(self.model.opset_import))
            m.ir_version = self.model.ir_version
            m.functions.extend(self.model.functions)
            what = f"a segment of the model (nodes {self.position}..{stop - 1})"
            sess = _session(m, self.threads, what)
            results: list[list[NDArray[np.generic]]] = [[] for _ in outputs]
            held = self.frontier_bytes()
            for b in range(self.num_batches):
                feed = {n: self.state[n][b] for n in inputs}
                for k, value in enumerate(runtime.run(sess, outputs, feed, what=what)):
                    held += int(value.nbytes)
                    spill = self.max_bytes is not None and held > self.max_bytes
                    results[k].append(self._keep(value) if spill else value)
            for o, r in zip(outputs, results, strict=True):
                self.state[o] = r
        self.position = stop
        for name in [n for n in self.state if self.last_use.get(n, -1) < stop and n not in keep_extra]:
            for a in self.state.pop(name):
                if isinstance(a, np.memmap) and a.filename:
                    Path(a.filename).unlink(missing_ok=True)  # the mapping stays valid until released
        self.seconds += time.perf_counter() - t0

    def snapshot(self) -> _Snapshot:
        """The position and the kept tensors, to :meth:`restore` later (the arrays are shared, not
        copied: the runner never writes into a kept array)."""
        return self.position, {k: list(v) for k, v in self.state.items()}

    def restore(self, snap: _Snapshot) -> None:
        """Go back to a :meth:`snapshot`: the next :meth:`advance` re-runs the nodes from there with
        the *current* initializers (after a weight used by the nodes in between has changed)."""
        self.position, state = snap
        self.state = {k: list(v) for k, v in state.items()}

    def _keep(self, value: NDArray[np.generic]) -> NDArray[np.generic]:
        """Spill ``value`` to a memory-mapped ``.npy`` file (the frontier is over ``max_bytes``)."""
        if self._spill is None:
            self._spill = tempfile.TemporaryDirectory(prefix="chita-activations-", dir=self._spill_root)
            log.info("activations exceed %d bytes: spilling them to %s", self.max_bytes, self._spill.name)
        path = Path(self._spill.name) / f"{self._spilled}.npy"
        self._spilled += 1
        np.save(path, np.asarray(value))
        mapped: NDArray[np.generic] = np.load(path, mmap_mode="r")
        return mapped

    def close(self) -> None:
        """Drop the kept tensors and any spilled files."""
        self.state.clear()
        if self._spill is not None:
            self._spill.cleanup()
            self._spill = None

    def _value_info(self, name: str) -> onnx.ValueInfoProto:
        """The segment input ``name`` typed as its kept values are: each dimension that all batches
        share is given (onnxruntime then plans and optimises the segment for it), the others are left
        open."""
        values = self.state[name]
        arr = values[0]
        elem = helper.np_dtype_to_tensor_dtype(np.asarray(arr).dtype)
        shapes = {tuple(np.shape(v)) for v in values}
        dims: list[int | None] = [
            int(arr.shape[k]) if len({s[k] for s in shapes}) == 1 else None for k in range(np.ndim(arr))
        ]
        return helper.make_tensor_value_info(name, elem, dims)

    def run_to_end(self) -> dict[str, list[NDArray[np.generic]]]:
        """Finish the pass; the graph outputs per batch."""
        self.advance(len(self.nodes))
        return {o.name: self.values(o.name) for o in self.graph.output}

    def frontier_bytes(self) -> int:
        """Bytes of the kept tensors held in memory (spilled ones excluded)."""
        return sum(int(a.nbytes) for v in self.state.values() for a in v if not isinstance(a, np.memmap))


class AheadRunner:
    """A :class:`SegmentRunner` on a model whose initializers never change (the dense model of the
    layer-wise pass), whose segments run ahead of the caller on one worker thread.

    :meth:`submit` queues an ``advance(stop, extra)`` that the caller is going to make; the caller's
    own :meth:`advance` then takes that segment's result (waiting for it if needed) and
    :meth:`values` reads the tensors as the runner held them right after it (its
    :meth:`~SegmentRunner.snapshot` then).  The segments are the
    same, in the same order, as those of the synchronous runner, so every value is the same bit for
    bit; the segments only run while the caller's thread does other work (onnxruntime and NumPy
    release the GIL).  A call that was not submitted, or differs from what was, waits for the queued
    segments, rewinds the runner to the caller's position and runs the call itself (counted in
    :attr:`mismatches`): correct, only slower.  A call with nothing queued just runs (and waits).

    Memory: the tensors of the submitted segments that the caller has not yet reached stay alive
    until it does, and the worker's onnxruntime session runs next to the caller's; the caller bounds
    the first by how far ahead it submits (the layer-wise pass stops running ahead once the runner
    spills activations to disk: :attr:`spilling`).
    """

    def __init__(self, runner: SegmentRunner) -> None:
        from concurrent.futures import Future, ThreadPoolExecutor

        self.runner = runner
        self.nodes = runner.nodes
        self.num_batches = runner.num_batches
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chita-ahead")
        self._queued: list[tuple[int, frozenset[str], Future[_Snapshot]]] = []
        self._view: _Snapshot = runner.snapshot()  # what the caller sees
        self._ahead = runner.position  # where the runner stands once the queue has run
        self._worker: int | None = None  # the worker's thread ident, once it has run a segment
        self._abandoned = False
        self.mismatches = 0

    @property
    def position(self) -> int:
        return self._view[0]

    @property
    def seconds(self) -> float:
        return self.runner.seconds

    @property
    def spilling(self) -> bool:
        """Whether the runner has moved activations to disk (its memory cap is reached)."""
        return self.runner._spilled > 0

    def idle(self) -> bool:
        """Whether the worker has run every queued segment (so its core is free until the next
        :meth:`submit`).  Call from the pass's thread, which alone queues segments."""
        return all(fut.done() for _, _, fut in self._queued)

    def _step(self, stop: int, extra: frozenset[str]) -> _Snapshot:
        self._worker = threading.get_ident()
        if self._abandoned:
            raise ChitaError("the dense runner was closed")
        self.runner.advance(stop, extra)
        return self.runner.snapshot()

    def submit(self, stop: int, extra: Iterable[str] = ()) -> None:
        """Queue ``advance(stop, extra)`` (a no-op when the queued segments already reach ``stop``,
        as the synchronous call would be)."""
        stop = min(stop, len(self.nodes))
        if stop <= self._ahead or self._pool is None:
            return
        names = frozenset(extra)
        self._queued.append((stop, names, self._pool.submit(self._step, stop, names)))
        self._ahead = stop

    def advance(self, stop: int, extra: Iterable[str] = ()) -> None:
        """As :meth:`SegmentRunner.advance`, from the queued segments when they match."""
        stop = min(stop, len(self.nodes))
        if stop <= self.position:
            return
        names = frozenset(extra)
        if self._queued:
            if self._queued[0][0] == stop and names <= self._queued[0][1]:
                self._view = self._queued.pop(0)[2].result()
                return
            self.mismatches += 1
            log.debug("dense runner: advance(%d) was not queued next; running it in place", stop)
            self._drain()
            self.runner.restore(self._view)
            self._ahead = self.position
        self.submit(stop, names)
        self._view = self._queued.pop(0)[2].result()

    def _drain(self) -> None:
        """Wait for every queued segment and forget them (their errors too: the caller's own call
        runs again and raises them)."""
        for _, _, fut in self._queued:
            if not fut.cancelled():
                fut.exception()  # waits; an error is not raised here
        self._queued.clear()

    def values(self, name: str) -> list[NDArray[np.generic]]:
        if name in self._view[1]:
            return self._view[1][name]
        if name in self.runner.inits:
            return [self.runner.initializer(name)] * self.num_batches
        raise KeyError(f"tensor {name!r} is not available at node {self.position}")

    def initializer(self, name: str) -> NDArray[np.generic]:
        return self.runner.initializer(name)

    def close(self, abandon: bool = False) -> None:
        """Wait for the worker, stop it and drop the kept tensors and any spilled files.  With
        ``abandon`` (the pass failed or was interrupted) the queued segments are dropped and the
        worker's onnxruntime run is terminated, so that a Ctrl-C is not held up by them."""
        if abandon:
            self._abandoned = True
            for _, _, fut in self._queued:
                fut.cancel()
            if self._worker is not None:
                runtime.stop_runs(self._worker)
        self._drain()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if abandon and self._worker is not None:
            runtime.stop_runs(self._worker, stopped=False)
        self._view = (self.position, {})
        self.runner.close()


def model_specs(model: onnx.ModelProto) -> list[InputSpec]:
    return model_inputs(model)
