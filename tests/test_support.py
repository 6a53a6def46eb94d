"""Up-front refusals and the support report (chita_onnx.support, ``inspect --check``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from chita_onnx_cli.main import cli
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper
from rewrite_kit import MS, Init, engine_grads, img_chain, model_of, node, vec_chain, vi

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.errors import UnsupportedOpError
from chita_onnx.support import assert_supported, check_model_support, format_support

I8, U8 = TensorProto.INT8, TensorProto.UINT8


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def _run_cli(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------------------------ quantized


def _q(name: str, shape: tuple[int, ...], dtype: int = I8) -> onnx.TensorProto:
    arr = np.random.default_rng(0).integers(-5, 5, shape)
    return numpy_helper.from_array(arr.astype(np.int8 if dtype == I8 else np.uint8), name)


def _scalar(name: str, value: float, dtype: type = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def quantized(kind: str) -> onnx.ModelProto:
    """Small models as onnxruntime's quantization tools write them."""
    x = [vi("x", ["N", 2, 5, 5])]
    # outputs declare their shapes: a graph output without one fails onnx.checker, which load refuses
    y = [vi("y", ["N", 3, 3, 3])]
    if kind == "ConvInteger":  # dynamic quantization of a Conv
        nodes = [
            helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="dq"),
            helper.make_node("ConvInteger", ["xq", "Wq", "xz"], ["yi"], name="conv_int"),
            helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT, name="cast"),
        ]
        return model_of(nodes, x, y, [_q("Wq", (3, 2, 3, 3), U8)], 13, check=False)
    if kind == "QLinearConv":
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"], name="q"),
            helper.make_node("QLinearConv", ["xq", "s", "z", "Wq", "s", "zw", "s", "z"], ["yq"], name="qconv"),
            helper.make_node("DequantizeLinear", ["yq", "s", "z"], ["y"], name="dq"),
        ]
        inits = [_q("Wq", (3, 2, 3, 3)), _scalar("s", 0.1), _scalar("z", 0, np.int8), _scalar("zw", 0, np.int8)]
        return model_of(nodes, x, y, inits, 13, check=False)
    if kind == "QDQ":  # float ops between Quantize/Dequantize pairs, integer weights
        nodes = [
            helper.make_node("DequantizeLinear", ["Wq", "s", "z"], ["W"], name="w_dq"),
            helper.make_node("Conv", ["x", "W"], ["y"], name="conv"),
        ]
        return model_of(
            nodes, x, y, [_q("Wq", (3, 2, 3, 3)), _scalar("s", 0.1), _scalar("z", 0, np.int8)], 13, check=False
        )
    if kind == "MatMulInteger":
        nodes = [
            helper.make_node("DynamicQuantizeLinear", ["v"], ["vq", "vs", "vz"], name="dq"),
            helper.make_node("MatMulInteger", ["vq", "Wq", "vz"], ["yi"], name="mm_int"),
            helper.make_node("Cast", ["yi"], ["y"], to=TensorProto.FLOAT, name="cast"),
        ]
        return model_of(nodes, [vi("v", ["N", 4])], [vi("y", ["N", 3])], [_q("Wq", (4, 3), U8)], 13, check=False)
    # com.microsoft, as in ddddocr's common_old.onnx
    nodes = [
        helper.make_node("DynamicQuantizeLSTM", ["v"], ["y"], name="qlstm", domain=MS),
    ]
    return model_of(nodes, [vi("v", [2, 1, 4])], [vi("y", [2, 1, 1, 4])], [], 13, ms=True)


@pytest.mark.parametrize("kind", ["ConvInteger", "QLinearConv", "QDQ", "MatMulInteger", "DynamicQuantizeLSTM"])
def test_quantized_models_are_refused_up_front_with_advice(kind: str, tmp_path: Path) -> None:
    path = _save(quantized(kind), tmp_path / f"{kind}.onnx")
    report = check_model_support(path)
    assert not report.ok and len(report.refusals) == 1
    assert "is quantized" in report.refusals[0] and "prune the float model before quantizing" in report.refusals[0]
    code, _out, err = _run_cli("compress", path, tmp_path / "o.onnx", "--data", tmp_path / "missing.npz")
    assert code == 1 and err.count("\n") == 1 and "quantized" in err and "Traceback" not in err
    assert not (tmp_path / "o.onnx").exists()


