"""Models whose only output is ``ArgMax`` of class scores (a classifier or segmenter exported with its
labels only): the loss is taken of the scores, and the report scores the labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from rewrite_kit import model_of, vi

from chita_onnx import CompressConfig, compress
from chita_onnx.evaluate import make_session
from chita_onnx.gradients import per_sample_gradients
from chita_onnx.gradients.prepare import differentiated_tensor, find_head

RNG = np.random.default_rng(7)
W1 = RNG.normal(size=(6, 8)).astype(np.float32)
W2 = RNG.normal(size=(5, 8)).astype(np.float32)
K1 = (RNG.normal(size=(6, 3, 3, 3)) * 0.4).astype(np.float32)
K2 = (RNG.normal(size=(4, 6, 1, 1)) * 0.4).astype(np.float32)


def classifier(label: str) -> onnx.ModelProto:
    """x[N,6] → MatMul → Relu → Gemm → scores[N,5], then (``label``): ``"argmax"`` an int64 label
    ``[N]`` only; ``"softmax_argmax"`` the label of Softmax(scores); ``"argmax_keep"`` ``[N,1]`` cast to
    int32; ``"topk"`` the top 3 of Softmax(scores) and their classes (``"topk_values"``: the values
    only); ``"scores"`` the scores themselves, ``"softmax"`` their Softmax (the twins)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Gemm", ["r", "W2"], ["scores"], name="head", transB=1),
    ]
    out = vi("scores", ["N", 5])
    if label == "argmax":
        nodes.append(helper.make_node("ArgMax", ["scores"], ["label"], name="pick", axis=1, keepdims=0))
        out = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    elif label == "softmax_argmax":
        nodes.append(helper.make_node("Softmax", ["scores"], ["p"], name="sm", axis=-1))
        nodes.append(helper.make_node("ArgMax", ["p"], ["label"], name="pick", axis=-1, keepdims=0))
        out = helper.make_tensor_value_info("label", TensorProto.INT64, ["N"])
    elif label in ("topk", "topk_values"):  # top-3 probabilities first, then their classes
        nodes.append(helper.make_node("Softmax", ["scores"], ["p"], name="sm", axis=-1))
        k = numpy_helper.from_array(np.array([3], np.int64), "k")
        nodes.append(helper.make_node("TopK", ["p", "k"], ["top", "idx"], name="top3", axis=-1))
        outs = [vi("top", ["N", 3])]
        if label == "topk":
            outs.append(helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 3]))
        inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2"), k]
        return model_of(nodes, [vi("x", ["N", 6])], outs, inits, 17)
    elif label == "softmax":
        nodes.append(helper.make_node("Softmax", ["scores"], ["p"], name="sm", axis=-1))
        out = vi("p", ["N", 5])
    elif label == "argmax_keep":
        nodes.append(helper.make_node("ArgMax", ["scores"], ["l64"], name="pick", axis=1))
        nodes.append(helper.make_node("Cast", ["l64"], ["label"], name="cast", to=TensorProto.INT32))
        out = helper.make_tensor_value_info("label", TensorProto.INT32, ["N", 1])
    inits = [numpy_helper.from_array(W1, "W1"), numpy_helper.from_array(W2, "W2")]
    return model_of(nodes, [vi("x", ["N", 6])], [out], inits, 17)


