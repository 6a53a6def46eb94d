"""Latency, parameters and FLOPs of ONNX models, measured side by side with onnxruntime (CPU).

Latency ratios are only meaningful between models timed in the same process at the same time, so
:func:`side_by_side` interleaves the models round by round (the order rotates every round) and
reports the median of each.  One onnxruntime thread by default: on a shared machine that is the
most repeatable setting, and it is what the benchmarks use.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray

from ..data import ArraySource
from ..data_types import Batch, InputSpec
from .capture import capture, session

Feed = Mapping[str, NDArray[np.generic]]


def batch_feed(sample: Feed, batch: int) -> dict[str, NDArray[np.generic]]:
    """Inputs of batch size ``batch`` made by repeating the samples of ``sample`` (batch on axis 0)."""
    out: dict[str, NDArray[np.generic]] = {}
    for name, value in sample.items():
        v = np.asarray(value)
        reps = -(-batch // v.shape[0])
        out[name] = np.ascontiguousarray(np.concatenate([v] * reps)[:batch])
    return out


def timings(
    models: Sequence[onnx.ModelProto | bytes],
    feed: Feed,
    *,
    rounds: int | None = None,
    budget: float = 8.0,
    min_seconds: float = 0.01,
    threads: int = 1,
    trials: int = 3,
    seed: int = 0,
) -> NDArray[np.float64]:
    """Seconds per run of each model on ``feed``, one row per round: shape ``(rounds, len(models))``.

    The rounds come from ``trials`` independent trials, each with freshly created sessions (in a
    shuffled order): two sessions of the *same* model can differ by 10–30% on small convolutions
    (measured), so one session per model is not a fair comparison.  Within a trial, each
    measurement repeats the run until it takes at least ``min_seconds`` and the models take turns
    (rotating order); measurements in one round are back to back, so on a loaded machine they share
    its load — compare models round by round (:func:`paired_speedup`).  By default the rounds fill
    ``budget`` seconds (between 7 and 61 in all).
    """
    rng = np.random.default_rng(seed)
    protos = [m if isinstance(m, bytes) else m.SerializeToString() for m in models]
    parts: list[NDArray[np.float64]] = []
    for trial in range(trials):
        order = rng.permutation(len(protos))
        created = {int(k): session(protos[int(k)], threads=threads) for k in order}
        sessions = [created[k] for k in range(len(protos))]
        names = [[o.name for o in s.get_outputs()] for s in sessions]
        reps = []
        per_round = 0.0
        for s, out in zip(sessions, names, strict=True):
            for _ in range(2):
                s.run(out, dict(feed))
            t0 = time.perf_counter()
            s.run(out, dict(feed))
            one = max(time.perf_counter() - t0, 1e-6)
            reps.append(max(1, int(np.ceil(min_seconds / one))))
            per_round += reps[-1] * one
        total = rounds if rounds is not None else int(min(61, max(7, budget / max(per_round, 1e-9))))
        n = max(2, -(-total // trials)) if trials > 1 else total
        t = np.zeros((n, len(protos)))
        for r in range(n):
            turn = list(range(len(protos)))
            turn = turn[(r + trial) % len(turn) :] + turn[: (r + trial) % len(turn)]
            for k in turn:
                s, out = sessions[k], names[k]
                t0 = time.perf_counter()
                for _ in range(reps[k]):
                    s.run(out, dict(feed))
                t[r, k] = (time.perf_counter() - t0) / reps[k]
        parts.append(t)
        del created, sessions
    return np.concatenate(parts)


def side_by_side(models: Sequence[onnx.ModelProto | bytes], feed: Feed, **kwargs: Any) -> list[float]:
    """Median seconds per run of each model (see :func:`timings`)."""
    return [float(v) for v in np.median(timings(models, feed, **kwargs), axis=0)]


def paired_speedup(times: NDArray[np.float64], reference: int = 0) -> list[float]:
    """Median over rounds of ``t_reference / t_model``: how many times faster each model is."""
    return [float(v) for v in np.median(times[:, [reference]] / times, axis=0)]


@dataclass(frozen=True)
class Cost:
    """Parameters (all float constants) and FLOPs (2 × multiply-adds of Conv/Gemm/MatMul/RNN/...)
    of a model on one input batch (FLOPs for that batch)."""

    params: int
    flops: int


def count_params(model: onnx.ModelProto) -> int:
    from onnx import TensorProto

    floats = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE, TensorProto.BFLOAT16}
    total = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in floats:
                    total += int(np.prod(a.t.dims))
    return total


def count_flops(model: onnx.ModelProto, feed: Feed, specs: Sequence[InputSpec]) -> int:
    """FLOPs (2 × MACs) of the weight layers, from the tensor shapes of one real run."""
    from .graphutil import Constants

    graph = model.graph
    consts = Constants(graph)
    wanted: list[str] = []
    for node in graph.node:
        if node.op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"):
            wanted.extend(x for x in (node.input[0], node.output[0]) if x and not consts.is_const(x))
            if node.op_type == "MatMul" and not consts.is_const(node.input[1]):
                wanted.append(node.input[1])
    wanted = list(dict.fromkeys(wanted))
    batch = Batch({k: np.asarray(v) for k, v in feed.items()}, None)
    values = next(capture(model, wanted, ArraySource(dict(batch.inputs), batch_size=batch.size), specs))
    shapes = {k: np.shape(v) for k, v in values.items()}
    macs = 0
    for node in graph.node:
        op = node.op_type
        if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "LSTM", "GRU", "RNN"):
            continue
        out = shapes.get(node.output[0])
        if op in ("Conv", "ConvTranspose"):
            w = consts.value(node.input[1])
            if w is None or out is None:
                continue
            if op == "Conv":
                macs += int(np.prod(out)) * int(np.prod(w.shape[1:]))
            else:
                xin = shapes[node.input[0]]
                macs += int(np.prod(xin)) * int(np.prod(w.shape[1:]))
        elif op in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0]) or (consts.value(node.input[0]).shape)  # type: ignore[union-attr]
            if out is None or not a:
                continue
            k = a[0] if (op == "Gemm" and any(x.name == "transA" and x.i for x in node.attribute)) else a[-1]
            macs += int(np.prod(out)) * int(k)
        else:
            w, r = consts.value(node.input[1]), consts.value(node.input[2])
            x = shapes.get(node.input[0])
            if w is None or r is None or x is None:
                continue
            steps = int(x[0]) * int(x[1])  # seq × batch (layout 0) or batch × seq
            macs += steps * (int(np.prod(w.shape)) + int(np.prod(r.shape)))
    return 2 * macs


def cost(model: onnx.ModelProto, feed: Feed, specs: Sequence[InputSpec]) -> Cost:
    return Cost(count_params(model), count_flops(model, feed, specs))


def kernel_multiple() -> int:
    """The channel multiple onnxruntime's CPU kernels prefer on this machine.

    onnxruntime's MLAS runs convolutions in the NCHWc layout with a block of 16 channels on AVX-512
    and 8 on AVX2 (``MlasNchwcGetBlockSize``); channel counts that are not multiples of the block
    fall back to slower kernels (measured: BENCHMARKS.md, channel pruning).  Elsewhere 8 is used.
    """
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return 16 if "avx512f" in line.split() else 8
    except OSError:
        pass
    return 8
