"""Open a fixed batch by following the batch axis through the graph.

A model traced at a fixed batch ``b`` writes ``b`` into constants: the input shapes, and the targets
of ``Reshape`` and ``Expand``.  :func:`chita_onnx.activations.open_batch` opens the inputs and the
``Reshape`` targets that *start* with ``b``.  That covers a flattening ``[b, -1]``, but not what
torch's dynamo exporter writes for attention from a static example: ``nn.MultiheadAttention``
reshapes ``[T, b, 3, d]`` with the batch in the middle and ``[T, b·heads, d/heads]`` with the batch
merged into the heads.

:func:`trace_open` follows the batch from the inputs, op by op, as a position: an axis of the
tensor, and whether it is that axis alone or the major, minor or a middle factor of an axis merged
with others (a MobileViT's patches or a Swin's windows merged into the batch, then an attention's
``[T·b·P, d]``).  A
``Reshape`` keeps the elements in row-major order, so the batch lands where the product of the
target's leading entries equals the product of the input's dims before it; that entry becomes
``-1``.  An ``Expand`` target gets ``1`` at the batch axis.  Any op it does not know, or a batch
that a ``Squeeze``, ``Slice``, reduction or contraction would touch, stops it (``None``).  The
caller checks the copy by running it (:func:`chita_onnx.activations.opened_alike`): a wrong guess
cannot pass that check.  Graph code only: reshapes, no numerics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .activations import _attr
from .data_types import InputSpec
from .errors import ModelError
from .gradients.prepare import _infer_shapes, _shape_table
from .graph import _constant_values

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class At:
    """Where a tensor's batch is: ``axis``, and ``kind``: the axis alone (``"own"``), or the major
    (``"major"``: ``[b·h, ...]``, batch outermost), minor (``"minor"``: ``[t·b, ...]``, as
    ``x.view(-1, d)`` of a ``[T, b, d]`` tensor) or a middle (``"middle"``: ``[t·b·h, ...]``, as
    ``x.view(-1, d)`` of a ``[T, b·h, d]`` tensor) factor of an axis merged with others; ``outer``:
    for ``"middle"``, the product of the factors before the batch in that axis (``t``)."""

    axis: int
    kind: str = "own"
    outer: int = 1

    def moved(self, axis: int) -> At:
        """The same position on another axis (an op that moves or renumbers the axes)."""
        return replace(self, axis=axis)


class _StopError(Exception):
    """The batch cannot be followed through this node."""


#: Ops whose output has the first input's shape, element for element.
_SAME = frozenset(
    {
        "Identity", "Cast", "CastLike", "Relu", "Sigmoid", "Tanh", "Erf", "Exp", "Log", "Sqrt", "Neg", "Abs",
        "Softplus", "Softsign", "Gelu", "LeakyRelu", "Elu", "Selu", "Celu", "HardSigmoid", "HardSwish", "Mish",
        "Clip", "Dropout", "Not", "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu",
        "IsNaN", "IsInf", "Shrink",
    }
)  # fmt: skip
#: Elementwise ops with broadcasting over all their inputs.
_BROADCAST = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Where", "Max", "Min", "Sum", "Mean", "Equal", "Greater", "Less",
     "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "PRelu", "Mod"}
)  # fmt: skip
#: Ops on ``[N, C, ...]`` tensors that keep the batch on axis 0.
_CHANNELS_FIRST = frozenset(
    {"Conv", "ConvTranspose", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool",
     "BatchNormalization", "InstanceNormalization", "LRN", "GroupNormalization", "DepthToSpace", "SpaceToDepth"}
)  # fmt: skip
_REDUCE = frozenset(
    {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
     "ReduceLogSumExp", "ReduceSumSquare"}
)  # fmt: skip


def _run_shapes(model: onnx.ModelProto, specs: Sequence[InputSpec], names: list[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of ``names`` in one onnxruntime run of ``model`` on zeros (its inputs are all fixed):
    for values whose shape inference cannot follow (bounds computed from ``Shape``)."""
    from . import runtime
    from .errors import ChitaError

    m = onnx.ModelProto()
    m.CopyFrom(model)
    known = {o.name for o in m.graph.output}
    m.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names if n not in known)
    feeds = {}
    for s in specs:
        if any(not isinstance(d, int) or d < 0 for d in s.shape):
            return {}
        feeds[s.name] = np.zeros(tuple(int(d) for d in s.shape), dtype=s.dtype)  # type: ignore[arg-type]
    try:
        sess = runtime.session(m, what="the model (shapes of its fixed batch)", threads=1, check=False)
        values = runtime.run(sess, [*names], feeds, what="the model on zeros (shapes of its fixed batch)")
    except ChitaError as exc:
        log.debug("no shapes from a run: %s", exc)
        return {}
    return {n: tuple(int(d) for d in np.shape(v)) for n, v in zip(names, values, strict=True)}


