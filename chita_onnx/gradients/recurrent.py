"""LSTM, GRU and RNN unrolled for the fixed sequence length of the working copy.

onnxruntime-training 1.19.2 has no gradient builder for these ops (measured).  With the input
shape fixed, each becomes MatMul/Add/activations/Mul over ``T`` explicit steps, for every
direction, with the ONNX equations (gate orders ``iofc`` for LSTM and ``zrh`` for GRU; peepholes,
``clip``, ``input_forget``, ``linear_before_reset``, the ``activations``/``activation_alpha``/
``activation_beta`` attributes, ``layout``, initial states, and a constant ``sequence_lens``, where
steps past a sequence's length hold the state and write zeros to ``Y``).  Outputs ``Y``, ``Y_h``
(and ``Y_c``) keep their names.  The unrolled graph is checked against onnxruntime's own kernel when
it is made.

Two choices keep the per-sample gradient cheap.  A direction's weights are taken with
Slice + Reshape, not a scalar Gather, whose gradient kernel is slow.  And the builder never
differentiates ``R`` through the steps: a zero tensor added to the input projection stands in for
it, and :mod:`.deferred` turns that stand-in's gradient into ``R``'s with one product per row block.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from ..errors import UnsupportedOpError
from .deferred import record_deferred
from .prepare import attr_float, attr_int, attr_str
from .rewrites import Ctx, label

_DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
#: Most time steps (× directions) one node is unrolled into: beyond it the working copy takes minutes
#: to build and run (a 3,000-step LSTM did not finish in 200 s), so the node is refused with a clear
#: error instead (compress's layer-wise default then allocates by magnitude; it needs no gradients).
MAX_UNROLL_STEPS = 1024


def _floats(n: onnx.NodeProto, name: str) -> list[float]:
    for a in n.attribute:
        if a.name == name:
            return [float(v) for v in a.floats]
    return []


def _strings(n: onnx.NodeProto, name: str) -> list[str]:
    for a in n.attribute:
        if a.name == name:
            return [v.decode() if isinstance(v, bytes) else str(v) for v in a.strings]
    return []


class _Unroll:
    def __init__(self, c: Ctx, n: onnx.NodeProto) -> None:
        self.c, self.n = c, n
        self.nodes: list[onnx.NodeProto] = []
        self.base = next((o for o in n.output if o), label(n))
        self.dt = c.dtype_of(n.input[0])

    def add(self, op: str, ins: list[str], tag: str, **attrs: Any) -> str:
        out = self.c.tmp(f"{self.base}_{tag}")
        self.nodes.append(self.c.node(op, ins, [out], **attrs))
        return out

    def const(self, tag: str, value: NDArray[Any]) -> str:
        return self.c.const(f"{self.base}_{tag}", value)

    def act(self, name: str, x: str, alpha: float | None, beta: float | None, tag: str) -> str:
        key = name.lower()
        dt = self.dt
        if key in ("sigmoid", "tanh", "relu", "softsign", "softplus"):
            op = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu", "softsign": "Softsign", "softplus": "Softplus"}
            return self.add(op[key], [x], tag)
        if key == "leakyrelu":
            return self.add("LeakyRelu", [x], tag, alpha=0.01 if alpha is None else alpha)
        if key == "thresholdedrelu":
            return self.add("ThresholdedRelu", [x], tag, alpha=1.0 if alpha is None else alpha)
        if key == "hardsigmoid":
            return self.add(
                "HardSigmoid", [x], tag, alpha=0.2 if alpha is None else alpha, beta=0.5 if beta is None else beta
            )
        if key == "elu":
            return self.add("Elu", [x], tag, alpha=1.0 if alpha is None else alpha)
        if key == "affine":
            ax = self.add(
                "Mul", [x, self.const(f"{tag}_a", np.asarray(1.0 if alpha is None else alpha, dt))], f"{tag}_ax"
            )
            return self.add("Add", [ax, self.const(f"{tag}_b", np.asarray(0.0 if beta is None else beta, dt))], tag)
        if key == "scaledtanh":
            bx = self.add(
                "Mul", [x, self.const(f"{tag}_b", np.asarray(1.0 if beta is None else beta, dt))], f"{tag}_bx"
            )
            t = self.add("Tanh", [bx], f"{tag}_t")
            return self.add("Mul", [t, self.const(f"{tag}_a", np.asarray(1.0 if alpha is None else alpha, dt))], tag)
        raise UnsupportedOpError(
            f"cannot unroll {self.n.op_type} node {label(self.n)!r}: activation {name!r} is unknown"
        )

    def cols(self, x: str, k: int, H: int, tag: str, count: int = 1) -> str:
        """Columns ``[k·H, (k + count)·H)`` of a ``[B, G·H]`` tensor."""
        st = self.const(f"{tag}_st", np.asarray([k * H], np.int64))
        en = self.const(f"{tag}_en", np.asarray([(k + count) * H], np.int64))
        ax = self.const(f"{tag}_ax", np.asarray([-1], np.int64))
        return self.add("Slice", [x, st, en, ax], tag)


def recurrent(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Unroll an LSTM, GRU or RNN node (see the module docstring)."""
    op = n.op_type
    u = _Unroll(c, n)
    ins = list(n.input) + [""] * 8
    X, W, R, B, seq, h0 = ins[0], ins[1], ins[2], ins[3], ins[4], ins[5]
    c0, P = (ins[6], ins[7]) if op == "LSTM" else ("", "")
    layout = attr_int(n, "layout", 0)
    dims = c.static(X, n)
    T, Bn = (dims[0], dims[1]) if layout == 0 else (dims[1], dims[0])
    wdims = c.static(W, n)
    D = wdims[0]
    G = _GATES[op]
    H = attr_int(n, "hidden_size", wdims[1] // G)
    direction = attr_str(n, "direction", "forward")
    if T * D > MAX_UNROLL_STEPS:
        raise UnsupportedOpError(
            f"{op} node {label(n)!r}: {T} time steps × {D} direction(s) are too many to unroll for gradients "
            f"(at most {MAX_UNROLL_STEPS})"
        )
    if (direction == "bidirectional") != (D == 2):
        raise UnsupportedOpError(
            f"{op} node {label(n)!r}: direction {direction!r} does not match W of shape {list(wdims)}"
        )
    dt = c.dtype_of(X)
    acts = _strings(n, "activations") or _DEFAULT_ACTS[op] * D
    per = len(_DEFAULT_ACTS[op])
    alphas, betas = _floats(n, "activation_alpha"), _floats(n, "activation_beta")
    clip = attr_float(n, "clip", 0.0)
    input_forget = attr_int(n, "input_forget", 0)
    lbr = attr_int(n, "linear_before_reset", 0)
    lens = c.int_input(n, 4) if seq else None
    masks: list[str | None] = [None] * T
    if lens is not None and any(v != T for v in lens):
        for t in range(T):
            keep = np.asarray([t < v for v in lens], bool).reshape(Bn, 1)
            masks[t] = u.const(f"mask{t}", keep)

    x = X
    if layout == 1:
        x = u.add("Transpose", [X], "x_tbi", perm=[1, 0, 2])
    if layout == 1:
        h0 = u.add("Transpose", [h0], "h0_dbh", perm=[1, 0, 2]) if h0 else h0
        c0 = u.add("Transpose", [c0], "c0_dbh", perm=[1, 0, 2]) if c0 else c0
    zeros = u.const("zero_state", np.zeros((Bn, H), dt))
    zero_y = u.const("zero_y", np.zeros((Bn, H), dt))
    tidx = [u.const(f"t{t}", np.asarray(t, np.int64)) for t in range(T)]
    dirs_y: list[str] = []
    dirs_h: list[str] = []
    dirs_c: list[str] = []
    deferred: list[dict[str, Any]] = []
    for d in range(D):
        tag = f"d{d}"
        Wd = _pick(u, W, d, [G * H, -1], f"{tag}_W")
        WdT = u.add("Transpose", [Wd], f"{tag}_WT", perm=[1, 0])
        Rd = _pick(u, R, d, [G * H, H], f"{tag}_R")
        xw = u.add("MatMul", [x, WdT], f"{tag}_xw")  # [T, B, G·H]
        rb_h = ""
        if B:
            Bd = _pick(u, B, d, [-1], f"{tag}_B")
            st0 = u.const(f"{tag}_b0", np.asarray([0], np.int64))
            st1 = u.const(f"{tag}_b1", np.asarray([G * H], np.int64))
            st2 = u.const(f"{tag}_b2", np.asarray([2 * G * H], np.int64))
            ax0 = u.const(f"{tag}_bax", np.asarray([0], np.int64))
            wb = u.add("Slice", [Bd, st0, st1, ax0], f"{tag}_Wb")
            rb = u.add("Slice", [Bd, st1, st2, ax0], f"{tag}_Rb")
            if op == "GRU" and lbr:
                # Rb_h stays inside r ⊙ (h·Rhᵀ + Rb_h); Rb_z and Rb_r join the input term
                zr = u.add("Slice", [rb, st0, u.const(f"{tag}_b2h", np.asarray([2 * H], np.int64)), ax0], f"{tag}_Rbzr")
                pad = u.add("Pad", [zr, u.const(f"{tag}_bpad", np.asarray([0, H], np.int64))], f"{tag}_Rbzr0")
                rb_h = u.add(
                    "Slice",
                    [rb, u.const(f"{tag}_b2h2", np.asarray([2 * H], np.int64)), st1, ax0],
                    f"{tag}_Rbh",
                )
                rb = pad
            bsum = u.add("Add", [wb, rb], f"{tag}_bias")
            xw = u.add("Add", [xw, bsum], f"{tag}_xwb")
        # xw + a zero tensor E, whose gradient is every step's pre-activation gradient: the gradient
        # builder can then leave R alone and R's gradient becomes one product per block of its rows
        # (.deferred).  GRU with linear_before_reset: a second one, E2, on h·R_hᵀ
        E = u.const(f"{tag}_dpre", np.zeros((T, Bn, G * H), dt))
        xw = u.add("Add", [xw, E], f"{tag}_xwe")
        E2 = u.const(f"{tag}_dhh", np.zeros((T, Bn, H), dt)) if op == "GRU" and lbr else ""
        hprev: dict[int, str] = {}
        rh: dict[int, str] = {}  # GRU: r_t ⊙ h_{t−1}, what R_h multiplies without linear_before_reset
        if op == "GRU":
            RzrT = u.add("Transpose", [_rows(u, Rd, 0, 2 * H, f"{tag}_Rzr")], f"{tag}_RzrT", perm=[1, 0])
            RhT = u.add("Transpose", [_rows(u, Rd, 2 * H, 3 * H, f"{tag}_Rh")], f"{tag}_RhT", perm=[1, 0])
        else:
            RdT = u.add("Transpose", [Rd], f"{tag}_RT", perm=[1, 0])
        h = _pick(u, h0, d, [-1, H], f"{tag}_h0") if h0 else zeros
        cell = _pick(u, c0, d, [-1, H], f"{tag}_c0") if c0 else zeros
        pi = po = pf = ""
        if P:
            Pd = _pick(u, P, d, [-1], f"{tag}_P")
            pi, po, pf = (_rows(u, Pd, k * H, (k + 1) * H, f"{tag}_P{k}") for k in range(3))
        fa = [acts[d * per + k] for k in range(per)]
        fal = [alphas[d * per + k] if d * per + k < len(alphas) else None for k in range(per)]
        fbe = [betas[d * per + k] if d * per + k < len(betas) else None for k in range(per)]
        reverse = direction == "reverse" or d == 1
        order = range(T - 1, -1, -1) if reverse else range(T)
        ys: dict[int, str] = {}
        for t in order:
            s = f"{tag}_t{t}"
            xt = u.add("Gather", [xw, tidx[t]], f"{s}_x", axis=0)  # [B, G·H]
            hprev[t] = h
            if op == "LSTM":
                pre = u.add("Add", [xt, u.add("MatMul", [h, RdT], f"{s}_hr")], f"{s}_pre")
                gi, go, gf, gc = (u.cols(pre, k, H, f"{s}_g{k}") for k in range(4))
                if pi:
                    gi = u.add("Add", [gi, u.add("Mul", [pi, cell], f"{s}_pic")], f"{s}_gip")
                    gf = u.add("Add", [gf, u.add("Mul", [pf, cell], f"{s}_pfc")], f"{s}_gfp")
                gi, gf, gc = (_clip(u, g, clip, f"{s}_{k}c") for g, k in ((gi, "i"), (gf, "f"), (gc, "c")))
                it = u.act(fa[0], gi, fal[0], fbe[0], f"{s}_i")
                if input_forget:
                    ft = u.add("Sub", [u.const(f"{s}_one", np.asarray(1.0, dt)), it], f"{s}_f")
                else:
                    ft = u.act(fa[0], gf, fal[0], fbe[0], f"{s}_f")
                ct = u.act(fa[1], gc, fal[1], fbe[1], f"{s}_c")
                c_new = u.add("Add", [u.add("Mul", [ft, cell], f"{s}_fc"), u.add("Mul", [it, ct], f"{s}_ic")], f"{s}_C")
                if po:
                    go = u.add("Add", [go, u.add("Mul", [po, c_new], f"{s}_poc")], f"{s}_gop")
                go = _clip(u, go, clip, f"{s}_oc")
                ot = u.act(fa[0], go, fal[0], fbe[0], f"{s}_o")
                h_new = u.add("Mul", [ot, u.act(fa[2], c_new, fal[2], fbe[2], f"{s}_hc")], f"{s}_H")
            elif op == "GRU":
                hzr = u.add("MatMul", [h, RzrT], f"{s}_hzr")
                zt = _gru_gate(u, xt, hzr, 0, H, (fa[0], fal[0], fbe[0]), clip, f"{s}_z")
                rt = _gru_gate(u, xt, hzr, 1, H, (fa[0], fal[0], fbe[0]), clip, f"{s}_r")
                xh = u.cols(xt, 2, H, f"{s}_x2")
                if lbr:
                    hh = u.add("MatMul", [h, RhT], f"{s}_hh0")
                    hh = u.add("Add", [hh, u.add("Gather", [E2, tidx[t]], f"{s}_e2", axis=0)], f"{s}_hh")
                    if rb_h:
                        hh = u.add("Add", [hh, rb_h], f"{s}_hhb")
                    rec = u.add("Mul", [rt, hh], f"{s}_rhh")
                else:
                    rh[t] = u.add("Mul", [rt, h], f"{s}_rh")
                    rec = u.add("MatMul", [rh[t], RhT], f"{s}_rhR")
                ht = u.act(
                    fa[1], _clip(u, u.add("Add", [xh, rec], f"{s}_hp"), clip, f"{s}_hcl"), fal[1], fbe[1], f"{s}_ht"
                )
                one_z = u.add("Sub", [u.const(f"{s}_one", np.asarray(1.0, dt)), zt], f"{s}_1mz")
                h_new = u.add("Add", [u.add("Mul", [one_z, ht], f"{s}_a"), u.add("Mul", [zt, h], f"{s}_b")], f"{s}_H")
                c_new = ""
            else:
                pre = u.add("Add", [xt, u.add("MatMul", [h, RdT], f"{s}_hr")], f"{s}_pre")
                h_new = u.act(fa[0], _clip(u, pre, clip, f"{s}_pc"), fal[0], fbe[0], f"{s}_H")
                c_new = ""
            m = masks[t]
            if m is not None:
                ys[t] = u.add("Where", [m, h_new, zero_y], f"{s}_y")
                h = u.add("Where", [m, h_new, h], f"{s}_hm")
                if c_new:
                    cell = u.add("Where", [m, c_new, cell], f"{s}_cm")
            else:
                ys[t] = h_new
                h = h_new
                if c_new:
                    cell = c_new
        hs = [hprev[t] for t in range(T)]
        if op != "GRU":
            blocks = [{"dpre": E, "cols": [0, G * H], "inputs": hs}]
        elif lbr:
            blocks = [{"dpre": E, "cols": [0, 2 * H], "inputs": hs}, {"dpre": E2, "cols": [0, H], "inputs": hs}]
        else:
            rhs = [rh[t] for t in range(T)]
            blocks = [{"dpre": E, "cols": [0, 2 * H], "inputs": hs}, {"dpre": E, "cols": [2 * H, 3 * H], "inputs": rhs}]
        deferred.append({"weight": R, "slice": Rd, "blocks": blocks})
        ax0 = u.const(f"{tag}_ax0", np.asarray([0], np.int64))
        dirs_y.append(
            u.add("Concat", [u.add("Unsqueeze", [ys[t], ax0], f"{tag}_y{t}") for t in range(T)], f"{tag}_Y", axis=0)
        )
        dirs_h.append(u.add("Unsqueeze", [h, ax0], f"{tag}_Yh"))
        if op == "LSTM":
            dirs_c.append(u.add("Unsqueeze", [cell, ax0], f"{tag}_Yc"))
    if deferred and R:
        record_deferred(u.c.model, deferred)
    outs = list(n.output) + [""] * 3
    ax1 = u.const("ax1", np.asarray([1], np.int64))
    if outs[0]:
        ytd = [u.add("Unsqueeze", [yd, ax1], f"Y{d}") for d, yd in enumerate(dirs_y)]  # [T, 1, B, H]
        y = ytd[0] if D == 1 else u.add("Concat", ytd, "Y", axis=1)
        _finish(u, y, outs[0], [2, 0, 1, 3] if layout == 1 else None)
    for k, parts in ((1, dirs_h), (2, dirs_c)):
        if outs[k] and parts:
            y = parts[0] if D == 1 else u.add("Concat", parts, f"out{k}", axis=0)
            _finish(u, y, outs[k], [1, 0, 2] if layout == 1 else None)
    return u.nodes


def _gru_gate(
    u: _Unroll, xt: str, hzr: str, k: int, H: int, act: tuple[str, float | None, float | None], clip: float, tag: str
) -> str:
    """``f(x·W_kᵀ + h·R_kᵀ + b_k)`` for GRU gate ``k`` (0: update z, 1: reset r)."""
    pre = u.add("Add", [u.cols(xt, k, H, f"{tag}x"), u.cols(hzr, k, H, f"{tag}h")], f"{tag}p")
    return u.act(act[0], _clip(u, pre, clip, f"{tag}c"), act[1], act[2], tag)


def _pick(u: _Unroll, x: str, d: int, shape: list[int], tag: str) -> str:
    """Direction ``d`` of a per-direction tensor ``x`` (``[D, ...]``), reshaped to ``shape``.

    A Slice rather than a scalar Gather: onnxruntime-training's GatherGrad scatters element by
    element and took 21 ms per run for one 2048 × 512 weight (ddddocr-common's LSTM, about 35% of
    its whole per-sample gradient), where SliceGrad is a zero fill and a copy.
    """
    sliced = _rows(u, x, d, d + 1, f"{tag}_sl")
    return u.add("Reshape", [sliced, u.const(f"{tag}_shape", np.asarray(shape, np.int64))], tag)


def _rows(u: _Unroll, x: str, lo: int, hi: int, tag: str) -> str:
    st = u.const(f"{tag}_st", np.asarray([lo], np.int64))
    en = u.const(f"{tag}_en", np.asarray([hi], np.int64))
    ax = u.const(f"{tag}_ax", np.asarray([0], np.int64))
    return u.add("Slice", [x, st, en, ax], tag)


def _clip(u: _Unroll, x: str, clip: float, tag: str) -> str:
    if clip <= 0:
        return x
    lo = u.const(f"{tag}_lo", np.asarray(-clip, u.dt))
    hi = u.const(f"{tag}_hi", np.asarray(clip, u.dt))
    return u.add("Clip", [x, lo, hi], tag)


def _finish(u: _Unroll, src: str, dst: str, perm: list[int] | None) -> None:
    if perm is None:
        u.nodes.append(u.c.node("Identity", [src], [dst]))
    else:
        u.nodes.append(u.c.node("Transpose", [src], [dst], perm=perm))


__all__ = ["recurrent"]
