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