def _static_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Every main-graph value's shape where shape inference fixes all its dims."""
    try:
        table = _shape_table(_infer_shapes(model))
    except ModelError:  # a model shape inference cannot read: nothing known
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for name, (_, dims) in table.items():
        if dims is not None and all(d is not None for d in dims):
            out[name] = tuple(int(d or 0) for d in dims)
    return out


#: Reshapes whose batch position is ambiguous (always so for a batch of one) are decided by
#: backtracking: a later op that cannot take the batch where a guess put it undoes the latest guess.
#: At most this many passes over the graph.
MAX_PASSES = 256


@dataclass
class _Pass:
    """One pass over the graph: the guess taken at each ambiguous ``Reshape`` (by node index), the
    guesses met (node index, number of candidates), the batch positions and the target rewrites."""

    choices: dict[int, int]
    met: list[tuple[int, int]]
    at: dict[str, At]
    rewrites: list[tuple[onnx.NodeProto, int, np.ndarray]]


def trace_open(model: onnx.ModelProto, specs: Sequence[InputSpec], name: str = "chita_batch") -> onnx.ModelProto | None:
    """A copy of ``model`` (fixed batch ``b`` on every batched input) whose inputs leave the batch
    open and whose ``Reshape``/``Expand`` targets follow it (module docstring), or None where the
    batch cannot be followed.  Only the main graph is read; a subgraph that reads a batched tensor
    stops it."""
    dims = [s.shape[s.batch_axis] for s in specs if s.batch_axis is not None]
    size = next((d for d in dims if isinstance(d, int)), 0)
    if size < 1:
        return None
    shapes = _static_shapes(model)
    missing = [o for n in model.graph.node for o in n.output if o and o not in shapes]
    if missing:
        shapes.update(_run_shapes(model, specs, missing))
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    consts.update({k: numpy_helper.to_array(t) for k, (_, t) in _constant_values(g).items()})
    _fold_small(g, consts)
    axes = {s.name: s.batch_axis for s in specs}
    start: dict[str, At] = {}
    for vi in g.input:
        axis = axes.get(vi.name)
        tt = vi.type.tensor_type
        if axis is None or not tt.HasField("shape") or axis >= len(tt.shape.dim):
            continue
        start[vi.name] = At(axis)
    choices: dict[int, int] = {}
    done: _Pass | None = None
    for _ in range(MAX_PASSES):
        run = _Pass(dict(choices), [], dict(start), [])
        try:
            _walk(g, run, shapes, consts, size)
            done = run
            break
        except _StopError as why:
            log.debug("the fixed batch cannot be followed (%s)", why)
            for idx, n in reversed(run.met):  # the latest guess with an alternative left
                if run.choices.get(idx, 0) + 1 < n:
                    choices = {k: v for k, v in run.choices.items() if k < idx}
                    choices[idx] = run.choices.get(idx, 0) + 1
                    break
            else:
                return None
    if done is None:
        return None
    for vi in g.input:
        if vi.name in start:
            dim = vi.type.tensor_type.shape.dim[start[vi.name].axis]
            dim.ClearField("dim_value")
            dim.dim_param = name
    for k, (node, slot, value) in enumerate(done.rewrites):
        new = f"{node.input[slot]}__batch_{k}"
        g.initializer.append(numpy_helper.from_array(value.astype(np.int64), new))
        node.input[slot] = new
    del g.value_info[:]
    for vi in g.output:
        if vi.type.HasField("tensor_type"):
            vi.type.tensor_type.ClearField("shape")
    return m


