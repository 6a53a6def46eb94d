"""Per-layer input statistics for layer-wise reconstruction (NumPy only; no onnx import).

A prunable layer computes, per group ``g``, ``y = W_g · x`` for every *input row* ``x`` of length
``d``: the rows are the im2col patches of a Conv (one per sample and output position), the rows of a
Gemm's (possibly transposed, ``alpha``-scaled) ``A``, or every time step of a MatMul's operand.  This
module turns a layer's input tensor into those rows and accumulates, batch by batch and with memory
bounded per layer (``O(g·d·(d + M_g))``):

* ``H = Σ x_p x_pᵀ``            (g, d, d)   the Gram of the rows seen by the *pruned* model,
* ``B = Σ x_p (W̄ x_d)ᵀ``        (g, d, M_g) the cross term with the *dense* layer's outputs,
* ``yy = Σ (W̄ x_d)²``           (g, M_g)    the dense output energy (for relative errors),
* ``mean_p``, ``mean_d``        (g, d)      mean input rows (for bias correction),

over ``rows`` rows, optionally a seeded random subset of them (``max_rows``).  The layer-wise
objective of output row ``i`` is then ``‖X_p w − X_d w̄_i‖² = wᵀHw − 2wᵀB_i + yy_i``.

Weight orientation: :func:`weight_rows` maps an ONNX weight to ``(g, M_g, d)`` ("rows = outputs"),
:func:`rows_to_weight` maps back.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import as_strided
from numpy.typing import NDArray

Kind = Literal["conv", "gemm", "matmul_right", "matmul_left"]

#: Largest im2col chunk materialised at once (bytes).
CHUNK_BYTES = 64 * 2**20


@dataclass(frozen=True)
class LayerGeometry:
    """How a layer turns its input tensor into rows and its ONNX weight into ``(g, M_g, d)``.

    * ``conv``: weight ``[M, C/g, *k]``; ``pads_begin``/``pads_end`` as in ONNX, or ``auto_pad``
      (``SAME_UPPER``/``SAME_LOWER``/``VALID``) resolved from the input's spatial size.
    * ``gemm``: ``Y = alpha·A'·B'``; the weight is ``B`` (``[N, K]`` with ``trans_b``, else ``[K, N]``).
    * ``matmul_right``: ``Y = A·W``, ``W [K, N]``, ``A [..., K]``: every leading index is a row.
    * ``matmul_left``: ``Y = W·A``, ``W [M, K]``, ``A [..., K, N]``: every column of ``A`` is a row.
    """

    kind: Kind
    weight_shape: tuple[int, ...]
    group: int = 1
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads_begin: tuple[int, ...] = ()
    pads_end: tuple[int, ...] = ()
    auto_pad: str = "NOTSET"
    alpha: float = 1.0
    trans_a: bool = False
    trans_b: bool = False

    @property
    def groups(self) -> int:
        return self.group if self.kind == "conv" else 1

    @property
    def d(self) -> int:
        """Length of one input row (``C/g·Π k`` for a Conv)."""
        if self.kind == "conv":
            return int(np.prod(self.weight_shape[1:]))
        if self.kind == "gemm":
            return self.weight_shape[1] if self.trans_b else self.weight_shape[0]
        if self.kind == "matmul_right":
            return self.weight_shape[0]
        return self.weight_shape[1]

    @property
    def outputs_per_group(self) -> int:
        """``M_g``: output rows of each group."""
        if self.kind == "conv":
            return self.weight_shape[0] // self.group
        if self.kind == "gemm":
            return self.weight_shape[0] if self.trans_b else self.weight_shape[1]
        if self.kind == "matmul_right":
            return self.weight_shape[1]
        return self.weight_shape[0]

    @property
    def spatial(self) -> int:
        return len(self.weight_shape) - 2 if self.kind == "conv" else 0

    def conv_pads(self, in_spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Begin and end pads for an input of spatial size ``in_spatial`` (resolves ``auto_pad``)."""
        s = self.spatial
        k = self.weight_shape[2:]
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            begin, end = [], []
            for i in range(s):
                out = -(-in_spatial[i] // self.strides[i])
                total = max(0, (out - 1) * self.strides[i] + (k[i] - 1) * self.dilations[i] + 1 - in_spatial[i])
                small, big = total // 2, total - total // 2
                begin.append(small if self.auto_pad == "SAME_UPPER" else big)
                end.append(big if self.auto_pad == "SAME_UPPER" else small)
            return tuple(begin), tuple(end)
        if self.auto_pad == "VALID":
            return (0,) * s, (0,) * s
        return (self.pads_begin or (0,) * s), (self.pads_end or (0,) * s)


# ------------------------------------------------------------------------------ weight orientation


def weight_rows(w: NDArray[np.floating], geom: LayerGeometry) -> NDArray[np.float64]:
    """The ONNX weight as ``(g, M_g, d)`` float64: row ``i`` of group ``g`` maps input rows to output ``i``."""
    a: NDArray[np.float64] = np.asarray(w, dtype=np.float64)
    if geom.kind == "conv":
        return np.array(a.reshape(geom.group, a.shape[0] // geom.group, -1), dtype=np.float64)
    if geom.kind == "matmul_left" or (geom.kind == "gemm" and geom.trans_b):
        return np.array(a[None], dtype=np.float64)
    return np.array(a.T[None], dtype=np.float64)  # Gemm without transB, MatMul A·W: W is [K, N]


def rows_to_weight(r: NDArray[np.floating], geom: LayerGeometry) -> NDArray[np.float64]:
    """Inverse of :func:`weight_rows`: ``(g, M_g, d)`` back to the ONNX weight shape."""
    a: NDArray[np.float64] = np.asarray(r, dtype=np.float64)
    if geom.kind == "conv":
        return np.array(a.reshape(geom.weight_shape), dtype=np.float64)
    if geom.kind == "matmul_left" or (geom.kind == "gemm" and geom.trans_b):
        return np.array(a[0], dtype=np.float64)
    return np.array(a[0].T, dtype=np.float64)


# -------------------------------------------------------------------------------------- input rows


def num_rows(a_shape: tuple[int, ...], geom: LayerGeometry) -> int:
    """How many input rows a layer input of shape ``a_shape`` yields."""
    if geom.kind == "conv":
        pb, pe = geom.conv_pads(a_shape[2:])
        k = geom.weight_shape[2:]
        out = [
            (a_shape[2 + i] + pb[i] + pe[i] - geom.dilations[i] * (k[i] - 1) - 1) // geom.strides[i] + 1
            for i in range(geom.spatial)
        ]
        return int(a_shape[0] * np.prod(out, dtype=np.int64))
    if geom.kind == "gemm":
        return int(a_shape[1] if geom.trans_a else a_shape[0])
    if geom.kind == "matmul_right":
        return int(np.prod(a_shape[:-1], dtype=np.int64))
    return int(np.prod(a_shape[:-2], dtype=np.int64) * a_shape[-1])


def _conv_windows(a: NDArray[np.floating], geom: LayerGeometry) -> NDArray[np.float32]:
    """A read-only ``(N, *out, g, C/g, *k)`` window view of the zero-padded input ``a [N, C, *sp]``."""
    s = geom.spatial
    k = geom.weight_shape[2:]
    pb, pe = geom.conv_pads(tuple(a.shape[2:]))
    xp = np.pad(np.asarray(a, np.float32), [(0, 0), (0, 0), *zip(pb, pe, strict=True)])
    out = tuple((xp.shape[2 + i] - geom.dilations[i] * (k[i] - 1) - 1) // geom.strides[i] + 1 for i in range(s))
    cg = a.shape[1] // geom.group
    st = xp.strides
    return as_strided(
        xp,
        shape=(xp.shape[0], *out, geom.group, cg, *k),
        strides=(
            st[0],
            *(st[2 + i] * geom.strides[i] for i in range(s)),
            cg * st[1],
            st[1],
            *(st[2 + i] * geom.dilations[i] for i in range(s)),
        ),
        writeable=False,
    )


def input_rows(
    a: NDArray[np.floating], geom: LayerGeometry, index: NDArray[np.int64] | None = None
) -> NDArray[np.float32]:
    """The layer's input rows ``(R, g, d)`` float32 (``alpha`` applied), all of them or those at ``index``.

    Row order: sample-major, then output position (Conv) / leading index (MatMul).
    """
    if geom.kind == "conv":
        view = _conv_windows(a, geom)
        lead = view.shape[: 1 + geom.spatial]
        flat_lead = int(np.prod(lead))
        g, d = geom.group, geom.d
        if index is None:
            rows = np.ascontiguousarray(view).reshape(flat_lead, g, d)
        else:
            pos = np.unravel_index(index, lead)
            rows = view[pos].reshape(len(index), g, d)
        return np.ascontiguousarray(rows, dtype=np.float32)
    a = np.asarray(a, np.float32)
    if geom.kind == "gemm":
        m = a.T if geom.trans_a else a
    elif geom.kind == "matmul_right":
        m = a.reshape(-1, a.shape[-1])
    else:
        m = np.swapaxes(a, -1, -2).reshape(-1, a.shape[-2])
    if index is not None:
        m = m[index]
    out = np.ascontiguousarray(m, dtype=np.float32).reshape(m.shape[0], 1, m.shape[1])
    if geom.alpha != 1.0 and geom.kind == "gemm":
        out = out * np.float32(geom.alpha)
    return out


def row_chunks(a_shape: tuple[int, ...], geom: LayerGeometry) -> int:
    """Samples per chunk so that one chunk's rows take at most :data:`CHUNK_BYTES`."""
    per_sample = max(1, num_rows(a_shape, geom) // max(1, a_shape[0])) * geom.groups * geom.d * 4
    return max(1, CHUNK_BYTES // per_sample)


# ------------------------------------------------------------------------------------ accumulation


@dataclass
class LayerStats:
    """Accumulated statistics of one layer (see the module docstring); all float64."""

    geom: LayerGeometry
    H: NDArray[np.float64]
    B: NDArray[np.float64] | None
    yy: NDArray[np.float64] | None
    mean_p: NDArray[np.float64]
    mean_d: NDArray[np.float64]
    rows: int = 0
    seen: int = 0  # rows before subsampling

    @staticmethod
    def empty(geom: LayerGeometry, *, cross: bool) -> LayerStats:
        g, d, m = geom.groups, geom.d, geom.outputs_per_group
        return LayerStats(
            geom,
            np.zeros((g, d, d)),
            np.zeros((g, d, m)) if cross else None,
            np.zeros((g, m)) if cross else None,
            np.zeros((g, d)),
            np.zeros((g, d)),
        )


@dataclass
class RowSampler:
    """Seeded choice of a subset of rows: at most about ``max_rows`` over the whole pass.

    ``total`` is the number of rows the whole calibration set yields; each batch keeps the same
    fraction of its rows (rounded up), chosen uniformly without replacement.
    """

    total: int
    max_rows: int | None
    seed: int
    _rng: np.random.Generator = field(init=False)

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed)

    @property
    def fraction(self) -> float:
        if self.max_rows is None or self.total <= self.max_rows:
            return 1.0
        return self.max_rows / self.total

    def pick(self, rows: int) -> NDArray[np.int64] | None:
        f = self.fraction
        if f >= 1.0:
            return None
        take = min(rows, max(1, math.ceil(f * rows)))
        return np.sort(self._rng.choice(rows, size=take, replace=False)).astype(np.int64)


def accumulate(
    stats: LayerStats,
    a_pruned: NDArray[np.floating],
    a_dense: NDArray[np.floating] | None,
    w_dense_rows: NDArray[np.floating] | None,
    index: NDArray[np.int64] | None = None,
) -> None:
    """Add one batch: ``a_pruned`` (and ``a_dense``, same shape) are the layer's input tensors in the
    pruned and the dense model; ``w_dense_rows`` is ``W̄`` as ``(g, M_g, d)``.  ``index`` picks rows
    (see :class:`RowSampler`); large inputs are processed in chunks of samples."""
    geom = stats.geom
    total = num_rows(tuple(a_pruned.shape), geom)
    stats.seen += total
    wT = None
    if stats.B is not None and a_dense is not None and w_dense_rows is not None:
        wT = np.ascontiguousarray(np.swapaxes(w_dense_rows, 1, 2), dtype=np.float32)
    cross = wT is not None
    if geom.kind == "conv" and index is None:
        step = row_chunks(tuple(a_pruned.shape), geom)
        for s0 in range(0, a_pruned.shape[0], step):
            xp = input_rows(a_pruned[s0 : s0 + step], geom)
            xd = input_rows(a_dense[s0 : s0 + step], geom) if cross and a_dense is not None else None
            _add_rows(stats, xp, xd, wT)
        return
    xp = input_rows(a_pruned, geom, index)
    xd = input_rows(a_dense, geom, index) if cross and a_dense is not None else None
    _add_rows(stats, xp, xd, wT)


def _add_rows(
    stats: LayerStats,
    xp: NDArray[np.float32],
    xd: NDArray[np.float32] | None,
    wT: NDArray[np.float32] | None,
) -> None:
    """Accumulate rows ``xp``/``xd`` of shape ``(R, g, d)`` (float32 products, float64 sums)."""
    R = xp.shape[0]
    if R == 0:
        return
    stats.rows += R
    stats.mean_p += xp.sum(axis=0, dtype=np.float64)
    if xd is not None:
        stats.mean_d += xd.sum(axis=0, dtype=np.float64)
    for gi in range(xp.shape[1]) if xp.shape[1] <= 4 else ():
        x = xp[:, gi, :]
        stats.H[gi] += x.T @ x
        if xd is not None and wT is not None and stats.B is not None and stats.yy is not None:
            y = xd[:, gi, :] @ wT[gi]
            stats.B[gi] += x.T @ y
            stats.yy[gi] += np.einsum("ij,ij->j", y, y, dtype=np.float64)
    if xp.shape[1] > 4:  # many groups (depthwise): one batched product
        xg = np.ascontiguousarray(xp.transpose(1, 2, 0))  # (g, d, R)
        stats.H += np.matmul(xg, xg.transpose(0, 2, 1))
        if xd is not None and wT is not None and stats.B is not None and stats.yy is not None:
            y = np.matmul(np.ascontiguousarray(xd.transpose(1, 0, 2)), wT)  # (g, R, M_g)
            stats.B += np.matmul(xg, y)
            stats.yy += np.einsum("grm,grm->gm", y, y, dtype=np.float64)


def finalize_means(stats: LayerStats) -> None:
    """Turn the accumulated sums of ``mean_p``/``mean_d`` into means (call once, after the pass)."""
    if stats.rows:
        stats.mean_p /= stats.rows
        stats.mean_d /= stats.rows
