"""The dense model's segments run ahead of the layer-wise pass on a worker thread
(:class:`chita_onnx.activations.AheadRunner`): the same values bit for bit, calls that were not
foreseen still served correctly, worker errors raised in the caller, and the whole pass unchanged."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper
from test_class_offsets import many_class_model
from test_layerwise_shared import _batches, _recurrence
from test_rnn_layerwise import rnn_model

import chita_onnx.activations as act
import chita_onnx.errors
from chita_onnx.activations import AheadRunner, SegmentRunner, calibration_batches, working_copy
from chita_onnx.data import open_source
from chita_onnx.errors import ModelError
from chita_onnx.graph import model_inputs
from chita_onnx.heads import softmax_head
from chita_onnx.sequential import LayerwiseOptions, layerwise_prune

REPO = Path(__file__).resolve().parents[1]
CNN, CALIB = REPO / "models/digits_cnn.onnx", REPO / "models/digits_calib.npz"


def _cnn() -> tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]:
    model = working_copy(onnx.load(CNN))
    specs = model_inputs(model)
    return model, calibration_batches(open_source(str(CALIB), specs), specs, 48, 16)


Calls = list[tuple[int, tuple[str, ...]]]


def _state(read: list[list[str]], runner: SegmentRunner | AheadRunner, calls: Calls) -> list:
    """The values of ``read[k]`` after each call ``k``."""
    out = []
    for (stop, extra), names in zip(calls, read, strict=True):
        runner.advance(stop, extra)
        out.append([[np.array(a) for a in runner.values(n)] for n in names])
    return out


def _calls(model: onnx.ModelProto) -> tuple[list[tuple[int, tuple[str, ...]]], list[list[str]]]:
    """Advance calls through the model as the pass makes them (no-ops included), and what each reads."""
    nodes = list(model.graph.node)
    calls, read = [], []
    for pos in range(0, len(nodes), 2):
        out = nodes[pos].output[0]
        calls.append((pos + 1, (out,)))
        read.append([out])
        calls.append((pos + 1, (out,)))  # a repeated call is a no-op, as in the synchronous runner
        read.append([out])
    calls.append((len(nodes), ()))
    read.append([o.name for o in model.graph.output])
    return calls, read


def test_ahead_runner_gives_the_synchronous_runners_values_bit_for_bit() -> None:
    model, batches = _cnn()
    calls, read = _calls(model)
    want = _state(read, SegmentRunner(model, batches), calls)
    ahead = AheadRunner(SegmentRunner(model, batches))
    for c in calls:  # everything queued at once: the worker runs as far ahead as it likes
        ahead.submit(*c)
    got = _state(read, ahead, calls)
    ahead.close()
    assert ahead.mismatches == 0
    for g, w in zip(got, want, strict=True):
        for ga, wa in zip(g, w, strict=True):
            for x, y in zip(ga, wa, strict=True):
                np.testing.assert_array_equal(x, y)


def test_calls_that_were_not_queued_rewind_and_give_the_same_values() -> None:
    model, batches = _cnn()
    calls, read = _calls(model)
    want = _state(read, SegmentRunner(model, batches), calls)
    ahead = AheadRunner(SegmentRunner(model, batches))
    wrong = [(stop + 1, ()) for stop, _ in calls[::2]]  # one node too far, and without the kept outputs
    for c in wrong:
        ahead.submit(*c)
    got = _state(read, ahead, calls)
    assert ahead.mismatches >= 1
    ahead.close()
    for g, w in zip(got, want, strict=True):
        for ga, wa in zip(g, w, strict=True):
            for x, y in zip(ga, wa, strict=True):
                np.testing.assert_array_equal(x, y)


def test_a_failing_segment_raises_in_the_caller_and_close_returns() -> None:
    """A segment that onnxruntime cannot run fails on the worker; the caller's ``advance`` raises the
    same one-line error as the synchronous runner, and ``close`` does not hang."""
    shape = numpy_helper.from_array(np.array([7], np.int64), "shape")
    model = make_model(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Reshape", ["r", "shape"], ["y"])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M"])],
        [shape],
    )
    batches = [{"x": np.ones((2, 3), np.float32)}]
    sync_runner = SegmentRunner(model, batches)
    sync_runner.advance(1, ["r"])
    with pytest.raises(ModelError) as sync:
        sync_runner.advance(2)
    ahead = AheadRunner(SegmentRunner(model, batches))
    ahead.submit(1, ("r",))
    ahead.submit(2)
    ahead.advance(1, ["r"])
    np.testing.assert_array_equal(ahead.values("r")[0], np.ones((2, 3), np.float32))
    with pytest.raises(ModelError) as got:
        ahead.advance(2)
    assert str(got.value) == str(sync.value)
    ahead.close()


def _gemm_with_opaque_offset(rng: np.random.Generator) -> onnx.ModelProto:
    """``h = x·W0``; ``y = Gemm(h, W1, C=h)``: a bias that is a runtime tensor (an opaque offset)."""
    W0 = numpy_helper.from_array(rng.standard_normal((6, 8)).astype(np.float32), "W0")
    W1 = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "W1")
    W2 = numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W2")
    nodes = [
        helper.make_node("MatMul", ["x", "W0"], ["h"]),
        helper.make_node("Gemm", ["h", "W1", "h"], ["g"]),
        helper.make_node("Tanh", ["g"], ["t"]),
        helper.make_node("MatMul", ["t", "W2"], ["y"]),
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [W0, W1, W2],
    )


def _cases() -> dict[str, tuple[onnx.ModelProto, list[dict[str, np.ndarray]], dict[str, int], tuple]]:
    rng = np.random.default_rng(4)
    cnn, cnn_batches = _cnn()
    cnn_keep = {t.name: t.dims[0] * int(np.prod(t.dims[1:])) // 2 for t in cnn.graph.initializer if len(t.dims) >= 2}
    rec = _recurrence(rng)
    D, H, F, T = 2, 3, 4, 5
    W, R = rng.standard_normal((D, 4 * H, F)), 0.5 * rng.standard_normal((D, 4 * H, H))
    lstm = working_copy(rnn_model("LSTM", W, R, np.zeros((D, 8 * H)), T=T, head=2))
    lstm_batches = [{"x": rng.standard_normal((20, T, F)).astype(np.float32)} for _ in range(2)]
    lstm_keep = {"W": 40, "R": 30, "Wout": 8}
    many = many_class_model()
    head = softmax_head(many)
    assert head is not None
    x = rng.standard_normal((100, 16)).astype(np.float32)
    opaque = _gemm_with_opaque_offset(rng)
    opaque_batches = [{"x": rng.standard_normal((30, 6)).astype(np.float32)}]
    return {
        "cnn": (cnn, cnn_batches, cnn_keep, ((), ())),
        "shared weights (unrolled RNN)": (rec, _batches(rng), {"Wx": 8, "Wh": 13, "Wo": 5}, ((), ())),
        "LSTM node": (lstm, lstm_batches, lstm_keep, ((), ())),
        "softmax tail": (many, [{"x": x[:60]}, {"x": x[60:]}], {"W1": 100, "W2": 700}, ((head.probs,), (head.logits,))),
        "opaque offset": (opaque, opaque_batches, {"W0": 20, "W1": 30, "W2": 16}, ((), ())),
    }


CASES = _cases()


@pytest.mark.parametrize("case", list(CASES))
def test_the_pass_gives_the_same_weights_with_the_dense_model_ahead(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every site kind the pass visits (convolutions with prefetched runs, a weight shared by the
    steps of an unrolled recurrence, a recurrent node, a bias that is a runtime tensor, the head's
    tail): identical weights and tails, and every dense call foreseen."""
    model, batches, keep, tail = CASES[case]
    runners: list[AheadRunner] = []
    real = act.AheadRunner.__init__

    def tracked(self: AheadRunner, runner: SegmentRunner) -> None:
        real(self, runner)
        runners.append(self)

    monkeypatch.setattr(act.AheadRunner, "__init__", tracked)
    sync = layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(ahead=False), tail=tail)
    assert not runners
    got = layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(ahead=True), tail=tail)
    assert len(runners) == 1 and runners[0].mismatches == 0
    assert [r.name for r in got.layers] == [r.name for r in sync.layers] and set(got.weights) == set(keep)
    for name in keep:
        np.testing.assert_array_equal(got.weights[name], sync.weights[name])
    if tail[0]:
        assert got.tail is not None and sync.tail is not None
        for side in (0, 1):
            for n in got.tail[side]:
                for a, b in zip(got.tail[side][n], sync.tail[side][n], strict=True):
                    np.testing.assert_array_equal(a, b)


