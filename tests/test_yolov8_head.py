"""Two idioms of ultralytics YOLOv8 exports (nudenet's 320n.onnx in the zoo), on tiny seeded models.

* The DFL head reads the expectation of a 16-bin softmax through a 1×1 ``Conv`` whose weight is
  ``arange(16)``: a fixed operator, never pruned nor re-fitted (the default's layer-wise re-fit moved
  it to 1.02, 1.97, ... on the zoo model, shifting every box).
* ``output0`` is ``Concat(axis=1)`` of box coordinates in pixels and sigmoid class scores: the
  Gauss-Newton head takes the two parts, each divided by its RMS norm, so that the boxes do not drown
  the scores (on the zoo model the class branch fell to 14% density at 30% sparsity).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import onnx
from numpy.typing import ArrayLike, NDArray
from onnx import TensorProto, helper, numpy_helper

from chita_onnx import CompressConfig, compress, inspect_model
from chita_onnx.data_types import Batch
from chita_onnx.gradients import GradientEngine, per_sample_gradients
from chita_onnx.graph import find_prunable, fixed_weights, is_fixed_operator

BINS = 16


def _init(name: str, a: ArrayLike) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _model(
    name: str, nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], x: list[int], y: list[int]
) -> onnx.ModelProto:
    """Opset 17, float input ``x`` and output ``y`` with a dynamic batch ``N``."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", *x])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", *y])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)


