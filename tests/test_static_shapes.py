"""Static shapes of the gradient working copy (chita_onnx.gradients.static): shape subgraphs folded,
If nodes inlined (weights inside branches included), shapes recorded from a run; and the written
model keeping its dynamic dims."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from rewrite_kit import Init, engine_grads, fd_check, model_of, node, vi

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.data import ArraySource
from chita_onnx.data_types import Batch
from chita_onnx.errors import DataError
from chita_onnx.gradients import GradientEngine
from chita_onnx.gradients.prepare import normalize
from chita_onnx.gradients.static import make_static
from chita_onnx.graph import find_prunable, get_weights, write_weights

I64 = TensorProto.INT64


def _bn(w: Init, x: str, y: str, c: int) -> onnx.NodeProto:
    """An eval-mode BatchNormalization with seeded statistics."""
    var = w.const(f"{y}_var", 0.5 + w.rng.random(c))
    return node(
        "BatchNormalization",
        [x, w(f"{y}_s", c, scale=0.1, offset=1.0), w(f"{y}_b", c, scale=0.1), w(f"{y}_m", c, scale=0.1), var],
        [y],
    )


def _dim_of(t: str, k: int, w: Init, tag: str) -> tuple[list[onnx.NodeProto], str]:
    """Dim ``k`` of ``t`` as a 1-element int64 tensor, the way paddle2onnx writes it:
    Shape → Identity → Slice → Squeeze → Identity → Unsqueeze."""
    i = lambda name, v: w.const(f"{tag}_{name}", v, np.int64)  # noqa: E731
    return [
        node("Shape", [t], [f"{tag}_s"]),
        node("Identity", [f"{tag}_s"], [f"{tag}_s2"]),
        node("Slice", [f"{tag}_s2", i("st", [k]), i("en", [k + 1]), i("ax", [0]), i("sp", [1])], [f"{tag}_sl"]),
        node("Squeeze", [f"{tag}_sl", i("a0", [0])], [f"{tag}_sq"]),
        node("Identity", [f"{tag}_sq"], [f"{tag}_sq2"]),
        node("Unsqueeze", [f"{tag}_sq2", i("a1", [0])], [f"{tag}_d"]),
    ], f"{tag}_d"


def paddle_style(seed: int = 3) -> onnx.ModelProto:
    """x[N,3,H,W] → Conv → Reshape to [0, 4, H, −1] (H taken from Shape, paddle2onnx style) →
    BatchNormalization → Relu → GlobalAveragePool → Reshape to [N, −1] (N from Shape) → MatMul →
    Softmax.  Every dim but the channels is dynamic; onnx inference cannot follow the targets."""
    w = Init(seed)
    h_nodes, h_dim = _dim_of("c", 2, w, "h")
    n_nodes, n_dim = _dim_of("g", 0, w, "n")
    nodes = [
        node("Conv", ["x", w("C1", 4, 3, 3, 3, scale=0.3)], ["c"], pads=[1, 1, 1, 1]),
        *h_nodes,
        node(
            "Concat",
            [w.const("zero", [0], np.int64), w.const("four", [4], np.int64), h_dim, w.const("m1", [-1], np.int64)],
            ["t1"],
            axis=0,
        ),
        node("Identity", ["t1"], ["t1i"]),
        node("Reshape", ["c", "t1i"], ["r"]),
        _bn(w, "r", "b", 4),
        node("Relu", ["b"], ["a"]),
        node("GlobalAveragePool", ["a"], ["g"]),
        *n_nodes,
        node("Concat", [n_dim, "m1"], ["t2"], axis=0),
        node("Reshape", ["g", "t2"], ["f"]),
        node("MatMul", ["f", w("W2", 4, 3)], ["logits"]),
        node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    return model_of(nodes, [vi("x", ["N", 3, "H", "W"])], [vi("probs", ["N", 3])], w.items, 15)


def test_onnx_inference_alone_cannot_follow_the_paddle_shape_arithmetic() -> None:
    """The premise of the next tests: with every input dim fixed, onnx's data-propagating shape
    inference still does not know the shape of the head."""
    m = normalize(paddle_style())
    for d, v in zip(m.graph.input[0].type.tensor_type.shape.dim, [1, 3, 8, 8], strict=True):
        d.ClearField("dim_param")
        d.dim_value = v
    for o in m.graph.output:
        o.type.tensor_type.ClearField("shape")
    inferred = onnx.shape_inference.infer_shapes(m, data_prop=True)
    vis = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    dims = vis["logits"].type.tensor_type.shape.dim
    assert not all(d.HasField("dim_value") for d in dims)


def test_paddle_style_shape_subgraphs_are_folded_and_gradients_are_exact() -> None:
    model = paddle_style()
    e, gm, feeds, labels = engine_grads(model, ["C1", "W2"], n=3)
    st = e.fwd.static
    assert st is not None and st.folded >= 2
    assert {"BatchNormalization"} <= set(e.fwd.rewrites)
    assert not any(n.op_type in ("Shape", "Concat") for n in e.fwd.model.graph.node)
    fd_check(gm, model, feeds, labels)


def test_written_model_keeps_dynamic_dims_and_runs_at_other_shapes(tmp_path: Path) -> None:
    model = paddle_style(seed=4)
    src = tmp_path / "paddle.onnx"
    onnx.save(model, src)
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((24, 3, 8, 8)).astype(np.float32)}
    out = tmp_path / "pruned.onnx"
    # statistics correction off: the test compares the pruned weights in an unchanged graph
    cfg = CompressConfig(sparsity=0.4, method="chita", holdout=0.25, bias_correction="off", bn_recalibrate="off")
    chita_onnx.compress(src, out, data, cfg)
    pruned = onnx.load(out)
    dims = pruned.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["N", 3, "H", "W"]
    assert pruned.opset_import[0].version == model.opset_import[0].version
    assert [n.op_type for n in pruned.graph.node] == [n.op_type for n in model.graph.node]
    # another batch size and another H/W than the calibration data
    x = rng.standard_normal((5, 3, 12, 10)).astype(np.float32)
    names = [t.name for t in find_prunable(model)]
    w_pruned = get_weights(chita_onnx.load_model(out), names)
    assert sum(int(np.count_nonzero(v)) for v in w_pruned.values()) < sum(v.size for v in w_pruned.values())
    same_graph, _ = write_weights(model, w_pruned, storage="dense")

    def run(m: onnx.ModelProto | Path) -> np.ndarray:
        data_ = m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m)
        return np.asarray(ort.InferenceSession(data_, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0])

    got, dense = run(out), run(model)
    assert got.shape == dense.shape == (5, 3)
    np.testing.assert_allclose(got, run(same_graph), rtol=1e-6, atol=1e-7)
    assert np.abs(got - dense).max() < 0.5  # pruned, so not equal; but the same model
    assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------- If nodes


def _branch(name: str, w: Init, act: str, weight: str, outer: bool = False) -> onnx.GraphProto:
    """A branch holding its weight in a Constant node (as spox writes them), or reading a main-graph
    initializer (``outer``, as torch's dynamo exporter does)."""
    value = w.rng.standard_normal((6, 4)).astype(np.float32) * 0.5
    tensor = onnx.numpy_helper.from_array(value, weight)
    if outer:
        w.items.append(tensor)
    nodes = [
        *([] if outer else [helper.make_node("Constant", [], [weight], value=tensor, name=f"{weight}_c")]),
        helper.make_node("MatMul", ["z", weight], [f"{name}_mm"], name=f"{name}_mm"),
        helper.make_node(act, [f"{name}_mm"], [f"{name}_out"], name=f"{name}_act"),
    ]
    return helper.make_graph(nodes, name, [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, None)])