def _fold_small(g: onnx.GraphProto, consts: dict[str, np.ndarray]) -> None:
    """Add to ``consts`` the integer values that ``Unsqueeze``/``Squeeze``/``Concat``/``Cast``/
    ``Identity`` compute from constants (TorchScript without constant folding writes a ``Slice``'s
    axes as ``Unsqueeze(Constant)``).  Values only read, never written into the graph."""
    for n in g.node:
        if n.domain not in ("", "ai.onnx") or not n.input or not all(i in consts for i in n.input if i):
            continue
        vals = [np.asarray(consts[i]) for i in n.input if i]
        if any(v.dtype.kind not in "iu" or v.size > 64 for v in vals):
            continue
        out: np.ndarray | None = None
        if n.op_type in ("Identity", "Cast"):
            out = vals[0]
        elif n.op_type in ("Unsqueeze", "Squeeze"):
            ax = _attr(n, "axes")
            listed = np.asarray(ax if ax is not None else (vals[1] if len(vals) > 1 else []), dtype=np.int64)
            axes = [int(a) for a in listed.reshape(-1)]
            if n.op_type == "Unsqueeze":
                out = vals[0]
                for a in sorted(a % (vals[0].ndim + len(axes)) for a in axes):
                    out = np.expand_dims(out, a)
            elif axes:
                out = np.squeeze(vals[0], axis=tuple(a % vals[0].ndim for a in axes))
        elif n.op_type == "Concat":
            out = np.concatenate([np.atleast_1d(v) for v in vals], axis=int(_attr(n, "axis", 0)))  # type: ignore[call-overload]
        if out is not None:
            consts[n.output[0]] = out


def _walk(
    g: onnx.GraphProto, run: _Pass, shapes: dict[str, tuple[int, ...]], consts: dict[str, np.ndarray], size: int
) -> None:
    """One pass (:class:`_Pass`); raises :class:`_StopError` where the batch cannot be followed."""
    for idx, node in enumerate(g.node):
        batched = [(i, run.at[t]) for i, t in enumerate(node.input) if t in run.at]
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            if batched or _reads_batched(node, run.at):
                raise _StopError(f"{node.op_type} with a subgraph")
            continue
        if not batched:
            continue
        if node.op_type == "Reshape" and node.domain in ("", "ai.onnx"):
            found = {node.output[0]: _reshape(node, idx, batched, shapes, run, size)}
        else:
            found = _follow(node, batched, shapes, consts, run.rewrites, size)
        run.at.update(found)
    if not all(o.name in run.at for o in g.output):
        raise _StopError("an output does not carry the batch")


def _reads_batched(node: onnx.NodeProto, at: dict[str, At]) -> bool:
    """Whether a subgraph of ``node`` reads a batched tensor of the outer scope."""
    for a in node.attribute:
        for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            if any(i in at for n in sub.node for i in n.input):
                return True
    return False


def _rank(name: str, shapes: dict[str, tuple[int, ...]]) -> int:
    if name not in shapes:
        raise _StopError(f"no static shape for {name!r}")
    return len(shapes[name])


def _const(node: onnx.NodeProto, slot: int, consts: dict[str, np.ndarray]) -> np.ndarray:
    if slot >= len(node.input) or node.input[slot] not in consts:
        raise _StopError(f"{node.op_type} {node.name!r}: input {slot} is not a constant")
    return np.asarray(consts[node.input[slot]])


def _axes(node: onnx.NodeProto, consts: dict[str, np.ndarray], rank: int) -> list[int] | None:
    """The ``axes`` of a node, from its attribute or its second input (None: not given)."""
    value = _attr(node, "axes")
    if value is None and len(node.input) > 1 and node.input[1]:
        value = _const(node, 1, consts).tolist()
    if value is None:
        return None
    return [int(a) % rank for a in np.atleast_1d(np.asarray(value))]