def dfl_model(seed: int) -> onnx.ModelProto:
    """x [N,3,8,8] → Conv 3×3 (16 ch) → Relu → Conv 1×1 (16 bins) → Softmax over the bins → DFL Conv
    with the fixed weight arange(16) → [N,1,8,8]; next to it a learned 1×1 Conv branch; both joined."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w1", rng.standard_normal((16, 3, 3, 3)) * 0.3),
        _init("w2", rng.standard_normal((BINS, 16, 1, 1)) * 0.3),
        _init("dfl", np.arange(BINS, dtype=np.float32).reshape(1, BINS, 1, 1)),
        _init("w3", rng.standard_normal((2, 16, 1, 1)) * 0.3),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["bins"], name="conv_bins"),
        helper.make_node("Softmax", ["bins"], ["p"], axis=1, name="softmax_bins"),
        helper.make_node("Conv", ["p", "dfl"], ["dist"], name="dfl_conv"),
        helper.make_node("Conv", ["r1", "w3"], ["s"], name="conv_scores"),
        helper.make_node("Sigmoid", ["s"], ["scores"], name="sigmoid_scores"),
        helper.make_node("Concat", ["dist", "scores"], ["y"], axis=1, name="concat_out"),
    ]
    return _model("dfl", nodes, inits, [3, 8, 8], [3, 8, 8])


def mixed_model(seed: int, box_scale: float) -> onnx.ModelProto:
    """x [N,8] → MatMul → Relu → boxes = MatMul · box_scale (pixels), scores = Sigmoid(MatMul);
    y = Concat(axis=1)[boxes (4), scores (6)]."""
    rng = np.random.default_rng(seed)
    inits = [
        _init("w_in", rng.standard_normal((8, 16)) * 0.5),
        _init("w_box", rng.standard_normal((16, 4)) * 0.5),
        _init("w_cls", rng.standard_normal((16, 6)) * 0.5),
        _init("stride", np.asarray(box_scale, np.float32)),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "w_in"], ["h0"], name="mm_in"),
        helper.make_node("Relu", ["h0"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "w_box"], ["b0"], name="mm_box"),
        helper.make_node("Mul", ["b0", "stride"], ["boxes"], name="to_pixels"),
        helper.make_node("MatMul", ["h", "w_cls"], ["c0"], name="mm_cls"),
        helper.make_node("Sigmoid", ["c0"], ["scores"], name="sigmoid"),
        helper.make_node("Concat", ["boxes", "scores"], ["y"], axis=1, name="concat_out"),
    ]
    return _model("mixed", nodes, inits, [8], [10])


# ------------------------------------------------------------------------------------ DFL weights


def test_integer_operator_weights_are_fixed() -> None:
    assert is_fixed_operator(_init("a", np.arange(16).reshape(1, 16, 1, 1)))
    assert is_fixed_operator(_init("sobel", [[[[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]]]))
    assert not is_fixed_operator(_init("ternary", [[[[-1, 0, 1], [1, 0, -1]]]]))
    assert not is_fixed_operator(_init("ones", np.ones((4, 4))))
    learned = np.arange(200, dtype=np.float32).reshape(10, 20)
    learned[-1, -1] += 0.5  # integers up to the last value only: still learned
    assert not is_fixed_operator(_init("learned", learned))
    # a whole layer of integers (a quantized layer stored as float, its scale applied after it)
    int8_layer = np.random.default_rng(3).integers(-127, 128, size=(64, 32)).astype(np.float32)
    assert not is_fixed_operator(_init("int8_layer", int8_layer))
    assert is_fixed_operator(_init("small", int8_layer[:16, :16]))


def test_dfl_arange_conv_is_not_prunable(tmp_path: Path) -> None:
    model = dfl_model(seed=0)
    assert [t.name for t in find_prunable(model)] == ["w1", "w2", "w3"]
    assert fixed_weights(model) == ["dfl"]
    path = tmp_path / "dfl.onnx"
    onnx.save(model, path)
    assert "dfl" not in [t.name for t in inspect_model(path)]


def test_dfl_arange_conv_is_left_exactly_as_it_is(tmp_path: Path) -> None:
    """The default (layer-wise re-fit) and magnitude pruning at 50%: the DFL weight is unchanged
    bit for bit, and the report says why."""
    path = tmp_path / "dfl.onnx"
    onnx.save(dfl_model(seed=1), path)
    rng = np.random.default_rng(2)
    calib = {"x": rng.standard_normal((48, 3, 8, 8)).astype(np.float32)}
    methods: tuple[Literal["auto", "magnitude"], ...] = ("auto", "magnitude")
    for method in methods:
        out = tmp_path / f"{method}.onnx"
        report = compress(path, out, calib, CompressConfig(sparsity=0.5, method=method))
        weights = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
        np.testing.assert_array_equal(weights["dfl"], np.arange(BINS, dtype=np.float32).reshape(1, BINS, 1, 1))
        assert any("fixed operator" in w and "dfl" in w for w in report.warnings), report.warnings


# ------------------------------------------------------------------------- mixed-scale Concat head


def _share(model: onnx.ModelProto, x: NDArray[np.float32], name: str) -> float:
    """Fraction of the per-sample gradients' squared norm that falls on tensor ``name``."""
    gm = per_sample_gradients(model, {"x": x})
    slot = next(s for s in gm.layout.slots if s.name == name)
    X = gm.X.astype(np.float64)
    return float(np.sum(X[:, slot.offset : slot.stop] ** 2) / np.sum(X**2))


def test_concat_of_pixels_and_scores_weighs_both_parts() -> None:
    """Boxes ×300 next to sigmoid scores: without the per-part scales the score weights get a
    negligible share of the Gauss-Newton gradients; with them, a share of the same order as the boxes'."""
    x = np.random.default_rng(3).standard_normal((32, 8)).astype(np.float32)
    model = mixed_model(seed=4, box_scale=300.0)
    engine = GradientEngine(model, None, example=Batch({"x": x}, None))
    assert engine.output_scales is not None and len(engine.output_scales) == 2
    assert engine.output_scales[0] > 10 * engine.output_scales[1]
    assert "Concat of parts on different scales" in engine.loss_description
    assert _share(model, x, "w_cls") > 0.05


def test_concat_of_parts_on_one_scale_is_left_alone() -> None:
    """Parts of comparable scale keep the plain head (unit scales): other models' numbers unchanged."""
    x = np.random.default_rng(5).standard_normal((32, 8)).astype(np.float32)
    engine = GradientEngine(mixed_model(seed=4, box_scale=1.0), None, example=Batch({"x": x}, None))
    assert engine.output_scales is None
    assert "Concat" not in engine.loss_description
