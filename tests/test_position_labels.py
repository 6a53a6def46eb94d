"""Labels with a class per position (a tagger's ``(N, T)``, a segmenter's ``(N, H, W)``): read for the
evaluation only, with negative values not scored; the pruning never reads them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from rewrite_kit import model_of, vi

from chita_onnx import CompressConfig, compress
from chita_onnx.data import open_source, validate_source, without_position_labels
from chita_onnx.data_types import InputSpec
from chita_onnx.errors import DataError
from chita_onnx.evaluate import make_session, reference, top1
from chita_onnx.gradients import per_sample_gradients

RNG = np.random.default_rng(11)
W = RNG.normal(size=(6, 8)).astype(np.float32)
V = RNG.normal(size=(8, 5)).astype(np.float32)


def tagger() -> onnx.ModelProto:
    """x[N,7,6] → MatMul W → Tanh → MatMul V → logits[N,7,5]: one class score vector per position."""
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
        helper.make_node("Tanh", ["h"], ["t"], name="tanh"),
        helper.make_node("MatMul", ["t", "V"], ["logits"], name="mm2"),
    ]
    inits = [numpy_helper.from_array(W, "W"), numpy_helper.from_array(V, "V")]
    return model_of(nodes, [vi("x", ["N", 7, 6])], [vi("logits", ["N", 7, 5])], inits, 17)


def _tags(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The dense tagger's own classes, a fifth of them changed, and every position after a random
    length marked -100 (padding)."""
    y = np.argmax(np.tanh(x @ W) @ V, axis=-1)
    flip = rng.random(y.shape) < 0.2
    y = np.where(flip, rng.integers(0, 5, y.shape), y)
    for i, length in enumerate(rng.integers(2, 8, len(y))):
        y[i, length:] = -100
    return y.astype(np.int64)


def test_accuracy_over_the_scored_positions_of_three_layouts() -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, (6, 5))
    labels[0, 3:] = -1
    seq = rng.normal(size=(6, 5, 4))  # (N, T, C)
    maps = np.moveaxis(seq, -1, 1)  # (N, C, T): a segmenter's class maps
    scored = labels >= 0
    want = float(np.mean(np.argmax(seq, -1)[scored] == labels[scored]))
    assert top1(seq, labels) == pytest.approx(want)
    assert top1(maps, labels) == pytest.approx(want)
    assert top1(np.argmax(seq, -1), labels, index_labels=True) == pytest.approx(want)
    assert top1(seq[:, :4], labels) is None  # positions that do not line up: no accuracy
    assert top1(seq, np.full((6, 5), -100)) is None  # nothing scored


def test_labels_that_do_not_line_up_with_the_output_are_named_in_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    specs = [InputSpec("x", (None, 7, 6), np.dtype(np.float32), 0)]
    x = RNG.normal(size=(10, 7, 6)).astype(np.float32)
    onnx.save(tagger(), tmp_path / "m.onnx")
    with caplog.at_level("WARNING", logger="chita_onnx.evaluate"):
        ref = reference(tmp_path / "m.onnx", open_source({"x": x, "labels": np.zeros((10, 6), np.int64)}, specs), specs)
    assert ref.labels is not None and "do not line up with output 'logits'" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="chita_onnx.evaluate"):
        reference(tmp_path / "m.onnx", open_source({"x": x, "labels": np.zeros((10, 7), np.int64)}, specs), specs)
    assert "line up" not in caplog.text


def test_per_position_labels_are_validated_and_negative_ones_are_not_scored(tmp_path: Path) -> None:
    specs = [InputSpec("x", (None, 7, 6), np.dtype(np.float32), 0)]
    x = RNG.normal(size=(10, 7, 6)).astype(np.float32)
    np.savez(tmp_path / "ok.npz", x=x, labels=_tags(x, np.random.default_rng(1)))
    src = open_source(tmp_path / "ok.npz", specs)
    assert validate_source(src, specs) == 10  # a [N, T, C] output: no class count per sample
    assert without_position_labels(src) is not src and all(b.labels is None for b in without_position_labels(src))
    one = open_source({"x": x, "labels": np.arange(10) % 5}, specs)
    assert without_position_labels(one) is one  # a class per sample is the loss's: kept
    np.savez(tmp_path / "neg.npz", x=x, labels=-np.ones(10, np.int64))  # per sample, -1 is still an error
    with pytest.raises(DataError, match="label -1 is out of range"):
        validate_source(open_source(tmp_path / "neg.npz", specs), specs, num_classes=5)
    with pytest.raises(DataError, match=r"one class index per sample; labels per position .* are read by compress"):
        per_sample_gradients(tagger(), {"x": x, "labels": _tags(x, np.random.default_rng(1))})


def test_compress_scores_per_position_labels_and_prunes_as_without_them(tmp_path: Path) -> None:
    """The pruned weights are those of the same run without labels (the loss follows the model), and
    the report's accuracy is the scored positions' accuracy of the written model in onnxruntime."""
    rng = np.random.default_rng(2)
    x, xe = (rng.normal(size=(n, 7, 6)).astype(np.float32) for n in (64, 40))
    ye = _tags(xe, rng)
    np.savez(tmp_path / "c.npz", x=x, labels=_tags(x, rng))
    np.savez(tmp_path / "u.npz", x=x)
    np.savez(tmp_path / "e.npz", x=xe, labels=ye)
    onnx.save(tagger(), tmp_path / "m.onnx")
    cfg = CompressConfig(sparsity=0.5)
    a = compress(tmp_path / "m.onnx", tmp_path / "a.onnx", tmp_path / "c.npz", cfg, eval_data=tmp_path / "e.npz")
    b = compress(tmp_path / "m.onnx", tmp_path / "b.onnx", tmp_path / "u.npz", cfg, eval_data=tmp_path / "e.npz")
    wa, wb = (onnx.load(tmp_path / f).graph.initializer for f in ("a.onnx", "b.onnx"))
    for t, u in zip(wa, wb, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(t), numpy_helper.to_array(u))
    ev = a.evaluation
    assert ev is not None and ev.dense_accuracy is not None and ev.pruned_accuracy is not None
    scored = ye >= 0
    for path, acc in ((tmp_path / "m.onnx", ev.dense_accuracy), (tmp_path / "a.onnx", ev.pruned_accuracy)):
        y = make_session(path).run(None, {"x": xe})[0]
        assert acc == pytest.approx(float(np.mean(np.argmax(y, -1)[scored] == ye[scored])))
    assert b.evaluation is not None and b.evaluation.dense_accuracy == ev.dense_accuracy
