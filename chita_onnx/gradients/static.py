"""Static shapes for the gradient working copy.

The working copy has every input dimension fixed (from the calibration data).  Exporters compute
reshape targets, padding amounts, resize sizes, initial RNN states, ... from ``Shape`` of
intermediate tensors (paddle2onnx's ``Shape → Slice → Concat → Reshape``, torch's ``Shape → Gather →
Unsqueeze → Concat``), and ``If`` nodes test shapes or inputs such as a sample rate.  onnx shape
inference cannot follow all of that, while our rewrites (BatchNormalization needs ranks, Resize
needs sizes, the loss needs the head's shape) need static shapes.  :func:`make_static`:

1. classifies every tensor as *constant* (depends on initializers only), *shape-only* (depends on
   constants and on input **shapes**, never on input values) or *value*;
2. folds, until nothing changes: ``Shape``/``Size`` of tensors whose shape onnx inference knows
   become constants; constant tensors consumed by value nodes are computed once by onnxruntime and
   become initializers; ``If`` nodes whose condition became a constant are replaced by the branch
   they take (:mod:`.subgraphs`);
3. when shape-only tensors remain (inference could not follow them), runs the working copy once in
   onnxruntime on the calibration example and folds those too; ``If`` conditions that depend on
   input *values* are evaluated the same way and recorded as :class:`Guard` s (every calibration
   batch must take the same branch);
4. writes the shape observed in that run into ``value_info`` for every tensor whose shape inference
   still leaves unknown but that depends only on input shapes.

The written (pruned) model never sees any of this: it keeps its dynamic dims, graph and opset.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from ..errors import ModelError
from .subgraphs import inline_decided, node_inputs, walk_graphs

log = logging.getLogger(__name__)

CONST, SHAPE, VALUE = 0, 1, 2

_DEFAULT_DOMAINS = ("", "ai.onnx")
_RANDOM = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}
)
#: Inputs whose *values* decide the output's shape (``None``: all of them).  Any other op's output
#: shape depends only on its inputs' shapes and attributes.
_SHAPE_ARGS: dict[str, tuple[int, ...] | None] = {
    "Reshape": (1,),
    "Expand": (1,),
    "Tile": (1,),
    "Slice": (1, 2, 3, 4),
    "Pad": (1, 3),
    "ConstantOfShape": (0,),
    "Range": None,
    "Resize": (1, 2, 3),
    "Upsample": (1,),
    "Unsqueeze": (1,),
    "Squeeze": (1,),
    "ReduceSum": (1,),
    "ReduceMean": (1,),
    "ReduceMax": (1,),
    "ReduceMin": (1,),
    "ReduceProd": (1,),
    "ReduceL1": (1,),
    "ReduceL2": (1,),
    "ReduceLogSum": (1,),
    "ReduceLogSumExp": (1,),
    "ReduceSumSquare": (1,),
    "Split": (1,),
    "TopK": (1,),
    "OneHot": (1,),
    "CenterCropPad": (1,),
    "Col2Im": (1, 2),
    "DFT": (1, 2),
    "STFT": (2, 3),
    "MaxUnpool": (2,),
    "AffineGrid": (1,),
    "BlackmanWindow": None,
    "HannWindow": None,
    "HammingWindow": None,
    "MelWeightMatrix": None,
    "NonZero": None,
    "Unique": None,
    "Compress": None,
    "NonMaxSuppression": None,
    "StringSplit": None,
    "If": None,
    "Loop": None,
    "Scan": None,
}
#: Folding rounds before giving up (each round folds at least one tensor or inlines an If).
_MAX_ROUNDS = 64


@dataclass(frozen=True)
class Guard:
    """An ``If`` condition decided by input values: every calibration batch must give ``value``.

    ``tensor`` names the condition in the model :func:`make_static` was given (before folding).
    """

    node: str
    tensor: str
    value: bool


@dataclass
class StaticInfo:
    """What :func:`make_static` did: tensors folded to constants, If nodes inlined (``name → branch``),
    guards, value_info entries written from a real run, onnxruntime runs used, seconds spent."""

    folded: int = 0
    inlined: dict[str, str] = field(default_factory=dict)
    guards: list[Guard] = field(default_factory=list)
    recorded: int = 0
    runs: int = 0
    seconds: float = 0.0
    recorded_names: frozenset[str] = frozenset()


# ------------------------------------------------------------------------------------- helpers


def _infer(model: onnx.ModelProto, keep: Iterable[str] = ()) -> onnx.ModelProto:
    """Shape inference from scratch: earlier results are dropped (except ``keep``) because onnx's
    data propagation can contradict its own earlier output (seen on scalar Equal in silero_vad)."""
    kept = set(keep)
    vis = [v for v in model.graph.value_info if v.name in kept]
    del model.graph.value_info[:]
    model.graph.value_info.extend(vis)
    light = _light(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=False, strict_mode=False, data_prop=True)
    except Exception as exc:
        raise ModelError(f"shape inference failed on the gradient working copy: {str(exc).splitlines()[0]}") from None
    heavy = {t.name for t in model.graph.initializer} - {t.name for t in light.graph.initializer}
    del model.graph.value_info[:]
    model.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in heavy)
    del model.graph.output[:]
    model.graph.output.extend(inferred.graph.output)
    return model


#: Initializers with more elements than this are shown to shape inference as typed inputs (their
#: values never decide a shape, and serializing them dominated the inference time).
_LIGHT_LIMIT = 4096


def _light(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers are typed graph inputs without data."""
    m = onnx.ModelProto()
    m.ir_version = max(model.ir_version, 4)
    m.opset_import.extend(model.opset_import)
    g, src = m.graph, model.graph
    g.name = src.name
    g.node.extend(src.node)
    g.input.extend(src.input)
    g.output.extend(src.output)
    g.value_info.extend(src.value_info)
    for t in src.initializer:
        if int(np.prod(t.dims, dtype=np.int64)) <= _LIGHT_LIMIT:
            g.initializer.append(t)
        else:
            g.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return m