def test_the_pass_is_the_same_when_the_dense_runner_spills_to_disk(tmp_path: Path) -> None:
    """Under a memory cap that moves every kept activation to disk the runner stops running ahead
    (one event at a time); the weights are still those of the synchronous pass."""
    model, batches, keep, tail = CASES["cnn"]
    opts = LayerwiseOptions(max_bytes=0, spill_dir=str(tmp_path))
    sync = layerwise_prune(model, batches, keep=keep, opts=opts, tail=tail)
    got = layerwise_prune(model, batches, keep=keep, opts=dataclasses.replace(opts, ahead=True), tail=tail)
    for name in keep:
        np.testing.assert_array_equal(got.weights[name], sync.weights[name])
    assert not any(tmp_path.rglob("*.npy"))  # the spilled files are gone with the runners


def test_an_abandoned_runner_stops_its_running_segment() -> None:
    """The pass failed or was interrupted while the worker runs a long segment (here an endless
    ``Loop``): ``close(abandon=True)`` terminates that run and drops the queue instead of waiting,
    and later runs on other threads are not affected."""
    import threading
    import time

    from test_runtime import _endless_loop

    from chita_onnx import runtime

    model = _endless_loop()
    batches = [{"x": np.zeros(64, np.float32)} for _ in range(3)]
    ahead = AheadRunner(SegmentRunner(model, batches))
    ahead.submit(1)
    ahead.submit(1)  # a no-op: the queue already reaches node 1
    time.sleep(0.5)  # the worker is inside onnxruntime's Loop
    done = threading.Event()
    closer = threading.Thread(target=lambda: (ahead.close(abandon=True), done.set()), daemon=True)
    t0 = time.monotonic()
    closer.start()
    assert done.wait(30), "close(abandon=True) waited for the endless segment"
    assert time.monotonic() - t0 < 30
    assert not runtime._WATCHDOG.stopped  # the worker's thread is no longer marked
    sess = runtime.session(model, what="the loop")  # a run elsewhere still runs (until its budget)
    with pytest.raises(chita_onnx.errors.ResourceError):
        runtime.run(sess, None, {"x": np.zeros(64, np.float32)}, what="the loop", budget=0.3)


