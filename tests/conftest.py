"""Shared fixtures: tiny seeded ONNX models built with onnx.helper, and their data.

Models use IR 10 / opset 17 so that the onnxruntime 1.19.2 of the training wheel loads them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"


def cached_venv(venv: Path, *packages: str) -> Path:
    """The Python of a cached virtual environment with the newest ``packages`` (created with pip on
    first use): runtimes that must not share the project's environment (plain onnxruntime, OpenVINO)."""
    import subprocess
    import sys

    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "--upgrade", *packages], check=True, timeout=900)
    return py


def make_model(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    inits: Sequence[onnx.TensorProto],
    *,
    opset: int = 17,
    ir: int = 10,
    name: str = "test",
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="chita-tests")
    model.ir_version = ir
    helper.set_model_props(model, {"author": "tests"})
    onnx.checker.check_model(model)
    return model


def tiny_mlp(seed: int = 0, d_in: int = 12, hidden: int = 16, classes: int = 5) -> onnx.ModelProto:
    """x[N,d_in] → MatMul W1 → Add b1 → Relu → Gemm(W2, b2, transB=1) → logits[N,classes]."""
    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((d_in, hidden)) / np.sqrt(d_in)).astype(np.float32)
    b1 = (0.1 * rng.standard_normal(hidden)).astype(np.float32)
    w2 = (rng.standard_normal((classes, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (0.1 * rng.standard_normal(classes)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("Gemm", ["h2", "W2", "b2"], ["logits"], name="fc2", transB=1),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d_in])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "W1"), (b1, "b1"), (w2, "W2"), (b2, "b2")]],
    )


def tiny_cnn(seed: int = 0, classes: int = 4) -> onnx.ModelProto:
    """x[N,2,6,6] → Conv → BN → Relu → depthwise Conv → BN → Relu → MaxPool → Flatten → Gemm."""
    rng = np.random.default_rng(seed)

    def arr(*shape: int, s: float = 0.5) -> np.ndarray:
        return (s * rng.standard_normal(shape)).astype(np.float32)

    c = 4
    inits = {
        "conv1.weight": arr(c, 2, 3, 3),
        "conv1.bias": arr(c, s=0.1),
        "bn1.scale": 1 + arr(c, s=0.1),
        "bn1.bias": arr(c, s=0.1),
        "bn1.mean": arr(c, s=0.1),
        "bn1.var": (0.5 + rng.random(c)).astype(np.float32),
        "dw.weight": arr(c, 1, 3, 3),
        "bn2.scale": 1 + arr(c, s=0.1),
        "bn2.bias": arr(c, s=0.1),
        "bn2.mean": arr(c, s=0.1),
        "bn2.var": (0.5 + rng.random(c)).astype(np.float32),
        "fc.weight": arr(classes, c * 3 * 3, s=0.3),
        "fc.bias": arr(classes, s=0.1),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c1", "bn1.scale", "bn1.bias", "bn1.mean", "bn1.var"], ["b1"], name="bn1"
        ),
        helper.make_node("Relu", ["b1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "dw.weight"], ["c2"], name="dwconv", group=c, pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["c2", "bn2.scale", "bn2.bias", "bn2.mean", "bn2.var"], ["b2"], name="bn2"
        ),
        helper.make_node("Relu", ["b2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        [numpy_helper.from_array(v, k) for k, v in inits.items()],
    )


def labelled_data(model: onnx.ModelProto, n: int = 64, seed: int = 1) -> dict[str, np.ndarray]:
    """Random inputs for ``model`` and labels = the dense model's argmax (so accuracy is 100%)."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    vi = model.graph.input[0]
    shape = [n] + [d.dim_value for d in vi.type.tensor_type.shape.dim[1:]]
    x = rng.standard_normal(shape).astype(np.float32)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (y,) = sess.run(None, {vi.name: x})
    return {vi.name: x, "labels": np.argmax(y, axis=1).astype(np.int64)}


@pytest.fixture
def mlp_path(tmp_path: Path) -> Path:
    p = tmp_path / "mlp.onnx"
    onnx.save(tiny_mlp(), p)
    return p


@pytest.fixture
def mlp_data(tmp_path: Path) -> Path:
    p = tmp_path / "mlp_calib.npz"
    np.savez(p, **labelled_data(tiny_mlp()))
    return p


@pytest.fixture
def cnn_path(tmp_path: Path) -> Path:
    p = tmp_path / "cnn.onnx"
    onnx.save(tiny_cnn(), p)
    return p


@pytest.fixture
def cnn_data(tmp_path: Path) -> Path:
    p = tmp_path / "cnn_calib.npz"
    np.savez(p, **labelled_data(tiny_cnn()))
    return p
