"""Channel pruning: one small seeded graph per dependency rule, and the masked-equivalence property.

Every graph is built with ``onnx.helper`` and run with onnxruntime.  For each, channels are removed at
random (seeded) and the sliced (smaller) model must compute exactly what the masked model computes —
the model with the same channels zeroed in the layers that read them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from chita_onnx.data import ArraySource
from chita_onnx.graph import model_inputs
from chita_onnx.structured.capture import probe_shapes, session
from chita_onnx.structured.groups import Analysis, analyse
from chita_onnx.structured.latency import count_params
from chita_onnx.structured.prune import ChannelOptions, prune_channels, round_count
from chita_onnx.structured.surgery import kept_classes, masked_model, sliced_model

RNG_SEED = 0


class G:
    """A tiny graph builder: named nodes, seeded initializers, one input, named outputs."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def w(self, name: str, *shape: int, scale: float = 0.5) -> str:
        self.inits.append(numpy_helper.from_array((scale * self.rng.standard_normal(shape)).astype(np.float32), name))
        return name

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op: str, inputs: Sequence[str], output: str | Sequence[str], **attrs: object) -> str:
        outs = [output] if isinstance(output, str) else list(output)
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=outs[0] + "_node", **attrs))
        return outs[0]

    def conv(self, x: str, name: str, cin: int, cout: int, k: int = 3, group: int = 1, bias: bool = True) -> str:
        ins = [x, self.w(f"{name}.w", cout, cin // group, k, k)]
        if bias:
            ins.append(self.w(f"{name}.b", cout, scale=0.1))
        return self.op("Conv", ins, name, pads=[k // 2] * 4, group=group)

    def bn(self, x: str, name: str, c: int) -> str:
        ins = [x, self.w(f"{name}.s", c, scale=0.2), self.w(f"{name}.b", c, scale=0.1)]
        ins.append(self.w(f"{name}.m", c, scale=0.1))
        ins.append(self.const(f"{name}.v", (0.5 + self.rng.random(c)).astype(np.float32)))
        return self.op("BatchNormalization", ins, name)

    def model(self, x_shape: Sequence[int | str], outputs: Sequence[str], opset: int = 17) -> onnx.ModelProto:
        graph = helper.make_graph(
            self.nodes,
            "test",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="chita-tests")
        model.ir_version = 10 if opset >= 9 else 7
        model = onnx.shape_inference.infer_shapes(model)  # fills in the output types
        onnx.checker.check_model(model)
        return model


def _data(model: onnx.ModelProto, n: int = 24, seed: int = 1) -> dict[str, np.ndarray]:
    specs = model_inputs(model)
    rng = np.random.default_rng(seed)
    out = {}
    for s in specs:
        shape = [n if not isinstance(d, int) or d <= 0 else d for d in s.shape]
        if isinstance(s.shape[0], int) and s.shape[0] > 0:
            shape[0] = s.shape[0]
        out[s.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def _analysis(model: onnx.ModelProto) -> Analysis:
    x = _data(model, 2)
    specs = model_inputs(model)
    from chita_onnx.data_types import Batch

    batches = [Batch({k: v[:1] for k, v in x.items()}, None), Batch(x, None)]
    if isinstance(specs[0].shape[0], int) and specs[0].shape[0] > 0:
        batches = batches[:1]
    return analyse(model, probe_shapes(model, batches, specs))


def _random_keep(a: Analysis, seed: int = 0, fraction: float = 0.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    kept = {}
    for g in a.groups:
        if g.prunable:
            k = max(1, round((1 - fraction) * g.size))
            if g.blocks > 1:
                k = max(g.blocks, k // g.blocks * g.blocks)
                per = k // g.blocks
                assert g.block_of is not None
                kept[g.id] = np.concatenate(
                    [rng.choice(np.flatnonzero(g.block_of == b), per, replace=False) for b in range(g.blocks)]
                )
                kept[g.id] = g.classes[np.sort(kept[g.id])]
            else:
                kept[g.id] = rng.choice(g.classes, k, replace=False)
    return kept_classes(a, kept)


def _run(model: onnx.ModelProto, x: dict[str, np.ndarray]) -> list[np.ndarray]:
    return session(model).run(None, x)


def assert_equivalent(model: onnx.ModelProto, seeds: Sequence[int] = (0, 1, 2)) -> Analysis:
    """Sliced == masked for several random channel choices; the sliced model is smaller and valid."""
    a = _analysis(model)
    x = _data(model)
    assert any(g.prunable for g in a.groups), "nothing prunable"
    for seed in seeds:
        keep = _random_keep(a, seed)
        masked, sliced = masked_model(a, keep), sliced_model(a, keep)
        onnx.checker.check_model(sliced, full_check=True)
        for ym, ys in zip(_run(masked, x), _run(sliced, x), strict=True):
            np.testing.assert_allclose(ys, ym, rtol=1e-4, atol=1e-4)
        assert count_params(sliced) < count_params(model)
        assert [i.name for i in sliced.graph.input] == [i.name for i in model.graph.input]
        assert [o.name for o in sliced.graph.output] == [o.name for o in model.graph.output]
    return a


def _group_with(a: Analysis, producer: str) -> int:
    """The group of the layer whose output is named ``producer``."""
    return next(g.id for g in a.groups if f"{producer}_node" in g.producers)


# --------------------------------------------------------------------------------- dependency rules


def test_residual_add_joins_the_convs_that_feed_it() -> None:
    g = G()
    c1 = g.op("Relu", [g.bn(g.conv("x", "c1", 3, 8), "bn1", 8)], "r1")
    c2 = g.op("Relu", [g.conv(c1, "c2", 8, 8)], "r2")
    c3 = g.conv(c2, "c3", 8, 8)
    s = g.op("Add", [c1, c3], "sum")
    g.op("Conv", [g.op("Relu", [s], "r3"), g.w("head.w", 4, 8, 1, 1)], "y")
    model = g.model(["N", 3, 6, 6], ["y"])
    a = assert_equivalent(model)
    assert _group_with(a, "c1") == _group_with(a, "c3") != _group_with(a, "c2")
    residual = a.groups[_group_with(a, "c1")]
    assert len(residual.consumers) == 2 and residual.prunable  # c2 and the head read the stream


def test_se_branch_mul_joins_the_excitation_conv() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 16)], "r1")
    pooled = g.op("GlobalAveragePool", [c1], "gap")
    squeeze = g.op("Relu", [g.conv(pooled, "se1", 16, 4, k=1)], "se_r")
    gate = g.op("HardSigmoid", [g.conv(squeeze, "se2", 4, 16, k=1)], "gate")
    scaled = g.op("Mul", [c1, gate], "scaled")
    g.conv(scaled, "y", 16, 5, k=1)
    a = assert_equivalent(g.model(["N", 3, 5, 5], ["y"]))
    assert _group_with(a, "c1") == _group_with(a, "se2")
    assert _group_with(a, "se1") != _group_with(a, "c1")


def test_concat_shifts_the_offsets_of_the_second_input() -> None:
    g = G()
    a1 = g.op("Relu", [g.conv("x", "a", 3, 8)], "ra")
    b1 = g.op("Relu", [g.conv("x", "b", 3, 12)], "rb")
    cat = g.op("Concat", [a1, "x", b1], "cat", axis=1)  # the graph input's 3 channels sit in between
    g.conv(cat, "y", 23, 4)
    a = assert_equivalent(g.model(["N", 3, 5, 5], ["y"]))
    cons = a.consumers[0]
    assert cons.units.size == 23
    ga, gb = a.groups[_group_with(a, "a")], a.groups[_group_with(a, "b")]  # conv outputs are named a, b
    assert set(a.unit_class[cons.units[:8]]) == set(ga.classes.tolist())
    assert set(a.unit_class[cons.units[11:]]) == set(gb.classes.tolist())
    assert (cons.units[8:11] == 0).all()  # pinned positions of the graph input


def test_depthwise_conv_follows_its_input_and_group_is_rewritten() -> None:
    g = G()
    c1 = g.op("Relu", [g.bn(g.conv("x", "c1", 3, 8), "bn1", 8)], "r1")
    dw = g.op("Relu", [g.bn(g.conv(c1, "dw", 8, 8, group=8), "bn2", 8)], "r2")
    g.conv(dw, "y", 8, 4, k=1)
    model = g.model(["N", 3, 6, 6], ["y"])
    a = assert_equivalent(model)
    assert len([gr for gr in a.groups if gr.prunable]) == 1  # the depthwise conv is no group of its own
    keep = _random_keep(a, 3)
    sliced = sliced_model(a, keep)
    dw_node = next(n for n in sliced.graph.node if n.name == "dw_node")
    group = next(at.i for at in dw_node.attribute if at.name == "group")
    assert group == int(keep[a.groups[0].classes].sum()) == 4


def test_depthwise_with_channel_multiplier_repeats_units() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 6)], "r1")
    dw = g.op("Relu", [g.conv(c1, "dw", 6, 12, group=6)], "r2")  # multiplier 2
    g.conv(dw, "y", 12, 4, k=1)
    a = assert_equivalent(g.model(["N", 3, 5, 5], ["y"]))
    assert a.consumers[-1].units.size == 12
    assert np.array_equal(a.consumers[-1].units[::2], a.consumers[-1].units[1::2])


def test_grouped_conv_keeps_equal_counts_per_block() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 8)], "r1")
    c2 = g.op("Relu", [g.conv(c1, "gc", 8, 8, group=2)], "r2")
    g.conv(c2, "y", 8, 4, k=1)
    a = assert_equivalent(g.model(["N", 3, 5, 5], ["y"]))
    grp = a.groups[_group_with(a, "c1")]
    assert grp.blocks == 2 and grp.block_of is not None
    assert np.bincount(grp.block_of).tolist() == [4, 4]


