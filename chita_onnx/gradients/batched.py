"""The batched path (recipe B): one batched forward/backward, per-sample weight gradients in NumPy.

onnxruntime-training builds the gradient of the summed loss with respect to each prunable layer's
*output* ``z_k`` (an intermediate tensor).  With inference semantics the samples of a batch are
independent, so row ``b`` of ``dL/dz_k`` is exactly sample ``b``'s ``dℓ_b/dz_k``.  The layer inputs
``a_k`` are extra graph outputs.  Per-sample weight gradients are then formed in NumPy and written
straight into the rows of the gradient matrix:

* Gemm ``z = α·A·W(ᵀ)``: ``G_b = α·dz_b ⊗ a_b`` (``transB=1``) or ``α·a_b ⊗ dz_b``;
* MatMul ``z = A·W``: ``G_b = Σ_t a_btᵀ dz_bt``; ``z = W·A``: ``G_b = Σ_t dz_bt a_btᵀ``;
* Conv (any spatial rank, pads/auto_pad, strides, dilations, groups): im2col of the padded input
  from an ``as_strided`` view, then ``G_b[g] = dz_b[g] @ cols_b[g]ᵀ``.

With ``mini_batch = m`` a row is the sum over its ``m`` samples (the target already carries the
``1/m``).  This path covers only weights with exactly one consumer at its weight position; the
engine verifies it against the one-sample path before trusting it and falls back otherwise.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Literal

import numpy as np
import onnx
from numpy.lib.stride_tricks import as_strided
from numpy.typing import NDArray
from onnx import TensorProto, helper

from ..layout import Layout
from ._ort import Runner, build_gradient_model
from .prepare import Forward, _shape_table, attach_loss, attr_float, attr_int, attr_ints, attr_str

log = logging.getLogger(__name__)

#: Upper bound of the im2col scratch buffer of one Conv layer (bytes).
COLS_BUDGET = 64 * 2**20


class NotEligibleError(Exception):
    """The model (or the requested weights) cannot use the batched path."""


@dataclass(frozen=True)
class LayerPlan:
    """One prunable weight handled by the batched path."""

    weight: str
    kind: Literal["conv", "gemm", "matmul_right", "matmul_left"]
    z: str
    a: str
    offset: int
    wshape: tuple[int, ...]
    a_shape: tuple[int, ...]
    z_shape: tuple[int, ...]
    alpha: float = 1.0
    trans_a: bool = False
    trans_b: bool = False
    group: int = 1
    strides: tuple[int, ...] = ()
    dilations: tuple[int, ...] = ()
    pads_begin: tuple[int, ...] = ()
    pads_end: tuple[int, ...] = ()

    @property
    def size(self) -> int:
        return prod(self.wshape)


def _conv_pads(
    node: onnx.NodeProto, in_sp: Sequence[int], k: Sequence[int], st: Sequence[int], dil: Sequence[int]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    s = len(in_sp)
    auto = attr_str(node, "auto_pad", "NOTSET")
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(s):
            out = -(-in_sp[i] // st[i])
            total = max(0, (out - 1) * st[i] + (k[i] - 1) * dil[i] + 1 - in_sp[i])
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
        return tuple(begin), tuple(end)
    if auto == "VALID":
        return (0,) * s, (0,) * s
    p = attr_ints(node, "pads")
    if p is None:
        return (0,) * s, (0,) * s
    return tuple(p[:s]), tuple(p[s:])


def plan_layers(fwd: Forward, weights: Sequence[str], layout: Layout) -> list[LayerPlan]:
    """How each of ``weights`` is differentiated by the batched path; :class:`NotEligibleError` if one
    of them is not a single-use Conv/Gemm/MatMul weight with the batch on axis 0."""
    g = fwd.model.graph
    table = _shape_table(fwd.model)
    batch = fwd.batch
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            if name in weights:
                uses.setdefault(name, []).append((n, i))

    def shape(name: str) -> tuple[int, ...]:
        dims = table.get(name, (0, None))[1]
        if dims is None or any(d is None for d in dims):
            raise NotEligibleError(f"unknown shape of {name!r}")
        return tuple(int(d) for d in dims if d is not None)

    plans: list[LayerPlan] = []
    for w in weights:
        use = uses.get(w, [])
        if len(use) != 1:
            raise NotEligibleError(f"weight {w!r} has {len(use)} consumers")
        node, pos = use[0]
        if node.domain not in ("", "ai.onnx"):
            raise NotEligibleError(f"weight {w!r} feeds a {node.domain} op")
        slot = layout.slot(w)
        wshape = tuple(slot.shape)
        z = node.output[0]
        if node.op_type == "Conv" and pos == 1:
            a = node.input[0]
            a_sh, z_sh = shape(a), shape(z)
            s = len(wshape) - 2
            k = wshape[2:]
            st = tuple(attr_ints(node, "strides", [1] * s) or ())
            dil = tuple(attr_ints(node, "dilations", [1] * s) or ())
            grp = attr_int(node, "group", 1)
            pb, pe = _conv_pads(node, a_sh[2:], k, st, dil)
            outs = tuple((a_sh[2 + i] + pb[i] + pe[i] - dil[i] * (k[i] - 1) - 1) // st[i] + 1 for i in range(s))
            if a_sh[0] != batch or z_sh != (batch, wshape[0], *outs) or a_sh[1] != wshape[1] * grp:
                raise NotEligibleError(f"Conv {node.name!r}: shapes {a_sh} -> {z_sh} do not match the weight {wshape}")
            plans.append(
                LayerPlan(
                    w,
                    "conv",
                    z,
                    a,
                    slot.offset,
                    wshape,
                    a_sh,
                    z_sh,
                    group=grp,
                    strides=st,
                    dilations=dil,
                    pads_begin=pb,
                    pads_end=pe,
                )
            )
        elif node.op_type == "Gemm" and pos == 1:
            a = node.input[0]
            a_sh, z_sh = shape(a), shape(z)
            ta, tb = bool(attr_int(node, "transA", 0)), bool(attr_int(node, "transB", 0))
            alpha = attr_float(node, "alpha", 1.0)
            if len(a_sh) != 2 or a_sh[1 if ta else 0] != batch or z_sh[0] != batch:
                raise NotEligibleError(f"Gemm {node.name!r}: the batch is not on the rows of A")
            plans.append(
                LayerPlan(w, "gemm", z, a, slot.offset, wshape, a_sh, z_sh, alpha=alpha, trans_a=ta, trans_b=tb)
            )
        elif node.op_type == "MatMul" and len(wshape) == 2:
            other = node.input[1 - pos]
            a_sh, z_sh = shape(other), shape(z)
            if pos == 1 and len(a_sh) >= 2 and a_sh[0] == batch:
                plans.append(LayerPlan(w, "matmul_right", z, other, slot.offset, wshape, a_sh, z_sh))
            elif pos == 0 and len(a_sh) >= 3 and a_sh[0] == batch:
                plans.append(LayerPlan(w, "matmul_left", z, other, slot.offset, wshape, a_sh, z_sh))
            else:
                raise NotEligibleError(f"MatMul {node.name!r}: the batch is not on axis 0 of the other operand")
        else:
            raise NotEligibleError(f"weight {w!r} feeds input {pos} of {node.op_type} {node.name!r}")
    return plans


class BatchedPath:
    """Batched forward/backward in onnxruntime + per-sample weight gradients in NumPy."""

    def __init__(
        self,
        fwd: Forward,
        weights: Sequence[str],
        layout: Layout,
        mini_batch: int,
        values: Mapping[str, NDArray[np.float32]],
        threads: int = 1,
    ) -> None:
        self.fwd = fwd
        self.batch = fwd.batch
        self.m = mini_batch
        if self.batch % mini_batch:
            raise NotEligibleError("the chunk is not a multiple of the mini-batch")
        self.plans = plan_layers(fwd, weights, layout)
        lm, self.target, loss = attach_loss(fwd)
        gm = build_gradient_model(lm, {p.z for p in self.plans}, loss)
        outputs = {o.name for o in gm.graph.output}
        graph_inputs = {i.name for i in gm.graph.input}
        for p in self.plans:
            if f"{p.z}_grad" not in outputs:
                raise NotEligibleError(f"the builder gave no gradient for {p.z!r}")
            if p.a not in graph_inputs and p.a not in outputs:
                gm.graph.output.append(helper.make_tensor_value_info(p.a, TensorProto.FLOAT, list(p.a_shape)))
                outputs.add(p.a)
        self.runner = Runner(gm, values, threads, check=False)
        self.graph_inputs = graph_inputs
        # persistent output buffers
        self.dz: dict[str, NDArray[np.float32]] = {}
        self.acts: dict[str, NDArray[np.float32]] = {}
        for p in self.plans:
            if p.z not in self.dz:
                self.dz[p.z] = np.zeros(p.z_shape, np.float32)
                self.runner.bind_output_array(f"{p.z}_grad", self.dz[p.z])
            if p.a not in graph_inputs and p.a not in self.acts:
                self.acts[p.a] = np.zeros(p.a_shape, np.float32)
                self.runner.bind_output_array(p.a, self.acts[p.a])
        # im2col scratch: one buffer shared by all Conv layers (they run one after the other)
        self._scratch: dict[str, tuple[NDArray[np.float32], int]] = {}
        need = 0
        for p in self.plans:
            if p.kind == "conv":
                self._scratch[p.weight] = self._conv_scratch(p)
                need = max(need, self._scratch[p.weight][1] * self.m * self._cols_per_sample(p))
        self._cols = np.zeros(need, np.float32)
        self._cols.fill(0.0)  # fault the pages in now
        # warm-up run (zeros): onnxruntime sizes its arenas, and a graph that cannot run at this
        # batch size (a fixed-batch export) fails here rather than in the middle of a run
        zeros = {name: np.zeros(shape, dtype) for name, dtype, shape in fwd.data_inputs}
        self.run(zeros, np.zeros(fwd.head.shape, np.float32), np.empty((0, layout.p), np.float32), 0, 0)

    @staticmethod
    def _cols_per_sample(p: LayerPlan) -> int:
        return p.group * prod(p.wshape[1:]) * prod(p.z_shape[2:])

    def _conv_scratch(self, p: LayerPlan) -> tuple[NDArray[np.float32], int]:
        """The zero-padded input buffer and the rows per im2col pass (≤ :data:`COLS_BUDGET` bytes)."""
        s = len(p.wshape) - 2
        C, in_sp = p.a_shape[1], p.a_shape[2:]
        padded = tuple(in_sp[i] + p.pads_begin[i] + p.pads_end[i] for i in range(s))
        per_row = self.m * self._cols_per_sample(p) * 4
        sub = max(1, min(self.batch // self.m, COLS_BUDGET // max(per_row, 1)))
        return np.zeros((sub * self.m, C, *padded), np.float32), sub

    def bind_weights(self, values: Mapping[str, NDArray[np.float32]]) -> None:
        self.runner.bind_weights(values)

    def run(
        self,
        inputs: Mapping[str, NDArray[np.generic]],
        target: NDArray[np.float32],
        X: NDArray[np.float32],
        row0: int,
        nrows: int,
    ) -> tuple[float, float]:
        """Rows ``row0 : row0 + nrows`` of ``X`` from one chunk (``inputs`` padded to the chunk).

        Returns the seconds spent in onnxruntime and in NumPy.
        """
        t0 = time.perf_counter()
        feeds: dict[str, NDArray[np.generic]] = {}
        for name, arr in inputs.items():
            feeds[name] = arr
            self.runner.bind_input(name, arr)
        self.runner.bind_input(self.target, target)
        self.runner.run()
        t1 = time.perf_counter()
        for p in self.plans:
            a = self.acts[p.a] if p.a in self.acts else np.asarray(feeds[p.a], np.float32)
            dz = self.dz[p.z]
            if p.kind == "conv":
                self._conv(p, a, dz, X, row0, nrows)
            else:
                self._dense(p, a, dz, X, row0, nrows)
        return t1 - t0, time.perf_counter() - t1

    # -- per-sample weight gradients ------------------------------------------------------------

    def _rows_view(
        self, X: NDArray[np.float32], p: LayerPlan, r0: int, r1: int, shape: tuple[int, ...]
    ) -> NDArray[np.float32]:
        return X[r0:r1, p.offset : p.offset + p.size].reshape((r1 - r0, *shape))

    def _dense(
        self,
        p: LayerPlan,
        a: NDArray[np.float32],
        dz: NDArray[np.float32],
        X: NDArray[np.float32],
        row0: int,
        nrows: int,
    ) -> None:
        m, ns = self.m, nrows * self.m
        if nrows == 0:
            return
        if p.kind == "gemm":
            a2 = a[:, :ns].T if p.trans_a else a[:ns]
            d2 = dz[:ns]
            if p.trans_b:  # W [N, K]: G = α dzᵀ a
                left, right = d2, a2
            else:  # W [K, N]: G = α aᵀ dz
                left, right = a2, d2
            out = self._rows_view(X, p, row0, row0 + nrows, p.wshape)
            if m == 1:
                np.multiply(left[:, :, None], right[:, None, :], out=out)
            else:
                lr = left.reshape(nrows, m, left.shape[1]).transpose(0, 2, 1)
                rr = right.reshape(nrows, m, right.shape[1])
                np.matmul(lr, rr, out=out)
            if p.alpha != 1.0:
                out *= np.float32(p.alpha)
        elif p.kind == "matmul_right":  # z = A·W, W [K, N]: G = Σ_t aᵀ dz
            K, N = p.wshape
            ar = a[:ns].reshape(nrows, -1, K)
            dr = dz[:ns].reshape(nrows, -1, N)
            out = self._rows_view(X, p, row0, row0 + nrows, p.wshape)
            if ar.shape[1] == 1:  # an outer product: broadcasting beats a k=1 matmul
                np.multiply(ar[:, 0, :, None], dr[:, 0, None, :], out=out)
            else:
                np.matmul(ar.transpose(0, 2, 1), dr, out=out)
        else:  # z = W·A, W [M, K], A [b, ..., K, N]: G = Σ_t dz aᵀ
            M, K = p.wshape
            N = a.shape[-1]
            dr = np.ascontiguousarray(dz[:ns].reshape(nrows, -1, M, N).transpose(0, 2, 1, 3))
            ar = np.ascontiguousarray(a[:ns].reshape(nrows, -1, K, N).transpose(0, 2, 1, 3))
            out = self._rows_view(X, p, row0, row0 + nrows, p.wshape)
            np.matmul(dr.reshape(nrows, M, -1), ar.reshape(nrows, K, -1).transpose(0, 2, 1), out=out)

    def _conv(
        self,
        p: LayerPlan,
        a: NDArray[np.float32],
        dz: NDArray[np.float32],
        X: NDArray[np.float32],
        row0: int,
        nrows: int,
    ) -> None:
        m = self.m
        s = len(p.wshape) - 2
        M, Cg = p.wshape[0], p.wshape[1]
        k = p.wshape[2:]
        g = p.group
        Mg = M // g
        Kp = Cg * prod(k)
        out_sp = p.z_shape[2:]
        L = prod(out_sp)
        in_sp = p.a_shape[2:]
        xp_all, sub = self._scratch[p.weight]
        interior = (
            slice(None),
            slice(None),
            *(slice(p.pads_begin[i], p.pads_begin[i] + in_sp[i]) for i in range(s)),
        )
        for r0 in range(0, nrows, sub):
            r1 = min(nrows, r0 + sub)
            rows, bs, b0 = r1 - r0, (r1 - r0) * m, r0 * m
            xp = xp_all[:bs]
            xp[interior] = a[b0 : b0 + bs]
            st = xp.strides
            view = as_strided(
                xp,
                shape=(bs, g, Cg, *k, *out_sp),
                strides=(
                    st[0],
                    Cg * st[1],
                    st[1],
                    *(st[2 + i] * p.dilations[i] for i in range(s)),
                    *(st[2 + i] * p.strides[i] for i in range(s)),
                ),
                writeable=False,
            )
            cols = self._cols[: bs * g * Kp * L].reshape(bs, g, Cg, *k, *out_sp)
            np.copyto(cols, view)
            cols2 = cols.reshape(bs, g, Kp, L)
            dzv = dz[b0 : b0 + bs].reshape(bs, g, Mg, L)
            out = self._rows_view(X, p, row0 + r0, row0 + r1, (g, Mg, Kp))
            if m == 1:
                np.matmul(dzv, cols2.transpose(0, 1, 3, 2), out=out)
            else:  # a row sums its m samples: fold them into the contraction
                dzr = np.ascontiguousarray(dzv.reshape(rows, m, g, Mg, L).transpose(0, 2, 3, 1, 4))
                colr = np.ascontiguousarray(cols2.reshape(rows, m, g, Kp, L).transpose(0, 2, 1, 4, 3))
                np.matmul(dzr.reshape(rows, g, Mg, m * L), colr.reshape(rows, g, m * L, Kp), out=out)
