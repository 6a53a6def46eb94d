"""How the prunable tensors map onto one flat weight vector ``w`` of length ``p``.

Every layer that handles ``w`` or the gradient matrix ``X`` (n × p) uses the same :class:`Layout`:
tensor ``t`` occupies columns ``offset_t : offset_t + size_t``, flattened row-major in its ONNX
layout (Conv ``[M, C/g, kH, kW]``, Gemm ``[N, K]`` or ``[K, N]``, MatMul ``[K, N]``).  Only reshapes
happen here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class Slot:
    """One tensor's place in the flat vector: columns ``offset : offset + size``."""

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return prod(self.shape)

    @property
    def stop(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class Layout:
    """The ordered slots of all prunable tensors; ``p`` is the total number of weights."""

    slots: tuple[Slot, ...]

    @staticmethod
    def from_shapes(items: Iterable[tuple[str, Sequence[int]]]) -> Layout:
        slots: list[Slot] = []
        off = 0
        for name, shape in items:
            slot = Slot(name, tuple(int(d) for d in shape), off)
            slots.append(slot)
            off = slot.stop
        return Layout(tuple(slots))

    @property
    def p(self) -> int:
        return self.slots[-1].stop if self.slots else 0

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.slots)

    @property
    def segments(self) -> tuple[int, ...]:
        """Column offsets ``(0, p_1, p_1 + p_2, ..., p)``: the segment boundaries of a solver budget."""
        return (0, *(s.stop for s in self.slots))

    def slot(self, name: str) -> Slot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    def subset(self, names: Sequence[str]) -> Layout:
        """A new, compact layout for ``names`` (in the given order)."""
        return Layout.from_shapes((n, self.slot(n).shape) for n in names)

    def flatten(self, tensors: Mapping[str, NDArray[np.floating]], dtype: type = np.float32) -> NDArray[np.floating]:
        """Concatenate ``tensors`` (each of its slot's shape) into one ``(p,)`` vector."""
        out: NDArray[np.floating] = np.empty(self.p, dtype=dtype)
        for s in self.slots:
            out[s.offset : s.stop] = np.asarray(tensors[s.name]).reshape(-1)
        return out

    def unflatten(self, w: NDArray[np.floating]) -> dict[str, NDArray[np.floating]]:
        """Split a ``(p,)`` vector into per-tensor arrays (reshaped views of ``w``)."""
        if w.shape != (self.p,):
            raise ValueError(f"expected a vector of shape ({self.p},), got {w.shape}")
        return {s.name: w[s.offset : s.stop].reshape(s.shape) for s in self.slots}
