"""Python-API calibration sources other than .npz: what a user integrating chita-onnx passes.

Lists of feed dicts, ``(inputs, labels)`` pairs, one-shot generators and onnxruntime-style
``CalibrationDataReader`` objects (``get_next()`` -> feed dict, then ``None``) are accepted; anything
else is refused with one ``DataError`` line, never an ``AttributeError`` from deep inside the run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_mlp

import chita_onnx
from chita_onnx import Batch, CompressConfig, DataError
from chita_onnx.data import open_source, validate_source
from chita_onnx.graph import model_inputs

SPECS = model_inputs(tiny_mlp())
RNG = np.random.default_rng(0)
X = RNG.standard_normal((40, 12)).astype(np.float32)
Y = RNG.integers(0, 5, 40)


class GetNextReader:
    """onnxruntime.quantization's CalibrationDataReader protocol: get_next() until None, single use."""

    def __init__(self) -> None:
        self._it = iter([{"x": X[i : i + 8]} for i in range(0, 40, 8)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _gen():  # type: ignore[no-untyped-def]
    for i in range(0, 40, 8):
        yield Batch({"x": X[i : i + 8]}, Y[i : i + 8])


SOURCES = {
    "list of feed dicts": lambda: [{"x": X[i : i + 8]} for i in range(0, 40, 8)],
    "list of dicts with labels": lambda: [{"x": X[i : i + 8], "labels": Y[i : i + 8]} for i in range(0, 40, 8)],
    "list of (inputs, labels) pairs": lambda: [({"x": X[i : i + 8]}, Y[i : i + 8]) for i in range(0, 40, 8)],
    "generator of Batch": _gen,
    "generator of dicts": lambda: ({"x": X[i : i + 8]} for i in range(0, 40, 8)),
    "get_next reader": GetNextReader,
}


@pytest.mark.parametrize("make", list(SOURCES.values()), ids=list(SOURCES))
def test_user_sources_are_reiterable_batches(make) -> None:  # type: ignore[no-untyped-def]
    src = open_source(make(), SPECS)
    assert validate_source(src, SPECS, num_classes=5) == 40
    again = np.concatenate([b.inputs["x"] for b in src])  # a second pass sees the same samples
    np.testing.assert_array_equal(again, X)


def test_onnxruntime_calibration_data_reader_subclass() -> None:
    quantization = pytest.importorskip("onnxruntime.quantization")

    class Reader(quantization.CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._it = iter([{"x": X[i : i + 8]} for i in range(0, 40, 8)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self._it, None)

    src = open_source(Reader(), SPECS)
    assert validate_source(src, SPECS) == 40
    assert validate_source(src, SPECS) == 40


@pytest.mark.parametrize("make", [SOURCES["generator of Batch"], GetNextReader, SOURCES["list of feed dicts"]])
def test_compress_and_evaluate_take_user_sources(tmp_path: Path, make) -> None:  # type: ignore[no-untyped-def]
    model = tmp_path / "m.onnx"
    onnx.save(tiny_mlp(), model)
    before = model.read_bytes()
    report = chita_onnx.compress(model, tmp_path / "o.onnx", make(), CompressConfig(sparsity=0.5, method="magnitude"))
    assert report.evaluation.samples == 8  # 20% of 40 held out
    assert chita_onnx.evaluate_model(model, make()).samples == 40
    assert model.read_bytes() == before


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (X, r"a bare ndarray; pass a mapping \{input name: array\}"),
        ([X[:8], X[8:]], r"data \(batch 0\): got a ndarray; each batch must be"),
        ([{"x": X[:8]}, 3], r"data \(batch 1\): got a int; each batch must be"),
        ([], "data: no samples"),
        (iter([]), "data: no samples"),
    ],
)
def test_bad_user_sources_are_one_data_error(data: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        validate_source(open_source(data, SPECS), SPECS)


def test_per_sample_gradients_opens_paths_and_mappings(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=X, labels=Y)
    model = tiny_mlp()
    for data in (tmp_path / "d.npz", str(tmp_path / "d.npz"), {"x": X, "labels": Y}, [{"x": X}]):
        g = chita_onnx.per_sample_gradients(model, data)
        assert g.X.shape[0] == 40


def test_per_sample_gradients_takes_a_model_path(tmp_path: Path) -> None:
    onnx.save(tiny_mlp(), tmp_path / "m.onnx")
    g = chita_onnx.per_sample_gradients(tmp_path / "m.onnx", {"x": X})
    assert g.X.shape == (40, chita_onnx.per_sample_gradients(tiny_mlp(), {"x": X}).X.shape[1])
    with pytest.raises(chita_onnx.ConfigError, match=r"model: expected an onnx\.ModelProto or a file path, got a int"):
        chita_onnx.per_sample_gradients(3, {"x": X})  # type: ignore[arg-type]


def test_a_source_mixing_batches_and_other_items_is_one_data_error() -> None:
    class Mixed:
        def __iter__(self):  # type: ignore[no-untyped-def]
            yield Batch({"x": X[:8]}, None)
            yield {"x": X[8:16]}

    with pytest.raises(DataError, match=r"data \(batch 1\): got a dict, not a chita_onnx\.Batch; give every batch"):
        validate_source(open_source(Mixed(), SPECS), SPECS)


def test_errors_in_memory_data_name_the_argument(tmp_path: Path) -> None:
    # two in-memory arguments, the same mistake: the message says which one
    model = tmp_path / "m.onnx"
    onnx.save(tiny_mlp(), model)
    good = {"x": X, "labels": Y}
    bad = {"x": X, "labels": Y[:-1]}
    with pytest.raises(DataError, match=r"^eval_data: 'labels' has shape"):
        chita_onnx.compress(model, tmp_path / "o.onnx", good, CompressConfig(sparsity=0.5), eval_data=bad)
    with pytest.raises(DataError, match=r"^data: 'labels' has shape"):
        chita_onnx.compress(model, tmp_path / "o.onnx", bad, CompressConfig(sparsity=0.5), eval_data=good)
    with pytest.raises(DataError, match=r"^eval_data: unsupported data specification of type int"):
        chita_onnx.compress(model, tmp_path / "o.onnx", good, CompressConfig(sparsity=0.5), eval_data=5)
