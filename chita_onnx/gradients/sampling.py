"""Exact rewrites of AffineGrid and GridSample (onnxruntime-training 1.19.2 has no gradient for
either), as in a spatial transformer (localisation net → θ → AffineGrid → GridSample) or a
deformable-attention sampler.

* **AffineGrid** (2-D θ ``(N, 2, 3)`` or 3-D θ ``(N, 3, 4)``) is linear in θ: the grid is
  ``base · θᵀ`` with ``base`` ``(L, r + 1)`` the normalised coordinates of the ``L`` output positions
  (last spatial axis first, then a column of ones), one ``MatMul`` over the batch and a ``Reshape``.
* **GridSample** (4-D input ``(N, C, H, W)``, grid ``(N, Ho, Wo, 2)``; ``linear``/``bilinear`` or
  ``nearest``; padding ``zeros``, ``border`` or ``reflection``; either ``align_corners``): the grid is
  mapped to pixel coordinates; each of the (up to) four neighbouring pixels is read by
  ``GatherElements`` on the flattened input at its clamped integer index, weighted by its bilinear
  weight (and, with zero padding, by whether the pixel lies inside).  The integer corner comes from
  ``Floor`` (``Round`` for ``nearest``) through an ``int64`` ``Cast``, which onnxruntime does not differentiate, so the
  gradient with respect to the grid is exactly that of the bilinear weights, and with respect to the
  input that of the gathers.  Reflection padding first folds each coordinate back into the image
  (``Abs`` of a wrapped offset; ``nearest`` rounds before, as onnxruntime does), then reads like
  border padding.  Bicubic sampling and 5-D inputs
  are refused.

Both are checked against onnxruntime's own kernel on a random input when they are made (a random
grid reaches past the borders, so the padding is checked too).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto

from .prepare import attr_int, attr_str
from .rewrites import Ctx, attribute_refusal, refuse

__all__ = ["affine_grid", "grid_sample"]


def _axis_coords(size: int, align_corners: int) -> np.ndarray:
    """Normalised coordinates in [-1, 1] of ``size`` positions along one axis (the operator's
    definition: pixel corners with ``align_corners``, pixel centres without)."""
    i = np.arange(size, dtype=np.float64)
    if align_corners:
        return -1.0 + 2.0 * i / (size - 1)
    return (2.0 * i + 1.0) / size - 1.0


def affine_grid(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    theta, y = n.input[0], n.output[0]
    align = attr_int(n, "align_corners", 0)
    size = c.int_input(n, 1) if c.array(n.input[1]) is not None else None
    if size is None:
        dims = c.dims(y)
        if dims is None or any(d is None for d in dims[1:-1]):
            raise refuse(n, f"its output size is neither a constant nor a static shape ({dims})")
        spatial = [int(d) for d in dims[1:-1] if d is not None]
    else:
        spatial = [int(v) for v in size[2:]]
    r = len(spatial)
    if r not in (2, 3):
        raise refuse(n, f"a grid of {r} spatial axes is not rewritten")
    if align and min(spatial) < 2:
        raise refuse(n, f"align_corners=1 with an axis of size 1 ({spatial})")
    axes = [_axis_coords(s, align) for s in spatial]
    mesh = np.meshgrid(*axes, indexing="ij")  # one array per axis, each of shape `spatial`
    cols = [m.reshape(-1) for m in reversed(mesh)]  # x (last axis) first, as the operator orders them
    base = np.stack([*cols, np.ones(cols[0].size)], axis=1).astype(c.dtype_of(theta))  # (L, r + 1)
    tt, flat = c.tmp(f"{y}_theta_t"), c.tmp(f"{y}_flat")
    return [
        c.node("Transpose", [theta], [tt], perm=[0, 2, 1]),  # (N, r + 1, r)
        c.node("MatMul", [c.const(f"{y}_base", base), tt], [flat]),  # (N, L, r)
        c.node("Reshape", [flat, c.const(f"{y}_shape", np.asarray([-1, *spatial, r], np.int64))], [y]),
    ]


def grid_sample(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, grid, y = n.input[0], n.input[1], n.output[0]
    mode = attr_str(n, "mode", "bilinear")
    padding = attr_str(n, "padding_mode", "zeros")
    align = attr_int(n, "align_corners", 0)
    why = attribute_refusal(n)
    if why is not None:
        raise refuse(n, why)
    xd, gd = c.dims(x), c.dims(grid)
    if xd is None or len(xd) != 4 or gd is None or len(gd) != 4:
        raise refuse(n, f"only a 4-D input and grid are rewritten (shapes {xd} and {gd})")
    if any(d is None for d in (*xd[1:], *gd[1:3])):
        raise refuse(n, f"the input's channels and sizes and the grid's sizes must be static ({xd}, {gd})")
    C, H, W = (int(d) for d in xd[1:] if d is not None)
    Ho, Wo = (int(d) for d in gd[1:3] if d is not None)
    gtype = c.dtype_of(grid)
    elem = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float64): TensorProto.DOUBLE}.get(np.dtype(gtype))
    if elem is None:
        raise refuse(n, f"a grid of type {gtype} is not rewritten")
    xtype = c.dtype_of(x)
    out: list[onnx.NodeProto] = []

    consts: dict[str, str] = {}

    def i64(tag: str, v: int | list[int]) -> str:
        if tag not in consts:  # one initializer per distinct constant
            consts[tag] = c.const(f"{y}_{tag}", np.asarray(v, np.int64))
        return consts[tag]

    def pixel(k: int, size: int, tag: str) -> str:
        """Grid component ``k`` (0: x, 1: y) in pixel coordinates, ``(N, Ho, Wo)``."""
        g, p = c.tmp(f"{y}_g{tag}"), c.tmp(f"{y}_p{tag}")
        scale = (size - 1) / 2.0 if align else size / 2.0
        out.append(c.node("Gather", [grid, i64(f"comp{tag}", k)], [g], axis=3))
        s, u = c.tmp(f"{y}_s{tag}"), c.tmp(f"{y}_u{tag}")
        out.append(c.node("Mul", [g, c.const(f"{y}_scale{tag}", np.asarray(scale, gtype))], [s]))
        out.append(c.node("Add", [s, c.const(f"{y}_off{tag}", np.asarray((size - 1) / 2.0, gtype))], [u]))
        if padding == "reflection":
            if mode == "nearest":  # onnxruntime rounds first, then reflects the pixel index
                rounded = c.tmp(f"{y}_round{tag}")
                out.append(c.node("Round", [u], [rounded]))
                u = rounded
            return reflect(u, size, tag)
        # clipped to [-2, size + 1]: the same value and gradient (every point beyond reads padding
        # only), and no int64 overflow in the corner's Cast for huge or infinite coordinates
        lo, hi = (c.const(f"{y}_{name}{tag}", np.asarray(v, gtype)) for name, v in (("min", -2.0), ("max", size + 1.0)))
        out.append(c.node("Clip", [u, lo, hi], [p]))
        return p

    def reflect(u: str, size: int, tag: str) -> str:
        """``u`` reflected into ``[lo, hi]`` (pixel corners ``[0, size − 1]`` with ``align_corners``,
        the image's edges ``[−½, size − ½]`` without): ``hi − |((u − lo) mod 2R) − R|``, ``R = hi − lo``;
        the wrap count goes through an int64 Cast (no gradient), the rest is ±1 times ``u``'s."""
        lo = 0.0 if align else -0.5
        span = (size - 1.0) if align else float(size)
        if span <= 0:
            raise refuse(n, "reflection padding with align_corners=1 on an axis of size 1")
        v, q, qi, qf, m, d, a, r = (c.tmp(f"{y}_{k}{tag}") for k in ("rv", "rq", "rqi", "rqf", "rm", "rd", "ra", "r"))

        def f(name: str, value: float) -> str:
            return c.const(f"{y}_{name}{tag}", np.asarray(value, gtype))

        out.append(c.node("Sub", [u, f("rlo", lo)], [v]))
        out.append(c.node("Div", [v, f("r2span", 2.0 * span)], [c.tmp(f"{y}_rw{tag}")]))
        out.append(c.node("Floor", [out[-1].output[0]], [q]))
        out.append(c.node("Cast", [q], [qi], to=TensorProto.INT64))
        out.append(c.node("Cast", [qi], [qf], to=elem))
        out.append(c.node("Mul", [qf, f("r2span_m", 2.0 * span)], [c.tmp(f"{y}_rwrap{tag}")]))
        out.append(c.node("Sub", [v, out[-1].output[0]], [m]))  # in [0, 2R)
        out.append(c.node("Sub", [m, f("rspan", span)], [d]))
        out.append(c.node("Abs", [d], [a]))
        out.append(c.node("Sub", [f("rhi", lo + span), a], [r]))
        return r

    def integer(p: str, op: str, tag: str) -> str:
        """``op(p)`` (Floor or Round) as int64, off the gradient's path."""
        f, i = c.tmp(f"{y}_{op.lower()}{tag}"), c.tmp(f"{y}_int{tag}")
        out.append(c.node(op, [p], [f]))
        out.append(c.node("Cast", [f], [i], to=TensorProto.INT64))
        return i

    def clamp(i: str, size: int, tag: str) -> str:
        lo, hi = c.tmp(f"{y}_lo{tag}"), c.tmp(f"{y}_clamped{tag}")
        out.append(c.node("Max", [i, i64("zero_i", 0)], [lo]))
        out.append(c.node("Min", [lo, i64(f"last{size}", size - 1)], [hi]))
        return hi

    def inside(i: str, size: int, tag: str) -> str:
        ge, le, both = (c.tmp(f"{y}_{k}{tag}") for k in ("ge", "le", "in"))
        out.append(c.node("GreaterOrEqual", [i, i64("zero_i", 0)], [ge]))
        out.append(c.node("LessOrEqual", [i, i64(f"last{size}", size - 1)], [le]))
        out.append(c.node("And", [ge, le], [both]))
        return both

    def corner(xi: str, yi: str, weight: str | None, tag: str) -> str:
        """The input at the integer corner ``(yi, xi)`` times ``weight`` (and the inside mask)."""
        xc, yc = clamp(xi, W, f"x{tag}"), clamp(yi, H, f"y{tag}")
        row, flat, col, idx, v, v4 = (c.tmp(f"{y}_{k}{tag}") for k in ("row", "flat", "col", "idx", "v", "v4"))
        out.append(c.node("Mul", [yc, i64("width", W)], [row]))
        out.append(c.node("Add", [row, xc], [flat]))
        out.append(c.node("Reshape", [flat, i64("col_shape", [-1, 1, Ho * Wo])], [col]))
        out.append(c.node("Expand", [col, i64("expand", [1, C, 1])], [idx]))
        out.append(c.node("GatherElements", [xflat, idx], [v], axis=2))
        out.append(c.node("Reshape", [v, i64("out_shape", [-1, C, Ho, Wo])], [v4]))
        w = weight
        if padding == "zeros":
            both, m = c.tmp(f"{y}_inside{tag}"), c.tmp(f"{y}_mask{tag}")
            out.append(c.node("And", [inside(xi, W, f"x{tag}"), inside(yi, H, f"y{tag}")], [both]))
            out.append(c.node("Cast", [both], [m], to=elem))
            if w is None:
                w = m
            else:
                out.append(c.node("Mul", [w, m], [c.tmp(f"{y}_wm{tag}")]))
                w = out[-1].output[0]
        if w is None:
            return v4
        w4, term = c.tmp(f"{y}_w4{tag}"), c.tmp(f"{y}_term{tag}")
        out.append(c.node("Reshape", [w, i64("w_shape", [-1, 1, Ho, Wo])], [w4]))
        if gtype != xtype:
            out.append(c.node("Cast", [w4], [c.tmp(f"{y}_w4c{tag}")], to=onnx.helper.np_dtype_to_tensor_dtype(xtype)))
            w4 = out[-1].output[0]
        out.append(c.node("Mul", [v4, w4], [term]))
        return term

    xflat = c.tmp(f"{y}_xflat")
    out.append(c.node("Reshape", [x, i64("in_shape", [-1, C, H * W])], [xflat]))
    px, py = pixel(0, W, "x"), pixel(1, H, "y")
    if mode == "nearest":
        terms = [corner(integer(px, "Round", "x"), integer(py, "Round", "y"), None, "")]
    else:
        x0, y0 = integer(px, "Floor", "x"), integer(py, "Floor", "y")
        x1, y1 = c.tmp(f"{y}_x1"), c.tmp(f"{y}_y1")
        out.append(c.node("Add", [x0, i64("one_i", 1)], [x1]))
        out.append(c.node("Add", [y0, i64("one_i", 1)], [y1]))
        one = c.const(f"{y}_one", np.asarray(1.0, gtype))
        weights = {}
        for p, i0, tag in ((px, x0, "x"), (py, y0, "y")):
            f0, w1, w0 = c.tmp(f"{y}_f0{tag}"), c.tmp(f"{y}_w1{tag}"), c.tmp(f"{y}_w0{tag}")
            out.append(c.node("Cast", [i0], [f0], to=elem))
            out.append(c.node("Sub", [p, f0], [w1]))  # the fractional part: the weight of the upper corner
            out.append(c.node("Sub", [one, w1], [w0]))
            weights[tag] = (w0, w1)
        terms = []
        for yi, wy, ty in ((y0, weights["y"][0], "0"), (y1, weights["y"][1], "1")):
            for xi, wx, tx in ((x0, weights["x"][0], "0"), (x1, weights["x"][1], "1")):
                wxy = c.tmp(f"{y}_w{ty}{tx}")
                out.append(c.node("Mul", [wy, wx], [wxy]))
                terms.append(corner(xi, yi, wxy, f"{ty}{tx}"))
    summed = c.sum_(onnx.helper.make_node("Sum", terms, [y]))  # the chain of Adds that legalizes a Sum
    assert summed is not None
    return out + summed
