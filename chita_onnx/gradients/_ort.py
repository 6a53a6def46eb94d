"""Thin wrappers around onnxruntime: the gradient-graph builder and inference sessions.

Only ``onnxruntime`` and ``onnxruntime.capi._pybind_state`` are imported; ``onnxruntime.training``
(which imports torch) is never touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from .. import runtime
from ..errors import GradientError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def captured_fd2() -> Iterator[list[str]]:
    """Redirect file descriptor 2 (C-level stderr) to a temporary file for the duration.

    onnxruntime-training's builder prints hundreds of INFO lines to fd 2 whatever the log level.
    The yielded list receives the captured lines after the block (for error messages).
    """
    lines: list[str] = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(tmp.read().decode("utf-8", "replace").splitlines())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:400]
    return type(exc).__name__


def build_gradient_model(model: onnx.ModelProto, xs: Iterable[str], loss: str) -> onnx.ModelProto:
    """The gradient graph of ``loss`` w.r.t. the tensors ``xs`` (outputs ``loss``, ``<x>_grad``).

    Raises :class:`GradientError` with a one-line message when the builder fails.
    """
    from onnxruntime.capi._pybind_state import GradientGraphBuilder

    from .deferred import plan

    xset, finish = plan(model, xs)
    runtime.check_graph(model, "the loss graph handed to onnxruntime-training's gradient builder")
    try:
        with captured_fd2() as lines:
            builder = GradientGraphBuilder(model.SerializeToString(), {loss}, xset, loss, ort.SessionOptions())
            builder.build()
            data = builder.get_model()
    except Exception as exc:
        log.debug("gradient builder output:\n%s", "\n".join(lines[-20:]))
        raise GradientError(f"onnxruntime-training could not build the gradient graph: {_first_line(exc)}") from None
    log.debug("gradient builder: %d log lines suppressed", len(lines))
    gm = onnx.load_from_string(data)
    return gm if finish is None else finish(gm)


def make_session(model: onnx.ModelProto | bytes, threads: int = 1, *, check: bool = True) -> ort.InferenceSession:
    """A CPU inference session; ``threads`` intra-op threads, no spinning when more than one.  A graph
    we built is checked first (``check``); the gradient builder's own output is not (onnx does not
    know its training ops, and it comes from a checked graph)."""
    return runtime.session(
        model,
        what="the gradient graph",
        threads=max(1, int(threads)),
        check=check and isinstance(model, onnx.ModelProto),
        error=GradientError,
    )


class Runner:
    """A session with an IOBinding whose weight inputs stay bound between runs."""

    def __init__(
        self,
        model: onnx.ModelProto,
        weights: Mapping[str, NDArray[np.float32]],
        threads: int = 1,
        *,
        check: bool = True,
        what: str = "the gradient graph",
    ) -> None:
        self.what = what
        self.session = make_session(model, threads, check=check)
        self.io: Any = self.session.io_binding()
        self.input_names = {i.name for i in self.session.get_inputs()}
        self._weights: dict[str, NDArray[np.float32]] = {}
        self.bind_weights(weights)

    def bind_weights(self, weights: Mapping[str, NDArray[np.float32]]) -> None:
        for name, value in weights.items():
            if name in self.input_names:
                self._weights[name] = value  # keep the buffer alive while bound
                self.io.bind_cpu_input(name, value)

    def bind_input(self, name: str, value: NDArray[Any]) -> None:
        self.io.bind_cpu_input(name, value)

    def bind_output_at(self, name: str, shape: tuple[int, ...], address: int) -> None:
        self.io.bind_output(name, "cpu", 0, np.float32, list(shape), address)

    def bind_output_array(self, name: str, array: NDArray[Any]) -> None:
        """Bind output ``name`` to ``array``'s memory (C-contiguous, the output's dtype and shape)."""
        if not array.flags.c_contiguous:
            raise ValueError("output buffers must be C-contiguous")
        self.io.bind_output(name, "cpu", 0, array.dtype.type, list(array.shape), array.ctypes.data)

    def run(self) -> None:
        runtime.run_bound(self.session, self.io, what=self.what)