def test_a_pass_that_fails_abandons_the_dense_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    """An error in the pass's own thread (here a solve) closes the dense runner with ``abandon``."""
    import chita_onnx.sequential as seq

    closed: list[bool] = []
    real = act.AheadRunner.close

    def spy(self: AheadRunner, abandon: bool = False) -> None:
        closed.append(abandon)
        real(self, abandon)

    def broken(*args: object, **kwargs: object) -> object:
        raise ModelError("a solve failed")

    monkeypatch.setattr(act.AheadRunner, "close", spy)
    monkeypatch.setattr(seq, "prune_layer", broken)
    model, batches, keep, tail = CASES["cnn"]
    with pytest.raises(ModelError, match="a solve failed"):
        layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(ahead=True), tail=tail)
    assert closed == [True]


def test_the_pass_reports_the_diagnostic_errors_only_when_asked(caplog: pytest.LogCaptureFixture) -> None:
    """The pass skips each layer's two reported-only errors by default (NaN), computes them with
    ``diagnostics=True`` or when debug logging is on, and writes the same weights either way."""
    model, batches = _cnn()
    keep = {i.name: int(np.prod(i.dims)) // 3 for i in model.graph.initializer if len(i.dims) >= 2}
    names = list(keep)
    off = layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions())
    on = layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(diagnostics=True))
    with caplog.at_level("DEBUG", logger="chita_onnx.sequential"):
        logged = layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions())
    for n in names:
        np.testing.assert_array_equal(off.weights[n], on.weights[n])
        np.testing.assert_array_equal(off.weights[n], logged.weights[n])
    assert all(np.isnan(r.masked_error) and np.isnan(r.dense_error) for r in off.layers)
    for rep in (on, logged):
        assert all(np.isfinite(r.masked_error) and r.error <= r.masked_error for r in rep.layers)
    assert [r.error for r in off.layers] == [r.error for r in on.layers]