def segmenter(label: bool) -> onnx.ModelProto:
    """x[N,3,6,6] → Conv 3×3 → Relu → Conv 1×1 → scores[N,4,6,6] → (``label``) ArgMax over the class
    axis 1 → an int64 label map ``[N,6,6]``; else (the twin) Softmax over axis 1, probabilities."""
    nodes = [
        helper.make_node("Conv", ["x", "K1"], ["h"], name="c1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "K2"], ["scores"], name="c2"),
    ]
    if label:
        nodes.append(helper.make_node("ArgMax", ["scores"], ["mask"], name="pick", axis=1, keepdims=0))
        out = helper.make_tensor_value_info("mask", TensorProto.INT64, ["N", 6, 6])
    else:
        nodes.append(helper.make_node("Softmax", ["scores"], ["p"], name="sm", axis=1))
        out = vi("p", ["N", 4, 6, 6])
    inits = [numpy_helper.from_array(K1, "K1"), numpy_helper.from_array(K2, "K2")]
    return model_of(nodes, [vi("x", ["N", 3, 6, 6])], [out], inits, 17)


def _data(n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {"x": rng.normal(size=(n, 6)).astype(np.float32), "labels": rng.integers(0, 5, n)}


@pytest.mark.parametrize("label", ["argmax", "softmax_argmax", "argmax_keep"])
def test_the_loss_is_taken_of_the_scores_behind_the_label(label: str) -> None:
    m = classifier(label)
    guess = find_head(m, "label")
    want = "p" if label == "softmax_argmax" else "scores"
    assert differentiated_tensor(m, None) == want
    assert guess.kind == "logits" and guess.tensor == "scores" and guess.class_axis in (1, -1)


@pytest.mark.parametrize("fisher", ["empirical", "sampled"])
def test_label_output_gradients_equal_the_scores_twin_with_cross_entropy(fisher: str) -> None:
    """The rows of an ArgMax-only classifier are those of its twin that outputs the scores, read as
    logits; before, the label model had no gradients at all."""
    data = _data()
    a = per_sample_gradients(classifier("argmax"), data, fisher=fisher)  # type: ignore[arg-type]
    b = per_sample_gradients(classifier("scores"), data, loss="ce", fisher=fisher)  # type: ignore[arg-type]
    assert a.X.shape == b.X.shape and a.X.shape[0] == 40
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)
    assert np.abs(a.X).max() > 0


def test_compress_prunes_a_label_classifier_as_its_scores_twin_and_scores_the_labels(tmp_path: Path) -> None:
    """Same weights as the twin pruned with ``--loss ce``; the report's top-1 accuracy of the labels
    is the twin's top-1 accuracy of the scores, and the agreement is the labels' agreement."""
    np.savez(tmp_path / "c.npz", **_data(60))
    paths = {}
    for kind in ("argmax", "scores"):
        onnx.save(classifier(kind), tmp_path / f"{kind}.onnx")
        paths[kind] = tmp_path / f"{kind}.onnx"
    cfg = CompressConfig(sparsity=0.5)
    ra = compress(paths["argmax"], tmp_path / "a.onnx", tmp_path / "c.npz", cfg)
    rb = compress(paths["scores"], tmp_path / "b.onnx", tmp_path / "c.npz", cfg.with_(loss="ce"))
    wa = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "a.onnx").graph.initializer}
    wb = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "b.onnx").graph.initializer}
    for name in ("W1", "W2"):
        np.testing.assert_allclose(wa[name], wb[name], rtol=1e-5, atol=1e-6)
        assert 0 < np.count_nonzero(wa[name]) < wa[name].size
    ca, cb = ra.evaluation, rb.evaluation
    assert ca is not None and cb is not None
    assert ca.output == "label" and ca.dense_accuracy == cb.dense_accuracy
    assert ca.pruned_accuracy == cb.pruned_accuracy and ca.agreement == cb.agreement
    assert ca.dense_accuracy is not None