def test_flatten_into_gemm_carries_the_spatial_multiplicity() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 6)], "r1")
    pooled = g.op("MaxPool", [c1], "pool", kernel_shape=[2, 2], strides=[2, 2])
    flat = g.op("Flatten", [pooled], "flat")
    g.op("Gemm", [flat, g.w("fc.w", 5, 6 * 9), g.w("fc.b", 5)], "y", transB=1)
    a = assert_equivalent(g.model(["N", 3, 6, 6], ["y"]))
    cons = next(c for c in a.consumers if c.kind == "gemm")
    assert cons.units.size == 54
    assert (cons.units.reshape(6, 9) == cons.units.reshape(6, 9)[:, :1]).all()  # 9 positions per channel


def test_reshape_with_a_literal_target_is_rewritten() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 8)], "r1")
    flat = g.op("Reshape", [c1, g.const("shape", np.array([-1, 8 * 16], np.int64))], "flat")
    g.op("MatMul", [flat, g.w("fc.w", 8 * 16, 5)], "y")
    a = assert_equivalent(g.model(["N", 3, 4, 4], ["y"]))
    assert any(r.kind == "shape" for r in a.rewrites)


def test_reshape_with_a_computed_target_is_tentative_but_exact() -> None:
    """paddle2onnx-style: the flattened width is computed at run time from Shape(x)."""
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 8)], "r1")
    shp = g.op("Shape", [c1], "shp")
    n = g.op("Gather", [shp, g.const("i0", np.array([0], np.int64))], "n", axis=0)
    target = g.op("Concat", [n, g.const("minus1", np.array([-1], np.int64))], "target", axis=0)
    flat = g.op("Reshape", [c1, target], "flat")
    g.op("MatMul", [flat, g.w("fc.w", 8 * 16, 5)], "y")
    a = assert_equivalent(g.model(["N", 3, 4, 4], ["y"]))
    assert a.groups[_group_with(a, "c1")].prunable