def if_model(cond: str, outer: bool = False) -> onnx.ModelProto:
    """x[N,5] → MatMul W1 → z; If(cond) → then: MatMul(z, Wa) → Tanh, else: MatMul(z, Wb) → Sigmoid;
    → Gemm W2.  ``cond``: "shape" (width == 5) or "value" (max of an int64 input ``mode`` == 1)."""
    w = Init(21)
    nodes = [node("MatMul", ["x", w("W1", 5, 6)], ["z"])]
    inputs = [vi("x", ["N", 5])]
    if cond == "shape":
        nodes += [
            node("Shape", ["x"], ["xs"]),
            node("Gather", ["xs", w.const("one", 1, np.int64)], ["xw"], axis=0),
            node("Equal", ["xw", w.const("five", 5, np.int64)], ["c"]),
        ]
    else:
        inputs.append(vi("mode", ["N", 1], TensorProto.INT64))
        nodes += [
            node("ReduceMax", ["mode"], ["mm"], keepdims=0),
            node("Equal", ["mm", w.const("one", 1, np.int64)], ["c"]),
        ]
    then_g, else_g = _branch("then", w, "Tanh", "Wa", outer), _branch("else", w, "Sigmoid", "Wb", outer)
    nodes.append(helper.make_node("If", ["c"], ["h"], then_branch=then_g, else_branch=else_g, name="the_if"))
    nodes.append(node("Gemm", ["h", w("W2", 3, 4)], ["logits"], transB=1))
    return model_of(nodes, inputs, [vi("logits", ["N", 3])], w.items, 17)


