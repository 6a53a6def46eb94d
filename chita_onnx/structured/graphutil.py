"""Small ONNX helpers for channel pruning: constant lookup, per-use constant rewrites, clean-up.

Exporters store weights differently: as initializers (PyTorch, tf2onnx), as ``Constant`` nodes
(paddle2onnx, some PyTorch versions), or behind ``Identity`` nodes (paddle2onnx ``deepcopy`` weights).
:class:`Constants` resolves all three.  Rewrites never edit a tensor in place: every changed use gets
its own new initializer (so a tensor shared with another node is never changed under it), and
:func:`drop_unused` removes what no node reads any more.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper


def node_label(node: onnx.NodeProto, index: int) -> str:
    """A readable, unique-enough name of a node for messages: its name, or ``<Op #i>``."""
    return node.name or f"<{node.op_type} #{index}>"


def _attr_tensor(node: onnx.NodeProto) -> NDArray[np.generic] | None:
    for attr in node.attribute:
        if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
            return np.asarray(numpy_helper.to_array(attr.t))
        if attr.name == "value_float":
            return np.asarray(attr.f, dtype=np.float32)
        if attr.name == "value_floats":
            return np.asarray(list(attr.floats), dtype=np.float32)
        if attr.name == "value_int":
            return np.asarray(attr.i, dtype=np.int64)
        if attr.name == "value_ints":
            return np.asarray(list(attr.ints), dtype=np.int64)
    return None


class Constants:
    """Values of the constant tensors of a graph: initializers (that are not overridable graph inputs),
    ``Constant`` nodes and ``Identity`` nodes of constants.  Arrays are read lazily and cached."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        inputs = {i.name for i in graph.input}
        self._inits = {t.name: t for t in graph.initializer if t.name not in inputs}
        self._nodes: dict[str, onnx.NodeProto] = {}
        self._alias: dict[str, str] = {}
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and len(node.output) == 1:
                self._nodes[node.output[0]] = node
        for node in graph.node:  # Identity chains of constants, in graph (topological) order
            if node.op_type == "Identity" and node.input and self.is_const(node.input[0]):
                self._alias[node.output[0]] = self.root(node.input[0])
        self._cache: dict[str, NDArray[np.generic] | None] = {}

    def root(self, name: str) -> str:
        """The initializer or Constant output behind ``name`` (following Identity nodes)."""
        return self._alias.get(name, name)

    def is_const(self, name: str) -> bool:
        name = self._alias.get(name, name)
        return name in self._inits or name in self._nodes

    def value(self, name: str) -> NDArray[np.generic] | None:
        """The value of a constant tensor, or ``None`` if ``name`` is not constant."""
        if not name:
            return None
        name = self._alias.get(name, name)
        if name not in self._cache:
            if name in self._inits:
                self._cache[name] = np.asarray(numpy_helper.to_array(self._inits[name]))
            elif name in self._nodes:
                self._cache[name] = _attr_tensor(self._nodes[name])
            else:
                self._cache[name] = None
        return self._cache[name]

    def elem_type(self, name: str) -> int:
        name = self._alias.get(name, name)
        if name in self._inits:
            return int(self._inits[name].data_type)
        value = self.value(name)
        return int(helper.np_dtype_to_tensor_dtype(value.dtype)) if value is not None else TensorProto.FLOAT


class Rewriter:
    """Applies per-use constant replacements and attribute changes to a copy of a model.

    ``set_input(i, slot, array)`` makes input ``slot`` of node ``i`` read a new initializer holding
    ``array`` (appending the input if the node has fewer inputs, e.g. a Conv that gets a bias).
    """

    def __init__(self, model: onnx.ModelProto, tag: str = "ch") -> None:
        self.model = onnx.ModelProto()
        self.model.CopyFrom(model)
        self.graph = self.model.graph
        self.tag = tag
        self._used = (
            {t.name for t in self.graph.initializer}
            | {o for n in self.graph.node for o in n.output}
            | {i.name for i in self.graph.input}
        )
        self._count = Counter[str]()

    def fresh(self, base: str) -> str:
        while True:
            self._count[base] += 1
            name = f"{base}__{self.tag}{self._count[base]}"
            if name not in self._used:
                self._used.add(name)
                return name

    def add_initializer(self, base: str, array: NDArray[np.generic]) -> str:
        name = self.fresh(base or "const")
        self.graph.initializer.append(numpy_helper.from_array(np.require(array, requirements="C"), name))
        if self.model.ir_version < 4:  # old IR: every initializer is also a graph input
            self.graph.input.append(helper.make_tensor_value_info(name, self._elem(array), list(array.shape)))
        return name

    @staticmethod
    def _elem(array: NDArray[np.generic]) -> int:
        return int(helper.np_dtype_to_tensor_dtype(array.dtype))

    def set_input(self, index: int, slot: int, array: NDArray[np.generic], base: str = "") -> str:
        node = self.graph.node[index]
        while len(node.input) <= slot:
            node.input.append("")
        name = self.add_initializer(base or node.input[slot] or f"{node.name or node.op_type}_in{slot}", array)
        node.input[slot] = name
        return name

    def set_attr_int(self, index: int, name: str, value: int) -> None:
        node = self.graph.node[index]
        for attr in node.attribute:
            if attr.name == name:
                attr.i = int(value)
                return
        node.attribute.append(helper.make_attribute(name, int(value)))

    def set_attr_ints(self, index: int, name: str, values: Iterable[int]) -> None:
        node = self.graph.node[index]
        keep = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(keep)
        node.attribute.append(helper.make_attribute(name, [int(v) for v in values]))

    def remove_attr(self, index: int, name: str) -> None:
        node = self.graph.node[index]
        keep = [a for a in node.attribute if a.name != name]
        del node.attribute[:]
        node.attribute.extend(keep)

    def finish(self, drop_value_info: Iterable[str] = ()) -> onnx.ModelProto:
        """Remove stale ``value_info`` entries and constants nobody reads; return the model."""
        drop = set(drop_value_info)
        if drop:
            keep_vi = [v for v in self.graph.value_info if v.name not in drop]
            del self.graph.value_info[:]
            self.graph.value_info.extend(keep_vi)
        drop_unused(self.model)
        return self.model


def drop_unused(model: onnx.ModelProto) -> None:
    """Delete initializers, Constant and Identity-of-constant nodes that nothing reads (in place).

    Graph inputs and outputs are never touched.
    """
    graph = model.graph
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    while True:
        read = Counter[str]()
        for node in graph.node:
            read.update(x for x in node.input if x)
            for attr in node.attribute:  # names captured by subgraphs
                subs = [attr.g] if attr.type == onnx.AttributeProto.GRAPH else list(attr.graphs)
                for g in subs:
                    for sub in g.node:
                        read.update(x for x in sub.input if x)
        consts = Constants(graph)
        removable = {
            i
            for i, n in enumerate(graph.node)
            if n.op_type in ("Constant", "Identity")
            and n.output
            and all(read[o] == 0 and o not in outputs for o in n.output)
            and (n.op_type == "Constant" or (len(n.input) == 1 and consts.is_const(n.input[0])))
        }
        inits = [t for t in graph.initializer if read[t.name] == 0 and t.name not in outputs and t.name not in inputs]
        if not removable and not inits:
            return
        if removable:
            keep = [n for i, n in enumerate(graph.node) if i not in removable]
            del graph.node[:]
            graph.node.extend(keep)
        if inits:
            dead = {t.name for t in inits}
            keep_t = [t for t in graph.initializer if t.name not in dead]
            del graph.initializer[:]
            graph.initializer.extend(keep_t)
