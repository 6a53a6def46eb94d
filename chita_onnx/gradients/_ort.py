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
from onnx import helper

from .. import runtime
from ..errors import GradientError, ModelError
from ..validate import sort_graph

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
    shown, hidden = hide_control_flow(model, xset)
    try:
        with captured_fd2() as lines:
            builder = GradientGraphBuilder(shown.SerializeToString(), {loss}, xset, loss, ort.SessionOptions())
            builder.build()
            data = builder.get_model()
    except Exception as exc:
        log.debug("gradient builder output:\n%s", "\n".join(lines[-20:]))
        raise GradientError(f"onnxruntime-training could not build the gradient graph: {_first_line(exc)}") from None
    log.debug("gradient builder: %d log lines suppressed", len(lines))
    gm = restore_control_flow(onnx.load_from_string(data), hidden)
    return gm if finish is None else finish(gm)


Hidden = tuple[list[onnx.NodeProto], list[str], list[onnx.TensorProto]]


def hide_control_flow(model: onnx.ModelProto, xs: Iterable[str]) -> tuple[onnx.ModelProto, Hidden]:
    """``model`` without its Loop, Scan and If nodes that no tensor of ``xs`` reaches (their outputs
    become graph inputs), and what :func:`restore_control_flow` needs to put them back: the nodes,
    the graph outputs added so that the builder keeps computing what they read, and the initializers
    they read (the builder drops the ones nothing else reads).

    Such a node needs no gradient, but onnxruntime-training 1.19.2's builder aborts the whole process
    (a failed bounds assertion, no exception) when a Loop body reads a main-graph node's output from
    the outer scope, as torch's TorchScript export of ``nn.EmbeddingBag`` does.  A node whose outputs
    have no known type in ``model`` stays (its stand-in graph input needs one).
    """
    from .subgraphs import node_inputs, subgraphs

    g = model.graph
    if not any(subgraphs(n) for n in g.node):
        return model, ([], [], [])
    reached = set(xs)
    for n in g.node:  # topological order
        if any(i in reached for i in node_inputs(n)):
            reached.update(o for o in n.output if o)
    typed = {v.name: v for v in [*g.value_info, *g.output] if v.type.tensor_type.elem_type}
    hide = [
        k
        for k, n in enumerate(g.node)
        if subgraphs(n) and not any(o in reached for o in n.output) and all(o in typed for o in n.output if o)
    ]
    if not hide:
        return model, ([], [], [])
    shown = onnx.ModelProto()
    shown.CopyFrom(model)
    hidden = [g.node[k] for k in hide]
    for k in reversed(hide):
        del shown.graph.node[k]
    outs = {o for n in hidden for o in n.output if o}
    shown.graph.input.extend(typed[o] for n in hidden for o in n.output if o)
    kept_vi = [v for v in shown.graph.value_info if v.name not in outs]
    del shown.graph.value_info[:]
    shown.graph.value_info.extend(kept_vi)
    known = {i.name for i in g.input} | {t.name for t in g.initializer} | {o.name for o in g.output} | outs
    added = list(dict.fromkeys(r for n in hidden for r in node_inputs(n) if r not in known))
    shown.graph.output.extend(typed[r] if r in typed else helper.make_empty_tensor_value_info(r) for r in added)
    log.debug("gradient builder: %d control-flow node(s) off the differentiated path hidden", len(hidden))
    reads = {r for n in hidden for r in node_inputs(n)}
    inits = [t for t in g.initializer if t.name in reads]
    return shown, (hidden, added, inits)


def restore_control_flow(gm: onnx.ModelProto, hide: Hidden) -> onnx.ModelProto:
    """Put :func:`hide_control_flow`'s nodes back into the built gradient graph ``gm``: their outputs
    stop being graph inputs, the added graph outputs go, and the nodes are sorted topologically."""
    hidden, added, inits = hide
    if not hidden:
        return gm
    g = gm.graph
    have = {t.name for t in g.initializer} | {i.name for i in g.input}
    g.initializer.extend(t for t in inits if t.name not in have)
    outs = {o for n in hidden for o in n.output if o}
    for field, drop in ((g.input, outs), (g.output, set(added))):
        kept = [v for v in field if v.name not in drop]
        del field[:]
        field.extend(kept)
    nodes = [*hidden, *g.node]
    del g.node[:]
    g.node.extend(nodes)
    try:
        sort_graph(g, "the gradient graph")
    except ModelError:  # pragma: no cover - a cycle: the builder renamed what a hidden node reads
        raise GradientError(
            "the gradient graph cannot take back a control-flow node; please report this model"
        ) from None
    return gm


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