def test_weights_inside_if_branches_are_found_and_written_back() -> None:
    model = if_model("shape")
    found = {t.name: t for t in find_prunable(model)}
    assert set(found) == {"W1", "W2", "Wa", "Wb"}
    assert found["Wa"].scope == "the_if/then_branch" and found["Wb"].scope == "the_if/else_branch"
    new = {"Wa": np.zeros((6, 4), np.float32), "Wb": np.ones((6, 4), np.float32)}
    written, stored = write_weights(model, new)
    assert {s.name for s in stored} == {"Wa", "Wb"}
    back = get_weights(written, ["Wa", "Wb"])
    np.testing.assert_array_equal(back["Wa"], 0)
    np.testing.assert_array_equal(back["Wb"], 1)
    onnx.checker.check_model(written)


def test_shape_condition_inlines_the_taken_branch_and_its_weights_get_exact_gradients() -> None:
    model = if_model("shape")
    e, gm, feeds, labels = engine_grads(model, ["W1", "Wa", "Wb", "W2"])
    assert e.fwd.static is not None and e.fwd.static.inlined == {"the_if": "then_branch"}
    assert e.unreached == ("Wb",)
    assert not any(n.op_type == "If" for n in e.fwd.model.graph.node)
    np.testing.assert_array_equal(gm.X[:, gm.layout.slot("Wb").offset : gm.layout.slot("Wb").stop], 0)
    fd_check(gm, model, feeds, labels)


def _mode_feeds(n: int, mode: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((n, 5)).astype(np.float32), "mode": np.full((n, 1), mode, np.int64)}


def test_value_condition_is_decided_by_the_data_and_every_batch_must_agree() -> None:
    model = if_model("value")
    feeds = _mode_feeds(4, 0)
    e = GradientEngine(model, ["W1", "Wa", "Wb", "W2"], example=Batch(feeds, None), loss="mse", method="single")
    assert e.fwd.static is not None and e.fwd.static.inlined == {"the_if": "else_branch"}
    assert [g.node for g in e.guards] == ["the_if"] and e.unreached == ("Wa",)
    e.compute(ArraySource(feeds, batch_size=2))
    mixed = {k: np.concatenate([feeds[k], _mode_feeds(2, 1)[k]]) for k in feeds}
    with pytest.raises(DataError, match=r"calibration block \d+ takes the other branch of If node 'the_if'"):
        e.compute(ArraySource(mixed, batch_size=2))


