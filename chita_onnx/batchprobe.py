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
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx
from numpy.typing import NDArray

from . import runtime
from .activations import _stacked_along_one_axis
from .data import to_model_layout
from .data_types import CalibrationSource, InputSpec
from .errors import ChitaError
from .graph import guessed_batch_names, model_inputs, rename_dim

log = logging.getLogger(__name__)

#: Calibration samples fed by the probe, each alone and all together.
PROBE_SAMPLES = 3


def _first_samples(source: CalibrationSource, specs: Sequence[InputSpec], k: int) -> dict[str, NDArray[np.generic]]:
    """Up to ``k`` samples of every batched input (samples first), and the static inputs as given."""
    parts: dict[str, list[NDArray[np.generic]]] = {s.name: [] for s in specs}
    taken = 0
    for batch in source:
        for s in specs:
            a = np.asarray(batch.inputs[s.name])
            if s.batch_axis is None:
                parts[s.name] = [a]
            else:
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
    arrays = _first_samples(source, specs, PROBE_SAMPLES)
    batched = [s.name for s in specs if s.batch_axis is not None]
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
        on = [s._replace(batch_axis=list(s.shape).index(name)) if name in s.shape else s for s in specs]

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


def settle_batch_axes(
    model: onnx.ModelProto, specs: Sequence[InputSpec], source: CalibrationSource, what: str
) -> tuple[onnx.ModelProto, tuple[InputSpec, ...], tuple[str, str] | None]:
    """Where the rules only guess the batch axis (:func:`~chita_onnx.graph.guessed_batch_names`),
    run the probe; a dim it singles out is renamed ``batch`` (``batch_<name>`` if the model already
    has a ``batch``) in a copy of ``model``, so that every later reading of the copy's inputs agrees.
    Returns the model, its inputs, and ``(old, new)`` for a rename (None: unchanged)."""
    candidates = guessed_batch_names(model)
    if not candidates:
        return model, tuple(specs), None
    name = probe_batch_name(model, specs, source, candidates)
    if name is None:
        log.info("%s: the batch axis stays a guess (axis %s); the samples are computed apart along none or several "
                 "of %s", what, [s.batch_axis for s in specs], candidates)  # fmt: skip
        return model, tuple(specs), None
    dims = {d.dim_param for vi in [*model.graph.input, *model.graph.output] for d in vi.type.tensor_type.shape.dim}
    new = "batch" if "batch" not in dims else f"batch_{name}"
    renamed = rename_dim(model, name, new)
    settled = tuple(model_inputs(renamed))
    if [s.batch_axis for s in settled] != [s.batch_axis for s in specs]:
        log.info("%s: the samples are computed apart only along dim %r: fed on axis %s",
                 what, name, [s.batch_axis for s in settled])  # fmt: skip
    return renamed, settled, (name, new)
