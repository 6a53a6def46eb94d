"""Exact rewrites of Resize and ConvTranspose (onnxruntime-training 1.19.2 has no CPU kernels for
``ResizeGrad`` and ``ConvTransposeGrad``).

* **Resize** (nearest, linear, cubic, with any coordinate transformation except
  ``tf_crop_and_resize``, antialias included) is linear in its input and separable: the output is
  ``X ×_k A_k`` over the resized spatial axes ``k``.  Each ``A_k`` (output size × input size) is
  obtained exactly by running onnxruntime's own Resize on a basis input (a 1-D resize of the identity
  along axis ``k``); a row with a single weight 1 (nearest) becomes a ``Gather``, the rest a
  ``MatMul``.  Resizing the batch or channel axis is refused.
* **ConvTranspose** is a stride-1 ``Conv`` of the zero-upsampled input with the flipped kernel whose
  in/out channels are swapped within each group: zeros are inserted with Reshape/Pad/Reshape, the
  padding (explicit, ``auto_pad``, ``output_shape``, ``output_padding``) becomes the Conv's pads or a
  crop.

Both rewrites are checked against onnxruntime's own kernel on a random input when they are made.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper

from ..errors import GradientError, ModelError
from .prepare import attr_int, attr_ints, attr_str
from .rewrites import Ctx, _along_axis, _gather_axis, label, refuse

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- Resize


def _resize_matrix(
    c: Ctx, n: onnx.NodeProto, rank: int, k: int, n_in: int, n_out: int, scale: float | None
) -> NDArray[Any]:
    """``A`` (n_out × n_in) of a 1-D resize along axis ``k``, from onnxruntime's own kernel."""
    from .. import runtime

    node = onnx.NodeProto()
    node.CopyFrom(n)
    keep = [a for a in node.attribute if a.name not in ("axes", "keep_aspect_ratio_policy")]
    del node.attribute[:]
    node.attribute.extend(keep)
    del node.input[:]
    in_dims = [n_in, 1] + [1] * (rank - 2)
    in_dims[k] = n_in
    inits = []
    if scale is not None:
        sc = np.ones(rank, np.float32)
        sc[k] = scale
        inits.append(helper.make_tensor("scales", TensorProto.FLOAT, [rank], sc.tolist()))
        node.input.extend(["X", "", "scales"])
    else:
        sz = [n_in, 1] + [1] * (rank - 2)
        sz[k] = n_out
        inits.append(helper.make_tensor("sizes", TensorProto.INT64, [rank], sz))
        node.input.extend(["X", "", "", "sizes"])
    del node.output[:]
    node.output.append("Y")
    g = helper.make_graph(
        [node],
        "basis",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, in_dims)],
        [onnx.ValueInfoProto(name="Y")],
    )
    g.initializer.extend(inits)
    m = helper.make_model(g, opset_imports=[o for o in c.model.opset_import if o.domain in ("", "ai.onnx")])
    m.ir_version = c.model.ir_version
    X = np.zeros(in_dims, np.float32)
    idx = [0] * rank
    for b in range(n_in):
        idx[0], idx[k] = b, b
        X[tuple(idx)] = 1.0
    what = f"the basis of the Resize rewrite of node {label(n)!r}"
    try:
        sess = runtime.session(m, what=what)
        Y = runtime.run(sess, None, {"X": X}, what=what, budget=runtime.ANALYSIS_SECONDS)[0]
    except (ModelError, GradientError) as exc:
        raise refuse(n, f"onnxruntime could not resize a basis input ({str(exc)[:200]})") from None
    Y = np.asarray(Y)
    if Y.shape[k] != n_out:
        raise refuse(n, f"a 1-D resize of axis {k} gives {Y.shape[k]} elements, the model {n_out}")
    sel: list[int | slice] = [0] * rank
    sel[0], sel[k] = slice(None), slice(None)
    # Y[b, 0, .., p, ..] = A[p, b]
    return np.asarray(Y[tuple(sel)]).T.astype(np.float64)