def test_split_on_the_channel_axis_is_rewritten() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 12)], "r1")
    g.op("Split", [c1, g.const("sizes", np.array([4, 8], np.int64))], ["s0", "s1"], axis=1)
    y0 = g.conv("s0", "y0", 4, 3, k=1)
    y1 = g.conv("s1", "y1", 8, 3, k=1)
    g.op("Add", [y0, y1], "y")
    model = g.model(["N", 3, 5, 5], ["y"])
    a = assert_equivalent(model)
    assert any(r.kind == "split" for r in a.rewrites)


def test_slice_on_the_channel_axis_is_rewritten() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 12)], "r1")
    starts, ends = g.const("st", np.array([2], np.int64)), g.const("en", np.array([10], np.int64))
    part = g.op("Slice", [c1, starts, ends, g.const("ax", np.array([1], np.int64))], "part")
    g.conv(part, "y", 8, 3, k=1)
    a = assert_equivalent(g.model(["N", 3, 5, 5], ["y"]))
    assert any(r.kind == "slice" for r in a.rewrites)


def test_slice_with_step_on_channels_is_refused() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 12)], "r1")
    ins = [c1, g.const("st", np.array([0], np.int64)), g.const("en", np.array([12], np.int64))]
    ins += [g.const("ax", np.array([1], np.int64)), g.const("sp", np.array([2], np.int64))]
    part = g.op("Slice", ins, "part")
    g.conv(part, "y", 6, 3, k=1)
    a = _analysis(g.model(["N", 3, 5, 5], ["y"]))
    grp = a.groups[_group_with(a, "c1")]
    assert not grp.prunable and "step" in grp.reasons[0]