def _static_dims(model: onnx.ModelProto) -> dict[str, tuple[int, tuple[int, ...] | None]]:
    """``name -> (elem_type, dims or None)`` where dims are all known non-negative ints."""
    out: dict[str, tuple[int, tuple[int, ...] | None]] = {}
    g = model.graph
    for vi in [*g.input, *g.value_info, *g.output]:
        if not vi.type.HasField("tensor_type"):
            continue
        tt = vi.type.tensor_type
        dims: tuple[int, ...] | None = None
        if tt.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0 for d in tt.shape.dim):
            dims = tuple(int(d.dim_value) for d in tt.shape.dim)
        out[vi.name] = (int(tt.elem_type), dims)
    for t in g.initializer:
        out[t.name] = (int(t.data_type), tuple(int(d) for d in t.dims))
    return out


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    from .prepare import constants_to_initializers

    constants_to_initializers(graph)


def set_input_shapes(model: onnx.ModelProto, shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Fix the graph inputs named in ``shapes`` to those dims, in place."""
    for vi in model.graph.input:
        if vi.name in shapes:
            tt = vi.type.tensor_type
            del tt.shape.dim[:]
            for d in shapes[vi.name]:
                tt.shape.dim.add().dim_value = int(d)


def _run(
    model: onnx.ModelProto,
    outputs: list[str],
    feeds: Mapping[str, NDArray[Any]] | None,
    *,
    what: str = "the gradient working copy",
    budget: float | None = None,
) -> dict[str, NDArray[Any]]:
    """Values of ``outputs`` from one onnxruntime run of the part of ``model`` they need.

    The part is checked before onnxruntime sees it (:func:`chita_onnx.runtime.check_graph`); the run
    stops after ``budget`` seconds when given (constant folding), and on Ctrl-C/SIGTERM."""
    from .. import runtime
    from .prepare import cut_to

    m = cut_to(model, outputs)
    g = m.graph
    ins = list(g.input)
    del g.output[:]
    for o in outputs:  # untyped: onnxruntime infers the types (cut_to guesses float when unknown)
        g.output.add().name = o
    missing = [i.name for i in ins if i.name not in (feeds or {})]
    if missing:
        raise ModelError(f"no calibration array for model input {missing[0]!r}")
    feed = {i.name: np.asarray((feeds or {})[i.name]) for i in ins}
    sess = runtime.session(m, what=what, optimize=False)
    values = runtime.run(sess, outputs, feed, what=what, budget=budget)
    return dict(zip(outputs, values, strict=True))


# -------------------------------------------------------------------------------- classification


@dataclass
class _Status:
    status: dict[str, int]
    shape_known: dict[str, bool]


def _fixed_trips(node: onnx.NodeProto, status: Mapping[str, int]) -> bool:
    """Whether ``Loop`` ``node`` runs a number of times that input values cannot change: its trip
    count and initial condition depend on constants and shapes only, and so does the condition its
    body computes.  The body's condition may read the iteration number, the incoming condition,
    body constants, shape-only outer-scope tensors, and loop-carried counters: carried values whose
    initial value is shape-only and whose update depends on such tensors only (tf2onnx's Keras
    ``while`` loops stop at ``Less(iteration, n) And Less(time + 1, T)``, ``time`` a carried counter)."""
    ins = list(node.input) + [""] * (2 - len(node.input))
    if not ins[0] or any(n and status.get(n, VALUE) > SHAPE for n in ins[:2]):
        return False
    body = next((a.g for a in node.attribute if a.name == "body"), None)
    if body is None or len(body.input) < 2 or not body.output:
        return False
    local = {i.name for i in body.input} | {o for n in body.node for o in n.output if o}
    local |= {t.name for t in body.initializer}
    carried = range(min(len(body.input) - 2, len(body.output) - 1, len(node.input) - 2))

    def outer(name: str) -> bool:  # an outer-scope tensor that input values cannot change
        return name not in local and status.get(name, VALUE) <= SHAPE

    # the greatest fixed point: assume every carried value with a shape-only start is a counter, and
    # drop those whose update reads anything else until none is dropped
    slots = {j for j in carried if node.input[2 + j] and status.get(node.input[2 + j], VALUE) <= SHAPE}
    while True:
        counted = {body.input[0].name, body.input[1].name} | {t.name for t in body.initializer}
        counted |= {body.input[2 + j].name for j in slots}
        for n in body.node:
            if n.op_type not in _RANDOM and all(i in counted or outer(i) for i in node_inputs(n)):
                counted.update(o for o in n.output if o)
        kept = {j for j in slots if body.output[1 + j].name in counted or outer(body.output[1 + j].name)}
        if kept == slots:
            return body.output[0].name in counted or outer(body.output[0].name)
        slots = kept


def classify(graph: onnx.GraphProto, protect: Iterable[str] = ()) -> _Status:
    """Status (CONST/SHAPE/VALUE) and shape determinacy of every tensor of ``graph``.

    ``protect`` names initializers that stay variable (the weights to differentiate)."""
    protect = set(protect)
    status: dict[str, int] = {}
    known: dict[str, bool] = {}
    for vi in graph.input:
        status[vi.name] = VALUE
        known[vi.name] = True
    for t in graph.initializer:
        status[t.name] = VALUE if t.name in protect else CONST
        known[t.name] = True
    for n in graph.node:
        ins = node_inputs(n)
        st_in = [status.get(i, VALUE) for i in ins]
        op = n.op_type if n.domain in _DEFAULT_DOMAINS else f"{n.domain}.{n.op_type}"
        if op in _RANDOM:
            st = VALUE
        elif op in ("Shape", "Size"):
            x = n.input[0]
            st = status.get(x, VALUE) if status.get(x, VALUE) == CONST else (SHAPE if known.get(x, False) else VALUE)
        else:
            st = max(st_in, default=CONST)
        args = _SHAPE_ARGS.get(op, ())
        if op == "Loop" and _fixed_trips(n, status):
            # a counted loop (torch's nn.EmbeddingBag export loops once per bag): ONNX requires a scan
            # output to keep its shape across iterations, so its shape follows the body's, not the values
            kn = all(known.get(i, False) for i in ins)
        elif args is None:
            kn = all(s <= SHAPE for s in st_in) and all(known.get(i, False) for i in ins)
        else:
            kn = all(known.get(i, False) for i in ins) and all(
                status.get(n.input[k], VALUE) <= SHAPE for k in args if k < len(n.input) and n.input[k]
            )
        for o in n.output:
            if o:
                status[o] = st
                known[o] = kn or st <= SHAPE
    return _Status(status, known)


# ---------------------------------------------------------------------------------------- folding


def _fold_known_shapes(model: onnx.ModelProto) -> int:
    """``Shape``/``Size`` of tensors with a static inferred shape → initializers."""
    table = _static_dims(model)
    g = model.graph
    keep: list[onnx.NodeProto] = []
    folded = 0
    for n in g.node:
        if n.domain in _DEFAULT_DOMAINS and n.op_type in ("Shape", "Size") and n.output[0]:
            dims = table.get(n.input[0], (0, None))[1]
            if dims is not None:
                if n.op_type == "Size":
                    value = np.asarray(int(np.prod(dims, dtype=np.int64)), np.int64)
                else:
                    start = next((int(a.i) for a in n.attribute if a.name == "start"), 0)
                    end = next((int(a.i) for a in n.attribute if a.name == "end"), None)
                    value = np.asarray(dims[slice(start, end)], np.int64)
                g.initializer.append(numpy_helper.from_array(value, n.output[0]))
                folded += 1
                continue
        keep.append(n)
    if folded:
        del g.node[:]
        g.node.extend(keep)
    return folded


def _fold(
    model: onnx.ModelProto,
    st: _Status,
    levels: set[int],
    feeds: Mapping[str, NDArray[Any]] | None,
    extra: list[str],
    info: StaticInfo,
) -> tuple[int, dict[str, NDArray[Any]]]:
    """Replace the tensors of status in ``levels`` that feed other nodes by initializers (one
    onnxruntime run, which also evaluates the ``extra`` tensors); drop the nodes that computed them.
    Returns the number of folded tensors and the values of ``extra``."""
    g = model.graph
    inits = {t.name for t in g.initializer}
    frontier: list[str] = []
    seen: set[str] = set()

    def add(name: str) -> None:
        if name and name not in seen and name not in inits and st.status.get(name, VALUE) in levels:
            seen.add(name)
            frontier.append(name)

    for n in g.node:
        outs = [o for o in n.output if o]
        if outs and st.status.get(outs[0], VALUE) in levels:
            continue
        for i in node_inputs(n):
            add(i)
    for o in g.output:
        add(o.name)
    if not frontier and not extra:
        return 0, {}
    from ..runtime import ANALYSIS_SECONDS

    constant = levels == {CONST} and not extra
    what = "folding constant tensors of the gradient working copy" if constant else "the gradient working copy"
    wanted = frontier + [e for e in extra if e not in seen]
    values = _run(model, wanted, feeds, what=what, budget=ANALYSIS_SECONDS if constant else None)
    info.runs += 1
    for name in frontier:
        v = values[name]
        if v.dtype == object:
            raise ModelError(f"tensor {name!r} holds strings; cannot fold it into the gradient working copy")
        g.initializer.append(numpy_helper.from_array(np.require(v, requirements="C"), name))  # (keeps rank 0)
    if frontier:
        keep = [n for n in g.node if not (n.output and n.output[0] and st.status.get(n.output[0], VALUE) in levels)]
        del g.node[:]
        g.node.extend(keep)
    info.folded += len(frontier)
    return len(frontier), {e: values[e] for e in extra}


def _cond_value(v: NDArray[Any], node: onnx.NodeProto) -> bool:
    arr = np.asarray(v)
    if arr.size != 1:
        raise ModelError(f"If node {node.name!r}: its condition has {arr.size} elements, expected one")
    return bool(arr.reshape(-1)[0])


def _inline(model: onnx.ModelProto, decisions: Mapping[int, bool], info: StaticInfo) -> int:
    """Replace the If nodes at the given graph positions by their taken branches."""
    if not decisions:
        return 0
    from .prepare import _Names

    g = model.graph
    for k, n in enumerate(g.node):
        if k in decisions:
            info.inlined[n.name or f"If#{k}"] = "then_branch" if decisions[k] else "else_branch"
            log.debug("If node %r: inlined its %s", n.name, "then_branch" if decisions[k] else "else_branch")
    inline_decided(g, decisions, _Names(g))
    _constants_to_initializers(g)
    return len(decisions)


def _strip_shapes(model: onnx.ModelProto) -> None:
    """Forget exporter-declared intermediate and output shapes, subgraphs included (they may be
    wrong, e.g. a declared rank that the graph does not produce: we re-infer)."""
    for _, g in walk_graphs(model.graph):
        del g.value_info[:]
        for o in g.output:
            if o.type.HasField("tensor_type"):
                o.type.tensor_type.ClearField("shape")


def make_static(
    model: onnx.ModelProto,
    feeds: Mapping[str, NDArray[Any]] | None,
    *,
    protect: Iterable[str] = (),
    input_shapes: Mapping[str, tuple[int, ...]] | None = None,
) -> tuple[onnx.ModelProto, StaticInfo]:
    """A copy of ``model`` with static shapes: see the module docstring.

    ``feeds`` are the calibration inputs at the working shapes (they fix the input dims); without
    them, ``input_shapes`` fixes the dims, shape-only tensors are computed on zeros and If conditions
    that depend on input values stay unresolved.  ``protect`` names initializers that are never
    folded (the weights being differentiated).  Expects a normalized model (no Constant nodes).
    """
    t0 = time.perf_counter()
    m = onnx.ModelProto()
    m.CopyFrom(model)
    info = StaticInfo()
    protect = set(protect)
    shapes = {k: tuple(int(d) for d in np.shape(v)) for k, v in (feeds or {}).items()}
    if input_shapes:
        shapes = {**input_shapes, **shapes}
    set_input_shapes(m, shapes)
    _strip_shapes(m)
    run_feeds: Mapping[str, NDArray[Any]] | None = feeds
    if feeds is None:
        run_feeds = _zeros_for(m)
    for _ in range(_MAX_ROUNDS):
        m = _infer(m)
        changed = _fold_known_shapes(m)
        st = classify(m.graph, protect)
        folded, _ = _fold(m, st, {CONST}, None, [], info)
        changed += folded
        if folded:
            st = classify(m.graph, protect)
        decisions = _const_conditions(m)
        changed += _inline(m, decisions, info)
        if changed:
            continue
        # shape-only tensors inference could not follow, and conditions on input values: one real run
        ifs = [(k, n) for k, n in enumerate(m.graph.node) if n.op_type == "If" and n.domain in _DEFAULT_DOMAINS]
        value_ifs = [(k, n) for k, n in ifs if st.status.get(n.input[0], VALUE) == VALUE]
        if feeds is None:
            value_ifs = []
        conds = [n.input[0] for _, n in value_ifs]
        folded, vals = _fold(m, st, {CONST, SHAPE}, run_feeds, conds, info)
        decisions = {}
        for k, n in value_ifs:
            v = _cond_value(vals[n.input[0]], n)
            info.guards.append(Guard(n.name or f"If#{k}", n.input[0], v))
            decisions[k] = v
        # the fold removed nodes: positions of the Ifs moved
        if decisions:
            pos = {id(n): k for k, n in enumerate(m.graph.node)}
            by_node = {id(n): decisions[k] for k, n in value_ifs}
            decisions = {pos[i]: v for i, v in by_node.items() if i in pos}
        changed = folded + _inline(m, decisions, info)
        if not changed:
            break
    else:  # pragma: no cover - a bug guard
        raise ModelError(f"shape folding did not settle after {_MAX_ROUNDS} rounds")
    _drop_dead(m)
    m = _infer(m)
    recorded = _record_shapes(m, run_feeds, protect, info)
    info.recorded = len(recorded)
    info.recorded_names = frozenset(recorded)
    if recorded:
        m = _infer(m, recorded)
    info.seconds = time.perf_counter() - t0
    log.debug(
        "static shapes: %d tensors folded, %d If inlined, %d shapes recorded, %d onnxruntime runs, %.2fs",
        info.folded,
        len(info.inlined),
        info.recorded,
        info.runs,
        info.seconds,
    )
    return m, info


def _drop_dead(model: onnx.ModelProto) -> None:
    """Remove the nodes and initializers the outputs no longer need (the untaken branches' weights
    among them), in place; graph inputs stay."""
    g = model.graph
    prod = {o: n for n in g.node for o in n.output if o}
    need: set[str] = set()
    live: set[int] = set()
    stack = [o.name for o in g.output]
    while stack:
        t = stack.pop()
        if t in need:
            continue
        need.add(t)
        node = prod.get(t)
        if node is not None and id(node) not in live:
            live.add(id(node))
            stack.extend(node_inputs(node))
    nodes = [n for n in g.node if id(n) in live]
    if len(nodes) != len(g.node):
        del g.node[:]
        g.node.extend(nodes)
    inits = [t for t in g.initializer if t.name in need]
    if len(inits) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(inits)


def _zeros_for(model: onnx.ModelProto) -> dict[str, NDArray[Any]]:
    feeds: dict[str, NDArray[Any]] = {}
    for vi in model.graph.input:
        tt = vi.type.tensor_type
        if not all(d.HasField("dim_value") for d in tt.shape.dim):
            continue
        dims = [int(d.dim_value) for d in tt.shape.dim]
        feeds[vi.name] = np.zeros(dims, helper.tensor_dtype_to_np_dtype(tt.elem_type))
    return feeds


def _const_conditions(model: onnx.ModelProto) -> dict[int, bool]:
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[int, bool] = {}
    for k, n in enumerate(model.graph.node):
        if n.op_type == "If" and n.domain in _DEFAULT_DOMAINS and n.input[0] in inits:
            out[k] = _cond_value(numpy_helper.to_array(inits[n.input[0]]), n)
    return out


def _record_shapes(
    model: onnx.ModelProto, feeds: Mapping[str, NDArray[Any]] | None, protect: set[str], info: StaticInfo
) -> list[str]:
    """Write the observed shape of every shape-determined tensor that inference leaves unknown."""
    g = model.graph
    table = _static_dims(model)
    st = classify(g, protect)
    missing = [
        o for n in g.node for o in n.output if o and table.get(o, (0, None))[1] is None and st.shape_known.get(o, False)
    ]
    if not missing or feeds is None:
        return []
    values = _run(model, missing, feeds)
    info.runs += 1
    kept = [v for v in g.value_info if v.name not in set(missing)]
    del g.value_info[:]
    g.value_info.extend(kept)
    for name in missing:
        v = values[name]
        if v.dtype == object:
            continue
        elem = helper.np_dtype_to_tensor_dtype(v.dtype)
        g.value_info.append(helper.make_tensor_value_info(name, elem, list(v.shape)))
    return missing


def evaluate_conditions(
    model: onnx.ModelProto, guards: Iterable[Guard], feeds: Mapping[str, NDArray[Any]]
) -> list[Guard]:
    """The guards whose condition, evaluated on ``feeds``, differs from the recorded value."""
    guards = list(guards)
    if not guards:
        return []
    values = _run(model, [g.tensor for g in guards], feeds)
    return [g for g in guards if _cond_value(values[g.tensor], onnx.NodeProto(name=g.node)) != g.value]


def weights_reached(
    model: onnx.ModelProto, feeds: Mapping[str, NDArray[Any]], names: Iterable[str]
) -> tuple[list[str], list[Guard]]:
    """Which of ``names`` (weights, possibly in If branches) exist once every If is resolved on
    ``feeds`` (as given: no dims are fixed).  Returns ``(reached, guards)``."""
    from .prepare import normalize

    m = normalize(model)
    _strip_shapes(m)
    info = StaticInfo()
    for _ in range(_MAX_ROUNDS):
        ifs = [(k, n) for k, n in enumerate(m.graph.node) if n.op_type == "If" and n.domain in _DEFAULT_DOMAINS]
        if not ifs:
            break
        inits = {t.name for t in m.graph.initializer}
        conds = [n.input[0] for _, n in ifs if n.input[0] not in inits]
        vals = _run(m, conds, feeds) if conds else {}
        decisions: dict[int, bool] = {}
        for k, n in ifs:
            if n.input[0] in inits:
                v = _cond_value(numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == n.input[0])), n)
            else:
                v = _cond_value(vals[n.input[0]], n)
                info.guards.append(Guard(n.name or f"If#{k}", n.input[0], v))
            decisions[k] = v
        _inline(m, decisions, info)
    _drop_dead(m)
    present = {t.name for t in m.graph.initializer}
    return [w for w in names if w in present], info.guards


__all__ = [
    "CONST",
    "SHAPE",
    "VALUE",
    "Guard",
    "StaticInfo",
    "classify",
    "evaluate_conditions",
    "make_static",
    "set_input_shapes",
    "weights_reached",
]

_ = TensorProto  # re-exported type constants are used by callers' annotations
