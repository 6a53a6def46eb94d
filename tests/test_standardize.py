"""The load-time passes of :mod:`chita_onnx.standardize`: weights that old-IR exporters list as graph
inputs, and weights that layers inside model-local functions read as formal parameters.  Before
them both kinds of model had "no prunable weights".  Each pass is checked for equivalence in
onnxruntime, then end to end through ``compress``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from chita_onnx_cli.main import cli
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from chita_onnx import CompressConfig, compress
from chita_onnx.errors import ModelError
from chita_onnx.graph import find_prunable, load_model
from chita_onnx.standardize import (
    DetachedInputs,
    detach_initializer_inputs,
    inline_functions,
    replace_image_scaler,
    restore_initializer_inputs,
    unfuse_contrib_layers,
)
from chita_onnx.weightchains import expose_weights, unprunable_layer_weights

F = TensorProto.FLOAT


def run(model: onnx.ModelProto, x: np.ndarray, *, basic: bool = False) -> np.ndarray:
    """``model``'s first output on ``x``; ``basic``: without onnxruntime's layout optimizations (its
    NCHWc rewrite fails on a hand-written FusedConv with a residual input of 4 channels)."""
    so = ort.SessionOptions()
    if basic:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    out: np.ndarray = sess.run(None, {"x": x})[0]
    return out


def old_ir_model(seed: int = 0) -> onnx.ModelProto:
    """IR 3 / opset 9, as caffe2-era converters wrote it: ``x [N, 2, 6, 6]`` → Conv (4 filters 3×3)
    → Relu → Flatten → Gemm ``[64, 5]`` (transB=0), every initializer also a graph input."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 2, 3, 3)) / 3).astype(np.float32), "conv_w"),
        numpy_helper.from_array((rng.standard_normal(4) / 10).astype(np.float32), "conv_b"),
        numpy_helper.from_array((rng.standard_normal((64, 5)) / 8).astype(np.float32), "fc_w"),
        numpy_helper.from_array((rng.standard_normal(5) / 10).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"]),
    ]
    inputs = [helper.make_tensor_value_info("x", F, ["N", 2, 6, 6])]
    inputs += [helper.make_tensor_value_info(t.name, F, list(t.dims)) for t in inits]
    g = helper.make_graph(nodes, "old", inputs, [helper.make_tensor_value_info("y", F, ["N", 5])], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 9)])
    m.ir_version = 3
    onnx.checker.check_model(m)
    return m


