"""A data value only onnxruntime can refuse (a token id past the embedding table) is reported with
the data file and batch it came from, not only as a failure of "the model"."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import DataError, ModelError


def _token_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    emb = numpy_helper.from_array(rng.standard_normal((20, 8)).astype(np.float32), "E")
    w = numpy_helper.from_array(rng.standard_normal((8, 3)).astype(np.float32), "W")
    axes = numpy_helper.from_array(np.array([1], np.int64), "axes")
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["emb"], name="embed"),
        helper.make_node("ReduceMean", ["emb", "axes"], ["pooled"], keepdims=0, name="pool"),
        helper.make_node("MatMul", ["pooled", "W"], ["logits"], name="head"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        [emb, w, axes],
        opset=18,
    )


def test_out_of_range_token_ids_name_the_data_file(tmp_path: Path) -> None:
    model, data = tmp_path / "tok.onnx", tmp_path / "ids.npz"
    onnx.save(_token_model(), model)
    ids = np.random.default_rng(1).integers(0, 20, (16, 6))
    ids[9, 2] = 116
    np.savez(data, ids=ids, labels=np.zeros(16, np.int64))
    with pytest.raises(ModelError, match=r"ids\.npz \(batch 1\).*idx=116"):
        chita_onnx.evaluate_model(model, data, batch_size=8)


@pytest.mark.parametrize("method", ["auto", "chita", "layerwise"])
def test_out_of_range_calibration_ids_name_the_file_when_pruning_fails(tmp_path: Path, method: str) -> None:
    """With separate evaluation data, a bad token id in the calibration file first breaks onnxruntime
    inside pruning (the gradient graph, a layer-wise segment), whose messages cannot name the data:
    the run then checks the calibration data through the dense model and says which file and batch,
    as a DataError (no fallback to another method, nothing written)."""
    model, calib, good = tmp_path / "tok.onnx", tmp_path / "calib.npz", tmp_path / "eval.npz"
    onnx.save(_token_model(), model)
    ids = np.random.default_rng(1).integers(0, 20, (32, 6))
    np.savez(good, ids=ids, labels=np.zeros(32, np.int64))
    ids[21, 2] = 57
    np.savez(calib, ids=ids, labels=np.zeros(32, np.int64))
    out = tmp_path / "out.onnx"
    cfg = chita_onnx.CompressConfig(sparsity=0.5, method=method, batch_size=8)
    with pytest.raises(DataError, match=r"calib\.npz \(batch 2\).*idx=57"):
        chita_onnx.compress(model, out, calib, cfg, eval_data=good)
    assert not out.exists()
