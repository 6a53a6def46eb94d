"""A signal that lands just as an output's staging folder is created must not orphan the folder."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import pytest

from chita_onnx import paths
from chita_onnx.paths import STAGING_PREFIX, plan_outputs


def test_sigint_right_after_mkdtemp_leaves_no_staging_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp_then_interrupt(*args: object, **kwargs: object) -> str:
        made = real_mkdtemp(*args, **kwargs)  # type: ignore[call-overload]
        # Ctrl-C between the folder's creation and its record.  A process-directed signal may be
        # taken by another thread (onnxruntime's pool), and on a loaded machine its handler can run
        # well after kill() returns: wait until whatever handler is installed now has seen it, so
        # that it lands while the folder is still unrecorded, as the test means.
        seen = threading.Event()
        current = signal.getsignal(signal.SIGINT)

        def note(signum: int, frame: object) -> None:
            seen.set()
            signal.signal(signal.SIGINT, current)
            if callable(current):
                current(signum, frame)  # type: ignore[arg-type]

        signal.signal(signal.SIGINT, note)
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 10.0
        while not seen.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)  # the main thread runs pending handlers between these sleeps
        return str(made)

    monkeypatch.setattr(paths.tempfile, "mkdtemp", mkdtemp_then_interrupt)
    with pytest.raises(KeyboardInterrupt), plan_outputs([("--out", tmp_path / "g.npy")]) as plan:
        plan.staged("--out").write_text("partial")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]


def test_sigint_with_runtime_threads_alive_leaves_no_staging_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same once onnxruntime has started its thread pool: a process-directed signal can then be
    delivered to one of those threads, which a signal mask on the main thread does not cover."""
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
        test_sigint_right_after_mkdtemp_leaves_no_staging_folder(tmp_path, monkeypatch)
