"""Control flow in the gradient working copy: outer-scope references and If inlining.

onnxruntime-training builds no gradient through ``If``, ``Loop`` or ``Scan``.  An ``If`` whose
condition is fixed (by constants, by the fixed input shapes, or by the calibration data) is replaced
by the nodes of the branch it takes (:func:`inline_if`); ``Loop`` and ``Scan`` on the differentiable
path are refused by the coverage check.

Names: a branch may define names that also exist in the enclosing graph (sibling ``If`` nodes may
both define ``x``).  Such branch-local names are renamed when inlined; names the branch reads from the
outer scope keep their names, and so do branch-local names that clash with nothing (the weights
stored as ``Constant`` nodes inside branches keep their names, so they can be addressed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import onnx
from onnx import helper

from ..graph import subgraphs, walk_graphs

__all__ = [
    "defined_names",
    "inline_decided",
    "inline_if",
    "node_inputs",
    "outer_refs",
    "subgraphs",
    "walk_graphs",
]


def defined_names(graph: onnx.GraphProto) -> set[str]:
    """Names defined in ``graph`` itself: inputs, initializers and node outputs (not nested ones)."""
    names = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    for n in graph.node:
        names.update(o for o in n.output if o)
    return names


def _refs(graph: onnx.GraphProto) -> set[str]:
    local = defined_names(graph)
    found: set[str] = set()
    for n in graph.node:
        found.update(i for i in n.input if i and i not in local)
        for _, sub in subgraphs(n):
            found |= {r for r in _refs(sub) if r not in local}
    found.update(o.name for o in graph.output if o.name not in local)
    return found


def outer_refs(node: onnx.NodeProto) -> list[str]:
    """Names that ``node``'s subgraphs read from enclosing scopes (sorted)."""
    found: set[str] = set()
    for _, sub in subgraphs(node):
        found |= _refs(sub)
    return sorted(found)


def node_inputs(node: onnx.NodeProto) -> list[str]:
    """The explicit inputs of ``node`` followed by the outer-scope names its subgraphs read."""
    ins = [i for i in node.input if i]
    if node.attribute and any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute
    ):
        ins += [r for r in outer_refs(node) if r not in ins]
    return ins


def _rename_in_graph(graph: onnx.GraphProto, rename: dict[str, str]) -> None:
    """Apply ``rename`` to every reference in ``graph`` (recursively), except where a nested graph
    defines the name itself."""
    local = defined_names(graph)
    live = {k: v for k, v in rename.items() if k not in local}
    if not live:
        return
    for n in graph.node:
        for k, i in enumerate(n.input):
            if i in live:
                n.input[k] = live[i]
        for _, sub in subgraphs(n):
            _rename_in_graph(sub, live)
    for o in graph.output:
        if o.name in live:
            o.name = live[o.name]


def inline_if(
    node: onnx.NodeProto,
    take_then: bool,
    fresh: Callable[[str], str],
    taken: Iterable[str],
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:
    """The nodes and initializers that replace ``If`` node ``node`` by the branch it takes.

    ``taken`` holds every name already defined in the enclosing graph; branch-local names in it are
    renamed with ``fresh``.  The If outputs are produced by ``Identity`` nodes from the branch
    outputs, so names downstream of the If do not change.
    """
    branch_name = "then_branch" if take_then else "else_branch"
    branch = next((a.g for a in node.attribute if a.name == branch_name), None)
    if branch is None:
        raise ValueError(f"If node {node.name!r} has no {branch_name}")
    g = onnx.GraphProto()
    g.CopyFrom(branch)
    used = set(taken)
    rename = {n: fresh(n) for n in sorted(defined_names(g)) if n in used}
    if rename:
        for n in g.node:
            for k, o in enumerate(n.output):
                if o in rename:
                    n.output[k] = rename[o]
        for t in g.initializer:
            if t.name in rename:
                t.name = rename[t.name]
        # the old names are no longer defined here: every reference follows the new ones
        _rename_in_graph(g, rename)
    nodes = list(g.node)
    label = node.name or "If"
    for src, dst in zip([o.name for o in g.output], list(node.output), strict=False):
        if dst:
            nodes.append(helper.make_node("Identity", [src], [dst], name=fresh(f"{label}_{branch_name}_{dst}")))
    return nodes, list(g.initializer)


def inline_decided(graph: onnx.GraphProto, decisions: Mapping[int, bool], fresh: Callable[[str], str]) -> None:
    """In place: the ``If`` nodes of ``graph`` at the positions in ``decisions`` replaced by the branch
    each takes (``True``: then), via :func:`inline_if`.  ``fresh`` makes names that collide with
    nothing already in ``graph`` (and remembers the ones it made)."""
    taken = defined_names(graph) | {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    new: list[onnx.NodeProto] = []
    for k, n in enumerate(graph.node):
        if k not in decisions:
            new.append(n)
            continue
        nodes, inits = inline_if(n, decisions[k], fresh, taken)
        for x in nodes:
            taken.update(x.output)
        taken.update(t.name for t in inits)
        new.extend(nodes)
        graph.initializer.extend(inits)
    copies = [onnx.NodeProto() for _ in new]
    for dst, src in zip(copies, new, strict=True):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(copies)
