"""Multi-input and stateful models, and heads that are not batch-first classifiers.

* batch axes from the model signature (a state ``[2, batch, H]``, a rank-0 ``sr``, unnamed dims);
* calibration data with samples on axis 0 for every batched input, static inputs given once;
* a multi-output Gauss-Newton head (each output divided by its scale), a per-position
  cross-entropy on a sequence-first ``[T, N, C]`` softmax, a Bernoulli head on a sigmoid map:
  gradient rows against float64 finite differences, and ``compress`` end to end.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from onnx import TensorProto
from onnx.reference import ReferenceEvaluator
from test_gradients import Init, Reference, _to_f64, ce, check_fd, mk, node, vi

from chita_onnx import CompressConfig, compress
from chita_onnx.batching import infer_batch_axes, output_batch_axis
from chita_onnx.data import ArraySource, open_source, validate_source
from chita_onnx.errors import DataError
from chita_onnx.evaluate import make_session
from chita_onnx.gradients import GradientEngine, per_sample_gradients
from chita_onnx.graph import model_inputs

# ------------------------------------------------------------------------------------ batch axes


@pytest.mark.parametrize(
    ("shapes", "want"),
    [
        # silero-vad op18: named batch shared by the audio and the state; rank-0 sample rate
        ([("batch", "sequence"), (), (2, "batch", 128)], [0, None, 1]),
        # spox export: no names at all
        ([("", ""), (2, "", 128), ()], [0, 1, None]),
        # spox writes 0 for unknown
        ([(0, 0), (2, 0, 128)], [0, 1]),
        # a fixed batch of one with a dynamic width (ddddocr)
        ([(1, 1, 64, "image_width")], [0]),
        # a whole fixed-batch model
        ([(1, 3, 800, 608)], [0]),
        # a static vector next to a dynamic image
        ([("N", 3, "H", "W"), (2,)], [0, None]),
        # token ids and mask: batch and sequence both shared, batch at the lower axis
        ([("batch", "seq"), ("batch", "seq")], [0, 0]),
    ],
)
def test_batch_axes_from_the_signature(shapes: list[tuple[Any, ...]], want: list[int | None]) -> None:
    assert infer_batch_axes(shapes) == want


def test_output_batch_axis_survives_a_wrong_declared_shape() -> None:
    assert output_batch_axis([2, "batch", 128], ["batch"], (2, 5, 128), 5) == 1
    assert output_batch_axis([1, "seqlen"], [], (7, 1, 30), 1) == 1  # declared rank is wrong
    assert output_batch_axis(["N", 4], ["N"], (5, 4), 5) == 0


# --------------------------------------------------------------------------- a stateful model


def stateful(seed: int = 0) -> onnx.ModelProto:
    """A silero-like cell: audio ``x [batch, 8]``, state ``[2, batch, 4]``, rank-0 int64 ``sr``;
    outputs a speech probability ``[batch, 1]`` and the next state ``[2, batch, 4]``."""
    w = Init(seed)
    nodes = [
        node("Cast", ["sr"], ["srf"], to=TensorProto.FLOAT),
        node("Div", ["srf", w.const("c16k", 16000.0)], ["rate"]),
        node("Gather", ["state", w.const("i0", 0, np.int64)], ["s0"], axis=0),
        node("Gather", ["state", w.const("i1", 1, np.int64)], ["s1"], axis=0),
        node("MatMul", ["x", w("W1", 8, 4)], ["h"]),
        node("Add", ["h", "s0"], ["a"]),
        node("Mul", ["a", "rate"], ["a2"]),
        node("Tanh", ["a2"], ["t"]),
        node("MatMul", ["t", w("W2", 4, 4)], ["g0"]),
        node("Add", ["g0", "s1"], ["g"]),
        node("Tanh", ["g"], ["u"]),
        node("MatMul", ["u", w("W3", 4, 1)], ["z"]),
        node("Sigmoid", ["z"], ["output"]),
        node("Unsqueeze", ["t", w.const("ax0", [0], np.int64)], ["t0"]),
        node("Unsqueeze", ["u", "ax0"], ["u0"]),
        node("Concat", ["t0", "u0"], ["stateN"], axis=0),
    ]
    return mk(
        nodes,
        [vi("x", ["batch", 8]), vi("state", [2, "batch", 4]), vi("sr", [], TensorProto.INT64)],
        [vi("output", ["batch", 1]), vi("stateN", [2, "batch", 4])],
        w.items,
    )


def stateful_data(n: int, seed: int = 1) -> dict[str, NDArray[Any]]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((n, 8)).astype(np.float32),
        "state": (0.5 * rng.standard_normal((n, 2, 4))).astype(np.float32),  # samples on axis 0
        "sr": np.asarray(16000, np.int64),
    }


def test_stateful_model_inputs_and_data(tmp_path: Path) -> None:
    model = stateful()
    specs = model_inputs(model)
    assert [(s.name, s.batch_axis) for s in specs] == [("x", 0), ("state", 1), ("sr", None)]
    np.savez(tmp_path / "calib.npz", **stateful_data(10))
    src = open_source(tmp_path / "calib.npz", specs, batch_size=4)
    assert validate_source(src, specs) == 10
    batches = list(src)
    assert [b.inputs["state"].shape for b in batches] == [(4, 2, 4), (4, 2, 4), (2, 2, 4)]
    assert all(b.inputs["sr"].shape == () for b in batches)
    bad = stateful_data(10)
    bad["state"] = np.zeros((2, 10, 4), np.float32)  # the model's layout instead of samples-first
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(DataError, match=r"'state' has shape \(2, 10, 4\), the model expects \(samples, 2, 4\)"):
        validate_source(open_source(tmp_path / "bad.npz", specs), specs)
    bad = stateful_data(10)
    bad["sr"] = np.full(10, 16000, np.int64)
    np.savez(tmp_path / "bad_sr.npz", **bad)
    with pytest.raises(DataError, match=r"'sr' has shape \(10,\), the model expects \(\) \(no batch axis"):
        validate_source(open_source(tmp_path / "bad_sr.npz", specs), specs)


def _multi_reference(model: onnx.ModelProto, weights: Sequence[str]) -> tuple[ReferenceEvaluator, dict[str, Any]]:
    ev = ReferenceEvaluator(_to_f64(model, weights, ["output", "stateN"]))
    inits = {t.name: onnx.numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    return ev, {k: inits[k] for k in weights}


@pytest.mark.parametrize("method", ["single", "batched"])
def test_multi_output_gauss_newton_rows_match_finite_differences(method: str) -> None:
    model = stateful(seed=3)
    weights = ["W1", "W2", "W3"]
    data = stateful_data(7, seed=4)
    src = ArraySource(data, batch_size=3, static=["sr"])
    engine = GradientEngine(model, weights, example=next(iter(src)), method=method)
    gm = engine.compute(src, seed=7)
    assert gm.head == "regression" and gm.loss == "mse"
    assert "2 outputs" in gm.loss_description and "RMS norm" in gm.loss_description
    ev, w0 = _multi_reference(model, weights)

    def outs(i: int, w: dict[str, Any]) -> tuple[NDArray[np.float64], NDArray[np.float64]]:
        feeds = {
            "x": data["x"][i : i + 1].astype(np.float64),
            "state": np.moveaxis(data["state"][i : i + 1], 0, 1).astype(np.float64),
            "sr": data["sr"],
        }
        y, s = ev.run(["output", "stateN"], {**feeds, **w})
        return np.asarray(y).reshape(-1), np.moveaxis(np.asarray(s), 1, 0).reshape(-1)

    # the scales: RMS over the example batch of each output's per-sample norm
    first = [outs(i, w0) for i in range(3)]
    want_scales = [np.sqrt(np.mean([np.sum(o[k] ** 2) for o in first])) for k in range(2)]
    assert engine.output_scales is not None
    np.testing.assert_allclose(engine.output_scales, want_scales, rtol=1e-5)
    s1, s2 = engine.output_scales
    eps = np.random.default_rng(7).standard_normal((7, 1 + 8))

    def loss(i: int, w: dict[str, Any]) -> float:
        y, s = outs(i, w)
        return float(-(eps[i] @ np.concatenate([y / s1, s / s2])))

    rng = np.random.default_rng(0)
    for i in (0, 4, 6):
        for slot in gm.layout.slots:
            g = gm.X[i, slot.offset : slot.stop].astype(np.float64)
            v = rng.standard_normal(slot.size)
            v /= np.linalg.norm(v)
            h = 1e-5
            wp = {**w0, slot.name: w0[slot.name] + h * v.reshape(slot.shape)}
            wm = {**w0, slot.name: w0[slot.name] - h * v.reshape(slot.shape)}
            fd = (loss(i, wp) - loss(i, wm)) / (2 * h)
            assert abs(fd - g @ v) <= 2e-5 * np.linalg.norm(g) + 1e-7, (i, slot.name, fd, g @ v)


def test_stateful_model_compresses_end_to_end(tmp_path: Path) -> None:
    model = stateful(seed=5)
    path = tmp_path / "vad.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "calib.npz", **stateful_data(40, seed=6))
    np.savez(tmp_path / "test.npz", **stateful_data(20, seed=7))
    report = compress(
        path,
        tmp_path / "out.onnx",
        tmp_path / "calib.npz",
        CompressConfig(sparsity=0.5),
        eval_data=tmp_path / "test.npz",
    )
    assert report.nnz <= report.k
    assert "2 outputs" in report.loss
    e = report.evaluation
    assert e is not None and e.relative_error is not None and e.cosine is not None
    assert [o.name for o in e.outputs] == ["output", "stateN"]
    assert all(0 < o.relative_error < 1 and o.cosine > 0.5 for o in e.outputs)
    assert e.outputs[1].shape == (2, 4)  # the state compared per sample, batch moved to axis 0
    sess = make_session(tmp_path / "out.onnx")
    d = stateful_data(3, seed=8)
    y, s = sess.run(None, {"x": d["x"], "state": np.moveaxis(d["state"], 0, 1).copy(), "sr": d["sr"]})
    assert y.shape == (3, 1) and s.shape == (2, 3, 4)


# ------------------------------------------------------------------- sequence-first softmax head


def sequence_first(seed: int = 0) -> onnx.ModelProto:
    """``x [N, 6]`` → logits ``[N, 3, 4]`` → Transpose → Softmax over classes of ``[3, N, 4]``."""
    w = Init(seed)
    nodes = [
        node("MatMul", ["x", w("W1", 6, 10)], ["h0"]),
        node("Tanh", ["h0"], ["h"]),
        node("MatMul", ["h", w("W2", 10, 12)], ["z"]),
        node("Reshape", ["z", w.const("shp", [-1, 3, 4], np.int64)], ["z3"]),
        node("Transpose", ["z3"], ["zt"], perm=[1, 0, 2]),
        node("Softmax", ["zt"], ["probs"], axis=2),
    ]
    return mk(nodes, [vi("x", ["N", 6])], [vi("probs", [3, "N", 4])], w.items)


@pytest.mark.parametrize("method", ["single", "batched"])
def test_sequence_first_softmax_gets_per_position_cross_entropy(method: str) -> None:
    model = sequence_first(seed=2)
    x = np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32)
    gm = per_sample_gradients(model, ArraySource({"x": x}, batch_size=5), ["W1", "W2"], fisher="argmax", method=method)
    assert gm.head == "logits"
    assert "per-position cross-entropy (3 positions" in gm.loss_description
    ref = Reference(model, ["W1", "W2"], "zt")

    def loss(i: int, z: NDArray[np.float64]) -> float:  # z: [3, 1, 4]; labels = arg-max at w̄
        z0 = ref.out({"x": x[i : i + 1]}, ref.w)
        return sum(ce(z[t, 0], int(np.argmax(z0[t, 0]))) for t in range(3))

    check_fd(gm, ref, lambda i: {"x": x[i : i + 1]}, loss, rows=(0, 2, 4))


# --------------------------------------------------------------------------- sigmoid map head


def prob_map(seed: int = 0) -> onnx.ModelProto:
    w = Init(seed)
    nodes = [
        node("Conv", ["x", w("C1", 3, 1, 3, 3)], ["c1"], pads=[1, 1, 1, 1]),
        node("Tanh", ["c1"], ["t1"]),
        node("Conv", ["t1", w("C2", 1, 3, 3, 3)], ["z"], pads=[1, 1, 1, 1]),
        node("Sigmoid", ["z"], ["map"]),
    ]
    return mk(nodes, [vi("x", ["N", 1, 5, 5])], [vi("map", ["N", 1, 5, 5])], w.items)


@pytest.mark.parametrize("fisher", ["argmax", "sampled"])
def test_sigmoid_map_gets_the_bernoulli_loss(fisher: str) -> None:
    model = prob_map(seed=4)
    x = np.random.default_rng(5).standard_normal((6, 1, 5, 5)).astype(np.float32)
    gm = per_sample_gradients(model, ArraySource({"x": x}, batch_size=4), ["C1", "C2"], fisher=fisher, seed=9)
    assert gm.head == "binary"
    assert "Bernoulli" in gm.loss_description
    ref = Reference(model, ["C1", "C2"], "z")
    z0 = [ref.out({"x": x[i : i + 1]}, ref.w) for i in range(6)]
    p0 = [1 / (1 + np.exp(-z)) for z in z0]
    if fisher == "argmax":
        ys = [(p > 0.5).astype(np.float64) for p in p0]
    else:  # Bernoulli draws, in sample order, from the seeded generator
        u = np.random.default_rng(9).random((6, 1, 5, 5))
        ys = [(u[i : i + 1] < p0[i]).astype(np.float64) for i in range(6)]

    def bce(i: int, z: NDArray[np.float64]) -> float:  # softplus(z) − y·z, with y fixed at w̄
        return float(np.sum(np.logaddexp(0.0, z) - ys[i] * z))

    check_fd(gm, ref, lambda i: {"x": x[i : i + 1]}, bce, rows=(0, 3, 5))


# ---------------------------------------------------------------------- detector-like, end to end


def detector(seed: int = 0) -> onnx.ModelProto:
    """Two heads of different scales: sigmoid scores ``[N, 16, 2]`` and boxes ``[N, 16, 4]`` (×10)."""
    w = Init(seed)
    nodes = [
        node("Conv", ["x", w("C1", 6, 3, 3, 3)], ["c1"], pads=[1, 1, 1, 1], strides=[2, 2]),
        node("Relu", ["c1"], ["f"]),
        node("Conv", ["f", w("C2", 2, 6, 1, 1)], ["s0"]),
        node("Sigmoid", ["s0"], ["s1"]),
        node("Reshape", ["s1", w.const("shp2", [0, 2, 16], np.int64)], ["s2"]),
        node("Transpose", ["s2"], ["scores"], perm=[0, 2, 1]),
        node("Conv", ["f", w("C3", 4, 6, 1, 1)], ["b0"]),
        node("Mul", ["b0", w.const("ten", 10.0)], ["b1"]),
        node("Reshape", ["b1", w.const("shp4", [0, 4, 16], np.int64)], ["b2"]),
        node("Transpose", ["b2"], ["boxes"], perm=[0, 2, 1]),
    ]
    return mk(nodes, [vi("x", ["N", 3, 8, 8])], [vi("scores", ["N", 16, 2]), vi("boxes", ["N", 16, 4])], w.items)


@pytest.mark.parametrize(
    ("build", "shape", "loss_word"),
    [
        (detector, (3, 8, 8), "2 outputs"),
        (prob_map, (1, 5, 5), "Bernoulli"),
        (sequence_first, (6,), "per-position cross-entropy"),
    ],
)
def test_non_classifier_heads_compress_end_to_end(
    build: Any, shape: tuple[int, ...], loss_word: str, tmp_path: Path
) -> None:
    path = tmp_path / "m.onnx"
    onnx.save(build(seed=11), path)
    rng = np.random.default_rng(12)
    calib = {"x": rng.standard_normal((48, *shape)).astype(np.float32)}
    test = {"x": rng.standard_normal((24, *shape)).astype(np.float32)}
    dense = make_session(path)
    report = compress(path, tmp_path / "out.onnx", calib, CompressConfig(sparsity=0.5), eval_data=test)
    assert loss_word in report.loss
    e = report.evaluation
    assert e is not None and e.relative_error is not None and e.cosine is not None
    assert 0.0 < e.relative_error < 1.0 and e.cosine > 0.5
    pruned = make_session(tmp_path / "out.onnx")
    yd = dense.run(None, test)
    yp = pruned.run(None, test)
    for a, b in zip(yd, yp, strict=True):
        assert a.shape == b.shape


def test_report_gives_per_position_agreement_for_a_sequence_output(tmp_path: Path) -> None:
    """A single ``(N, T, C)`` output (a CTC recogniser's log-probabilities) has no top-1 agreement per
    sample; the report gives the fraction of positions whose argmax class is unchanged instead of
    leaving the line empty (it was computed and dropped)."""
    from chita_onnx.report import format_report

    w = Init(4)
    nodes = [
        node("MatMul", ["x", w("W1", 6, 16)], ["h0"]),
        node("Tanh", ["h0"], ["h"]),
        node("MatMul", ["h", w("W2", 16, 15)], ["z"]),
        node("Reshape", ["z", w.const("shp", [-1, 3, 5], np.int64)], ["logits"]),
    ]
    src, out = tmp_path / "seq.onnx", tmp_path / "o.onnx"
    onnx.save(mk(nodes, [vi("x", ["N", 6])], [vi("logits", ["N", 3, 5])], w.items), src)
    rng = np.random.default_rng(5)
    calib, test = ({"x": rng.standard_normal((n, 6)).astype(np.float32)} for n in (40, 30))
    rep = compress(src, out, calib, CompressConfig(sparsity=0.6, method="magnitude"), eval_data=test)
    e = rep.evaluation
    assert e is not None and e.agreement is None
    yd = make_session(src).run(None, test)[0]
    yp = make_session(out).run(None, test)[0]
    want = float(np.mean(np.argmax(yd, -1) == np.argmax(yp, -1)))
    assert e.position_agreement == pytest.approx(want) and 0.0 < want < 1.0
    assert "per-position argmax agreement" in format_report(rep)
    assert rep.to_dict()["evaluation"]["position_agreement"] == pytest.approx(want)


@pytest.mark.parametrize("method", ["auto", "chita"])
def test_output_that_leaves_a_prunable_weight_off_the_loss_path(method: str, tmp_path: Path) -> None:
    """``--output y1`` on a model with a second head: that head's weight is still in the budget but
    does not reach the loss (zero gradient columns, as the engine warns).  Setting the current
    weights used to raise "cannot set weight 'W3': not an updatable weight of this engine" (the
    layer-wise pass fell back to chita, which failed the same way)."""
    from test_support import _two_heads

    import chita_onnx

    src, out, data = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "calib.npz"
    onnx.save(_two_heads([]), src)
    x = np.random.default_rng(33).standard_normal((32, 8)).astype(np.float32)
    np.savez(data, x=x)
    rep = compress(src, out, data, CompressConfig(sparsity=0.5, method=method, output="y1"))
    assert rep.nnz == rep.k == 120
    values = chita_onnx.graph.get_weights(chita_onnx.graph.densify(chita_onnx.load_model(out)), ["W1", "W2", "W3"])
    assert sum(int(np.count_nonzero(v)) for v in values.values()) == 120
    y1 = make_session(out).run(["y1"], {"x": x})[0]
    assert np.isfinite(y1).all()


def test_labels_on_a_two_output_model_say_how_to_use_them(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Labels with two outputs and no softmax: one Gauss-Newton head over both (labels unused), and
    the warning names the way to fit one output to the labels; with ``--output`` the labels are used."""
    from test_support import _two_heads

    src, data = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(_two_heads([]), src)
    rng = np.random.default_rng(34)
    np.savez(data, x=rng.standard_normal((32, 8)).astype(np.float32), labels=rng.integers(0, 4, 32))
    with caplog.at_level("WARNING"):
        rep = compress(src, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.5, method="chita"))
    said = [r.getMessage() for r in caplog.records if "labels are not used" in r.getMessage()]
    assert len(said) == 1 and "--output NAME" in said[0] and "y1" in rep.loss and "y2" in rep.loss
    caplog.clear()
    with caplog.at_level("WARNING"):
        rep = compress(src, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.5, method="chita", output="y1"))
    assert not any("labels are not used" in r.getMessage() for r in caplog.records)
    assert "cross-entropy" in rep.loss


