"""Classifiers in scikit-learn's export form (skl2onnx): a label output first (class values, integer
or string, picked by ArgMax from a table), then the probabilities as a ``ZipMap`` (a sequence of maps)
or as a plain tensor.  The default must get gradients through such a head (the loss is taken before
the ZipMap), and the evaluation must score the labels instead of failing on strings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from chita_onnx import CompressConfig, compress
from chita_onnx.support import check_model_support

F = TensorProto.FLOAT
INT_CLASSES = [10, 20, 30]
STR_CLASSES = ["cat", "dog", "eel"]


def skl_classifier(kind: str, head: str = "zipmap", seed: int = 0, column: bool = False) -> onnx.ModelProto:
    """``x [N, 4]`` → MatMul/Add/Relu → MatMul/Add → Softmax → ``label`` (``kind``: "int" or "string"
    class values, Gather of ArgMax; ``[N, 1]`` with ``column``) and, by ``head``: "zipmap"
    (``probabilities``, a ZipMap with the class values), "tensor" (``probabilities [N, 3]``), or "none"
    (the label only)."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array((rng.standard_normal((4, 16)) / 2).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal(16) / 10).astype(np.float32), "b1"),
        numpy_helper.from_array((rng.standard_normal((16, 3)) / 2).astype(np.float32), "W2"),
        numpy_helper.from_array((rng.standard_normal(3) / 10).astype(np.float32), "b2"),
    ]
    if kind == "int":
        inits.append(numpy_helper.from_array(np.array(INT_CLASSES, np.int64), "classes"))
        label_type, zip_attr = TensorProto.INT64, {"classlabels_int64s": INT_CLASSES}
    else:
        inits.append(helper.make_tensor("classes", TensorProto.STRING, [3], [c.encode() for c in STR_CLASSES]))
        label_type, zip_attr = TensorProto.STRING, {"classlabels_strings": STR_CLASSES}
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["m1"]),
        helper.make_node("Add", ["m1", "b1"], ["a1"]),
        helper.make_node("Relu", ["a1"], ["h1"]),
        helper.make_node("MatMul", ["h1", "W2"], ["m2"]),
        helper.make_node("Add", ["m2", "b2"], ["z"]),
        helper.make_node("Softmax", ["z"], ["probs"], axis=1),
        helper.make_node("ArgMax", ["probs"], ["idx"], axis=1, keepdims=0),
        helper.make_node("Gather", ["classes", "idx"], ["label_flat" if column else "label"], axis=0),
    ]
    if column:  # labels as a column, [N, 1]
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "one"))
        nodes.append(helper.make_node("Unsqueeze", ["label_flat", "one"], ["label"]))
    outputs = [helper.make_tensor_value_info("label", label_type, ["N", 1] if column else ["N"])]
    opsets = [helper.make_opsetid("", 15)]
    if head == "zipmap":
        nodes.append(helper.make_node("ZipMap", ["probs"], ["probabilities"], domain="ai.onnx.ml", **zip_attr))
        key = TensorProto.INT64 if kind == "int" else TensorProto.STRING
        seq = helper.make_sequence_type_proto(helper.make_map_type_proto(key, helper.make_tensor_type_proto(F, [])))
        outputs.append(helper.make_value_info("probabilities", seq))
        opsets.append(helper.make_opsetid("ai.onnx.ml", 1))
    elif head == "tensor":
        nodes.append(helper.make_node("Identity", ["probs"], ["probabilities"]))
        outputs.append(helper.make_tensor_value_info("probabilities", F, ["N", 3]))
    g = helper.make_graph(nodes, "skl", [helper.make_tensor_value_info("x", F, ["N", 4])], outputs, inits)
    m = helper.make_model(g, opset_imports=opsets)
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def data(model: onnx.ModelProto, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and the dense model's own class indices, with 10% of them changed (so accuracy < 1)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    probs = run(model, x, "label").reshape(-1)  # the class values, mapped to indices below
    idx = np.array([(INT_CLASSES if probs.dtype.kind in "iu" else STR_CLASSES).index(_plain(v)) for v in probs])
    flip = rng.random(n) < 0.1
    idx[flip] = (idx[flip] + 1) % 3
    return x, idx.astype(np.int64)


def _plain(v: object) -> object:
    return v.decode() if isinstance(v, bytes) else (v.item() if isinstance(v, np.generic) else v)


def run(model: onnx.ModelProto | Path, x: np.ndarray, output: str) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    out: np.ndarray = np.asarray(sess.run([output], {"x": x})[0])
    return out


@pytest.mark.parametrize(("kind", "column"), [("int", False), ("string", False), ("string", True)])
def test_zipmap_classifier_gets_gradients_and_scored_labels(tmp_path: Path, kind: str, column: bool) -> None:
    """The default prunes with gradients (no magnitude fallback for the ZipMap), and the report's
    accuracy and agreement are those of the label output, recomputed here with onnxruntime."""
    m = skl_classifier(kind, column=column)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x, y = data(m, 400, seed=1)
    support = check_model_support(src)
    assert support.ok and support.output == "probs"  # the tensor the ZipMap reads
    rep = compress(src, out, {"x": x[:200], "labels": y[:200]}, CompressConfig(sparsity=0.5),
                   eval_data={"x": x[200:], "labels": y[200:]})  # fmt: skip
    assert rep.method == "layerwise"
    assert not [w for w in rep.warnings if "no gradients" in w]
    ev = rep.evaluation
    assert ev is not None and ev.output == "label"
    classes = INT_CLASSES if kind == "int" else STR_CLASSES
    dense, pruned = run(m, x[200:], "label").reshape(-1), run(out, x[200:], "label").reshape(-1)
    index = np.array([classes.index(_plain(v)) for v in dense])
    assert ev.dense_accuracy == pytest.approx(float(np.mean(index == y[200:])))
    assert ev.agreement == pytest.approx(float(np.mean(dense == pruned)))
    assert 0.5 < ev.dense_accuracy < 1.0  # the flipped labels are counted wrong


def test_a_label_output_without_a_class_table_gives_agreement_but_no_accuracy(tmp_path: Path) -> None:
    """Class values are not class indices: without a ZipMap naming them, accuracy is not guessed."""
    m = skl_classifier("int", head="none")
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x, y = data(m, 300, seed=2)
    rep = compress(src, out, {"x": x[:200], "labels": y[:200]}, CompressConfig(sparsity=0.5, method="magnitude"),
                   eval_data={"x": x[200:], "labels": y[200:]})  # fmt: skip
    ev = rep.evaluation
    assert ev is not None and ev.output == "label" and ev.dense_accuracy is None
    assert ev.agreement == pytest.approx(float(np.mean(run(m, x[200:], "label") == run(out, x[200:], "label"))))


def test_a_probability_tensor_after_the_label_is_the_scored_output(tmp_path: Path) -> None:
    """skl2onnx with ``zipmap=False``: the float probabilities are scored (class indices), not the label."""
    m = skl_classifier("string", head="tensor")
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(m, src)
    x, y = data(m, 300, seed=3)
    rep = compress(src, out, {"x": x[:200], "labels": y[:200]}, CompressConfig(sparsity=0.5),
                   eval_data={"x": x[200:], "labels": y[200:]})  # fmt: skip
    ev = rep.evaluation
    assert ev is not None and ev.output == "probabilities"
    assert ev.dense_accuracy == pytest.approx(float(np.mean(run(m, x[200:], "probabilities").argmax(1) == y[200:])))


def test_the_statistics_correction_is_decided_on_the_probabilities(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``auto`` statistics correction compares candidates on the tensor the loss reads (the
    probabilities before the ZipMap), not on the string labels, which it cannot measure."""
    m = skl_classifier("string")
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    x, y = data(m, 300, seed=4)
    cfg = CompressConfig(sparsity=0.5, method="magnitude")
    rep = compress(src, tmp_path / "out.onnx", {"x": x[:200], "labels": y[:200]}, cfg, eval_data={"x": x[200:]})
    assert "statistics correction skipped" not in caplog.text
    assert not [w for w in rep.warnings if "skipped" in w]