def _follow(
    node: onnx.NodeProto,
    batched: list[tuple[int, At]],
    shapes: dict[str, tuple[int, ...]],
    consts: dict[str, np.ndarray],
    rewrites: list[tuple[onnx.NodeProto, int, np.ndarray]],
    size: int,
) -> dict[str, At]:
    """Where the batch (``size`` samples) is in each output of ``node``, given where it is in its
    batched inputs."""
    op = node.op_type
    first = batched[0][1]
    outs = [o for o in node.output if o]
    if node.domain not in ("", "ai.onnx"):
        raise _StopError(f"{node.domain}.{op}")
    if op in ("Shape", "Size"):  # computed at run time from the opened tensor: no batch axis of its own
        return {}
    if op in _SAME:
        if batched[0][0] != 0:
            raise _StopError(f"{op} reads the batch as a parameter")
        return {o: first for o in outs}
    if op in _BROADCAST:
        r_out = _rank(node.output[0], shapes)
        found: At | None = None
        for i, t in enumerate(node.input):
            if not t:
                continue
            r_in = _rank(t, shapes)
            hit = next((w for k, w in batched if k == i), None)
            if hit is not None:
                w = hit.moved(hit.axis + r_out - r_in)
                if found is not None and w != found:
                    raise _StopError(f"{op} {node.name!r}: operands disagree on the batch")
                found = w
        assert found is not None
        for i, t in enumerate(node.input):
            if t and all(k != i for k, _ in batched):
                dims = shapes.get(t)
                if dims is None:
                    raise _StopError(f"{op} {node.name!r}: no static shape for {t!r}")
                pos = found.axis - (r_out - len(dims))
                if 0 <= pos < len(dims) and dims[pos] != 1:
                    raise _StopError(f"{op} {node.name!r}: an operand without the batch is not broadcast along it")
        return {o: found for o in outs}
    if op in _CHANNELS_FIRST:
        if any(k != 0 for k, _ in batched) or first.axis != 0:
            raise _StopError(f"{op} with the batch off axis 0")
        return {o: first for o in outs}
    if op in ("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization", "ArgMax", "ArgMin", "CumSum", "TopK"):
        if any(k != 0 for k, _ in batched):
            raise _StopError(f"{op} reads the batch as a parameter")
        rank = _rank(node.input[0], shapes)
        default = -1 if op in ("Softmax", "LogSoftmax", "Hardmax", "LayerNormalization", "TopK") else 0
        axis = int(_const(node, 1, consts)) if op == "CumSum" else int(_attr(node, "axis", default))  # type: ignore[call-overload]
        axis %= rank
        if axis == first.axis or (op == "LayerNormalization" and first.axis >= axis):
            raise _StopError(f"{op} {node.name!r} works along the batch")
        if op in ("ArgMax", "ArgMin") and not _attr(node, "keepdims", 1) and axis < first.axis:
            return {o: first.moved(first.axis - 1) for o in outs}
        return {o: first for o in outs}
    if op == "Transpose":
        rank = _rank(node.input[0], shapes)
        perm = _attr(node, "perm")
        order = list(perm) if perm is not None else list(reversed(range(rank)))  # type: ignore[call-overload]
        return {outs[0]: first.moved(order.index(first.axis))}
    if op == "MatMul":
        ra, rb = _rank(node.input[0], shapes), _rank(node.input[1], shapes)
        ro = _rank(node.output[0], shapes)
        found = None
        for k, w in batched:
            r = ra if k == 0 else rb
            if r < 2 or (k == 0 and w.axis == r - 1) or (k == 1 and w.axis == r - 2):
                raise _StopError(f"MatMul {node.name!r} contracts the batch")
            if (k == 0 and w.axis == r - 2) or (k == 1 and w.axis == r - 1):
                if len(batched) > 1:
                    raise _StopError(f"MatMul {node.name!r}: the batch in a matrix axis of both operands")
                here = w.moved(ro - 2 if k == 0 else ro - 1)
            else:
                here = w.moved(w.axis + ro - r)
            if found is not None and here != found:
                raise _StopError(f"MatMul {node.name!r}: operands disagree on the batch")
            found = here
        assert found is not None
        return {outs[0]: found}
    if op == "Gemm":
        if batched != [(0, first)] or first.axis != (1 if _attr(node, "transA", 0) else 0):
            raise _StopError("Gemm with the batch off its rows")
        return {outs[0]: first.moved(0)}
    if op == "Flatten":
        s, out = shapes.get(node.input[0]), shapes.get(node.output[0])
        if s is None or out is None:
            raise _StopError("Flatten without static shapes")
        return {outs[0]: _candidates(s, first, out, size, f"Flatten {node.name!r}")[0][0]}
    if op == "Unsqueeze":
        r_out = _rank(node.output[0], shapes)
        added = _axes(node, consts, r_out) or []
        kept = [a for a in range(r_out) if a not in added]
        return {outs[0]: first.moved(kept[first.axis])}
    if op == "Squeeze":
        rank = _rank(node.input[0], shapes)
        gone = _axes(node, consts, rank)
        if gone is None or first.axis in gone:
            raise _StopError("Squeeze of the batch axis")
        return {outs[0]: first.moved(first.axis - sum(a < first.axis for a in gone))}
    if op in _REDUCE:
        rank = _rank(node.input[0], shapes)
        reduced = _axes(node, consts, rank)
        if reduced is None or not reduced:
            if reduced is not None and _attr(node, "noop_with_empty_axes", 0):
                return {outs[0]: first}
            raise _StopError(f"{op} over every axis")
        if first.axis in reduced:
            raise _StopError(f"{op} over the batch")
        if _attr(node, "keepdims", 1):
            return {outs[0]: first}
        return {outs[0]: first.moved(first.axis - sum(a < first.axis for a in reduced))}
    if op == "Gather":
        if any(k != 0 for k, _ in batched):
            raise _StopError("Gather indices carry the batch")
        rank = _rank(node.input[0], shapes)
        axis = int(_attr(node, "axis", 0)) % rank  # type: ignore[call-overload]
        if axis == first.axis:
            raise _StopError("Gather along the batch")
        if axis > first.axis:
            return {outs[0]: first}
        return {outs[0]: first.moved(first.axis - 1 + _rank(node.input[1], shapes))}
    if op in ("Split", "Slice", "Pad"):
        rank = _rank(node.input[0], shapes)
        if any(k != 0 for k, _ in batched):
            raise _StopError(f"{op} parameters carry the batch")
        if op == "Split":
            touched = [int(_attr(node, "axis", 0)) % rank]  # type: ignore[call-overload]
        elif op == "Slice":  # the bounds may be computed (from a Shape): only the axes matter
            if len(node.input) > 3 and node.input[3]:
                touched = [int(a) % rank for a in _const(node, 3, consts)]
            else:
                starts = shapes.get(node.input[1])
                if starts is None or len(starts) != 1:
                    raise _StopError(f"Slice {node.name!r}: no static shape for its starts")
                touched = list(range(starts[0]))
        else:
            pads = _const(node, 1, consts) if len(node.input) > 1 else np.asarray(_attr(node, "pads", []))
            chosen = (
                [int(a) % rank for a in _const(node, 3, consts)]
                if len(node.input) > 3 and node.input[3]
                else list(range(rank))
            )
            half = len(pads) // 2
            touched = [a for j, a in enumerate(chosen) if pads[j] != 0 or pads[j + half] != 0]
        if first.axis in touched:
            raise _StopError(f"{op} along the batch")
        return {o: first for o in outs}
    if op == "Concat":
        rank = _rank(node.output[0], shapes)
        axis = int(_attr(node, "axis", 0)) % rank  # type: ignore[call-overload]
        if axis == first.axis or len(batched) != sum(1 for t in node.input if t):
            raise _StopError("Concat along the batch, or of a tensor without it")
        if any(w != first for _, w in batched):
            raise _StopError("Concat operands disagree on the batch")
        return {outs[0]: first}
    if op == "Expand":
        if any(k != 0 for k, _ in batched):
            raise _StopError("Expand's shape carries the batch")
        target = _const(node, 1, consts).astype(np.int64).copy()
        r_in = _rank(node.input[0], shapes)
        r_out = max(r_in, target.size)
        axis = first.axis + r_out - r_in
        pos = axis - (r_out - target.size)
        if 0 <= pos < target.size:
            target[pos] = 1
            rewrites.append((node, 1, target))
        return {outs[0]: first.moved(axis)}
    raise _StopError(f"{op} is not followed")


