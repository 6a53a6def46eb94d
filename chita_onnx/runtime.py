"""Every onnxruntime session and run of chita-onnx: checked graphs, interruptible and bounded runs.

onnxruntime 1.19.2 can crash the whole process (a segmentation fault) when it is handed some invalid
graphs, and a run stays inside C++ until it returns: a signal handler written in Python (Ctrl-C's
``KeyboardInterrupt``, the command line's SIGTERM handler) cannot run before that, so a model with a
long or endless ``Loop`` could not even be stopped.  Three rules, applied here to every session and
run the library makes:

* **No unchecked graph reaches onnxruntime.**  Models read from disk are checked on load
  (:func:`chita_onnx.validate.validate_graph`); every graph chita-onnx *builds* — the gradient
  working copy and its parts that shape folding runs, the single-node graphs that verify a rewrite,
  the basis graphs of the Resize rewrite, the loss graph handed to the gradient builder — goes
  through :func:`check_graph` (``onnx.checker`` and strict type and shape inference, on a copy
  without the weights' bytes) before :func:`session` creates a session for it.  A graph that fails is
  a :class:`~chita_onnx.errors.ModelError` naming what was being built and onnx's reason (with the
  node), never a crash.
* **Every run can be interrupted.**  While :func:`run` or :func:`run_bound` is inside onnxruntime,
  the interpreter's wakeup file descriptor is pointed at a pipe watched by a helper thread; SIGINT,
  SIGTERM, SIGHUP and SIGALRM set the run's ``RunOptions.terminate`` flag, onnxruntime returns within
  one node, and the Python handler (``KeyboardInterrupt``, the command line's exit on SIGTERM) runs.
* **Runs made for the analysis are bounded.**  A run given a ``budget`` (shape folding of constant
  tensors, rewrite checks: work that takes milliseconds in a real model) is terminated after that
  many seconds with a :class:`~chita_onnx.errors.ResourceError` naming what it computed.  Runs of the
  model itself on the user's data are not timed (they take as long as the model takes), but stay
  interruptible.

onnxruntime's own error log lines are silenced (its errors come back as exceptions, which are turned
into one-line :class:`~chita_onnx.errors.ChitaError` s naming what was run).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from .errors import ChitaError, GradientError, ModelError, ResourceError

log = logging.getLogger(__name__)

#: Seconds an analysis run may take (shape folding of constant tensors, rewrite checks) before it is
#: stopped: in real models these runs evaluate shape arithmetic and single nodes on small inputs.
ANALYSIS_SECONDS = 20.0
#: Signals that stop a run in progress (their Python handlers then run as usual).
INTERRUPTS = frozenset(
    int(s) for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", 0), getattr(signal, "SIGALRM", 0)) if s
)
#: onnxruntime's log severity for our sessions and runs: FATAL only (errors are raised, not printed).
_QUIET = 4


def _first_line(exc: BaseException) -> str:
    for line in str(exc).strip().splitlines():
        line = " ".join(line.split())
        if line:
            return line[:400]
    return type(exc).__name__


# --------------------------------------------------------------------------------- graph checks


def check_graph(model: onnx.ModelProto, what: str) -> None:
    """Refuse a graph that onnxruntime might crash on: strict type and shape inference, then
    ``onnx.checker``, on a copy in which large initializers are typed inputs (cheap for any size).

    ``what`` says what the graph is for (``"the gradient working copy"``, ``"a check of the rewrite of
    node 'up'"``); it starts the :class:`ModelError`'s message, followed by onnx's reason.
    """
    from .validate import light_copy, refuse_crashing_attributes

    refuse_crashing_attributes(model.graph, what)
    light = light_copy(model)
    try:
        inferred = onnx.shape_inference.infer_shapes(light, check_type=True, strict_mode=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError, RuntimeError) as exc:
        msg = _first_line(exc).replace("[ShapeInferenceError] Inference error(s): ", "")
        raise ModelError(f"{what}: the generated graph is inconsistent (onnx shape inference): {msg}") from None
    known = {v.name: v for v in [*inferred.graph.value_info, *inferred.graph.output]}
    outs: list[onnx.ValueInfoProto] = []
    for o in light.graph.output:
        tt = o.type.tensor_type if o.type.HasField("tensor_type") else None
        if tt is not None and tt.elem_type and tt.HasField("shape"):
            outs.append(o)
            continue
        v = known.get(o.name, o)
        vt = v.type.tensor_type if v.type.HasField("tensor_type") else None
        if vt is not None and vt.elem_type:
            t = onnx.ValueInfoProto()
            t.CopyFrom(v)
            if not vt.HasField("shape"):  # rank unknown to inference: the checker still wants a shape
                continue
            outs.append(t)
    del light.graph.output[:]
    light.graph.output.extend(outs)
    if not outs:
        return  # nothing the checker could check that inference did not
    try:
        onnx.checker.check_model(light)
    except (onnx.checker.ValidationError, ValueError) as exc:
        if "is deprecated in domain_version" in str(exc):
            return  # a deprecated op (GroupNormalization-18): onnxruntime still runs it; not a safety issue
        raise ModelError(f"{what}: the generated graph fails onnx.checker: {_first_line(exc)}") from None


# ------------------------------------------------------------------------------------- sessions


def session(
    model: onnx.ModelProto | bytes | str | os.PathLike[str],
    *,
    what: str,
    threads: int = 1,
    optimize: bool = True,
    check: bool = True,
    error: type[ChitaError] = ModelError,
) -> ort.InferenceSession:
    """A CPU inference session for ``model``.

    A :class:`onnx.ModelProto` that chita-onnx built is checked first (:func:`check_graph`; pass
    ``check=False`` only for a graph onnxruntime itself produced, or one loaded through
    :func:`~chita_onnx.graph.load_model`, which checked it).  ``threads`` intra-op threads (0: the
    onnxruntime default), without spinning when more than one; ``optimize=False`` disables graph
    optimizations.  Failures raise ``error`` with ``what`` and onnxruntime's first line.
    """
    if check and isinstance(model, onnx.ModelProto):
        check_graph(model, what)
    so = ort.SessionOptions()
    so.log_severity_level = _QUIET
    if threads:
        so.intra_op_num_threads = max(1, int(threads))
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads > 1:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data: bytes | str = (
        model.SerializeToString()
        if isinstance(model, onnx.ModelProto)
        else model
        if isinstance(model, bytes)
        else os.fspath(model)
    )
    try:
        return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise error(f"{what}: onnxruntime {ort.__version__} cannot load it: {_first_line(exc)}") from None


# ----------------------------------------------------------------------------------- the watchdog


@dataclass
class _Active:
    options: ort.RunOptions
    deadline: float | None
    timed_out: bool = False
    signalled: int = 0
    thread: int = field(default_factory=threading.get_ident)


class _Watchdog:
    """One helper thread per process: terminates active runs on a signal (through the interpreter's
    wakeup fd) or at their deadline."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active: dict[int, _Active] = {}
        self.stopped: set[int] = set()  # threads whose runs end as soon as they start (stop_runs)
        self.pid = -1
        self.r = self.w = -1

    def _start(self) -> None:
        if self.pid == os.getpid():
            return
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        self.pid = os.getpid()
        threading.Thread(target=self._loop, name="chita-onnx-ort-watchdog", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self.lock:
                deadlines = [a.deadline for a in self.active.values() if a.deadline is not None and not a.timed_out]
            timeout = None if not deadlines else max(0.0, min(deadlines) - time.monotonic())
            try:
                ready, _, _ = select.select([self.r], [], [], timeout)
            except (OSError, ValueError):  # pragma: no cover - the pipe went away
                return
            signals: list[int] = []
            if ready:
                with contextlib.suppress(BlockingIOError):
                    signals = [b for b in os.read(self.r, 512) if b]
            now = time.monotonic()
            with self.lock:
                for a in self.active.values():
                    hit = [s for s in signals if s in INTERRUPTS]
                    if hit:
                        a.signalled = hit[0]
                        a.options.terminate = True
                    elif a.deadline is not None and now >= a.deadline and not a.timed_out:
                        a.timed_out = True
                        a.options.terminate = True

    @contextlib.contextmanager
    def watch(self, options: ort.RunOptions, budget: float | None) -> Iterator[_Active]:
        with self.lock:
            self._start()
            entry = _Active(options, None if budget is None else time.monotonic() + budget)
            self.active[id(entry)] = entry
            if entry.thread in self.stopped:
                options.terminate = True
        old: int | None = None
        if threading.current_thread() is threading.main_thread():
            try:
                old = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
            except (ValueError, OSError):  # pragma: no cover - not allowed here
                old = None
            if old is not None and old not in (-1, self.w):  # someone else's: leave theirs in place
                signal.set_wakeup_fd(old)
                old = None
        if budget is not None:
            with contextlib.suppress(BlockingIOError):
                os.write(self.w, b"\0")  # wake the thread to see the new deadline
        try:
            yield entry
        finally:
            if old is not None:
                with contextlib.suppress(ValueError, OSError):
                    signal.set_wakeup_fd(old)
            with self.lock:
                self.active.pop(id(entry), None)

    def stop(self, thread: int, stopped: bool) -> None:
        with self.lock:
            if not stopped:
                self.stopped.discard(thread)
                return
            self.stopped.add(thread)
            for a in self.active.values():
                if a.thread == thread:
                    a.options.terminate = True


_WATCHDOG = _Watchdog()


def stop_runs(thread: int, stopped: bool = True) -> None:
    """Terminate the onnxruntime run that thread ``thread`` (a :func:`threading.get_ident`) is in,
    and every run it starts from now on, until called with ``stopped=False``.  For a worker thread
    whose work is abandoned (:meth:`chita_onnx.activations.AheadRunner.close`): its runs fail at
    once with a ``ModelError`` instead of running to their end."""
    _WATCHDOG.stop(thread, stopped)


def _poll_signals() -> None:
    """An empty Python call: pending signal handlers run at the next call boundary."""


def _options() -> ort.RunOptions:
    ro = ort.RunOptions()
    ro.log_severity_level = _QUIET
    return ro


def _failed(exc: Exception, entry: _Active, what: str, budget: float | None, error: type[ChitaError]) -> ChitaError:
    if entry.signalled:
        _poll_signals()  # the handler (KeyboardInterrupt, SystemExit on SIGTERM, ...) raises here
        return ChitaError(f"{what}: interrupted by signal {entry.signalled}")
    if entry.timed_out:
        return ResourceError(
            f"{what}: onnxruntime did not finish within {budget:g} s (a Loop or a large computation on "
            "constants?); refusing the model"
        )
    failed = error(f"{what}: onnxruntime failed: {_first_line(exc)}")
    failed.run_failed = True
    return failed


def run(
    sess: ort.InferenceSession,
    outputs: Sequence[str] | None,
    feeds: Mapping[str, Any],
    *,
    what: str,
    budget: float | None = None,
    error: type[ChitaError] = ModelError,
) -> list[NDArray[Any]]:
    """``sess.run(outputs, feeds)``, interruptible, stopped after ``budget`` seconds when given;
    failures raise ``error`` (a timeout :class:`ResourceError`) naming ``what``."""
    ro = _options()
    with _WATCHDOG.watch(ro, budget) as entry:
        try:
            values = sess.run(None if outputs is None else list(outputs), dict(feeds), ro)
        except Exception as exc:
            raise _failed(exc, entry, what, budget, error) from None
    return [np.asarray(v) for v in values]


def run_bound(sess: ort.InferenceSession, io: Any, *, what: str, error: type[ChitaError] = GradientError) -> None:
    """``sess.run_with_iobinding(io)``, interruptible; failures raise ``error`` naming ``what``."""
    ro = _options()
    with _WATCHDOG.watch(ro, None) as entry:
        try:
            sess.run_with_iobinding(io, ro)
        except Exception as exc:
            raise _failed(exc, entry, what, None, error) from None


__all__ = ["ANALYSIS_SECONDS", "INTERRUPTS", "check_graph", "run", "run_bound", "session", "stop_runs"]