def test_nhwc_graph_with_transposes_and_channel_last_params() -> None:
    """tf2onnx-style: NHWC tensors, Transposes around each Conv, a per-channel Mul on the last axis."""
    g = G()
    t0 = g.op("Transpose", ["x"], "t0", perm=[0, 3, 1, 2])
    c1 = g.conv(t0, "c1", 3, 8)
    t1 = g.op("Transpose", [c1], "t1", perm=[0, 2, 3, 1])
    scaled = g.op("Mul", [t1, g.w("scale", 8)], "scaled")
    shifted = g.op("Relu", [g.op("Add", [scaled, g.w("shift", 8)], "shifted")], "act")
    t2 = g.op("Transpose", [shifted], "t2", perm=[0, 3, 1, 2])
    c2 = g.conv(t2, "c2", 8, 4, k=1)
    g.op("Transpose", [c2], "y", perm=[0, 2, 3, 1])
    a = assert_equivalent(g.model(["N", 5, 5, 3], ["y"]))
    params = [s for s in a.slices if s.kind == "param" and s.axis == 0]
    assert len(params) >= 3  # bias, scale and shift follow the channels


def test_graph_outputs_are_never_reshaped() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 8)], "features")
    g.conv(c1, "y", 8, 4, k=1)
    a = _analysis(g.model(["N", 3, 5, 5], ["features", "y"]))
    grp = a.groups[_group_with(a, "c1")]
    assert not grp.prunable and "graph output 'features'" in grp.reasons[0]
    assert not any(gr.prunable for gr in a.groups)


@pytest.mark.parametrize(
    ("op", "why"),
    [
        ("Softmax", "normalises over the channel axis"),
        ("ReduceMean", "reduces over the channel axis"),
        ("LRN", "not a channel-wise op"),
    ],
)
def test_channel_mixing_ops_keep_the_group_whole(op: str, why: str) -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 8)], "r1")
    attrs: dict[str, object] = {"axis": 1} if op == "Softmax" else {"axes": [1]} if op == "ReduceMean" else {"size": 3}
    mixed = g.op(op, [c1], "mixed", **attrs)
    g.op("Add", [g.conv(c1, "c2", 8, 4, k=1), g.conv(mixed, "c3", 8 if op != "ReduceMean" else 1, 4, k=1)], "y")
    a = _analysis(g.model(["N", 3, 5, 5], ["y"]))
    grp = a.groups[_group_with(a, "c1")]
    assert not grp.prunable and any(why in r for r in grp.reasons)


