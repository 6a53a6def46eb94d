"""The Python entry points check the types of their arguments: a dict for the config or an
in-memory ModelProto for the model is one ConfigError line, not an AttributeError or TypeError."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_mlp

import chita_onnx
from chita_onnx import ConfigError


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    model, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(tiny_mlp(), model)
    np.savez(data, x=np.random.default_rng(0).standard_normal((20, 12)).astype(np.float32))
    return model, data


def test_config_must_be_a_compress_config(tmp_path: Path, files: tuple[Path, Path]) -> None:
    model, data = files
    with pytest.raises(ConfigError, match=r"config: expected a chita_onnx\.CompressConfig, got a dict"):
        chita_onnx.compress(model, tmp_path / "o.onnx", data, {"sparsity": 0.5})  # type: ignore[arg-type]
    assert not (tmp_path / "o.onnx").exists()


def test_model_must_be_a_path(tmp_path: Path, files: tuple[Path, Path]) -> None:
    _, data = files
    with pytest.raises(ConfigError, match=r"MODEL: expected a file path, got a ModelProto \(save it with onnx\.save"):
        chita_onnx.compress(tiny_mlp(), tmp_path / "o.onnx", data)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"MODEL: expected a file path, got a ModelProto"):
        chita_onnx.evaluate_model(tiny_mlp(), data)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"--report: expected a file path, got a int"):
        chita_onnx.compress(files[0], tmp_path / "o.onnx", data, report=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", ["unstructured", 24, None])
def test_check_pattern_refuses_a_non_pattern_with_a_config_error(files: tuple[Path, Path], pattern: object) -> None:
    with pytest.raises(ConfigError, match=r"pattern=.*N:M pattern such as"):
        chita_onnx.check_pattern(files[0], pattern)  # type: ignore[arg-type]
