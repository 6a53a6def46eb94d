"""N:M patterns on the graph side: which axis of each prunable tensor the groups run along, and a checker.

The rule (TensorRT's sparse tensor cores; NVIDIA Polygraphy's ``SparsityPruner`` uses the same axes):
for every output channel and every kernel position, each group of ``M`` consecutive entries along the
**reduction (input-channel) axis** holds at most ``N`` nonzeros.  Per consumer of a weight:

==========================  ==========================  ================================
consumer                    weight layout               reduction axis
==========================  ==========================  ================================
``Conv`` input 1            ``[M_out, C/g, k...]``      1
``Gemm`` B, ``transB=0``    ``[K, N]``                  0
``Gemm`` B, ``transB=1``    ``[N, K]``                  1
``MatMul`` B (input 1)      ``[..., K, N]``             ``rank − 2``
``MatMul`` A (input 0)      ``[..., M, K]``             ``rank − 1``
==========================  ==========================  ================================

A tensor is *eligible* when all its consumers agree on the axis and that axis' length is a multiple of
``M``; anything else is left dense and listed with the reason (TensorRT skips such layers too).
Only index arithmetic and reshapes happen here; the groups go to the solver as plain index arrays.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper

from .errors import ConfigError
from .graph import PrunableTensor, find_prunable, get_weights, load_model
from .layout import Layout
from .solver.nm import NMPattern, group_indices

__all__ = [
    "PatternCheck",
    "PatternTensor",
    "check_pattern",
    "pattern_groups",
    "pattern_summary",
    "plan_pattern",
    "reduction_axis",
]


@dataclass(frozen=True)
class PatternTensor:
    """One prunable tensor under an N:M pattern: the axis its groups run along, or why it stays dense."""

    name: str
    op_type: str
    shape: tuple[int, ...]
    axis: int | None
    eligible: bool
    reason: str = ""


def reduction_axis(node: onnx.NodeProto, slot: int, rank: int) -> int | None:
    """The reduction axis of the weight at input ``slot`` (rank ``rank``) of ``node``; ``None`` if unknown."""
    if node.op_type == "Conv" and slot == 1:
        return 1
    if node.op_type == "ConvTranspose" and slot == 1:
        return 0  # [C_in, C_out/g, *k]: the input channels are summed over
    if node.op_type == "Gemm" and slot == 1:
        trans_b = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "transB"), 0)
        return 1 if trans_b else 0
    if node.op_type == "MatMul" and rank >= 2:
        return rank - 2 if slot == 1 else rank - 1
    return None


def plan_pattern(
    model: onnx.ModelProto, tensors: Sequence[PrunableTensor], pattern: NMPattern
) -> tuple[PatternTensor, ...]:
    """Decide, for every tensor of ``tensors``, its reduction axis and whether the pattern applies."""
    wanted = {t.name: t for t in tensors}
    axes: dict[str, set[int | None]] = {t.name: set() for t in tensors}
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name in wanted:
                axes[name].add(reduction_axis(node, slot, len(wanted[name].shape)))
    plan: list[PatternTensor] = []
    for t in tensors:
        found = axes[t.name]
        if len(found) != 1 or None in found:
            why = (
                "its consumers reduce over different axes " + str(sorted(a for a in found if a is not None))
                if len(found) > 1
                else "no Conv/Gemm/MatMul consumer with a known reduction axis"
            )
            plan.append(PatternTensor(t.name, t.op_type, t.shape, None, False, why))
            continue
        axis = next(iter(found))
        assert axis is not None
        length = t.shape[axis]
        if length % pattern.m:
            why = f"reduction axis {axis} has length {length}, not a multiple of {pattern.m}"
            plan.append(PatternTensor(t.name, t.op_type, t.shape, axis, False, why))
        else:
            plan.append(PatternTensor(t.name, t.op_type, t.shape, axis, True))
    return tuple(plan)


def pattern_groups(plan: Sequence[PatternTensor], layout: Layout, m: int) -> NDArray[np.int64]:
    """``(G, m)`` int64: the groups of every eligible tensor as column indices of ``layout``'s flat vector."""
    parts = [
        group_indices(t.shape, t.axis, m, offset=layout.slot(t.name).offset)
        for t in plan
        if t.eligible and t.axis is not None and t.name in layout.names
    ]
    return np.concatenate(parts) if parts else np.empty((0, m), dtype=np.int64)