def test_transformer_mlp_hidden_dim_is_prunable_and_stream_is_not() -> None:
    """MatMul → Add bias → Gelu → MatMul (MLP block) after a LayerNorm over the model dimension."""
    g = G()
    ln = g.op("LayerNormalization", ["x", g.w("ln.s", 12), g.w("ln.b", 12)], "ln", axis=-1)
    h = g.op("MatMul", [ln, g.w("fc1.w", 12, 32)], "h")
    hb = g.op("Add", [h, g.w("fc1.b", 32)], "hb")
    act = g.op("Mul", [hb, g.op("Sigmoid", [hb], "sig")], "act")
    o = g.op("MatMul", [act, g.w("fc2.w", 32, 12)], "o")
    ob = g.op("Add", [o, g.w("fc2.b", 12)], "ob")
    res = g.op("Add", ["x", ob], "res")
    g.op("LayerNormalization", [res, g.w("ln2.s", 12), g.w("ln2.b", 12)], "y", axis=-1)
    a = assert_equivalent(g.model(["N", 7, 12], ["y"]))
    assert a.groups[_group_with(a, "h")].prunable
    assert not a.groups[_group_with(a, "o")].prunable  # joined with the graph input in the residual


def test_attention_scores_keep_q_and_k_whole() -> None:
    g = G()
    q = g.op("MatMul", ["x", g.w("q.w", 12, 12)], "q")
    k = g.op("MatMul", ["x", g.w("k.w", 12, 12)], "k")
    kt = g.op("Transpose", [k], "kt", perm=[0, 2, 1])
    scores = g.op("Softmax", [g.op("MatMul", [q, kt], "qk")], "scores", axis=-1)
    g.op("MatMul", [scores, "x"], "y")
    a = _analysis(g.model(["N", 7, 12], ["y"]))
    assert not a.groups[_group_with(a, "q")].prunable
    assert "multiplies two activations" in a.groups[_group_with(a, "q")].reasons[0]


def test_lstm_reads_channels_through_a_merging_reshape() -> None:
    """ddddocr-style: conv features (N=1, C, H, W) → Transpose → Reshape (W, N, C·H) → LSTM."""
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 1, 8)], "r1")
    t = g.op("Transpose", [c1], "t", perm=[3, 0, 1, 2])  # W, N, C, H
    seq = g.op("Reshape", [t, g.const("shape", np.array([0, 0, -1], np.int64))], "seq")
    hidden = 6
    ins = [seq, g.w("lstm.W", 1, 4 * hidden, 8 * 4), g.w("lstm.R", 1, 4 * hidden, hidden), g.w("lstm.B", 1, 8 * hidden)]
    g.op("LSTM", ins, ["y"], hidden_size=hidden)
    a = assert_equivalent(g.model([1, 1, 4, 5], ["y"]))
    cons = next(c for c in a.consumers if c.kind == "rnn")
    assert cons.units.size == 32


def test_constant_node_weights_behind_identity() -> None:
    """paddle2onnx-style weights: Constant nodes, read through Identity."""
    g = G()
    w1 = helper.make_node(
        "Constant",
        [],
        ["w1_const"],
        value=numpy_helper.from_array(g.rng.standard_normal((8, 3, 3, 3)).astype(np.float32)),
    )
    g.nodes.append(w1)
    g.op("Identity", ["w1_const"], "w1")
    c1 = g.op("Relu", [g.op("Conv", ["x", "w1"], "c1", pads=[1, 1, 1, 1])], "r1")
    g.conv(c1, "y", 8, 4, k=1)
    a = assert_equivalent(g.model(["N", 3, 5, 5], ["y"]))
    assert a.groups[_group_with(a, "c1")].prunable


