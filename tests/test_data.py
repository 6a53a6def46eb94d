"""Calibration data: formats, validation against the model, and held-out splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_mlp

from chita_onnx.data import ArraySource, NpzFolderSource, open_source, split_holdout, validate_source
from chita_onnx.data_types import Batch, CalibrationSource, InputSpec
from chita_onnx.errors import DataError
from chita_onnx.graph import model_inputs

SPECS = model_inputs(tiny_mlp())


def _x(n: int = 10, d: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def test_npz_by_input_name_with_labels_is_reiterable(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=_x(10), labels=np.arange(10) % 5)
    src = open_source(tmp_path / "d.npz", SPECS, batch_size=4)
    assert validate_source(src, SPECS, num_classes=5) == 10
    first = [b.labels.tolist() for b in src if b.labels is not None]
    second = [b.labels.tolist() for b in src if b.labels is not None]
    assert first == second == [[0, 1, 2, 3], [4, 0, 1, 2], [3, 4]]


def test_single_input_model_accepts_any_one_array_and_labels_are_optional(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", whatever=_x(6))
    src = open_source(tmp_path / "d.npz", SPECS)
    batches = list(src)
    assert list(batches[0].inputs) == ["x"] and batches[0].labels is None
    assert validate_source(src, SPECS) == 6


def test_folder_of_npz_batches(tmp_path: Path) -> None:
    for i in range(3):
        np.savez(tmp_path / f"b{i}.npz", x=_x(4, seed=i), labels=np.full(4, i))
    src = open_source(tmp_path, SPECS)
    assert isinstance(src, NpzFolderSource)
    assert validate_source(src, SPECS, num_classes=5) == 12
    assert [int(b.labels[0]) for b in src if b.labels is not None] == [0, 1, 2]


def test_random_data_warns(caplog: pytest.LogCaptureFixture) -> None:
    src = open_source("random", SPECS, seed=3)
    assert validate_source(src, SPECS) == 128
    assert "random calibration data" in caplog.text


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    np.savez(tmp_path / "evil.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match=r"evil\.npz: array 'x' holds Python objects"):
        open_source(tmp_path / "evil.npz", SPECS)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((4, 7), np.float32)}, r"input 'x' has shape \(4, 7\), the model expects \('\?', 12\)"),
        ({"x": np.zeros((4, 12), np.int32)}, "input 'x' has dtype int32"),
        ({"x": np.zeros((4, 12), np.float32), "labels": np.array([0, 1, 2, 9])}, "label 9 is out of range"),
        ({"x": np.zeros((4, 12), np.float32), "labels": np.array([0, -1, 2, 3])}, "label -1 is out of range"),
        ({"x": np.zeros((4, 12), np.float32), "labels": np.zeros(4)}, "'labels' must be integers"),
        (
            {"x": np.zeros((4, 12), np.float32), "labels": np.zeros((3, 4), np.int64)},
            r"'labels' has shape \(3, 4\), expected \(4,\) or \(4, positions...\)",
        ),
        (
            {"x": np.zeros((4, 12), np.float32), "labels": np.zeros((4, 3))},
            "'labels' must be integers, got dtype float64$",
        ),
        (
            {"x": np.zeros((4, 12), np.float32), "labels": np.eye(5, dtype=np.float32)[[0, 2, 1, 4]]},
            r"'labels' must be integers, got dtype float32 \(they look one-hot: save labels.argmax\(1\)",
        ),
    ],
)
def test_bad_arrays_name_the_file_and_value(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=r"bad\.npz.*" + message):
        validate_source(open_source(tmp_path / "bad.npz", SPECS), SPECS, num_classes=5)


def test_missing_input_in_multi_key_npz(tmp_path: Path) -> None:
    np.savez(tmp_path / "two.npz", a=_x(), b=_x())
    with pytest.raises(DataError, match=r"two\.npz: the model has one input 'x'"):
        open_source(tmp_path / "two.npz", SPECS)


def test_in_memory_arrays_and_custom_sources() -> None:
    src = open_source({"x": _x(5), "labels": np.arange(5) % 5}, SPECS)
    assert validate_source(src, SPECS, num_classes=5) == 5

    class Reader:
        """A user-defined re-iterable source, like an ORT CalibrationDataReader that can restart."""

        def __iter__(self):  # type: ignore[no-untyped-def]
            for i in range(2):
                yield Batch({"x": _x(3, seed=i)}, None)

    custom = Reader()
    assert isinstance(custom, CalibrationSource)
    assert open_source(custom, SPECS) is custom
    assert validate_source(custom, SPECS) == 6


def test_holdout_split_is_disjoint_seeded_and_complete() -> None:
    x = _x(50)
    x[:, 0] = np.arange(50)
    src = ArraySource({"x": x}, np.arange(50) % 5)
    calib, held = split_holdout(src, 0.2, seed=7)
    ids_c, ids_h = set(calib.inputs["x"][:, 0].tolist()), set(held.inputs["x"][:, 0].tolist())
    assert len(ids_h) == 10 and len(ids_c) == 40 and not ids_c & ids_h
    again = split_holdout(src, 0.2, seed=7)[1]
    np.testing.assert_array_equal(again.inputs["x"], held.inputs["x"])
    with pytest.raises(DataError, match="too few"):
        split_holdout(ArraySource({"x": _x(1)}), 0.2)


def test_float_data_beyond_a_float16_input_range_is_refused(tmp_path: Path) -> None:
    """float32 data for a float16 model: a value that the cast would turn into inf is refused like
    inf itself, naming the array, the sample and the value (not found later as a NaN Gram)."""
    specs = [InputSpec("x", ("N", 12), np.dtype(np.float16), 0)]
    x = _x(6)
    np.savez(tmp_path / "ok.npz", x=x)
    assert validate_source(open_source(tmp_path / "ok.npz", specs), specs) == 6
    x[4, 3] = 1e6
    np.savez(tmp_path / "big.npz", x=x)
    with pytest.raises(DataError, match=r"big\.npz: array .x. holds 1000000\.0 at sample 4 .*float16"):
        validate_source(open_source(tmp_path / "big.npz", specs), specs)


def test_labels_of_several_values_for_a_per_sample_classifier_are_refused_with_the_way_out() -> None:
    """One-hot labels ``(batch, classes)`` for a model that scores classes once per sample: refused with
    the fix, not read as labels per position (which a tagger's or segmenter's evaluation reads)."""
    batch = Batch({"x": _x(4)}, np.eye(5, dtype=np.int64)[[0, 1, 2, 3]])
    with pytest.raises(DataError, match=r"shape \(4, 5\), but the model scores 5 classes once per sample: .*argmax"):
        validate_source([batch], SPECS, num_classes=5)
    assert validate_source([batch], SPECS) == 4  # no class count known: read as labels per position


@pytest.mark.parametrize(
    ("key", "values", "hinted"),
    [
        ("y", np.arange(10) % 5, True),
        ("Target", (np.arange(10) % 5).astype(np.float32), True),  # whole numbers stored as floats
        ("y", np.linspace(0, 1, 10), False),  # regression targets, not classes
        ("y", np.arange(7) % 5, False),  # not one per sample
        ("weights", np.arange(10) % 5, False),  # not named like labels
    ],
)
def test_an_extra_array_named_like_labels_gets_a_rename_hint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str, values: np.ndarray, hinted: bool
) -> None:
    np.savez(tmp_path / "d.npz", x=_x(10), **{key: values})
    src = open_source(tmp_path / "d.npz", SPECS)
    assert all(b.labels is None for b in src)  # only 'labels' is read as labels
    assert f"ignoring arrays that are not model inputs: ['{key}']" in caplog.text
    assert ("save them under 'labels'" in caplog.text) is hinted


def test_two_unnamed_arrays_for_one_input_hint_at_the_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", data=_x(10), y=np.arange(10) % 5)
    with pytest.raises(DataError, match=r"d\.npz: the model has one input 'x'.*'y' looks like class labels"):
        open_source(tmp_path / "d.npz", SPECS)


def test_no_hint_when_labels_are_given(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    np.savez(tmp_path / "d.npz", x=_x(10), labels=np.arange(10) % 5, y=np.arange(10) % 5)
    src = open_source(tmp_path / "d.npz", SPECS)
    assert all(b.labels is not None for b in src)
    assert "ignoring arrays" in caplog.text and "save them under" not in caplog.text


def _two_input_specs() -> list[InputSpec]:
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])],
        "two",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 12]) for n in ("a", "b")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 12])],
    )
    return model_inputs(helper.make_model(g))


def test_a_npy_array_feeds_a_one_input_model(tmp_path: Path) -> None:
    x = _x(10)
    np.save(tmp_path / "x.npy", x)
    src = open_source(tmp_path / "x.npy", SPECS, batch_size=4)
    assert validate_source(src, SPECS) == 10
    got = np.concatenate([b.inputs["x"] for b in src])
    np.testing.assert_array_equal(got, x)
    assert all(b.labels is None for b in src)


def test_a_npy_array_is_refused_for_a_model_with_two_inputs(tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", _x(10))
    with pytest.raises(DataError, match=r"x\.npy: is a single \.npy array, which feeds only a one-input model"):
        open_source(tmp_path / "x.npy", _two_input_specs())


def test_a_forged_or_object_npy_is_refused_before_it_is_read(tmp_path: Path) -> None:
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match=r"obj\.npy holds Python objects"):
        open_source(tmp_path / "obj.npy", SPECS)
    np.save(tmp_path / "cut.npy", _x(10))
    raw = (tmp_path / "cut.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(DataError, match=r"cut\.npy declares shape \(10, 12\) of float32 .* truncated or forged"):
        open_source(tmp_path / "cut.npy", SPECS)


def test_an_image_saved_channels_last_is_told_how_to_reorder_it(tmp_path: Path) -> None:
    specs = [InputSpec("img", ("N", 3, 8, 6), np.dtype(np.float32), 0)]
    np.savez(tmp_path / "nhwc.npz", img=np.zeros((5, 8, 6, 3), np.float32))
    with pytest.raises(DataError, match=r"np\.transpose\(x, \(0, 3, 1, 2\)\) gives the model's layout"):
        validate_source(open_source(tmp_path / "nhwc.npz", specs), specs)
    x = np.random.default_rng(0).normal(size=(5, 8, 6, 3)).astype(np.float32)
    np.savez(tmp_path / "fixed.npz", img=np.transpose(x, (0, 3, 1, 2)))
    assert validate_source(open_source(tmp_path / "fixed.npz", specs), specs) == 5
    np.savez(tmp_path / "other.npz", img=np.zeros((5, 8, 7, 3), np.float32))  # not a reordering: no hint
    with pytest.raises(DataError, match=r"the model expects \('\?', 3, 8, 6\)$"):
        validate_source(open_source(tmp_path / "other.npz", specs), specs)
