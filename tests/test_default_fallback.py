"""The default recipe degrades per weight: weights the layer-wise pass cannot reconstruct (here a MatMul
with a 3-D constant weight) are pruned to their allocated share before the pass, the rest is
reconstructed layer by layer, and only a majority of such weights sends ``auto`` to ``chita``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.activations import working_copy
from chita_onnx.graph import find_prunable
from chita_onnx.rnnlayers import check_layers, split_layers
from chita_onnx.runtime import run, session
from chita_onnx.sequential import LayerwiseOptions, layerwise_prune
from chita_onnx.solver.budgets import keep_count


def grouped_matmul_cnn(C: int, seed: int = 0, D: int = 6) -> onnx.ModelProto:
    """``x [N,1,8,8] → Conv(4, 3×3) → Relu → MatMul(G [4, 8, D]) → Relu → ReduceMean(axis 2) →
    Flatten → Gemm(C) → logits``: ``G`` is a 3-D constant weight (one ``[8, D]`` matrix per channel),
    which the layer-wise pass does not reconstruct.  Sizes: Conv 36, G 32·D, Gemm 4·D·C."""
    rng = np.random.default_rng(seed)

    def init(name: str, *shape: int, scale: float) -> TensorProto:
        return numpy_helper.from_array((scale * rng.standard_normal(shape)).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("MatMul", ["r", "G"], ["g"], name="grouped"),
        helper.make_node("Relu", ["g"], ["gr"]),
        helper.make_node("ReduceMean", ["gr"], ["m"], axes=[2], keepdims=0),
        helper.make_node("Flatten", ["m"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg", "bg"], ["logits"], transB=1, name="head"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", C])],
        [
            init("Wc", 4, 1, 3, 3, scale=0.6),
            init("G", 4, 8, D, scale=0.5),
            init("Wg", C, 4 * D, scale=0.7),
            numpy_helper.from_array(np.zeros(C, np.float32), "bg"),
        ],
    )


def _data(n: int, seed: int) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((n, 1, 8, 8)).astype(np.float32)}


def _weights(path: Path) -> dict[str, np.ndarray]:
    from chita_onnx.graph import get_weights, load_model

    m = load_model(path)
    return get_weights(m, [t.name for t in find_prunable(m)])


def test_split_layers_names_what_check_layers_refuses() -> None:
    model = working_copy(grouped_matmul_cnn(C=10))
    names = ["Wc", "G", "Wg"]
    assert "G" in {t.name for t in find_prunable(model)}
    try:
        check_layers(model, names)
        raised = False
    except chita_onnx.ChitaError:
        raised = True
    assert raised  # the strict check is unchanged for its other callers
    sites, refused = split_layers(model, names)
    assert [s.weight for s in sites] == ["Wc", "Wg"]
    assert list(refused) == ["G"] and refused["G"]
    assert split_layers(model, ["Wc", "Wg"]) == (check_layers(model, ["Wc", "Wg"]), {})


def test_default_stays_layerwise_with_a_minority_of_unsupported_weights(tmp_path: Path) -> None:
    src, out = tmp_path / "g.onnx", tmp_path / "out.onnx"
    onnx.save(grouped_matmul_cnn(C=10), src)  # Conv 36 + G 192 + Gemm 240: G is 41% of p
    report = chita_onnx.compress(src, out, _data(120, 1), CompressConfig(sparsity=0.6), eval_data=_data(60, 2))
    assert report.method == "layerwise"
    choice = str(report.solver["method_choice"])
    assert choice.startswith("method auto: layerwise") and "not reconstructed" in choice and "G (" in choice
    assert report.solver["not_reconstructed"] == "G"
    w = _weights(out)
    nnz = sum(int(np.count_nonzero(v)) for v in w.values())
    assert nnz == report.k == keep_count(0.6, report.p)
    nnz_g = int(np.count_nonzero(w["G"]))
    assert 0 < nnz_g < w["G"].size  # G got its share of the global budget, and was pruned
    dense, pruned = onnx.load(src), onnx.load(out)
    assert [i.name for i in pruned.graph.input] == [i.name for i in dense.graph.input]
    assert [o.name for o in pruned.graph.output] == [o.name for o in dense.graph.output]
    x = _data(5, 3)
    y = run(session(pruned, what="pruned"), ["logits"], x, what="pruned")[0]
    assert y.shape == (5, 10) and np.all(np.isfinite(y))
    assert report.evaluation is not None and report.evaluation.agreement is not None


def test_a_majority_of_unsupported_weights_still_falls_back_to_chita(tmp_path: Path) -> None:
    src = tmp_path / "g.onnx"
    onnx.save(grouped_matmul_cnn(C=3), src)  # Conv 36 + G 192 + Gemm 72: G is 64% of p
    report = chita_onnx.compress(src, tmp_path / "o.onnx", _data(80, 1), CompressConfig(sparsity=0.5))
    assert report.method == "chita"
    choice = str(report.solver["method_choice"])
    assert choice.startswith("method auto: chita") and "more than half" in choice and "G (" in choice
    assert report.nnz <= report.k
    only = tmp_path / "only.onnx"  # no weight the pass can reconstruct: --method layerwise refuses, clearly
    onnx.save(
        make_model(
            [helper.make_node("MatMul", ["x", "G"], ["y"], name="grouped")],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6])],
            [numpy_helper.from_array(np.ones((4, 8, 6), np.float32), "G")],
        ),
        only,
    )
    x = {"x": np.random.default_rng(0).standard_normal((20, 4, 8)).astype(np.float32)}
    with pytest.raises(chita_onnx.ChitaError, match="cannot handle any prunable weight: G"):
        chita_onnx.compress(only, tmp_path / "o2.onnx", x, CompressConfig(sparsity=0.5, method="layerwise"))
    assert chita_onnx.compress(only, tmp_path / "o3.onnx", x, CompressConfig(sparsity=0.5)).method == "chita"


def test_planted_conv_is_recovered_by_the_default_next_to_an_unsupported_weight(tmp_path: Path) -> None:
    """test_row_cap's planted Conv (channels duplicated by a protected 1×1 Conv, a 3×3 Conv spread
    equally over both copies), followed by a MatMul with a 3-D weight: at 50% the default still keeps
    one copy of each tap of the planted Conv and reproduces its kernel exactly."""
    rng = np.random.default_rng(5)
    C, M = 2, 3
    a = rng.standard_normal((M, C, 3, 3)).astype(np.float32)
    w = np.concatenate([0.5 * a, 0.5 * a], axis=1)  # (M, 2C, 3, 3)
    dup = np.concatenate([np.eye(C), np.eye(C)]).reshape(2 * C, C, 1, 1).astype(np.float32)
    g = rng.standard_normal((M, 8, 4)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "D"], ["xx"], name="dup"),
            helper.make_node("Conv", ["xx", "W"], ["y"], pads=[1, 1, 1, 1], name="conv"),
            helper.make_node("MatMul", ["y", "G"], ["z"], name="grouped"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 8, 8])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", M, 8, 4])],
        [numpy_helper.from_array(dup, "D"), numpy_helper.from_array(w, "W"), numpy_helper.from_array(g, "G")],
    )
    path = tmp_path / "planted.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((200, C, 8, 8)).astype(np.float32)
    cfg = CompressConfig(sparsity=0.5, allocation="uniform", damp=1e-6, keep=("D",))
    r = chita_onnx.compress(path, tmp_path / "p.onnx", {"x": x}, cfg, eval_data={"x": x[:40]})
    assert r.method == "layerwise" and r.solver["not_reconstructed"] == "G"
    assert r.nnz == r.k
    out = _weights(tmp_path / "p.onnx")
    W = out["W"]
    assert int(np.count_nonzero(W)) == w.size // 2
    both = (W[:, :C] != 0) & (W[:, C:] != 0)
    assert not both.any()  # one copy of each tap
    np.testing.assert_allclose(W[:, :C] + W[:, C:], a, atol=1e-3)  # the planted kernel, exactly
    assert int(np.count_nonzero(out["G"])) == g.size // 2


def test_fixed_upstream_weights_are_seen_pruned_by_the_layers_after_them() -> None:
    """``x → MatMul(P [1, K, K]) → MatMul(W2 [K, M])``; ``P`` is fixed to a pruned, still invertible
    value and ``W2`` is re-fitted with every weight kept: on the pruned inputs the fit reproduces the
    dense outputs exactly, which it cannot when it is fitted on the dense inputs."""
    rng = np.random.default_rng(7)
    K, M = 6, 4
    P = (np.eye(K) + 0.3 * rng.standard_normal((K, K))).astype(np.float32)[None]
    W2 = rng.standard_normal((K, M)).astype(np.float32)
    model = working_copy(
        make_model(
            [helper.make_node("MatMul", ["x", "P"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["y"])],
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "N", K])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "N", M])],
            [numpy_helper.from_array(P, "P"), numpy_helper.from_array(W2, "W2")],
        )
    )
    Pp = np.where(np.abs(P) >= np.quantile(np.abs(P), 0.5), P, 0).astype(np.float32)
    assert abs(np.linalg.det(Pp[0])) > 1e-2
    x = rng.standard_normal((1, 300, K)).astype(np.float32)
    opts = LayerwiseOptions(damp=1e-9)
    seen = layerwise_prune(model, [{"x": x}], keep={"W2": W2.size}, opts=opts, fixed={"P": Pp})
    blind = layerwise_prune(model, [{"x": x}], keep={"W2": W2.size}, opts=opts)
    dense = x @ P @ W2
    assert np.max(np.abs(x @ Pp @ seen.weights["W2"] - dense)) < 1e-3 * np.max(np.abs(dense))
    assert np.max(np.abs(x @ Pp @ blind.weights["W2"] - dense)) > 0.05 * np.max(np.abs(dense))
    assert set(seen.weights) == {"W2"}  # the fixed weight is not re-fitted


def _cnn_with(op_nodes: list[onnx.NodeProto], seed: int) -> onnx.ModelProto:
    """``x [N,2,6,6] → Conv(6, 3×3, pads 1) → OPS (z → y) → Relu → Flatten → Gemm(5)``."""
    rng = np.random.default_rng(seed)
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["z"], pads=[1, 1, 1, 1], name="conv"),
        *op_nodes,
        helper.make_node("Relu", ["y"], ["r"]),
        helper.make_node("Flatten", ["r"], ["fl"]),
        helper.make_node("Gemm", ["fl", "Wg"], ["logits"], transB=1, name="fc"),
    ]
    inits = [
        numpy_helper.from_array((rng.standard_normal((6, 2, 3, 3)) / 4).astype(np.float32), "Wc"),
        numpy_helper.from_array((rng.standard_normal((5, 216)) / 15).astype(np.float32), "Wg"),
    ]
    io = [helper.make_tensor_value_info("x", f, ["N", 2, 6, 6])], [helper.make_tensor_value_info("logits", f, ["N", 5])]
    m = helper.make_model(helper.make_graph(nodes, "cnn", *io, inits), opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_default_allocates_by_magnitude_when_an_op_has_no_gradient(tmp_path: Path) -> None:
    """An op onnxruntime-training cannot differentiate and nothing rewrites (Atan) between the
    weights and the loss: ``--method chita`` refuses, the default prunes layer-wise to the exact
    budget with the magnitude allocation, and says why."""
    src, out = tmp_path / "atan.onnx", tmp_path / "out.onnx"
    onnx.save(_cnn_with([helper.make_node("Atan", ["z"], ["y"])], seed=3), src)
    x = {"x": np.random.default_rng(4).standard_normal((48, 2, 6, 6)).astype(np.float32)}
    with pytest.raises(chita_onnx.errors.UnsupportedOpError, match="Atan"):
        chita_onnx.compress(src, out, x, CompressConfig(sparsity=0.5, method="chita"))
    rep = chita_onnx.compress(src, out, x, CompressConfig(sparsity=0.5), eval_data={"x": x["x"][:8]})
    assert rep.method == "layerwise" and rep.config["allocation"] == "magnitude"
    assert rep.nnz == keep_count(0.5, 108 + 1080)
    said = [w for w in rep.warnings if "no gradients for this model" in w]
    assert len(said) == 1 and "Atan" in said[0]


def test_lrn_models_get_gradients_and_the_default_allocation(tmp_path: Path) -> None:
    """LRN (AlexNet, GoogLeNet) has an exact rewrite for gradients: the default keeps its OBD
    allocation, and one-shot chita runs."""
    src, out = tmp_path / "lrn.onnx", tmp_path / "out.onnx"
    onnx.save(_cnn_with([helper.make_node("LRN", ["z"], ["y"], size=5, alpha=1e-4, beta=0.75, bias=1.0)], 5), src)
    x = {"x": np.random.default_rng(6).standard_normal((48, 2, 6, 6)).astype(np.float32)}
    rep = chita_onnx.compress(src, out, x, CompressConfig(sparsity=0.5), eval_data={"x": x["x"][:8]})
    assert rep.config["allocation"] == "obd" and not [w for w in rep.warnings if "no gradients" in w]
    assert rep.nnz == keep_count(0.5, 108 + 1080)
    rep = chita_onnx.compress(src, out, x, CompressConfig(sparsity=0.5, method="chita"), eval_data={"x": x["x"][:8]})
    assert rep.method == "chita" and rep.nnz == keep_count(0.5, 108 + 1080)


def test_a_float16_model_is_pruned_by_the_default_in_float16(tmp_path: Path) -> None:
    """A model computed in float16 end to end: its gradients come from a float32 twin (see
    tests/test_precision_twin.py), the written weights stay float16, and the statistics correction
    runs on float16 segments."""
    m = _cnn_with([helper.make_node("Identity", ["z"], ["y"])], seed=7)
    for t in m.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float16), t.name))
    for v in (*m.graph.input, *m.graph.output):
        v.type.tensor_type.elem_type = TensorProto.FLOAT16
    src, out = tmp_path / "half.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x = {"x": np.random.default_rng(8).standard_normal((48, 2, 6, 6)).astype(np.float16)}
    cfg = CompressConfig(sparsity=0.5, bias_correction="on")
    rep = chita_onnx.compress(src, out, x, cfg, eval_data={"x": x["x"][:8]})
    assert rep.config["allocation"] == "obd" and rep.nnz == keep_count(0.5, 108 + 1080)
    assert not [w for w in rep.warnings if "no gradients" in w]
    written = onnx.load(out)
    stored = {t.name: t for t in written.graph.initializer}
    assert {stored[n].data_type for n in ("Wc", "Wg")} == {TensorProto.FLOAT16}
    y = session(written, what="the written model").run(None, {"x": x["x"][:4]})[0]
    assert y.dtype == np.float16 and np.all(np.isfinite(y))
    # a gradient-free allocation asked for explicitly is no reason to refuse either
    rep = chita_onnx.compress(src, out, x, CompressConfig(sparsity=0.5, allocation="uniform"))
    assert rep.config["allocation"] == "uniform" and rep.nnz == keep_count(0.5, 108 + 1080)


def test_a_layer_too_wide_to_solve_in_memory_is_pruned_by_its_allocation(tmp_path: Path) -> None:
    """A layer whose Gram and factors would pass ``--max-memory`` (VGG's 25088-wide fc6 needs tens
    of GB) is pruned by its allocated count alone, like a weight the pass cannot handle: the run
    stays layer-wise, keeps exactly k, and reconstructs the other layers."""
    rng = np.random.default_rng(13)
    f = TensorProto.FLOAT
    inits = [
        numpy_helper.from_array((rng.standard_normal((200, 16)) / 14).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal((3, 16)) / 4).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="wide"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("Gemm", ["r", "W2"], ["logits"], transB=1, name="head"),
    ]
    io = [helper.make_tensor_value_info("x", f, ["N", 200])], [helper.make_tensor_value_info("logits", f, ["N", 3])]
    m = helper.make_model(helper.make_graph(nodes, "wide", *io, inits), opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    src, out = tmp_path / "wide.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x = {"x": rng.standard_normal((48, 200)).astype(np.float32)}
    cfg = CompressConfig(sparsity=0.5, max_memory=2**20)  # W1's solve: ~1.8 MB; W2's: ~3 KB
    rep = chita_onnx.compress(src, out, x, cfg, eval_data={"x": x["x"][:8]})
    assert rep.method == "layerwise" and rep.nnz == keep_count(0.5, 3200 + 48)
    assert rep.solver["not_reconstructed"] == "W1"
    roomy = chita_onnx.compress(src, out, x, cfg.with_(max_memory=2**30), eval_data={"x": x["x"][:8]})
    assert "not_reconstructed" not in roomy.solver and roomy.nnz == rep.nnz