def test_old_opset_split_and_slice_attributes() -> None:
    g = G()
    c1 = g.op("Relu", [g.conv("x", "c1", 3, 12)], "r1")
    g.op("Split", [c1], ["s0", "s1"], axis=1, split=[5, 7])
    part = g.op("Slice", ["s1"], "part", starts=[1], ends=[6], axes=[1])
    y0 = g.conv("s0", "y0", 5, 3, k=1)
    y1 = g.conv(part, "y1", 5, 3, k=1)
    g.op("Add", [y0, y1], "y")
    assert_equivalent(g.model(["N", 3, 5, 5], ["y"], opset=9))


# --------------------------------------------------------------------------------- pruning


def _tiny_cnn() -> onnx.ModelProto:
    g = G(3)
    c1 = g.op("Relu", [g.bn(g.conv("x", "c1", 3, 16), "bn1", 16)], "r1")
    dw = g.op("Relu", [g.bn(g.conv(c1, "dw", 16, 16, group=16), "bn2", 16)], "r2")
    c2 = g.op("Relu", [g.bn(g.conv(dw, "c2", 16, 32, k=1), "bn3", 32)], "r2b")
    c3 = g.op("Relu", [g.conv(c2, "c3", 32, 32)], "r3")
    s = g.op("Add", [c2, c3], "res")
    pooled = g.op("GlobalAveragePool", [s], "gap")
    flat = g.op("Flatten", [pooled], "flat")
    g.op("Gemm", [flat, g.w("fc.w", 6, 32), g.w("fc.b", 6)], "logits", transB=1)
    return g.model(["N", 3, 8, 8], ["logits"])


def test_masked_equivalence_before_refit_through_the_pruner() -> None:
    """Without re-fit (magnitude, no update) the pruned model is exactly the masked model."""
    model = _tiny_cnn()
    x = _data(model, 32)
    r = prune_channels(
        model, ArraySource(x), model_inputs(model), ChannelOptions(0.5, method="magnitude", update=False)
    )
    assert not r.weights
    original = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    masked = r.masked()
    zeroed = sum(int((numpy_helper.to_array(t) == 0).sum()) for t in masked.graph.initializer)
    assert zeroed > 0 and all(k in original for k in [t.name for t in model.graph.initializer])
    for ym, ys in zip(_run(masked, x), _run(r.sliced(), x), strict=True):
        np.testing.assert_allclose(ys, ym, rtol=1e-5, atol=1e-5)


def test_refit_reduces_the_error_and_stays_equivalent() -> None:
    model = _tiny_cnn()
    x = _data(model, 64)
    specs = model_inputs(model)
    dense_y = _run(model, x)[0]
    errs = {}
    for method, update in (("magnitude", False), ("magnitude", True), ("chita", True)):
        r = prune_channels(model, ArraySource(x), specs, ChannelOptions(0.5, method=method, update=update))
        sliced, masked = r.sliced(), r.masked()
        np.testing.assert_allclose(_run(sliced, x)[0], _run(masked, x)[0], rtol=1e-4, atol=1e-4)
        errs[(method, update)] = float(np.mean((_run(sliced, x)[0] - dense_y) ** 2))
    assert errs[("magnitude", True)] < errs[("magnitude", False)]
    assert errs[("chita", True)] < errs[("magnitude", False)]


