"""Following a fixed batch through attention reshapes (``chita_onnx.batchtrace``).

The model is what torch's dynamo exporter writes for ``nn.MultiheadAttention`` from a static
example: a batch-first input transposed to sequence-first, ``view(-1, d)`` (the batch the *minor*
factor of ``T·b``), ``view(T, b·heads, d/heads)`` (the *major* factor of ``b·heads``), attention per
head, and back.  With a batch of one, every one of those reshapes could put the batch elsewhere;
the trace must pick the placement under which the copy, run on several samples at once, gives
each sample's own outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from test_gradients import Init, mk, node, vi

from chita_onnx import CompressConfig
from chita_onnx.activations import opened_alike, working_copy
from chita_onnx.batchtrace import trace_open
from chita_onnx.graph import model_inputs

T, D, H, C = 6, 8, 2, 3


def attention(b: int, seed: int = 0, *, mixes: bool = False) -> onnx.ModelProto:
    """``x [b, T, D]`` → one self-attention head block as a static export writes it → ``y [b, C]``."""
    w = Init(seed)
    hd = D // H

    def shape(name: str, *dims: int) -> str:
        return w.const(name, list(dims), np.int64)

    nodes = [
        node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]),  # [T, b, D]
        node("Reshape", ["xt", shape("s_flat", T * b, D)], ["xf"], allowzero=1),  # [T·b, D]: b minor
        node("Gemm", ["xf", w("Wq", D, D)], ["qf"]),
        node("Gemm", ["xf", w("Wv", D, D)], ["vf"]),
        node("Reshape", ["qf", shape("s_tbd", T, b, D)], ["q3"]),  # [T, b, D]
        node("Reshape", ["q3", shape("s_heads", T, b * H, hd)], ["qh"]),  # [T, b·H, hd]: b major
        node("Transpose", ["qh"], ["q"], perm=[1, 0, 2]),  # [b·H, T, hd]
        node("Reshape", ["vf", shape("s_tbd2", T, b, D)], ["v3"]),
        node("Reshape", ["v3", shape("s_heads2", T, b * H, hd)], ["vh"]),
        node("Transpose", ["vh"], ["v"], perm=[1, 0, 2]),
        node("Transpose", ["q"], ["kT"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kT"], ["s"]),  # [b·H, T, T]
        node("Softmax", ["s"], ["p"], axis=-1),
        node("MatMul", ["p", "v"], ["o"]),  # [b·H, T, hd]
        node("Reshape", ["o", shape("s_split", b, H, T, hd)], ["o4"]),  # b alone again
        node("Transpose", ["o4"], ["o5"], perm=[0, 2, 1, 3]),
        node("Reshape", ["o5", shape("s_out", b, T, D)], ["o6"]),
        node("ReduceMean", ["o6"], ["pooled"], axes=[1], keepdims=0),
    ]
    if mixes:  # subtract the batch mean: each sample's output depends on the others
        nodes += [
            node("ReduceMean", ["pooled"], ["mu"], axes=[0], keepdims=1),
            node("Sub", ["pooled", "mu"], ["centred"]),
        ]
    nodes.append(node("Gemm", ["centred" if mixes else "pooled", w("Wo", D, C)], ["y"]))
    return mk(nodes, [vi("x", [b, T, D])], [vi("y", [b, C])], w.items)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def reshape_targets(model: onnx.ModelProto) -> dict[str, list[int]]:
    """Each ``Reshape``'s stored target, by the name of its output."""
    inits = {t.name: onnx.numpy_helper.to_array(t).tolist() for t in model.graph.initializer}
    return {n.output[0]: inits[n.input[1]] for n in model.graph.node if n.op_type == "Reshape" and n.input[1] in inits}


def samples(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, T, D)).astype(np.float32)


