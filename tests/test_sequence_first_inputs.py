"""Sequence-first inputs ``[T, N, F]``: the batch is axis 1, and nothing but the graph may say so.

torch's ``nn.LSTM``/``nn.GRU``/``nn.TransformerEncoder`` take time on axis 0 by default.  With both
axes dynamic, "the first unknown axis" is the time axis; fed that way a model runs without an error
and computes nonsense.  These tests pin the rules that find axis 1 (a dim name that says batch; the
input reaching a recurrent layer's ``X``; the one input axis named in the outputs) and check, against
float64 finite differences and against onnxruntime fed by hand, that the samples the tool sees are
the model's samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from test_gradients import Init, Reference, ce_loss, check_fd, mk, node, vi

from chita_onnx import CompressConfig, compress
from chita_onnx.batching import infer_batch_axes, is_batch_name
from chita_onnx.data import ArraySource
from chita_onnx.evaluate import make_session
from chita_onnx.gradients import per_sample_gradients
from chita_onnx.graph import model_inputs

T, F, H, C = 5, 3, 4, 3


@pytest.mark.parametrize(
    ("shapes", "hints", "want"),
    [
        ([("seq", "batch", F)], None, [1]),  # a name that says batch, in one input
        ([("T", "N", F)], None, [1]),
        ([("time", "batch_size", F), ("time", "batch_size")], None, [1, 1]),  # shared, but "time" is lower
        ([("s0", "s1", F)], [1], [1]),  # the graph's hint picks the name
        ([("s0", "s1", F), ("s0", "s1")], [1, None], [1, 1]),  # ... and every input that has it
        ([("", "", F)], [1], [1]),  # unnamed dims: the hint itself
        ([("s0", "s1", F)], None, [0]),  # nothing says: the first unknown axis, as before
        ([("batch", "seq"), ("batch", "seq")], None, [0, 0]),
        ([(1, "s0", F)], [1], [1]),  # a hint wins over the fixed batch of one
        ([(T, 7, F)], [1], [0]),  # a fixed axis is never a hinted batch (a static model: axis 0)
    ],
)
def test_batch_axis_rules(
    shapes: list[tuple[Any, ...]], hints: list[int | None] | None, want: list[int | None]
) -> None:
    assert infer_batch_axes(shapes, hints) == want


@pytest.mark.parametrize("name", ["batch", "Batch_Size", "N", "b", "bs", "batch_0", "n_samples", "input_batch"])
def test_batch_names(name: str) -> None:
    assert is_batch_name(name)


@pytest.mark.parametrize("name", ["seq", "time", "T", "s0", "unk__12", "frames", "width", "", "sequence", "num"])
def test_not_batch_names(name: str) -> None:
    assert not is_batch_name(name)


# ----------------------------------------------------------------------------- graphs


def lstm_model(dims: tuple[Any, Any], *, front: str = "none", layout: int = 0, seed: int = 0) -> onnx.ModelProto:
    """``x`` (``dims + (F,)``) → [front] → LSTM (hidden H) → last hidden state → MatMul → logits ``[N, C]``.

    ``front``: ``"none"``; ``"transpose"`` (``x`` is batch-first ``[N, T, F]``, transposed for a
    ``layout=0`` LSTM); ``"scale"`` (``x · s + b`` with stored ``s, b [F]`` first).
    """
    w = Init(seed)
    nodes = []
    src = "x"
    if front == "transpose":
        nodes.append(node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]))
        src = "xt"
    elif front == "scale":
        nodes += [node("Mul", ["x", w("s", F, offset=1.0, scale=0.1)], ["xs"]), node("Add", ["xs", w("b", F)], ["xb"])]
        src = "xb"
    nodes += [
        node("LSTM", [src, w("W", 1, 4 * H, F), w("R", 1, 4 * H, H)], ["y", "yh"], hidden_size=H, layout=layout),
        node("Squeeze", ["yh", w.const("ax", [1 if layout else 0], np.int64)], ["h"]),
        node("MatMul", ["h", w("Wo", H, C)], ["logits"]),
    ]
    batch = dims[0] if front == "transpose" or layout else dims[1]
    return mk(nodes, [vi("x", [*dims, F])], [vi("logits", [batch, C])], w.items)


@pytest.mark.parametrize(
    ("dims", "front", "layout", "want"),
    [
        (("", ""), "none", 0, 1),  # sequence-first into X: axis 1
        (("s0", "s1"), "scale", 0, 1),  # through a stored scale and shift
        (("", ""), "transpose", 0, 0),  # batch-first, transposed for the LSTM: axis 0
        (("", ""), "none", 1, 0),  # layout=1: X is batch-first
    ],
)
def test_recurrent_input_shows_the_batch_axis(dims: tuple[Any, Any], front: str, layout: int, want: int) -> None:
    assert [s.batch_axis for s in model_inputs(lstm_model(dims, front=front, layout=layout))] == [want]


def encoder_model(out_dims: list[Any], seed: int = 0) -> onnx.ModelProto:
    """``x [s0, s1, F]`` → MatMul → Tanh → output ``out_dims`` (no recurrent layer to say anything)."""
    w = Init(seed)
    nodes = [node("MatMul", ["x", w("W1", F, C)], ["z"]), node("Tanh", ["z"], ["zt"])]
    if len(out_dims) == 2:  # mean over time: [s1, C]
        nodes.append(node("ReduceMean", ["zt", w.const("a0", [0], np.int64)], ["y"], keepdims=0))
    else:
        nodes.append(node("Identity", ["zt"], ["y"]))
    return mk(nodes, [vi("x", ["s0", "s1", F])], [vi("y", out_dims)], w.items, opset=18)


def test_the_output_names_the_batch_axis() -> None:
    assert model_inputs(encoder_model(["s1", C]))[0].batch_axis == 1
    # a per-position output names both axes: nothing is decided, the first unknown axis
    assert model_inputs(encoder_model(["s0", "s1", C]))[0].batch_axis == 0


# ------------------------------------------------------------------ the samples the tool sees


def samples(n: int, seed: int) -> NDArray[np.float32]:
    """``n`` samples-first sequences ``(n, T, F)``."""
    return np.random.default_rng(seed).standard_normal((n, T, F)).astype(np.float32)


def test_gradients_of_a_sequence_first_lstm_match_finite_differences() -> None:
    model = lstm_model(("", ""), seed=3)
    x = samples(7, 4)
    labels = np.random.default_rng(5).integers(0, C, 7).astype(np.int64)
    gm = per_sample_gradients(model, ArraySource({"x": x}, labels, batch_size=3), ["W", "R", "Wo"])
    ref = Reference(model, ["W", "R", "Wo"], "logits")
    # one sample at a time, time-major as the model takes it
    check_fd(gm, ref, lambda i: {"x": np.moveaxis(x[i : i + 1], 0, 1)}, ce_loss(labels), rows=(0, 3, 6))


def test_compress_reads_samples_on_the_models_batch_axis(tmp_path: Path) -> None:
    model = lstm_model(("s0", "s1"), seed=8)
    onnx.save(model, tmp_path / "tm.onnx")
    sess = make_session(tmp_path / "tm.onnx")

    def labelled(n: int, seed: int) -> dict[str, NDArray[Any]]:
        x = samples(n, seed)
        (z,) = sess.run(None, {"x": np.ascontiguousarray(np.moveaxis(x, 0, 1))})
        return {"x": x, "labels": z.argmax(1)}  # the dense model's own decisions, fed by hand

    np.savez(tmp_path / "calib.npz", **labelled(48, 9))
    np.savez(tmp_path / "test.npz", **labelled(40, 10))
    report = compress(
        tmp_path / "tm.onnx", tmp_path / "out.onnx", tmp_path / "calib.npz", CompressConfig(sparsity=0.3),
        eval_data=tmp_path / "test.npz",
    )  # fmt: skip
    e = report.evaluation
    assert e is not None and e.samples == 40
    assert e.dense_accuracy == pytest.approx(1.0)  # every sample scored as the model computes it
    assert e.pruned_accuracy is not None and e.agreement is not None and e.agreement >= 0.5
    out = make_session(tmp_path / "out.onnx")
    y = out.run(None, {"x": np.ascontiguousarray(np.moveaxis(samples(4, 11), 0, 1))})[0]
    assert y.shape == (4, C)


def test_inspect_says_on_which_axis_the_samples_are_fed(tmp_path: Path) -> None:
    from chita_onnx_cli.main import cli
    from click.testing import CliRunner

    onnx.save(lstm_model(("time", "streams")), tmp_path / "tm.onnx")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "tm.onnx")])
    assert result.exit_code == 0
    assert "input 'x' [time, streams, 3]: arrays (samples, time, 3), fed on the model's axis 1" in result.output
