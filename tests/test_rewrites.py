"""Every exact rewrite of the gradient working copy (chita_onnx.gradients.rewrites, .resample,
.recurrent) against finite differences of the *original* model, on small seeded graphs.

Each case builds a chain ``weights → OP → weights → logits``, computes per-sample gradients with the
engine (which must apply the rewrite: checked through ``engine.fwd.rewrites``) and compares them with
float64 central differences evaluated by ``onnx.reference`` on the model as written, or — for
attributes ``onnx.reference`` ignores — float32 differences of onnxruntime's own kernel.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest
from rewrite_kit import (
    MS,
    Init,
    engine_grads,
    fd_check,
    img_chain,
    node,
    ort_fd_check,
    seq_chain,
    vec_chain,
)

from chita_onnx.errors import UnsupportedOpError

NEG_INF = float("-inf")


def _f(w: Init, name: str, value: Any) -> str:
    return w.const(name, value)


def _i(w: Init, name: str, value: Any) -> str:
    return w.const(name, value, np.int64)


def _skip_layer_norm(w: Init) -> tuple[list[onnx.NodeProto], int]:
    skip = node(
        "SkipLayerNormalization",
        ["z", "t", _f(w, "g", np.linspace(0.5, 1.5, 6)), _f(w, "b", np.linspace(-0.1, 0.1, 6))],
        ["y"],
        domain=MS,
        epsilon=1e-5,
    )
    return [node("Tanh", ["z"], ["t"]), skip], 6


def _einsum(
    equation: str, shape: list[int], d_out: int, *, one: bool = False, shape_k: list[int] | None = None
) -> Callable[[Init], tuple[list[onnx.NodeProto], int]]:
    """``z [N, 6]`` reshaped to ``shape`` (with ``N`` first) as ``q``, ``Tanh(z)`` to ``shape_k``
    (default ``shape``) as ``k``; ``Einsum(equation)(q, k)`` (``(q)`` alone with ``one``) flattened to
    ``y [N, d_out]``."""

    def build(w: Init) -> tuple[list[onnx.NodeProto], int]:
        nodes = [
            node("Reshape", ["z", _i(w, "q_shape", [-1, *shape])], ["q"]),
            node("Tanh", ["z"], ["zt"]),
            node("Reshape", ["zt", _i(w, "k_shape", [-1, *(shape_k or shape)])], ["k"]),
            node("Einsum", ["q"] if one else ["q", "k"], ["e"], equation=equation),
            node("Reshape", ["e", _i(w, "flat", [-1, d_out])], ["y"]),
        ]
        return nodes, d_out

    return build


EINSUM: dict[str, tuple[str, list[int], int, bool]] = {
    "scores": ("bqe,bke->bqk", [2, 3], 4, False),  # attention scores: batch, rows, columns, contraction
    "mix": ("bqk,bke->bqe", [3, 2], 9, False),  # k: [N, 2, 3]
    "transposed-output": ("bqe,bke->bkq", [2, 3], 4, False),
    "implicit-output": ("bqe,bke", [2, 3], 4, False),  # → "kq", b and e summed
    "ellipsis": ("...qe,...ke->...qk", [2, 3], 4, False),
    "outer": ("bi,bj->bij", [6], 36, False),
    "sum-one-side": ("bqe,bke->bq", [2, 3], 2, False),  # k only in the second operand: summed first
    "one-operand": ("bij->bji", [2, 3], 6, True),
    "one-operand-sum": ("bij->bi", [2, 3], 2, True),
}


@pytest.mark.parametrize("case", sorted(EINSUM))
def test_einsum_between_activations_matches_finite_differences(case: str) -> None:
    """onnxruntime-training has no Einsum gradient: the rewrite into ReduceSum/Transpose/Reshape/MatMul
    is checked against onnxruntime's Einsum kernel when made, and here against float64 differences of
    the original model."""
    equation, shape, d_out, one = EINSUM[case]
    w = Init(37)
    nodes, d_out = _einsum(equation, shape, d_out, one=one, shape_k=shape[::-1] if case == "mix" else None)(w)
    model = vec_chain(nodes, w, d_out, 17)
    e, gm, feeds, labels = engine_grads(model, ["W1", "W2"])
    assert e.fwd.rewrites.get("Einsum") == 1, e.fwd.rewrites
    assert np.abs(gm.X).max() > 0
    fd_check(gm, model, feeds, labels)


def test_random_einsums_match_onnxruntimes_kernel() -> None:
    """Seeded random equations of one or two operands (implicit outputs, ellipses, sums to a scalar):
    the rewrite computes what onnxruntime's Einsum computes (:meth:`Ctx.check`, one random input)."""
    import random

    from onnx import TensorProto, helper

    from chita_onnx.gradients.rewrites import Ctx, einsum

    rng = random.Random(3)
    for _ in range(60):
        A = "".join(rng.sample("abcdef", rng.randint(1, 4)))
        B = "".join(rng.sample("abcdef", rng.randint(0, 4)))
        out = "".join(rng.sample(sorted(set(A + B)), rng.randint(0, len(set(A + B)))))
        size = {ch: rng.randint(1, 4) for ch in "abcdef"}
        extra = [rng.randint(1, 3) for _ in range(rng.randint(0, 2))] if rng.random() < 0.3 else []
        pre = "..." if extra else ""
        lhs = f"{pre}{A},{pre}{B}" if B else f"{pre}{A}"
        eq = lhs if rng.random() < 0.3 else f"{lhs}->{pre}{out}"
        shapes = [extra + [size[ch] for ch in t] for t in ([A, B] if B else [A])]
        names = ["a", "b"][: len(shapes)]
        nd = helper.make_node("Einsum", names, ["y"], equation=eq)
        ins = [helper.make_tensor_value_info(n, TensorProto.FLOAT, sh) for n, sh in zip(names, shapes, strict=True)]
        g = helper.make_graph([nd], "e", ins, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
        m = onnx.shape_inference.infer_shapes(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]))
        c = Ctx(m, frozenset())
        repl = einsum(c, nd)
        assert repl is not None, eq
        assert c.check(nd, repl) is None, (eq, shapes)


