"""Per-layer input statistics for layer-wise reconstruction (NumPy only; no onnx import).

A prunable layer computes, per group ``g``, ``y = W_g · x`` for every *input row* ``x`` of length
``d``: the rows are the im2col patches of a Conv (one per sample and output position), the rows of a
Gemm's (possibly transposed, ``alpha``-scaled) ``A``, or every time step of a MatMul's operand.  This
module turns a layer's input tensor into those rows and accumulates, batch by batch and with memory
bounded per layer (``O(g·d·(d + M_g))``):

* ``H = Σ x_p x_pᵀ``            (g, d, d)   the Gram of the rows seen by the *pruned* model,
* ``B = Σ x_p (W̄ x_d)ᵀ``        (g, d, M_g) the cross term with the *dense* layer's outputs,
* ``yy = Σ (W̄ x_d)²``           (g, M_g)    the dense output energy (for relative errors),
* ``mean_p``                    (g, d)      the mean input row,

over ``rows`` rows, optionally a seeded random subset of them (``max_rows``).  The layer-wise
objective of output row ``i`` is then ``‖X_p w − X_d w̄_i‖² = wᵀHw − 2wᵀB_i + yy_i``.

Weight orientation: :func:`weight_rows` maps an ONNX weight to ``(g, M_g, d)`` ("rows = outputs"),
:func:`rows_to_weight` maps back.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from numpy.lib.stride_tricks import as_strided
from numpy.typing import NDArray

from .solver import parallel
from .solver.offsets import log_softmax

Kind = Literal["conv", "gemm", "matmul_right", "matmul_left", "convt"]

#: Largest im2col chunk materialised at once (bytes).
CHUNK_BYTES = 64 * 2**20
#: Rows (or bytes of rows) gathered before they are added to the Gram in one product (:func:`flush`).
FLUSH_ROWS = 4096
FLUSH_BYTES = 64 * 2**20
#: Row length from which small row blocks are gathered (narrower Grams are cheap to update).
GATHER_MIN_D = 512
#: A Gram update ``xᵀx`` of rows at least :data:`GATHER_MIN_D` long and at least this many
#: multiply-adds (``R·d²/2``) is made as three blocks split by the triangle (:func:`add_gram`), two
#: jobs of equal work for :func:`chita_onnx.solver.parallel.tasks`.
SPLIT_GRAM_MACS = 5e7
#: The split column of :func:`add_gram` is a multiple of this (BLAS kernel widths).
SPLIT_GRAM_ALIGN = 64
#: A layer of one group with rows at least this long may keep its input rows instead of their Gram
#: (:attr:`LayerStats.rowspace`; the row-space solver, :mod:`chita_onnx.solver.rowspace`).
ROWSPACE_MIN_D = 1024
#: ... while it has at most ``d`` rows (beyond that the row-space solver never costs less), and they
#: (with the dense outputs) take at most this many bytes (float32).  Whether the rows are then used
#: is the caller's choice at :func:`finalize_means`.
ROWSPACE_BYTES = 128 * 2**20


@dataclass(frozen=True)
class LayerGeometry:
    """How a layer turns its input tensor into rows and its ONNX weight into ``(g, M_g, d)``.

    * ``conv``: weight ``[M, C/g, *k]``; ``pads_begin``/``pads_end`` as in ONNX, or ``auto_pad``
      (``SAME_UPPER``/``SAME_LOWER``/``VALID``) resolved from the input's spatial size.
    * ``gemm``: ``Y = alpha·A'·B'``; the weight is ``B`` (``[N, K]`` with ``trans_b``, else ``[K, N]``).
    * ``matmul_right``: ``Y = A·W``, ``W [K, N]``, ``A [..., K]``: every leading index is a row.
    * ``matmul_left``: ``Y = W·A``, ``W [M, K]``, ``A [..., K, N]``: every column of ``A`` is a row.
    * ``convt`` (ConvTranspose): weight ``[C, M/g, *k]``; output position ``p`` of group ``g`` is
      ``Σ_{c, t} W[g·C/g + c, o, t] · x[c, (p + pb − t·dil)/stride]`` over the taps ``t`` whose
      input position is integral and inside the input: one row per sample and output position, of
      length ``C/g·Π k`` (channel-major, like the weight's rows).  ``output_padding``,
      ``output_shape`` and ``auto_pad`` resolve the pads as onnxruntime does (:meth:`convt_pads`).
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
    output_padding: tuple[int, ...] = ()
    output_shape: tuple[int, ...] = ()

    @property
    def groups(self) -> int:
        return self.group if self.kind in ("conv", "convt") else 1

    @property
    def d(self) -> int:
        """Length of one input row (``C/g·Π k`` for a Conv)."""
        if self.kind == "conv":
            return int(np.prod(self.weight_shape[1:]))
        if self.kind == "convt":
            return self.weight_shape[0] // self.group * int(np.prod(self.weight_shape[2:]))
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
        if self.kind == "convt":
            return self.weight_shape[1]
        if self.kind == "gemm":
            return self.weight_shape[0] if self.trans_b else self.weight_shape[1]
        if self.kind == "matmul_right":
            return self.weight_shape[1]
        return self.weight_shape[0]

    @property
    def spatial(self) -> int:
        return len(self.weight_shape) - 2 if self.kind in ("conv", "convt") else 0

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


    def convt_geometry(self, in_spatial: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """A ConvTranspose's begin pads and output size for an input of spatial size ``in_spatial``
        (``output_shape`` and ``SAME_*`` fix the output size; the padding that gives it is split as
        onnxruntime 1.19 splits it, measured: the odd unit at the beginning, except at the end for
        ``SAME_UPPER``)."""
        s = self.spatial
        k = self.weight_shape[2:]
        dil = self.dilations or (1,) * s
        st = self.strides or (1,) * s
        op = self.output_padding or (0,) * s
        full = [st[i] * (in_spatial[i] - 1) + op[i] + (k[i] - 1) * dil[i] + 1 for i in range(s)]
        if self.output_shape or self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = list(self.output_shape[-s:]) if self.output_shape else [in_spatial[i] * st[i] for i in range(s)]
            total = [max(0, full[i] - out[i]) for i in range(s)]
            upper = self.auto_pad == "SAME_UPPER"
            begin = [t // 2 if upper else t - t // 2 for t in total]
            return tuple(begin), tuple(out)
        if self.auto_pad == "VALID":
            return (0,) * s, tuple(full)
        pb, pe = self.pads_begin or (0,) * s, self.pads_end or (0,) * s
        return tuple(pb), tuple(full[i] - pb[i] - pe[i] for i in range(s))


# ------------------------------------------------------------------------------ weight orientation


def weight_rows(w: NDArray[np.floating], geom: LayerGeometry) -> NDArray[np.float64]:
    """The ONNX weight as ``(g, M_g, d)`` float64: row ``i`` of group ``g`` maps input rows to output ``i``."""
    a: NDArray[np.float64] = np.asarray(w, dtype=np.float64)
    if geom.kind == "conv":
        return np.array(a.reshape(geom.group, a.shape[0] // geom.group, -1), dtype=np.float64, order="C")
    if geom.kind == "convt":  # [C, M/g, *k] → (g, M/g, C/g·Πk)
        k = a.shape[2:]
        b = a.reshape(geom.group, a.shape[0] // geom.group, a.shape[1], *k).swapaxes(1, 2)
        return np.array(b.reshape(geom.group, a.shape[1], -1), dtype=np.float64, order="C")
    if geom.kind == "matmul_left" or (geom.kind == "gemm" and geom.trans_b):
        return np.array(a[None], dtype=np.float64, order="C")
    return np.array(a.T[None], dtype=np.float64, order="C")  # Gemm without transB, MatMul A·W: W is [K, N]


def rows_to_weight(r: NDArray[np.floating], geom: LayerGeometry) -> NDArray[np.float64]:
    """Inverse of :func:`weight_rows`: ``(g, M_g, d)`` back to the ONNX weight shape."""
    a: NDArray[np.float64] = np.asarray(r, dtype=np.float64)
    if geom.kind == "conv":
        return np.array(a.reshape(geom.weight_shape), dtype=np.float64, order="C")
    if geom.kind == "convt":
        c, m, *k = geom.weight_shape
        b = a.reshape(geom.group, m, c // geom.group, *k).swapaxes(1, 2)
        return np.array(b.reshape(geom.weight_shape), dtype=np.float64, order="C")
    if geom.kind == "matmul_left" or (geom.kind == "gemm" and geom.trans_b):
        return np.array(a[0], dtype=np.float64, order="C")
    return np.array(a[0].T, dtype=np.float64, order="C")


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
    if geom.kind == "convt":
        return int(a_shape[0] * np.prod(geom.convt_geometry(tuple(a_shape[2:]))[1], dtype=np.int64))
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


def _gather_patches(a: NDArray[np.floating], geom: LayerGeometry, index: NDArray[np.int64]) -> NDArray[np.float32]:
    """The im2col rows at ``index`` ``(R, g, d)``, gathered straight from the unpadded input (zeros
    where a kernel tap falls into the padding): no copy of the whole activation."""
    in_sp = tuple(a.shape[2:])
    pb, pe = geom.conv_pads(in_sp)
    k = geom.weight_shape[2:]
    out = tuple(
        (in_sp[i] + pb[i] + pe[i] - geom.dilations[i] * (k[i] - 1) - 1) // geom.strides[i] + 1
        for i in range(geom.spatial)
    )

    def taps(i: int, p: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
        coord = (p * geom.strides[i] - pb[i])[:, None] + (np.arange(k[i]) * geom.dilations[i])[None, :]
        return coord, (coord >= 0) & (coord < in_sp[i])

    return _gather_taps(a, geom, index, out, taps)


def _gather_convt(a: NDArray[np.floating], geom: LayerGeometry, index: NDArray[np.int64]) -> NDArray[np.float32]:
    """A ConvTranspose's input rows at ``index`` ``(R, g, d)``: tap ``t`` of output position ``p``
    reads input position ``(p + pb − t·dil)/stride`` where that is an integer inside the input, else 0."""
    s = geom.spatial
    k = geom.weight_shape[2:]
    in_sp = tuple(a.shape[2:])
    pb, out = geom.convt_geometry(in_sp)
    dil = geom.dilations or (1,) * s
    st = geom.strides or (1,) * s

    def taps(i: int, p: NDArray[np.int64]) -> tuple[NDArray[np.int64], NDArray[np.bool_]]:
        q, r = np.divmod((p + pb[i])[:, None] - (np.arange(k[i]) * dil[i])[None, :], st[i])
        return q, (r == 0) & (q >= 0) & (q < in_sp[i])

    return _gather_taps(a, geom, index, tuple(out), taps)


def _gather_taps(
    a: NDArray[np.floating],
    geom: LayerGeometry,
    index: NDArray[np.int64],
    out: tuple[int, ...],
    taps: Callable[[int, NDArray[np.int64]], tuple[NDArray[np.int64], NDArray[np.bool_]]],
) -> NDArray[np.float32]:
    """The rows at ``index`` (flat over ``(N, *out)``) of a layer whose tap ``t`` along spatial axis
    ``i`` at output coordinate ``p`` reads input coordinate ``taps(i, p)[0][:, t]`` where
    ``taps(i, p)[1]`` holds, else 0 (Conv and ConvTranspose differ only in ``taps``)."""
    s = geom.spatial
    k = geom.weight_shape[2:]
    in_sp = tuple(a.shape[2:])
    pos = np.unravel_index(index, (a.shape[0], *out))
    R = len(index)
    idx: list[NDArray[np.int64]] = [pos[0].reshape(R, *([1] * s))]
    valid = np.ones((R, *k), dtype=bool)
    for i in range(s):
        shape = [R] + [1] * s
        shape[1 + i] = k[i]
        coord, ok = taps(i, np.asarray(pos[1 + i], np.int64))
        valid &= ok.reshape(shape)
        idx.append(np.clip(coord, 0, in_sp[i] - 1).reshape(shape))
    return _take_taps(a, geom, idx, valid)


def _take_taps(
    a: NDArray[np.floating], geom: LayerGeometry, idx: list[NDArray[np.int64]], valid: NDArray[np.bool_]
) -> NDArray[np.float32]:
    """``a[sample, :, *taps]`` at the broadcast indices ``idx`` ``(R, *k)`` each, zero where not
    ``valid``: the rows ``(R, g, d)`` (channel-major, then taps)."""
    R = valid.shape[0]
    a32 = np.asarray(a, np.float32)
    # advanced indices around the channel slice: the result is (R, *k, C)
    key: tuple[object, ...] = (idx[0], slice(None), *idx[1:])
    got = a32[key]  # type: ignore[index]
    got = got * valid[..., None]
    got = np.moveaxis(got, -1, 1)  # (R, C, *k)
    return np.ascontiguousarray(got, dtype=np.float32).reshape(R, geom.group, geom.d)


def input_rows(
    a: NDArray[np.floating], geom: LayerGeometry, index: NDArray[np.int64] | None = None
) -> NDArray[np.float32]:
    """The layer's input rows ``(R, g, d)`` float32 (``alpha`` applied), all of them or those at ``index``.

    Row order: sample-major, then output position (Conv) / leading index (MatMul).
    """
    if geom.kind == "conv" and index is not None:
        return _gather_patches(a, geom, index)
    if geom.kind == "convt":
        return _gather_convt(a, geom, np.arange(num_rows(tuple(a.shape), geom)) if index is None else index)
    if geom.kind == "conv":
        view = _conv_windows(a, geom)
        lead = view.shape[: 1 + geom.spatial]
        flat_lead = int(np.prod(lead))
        g, d = geom.group, geom.d
        rows = np.ascontiguousarray(view).reshape(flat_lead, g, d)
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
    rows: int = 0
    seen: int = 0  # rows before subsampling
    #: Row blocks ``(x (R, g, d), y (R, g, M_g) or None)`` not yet in ``H``/``B``/``yy`` (:func:`flush`).
    pending: list[tuple[NDArray[np.float32], NDArray[np.float32] | None]] = field(default_factory=list)
    pending_rows: int = 0
    #: Keep the rows instead of ``H``/``B`` while they are few (:func:`rowspace_eligible`): until
    #: there are more than ``d`` of them or :data:`ROWSPACE_BYTES` (then ``H`` is formed and this
    #: turns False).  After :func:`finalize_means` with ``rows=True``, when still True, :attr:`X` and
    #: :attr:`Y` hold the rows and ``H``/``B`` are empty ``(g, 0, 0)`` / ``(g, 0, M_g)``
    #: placeholders; ``yy`` is filled.
    rowspace: bool = False
    #: Row-space mode without the Gram to fall back to (a layer whose Gram would not fit in memory):
    #: rows beyond :func:`rowspace_capacity` are dropped instead of forming ``H``.
    rows_only: bool = False
    #: Rows dropped in ``rows_only`` mode (counted in ``rows`` and ``mean_p``, not kept).
    dropped: int = 0
    #: The pruned model's input rows ``(N, d)`` and the dense outputs ``(N, M)`` (None without the
    #: cross term), float32, in row-space mode after :func:`finalize_means`.
    X: NDArray[np.float32] | None = None
    Y: NDArray[np.float32] | None = None
    #: A softmax head (one group whose outputs are the classes): the per-class offset ``(M,)`` that
    #: turns the dense output rows into the logits (the bias the node's targets leave out, plus the
    #: one added after it; :func:`add_class_energy`).  None elsewhere.
    class_offset: NDArray[np.float64] | None = None
    #: With :attr:`class_offset`: ``E (M, d)``, ``E_cj = Σ_n (q_nc + prior/M) x_nj²`` over the input
    #: rows, ``q_n`` the dense softmax of row ``n`` (:func:`add_class_energy`).
    class_energy: NDArray[np.float64] | None = None

    @staticmethod
    def empty(geom: LayerGeometry, *, cross: bool, rowspace: bool = False, rows_only: bool = False) -> LayerStats:
        """Zero statistics; ``rowspace``: keep the rows while they are few (only for one group; the
        Gram is then allocated when the rows turn out to be many); ``rows_only``: never form the
        Gram (:attr:`rows_only`)."""
        g, d, m = geom.groups, geom.d, geom.outputs_per_group
        rs = (rowspace or rows_only) and rowspace_eligible(geom)
        if rows_only and not rs:
            raise ValueError(f"a {geom.kind} layer of {g} group(s) and rows of {d} cannot be solved from its rows")
        return LayerStats(
            geom,
            np.zeros((g, 0, 0) if rs else (g, d, d)),
            (np.zeros((g, 0, m) if rs else (g, d, m))) if cross else None,
            np.zeros((g, m)) if cross else None,
            np.zeros((g, d)),
            rowspace=rs,
            rows_only=rows_only,
        )

    def _allocate(self) -> None:
        """Give ``H``/``B`` their full shapes (leaving row-space mode)."""
        g, d, m = self.geom.groups, self.geom.d, self.geom.outputs_per_group
        self.rowspace = False
        if self.H.shape != (g, d, d):
            self.H = np.zeros((g, d, d))
        if self.B is not None and self.B.shape != (g, d, m):
            self.B = np.zeros((g, d, m))


def rowspace_capacity(geom: LayerGeometry) -> int:
    """The most rows a layer keeps in row-space mode: ``d``, and :data:`ROWSPACE_BYTES` of rows and
    dense outputs (float32)."""
    return int(min(geom.d, ROWSPACE_BYTES // (4 * (geom.d + geom.outputs_per_group))))


def rowspace_eligible(geom: LayerGeometry) -> bool:
    """Whether a layer may keep its input rows instead of their Gram: one group, rows of at least
    :data:`ROWSPACE_MIN_D`."""
    return geom.groups == 1 and geom.d >= ROWSPACE_MIN_D


@dataclass
class RowSampler:
    """Seeded choice of a subset of rows: at most about ``max_rows`` over the whole pass.

    ``total`` is the number of rows the whole calibration set yields; each batch keeps the same
    fraction of its rows (rounded up), chosen uniformly without replacement; with ``groups`` (a
    batch of that many samples whose rows come sample by sample) each sample keeps that fraction of
    its own rows, as a pass over batches of one sample does.
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

    def pick(self, rows: int, groups: int = 1) -> NDArray[np.int64] | None:
        f = self.fraction
        if f >= 1.0:
            return None
        if groups > 1 and rows % groups == 0:
            each = rows // groups
            take = min(each, max(1, math.ceil(f * each)))
            parts = [g * each + np.sort(self._rng.choice(each, size=take, replace=False)) for g in range(groups)]
            return np.concatenate(parts).astype(np.int64)
        take = min(rows, max(1, math.ceil(f * rows)))
        return np.sort(self._rng.choice(rows, size=take, replace=False)).astype(np.int64)


def output_rows(
    z: NDArray[np.floating],
    geom: LayerGeometry,
    index: NDArray[np.int64] | None = None,
    offset: NDArray[np.floating] | None = None,
) -> NDArray[np.float32]:
    """The layer's output rows ``(R, g, M_g)`` float32 in the order of :func:`input_rows`, minus
    ``offset`` (the per-channel bias the node adds, shape ``(g·M_g,)``)."""
    z = np.asarray(z, np.float32)
    if geom.kind in ("conv", "convt") and index is not None:  # gather first: no copy of the whole output
        L = int(np.prod(z.shape[2:], dtype=np.int64))
        b, pos = np.divmod(index, L)
        m = z.reshape(z.shape[0], z.shape[1], L)[b, :, pos]
        index = None
    elif geom.kind in ("conv", "convt"):
        m = np.moveaxis(z, 1, -1).reshape(-1, z.shape[1])
    elif geom.kind == "matmul_left":
        m = np.swapaxes(z, -1, -2).reshape(-1, z.shape[-2])
    else:
        m = z.reshape(-1, z.shape[-1])
    if index is not None:
        m = m[index]
    if offset is not None:
        m = m - np.asarray(offset, np.float32).reshape(1, -1)
    return np.ascontiguousarray(m).reshape(m.shape[0], geom.groups, geom.outputs_per_group)


def dense_weight_t(w_rows: NDArray[np.floating]) -> NDArray[np.float32]:
    """``W̄`` as :func:`accumulate` multiplies dense input rows by it: ``(g, d, M_g)`` float32, contiguous."""
    out: NDArray[np.float32] = np.ascontiguousarray(np.swapaxes(w_rows, 1, 2), dtype=np.float32)
    return out


def accumulate(
    stats: LayerStats,
    a_pruned: NDArray[np.floating],
    *,
    a_dense: NDArray[np.floating] | None = None,
    w_dense_rows: NDArray[np.floating] | None = None,
    z_dense: NDArray[np.floating] | None = None,
    offset: NDArray[np.floating] | None = None,
    index: NDArray[np.int64] | None = None,
    geom: LayerGeometry | None = None,
    w_dense_t: NDArray[np.float32] | None = None,
) -> None:
    """Add one batch.  ``a_pruned``: the layer's input tensor in the pruned model.  The dense targets
    ``W̄ x_d`` come either from the dense model's input ``a_dense`` and ``w_dense_rows`` (``W̄`` as
    ``(g, M_g, d)``; or ``w_dense_t``, the same as :func:`dense_weight_t` gives, made once for all
    batches), or directly from the dense layer's output ``z_dense`` minus ``offset`` (its
    bias).  Without either only ``H`` is accumulated.  ``index`` picks rows (see
    :class:`RowSampler`); without it a Conv is processed in chunks of samples.  ``geom``: how this
    node reads the weight, when it is not ``stats.geom`` (one weight read by several nodes with
    different strides, pads or dilations: their rows go into the same statistics)."""
    if geom is None:
        geom = stats.geom
    elif (geom.kind, geom.weight_shape, geom.group) != (stats.geom.kind, stats.geom.weight_shape, stats.geom.group):
        raise ValueError(
            f"rows of a {geom.kind} {geom.weight_shape} cannot join statistics of {stats.geom.weight_shape}"
        )
    total = num_rows(tuple(a_pruned.shape), geom)
    stats.seen += total
    wT = None
    if stats.B is not None and a_dense is not None:
        wT = w_dense_t if w_dense_t is not None else None if w_dense_rows is None else dense_weight_t(w_dense_rows)
    use_z = stats.B is not None and z_dense is not None

    def targets(sl: slice, idx: NDArray[np.int64] | None) -> NDArray[np.float32] | None:
        if use_z:
            assert z_dense is not None
            return output_rows(z_dense[sl], geom, idx, offset)
        if wT is not None:
            assert a_dense is not None
            xd = input_rows(a_dense[sl], geom, idx)
            y: NDArray[np.float32] = np.matmul(np.ascontiguousarray(xd.transpose(1, 0, 2)), wT).transpose(1, 0, 2)
            return y
        return None

    if geom.kind in ("conv", "convt") and index is None:
        step = row_chunks(tuple(a_pruned.shape), geom)
        for s0 in range(0, a_pruned.shape[0], step):
            sl = slice(s0, s0 + step)
            _add_rows(stats, input_rows(a_pruned[sl], geom), targets(sl, None))
        return
    _add_rows(stats, input_rows(a_pruned, geom, index), targets(slice(None), index))


def _add_rows(stats: LayerStats, xp: NDArray[np.float32], y: NDArray[np.float32] | None) -> None:
    """Add input rows ``xp (R, g, d)`` and dense output rows ``y (R, g, M_g)``: the mean and the row
    count at once; the products at once too, except for blocks of fewer than ``d`` rows of a wide
    layer (``d ≥`` :data:`GATHER_MIN_D`: one time step of a few samples), which are gathered until
    ``min(d, FLUSH_ROWS)`` rows or :data:`FLUSH_BYTES` (:func:`flush`) — each would otherwise pay a
    pass over the ``d × d`` float64 Gram."""
    R = xp.shape[0]
    if R == 0:
        return
    if stats.class_offset is not None and y is not None:
        add_class_energy(stats, xp[:, 0, :], y[:, 0, :])
    stats.rows += R
    ones = np.ones(R, np.float32)
    stats.mean_p += (ones @ xp.reshape(R, -1)).reshape(stats.mean_p.shape)  # BLAS sums
    d = xp.shape[2]
    if stats.rowspace and stats.rows_only:  # no Gram to fall back to: keep what fits, drop the rest
        room = rowspace_capacity(stats.geom) - stats.pending_rows
        if room < R:
            stats.dropped += R - max(room, 0)
            xp, y = xp[: max(room, 0)], None if y is None else y[: max(room, 0)]
            R = xp.shape[0]
        if R:
            stats.pending.append((xp, y))
            stats.pending_rows += R
        return
    if stats.rowspace:
        stats.pending.append((xp, y))
        stats.pending_rows += R
        size = stats.pending_rows * xp.shape[1] * (d + (0 if y is None else y.shape[2])) * 4
        if stats.pending_rows > d or size > ROWSPACE_BYTES:
            stats._allocate()  # too many rows: the Gram from here on
            flush(stats)
        return
    if d < GATHER_MIN_D or xp.shape[0] >= d:  # a product that BLAS runs well as it is: no gathering
        flush(stats)
        stats.pending.append((xp, y))
        flush(stats)
        return
    stats.pending.append((xp, y))
    stats.pending_rows += R
    size = stats.pending_rows * xp.shape[1] * (d + (0 if y is None else y.shape[2])) * 4
    if stats.pending_rows >= min(FLUSH_ROWS, d) or size >= FLUSH_BYTES:
        flush(stats)


#: The prior added to the dense class probabilities in :func:`add_class_energy`, as a fraction of
#: the uniform ``1/M``: a class the data give no probability still weighs a little.
CLASS_PRIOR = 0.01


def add_class_energy(stats: LayerStats, x: NDArray[np.float32], y: NDArray[np.float32]) -> None:
    """``E += (q + prior/M)ᵀ (x ∘ x)`` for input rows ``x (R, d)`` and dense output rows ``y (R, M)``
    of a softmax head: ``q = softmax(y + class_offset)`` row by row (float32 products, float64 sums;
    the energy behind :func:`~chita_onnx.solver.layerwise.class_weighted_mask`)."""
    assert stats.class_offset is not None
    q = np.exp(log_softmax(y, stats.class_offset))
    q += CLASS_PRIOR / q.shape[1]
    part = q.astype(np.float32).T @ np.square(x, dtype=np.float32)
    if stats.class_energy is None:
        stats.class_energy = np.zeros(part.shape)
    stats.class_energy += part


def gram_split(R: int, d: int) -> int:
    """The column ``c`` at which :func:`add_gram` splits the Gram of ``R`` rows of length ``d``, or 0
    (one product).  A function of the shape alone, so that the sums never depend on whether the
    second core was free."""
    if d < GATHER_MIN_D or 0.5 * R * d * d < SPLIT_GRAM_MACS:
        return 0
    c = int(d / math.sqrt(2.0)) // SPLIT_GRAM_ALIGN * SPLIT_GRAM_ALIGN  # c²/2 ≈ (d−c)²/2 + c(d−c)
    return c if 0 < c < d else 0


def add_gram(H: NDArray[np.float64], x: NDArray[np.float32]) -> None:
    """``H += xᵀx`` for rows ``x (R, d)`` and ``H (d, d)`` (float32 products, float64 sums; ``H``
    stays exactly symmetric).

    A large update (:func:`gram_split`) is made as three blocks, with ``x = [A | B]`` split at
    column ``c ≈ d/√2``: ``AᵀA`` (``syrk``) as one job and ``BᵀB`` (``syrk``) with ``AᵀB`` (``gemm``)
    as the other, each about a quarter of the ``R·d²`` multiply-adds of the full product that one
    ``syrk`` computes half of.  :func:`~chita_onnx.solver.parallel.tasks` runs the two jobs at once
    when the second core is free, else one after the other: the same calls, so the same sums either
    way (they differ from the one-call product only by float32 rounding).  On one thread the blocks
    take about as long as the one call (BENCHMARKS.md, "Stop 38")."""
    R, d = x.shape
    c = gram_split(R, d)
    if c == 0:
        H += x.T @ x
        return
    A, B = x[:, :c], x[:, c:]
    rest = float(R) * (d - c)
    jobs: list[Callable[[], tuple[NDArray[np.float32], ...]]] = [
        lambda: (A.T @ A,),
        lambda: (B.T @ B, A.T @ B),
    ]
    (aa,), (bb, ab) = parallel.tasks(jobs, [0.5 * R * c * c, 0.5 * rest * (d - c) + rest * c])
    H[:c, :c] += aa
    H[c:, c:] += bb
    H[:c, c:] += ab
    H[c:, :c] += ab.T


def flush(stats: LayerStats) -> None:
    """Add the pending row blocks to ``H``, ``B`` and ``yy`` (float32 products, float64 sums)."""
    if not stats.pending:
        return
    if stats.rowspace:
        stats._allocate()
    blocks, stats.pending, stats.pending_rows = stats.pending, [], 0
    xp = blocks[0][0] if len(blocks) == 1 else np.concatenate([b[0] for b in blocks])
    ys = [b[1] for b in blocks]
    y = None if any(v is None for v in ys) else (ys[0] if len(ys) == 1 else np.concatenate(ys))  # type: ignore[arg-type]
    R = xp.shape[0]
    ones = np.ones(R, np.float32)
    cross = y is not None and stats.B is not None and stats.yy is not None
    if xp.shape[1] <= 4:
        for gi in range(xp.shape[1]):
            x = xp[:, gi, :]
            add_gram(stats.H[gi], x)
            if cross:
                assert y is not None and stats.B is not None and stats.yy is not None
                yg = np.ascontiguousarray(y[:, gi, :])
                stats.B[gi] += parallel.matmul(x.T, yg)
                stats.yy[gi] += ones @ (yg * yg)
        return
    xg = np.ascontiguousarray(xp.transpose(1, 2, 0))  # many groups (depthwise): batched products
    stats.H += np.matmul(xg, xg.transpose(0, 2, 1))
    if cross:
        assert y is not None and stats.B is not None and stats.yy is not None
        yg = np.ascontiguousarray(y.transpose(1, 0, 2))  # (g, R, M_g)
        stats.B += np.matmul(xg, yg)
        stats.yy += np.einsum("grm,grm->gm", yg, yg, dtype=np.float64)


def finalize_means(stats: LayerStats, *, rows: bool = False) -> None:
    """Add the pending rows (:func:`flush`) and turn the accumulated sum of ``mean_p`` into the mean
    input row (call once, after the pass).  With ``rows``, in row-space mode
    (:attr:`LayerStats.rowspace`), the pending rows become :attr:`LayerStats.X`/:attr:`LayerStats.Y`
    instead (and ``yy`` their output energy); with no rows at all the statistics take the Gram's
    form (all zero)."""
    if stats.rows_only and stats.rowspace and not stats.pending_rows:  # no rows at all: one zero row
        d, m = stats.geom.d, stats.geom.outputs_per_group
        zero_y = None if stats.B is None else np.zeros((1, 1, m), np.float32)
        stats.pending = [(np.zeros((1, 1, d), np.float32), zero_y)]
        stats.pending_rows = 1
    if stats.rowspace and not rows and not stats.rows_only:
        stats._allocate()
    if stats.rowspace and stats.pending_rows:
        blocks, stats.pending, stats.pending_rows = stats.pending, [], 0
        stats.X = np.ascontiguousarray(np.concatenate([b[0][:, 0, :] for b in blocks]))
        if stats.B is not None:
            ys = [b[1] for b in blocks]
            if any(v is None for v in ys):
                raise ValueError("rows without dense outputs were added to statistics with a cross term")
            stats.Y = np.ascontiguousarray(np.concatenate([v[:, 0, :] for v in ys if v is not None]))
            if stats.yy is not None:
                stats.yy[0] += np.einsum("nm,nm->m", stats.Y, stats.Y, dtype=np.float64)
    if not stats.rowspace:
        flush(stats)
    if stats.rowspace and stats.X is None:  # no rows at all
        stats._allocate()
    if stats.rows:
        stats.mean_p /= stats.rows
