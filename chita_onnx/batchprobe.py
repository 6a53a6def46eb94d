"""Tell the batch axis from a time axis by running the model: the samples never meet along the batch.

The rules of :mod:`chita_onnx.batching` read the batch axis off the signature and the graph.  One
kind of input defeats them: two or more unknown axes with generated names (a dynamo export's
``[s77, s27, F]`` of a sequence-first transformer), no recurrent layer whose ``X`` would fix the
batch, and an output that keeps both axes (per position, ``[s77, s27, C]``).  The rules then take
the first axis, which may be time.  Such a model runs without an error on samples fed along its
time axis, so a wrong guess would go unnoticed: the calibration samples would attend to each other.

Running the model decides it.  Along the batch axis every sample is computed on its own; along a
time axis an attention, a convolution or a recurrence mixes the positions.  For each candidate dim
name, :func:`probe_batch_name` feeds a few calibration samples stacked along it and each alone; the
candidate under which every output is the per-sample outputs stacked is the batch.  When none or
several pass (a model that treats positions apart computes the same either way), nothing changes.

The data's shape can decide too: a static sequence-first export ``[28, 1, 28]`` has no dynamic axis
at all, and the rules take axis 0; arrays of samples ``(28, 28)`` fit its axis 1 only.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from . import runtime
from .activations import _stacked_along_one_axis
from .data import DataSpec, open_source, to_model_layout
from .data_types import CalibrationSource, InputSpec
from .errors import ChitaError, DataError
from .graph import guessed_batch_names, model_inputs, with_batch_axes

log = logging.getLogger(__name__)

#: Calibration samples fed by the probe, each alone and all together.
PROBE_SAMPLES = 3


def _first_samples(source: CalibrationSource, specs: Sequence[InputSpec], k: int) -> dict[str, NDArray[np.generic]]:
    """Up to ``k`` samples of every batched input (samples first), and the static inputs as given."""
    parts: dict[str, list[NDArray[np.generic]]] = {s.name: [] for s in specs}
    taken = 0
    for batch in source:
        for s in specs:
            if s.name not in batch.inputs:  # missing: the data's validation names it
                continue
            a = np.asarray(batch.inputs[s.name])
            if s.batch_axis is None or a.ndim == 0:
                parts[s.name] = [a]
            elif not parts[s.name] or parts[s.name][0].shape[1:] == a.shape[1:]:  # sequences of one length
                parts[s.name].append(a[: k - taken])
        taken += min(batch.size, k - taken)
        if taken >= k:
            break
    return {n: (v[0] if len(v) == 1 else np.concatenate(v)) for n, v in parts.items() if v}


def probe_batch_name(
    model: onnx.ModelProto, specs: Sequence[InputSpec], source: CalibrationSource, candidates: Sequence[str]
) -> str | None:
    """The one dim name of ``candidates`` along which the model computes every sample apart, or None.

    ``specs`` are the inputs as :func:`~chita_onnx.graph.model_inputs` reads them; ``source`` gives
    the samples (samples first, as every calibration source does).  Under each candidate, the inputs
    that have that dim are fed with the samples on it (the others as ``specs`` say): the model runs
    on :data:`PROBE_SAMPLES` samples together and on each alone, and the candidate passes when every
    output is the per-sample outputs stacked along one axis.  A run that fails fails the candidate.
    """
    return _probe(model, specs, _first_samples(source, specs, PROBE_SAMPLES), candidates)


def _on(specs: Sequence[InputSpec], name: str) -> list[InputSpec]:
    """``specs`` with every input that has the dim ``name`` batched on it (the others as they are)."""
    return [s._replace(batch_axis=list(s.shape).index(name)) if name in s.shape else s for s in specs]


def _probe(
    model: onnx.ModelProto,
    specs: Sequence[InputSpec],
    arrays: dict[str, NDArray[np.generic]],
    candidates: Sequence[str],
) -> str | None:
    """:func:`probe_batch_name` on the samples ``arrays`` (:func:`_first_samples`)."""
    batched = [s.name for s in specs if s.batch_axis is not None]
    if any(n not in arrays or arrays[n].ndim == 0 for n in batched):
        return None
    k = min((arrays[n].shape[0] for n in batched), default=0)
    if k < 2 or all(np.array_equal(arrays[n][i], arrays[n][0]) for i in range(1, k) for n in batched):
        return None  # equal samples cannot show which axis mixes them
    try:
        sess = runtime.session(model, what="the model (probe of its batch axis)", threads=1, check=False)
    except ChitaError as exc:
        log.debug("no batch-axis probe: %s", exc)
        return None
    passing: list[str] = []
    for name in candidates:
        on = _on(specs, name)

        def fed(lo: int, hi: int, on: list[InputSpec] = on) -> dict[str, NDArray[np.generic]]:
            return {
                s.name: to_model_layout(arrays[s.name][lo:hi], s) if s.batch_axis is not None else arrays[s.name]
                for s in on
            }

        try:
            alone = [runtime.run(sess, None, fed(i, i + 1), what="the model on one sample (batch-axis probe)")
                     for i in range(k)]  # fmt: skip
            together = runtime.run(sess, None, fed(0, k), what="the model on the probe samples (batch-axis probe)")
        except ChitaError as exc:
            log.debug("the samples on %r: %s", name, exc)
            continue
        if all(_stacked_along_one_axis([a[j] for a in alone], np.asarray(t)) for j, t in enumerate(together)):
            passing.append(name)
        else:
            log.debug("the samples on %r meet: not the batch", name)
    return passing[0] if len(passing) == 1 else None


def _fits(dims: Sequence[object], shape: tuple[int, ...]) -> bool:
    """Whether an array of ``shape`` fits model dims ``dims`` (a fixed size must match)."""
    if len(dims) != len(shape):
        return False
    return all(not isinstance(d, int) or d <= 0 or d == g for d, g in zip(dims, shape, strict=True))


def axis_from_shape(spec: InputSpec, sample: tuple[int, ...]) -> int | None:
    """The batch axis the data's shape shows for ``spec``: where the rules' axis does not fit arrays of
    per-sample shape ``sample`` and exactly one fixed axis of size 1 does (a static sequence-first
    export from one sample, ``[28, 1, 28]``, fed ``(n, 28, 28)``: its samples are on axis 1), that
    axis; else None.  Only a batch of one, and only where the rules' axis is not one itself: data
    that fits nothing else, or a static ``[1, 8, 1]`` fed ``(n, 1, 8)``, stays refused by its shape."""
    if spec.batch_axis is None or spec.shape[spec.batch_axis] == 1:  # a batch of one where the rules say
        return None
    if _fits(spec.shape[: spec.batch_axis] + spec.shape[spec.batch_axis + 1 :], sample):
        return None
    ones = [a for a, d in enumerate(spec.shape) if d == 1 and a != spec.batch_axis]
    fits = [a for a in ones if _fits(spec.shape[:a] + spec.shape[a + 1 :], sample)]
    return fits[0] if len(fits) == 1 else None


def settle_batch_axes(
    model: onnx.ModelProto, specs: Sequence[InputSpec], source: CalibrationSource, what: str
) -> tuple[onnx.ModelProto, tuple[InputSpec, ...]]:
    """The batch axes the data decides where the rules of :func:`~chita_onnx.graph.model_inputs`
    cannot: an input whose arrays fit only another axis (:func:`axis_from_shape`), else, where the
    rules only guess (:func:`~chita_onnx.graph.guessed_batch_names`), the probe.  A decision is
    recorded in a copy of ``model`` (:func:`~chita_onnx.graph.with_batch_axes`), so that every later
    reading of the copy's inputs agrees.  Returns the model (the same object when nothing changed)
    and its inputs."""
    arrays = _first_samples(source, specs, PROBE_SAMPLES)
    rules = {s.name: s.batch_axis for s in specs}
    axes = dict(rules)
    for s in specs:
        a = arrays.get(s.name)
        if a is None or a.ndim == 0:
            continue
        moved = axis_from_shape(s, tuple(a.shape[1:]))
        if moved is not None:
            log.info("%s: input %r: the arrays' samples %s fit the model's axis %d only: fed there",
                     what, s.name, tuple(a.shape[1:]), moved)  # fmt: skip
            axes[s.name] = moved
    if axes == rules:
        candidates = guessed_batch_names(model)
        name = _probe(model, specs, arrays, candidates) if candidates else None
        if name is None:
            if candidates:
                log.info("%s: the batch axis stays a guess (axes %s): the samples stay apart along none or "
                         "several of %s", what, list(rules.values()), candidates)  # fmt: skip
            return model, tuple(specs)
        axes = {s.name: s.batch_axis for s in _on(specs, name)}
        log.info("%s: the samples are computed apart only along dim %r: fed on axes %s",
                 what, name, list(axes.values()))  # fmt: skip
        if axes == rules:  # the probe confirms the rules: nothing to record
            return model, tuple(specs)
    settled = with_batch_axes(model, axes)
    return settled, tuple(model_inputs(settled))


def open_settled(
    data: DataSpec, model: onnx.ModelProto, specs: Sequence[InputSpec], what: str, **kw: Any
) -> tuple[onnx.ModelProto, tuple[InputSpec, ...], CalibrationSource]:
    """:func:`~chita_onnx.data.open_source` of ``data`` for ``model`` after :func:`settle_batch_axes`:
    the model (a copy where the data decided an axis), its inputs and the source read for them
    (``kw``: :func:`~chita_onnx.data.open_source`'s keywords).  Arrays that do not fit the rules'
    axes are read without the shape check first; if they fit no other axis, the check's error is
    raised as it was."""
    try:
        source = open_source(data, specs, **kw)
        refused: DataError | None = None
    except DataError as exc:  # perhaps the samples sit on another axis: read loosely, then decide
        loose = [s._replace(shape=(None,) * len(s.shape)) if s.batch_axis is not None else s for s in specs]
        try:
            source = open_source(data, loose, **kw)
        except DataError:
            raise exc from None
        refused = exc
    settled_model, settled = settle_batch_axes(model, specs, source, what)
    if settled == tuple(specs):
        if refused is not None:
            raise refused
        return model, settled, source
    if not isinstance(data, (str, bytes, os.PathLike, Mapping)):  # a source of batches: read once, kept as is
        return settled_model, settled, source
    return settled_model, settled, open_source(data, settled, **kw)