def test_einsum_with_a_diagonal_is_still_refused() -> None:
    w = Init(37)
    nodes, d_out = _einsum("bii->bi", [3, 3], 3, one=True)(w)
    nodes[0] = node("Reshape", ["z", _i(w, "sq", [-1, 2, 3])], ["q0"])
    nodes.insert(1, node("Concat", ["q0", "q0"], ["q1"], axis=1))
    nodes.insert(2, node("Slice", ["q1", _i(w, "s0", [0]), _i(w, "s1", [3]), _i(w, "s2", [1])], ["q"]))
    model = vec_chain(nodes, w, d_out, 17)
    with pytest.raises(UnsupportedOpError, match="Einsum"):
        engine_grads(model, ["W1", "W2"])


# --------------------------------------------------------------------------- elementwise and shape

# name -> (build(w) -> (nodes, d_out), opset, rewrite key expected in engine.fwd.rewrites, ms domain)
VEC: dict[str, tuple[Callable[[Init], tuple[list[onnx.NodeProto], int]], int, str, bool]] = {
    "Reciprocal": (
        lambda w: ([node("Sigmoid", ["z"], ["s"]), node("Reciprocal", ["s"], ["y"])], 6),
        17,
        "Reciprocal",
        False,
    ),
    # ReLU6 as torch's dynamo exporter writes it without its optimizer: Clip bounds CastLike'd to z
    "CastLike": (
        lambda w: (
            [
                node("CastLike", [_f(w, "lo", np.float32(0.0)), "z"], ["lo_z"]),
                node("CastLike", [_f(w, "hi", np.float32(0.6)), "z"], ["hi_z"]),
                node("Clip", ["z", "lo_z", "hi_z"], ["y"]),
            ],
            6,
        ),
        17,
        "CastLike",
        False,
    ),
    "Gelu": (lambda w: ([node("Gelu", ["z"], ["y"])], 6), 20, "Gelu", False),
    "Gelu-tanh": (lambda w: ([node("Gelu", ["z"], ["y"], approximate="tanh")], 6), 20, "Gelu", False),
    "ms.Gelu": (lambda w: ([node("Gelu", ["z"], ["y"], domain=MS)], 6), 17, f"{MS}.Gelu", True),
    "ms.FastGelu": (
        lambda w: ([node("FastGelu", ["z", _f(w, "fb", np.linspace(-0.2, 0.2, 6))], ["y"], domain=MS)], 6),
        17,
        f"{MS}.FastGelu",
        True,
    ),
    "ms.BiasGelu": (
        lambda w: ([node("BiasGelu", ["z", _f(w, "bb", np.linspace(-0.3, 0.3, 6))], ["y"], domain=MS)], 6),
        17,
        f"{MS}.BiasGelu",
        True,
    ),
    "ms.QuickGelu": (
        lambda w: ([node("QuickGelu", ["z"], ["y"], domain=MS, alpha=1.5)], 6),
        17,
        f"{MS}.QuickGelu",
        True,
    ),
    "ms.FusedMatMul": (
        lambda w: ([node("FusedMatMul", ["z", w("FW", 4, 6)], ["y"], domain=MS, transB=1, alpha=0.7)], 4),
        17,
        f"{MS}.FusedMatMul",
        True,
    ),
    "ms.SkipLayerNormalization": (
        _skip_layer_norm,
        17,
        f"{MS}.SkipLayerNormalization",
        True,
    ),
    "ms.SkipLayerNormalization-13": (  # before opset 17: the layer norm written out (no LayerNormalization)
        _skip_layer_norm,
        13,
        f"{MS}.SkipLayerNormalization",
        True,
    ),
    "Softplus": (lambda w: ([node("Softplus", ["z"], ["y"])], 6), 17, "Softplus", False),
    "Softsign": (lambda w: ([node("Softsign", ["z"], ["y"])], 6), 17, "Softsign", False),
    "Mish": (lambda w: ([node("Mish", ["z"], ["y"])], 6), 18, "Mish", False),
    "Selu": (lambda w: ([node("Selu", ["z"], ["y"])], 6), 17, "Selu", False),
    "Celu": (lambda w: ([node("Celu", ["z"], ["y"], alpha=0.7)], 6), 17, "Celu", False),
    "PRelu": (lambda w: ([node("PRelu", ["z", _f(w, "sl", np.linspace(0.05, 0.3, 6))], ["y"])], 6), 17, "PRelu", False),
    "ThresholdedRelu": (
        lambda w: ([node("ThresholdedRelu", ["z"], ["y"], alpha=0.1)], 6),
        17,
        "ThresholdedRelu",
        False,
    ),
    "Mean": (
        lambda w: ([node("Tanh", ["z"], ["t"]), node("Mean", ["z", "t", _f(w, "c", 0.3)], ["y"])], 6),
        17,
        "Mean",
        False,
    ),
    "Floor": (
        lambda w: (
            [
                node("Mul", ["z", _f(w, "k", 3.0)], ["z3"]),
                node("Floor", ["z3"], ["fl"]),
                node("Mul", ["fl", "z"], ["y"]),
            ],
            6,
        ),
        17,
        "Floor",
        False,
    ),
    "Round": (
        lambda w: (
            [
                node("Mul", ["z", _f(w, "k", 3.0)], ["z3"]),
                node("Round", ["z3"], ["fl"]),
                node("Mul", ["fl", "z"], ["y"]),
            ],
            6,
        ),
        17,
        "Round",
        False,
    ),
    "Sign": (lambda w: ([node("Sign", ["z"], ["sg"]), node("Mul", ["sg", "z"], ["y"])], 6), 17, "Sign", False),
    "Pow-int-exponent": (
        lambda w: ([node("Sigmoid", ["z"], ["s"]), node("Pow", ["s", _i(w, "e", 3)], ["y"])], 6),
        17,
        "Pow",
        False,
    ),
    "Split-unused-output": (
        lambda w: ([node("Split", ["z", _i(w, "sp", [2, 4])], ["a", "b"], axis=1), node("Tanh", ["a"], ["y"])], 2),
        17,
        "Split",
        False,
    ),
    "Split-num-outputs": (
        lambda w: (
            [node("Split", ["z"], ["a", "b", "c"], axis=1, num_outputs=3), node("Mul", ["a", "c"], ["y"])],
            2,
        ),
        18,
        "Split",
        False,
    ),
    "Slice-negative-step": (
        lambda w: (
            [
                node(
                    "Slice", ["z", _i(w, "st", [-1]), _i(w, "en", [-100]), _i(w, "ax", [1]), _i(w, "sp", [-2])], ["r"]
                ),
                node("Tanh", ["r"], ["y"]),
            ],
            3,
        ),
        17,
        "Slice",
        False,
    ),
    "CumSum": (lambda w: ([node("CumSum", ["z", _i(w, "a", 1)], ["y"])], 6), 17, "CumSum", False),
    "CumSum-exclusive-reverse": (
        lambda w: ([node("CumSum", ["z", _i(w, "a", -1)], ["y"], exclusive=1, reverse=1)], 6),
        17,
        "CumSum",
        False,
    ),
    "LpNormalization": (
        lambda w: ([node("LpNormalization", ["z"], ["y"], axis=1, p=2)], 6),
        17,
        "LpNormalization",
        False,
    ),
    "LpNormalization-p1": (
        lambda w: ([node("LpNormalization", ["z"], ["y"], axis=-1, p=1)], 6),
        17,
        "LpNormalization",
        False,
    ),
    "ReduceL1": (
        lambda w: ([node("ReduceL1", ["z"], ["r"], axes=[1], keepdims=1), node("Mul", ["r", "z"], ["y"])], 6),
        17,
        "ReduceL1",
        False,
    ),
    "ReduceSumSquare": (
        lambda w: ([node("ReduceSumSquare", ["z", _i(w, "a", [1])], ["r"]), node("Mul", ["r", "z"], ["y"])], 6),
        18,
        "ReduceSumSquare",
        False,
    ),
    "ReduceMax": (
        lambda w: ([node("ReduceMax", ["z"], ["r"], axes=[1], keepdims=1), node("Mul", ["r", "z"], ["y"])], 6),
        17,
        "ReduceMax",
        False,
    ),
    "ReduceMin-keepdims0-opset18": (
        lambda w: (
            [
                node("ReduceMin", ["z", _i(w, "a", [-1])], ["r"], keepdims=0),
                node("Unsqueeze", ["r", _i(w, "u", [1])], ["ru"]),
                node("Mul", ["ru", "z"], ["y"]),
            ],
            6,
        ),
        18,
        "ReduceMin",
        False,
    ),
    "ReduceMax-all-axes": (
        lambda w: ([node("ReduceMax", ["z"], ["r"], keepdims=0), node("Mul", ["r", "z"], ["y"])], 6),
        17,
        "ReduceMax",
        False,
    ),
    "ReduceMax-ties": (
        lambda w: (
            [
                node("Slice", ["z", _i(w, "s0", [0]), _i(w, "e0", [3]), _i(w, "a0", [1])], ["h"]),
                node("Concat", ["h", "h"], ["hh"], axis=1),  # every maximum is tied
                node("ReduceMax", ["hh"], ["r"], axes=[1], keepdims=1),
                node("Mul", ["r", "hh"], ["y"]),
            ],
            6,
        ),
        17,
        "ReduceMax",
        False,
    ),
    # jax2tf's softmax: Max(−inf, ReduceMax(x)) subtracted, then Exp normalised by its ReduceSum
    "softmax-shift-jax2tf": (
        lambda w: (
            [
                node("ReduceMax", ["z"], ["m"], axes=[1], keepdims=1),
                node("Max", [_f(w, "ninf", NEG_INF), "m"], ["mm"]),
                node("Sub", ["z", "mm"], ["s"]),
                node("Exp", ["s"], ["e"]),
                node("ReduceSum", ["e", _i(w, "ax", [1])], ["den"], keepdims=1),
                node("Div", ["e", "den"], ["y"]),
            ],
            6,
        ),
        17,
        "softmax shift (stop-gradient)",
        False,
    ),
    "softmax-shift-Softmax": (
        lambda w: (
            [
                node("ReduceMax", ["z"], ["m"], axes=[-1], keepdims=1),
                node("Identity", ["m"], ["mi"]),
                node("Sub", ["z", "mi"], ["s"]),
                node("Softmax", ["s"], ["y"], axis=1),
            ],
            6,
        ),
        17,
        "softmax shift (stop-gradient)",
        False,
    ),
    # denoising models: soft thresholding, with a bias (lambd within the values of z)
    "Shrink": (lambda w: ([node("Shrink", ["z"], ["y"], lambd=0.3, bias=0.1)], 6), 17, "Shrink", False),
    # a hard attention/selection mask: the gradient flows through z only, not through the argmax
    "Hardmax": (
        lambda w: ([node("Hardmax", ["z"], ["h"], axis=1), node("Add", ["z", "h"], ["y"])], 6),
        17,
        "Hardmax",
        False,
    ),
    # angle wrapping: C's fmod on floats (the sign of z), with wraps in the data
    "Mod-fmod": (
        lambda w: ([node("Mod", ["z", _f(w, "period", np.float32(0.7))], ["y"], fmod=1)], 6),
        17,
        "Mod",
        False,
    ),
}


