"""Gradients of float16 and float64 models through their float32 twin
(:mod:`chita_onnx.gradients.precision`): the same X as the float32 model whose weights and data
are exactly the values the half-precision model holds, so the default keeps its gradient-based
allocation on such models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.data import ArraySource
from chita_onnx.gradients import per_sample_gradients
from chita_onnx.gradients.precision import float32_twin, needs_twin
from chita_onnx.graph import load_model
from chita_onnx.runtime import session
from chita_onnx.solver.budgets import keep_count


def cnn(elem: int, seed: int = 0) -> onnx.ModelProto:
    """``x [N,2,6,6] → Conv(6, 3×3) → Relu → Flatten → Gemm(5) → Softmax`` in element type ``elem``,
    with a Cast to ``elem`` of a float32 constant on the way (as float16 exports keep some)."""
    rng = np.random.default_rng(seed)
    np_t = helper.tensor_dtype_to_np_dtype(elem)
    # values a float16 holds exactly, so that every precision sees the same numbers
    wc = (rng.standard_normal((6, 2, 3, 3)) / 4).astype(np.float16).astype(np_t)
    wg = (rng.standard_normal((5, 216)) / 15).astype(np.float16).astype(np_t)
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["z"], pads=[1, 1, 1, 1]),
        helper.make_node("Cast", ["half"], ["half_t"], to=elem),
        helper.make_node("Mul", ["z", "half_t"], ["zs"]),
        helper.make_node("Relu", ["zs"], ["r"]),
        helper.make_node("Flatten", ["r"], ["fl"]),
        helper.make_node("Gemm", ["fl", "Wg"], ["logits"], transB=1),
        helper.make_node("Softmax", ["logits"], ["prob"], axis=1),
    ]
    inits = [
        numpy_helper.from_array(wc, "Wc"),
        numpy_helper.from_array(wg, "Wg"),
        numpy_helper.from_array(np.array(0.5, np.float32), "half"),
    ]
    io = (
        [helper.make_tensor_value_info("x", elem, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("prob", elem, ["N", 5])],
    )
    m = helper.make_model(helper.make_graph(nodes, "cnn", *io, inits), opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def data(elem: int, n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((n, 2, 6, 6)).astype(np.float16)
    return x.astype(helper.tensor_dtype_to_np_dtype(elem)), rng.integers(0, 5, n)


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.DOUBLE])
def test_twin_gradients_equal_the_float32_models(elem: int) -> None:
    half, full = cnn(elem), cnn(TensorProto.FLOAT)
    assert needs_twin(half, ["Wc", "Wg"]) and not needs_twin(full, ["Wc", "Wg"])
    twin = float32_twin(half)
    assert {t.data_type for t in twin.graph.initializer} == {TensorProto.FLOAT}
    assert next(n for n in twin.graph.node if n.op_type == "Cast").attribute[0].i == TensorProto.FLOAT
    x, y = data(elem)
    x32, _ = data(TensorProto.FLOAT)
    got = per_sample_gradients(half, ArraySource({"x": x}, labels=y), fisher="empirical").X
    want = per_sample_gradients(full, ArraySource({"x": x32}, labels=y), fisher="empirical").X
    assert np.abs(want).max() > 0
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def test_default_keeps_the_obd_allocation_on_a_float16_model(tmp_path: Path) -> None:
    src, out = tmp_path / "half.onnx", tmp_path / "out.onnx"
    onnx.save(cnn(TensorProto.FLOAT16, seed=4), src)
    x, y = data(TensorProto.FLOAT16, 64)
    rep = chita_onnx.compress(src, out, {"x": x, "labels": y}, CompressConfig(sparsity=0.5))
    assert rep.config["allocation"] == "obd" and not [w for w in rep.warnings if "no gradients" in w]
    assert rep.nnz == keep_count(0.5, 108 + 1080)
    written = onnx.load(out)
    assert {t.data_type for t in written.graph.initializer if t.name in ("Wc", "Wg")} == {TensorProto.FLOAT16}


def test_class_offsets_take_the_logits_type(tmp_path: Path) -> None:
    """A float16 classifier with class offsets on: the offset is stored in the logits' own type (a
    float32 one made the written model unloadable), and the written model runs.  (onnxruntime's CPU
    provider has no float64 Conv, so the float64 model cannot run at all.)"""
    elem = TensorProto.FLOAT16
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(cnn(elem, seed=6), src)
    x, y = data(elem, 64)
    rep = chita_onnx.compress(src, out, {"x": x, "labels": y}, CompressConfig(sparsity=0.5, class_offsets="on"))
    assert "class offsets on" in str(rep.solver["statistics"]), rep.solver["statistics"]
    written = onnx.load(out)
    offsets = [t for t in written.graph.initializer if "class_offset" in t.name]
    assert offsets and {t.data_type for t in offsets} == {elem}
    sess = session(written, what="the written model")
    probs = sess.run(None, {"x": x[:4]})[0]
    assert probs.dtype == helper.tensor_dtype_to_np_dtype(elem) and np.all(np.isfinite(probs))


def test_float64_weights_a_method_keeps_unchanged_are_written_bit_for_bit(tmp_path: Path) -> None:
    """The solvers work in float32; a float64 weight that magnitude pruning keeps unchanged is
    written back with its original float64 value, not its float32 rounding."""
    rng = np.random.default_rng(21)
    f = TensorProto.DOUBLE
    w1, w2 = rng.standard_normal((6, 16)) / 3, rng.standard_normal((16, 4)) / 4  # not float32-exact
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["y"]),
    ]
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")]
    io = [helper.make_tensor_value_info("x", f, ["N", 6])], [helper.make_tensor_value_info("y", f, ["N", 4])]
    m = helper.make_model(helper.make_graph(nodes, "mlp64", *io, inits), opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    src, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x = rng.standard_normal((48, 6))
    cfg = CompressConfig(sparsity=0.5, method="magnitude", bias_correction="off", bn_recalibrate="off")
    rep = chita_onnx.compress(src, out, {"x": x}, cfg)
    assert rep.nnz == keep_count(0.5, 96 + 64)
    written = {t.name: numpy_helper.to_array(t) for t in load_model(out).graph.initializer}  # sparse ones densified
    for name, orig in (("W1", w1), ("W2", w2)):
        kept = written[name] != 0
        assert written[name].dtype == np.float64 and kept.any()
        np.testing.assert_array_equal(written[name][kept], orig[kept])