def _span(s: tuple[int, ...], at: At, size: int) -> tuple[int, int]:
    """``(L, R)``: the elements before and after a batch of ``size`` in row-major order of shape ``s``."""
    whole = int(np.prod(s))
    if at.kind == "own" or at.kind == "major":
        before = int(np.prod(s[: at.axis]))
    elif at.kind == "middle":
        before = int(np.prod(s[: at.axis])) * at.outer
    else:
        before = int(np.prod(s[: at.axis + 1])) // size
    return before, whole // (before * size)


def _candidates(s: tuple[int, ...], at: At, target: tuple[int, ...], size: int, what: str) -> list[tuple[At, int]]:
    """Where a row-major reshape from ``s`` to ``target`` can put the batch, best guess first, with
    the target axis that holds it: alone where an entry is exactly the batch; else as the minor
    factor of an axis (the ``view(-1, d)`` of a sequence-first ``[T, b, d]``) or the major one
    (``view(T, b·heads, d/heads)``), those that keep the dims on the far side of the batch as they
    were first; last, as a middle factor (the ``view(-1, d)`` of a ``[T, b·h, d]``: patches or
    windows merged into the batch before an attention).  A batch of one fits many of them."""
    before, after = _span(s, at, size)
    lo, hi = _sides(s, at, size)
    t = [int(v) for v in target]
    own: list[tuple[At, int]] = []
    ranked: list[tuple[int, tuple[At, int]]] = []
    for j in range(len(t)):
        lead, tail = int(np.prod(t[:j])), int(np.prod(t[j + 1 :]))
        if lead == before and t[j] == size and tail == after:
            own.append((At(j), j))
        if lead * t[j] == before * size and tail == after and t[j] > size:
            ranked.append((0 if tuple(t[j + 1 :]) == hi else 2, (At(j, "minor"), j)))
        if lead == before and t[j] > size and t[j] % size == 0 and (t[j] // size) * tail == after:
            ranked.append((1 if tuple(t[:j]) == lo else 3, (At(j, "major"), j)))
        if before % lead == 0 and before > lead and t[j] % ((before // lead) * size) == 0:
            inner = t[j] // ((before // lead) * size)
            if inner > 1 and inner * tail == after:
                ranked.append((4, (At(j, "middle", before // lead), j)))
    found = own + [c for _, c in sorted(ranked, key=lambda r: r[0])]
    if not found:
        raise _StopError(f"{what} splits the batch across axes")
    return found


def _sides(s: tuple[int, ...], at: At, size: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The dims before and after the batch (a merged axis's other factor counted on its side)."""
    a = at.axis
    rest = int(s[a]) // size
    if at.kind == "major":
        return tuple(s[:a]), ((rest,) if rest > 1 else ()) + tuple(s[a + 1 :])
    if at.kind == "minor":
        return tuple(s[:a]) + ((rest,) if rest > 1 else ()), tuple(s[a + 1 :])
    if at.kind == "middle":
        inner = rest // at.outer
        return (*s[:a], at.outer), ((inner,) if inner > 1 else ()) + tuple(s[a + 1 :])
    return tuple(s[:a]), tuple(s[a + 1 :])


def _reshape(
    node: onnx.NodeProto,
    idx: int,
    batched: list[tuple[int, At]],
    shapes: dict[str, tuple[int, ...]],
    run: _Pass,
    size: int,
) -> At:
    """Where a ``Reshape`` puts a batch of ``size`` (:func:`_candidates`; the pass's guess where
    there are several); records its target with that entry ``-1`` (every other entry as resolved
    for the fixed batch)."""
    if any(k != 0 for k, _ in batched):
        raise _StopError("a Reshape whose target carries the batch")
    s = shapes.get(node.input[0])
    out = shapes.get(node.output[0])
    if s is None or out is None:
        raise _StopError("a Reshape without static shapes")
    found = _candidates(s, batched[0][1], out, size, f"Reshape {node.name!r}")
    if len(found) > 1:
        run.met.append((idx, len(found)))
    where, j = found[min(run.choices.get(idx, 0), len(found) - 1)]
    opened = np.asarray(out, dtype=np.int64).copy()
    opened[j] = -1
    run.rewrites.append((node, 1, opened))
    return where
