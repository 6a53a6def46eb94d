"""Accuracy checks with onnxruntime: one model on labelled data, or a pruned model against its dense one.

Every number here comes from a real ``onnxruntime.InferenceSession`` run over the whole data source.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from .data import feed
from .data_types import Batch, CalibrationSource, InputSpec
from .errors import DataError, ModelError, first_line
from .graph import RUNTIME_MAX_IR, RUNTIME_MAX_OPSET, for_runtime, load_model, model_files, opset_version
from .progress import progress

log = logging.getLogger(__name__)


def make_session(model: str | os.PathLike[str] | bytes, *, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session; load failures become a one-line :class:`ModelError`."""
    if not isinstance(model, bytes):
        head = onnx.load(str(model), load_external_data=False)
        if head.ir_version > RUNTIME_MAX_IR or opset_version(head) > RUNTIME_MAX_OPSET:
            log.info(
                "%s: IR %d / opset %d is newer than onnxruntime %s loads; evaluating a converted copy",
                model,
                head.ir_version,
                opset_version(head),
                ort.__version__,
            )
            model = for_runtime(load_model(model)).SerializeToString()
    else:
        proto = onnx.load_model_from_string(model)
        if proto.ir_version > RUNTIME_MAX_IR or opset_version(proto) > RUNTIME_MAX_OPSET:
            model = for_runtime(proto).SerializeToString()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(
            model if isinstance(model, bytes) else str(model), so, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        where = "model" if isinstance(model, bytes) else str(model)
        msg = first_line(exc)
        raise ModelError(f"{where}: onnxruntime {ort.__version__} cannot load it: {msg}") from None


def _chunks(batch: Batch, fixed: int | None) -> Iterator[tuple[Batch, int]]:
    """Split a batch into pieces of a fixed batch size, padding the last (returns the real count)."""
    if fixed is None:
        yield batch, batch.size
        return
    for start in range(0, batch.size, fixed):
        real = min(fixed, batch.size - start)
        idx = np.minimum(np.arange(start, start + fixed), batch.size - 1)
        yield Batch({k: np.asarray(v)[idx] for k, v in batch.inputs.items()}, None), real


def run_model(
    session: ort.InferenceSession,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    output: str | None = None,
    *,
    desc: str = "evaluate",
) -> tuple[NDArray[np.floating], NDArray[np.int64] | None]:
    """Run ``session`` over every batch; return the chosen output ``(N, ...)`` and the labels ``(N,)``."""
    names = [o.name for o in session.get_outputs()]
    name = output or names[0]
    if name not in names:
        raise DataError(f"--output={name!r}: the model has outputs {names}")
    first = specs[0].shape[0] if specs and specs[0].shape else None
    fixed = first if isinstance(first, int) and first > 0 else None
    outs: list[NDArray[np.floating]] = []
    labels: list[NDArray[np.int64]] = []
    have_labels = True
    for batch in progress(source, desc=desc, unit="batch"):
        for piece, real in _chunks(batch, fixed):
            (y,) = session.run([name], feed(piece, specs))
            outs.append(np.asarray(y)[:real])
        if batch.labels is None:
            have_labels = False
        else:
            labels.append(np.asarray(batch.labels, dtype=np.int64))
    return np.concatenate(outs), (np.concatenate(labels) if have_labels and labels else None)


def _is_classifier(y: NDArray[np.floating]) -> bool:
    return y.ndim == 2 and y.shape[1] > 1


def top1(y: NDArray[np.floating], labels: NDArray[np.int64] | None) -> float | None:
    """Top-1 accuracy of class scores ``y (N, C)`` against ``labels (N,)``; None if not applicable."""
    if labels is None or not _is_classifier(y):
        return None
    if y.shape[0] != labels.shape[0]:
        raise ModelError(
            f"the model output has {y.shape[0]} rows for {labels.shape[0]} labelled samples: its first axis is "
            "not the batch axis, so top-1 accuracy is undefined"
        )
    return float(np.mean(np.argmax(y, axis=1) == labels))


@dataclass(frozen=True)
class Evaluation:
    """One model on one data set."""

    samples: int
    accuracy: float | None
    seconds: float


@dataclass(frozen=True)
class Comparison:
    """A pruned model against its dense original on the same samples.

    ``agreement`` is the fraction of samples whose top-1 class is unchanged; the differences are
    taken elementwise over the chosen output.
    """

    samples: int
    output: str
    dense_accuracy: float | None
    pruned_accuracy: float | None
    agreement: float | None
    max_abs_diff: float
    mean_abs_diff: float
    seconds: float


def evaluate(
    model: str | os.PathLike[str] | bytes,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    output: str | None = None,
) -> Evaluation:
    """Top-1 accuracy of one model (``None`` without labels or for non-classifier outputs)."""
    ref = reference(model, source, specs, output)
    return Evaluation(samples=int(ref.y.shape[0]), accuracy=top1(ref.y, ref.labels), seconds=ref.seconds)


@dataclass(frozen=True)
class Reference:
    """The dense model's outputs on an evaluation set, computed once and compared against many times."""

    output: str
    y: NDArray[np.floating]
    labels: NDArray[np.int64] | None
    seconds: float


def reference(
    dense: str | os.PathLike[str] | bytes,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    output: str | None = None,
) -> Reference:
    """Run the dense model once over ``source``."""
    t0 = time.perf_counter()
    session = make_session(dense)
    name = output or session.get_outputs()[0].name
    y, labels = run_model(session, source, specs, name, desc="evaluate")
    return Reference(name, y, labels, time.perf_counter() - t0)


def compare_to(
    ref: Reference, pruned: str | os.PathLike[str] | bytes, source: CalibrationSource, specs: Sequence[InputSpec]
) -> Comparison:
    """Evaluate the pruned model on the same ``source`` and compare it with the dense reference."""
    t0 = time.perf_counter()
    yp, _ = run_model(make_session(pruned), source, specs, ref.output, desc="evaluate pruned")
    yd = ref.y
    diff = np.abs(yd.astype(np.float64) - yp.astype(np.float64))
    agree = float(np.mean(np.argmax(yd, 1) == np.argmax(yp, 1))) if _is_classifier(yd) else None
    return Comparison(
        samples=int(yd.shape[0]),
        output=ref.output,
        dense_accuracy=top1(yd, ref.labels),
        pruned_accuracy=top1(yp, ref.labels),
        agreement=agree,
        max_abs_diff=float(diff.max(initial=0.0)),
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        seconds=ref.seconds + time.perf_counter() - t0,
    )


def compare(
    dense: str | os.PathLike[str] | bytes,
    pruned: str | os.PathLike[str] | bytes,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    output: str | None = None,
) -> Comparison:
    """Evaluate both models with onnxruntime on ``source`` and compare their outputs."""
    return compare_to(reference(dense, source, specs, output), pruned, source, specs)


def file_sizes(path: str | os.PathLike[str], *, level: int = 9) -> tuple[int, int]:
    """Raw and zstd-compressed (level ``level``) bytes of a model file plus its external data files."""
    import zstandard

    files = model_files(path)
    raw = sum(f.stat().st_size for f in files)
    cctx = zstandard.ZstdCompressor(level=level)
    packed = 0
    for f in files:
        with open(f, "rb") as fh:
            packed += len(cctx.compress(fh.read()))
    return raw, packed
