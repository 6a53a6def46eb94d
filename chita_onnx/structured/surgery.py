"""Graph rewrite for channel pruning: the *masked* model and the *sliced* (smaller) model.

Both are built from the same :class:`~chita_onnx.structured.groups.Analysis` and the same decision
``kept[class]``:

* :func:`masked_model` keeps every shape and zeroes the input columns of the consumers that read a
  removed channel (and the producers' rows of it), so removed channels are computed but never read;
* :func:`sliced_model` removes them: producer rows, per-channel parameters (BN, biases, depthwise
  filters) and consumer columns are sliced; Conv ``group`` attributes, Reshape targets, Split sizes
  and Slice bounds follow; stale ``value_info`` is dropped.

By construction the two compute the same outputs (tested).  ``weights`` overrides let the re-fitted
consumer weights (full, unsliced shape) go into either model.  Graph inputs and outputs are untouched.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx
from numpy.typing import NDArray

from .graphutil import Constants, Rewriter
from .groups import PINNED, Analysis, Slice

Key = tuple[int, int]  # (node index, input slot)


def kept_classes(analysis: Analysis, kept: Mapping[int, NDArray[np.int64]]) -> NDArray[np.bool_]:
    """Boolean over class ids: False for the classes of pruned groups that are not in ``kept[gid]``."""
    keep = np.ones(analysis.unit_class.size, dtype=bool)
    for gid, ids in kept.items():
        g = analysis.groups[gid]
        keep[g.classes] = False
        keep[np.asarray(ids, dtype=np.int64)] = True
    keep[PINNED] = True
    return keep


def _positions(analysis: Analysis, units: NDArray[np.int64], keep: NDArray[np.bool_]) -> NDArray[np.bool_]:
    return keep[analysis.unit_class[units]]


def _grouped_take(w: NDArray[np.generic], mask: NDArray[np.bool_], groups: int, zero: bool) -> NDArray[np.generic]:
    """Columns (axis 1) of a grouped Conv weight; ``mask`` covers all C_in positions."""
    cout = w.shape[0]
    per_in = w.shape[1]
    per_out = cout // groups
    if zero:
        out = w.copy()
        for b in range(groups):
            dead = ~mask[b * per_in : (b + 1) * per_in]
            out[b * per_out : (b + 1) * per_out, dead] = 0
        return out
    cols = [np.flatnonzero(mask[b * per_in : (b + 1) * per_in]) for b in range(groups)]
    n = {c.size for c in cols}
    if len(n) != 1:
        raise ValueError(f"grouped Conv keeps unequal channel counts per group: {[c.size for c in cols]}")
    return np.concatenate([w[b * per_out : (b + 1) * per_out][:, cols[b]] for b in range(groups)], axis=0)


def _roles(analysis: Analysis, weights: Mapping[Key, NDArray[np.generic]]) -> list[Slice]:
    """The slices, plus bias slices for biases the re-fit added to a producer that had none."""
    roles = list(analysis.slices)
    have = {(s.node, s.slot) for s in roles}
    for node, slot in weights:
        if (node, slot) in have or slot != 2:
            continue
        prod = [s for s in roles if s.node == node and s.slot == 1 and s.kind == "producer"]
        if prod:
            roles.append(Slice(node, 2, 0, prod[0].units, "param"))
    order = {"consumer": 0, "producer": 1, "param": 2}
    return sorted(roles, key=lambda s: order[s.kind])


def _build(
    analysis: Analysis,
    keep: NDArray[np.bool_],
    weights: Mapping[Key, NDArray[np.generic]],
    *,
    sliced: bool,
    zero_producers: bool = True,
) -> onnx.ModelProto:
    model = analysis.model
    graph = model.graph
    consts = Constants(graph)
    arrays: dict[Key, NDArray[np.generic]] = {k: np.asarray(v) for k, v in weights.items()}

    def current(key: Key) -> NDArray[np.generic]:
        if key not in arrays:
            value = consts.value(graph.node[key[0]].input[key[1]])
            if value is None:
                raise ValueError(f"input {key[1]} of node {key[0]} is not a constant")
            arrays[key] = value
        return arrays[key]

    for role in _roles(analysis, weights):
        mask = _positions(analysis, role.units, keep)
        if mask.all():
            continue
        key = (role.node, role.slot)
        w = current(key)
        if w.ndim == 0 or w.shape[role.axis] == 1:
            continue
        if role.groups > 1:
            arrays[key] = _grouped_take(w, mask, role.groups, zero=not sliced)
        elif sliced:
            arrays[key] = np.take(w, np.flatnonzero(mask), axis=role.axis)
        elif role.kind == "consumer" or (role.kind == "producer" and zero_producers):
            z = w.copy()
            index = [slice(None)] * w.ndim
            index[role.axis] = ~mask  # type: ignore[call-overload]
            z[tuple(index)] = 0
            arrays[key] = z
    rw = Rewriter(model, tag="ch" if sliced else "mask")
    if sliced:
        opset = next((int(o.version) for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        for r in analysis.rewrites:
            counts = [int(_positions(analysis, u, keep).sum()) for u in r.units]
            full = [u.size for u in r.units]
            if counts == full:
                continue
            node = graph.node[r.node]
            if r.kind == "attr":
                rw.set_attr_int(r.node, r.name, counts[0])
            elif r.kind == "shape":
                key = (r.node, r.slot)
                target = np.array(current(key), copy=True)
                flat = target.reshape(-1)
                flat[r.index] = counts[0]
                arrays[key] = target
            elif r.kind == "split":
                sizes = np.asarray(counts, dtype=np.int64)
                if opset >= 13:
                    rw.remove_attr(r.node, "num_outputs")
                    arrays[(r.node, 1)] = sizes
                else:
                    rw.set_attr_ints(r.node, "split", sizes.tolist())
            elif r.kind == "slice":
                mask = _positions(analysis, r.units[0], keep)
                start, end = int(mask[: r.start].sum()), int(mask[: r.end].sum())
                if opset >= 10:
                    for slot, bound in ((1, start), (2, end)):
                        bounds = np.array(current((r.node, slot)), copy=True).reshape(-1)
                        bounds[r.index] = bound
                        arrays[(r.node, slot)] = bounds
                else:
                    for name, bound in (("starts", start), ("ends", end)):
                        old = next(list(a.ints) for a in node.attribute if a.name == name)
                        old[r.index] = bound
                        rw.set_attr_ints(r.node, name, old)
    for (at, slot), array in arrays.items():
        inputs = graph.node[at].input
        original = consts.value(inputs[slot]) if slot < len(inputs) else None
        if original is not None and original.shape == array.shape and np.array_equal(original, array):
            continue
        rw.set_input(at, slot, np.ascontiguousarray(array))
    stale = [name for name in analysis.annots if sliced]
    return rw.finish(drop_value_info=stale)


def masked_model(
    analysis: Analysis,
    keep: NDArray[np.bool_],
    weights: Mapping[Key, NDArray[np.generic]] | None = None,
    *,
    zero_producers: bool = True,
) -> onnx.ModelProto:
    """Same shapes; removed channels are computed but their consumer columns are zero (and, with
    ``zero_producers``, the producers' rows of them too)."""
    return _build(analysis, keep, weights or {}, sliced=False, zero_producers=zero_producers)


def sliced_model(
    analysis: Analysis, keep: NDArray[np.bool_], weights: Mapping[Key, NDArray[np.generic]] | None = None
) -> onnx.ModelProto:
    """The smaller dense model without the removed channels."""
    return _build(analysis, keep, weights or {}, sliced=True)