#: onnx.reference computes LpNormalization(p=1) without the absolute value: checked against
#: onnxruntime's kernel instead.
ORT_CHECKED = {"LpNormalization-p1"}


@pytest.mark.parametrize("case", sorted(VEC))
def test_vector_rewrite_matches_finite_differences(case: str) -> None:
    build, opset, key, ms = VEC[case]
    w = Init(31)
    nodes, d_out = build(w)
    model = vec_chain(nodes, w, d_out, opset, ms)
    e, gm, feeds, labels = engine_grads(model, ["W1", "W2"])
    assert key in e.fwd.rewrites, e.fwd.rewrites
    assert np.abs(gm.X).max() > 0
    if case in ORT_CHECKED:
        ort_fd_check(gm, model, feeds, labels, rows=(0, 1))
        return
    erf = "Gelu" in case
    fd_check(gm, model, feeds, labels, h=1e-4 if erf else 1e-5, rtol=1e-4 if erf else 2e-5)


# --------------------------------------------------------------------------------- image-like ops


def _resize(w: Init, mode: str, ctm: str, scales: Any = None, sizes: Any = None, **kw: Any) -> onnx.NodeProto:
    ins = ["z", "", _f(w, "sc", scales) if scales is not None else ""]
    if sizes is not None:
        ins.append(_i(w, "sz", sizes))
    return node("Resize", ins, ["y"], mode=mode, coordinate_transformation_mode=ctm, **kw)


