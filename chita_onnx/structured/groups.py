"""Channel dependency groups, found from the graph.

Every prunable layer (Conv, Gemm, MatMul with a constant weight) *produces* a channel space: one
**unit** per output channel.  The analysis walks the graph in topological order and annotates each
tensor with its channel axis and, for every position along that axis, the unit it carries
(:class:`Annot`).  Ops move, copy or join units:

* BatchNormalization, InstanceNormalization, activations, pooling, Pad, Resize, Cast, Dropout and
  element-wise ops with constants keep the units (their per-channel parameters become *params* that
  are sliced with the channels);
* a depthwise Conv follows its input (its filters are params; ``group`` is rewritten);
* element-wise ops between two annotated tensors (residual ``Add``, SE ``Mul``) **join** the units
  position by position (union-find), so all convs feeding one residual Add share one mask;
* Concat concatenates the positions (offsets shift); Split and Slice on the channel axis select
  sub-ranges (their sizes/bounds are rewritten);
* Transpose moves the axis (NHWC graphs from tf2onnx); Flatten/Reshape/Squeeze/Unsqueeze move it or
  merge it with the following axes (each unit then covers ``multiplicity`` positions, e.g. the
  ``C·H·W`` inputs of a Gemm after Flatten), decided from the concrete shapes of two probe runs;
* Conv/Gemm/MatMul/LSTM/GRU/RNN weights that read annotated positions are *consumers*: their input
  columns are sliced (and re-fitted).

A unit joined with positions no prunable layer produced (a graph input, an opaque op) is *pinned*
(always kept).  A **group** is a connected set of channel spaces (spaces whose units were joined);
a group that reaches a graph output, a channel-mixing op (Softmax/LayerNorm/Reduce over the channel
axis, a MatMul of two activations, Gather on channels, ...) or any op the rewriter does not know is
*blocked*: it stays whole, and :attr:`Group.reasons` says why.  Reshapes whose target shape is
computed at run time are accepted *tentatively*: the pruned model is checked against the masked
model, and a tentative group is blocked if that check fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper

from .capture import Shapes
from .graphutil import Constants, node_label

log = logging.getLogger(__name__)

#: Unit id of positions that can never be removed (not produced by a prunable layer, or joined with such).
PINNED = 0

_UNARY = {
    "Relu", "LeakyRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Elu", "Selu", "Celu", "Softplus",
    "Softsign", "Clip", "Erf", "Gelu", "Mish", "Identity", "Cast", "Dropout", "Neg", "Abs", "Sqrt", "Exp", "Log",
    "Reciprocal", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "ThresholdedRelu", "Shrink", "Not", "IsNaN",
    "IsInf", "Swish", "QuickGelu", "FastGelu",
}  # fmt: skip
_BINARY = {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean", "PRelu", "Where", "Equal", "Greater", "Less",
    "GreaterOrEqual", "LessOrEqual", "And", "Or", "Xor", "Mod", "BitShift",
}  # fmt: skip
_POOL = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"}
_REDUCE = {
    "ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceProd", "ReduceSumSquare",
    "ReduceLogSum", "ReduceLogSumExp",
}  # fmt: skip
_RESHAPE = {"Reshape", "Flatten", "Squeeze", "Unsqueeze"}
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@dataclass(frozen=True)
class Annot:
    """Channel annotation of a tensor: its channel ``axis`` and the unit of each position on it."""

    axis: int
    units: NDArray[np.int64]


@dataclass(frozen=True)
class Slice:
    """Input ``slot`` of node ``node`` is a constant sliced along ``axis`` by the positions' units.

    ``kind``: ``producer`` (output channels of a layer), ``param`` (per-channel parameter: BN,
    bias, depthwise filter, ...) or ``consumer`` (input columns of a layer).  ``groups`` > 1 marks
    the input columns of a grouped Conv (axis 1 holds ``C/groups`` columns per output group).
    """

    node: int
    slot: int
    axis: int
    units: NDArray[np.int64]
    kind: str
    groups: int = 1


@dataclass(frozen=True)
class Rewrite:
    """A non-weight change that follows the kept channels.

    * ``attr``: integer attribute ``name`` of ``node`` := number of kept positions in ``units[0]``;
    * ``shape``: entry ``index`` of the 1-D int constant in input ``slot`` := kept positions;
    * ``split``: the split sizes of ``node`` := kept positions of each ``units[i]`` (output i);
    * ``slice``: bounds ``start``/``end`` of the sliced channel axis (entry ``index`` of the
      starts/ends lists) := kept positions before them; ``units[0]`` are the input's positions.
    """

    kind: str
    node: int
    units: tuple[NDArray[np.int64], ...]
    name: str = ""
    slot: int = 0
    index: int = 0
    start: int = 0
    end: int = 0


@dataclass(frozen=True)
class Consumer:
    """A layer whose input columns read channel positions: the re-fit and selection work on these.

    ``kind``: ``conv``, ``gemm``, ``matmul`` or ``rnn``; ``input`` is the activation tensor and
    ``units`` its positions on the channel ``axis`` (1 for conv, last for the others).
    """

    node: int
    kind: str
    input: str
    axis: int
    units: NDArray[np.int64]


@dataclass
class Group:
    """Channel spaces that must be pruned together.

    ``classes`` are the selection variables (joined units); ``size`` = number of channels.
    ``blocks`` > 1: the channels split into that many equal consecutive blocks (grouped Conv) and every
    block must keep the same number.  ``reasons`` non-empty: the group is kept whole.
    """

    id: int
    producers: list[str]
    classes: NDArray[np.int64]
    pinned: int
    consumers: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    tentative: list[str] = field(default_factory=list)
    blocks: int = 1
    block_of: NDArray[np.int64] | None = None

    @property
    def size(self) -> int:
        return int(self.classes.size)

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.size - self.pinned > 0


class _UnionFind:
    def __init__(self) -> None:
        self.parent: list[int] = [PINNED]

    def new(self, n: int) -> NDArray[np.int64]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return np.arange(start, start + n, dtype=np.int64)

    def find(self, a: int) -> int:
        p = self.parent
        root = a
        while p[root] != root:
            root = p[root]
        while p[a] != root:
            p[a], a = root, p[a]
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if rb == PINNED or (ra != PINNED and rb < ra):
            ra, rb = rb, ra
        self.parent[rb] = ra  # PINNED (0) always stays the root of its class

    def roots(self, units: NDArray[np.int64]) -> NDArray[np.int64]:
        return np.fromiter((self.find(int(u)) for u in units), dtype=np.int64, count=units.size)


@dataclass
class Analysis:
    """The result of :func:`analyse`: groups, the constant slices and rewrites that follow them."""

    model: onnx.ModelProto
    annots: dict[str, Annot]
    slices: list[Slice]
    rewrites: list[Rewrite]
    consumers: list[Consumer]
    groups: list[Group]
    unit_class: NDArray[np.int64]  # unit id -> class root
    class_group: dict[int, int]  # class root -> group id

    def group_of_units(self, units: NDArray[np.int64]) -> set[int]:
        return {self.class_group[c] for c in np.unique(self.unit_class[units]) if c in self.class_group}

    def keep_positions(self, units: NDArray[np.int64], kept: NDArray[np.bool_]) -> NDArray[np.bool_]:
        """Which positions survive when ``kept[unit_class]`` says which classes are kept."""
        return kept[self.unit_class[units]]


class _Walker:
    def __init__(self, model: onnx.ModelProto, shapes: Sequence[Shapes]) -> None:
        self.model = model
        self.graph = model.graph
        self.shapes = list(shapes)
        self.consts = Constants(self.graph)
        self.uf = _UnionFind()
        self.ann: dict[str, Annot] = {}
        self.slices: list[Slice] = []
        self.rewrites: list[Rewrite] = []
        self.consumers: list[Consumer] = []
        self.spaces: list[tuple[str, NDArray[np.int64]]] = []  # (producer label, units)
        self.blocked: list[tuple[int, str]] = []  # (unit, reason)
        self.tentative: list[tuple[int, str]] = []
        self.block_constraints: list[list[NDArray[np.int64]]] = []
        opset = 0
        for op in model.opset_import:
            if op.domain in ("", "ai.onnx"):
                opset = int(op.version)
        self.opset = opset
        self.readers: dict[str, list[int]] = {}
        for i, node in enumerate(self.graph.node):
            for x in node.input:
                if x:
                    self.readers.setdefault(x, []).append(i)

    # ------------------------------------------------------------------------------ helpers

    def shape(self, name: str, probe: int = 0) -> tuple[int, ...] | None:
        if name in self.shapes[probe]:
            return self.shapes[probe][name]
        value = self.consts.value(name)
        return None if value is None else tuple(value.shape)

    def block(self, units: NDArray[np.int64] | None, reason: str) -> None:
        if units is not None and units.size:
            for u in np.unique(units):
                if u != PINNED:
                    self.blocked.append((int(u), reason))

    def block_inputs(self, node: onnx.NodeProto, label: str, why: str) -> None:
        for x in node.input:
            a = self.ann.get(x)
            if a is not None:
                self.block(a.units, f"{why} ({node.op_type} {label} reads channel tensor {x!r})")

    def pin(self, units: NDArray[np.int64]) -> None:
        for u in np.unique(units):
            self.uf.union(PINNED, int(u))

    def join(self, a: NDArray[np.int64], b: NDArray[np.int64]) -> None:
        for x, y in zip(a.tolist(), b.tolist(), strict=True):
            self.uf.union(x, y)

    def new_space(self, label: str, n: int) -> NDArray[np.int64]:
        units = self.uf.new(n)
        self.spaces.append((label, units))
        return units

    def attr(self, node: onnx.NodeProto, name: str, default: object = None) -> object:
        for a in node.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    def attr_i(self, node: onnx.NodeProto, name: str, default: int) -> int:
        value = self.attr(node, name)
        return default if value is None else int(value)  # type: ignore[call-overload]

    def attr_ints(self, node: onnx.NodeProto, name: str) -> list[int] | None:
        value = self.attr(node, name)
        return None if value is None else [int(v) for v in value]  # type: ignore[attr-defined]

    def with_shape(self, node: onnx.NodeProto, label: str) -> tuple[Annot, tuple[int, ...]] | None:
        """The annotation and shape of input 0, or ``None`` (blocked if the shape is unknown)."""
        a = self.ann.get(node.input[0]) if node.input else None
        if a is None:
            return None
        xs = self.shape(node.input[0])
        if xs is None:
            self.block(a.units, f"{node.op_type} {label}: input shape unknown")
            return None
        return a, xs

    def int_input_or_attr(self, node: onnx.NodeProto, slot: int, name: str) -> list[int] | None:
        """An int list given as attribute ``name`` (old opsets) or constant input ``slot`` (new)."""
        value = self.attr(node, name)
        if value is not None:
            return [int(v) for v in value]  # type: ignore[attr-defined]
        if len(node.input) > slot and node.input[slot]:
            arr = self.consts.value(node.input[slot])
            return None if arr is None else [int(v) for v in np.asarray(arr).reshape(-1)]
        return []

    # ------------------------------------------------------------------------------ walk

    def run(self) -> None:
        for i, node in enumerate(self.graph.node):
            label = node_label(node, i)
            if node.domain not in ("", "ai.onnx"):
                self.block_inputs(node, label, f"op {node.domain}.{node.op_type} is not supported")
                continue
            handler = getattr(self, f"op_{node.op_type.lower()}", None)
            annotated = any(x in self.ann for x in node.input)
            captured = self._captured(node)
            for x in captured:
                self.block(self.ann[x].units, f"used inside a subgraph of {node.op_type} {label}")
            if handler is not None:
                handler(i, node, label)
            elif node.op_type in _UNARY:
                self.unary(node, label)
            elif node.op_type in _BINARY:
                self.broadcast(i, node, label)
            elif node.op_type in _POOL:
                self.pool(node, label)
            elif node.op_type in _REDUCE or node.op_type in ("ArgMax", "ArgMin"):
                self.reduce(node, label)
            elif node.op_type in _RESHAPE:
                self.reshape(i, node, label)
            elif node.op_type in ("Softmax", "LogSoftmax", "Hardmax", "LpNormalization"):
                self.softmax(node, label)
            elif node.op_type in _RNN_GATES:
                self.rnn(i, node, label)
            elif annotated:
                self.block_inputs(node, label, f"{node.op_type} is not a channel-wise op the rewriter knows")
        outputs = {o.name for o in self.graph.output}
        for name in outputs & set(self.ann):
            self.block(self.ann[name].units, f"reaches graph output {name!r}")

    def _captured(self, node: onnx.NodeProto) -> list[str]:
        names: list[str] = []
        for a in node.attribute:
            subs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subs:
                for sub in g.node:
                    names.extend(x for x in sub.input if x in self.ann)
        return names

    def set(self, name: str, annot: Annot | None) -> None:
        if name and annot is not None and annot.units.size > 1:
            self.ann[name] = annot

    # ------------------------------------------------------------------------------ op families

    def unary(self, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0]) if node.input else None
        for x in node.input[1:]:
            if x in self.ann:  # Clip with dynamic bounds from a channel tensor
                self.block(self.ann[x].units, f"{node.op_type} {label} takes a channel tensor as a parameter")
        if a is None:
            return
        self.set(node.output[0], a)
        if node.op_type == "Dropout" and len(node.output) > 1:
            self.set(node.output[1], a)

    def broadcast(self, index: int, node: onnx.NodeProto, label: str) -> None:
        out = node.output[0]
        out_shape = self.shape(out)
        annotated = [(k, x, self.ann[x]) for k, x in enumerate(node.input) if x in self.ann]
        if not annotated:
            return
        if out_shape is None:
            self.block_inputs(node, label, "output shape unknown")
            return
        rank = len(out_shape)
        axes = set()
        for _k, x, a in annotated:
            xs = self.shape(x)
            if xs is None:
                axes.add(-1)
                continue
            axes.add(a.axis + rank - len(xs))
        if len(axes) != 1 or -1 in axes:
            self.block_inputs(node, label, "inputs carry channels on different axes")
            return
        axis = axes.pop()
        dim = out_shape[axis]
        first = annotated[0][2].units
        for _k, x, a in annotated:
            if a.units.size != dim:
                self.block_inputs(node, label, f"channel tensor {x!r} is broadcast along its channel axis")
                return
        for _k, _x, a in annotated[1:]:
            self.join(first, a.units)
        for k, x in enumerate(node.input):
            if not x or x in self.ann:
                continue
            xs = self.shape(x)
            if xs is None:
                self.pin(first)
                continue
            ax = axis - (rank - len(xs))
            if ax < 0 or xs[ax] == 1:
                continue
            if self.consts.is_const(x):
                self.slices.append(Slice(index, k, ax, first, "param"))
            else:
                self.pin(first)
        self.set(out, Annot(axis, first))

    def pool(self, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            return
        if a.axis != 1:
            self.block(a.units, f"{node.op_type} {label} pools a tensor whose channels are not on axis 1")
            return
        self.set(node.output[0], a)
        if len(node.output) > 1 and node.output[1] and self.readers.get(node.output[1]):
            self.block(a.units, f"{node.op_type} {label}: the indices output is used")

    def reduce(self, node: onnx.NodeProto, label: str) -> None:
        found = self.with_shape(node, label)
        if found is None:
            return
        a, xs = found
        rank = len(xs)
        if node.op_type in ("ArgMax", "ArgMin"):
            axes = [self.attr_i(node, "axis", 0)]
        else:
            axes_l = self.int_input_or_attr(node, 1, "axes")
            if axes_l is None:
                self.block(a.units, f"{node.op_type} {label}: axes are computed at run time")
                return
            axes = axes_l
            if not axes:
                if self.attr_i(node, "noop_with_empty_axes", 0) == 1:
                    self.set(node.output[0], a)
                    return
                axes = list(range(rank))
        axes = [ax % rank for ax in axes]
        if a.axis in axes:
            self.block(a.units, f"{node.op_type} {label} reduces over the channel axis")
            return
        keep = self.attr_i(node, "keepdims", 1)
        new_axis = a.axis if keep else a.axis - sum(1 for ax in axes if ax < a.axis)
        self.set(node.output[0], Annot(new_axis, a.units))

    def softmax(self, node: onnx.NodeProto, label: str) -> None:
        found = self.with_shape(node, label)
        if found is None:
            return
        a, xs = found
        rank = len(xs)
        default = -1 if self.opset >= 13 or node.op_type == "LpNormalization" else 1
        axis = self.attr_i(node, "axis", default) % rank
        old = node.op_type != "LpNormalization" and self.opset < 13  # coerced to 2-D: axes >= axis mix
        if a.axis == axis or (old and a.axis >= axis):
            self.block(a.units, f"{node.op_type} {label} normalises over the channel axis")
            return
        self.set(node.output[0], a)

    def reshape(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0]) if node.input else None
        for x in node.input[1:]:
            if x in self.ann:
                self.block(self.ann[x].units, f"{node.op_type} {label} takes a channel tensor as its shape")
        if a is None:
            return
        mapping = self.map_axis(node.input[0], node.output[0], a.axis)
        if mapping is None:
            self.block(a.units, f"{node.op_type} {label} splits the channel axis or merges it with a leading one")
            return
        new_axis, mult = mapping
        units = np.repeat(a.units, mult) if mult > 1 else a.units
        if node.op_type == "Reshape" and not self.reshape_target(index, node, label, a, new_axis, units):
            return
        self.set(node.output[0], Annot(new_axis, units))

    def map_axis(self, src: str, dst: str, axis: int) -> tuple[int, int] | None:
        """Where channel ``axis`` of ``src`` lands in ``dst`` (a reshape), and its multiplicity.

        The answer must be the same for every probe (two batch sizes tell batch from channel dims).
        """
        answers = set()
        for p in range(len(self.shapes)):
            si, so = self.shape(src, p), self.shape(dst, p)
            if si is None or so is None:
                return None
            answers.add(_map_axis(si, so, axis))
        if len(answers) != 1:
            return None
        return answers.pop()

    def reshape_target(
        self, index: int, node: onnx.NodeProto, label: str, a: Annot, new_axis: int, units: NDArray[np.int64]
    ) -> bool:
        """Record how the Reshape's target shape follows the channels; False if it cannot."""
        shape_name = node.input[1] if len(node.input) > 1 else ""
        target = self.consts.value(shape_name)
        out_dim = units.size
        if target is not None:
            entry = int(np.asarray(target).reshape(-1)[new_axis])
            if entry == -1 or (entry == 0 and new_axis == a.axis and units.size == a.units.size):
                return True
            if entry == out_dim:
                self.rewrites.append(Rewrite("shape", index, (units,), slot=1, index=new_axis))
                return True
            self.block(a.units, f"Reshape {label}: target entry {entry} does not match {out_dim} channels")
            return False
        # the target is computed: look for a Concat of pieces, one of which holds our entry
        producer = self._producer_of(shape_name)
        if producer is not None and self.graph.node[producer].op_type == "Concat":
            cnode = self.graph.node[producer]
            offset = 0
            for slot, piece in enumerate(cnode.input):
                ps = self.shape(piece)
                if ps is None or len(ps) != 1:
                    break
                if offset <= new_axis < offset + ps[0]:
                    value = self.consts.value(piece)
                    if value is None:
                        self.tentative.append((int(units[0]), f"Reshape {label}: target computed at run time"))
                        return True
                    entry = int(np.asarray(value).reshape(-1)[new_axis - offset])
                    if entry == -1:
                        return True
                    if entry == out_dim:
                        self.rewrites.append(Rewrite("shape", producer, (units,), slot=slot, index=new_axis - offset))
                        return True
                    self.block(a.units, f"Reshape {label}: target entry {entry} does not match {out_dim} channels")
                    return False
                offset += ps[0]
        self.tentative.append((int(units[0]), f"Reshape {label}: target computed at run time"))
        return True

    def _producer_of(self, name: str) -> int | None:
        for i, node in enumerate(self.graph.node):
            if name in node.output:
                return i
        return None

    # ------------------------------------------------------------------------------ specific ops

    def op_transpose(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            return
        perm = self.attr_ints(node, "perm")
        if perm is None:
            xs = self.shape(node.input[0])
            if xs is None:
                self.block(a.units, f"Transpose {label}: input rank unknown")
                return
            perm = list(range(len(xs)))[::-1]
        self.set(node.output[0], Annot(perm.index(a.axis), a.units))

    def op_batchnormalization(self, index: int, node: onnx.NodeProto, label: str) -> None:
        self._norm(index, node, label, slots=(1, 2, 3, 4))

    def op_instancenormalization(self, index: int, node: onnx.NodeProto, label: str) -> None:
        self._norm(index, node, label, slots=(1, 2))

    def _norm(self, index: int, node: onnx.NodeProto, label: str, slots: tuple[int, ...]) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            self.block_inputs(node, label, "normalisation parameters come from a channel tensor")
            return
        if a.axis != 1:
            self.block(
                a.units, f"{node.op_type} {label} normalises channels on axis 1, the tensor has them on {a.axis}"
            )
            return
        used = [o for o in node.output[1:] if o and self.readers.get(o)]
        if used or any(x in self.ann for x in node.input[1:]):
            self.block(a.units, f"{node.op_type} {label} runs in training mode")
            return
        for s in slots:
            if len(node.input) > s and node.input[s]:
                if not self.consts.is_const(node.input[s]):
                    self.pin(a.units)
                else:
                    self.slices.append(Slice(index, s, 0, a.units, "param"))
        self.set(node.output[0], a)

    def op_layernormalization(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            self.block_inputs(node, label, "LayerNormalization parameters come from a channel tensor")
            return
        xs = self.shape(node.input[0])
        if xs is None:
            self.block(a.units, f"LayerNormalization {label}: input shape unknown")
            return
        axis = self.attr_i(node, "axis", -1) % len(xs)
        if a.axis >= axis:
            self.block(a.units, f"LayerNormalization {label} normalises over the channel axis")
            return
        self.set(node.output[0], a)

    def op_concat(self, index: int, node: onnx.NodeProto, label: str) -> None:
        out_shape = self.shape(node.output[0])
        annotated = [self.ann.get(x) for x in node.input]
        if not any(annotated):
            return
        if out_shape is None:
            self.block_inputs(node, label, "output shape unknown")
            return
        axis = self.attr_i(node, "axis", 0) % len(out_shape)
        axes = {a.axis for a in annotated if a is not None}
        if axes == {axis}:
            parts = []
            for x, a in zip(node.input, annotated, strict=True):
                if a is not None:
                    parts.append(a.units)
                else:
                    xs = self.shape(x)
                    if xs is None:
                        self.block_inputs(node, label, "input shape unknown")
                        return
                    parts.append(np.full(xs[axis], PINNED, dtype=np.int64))
            self.set(node.output[0], Annot(axis, np.concatenate(parts)))
            return
        if len(axes) == 1:  # concatenation along another axis: the inputs share channels
            ch = axes.pop()
            first = next(a for a in annotated if a is not None).units
            for x, a in zip(node.input, annotated, strict=True):
                if a is None:
                    xs = self.shape(x)
                    if xs is None or xs[ch] != 1:
                        self.pin(first)
                elif a.units.size != first.size:
                    self.block_inputs(node, label, "inputs have different channel counts")
                    return
                else:
                    self.join(first, a.units)
            self.set(node.output[0], Annot(ch, first))
            return
        self.block_inputs(node, label, "inputs carry channels on different axes")

    def op_split(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            self.block_inputs(node, label, "split sizes come from a channel tensor")
            return
        xs = self.shape(node.input[0])
        if xs is None:
            self.block(a.units, f"Split {label}: input shape unknown")
            return
        axis = self.attr_i(node, "axis", 0) % len(xs)
        if axis != a.axis:
            for o in node.output:
                self.set(o, a)
            return
        sizes = []
        for o in node.output:
            os_ = self.shape(o)
            if os_ is None:
                self.block(a.units, f"Split {label}: output shape unknown")
                return
            sizes.append(os_[axis])
        if len(node.input) > 1 and node.input[1] and self.consts.value(node.input[1]) is None:
            self.block(a.units, f"Split {label}: split sizes are computed at run time")
            return
        bounds = np.cumsum([0, *sizes])
        parts = tuple(a.units[bounds[k] : bounds[k + 1]] for k in range(len(sizes)))
        self.rewrites.append(Rewrite("split", index, parts))
        for o, part in zip(node.output, parts, strict=True):
            self.set(o, Annot(axis, part))

    def op_slice(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            self.block_inputs(node, label, "slice bounds come from a channel tensor")
            return
        xs = self.shape(node.input[0])
        if xs is None:
            self.block(a.units, f"Slice {label}: input shape unknown")
            return
        rank = len(xs)
        steps: list[int] | None = None
        if self.opset < 10:
            starts, ends = self.attr_ints(node, "starts"), self.attr_ints(node, "ends")
            axes_v = self.attr_ints(node, "axes")
        else:
            starts = self.int_input_or_attr(node, 1, "__none__")
            ends = self.int_input_or_attr(node, 2, "__none__")
            axes_v = self.int_input_or_attr(node, 3, "__none__") if len(node.input) > 3 and node.input[3] else None
            steps = self.int_input_or_attr(node, 4, "__none__") if len(node.input) > 4 and node.input[4] else None
        if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes_v is None):
            self.block(a.units, f"Slice {label}: bounds are computed at run time")
            return
        starts_l, ends_l = list(starts), list(ends)
        axes_l = [int(v) % rank for v in axes_v] if axes_v else list(range(len(starts_l)))
        if a.axis not in axes_l:
            self.set(node.output[0], a)
            return
        k = axes_l.index(a.axis)
        if steps is not None and steps[k] != 1:
            self.block(a.units, f"Slice {label} steps through the channel axis (step {steps[k]})")
            return
        dim = xs[a.axis]
        s, e = int(starts_l[k]), int(ends_l[k])
        s = min(max(s + dim if s < 0 else s, 0), dim)
        e = min(max(e + dim if e < 0 else e, 0), dim)
        if e <= s:
            self.block(a.units, f"Slice {label} selects no channels")
            return
        self.rewrites.append(Rewrite("slice", index, (a.units,), index=k, start=s, end=e))
        self.set(node.output[0], Annot(a.axis, a.units[s:e]))

    def op_gather(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if len(node.input) > 1 and node.input[1] in self.ann:
            self.block(self.ann[node.input[1]].units, f"Gather {label} uses a channel tensor as indices")
        if a is None:
            return
        xs, idx = self.shape(node.input[0]), self.shape(node.input[1])
        if xs is None or idx is None:
            self.block(a.units, f"Gather {label}: shapes unknown")
            return
        axis = self.attr_i(node, "axis", 0) % len(xs)
        if axis == a.axis:
            self.block(a.units, f"Gather {label} picks channels")
            return
        new_axis = a.axis if a.axis < axis else a.axis + len(idx) - 1
        self.set(node.output[0], Annot(new_axis, a.units))

    def op_pad(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        for x in node.input[1:]:
            if x in self.ann:
                self.block(self.ann[x].units, f"Pad {label} takes a channel tensor as a parameter")
        if a is None:
            return
        xs, ys = self.shape(node.input[0]), self.shape(node.output[0])
        if xs is None or ys is None or xs[a.axis] != ys[a.axis]:
            self.block(a.units, f"Pad {label} pads the channel axis")
            return
        self.set(node.output[0], a)

    def op_resize(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            return
        xs, ys = self.shape(node.input[0]), self.shape(node.output[0])
        sizes = node.input[3] if len(node.input) > 3 else ""
        if xs is None or ys is None or xs[a.axis] != ys[a.axis] or sizes:
            self.block(a.units, f"{node.op_type} {label} resizes with explicit sizes or along the channel axis")
            return
        self.set(node.output[0], a)

    op_upsample = op_resize

    def op_expand(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            self.block_inputs(node, label, "Expand shape from a channel tensor")
            return
        xs, ys = self.shape(node.input[0]), self.shape(node.output[0])
        target = self.consts.value(node.input[1])
        if xs is None or ys is None or target is None:
            self.block(a.units, f"Expand {label}: target shape unknown")
            return
        new_axis = a.axis + len(ys) - len(xs)
        t = np.asarray(target).reshape(-1)
        t_axis = new_axis - (len(ys) - t.size)
        if t_axis >= 0 and int(t[t_axis]) not in (1,):
            self.block(a.units, f"Expand {label} names the channel count in its target shape")
            return
        self.set(node.output[0], Annot(new_axis, a.units))

    def op_tile(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            return
        reps = self.consts.value(node.input[1]) if len(node.input) > 1 else None
        if reps is None or int(np.asarray(reps).reshape(-1)[a.axis]) != 1:
            self.block(a.units, f"Tile {label} repeats along the channel axis")
            return
        self.set(node.output[0], a)

    def op_shape(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        if a is None:
            return
        start = self.attr_i(node, "start", 0)
        xs = self.shape(node.input[0])
        rank = len(xs) if xs is not None else 0
        start = start % rank if rank and start < 0 else start
        # reading only other dims (e.g. the batch size) is safe; anything else is checked afterwards
        safe = True
        for r in self.readers.get(node.output[0], []):
            reader = self.graph.node[r]
            if reader.op_type == "Gather" and len(reader.input) > 1:
                idx = self.consts.value(reader.input[1])
                if idx is not None and all((int(v) % max(rank, 1)) + start != a.axis for v in np.ravel(idx)):
                    continue
            if reader.op_type == "Slice" and len(reader.input) > 2:
                s, e = self.consts.value(reader.input[1]), self.consts.value(reader.input[2])
                if s is not None and e is not None and s.size == 1 and e.size == 1:
                    lo = int(s.reshape(-1)[0]) + start
                    hi = min(int(e.reshape(-1)[0]), rank) + start
                    if not lo <= a.axis < hi:
                        continue
            safe = False
        if not safe:
            self.tentative.append((int(a.units[0]), f"Shape {label} reads the channel count"))

    def op_size(self, index: int, node: onnx.NodeProto, label: str) -> None:
        self.block_inputs(node, label, "Size counts the elements")

    def op_conv(self, index: int, node: onnx.NodeProto, label: str) -> None:
        x = node.input[0]
        a = self.ann.get(x)
        w_name = node.input[1] if len(node.input) > 1 else ""
        w = self.consts.value(w_name)
        for extra in node.input[1:]:
            if extra in self.ann:
                self.block(self.ann[extra].units, f"Conv {label} takes a channel tensor as weight or bias")
        if w is None or w.ndim < 3:
            if a is not None:
                self.block(a.units, f"Conv {label} has no constant weight")
            return
        if a is not None and a.axis != 1:
            self.block(a.units, f"Conv {label} reads a tensor whose channels are not on axis 1")
            a = None
        group = self.attr_i(node, "group", 1)
        cout, cin_g = int(w.shape[0]), int(w.shape[1])
        cin = cin_g * group
        has_bias = len(node.input) > 2 and bool(node.input[2])
        if group > 1 and cin_g == 1 and group == cin:  # depthwise: follows its input
            mult = cout // cin
            if a is None:
                out = np.full(cout, PINNED, dtype=np.int64)
            else:
                out = np.repeat(a.units, mult)
                self.slices.append(Slice(index, 1, 0, out, "param"))
                if has_bias:
                    self.slices.append(Slice(index, 2, 0, out, "param"))
                self.rewrites.append(Rewrite("attr", index, (a.units,), name="group"))
            self.set(node.output[0], Annot(1, out))
            return
        if a is not None:
            self.slices.append(Slice(index, 1, 1, a.units, "consumer", groups=group))
            self.consumers.append(Consumer(index, "conv", x, 1, a.units))
            if group > 1:
                self.block_constraints.append(np.split(a.units, group))
        out = self.new_space(label, cout)
        self.slices.append(Slice(index, 1, 0, out, "producer"))
        if has_bias:
            self.slices.append(Slice(index, 2, 0, out, "param"))
        if group > 1:
            self.block_constraints.append(np.split(out, group))
        self.set(node.output[0], Annot(1, out))

    def op_gemm(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        b = self.consts.value(node.input[1]) if len(node.input) > 1 else None
        for extra in node.input[1:]:
            if extra in self.ann:
                self.block(self.ann[extra].units, f"Gemm {label} takes a channel tensor as B or C")
        trans_a = self.attr_i(node, "transA", 0)
        trans_b = self.attr_i(node, "transB", 0)
        if b is None or b.ndim != 2 or trans_a:
            if a is not None:
                self.block(a.units, f"Gemm {label} has no constant B or transposes A")
            return
        if a is not None:
            if a.axis != 1:
                self.block(a.units, f"Gemm {label} reads channels on the row axis")
            else:
                self.slices.append(Slice(index, 1, 1 if trans_b else 0, a.units, "consumer"))
                self.consumers.append(Consumer(index, "gemm", node.input[0], 1, a.units))
        n_out = int(b.shape[0] if trans_b else b.shape[1])
        out = self.new_space(label, n_out)
        self.slices.append(Slice(index, 1, 0 if trans_b else 1, out, "producer"))
        if len(node.input) > 2 and node.input[2]:
            cs = self.shape(node.input[2])
            if cs and cs[-1] == n_out and (len(cs) == 1 or int(np.prod(cs[:-1])) == 1):
                self.slices.append(Slice(index, 2, len(cs) - 1, out, "param"))
            elif cs and cs[-1] == n_out:
                self.pin(out)
        self.set(node.output[0], Annot(1, out))

    def op_matmul(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a, b_ann = self.ann.get(node.input[0]), self.ann.get(node.input[1])
        b = self.consts.value(node.input[1])
        if b_ann is not None:
            self.block(b_ann.units, f"MatMul {label} multiplies two activations")
        if b is None or b.ndim != 2:
            if a is not None:
                self.block(a.units, f"MatMul {label} multiplies two activations")
            return
        xs = self.shape(node.input[0])
        if xs is None:
            if a is not None:
                self.block(a.units, f"MatMul {label}: input shape unknown")
            return
        rank = len(xs)
        if a is not None and a.axis != rank - 1:
            # channels on a row/batch axis pass through; the new output columns stay whole
            self.set(node.output[0], a)
            return
        if a is not None:
            self.slices.append(Slice(index, 1, 0, a.units, "consumer"))
            self.consumers.append(Consumer(index, "matmul", node.input[0], rank - 1, a.units))
        out = self.new_space(label, int(b.shape[1]))
        self.slices.append(Slice(index, 1, 1, out, "producer"))
        self.set(node.output[0], Annot(max(rank, 2) - 1, out))

    def rnn(self, index: int, node: onnx.NodeProto, label: str) -> None:
        a = self.ann.get(node.input[0])
        for extra in node.input[1:]:
            if extra in self.ann:
                self.block(self.ann[extra].units, f"{node.op_type} {label} takes a channel tensor as a state/weight")
        if a is None:
            return
        w = self.consts.value(node.input[1])
        if a.axis != 2 or w is None or w.ndim != 3:
            self.block(a.units, f"{node.op_type} {label}: channels not on the feature axis or weights not constant")
            return
        self.slices.append(Slice(index, 1, 2, a.units, "consumer"))
        self.consumers.append(Consumer(index, "rnn", node.input[0], 2, a.units))


def _map_axis(si: tuple[int, ...], so: tuple[int, ...], axis: int) -> tuple[int, int] | None:
    """Reshape of shape ``si`` into ``so``: where does channel ``axis`` go, with what multiplicity?"""
    pre = int(np.prod(si[:axis], dtype=np.int64))
    c = si[axis]
    for o in range(len(so) + 1):
        if int(np.prod(so[:o], dtype=np.int64)) != pre:
            if int(np.prod(so[:o], dtype=np.int64)) > pre:
                return None
            continue
        if o == len(so):
            return None
        if so[o] == c:
            return o, 1
        mult = 1
        for d in si[axis + 1 :]:
            mult *= d
            if so[o] == c * mult:
                return o, mult
            if c * mult > so[o]:
                break
    return None


def analyse(model: onnx.ModelProto, shapes: Sequence[Shapes]) -> Analysis:
    """Find the channel groups of ``model`` given the probe shapes of its tensors."""
    w = _Walker(model, shapes)
    w.run()
    uf = w.uf
    n_units = len(uf.parent)
    unit_class = np.fromiter((uf.find(u) for u in range(n_units)), dtype=np.int64, count=n_units)
    # connect spaces whose units share a class
    space_uf = _UnionFind()
    space_ids = space_uf.new(len(w.spaces)) if w.spaces else np.zeros(0, np.int64)
    first_space_of_class: dict[int, int] = {}
    for sid, (_label, units) in zip(space_ids.tolist(), w.spaces, strict=True):
        for c in np.unique(unit_class[units]).tolist():
            if c == PINNED:
                continue
            if c in first_space_of_class:
                space_uf.union(first_space_of_class[c], sid)
            else:
                first_space_of_class[c] = sid
    comp: dict[int, list[int]] = {}
    for sid in space_ids.tolist():
        comp.setdefault(space_uf.find(sid), []).append(sid)
    groups: list[Group] = []
    class_group: dict[int, int] = {}
    for members in comp.values():
        classes: list[int] = []
        seen: set[int] = set()
        pinned = 0
        for sid in members:
            for c in unit_class[w.spaces[sid - 1][1]].tolist():
                if c not in seen:
                    seen.add(c)
                    if c == PINNED:
                        pinned += 1
                    else:
                        classes.append(c)
        gid = len(groups)
        g = Group(
            id=gid,
            producers=[w.spaces[sid - 1][0] for sid in members],
            classes=np.asarray(classes, dtype=np.int64),
            pinned=0,
        )
        for c in classes:
            class_group[c] = gid
        if pinned and not classes:
            g.reasons.append("every channel is joined with a tensor no prunable layer produced")
        groups.append(g)
    for unit, reason in w.blocked:
        c = int(unit_class[unit])
        if c in class_group and reason not in groups[class_group[c]].reasons:
            groups[class_group[c]].reasons.append(reason)
    for unit, reason in w.tentative:
        c = int(unit_class[unit])
        if c in class_group and reason not in groups[class_group[c]].tentative:
            groups[class_group[c]].tentative.append(reason)
    # grouped convolutions: equal number kept per block
    for parts in w.block_constraints:
        classes_per_block = [unit_class[p] for p in parts]
        cs = np.concatenate(classes_per_block)
        gids = {class_group.get(int(c), -1) for c in cs.tolist() if c != PINNED}
        if not gids:
            continue
        g = groups[min(gids)]
        reason = ""
        if len(gids) > 1 or (cs == PINNED).any() or len(set(cs.tolist())) != cs.size or cs.size != g.size:
            reason = "a grouped Conv's channel blocks do not map one-to-one onto the group's channels"
        elif g.blocks > 1 and g.blocks != len(parts):
            reason = "two grouped Convs split the same channels into different blocks"
        else:
            order = {int(c): k for k, c in enumerate(g.classes.tolist())}
            block_of = np.empty(g.size, np.int64)
            for b, p in enumerate(classes_per_block):
                block_of[[order[int(c)] for c in p.tolist()]] = b
            if g.block_of is not None and not np.array_equal(g.block_of, block_of):
                reason = "two grouped Convs split the same channels into different blocks"
            g.blocks, g.block_of = len(parts), block_of
        if reason:
            for gid in gids:
                if gid >= 0 and reason not in groups[gid].reasons:
                    groups[gid].reasons.append(reason)
    for k, cons in enumerate(w.consumers):
        hit = {class_group[c] for c in np.unique(unit_class[cons.units]).tolist() if c in class_group}
        for gid in hit:
            groups[gid].consumers.append(k)
    for g in groups:
        if g.size <= 1 and not g.reasons:
            g.reasons.append("fewer than two channels")
    return Analysis(model, w.ann, w.slices, w.rewrites, w.consumers, groups, unit_class, class_group)


def describe(analysis: Analysis) -> list[dict[str, object]]:
    """One record per group: producers, channels, consumers, prunable or why not (for reports)."""
    out: list[dict[str, object]] = []
    graph = analysis.model.graph
    for g in analysis.groups:
        out.append(
            {
                "group": g.id,
                "producers": g.producers,
                "channels": g.size,
                "consumers": [
                    node_label(graph.node[analysis.consumers[k].node], analysis.consumers[k].node) for k in g.consumers
                ],
                "blocks": g.blocks,
                "prunable": g.prunable,
                "reasons": list(g.reasons),
                "tentative": list(g.tentative),
            }
        )
    return out
