"""The gradient engine builds its head's working copy once.

Deciding how to read an output with no softmax (logits with labels, a Gauss-Newton output without)
runs a probe forward of that output; the one-sample path then needs the same graph read as the
decided kind.  :func:`~chita_onnx.gradients.prepare.with_head` turns the probe into that forward
instead of building it again (shape folding, exact rewrites and the self-check: 1.5 s of
ddddocr-common's 4.2 s engine build).  Checked here: the reused forward is exactly what a fresh build
gives, the cases where the head could differ are rebuilt, and the engine's gradient rows are bit for
bit those of an engine that rebuilds.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import tiny_mlp
from test_gradients import vi
from test_heads_and_inputs import sequence_first

from chita_onnx.data import ArraySource
from chita_onnx.data_types import Batch
from chita_onnx.gradients import GradientEngine, per_sample_gradients
from chita_onnx.gradients import engine as engine_module
from chita_onnx.gradients.prepare import Forward, build_forward, normalize, with_head


def time_major(seed: int = 0) -> onnx.ModelProto:
    """``x [N, 6]`` → raw scores ``[3, N, 4]`` (sequence first, no softmax): a CTC-style output that
    the working copy transposes batch-first (``sequence_first`` without its Softmax)."""
    m = sequence_first(seed)
    g = m.graph
    softmax = next(n for n in g.node if n.op_type == "Softmax")
    g.node.remove(softmax)
    del g.output[:]
    g.output.append(vi("zt", [3, "N", 4]))
    return m


def _build(model: onnx.ModelProto, kind: str, tensor: str, axis: int | None, x: np.ndarray) -> Forward:
    weights = [t.name for t in model.graph.initializer if t.name.startswith("W")]
    return build_forward(
        normalize(model),
        kind,  # type: ignore[arg-type]
        tensor,
        axis,
        batch=1,
        sample_shapes={"x": tuple(x.shape[1:])},
        batch_axes={"x": 0},
        weights=weights,
        updatable=weights,
        feeds={"x": x[:1]},
    )


def _same(a: Forward, b: Forward) -> None:
    assert a.model.SerializeToString() == b.model.SerializeToString()
    assert a.model is not b.model
    assert (a.head, a.batch, a.data_inputs, a.weight_inputs, a.on_path, a.segments, a.rewrites) == (
        b.head,
        b.batch,
        b.data_inputs,
        b.weight_inputs,
        b.on_path,
        b.segments,
        b.rewrites,
    )


@pytest.mark.parametrize(("kind", "axis"), [("logits", None), ("logits", 1), ("logits", -1), ("probabilities", None)])
def test_a_probe_read_as_a_classifier_is_the_classifier_forward(kind: str, axis: int | None) -> None:
    model = tiny_mlp(seed=3)
    x = np.random.default_rng(4).standard_normal((3, 12)).astype(np.float32)
    probe = _build(model, "regression", "logits", None, x)
    again = with_head(probe, kind, "logits", axis)  # type: ignore[arg-type]
    assert again is not None
    _same(again, _build(model, kind, "logits", axis, x))
    assert again.head.class_axis == 1 and probe.head.class_axis is None
    assert again.model is not probe.model


def test_a_transposed_head_is_reused_only_without_a_class_axis() -> None:
    model = time_major(seed=5)
    x = np.random.default_rng(6).standard_normal((3, 6)).astype(np.float32)
    probe = _build(model, "regression", "zt", None, x)
    assert probe.head.tensor != "zt"  # the working copy made it batch-first
    for kind in ("regression", "binary"):
        again = with_head(probe, kind, "zt", None)  # type: ignore[arg-type]
        assert again is not None
        _same(again, _build(model, kind, "zt", None, x))
    # a class axis would have to follow the transpose: built again instead
    assert with_head(probe, "logits", "zt", 2) is None


def test_a_class_kind_without_a_class_axis_is_refused_as_the_build_refuses_it() -> None:
    from chita_onnx.errors import ModelError

    model = tiny_mlp(seed=3, classes=1)
    x = np.random.default_rng(4).standard_normal((3, 12)).astype(np.float32)
    probe = _build(model, "regression", "logits", None, x)
    with pytest.raises(ModelError, match="no class axis"):
        _build(model, "logits", "logits", 0, x)
    with pytest.raises(ModelError, match="no class axis"):
        with_head(probe, "logits", "logits", 0)


def _counting(monkeypatch: pytest.MonkeyPatch, reuse: bool) -> list[str]:
    """Record the engine's build_forward calls (and, with ``reuse=False``, never reuse a probe)."""
    calls: list[str] = []
    real = engine_module.build_forward

    def counted(*args: object, **kwargs: object) -> Forward:
        calls.append(f"{args[1]} {args[2]} batch {kwargs['batch']}")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(engine_module, "build_forward", counted)
    if not reuse:
        monkeypatch.setattr(engine_module, "with_head", lambda *a: None)
    return calls


@pytest.mark.parametrize(
    ("make", "labels", "kind"),
    [(lambda: tiny_mlp(seed=8), True, "logits"), (lambda: tiny_mlp(seed=8), False, "regression"),
     (lambda: time_major(seed=9), False, "regression")],
)  # fmt: skip
def test_the_engine_builds_its_head_once_with_the_same_rows(
    monkeypatch: pytest.MonkeyPatch, make: object, labels: bool, kind: str
) -> None:
    model = make()  # type: ignore[operator]
    d = 12 if model.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 12 else 6
    rng = np.random.default_rng(10)
    x = rng.standard_normal((6, d)).astype(np.float32)
    y = rng.integers(0, 5, 6) if labels else None
    rows = {}
    for reuse in (True, False):
        with monkeypatch.context() as mp:
            calls = _counting(mp, reuse)
            src = ArraySource({"x": x}, labels=y, batch_size=6)
            gm = per_sample_gradients(model, src, None, fisher="sampled", seed=3, method="single")
            assert gm.head == kind
            head_builds = [c for c in calls if c.endswith("batch 1")]
            assert len(head_builds) == (1 if reuse else 2), calls
            rows[reuse] = gm.X
    assert rows[True].shape == (6, sum(t.dims[0] * t.dims[1] for t in model.graph.initializer if t.name[0] == "W"))
    assert np.array_equal(rows[True], rows[False])  # bit for bit


def test_the_memo_is_dropped_once_the_engine_is_built() -> None:
    model = tiny_mlp(seed=8)
    x = np.random.default_rng(1).standard_normal((4, 12)).astype(np.float32)
    eng = GradientEngine(model, None, example=Batch({"x": x}, None))
    assert eng._forward_memo is None and not eng._remember_forward
