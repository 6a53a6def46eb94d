"""The graph layer: prunable-weight discovery, safe loading, and writing the pruned model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import make_model, tiny_cnn, tiny_mlp
from onnx import TensorProto, helper, numpy_helper

from chita_onnx.errors import ModelError, OutputError
from chita_onnx.graph import (
    METADATA_KEY,
    check_model,
    find_prunable,
    get_weights,
    load_model,
    materialize_constants,
    save_model,
    write_weights,
)


def _run(model: onnx.ModelProto | str, x: np.ndarray, name: str = "x") -> np.ndarray:
    src = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return np.asarray(sess.run(None, {name: x})[0])


def test_mlp_prunable_weights_are_matmul_and_gemm_not_biases() -> None:
    found = {t.name: t for t in find_prunable(tiny_mlp())}
    assert set(found) == {"W1", "W2"}
    assert found["W1"].op_type == "MatMul" and found["W1"].nodes == ("fc1",)
    assert found["W2"].op_type == "Gemm" and found["W2"].shape == (5, 16)


def test_cnn_prunable_includes_depthwise_conv_and_excludes_bn() -> None:
    names = [t.name for t in find_prunable(tiny_cnn())]
    assert names == ["conv1.weight", "dw.weight", "fc.weight"]


def _shared_and_mixed_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 4)).astype(np.float32)
    tied = rng.standard_normal((4, 4)).astype(np.float32)
    shape = np.array([-1, 4], dtype=np.int64)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["a"], name="mm_a"),
        helper.make_node("MatMul", ["a", "W"], ["b"], name="mm_b"),  # W shared: counts once
        helper.make_node("MatMul", ["b", "T"], ["c"], name="mm_c"),
        helper.make_node("Add", ["c", "T"], ["d"], name="add_t"),  # T also feeds an Add: never pruned
        helper.make_node("Reshape", ["d", "shape"], ["y"], name="reshape"),
        helper.make_node("MatMul", ["W", "T"], ["wt"], name="const_mm"),  # two constants: not a layer
        helper.make_node("Identity", ["wt"], ["z"], name="id"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, [4, 4]),
        ],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(tied, "T"), numpy_helper.from_array(shape, "shape")],
    )


def test_shared_initializer_counts_once_and_mixed_use_is_never_pruned() -> None:
    found = find_prunable(_shared_and_mixed_model())
    # W feeds mm_a, mm_b and the constant-only MatMul (not a weight slot) → not prunable either
    assert [t.name for t in found] == []
    m = _shared_and_mixed_model()
    del m.graph.node[5:]  # drop the constant MatMul
    m.graph.output.pop()
    found = find_prunable(m)
    assert [(t.name, t.nodes) for t in found] == [("W", ("mm_a", "mm_b"))]


def _constant_weight_model() -> onnx.ModelProto:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["Wc"], value=numpy_helper.from_array(w, "Wc")),
        helper.make_node("MatMul", ["x", "Wc"], ["y"], name="mm"),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [],
    )


def test_constant_node_weights_are_found_materialized_and_written_back() -> None:
    model = _constant_weight_model()
    (t,) = find_prunable(model)
    assert (t.name, t.source, t.shape) == ("Wc", "constant", (6, 3))
    mat = materialize_constants(model)
    assert [i.name for i in mat.graph.initializer] == ["Wc"]
    assert [t.source for t in find_prunable(mat)] == ["initializer"]
    w = get_weights(model, ["Wc"])["Wc"].copy()
    w[:, 0] = 0
    out, stored = write_weights(model, {"Wc": w})
    assert stored[0].storage == "dense" and stored[0].nnz == 12
    x = np.ones((2, 6), np.float32)
    np.testing.assert_array_equal(_run(out, x), x @ w)


def test_external_data_is_loaded_and_outside_paths_are_refused(tmp_path: Path) -> None:
    model = tiny_mlp()
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, location="ext.data", size_threshold=0)
    loaded = load_model(tmp_path / "ext.onnx")
    np.testing.assert_array_equal(get_weights(loaded, ["W1"])["W1"], get_weights(tiny_mlp(), ["W1"])["W1"])
    assert [t.name for t in find_prunable(loaded)] == ["W1", "W2"]

    evil = onnx.load(tmp_path / "ext.onnx", load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../outside.data"
    (tmp_path / "sub").mkdir()
    onnx.save(evil, tmp_path / "sub" / "evil.onnx")
    with pytest.raises(ModelError, match=r"outside the model's folder"):
        load_model(tmp_path / "sub" / "evil.onnx")


def test_missing_and_non_onnx_files_raise_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"this is not a protobuf \xff\xfe" * 10)
    with pytest.raises(ModelError, match=r"junk\.onnx"):
        load_model(junk)


@pytest.mark.parametrize("storage", ["auto", "sparse", "dense"])
def test_written_model_is_checker_clean_and_matches_dense_with_zeros(tmp_path: Path, storage: str) -> None:
    model = tiny_mlp(d_in=64, hidden=64)
    rng = np.random.default_rng(0)
    weights = get_weights(model, ["W1", "W2"])
    for w in weights.values():
        w[rng.random(w.shape) < 0.8] = 0.0  # 80% zeros: sparse storage is smaller
    out, _ = write_weights(model, weights, storage=storage, metadata={"method": "test"})
    path = tmp_path / f"out_{storage}.onnx"
    save_model(out, path, input_path=tmp_path / "in.onnx")
    check_model(path)
    re = onnx.load(path)
    expect_sparse = storage in ("auto", "sparse")
    assert {s.values.name for s in re.graph.sparse_initializer} == ({"W1", "W2"} if expect_sparse else set())
    for s in re.graph.sparse_initializer:
        assert s.indices.data_type == TensorProto.INT64 and len(s.indices.dims) == 1
    assert [o.version for o in re.opset_import] == [o.version for o in model.opset_import]
    assert re.ir_version == model.ir_version
    props = {p.key: p.value for p in re.metadata_props}
    assert props["author"] == "tests" and '"method": "test"' in props[METADATA_KEY]
    # identical outputs to the dense-with-zeros model in onnxruntime
    dense, _ = write_weights(model, weights, storage="dense")
    x = rng.standard_normal((8, 64)).astype(np.float32)
    np.testing.assert_array_equal(_run(str(path), x), _run(dense, x))
    if storage == "sparse":
        assert path.stat().st_size < len(dense.SerializeToString())


def test_auto_storage_keeps_dense_below_break_even() -> None:
    model = tiny_mlp(d_in=64, hidden=64)
    weights = get_weights(model, ["W1"])
    weights["W1"][:, :32] = 0.0  # 50% zeros: 12 bytes per nonzero would be larger than dense
    _, stored = write_weights(model, weights, storage="auto")
    assert stored[0].storage == "dense" and stored[0].sparse_bytes > stored[0].dense_bytes


def test_pruned_sparse_model_reloads_as_dense_weights(tmp_path: Path) -> None:
    model = tiny_mlp(d_in=64, hidden=64)
    weights = get_weights(model, ["W1"])
    weights["W1"][:, :60] = 0.0
    out, _ = write_weights(model, weights, storage="sparse")
    save_model(out, tmp_path / "s.onnx")
    again = load_model(tmp_path / "s.onnx")
    np.testing.assert_array_equal(get_weights(again, ["W1"])["W1"], weights["W1"])
    assert [t.name for t in find_prunable(again)] == ["W1", "W2"]


def test_save_refuses_the_input_path_and_leaves_no_temp_files(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    onnx.save(tiny_mlp(), src)
    before = src.read_bytes()
    with pytest.raises(OutputError, match="input model"):
        save_model(tiny_mlp(1), src, input_path=src)
    assert src.read_bytes() == before
    save_model(tiny_mlp(1), tmp_path / "o.onnx", input_path=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "o.onnx"]
    with pytest.raises(OutputError, match="does not exist"):
        save_model(tiny_mlp(1), tmp_path / "no_dir" / "o.onnx")
