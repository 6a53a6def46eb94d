"""A ``Loop`` off the differentiated path whose body reads a main-graph node's output from the outer
scope — torch's TorchScript export of ``nn.EmbeddingBag`` (``benchmarks/make_unseen_torch6.py``,
``dcn_bag_ts``).  onnxruntime-training 1.19.2's gradient builder aborted the whole process on it (a
failed bounds assertion, exit -6 and no message), so ``compress``, ``gradients`` and ``inspect
--check --data`` died; the builder now gets the graph with such nodes hidden
(:func:`chita_onnx.gradients._ort.hide_control_flow`) and the gradient graph gets them back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

N, BAG, VOCAB, E, DENSE, CLASSES = 6, 3, 10, 4, 2, 5


def bag_model(outer_node: bool, dense: bool = True) -> onnx.ModelProto:
    """``ids [N, 3]`` int64 and ``dense [N, 2]`` → a ``Loop`` over the batch (the mean of the rows of
    ``table`` that ``ids[i]`` picks: an EmbeddingBag) → Concat with ``dense`` → ``Gemm`` by ``W [5, 6]``.
    With ``outer_node`` the body reads ``Identity(ids)``, a main-graph node's output; else ``ids``.
    Without ``dense``, no second input: the bags alone feed ``Gemm`` by ``W [5, 4]`` (fastText)."""
    rng = np.random.default_rng(0)
    src = "ids2" if outer_node else "ids"
    body = helper.make_graph(
        [
            helper.make_node("Gather", [src, "i"], ["row"], axis=0),
            helper.make_node("Gather", ["table", "row"], ["emb"], axis=0),
            helper.make_node("ReduceMean", ["emb"], ["bag"], axes=[0], keepdims=0),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("bag", TensorProto.FLOAT, [E]),
        ],
    )
    nodes = [
        helper.make_node("Identity", ["ids"], ["ids2"]),
        helper.make_node("Shape", ["ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
        helper.make_node("Loop", ["n", "true"], ["bags"], body=body, name="bag_loop"),
        helper.make_node("Concat", ["bags", "dense"], ["x"], axis=1),
        helper.make_node("Gemm", ["x", "W", "b"], ["logits"], transB=1),
    ]
    inputs = [
        helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", BAG]),
        helper.make_tensor_value_info("dense", TensorProto.FLOAT, ["N", DENSE]),
    ]
    width = E + DENSE
    if not dense:
        nodes[-2:] = [helper.make_node("Gemm", ["bags", "W", "b"], ["logits"], transB=1)]
        inputs, width = inputs[:1], E
    g = helper.make_graph(
        nodes,
        "bag",
        inputs,
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(rng.normal(size=(VOCAB, E)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.normal(size=(CLASSES, width)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.normal(size=CLASSES).astype(np.float32), "b"),
         numpy_helper.from_array(np.asarray(0, np.int64), "zero"),
         numpy_helper.from_array(np.asarray(True), "true")],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.checker.check_model(m, full_check=True)
    return m


def data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        "ids": rng.integers(0, VOCAB, size=(N, BAG)).astype(np.int64),
        "dense": rng.normal(size=(N, DENSE)).astype(np.float32),
        "labels": (np.arange(N) % CLASSES).astype(np.int64),
    }


def test_empirical_gradients_of_a_model_with_an_off_path_loop(tmp_path: Path) -> None:
    """The per-sample gradients (in a child process: the abort killed its interpreter) are exactly
    the cross-entropy gradients ``(softmax(z) − onehot(y)) xᵀ``, with ``x`` from onnxruntime."""
    model = bag_model(outer_node=True)
    onnx.save(model, tmp_path / "bag.onnx")
    d = data()
    np.savez(tmp_path / "bag.npz", ids=d["ids"], dense=d["dense"], labels=d["labels"])
    script = textwrap.dedent(
        f"""
        import numpy as np, chita_onnx
        g = chita_onnx.per_sample_gradients({str(tmp_path / "bag.onnx")!r}, {str(tmp_path / "bag.npz")!r},
                                            fisher="empirical")
        np.save({str(tmp_path / "g.npy")!r}, np.asarray(g.X))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    got = np.load(tmp_path / "g.npy")
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", E + DENSE]))
    z, x = ort.InferenceSession(m.SerializeToString()).run(["logits", "x"], {"ids": d["ids"], "dense": d["dense"]})
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    delta = p - np.eye(CLASSES)[d["labels"]]
    want = np.einsum("nc,nj->ncj", delta, x).reshape(N, -1)
    assert got.shape == want.shape
    assert np.allclose(got, want, atol=1e-5) or np.allclose(got, -want, atol=1e-5), np.abs(got - want).max()