# name -> (build(w) -> node list, flattened size, opset, key)
IMG: dict[str, tuple[Callable[[Init], list[onnx.NodeProto]], int, int, str]] = {
    "Resize-nearest-x2": (
        lambda w: [_resize(w, "nearest", "asymmetric", [1, 1, 2, 2], nearest_mode="floor")],
        3 * 64,
        17,
        "Resize",
    ),
    "Resize-nearest-x1.5-ceil": (
        lambda w: [_resize(w, "nearest", "half_pixel", [1, 1, 1.5, 1.5], nearest_mode="round_prefer_ceil")],
        3 * 36,
        17,
        "Resize",
    ),
    "Resize-nearest-tf-sizes": (
        lambda w: [_resize(w, "nearest", "tf_half_pixel_for_nn", sizes=[7, 6], axes=[2, 3])],
        3 * 42,
        18,
        "Resize",
    ),
    "Resize-linear-x2": (lambda w: [_resize(w, "linear", "half_pixel", [1, 1, 2, 2])], 3 * 64, 17, "Resize"),
    "Resize-linear-align-sizes": (
        lambda w: [_resize(w, "linear", "align_corners", sizes=[7, 9], axes=[2, 3])],
        3 * 63,
        18,
        "Resize",
    ),
    "Resize-linear-downsample": (
        lambda w: [_resize(w, "linear", "pytorch_half_pixel", [1, 1, 0.6, 0.8])],
        3 * 2 * 3,
        17,
        "Resize",
    ),
    "Resize-cubic": (
        lambda w: [_resize(w, "cubic", "half_pixel", [1, 1, 2, 1.5], cubic_coeff_a=-0.5, exclude_outside=1)],
        3 * 8 * 6,
        17,
        "Resize",
    ),
    "Resize-opset18-axes": (
        lambda w: [_resize(w, "linear", "half_pixel", [2.0, 1.5], axes=[2, 3])],
        3 * 8 * 6,
        18,
        "Resize",
    ),
    "Resize-opset18-antialias": (
        lambda w: [_resize(w, "linear", "half_pixel", [1, 1, 0.5, 0.5], antialias=1)],
        3 * 4,
        18,
        "Resize",
    ),
    "ConvTranspose-stride2-pads-outpad": (
        lambda w: [
            node(
                "ConvTranspose",
                ["z", w("CT", 3, 2, 3, 3)],
                ["y"],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
                output_padding=[1, 1],
            )
        ],
        2 * 8 * 8,
        17,
        "ConvTranspose",
    ),
    "ConvTranspose-depthwise-bias": (
        lambda w: [
            node("ConvTranspose", ["z", w("CT", 3, 1, 3, 3), w("CTb", 3, scale=0.1)], ["y"], strides=[2, 2], group=3)
        ],
        3 * 9 * 9,
        17,
        "ConvTranspose",
    ),
    "ConvTranspose-dilated-groups": (
        lambda w: [node("ConvTranspose", ["z", w("CT", 3, 2, 2, 2)], ["y"], dilations=[2, 2], group=3)],
        6 * 6 * 6,
        17,
        "ConvTranspose",
    ),
    "ConvTranspose-same-upper": (
        lambda w: [node("ConvTranspose", ["z", w("CT", 3, 2, 3, 3)], ["y"], strides=[2, 2], auto_pad="SAME_UPPER")],
        2 * 8 * 8,
        17,
        "ConvTranspose",
    ),
    "ConvTranspose-same-lower": (
        lambda w: [node("ConvTranspose", ["z", w("CT", 3, 2, 4, 4)], ["y"], strides=[2, 2], auto_pad="SAME_LOWER")],
        2 * 8 * 8,
        17,
        "ConvTranspose",
    ),
    "ConvTranspose-output-shape": (
        lambda w: [node("ConvTranspose", ["z", w("CT", 3, 2, 3, 3)], ["y"], strides=[2, 2], output_shape=[9, 8])],
        2 * 9 * 8,
        17,
        "ConvTranspose",
    ),
    "ConvTranspose-crop": (
        lambda w: [node("ConvTranspose", ["z", w("CT", 3, 2, 3, 3)], ["y"], pads=[3, 0, 0, 0])],
        2 * 3 * 6,
        17,
        "ConvTranspose",
    ),
    "Pad-reflect": (
        lambda w: [node("Pad", ["z", _i(w, "p", [0, 0, 1, 2, 0, 0, 2, 1])], ["y"], mode="reflect")],
        3 * 7 * 7,
        17,
        "Pad",
    ),
    "Pad-edge": (
        lambda w: [node("Pad", ["z", _i(w, "p", [0, 0, 2, 0, 0, 0, 0, 3])], ["y"], mode="edge")],
        3 * 6 * 7,
        17,
        "Pad",
    ),
    "Pad-wrap": (
        lambda w: [node("Pad", ["z", _i(w, "p", [0, 0, 1, 1, 0, 0, 1, 2])], ["y"], mode="wrap")],
        3 * 6 * 7,
        19,
        "Pad",
    ),
    "GroupNormalization-18": (
        lambda w: [
            node(
                "GroupNormalization",
                ["z", _f(w, "gs", [1.2, 0.8, 1.0]), _f(w, "gb", [0.1, -0.1, 0.0])],
                ["y"],
                num_groups=3,
            )
        ],
        3 * 16,
        18,
        "GroupNormalization",
    ),
    "MeanVarianceNormalization": (
        lambda w: [node("MeanVarianceNormalization", ["z"], ["y"])],
        3 * 16,
        17,
        "MeanVarianceNormalization",
    ),
    "LRN-3": (  # a window of 3 of the 3 channels: the outer two see only two
        lambda w: [node("LRN", ["z"], ["y"], size=3, alpha=0.3, beta=0.6, bias=1.5)],
        3 * 16,
        13,
        "LRN",
    ),
    "LRN-5": (  # AlexNet's attributes (the window covers every channel here)
        lambda w: [node("LRN", ["z"], ["y"], size=5, alpha=1e-4, beta=0.75, bias=1.0)],
        3 * 16,
        13,
        "LRN",
    ),
}