@pytest.mark.parametrize("b", [1, 2])
def test_the_traced_copy_runs_any_batch_as_each_sample_alone(b: int) -> None:
    model = attention(b)
    opened = trace_open(working_copy(model), model_inputs(model))
    assert opened is not None
    x = samples(4 * b)
    alone = session(model)
    want = np.concatenate([alone.run(None, {"x": x[i : i + b]})[0] for i in range(0, 4 * b, b)])
    free = session(opened)
    for n in (1, 3, 4 * b):
        got = free.run(None, {"x": x[:n]})[0]
        assert got.shape == (n, C)
        np.testing.assert_allclose(got, want[:n], rtol=1e-5, atol=1e-6)
    # the traced targets: the batch minor in [T·b, D], major in [T, b·H, hd], alone in [b, H, T, hd]
    targets = reshape_targets(opened)
    assert targets["xf"] == [-1, D] and targets["qh"] == [T, -1, D // H] and targets["o4"] == [-1, H, T, D // H]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == b  # the original is untouched


def test_a_graph_that_mixes_its_batch_is_not_opened() -> None:
    model = attention(2, mixes=True)
    assert trace_open(working_copy(model), model_inputs(model)) is None  # a mean over the batch
    alone = [{"x": samples(1, seed=s)} for s in range(2)]
    together = {"x": np.concatenate([a["x"] for a in alone])}
    assert opened_alike(working_copy(model), model_inputs(model), alone, together) is None


def test_layerwise_and_gradients_run_the_traced_copy(tmp_path: Path) -> None:
    from chita_onnx.pipeline import prepare
    from chita_onnx.reconstruct import layer_data

    path = tmp_path / "attn_b1.onnx"
    onnx.save(attention(1, seed=3), path)
    calib = {"x": samples(10, seed=4)}
    cfg = CompressConfig(sparsity=0.5, batch_size=4)
    opened, batches, opts = layer_data(prepare(path, calib, cfg, hold_out=False), cfg)
    assert [b["x"].shape[0] for b in batches] == [4, 4, 2] and opts.sample_groups == (4, 4, 2)
    assert opened.graph.input[0].type.tensor_type.shape.dim[0].dim_param


@pytest.mark.parametrize("axes_folded", [True, False])
def test_a_slice_with_computed_bounds_is_followed(axes_folded: bool) -> None:
    # TorchScript without constant folding computes slice bounds from Shape (only the axes matter)
    # and writes the axes as Unsqueeze(Constant)
    w = Init(5)
    axes = [node("Unsqueeze", [w.const("one", 1, np.int64), w.const("a0", [0], np.int64)], ["ax1"])]
    nodes = [
        *([] if axes_folded else axes),
        node("Shape", ["x"], ["sh"], start=1, end=2),  # [T]
        node(
            "Slice",
            ["x", w.const("zero", [0], np.int64), "sh", w.const("ax1", [1], np.int64) if axes_folded else "ax1"],
            ["xs"],
        ),
        node("Reshape", ["xs", w.const("flat", [1, T * D], np.int64)], ["f"]),
        node("Gemm", ["f", w("Wg", T * D, C)], ["y"]),
    ]
    model = mk(nodes, [vi("x", [1, T, D])], [vi("y", [1, C])], w.items, opset=17)
    opened = trace_open(working_copy(model), model_inputs(model))
    assert opened is not None
    x = samples(3, seed=6)
    want = np.concatenate([session(model).run(None, {"x": x[i : i + 1]})[0] for i in range(3)])
    np.testing.assert_allclose(session(opened).run(None, {"x": x})[0], want, rtol=1e-5, atol=1e-6)


P = 4  # patches merged into the batch (MobileViT's pixels of a 2×2 patch, a Swin's windows)


def patch_attention(b: int, seed: int = 7) -> onnx.ModelProto:
    """``x [b, P·T, D]`` → the patches merged into the batch ``[b·P, T, D]`` (b major), then the
    sequence-first attention flattening ``[T, b·P, D]`` → ``[T·b·P, D]`` (b a *middle* factor), a
    projection, the way back, and a per-sample ``[b, C]`` head."""
    w = Init(seed)

    def shape(name: str, *dims: int) -> str:
        return w.const(name, list(dims), np.int64)

    nodes = [
        node("Reshape", ["x", shape("s_patches", b * P, T, D)], ["xp"]),  # [b·P, T, D]: b major
        node("Transpose", ["xp"], ["xt"], perm=[1, 0, 2]),  # [T, b·P, D]
        node("Reshape", ["xt", shape("s_rows", T * b * P, D)], ["xf"]),  # [T·b·P, D]: b in the middle
        node("Gemm", ["xf", w("Wp", D, D)], ["hf"]),
        node("Tanh", ["hf"], ["af"]),
        node("Reshape", ["af", shape("s_back", T, b * P, D)], ["a3"]),  # [T, b·P, D]
        node("Softmax", ["a3"], ["sm"], axis=0),  # over T: the samples stay apart
        node("Transpose", ["sm"], ["st"], perm=[1, 0, 2]),  # [b·P, T, D]
        node("Reshape", ["st", shape("s_out", b, P * T * D)], ["flat"]),  # b alone
        node("Gemm", ["flat", w("Wo", P * T * D, C)], ["y"]),
    ]
    return mk(nodes, [vi("x", [b, P * T, D])], [vi("y", [b, C])], w.items)


@pytest.mark.parametrize("b", [1, 2])
def test_a_batch_in_the_middle_of_a_merged_axis_is_followed(b: int) -> None:
    model = patch_attention(b)
    opened = trace_open(working_copy(model), model_inputs(model))
    assert opened is not None
    x = np.random.default_rng(8).standard_normal((4 * b, P * T, D)).astype(np.float32)
    want = np.concatenate([session(model).run(None, {"x": x[i : i + b]})[0] for i in range(0, 4 * b, b)])
    for n in (1, 3, 4 * b):
        np.testing.assert_allclose(session(opened).run(None, {"x": x[:n]})[0], want[:n], rtol=1e-5, atol=1e-6)
    targets = reshape_targets(opened)
    # [T·b·P, D] cannot say where b sits with one -1: T·b·P is the entry that grows with the batch
    assert targets["xf"] == [-1, D] and targets["a3"] == [T, -1, D] and targets["flat"] == [-1, P * T * D]
