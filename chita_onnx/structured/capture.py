"""Intermediate activations through onnxruntime: extra graph outputs on a copy of the model.

This is the minimal capture the channel pruner needs, behind two functions so that a shared
activation-capture module can replace it later:

* :func:`probe_shapes` — the concrete shape of every intermediate tensor on a few real samples (the
  dependency analysis reasons on these, not on exporter-provided ``value_info``);
* :func:`capture` — the values of chosen tensors, batch by batch, over a calibration source.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence

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


def _reads(node: onnx.NodeProto) -> list[str]:
    """Names a node reads, including those captured by its subgraphs."""
    names = [x for x in node.input if x]
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for sub in g.node:
                names.extend(_reads(sub))
    return names


def _with_outputs(
    model: onnx.ModelProto,
    names: Sequence[str],
    *,
    only: bool = False,
    given: Mapping[str, int] | None = None,
) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of ``model`` that also outputs the tensors ``names`` (type left to onnxruntime).

    ``only``: the copy outputs just ``names`` and keeps only the nodes needed to compute them;
    tensors in ``given`` (name → element type) become extra graph inputs where they cut the graph.
    Returns the model and the ``given`` names it reads.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    used: list[str] = []
    if only:
        cut = dict(given or {})
        needed = set(names)
        keep = []
        for node in reversed(out.graph.node):
            if any(o in needed and o not in cut for o in node.output):
                keep.append(node)
                needed.update(_reads(node))
        del out.graph.node[:]
        out.graph.node.extend(reversed(keep))
        del out.graph.output[:]
        produced = {o for node in keep for o in node.output}
        used = [n for n in cut if n in needed and n not in produced]
        for n in used:
            out.graph.input.append(helper.make_tensor_value_info(n, cut[n], None))
    have = {o.name for o in out.graph.output}
    for name in names:
        if name not in have:
            vi = onnx.ValueInfoProto()
            vi.name = name
            out.graph.output.append(vi)
            have.add(name)
    return out, used


def _runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    if model.ir_version > RUNTIME_MAX_IR or opset_version(model) > RUNTIME_MAX_OPSET:
        return for_runtime(model)
    return model


def session(model: onnx.ModelProto | bytes, *, threads: int = 1, optimize: bool = True) -> ort.InferenceSession:
    """A CPU session with all graph optimisations (none when not ``optimize``); load failures become a
    one-line :class:`ModelError`.

    A model newer than the bundled onnxruntime loads is converted down first (for running only).
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    proto = onnx.load_model_from_string(model) if isinstance(model, bytes) else model
    runnable = _runnable(proto)
    data = model if isinstance(model, bytes) and runnable is proto else runnable.SerializeToString()
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
    sess = session(_with_outputs(runnable, names)[0])
    fetch = [o.name for o in sess.get_outputs()]
    result: list[Shapes] = []
    for batch in batches:
        inputs = feed(batch, specs)
        values = sess.run(fetch, inputs)
        shapes = {n: tuple(int(d) for d in np.shape(v)) for n, v in inputs.items()}
        shapes.update({n: tuple(int(d) for d in np.shape(v)) for n, v in zip(fetch, values, strict=True)})
        result.append(shapes)
    return result


def capture(
    model: onnx.ModelProto | bytes,
    names: Sequence[str],
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    *,
    max_samples: int | None = None,
    threads: int = 1,
    given: Mapping[str, Sequence[NDArray[np.generic]]] | None = None,
) -> Iterator[dict[str, NDArray[np.floating]]]:
    """Yield ``{name: value}`` of the tensors ``names`` for every batch of ``source`` (at most
    ``max_samples`` samples in total), computed by onnxruntime on ``model`` (only the nodes needed).

    ``given`` holds known values of intermediate tensors, one array per batch (e.g. captured in an
    earlier pass and still valid): the computation starts from them instead of from the inputs.
    """
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load_model_from_string(model)
    given = dict(given or {})
    types = {n: int(helper.np_dtype_to_tensor_dtype(np.asarray(v[0]).dtype)) for n, v in given.items() if v}
    cut_model, used = _with_outputs(_runnable(proto), names, only=True, given=types)
    sess = session(cut_model, threads=threads)
    seen = 0
    for b, batch in enumerate(source):
        if max_samples is not None and seen >= max_samples:
            return
        if max_samples is not None and seen + batch.size > max_samples:
            keep = max_samples - seen
            batch = Batch({k: np.asarray(v)[:keep] for k, v in batch.inputs.items()}, None)
        inputs = feed(batch, specs)
        inputs.update({n: given[n][b] for n in used})
        values = sess.run(list(names), inputs)
        seen += batch.size
        yield dict(zip(names, values, strict=True))


def value_info(name: str, elem_type: int = onnx.TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem_type, None)