def _exported(kind: str) -> onnx.ModelProto:
    """x[N,4] → MatMul W[4,6] → (a BatchNormalization or Dropout as ``kind`` says) → Gemm → y[N,3]:
    what an exporter writes for a model left in training mode, and the inference-mode twins."""
    rng = np.random.default_rng(0)
    W = numpy_helper.from_array(rng.normal(size=(4, 6)).astype(np.float32), "W")
    V = numpy_helper.from_array(rng.normal(size=(3, 6)).astype(np.float32), "V")
    stats = [
        numpy_helper.from_array(v.astype(np.float32), n)
        for n, v in (("g", np.ones(6)), ("b", np.zeros(6)), ("mu", rng.normal(size=6)), ("var", np.ones(6)))
    ]
    opset, inputs, extra = 15, [vi("x", ["N", 4])], []
    if kind.startswith("bn"):
        outs = ["h"]
        attrs: dict[str, int] = {}
        if kind == "bn_training":  # opset 15 asks for the running statistics' outputs in training mode
            attrs["training_mode"], outs = 1, ["h", "rm", "rv"]
        elif kind == "bn9_training":
            opset, outs = 9, ["h", "rm", "rv", "sm", "sv"]
        elif kind == "bn9":
            opset = 9
        mid = [helper.make_node("BatchNormalization", ["z", "g", "b", "mu", "var"], outs, name="bn", **attrs)]
        extra = stats
    else:
        mode, ratio = {"dropout_training": (True, 0.3), "dropout_ratio0": (True, 0.0), "dropout": (False, 0.3)}.get(
            kind, (True, 0.3)
        )
        extra = [_scalar("ratio", ratio)]
        if kind == "dropout_constant":  # the flag from a Constant node, as the TorchScript exporter writes it
            mid = [helper.make_node("Constant", [], ["mode"], value=numpy_helper.from_array(np.array(True), "m"))]
        elif kind == "dropout_input":  # the caller decides: a graph input, never fed true by chita-onnx
            mid, inputs = [], [*inputs, helper.make_tensor_value_info("mode", TensorProto.BOOL, [])]
        else:
            mid, extra = [], [*extra, numpy_helper.from_array(np.array(mode), "mode")]
        mid.append(helper.make_node("Dropout", ["z", "ratio", "mode"], ["h"], name="drop"))
    nodes = [helper.make_node("MatMul", ["x", "W"], ["z"], name="mm"), *mid]
    nodes.append(helper.make_node("Gemm", ["h", "V", "c"], ["y"], name="head", transB=1))
    c = numpy_helper.from_array(np.zeros(3, np.float32), "c")
    return model_of(nodes, inputs, [vi("y", ["N", 3])], [W, V, c, *extra], opset)


@pytest.mark.parametrize(
    ("kind", "node_name"),
    [("bn_training", "'bn'"), ("bn9_training", "'bn'"), ("dropout_training", "'drop'"), ("dropout_constant", "'drop'")],
)
def test_models_exported_in_training_mode_are_refused_with_advice(kind: str, node_name: str, tmp_path: Path) -> None:
    """A model left in training mode when exported (the dynamo exporter writes its Dropout with a stored
    true ``training_mode``, TorchScript with ``training=TRAINING`` a training-mode BatchNormalization)
    computes a different function on every run or for every batch.  Every method refuses it in one
    line naming the node, and nothing is written."""
    path = _save(_exported(kind), tmp_path / f"{kind}.onnx")
    before = path.read_bytes()
    report = check_model_support(path)
    assert not report.ok and len(report.refusals) == 1
    assert "exported in training mode" in report.refusals[0] and node_name in report.refusals[0]
    assert "model.eval()" in report.refusals[0]
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32))
    for method in ("auto", "magnitude"):
        code, _out, err = _run_cli(
            "compress", path, tmp_path / "o.onnx", "--data", tmp_path / "c.npz", "--sparsity", "0.5", "--method", method
        )
        assert code == 1 and err.count("\n") == 1 and "training mode" in err and node_name in err, err
        assert "Traceback" not in err and not (tmp_path / "o.onnx").exists()
    code, out, _err = _run_cli("inspect", path)
    assert "exported in training mode" in out
    assert path.read_bytes() == before


