"""``--head-select classes``: a softmax head keeps the weights its classes use.

The solver side (:func:`~chita_onnx.solver.layerwise.class_weighted_mask`), the statistics it reads
(:func:`~chita_onnx.layerstats.add_class_energy`, checked against finite differences of the KL
divergence to the dense output), the graph side (:func:`~chita_onnx.reconstruct.class_head` on the
head shapes exporters write) and the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model, tiny_mlp
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.errors import SolverError
from chita_onnx.layerstats import CLASS_PRIOR, LayerGeometry, LayerStats, accumulate, add_class_energy
from chita_onnx.reconstruct import class_head
from chita_onnx.rnnlayers import split_layers
from chita_onnx.solver.layerwise import HEAD_CLASS_FLOOR, class_weighted_mask

REPO = Path(__file__).resolve().parents[1]
MLP, CALIB, TEST = REPO / "models/digits_mlp.onnx", REPO / "models/digits_calib.npz", REPO / "models/digits_test.npz"


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


# ------------------------------------------------------------------------------------------ solver


def test_the_mask_is_an_exact_budget_with_a_floor_per_class() -> None:
    rng = np.random.default_rng(0)
    M, d, keep = 6, 40, 90
    W = rng.standard_normal((M, d))
    E = rng.uniform(0.5, 2.0, (M, d))
    E[2] = 0.0  # a class the calibration data never give probability
    E[4] *= 100.0  # one they mostly predict
    mask = class_weighted_mask(W, E, keep)
    assert mask.shape == (M, d) and int(mask.sum()) == keep
    per = int(HEAD_CLASS_FLOOR * keep / M)
    assert mask.sum(axis=1).min() >= per
    assert int(mask[2].sum()) == per  # nothing beyond its floor
    assert int(mask[4].sum()) > keep // M  # the class the data use takes more than an even share
    on_floor = np.argsort(-(W[2] ** 2))[:per]  # its floor is its largest weights (E is zero there)
    assert mask[2, on_floor].all()


def test_without_a_floor_the_mask_is_the_top_k_of_the_saliency() -> None:
    rng = np.random.default_rng(1)
    W, E = rng.standard_normal((5, 30)), rng.uniform(0.0, 3.0, (5, 30))
    keep = 47
    mask = class_weighted_mask(W, E, keep, floor=0.0)
    s = (W**2 * E).ravel()
    assert set(np.flatnonzero(mask.ravel())) == set(np.argsort(-s)[:keep])


def test_limit_cases_and_bad_arguments() -> None:
    rng = np.random.default_rng(2)
    W, E = rng.standard_normal((3, 8)), rng.uniform(size=(3, 8))
    assert not class_weighted_mask(W, E, 0).any()
    assert class_weighted_mask(W, E, W.size).all()
    with pytest.raises(SolverError, match="energy has shape"):
        class_weighted_mask(W, E[:, :4], 5)
    with pytest.raises(SolverError, match="keep=25"):
        class_weighted_mask(W, E, 25)
    with pytest.raises(SolverError, match=r"floor=1\.5"):
        class_weighted_mask(W, E, 5, floor=1.5)


# -------------------------------------------------------------------------------------- statistics


def _kl(W: np.ndarray, b: np.ndarray, X: np.ndarray, p: np.ndarray) -> float:
    q = _softmax(X @ W.T + b)
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def test_class_energy_bounds_the_kl_curvature_measured_by_finite_differences() -> None:
    """At the dense weights, the KL divergence from the dense output has the Gauss-Newton curvature
    ``Σ_n x_n x_nᵀ ⊗ (diag q_n − q_n q_nᵀ)``; its diagonal, measured here by central second
    differences, is ``Σ_n q_nc (1 − q_nc) x_nj²``.  The class energy keeps ``diag q_n`` (the coupling
    dropped, an upper bound) plus the prior: it must be at least the measured curvature, and equal
    to it once the ``q²`` term is added back."""
    rng = np.random.default_rng(3)
    n, d, M = 50, 4, 3
    X = rng.standard_normal((n, d))
    W = rng.standard_normal((M, d))
    b = rng.standard_normal(M)
    p = _softmax(X @ W.T + b)
    stats = LayerStats.empty(LayerGeometry("gemm", (M, d), trans_b=True), cross=True)
    stats.class_offset = b.copy()
    add_class_energy(stats, X.astype(np.float32), (X @ W.T).astype(np.float32))
    assert stats.class_energy is not None
    E = stats.class_energy - CLASS_PRIOR / M * np.sum(X**2, axis=0)[None, :]
    h = 1e-3
    fd = np.zeros((M, d))
    f0 = _kl(W, b, X, p)
    for c in range(M):
        for j in range(d):
            Wp, Wm = W.copy(), W.copy()
            Wp[c, j] += h
            Wm[c, j] -= h
            fd[c, j] = (_kl(Wp, b, X, p) - 2 * f0 + _kl(Wm, b, X, p)) / h**2 * n
    exact_diag = np.einsum("nc,nj->cj", p * (1 - p), X**2)
    np.testing.assert_allclose(fd, exact_diag, rtol=2e-3, atol=1e-6)
    assert np.all(fd - 1e-4 <= E)
    np.testing.assert_allclose(E - np.einsum("nc,nj->cj", p**2, X**2), fd, rtol=2e-3, atol=1e-4)


def test_class_energy_accumulates_over_batches_like_one_batch() -> None:
    rng = np.random.default_rng(4)
    M, d = 4, 6
    geom = LayerGeometry("gemm", (M, d), trans_b=True)
    X = rng.standard_normal((30, d)).astype(np.float32)
    W = rng.standard_normal((M, d)).astype(np.float32)
    bias = rng.standard_normal(M)
    z = X @ W.T + bias.astype(np.float32)  # the node's output, bias included
    one, parts = (LayerStats.empty(geom, cross=True) for _ in range(2))
    for s in (one, parts):
        s.class_offset = bias
    accumulate(one, X, z_dense=z, offset=bias, geom=geom)
    for sl in (slice(0, 7), slice(7, 19), slice(19, 30)):
        accumulate(parts, X[sl], z_dense=z[sl], offset=bias, geom=geom)
    q = _softmax(z.astype(np.float64)) + CLASS_PRIOR / M
    assert one.class_energy is not None and parts.class_energy is not None
    np.testing.assert_allclose(one.class_energy, q.T @ X.astype(np.float64) ** 2, rtol=1e-5)
    np.testing.assert_allclose(parts.class_energy, one.class_energy, rtol=1e-5)


# ------------------------------------------------------------------------------------------- graph


def _head_model(kind: str) -> onnx.ModelProto:
    """x[N,6] → MatMul W1 → Relu → a 4-class head written as ``kind``."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((6, 8)).astype(np.float32)
    w2 = rng.standard_normal((8, 4)).astype(np.float32)
    wt = np.ascontiguousarray(w2.T)
    b2 = np.arange(4, dtype=np.float32)
    c = np.array([0.5, -0.5, 1.0, 0.0], np.float32)
    inits = [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(b2, "b2")]
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Relu", ["h0"], ["h"])]
    out = "probs"
    if kind == "matmul_add_identity_softmax":
        inits.append(numpy_helper.from_array(w2, "W2"))
        nodes += [
            helper.make_node("MatMul", ["h", "W2"], ["z0"]),
            helper.make_node("Add", ["z0", "b2"], ["z1"]),
            helper.make_node("Identity", ["z1"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=-1),
        ]
    elif kind == "gemm_add_softmax":
        inits += [numpy_helper.from_array(wt, "W2"), numpy_helper.from_array(c, "c")]
        nodes += [
            helper.make_node("Gemm", ["h", "W2", "c"], ["z0"], transB=1, beta=2.0),
            helper.make_node("Add", ["b2", "z0"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        ]
    elif kind == "broadcast_softmax":  # what tf2onnx writes for JAX's softmax
        inits += [
            numpy_helper.from_array(w2, "W2"),
            numpy_helper.from_array(np.array([1], np.int64), "ax"),
            numpy_helper.from_array(np.array([-1, 1], np.int64), "col"),
            numpy_helper.from_array(np.array(-np.inf, np.float32), "floor"),
        ]
        nodes += [
            helper.make_node("MatMul", ["h", "W2"], ["z0"]),
            helper.make_node("Add", ["z0", "b2"], ["z"]),
            helper.make_node("ReduceMax", ["z"], ["m0"], axes=[1], keepdims=0),
            helper.make_node("Max", ["floor", "m0"], ["m1"]),
            helper.make_node("Reshape", ["m1", "col"], ["m2"]),
            helper.make_node("Sub", ["z", "m2"], ["s"]),
            helper.make_node("Exp", ["s"], ["e"]),
            helper.make_node("ReduceSum", ["e", "ax"], ["t0"], keepdims=0),
            helper.make_node("Reshape", ["t0", "col"], ["t1"]),
            helper.make_node("Div", ["e", "t1"], ["probs"]),
        ]
    elif kind in ("sigmoid", "raw"):
        inits.append(numpy_helper.from_array(w2, "W2"))
        nodes += [helper.make_node("MatMul", ["h", "W2"], ["z0"]), helper.make_node("Add", ["z0", "b2"], ["z"])]
        if kind == "sigmoid":
            nodes.append(helper.make_node("Sigmoid", ["z"], ["probs"]))
        else:
            out = "z"
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["N", 4])],
        inits,
        opset=13,
    )


