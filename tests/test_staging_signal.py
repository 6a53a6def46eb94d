"""A signal that lands just as an output's staging folder is created must not orphan the folder."""

from __future__ import annotations

import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from chita_onnx import paths
from chita_onnx.paths import STAGING_PREFIX, plan_outputs


def _interrupt_between_mkdtemp_and_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, elsewhere: bool) -> None:
    """Ctrl-C between the staging folder's creation and its record: raised in the main thread, or
    (``elsewhere``) taken by another thread, as a process-directed signal can be when onnxruntime's
    or BLAS's threads run; the Python handler then runs in the main thread a moment later, so the
    test waits until the installed handler has seen it (the folder still unrecorded)."""
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp_then_interrupt(*args: object, **kwargs: object) -> str:
        made = real_mkdtemp(*args, **kwargs)  # type: ignore[call-overload]
        seen = threading.Event()
        current = signal.getsignal(signal.SIGINT)

        def note(signum: int, frame: object) -> None:
            seen.set()
            signal.signal(signal.SIGINT, current)
            if callable(current):
                current(signum, frame)  # type: ignore[arg-type]

        signal.signal(signal.SIGINT, note)
        if elsewhere:  # the C-level handler runs in that thread, the Python one in the main thread
            other = threading.Thread(target=lambda: signal.pthread_kill(threading.get_ident(), signal.SIGINT))
            other.start()
            other.join()
        else:
            signal.raise_signal(signal.SIGINT)
        deadline = time.monotonic() + 10.0
        while not seen.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # the main thread runs pending handlers between these sleeps
        assert seen.is_set()
        return str(made)

    monkeypatch.setattr(paths.tempfile, "mkdtemp", mkdtemp_then_interrupt)
    # A process started in the background by a non-interactive shell begins with SIGINT ignored, and
    # Python then leaves it so (no KeyboardInterrupt at all): give the test Python's own handler.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        _expect_interrupt(tmp_path)
    finally:
        signal.signal(signal.SIGINT, previous)


def _expect_interrupt(tmp_path: Path) -> None:
    with pytest.raises(KeyboardInterrupt), plan_outputs([("--out", tmp_path / "g.npy")]) as plan:
        plan.staged("--out").write_text("partial")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]


@pytest.mark.parametrize("elsewhere", [False, True], ids=["main-thread", "other-thread"])
def test_sigint_right_after_mkdtemp_leaves_no_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, elsewhere: bool
) -> None:
    _interrupt_between_mkdtemp_and_record(tmp_path, monkeypatch, elsewhere)


def test_sigint_with_runtime_threads_alive_leaves_no_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same once onnxruntime has started its thread pool (a process-directed signal can then be
    delivered to one of those threads, which a signal mask on the main thread does not cover)."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])
    g = helper.make_graph([helper.make_node("MatMul", ["x", "x"], ["y"])], "g", [x], [y])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 4
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sess.run(None, {"x": np.ones((64, 64), np.float32)})
    for _ in range(5):
        for p in tmp_path.iterdir():
            p.rmdir() if p.is_dir() else p.unlink()
        _interrupt_between_mkdtemp_and_record(tmp_path, monkeypatch, elsewhere=True)