@pytest.mark.parametrize("kind", ["bn", "bn9", "dropout", "dropout_ratio0", "dropout_input"])
def test_inference_mode_twins_are_pruned(kind: str, tmp_path: Path) -> None:
    """The same graphs in inference mode (or with a Dropout that keeps every value, or whose mode the
    caller feeds) are no training-mode exports: they are pruned as usual."""
    path = _save(_exported(kind), tmp_path / f"{kind}.onnx")
    assert check_model_support(path).ok
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(1).normal(size=(32, 4)).astype(np.float32))
    code, _out, err = _run_cli(
        "compress",
        path,
        tmp_path / "o.onnx",
        "--data",
        tmp_path / "c.npz",
        "--sparsity",
        "0.5",
        "--method",
        "magnitude",
    )
    if kind == "dropout_input":  # a boolean input the calibration file lacks: refused as missing data, not as training
        assert code == 1 and "training mode" not in err and "mode" in err, err
        return
    assert code == 0, err
    assert (tmp_path / "o.onnx").exists()


def test_bfloat16_weights_are_refused_with_a_clear_message_and_float16_is_supported() -> None:
    w = Init(1)
    model = vec_chain([node("Tanh", ["z"], ["y"])], w)
    half = onnx.ModelProto()
    half.CopyFrom(model)
    for t in model.graph.initializer:
        t.CopyFrom(helper.make_tensor(t.name, TensorProto.BFLOAT16, t.dims, numpy_helper.to_array(t).ravel()))
    for v in [*model.graph.input, *model.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.BFLOAT16
    report = check_model_support(model)
    assert not report.ok
    assert "'W1' is bfloat16" in report.refusals[0] and "prune the float32 model" in report.refusals[0]
    for t in half.graph.initializer:  # float16: the gradients come from a float32 twin
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in [*half.graph.input, *half.graph.output]:
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    assert check_model_support(half).ok


# ---------------------------------------------------------------------------------- control flow


def _loop_body() -> onnx.GraphProto:
    nodes = [
        helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        helper.make_node("Tanh", ["v_in"], ["t"]),
        helper.make_node("Add", ["t", "z"], ["v_out"]),  # reads z from the outer scope
    ]
    return helper.make_graph(
        nodes,
        "body",
        [
            helper.make_tensor_value_info("iter", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, None),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, None),
        ],
    )


def loop_model(on_path: bool = True) -> onnx.ModelProto:
    w = Init(5)
    trip, cond = w.const("trip", 2, np.int64), w.const("cond", True, np.bool_)
    if on_path:
        nodes = [
            node("MatMul", ["x", w("W1", 5, 6)], ["z"]),
            helper.make_node("Loop", [trip, cond, "z"], ["y"], body=_loop_body(), name="the_loop"),
        ]
    else:  # a loop on the input only, before any weight
        nodes = [
            node("Identity", ["x"], ["z"]),
            helper.make_node("Loop", [trip, cond, "z"], ["xl"], body=_loop_body(), name="the_loop"),
            node("MatMul", ["xl", w("W1", 5, 6)], ["y"]),
        ]
    nodes.append(node("Gemm", ["y", w("W2", 3, 6)], ["logits"], transB=1))
    return model_of(nodes, [vi("x", ["N", 5])], [vi("logits", ["N", 3])], w.items, 17)