#: Cases onnx.reference cannot serve as the float64 reference for: grouped ConvTranspose and
#: output_shape (wrong or unsupported there), tf_half_pixel_for_nn (unsupported), and the function
#: ops GroupNormalization/MeanVarianceNormalization (their bodies compute in float32 there), and LRN
#: (onnx.reference's window differs from the operator's definition by up to 0.2 on these inputs;
#: onnxruntime's kernel matches it to 1e-7).  They are checked with float32 differences of
#: onnxruntime's own kernel.
IMG_ORT_CHECKED = {
    "LRN-3",
    "LRN-5",
    "ConvTranspose-depthwise-bias",
    "ConvTranspose-dilated-groups",
    "ConvTranspose-output-shape",
    "GroupNormalization-18",
    "MeanVarianceNormalization",
    "Resize-nearest-tf-sizes",
}


@pytest.mark.parametrize("case", sorted(IMG))
def test_image_rewrite_matches_finite_differences(case: str) -> None:
    build, flat, opset, key = IMG[case]
    w = Init(41)
    nodes = build(w)
    model = img_chain(nodes, w, flat, opset=opset)
    e, gm, feeds, labels = engine_grads(model, ["C1", "W2"])
    assert key in e.fwd.rewrites, e.fwd.rewrites
    if case in IMG_ORT_CHECKED:
        ort_fd_check(gm, model, feeds, labels, rows=(0, 1))
    else:
        fd_check(gm, model, feeds, labels)


@pytest.mark.parametrize("mode", ["DCR", "CRD", "SpaceToDepth"])
def test_depth_space_rewrites(mode: str) -> None:
    w = Init(43)
    if mode == "SpaceToDepth":
        nodes = [node("SpaceToDepth", ["z"], ["y"], blocksize=2)]
    else:
        nodes = [node("DepthToSpace", ["z"], ["y"], blocksize=2, mode=mode)]
    model = img_chain(nodes, w, 4 * 16, cout=4)
    e, gm, feeds, labels = engine_grads(model, ["C1", "W2"])
    assert {"DepthToSpace", "SpaceToDepth"} & set(e.fwd.rewrites)
    fd_check(gm, model, feeds, labels)


def test_conv_transpose_1d() -> None:
    w = Init(47)
    nodes = [node("ConvTranspose", ["z", w("CT", 3, 2, 4)], ["y"], strides=[3], pads=[1, 2], output_padding=[1])]
    model = img_chain(nodes, w, 2 * (3 * 5 + 1 + 4 - 3), hw=(6,))
    e, gm, feeds, labels = engine_grads(model, ["C1", "W2"])
    assert e.fwd.rewrites.get("ConvTranspose") == 1
    fd_check(gm, model, feeds, labels)


def test_group_normalization_opset21_per_channel_scale() -> None:
    w = Init(53)
    gn = node(
        "GroupNormalization",
        ["z", _f(w, "gs", [1.2, 0.8, 1.0, 0.9]), _f(w, "gb", [0.1, -0.1, 0.0, 0.2])],
        ["y"],
        num_groups=2,
    )
    model = img_chain([gn], w, 4 * 16, cout=4, opset=21)
    e, gm, feeds, labels = engine_grads(model, ["C1", "W2"])
    assert e.fwd.rewrites.get("GroupNormalization") == 1
    ort_fd_check(gm, model, feeds, labels, rows=(0, 1))  # see IMG_ORT_CHECKED


# -------------------------------------------------------------------------------- recurrent ops


def _rnn_model(
    op: str,
    w: Init,
    *,
    D: int = 1,
    T: int = 4,
    n_in: int = 3,
    H: int = 2,
    layout: int = 0,
    outs: tuple[str, ...] = ("Y", "Yh"),
    inputs: dict[int, str] | None = None,
    direction: str | None = None,
    **attrs: Any,
) -> onnx.ModelProto:
    """``x → MatMul → sequence → op → every used output flattened and concatenated → Gemm``."""
    G = {"LSTM": 4, "GRU": 3, "RNN": 1}[op]
    ins = ["seq", w("RW", D, G * H, n_in), w("RR", D, G * H, H), w("RB", D, 2 * G * H, scale=0.1)]
    ins += [(inputs or {}).get(k, "") for k in range(4, 8)]
    while not ins[-1]:
        ins.pop()
    names = ["Y", "Yh", "Yc"][: 3 if op == "LSTM" else 2]
    out_names = [n if n in outs else "" for n in names]
    while not out_names[-1]:
        out_names.pop()
    direction = direction or ("bidirectional" if D == 2 else "forward")
    rnn = node(op, ins, out_names, hidden_size=H, direction=direction, layout=layout, **attrs)
    flat = _i(w, "flat", [1, -1])
    extra = [node("Reshape", [o, flat], [f"{o}_f"]) for o in outs]
    extra.append(node("Concat", [f"{o}_f" for o in outs], ["y"], axis=1))
    sizes = {"Y": T * D * H, "Yh": D * H, "Yc": D * H}
    return seq_chain(rnn, w, T=T, n_in=n_in, flat=sum(sizes[o] for o in outs), layout=layout, extra=extra)


RNN_REF: dict[str, dict[str, Any]] = {  # attributes onnx.reference implements: float64 differences
    "LSTM-forward": {"op": "LSTM"},
    "LSTM-reverse-Yc": {"op": "LSTM", "direction": "reverse", "outs": ("Y", "Yh", "Yc")},
    "LSTM-bidirectional": {"op": "LSTM", "D": 2, "outs": ("Y", "Yh", "Yc")},
    "GRU-forward": {"op": "GRU"},
    "GRU-bidirectional-linear-before-reset": {"op": "GRU", "D": 2, "linear_before_reset": 1},
    "GRU-reverse": {"op": "GRU", "direction": "reverse"},
    "RNN-bidirectional": {"op": "RNN", "D": 2},
}


@pytest.mark.parametrize("case", sorted(RNN_REF))
def test_recurrent_unroll_matches_float64_differences(case: str) -> None:
    kw = dict(RNN_REF[case])
    op = kw.pop("op")
    model = _rnn_model(op, Init(61), **kw)
    e, gm, feeds, labels = engine_grads(model, ["W1", "RW", "RR", "RB", "W2"], n=1)
    assert e.fwd.rewrites.get(op) == 1, e.fwd.rewrites
    fd_check(gm, model, feeds, labels)


