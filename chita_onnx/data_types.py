"""The calibration-data protocol shared by every layer.

A calibration source is any *re-iterable* object whose iteration yields :class:`Batch` objects: a dict
of input arrays (keyed by the model's input names, batch on axis 0) and optional integer labels of
shape ``(batch,)``.  Iterating twice must give the same batches in the same order.  In spirit this is
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
        return int(next(iter(self.inputs.values())).shape[0])


@runtime_checkable
class CalibrationSource(Protocol):
    """A re-iterable source of :class:`Batch`; every iteration yields the same batches in order."""

    def __iter__(self) -> Iterator[Batch]: ...


class InputSpec(NamedTuple):
    """A model input: its name, shape (ints for fixed dims, str/None for symbolic ones) and dtype."""

    name: str
    shape: tuple[int | str | None, ...]
    dtype: np.dtype[np.generic]