def scan_model() -> onnx.ModelProto:
    w = Init(6)
    body = helper.make_graph(
        [helper.make_node("Add", ["s_in", "x_t"], ["s_out"]), helper.make_node("Identity", ["s_out"], ["y_t"])],
        "body",
        [
            helper.make_tensor_value_info("s_in", TensorProto.FLOAT, [6]),
            helper.make_tensor_value_info("x_t", TensorProto.FLOAT, [6]),
        ],
        [
            helper.make_tensor_value_info("s_out", TensorProto.FLOAT, [6]),
            helper.make_tensor_value_info("y_t", TensorProto.FLOAT, [6]),
        ],
    )
    nodes = [
        node("MatMul", ["x", w("W1", 5, 6)], ["z"]),
        helper.make_node(
            "Scan", [w.const("s0", np.zeros(6)), "z"], ["s", "y"], body=body, num_scan_inputs=1, name="the_scan"
        ),
        node("Gemm", ["y", w("W2", 3, 6)], ["logits"], transB=1),
    ]
    return model_of(nodes, [vi("x", ["N", 5])], [vi("logits", ["N", 3])], w.items, 17)


@pytest.mark.parametrize(("build", "op", "name"), [(loop_model, "Loop", "the_loop"), (scan_model, "Scan", "the_scan")])
def test_loops_on_the_path_are_refused_before_any_work(build: object, op: str, name: str, tmp_path: Path) -> None:
    model = build()  # type: ignore[operator]
    with pytest.raises(UnsupportedOpError, match=rf"op {op} \(node '{name}'\).*unrolled.*--output"):
        assert_supported(model)
    path = _save(model, tmp_path / "loop.onnx")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 5), np.float32))
    code, _, err = _run_cli("compress", path, tmp_path / "o.onnx", "--data", tmp_path / "d.npz", "--method", "chita")
    assert code == 1 and f"op {op} (node '{name}')" in err and err.count("\n") == 1
    # the default needs gradients only for its allocation: it allocates by magnitude and says why
    code, out, err = _run_cli("compress", path, tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert code == 0 and "no gradients for this model" in out + err and f"op {op} (node '{name}')" in out + err


def test_a_loop_before_the_weights_is_fine() -> None:
    assert_supported(loop_model(on_path=False))
    assert check_model_support(loop_model(on_path=False)).ok


def test_an_op_without_gradient_or_rewrite_is_named() -> None:
    w = Init(7)
    model = vec_chain([node("Atan", ["z"], ["y"])], w)
    report = check_model_support(model)
    assert not report.ok and "op Atan (node 'Atan_y')" in report.refusals[0]
    with pytest.raises(UnsupportedOpError, match="Atan"):
        assert_supported(model)


def test_check_says_that_the_default_goes_through_without_gradients(tmp_path: Path) -> None:
    """The unseen-torch4 audit: ``inspect --check`` on a model with an op that onnxruntime-training
    cannot differentiate (an Einsum there, Atan here) said 'NOT supported', exit 1, and nothing
    more, while ``compress`` with the defaults pruned it (magnitude allocation): the report now says
    so, and keeps exit 1 for the methods that need gradients.  A quantized model stays refused."""
    path = _save(vec_chain([node("Atan", ["z"], ["y"])], Init(7)), tmp_path / "s.onnx")
    report = check_model_support(path)
    assert not report.ok and report.without_gradients and "op Atan" in report.refusals[0]
    code, out, err = _run_cli("inspect", path, "--check")
    assert code == 1 and "op Atan" in err
    assert "compress's default (--method auto) still prunes it, layer-wise with --allocation magnitude" in out
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(3).standard_normal((16, 5)).astype(np.float32))
    code, out, err = _run_cli("compress", path, tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert code == 0 and "no gradients for this model" in out + err
    q = check_model_support(quantized("QDQ"))
    assert not q.ok and not q.without_gradients and "still prunes" not in format_support(q)
    assert check_model_support(vec_chain([node("Relu", ["z"], ["y"])], Init(8))).without_gradients is False


def test_an_einsum_layer_is_checked_as_compress_sees_it(tmp_path: Path) -> None:
    """``compress`` reads a weight-bearing ``Einsum`` (``ij,jk->ik``) as the MatMul it is and prunes it
    with gradients; the support check used to look at the graph before that rewrite and refuse it."""
    w = Init(7)
    model = vec_chain([node("Einsum", ["z", w("E", 6, 6)], ["y"], equation="ij,jk->ik")], w)
    report = check_model_support(model)
    assert report.ok and report.prunable_tensors == 3
    src = _save(model, tmp_path / "e.onnx")
    x = {"x": np.random.default_rng(0).standard_normal((16, 5)).astype(np.float32)}
    rep = chita_onnx.compress(src, tmp_path / "o.onnx", x, CompressConfig(sparsity=0.5, method="chita"))
    assert "E" in {t.name for t in rep.tensors}


# ---------------------------------------------------------------------------------------- report


def _detector(w: Init) -> onnx.ModelProto:
    nodes = [
        node("Resize", ["z", "", w.const("sc", [1, 1, 2, 2])], ["r"], mode="linear"),
        node("HardSwish", ["r"], ["y"]),
    ]
    return img_chain(nodes, w, 3 * 64)


def test_report_counts_rewrites_and_agrees_with_the_engine(tmp_path: Path) -> None:
    model = _detector(Init(8))
    report = check_model_support(model)
    assert report.ok and not report.checked_with_data
    assert dict(report.rewrites) == {"HardSwish": 1, "Resize": 1}
    assert dict(report.native) == {"Conv": 1, "Flatten": 1, "Gemm": 1}
    e, *_ = engine_grads(model, ["C1", "W2"])
    assert {k: v for k, v in e.fwd.rewrites.items() if k in ("Resize", "HardSwish")} == dict(report.rewrites)
    data = {"x": np.random.default_rng(0).standard_normal((4, 2, 4, 4)).astype(np.float32)}
    full = check_model_support(model, data)
    assert full.ok and full.checked_with_data and dict(full.static)["If nodes inlined"] == 0
    json.dumps(full.to_dict())
    text = format_support(full)
    assert "supported (checked with data)" in text and "Resize ×1" in text


def test_inspect_check_cli(tmp_path: Path) -> None:
    model = _save(_detector(Init(9)), tmp_path / "det.onnx")
    code, out, _ = _run_cli("inspect", model, "--check")
    assert code == 0 and "supported" in out and "exact rewrites: HardSwish ×1, Resize ×1" in out
    np.savez(tmp_path / "d.npz", x=np.random.default_rng(1).standard_normal((3, 2, 4, 4)).astype(np.float32))
    code, out, _ = _run_cli("inspect", model, "--check", "--data", tmp_path / "d.npz", "--json")
    assert code == 0 and json.loads(out)["checked_with_data"] is True
    code, out, err = _run_cli("inspect", _save(quantized("QDQ"), tmp_path / "q.onnx"), "--check")
    assert code == 1 and "NOT supported" in out and err.startswith("error:") and "quantized" in err
    assert "refused by the structural check" in out and "pass --data" not in out
    code, out, _ = _run_cli("inspect", tmp_path / "q.onnx")  # the plain listing says so too
    assert code == 0 and "compress refuses this model" in out and "quantized" in out
    code, out, err = _run_cli("inspect", tmp_path / "q.onnx", "--json")  # JSON on stdout, the refusal on stderr
    assert code == 0 and isinstance(json.loads(out), list) and "compress refuses this model" in err
    code, out, _ = _run_cli("inspect", model)  # without --check: the tensor table as before
    assert code == 0 and "prunable tensors" in out


def test_compress_api_refuses_unsupported_models_before_reading_data(tmp_path: Path) -> None:
    # the data file exists (the output plan checks paths first) but is not an .npz: never read
    (tmp_path / "d.npz").write_bytes(b"not read")
    with pytest.raises(UnsupportedOpError, match="Loop"):
        chita_onnx.compress(
            _save(loop_model(), tmp_path / "l.onnx"),
            tmp_path / "o.onnx",
            tmp_path / "d.npz",
            CompressConfig(method="chita"),
        )


def _linear_behind_transpose(extra: list[onnx.NodeProto] | None = None) -> onnx.ModelProto:
    """``x @ Transpose(W)`` (``W`` stored [out, in], as torch's dynamo exporter writes ``nn.Linear``),
    Relu, a Gemm head; ``extra`` nodes read ``logits`` and end in the output ``y``."""
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0], name="t"),
        helper.make_node("MatMul", ["x", "Wt"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "C"], ["logits" if extra else "y"], transB=1, name="gemm"),
        *(extra or []),
    ]
    inits = [
        numpy_helper.from_array(rng.standard_normal((16, 8)).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal((10, 16)).astype(np.float32), "C"),
    ]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_check_and_gradients_see_a_weight_stored_behind_a_transpose(tmp_path: Path) -> None:
    """``inspect --check`` and the ``gradients`` command see the weights ``compress`` prunes, a layer
    reading its weight through a Transpose included: the support report used to count only the Gemm
    (160 of 288 weights) and passed a model whose MatMul weight has no gradient, and ``gradients``
    wrote X for the Gemm alone."""
    src = _save(_linear_behind_transpose(), tmp_path / "t.onnx")
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(12).standard_normal((24, 8)).astype(np.float32))
    listed = chita_onnx.inspect_model(src)
    rep = check_model_support(src, data)
    assert rep.ok and rep.prunable_tensors == len(listed) == 2 and rep.prunable_weights == 288
    out = tmp_path / "g.npy"
    code, _, err = _run_cli("gradients", src, "--data", data, "--out", out)
    assert code == 0, err
    assert np.load(out).shape == (24, 288)
    layout = json.loads((tmp_path / "g.npy.layout.json").read_text())
    assert sorted(t["name"] for t in layout["tensors"]) == sorted(t.name for t in listed)
    atan = [helper.make_node("Atan", ["logits"], ["y"], name="atan")]
    bad = _save(_linear_behind_transpose(atan), tmp_path / "s.onnx")
    rep = check_model_support(bad, data)
    assert not rep.ok and "Atan" in rep.refusals[0] and rep.prunable_weights == 288
    with pytest.raises(UnsupportedOpError, match="Atan"):  # what --check now predicts
        chita_onnx.compress(bad, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.5, method="chita"))


