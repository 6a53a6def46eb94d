"""A stored weight split into pieces that several layers read (torch's cross-attention ``in_proj_weight``
``Split`` into the query and key/value projections): each piece becomes a prunable weight, and only
when the pieces are disjoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from chita_onnx import CompressConfig, compress
from chita_onnx.graph import find_prunable
from chita_onnx.weightchains import expose_weights, unprunable_layer_weights

D = 8


def split_model(pieces: str = "split") -> onnx.ModelProto:
    """q[N,D], m[N,D] → MatMul(q, W[0:D]ᵀ) + MatMul(m, W[D:3D]ᵀ)[:, :D] → y[N,D]; W [3D, D] stored once.

    ``pieces``: ``split`` (one Split, as dynamo writes it), ``slices`` (two Slices with computed
    bounds, disjoint), ``overlap`` (two Slices sharing rows), ``scaled`` (the second piece doubled),
    ``shape_bounds`` / ``gather_bounds`` (bounds from the static axis of ``q``'s shape, by a Slice or a
    Gather of it, as TorchScript writes them),
    ``batch_bounds`` (from its dynamic batch axis: nothing fixes them)."""
    rng = np.random.default_rng(0)
    W = rng.standard_normal((3 * D, D)).astype(np.float32)
    c = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v, np.int64)))  # noqa: E731
    nodes = [c("ax", [0])]
    if pieces == "split":
        nodes += [c("sizes", [D, 2 * D]), helper.make_node("Split", ["W", "sizes"], ["Wq", "Wkv"], axis=0)]
    elif pieces in ("shape_bounds", "gather_bounds", "batch_bounds"):  # E = q.shape[1] (batch: q.shape[0])
        axis = 0 if pieces == "batch_bounds" else 1
        nodes += [helper.make_node("Shape", ["q"], ["qs"]), c("a0", [axis]), c("a1", [axis + 1]), c("two_", [2])]
        if pieces == "gather_bounds":  # Gather of a scalar index, then Unsqueeze (TorchScript's x.size(1))
            nodes += [c("i", axis), helper.make_node("Gather", ["qs", "i"], ["e0"], axis=0)]
            nodes += [helper.make_node("Unsqueeze", ["e0", "ax"], ["e"])]
        else:
            nodes += [helper.make_node("Slice", ["qs", "a0", "a1"], ["e"])]  # [E], a tensor's static axis
        nodes += [helper.make_node("Mul", ["e", "two_"], ["e2"]), helper.make_node("Add", ["e", "e2"], ["e3"])]
        nodes += [c("z", [0]), helper.make_node("Slice", ["W", "z", "e", "ax"], ["Wq"])]
        nodes += [helper.make_node("Slice", ["W", "e", "e3", "ax"], ["Wkv"])]
    else:
        lo2 = D // 2 if pieces == "overlap" else D
        nodes += [c("z", [0]), c("d", [D]), c("lo2", [lo2]), c("len2", [2 * D]), c("one", [1])]
        nodes += [helper.make_node("Add", ["lo2", "len2"], ["hi2"])]  # a computed bound, as TorchScript writes
        nodes += [helper.make_node("Slice", ["W", "z", "d", "ax"], ["Wq"])]
        out2 = "Wkv0" if pieces == "scaled" else "Wkv"
        nodes += [helper.make_node("Slice", ["W", "lo2", "hi2", "ax"], [out2])]
        if pieces == "scaled":
            nodes += [helper.make_node("Constant", [], ["two"], value=numpy_helper.from_array(np.float32(2.0)))]
            nodes += [helper.make_node("Mul", ["Wkv0", "two"], ["Wkv"])]
    nodes += [
        helper.make_node("Transpose", ["Wq"], ["WqT"], perm=[1, 0]),
        helper.make_node("Transpose", ["Wkv"], ["WkvT"], perm=[1, 0]),
        helper.make_node("MatMul", ["q", "WqT"], ["a"], name="q_proj"),
        helper.make_node("MatMul", ["m", "WkvT"], ["kv"], name="kv_proj"),
        c("st", [0]),
        c("en", [D]),
        c("ax1", [1]),
        helper.make_node("Slice", ["kv", "st", "en", "ax1"], ["k"]),
        helper.make_node("Add", ["a", "k"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "split",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", D]) for n in ("q", "m")],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])],
        [numpy_helper.from_array(W, "W")],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def _feeds(n: int = 32) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {k: rng.standard_normal((n, D)).astype(np.float32) for k in ("q", "m")}


@pytest.mark.parametrize("pieces", ["split", "slices", "shape_bounds", "gather_bounds"])
def test_disjoint_pieces_become_prunable_weights_and_the_model_is_unchanged(pieces: str) -> None:
    model = split_model(pieces)
    exposed, _ = expose_weights(model)
    found = {t.name: t.shape for t in find_prunable(exposed)}
    assert sorted(found.values()) == [(D, D), (D, 2 * D)]  # the transposed pieces, as the MatMuls read them
    assert sum(int(np.prod(s)) for s in found.values()) == 3 * D * D  # stored once: no value twice
    assert "W" not in {i.name for i in exposed.graph.initializer}
    np.testing.assert_allclose(_run(exposed, _feeds()), _run(model, _feeds()), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("pieces", ["overlap", "scaled", "batch_bounds"])  # batch: not fixed by the model
def test_overlapping_or_computed_pieces_are_left_alone_and_named(pieces: str) -> None:
    model = split_model(pieces)
    exposed, _ = expose_weights(model)
    assert find_prunable(exposed) == []
    assert [name for name, _, _ in unprunable_layer_weights(exposed, set())] == ["W"]


def test_compress_prunes_the_pieces_and_the_output_runs(tmp_path: Path) -> None:
    model = split_model("split")
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **_feeds(96))
    rep = compress(tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "d.npz", CompressConfig(sparsity=0.5))
    assert rep.p == 3 * D * D and rep.nnz == rep.k == round(0.5 * rep.p)
    out = onnx.load(tmp_path / "o.onnx")
    stored = [numpy_helper.to_array(i) for i in out.graph.initializer if i.data_type == TensorProto.FLOAT]
    assert sum(int(np.count_nonzero(a)) for a in stored if a.ndim == 2) == rep.nnz
    y = _run(out, _feeds())
    assert y.shape == (32, D) and np.all(np.isfinite(y))


def test_a_learned_query_on_the_activation_side_of_a_layer_is_not_called_a_dense_weight() -> None:
    """``queries.expand(N, -1, -1) @ W``: the broadcast queries depend only on a constant and the
    batch size, but they are the activation side of a layer whose weight ``W`` is prunable."""
    rng = np.random.default_rng(2)
    c = lambda name, v: helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(v, np.int64)))  # noqa: E731
    nodes = [
        helper.make_node("Shape", ["q"], ["qs"]),
        c("i0", [0]),
        c("i1", [1]),
        c("rest", [3, D]),
        helper.make_node("Slice", ["qs", "i0", "i1"], ["n"]),
        helper.make_node("Concat", ["n", "rest"], ["shape"], axis=0),
        helper.make_node("Expand", ["Q", "shape"], ["qe"]),
        helper.make_node("MatMul", ["qe", "W"], ["h"], name="proj"),
        helper.make_node("ReduceSum", ["h"], ["s"], axes=[1], keepdims=0),
        helper.make_node("Add", ["s", "q"], ["y"]),
    ]
    g = helper.make_graph(
        nodes,
        "queries",
        [helper.make_tensor_value_info("q", TensorProto.FLOAT, ["N", D])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", D])],
        [
            numpy_helper.from_array(rng.standard_normal((3, D)).astype(np.float32), "Q"),
            numpy_helper.from_array(rng.standard_normal((D, D)).astype(np.float32), "W"),
        ],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 12)], ir_version=8)
    exposed, _ = expose_weights(model)
    assert [t.name for t in find_prunable(exposed)] == ["W"]
    assert unprunable_layer_weights(exposed, {"W"}) == []
