"""The calibration-data protocol shared by every layer.

A calibration source is any *re-iterable* object whose iteration yields :class:`Batch` objects: a dict
of input arrays (keyed by the model's input names) and optional integer labels of shape ``(batch,)``.
Every input that has a batch axis in the model (:attr:`InputSpec.batch_axis`) holds its samples on
axis 0, whatever axis the model uses (a recurrent state ``[2, batch, 128]`` is stored ``(N, 2, 128)``
and moved when fed); an input without one (a rank-0 sample rate, say) is one value with the model's
shape, shared by every sample.  Iterating twice must give the same batches in the same order.  In spirit this is
onnxruntime's ``CalibrationDataReader`` (``get_next()`` → feed dict), made re-iterable and label-aware.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray


class Batch(NamedTuple):
    """One batch: ``inputs[name]`` has shape ``(b, ...)``; ``labels`` is ``(b,)`` int64 or ``None``."""

    inputs: Mapping[str, NDArray[np.generic]]
    labels: NDArray[np.int64] | None

    @property
    def size(self) -> int:
        """Samples in the batch: axis 0 of the first input that has one (static inputs come last in
        the batches chita-onnx makes; use :func:`chita_onnx.data.batch_size` when specs are known)."""
        for v in self.inputs.values():
            if np.ndim(v) > 0:
                return int(np.shape(v)[0])
        return 1


@runtime_checkable
class CalibrationSource(Protocol):
    """A re-iterable source of :class:`Batch`; every iteration yields the same batches in order."""

    def __iter__(self) -> Iterator[Batch]: ...


class InputSpec(NamedTuple):
    """A model input: its name, shape (ints for fixed dims, str/None for symbolic ones), dtype and
    batch axis.

    ``batch_axis`` is the axis of ``shape`` that indexes samples (``None`` for an input without one,
    such as a rank-0 scalar: it is given once and shared by all samples).  Calibration arrays always
    carry their samples on axis 0; :func:`chita_onnx.data.feed` moves them to ``batch_axis``.
    """

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype[np.generic]
    batch_axis: int | None = 0

    @property
    def sample_shape(self) -> tuple[int | str | None, ...]:
        """The shape of one sample: ``shape`` without the batch axis (all of it for a static input)."""
        if self.batch_axis is None:
            return self.shape
        return self.shape[: self.batch_axis] + self.shape[self.batch_axis + 1 :]