RNN_ORT: dict[str, dict[str, Any]] = {  # attributes only onnxruntime's kernel implements: float32 differences
    "LSTM-peepholes-initial-states": {"op": "LSTM", "peep": True, "init": True, "outs": ("Y", "Yh", "Yc")},
    "LSTM-activations-clip": {
        "op": "LSTM",
        "D": 2,
        "activations": ["HardSigmoid", "Tanh", "Softsign", "Sigmoid", "Tanh", "Tanh"],
        "activation_alpha": [0.25, 1.0, 1.0, 1.0, 1.0, 1.0],
        "activation_beta": [0.45, 1.0, 1.0, 1.0, 1.0, 1.0],
        "clip": 1.5,
    },
    "LSTM-input-forget": {"op": "LSTM", "input_forget": 1},
    "LSTM-sequence-lens": {"op": "LSTM", "D": 2, "lens": 3, "outs": ("Y", "Yh", "Yc")},
    "GRU-sequence-lens-initial-state": {"op": "GRU", "lens": 2, "init": True},
    "RNN-relu": {"op": "RNN", "activations": ["Relu"]},
}


@pytest.mark.parametrize("case", sorted(RNN_ORT))
def test_recurrent_unroll_matches_onnxruntime_kernel(case: str) -> None:
    kw = dict(RNN_ORT[case])
    op = kw.pop("op")
    D, H = kw.get("D", 1), 2
    w = Init(67)
    rng = np.random.default_rng(5)
    inputs: dict[int, str] = {}
    lens = kw.pop("lens", None)
    if lens is not None:
        inputs[4] = w.const("lens", [lens], np.int32)
    if kw.pop("init", False):
        inputs[5] = w.const("h0", 0.3 * rng.standard_normal((D, 1, H)))
        if op == "LSTM":
            inputs[6] = w.const("c0", 0.3 * rng.standard_normal((D, 1, H)))
    if kw.pop("peep", False):
        inputs[7] = w.const("P", 0.3 * rng.standard_normal((D, 3 * H)))
    model = _rnn_model(op, w, inputs=inputs, **kw)
    e, gm, feeds, labels = engine_grads(model, ["W1", "RW", "RR", "RB", "W2"], n=1)
    assert e.fwd.rewrites.get(op) == 1, e.fwd.rewrites
    ort_fd_check(gm, model, feeds, labels)


@pytest.mark.parametrize("seed", range(12))
def test_random_recurrent_nodes_match_finite_differences(seed: int) -> None:
    """Seeded random LSTM/GRU/RNN nodes (direction, ``linear_before_reset``, clip, the outputs used,
    ``sequence_lens``, initial states, peepholes): the gradients of ``W``, ``R`` and ``B`` — ``R``'s
    through the one-product path — against central differences of onnxruntime's own kernel."""
    import random

    rng = random.Random(seed)
    op = rng.choice(["LSTM", "GRU", "RNN"])
    D, H = rng.choice([1, 2]), 2
    kw: dict[str, Any] = {"D": D}
    if D == 1 and rng.random() < 0.5:
        kw["direction"] = "reverse"
    if op == "GRU" and rng.random() < 0.5:
        kw["linear_before_reset"] = 1
    if rng.random() < 0.3:
        kw["clip"] = 1.5
    outs = ["Y", "Yh"] + (["Yc"] if op == "LSTM" else [])
    kw["outs"] = tuple(o for o in outs if rng.random() < 0.7) or ("Y",)
    w = Init(200 + seed)
    values = np.random.default_rng(seed)
    inputs: dict[int, str] = {}
    if rng.random() < 0.4:
        inputs[4] = w.const("lens", [rng.randint(1, 4)], np.int32)
    if rng.random() < 0.4:
        inputs[5] = w.const("h0", 0.3 * values.standard_normal((D, 1, H)))
        if op == "LSTM":
            inputs[6] = w.const("c0", 0.3 * values.standard_normal((D, 1, H)))
    if op == "LSTM" and rng.random() < 0.3:
        inputs[7] = w.const("P", 0.3 * values.standard_normal((D, 3 * H)))
    model = _rnn_model(op, w, inputs=inputs, **kw)
    e, gm, feeds, labels = engine_grads(model, ["W1", "RW", "RR", "RB", "W2"], n=1)
    assert e.fwd.rewrites.get(op) == 1, e.fwd.rewrites
    ort_fd_check(gm, model, feeds, labels)


@pytest.mark.parametrize("case", sorted(RNN_REF))
def test_recurrent_weight_gradient_is_one_product_unless_tied(case: str) -> None:
    """The builder is asked for the zero stand-ins ``E`` (one per direction; two for GRU with
    ``linear_before_reset``) instead of ``R``, whose gradient is then one GEMM per row block (the
    values are checked against finite differences above).  A second reader of ``R`` (a tied use)
    keeps the builder's own gradient."""
    from chita_onnx.gradients.deferred import plan

    kw = dict(RNN_REF[case])
    op = kw.pop("op")
    model = _rnn_model(op, Init(61), **kw)
    e, _, _, _ = engine_grads(model, ["W1", "RW", "RR", "RB", "W2"], n=1)
    wc = e.fwd.model
    xs, finish = plan(wc, ["RW", "RR"])
    per_direction = 2 if kw.get("linear_before_reset") else 1
    assert finish is not None and "RR" not in xs and "RW" in xs
    assert len(xs) == 1 + per_direction * kw.get("D", 1)
    tied = onnx.ModelProto()
    tied.CopyFrom(wc)
    tied.graph.node.append(node("ReduceSum", ["RR"], ["RR_sum"], keepdims=0))
    xs2, finish2 = plan(tied, ["RW", "RR"])
    assert finish2 is None and xs2 == {"RW", "RR"}
    nested = onnx.ModelProto()  # R also read inside a subgraph: the same
    nested.CopyFrom(wc)
    body = onnx.helper.make_graph(
        [node("Identity", ["RR"], ["rr_copy"])], "body", [], [onnx.helper.make_tensor_value_info("rr_copy", 1, None)]
    )
    nested.graph.node.append(
        node("If", [next(i.name for i in wc.graph.input)], ["if_out"], then_branch=body, else_branch=body)
    )
    assert plan(nested, ["RW", "RR"])[1] is None


# -------------------------------------------------------------------------------------- refusals