@pytest.mark.parametrize(
    ("kind", "offset"),
    [
        ("matmul_add_identity_softmax", [0.0, 1.0, 2.0, 3.0]),
        ("gemm_add_softmax", [1.0, 0.0, 4.0, 3.0]),  # beta·c + b2
        ("broadcast_softmax", [0.0, 1.0, 2.0, 3.0]),
    ],
)
def test_the_head_layer_and_its_offset_are_found(kind: str, offset: list[float]) -> None:
    model = _head_model(kind)
    sites, refused = split_layers(model, ["W1", "W2"])
    assert not refused
    found = class_head(model, sites, None)
    assert found is not None
    assert found[0] == "W2"
    np.testing.assert_allclose(found[1], offset)


def test_the_trial_is_skipped_where_the_head_is_most_of_the_pass() -> None:
    from chita_onnx.reconstruct import trial_affordable

    small = _head_model("matmul_add_identity_softmax")  # an 8 × 4 head after a 6 × 8 layer
    assert not trial_affordable(split_layers(small, ["W1", "W2"])[0], "W2")
    mlp = onnx.load(MLP)
    names = ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert trial_affordable(split_layers(mlp, names)[0], "fc3.weight")


def test_no_head_layer_without_a_softmax_over_its_outputs() -> None:
    sig = _head_model("sigmoid")
    assert class_head(sig, split_layers(sig, ["W1", "W2"])[0], None) is None
    raw = _head_model("raw")
    sites = split_layers(raw, ["W1", "W2"])[0]
    assert class_head(raw, sites, None) is None  # raw scores: only when the gradients read them as logits
    found = class_head(raw, sites, None, "logits")
    assert found is not None and found[0] == "W2"


