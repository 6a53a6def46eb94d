"""Intermediate activations through onnxruntime: extra graph outputs on a copy of the model.

This is the minimal capture the channel pruner needs, behind two functions so that a shared
activation-capture module can replace it later:

* :func:`probe_shapes` — the concrete shape of every intermediate tensor on a few real samples (the
  dependency analysis reasons on these, not on exporter-provided ``value_info``);
* :func:`capture` — the values of chosen tensors, batch by batch, over a calibration source.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import helper

from ..data import feed
from ..data_types import Batch, CalibrationSource, InputSpec
from ..errors import ModelError
from ..graph import RUNTIME_MAX_IR, RUNTIME_MAX_OPSET, for_runtime, opset_version

log = logging.getLogger(__name__)

Shapes = dict[str, tuple[int, ...]]


def _with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (type left to onnxruntime)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            vi = onnx.ValueInfoProto()
            vi.name = name
            out.graph.output.append(vi)
            have.add(name)
    return out


def _runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ir_version > RUNTIME_MAX_IR or opset_version(model) > RUNTIME_MAX_OPSET:
        return for_runtime(model)
    return model


def session(model: onnx.ModelProto | bytes, *, threads: int = 1) -> ort.InferenceSession:
    """A CPU session with all graph optimisations; load failures become a one-line :class:`ModelError`."""
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    data = model if isinstance(model, bytes) else model.SerializeToString()
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelError(f"onnxruntime {ort.__version__} cannot load the model: {msg}") from None


def _tensor_names(model: onnx.ModelProto) -> list[str]:
    inits = {t.name for t in model.graph.initializer}
    consts = {n.output[0] for n in model.graph.node if n.op_type == "Constant" and n.output}
    names: list[str] = []
    for node in model.graph.node:
        if node.op_type == "Constant":
            continue
        names.extend(o for o in node.output if o and o not in inits and o not in consts)
    return names


def probe_shapes(model: onnx.ModelProto, batches: Sequence[Batch], specs: Sequence[InputSpec]) -> list[Shapes]:
    """The concrete shape of every node output, one dict per probe batch (real samples).

    Tensors whose type onnxruntime cannot expose (sequences, maps) are left out.
    """
    runnable = _runnable(model)
    names = [n for n in _tensor_names(runnable)]
    sess = session(_with_outputs(runnable, names))
    fetch = [o.name for o in sess.get_outputs()]
    result: list[Shapes] = []
    for batch in batches:
        values = sess.run(fetch, feed(batch, specs))
        result.append({n: tuple(int(d) for d in np.shape(v)) for n, v in zip(fetch, values, strict=True)})
    return result


def capture(
    model: onnx.ModelProto | bytes,
    names: Sequence[str],
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    *,
    max_samples: int | None = None,
) -> Iterator[dict[str, NDArray[np.floating]]]:
    """Yield ``{name: value}`` of the tensors ``names`` for every batch of ``source`` (at most
    ``max_samples`` samples in total), computed by onnxruntime on ``model``."""
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_model_from_string(model)
    sess = session(_with_outputs(_runnable(proto), names))
    seen = 0
    for batch in source:
        if max_samples is not None and seen >= max_samples:
            return
        if max_samples is not None and seen + batch.size > max_samples:
            keep = max_samples - seen
            batch = Batch({k: np.asarray(v)[:keep] for k, v in batch.inputs.items()}, None)
        values = sess.run(list(names), feed(batch, specs))
        seen += batch.size
        yield dict(zip(names, values, strict=True))


def value_info(name: str, elem_type: int = onnx.TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, None)
