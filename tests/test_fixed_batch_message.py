"""Models exported with a fixed batch of ``b > 1`` (a trace without dynamic axes).

Where the graph computes every sample alone, a copy with the batch opened (the input's batch axis,
and a flattening ``Reshape`` to ``[b, -1]``) is what the gradients and the layer-wise passes run:
its per-sample gradients equal those of the same model exported with a dynamic batch, and
``compress`` goes through with the defaults, writing a model that keeps its fixed batch.  Where the
graph mixes the samples (a statistic over the batch), the error names the input, its fixed batch
and the flag that makes the run go through (``--mini-batch 8``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import tiny_mlp
from test_gradients import Init, mk, node, vi

import chita_onnx
from chita_onnx import CompressConfig, DataError
from chita_onnx.data import ArraySource
from chita_onnx.evaluate import make_session
from chita_onnx.gradients import per_sample_gradients


def _fixed_batch(batch: int, *, mixes: bool = False) -> onnx.ModelProto:
    model = tiny_mlp()
    if mixes:  # centre the hidden units on the batch mean: each output depends on every sample
        g = model.graph
        at = next(i for i, n in enumerate(g.node) if n.op_type == "Relu")
        g.node[at].output[0] = "h2raw"
        g.node.insert(at + 1, onnx.helper.make_node("ReduceMean", ["h2raw"], ["mu"], axes=[0], keepdims=1))
        g.node.insert(at + 2, onnx.helper.make_node("Sub", ["h2raw", "mu"], ["h2"]))
        onnx.checker.check_model(model)
    for value in (*model.graph.input, *model.graph.output):
        dim = value.type.tensor_type.shape.dim[0]
        dim.ClearField("dim_param")
        dim.dim_value = batch
    return model


def conv_flatten(batch: int | str, seed: int = 3, *, allowzero: int = 0) -> onnx.ModelProto:
    """``x [batch, 2, 6, 6]`` → Conv → Relu → ``Reshape`` to ``[batch, -1]`` (``[-1, 144]`` when the
    batch is dynamic; ``[batch, 144]`` with ``allowzero=1``, as torch's dynamo exporter writes a
    static ``view``) → Gemm → ``y [batch, 3]``."""
    w = Init(seed)
    flat = ([batch, 144] if allowzero else [batch, -1]) if isinstance(batch, int) else [-1, 144]
    nodes = [
        node("Conv", ["x", w("Wc", 4, 2, 3, 3)], ["c"], pads=[1, 1, 1, 1]),
        node("Relu", ["c"], ["r"]),
        node("Reshape", ["r", w.const("flat", flat, np.int64)], ["f"], allowzero=allowzero),
        node("Gemm", ["f", w("Wg", 144, 3)], ["y"]),
    ]
    return mk(nodes, [vi("x", [batch, 2, 6, 6])], [vi("y", [batch, 3])], w.items)


@pytest.mark.parametrize(("batch", "allowzero"), [(4, 0), (4, 1), (1, 1)])
def test_fixed_batch_gradients_equal_the_dynamic_exports(
    batch: int, allowzero: int, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((12, 2, 6, 6)).astype(np.float32)
    labels = rng.integers(0, 3, 12).astype(np.int64)
    src = ArraySource({"x": x}, labels, batch_size=6)
    with caplog.at_level("INFO", logger="chita_onnx.gradients.engine"):
        fixed = per_sample_gradients(conv_flatten(batch, allowzero=allowzero), src, ["Wc", "Wg"], loss="ce").X
    assert any("gradients on an opened copy" in r.getMessage() for r in caplog.records)
    dynamic = per_sample_gradients(conv_flatten("N"), src, ["Wc", "Wg"], loss="ce").X
    assert fixed.shape == (12, 4 * 2 * 9 + 144 * 3)
    np.testing.assert_allclose(fixed, dynamic, rtol=1e-5, atol=1e-7)


def test_fixed_batch_compresses_with_the_defaults_and_keeps_its_interface(tmp_path: Path) -> None:
    model, data = tmp_path / "b4.onnx", tmp_path / "d.npz"
    onnx.save(conv_flatten(4), model)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30, 2, 6, 6)).astype(np.float32)
    np.savez(data, x=x, labels=rng.integers(0, 3, 30))
    report = chita_onnx.compress(model, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.5))
    assert report.method == "layerwise" and report.nnz <= report.k
    out = onnx.load(tmp_path / "o.onnx")
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [4, 2, 6, 6]
    y = make_session(tmp_path / "o.onnx").run(None, {"x": x[:4]})[0]
    assert y.shape == (4, 3) and np.all(np.isfinite(y))


def test_fixed_batch_that_mixes_samples_names_the_flag(tmp_path: Path) -> None:
    model, data = tmp_path / "b8.onnx", tmp_path / "d.npz"
    onnx.save(_fixed_batch(8, mixes=True), model)
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((64, 12)).astype(np.float32), labels=rng.integers(0, 5, 64))
    with pytest.raises(DataError, match=r"fixed batch dimension 8.*use --mini-batch 8 "):
        chita_onnx.compress(model, tmp_path / "o.onnx", data, CompressConfig(method="chita", sparsity=0.5))
    chita_onnx.compress(model, tmp_path / "o.onnx", data, CompressConfig(method="chita", sparsity=0.5, mini_batch=8))
    assert (tmp_path / "o.onnx").exists()


def test_fixed_batch_of_separate_samples_needs_no_flag(tmp_path: Path) -> None:
    # chita on the batch-8 export prunes as on the same model with a dynamic batch: the same weights
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((64, 12)).astype(np.float32), labels=rng.integers(0, 5, 64))
    written = {}
    for name, model in (("b8", _fixed_batch(8)), ("dyn", tiny_mlp())):
        onnx.save(model, tmp_path / f"{name}.onnx")
        cfg = CompressConfig(method="chita", sparsity=0.5, bias_correction="off")
        report = chita_onnx.compress(tmp_path / f"{name}.onnx", tmp_path / f"{name}_o.onnx", data, cfg)
        assert report.nnz <= report.k
        out = onnx.load(tmp_path / f"{name}_o.onnx")
        written[name] = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    for k in ("W1", "W2"):
        np.testing.assert_allclose(written["b8"][k], written["dyn"][k], rtol=1e-5, atol=1e-6)
        assert np.array_equal(written["b8"][k] == 0, written["dyn"][k] == 0)


def test_the_default_recipe_allocates_by_magnitude_when_the_batch_cannot_be_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # no per-sample gradients for a graph that mixes its fixed batch: the default still prunes
    # (layer-wise, magnitude allocation, the model's own batches of 8) and says why; a method that
    # needs the gradients (above) is refused in one line
    model, data = tmp_path / "b8.onnx", tmp_path / "d.npz"
    onnx.save(_fixed_batch(8, mixes=True), model)
    rng = np.random.default_rng(1)
    np.savez(data, x=rng.standard_normal((64, 12)).astype(np.float32), labels=rng.integers(0, 5, 64))
    with caplog.at_level("WARNING"):
        report = chita_onnx.compress(model, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.5))
    assert report.method == "layerwise" and report.config["allocation"] == "magnitude"
    assert report.nnz <= report.k and (tmp_path / "o.onnx").exists()
    assert any("fixed batch dimension 8" in w and "magnitudes" in w for w in report.warnings)
    assert not any("falling back" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("mixes", [False, True])
def test_layerwise_opens_a_fixed_batch_of_several_only_where_samples_stay_apart(mixes: bool, tmp_path: Path) -> None:
    from chita_onnx.pipeline import prepare
    from chita_onnx.reconstruct import layer_data

    path = tmp_path / "b8.onnx"
    onnx.save(_fixed_batch(8, mixes=mixes), path)
    calib = {"x": np.random.default_rng(6).standard_normal((20, 12)).astype(np.float32)}
    cfg = CompressConfig(sparsity=0.5, batch_size=6)
    _, batches, opts = layer_data(prepare(path, calib, cfg, hold_out=False), cfg)
    # opened: batches of the configured size, every sample used; kept: batches of exactly 8
    assert [b["x"].shape[0] for b in batches] == ([8, 8] if mixes else [6, 6, 6, 2])
    assert opts.sample_groups == (() if mixes else (6, 6, 6, 2))


def test_layerwise_opens_a_static_dynamo_view_of_batch_one(tmp_path: Path) -> None:
    # torch's dynamo exporter without dynamic shapes: x [1, ...] and Reshape(allowzero=1) to [1, 144]
    from chita_onnx.pipeline import prepare
    from chita_onnx.reconstruct import layer_data

    path = tmp_path / "b1.onnx"
    onnx.save(conv_flatten(1, allowzero=1), path)
    calib = {"x": np.random.default_rng(8).standard_normal((12, 2, 6, 6)).astype(np.float32)}
    cfg = CompressConfig(sparsity=0.5, batch_size=6)
    _, batches, opts = layer_data(prepare(path, calib, cfg, hold_out=False), cfg)
    assert [b["x"].shape[0] for b in batches] == [6, 6] and opts.sample_groups == (6, 6)
