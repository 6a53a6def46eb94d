"""Layer weights a control-flow body reads (tf2onnx writes a Keras GRU it cannot match to an ONNX
``GRU`` as a ``Loop`` that carries the kernels as loop state): ``compress`` cannot prune them, and
its report must say so instead of leaving them dense in silence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from chita_onnx import CompressConfig, compress
from chita_onnx.weightchains import unprunable_layer_weights


def loop_model(seed: int = 0) -> onnx.ModelProto:
    """``x [N, 8]`` → ``Loop`` (3 trips) ``h ← tanh(h·W + h·U)``, with ``W [8, 8]`` a loop-carried
    operand (passed on unchanged, as tf2onnx carries a recurrent kernel) and ``U [8, 8]`` read from
    the outer scope → ``MatMul`` by ``head [8, 4]`` (prunable)."""
    rng = np.random.default_rng(seed)
    f = TensorProto.FLOAT
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w_in"], ["hw"]),
            helper.make_node("MatMul", ["h_in", "U"], ["hu"]),
            helper.make_node("Add", ["hw", "hu"], ["s"]),
            helper.make_node("Tanh", ["s"], ["h_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Identity", ["w_in"], ["w_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_in", f, ["N", 8]),
            helper.make_tensor_value_info("w_in", f, [8, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("h_out", f, ["N", 8]),
            helper.make_tensor_value_info("w_out", f, [8, 8]),
        ],
    )
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "U"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "head"),
        numpy_helper.from_array(np.array(3, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    nodes = [
        helper.make_node("Loop", ["trips", "cond", "x", "W"], ["h", "w_last"], body=body, name="rnn_loop"),
        helper.make_node("MatMul", ["h", "head"], ["y"], name="head_mm"),
    ]
    io = [helper.make_tensor_value_info("x", f, ["N", 8])], [helper.make_tensor_value_info("y", f, ["N", 4])]
    g = helper.make_graph(nodes, "m", *io, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_weights_read_inside_a_loop_body_are_named() -> None:
    found = unprunable_layer_weights(loop_model(), {"head"})
    assert sorted(found) == [("U", "MatMul in Loop rnn_loop", 64), ("W", "MatMul in Loop rnn_loop", 64)]
    assert unprunable_layer_weights(loop_model(), {"head", "W", "U"}) == []


def test_compress_reports_loop_weights_left_dense(tmp_path: Path) -> None:
    src, out = tmp_path / "loop.onnx", tmp_path / "out.onnx"
    onnx.save(loop_model(3), src)
    x = {"x": np.random.default_rng(4).standard_normal((32, 8)).astype(np.float32)}
    # magnitude: the default's gradient working copy of a Loop model is a separate gap (BENCHMARKS stop 19)
    cfg = CompressConfig(sparsity=0.5, method="magnitude", bn_recalibrate="off", bias_correction="off")
    rep = compress(src, out, x, cfg, eval_data={"x": x["x"][:4]})
    assert [t.name for t in rep.tensors] == ["head"] and rep.nnz == 16
    said = [w for w in rep.warnings if "not prunable" in w]
    assert len(said) == 1 and "2 layer weight tensor(s) with 128 weights" in said[0]
    assert "W (MatMul in Loop rnn_loop, 64)" in said[0] and "U (MatMul in Loop rnn_loop, 64)" in said[0]


def test_default_prunes_a_model_with_a_loop_upstream_of_the_weights(tmp_path: Path) -> None:
    """A Loop upstream of the weights, as tf2onnx writes a Keras GRU: the default prunes layer-wise to
    the exact budget.  The Loop runs a fixed number of times, so its output's shape is static and the
    gradients are built around it (they used to fail, "cannot infer the static shape of the loss
    input", and the default fell back to the magnitude allocation; a model whose gradients cannot be
    built is tests/test_default_fallback.py's)."""
    src, out = tmp_path / "loop.onnx", tmp_path / "out.onnx"
    onnx.save(loop_model(5), src)
    x = {"x": np.random.default_rng(6).standard_normal((48, 8)).astype(np.float32)}
    rep = compress(src, out, x, CompressConfig(sparsity=0.5), eval_data={"x": x["x"][:4]})
    assert rep.method == "layerwise" and rep.nnz == 16
    assert not any("no gradients for this model" in w for w in rep.warnings)
    assert any("not prunable" in w for w in rep.warnings)  # the Loop's W and U, still named
    # the fallback keeps the default's statistics settings (it used to ask for a decision it had no data for)
    assert "Error" not in str(rep.solver["statistics"]), rep.solver["statistics"]


def test_kernels_stored_in_the_body_are_named_and_a_carried_state_is_not() -> None:
    """tf2onnx's TFLite ``WHILE``: the kernels are initializers of the body itself, and the initial
    hidden state is a main-graph zeros tensor carried through the loop and changed by it.  The
    report named the state (a 1×32 "weight") and missed the kernels (5,120 weights of an LSTM)."""
    m = loop_model()
    g = m.graph
    body = next(a.g for a in g.node[0].attribute if a.name == "body")
    rng = np.random.default_rng(1)
    body.initializer.append(numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "V"))
    body.node.insert(0, helper.make_node("MatMul", ["h_in", "V"], ["hv"]))
    body.node[body_index(body, "Add")].input[1] = "hv_hu"
    body.node.insert(1, helper.make_node("Add", ["hv", "hu"], ["hv_hu"]))
    g.initializer.append(numpy_helper.from_array(np.zeros((2, 8), np.float32), "h0"))
    g.node[0].input[2] = "h0"  # the carried state now starts from a stored zeros tensor
    found = {name: (op, size) for name, op, size in unprunable_layer_weights(m, {"head"})}
    assert found == {
        "W": ("MatMul in Loop rnn_loop", 64),
        "U": ("MatMul in Loop rnn_loop", 64),
        "V": ("MatMul in Loop rnn_loop", 64),
    }


