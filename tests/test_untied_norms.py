"""Two LayerNorms reading one stored scale and bias (``gradients.prepare.untie_norm_params``).

torch's dynamo exporter stores equal tensors once, so every untrained LayerNorm of a model (ones
and zeros) ends up reading the same two initializers.  onnxruntime-training's LayerNorm gradient
names its scale and bias gradients after them whether they are wanted or not, and two such nodes
define one name twice: the builder refused the graph.  Each LayerNorm now reads its own copy.
"""

from __future__ import annotations

import numpy as np
import onnx
from test_gradients import Init, Reference, ce_loss, check_fd, mk, node, vi

from chita_onnx.gradients import per_sample_gradients
from chita_onnx.gradients.prepare import untie_norm_params

D, T, C = 6, 4, 3


def two_norms(tied: bool, seed: int = 0) -> onnx.ModelProto:
    """``x [N, T, D]`` → MatMul → LayerNorm → Tanh → MatMul → LayerNorm → mean over T → MatMul → logits.
    ``tied``: both LayerNorms read ``g``/``b``; else each its own tensors of the same values."""
    w = Init(seed)
    g, b = w("g", D, offset=1.0, scale=0.1), w("b", D, scale=0.1)
    if tied:
        g2, b2 = g, b
    else:
        vals = {t.name: onnx.numpy_helper.to_array(t) for t in w.items}
        g2, b2 = w.const("g2", vals["g"]), w.const("b2", vals["b"])
    nodes = [
        node("MatMul", ["x", w("W1", D, D)], ["h1"]),
        node("LayerNormalization", ["h1", g, b], ["n1"], axis=-1),
        node("Tanh", ["n1"], ["t1"]),
        node("MatMul", ["t1", w("W2", D, D)], ["h2"]),
        node("LayerNormalization", ["h2", g2, b2], ["n2"], axis=-1),
        node("ReduceMean", ["n2", w.const("ax", [1], np.int64)], ["pooled"], keepdims=0),
        node("MatMul", ["pooled", w("Wo", D, C)], ["logits"]),
    ]
    return mk(nodes, [vi("x", ["N", T, D])], [vi("logits", ["N", C])], w.items, opset=18)


def test_shared_layernorm_parameters_get_gradients_like_separate_ones() -> None:
    x = np.random.default_rng(1).standard_normal((7, T, D)).astype(np.float32)
    labels = np.random.default_rng(2).integers(0, C, 7).astype(np.int64)
    data = {"x": x, "labels": labels}
    tied = per_sample_gradients(two_norms(True), data, ["W1", "W2", "Wo"])
    apart = per_sample_gradients(two_norms(False), data, ["W1", "W2", "Wo"])
    np.testing.assert_allclose(tied.X, apart.X, rtol=1e-5, atol=1e-7)
    ref = Reference(two_norms(True), ["W1", "W2", "Wo"], "logits")
    check_fd(tied, ref, lambda i: {"x": x[i : i + 1]}, ce_loss(labels), rows=(0, 3, 6))


def test_untying_copies_only_what_a_layernorm_shares() -> None:
    model = two_norms(True)
    g = model.graph
    g.node.append(node("Mul", ["logits", "g"], ["unused"]))  # a third reader that keeps the original
    made = untie_norm_params(g, protect=["W1"])
    assert made == 4  # scale and bias of both LayerNorms
    names = {t.name for t in g.initializer}
    assert {"g", "g__untied", "g__untied1", "b__untied", "b__untied1"} <= names and "b" not in names
    norms = [n for n in g.node if n.op_type == "LayerNormalization"]
    assert [list(n.input[1:]) for n in norms] == [["g__untied", "b__untied"], ["g__untied1", "b__untied1"]]
    assert untie_norm_params(g) == 0  # nothing is shared any more