def function_model(seed: int = 0) -> onnx.ModelProto:
    """``x [N, 6]`` → ``Block(x, W1, b1)`` → ``Block(·, W2, b2)`` → ``Head(·)``, where the local
    function ``Block`` calls the local function ``Dense`` (MatMul + Add) and then Relu, and ``Head``
    holds its ``[8, 3]`` weight as a Constant node inside its body (as onnxscript writes one)."""
    rng = np.random.default_rng(seed)
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("lib", 1)]
    dense = helper.make_function(
        "lib",
        "Dense",
        ["x", "W", "b"],
        ["y"],
        [helper.make_node("MatMul", ["x", "W"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])],
        ops,
    )
    block = helper.make_function(
        "lib",
        "Block",
        ["x", "W", "b"],
        ["y"],
        [helper.make_node("Dense", ["x", "W", "b"], ["d"], domain="lib"), helper.make_node("Relu", ["d"], ["y"])],
        ops,
    )
    head_w = numpy_helper.from_array((rng.standard_normal((8, 3)) / 3).astype(np.float32), "hw")
    head = helper.make_function(
        "lib",
        "Head",
        ["x"],
        ["y"],
        [helper.make_node("Constant", [], ["hw"], value=head_w), helper.make_node("MatMul", ["x", "hw"], ["y"])],
        ops,
    )
    inits = [
        numpy_helper.from_array((rng.standard_normal((6, 8)) / 2).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal(8) / 10).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "W2"),
        numpy_helper.from_array((rng.standard_normal(8) / 10).astype(np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("Block", ["x", "W1", "b1"], ["h1"], domain="lib", name="block1"),
        helper.make_node("Block", ["h1", "W2", "b2"], ["h2"], domain="lib", name="block2"),
        helper.make_node("Head", ["h2"], ["y"], domain="lib", name="head"),
    ]
    io = [helper.make_tensor_value_info("x", F, ["N", 6])], [helper.make_tensor_value_info("y", F, ["N", 3])]
    g = helper.make_graph(nodes, "fn", *io, inits)
    m = helper.make_model(g, opset_imports=ops, functions=[dense, block, head])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def test_detached_initializer_inputs_give_the_same_outputs_and_are_prunable() -> None:
    m = old_ir_model(1)
    assert find_prunable(m) == []  # overridable inputs: nothing is a constant
    out = detach_initializer_inputs(m)
    assert [i.name for i in out.graph.input] == ["x"] and out.ir_version == 4
    assert [i.name for i in m.graph.input] == ["x", "conv_w", "conv_b", "fc_w", "fc_b"]  # the input is not touched
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(2).standard_normal((5, 2, 6, 6)).astype(np.float32)
    np.testing.assert_array_equal(run(out, x), run(m, x))
    assert [t.name for t in find_prunable(out)] == ["conv_w", "fc_w"]
    assert detach_initializer_inputs(out) is out  # nothing left to do
    record = DetachedInputs()
    back = restore_initializer_inputs(detach_initializer_inputs(m, record=record), record)
    assert [i.name for i in back.graph.input] == [i.name for i in m.graph.input] and back.ir_version == 3
    np.testing.assert_array_equal(run(back, x), run(m, x))


def test_inlined_functions_give_the_same_outputs_and_expose_every_weight() -> None:
    m = function_model(3)
    assert find_prunable(m) == []  # the layers read formal parameters
    out = inline_functions(m)
    assert not out.functions and {n.op_type for n in out.graph.node} == {"MatMul", "Add", "Relu", "Constant"}
    onnx.checker.check_model(out, full_check=True)
    x = np.random.default_rng(4).standard_normal((7, 6)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(m, x), rtol=0, atol=0)
    found = find_prunable(out)
    assert [t.shape for t in found] == [(6, 8), (8, 8), (8, 3)]
    assert [t.source for t in found] == ["initializer", "initializer", "constant"]
    assert inline_functions(out) is out


def test_a_malformed_local_function_is_one_model_error(tmp_path: Path) -> None:
    ops = [helper.make_opsetid("", 17), helper.make_opsetid("lib", 1)]
    fn = helper.make_function("lib", "Twice", ["a"], ["b"], [helper.make_node("Relu", ["a"], ["b"])], ops)
    node = helper.make_node("Twice", ["x", "x", "x"], ["y"], domain="lib")  # 3 actual parameters, 1 formal
    io = [helper.make_tensor_value_info("x", F, ["N", 6])], [helper.make_tensor_value_info("y", F, ["N", 6])]
    m = helper.make_model(helper.make_graph([node], "bad", *io), opset_imports=ops, functions=[fn])
    with pytest.raises(ModelError, match=r"cannot inline the model's local functions \(lib\.Twice\)"):
        inline_functions(m, "bad.onnx")
    src = tmp_path / "bad.onnx"
    onnx.save(m, src)
    np.savez(tmp_path / "calib.npz", x=np.zeros((8, 6), np.float32))
    args = [
        "compress",
        str(src),
        str(tmp_path / "out.onnx"),
        "--sparsity",
        "0.5",
        "--data",
        str(tmp_path / "calib.npz"),
    ]
    result = CliRunner().invoke(cli, args)
    said = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(said) == 1 and str(src) in said[0] and "lib.Twice" in said[0]
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.parametrize("kind", ["old_ir", "functions"])
def test_compress_prunes_both_kinds_to_the_exact_budget(tmp_path: Path, kind: str) -> None:
    """The default end to end: every weight in the budget, the written file loads in onnxruntime and
    keeps the dense model's decisions on most inputs, and the input file is left as it was."""
    shape: tuple[int, ...]
    if kind == "old_ir":
        m, shape = old_ir_model(5), (96, 2, 6, 6)
    else:
        m, shape = function_model(5), (96, 6)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    before = src.read_bytes()
    x = np.random.default_rng(6).standard_normal(shape).astype(np.float32)
    rep = compress(src, out, {"x": x[:64]}, CompressConfig(sparsity=0.5), eval_data={"x": x[64:]})
    p = sum(t.size for t in find_prunable(load_model(src)))
    assert p > 0 and rep.nnz == round(0.5 * p)
    written = load_model(out)
    weights = {t.name: numpy_helper.to_array(t) for t in written.graph.initializer}
    weights |= {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in written.graph.node if n.op_type == "Constant"
    }
    assert sum(int(np.count_nonzero(weights[t.name])) for t in find_prunable(written)) == rep.nnz
    assert src.read_bytes() == before
    agree = (run(written, x[64:]).argmax(1) == run(m, x[64:]).argmax(1)).mean()
    assert agree >= 0.75
    raw = onnx.load(out)  # the written file keeps the input's interface and IR version
    assert [i.name for i in raw.graph.input] == [i.name for i in m.graph.input] and raw.ir_version == m.ir_version
    assert not raw.graph.sparse_initializer or kind != "old_ir"  # IR 3 has no sparse initializers
    onnx.checker.check_model(raw)
    if kind == "old_ir":  # even when sparse storage is asked for, an IR 3 input gets dense inputs back
        cfg = CompressConfig(sparsity=0.9, storage="sparse")
        sparse_rep = compress(src, out, {"x": x[:64]}, cfg, eval_data={"x": x[64:]})
        assert {t.storage for t in sparse_rep.tensors} == {"dense"}  # the report says what the file holds
        assert not [w for w in sparse_rep.warnings if "sparse_initializer" in w]
        raw = onnx.load(out)
        assert raw.ir_version == 3 and not raw.graph.sparse_initializer
        assert [i.name for i in raw.graph.input] == [i.name for i in m.graph.input]
        run(raw, x[:4])


def test_channel_pruning_keeps_initializer_inputs_with_their_new_shapes(tmp_path: Path) -> None:
    """``--structure channel`` on an IR 3 model: the written file lists every initializer as an
    input again, in the input's order and IR version, each typed with its sliced shape."""
    m = old_ir_model(7)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x = np.random.default_rng(8).standard_normal((96, 2, 6, 6)).astype(np.float32)
    cfg = CompressConfig(sparsity=0.5, structure="channel", channel_multiple=1, latency_check=False)
    compress(src, out, {"x": x[:64]}, cfg, eval_data={"x": x[64:]})
    raw = onnx.load(out)
    assert raw.ir_version == 3
    assert [i.name for i in raw.graph.input] == [i.name for i in m.graph.input]
    shapes = {t.name: list(t.dims) for t in raw.graph.initializer}
    assert shapes["conv_w"][0] < 4  # channels were removed ...
    for v in raw.graph.input[1:]:  # ... and every listed input has its tensor's new shape
        assert [d.dim_value for d in v.type.tensor_type.shape.dim] == shapes[v.name]
    onnx.checker.check_model(raw)
    assert run(raw, x[:4]).shape == (4, 5)


# ------------------------------------------------------------------ onnxruntime's fused layers


def fused_model(opset: int = 17, seed: int = 0) -> onnx.ModelProto:
    """``x [N, 3, 8, 8]`` through every fused form onnxruntime's optimizer writes: FusedConv with
    Relu, LeakyRelu, Clip (with a residual ``Z``), HardSigmoid and none; then Flatten → FusedGemm
    (transB=1, alpha, beta, LeakyRelu via ``activation_alpha``) → FusedGemm (no bias: before opset
    11 the standard Gemm needs one) → FusedMatMul (transB=1, alpha=0.5)."""
    rng = np.random.default_rng(seed)

    def w(*shape: int) -> np.ndarray:
        return np.asarray(rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:])), np.float32)

    inits = {
        "c1": w(4, 3, 3, 3),
        "c1b": w(4),
        "c2": w(4, 4, 3, 3),
        "c3": w(4, 4, 3, 3),
        "c3b": w(4),
        "c4": w(4, 4, 1, 1),
        "c5": w(2, 4, 3, 3),
        "g1": w(16, 18),
        "g1b": w(16),
        "g2": w(16, 12),
        "m1": w(6, 12),
    }
    ms = "com.microsoft"
    conv: dict[str, Any] = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}
    nodes = [
        helper.make_node("FusedConv", ["x", "c1", "c1b"], ["a1"], domain=ms, activation="Relu", **conv),
        helper.make_node(
            "FusedConv", ["a1", "c2"], ["a2"], domain=ms, activation="LeakyRelu", activation_params=[0.1], **conv
        ),
        helper.make_node(
            "FusedConv",
            ["a2", "c3", "c3b", "a1"],
            ["a3"],
            domain=ms,
            activation="Clip",
            activation_params=[0.0, 6.0],
            **conv,
        ),
        helper.make_node(
            "FusedConv",
            ["a3", "c4"],
            ["a4"],
            domain=ms,
            activation="HardSigmoid",
            activation_params=[0.3, 0.4],
            kernel_shape=[1, 1],
        ),
        helper.make_node("FusedConv", ["a4", "c5"], ["a5"], domain=ms, strides=[2, 2], kernel_shape=[3, 3]),
        helper.make_node("Flatten", ["a5"], ["f"]),
        helper.make_node(
            "FusedGemm",
            ["f", "g1", "g1b"],
            ["h1"],
            domain=ms,
            transB=1,
            alpha=0.7,
            beta=1.3,
            activation="LeakyRelu",
            activation_alpha=0.2,
        ),
        helper.make_node("FusedGemm", ["h1", "g2"], ["h2"], domain=ms, activation="Tanh"),
        helper.make_node("FusedMatMul", ["h2", "m1"], ["y"], domain=ms, transB=1, alpha=0.5),
    ]
    io = [helper.make_tensor_value_info("x", F, ["N", 3, 8, 8])], [helper.make_tensor_value_info("y", F, ["N", 6])]
    g = helper.make_graph(nodes, "fused", *io, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ms, 1)])
    m.ir_version = 8
    return m


