"""Models in the legacy opsets of the classic model-zoo files (7 and 9), built seeded with
``onnx.helper``: ``BatchNormalization``-7 with its ``spatial`` attribute, ``LRN``, ``Flatten`` +
``Gemm``, ``Softmax`` that flattens to 2-D; ``Clip`` with ``min``/``max`` attributes, ``Upsample``-9,
``Squeeze`` with ``axes``.  The default ``compress`` prunes them by the layer-wise pass with per-sample
gradients (no fallback), keeps exactly ``k`` weights and the file's opset, and the pruned file runs in
onnxruntime close to the dense one (BENCHMARKS.md, "Stop 46", audits the trained versions)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.pipeline import keep_count


def _init(name: str, a: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(a, np.float32), name)


def _opset7_cnn(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv → BatchNormalization-7 (spatial=1) → Relu → LRN → MaxPool → Flatten → Gemm → Softmax, in
    IR 3."""
    c = 8
    inits = [
        _init("conv.w", rng.standard_normal((c, 1, 3, 3)) * 0.5),
        _init("conv.b", rng.standard_normal(c) * 0.1),
        _init("bn.scale", 1.0 + 0.1 * rng.standard_normal(c)),
        _init("bn.bias", 0.1 * rng.standard_normal(c)),
        _init("bn.mean", 0.1 * rng.standard_normal(c)),
        _init("bn.var", 1.0 + 0.2 * rng.random(c)),
        _init("fc.w", rng.standard_normal((10, c * 16)) * 0.2),
        _init("fc.b", rng.standard_normal(10) * 0.1),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"], spatial=1),
        helper.make_node("Relu", ["b"], ["r"]),
        helper.make_node("LRN", ["r"], ["n"], size=3, alpha=1e-4, beta=0.75, bias=2.0),
        helper.make_node("MaxPool", ["n"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], axis=1),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["z"], transB=1),
        helper.make_node("Softmax", ["z"], ["probs"], axis=1),
    ]
    # IR 3, as the opset-7 zoo files are: every initializer is also a graph input
    listed = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in inits]
    graph = helper.make_graph(
        nodes, "legacy7", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8]), *listed],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 7)], ir_version=3)


def _opset9_fpn(rng: np.random.Generator) -> onnx.ModelProto:
    """Conv → Clip(0, 6) by attribute → Upsample-9 (nearest ×2) → strided Conv → GlobalAveragePool →
    Squeeze(axes) → MatMul → Softmax."""
    inits = [
        _init("c1.w", rng.standard_normal((8, 1, 3, 3)) * 0.5),
        _init("scales", np.array([1.0, 1.0, 2.0, 2.0])),
        _init("c2.w", rng.standard_normal((12, 8, 3, 3)) * 0.2),
        _init("fc.w", rng.standard_normal((12, 10)) * 0.3),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "c1.w"], ["a"], pads=[1, 1, 1, 1]),
        helper.make_node("Clip", ["a"], ["r"], min=0.0, max=6.0),
        helper.make_node("Upsample", ["r", "scales"], ["u"], mode="nearest"),
        helper.make_node("Conv", ["u", "c2.w"], ["b"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("GlobalAveragePool", ["b"], ["g"]),
        helper.make_node("Squeeze", ["g"], ["s"], axes=[2, 3]),
        helper.make_node("MatMul", ["s", "fc.w"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=1),
    ]
    graph = helper.make_graph(
        nodes, "legacy9", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 10])], inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=4)


def _run(path: Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    data = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {"x": x})[0])


@pytest.mark.parametrize("build", [_opset7_cnn, _opset9_fpn], ids=["opset7-bn-lrn-gemm", "opset9-clip-upsample"])
def test_default_prunes_a_legacy_opset_model_with_gradients(
    build: Callable[[np.random.Generator], onnx.ModelProto], tmp_path: Path
) -> None:
    rng = np.random.default_rng(0)
    model = build(rng)
    onnx.checker.check_model(model)
    src = tmp_path / "in.onnx"
    onnx.save(model, src)
    before = src.read_bytes()
    x = rng.standard_normal((96, 1, 8, 8)).astype(np.float32)
    dense = _run(model, x)
    data = {"x": x, "labels": dense.argmax(1).astype(np.int64)}
    out = tmp_path / "out.onnx"
    r = chita_onnx.compress(src, out, data, CompressConfig(sparsity=0.5))
    assert src.read_bytes() == before
    assert r.method == "layerwise"
    assert r.loss and not r.warnings  # per-sample gradients ran (the OBD allocation), no fallback warned
    assert r.nnz == keep_count(0.5, r.p)
    pruned = onnx.load(out)
    assert [o.version for o in pruned.opset_import if o.domain in ("", "ai.onnx")] == [model.opset_import[0].version]
    weights = {i.name: numpy_helper.to_array(i) for i in pruned.graph.initializer}
    assert sum(int(np.count_nonzero(weights[t.name])) for t in r.tensors) == r.nnz
    got = _run(out, x)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)  # still probabilities
    assert float(np.mean(got.argmax(1) == dense.argmax(1))) >= 0.8
