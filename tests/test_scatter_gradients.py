"""ScatterND and ScatterElements on the gradient path (YOLOv5's in-place box decoding writes
``y[..., 0:2] = ...`` as a ScatterND): onnxruntime's own gradient without ``reduction``, an exact
rewrite for ``reduction="add"`` (the gradient builder ignores the reduction and would zero the data's
gradient where the updates land), and a one-line refusal for the others.  Checked against float32
finite differences of onnxruntime's own kernels."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import pytest
from rewrite_kit import Init, engine_grads, model_of, node, ort_fd_check, vi

from chita_onnx.errors import UnsupportedOpError


def _model(op: str, reduction: str, duplicate: bool = False) -> onnx.ModelProto:
    """x[1,5] → MatMul W1 → z[1,6]; the updates ``sigmoid(2·z[:, 0:2])`` scattered into z → Gemm W2."""
    w = Init(17)
    red: dict[str, Any] = {} if reduction == "none" else {"reduction": reduction}
    nodes = [
        node("MatMul", ["x", w("W1", 5, 6)], ["z"]),
        node("Slice", ["z", w.const("s0", [0], np.int64), w.const("s1", [2], np.int64), w.const("ax", [1], np.int64)],
             ["zs"]),
        node("Mul", ["zs", w.const("two", 2.0)], ["zs2"]),
        node("Sigmoid", ["zs2"], ["upd"]),
    ]  # fmt: skip
    if op == "ScatterND":
        idx = [[[0, 4], [0, 4]]] if duplicate else [[[0, 0], [0, 3]]]
        nodes += [
            node("Reshape", ["upd", w.const("us", [1, 2], np.int64)], ["upd2"]),
            node("ScatterND", ["z", w.const("idx", idx, np.int64), "upd2"], ["y"], **red),
        ]
    else:
        idx = [[5, 5]] if duplicate else [[1, 3]]
        nodes.append(node("ScatterElements", ["z", w.const("idx", idx, np.int64), "upd"], ["y"], axis=1, **red))
    nodes.append(node("Gemm", ["y", w("W2", 3, 6)], ["logits"], transB=1))
    return model_of(nodes, [vi("x", [1, 5])], [vi("logits", [1, 3])], w.items, 18)


@pytest.mark.parametrize("op", ["ScatterND", "ScatterElements"])
@pytest.mark.parametrize(("reduction", "duplicate"), [("none", False), ("add", False), ("add", True)])
def test_scatter_gradients_match_finite_differences(op: str, reduction: str, duplicate: bool) -> None:
    model = _model(op, reduction, duplicate)
    e, gm, feeds, labels = engine_grads(model, ["W1", "W2"], n=1)
    assert e.fwd.rewrites.get(op, 0) == (0 if reduction == "none" else 1), e.fwd.rewrites
    ort_fd_check(gm, model, feeds, labels, rows=(0,))


@pytest.mark.parametrize("op", ["ScatterND", "ScatterElements"])
@pytest.mark.parametrize("reduction", ["mul", "max"])
def test_scatter_with_another_reduction_is_refused_by_name(op: str, reduction: str) -> None:
    with pytest.raises(UnsupportedOpError, match=rf"{op}.*{op}_y.*reduction='{reduction}'"):
        engine_grads(_model(op, reduction), ["W1", "W2"], n=1)


@pytest.mark.parametrize(("reduction", "verdict"), [("none", "native"), ("add", "rewrite"), ("max", "refused")])
def test_inspect_check_predicts_what_the_engine_does_with_a_scatter(reduction: str, verdict: str) -> None:
    """``inspect --check`` without data: a plain scatter is native, an adding one is rewritten, and
    another reduction is refused by name, as the gradient engine then does."""
    from chita_onnx.support import check_model_support

    rep = check_model_support(_model("ScatterND", reduction))
    assert rep.ok == (verdict != "refused")
    assert (dict(rep.native).get("ScatterND", 0) == 1) == (verdict == "native"), rep.native
    assert (dict(rep.rewrites).get("ScatterND", 0) == 1) == (verdict == "rewrite"), rep.rewrites
    if verdict == "refused":
        assert "reduction='max'" in rep.refusals[0]