def test_resize_crop_and_channel_scaling_are_refused() -> None:
    w = Init(71)
    crop = node(
        "Resize",
        ["z", _f(w, "roi", [0, 0, 0.1, 0.1, 1, 1, 0.9, 0.9]), _f(w, "sc", [1, 1, 2, 2])],
        ["y"],
        coordinate_transformation_mode="tf_crop_and_resize",
        mode="linear",
    )
    with pytest.raises(UnsupportedOpError, match=r"Resize \(node 'Resize_y'\).*tf_crop_and_resize"):
        engine_grads(img_chain([crop], w, 3 * 64), ["C1", "W2"])
    w = Init(72)
    chan = _resize(w, "nearest", "asymmetric", [1, 2, 1, 1])
    with pytest.raises(UnsupportedOpError, match=r"Resize \(node 'Resize_y'\).*batch or channel"):
        engine_grads(img_chain([chan], w, 6 * 16), ["C1", "W2"])


def test_pow_with_the_exponent_on_the_path_is_refused() -> None:
    w = Init(73)
    nodes = [node("Sigmoid", ["z"], ["s"]), node("Pow", ["s", "z"], ["y"])]
    with pytest.raises(UnsupportedOpError, match=r"Pow \(node 'Pow_y'\).*exponent"):
        engine_grads(vec_chain(nodes, w), ["W1", "W2"])


def test_conv_transpose_with_a_computed_weight_is_refused() -> None:
    w = Init(74)
    nodes = [
        node("Mul", [w("CTraw", 3, 2, 3, 3), _f(w, "two", 2.0)], ["CTw"]),
        node("ConvTranspose", ["z", "CTw"], ["y"]),
    ]
    with pytest.raises(UnsupportedOpError, match=r"ConvTranspose \(node 'ConvTranspose_y'\).*not a constant"):
        engine_grads(img_chain(nodes, w, 2 * 36), ["C1", "W2", "CTraw"])


def test_lstm_layout1_unroll_matches_the_reference_forward() -> None:
    """onnxruntime 1.19 cannot run ``layout=1``; the unrolled graph is compared with onnx.reference."""
    from onnx.reference import ReferenceEvaluator

    from chita_onnx.gradients.prepare import normalize, working_copy

    model = _rnn_model("LSTM", Init(63), D=2, layout=1, outs=("Y", "Yh", "Yc"))
    wc, counts, _ = working_copy(normalize(model), "logits", weights=["W1", "W2"])
    assert counts.get("LSTM") == 1
    x = np.random.default_rng(2).standard_normal((1, 5)).astype(np.float32)
    want = ReferenceEvaluator(model).run(None, {"x": x})[0]
    got = ReferenceEvaluator(wc).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_jax2tf_layernorm_attention_block() -> None:
    """A tf2onnx/jax2tf-style block: decomposed LayerNorm with Rsqrt written as Sqrt → Reciprocal,
    single-head attention whose softmax subtracts Max(−inf, ReduceMax(scores)) (opset 13)."""
    w = Init(81)
    a1 = _i(w, "ax_last", [-1])
    nodes = [
        node("MatMul", ["z", w("W0", 6, 8)], ["z8"]),
        node("Reshape", ["z8", _i(w, "tok", [-1, 2, 4])], ["t"]),  # 2 tokens of width 4
        node("ReduceMean", ["t"], ["mu"], axes=[-1], keepdims=1),
        node("Sub", ["t", "mu"], ["d"]),
        node("Mul", ["d", "d"], ["d2"]),
        node("ReduceMean", ["d2"], ["var"], axes=[-1], keepdims=1),
        node("Add", ["var", _f(w, "eps", 1e-6)], ["ve"]),
        node("Sqrt", ["ve"], ["sd"]),
        node("Reciprocal", ["sd"], ["rs"]),
        node("Mul", ["d", "rs"], ["n"]),
        node("Mul", ["n", _f(w, "gamma", [1.1, 0.9, 1.0, 0.8])], ["ng"]),
        node("Add", ["ng", _f(w, "beta", [0.05, -0.05, 0.0, 0.1])], ["ln"]),
        node("MatMul", ["ln", w("Wq", 4, 4)], ["q"]),
        node("MatMul", ["ln", w("Wk", 4, 4)], ["k"]),
        node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kt"], ["sc"]),
        node("ReduceMax", ["sc"], ["m"], axes=[-1], keepdims=1),
        node("Max", [_f(w, "ninf", NEG_INF), "m"], ["mm"]),
        node("Sub", ["sc", "mm"], ["s"]),
        node("Exp", ["s"], ["e"]),
        node("ReduceSum", ["e", a1], ["den"], keepdims=1),
        node("Div", ["e", "den"], ["p"]),
        node("MatMul", ["p", "ln"], ["att"]),
        node("Reshape", ["att", _i(w, "flat", [-1, 8])], ["y"]),
    ]
    model = vec_chain(nodes, w, 8, opset=13)
    e, gm, feeds, labels = engine_grads(model, ["W1", "W0", "Wq", "Wk", "W2"])
    assert e.fwd.rewrites.get("Reciprocal") == 1 and e.fwd.rewrites.get("softmax shift (stop-gradient)") == 1
    fd_check(gm, model, feeds, labels)


# ops added to GRADIENT_OPS after measuring onnxruntime-training's own gradient (no rewrite needed)
NATIVE: dict[str, tuple[Callable[[Init], tuple[list[onnx.NodeProto], int]], int]] = {
    "Abs": (lambda w: ([node("Abs", ["z"], ["y"])], 6), 17),
    "Sin": (lambda w: ([node("Sin", ["z"], ["y"])], 6), 17),
    "Cos": (lambda w: ([node("Cos", ["z"], ["y"])], 6), 17),
    "Tile": (lambda w: ([node("Tile", ["z", _i(w, "rep", [1, 2])], ["y"])], 12), 17),
    "TopK": (lambda w: ([node("TopK", ["z", _i(w, "k", [3])], ["y", "idx"], axis=1)], 3), 17),
    "Trilu": (
        lambda w: (
            [
                node("Reshape", ["z", _i(w, "sh", [-1, 2, 3])], ["m"]),
                node("Trilu", ["m"], ["t"], upper=0),
                node("Reshape", ["t", _i(w, "fl", [-1, 6])], ["y"]),
            ],
            6,
        ),
        17,
    ),
    "ScatterElements": (
        lambda w: (
            [
                node("Tanh", ["z"], ["t"]),
                node("Slice", ["t", _i(w, "s0", [0]), _i(w, "s1", [2]), _i(w, "sa", [1])], ["u"]),
                node("ScatterElements", ["z", _i(w, "ix", [[4, 1]]), "u"], ["y"], axis=1),
            ],
            6,
        ),
        17,
    ),
    "GatherND": (
        lambda w: (
            [
                node("Transpose", ["z"], ["zt"], perm=[1, 0]),
                node("GatherND", ["zt", _i(w, "ix", [[5], [0], [2]])], ["g"]),
                node("Transpose", ["g"], ["y"], perm=[1, 0]),
            ],
            3,
        ),
        17,
    ),
    "ReduceL2": (
        lambda w: ([node("ReduceL2", ["z"], ["r"], axes=[1], keepdims=1), node("Mul", ["r", "z"], ["y"])], 6),
        17,
    ),
    "ReduceLogSumExp": (
        lambda w: ([node("ReduceLogSumExp", ["z"], ["r"], axes=[1], keepdims=1), node("Sub", ["z", "r"], ["y"])], 6),
        17,
    ),
}


