"""The default recipe (``--method auto``): layer-wise reconstruction where it can run, else CHITA."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MODELS
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.errors import ModelError
from chita_onnx.graph import find_prunable, get_weights, load_model
from chita_onnx.pipeline import prepare, resolve_method
from chita_onnx.solver.budgets import keep_count

CNN = MODELS / "digits_cnn.onnx"
CALIB, TEST = MODELS / "digits_calib.npz", MODELS / "digits_test.npz"


def _nnz(path: Path) -> tuple[int, int]:
    m = load_model(path)
    w = get_weights(m, [t.name for t in find_prunable(m)])
    return sum(int(np.count_nonzero(v)) for v in w.values()), sum(v.size for v in w.values())


def if_classifier(seed: int = 0, F: int = 6, H: int = 8, C: int = 3) -> onnx.ModelProto:
    """``x [N,F] → If(const true){MatMul(x, Wt)} else {MatMul(x, We)} → Relu → MatMul Wout → logits``,
    the branch weights stored inside the branches (as spox writes them)."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float = 0.5) -> TensorProto:
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    def branch(tag: str) -> onnx.GraphProto:
        return helper.make_graph(
            [helper.make_node("MatMul", ["x", f"W{tag}"], [f"y{tag}"])],
            f"branch_{tag}",
            [],
            [helper.make_tensor_value_info(f"y{tag}", TensorProto.FLOAT, ["N", H])],
            [init(f"W{tag}", F, H)],
        )

    nodes = [
        helper.make_node("If", ["cond"], ["y"], then_branch=branch("t"), else_branch=branch("e")),
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("MatMul", ["r", "Wout"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "if_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", F])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C])],
        [numpy_helper.from_array(np.array(True), "cond"), init("Wout", H, C, scale=0.8)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def test_default_is_layerwise_on_a_cnn_and_keeps_the_budget(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    report = chita_onnx.compress(CNN, out, CALIB, CompressConfig(sparsity=0.7), eval_data=TEST)
    assert report.method == "layerwise"
    assert str(report.solver["method_choice"]).startswith("method auto: layerwise")
    assert report.config["bias_correction"] == report.config["bn_recalibrate"] == "off"  # see resolve_method
    nnz, p = _nnz(out)
    assert nnz <= keep_count(0.7, p)
    assert report.evaluation is not None and report.evaluation.pruned_accuracy is not None
    assert report.evaluation.pruned_accuracy >= 0.9  # dense 0.98; measured 0.99 (BENCHMARKS.md)


def test_default_inlines_fixed_ifs_and_prunes_branch_weights_layer_by_layer(tmp_path: Path) -> None:
    src, out = tmp_path / "if.onnx", tmp_path / "out.onnx"
    onnx.save(if_classifier(), src)
    names = {t.name for t in find_prunable(onnx.load(src))}
    assert "Wt" in names  # a weight inside the taken branch
    rng = np.random.default_rng(1)
    data = {"x": rng.standard_normal((40, 6)).astype(np.float32)}
    report = chita_onnx.compress(src, out, data, CompressConfig(sparsity=0.5, holdout=0.25))
    assert report.method == "layerwise"
    assert report.k == keep_count(0.5, report.p)
    pruned = {t.name: t.nnz for t in report.tensors}
    assert pruned["Wt"] < 48 and pruned["Wt"] + pruned["Wout"] <= report.k  # the untaken branch's We is left
    written = onnx.load(out)
    assert [n.op_type for n in written.graph.node] == ["If", "Relu", "MatMul"]  # the graph is kept
    onnx.checker.check_model(written)


def test_inline_fixed_ifs_is_equivalent_on_the_calibration_data() -> None:
    from chita_onnx.activations import inline_fixed_ifs, working_copy
    from chita_onnx.runtime import run, session

    model = working_copy(if_classifier(seed=3))
    x = np.random.default_rng(2).standard_normal((5, 6)).astype(np.float32)
    inlined = inline_fixed_ifs(model, [{"x": x}])
    assert "If" not in [n.op_type for n in inlined.graph.node]
    assert {"Wt", "Wout"} <= {t.name for t in inlined.graph.initializer}
    a = run(session(model, what="original"), ["logits"], {"x": x}, what="original")[0]
    b = run(session(inlined, what="inlined"), ["logits"], {"x": x}, what="inlined")[0]
    np.testing.assert_array_equal(a, b)


def test_default_falls_back_to_chita_when_a_weight_is_not_a_layer_weight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault injection at the layer-site check: ``auto`` must then run CHITA and say why."""
    import chita_onnx.activations as activations

    def no_sites(model: object, names: object) -> None:
        raise ModelError("no consuming Conv/Gemm/MatMul node for weight(s) ['injected']")

    monkeypatch.setattr(activations, "find_layers", no_sites)
    report = chita_onnx.compress(CNN, tmp_path / "o.onnx", CALIB, CompressConfig(sparsity=0.5), eval_data=TEST)
    assert report.method == "chita"
    choice = str(report.solver["method_choice"])
    assert choice.startswith("method auto: chita") and "injected" in choice


def test_options_only_chita_has_resolve_auto_to_chita() -> None:
    prep = prepare(CNN, CALIB, CompressConfig(), TEST)
    assert resolve_method(prep, CompressConfig())[0].method == "layerwise"
    forced = resolve_method(prep, CompressConfig(bias_correction="on"))[0]
    assert (forced.bias_correction, forced.bn_recalibrate) == ("on", "off")
    for cfg in (CompressConfig(update="obs"), CompressConfig(first_order=True)):
        resolved, why = resolve_method(prep, cfg)
        assert resolved.method == "chita" and why.startswith("method auto: chita")
    nm, why = resolve_method(prep, CompressConfig(pattern="2:4"))
    assert (nm.method, nm.stages, nm.pattern) == ("chita++", 10, "2:4") and "chita++" in why
    named = CompressConfig(method="magnitude")
    assert resolve_method(prep, named) == (named, "")


def test_a_failing_layerwise_pass_falls_back_to_chita(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the default must not refuse a model that CHITA can prune."""
    import chita_onnx.reconstruct as reconstruct

    def broken(*args: object, **kwargs: object) -> None:
        raise ModelError("injected failure of the layer-wise pass")

    monkeypatch.setattr(reconstruct, "prune_layerwise", broken)
    out = tmp_path / "out.onnx"
    report = chita_onnx.compress(CNN, out, CALIB, CompressConfig(sparsity=0.5), eval_data=TEST)
    assert report.method == "chita"
    assert "injected failure" in str(report.solver["method_choice"])
    with pytest.raises(ModelError, match="injected"):
        chita_onnx.compress(CNN, tmp_path / "o2.onnx", CALIB, CompressConfig(sparsity=0.5, method="layerwise"))