def resize(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, y = n.input[0], n.output[0]
    mode = attr_str(n, "coordinate_transformation_mode", "half_pixel")
    if mode == "tf_crop_and_resize":
        raise refuse(n, "Resize with coordinate_transformation_mode=tf_crop_and_resize is not rewritten")
    dims_in, dims_out = c.static(x, n), c.static(y, n)
    r = len(dims_in)
    if r < 3 or dims_in[:2] != dims_out[:2]:
        raise refuse(n, f"Resize of the batch or channel axis ({list(dims_in)} → {list(dims_out)}) is not rewritten")
    axes = attr_ints(n, "axes") or list(range(r))
    axes = [a + r if a < 0 else a for a in axes]
    scales_arr = c.array(n.input[2]) if len(n.input) > 2 and n.input[2] else None
    if scales_arr is not None and np.asarray(scales_arr).size == 0:
        scales_arr = None
    if scales_arr is None and not (len(n.input) > 3 and n.input[3]):
        raise refuse(n, "Resize has neither constant scales nor sizes")
    full = [1.0] * r
    if scales_arr is not None:
        for a, v in zip(axes, np.asarray(scales_arr, np.float64).reshape(-1), strict=True):
            full[a] = float(v)
        if any(full[a] != 1.0 for a in (0, 1)):
            raise refuse(n, f"Resize scales the batch or channel axis (scales {full})")
    nodes: list[onnx.NodeProto] = []
    cur = x
    todo = []
    for k in range(2, r):
        A = _resize_matrix(c, n, r, k, dims_in[k], dims_out[k], full[k] if scales_arr is not None else None)
        if A.shape == (dims_in[k], dims_in[k]) and np.array_equal(A, np.eye(dims_in[k])):
            continue
        todo.append((k, A))
    dtype = c.dtype_of(x)
    for j, (k, A) in enumerate(todo):
        dst = y if j == len(todo) - 1 else c.tmp(f"{y}_axis{k}")
        onehot = np.count_nonzero(A, axis=1) == 1
        if bool(np.all(onehot)) and bool(np.all(A.max(axis=1) == 1.0)):
            nodes.append(_gather_axis(c, cur, [int(i) for i in A.argmax(axis=1)], k, dst))
        elif k == r - 2:
            An = c.const(f"{y}_A{k}", A.astype(dtype))
            nodes.append(c.node("MatMul", [An, cur], [dst]))
        else:
            At = c.const(f"{y}_At{k}", np.ascontiguousarray(A.T).astype(dtype))

            def matmul(src: str, out: str, At: str = At) -> list[onnx.NodeProto]:
                return [c.node("MatMul", [src, At], [out])]

            nodes += _along_axis(c, cur, dst, k, r, matmul)
        cur = dst
    if not nodes:
        nodes.append(c.node("Identity", [x], [y]))
    return nodes


# --------------------------------------------------------------------------------- ConvTranspose


def _flipped_kernel(W: NDArray[Any], group: int) -> NDArray[Any]:
    """ConvTranspose weight ``[Cin, Cout/g, k...]`` → Conv weight ``[Cout, Cin/g, k...]``, flipped."""
    cin, coutg = W.shape[0], W.shape[1]
    k = W.shape[2:]
    Wg = W.reshape(group, cin // group, coutg, *k).swapaxes(1, 2).reshape(group * coutg, cin // group, *k)
    flip = (slice(None), slice(None)) + (slice(None, None, -1),) * len(k)
    return np.ascontiguousarray(Wg[flip])


def _flipped_kernel_nodes(c: Ctx, w: str, shape: tuple[int, ...], group: int) -> tuple[str, list[onnx.NodeProto]]:
    """:func:`_flipped_kernel` of the tensor ``w`` as Reshape/Transpose/Reshape and one reversing
    ``Gather`` per kernel axis (ops with a gradient), so that the gradient reaches ``w`` itself."""
    cin, coutg = shape[0], shape[1]
    k = list(shape[2:])
    s = len(k)
    r1, t1, cur = c.tmp(f"{w}_ct_grouped"), c.tmp(f"{w}_ct_swapped"), c.tmp(f"{w}_ct_unflipped")
    nodes = [
        c.node("Reshape", [w, c.const(f"{w}_ct_g", np.asarray([group, cin // group, coutg, *k], np.int64))], [r1]),
        c.node("Transpose", [r1], [t1], perm=[0, 2, 1, *range(3, 3 + s)]),
        c.node("Reshape", [t1, c.const(f"{w}_ct_c", np.asarray([group * coutg, cin // group, *k], np.int64))], [cur]),
    ]
    for j in range(s):
        nxt = c.tmp(f"{w}_ct_flip{j}")
        nodes.append(_gather_axis(c, cur, range(k[j] - 1, -1, -1), 2 + j, nxt))
        cur = nxt
    return cur, nodes


def conv_transpose(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, w, y = n.input[0], n.input[1], n.output[0]
    bias = n.input[2] if len(n.input) > 2 else ""
    W = c.array(w)
    if W is None:
        raise refuse(n, f"its weight {w!r} is not a constant, so it cannot be rewritten as a Conv")
    W = np.asarray(W)
    dims_in, dims_out = c.static(x, n), c.static(y, n)
    s = len(dims_in) - 2
    group = attr_int(n, "group", 1)
    kernel = list(W.shape[2:])
    strides = attr_ints(n, "strides") or [1] * s
    dil = attr_ints(n, "dilations") or [1] * s
    outpad = attr_ints(n, "output_padding") or [0] * s
    pads = attr_ints(n, "pads")
    auto = attr_str(n, "auto_pad", "NOTSET")
    k_eff = [(kernel[j] - 1) * dil[j] + 1 for j in range(s)]
    total = [strides[j] * (dims_in[2 + j] - 1) + outpad[j] + k_eff[j] - dims_out[2 + j] for j in range(s)]
    candidates: list[tuple[list[int], list[int]]] = []
    if auto in ("NOTSET", "") and attr_ints(n, "output_shape") is None:
        p = pads or [0] * (2 * s)
        candidates.append((p[:s], p[s:]))
    else:
        lo = [t // 2 for t in total]
        hi = [t - t // 2 for t in total]
        candidates += [(lo, hi), (hi, lo)] if auto != "SAME_UPPER" else [(hi, lo), (lo, hi)]
    if w in c.on_path_tensors:  # a weight being differentiated: the same permutation, as graph ops
        Wc, prep = _flipped_kernel_nodes(c, w, W.shape, group)
    else:
        Wc, prep = c.const(f"{w}_as_conv", _flipped_kernel(W, group).astype(W.dtype)), []
    last = ""
    for begin, end in candidates:
        nodes = prep + _conv_transpose_as_conv(
            c, n, x, y, bias, Wc, dims_in, kernel, strides, dil, outpad, group, begin, end
        )
        err = c.check(n, nodes)
        if err is None:
            return nodes
        last = err
    raise refuse(n, f"the rewrite as a Conv does not reproduce onnxruntime's output ({last}); please report this model")


def _conv_transpose_as_conv(
    c: Ctx,
    n: onnx.NodeProto,
    x: str,
    y: str,
    bias: str,
    Wc: str,
    dims_in: tuple[int, ...],
    kernel: list[int],
    strides: list[int],
    dil: list[int],
    outpad: list[int],
    group: int,
    begin: list[int],
    end: list[int],
) -> list[onnx.NodeProto]:
    s = len(dims_in) - 2
    N, C = dims_in[0], dims_in[1]
    sp = list(dims_in[2:])
    k_eff = [(kernel[j] - 1) * dil[j] + 1 for j in range(s)]
    left = [k_eff[j] - 1 - begin[j] for j in range(s)]
    right = [k_eff[j] - 1 - end[j] + outpad[j] for j in range(s)]
    L = [(sp[j] - 1) * strides[j] + 1 for j in range(s)]
    nodes: list[onnx.NodeProto] = []
    cur = x
    if any(st > 1 for st in strides):
        inter = [N, C] + [v for j in range(s) for v in (sp[j], 1)]
        r1, pd, r2 = c.tmp(f"{y}_ct_split"), c.tmp(f"{y}_ct_zeros"), c.tmp(f"{y}_ct_up")
        pad_end = [0, 0] + [v for j in range(s) for v in (0, strides[j] - 1)]
        nodes += [
            c.node("Reshape", [cur, c.const(f"{y}_ct_s1", np.asarray(inter, np.int64))], [r1]),
            c.node("Pad", [r1, c.const(f"{y}_ct_pads", np.asarray([0] * len(inter) + pad_end, np.int64))], [pd]),
            c.node(
                "Reshape",
                [pd, c.const(f"{y}_ct_s2", np.asarray([N, C] + [sp[j] * strides[j] for j in range(s)], np.int64))],
                [r2],
            ),
        ]
        cur = r2
        full = [sp[j] * strides[j] for j in range(s)]
    else:
        full = sp
    starts = [max(0, -left[j]) for j in range(s)]
    ends = [L[j] - max(0, -right[j]) for j in range(s)]
    if any(st != 0 for st in starts) or any(e != f for e, f in zip(ends, full, strict=True)):
        sl = c.tmp(f"{y}_ct_crop")
        nodes.append(
            c.node(
                "Slice",
                [
                    cur,
                    c.const(f"{y}_ct_starts", np.asarray(starts, np.int64)),
                    c.const(f"{y}_ct_ends", np.asarray(ends, np.int64)),
                    c.const(f"{y}_ct_axes", np.asarray(list(range(2, 2 + s)), np.int64)),
                ],
                [sl],
            )
        )
        cur = sl
    conv_pads = [max(0, v) for v in left] + [max(0, v) for v in right]
    ins = [cur, Wc] + ([bias] if bias else [])
    nodes.append(
        c.node("Conv", ins, [y], dilations=dil, group=group, pads=conv_pads, strides=[1] * s, kernel_shape=kernel)
    )
    return nodes


__all__ = ["conv_transpose", "resize"]