def _two_heads(extra: list[onnx.NodeProto]) -> onnx.ModelProto:
    """x → MatMul → Relu → two MatMul heads ``y1`` and ``y2`` (no softmax: the engine takes one
    Gauss-Newton loss over both outputs), ``extra`` appended after the second head."""
    rng = np.random.default_rng(31)
    w = {k: rng.standard_normal(s).astype(np.float32) for k, s in (("W1", (8, 16)), ("W2", (16, 4)), ("W3", (16, 3)))}
    last = "y2" if not extra else "z"
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="l1"),
        helper.make_node("Relu", ["h0"], ["h"], name="relu"),
        helper.make_node("MatMul", ["h", "W2"], ["y1"], name="head1"),
        helper.make_node("MatMul", ["h", "W3"], [last], name="head2"),
        *extra,
    ]
    g = helper.make_graph(
        nodes,
        "two_heads",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [
            helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 3]),
        ],
        [numpy_helper.from_array(v, k) for k, v in w.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_model_with_several_regression_outputs_is_checked_on_all_of_them(tmp_path: Path) -> None:
    """Two outputs and no classifier: the engine differentiates both (one Gauss-Newton head), so the
    check must look at both paths; it used to look at the first output only, said 'supported' for an
    op without gradient on the second head, and named only the first output."""
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.random.default_rng(32).standard_normal((24, 8)).astype(np.float32))
    good = _save(_two_heads([]), tmp_path / "good.onnx")
    rep = check_model_support(good, data)
    assert rep.ok and rep.output == "y1, y2" and dict(rep.native)["MatMul"] == 3
    atan = [helper.make_node("Atan", ["z"], ["y2"], name="atan")]
    bad = _save(_two_heads(atan), tmp_path / "bad.onnx")
    rep = check_model_support(bad)  # the structural check, before any data
    assert not rep.ok and "op Atan (node 'atan')" in rep.refusals[0] and rep.output == "y1, y2"
    with pytest.raises(UnsupportedOpError, match="Atan"):  # what --check predicts, before reading data
        chita_onnx.compress(bad, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.5, method="chita"))
    code, out, _ = _run_cli("inspect", bad, "--check")
    assert code == 1 and "differentiated output: y1, y2" in out
