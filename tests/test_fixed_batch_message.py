"""A model exported with a fixed batch of 8: the error names the flag that fixes it (``--mini-batch 8``),
and that flag does make the run go through."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_mlp

import chita_onnx
from chita_onnx import CompressConfig, DataError


def _fixed_batch(batch: int) -> onnx.ModelProto:
    model = tiny_mlp()
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = batch
    return model


def test_fixed_batch_error_names_the_flag(tmp_path: Path) -> None:
    model, data = tmp_path / "b8.onnx", tmp_path / "d.npz"
    onnx.save(_fixed_batch(8), model)
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((64, 12)).astype(np.float32), labels=rng.integers(0, 5, 64))
    with pytest.raises(DataError, match=r"fixed batch dimension 8.*use --mini-batch 8 "):
        chita_onnx.compress(model, tmp_path / "o.onnx", data, CompressConfig(method="chita", sparsity=0.5))
    chita_onnx.compress(model, tmp_path / "o.onnx", data, CompressConfig(method="chita", sparsity=0.5, mini_batch=8))
    assert (tmp_path / "o.onnx").exists()


def test_the_default_recipe_does_not_fall_back_on_a_data_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the layer-wise default meets the same data error chita would: it is raised once, without a
    # "falling back to chita" warning that blames the pass
    model, data = tmp_path / "b8.onnx", tmp_path / "d.npz"
    onnx.save(_fixed_batch(8), model)
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.standard_normal((64, 12)).astype(np.float32), labels=rng.integers(0, 5, 64))
    with caplog.at_level("WARNING"), pytest.raises(DataError, match=r"use --mini-batch 8 "):
        chita_onnx.compress(model, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.5))
    assert not any("falling back" in r.getMessage() for r in caplog.records)
    assert not (tmp_path / "o.onnx").exists()