@pytest.mark.parametrize("opset", [9, 17])
def test_unfused_layers_give_the_same_outputs_and_expose_every_weight(opset: int) -> None:
    m = fused_model(opset, seed=opset)
    assert find_prunable(m) == []
    out = unfuse_contrib_layers(m)
    assert not [n for n in out.graph.node if n.domain == "com.microsoft"]
    assert sum(n.op_type == "Clip" for n in out.graph.node) == 1
    x = np.random.default_rng(8).standard_normal((5, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(run(out, x, basic=True), run(m, x, basic=True), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(run(out, x), run(m, x, basic=True), rtol=1e-5, atol=1e-6)
    exposed = find_prunable(expose_weights(out)[0])  # m1 is read behind a Transpose (transB=1)
    assert sorted(t.name for t in exposed) == ["c1", "c2", "c3", "c4", "c5", "g1", "g2", "m1"]
    assert unfuse_contrib_layers(out) is out


def test_a_fused_layer_without_a_standard_form_is_left_alone() -> None:
    m = fused_model()
    g = m.graph
    next(a for a in g.node[0].attribute if a.name == "activation").s = b"ScaledTanh"  # onnxruntime-only
    for a in g.node[-1].attribute:
        if a.name == "transB":
            a.i = 0
    g.node[-1].attribute.append(helper.make_attribute("transBatchB", 1))
    out = unfuse_contrib_layers(m)
    left = [n.op_type for n in out.graph.node if n.domain == "com.microsoft"]
    assert left == ["FusedConv", "FusedMatMul"]
    named = unprunable_layer_weights(out, {t.name for t in find_prunable(out)})
    assert [(n, op) for n, op, _ in named] == [("c1", "FusedConv"), ("m1", "FusedMatMul")]


def test_an_onnxruntime_optimized_model_is_pruned_like_the_original(tmp_path: Path) -> None:
    """A CNN saved by onnxruntime after its optimizations (FusedConv/FusedGemm) prunes every weight
    of the original, to the exact budget, and the written model runs in onnxruntime."""
    rng = np.random.default_rng(9)
    m = old_ir_model(9)
    plain = detach_initializer_inputs(m)
    plain.graph.node.insert(4, helper.make_node("Relu", ["y"], ["z"]))
    plain.graph.output[0].name = "z"
    src, opt, out = tmp_path / "plain.onnx", tmp_path / "opt.onnx", tmp_path / "out.onnx"
    onnx.save(plain, src)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(opt)
    ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    saved = onnx.load(opt)
    assert {n.op_type for n in saved.graph.node if n.domain == "com.microsoft"} == {"FusedConv", "FusedGemm"}
    x = rng.standard_normal((96, 2, 6, 6)).astype(np.float32)
    rep = compress(opt, out, {"x": x[:64]}, CompressConfig(sparsity=0.5), eval_data={"x": x[64:]})
    p = sum(t.size for t in find_prunable(load_model(src)))
    assert p == 4 * 2 * 9 + 64 * 5 and rep.nnz == round(0.5 * p)
    assert rep.evaluation is not None and rep.evaluation.agreement is not None and rep.evaluation.agreement >= 0.75


def test_image_scaler_is_replaced_exactly_and_gradients_follow(tmp_path: Path) -> None:
    """Tiny YOLOv2's opening ImageScaler (opset 8): the same outputs as Mul + Add, and the default
    keeps its gradient-based allocation (before, the version converter stopped at the op)."""
    rng = np.random.default_rng(12)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 3, 3, 3)) / 4).astype(np.float32), "Wc"),
        numpy_helper.from_array((rng.standard_normal((5, 64)) / 8).astype(np.float32), "Wg"),
        numpy_helper.from_array(np.zeros(5, np.float32), "bg"),
    ]
    nodes = [
        helper.make_node("ImageScaler", ["x"], ["s"], scale=0.7, bias=[0.1, -0.2, 0.3]),
        helper.make_node("Conv", ["s", "Wc"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Flatten", ["r"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg", "bg"], ["y"], transB=1),
    ]
    io = [helper.make_tensor_value_info("x", F, ["N", 3, 4, 4])], [helper.make_tensor_value_info("y", F, ["N", 5])]
    m = helper.make_model(helper.make_graph(nodes, "yolo", *io, inits), opset_imports=[helper.make_opsetid("", 8)])
    m.ir_version = 4
    out = replace_image_scaler(m)
    assert [n.op_type for n in out.graph.node][:2] == ["Mul", "Add"] and replace_image_scaler(out) is out
    x = rng.standard_normal((6, 3, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(run(out, x), run(m, x), rtol=1e-6, atol=1e-6)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    xs = rng.standard_normal((48, 3, 4, 4)).astype(np.float32)
    rep = compress(src, dst, {"x": xs}, CompressConfig(sparsity=0.5), eval_data={"x": xs[:8]})
    assert rep.config["allocation"] == "obd" and not [w for w in rep.warnings if "no gradients" in w]
    assert rep.nnz == round(0.5 * (108 + 320))


@pytest.mark.parametrize(("opset", "elem"), [(8, TensorProto.FLOAT16), (6, F)])
def test_image_scaler_keeps_the_image_type_and_old_opsets(opset: int, elem: int) -> None:
    """The scale and bias take the image's own type (a float16 model stays valid); before opset 7
    (Mul/Add broadcast by attribute) the node is left as it is."""
    np_t = helper.tensor_dtype_to_np_dtype(elem)
    node = helper.make_node("ImageScaler", ["x"], ["y"], scale=0.5, bias=[1.0, 2.0, 3.0])
    io = (
        [helper.make_tensor_value_info("x", elem, ["N", 3, 2, 2])],
        [helper.make_tensor_value_info("y", elem, ["N", 3, 2, 2])],
    )
    m = helper.make_model(helper.make_graph([node], "s", *io), opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = 4
    out = replace_image_scaler(m)
    if opset < 7:
        assert out is m
        return
    assert {t.data_type for t in out.graph.initializer} == {elem}
    x = np.random.default_rng(14).standard_normal((2, 3, 2, 2)).astype(np_t)
    np.testing.assert_allclose(run(out, x), run(m, x), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------ onnxruntime's fused Attention


def ms_attention_model(seed: int = 0) -> onnx.ModelProto:
    """``x [N, 6, 8]`` → ``com.microsoft.Attention`` (2 heads, Q/K/V weight ``[8, 24]`` and bias) → mean
    over the sequence → MatMul ``[8, 3]``: a BERT layer as onnxruntime's transformer optimizer writes it."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((0.5 * rng.standard_normal((8, 24))).astype(np.float32), "qkv_w"),
        numpy_helper.from_array((0.1 * rng.standard_normal(24)).astype(np.float32), "qkv_b"),
        numpy_helper.from_array((0.5 * rng.standard_normal((8, 3))).astype(np.float32), "out_w"),
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
    ]
    nodes = [
        helper.make_node("Attention", ["x", "qkv_w", "qkv_b"], ["a"], domain="com.microsoft", num_heads=2, name="att"),
        helper.make_node("ReduceMean", ["a", "axis1"], ["m"], keepdims=0),
        helper.make_node("MatMul", ["m", "out_w"], ["y"]),
    ]
    g = helper.make_graph(
        nodes, "msattn", [helper.make_tensor_value_info("x", F, ["N", 6, 8])],
        [helper.make_tensor_value_info("y", F, ["N", 3])], inits,
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 8
    return m


def test_split_attention_projection_is_exact_and_restores_the_fused_node() -> None:
    from chita_onnx.standardize import restore_attention_projections, split_attention_projections

    m = ms_attention_model(1)
    x = np.random.default_rng(2).standard_normal((5, 6, 8)).astype(np.float32)
    rec = DetachedInputs()
    split = split_attention_projections(m, record=rec)
    assert [r.weight for r in rec.projections] == ["qkv_w"]
    assert any(n.op_type == "MatMul" and list(n.input) == ["x", "qkv_w"] for n in split.graph.node)
    assert "qkv_w" in {t.name for t in find_prunable(split)} and "qkv_w" not in {t.name for t in find_prunable(m)}
    np.testing.assert_allclose(run(split, x), run(m, x), rtol=1e-5, atol=1e-5)
    back = restore_attention_projections(split, rec)
    assert [(n.op_type, list(n.input)) for n in back.graph.node] == [(n.op_type, list(n.input)) for n in m.graph.node]
    assert {t.name for t in back.graph.initializer} == {t.name for t in m.graph.initializer}


@pytest.mark.parametrize("bias_correction", ["off", "on"])
def test_an_onnxruntime_attention_weight_is_pruned_and_written_back_fused(tmp_path: Path, bias_correction: str) -> None:
    """The fused Q/K/V weight is in the budget, the written model has the input's nodes (the bias
    correction's shift folded into the node's bias), and it loads and keeps most decisions."""
    m = ms_attention_model(3)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x = np.random.default_rng(4).standard_normal((96, 6, 8)).astype(np.float32)
    method = "magnitude" if bias_correction == "on" else "auto"
    cfg = CompressConfig(sparsity=0.5, bias_correction=bias_correction, method=method)
    rep = compress(src, out, {"x": x[:64]}, cfg, eval_data={"x": x[64:]})
    assert rep.p == 8 * 24 + 8 * 3 and rep.nnz == round(0.5 * rep.p)
    assert not [w for w in rep.warnings if "not prunable" in w]
    written = onnx.load(out)  # as written (load_model would split it again)
    nodes = [(n.op_type, list(n.input)) for n in written.graph.node]
    assert nodes[0] == ("Attention", ["x", "qkv_w", "qkv_b"]) and not [n for n in nodes[1:] if "qkv_w" in n[1]]
    assert not [t.name for t in written.graph.initializer if "identity" in t.name or t.name == "qkv_w_bias"]
    b0, b1 = (
        numpy_helper.to_array(next(t for t in g.initializer if t.name == "qkv_b")) for g in (m.graph, written.graph)
    )
    if bias_correction == "off":
        assert nodes == [(n.op_type, list(n.input)) for n in m.graph.node]
        np.testing.assert_array_equal(b0, b1)
    else:  # the shift on the projection is in the fused node's bias now
        assert not np.allclose(b0, b1)
    w = numpy_helper.to_array(next(t for t in written.graph.initializer if t.name == "qkv_w"))
    assert 0 < np.count_nonzero(w) < w.size
    if bias_correction == "off":  # the default: layer-wise on the projection's own rows
        assert (run(written, x[64:]).argmax(1) == run(m, x[64:]).argmax(1)).mean() >= 0.7


def test_restoring_folds_a_shift_on_the_projection_into_the_fused_bias() -> None:
    """``Attention(MatMul(x, W) + c, I, b)`` is written back as ``Attention(x, W, b + c)``: exactly."""
    from chita_onnx.standardize import restore_attention_projections, split_attention_projections

    m = ms_attention_model(5)
    rec = DetachedInputs()
    split = split_attention_projections(m, record=rec)
    r = rec.projections[0]
    mm = next(n for n in split.graph.node if n.op_type == "MatMul" and list(n.output) == [r.projected])
    mm.output[0] = r.projected + "_unbiased"  # what the bias correction writes
    shift = np.random.default_rng(6).standard_normal(24).astype(np.float32)
    split.graph.initializer.append(numpy_helper.from_array(shift, "shift"))
    at = next(i for i, n in enumerate(split.graph.node) if n is mm) + 1
    split.graph.node.insert(at, helper.make_node("Add", [r.projected + "_unbiased", "shift"], [r.projected]))
    x = np.random.default_rng(7).standard_normal((4, 6, 8)).astype(np.float32)
    want = run(split, x)
    back = restore_attention_projections(split, rec)
    assert [n.op_type for n in back.graph.node] == [n.op_type for n in m.graph.node]
    np.testing.assert_allclose(run(back, x), want, rtol=1e-5, atol=1e-5)


def test_a_sparse_stored_attention_weight_is_still_written_back_fused(tmp_path: Path) -> None:
    """Sparse storage moves the pruned Q/K/V weight to ``sparse_initializer`` before the fused node is
    put back; the node must still be restored (it was left split, with a dense 3H×3H identity)."""
    m = ms_attention_model(3)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x = np.random.default_rng(4).standard_normal((96, 6, 8)).astype(np.float32)
    compress(src, out, {"x": x[:64]}, CompressConfig(sparsity=0.9, storage="sparse"), eval_data={"x": x[64:]})
    written = onnx.load(out)
    assert [(n.op_type, list(n.input)) for n in written.graph.node] == [
        (n.op_type, list(n.input)) for n in m.graph.node
    ]
    assert "qkv_w" in {sp.values.name for sp in written.graph.sparse_initializer}
    assert not [t.name for t in written.graph.initializer if "identity" in t.name]
    assert run(written, x[64:]).shape == (32, 3)


def test_channel_pruning_counts_the_parameters_of_the_written_attention_model(tmp_path: Path) -> None:
    """The identity stand-in of a split Attention is not a parameter of the input or of the output."""
    m = ms_attention_model(3)
    rng = np.random.default_rng(0)
    m.graph.initializer.append(numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w0"))
    m.graph.node.insert(0, helper.make_node("MatMul", ["x", "w0"], ["h0"]))
    m.graph.node.insert(1, helper.make_node("Relu", ["h0"], ["h"]))
    m.graph.node[2].input[0] = "h"
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x = rng.standard_normal((96, 6, 8)).astype(np.float32)
    cfg = CompressConfig(sparsity=0.5, structure="channel", channel_multiple=1, latency_check=False)
    rep = compress(src, out, {"x": x[:64]}, cfg, eval_data={"x": x[64:]})

    def floats(model: onnx.ModelProto) -> int:
        return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type == F)

    assert rep.structured.params_before == floats(m) == 8 * 8 + 8 * 24 + 24 + 8 * 3
    assert rep.structured.params_after == floats(onnx.load(out))
    # FLOPs of one sample [1, 6, 8]: x·w0, the fused node's Q/K/V projection x·W (which the restored
    # node alone would hide), and the head; not the identity stand-in
    assert rep.structured.flops_before == 2 * (6 * 8 * 8 + 6 * 8 * 24 + 8 * 3)


@pytest.mark.parametrize(("axis", "bias"), [(-1, True), (2, False), (-2, True)])
def test_layer_norm_below_opset_17_is_written_as_primitive_ops(tmp_path: Path, axis: int, bias: bool) -> None:
    """onnxruntime's optimizer writes LayerNormalization into opset-11 models (it runs it as its own
    extension), which onnx.checker refused: now the file loads, computes what onnxruntime computes
    for the original, and is pruned with gradients."""
    rng = np.random.default_rng(21)
    norm_dims = [3, 8] if axis == -2 else [8]
    inits = [
        numpy_helper.from_array((rng.standard_normal((6, 8)) / 2).astype(np.float32), "W1"),
        numpy_helper.from_array((1 + 0.2 * rng.standard_normal(norm_dims)).astype(np.float32), "g"),
        numpy_helper.from_array((0.1 * rng.standard_normal(norm_dims)).astype(np.float32), "b"),
        numpy_helper.from_array((rng.standard_normal((24, 4)) / 4).astype(np.float32), "W2"),
        numpy_helper.from_array(np.asarray([-1, 24], np.int64), "flat"),
    ]
    ln_inputs = ["h", "g", "b"] if bias else ["h", "g"]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("LayerNormalization", ln_inputs, ["n"], axis=axis, epsilon=1e-3),
        helper.make_node("Reshape", ["n", "flat"], ["f"]),
        helper.make_node("MatMul", ["f", "W2"], ["y"]),
    ]
    io = [helper.make_tensor_value_info("x", F, ["N", 3, 6])], [helper.make_tensor_value_info("y", F, ["N", 4])]
    m = helper.make_model(helper.make_graph(nodes, "ortopt", *io, inits), opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 6
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(m)
    loaded = load_model(src)
    assert "LayerNormalization" not in {n.op_type for n in loaded.graph.node}
    x = rng.standard_normal((5, 3, 6)).astype(np.float32)
    np.testing.assert_allclose(run(loaded, x), run(m, x), rtol=1e-5, atol=1e-5)  # onnxruntime runs both
    xs = rng.standard_normal((40, 3, 6)).astype(np.float32)
    rep = compress(src, dst, {"x": xs}, CompressConfig(sparsity=0.5), eval_data={"x": xs[:8]})
    assert rep.config["allocation"] == "obd" and rep.nnz == round(0.5 * (48 + 96))
    onnx.checker.check_model(onnx.load(dst))


def squeeze_head_model(seed: int = 0, *, state: bool = False) -> onnx.ModelProto:
    """Opset 9, as torch 1.9 exported AECMOS's head: ``x [N, 1, 6]`` → MatMul ``[6, 8]`` → Sigmoid →
    MatMul ``[8, 4]`` → ``Squeeze`` without axes → Slice 0:2 (× 4 + 1) and Slice 2:4 → Concat on
    axis 0 → ``y [N]`` (the exporter's declared shape; really ``[4]`` per sample).  ``state``: the
    MatMuls become a GRU (hidden 8) over ``x`` as one step of batch N, from a static ``h0 [1, 1, 8]``
    that pins the batch to one sample at run time, as AECMOS's GRU state does."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "w2"),
        numpy_helper.from_array(np.array(4.0, np.float32), "four"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one"),
    ]
    inputs = [helper.make_tensor_value_info("x", F, ["N", 1, 6])]
    if state:
        inits += [
            numpy_helper.from_array((rng.standard_normal((1, 24, 6)) / 2).astype(np.float32), "gru_w"),
            numpy_helper.from_array((rng.standard_normal((1, 24, 8)) / 3).astype(np.float32), "gru_r"),
        ]
        inputs.append(helper.make_tensor_value_info("h0", F, [1, 1, 8]))
        nodes = [
            helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),
            helper.make_node("GRU", ["xt", "gru_w", "gru_r", "", "", "h0"], ["", "hn"], hidden_size=8),
            helper.make_node("Transpose", ["hn"], ["a"], perm=[1, 0, 2]),
        ]
    else:
        inits.append(numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "w1"))
        nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Sigmoid", ["h"], ["a"])]
    nodes += [
        helper.make_node("MatMul", ["a", "w2"], ["z"]),
        helper.make_node("Squeeze", ["z"], ["s"], name="Squeeze_41"),
        helper.make_node("Slice", ["s"], ["m"], axes=[0], starts=[0], ends=[2]),
        helper.make_node("Mul", ["m", "four"], ["m4"]),
        helper.make_node("Add", ["m4", "one"], ["mos"]),
        helper.make_node("Slice", ["s"], ["rest"], axes=[0], starts=[2], ends=[4]),
        helper.make_node("Concat", ["mos", "rest"], ["y"], axis=0),
    ]
    out = [helper.make_tensor_value_info("y", F, ["N"])]
    m = helper.make_model(
        helper.make_graph(nodes, "aec_head", inputs, out, inits), opset_imports=[helper.make_opsetid("", 9)]
    )
    m.ir_version = 4
    return m


def test_squeeze_without_axes_is_written_as_reshape(tmp_path: Path) -> None:
    """onnxruntime 1.19 refused the model outright ("rank must be greater than axis" at the Concat:
    its shape inference gives an open Squeeze a rank-0 output), so compress could not even measure
    it; load_model now writes the Squeeze as a Reshape to the same values, and every command runs."""
    from chita_onnx.evaluate import make_session

    m = squeeze_head_model()
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    rng = np.random.default_rng(1)
    xs = rng.standard_normal((24, 1, 6)).astype(np.float32)
    w1 = numpy_helper.to_array(next(t for t in m.graph.initializer if t.name == "w1"))
    w2 = numpy_helper.to_array(m.graph.initializer[0])
    sess = make_session(src)  # before: ModelError, onnxruntime 1.19.2 cannot load it
    assert "Squeeze" not in [n.op_type for n in load_model(src).graph.node]
    for x in xs[:4]:
        s = np.squeeze((1 / (1 + np.exp(-(x[None] @ w1)))) @ w2)
        np.testing.assert_allclose(sess.run(None, {"x": x[None]})[0], np.concatenate([s[:2] * 4 + 1, s[2:]]), rtol=1e-5)
    rep = compress(src, dst, {"x": xs}, CompressConfig(sparsity=0.5))
    assert rep.nnz < 0.6 * (48 + 32)
    out = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).run(None, {"x": xs[:1]})[0]
    assert out.shape == (4,)


