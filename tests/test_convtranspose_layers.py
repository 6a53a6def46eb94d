"""ConvTranspose weights as layers: the layer-wise pass's input rows reproduce onnxruntime's
ConvTranspose exactly, their per-sample gradients reach the weight through the exact rewrite, a
planted sparse ConvTranspose is recovered through the graph, and the default compress prunes them
within the exact global budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from rewrite_kit import Init, engine_grads, fd_check, img_chain, node, ort_fd_check

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.activations import find_layers
from chita_onnx.graph import find_prunable
from chita_onnx.layerstats import input_rows, num_rows, output_rows, rows_to_weight, weight_rows

CASES: dict[str, tuple[tuple[int, ...], int, int, int, tuple[int, ...], dict[str, Any]]] = {
    # name: (input spatial size, C_in, C_out/g, group, kernel, attributes)
    "1d-stride": ((5,), 2, 3, 1, (3,), {"strides": [2]}),
    "1d-valid": ((5,), 2, 2, 1, (4,), {"strides": [3], "auto_pad": "VALID"}),
    "1d-same-dilated": ((5,), 2, 2, 1, (4,), {"strides": [3], "auto_pad": "SAME_LOWER", "dilations": [2]}),
    "2d-pads-dil-outpad-groups": (
        (5, 6), 4, 3, 2, (3, 2),
        {"strides": [2, 3], "pads": [1, 0, 2, 1], "dilations": [2, 1], "output_padding": [1, 2]},
    ),
    "2d-depthwise-same-upper": ((5, 6), 4, 2, 4, (3, 3), {"strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "2d-same-lower": ((5, 6), 4, 2, 1, (3, 3), {"strides": [2, 2], "auto_pad": "SAME_LOWER"}),
    "2d-output-shape-odd": ((5, 6), 2, 2, 1, (4, 3), {"strides": [2, 2], "output_shape": [9, 12]}),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_convtranspose_rows_times_weight_rows_reproduce_onnxruntime(case: str) -> None:
    sp, C, Mg, g, k, attrs = CASES[case]
    rng = np.random.default_rng(3)
    w = rng.standard_normal((C, Mg, *k)).astype(np.float32)
    x = rng.standard_normal((2, C, *sp)).astype(np.float32)
    model = make_model(
        [helper.make_node("ConvTranspose", ["x", "W"], ["y"], group=g, **attrs)],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x.shape))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", "M", *[f"s{i}" for i in range(len(sp))]])],
        [numpy_helper.from_array(w, "W")],
    )
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    (site,) = find_layers(model, ["W"])
    geom = site.geometry
    assert geom.kind == "convt" and geom.groups == g
    np.testing.assert_array_equal(rows_to_weight(weight_rows(w, geom), geom), w)
    X = input_rows(x, geom)
    assert X.shape == (num_rows(tuple(x.shape), geom), g, C // g * int(np.prod(k)))
    got = np.einsum("rgd,gmd->rgm", X.astype(np.float64), weight_rows(w, geom))
    np.testing.assert_allclose(got, output_rows(y, geom), atol=1e-4)
    idx = np.array([0, 3, X.shape[0] - 1], np.int64)  # the row cap's gather gives the same rows
    np.testing.assert_array_equal(input_rows(x, geom, idx), X[idx])


@pytest.mark.parametrize("grouped", [False, True])
def test_convtranspose_weight_gradient_matches_finite_differences(grouped: bool) -> None:
    """The exact rewrite (a Conv of the zero-upsampled input) builds its flipped kernel from the
    ConvTranspose weight with graph ops, so the weight's own gradient columns are right (a grouped
    ConvTranspose is checked with float32 differences of onnxruntime's kernel: onnx.reference
    mishandles it)."""
    w = Init(41)
    if grouped:
        nodes = [node("ConvTranspose", ["z", w("CT", 3, 2, 2, 2)], ["y"], dilations=[2, 2], group=3)]
        model = img_chain(nodes, w, 6 * 6 * 6)
    else:
        attrs = {"strides": [2, 2], "pads": [1, 1, 1, 1], "output_padding": [1, 1]}
        model = img_chain([node("ConvTranspose", ["z", w("CT", 3, 2, 3, 3)], ["y"], **attrs)], w, 2 * 8 * 8)
    e, gm, feeds, labels = engine_grads(model, ["C1", "CT", "W2"])
    assert e.fwd.rewrites.get("ConvTranspose") == 1
    ct = gm.layout.slot("CT")
    assert np.abs(gm.X[:, ct.offset : ct.offset + ct.size]).max() > 0
    if grouped:
        ort_fd_check(gm, model, feeds, labels, rows=(0, 1))
    else:
        fd_check(gm, model, feeds, labels)


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, path)
    return path


def test_planted_sparse_convtranspose_is_recovered(tmp_path: Path) -> None:
    """Channels duplicated by a 1×1 Conv, then a strided ConvTranspose whose weight spreads equally
    over both copies: at 50% the layer-wise pass keeps one copy of each tap and reproduces the dense
    outputs (with the default row cap sampling the rows); magnitude cannot."""
    rng = np.random.default_rng(5)
    C, M = 2, 3
    a = rng.standard_normal((C, M, 3, 3)).astype(np.float32)
    w = np.concatenate([0.5 * a, 0.5 * a], axis=0)  # (2C, M, 3, 3): input channels first
    dup = np.concatenate([np.eye(C), np.eye(C)]).reshape(2 * C, C, 1, 1).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "D"], ["xx"], name="dup"),
            helper.make_node(
                "ConvTranspose", ["xx", "W"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1], name="up"
            ),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", M, 16, 16])],
        [numpy_helper.from_array(dup, "D"), numpy_helper.from_array(w, "W")],
    )
    path = _save(model, tmp_path / "planted_convt.onnx")
    assert [t.name for t in find_prunable(model)] == ["D", "W"]
    x = rng.standard_normal((200, C, 8, 8)).astype(np.float32)
    cfg = CompressConfig(
        sparsity=0.5, method="layerwise", allocation="uniform", damp=1e-6, keep=("D",),
        bn_recalibrate="off", bias_correction="off",
    )  # fmt: skip
    assert cfg.max_rows * 2 * C * 9 < 200 * 256  # the cap samples the rows
    r = chita_onnx.compress(path, tmp_path / "p.onnx", {"x": x}, cfg, eval_data={"x": x})
    assert r.nnz == w.size // 2
    assert r.evaluation is not None and r.evaluation.max_abs_diff < 1e-3
    mag = chita_onnx.compress(path, tmp_path / "m.onnx", {"x": x}, cfg.with_(method="magnitude"), eval_data={"x": x})
    assert mag.evaluation is not None and mag.evaluation.max_abs_diff > 0.1


def test_default_compress_prunes_convtranspose_within_the_exact_budget(tmp_path: Path) -> None:
    """Conv → Relu → grouped ConvTranspose (with bias) → Relu → pool → Gemm: the default compress
    prunes every weight tensor (no dense-layer warning), hits the global budget exactly, and the
    output runs in onnxruntime with the input's signature."""
    rng = np.random.default_rng(11)
    C = 3
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, C, 3, 3)).astype(np.float32), "W1"),
        numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "W2"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "B2"),
        numpy_helper.from_array(rng.standard_normal((5, 6)).astype(np.float32), "W3"),
    ]
    model = make_model(
        [
            helper.make_node("Conv", ["x", "W1"], ["h"], pads=[1, 1, 1, 1], strides=[2, 2]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node(
                "ConvTranspose", ["r", "W2", "B2"], ["u"], strides=[2, 2], pads=[1, 1, 1, 1], output_padding=[1, 1],
                group=2,
            ),
            helper.make_node("Relu", ["u"], ["u2"]),
            helper.make_node("GlobalAveragePool", ["u2"], ["g"]),
            helper.make_node("Flatten", ["g"], ["f"]),
            helper.make_node("Gemm", ["f", "W3"], ["y"], transB=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])],
        inits,
    )
    path = _save(model, tmp_path / "convt.onnx")
    x = rng.standard_normal((64, C, 8, 8)).astype(np.float32)
    r = chita_onnx.compress(path, tmp_path / "o.onnx", {"x": x}, CompressConfig(sparsity=0.5))
    p = sum(int(np.prod(t.dims)) for t in inits if t.name != "B2")
    assert r.nnz == p // 2
    assert not any("not prunable" in w for w in r.warnings)
    out = onnx.load(tmp_path / "o.onnx")
    W2 = next(numpy_helper.to_array(t) for t in out.graph.initializer if t.name == "W2")
    assert 0 < np.count_nonzero(W2) < W2.size
    sess = ort.InferenceSession(str(tmp_path / "o.onnx"), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape) for i in sess.get_inputs()] == [("x", ["N", C, 8, 8])]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("y", ["N", 5])]
    assert sess.run(None, {"x": x[:4]})[0].shape == (4, 5)