def body_index(body: onnx.GraphProto, op: str) -> int:
    return next(i for i, n in enumerate(body.node) if n.op_type == op)


@pytest.mark.parametrize("opset", [8, 11])
def test_a_weight_carried_through_scan_is_named_in_both_scan_forms(opset: int) -> None:
    """Scan carries a weight as a state it passes on unchanged.  Scan-8 puts ``sequence_lens`` before
    the states, so its node input ``i + 1`` is body input ``i``; Scan-9+ has no such input."""
    f = TensorProto.FLOAT
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["x_t", "w_in"], ["y_t"]),
            helper.make_node("Identity", ["w_in"], ["w_out"]),
        ],
        "scan_body",
        [helper.make_tensor_value_info("w_in", f, [8, 8]), helper.make_tensor_value_info("x_t", f, [2, 8])],
        [helper.make_tensor_value_info("w_out", f, [8, 8]), helper.make_tensor_value_info("y_t", f, [2, 8])],
    )
    ins = ["", "W", "x"] if opset == 8 else ["W", "x"]
    scan = helper.make_node("Scan", ins, ["w_last", "ys"], body=body, num_scan_inputs=1, name="scan")
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 8)).astype(np.float32), "W")
    g = helper.make_graph(
        [scan], "m", [helper.make_tensor_value_info("x", f, [3, 2, 8])],
        [helper.make_tensor_value_info("ys", f, [3, 2, 8])], [w],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
    assert unprunable_layer_weights(m, set()) == [("W", "MatMul in Scan scan", 64)]


def counter_loop_model(value_counter: bool = False, seed: int = 0) -> onnx.ModelProto:
    """:func:`loop_model` as tf2onnx writes a Keras ``while`` loop: the trip count is a large constant,
    and the body stops at ``Less(Cast(i), 5) And Less(Cast(t + 1), 3)``, with ``t`` a loop-carried
    counter that starts at 0 (3 trips).  With ``value_counter`` the counter's step is computed from
    ``h`` (always 1 here, but a value could change it)."""
    rng = np.random.default_rng(seed)
    f, i64, i32 = TensorProto.FLOAT, TensorProto.INT64, TensorProto.INT32
    step = (
        [
            helper.make_node("ReduceSum", ["h_in"], ["h_sum"], keepdims=0),
            helper.make_node("Greater", ["h_sum", "floor"], ["h_big"]),
            helper.make_node("Cast", ["h_big"], ["step"], to=i64),
        ]
        if value_counter
        else [helper.make_node("Identity", ["one"], ["step"])]
    )
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["h_in", "w_in"], ["hw"]),
            helper.make_node("MatMul", ["h_in", "U"], ["hu"]),
            helper.make_node("Add", ["hw", "hu"], ["s"]),
            helper.make_node("Tanh", ["s"], ["h_out"]),
            *step,
            helper.make_node("Add", ["t_in", "step"], ["t_out"]),
            helper.make_node("Cast", ["i"], ["i32"], to=i32),
            helper.make_node("Less", ["i32", "five"], ["c1"]),
            helper.make_node("Cast", ["t_out"], ["t32"], to=i32),
            helper.make_node("Less", ["t32", "three"], ["c2"]),
            helper.make_node("And", ["c1", "c2"], ["cond_out"]),
            helper.make_node("Identity", ["w_in"], ["w_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", i64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("t_in", i64, []),
            helper.make_tensor_value_info("h_in", f, ["N", 8]),
            helper.make_tensor_value_info("w_in", f, [8, 8]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("t_out", i64, []),
            helper.make_tensor_value_info("h_out", f, ["N", 8]),
            helper.make_tensor_value_info("w_out", f, [8, 8]),
        ],
        [
            numpy_helper.from_array(np.array(1, dtype=np.int64), "one"),
            numpy_helper.from_array(np.array(5, dtype=np.int32), "five"),
            numpy_helper.from_array(np.array(3, dtype=np.int32), "three"),
            numpy_helper.from_array(np.array(-1e9, dtype=np.float32), "floor"),
        ],
    )
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "W"),
        numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "U"),
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "head"),
        numpy_helper.from_array(np.array(2**31 - 1, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "t0"),
    ]
    nodes = [
        helper.make_node("Loop", ["trips", "cond", "t0", "x", "W"], ["t", "h", "w_last"], body=body, name="rnn_loop"),
        helper.make_node("MatMul", ["h", "head"], ["y"], name="head_mm"),
    ]
    io = [helper.make_tensor_value_info("x", f, ["N", 8])], [helper.make_tensor_value_info("y", f, ["N", 4])]
    m = helper.make_model(helper.make_graph(nodes, "m", *io, inits), opset_imports=[helper.make_opsetid("", 15)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_a_loop_stopped_by_a_carried_counter_has_a_static_shape() -> None:
    """tf2onnx's Keras GRU ``Loop`` (k_gru) stops on a loop-carried time counter; its output's shape
    was taken for value-dependent, so the default got no gradients ("cannot infer the static shape of
    the loss input") and fell back to the magnitude allocation.  A counter stepped by a value stays
    value-dependent."""
    from chita_onnx.gradients.static import classify

    x = np.ones((2, 8), np.float32)
    for value_counter in (False, True):  # both run 3 trips on real data
        m = counter_loop_model(value_counter)
        assert ort.InferenceSession(m.SerializeToString()).run(None, {"x": x})[0].shape == (2, 4)
        assert classify(m.graph).shape_known["h"] is not value_counter


def test_default_gets_gradients_through_a_loop_stopped_by_a_counter(tmp_path: Path) -> None:
    src, out = tmp_path / "loop.onnx", tmp_path / "out.onnx"
    onnx.save(counter_loop_model(seed=7), src)
    x = {"x": np.random.default_rng(8).standard_normal((48, 8)).astype(np.float32)}
    rep = compress(src, out, x, CompressConfig(sparsity=0.5), eval_data={"x": x["x"][:4]})
    assert rep.method == "layerwise" and rep.nnz == 16
    assert not any("no gradients for this model" in w for w in rep.warnings), rep.warnings
    assert any("not prunable" in w for w in rep.warnings)  # the Loop's W and U, still named