# ---------------------------------------------------------------------------------------- pipeline


def _softmax_mlp(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The bundled digits MLP with a Softmax on its logits, and its calibration images without
    labels (the sampled Fisher's case: a classifier calibrated on unlabelled data)."""
    m = onnx.load(MLP)
    m.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    m.graph.output[0].name = "probs"
    path = tmp_path / "softmax_mlp.onnx"
    onnx.save(m, path)
    with np.load(CALIB) as z:
        x = {k: z[k] for k in z.files if k != "labels"}
    return path, x


def _compress(model: Path, out: Path, data: dict[str, np.ndarray], how: str) -> chita_onnx.Report:
    """``--method layerwise --head-select how`` at 0.7, with no statistics step after the pass."""
    cfg = CompressConfig(
        sparsity=0.7, method="layerwise", head_select=how, storage="dense", bn_recalibrate="off",  # type: ignore[arg-type]
        bias_correction="off", class_offsets="off", auto_distill=False,
    )  # fmt: skip
    return chita_onnx.compress(model, out, data, cfg)


def test_only_the_head_changes_and_the_budget_stays_exact(tmp_path: Path) -> None:
    from chita_onnx.graph import get_weights, load_model
    from chita_onnx.solver.budgets import keep_count

    model, data = _softmax_mlp(tmp_path)
    got, nnz = {}, {}
    for how in ("layer", "classes"):
        out = tmp_path / f"{how}.onnx"
        report = _compress(model, out, data, how)
        nnz[how] = {t.name: t.nnz for t in report.tensors}
        assert sum(nnz[how].values()) == keep_count(0.7, sum(t.size for t in report.tensors))
        got[how] = get_weights(load_model(out), list(nnz[how]))
    assert nnz["layer"] == nnz["classes"]  # the allocation is the same
    for name in ("fc1.weight", "fc2.weight"):  # solved before the head: identical
        np.testing.assert_array_equal(got["layer"][name], got["classes"][name])
    head = got["classes"]["fc3.weight"]
    assert not np.array_equal(head != 0, got["layer"]["fc3.weight"] != 0)
    per = int(HEAD_CLASS_FLOOR * nnz["classes"]["fc3.weight"] / head.shape[0])
    assert (head != 0).sum(axis=1).min() >= per


def test_head_kl_is_the_kl_between_the_two_softmaxes() -> None:
    from chita_onnx.sequential import head_kl

    rng = np.random.default_rng(8)
    x = rng.standard_normal((2500, 5)).astype(np.float32)  # more than one chunk of rows
    W = rng.standard_normal((3, 5))
    y = rng.standard_normal((2500, 3)).astype(np.float32)
    off = rng.standard_normal((1, 3))
    p, q = _softmax(y.astype(np.float64) + off), _softmax(x.astype(np.float64) @ W.T + off)
    want = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))
    assert head_kl(x, y, W, off) == pytest.approx(want, rel=1e-9)
    assert head_kl(x, (x.astype(np.float64) @ W.T).astype(np.float32), W, off) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("model", ["mlp", "conv"])
