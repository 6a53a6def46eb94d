"""Models that use ops newer than the bundled onnxruntime (opset 23: ``Attention``, ``RMSNormalization``,
as torch's dynamo exporter writes at ``opset_version=23``): the working copies expand such nodes into
their ONNX function bodies before converting down to opset 21, and the written model keeps them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from chita_onnx import CompressConfig, compress
from chita_onnx.evaluate import make_session
from chita_onnx.graph import RUNTIME_MAX_OPSET, expand_newer_ops, find_prunable, load_model

F = TensorProto.FLOAT


def opset23_model(seed: int = 0) -> onnx.ModelProto:
    """``x [N, 6, 8]`` → q/k/v MatMuls → Attention (2 heads) → + x → RMSNormalization → mean over the
    sequence → MatMul → ``logits [N, 3]``."""
    rng = np.random.default_rng(seed)

    def w(name: str, *shape: int, scale: float = 0.4) -> onnx.TensorProto:
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    inits = [w("Wq", 8, 8), w("Wk", 8, 8), w("Wv", 8, 8), w("Wo", 8, 3), w("gamma", 8, scale=1.0)]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    nodes = [
        helper.make_node("MatMul", ["x", "Wq"], ["q"]),
        helper.make_node("MatMul", ["x", "Wk"], ["k"]),
        helper.make_node("MatMul", ["x", "Wv"], ["v"]),
        helper.make_node("Attention", ["q", "k", "v"], ["a"], q_num_heads=2, kv_num_heads=2),
        helper.make_node("Add", ["a", "x"], ["r"]),
        helper.make_node("RMSNormalization", ["r", "gamma"], ["n"], axis=-1, epsilon=1e-5),
        helper.make_node("ReduceMean", ["n", "axis1"], ["pooled"], keepdims=0),
        helper.make_node("MatMul", ["pooled", "Wo"], ["logits"]),
    ]
    g = helper.make_graph(
        nodes,
        "op23",
        [helper.make_tensor_value_info("x", F, ["N", 6, 8])],
        [helper.make_tensor_value_info("logits", F, ["N", 3])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 11
    onnx.checker.check_model(m, full_check=True)
    return m


def test_expanded_model_converts_down_and_computes_the_same() -> None:
    m = opset23_model()
    x = np.random.default_rng(1).standard_normal((5, 6, 8)).astype(np.float32)
    want = ReferenceEvaluator(m).run(None, {"x": x})[0]
    expanded = expand_newer_ops(m, RUNTIME_MAX_OPSET)
    assert not {"Attention", "RMSNormalization"} & {n.op_type for n in expanded.graph.node}
    assert not expanded.functions and {o.domain for o in expanded.opset_import} == {""}
    down = onnx.version_converter.convert_version(expanded, RUNTIME_MAX_OPSET)
    down.ir_version = 10
    got = make_session(down.SerializeToString()).run(None, {"x": x})[0]  # onnxruntime 1.19.2
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert expand_newer_ops(m, 23) is m  # nothing newer than the target: the model itself


def test_without_the_expansion_the_version_converter_refuses() -> None:
    with pytest.raises(Exception, match="No Previous Version of"):
        onnx.version_converter.convert_version(opset23_model(), RUNTIME_MAX_OPSET)


def test_an_opset_23_model_is_pruned_by_the_default_and_keeps_its_ops(tmp_path: Path) -> None:
    m = opset23_model(2)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x = np.random.default_rng(3).standard_normal((96, 6, 8)).astype(np.float32)
    rep = compress(src, out, {"x": x[:64]}, CompressConfig(sparsity=0.5), eval_data={"x": x[64:]})
    p = sum(t.size for t in find_prunable(load_model(src)))
    assert rep.method == "layerwise" and rep.nnz == round(0.5 * p) and p == 3 * 64 + 24
    assert not [w for w in rep.warnings if "no gradients" in w]
    written = onnx.load(out)
    assert {"Attention", "RMSNormalization"} <= {n.op_type for n in written.graph.node}
    assert [(o.domain, o.version) for o in written.opset_import] == [("", 23)]
    assert rep.evaluation is not None and rep.evaluation.agreement is not None and rep.evaluation.agreement >= 0.75


def test_a_newer_op_inside_an_if_branch_is_expanded_too() -> None:
    """``RMSNormalization`` in the then-branch of an ``If`` (outer-scope input and scale): the branch
    is expanded as well, and the down-converted copy computes what onnx's reference evaluator does."""
    rng = np.random.default_rng(5)
    inits = [
        numpy_helper.from_array((0.5 * rng.standard_normal((4, 6))).astype(np.float32), "W"),
        numpy_helper.from_array(rng.standard_normal(6).astype(np.float32), "g"),
        numpy_helper.from_array(np.array(True), "cond"),
    ]
    then = helper.make_graph(
        [helper.make_node("RMSNormalization", ["z", "g"], ["t"], axis=-1)],
        "then",
        [],
        [helper.make_tensor_value_info("t", F, None)],
    )
    other = helper.make_graph(
        [helper.make_node("Identity", ["z"], ["e"])], "else", [], [helper.make_tensor_value_info("e", F, None)]
    )
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["z"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other),
    ]
    g = helper.make_graph(
        nodes,
        "branch",
        [helper.make_tensor_value_info("x", F, ["N", 4])],
        [helper.make_tensor_value_info("y", F, ["N", 6])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 23)])
    m.ir_version = 11
    x = rng.standard_normal((3, 4)).astype(np.float32)
    want = ReferenceEvaluator(m).run(None, {"x": x})[0]
    down = onnx.version_converter.convert_version(expand_newer_ops(m, RUNTIME_MAX_OPSET), RUNTIME_MAX_OPSET)
    down.ir_version = 10
    got = make_session(down.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
