"""chita_onnx/runtime.py on real onnxruntime sessions: built graphs are checked before a session,
load and run failures become one-line errors naming what was run, a run with a budget is stopped
at its deadline, and a signal stops a run that is inside onnxruntime."""

from __future__ import annotations

import signal
import time

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from chita_onnx import runtime
from chita_onnx.errors import GradientError, ModelError, ResourceError


def _matmul(k_w: int = 3) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = helper.make_tensor("W", TensorProto.FLOAT, [k_w, 2], rng.standard_normal(2 * k_w).astype(np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        [w],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def _endless_loop() -> onnx.ModelProto:
    """``y = Loop(2^62 iterations){ x := sin(x) }`` on a small vector: never ends by itself."""
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond"], ["cond_out"]),
            helper.make_node("Sin", ["v"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v", TensorProto.FLOAT, [64]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [64]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "go", "x"], ["y"], body=body)],
        "loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64])],
        [
            helper.make_tensor("trips", TensorProto.INT64, [], [2**62]),
            helper.make_tensor("go", TensorProto.BOOL, [], [1]),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_valid_graph_runs_and_matches_numpy() -> None:
    m = _matmul()
    x = np.random.default_rng(1).standard_normal((4, 3)).astype(np.float32)
    sess = runtime.session(m, what="a test graph")
    (y,) = runtime.run(sess, ["y"], {"x": x}, what="a test graph", budget=30.0)
    w = onnx.numpy_helper.to_array(m.graph.initializer[0])
    np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-6)


def test_inconsistent_built_graph_is_refused_before_onnxruntime() -> None:
    bad = _matmul(k_w=5)  # x[N,3] @ W[5,2]: onnx inference finds the mismatch
    with pytest.raises(ModelError, match=r"^the working copy of 'fc': the generated graph is inconsistent"):
        runtime.session(bad, what="the working copy of 'fc'")


def test_crashing_attribute_is_refused_before_onnxruntime() -> None:
    node = helper.make_node("GroupNormalization", ["x", "s", "b"], ["y"], num_groups=0, name="gn")
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, 3])],
        [
            helper.make_tensor("s", TensorProto.FLOAT, [4], [1.0] * 4),
            helper.make_tensor("b", TensorProto.FLOAT, [4], [0.0] * 4),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 8
    with pytest.raises(ModelError, match="node 'gn' \\(GroupNormalization\\) has num_groups=0"):
        runtime.check_graph(m, "a built graph")


def test_load_and_run_failures_name_what_was_run() -> None:
    with pytest.raises(GradientError, match=r"^the gradient graph: onnxruntime .* cannot load it: "):
        runtime.session(b"not a model", what="the gradient graph", error=GradientError)
    sess = runtime.session(_matmul(), what="g")
    with pytest.raises(ModelError, match=r"^running g: onnxruntime failed: "):
        runtime.run(sess, ["y"], {"x": np.zeros((2, 7), np.float32)}, what="running g")


def test_a_run_past_its_budget_is_stopped() -> None:
    sess = runtime.session(_endless_loop(), what="folding constants")
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match=r"^folding constants: onnxruntime did not finish within 0.5 s"):
        runtime.run(sess, None, {"x": np.zeros(64, np.float32)}, what="folding constants", budget=0.5)
    assert time.monotonic() - t0 < 20


class _StopError(Exception):
    pass


def test_a_signal_stops_a_run_inside_onnxruntime() -> None:
    """SIGALRM arrives while onnxruntime runs an endless Loop: the run stops, the Python handler runs,
    and the interpreter's wakeup fd is restored afterwards."""
    sess = runtime.session(_endless_loop(), what="the model")

    def handler(signum: int, frame: object) -> None:
        raise _StopError

    before_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(before_fd)
    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        t0 = time.monotonic()
        with pytest.raises(_StopError):
            runtime.run(sess, None, {"x": np.zeros(64, np.float32)}, what="the model")
        assert time.monotonic() - t0 < 20
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    now_fd = signal.set_wakeup_fd(-1)
    signal.set_wakeup_fd(now_fd)
    assert now_fd == before_fd