@dataclass(frozen=True)
class PatternCheck:
    """Whether one tensor of a model satisfies an N:M pattern.

    ``status``: ``"ok"`` (every group holds ≤ N nonzeros), ``"violated"`` (``violating`` of ``groups``
    groups hold more), or ``"dense"`` (not eligible: ``reason`` says why; TensorRT runs it dense).
    ``max_nonzeros`` is the largest count of nonzeros found in one group.
    """

    name: str
    op_type: str
    shape: tuple[int, ...]
    axis: int | None
    status: str
    groups: int
    violating: int
    max_nonzeros: int
    nonzeros: int
    reason: str = ""

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def check_pattern(model: onnx.ModelProto | str | os.PathLike[str], pattern: NMPattern | str) -> list[PatternCheck]:
    """Check every prunable tensor of ``model`` (a model or a file) against ``pattern`` (e.g. ``"2:4"``).

    Counts the nonzeros of every group of ``M`` consecutive weights along each tensor's reduction
    axis.  Works on any model, pruned by chita-onnx or not.
    """
    if not isinstance(pattern, (str, NMPattern)):
        raise ConfigError(f"pattern={pattern!r}: expected an N:M pattern such as '2:4'")
    nm = NMPattern.parse(pattern) if isinstance(pattern, str) else pattern
    if nm is None:
        raise ConfigError(f"pattern={pattern!r}: check_pattern needs an N:M pattern such as 2:4")
    m = model if isinstance(model, onnx.ModelProto) else load_model(model)
    tensors = find_prunable(m)
    plan = plan_pattern(m, tensors, nm)
    weights = get_weights(m, [t.name for t in plan])
    out: list[PatternCheck] = []
    for t in plan:
        w = weights[t.name]
        if not t.eligible or t.axis is None:
            nnz = int(np.count_nonzero(w))
            out.append(PatternCheck(t.name, t.op_type, t.shape, t.axis, "dense", 0, 0, 0, nnz, t.reason))
            continue
        rows = np.moveaxis(w, t.axis, -1).reshape(-1, nm.m)
        counts = np.count_nonzero(rows, axis=1)
        bad = int(np.count_nonzero(counts > nm.n))
        status = "ok" if bad == 0 else "violated"
        out.append(
            PatternCheck(
                t.name,
                t.op_type,
                t.shape,
                t.axis,
                status,
                int(rows.shape[0]),
                bad,
                int(counts.max()) if counts.size else 0,
                int(np.count_nonzero(w)),
            )
        )
    return out


def pattern_summary(checks: Sequence[PatternCheck], pattern: NMPattern) -> dict[str, Any]:
    """The report's ``pattern`` section (JSON-ready) from :func:`check_pattern` on the written model."""
    eligible = [c for c in checks if c.status != "dense"]
    size = sum(c.size for c in eligible)
    nnz = sum(c.nonzeros for c in eligible)
    return {
        "pattern": str(pattern),
        "satisfied": all(c.status == "ok" for c in eligible),
        "checked_groups": sum(c.groups for c in eligible),
        "violating_groups": sum(c.violating for c in eligible),
        "eligible": [c.name for c in eligible],
        "violated": [c.name for c in eligible if c.status == "violated"],
        "dense": [{"name": c.name, "reason": c.reason} for c in checks if c.status == "dense"],
        "eligible_sparsity": 1.0 - nnz / size if size else 0.0,
        "tensors": [{**asdict(c), "shape": list(c.shape)} for c in checks],
    }