def test_auto_keeps_one_of_the_two_heads_and_says_which(tmp_path: Path, model: str) -> None:
    """``--head-select auto`` (the default) decides on held-out calibration samples and then fits the
    chosen head on all of them: its weights equal those of ``layer`` or of ``classes`` exactly, and
    the report says which, with both scores."""
    from chita_onnx.graph import get_weights, load_model

    if model == "mlp":
        path, data = _softmax_mlp(tmp_path)
        head = "fc3.weight"
    else:
        path = tmp_path / "conv.onnx"
        onnx.save(_conv_head(), path)
        data = {"x": np.random.default_rng(9).standard_normal((60, 3, 6, 6)).astype(np.float32)}
        head = "W2"
    got, infos = {}, {}
    for how in ("auto", "layer", "classes"):
        out = tmp_path / f"{how}.onnx"
        report = _compress(path, out, data, how)
        got[how] = get_weights(load_model(out), [head])[head]
        infos[how] = report.solver
        if how == "auto":
            from chita_onnx.report import format_report

            assert f"softmax head: {report.solver['head_select']} selection (KL to dense on" in format_report(report)
    info = infos["auto"]
    assert info["head_select"] in ("layer", "classes")
    assert info["head_held_rows"] > 0
    kl = {k: float(info[f"head_kl_{k}"]) for k in ("layer", "classes")}
    assert info["head_select"] == ("classes" if kl["classes"] < kl["layer"] else "layer")
    np.testing.assert_array_equal(got["auto"], got[str(info["head_select"])])
    assert "head_select" not in infos["layer"] and "head_select" not in infos["classes"]


def test_cli_head_select(tmp_path: Path) -> None:
    from chita_onnx_cli.main import cli
    from click.testing import CliRunner

    model = tmp_path / "mlp.onnx"
    onnx.save(tiny_mlp(), model)
    rng = np.random.default_rng(0)
    data = tmp_path / "calib.npz"
    np.savez(data, x=rng.standard_normal((64, 12)).astype(np.float32), labels=rng.integers(0, 5, 64))
    args = ["compress", str(model), str(tmp_path / "o.onnx"), "--data", str(data), "--sparsity", "0.5"]
    for how in ("classes", "auto", "layer"):
        ok = CliRunner().invoke(cli, [*args, "--method", "layerwise", "--head-select", how])
        assert ok.exit_code == 0, ok.output
    bad = CliRunner().invoke(cli, [*args, "--head-select", "obs"])
    assert bad.exit_code == 2 and "--head-select" in bad.output and "obs" in bad.output


def _run_heads(tmp_path: Path, model: onnx.ModelProto, x: dict[str, np.ndarray], head: str) -> dict[str, np.ndarray]:
    """``compress`` with each ``--head-select``; the head's weights from each, after checking that
    the budget is exact and the layers before the head are the same."""
    from chita_onnx.graph import get_weights, load_model
    from chita_onnx.solver.budgets import keep_count

    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    got, nnz = {}, {}
    for how in ("layer", "classes"):
        cfg = CompressConfig(
            sparsity=0.6, method="layerwise", head_select=how, storage="dense", bn_recalibrate="off",  # type: ignore[arg-type]
            bias_correction="off", class_offsets="off", auto_distill=False, allocation="magnitude",
        )  # fmt: skip
        out = tmp_path / f"{how}.onnx"
        report = chita_onnx.compress(path, out, x, cfg)
        nnz[how] = {t.name: t.nnz for t in report.tensors}
        assert sum(nnz[how].values()) == keep_count(0.6, sum(t.size for t in report.tensors))
        got[how] = get_weights(load_model(out), list(nnz[how]))
    assert nnz["layer"] == nnz["classes"]
    for name in nnz["layer"]:
        if name != head:
            np.testing.assert_array_equal(got["layer"][name], got["classes"][name])
    assert not np.array_equal(got["layer"][head] != 0, got["classes"][head] != 0)
    return {k: v[head] for k, v in got.items()}


