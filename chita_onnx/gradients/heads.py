"""Loss heads for outputs that are not a single batch-first classifier.

Small graph passes on the gradient working copy (after its input dims are fixed and shapes are
inferred), each returning the tensor the loss attaches to:

* :func:`batch_first` — an output whose batch is not on axis 0 (a sequence-first ``[T, N, C]``
  export) gets a ``Transpose`` that moves it there.
* :func:`combine_outputs` — several outputs (a detector's score and box branches, a recurrent
  model's output and next state) become one ``(batch, Σ size_o)`` tensor: each output is moved
  batch-first, flattened and multiplied by ``1/scale_o``.  The Gauss-Newton probe on that tensor is
  ``Σ_o J_oᵀ J_o / scale_o²``: a sum of per-output Gauss-Newton terms in which every output counts by
  its *relative* error, so a large-valued head does not drown a small one.
* :func:`output_scales` — ``scale_o``: the root mean square over samples of ``‖y_o‖`` (the
  per-sample norm) on calibration data, from the combined tensor computed with unit scales.

Graph code only: the scales are computed by the engine from a forward run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper

from ..errors import ModelError
from .prepare import _const, _infer_shapes, _Names, _shape_table

#: Name of the combined head tensor of a multi-output model.
COMBINED = "chita_outputs"


def batch_axis_of(name: str, dims: Sequence[int | None] | None, batch: int) -> int | None:
    """The axis of ``dims`` that holds the ``batch`` rows: 0 when it fits, else the only axis of that
    size.  ``None`` for a batch of one that has no axis of size 1 (an export that squeezed the batch
    axis away, e.g. a scalar score from torch's ``.squeeze()`` traced at batch 1).
    :class:`ModelError` when none or several fit."""
    if dims is None or any(d is None for d in dims):
        raise ModelError(f"cannot infer the static shape of the loss input {name!r} (got {dims})")
    if dims and dims[0] == batch:
        return 0
    hits = [k for k, d in enumerate(dims) if d == batch]
    if batch == 1 and not hits:
        return None
    if len(hits) != 1:
        raise ModelError(
            f"the loss input {name!r} has shape {list(dims)}: expected the batch ({batch}) on axis 0; "
            "the model may have a fixed batch size baked into a Reshape"
        )
    return hits[0]


def batch_first(
    model: onnx.ModelProto, tensor: str, dims: Sequence[int], batch: int
) -> tuple[str, tuple[int, ...], tuple[int, ...]]:
    """Move ``tensor``'s batch axis to the front with a Transpose appended to ``model`` (in place).

    Returns ``(tensor, shape, perm)``; ``perm`` is the identity (and nothing is added) when the batch
    already leads.  ``perm[k]`` is the original axis now at position ``k`` (``-1``: a new axis).  A
    batch of one squeezed away by the export gets a new leading axis of size 1 (a Reshape).
    """
    axis = batch_axis_of(tensor, dims, batch)
    names = _Names(model.graph)
    if axis is None:
        shape = (1, *(int(d) for d in dims))
        out = names(f"{tensor}_batch_axis")
        target = _const(model.graph, names, f"{tensor}_batch_shape", np.asarray(shape, np.int64))
        model.graph.node.append(helper.make_node("Reshape", [tensor, target], [out], name=names("chita_batch_axis")))
        return out, shape, (-1, *range(len(dims)))
    perm = (axis, *[k for k in range(len(dims)) if k != axis])
    if axis == 0:
        return tensor, tuple(int(d) for d in dims), perm
    out = names(f"{tensor}_batch_first")
    model.graph.node.append(
        helper.make_node("Transpose", [tensor], [out], perm=list(perm), name=names("chita_batch_first"))
    )
    return out, tuple(int(dims[k]) for k in perm), perm


def combine_outputs(
    model: onnx.ModelProto, tensors: Sequence[str], batch: int, scales: Sequence[float] | None
) -> tuple[onnx.ModelProto, str, tuple[int, ...], tuple[int, ...]]:
    """``Concat_o(Reshape(batch_first(y_o), [batch, −1]) · 1/scale_o)`` appended to ``model``.

    ``model`` must have inferred shapes for ``tensors``; returns the re-inferred model, the combined
    tensor's name, its shape ``(batch, Σ size_o)`` and the per-sample sizes ``size_o``.
    """
    table = _shape_table(model)
    g = model.graph
    names = _Names(g)
    parts: list[str] = []
    sizes: list[int] = []
    for k, t in enumerate(tensors):
        elem, dims = table.get(t, (TensorProto.FLOAT, None))
        if elem not in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16):
            raise ModelError(f"the output {t!r} is not a floating-point tensor")
        if dims is None or any(d is None for d in dims):
            raise ModelError(f"cannot infer the static shape of the output {t!r} (got {dims})")
        moved, shape, _ = batch_first(model, t, [int(d or 0) for d in dims], batch)
        cur = moved
        if elem != TensorProto.FLOAT:
            cast = names(f"{t}_f32")
            g.node.append(helper.make_node("Cast", [cur], [cast], to=TensorProto.FLOAT, name=names("chita_cast")))
            cur = cast
        size = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
        flat = names(f"{t}_flat")
        target = _const(g, names, f"{t}_flat_shape", np.asarray([batch, size], np.int64))
        g.node.append(helper.make_node("Reshape", [cur, target], [flat], name=names("chita_flatten")))
        scale = 1.0 if scales is None else float(scales[k])
        if scale != 1.0:
            inv = _const(g, names, f"{t}_inv_scale", np.asarray(1.0 / scale, np.float32))
            scaled = names(f"{t}_scaled")
            g.node.append(helper.make_node("Mul", [flat, inv], [scaled], name=names("chita_scale")))
            flat = scaled
        parts.append(flat)
        sizes.append(size)
    total = sum(sizes)
    out = names(COMBINED)
    g.node.append(helper.make_node("Concat", parts, [out], axis=1, name=names("chita_concat_outputs")))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, total]))
    del g.value_info[:]
    return _infer_shapes(model), out, (batch, total), tuple(sizes)


def output_scales(y: NDArray[np.floating], sizes: Sequence[int]) -> list[float]:
    """``scale_o = sqrt(mean_i ‖y_o,i‖²)`` of each segment of the combined ``(n, Σ size_o)`` tensor
    ``y`` computed with unit scales (1.0 for an all-zero segment)."""
    out: list[float] = []
    start = 0
    y64 = y.astype(np.float64)
    for size in sizes:
        seg = y64[:, start : start + size]
        s = float(np.sqrt(np.mean(np.sum(seg * seg, axis=1)))) if seg.size else 0.0
        out.append(s if s > 0 and np.isfinite(s) else 1.0)
        start += size
    return out