@pytest.mark.parametrize("op", sorted(NATIVE))
def test_native_gradient_ops_match_finite_differences(op: str) -> None:
    from chita_onnx.gradients import GRADIENT_OPS

    assert op in GRADIENT_OPS
    build, opset = NATIVE[op]
    w = Init(91)
    nodes, d_out = build(w)
    model = vec_chain(nodes, w, d_out, opset)
    e, gm, feeds, labels = engine_grads(model, ["W1", "W2"])
    assert op not in e.fwd.rewrites
    fd_check(gm, model, feeds, labels)


# --------------------------------------------------------------------------- onnxruntime's fused Attention


def _ms_attention_model(mask: str, seed: int = 0) -> tuple[onnx.ModelProto, list[str]]:
    """``x [N, 5, 8]`` → com.microsoft Attention (2 heads, Q/K/V weight ``[8, 24]`` and bias; ``mask``:
    "none", "raw" (an ``(N, 5)`` 0/1 mask computed from ``x``) or "end" (``(N,)`` end positions, its
    count of ones)) → mean over the sequence → MatMul ``[8, 3]`` → logits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((0.6 * rng.standard_normal((8, 24))).astype(np.float32), "qkv_w"),
        numpy_helper.from_array((0.1 * rng.standard_normal(24)).astype(np.float32), "qkv_b"),
        numpy_helper.from_array((0.6 * rng.standard_normal((8, 3))).astype(np.float32), "out_w"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    att_in = ["x", "qkv_w", "qkv_b"]
    pre: list[onnx.NodeProto] = []
    if mask != "none":  # a mask computed from the input (per sample): keep key j when x[j, 0] > -0.3
        inits += [
            numpy_helper.from_array(np.array(0, np.int64), "feat0"),
            numpy_helper.from_array(np.array(-0.3, np.float32), "cut"),
        ]
        pre += [
            helper.make_node("Gather", ["x", "feat0"], ["x0"], axis=2),
            helper.make_node("Greater", ["x0", "cut"], ["kept"]),
            helper.make_node("Cast", ["kept"], ["raw"], to=TensorProto.INT32),
        ]
        if mask == "raw2":  # values 0/1/2, not 0/1: onnxruntime keeps every key whose value is > 0
            inits.append(numpy_helper.from_array(np.array(1, np.int64), "feat1m"))
            inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero_m"))
            pre += [
                helper.make_node("Gather", ["x", "feat1m"], ["x1m"], axis=2),
                helper.make_node("Greater", ["x1m", "zero_m"], ["up"]),
                helper.make_node("Cast", ["up"], ["up_i"], to=TensorProto.INT32),
                helper.make_node("Mul", ["raw", "up_i"], ["extra"]),
                helper.make_node("Add", ["raw", "extra"], ["raw2"]),
            ]
        if mask in ("end", "endstart"):  # end positions: as many leading keys as the raw mask keeps
            inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis_l"))
            pre.append(helper.make_node("ReduceSum", ["raw", "axis_l"], ["end"], keepdims=0))
        if mask == "endstart":  # (2N,): the ends, then start positions (1 where x[0, 1] > 0, else 0)
            inits.append(numpy_helper.from_array(np.array(1, np.int64), "feat1"))
            inits.append(numpy_helper.from_array(np.array(0, np.int64), "pos0"))
            inits.append(numpy_helper.from_array(np.array(0.0, np.float32), "zero_f"))
            pre += [
                helper.make_node("Gather", ["x", "feat1"], ["x1"], axis=2),
                helper.make_node("Gather", ["x1", "pos0"], ["x10"], axis=1),
                helper.make_node("Greater", ["x10", "zero_f"], ["late"]),
                helper.make_node("Cast", ["late"], ["start"], to=TensorProto.INT32),
                helper.make_node("Concat", ["end", "start"], ["endstart"], axis=0),
            ]
        att_in.append({"raw": "raw", "raw2": "raw2", "end": "end", "endstart": "endstart"}[mask])
    nodes = [
        *pre,
        helper.make_node("Attention", att_in, ["a"], domain=MS, num_heads=2, name="att"),
        helper.make_node("ReduceMean", ["a", "axis1"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "out_w"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "msatt",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(MS, 1)])
    m.ir_version = 8
    return m, ["qkv_w", "out_w"]


@pytest.mark.parametrize("mask", ["none", "raw", "raw2", "end", "endstart"])
def test_ms_attention_gradients_match_finite_differences_of_onnxruntimes_kernel(mask: str) -> None:
    """The rewrite's per-sample gradients against central differences of the original model, whose
    Attention onnxruntime computes with its own kernel (masked keys included)."""
    model, weights = _ms_attention_model(mask)
    e, gm, feeds, labels = engine_grads(model, weights)
    assert "com.microsoft.Attention" in e.fwd.rewrites, e.fwd.rewrites
    assert np.abs(gm.X).max() > 0
    ort_fd_check(gm, model, feeds, labels, rows=(0, 1))


def test_ms_attention_with_past_state_is_refused() -> None:
    model, weights = _ms_attention_model("none")
    model.graph.node[0].output.append("present")
    with pytest.raises(UnsupportedOpError, match="present state"):
        engine_grads(model, weights)