def test_hidden_loop_comes_back_and_reads_its_outer_node() -> None:
    """The builder's input has no Loop (its output a graph input, ``ids2`` an extra output); the
    gradient graph has it back, computes ``bags`` from ``ids2`` again and has no extra input or output."""
    from chita_onnx.gradients._ort import hide_control_flow, restore_control_flow

    model = onnx.shape_inference.infer_shapes(bag_model(outer_node=True))
    model.graph.value_info.append(helper.make_tensor_value_info("bags", TensorProto.FLOAT, ["N", E]))
    shown, hidden = hide_control_flow(model, ["W"])
    assert [n.op_type for n in shown.graph.node].count("Loop") == 0
    assert "bags" in {i.name for i in shown.graph.input} and "ids2" in {o.name for o in shown.graph.output}
    # a stand-in for the builder's output: the graph it was handed, with the unread initializers dropped
    built = onnx.ModelProto()
    built.CopyFrom(shown)
    kept = [t for t in built.graph.initializer if t.name in {"W", "b", "zero"}]
    del built.graph.initializer[:]
    built.graph.initializer.extend(kept)
    back = restore_control_flow(built, hidden)
    assert [n.op_type for n in back.graph.node].count("Loop") == 1
    assert {i.name for i in back.graph.input} == {"ids", "dense"}
    assert [o.name for o in back.graph.output] == ["logits"]
    d = data()
    feeds = {"ids": d["ids"], "dense": d["dense"]}
    want = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    got = ort.InferenceSession(back.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # a Loop the differentiated weights reach is never hidden
    assert hide_control_flow(model, ["table"])[1][0] == []


def test_a_table_gathered_inside_the_loop_is_named_as_an_embedding_table() -> None:
    """The EmbeddingBag's table stays dense, outside the budget, and the report must say so as it
    does for a main-graph embedding (it said nothing: dcn_bag_ts's 812x16 table, 41% of its weights)."""
    from chita_onnx.weightchains import embedding_tables

    model = bag_model(outer_node=True)
    assert embedding_tables(model, {"W"}, min_size=16) == [("table", VOCAB * E)]
    assert embedding_tables(model, {"W", "table"}, min_size=16) == []


def test_gradients_of_a_fasttext_model_whose_batch_comes_through_the_loop() -> None:
    """A fastText-style classifier (EmbeddingBag → Gemm, ``fasttext_bag_ts``): the Loop's trip count is
    the batch size and its output's shape follows from the body, but the static working copy took
    it for value-dependent, so the loss shape was ``(None, 5)`` and gradients were refused ("cannot
    infer the static shape of the loss input"); the default fell back to the magnitude allocation."""
    import chita_onnx

    model = bag_model(outer_node=True, dense=False)
    d = data()
    g = chita_onnx.per_sample_gradients(model, {"ids": d["ids"], "labels": d["labels"]}, fisher="empirical")
    got = np.asarray(g.X)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info("bags", TensorProto.FLOAT, ["N", E]))
    z, x = ort.InferenceSession(m.SerializeToString()).run(["logits", "bags"], {"ids": d["ids"]})
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.einsum("nc,nj->ncj", p - np.eye(CLASSES)[d["labels"]], x).reshape(N, -1)
    assert np.allclose(got, want, atol=1e-5) or np.allclose(got, -want, atol=1e-5), np.abs(got - want).max()


def while_bag_model() -> onnx.ModelProto:
    """:func:`bag_model` (fastText form) whose body condition is computed from values: a while loop,
    whose output shape stays value-dependent, so no gradients can be built."""
    model = bag_model(outer_node=True, dense=False)
    body = next(n for n in model.graph.node if n.op_type == "Loop").attribute[0].g
    body.node[-1].CopyFrom(helper.make_node("Greater", ["row_sum", "floor"], ["cond_out"]))
    body.node.insert(len(body.node) - 1, helper.make_node("ReduceSum", ["emb"], ["row_sum"], keepdims=0))
    body.initializer.append(numpy_helper.from_array(np.asarray(-1e9, np.float32), "floor"))
    return model


def test_a_loop_that_a_value_can_stop_keeps_a_value_dependent_shape() -> None:
    """Only a counted Loop counts: a body whose condition output is computed from values (a while
    loop) may stop early, so its outputs' shapes stay value-dependent."""
    from chita_onnx.gradients.static import classify

    assert classify(bag_model(outer_node=True, dense=False).graph).shape_known["bags"]
    assert not classify(while_bag_model().graph).shape_known["bags"]


def test_no_fallback_to_chita_is_announced_when_the_magnitude_allocation_ran(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Gradients that fail past the structural check (the while loop's shape): the default's layer-wise
    pass and then chita fail, and the magnitude allocation prunes.  The log said "the layer-wise pass
    failed (...): falling back to chita" before trying chita, which is not what ran."""
    import chita_onnx
    from chita_onnx import CompressConfig

    d = data()
    src = tmp_path / "while.onnx"
    onnx.save(while_bag_model(), src)
    with caplog.at_level("WARNING"):
        rep = chita_onnx.compress(
            src, tmp_path / "o.onnx", {"ids": d["ids"], "labels": d["labels"]}, CompressConfig(sparsity=0.5)
        )
    assert rep.method == "layerwise" and rep.config["allocation"] == "magnitude" and rep.nnz == 10
    assert any("no gradients for this model" in w for w in rep.warnings)
    assert not any("chita" in r.getMessage() for r in caplog.records), [r.getMessage() for r in caplog.records]