def _conv_head() -> onnx.ModelProto:
    """x[N,3,6,6] → Conv 3×3 → Relu → a 1×1 Conv head of 5 classes → Softmax over the channels."""
    rng = np.random.default_rng(6)
    w1 = (0.5 * rng.standard_normal((8, 3, 3, 3))).astype(np.float32)
    w2 = rng.standard_normal((5, 8, 1, 1)).astype(np.float32)
    b2 = rng.standard_normal(5).astype(np.float32)
    return make_model(
        [
            helper.make_node("Conv", ["x", "W1"], ["h0"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["h0"], ["h"]),
            helper.make_node("Conv", ["h", "W2", "b2"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 5, 6, 6])],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "W1"), (w2, "W2"), (b2, "b2")]],
        opset=13,
    )


def test_a_per_pixel_softmax_over_a_conv_head(tmp_path: Path) -> None:
    """A segmenter's 1×1 Conv head with a Softmax over the channels (axis 1): one row per pixel."""
    rng = np.random.default_rng(10)
    model = _conv_head()
    sites = split_layers(model, ["W1", "W2"])[0]
    found = class_head(model, sites, None)
    assert found is not None and found[0] == "W2"
    b2 = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "b2"))
    np.testing.assert_allclose(found[1], b2, rtol=1e-6)
    x = {"x": rng.standard_normal((48, 3, 6, 6)).astype(np.float32)}
    heads = _run_heads(tmp_path, model, x, "W2")
    assert heads["classes"].shape == (5, 8, 1, 1)


def test_a_sequence_head_and_a_wide_head_solved_from_its_rows(tmp_path: Path) -> None:
    """A MatMul head on ``[N, T, K]`` with the Softmax over its last axis (a CTC recogniser's rows
    are every time step), and inputs wider than the rows there are (the row-space solve)."""
    rng = np.random.default_rng(7)
    K, C = 1100, 6
    w1 = (rng.standard_normal((4, K)) / 2).astype(np.float32)
    w2 = (rng.standard_normal((K, C)) / np.sqrt(K)).astype(np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h0"]),
            helper.make_node("Relu", ["h0"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=2),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 4])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3, C])],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
        opset=13,
    )
    found = class_head(model, split_layers(model, ["W1", "W2"])[0], None)
    assert found is not None and found[0] == "W2"
    x = {"x": rng.standard_normal((40, 3, 4)).astype(np.float32)}
    heads = _run_heads(tmp_path, model, x, "W2")
    per = int(HEAD_CLASS_FLOOR * np.count_nonzero(heads["classes"]) / C)
    assert (heads["classes"] != 0).sum(axis=0).min() >= per  # MatMul: the classes are columns


def test_the_class_axis_is_checked_on_the_values() -> None:
    from chita_onnx.sequential import _classes_on_channels

    mm, conv = LayerGeometry("matmul_right", (4, 6)), LayerGeometry("conv", (6, 4, 1, 1))
    z3, z4 = [np.zeros((2, 3, 6))], [np.zeros((2, 6, 5, 5))]
    assert _classes_on_channels(z3, mm, -1) and _classes_on_channels(z3, mm, 2)
    assert not _classes_on_channels(z3, mm, 1) and not _classes_on_channels(z3, mm, 3)
    assert _classes_on_channels(z4, conv, 1) and _classes_on_channels(z4, conv, -3)
    assert not _classes_on_channels(z4, conv, -1) and not _classes_on_channels(None, mm, -1)


def test_an_unranked_head_is_accepted_from_the_graph_with_its_axis() -> None:
    """Where the graph does not declare the logits' rank, the head is accepted with the softmax's
    axis as written, for the pass to check on the values (:func:`_classes_on_channels`, above)."""

    rng = np.random.default_rng(11)
    w1 = (rng.standard_normal((4, 16)) / 2).astype(np.float32)
    w2 = (rng.standard_normal((16, 6)) / 4).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W1"], ["h0"]),
            helper.make_node("Relu", ["h0"], ["h"]),
            helper.make_node("MatMul", ["h", "W2"], ["z"]),
            helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        ],
        "unranked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],  # no rank: nothing to infer from
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    found = class_head(model, split_layers(model, ["W1", "W2"])[0], None)
    assert found is not None and found[0] == "W2" and found[2] == 1
