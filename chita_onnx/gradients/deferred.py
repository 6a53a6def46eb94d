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
    """Add ``entries`` (``weight``, ``slice``: the direction's ``R_d``, ``dpre``: ``E_d``, ``hprev``:
    ``h_{t−1}`` per time index; one per direction, in direction order) to ``model``'s records."""
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
    producer_of = {o: nd for nd in g.node for o in nd.output if o}
    inits = {t.name for t in g.initializer}
    chosen: dict[str, list[dict[str, Any]]] = {}
    for w, es in records.items():
        slices = {e["slice"] for e in es}
        ok = len(es) == _directions(model, w) and len(slices) == len(es)
        ok = ok and all(e["dpre"] in inits and all(h in known for h in e["hprev"]) for e in es)
        # R must reach the graph only through the unrolling's Slice → Reshape per direction
        for nd in consumers.get(w, []) if ok else []:
            outs = [o for o in nd.output if o]
            ok = ok and nd.op_type == "Slice" and len(outs) == 1
            ok = ok and all(c.op_type == "Reshape" and c.output[0] in slices for c in consumers.get(outs[0], []))
        ok = ok and all(s in producer_of for s in slices)
        if ok:
            chosen[w] = es
        else:
            log.debug("recurrent weight %r: its gradient is left to the builder", w)
    if not chosen:
        return xset, None
    swapped = (xset - set(chosen)) | {e["dpre"] for es in chosen.values() for e in es}

    def finish(gm: onnx.ModelProto) -> onnx.ModelProto:
        gg = gm.graph
        outputs = {o.name for o in gg.output}
        for w, es in chosen.items():
            if any(f"{e['dpre']}_grad" not in outputs for e in es):
                raise RuntimeError(f"the gradient builder gave no gradient for the stand-in of {w!r}")
        elem = {vi.name: vi.type.tensor_type.elem_type for vi in gg.input}
        elem.update({t.name: t.data_type for t in gg.initializer})
        nodes: list[onnx.NodeProto] = []
        drop: set[str] = set()
        for w, es in chosen.items():
            parts = []
            for d, e in enumerate(es):
                dpre = f"{e['dpre']}_grad"
                drop.add(dpre)
                dpre_init = next(t for t in gm.graph.initializer if t.name == e["dpre"])
                gh = int(dpre_init.dims[2])
                hs, flat, gd, one = (f"{w}__deferred{d}_{k}" for k in ("hprev", "dpre", "grad", "grad3"))
                shape = f"{w}__deferred{d}_shape"
                shape3 = f"{w}__deferred{d}_shape3"
                gg.initializer.append(numpy_helper.from_array(np.asarray([-1, gh], np.int64), shape))
                gg.initializer.append(numpy_helper.from_array(np.asarray([1, gh, -1], np.int64), shape3))
                nodes += [
                    helper.make_node("Concat", list(e["hprev"]), [hs], axis=0, name=f"{hs}_Concat"),  # (T·B, H)
                    helper.make_node("Reshape", [dpre, shape], [flat], name=f"{flat}_Reshape"),  # (T·B, G·H)
                    helper.make_node("Gemm", [flat, hs], [gd], transA=1, name=f"{gd}_Gemm"),  # (G·H, H)
                    helper.make_node("Reshape", [gd, shape3], [one], name=f"{one}_Reshape"),
                ]
                parts.append(one)
            out = f"{w}_grad"
            nodes.append(helper.make_node("Concat", parts, [out], axis=0, name=f"{out}_Concat"))
            gg.output.append(helper.make_tensor_value_info(out, elem.get(w, onnx.TensorProto.FLOAT), None))
        gg.node.extend(nodes)
        kept = [o for o in gg.output if o.name not in drop]
        del gg.output[:]
        gg.output.extend(kept)
        return gm

    log.debug("recurrent weights with one-product gradients: %s", ", ".join(sorted(chosen)))
    return swapped, finish


__all__ = ["METADATA_KEY", "plan", "record_deferred"]