def test_equivalence_check_accepts_rounding_noise_and_refuses_a_wrong_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    """The sliced model passes against the masked one on the masked model's own rounding noise
    (fused vs unfused kernels) even with no fixed tolerance; a rewrite off by 0.1% does not."""
    from chita_onnx.data_types import Batch
    from chita_onnx.structured import run

    model = _tiny_cnn()
    x = _data(model, 64)
    specs = model_inputs(model)
    r = prune_channels(model, ArraySource(x), specs, ChannelOptions(0.5, method="chita", update=True, multiple=4))
    masked, sliced = r.masked(), r.sliced()
    batch = Batch({k: v[:8] for k, v in x.items()}, None)
    floor = run.rounding_floor(masked, batch, specs)
    assert 0.0 < floor < 1e-5  # Conv+BatchNormalization fused or not: different float rounding
    monkeypatch.setattr(run, "EQUIVALENCE_RTOL", 0.0)
    diff = run.max_difference(masked, sliced, batch, specs)
    assert diff <= run.ROUNDING_FACTOR * floor and run.equivalent(masked, diff, batch, specs)
    wrong = onnx.ModelProto()
    wrong.CopyFrom(sliced)
    fc = next(t for t in wrong.graph.initializer if t.name.startswith("fc.w"))
    fc.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(fc) * np.float32(1.001), fc.name))
    bad = run.max_difference(masked, wrong, batch, specs)
    assert not run.equivalent(masked, bad, batch, specs)
    monkeypatch.undo()
    assert not run.equivalent(masked, bad, batch, specs) and bad > run.EQUIVALENCE_RTOL


def test_round_count_prefers_kernel_friendly_counts() -> None:
    assert round_count(12, 16, 16) == 16  # 12 is no friendly count; 8 and 16 are, ties go up
    assert round_count(10, 16, 16) == 8
    assert round_count(24, 32, 16) == 32
    assert round_count(20, 32, 16) == 16
    assert round_count(100, 128, 16) == 96
    assert round_count(5, 24, 8) == 4  # below one block: multiple/2 and multiple/4
    assert round_count(7, 12, 16) == 8
    assert round_count(50, 64, 16, blocks=3) == 48  # grouped conv: multiples of lcm(16, 3)


def test_flops_target_is_met_within_the_rounding() -> None:
    from chita_onnx.structured.prune import flops_after, node_macs, plan

    model = _tiny_cnn()
    a = _analysis(model)
    x = _data(model, 1)
    shapes = probe_shapes(model, [__import__("chita_onnx").Batch(x, None)], model_inputs(model))[0]
    macs = node_macs(model, shapes)
    for target in (0.3, 0.6):
        counts, _ = plan(a, ChannelOptions(target, sparsity_of="flops", multiple=4), shapes)
        achieved = 1 - flops_after(a, macs, counts) / sum(macs.values())
        assert achieved >= target - 0.1


def test_capture_from_given_activations_equals_a_full_pass() -> None:
    from chita_onnx.structured.capture import capture

    model = _tiny_cnn()
    x = _data(model, 20)
    src = ArraySource(x, batch_size=8)
    specs = model_inputs(model)
    full = list(capture(model, ["r1", "r3"], src, specs))
    given = {"r2b": [v["r2b"] for v in capture(model, ["r2b"], src, specs)]}
    cut = list(capture(model, ["r3"], src, specs, given=given))
    assert len(cut) == len(full) == 3
    for a, b in zip(full, cut, strict=True):
        np.testing.assert_array_equal(a["r3"], b["r3"])


def test_allocation_meets_the_budget_and_prefers_cheap_groups() -> None:
    from chita_onnx.structured.prune import FLOOR, allocate, friendly_counts

    model = _tiny_cnn()
    a = _analysis(model)
    groups = [g for g in a.groups if g.prunable]
    assert len(groups) >= 2
    cheap, dear = groups[0], groups[1]
    curves = {
        cheap.id: {k: 0.01 * (cheap.size - k) for k in friendly_counts(cheap.size, 4)},
        dear.id: {k: 1.0 * (dear.size - k) for k in friendly_counts(dear.size, 4)},
    }
    opts = ChannelOptions(0.5, multiple=4)
    counts = allocate(a, curves, 0.5, opts, {})
    assert (cheap.size, dear.size) == (16, 32)
    # the cheap group goes down to its floor (FLOOR * 8 = 4) first, the dear one pays the rest of the
    # budget of 24 kept channels
    assert FLOOR * 0.5 * cheap.size == 4
    assert (counts[cheap.id], counts[dear.id]) == (4, 20)
