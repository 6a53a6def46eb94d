"""Recurrent weight gradients as one product instead of one outer product per time step.

Unrolled (:mod:`.recurrent`), an LSTM or RNN direction computes ``pre_t = xw_t + h_{t−1} R_dᵀ`` at
every step ``t``.  Differentiated as it stands, onnxruntime-training forms ``δ_tᵀ h_{t−1}`` — a full
``(G·H, H)`` matrix — at every step and sums the ``T`` of them: on ddddocr-common's bidirectional
LSTM (``T`` = 34) that was about 40% of a per-sample gradient.  The same gradient is

    ∂L/∂R_d = Σ_t δ_tᵀ h_{t−1} = Δᵀ H_prev,   Δ = [δ_0; …; δ_{T−1}] (T·B, G·H),  H_prev (T·B, H),

one GEMM.  The unrolling adds a zero tensor ``E_d (T, B, G·H)`` to ``xw`` (so ``∂L/∂E_d = Δ``) and
records, in the working copy's metadata, which tensors are ``R``, ``R_d``, ``E_d`` and the ``h_{t−1}``.
:func:`plan` then asks the gradient builder for ``E_d`` instead of ``R`` and :func:`finish` appends
the product, so the gradient graph still has the output ``<R>_grad`` with the same value.

A weight is deferred only when the record is complete: every direction of ``R`` present, every
named tensor in the graph, and ``R`` read by nothing but the unrolling's own per-direction slices
(a weight tied to another use keeps the builder's gradient).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

#: The working copy's metadata key holding the records (a JSON list), never in a written model.
METADATA_KEY = "chita.deferred_recurrent_gradients"

Finish = Callable[[onnx.ModelProto], onnx.ModelProto]


def record_deferred(model: onnx.ModelProto, entries: Iterable[dict[str, Any]]) -> None:
    """Add ``entries`` to ``model``'s records: one per direction, in direction order, each with
    ``weight`` (``R``), ``slice`` (the direction's ``R_d``) and ``blocks``: consecutive row blocks of
    ``R_d``, each ``{"dpre": E, "cols": [c0, c1], "inputs": [u_0, …, u_{T−1}]}`` meaning
    ``∂L/∂R_d[block] = Σ_t (∂L/∂E[t])[:, c0:c1]ᵀ u_t``."""
    prop = next((p for p in model.metadata_props if p.key == METADATA_KEY), None)
    if prop is None:
        prop = model.metadata_props.add()
        prop.key = METADATA_KEY
        prop.value = "[]"
    prop.value = json.dumps(json.loads(prop.value) + list(entries))


def _records(model: onnx.ModelProto) -> dict[str, list[dict[str, Any]]]:
    prop = next((p for p in model.metadata_props if p.key == METADATA_KEY), None)
    by_weight: dict[str, list[dict[str, Any]]] = {}
    for e in json.loads(prop.value) if prop is not None else []:
        by_weight.setdefault(str(e["weight"]), []).append(e)
    return by_weight


def _directions(model: onnx.ModelProto, name: str) -> int | None:
    """The leading dimension of graph input or initializer ``name``, when static."""
    g = model.graph
    for t in g.initializer:
        if t.name == name:
            return int(t.dims[0]) if t.dims else None
    for vi in g.input:
        if vi.name == name:
            dims = vi.type.tensor_type.shape.dim
            return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") else None
    return None


def _subgraph_reads(graph: onnx.GraphProto) -> set[str]:
    """Every tensor name read by a node inside a subgraph (If/Loop/Scan bodies, at any depth)."""
    reads: set[str] = set()
    for nd in graph.node:
        for a in nd.attribute:
            for sub in [a.g] if a.HasField("g") else list(a.graphs):
                reads |= {i for inner in sub.node for i in inner.input} | _subgraph_reads(sub)
    return reads


def plan(model: onnx.ModelProto, xs: Iterable[str]) -> tuple[set[str], Finish | None]:
    """The tensors to differentiate instead of ``xs``, and the step that restores the deferred
    weights' ``<R>_grad`` outputs in the built gradient graph (None: nothing deferred)."""
    xset = set(xs)
    records = {w: es for w, es in _records(model).items() if w in xset}
    if not records:
        return xset, None
    g = model.graph
    produced = {o for nd in g.node for o in nd.output if o}
    known = produced | {t.name for t in g.initializer} | {i.name for i in g.input}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for nd in g.node:
        for i in nd.input:
            consumers.setdefault(i, []).append(nd)
    inits = {t.name for t in g.initializer}
    nested = _subgraph_reads(g)
    chosen: dict[str, list[dict[str, Any]]] = {}
    for w, es in records.items():
        slices = {e["slice"] for e in es}
        ok = w not in nested and len(es) == _directions(model, w) and len(slices) == len(es)
        blocks = [b for e in es for b in e["blocks"]]
        ok = ok and all(b["dpre"] in inits and all(x in known for x in b["inputs"]) for b in blocks)
        # R must reach the graph only through the unrolling's Slice → Reshape per direction
        for nd in consumers.get(w, []) if ok else []:
            outs = [o for o in nd.output if o]
            ok = ok and nd.op_type == "Slice" and len(outs) == 1
            ok = ok and all(c.op_type == "Reshape" and c.output[0] in slices for c in consumers.get(outs[0], []))
        ok = ok and all(s in produced for s in slices)
        if ok:
            chosen[w] = es
        else:
            log.debug("recurrent weight %r: its gradient is left to the builder", w)
    if not chosen:
        return xset, None
    swapped = (xset - set(chosen)) | {b["dpre"] for es in chosen.values() for e in es for b in e["blocks"]}

    def finish(gm: onnx.ModelProto) -> onnx.ModelProto:
        gg = gm.graph
        outputs = {o.name for o in gg.output}
        stand_ins = {b["dpre"] for es in chosen.values() for e in es for b in e["blocks"]}
        if any(f"{x}_grad" not in outputs for x in stand_ins):
            raise RuntimeError(f"the gradient builder gave no gradient for a stand-in of {sorted(chosen)}")
        widths = {t.name: int(t.dims[-1]) for t in gg.initializer if t.name in stand_ins}
        elem = {vi.name: vi.type.tensor_type.elem_type for vi in gg.input}
        elem.update({t.name: t.data_type for t in gg.initializer})
        nodes: list[onnx.NodeProto] = []
        flat: dict[str, str] = {}  # stand-in → its gradient as (T·B, width)

        def const(name: str, values: list[int]) -> str:
            gg.initializer.append(numpy_helper.from_array(np.asarray(values, np.int64), name))
            return name

        for x in sorted(stand_ins):
            flat[x] = f"{x}__grad2d"
            shape = const(f"{x}__grad2d_shape", [-1, widths[x]])
            nodes.append(helper.make_node("Reshape", [f"{x}_grad", shape], [flat[x]], name=f"{flat[x]}_Reshape"))
        for w, es in chosen.items():
            parts = []
            for d, e in enumerate(es):
                rows = []
                for k, b in enumerate(e["blocks"]):
                    tag = f"{w}__deferred{d}_{k}"
                    delta = flat[b["dpre"]]
                    c0, c1 = (int(c) for c in b["cols"])
                    if (c0, c1) != (0, widths[b["dpre"]]):
                        starts, ends, axes = (const(f"{tag}_{n}", [v]) for n, v in (("st", c0), ("en", c1), ("ax", 1)))
                        nodes.append(
                            helper.make_node("Slice", [delta, starts, ends, axes], [f"{tag}_d"], name=f"{tag}_Slice")
                        )
                        delta = f"{tag}_d"
                    u = f"{tag}_u"  # (T·B, H): the u_t one under the other, as the rows of Δ
                    nodes.append(helper.make_node("Concat", list(b["inputs"]), [u], axis=0, name=f"{u}_Concat"))
                    nodes.append(helper.make_node("Gemm", [delta, u], [f"{tag}_g"], transA=1, name=f"{tag}_Gemm"))
                    rows.append(f"{tag}_g")
                parts += rows
            out = f"{w}_grad"  # the (D·G·H, H) rows in R's own shape (D, G·H, H)
            nodes += [
                helper.make_node("Concat", parts, [f"{out}_rows"], axis=0, name=f"{out}_Concat"),
                helper.make_node("Shape", [w], [f"{out}_shape"], name=f"{out}_Shape"),
                helper.make_node("Reshape", [f"{out}_rows", f"{out}_shape"], [out], name=f"{out}_Reshape"),
            ]
            gg.output.append(helper.make_tensor_value_info(out, elem.get(w, onnx.TensorProto.FLOAT), None))
        gg.node.extend(nodes)
        drop = {f"{x}_grad" for x in stand_ins}
        kept = [o for o in gg.output if o.name not in drop]
        del gg.output[:]
        gg.output.extend(kept)
        return gm

    log.debug("recurrent weights with one-product gradients: %s", ", ".join(sorted(chosen)))
    return swapped, finish


__all__ = ["METADATA_KEY", "plan", "record_deferred"]