def test_low_agreement_warning_points_to_error_and_cosine_for_non_class_outputs() -> None:
    """An autoencoder's (N, 784) output is not class scores: a low argmax agreement is no alarm by
    itself, so the warning names the output and gives the two measures that hold for any output."""
    from chita_onnx.evaluate import Comparison, low_agreement_warning

    base = Comparison(64, "recon", None, None, 0.451, 1.0, 0.1, 0.0, relative_error=0.213, cosine=0.9771)
    text = low_agreement_warning(base)
    assert text is not None and "45.1%" in text and "'recon'" in text and "0.213" in text and "0.9771" in text
    assert low_agreement_warning(dataclasses.replace(base, agreement=0.5)) is None
    assert low_agreement_warning(dataclasses.replace(base, agreement=None)) is None
    assert low_agreement_warning(None) is None
    bare = low_agreement_warning(dataclasses.replace(base, relative_error=None, cosine=None))
    assert bare is not None and "cosine" not in bare


def test_raw_logits_without_labels_say_how_to_read_them_as_logits(tmp_path: Path) -> None:
    """A 2-D raw output with no softmax and no labels is read as a regression output; the report's
    loss line says so and names ``--loss ce`` (a classifier's logits look exactly like this).  With
    labels the same model is read as logits, and a one-column output (no class axis) gets no such hint."""
    from conftest import tiny_mlp

    path = tmp_path / "mlp.onnx"
    onnx.save(tiny_mlp(seed=5), path)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((40, 12)).astype(np.float32)
    cfg = CompressConfig(sparsity=0.5)
    unlabelled = compress(path, tmp_path / "a.onnx", {"x": x}, cfg)
    assert "Gauss-Newton" in unlabelled.loss and "--loss ce reads it as logits" in unlabelled.loss
    labelled = compress(path, tmp_path / "b.onnx", {"x": x, "labels": rng.integers(0, 5, 40)}, cfg)
    assert "cross-entropy" in labelled.loss and "--loss ce" not in labelled.loss
    onnx.save(tiny_mlp(seed=7, classes=1), tmp_path / "scalar.onnx")
    scalar = compress(tmp_path / "scalar.onnx", tmp_path / "c.onnx", {"x": x}, cfg)
    assert "Gauss-Newton" in scalar.loss and "--loss ce" not in scalar.loss