def test_one_sample_output_without_a_batch_axis_is_kept_whole(tmp_path: Path) -> None:
    """A model that runs one sample at a time (its static GRU state has batch 1) and squeezes the batch
    away returns ``[4]`` per sample, declared ``[N]``: the evaluation kept only the first of the four
    values (axis 0 taken as the batch), so compress's before/after check compared echo MOS alone."""
    from chita_onnx.data import ArraySource, static_names
    from chita_onnx.evaluate import make_session, run_outputs
    from chita_onnx.graph import model_inputs

    m = squeeze_head_model(3, state=True)
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    rng = np.random.default_rng(4)
    xs = rng.standard_normal((5, 1, 6)).astype(np.float32)
    h0 = rng.standard_normal((1, 1, 8)).astype(np.float32)
    specs = model_inputs(load_model(src))
    source = ArraySource({"x": xs, "h0": h0}, batch_size=4, static=static_names(specs))
    sess = make_session(src)
    outs, _ = run_outputs(sess, source, specs, ["y"])
    want = np.stack([sess.run(None, {"x": x[None], "h0": h0})[0] for x in xs])
    assert want.shape == (5, 4) and outs["y"].shape == (5, 4)
    np.testing.assert_allclose(outs["y"], want, rtol=1e-6)


def test_layerwise_runs_one_sample_at_a_time_when_a_static_state_pins_the_batch(tmp_path: Path) -> None:
    """The GRU's static state ``h0 [1, 1, 8]`` fits one sample only: the layer-wise pass ran it on a
    batch of calibration samples, onnxruntime failed ("Input initial_h must have shape {1,N,8}")
    and the default fell back to one-shot chita; its batches are now of one sample."""
    m = squeeze_head_model(5, state=True)
    src, dst = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    rng = np.random.default_rng(6)
    xs = rng.standard_normal((40, 1, 6)).astype(np.float32)
    h0 = rng.standard_normal((1, 1, 8)).astype(np.float32)
    rep = compress(src, dst, {"x": xs, "h0": h0}, CompressConfig(sparsity=0.5))
    assert rep.method == "layerwise"
    assert rep.nnz == round(0.5 * (144 + 192 + 32))


def test_squeeze_that_onnxruntime_loads_is_left_alone() -> None:
    """plcmos's open squeezes (opset 11) load: nothing after them checks a rank, so the graph stays."""
    from chita_onnx.standardize import reshape_open_squeezes

    nodes = [helper.make_node("Squeeze", ["x"], ["s"]), helper.make_node("Sigmoid", ["s"], ["y"])]
    io = [helper.make_tensor_value_info("x", F, ["N", 1, 4])], [helper.make_tensor_value_info("y", F, None)]
    m = helper.make_model(helper.make_graph(nodes, "plc", *io), opset_imports=[helper.make_opsetid("", 11)])
    m.ir_version = 6
    assert reshape_open_squeezes(m) is m
    assert reshape_open_squeezes(squeeze_head_model()) is not squeeze_head_model()