@pytest.mark.parametrize("outer", [False, True], ids=["constant-in-branch", "initializer-read-by-branch"])
def test_compress_keeps_weights_of_a_branch_the_data_never_takes(
    outer: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = if_model("value", outer)
    assert {t.name: t.scope for t in find_prunable(model)}["Wb"] == ("" if outer else "the_if/else_branch")
    src = tmp_path / "if.onnx"
    onnx.save(model, src)
    data = _mode_feeds(30, 1, seed=3)
    out = tmp_path / "pruned.onnx"
    with caplog.at_level(logging.WARNING, logger="chita_onnx"):
        report = chita_onnx.compress(src, out, data, CompressConfig(sparsity=0.5, holdout=0.2))
    assert "Wb" in caplog.text and "stay unpruned" in caplog.text
    assert {t.name for t in report.tensors} == {"W1", "Wa", "W2"}
    before, after = get_weights(model, ["Wa", "Wb"]), get_weights(onnx.load(out), ["Wa", "Wb"])
    np.testing.assert_array_equal(after["Wb"], before["Wb"])
    assert np.count_nonzero(after["Wa"]) < before["Wa"].size


def test_shapes_that_inference_cannot_see_are_recorded_from_a_run() -> None:
    """com.microsoft's Gelu is unknown to onnx shape inference: BatchNormalization after it needs
    the rank, which comes from one onnxruntime run."""
    w = Init(25)
    nodes = [
        node("MatMul", ["x", w("W1", 5, 6)], ["z"]),
        node("Gelu", ["z"], ["g"], domain="com.microsoft"),
        _bn(w, "g", "b", 6),
        node("Gemm", ["b", w("W2", 3, 6)], ["logits"], transB=1),
    ]
    model = model_of(nodes, [vi("x", ["N", 5])], [vi("logits", ["N", 3])], w.items, 17, ms=True)
    e, gm, feeds, labels = engine_grads(model, ["W1", "W2"])
    assert e.fwd.static is not None and e.fwd.static.recorded >= 1
    assert "BatchNormalization" in e.fwd.rewrites and "com.microsoft.Gelu" in e.fwd.rewrites
    fd_check(gm, model, feeds, labels, h=1e-4, rtol=1e-4)


def test_make_static_without_data_folds_shapes_on_zeros() -> None:
    m = normalize(paddle_style())
    static, info = make_static(m, None, input_shapes={"x": (2, 3, 6, 7)})
    dims = [d.dim_value for d in static.graph.input[0].type.tensor_type.shape.dim]
    assert dims == [2, 3, 6, 7] and info.folded >= 2 and not info.guards


def test_a_folded_scalar_keeps_rank_zero() -> None:
    """A constant scalar computed by the graph (tf2onnx's TFLite ``WHILE`` computes a ``Loop``'s
    condition as ``And(Less(a, b), ...)``) is folded as a rank-0 initializer.  ``np.ascontiguousarray``
    made it ``[1]``, which the Loop's rank-0 condition input then contradicted in shape inference."""
    f = TensorProto.FLOAT
    inits = [
        onnx.numpy_helper.from_array(np.array(2.0, np.float32), "a"),
        onnx.numpy_helper.from_array(np.array(3.0, np.float32), "b"),
        onnx.numpy_helper.from_array(np.ones((4, 2), np.float32), "W"),
    ]
    nodes = [
        helper.make_node("Add", ["a", "b"], ["s"]),
        helper.make_node("Mul", ["x", "s"], ["xs"]),
        helper.make_node("MatMul", ["xs", "W"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "scalar", [helper.make_tensor_value_info("x", f, ["N", 4])],
        [helper.make_tensor_value_info("y", f, ["N", 2])], inits,
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    static, info = make_static(normalize(m), None, input_shapes={"x": (3, 4)}, protect={"W"})
    folded = {t.name: list(t.dims) for t in static.graph.initializer}
    assert info.folded >= 1 and folded["s"] == []
