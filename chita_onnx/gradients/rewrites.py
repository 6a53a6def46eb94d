"""Exact rewrites of ops that onnxruntime-training 1.19.2 cannot differentiate on CPU.

Each rule replaces one node by nodes that compute the same function with ops that have a working
gradient (checked by tests/test_rewrites.py against float64 finite differences).  Rules run on the
gradient working copy only, and only on nodes between a weight being differentiated and the loss.
Which ops lack a gradient was measured, not assumed (docs/ort-gradients.md §7 and the probes in the
tests): no gradient builder for Reciprocal's relatives Softplus/Softsign/Selu/Celu/PRelu/
ThresholdedRelu/Mish/Mean/ReduceMax/ReduceMin/ReduceL1/ReduceSumSquare/DepthToSpace/SpaceToDepth/
LpNormalization/GroupNormalization/MeanVarianceNormalization/CumSum/LSTM/GRU/RNN/LRN/Floor/Ceil/Round/
Sign and com.microsoft's SkipLayerNormalization/FusedMatMul; builders but no CPU kernels for
ConvTranspose and Resize; a run-time failure for Slice with negative steps and for Pad in reflect/
edge mode; a build failure for Pow with an integer exponent or an exponent on the path.

Structural rewrites (Resize, ConvTranspose, the recurrent ops) are checked numerically against
onnxruntime's own kernel on a random input when they are made (:meth:`Ctx.verify`): a mismatch is a
:class:`~chita_onnx.errors.UnsupportedOpError`, never a silently wrong gradient.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

from ..errors import GradientError, ModelError, UnsupportedOpError
from .prepare import (
    _DEFAULT_DOMAINS,
    _reduce,
    _Rewriter,
    attr_float,
    attr_int,
    attr_ints,
    attr_str,
    differentiable_nodes,
)

log = logging.getLogger(__name__)

Rule = Callable[["Ctx", onnx.NodeProto], "list[onnx.NodeProto] | None"]

#: Relative tolerance of the numerical check of structural rewrites against onnxruntime.
VERIFY_RTOL = 1e-4


def label(n: onnx.NodeProto) -> str:
    return n.name or f"<{n.op_type}>"


def op_key(n: onnx.NodeProto) -> str:
    """``op_type`` for the default domain, ``domain.op_type`` otherwise."""
    return n.op_type if n.domain in _DEFAULT_DOMAINS else f"{n.domain}.{n.op_type}"


def refuse(n: onnx.NodeProto, why: str) -> UnsupportedOpError:
    """The one-line refusal of a node that an exact rewrite cannot take."""
    return UnsupportedOpError(f"cannot differentiate op {n.op_type} (node {label(n)!r}): {why}")


def attribute_refusal(n: onnx.NodeProto) -> str | None:
    """Why the exact rewrite of ``n``'s op refuses it for its attributes alone (None: it does not).
    The rules raise it; ``inspect --check`` reports it before any data or shape is known."""
    key = op_key(n)
    if key in ("ScatterND", "ScatterElements"):
        reduction = attr_str(n, "reduction", "none")
        if reduction not in ("none", "add"):
            return (
                f"reduction={reduction!r} has no correct gradient in onnxruntime-training 1.19.2 and no exact "
                "rewrite (reduction 'none' and 'add' do)"
            )
    elif key == "GridSample":
        mode, padding = attr_str(n, "mode", "bilinear"), attr_str(n, "padding_mode", "zeros")
        if mode not in ("bilinear", "linear", "nearest"):
            return f"mode={mode!r} is not rewritten (bilinear/linear and nearest are)"
        if padding not in ("zeros", "border", "reflection"):
            return f"padding_mode={padding!r} is not rewritten (zeros, border and reflection are)"
    return None


class Ctx(_Rewriter):
    """The rewrite context: fresh names, constants, static shapes (see :class:`_Rewriter`);
    ``on_path_tensors`` are the tensors that carry a gradient, ``rules_used`` counts named variants."""

    def __post_init__(self) -> None:
        super().__post_init__()
        self.on_path_tensors: set[str] = set()
        self.rules_used: Counter[str] = Counter()

    def static(self, name: str, n: onnx.NodeProto) -> tuple[int, ...]:
        """The fully static shape of ``name``, or an :class:`UnsupportedOpError` naming ``n``."""
        dims = self.dims(name)
        if dims is None or any(d is None for d in dims):
            raise UnsupportedOpError(
                f"cannot rewrite op {n.op_type} (node {label(n)!r}) for gradients: the shape of its input "
                f"{name!r} is not static ({None if dims is None else list(dims)})"
            )
        return tuple(int(d) for d in dims if d is not None)

    def dtype_of(self, name: str) -> np.dtype[Any]:
        return self._dtype(name)

    def scalar(self, base: str, value: float, like: str) -> str:
        return self.const(base, np.asarray(value, self.dtype_of(like)))

    def reduce(self, op: str, x: str, axes: Sequence[int], keepdims: int, out: str) -> onnx.NodeProto:
        return _reduce(op, x, list(axes), keepdims, out, self.opset, self.model.graph, self.names)

    def int_input(self, n: onnx.NodeProto, k: int) -> list[int] | None:
        """Input ``k`` of ``n`` as a list of ints when it is a constant (``None`` when absent)."""
        if len(n.input) <= k or not n.input[k]:
            return None
        arr = self.array(n.input[k])
        if arr is None:
            raise UnsupportedOpError(
                f"cannot rewrite op {n.op_type} (node {label(n)!r}) for gradients: its input {n.input[k]!r} "
                "is not a constant of the working copy"
            )
        return [int(v) for v in np.asarray(arr).reshape(-1)]

    def verify(self, n: onnx.NodeProto, nodes: Sequence[onnx.NodeProto]) -> None:
        """:meth:`check`, raising :class:`UnsupportedOpError` on a mismatch."""
        err = self.check(n, nodes)
        if err is not None:
            raise UnsupportedOpError(
                f"cannot rewrite op {n.op_type} (node {label(n)!r}) for gradients: {err}; please report this model"
            )

    def check(self, n: onnx.NodeProto, nodes: Sequence[onnx.NodeProto]) -> str | None:
        """Run ``n`` and its replacement ``nodes`` in onnxruntime on one random input; the reason they
        differ (more than :data:`VERIFY_RTOL` of the output's scale), or ``None``."""
        from .. import runtime

        g = self.model.graph
        inits = {t.name: t for t in g.initializer}
        rng = np.random.default_rng(0)
        outs = [o for o in n.output if o]
        produced: set[str] = set()
        needed: list[str] = []
        for x in nodes:
            needed += [i for i in x.input if i and i not in produced]
            produced.update(x.output)
        needed += [i for i in n.input if i]
        feeds: dict[str, NDArray[Any]] = {}
        init_list: list[TensorProto] = []
        inputs: list[onnx.ValueInfoProto] = []
        for name in dict.fromkeys(needed):
            if name in inits:
                init_list.append(inits[name])
                continue
            shape = self.dims(name)
            elem = self.table.get(name, (TensorProto.FLOAT, None))[0]
            if shape is None or any(d is None for d in shape) or elem not in (TensorProto.FLOAT, TensorProto.DOUBLE):
                log.debug("node %r: rewrite not verified (input %r is not a static float tensor)", label(n), name)
                return None
            dims = [int(d) for d in shape if d is not None]
            feeds[name] = rng.standard_normal(dims).astype(helper.tensor_dtype_to_np_dtype(elem))
            inputs.append(helper.make_tensor_value_info(name, elem, dims))

        what = f"a check of the rewrite of node {label(n)!r}"

        def run(body: Sequence[onnx.NodeProto]) -> list[NDArray[Any]]:
            graph = helper.make_graph(list(body), "verify", inputs, [onnx.ValueInfoProto(name=o) for o in outs])
            graph.initializer.extend(init_list)
            model = helper.make_model(graph, opset_imports=list(self.model.opset_import))
            model.ir_version = self.model.ir_version
            sess = runtime.session(model, what=what, optimize=False)
            values = runtime.run(sess, outs, feeds, what=what, budget=runtime.ANALYSIS_SECONDS)
            return [np.asarray(v, np.float64) for v in values]

        try:
            want = run([n])
        except (ModelError, GradientError) as exc:  # a timeout (ResourceError) or a signal goes on up
            log.debug("node %r: rewrite not verified (onnxruntime cannot run it alone: %s)", label(n), exc)
            return None
        try:
            got = run(nodes)
        except (ModelError, GradientError) as exc:
            return f"the rewrite fails to run in onnxruntime ({str(exc)[:300]})"
        for o, a, b in zip(outs, want, got, strict=True):
            scale = max(1.0, float(np.abs(a).max(initial=0.0)))
            err = float(np.abs(a - b).max(initial=0.0)) if a.shape == b.shape else math.inf
            if not err <= VERIFY_RTOL * scale:
                return (
                    f"the exact rewrite does not reproduce onnxruntime's output {o!r} (max error {err:.3g}, "
                    f"shapes {a.shape} vs {b.shape})"
                )
        return None


# ----------------------------------------------------------------------------- elementwise rules


def reciprocal(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x = n.input[0]
    return [c.node("Div", [c.scalar(f"{x}_one", 1.0, x), x], [n.output[0]])]


def cast_like(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """``CastLike(x, like)`` → ``Cast(x, to=type of like)``: ``like`` gives only its element type (torch's
    dynamo exporter without its optimizer writes ``CastLike(constant, activation)`` for the bounds of
    ReLU6's Clip, which put an op with no gradient on every path).  Left alone when the type is unknown."""
    like = n.input[1]
    if like not in c.table:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}  # saturate (opset 19)
    return [c.node("Cast", [n.input[0]], [n.output[0]], to=c.table[like][0], **attrs)]


def _gelu(c: Ctx, x: str, y: str, approximate: str) -> list[onnx.NodeProto]:
    """``y = ½·x·(1 + erf(x/√2))``, or the tanh form ``½·x·(1 + tanh(√(2/π)·(x + 0.044715·x³)))``."""
    half, one = c.scalar(f"{y}_half", 0.5, x), c.scalar(f"{y}_one", 1.0, x)
    t = [c.tmp(f"{y}_gelu_{k}") for k in range(6)]
    if approximate == "tanh":
        k3 = c.scalar(f"{y}_k3", 0.044715, x)
        s = c.scalar(f"{y}_s", math.sqrt(2.0 / math.pi), x)
        core = [
            c.node("Mul", [x, x], [t[0]]),
            c.node("Mul", [t[0], x], [t[1]]),
            c.node("Mul", [t[1], k3], [t[2]]),
            c.node("Add", [x, t[2]], [t[3]]),
            c.node("Mul", [t[3], s], [t[4]]),
            c.node("Tanh", [t[4]], [t[5]]),
        ]
    else:
        r2 = c.scalar(f"{y}_rsqrt2", 1.0 / math.sqrt(2.0), x)
        core = [c.node("Mul", [x, r2], [t[4]]), c.node("Erf", [t[4]], [t[5]])]
    a, b = c.tmp(f"{y}_gelu_a"), c.tmp(f"{y}_gelu_b")
    return [*core, c.node("Add", [t[5], one], [a]), c.node("Mul", [x, a], [b]), c.node("Mul", [b, half], [y])]


def gelu(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    return _gelu(c, n.input[0], n.output[0], attr_str(n, "approximate", "none"))


def ms_gelu(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """com.microsoft Gelu / BiasGelu (erf form) and FastGelu (tanh form), with the optional bias."""
    x, y = n.input[0], n.output[0]
    pre: list[onnx.NodeProto] = []
    if len(n.input) > 1 and n.input[1]:
        xb = c.tmp(f"{y}_biased")
        pre.append(c.node("Add", [x, n.input[1]], [xb]))
        x = xb
    return [*pre, *_gelu(c, x, y, "tanh" if n.op_type == "FastGelu" else "none")]


def quick_gelu(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, y = n.input[0], n.output[0]
    ax, s = c.tmp(f"{y}_ax"), c.tmp(f"{y}_sig")
    alpha = c.scalar(f"{y}_alpha", attr_float(n, "alpha", 1.702), x)
    return [c.node("Mul", [x, alpha], [ax]), c.node("Sigmoid", [ax], [s]), c.node("Mul", [x, s], [y])]


def softplus(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``log(1 + eˣ) = relu(x) + log(1 + e^−|x|)`` (no overflow)."""
    x, y = n.input[0], n.output[0]
    r, a, na, e, p, lg = (c.tmp(f"{y}_sp_{k}") for k in ("relu", "abs", "neg", "exp", "1p", "log"))
    one = c.scalar(f"{y}_one", 1.0, x)
    return [
        c.node("Relu", [x], [r]),
        c.node("Abs", [x], [a]),
        c.node("Neg", [a], [na]),
        c.node("Exp", [na], [e]),
        c.node("Add", [e, one], [p]),
        c.node("Log", [p], [lg]),
        c.node("Add", [r, lg], [y]),
    ]


def softsign(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, y = n.input[0], n.output[0]
    a, d = c.tmp(f"{y}_abs"), c.tmp(f"{y}_den")
    return [
        c.node("Abs", [x], [a]),
        c.node("Add", [a, c.scalar(f"{y}_one", 1.0, x)], [d]),
        c.node("Div", [x, d], [y]),
    ]


def mish(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, y = n.input[0], n.output[0]
    sp, t = c.tmp(f"{y}_softplus"), c.tmp(f"{y}_tanh")
    inner = onnx.NodeProto()
    inner.CopyFrom(helper.make_node("Softplus", [x], [sp]))
    return [*softplus(c, inner), c.node("Tanh", [sp], [t]), c.node("Mul", [x, t], [y])]


def _exp_branch(c: Ctx, x: str, y: str, scale: float) -> tuple[list[onnx.NodeProto], str]:
    """``exp(min(x, 0)·scale) − 1`` (the min keeps the unselected branch finite)."""
    mn, sc, ex, em = (c.tmp(f"{y}_{k}") for k in ("min", "sc", "exp", "em1"))
    nodes = [c.node("Min", [x, c.scalar(f"{y}_zero", 0.0, x)], [mn])]
    src = mn
    if scale != 1.0:
        nodes.append(c.node("Mul", [mn, c.scalar(f"{y}_k", scale, x)], [sc]))
        src = sc
    nodes += [c.node("Exp", [src], [ex]), c.node("Sub", [ex, c.scalar(f"{y}_one", 1.0, x)], [em])]
    return nodes, em


def selu(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, y = n.input[0], n.output[0]
    alpha = attr_float(n, "alpha", 1.67326319217681884765625)
    gamma = attr_float(n, "gamma", 1.05070102214813232421875)
    nodes, em = _exp_branch(c, x, y, 1.0)
    pos, neg, sel = c.tmp(f"{y}_pos"), c.tmp(f"{y}_neg"), c.tmp(f"{y}_sel")
    return [
        *nodes,
        c.node("Greater", [x, c.scalar(f"{y}_zero0", 0.0, x)], [pos]),
        c.node("Mul", [em, c.scalar(f"{y}_alpha", alpha, x)], [neg]),
        c.node("Where", [pos, x, neg], [sel]),
        c.node("Mul", [sel, c.scalar(f"{y}_gamma", gamma, x)], [y]),
    ]


def celu(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``max(0, x) + min(0, α·(exp(x/α) − 1))``."""
    x, y = n.input[0], n.output[0]
    alpha = attr_float(n, "alpha", 1.0)
    nodes, em = _exp_branch(c, x, y, 1.0 / alpha)
    r, neg = c.tmp(f"{y}_relu"), c.tmp(f"{y}_neg")
    return [
        *nodes,
        c.node("Relu", [x], [r]),
        c.node("Mul", [em, c.scalar(f"{y}_alpha", alpha, x)], [neg]),
        c.node("Add", [r, neg], [y]),
    ]


def prelu(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """``max(x, 0) + slope·min(x, 0)`` (slope broadcast as in PRelu)."""
    x, slope, y = n.input[0], n.input[1], n.output[0]
    zero = c.scalar(f"{y}_zero", 0.0, x)
    p, m, s = c.tmp(f"{y}_pos"), c.tmp(f"{y}_negpart"), c.tmp(f"{y}_scaled")
    return [
        c.node("Max", [x, zero], [p]),
        c.node("Min", [x, zero], [m]),
        c.node("Mul", [m, slope], [s]),
        c.node("Add", [p, s], [y]),
    ]


def thresholded_relu(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, y = n.input[0], n.output[0]
    gt = c.tmp(f"{y}_gt")
    return [
        c.node("Greater", [x, c.scalar(f"{y}_alpha", attr_float(n, "alpha", 1.0), x)], [gt]),
        c.node("Where", [gt, x, c.scalar(f"{y}_zero", 0.0, x)], [y]),
    ]


def mean(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    ins = [i for i in n.input if i]
    y = n.output[0]
    out: list[onnx.NodeProto] = []
    acc = ins[0]
    for k, nxt in enumerate(ins[1:], start=1):
        dst = c.tmp(f"{y}_sum{k}")
        out.append(c.node("Add", [acc, nxt], [dst]))
        acc = dst
    out.append(c.node("Div", [acc, c.scalar(f"{y}_count", float(len(ins)), ins[0])], [y]))
    return out


def piecewise_constant(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Floor/Ceil/Round: zero gradient almost everywhere.  The value goes through an int64 Cast,
    which onnxruntime does not differentiate, so the gradient is exactly zero (exact for
    ``|x| < 2⁶³``)."""
    x, y = n.input[0], n.output[0]
    v, i = c.tmp(f"{y}_value"), c.tmp(f"{y}_int")
    inner = onnx.NodeProto()
    inner.CopyFrom(n)
    inner.output[0] = v
    return [
        inner,
        c.node("Cast", [v], [i], to=TensorProto.INT64),
        c.node("Cast", [i], [y], to=c.table.get(x, (TensorProto.FLOAT, None))[0]),
    ]


def shrink(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Shrink → ``[x > λ]·(x − bias) + [x < −λ]·(x + bias)`` (the masks through Casts of comparisons)."""
    x, y = n.input[0], n.output[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    lambd, bias = float(attrs.get("lambd", 0.5)), float(attrs.get("bias", 0.0))
    elem = c.table.get(x, (TensorProto.FLOAT, None))[0]
    gt, lt, mg, ml, lo, hi, a, b = (c.tmp(f"{y}_{k}") for k in ("gt", "lt", "mg", "ml", "lo", "hi", "a", "b"))
    return [
        c.node("Greater", [x, c.scalar(f"{y}_lambd", lambd, x)], [gt]),
        c.node("Less", [x, c.scalar(f"{y}_neg_lambd", -lambd, x)], [lt]),
        c.node("Cast", [gt], [mg], to=elem),
        c.node("Cast", [lt], [ml], to=elem),
        c.node("Sub", [x, c.scalar(f"{y}_bias", bias, x)], [hi]),
        c.node("Add", [x, c.scalar(f"{y}_bias_add", bias, x)], [lo]),
        c.node("Mul", [mg, hi], [a]),
        c.node("Mul", [ml, lo], [b]),
        c.node("Add", [a, b], [y]),
    ]


def fmod(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """Mod with ``fmod=1`` on floats → ``x − trunc(x / m)·m`` (C's fmod: the sign of ``x``); the
    quotient is truncated through an int64 Cast, which carries no gradient."""
    x, m, y = n.input[0], n.input[1], n.output[0]
    if not np.issubdtype(c.dtype_of(x), np.floating) or attr_int(n, "fmod", 0) != 1:
        return None  # integer Mod (not on a gradient path); fmod=0 is not defined for floats
    q, qi, qf, t = (c.tmp(f"{y}_{k}") for k in ("q", "qi", "qf", "t"))
    elem = c.table.get(x, (TensorProto.FLOAT, None))[0]
    return [
        c.node("Div", [x, m], [q]),
        c.node("Cast", [q], [qi], to=TensorProto.INT64),  # truncates toward zero
        c.node("Cast", [qi], [qf], to=elem),
        c.node("Mul", [qf, m], [t]),
        c.node("Sub", [x, t], [y]),
    ]


def sign(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, y = n.input[0], n.output[0]
    elem = c.table.get(x, (TensorProto.FLOAT, None))[0]
    zero = c.scalar(f"{y}_zero", 0.0, x)
    gt, lt, a, b = (c.tmp(f"{y}_{k}") for k in ("gt", "lt", "pos", "neg"))
    return [
        c.node("Greater", [x, zero], [gt]),
        c.node("Less", [x, zero], [lt]),
        c.node("Cast", [gt], [a], to=elem),
        c.node("Cast", [lt], [b], to=elem),
        c.node("Sub", [a, b], [y]),
    ]


def pow_(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """Pow with an integer exponent → the same exponent as a float constant.  An exponent that
    depends on the weights is refused (onnxruntime builds no gradient for it, and ``exp(b·log a)``
    is wrong for ``a ≤ 0``)."""
    x, e = n.input[0], n.input[1]
    if e in c.on_path_tensors:
        raise UnsupportedOpError(
            f"cannot differentiate op Pow (node {label(n)!r}) with respect to its exponent {e!r}: "
            "onnxruntime-training has no gradient for it; pass --output to stop before this node"
        )
    arr = c.array(e)
    elem = c.table.get(e, (TensorProto.FLOAT, None))[0]
    if arr is None or elem in (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16):
        return None
    ef = c.const(f"{e}_float", np.asarray(arr).astype(c.dtype_of(x)))
    return [c.node("Pow", [x, ef], [n.output[0]])]


# ------------------------------------------------------------------------------ shape-like rules


def split(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """Split → one Slice per used output (exact; avoids onnxruntime's run-time failure with unused
    outputs and its wrong sizes for an uneven ``num_outputs``)."""
    x = n.input[0]
    dims = c.static(x, n)
    axis = attr_int(n, "axis", 0)
    axis = axis + len(dims) if axis < 0 else axis
    total = dims[axis]
    k = len(n.output)
    sizes = c.int_input(n, 1)
    if sizes is None:
        sizes = attr_ints(n, "split")
    if sizes is None:
        step = -(-total // k)
        sizes = [min(step, max(0, total - i * step)) for i in range(k)]
    if len(sizes) != k or sum(sizes) != total:
        raise UnsupportedOpError(f"Split node {label(n)!r}: sizes {sizes} do not split {total} into {k} outputs")
    out: list[onnx.NodeProto] = []
    start = 0
    for o, sz in zip(n.output, sizes, strict=True):
        if c.used(o):
            st = c.const(f"{o}_starts", np.asarray([start], np.int64))
            en = c.const(f"{o}_ends", np.asarray([start + sz], np.int64))
            ax = c.const(f"{o}_axes", np.asarray([axis], np.int64))
            out.append(c.node("Slice", [x, st, en, ax], [o]))
        start += sz
    return out


def _gather_axis(c: Ctx, x: str, idx: Sequence[int], axis: int, y: str) -> onnx.NodeProto:
    ind = c.const(f"{y}_idx", np.asarray(list(idx), np.int64))
    return c.node("Gather", [x, ind], [y], axis=axis)


def slice_(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """Slice with a negative step (SliceGrad fails at run time) → Gather with the selected indices."""
    steps = c.int_input(n, 4)
    if steps is None or all(s > 0 for s in steps):
        return None
    x = n.input[0]
    dims = c.static(x, n)
    starts, ends = c.int_input(n, 1) or [], c.int_input(n, 2) or []
    axes = c.int_input(n, 3) or list(range(len(starts)))
    out: list[onnx.NodeProto] = []
    cur = x
    for k, (a, st, en, sp) in enumerate(zip(axes, starts, ends, steps, strict=True)):
        a = a + len(dims) if a < 0 else a
        idx = list(range(dims[a]))[slice(st, en, sp)]  # Python's slice clamps like ONNX's Slice
        dst = n.output[0] if k == len(axes) - 1 else c.tmp(f"{n.output[0]}_ax{a}")
        out.append(_gather_axis(c, cur, idx, a, dst))
        cur = dst
    return out


def pad(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """Pad in reflect/edge/wrap mode → Gathers with the padded index maps (PadGrad only supports
    constant mode)."""
    mode = attr_str(n, "mode", "constant")
    if mode == "constant":
        return None
    x = n.input[0]
    dims = c.static(x, n)
    r = len(dims)
    pads = c.int_input(n, 1)
    if pads is None:
        pads = attr_ints(n, "pads") or [0] * (2 * r)
    axes = c.int_input(n, 3) or list(range(r))
    axes = [a + r if a < 0 else a for a in axes]
    out: list[onnx.NodeProto] = []
    cur = x
    todo = [(a, pads[k], pads[k + len(axes)]) for k, a in enumerate(axes) if pads[k] or pads[k + len(axes)]]
    for j, (a, b, e) in enumerate(todo):
        size = dims[a]
        pos = np.arange(-b, size + e)
        if mode == "edge":
            idx = np.clip(pos, 0, size - 1)
        elif mode == "wrap":
            idx = np.mod(pos, size)
        else:  # reflect
            if size == 1:
                idx = np.zeros_like(pos)
            else:
                period = 2 * (size - 1)
                m = np.mod(pos, period)
                idx = np.where(m < size, m, period - m)
        dst = n.output[0] if j == len(todo) - 1 else c.tmp(f"{n.output[0]}_pad{a}")
        out.append(_gather_axis(c, cur, [int(i) for i in idx], a, dst))
        cur = dst
    if not out:
        out.append(c.node("Identity", [x], [n.output[0]]))
    return out


def depth_space(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """DepthToSpace (DCR/CRD) and SpaceToDepth → Reshape/Transpose/Reshape."""
    x, y = n.input[0], n.output[0]
    N, C, H, W = c.static(x, n)
    b = attr_int(n, "blocksize", 1)
    if n.op_type == "SpaceToDepth":
        s1, perm, s2 = [N, C, H // b, b, W // b, b], [0, 3, 5, 1, 2, 4], [N, C * b * b, H // b, W // b]
    elif attr_str(n, "mode", "DCR") == "CRD":
        s1, perm, s2 = [N, C // (b * b), b, b, H, W], [0, 1, 4, 2, 5, 3], [N, C // (b * b), H * b, W * b]
    else:
        s1, perm, s2 = [N, b, b, C // (b * b), H, W], [0, 3, 4, 1, 5, 2], [N, C // (b * b), H * b, W * b]
    t1, t2 = c.tmp(f"{y}_r1"), c.tmp(f"{y}_t")
    return [
        c.node("Reshape", [x, c.const(f"{y}_s1", np.asarray(s1, np.int64))], [t1]),
        c.node("Transpose", [t1], [t2], perm=perm),
        c.node("Reshape", [t2, c.const(f"{y}_s2", np.asarray(s2, np.int64))], [y]),
    ]


def _einsum_terms(equation: str, ranks: Sequence[int]) -> tuple[list[str], str] | None:
    """The operand and output index strings of an Einsum ``equation`` with every ``...`` spelled out
    (upper-case letters, aligned from the right as NumPy broadcasts them) and the implicit output made
    explicit (the indices used once, sorted; the ellipsis first).  None when an operand repeats an
    index (a diagonal) or the equation does not fit ``ranks``."""
    eq = equation.replace(" ", "")
    lhs, arrow, out = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks) or any(not ch.isalpha() for t in terms for ch in t.replace("...", "")):
        return None
    spare = [ch for ch in "ZYXWVUTSRQPONMLKJIHGFEDCBA" if ch not in eq]
    widest = max((r - len(t.replace("...", "")) for t, r in zip(terms, ranks, strict=True) if "..." in t), default=0)
    if widest < 0 or widest > len(spare):
        return None
    ell = "".join(reversed(spare[:widest]))  # the ellipsis' letters, outermost first
    spelled: list[str] = []
    for t, r in zip(terms, ranks, strict=True):
        if "..." in t:
            k = r - len(t.replace("...", ""))
            if k < 0:
                return None
            t = t.replace("...", ell[widest - k :])
        if len(t) != r or len(set(t)) != len(t):
            return None
        spelled.append(t)
    if arrow:
        out = out.replace("...", ell)
    else:
        counts = Counter("".join(spelled))
        out = ell + "".join(sorted(ch for ch, k in counts.items() if k == 1 and ch not in ell))
    if len(set(out)) != len(out) or any(ch not in "".join(spelled) for ch in out):
        return None
    return spelled, out


def einsum(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """Einsum of one or two operands (onnxruntime-training has no gradient for it) → ReduceSum over
    the indices only one operand has, Transposes and Reshapes to ``[batch…, rows, contracted]`` and
    ``[batch…, contracted, columns]``, one MatMul, and a Reshape/Transpose to the output's order.
    Exact (the same sums of products).  Kept as it is (and refused later) for a diagonal, more than
    two operands, or an index whose sizes differ between the operands (broadcasting)."""
    ins = [i for i in n.input]
    if not 1 <= len(ins) <= 2 or not all(ins):
        return None
    shapes = [c.static(x, n) for x in ins]
    parsed = _einsum_terms(attr_str(n, "equation", ""), [len(d) for d in shapes])
    if parsed is None:
        return None
    terms, out = parsed
    size: dict[str, int] = {}
    for t, dims in zip(terms, shapes, strict=True):
        for ch, dim in zip(t, dims, strict=True):
            if size.setdefault(ch, dim) != dim:
                return None
    y = n.output[0]
    nodes: list[onnx.NodeProto] = []

    def transpose(x: str, have: str, want: str, tag: str) -> str:
        if have == want:
            return x
        t = c.tmp(f"{y}_{tag}")
        nodes.append(c.node("Transpose", [x], [t], perm=[have.index(ch) for ch in want]))
        return t

    def reshape(x: str, dims: Sequence[int], tag: str) -> str:
        t = c.tmp(f"{y}_{tag}")
        nodes.append(c.node("Reshape", [x, c.const(f"{y}_{tag}_shape", np.asarray(list(dims), np.int64))], [t]))
        return t

    def summed(x: str, t: str, keep: str, tag: str) -> tuple[str, str]:
        """``x`` (indices ``t``) summed over the indices not in ``keep``."""
        gone = [k for k, ch in enumerate(t) if ch not in keep]
        if not gone:
            return x, t
        r = c.tmp(f"{y}_{tag}")
        nodes.append(c.reduce("ReduceSum", x, gone, 0, r))
        return r, "".join(ch for ch in t if ch in keep)

    def finish(x: str, t: str) -> list[onnx.NodeProto]:
        """``x`` (indices ``t``, the output's in some order) into ``y`` in the output's order."""
        if t == out:  # also a scalar: Transpose has no empty permutation
            nodes.append(c.node("Identity", [x], [y]))
        else:
            nodes.append(c.node("Transpose", [x], [y], perm=[t.index(ch) for ch in out]))
        return nodes

    if len(ins) == 1:
        return finish(*summed(ins[0], terms[0], out, "sum"))
    ta, tb = terms
    a, ta = summed(ins[0], ta, tb + out, "suma")
    b, tb = summed(ins[1], tb, ta + out, "sumb")
    batch = "".join(ch for ch in out if ch in ta and ch in tb)
    rows = "".join(ch for ch in ta if ch not in tb)
    cols = "".join(ch for ch in tb if ch not in ta)
    inner = "".join(ch for ch in ta if ch in tb and ch not in out)

    def prod(chs: str) -> int:
        return int(np.prod([size[ch] for ch in chs], dtype=np.int64))

    bd = [size[ch] for ch in batch]
    a2 = reshape(transpose(a, ta, batch + rows + inner, "ta"), [*bd, prod(rows), prod(inner)], "ra")
    b2 = reshape(transpose(b, tb, batch + inner + cols, "tb"), [*bd, prod(inner), prod(cols)], "rb")
    mm = c.tmp(f"{y}_mm")
    nodes.append(c.node("MatMul", [a2, b2], [mm]))
    full = batch + rows + cols
    return finish(reshape(mm, [size[ch] for ch in full], "rr"), full)


def cumsum(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """CumSum along a static axis → MatMul with a (strictly, for ``exclusive``) triangular matrix."""
    x, y = n.input[0], n.output[0]
    dims = c.static(x, n)
    ax = c.int_input(n, 1)
    a = int(ax[0]) if ax else 0
    r = len(dims)
    a = a + r if a < 0 else a
    L = dims[a]
    exclusive, reverse = attr_int(n, "exclusive", 0), attr_int(n, "reverse", 0)
    # y[..., j] = Σ_i x[..., i]·T[i, j]
    ones = np.ones((L, L))
    T = np.tril(ones, k=-exclusive) if reverse else np.triu(ones, k=exclusive)
    Tn = c.const(f"{y}_tri", T.astype(c.dtype_of(x)))
    return _along_axis(c, x, y, a, r, lambda src, dst: [c.node("MatMul", [src, Tn], [dst])])


def scatter(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """ScatterND / ScatterElements.  Without ``reduction`` onnxruntime's own gradient is right (kept).
    Its gradient builder ignores ``reduction``, though (the data's gradient is zeroed where the
    updates land, as for an overwrite), so ``reduction="add"`` becomes
    ``data + Scatter(zeros, indices, updates, reduction="add")``: the data's gradient passes whole
    through the ``Add`` and the updates' is the gather of the output's gradient, as the builder
    computes it.  ``mul``/``max``/``min`` are refused."""
    why = attribute_refusal(n)
    if why is not None:
        raise refuse(n, why)
    if attr_str(n, "reduction", "none") == "none":
        return None
    data, y = n.input[0], n.output[0]
    src = c.producers.get(data)
    if src is not None and src.op_type == "ConstantOfShape":
        return None  # constant data (this rewrite's own scatter, in the next round): no data gradient
    shape, zeros, added = c.tmp(f"{y}_shape"), c.tmp(f"{y}_zeros"), c.tmp(f"{y}_scattered")
    inner = onnx.NodeProto()
    inner.CopyFrom(n)
    inner.input[0] = zeros
    inner.output[0] = added
    inner.name = c.names(f"{y}_{n.op_type}")
    zero = numpy_helper.from_array(np.zeros(1, c.dtype_of(data)), "value")
    return [
        c.node("Shape", [data], [shape]),
        c.node("ConstantOfShape", [shape], [zeros], value=zero),
        inner,
        c.node("Add", [data, added], [y]),
    ]


def _along_axis(
    c: Ctx, x: str, y: str, a: int, r: int, body: Callable[[str, str], list[onnx.NodeProto]]
) -> list[onnx.NodeProto]:
    """Apply ``body`` (which acts on the last axis) to axis ``a``, transposing around it."""
    if a == r - 1:
        return body(x, y)
    perm = [i for i in range(r) if i != a] + [a]
    inv = [perm.index(i) for i in range(r)]
    t, u = c.tmp(f"{y}_to_last"), c.tmp(f"{y}_last")
    return [c.node("Transpose", [x], [t], perm=perm), *body(t, u), c.node("Transpose", [u], [y], perm=inv)]


# --------------------------------------------------------------------------------- normalisation


def _normalize(c: Ctx, x: str, y: str, axes: Sequence[int], eps: float, center: bool = True) -> list[onnx.NodeProto]:
    """``(x − mean)/√(var + ε)`` over ``axes`` (population variance)."""
    mean_, d, dd, var, ve, sd = (c.tmp(f"{y}_{k}") for k in ("mean", "d", "dd", "var", "ve", "sd"))
    nodes: list[onnx.NodeProto] = []
    src = x
    if center:
        nodes += [c.reduce("ReduceMean", x, axes, 1, mean_), c.node("Sub", [x, mean_], [d])]
        src = d
    nodes += [
        c.node("Mul", [src, src], [dd]),
        c.reduce("ReduceMean", dd, axes, 1, var),
        c.node("Add", [var, c.scalar(f"{y}_eps", eps, x)], [ve]),
        c.node("Sqrt", [ve], [sd]),
        c.node("Div", [src, sd], [y]),
    ]
    return nodes


def mean_variance_normalization(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x = n.input[0]
    r = len(c.static(x, n))
    axes = [a + r if a < 0 else a for a in (attr_ints(n, "axes") or [0, 2, 3])]
    return _normalize(c, x, n.output[0], axes, 1e-9)


def group_normalization(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """GroupNormalization (opset 18: scale/bias per group; 21: per channel)."""
    x, s, b, y = n.input[0], n.input[1], n.input[2], n.output[0]
    dims = c.static(x, n)
    N, C = dims[0], dims[1]
    G = attr_int(n, "num_groups", 1)
    eps = attr_float(n, "epsilon", 1e-5)
    per_channel = c.opset >= 21 or (c.dims(s) or (0,))[0] == C
    rest = list(dims[2:])
    g1, nrm, back, sr, br, f = (c.tmp(f"{y}_gn_{k}") for k in ("grouped", "norm", "back", "s", "b", "scaled"))
    gshape = c.const(f"{y}_gn_gshape", np.asarray([N, G, -1], np.int64))
    nodes = [
        c.node("Reshape", [x, gshape], [g1]),
        *_normalize(c, g1, nrm, [2], eps),
    ]
    if per_channel:
        nodes.append(c.node("Reshape", [nrm, c.const(f"{y}_gn_shape", np.asarray(dims, np.int64))], [back]))
        pshape = c.const(f"{y}_gn_pshape", np.asarray([C] + [1] * len(rest), np.int64))
    else:
        nodes.append(c.node("Reshape", [nrm, c.const(f"{y}_gn_g3", np.asarray([N, G, -1], np.int64))], [back]))
        pshape = c.const(f"{y}_gn_pshape", np.asarray([G, 1], np.int64))
    nodes += [
        c.node("Reshape", [s, pshape], [sr]),
        c.node("Reshape", [b, pshape], [br]),
        c.node("Mul", [back, sr], [f]),
    ]
    if per_channel:
        nodes.append(c.node("Add", [f, br], [y]))
    else:
        t = c.tmp(f"{y}_gn_out")
        nodes += [
            c.node("Add", [f, br], [t]),
            c.node("Reshape", [t, c.const(f"{y}_gn_shape", np.asarray(dims, np.int64))], [y]),
        ]
    return nodes


def lp_normalization(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, y = n.input[0], n.output[0]
    r = len(c.static(x, n))
    a = attr_int(n, "axis", -1)
    a = a + r if a < 0 else a
    p = attr_int(n, "p", 2)
    nrm = c.tmp(f"{y}_norm")
    if p == 1:
        ab = c.tmp(f"{y}_abs")
        nodes = [c.node("Abs", [x], [ab]), c.reduce("ReduceSum", ab, [a], 1, nrm)]
    else:
        nodes = [c.reduce("ReduceL2", x, [a], 1, nrm)]
    return [*nodes, c.node("Div", [x, nrm], [y])]


def _reduce_axes(c: Ctx, n: onnx.NodeProto, r: int) -> list[int] | None:
    """The axes a Reduce* node reduces (``None``: it is an identity)."""
    axes = attr_ints(n, "axes")
    if axes is None:
        axes = c.int_input(n, 1)
    if not axes:
        if attr_int(n, "noop_with_empty_axes", 0):
            return None
        return list(range(r))
    return sorted(a + r if a < 0 else a for a in axes)


def reduce_l1_sumsq(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    x, y = n.input[0], n.output[0]
    r = len(c.static(x, n))
    axes = _reduce_axes(c, n, r)
    t = c.tmp(f"{y}_elem")
    first = c.node("Abs", [x], [t]) if n.op_type == "ReduceL1" else c.node("Mul", [x, x], [t])
    if axes is None:
        return [first, c.node("Identity", [t], [y])]
    return [first, c.reduce("ReduceSum", t, axes, attr_int(n, "keepdims", 1), y)]


# ------------------------------------------------------------------------------------ max / min


_SHIFT_CHAIN = frozenset({"Max", "Min", "Clip", "Identity"})


def _shift_invariant_use(c: Ctx, s: str, axis: int, rank: int) -> bool:
    """Every use of ``s`` is invariant to adding a constant along ``axis``: a Softmax/LogSoftmax
    over that axis, or ``Exp`` normalised by its own ReduceSum over that axis."""
    uses = c.consumers.get(s, [])
    if not uses or s in c.outputs:
        return False
    for u in uses:
        if u.op_type in ("Softmax", "LogSoftmax"):
            ax = attr_int(u, "axis", -1 if c.opset >= 13 else 1)
            if c.opset < 13 or (ax + rank if ax < 0 else ax) != axis:
                return False
        elif u.op_type == "Exp":
            e = u.output[0]
            if e in c.outputs:
                return False
            sums = [v for v in c.consumers.get(e, []) if v.op_type == "ReduceSum"]
            for v in c.consumers.get(e, []):
                if v.op_type == "ReduceSum":
                    try:
                        if _reduce_axes(c, v, rank) != [axis]:
                            return False
                    except UnsupportedOpError:  # axes computed at run time: not provably a softmax
                        return False
                    if any(
                        w.op_type != "Div" or list(w.input) != [e, v.output[0]]
                        for w in c.consumers.get(v.output[0], [])
                    ):
                        return False
                    if v.output[0] in c.outputs:
                        return False
                elif v.op_type != "Div" or v.input[0] != e or not any(v.input[1] == q.output[0] for q in sums):
                    return False
        else:
            return False
    return True


def _is_constant(c: Ctx, name: str) -> bool:
    return not name or c.array(name) is not None


def reduce_max_min(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """ReduceMax/ReduceMin.

    * A row-constant shift of a softmax input (``ReduceMax`` over one axis, keepdims, optionally
      followed by Max/Min/Clip with constants or Identity, subtracted from tensors that only feed a
      softmax over that axis, as jax2tf writes ``Max(−inf, ReduceMax(x))``) → the same value
      through an int64 Cast, which carries no gradient: the gradient through the shift is exactly
      zero by shift invariance, at ties too.
    * Otherwise the exact subgradient split among ties: with ``m`` the maximum (computed on a path
      that needs no gradient) and ``eq = (x == m)``,
      ``y = ReduceSum(Where(eq, x, 0)) / ReduceSum(eq)`` — the same value, differentiable.
    """
    x, y = n.input[0], n.output[0]
    r = len(c.static(x, n))
    axes = _reduce_axes(c, n, r)
    keep = attr_int(n, "keepdims", 1)
    if axes is None:
        return [c.node("Identity", [x], [y])]
    if n.op_type == "ReduceMax" and keep and len(axes) == 1 and _softmax_shift(c, y, axes[0], r):
        raw, i = c.tmp(f"{y}_raw"), c.tmp(f"{y}_int")
        inner = onnx.NodeProto()
        inner.CopyFrom(n)
        inner.output[0] = raw
        elem = c.table.get(x, (TensorProto.FLOAT, None))[0]
        c.rules_used["softmax shift (stop-gradient)"] += 1
        return [inner, c.node("Cast", [raw], [i], to=TensorProto.INT64), c.node("Cast", [i], [y], to=elem)]
    m, eq, w, cnt, cf, num = (c.tmp(f"{y}_{k}") for k in ("m", "eq", "sel", "cnt", "eqf", "num"))
    plain = onnx.NodeProto()
    plain.CopyFrom(n)
    plain.output[0] = m
    for a in plain.attribute:
        if a.name == "keepdims":
            a.i = 1
    elem = c.table.get(x, (TensorProto.FLOAT, None))[0]
    return [
        plain,
        c.node("Equal", [x, m], [eq]),
        c.node("Where", [eq, x, c.scalar(f"{y}_zero", 0.0, x)], [w]),
        c.node("Cast", [eq], [cf], to=elem),
        c.reduce("ReduceSum", w, axes, keep, num),
        c.reduce("ReduceSum", cf, axes, keep, cnt),
        c.node("Div", [num, cnt], [y]),
    ]


def _softmax_shift(c: Ctx, m: str, axis: int, rank: int) -> bool:
    """``m`` (a keepdims ReduceMax over ``axis``) reaches only subtrahends of softmax inputs."""
    frontier = [m]
    seen: set[str] = set()
    while frontier:
        t = frontier.pop()
        if t in seen:
            continue
        seen.add(t)
        if t in c.outputs:
            return False
        uses = c.consumers.get(t, [])
        if not uses:
            return False
        for u in uses:
            chained = u.op_type in _SHIFT_CHAIN and u.input[0] == t and all(_is_constant(c, i) for i in u.input[1:])
            if chained or (u.op_type in ("Max", "Min") and all(_is_constant(c, i) for i in u.input if i != t)):
                frontier.append(u.output[0])
            elif u.op_type == "Sub" and len(u.input) == 2 and u.input[1] == t and u.input[0] != t:
                if not _shift_invariant_use(c, u.output[0], axis, rank):
                    return False
            else:
                return False
    return True


# -------------------------------------------------------------------------------- com.microsoft


def fused_matmul(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    a, b, y = n.input[0], n.input[1], n.output[0]
    if attr_int(n, "transBatchA", 0) or attr_int(n, "transBatchB", 0):
        raise UnsupportedOpError(f"cannot rewrite com.microsoft.FusedMatMul (node {label(n)!r}) with transBatch")
    nodes: list[onnx.NodeProto] = []

    def t(x: str, flag: str) -> str:
        if not attr_int(n, flag, 0):
            return x
        r = len(c.static(x, n))
        out = c.tmp(f"{x}_T")
        nodes.append(c.node("Transpose", [x], [out], perm=[*range(r - 2), r - 1, r - 2]))
        return out

    ta, tb = t(a, "transA"), t(b, "transB")
    alpha = attr_float(n, "alpha", 1.0)
    if alpha == 1.0:
        return [*nodes, c.node("MatMul", [ta, tb], [y])]
    mm = c.tmp(f"{y}_mm")
    return [*nodes, c.node("MatMul", [ta, tb], [mm]), c.node("Mul", [mm, c.scalar(f"{y}_alpha", alpha, a)], [y])]


def skip_layer_norm(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """com.microsoft SkipLayerNormalization → Add(s) + LayerNormalization over the last axis."""
    x, skip, gamma = n.input[0], n.input[1], n.input[2]
    beta = n.input[3] if len(n.input) > 3 else ""
    bias = n.input[4] if len(n.input) > 4 else ""
    y = n.output[0]
    s, sb = c.tmp(f"{y}_sum"), c.tmp(f"{y}_sumb")
    nodes = [c.node("Add", [x, skip], [s])]
    src = s
    if bias:
        nodes.append(c.node("Add", [s, bias], [sb]))
        src = sb
    outs = list(n.output) + [""] * 4
    if outs[3]:
        nodes.append(c.node("Identity", [src], [outs[3]]))
    eps = attr_float(n, "epsilon", 1e-12)
    if c.opset >= 17:
        ln_ins = [src, gamma] + ([beta] if beta else [])
        ln_outs = [y, outs[1] or c.tmp(f"{y}_mean"), outs[2] or c.tmp(f"{y}_invstd")]
        nodes.append(c.node("LayerNormalization", ln_ins, ln_outs, axis=-1, epsilon=eps))
        return nodes
    # before opset 17 (no LayerNormalization): (s − mean) / √(var + ε) · γ + β over the last axis
    norm, e = c.standardized(src, [-1], eps, f"{y}_ln", mean=outs[1], inv=outs[2])
    nodes += norm
    f = c.tmp(f"{y}_ln_f")
    if beta:
        nodes += [c.node("Mul", [e, gamma], [f]), c.node("Add", [f, beta], [y])]
    else:
        nodes.append(c.node("Mul", [e, gamma], [y]))
    return nodes


def ms_attention(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """com.microsoft Attention (BERT self-attention as onnxruntime's transformer optimizer writes it)
    → ``x·W + b`` split into Q, K, V, per head ``Softmax(scale·Q·Kᵀ + mask)·V``, heads merged.  The
    mask: none, a raw ``(N, L)`` 0/1 mask, or ``(N,)`` end positions (right padding), each turned into
    ``mask_filter_value`` on the masked keys.  Past/present state, attention bias, unidirectional or
    rotary attention and unequal ``qkv_hidden_sizes`` are refused."""
    ins = [*n.input, "", "", "", "", "", "", "", ""]
    x, w, b, mask = ins[0], ins[1], ins[2], ins[3]

    def refuse(why: str) -> UnsupportedOpError:
        return UnsupportedOpError(f"cannot rewrite op com.microsoft.Attention (node {label(n)!r}) for gradients: {why}")

    if any(ins[4:8]):
        raise refuse("it reads a past state, an attention bias or a past sequence length")
    if any(n.output[1:]):
        raise refuse("its present state is used")
    if attr_int(n, "unidirectional", 0) or attr_int(n, "do_rotary", 0):
        raise refuse("unidirectional and rotary attention are not rewritten")
    sizes = attr_ints(n, "qkv_hidden_sizes") or []
    if sizes and len(set(sizes)) != 1:
        raise refuse(f"qkv_hidden_sizes={sizes} are not equal")
    heads = attr_int(n, "num_heads", 0)
    width = c.static(w, n)[-1]
    if heads < 1 or width % (3 * heads):
        raise refuse(f"num_heads={heads} does not divide the projection width {width} into 3 parts")
    hidden = width // 3
    hd = hidden // heads
    scale = attr_float(n, "scale", 0.0) or 1.0 / math.sqrt(hd)
    y = n.output[0]
    parts = ("xw", "qkv", "q", "k", "v", "q4", "k4", "v4", "qt", "kt", "vt", "s", "ss", "sm", "o", "ot")
    t = {k: c.tmp(f"{y}_{k}") for k in parts}
    i64 = np.int64
    nodes = [c.node("MatMul", [x, w], [t["xw"]])]
    if b:
        nodes.append(c.node("Add", [t["xw"], b], [t["qkv"]]))
    else:
        nodes.append(c.node("Identity", [t["xw"]], [t["qkv"]]))
    split = c.const(f"{y}_split", np.array([hidden] * 3, i64))
    nodes.append(c.node("Split", [t["qkv"], split], [t["q"], t["k"], t["v"]], axis=-1))
    per_head = c.const(f"{y}_per_head", np.array([0, 0, heads, hd], i64))
    for z in ("q", "k", "v"):
        nodes.append(c.node("Reshape", [t[z], per_head], [t[f"{z}4"]]))
    nodes += [
        c.node("Transpose", [t["q4"]], [t["qt"]], perm=[0, 2, 1, 3]),
        c.node("Transpose", [t["k4"]], [t["kt"]], perm=[0, 2, 3, 1]),
        c.node("Transpose", [t["v4"]], [t["vt"]], perm=[0, 2, 1, 3]),
        c.node("MatMul", [t["qt"], t["kt"]], [t["s"]]),
        c.node("Mul", [t["s"], c.scalar(f"{y}_scale", scale, x)], [t["ss"]]),
    ]
    scores = t["ss"]
    if mask:
        mdims = c.dims(mask)
        keep = c.tmp(f"{y}_keep")
        fdt = int(helper.np_dtype_to_tensor_dtype(c.dtype_of(x)))
        if mdims is not None and len(mdims) == 2:  # raw (N, L) mask: onnxruntime keeps key j where it is > 0
            above = c.tmp(f"{y}_above")
            zero = c.const(f"{y}_mask_zero", np.array(0, c.dtype_of(mask)))
            nodes += [c.node("Greater", [mask, zero], [above]), c.node("Cast", [above], [keep], to=fdt)]
        elif mdims is not None and len(mdims) == 1:
            # (N,) end positions, or (2N,) end then start positions: key j is kept when start <= j < end.
            # Both forms at run time: the starts are mask[N:2N] of the mask with N zeros appended.
            names = ("shape", "len", "batch", "pos", "row", "ends", "zeros", "padded", "starts", "two_n")
            shape, length, batch, pos, row, ends, zeros, padded, starts, two_n = (c.tmp(f"{y}_{k}") for k in names)
            end, start, e_col, s_col, less, before, after, both = (
                c.tmp(f"{y}_{k}") for k in ("end", "start", "ecol", "scol", "less", "before", "after", "both")
            )
            zero1 = c.const(f"{y}_zero1", np.array([0], i64))
            nodes += [
                c.node("Shape", [x], [shape]),
                c.node("Gather", [shape, c.const(f"{y}_one_idx", np.array(1, i64))], [length], axis=0),
                c.node("Slice", [shape, zero1, c.const(f"{y}_one1", np.array([1], i64))], [batch]),
                c.node(
                    "Range",
                    [c.const(f"{y}_zero", np.array(0, i64)), length, c.const(f"{y}_step", np.array(1, i64))],
                    [pos],
                ),
                c.node("Unsqueeze", [pos, c.const(f"{y}_ax0", np.array([0], i64))], [row]),
                c.node("Slice", [mask, zero1, batch], [ends]),
                c.node("Sub", [ends, ends], [zeros]),
                c.node("Concat", [mask, zeros], [padded], axis=0),
                c.node("Add", [batch, batch], [two_n]),
                c.node("Slice", [padded, batch, two_n], [starts]),
                c.node("Cast", [ends], [end], to=int(TensorProto.INT64)),
                c.node("Cast", [starts], [start], to=int(TensorProto.INT64)),
                c.node("Unsqueeze", [end, c.const(f"{y}_ax1", np.array([1], i64))], [e_col]),
                c.node("Unsqueeze", [start, c.const(f"{y}_ax1s", np.array([1], i64))], [s_col]),
                c.node("Less", [row, e_col], [less]),
                c.node("Less", [row, s_col], [before]),
                c.node("Not", [before], [after]),
                c.node("And", [less, after], [both]),
                c.node("Cast", [both], [keep], to=fdt),
            ]
        else:
            raise refuse(f"its mask has {'an unknown rank' if mdims is None else f'{len(mdims)} dimensions'}")
        dropped, shift, shift4, masked = (c.tmp(f"{y}_{k}") for k in ("dropped", "shift", "shift4", "masked"))
        filt = attr_float(n, "mask_filter_value", -10000.0)
        nodes += [
            c.node("Sub", [c.scalar(f"{y}_one", 1.0, x), keep], [dropped]),
            c.node("Mul", [dropped, c.scalar(f"{y}_filter", filt, x)], [shift]),
            c.node("Unsqueeze", [shift, c.const(f"{y}_ax12", np.array([1, 2], i64))], [shift4]),
            c.node("Add", [scores, shift4], [masked]),
        ]
        scores = masked
    merge = c.const(f"{y}_merge", np.array([0, 0, hidden], i64))
    nodes += [
        c.node("Softmax", [scores], [t["sm"]], axis=-1),
        c.node("MatMul", [t["sm"], t["vt"]], [t["o"]]),
        c.node("Transpose", [t["o"]], [t["ot"]], perm=[0, 2, 1, 3]),
        c.node("Reshape", [t["ot"], merge], [y]),
    ]
    return nodes


def lrn(c: Ctx, n: onnx.NodeProto) -> list[onnx.NodeProto]:
    """LRN (AlexNet, GoogLeNet, CaffeNet, ZFNet) → ``x / (bias + α/size · B ⊛ x²)^β``, where the sum of
    squares over the window of channels ``[c − ⌊(size−1)/2⌋, c + ⌈(size−1)/2⌉]`` is a 1×…×1 ``Conv``
    with a constant ``C × C`` band of ones (the number of channels must be static)."""
    x, y = n.input[0], n.output[0]
    dims = c.dims(x)
    if dims is None or len(dims) < 3 or dims[1] is None:
        raise UnsupportedOpError(
            f"cannot rewrite op LRN (node {label(n)!r}) for gradients: the number of channels of {x!r} is not static"
        )
    C, size = int(dims[1]), attr_int(n, "size", 0)
    if size < 1:
        raise ValueError(f"size={size}")
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    ch = np.arange(C)
    band = ((ch[None, :] >= ch[:, None] - lo) & (ch[None, :] <= ch[:, None] + hi)).astype(c.dtype_of(x))
    kernel = c.const(f"{y}_lrn_band", band.reshape(C, C, *([1] * (len(dims) - 2))))
    sq, ssum, scaled, base, den = (c.tmp(f"{y}_{k}") for k in ("sq", "ssum", "scaled", "base", "den"))
    alpha, beta, bias = attr_float(n, "alpha", 1e-4), attr_float(n, "beta", 0.75), attr_float(n, "bias", 1.0)
    return [
        c.node("Mul", [x, x], [sq]),
        c.node("Conv", [sq, kernel], [ssum]),
        c.node("Mul", [ssum, c.scalar(f"{y}_alpha", alpha / size, x)], [scaled]),
        c.node("Add", [scaled, c.scalar(f"{y}_bias", bias, x)], [base]),
        c.node("Pow", [base, c.scalar(f"{y}_beta", beta, x)], [den]),
        c.node("Div", [x, den], [y]),
    ]


# ---------------------------------------------------------------------------------------- driver


def _structural() -> dict[str, Rule]:
    from .recurrent import recurrent
    from .resample import conv_transpose, resize
    from .sampling import affine_grid, grid_sample

    return {
        "Resize": resize,
        "ConvTranspose": conv_transpose,
        "LSTM": recurrent,
        "GRU": recurrent,
        "RNN": recurrent,
        "AffineGrid": affine_grid,
        "GridSample": grid_sample,
    }


RULES: dict[str, Rule] = {
    "Reciprocal": reciprocal,
    "CastLike": cast_like,
    "Gelu": gelu,
    "com.microsoft.Gelu": ms_gelu,
    "com.microsoft.BiasGelu": ms_gelu,
    "com.microsoft.FastGelu": ms_gelu,
    "com.microsoft.QuickGelu": quick_gelu,
    "com.microsoft.FusedMatMul": fused_matmul,
    "com.microsoft.SkipLayerNormalization": skip_layer_norm,
    "com.microsoft.Attention": ms_attention,
    "Softplus": softplus,
    "Softsign": softsign,
    "Mish": mish,
    "Selu": selu,
    "Celu": celu,
    "PRelu": prelu,
    "ThresholdedRelu": thresholded_relu,
    "Mean": mean,
    "Floor": piecewise_constant,
    "Ceil": piecewise_constant,
    "Round": piecewise_constant,
    "Sign": sign,
    "Shrink": shrink,
    "Hardmax": piecewise_constant,  # a one-hot of 0s and 1s: zero gradient almost everywhere
    "Mod": fmod,
    "Pow": pow_,
    "Split": split,
    "Slice": slice_,
    "Pad": pad,
    "DepthToSpace": depth_space,
    "SpaceToDepth": depth_space,
    "CumSum": cumsum,
    "Einsum": einsum,
    "MeanVarianceNormalization": mean_variance_normalization,
    "GroupNormalization": group_normalization,
    "LpNormalization": lp_normalization,
    "ReduceL1": reduce_l1_sumsq,
    "ReduceSumSquare": reduce_l1_sumsq,
    "ReduceMax": reduce_max_min,
    "ReduceMin": reduce_max_min,
    "LRN": lrn,
    "ScatterND": scatter,
    "ScatterElements": scatter,
}

#: Rules whose replacement is checked against onnxruntime when made.
VERIFIED = frozenset(
    {
        "Resize",
        "ConvTranspose",
        "LSTM",
        "GRU",
        "RNN",
        "Pad",
        "Slice",
        "DepthToSpace",
        "SpaceToDepth",
        "LRN",
        "Einsum",
        "AffineGrid",
        "GridSample",
        "ScatterND",
        "ScatterElements",
    }
)


def rule_for(n: onnx.NodeProto) -> Rule | None:
    key = op_key(n)
    if key in RULES:
        return RULES[key]
    return _structural().get(key) if n.domain in _DEFAULT_DOMAINS else None


def rewritable_ops() -> frozenset[str]:
    """Every op (``domain.op`` outside the default domain) that has an exact rewrite."""
    return frozenset(RULES) | frozenset(_structural())


def _apply_rule(rule: Rule, c: Ctx, nd: onnx.NodeProto) -> list[onnx.NodeProto] | None:
    """``rule(c, nd)``; a rule that trips over attributes or shapes out of their range (an axis past
    the rank, a zero divisor, a list of the wrong length: a node onnx's checker lets through but
    onnxruntime would refuse) refuses the node in one line instead of failing inside chita-onnx."""
    try:
        return rule(c, nd)
    except (IndexError, ValueError, ZeroDivisionError, OverflowError, KeyError) as exc:
        log.debug("rewrite of node %r failed", label(nd), exc_info=True)
        attrs = ", ".join(f"{a.name}={helper.get_attribute_value(a)!r}"[:60] for a in nd.attribute) or "none"
        raise UnsupportedOpError(
            f"cannot differentiate op {nd.op_type} (node {label(nd)!r}): its attributes or input shapes are out "
            f"of range for the exact rewrite (attributes: {attrs}; {type(exc).__name__}: {exc})"
        ) from None


def apply_rewrites(
    model: onnx.ModelProto,
    weights: Iterable[str],
    targets: Sequence[str],
    infer: Callable[[onnx.ModelProto], onnx.ModelProto],
    *,
    max_rounds: int = 8,
) -> tuple[onnx.ModelProto, Counter[str]]:
    """Rewrite, in rounds until nothing changes, every node between ``weights`` and ``targets`` that
    has a rule.  ``infer`` re-runs shape inference between rounds.  Returns the model and the count
    of rewritten nodes per op (plus named special cases such as the softmax shift)."""
    weights = list(weights)
    counts: Counter[str] = Counter()
    for _ in range(max_rounds):
        path_out = {o for t in targets for _, nd in differentiable_nodes(model, weights, t) for o in nd.output if o}
        c = Ctx(model, frozenset())
        c.on_path_tensors = path_out | set(weights)
        c.rules_used = Counter()
        g = model.graph
        new: list[onnx.NodeProto] = []
        changed = 0
        for nd in g.node:
            rule = rule_for(nd) if any(o in path_out for o in nd.output) else None
            repl = _apply_rule(rule, c, nd) if rule is not None else None
            if repl is None:
                new.append(nd)
                continue
            if op_key(nd) in VERIFIED:
                c.verify(nd, repl)
            new.extend(repl)
            counts[op_key(nd)] += 1
            changed += 1
        counts.update(c.rules_used)
        if not changed:
            break
        nodes = [onnx.NodeProto() for _ in new]
        for dst, src in zip(nodes, new, strict=True):
            dst.CopyFrom(src)
        del g.node[:]
        g.node.extend(nodes)
        model = infer(model)
    return model, counts


__all__ = ["RULES", "Ctx", "apply_rewrites", "attribute_refusal", "refuse", "rewritable_ops", "rule_for"]

_ = numpy_helper