def test_a_label_map_is_pruned_with_a_per_pixel_loss_and_compared_per_pixel(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    np.savez(tmp_path / "c.npz", x=rng.normal(size=(48, 3, 6, 6)).astype(np.float32))
    onnx.save(segmenter(True), tmp_path / "seg.onnx")
    onnx.save(segmenter(False), tmp_path / "twin.onnx")
    a = per_sample_gradients(segmenter(True), {"x": np.load(tmp_path / "c.npz")["x"][:8]}, fisher="sampled")
    b = per_sample_gradients(segmenter(False), {"x": np.load(tmp_path / "c.npz")["x"][:8]}, fisher="sampled")
    np.testing.assert_allclose(a.X, b.X, rtol=1e-5, atol=1e-6)
    held = rng.normal(size=(30, 3, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "e.npz", x=held)
    cfg = CompressConfig(sparsity=0.5)
    report = compress(tmp_path / "seg.onnx", tmp_path / "o.onnx", tmp_path / "c.npz", cfg, eval_data=tmp_path / "e.npz")
    c = report.evaluation
    assert c is not None and c.output == "mask" and c.agreement is not None and c.samples == 30
    md, mp = (make_session(tmp_path / f).run(None, {"x": held})[0] for f in ("seg.onnx", "o.onnx"))
    assert md.shape == (c.samples, 6, 6) and md.dtype == np.int64
    assert c.agreement == pytest.approx(float(np.mean(md == mp)))
    assert c.max_abs_diff == float(np.any(md != mp))  # a changed label counts 1


def test_a_top_k_classifier_is_pruned_at_its_scores_and_scored_by_its_first_class(tmp_path: Path) -> None:
    """``TopK`` of the probabilities, values first: before, the top-3 values were read as a 3-class
    output (labels 3 and 4 refused as out of range) and their argmax (always 0) as the class.  Now the
    loss is the Softmax twin's, and the report scores the first index: the twin's top-1 accuracy."""
    m = classifier("topk")
    assert differentiated_tensor(m, None) == "p" and find_head(m, "top").tensor == "scores"
    np.savez(tmp_path / "c.npz", **_data(60))
    onnx.save(m, tmp_path / "topk.onnx")
    onnx.save(classifier("softmax"), tmp_path / "twin.onnx")
    onnx.save(classifier("topk_values"), tmp_path / "values.onnx")
    cfg = CompressConfig(sparsity=0.5)
    ra = compress(tmp_path / "topk.onnx", tmp_path / "a.onnx", tmp_path / "c.npz", cfg)
    rb = compress(tmp_path / "twin.onnx", tmp_path / "b.onnx", tmp_path / "c.npz", cfg)
    rv = compress(tmp_path / "values.onnx", tmp_path / "v.onnx", tmp_path / "c.npz", cfg)
    weights = [
        {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / f).graph.initializer}
        for f in ("a.onnx", "b.onnx", "v.onnx")
    ]
    for name in ("W1", "W2"):
        np.testing.assert_allclose(weights[0][name], weights[1][name], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(weights[2][name], weights[1][name], rtol=1e-5, atol=1e-6)
    ca, cb, cv = ra.evaluation, rb.evaluation, rv.evaluation
    assert ca is not None and cb is not None and cv is not None
    assert ca.output == "idx" and ca.dense_accuracy == cb.dense_accuracy and ca.agreement == cb.agreement
    assert ca.pruned_accuracy == cb.pruned_accuracy and ca.dense_accuracy is not None
    top = next(c for c in ca.outputs if c.name == "top")
    assert top.argmax_agreement is None  # sorted values: their argmax says nothing
    assert cv.output == "top" and cv.agreement is None and cv.dense_accuracy is None


def test_a_top_k_of_sigmoid_scores_is_no_class_head() -> None:
    """A detector's TopK over its anchors' sigmoid scores keeps the first float output as it was."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm"),
        helper.make_node("Sigmoid", ["h"], ["s"], name="sig"),
        helper.make_node("TopK", ["s", "k"], ["top", "idx"], name="top3", axis=-1),
    ]
    k = numpy_helper.from_array(np.array([3], np.int64), "k")
    outs = [vi("top", ["N", 3]), helper.make_tensor_value_info("idx", TensorProto.INT64, ["N", 3])]
    m = model_of(nodes, [vi("x", ["N", 6])], outs, [numpy_helper.from_array(W1, "W1"), k], 17)
    assert differentiated_tensor(m, None) == "top" and find_head(m, "top").kind is None
