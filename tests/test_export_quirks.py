"""Export quirks met on real third-party models (the zoo's new wheels), on small synthetic graphs.

* A torch export that squeezed the batch axis away (``.squeeze()`` traced at batch 1): the declared
  output is a scalar, and onnxruntime returns ``[N]`` for a batch of N (speechmos' PLCMOS).  The
  gradient rows must equal those of the same model whose output keeps its batch axis.
* A static input that pins the batch to one (a recurrent state exported as ``[layers, 1, hidden]``
  next to an input with a dynamic batch, speechmos' AECMOS): onnxruntime refuses batches of several
  samples, so the evaluation runs one sample at a time.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_gradients import Init, mk, node, vi

from chita_onnx import CompressConfig, compress
from chita_onnx.data import ArraySource, static_names
from chita_onnx.evaluate import make_session, run_outputs
from chita_onnx.gradients import per_sample_gradients
from chita_onnx.graph import model_inputs


def scorer(seed: int = 0, *, squeeze: bool = True) -> onnx.ModelProto:
    """``x [N, 6]`` → tanh MLP → one score per sample; with ``squeeze`` the output is ``Squeeze``d
    without axes and declared as a scalar (what torch writes for ``y.squeeze()`` traced at batch 1),
    else it keeps its shape ``[N, 1]``."""
    w = Init(seed)
    nodes = [
        node("MatMul", ["x", w("W1", 6, 8)], ["h0"]),
        node("Tanh", ["h0"], ["h"]),
        node("MatMul", ["h", w("W2", 8, 1)], ["z" if squeeze else "score"]),
    ]
    if squeeze:
        nodes.append(node("Squeeze", ["z"], ["score"]))
    out = vi("score", [] if squeeze else ["N", 1])
    return mk(nodes, [vi("x", ["N", 6])], [out], w.items)


@pytest.mark.parametrize("method", ["single", "batched"])
def test_squeezed_batch_axis_gives_the_rows_of_the_unsqueezed_model(method: str) -> None:
    x = np.random.default_rng(1).standard_normal((7, 6)).astype(np.float32)
    src = ArraySource({"x": x}, batch_size=4)
    squeezed = per_sample_gradients(scorer(3), src, ["W1", "W2"], seed=5, method=method)
    plain = per_sample_gradients(scorer(3, squeeze=False), src, ["W1", "W2"], seed=5, method=method)
    assert squeezed.head == plain.head == "regression"
    assert np.abs(squeezed.X).max() > 0
    np.testing.assert_allclose(squeezed.X, plain.X, rtol=1e-6, atol=1e-7)


def test_squeezed_batch_axis_compresses_end_to_end(tmp_path: Path) -> None:
    path = tmp_path / "score.onnx"
    onnx.save(scorer(4), path)
    rng = np.random.default_rng(2)
    calib = {"x": rng.standard_normal((40, 6)).astype(np.float32)}
    test = {"x": rng.standard_normal((12, 6)).astype(np.float32)}
    report = compress(path, tmp_path / "out.onnx", calib, CompressConfig(sparsity=0.5), eval_data=test)
    assert report.nnz <= report.k == round(0.5 * report.p)
    e = report.evaluation
    assert e is not None and e.samples == 12 and e.relative_error is not None and 0 < e.relative_error < 1
    y = make_session(tmp_path / "out.onnx").run(None, test)[0]
    assert y.shape == (12,)


def pinned_state(seed: int = 0) -> onnx.ModelProto:
    """``x [N, 4]`` (dynamic batch) concatenated with a state ``h [1, 3]`` declared with a fixed
    batch of one: the Concat only runs for N = 1."""
    w = Init(seed)
    nodes = [
        node("Concat", ["x", "h"], ["xh"], axis=1),
        node("MatMul", ["xh", w("W1", 7, 5)], ["a"]),
        node("Tanh", ["a"], ["t"]),
        node("MatMul", ["t", w("W2", 5, 2)], ["y"]),
    ]
    return mk(nodes, [vi("x", ["N", 4]), vi("h", [1, 3])], [vi("y", ["N", 2])], w.items)


def test_static_input_pinning_the_batch_runs_one_sample_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "pinned.onnx"
    model = pinned_state(5)
    onnx.save(model, path)
    specs = model_inputs(model)
    assert static_names(specs) == {"h"}
    rng = np.random.default_rng(6)
    data = {"x": rng.standard_normal((9, 4)).astype(np.float32), "h": rng.standard_normal((1, 3)).astype(np.float32)}
    session = make_session(path)
    with pytest.raises(Exception, match="Concat"):  # onnxruntime itself refuses a batch of several
        session.run(None, data)
    ys, _ = run_outputs(session, ArraySource(data, batch_size=4, static=["h"]), specs, ["y"])
    want = np.concatenate([session.run(None, {"x": data["x"][i : i + 1], "h": data["h"]})[0] for i in range(9)])
    np.testing.assert_array_equal(ys["y"], want)
    calib = {"x": rng.standard_normal((30, 4)).astype(np.float32), "h": data["h"]}
    report = compress(path, tmp_path / "out.onnx", calib, CompressConfig(sparsity=0.5), eval_data=data)
    assert report.nnz <= report.k
    assert report.evaluation is not None and report.evaluation.samples == 9


def test_weights_on_path_in_one_pass_matches_the_per_weight_definition() -> None:
    """``weights_on_path`` (one backward cone) gives the same answer as asking
    ``differentiable_nodes`` weight by weight: a weight feeding only a dead branch, one reaching the
    target only through an integer tensor (Shape), and weights on float paths."""
    from chita_onnx.gradients.prepare import differentiable_nodes, weights_on_path

    w = Init(8)
    nodes = [
        node("MatMul", ["x", w("W1", 4, 5)], ["a"]),
        node("MatMul", ["x", w("Wdead", 4, 3)], ["dead"]),  # not consumed on the way to y
        node("Shape", [w("Wshape", 5, 5)], ["shp"]),  # only its (int64) shape reaches y
        node("Gather", ["shp", w.const("i0", 0, np.int64)], ["s0"], axis=0),
        node("Unsqueeze", ["s0", w.const("ax", [0], np.int64)], ["s1"]),
        node("Concat", [w.const("m1", [-1], np.int64), "s1"], ["shp2"], axis=0),
        node("Reshape", ["a", "shp2"], ["a2"]),
        node("Relu", ["a2"], ["r"]),
        node("Add", ["r", w("b", 5)], ["rb"]),
        node("MatMul", ["rb", w("W2", 5, 2)], ["y"]),
    ]
    model = mk(nodes, [vi("x", ["N", 4])], [vi("y", ["N", 2]), vi("dead", ["N", 3])], w.items)
    model = onnx.shape_inference.infer_shapes(model)
    names = ["W1", "Wdead", "Wshape", "b", "W2"]
    per_weight = [n for n in names if differentiable_nodes(model, [n], "y")]
    assert per_weight == ["W1", "b", "W2"]
    assert weights_on_path(model, names, "y") == per_weight
    assert weights_on_path(model, names, "dead") == [n for n in names if differentiable_nodes(model, [n], "dead")]


def test_weights_of_a_taken_branch_that_do_not_feed_the_loss_are_not_called_unreached(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An If with two outputs (silero-vad's probability and next state): with ``output`` the second,
    the taken branch's weight of the first is dead code, not a weight of an untaken branch."""
    from onnx import TensorProto, helper

    from chita_onnx.data_types import Batch
    from chita_onnx.gradients import GradientEngine

    rng = np.random.default_rng(3)

    def const(name: str, *shape: int) -> onnx.NodeProto:
        value = onnx.numpy_helper.from_array((0.5 * rng.standard_normal(shape)).astype(np.float32), name)
        return helper.make_node("Constant", [], [name], value=value, name=f"{name}_c")

    def branch(tag: str) -> onnx.GraphProto:
        nodes = [
            const(f"Wp_{tag}", 4, 1),
            const(f"Ws_{tag}", 4, 3),
            helper.make_node("MatMul", ["x", f"Wp_{tag}"], [f"p_{tag}"]),
            helper.make_node("MatMul", ["x", f"Ws_{tag}"], [f"s_{tag}"]),
        ]
        outs = [helper.make_tensor_value_info(f"{k}_{tag}", TensorProto.FLOAT, None) for k in ("p", "s")]
        return helper.make_graph(nodes, tag, [], outs)

    w = Init(4)
    nodes = [
        node("Equal", ["sr", w.const("k16", 16000, np.int64)], ["c"]),
        helper.make_node("If", ["c"], ["prob", "state"], then_branch=branch("hi"), else_branch=branch("lo")),
    ]
    model = mk(
        nodes,
        [vi("x", ["N", 4]), vi("sr", [], TensorProto.INT64)],
        [vi("prob", ["N", 1]), vi("state", ["N", 3])],
        w.items,
    )
    feeds = {"x": rng.standard_normal((5, 4)).astype(np.float32), "sr": np.asarray(16000, np.int64)}
    names = ["Wp_hi", "Ws_hi", "Wp_lo", "Ws_lo"]
    with caplog.at_level("WARNING"):
        e = GradientEngine(model, names, example=Batch(feeds, None), output="state", method="single")
    assert e.on_path == ("Ws_hi",)
    assert e.unreached == ("Wp_lo", "Ws_lo")  # the 8 kHz branch; Wp_hi is only off the loss's path
    assert any("do not influence the loss" in r.message and "Wp_hi" in r.message for r in caplog.records)


