"""Layer-input rows for the least-squares statistics of channel pruning (NumPy only, no onnx).

A consumer layer computes ``y = W a + b`` for every *row* ``a``: a receptive-field patch of a Conv
(im2col, columns ordered like ``W.reshape(C_out, -1)``: input channel major, then kernel offsets) or
one feature vector of a Gemm/MatMul/RNN input.  The pruner accumulates, per consumer,

    H = Σ ã ãᵀ  and  G = Σ ã yᵀ,   ã = [a_current ; 1],  y = W a_dense + b

over sampled rows, where ``a_current`` comes from the partly pruned model and ``a_dense`` from the
dense one at the same positions — the layer-wise reconstruction objective ``‖Y − Ã_S B‖²`` whose
minimiser over the kept columns ``S`` is the re-fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class ConvGeometry:
    """Kernel, strides, pads (begins then ends) and dilations of an N-d convolution."""

    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    pads: tuple[int, ...]
    dilations: tuple[int, ...]

    def out_size(self, spatial: Sequence[int]) -> tuple[int, ...]:
        nd = len(self.kernel)
        return tuple(
            (spatial[i] + self.pads[i] + self.pads[nd + i] - self.dilations[i] * (self.kernel[i] - 1) - 1)
            // self.strides[i]
            + 1
            for i in range(nd)
        )


def sample_rows(total: int, limit: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Sorted indices of at most ``limit`` of ``total`` rows (all of them when ``total <= limit``)."""
    if total <= limit:
        return np.arange(total, dtype=np.int64)
    return np.sort(rng.choice(total, size=limit, replace=False)).astype(np.int64)


def conv_rows(x: NDArray[np.floating], geom: ConvGeometry, rows: NDArray[np.int64]) -> NDArray[np.float32]:
    """im2col rows of ``x`` (N, C, *spatial) at flat output positions ``rows`` (over N × out positions).

    Returns ``(len(rows), C · prod(kernel))`` float32, columns ordered (channel, kernel offsets).
    """
    nd = len(geom.kernel)
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    out = geom.out_size(spatial)
    pad = [(0, 0), (0, 0)] + [(geom.pads[i], geom.pads[nd + i]) for i in range(nd)]
    xp = np.pad(np.asarray(x, dtype=np.float32), pad)
    multi = np.unravel_index(rows, (n, *out))
    b = multi[0]
    # index arrays broadcast to (R, C, k1, ..., kd)
    shape_r = (rows.size,) + (1,) * (1 + nd)
    index: list[NDArray[np.int64]] = [b.reshape(shape_r), np.arange(c).reshape((1, c) + (1,) * nd)]
    for i in range(nd):
        pos = multi[1 + i] * geom.strides[i]
        offs = np.arange(geom.kernel[i]) * geom.dilations[i]
        shp_p = (rows.size,) + (1,) * (1 + nd)
        shp_o = [1] * (2 + nd)
        shp_o[2 + i] = geom.kernel[i]
        index.append(pos.reshape(shp_p) + offs.reshape(shp_o))
    patches = xp[tuple(index)]
    return patches.reshape(rows.size, -1)


def linear_rows(x: NDArray[np.floating], axis: int, rows: NDArray[np.int64] | None) -> NDArray[np.float32]:
    """Feature vectors along ``axis`` of ``x``, one row per other index (sampled by ``rows``)."""
    moved = np.moveaxis(np.asarray(x, dtype=np.float32), axis, -1)
    flat = moved.reshape(-1, moved.shape[-1])
    return flat if rows is None else flat[rows]


def row_count(shape: Sequence[int], axis: int, geom: ConvGeometry | None) -> int:
    """How many rows a tensor of ``shape`` yields (output positions of a Conv, else other indices)."""
    if geom is not None:
        return int(shape[0]) * int(np.prod(geom.out_size(shape[2:])))
    return int(np.prod(shape)) // int(shape[axis])


@dataclass
class Accumulator:
    """``H = ÃᵀÃ`` (q+1)², ``G = ÃᵀY`` (q+1)×out, ``yy = ‖Y‖²``, rows ``n`` — float64 sums.

    The last column of ``Ã`` is the constant 1 (intercept) when ``intercept`` is true.
    """

    q: int
    out: int
    intercept: bool = True
    H: NDArray[np.float64] = field(init=False)
    G: NDArray[np.float64] = field(init=False)
    yy: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        d = self.q + (1 if self.intercept else 0)
        self.H = np.zeros((d, d))
        self.G = np.zeros((d, self.out))

    def add(self, a: NDArray[np.floating], y: NDArray[np.floating]) -> None:
        a64 = np.asarray(a, dtype=np.float64)
        if self.intercept:
            a64 = np.hstack([a64, np.ones((a64.shape[0], 1))])
        y64 = np.asarray(y, dtype=np.float64)
        self.H += a64.T @ a64
        self.G += a64.T @ y64
        self.yy += float(np.sum(y64 * y64))
        self.n += int(a64.shape[0])
