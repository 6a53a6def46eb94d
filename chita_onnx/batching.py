"""Which axis of each model input (and output) indexes the samples.

Exporters put the batch on axis 0 almost always, but not always: a recurrent state is often
``[layers, batch, hidden]`` (silero-vad's ``state [2, batch, 128]``), a sample rate is a rank-0
scalar with no batch at all, and sequence-first exports return ``[T, batch, C]``.  The rules, from the
model signature and what the graph layer reads off the graph (no data):

1. A symbolic dimension *name* that says batch (``batch``, ``batch_size``, ``N``, ``B``, ``bs``, ...:
   :func:`is_batch_name`) is the batch, in every input that has it, even in one input only: a
   sequence-first ``[seq, batch, F]`` input is batched on axis 1.  Otherwise, where the graph shows
   an input's batch axis (``hints``: the input feeds a recurrent layer's sequence input, whose batch
   axis ONNX fixes, or exactly one of its named axes is named in the outputs too), the name at that
   axis is the batch.  Otherwise a name shared by several inputs is the
   batch: the name found in the most inputs wins (ties: the one at the lowest axis, then the first
   seen).  Each input that has the chosen name is batched on the axis where it first appears.
2. Otherwise, per input: a hinted axis (above; unknown or 1) is the batch; a rank-0 input has no
   batch axis; an unknown axis 0 (a symbolic name, an empty name, no value, or a value ≤ 0 as some
   exporters write for "unknown") is the batch; a fixed axis 0 of size 1 is a fixed batch of one;
   otherwise the first unknown axis.
3. An input whose dims are all fixed has no batch axis when another input of the model has an
   unknown dim (it is a static value, e.g. an image-size vector), and axis 0 when the whole model is
   static (a fixed-batch export).

Pure Python: no onnx import (the graph layer turns value infos into the dim tuples used here).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

Dim = int | str | None

#: Dimension names that say "the samples": ``batch`` anywhere in the name, or one of these words.
_BATCH_WORDS = frozenset({"n", "b", "bs", "bsz", "nb", "nbatch", "minibatch", "samples", "n_samples", "num_samples"})


def is_batch_name(d: Dim) -> bool:
    """A symbolic dim name that says batch: contains ``batch`` (any case) or is one of ``N``, ``B``,
    ``bs``, ``bsz``, ``samples``, ... (not ``unk__3``, ``s0``, ``seq``, ``time``)."""
    if not isinstance(d, str) or not d:
        return False
    low = d.strip().lower()
    return "batch" in low or low in _BATCH_WORDS or re.fullmatch(r"[nb]_?\d+", low) is not None


def is_unknown(d: Dim) -> bool:
    """A dim without a fixed positive size: a symbolic name (even empty), ``None``, or an int ≤ 0."""
    return not isinstance(d, int) or d <= 0


def _named(d: Dim) -> str | None:
    return d if isinstance(d, str) and d else None


def shared_batch_name(shapes: Sequence[Sequence[Dim]], hints: Sequence[int | None] | None = None) -> str | None:
    """The symbolic dim name that rule 1 picks as the batch, or ``None``."""
    count: dict[str, int] = {}
    first_axis: dict[str, int] = {}
    order: dict[str, int] = {}
    for shape in shapes:
        seen: set[str] = set()
        for axis, d in enumerate(shape):
            name = _named(d)
            if name is None or name in seen:
                continue
            seen.add(name)
            count[name] = count.get(name, 0) + 1
            first_axis[name] = min(first_axis.get(name, axis), axis)
            order.setdefault(name, len(order))
    said = [n for n in count if is_batch_name(n)]
    if said:
        return min(said, key=lambda n: (-count[n], first_axis[n], order[n]))
    for shape, hint in zip(shapes, hints or (), strict=False):
        if hint is not None and hint < len(shape) and _named(shape[hint]) is not None:
            return _named(shape[hint])
    shared = [n for n, c in count.items() if c >= 2]
    if not shared:
        return None
    return min(shared, key=lambda n: (-count[n], first_axis[n], order[n]))


def _fallback_axis(shape: Sequence[Dim]) -> int | None:
    if not shape:
        return None
    if is_unknown(shape[0]) or shape[0] == 1:
        return 0
    for axis, d in enumerate(shape):
        if is_unknown(d):
            return axis
    return None


def infer_batch_axes(shapes: Sequence[Sequence[Dim]], hints: Sequence[int | None] | None = None) -> list[int | None]:
    """The batch axis of each input shape (``None`` for inputs without one); see the module docstring.

    ``hints[i]``: the batch axis the graph shows for input ``i`` (``None``: nothing shown).
    """
    name = shared_batch_name(shapes, hints)
    any_unknown = any(is_unknown(d) for shape in shapes for d in shape)
    axes: list[int | None] = []
    for i, shape in enumerate(shapes):
        hint = hints[i] if hints is not None and i < len(hints) else None
        if not shape:
            axes.append(None)
            continue
        if name is not None and name in shape:
            axes.append(list(shape).index(name))
            continue
        if hint is not None and hint < len(shape) and (is_unknown(shape[hint]) or shape[hint] == 1):
            axes.append(hint)
            continue
        if not any(is_unknown(d) for d in shape):
            axes.append(None if any_unknown else 0)
            continue
        axes.append(_fallback_axis(shape))
    return axes


def output_batch_axis(
    declared: Sequence[Dim] | None, input_batch_names: Sequence[str], actual: Sequence[int], fed: int
) -> int:
    """The batch axis of an output array of shape ``actual`` computed from ``fed`` samples.

    The declared shape is trusted when its rank matches and its batch dim (an input's batch name, or
    axis 0) has ``fed`` entries; otherwise the only axis of size ``fed``; otherwise axis 0.  Exporters
    do declare wrong output shapes (ddddocr's ``[1, seqlen]`` for a ``[T, 1, C]`` tensor).
    """
    if declared is not None and len(declared) == len(actual):
        for axis, d in enumerate(declared):
            if isinstance(d, str) and d and d in input_batch_names and actual[axis] == fed:
                return axis
        if actual and actual[0] == fed:
            return 0
    elif actual and actual[0] == fed:
        return 0
    hits = [axis for axis, size in enumerate(actual) if size == fed]
    if len(hits) == 1:
        return hits[0]
    return 0