def batch_one_cnn(seed: int = 0, *, mixes: bool = False) -> onnx.ModelProto:
    """``x [1, 2, 6, 6]`` (the batch fixed to one, as TFLite and paddle2onnx exports write it) → Conv →
    Relu → ``Reshape`` to the constant ``[1, -1]`` → Gemm → ``y [1, 3]``.  With ``mixes``, a
    ``ReduceMean`` over the batch axis before the Gemm: a graph that runs several samples but mixes them."""
    w = Init(seed)
    nodes = [
        node("Conv", ["x", w("Wc", 4, 2, 3, 3)], ["c"], pads=[1, 1, 1, 1]),
        node("Relu", ["c"], ["r"]),
        node("Reshape", ["r", w.const("flat", [1, -1], np.int64)], ["f"]),
    ]
    if mixes:
        nodes.append(node("ReduceMean", ["f"], ["m"], axes=[0], keepdims=1))
        nodes.append(node("Sub", ["f", "m"], ["g"]))
    nodes.append(node("Gemm", ["g" if mixes else "f", w("Wg", 144, 3)], ["y"]))
    return mk(nodes, [vi("x", [1, 2, 6, 6])], [vi("y", [1, 3])], w.items)


def test_opened_batch_runs_several_samples_as_each_alone() -> None:
    """``open_batch`` frees the fixed batch of the input and of the flattening ``Reshape``: the copy
    runs five samples at once, and each gets exactly the outputs it gets alone in the original."""
    import onnxruntime as ort

    from chita_onnx.activations import open_batch, working_copy

    def session_of(m: onnx.ModelProto) -> ort.InferenceSession:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])

    model = batch_one_cnn(3)
    x = np.random.default_rng(4).standard_normal((5, 2, 6, 6)).astype(np.float32)
    alone = session_of(model)
    with pytest.raises(Exception, match=r"Reshape|Gemm|dimension"):  # onnxruntime refuses five as exported
        alone.run(None, {"x": x})
    opened = open_batch(working_copy(model), model_inputs(model))
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1  # the original is untouched
    together = session_of(opened).run(None, {"x": x})[0]
    want = np.concatenate([alone.run(None, {"x": x[i : i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(together, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mixes", [False, True])
def test_layerwise_opens_a_fixed_batch_only_where_samples_stay_apart(mixes: bool, tmp_path: Path) -> None:
    """The layer-wise passes run a batch-one export several samples at a time only when the probe
    finds every sample computed alone; a graph that mixes the samples keeps batches of one."""
    from chita_onnx.pipeline import prepare
    from chita_onnx.reconstruct import layer_data

    path = tmp_path / "b1.onnx"
    onnx.save(batch_one_cnn(5, mixes=mixes), path)
    calib = {"x": np.random.default_rng(6).standard_normal((12, 2, 6, 6)).astype(np.float32)}
    cfg = CompressConfig(sparsity=0.5, batch_size=4)
    _, batches, opts = layer_data(prepare(path, calib, cfg, hold_out=False), cfg)
    assert [b["x"].shape[0] for b in batches] == ([1] * 12 if mixes else [4, 4, 4])
    assert opts.sample_groups == (() if mixes else (4, 4, 4))
    same = {"x": np.repeat(calib["x"][:1], 12, axis=0)}  # equal samples cannot show the mixing: no opening
    _, batches, opts = layer_data(prepare(path, same, cfg, hold_out=False), cfg)
    assert [b["x"].shape[0] for b in batches] == [1] * 12 and opts.sample_groups == ()


def test_layerwise_on_an_opened_batch_prunes_as_one_sample_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With every input row in the Grams (no row cap binds), pruning a batch-one export through the
    opened copy gives the weights of the pass that runs one sample at a time."""
    import chita_onnx.reconstruct as rc

    path = tmp_path / "b1.onnx"
    onnx.save(batch_one_cnn(7), path)
    calib = {"x": np.random.default_rng(8).standard_normal((24, 2, 6, 6)).astype(np.float32)}
    cfg = CompressConfig(
        sparsity=0.5, method="layerwise", batch_size=8, max_rows=10_000, bn_recalibrate="off", bias_correction="off"
    )
    compress(path, tmp_path / "opened.onnx", calib, cfg)
    monkeypatch.setattr(rc, "open_fixed_batch", lambda prep, config: None)
    compress(path, tmp_path / "single.onnx", calib, cfg)
    from chita_onnx.graph import get_weights, load_model

    a = get_weights(load_model(tmp_path / "opened.onnx"), ["Wc", "Wg"])
    b = get_weights(load_model(tmp_path / "single.onnx"), ["Wc", "Wg"])
    for name in ("Wc", "Wg"):
        np.testing.assert_array_equal(a[name] != 0, b[name] != 0)
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5)
    assert onnx.load(tmp_path / "opened.onnx").graph.input[0].type.tensor_type.shape.dim[0].dim_value == 1
