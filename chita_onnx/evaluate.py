"""Accuracy checks with onnxruntime: one model on labelled data, or a pruned model against its dense one.

Every number here comes from a real ``onnxruntime.InferenceSession`` run over the whole data source.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray

from . import runtime
from .batching import output_batch_axis
from .data import batch_size, feed, static_names
from .data_types import Batch, CalibrationSource, InputSpec
from .errors import DataError, ModelError
from .graph import RUNTIME_MAX_IR, RUNTIME_MAX_OPSET, for_runtime, label_scores, load_model, model_files, opset_version
from .progress import progress
from .standardize import open_squeezes

log = logging.getLogger(__name__)


def make_session(model: str | os.PathLike[str] | bytes, *, threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime CPU session; load failures become a one-line :class:`ModelError`.

    A model newer than onnxruntime reads is converted down first, and the converted graph is
    checked like every graph chita-onnx makes (:func:`chita_onnx.runtime.check_graph`); one with a
    ``Squeeze`` onnxruntime 1.19 cannot infer is evaluated as :func:`~chita_onnx.graph.load_model`
    loads it (:func:`~chita_onnx.standardize.reshape_open_squeezes`)."""
    where = "model" if isinstance(model, bytes) else str(model)
    converted: onnx.ModelProto | None = None
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
            converted = for_runtime(load_model(model))
    else:
        proto = onnx.load_model_from_string(model)
        if proto.ir_version > RUNTIME_MAX_IR or opset_version(proto) > RUNTIME_MAX_OPSET:
            converted = for_runtime(proto)
    if converted is not None:
        runtime.check_graph(converted, f"{where}: the copy converted for onnxruntime {ort.__version__}")
    try:
        return runtime.session(converted if converted is not None else model, what=where, threads=threads, check=False)
    except ModelError:
        if converted is not None or isinstance(model, bytes) or not open_squeezes(head):
            raise
    # onnxruntime 1.19 cannot infer a Squeeze without axes: evaluate the form load_model gives
    log.info("%s: onnxruntime refuses its Squeeze without axes; evaluating the copy load_model writes", model)
    return runtime.session(load_model(model), what=where, threads=threads, check=False)


def _chunks(batch: Batch, fixed: int | None, specs: Sequence[InputSpec]) -> Iterator[tuple[Batch, int]]:
    """Split a batch into pieces of a fixed batch size, padding the last (returns the real count).
    Static inputs (no batch axis) go whole with every piece."""
    size = batch_size(batch, specs)
    if fixed is None:
        yield batch, size
        return
    static = static_names(specs)
    for start in range(0, size, fixed):
        real = min(fixed, size - start)
        idx = np.minimum(np.arange(start, start + fixed), size - 1)
        yield Batch({k: v if k in static else np.asarray(v)[idx] for k, v in batch.inputs.items()}, None), real


def _fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    for s in specs:
        if s.batch_axis is not None:
            d = s.shape[s.batch_axis]
            return d if isinstance(d, int) and d > 0 else None
    return None


def run_outputs(
    session: ort.InferenceSession,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    names: Sequence[str],
    *,
    desc: str = "evaluate",
) -> tuple[dict[str, NDArray[np.floating]], NDArray[np.int64] | None]:
    """Run ``session`` over every batch; return each named output with its samples on axis 0
    (``(N, ...)``, moved from the output's batch axis) and the labels ``(N,)``."""
    declared = {o.name: o.shape for o in session.get_outputs()}
    names = list(dict.fromkeys(names))  # a graph may list one output twice: run and keep it once
    for name in names:
        if name not in declared:
            raise DataError(f"--output={name!r}: the model has outputs {list(declared)}")
    batch_names = [
        str(s.shape[s.batch_axis]) for s in specs if s.batch_axis is not None and isinstance(s.shape[s.batch_axis], str)
    ]
    fixed = _fixed_batch(specs)
    try:
        return _run_all(session, source, specs, names, batch_names, fixed, desc)
    except _BatchRefusedError as exc:
        # a static input can pin the batch: a recurrent state exported as [layers, 1, hidden] next to
        # an input with a dynamic batch only runs one sample at a time
        log.info("onnxruntime refused a batch of %d with static input(s) (%s): running one sample at a time", *exc.args)
        return _run_all(session, source, specs, names, batch_names, 1, desc)


class _BatchRefusedError(Exception):
    """onnxruntime failed on a batch of several samples of a model with static inputs."""


def _run_all(
    session: ort.InferenceSession,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    names: Sequence[str],
    batch_names: Sequence[str],
    fixed: int | None,
    desc: str,
) -> tuple[dict[str, NDArray[np.floating]], NDArray[np.int64] | None]:
    declared = {o.name: o.shape for o in session.get_outputs()}
    axes: dict[str, int] = {}
    outs: dict[str, list[NDArray[np.floating]]] = {n: [] for n in names}
    labels: list[NDArray[np.int64]] = []
    have_labels = True
    origin = getattr(source, "origin", "data")
    for i, batch in enumerate(progress(source, desc=desc, unit="batch")):
        what = f"onnxruntime running the model ({desc}) on {origin} (batch {i})"
        for piece, real in _chunks(batch, fixed, specs):
            fed = batch_size(piece, specs)
            try:
                ys = runtime.run(session, names, feed(piece, specs), what=what)
            except ModelError as exc:  # onnxruntime failed (a timeout or a signal is not a ModelError)
                if fed > 1 and static_names(specs) and not outs[names[0]]:
                    raise _BatchRefusedError(fed, str(exc)) from None
                raise
            for name, y in zip(names, ys, strict=True):
                arr = np.asarray(y)
                if not arr.ndim:
                    arr = arr.reshape(1)
                elif fed == 1 and 1 not in arr.shape:
                    # one sample and no axis of size 1: the graph squeezed its batch away (AECMOS's
                    # [4] scores, declared [batch_size]); the whole array is that sample's
                    arr = arr[None]
                else:
                    if name not in axes:
                        axes[name] = output_batch_axis(declared[name], batch_names, arr.shape, fed)
                    arr = np.moveaxis(arr, axes[name], 0)[:real]
                outs[name].append(arr)
        if batch.labels is None:
            have_labels = False
        else:
            labels.append(np.asarray(batch.labels, dtype=np.int64))
    return (
        {n: np.concatenate(v) for n, v in outs.items()},
        (np.concatenate(labels) if have_labels and labels else None),
    )


def run_model(
    session: ort.InferenceSession,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    output: str | None = None,
    *,
    desc: str = "evaluate",
) -> tuple[NDArray[np.floating], NDArray[np.int64] | None]:
    """Run ``session`` over every batch; return the chosen output ``(N, ...)`` and the labels ``(N,)``."""
    name = output or session.get_outputs()[0].name
    ys, labels = run_outputs(session, source, specs, [name], desc=desc)
    return ys[name], labels


def _is_classifier(y: NDArray[np.floating]) -> bool:
    return y.ndim == 2 and y.shape[1] > 1


def _is_labels(y: NDArray[np.generic]) -> bool:
    """A predicted-label output: one integer, boolean or string value per sample (``(N,)`` or
    ``(N, 1)``), as scikit-learn classifiers exported by skl2onnx write first (``output_label``)."""
    return (y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1)) and not np.issubdtype(y.dtype, np.floating)


def _per_position_top1(y: NDArray[np.generic], labels: NDArray[np.int64], index_labels: bool) -> float | None:
    """Accuracy over the scored positions (``labels ≥ 0``) of per-position labels ``(N, *P)``: against
    class scores ``(N, *P, C)`` (a tagger, a CTC frame output) or ``(N, C, *P)`` (a segmenter's maps),
    or against a label map ``(N, *P)`` (an ArgMax output).  None when the shapes do not line up."""
    if index_labels and y.shape == labels.shape:
        pred = y.astype(np.int64)
    elif np.issubdtype(y.dtype, np.floating) and y.ndim == labels.ndim + 1 and y.shape[:-1] == labels.shape:
        pred = np.argmax(y, axis=-1)
    elif (
        np.issubdtype(y.dtype, np.floating) and y.ndim == labels.ndim + 1 and (y.shape[0], *y.shape[2:]) == labels.shape
    ):
        pred = np.argmax(y, axis=1)
    else:
        return None
    scored = labels >= 0
    return float(np.mean(pred[scored] == labels[scored])) if scored.any() else None


def top1(
    y: NDArray[np.floating],
    labels: NDArray[np.int64] | None,
    classes: Sequence[object] | None = None,
    index_labels: bool = False,
) -> float | None:
    """Top-1 accuracy of class scores ``y (N, C)`` against ``labels (N,)`` (class indices), or over the
    positions of per-position labels ``(N, ...)`` (:func:`_per_position_top1`); None if not
    applicable.  Predicted labels ``y (N,)`` are scored when they are class indices
    (``index_labels``: an ArgMax output) or ``classes`` gives the class value of each index (a
    ZipMap's ``classlabels``), else not: a class value is not an index."""
    if labels is not None and labels.ndim > 1:
        return _per_position_top1(y, labels, index_labels)
    if labels is not None and _is_labels(y) and index_labels and len(y) == len(labels):
        return float(np.mean(y.reshape(-1).astype(np.int64) == labels))
    if labels is not None and _is_labels(y) and classes is not None and len(y) == len(labels):
        index = {c: i for i, c in enumerate(classes)}
        return float(np.mean(np.array([index.get(_plain(v), -1) for v in y.reshape(-1)]) == labels))
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
class OutputComparison:
    """One output of a pruned model against the dense one, for any kind of output.

    ``relative_error`` is ``‖y_pruned − y_dense‖ / ‖y_dense‖`` over all samples (Frobenius);
    ``cosine`` the mean over samples of the cosine similarity of the flattened outputs;
    ``argmax_agreement`` the fraction of positions whose arg-max over the last axis is unchanged, for
    ``(N, C)`` and ``(N, T, C)`` outputs (classes per sample, per time step or per anchor), else None.
    """

    name: str
    shape: tuple[int, ...]
    relative_error: float
    cosine: float
    max_abs_diff: float
    argmax_agreement: float | None


def compare_arrays(name: str, yd: NDArray[np.floating], yp: NDArray[np.floating]) -> OutputComparison:
    """Compare two ``(N, ...)`` arrays of the same shape (dense first).  Predicted labels (``(N,)``,
    integer or string) are compared by equality: the relative error is the fraction of changed
    labels, the cosine and agreement the fraction kept; any other non-numeric output likewise by
    element."""
    if _is_labels(yd) or not (np.issubdtype(yd.dtype, np.number) or yd.dtype == np.bool_):
        same = float(np.mean(yd.reshape(-1) == yp.reshape(-1))) if yd.size else 1.0
        return OutputComparison(name, tuple(int(x) for x in yd.shape[1:]), 1.0 - same, same, float(same < 1.0), same)
    d = yd.reshape(yd.shape[0], -1).astype(np.float64)
    p = yp.reshape(yp.shape[0], -1).astype(np.float64)
    diff = p - d
    ref = float(np.linalg.norm(d))
    rel = float(np.linalg.norm(diff)) / ref if ref > 0 else (0.0 if not diff.any() else float("inf"))
    nd, npn = np.linalg.norm(d, axis=1), np.linalg.norm(p, axis=1)
    dot = (d * p).sum(axis=1)
    both = (nd > 0) & (npn > 0)
    cos = np.where(both, dot / np.where(both, nd * npn, 1.0), np.where((nd == 0) & (npn == 0), 1.0, 0.0))
    agree = None
    if yd.ndim in (2, 3) and yd.shape[-1] > 1:
        agree = float(np.mean(np.argmax(yd, axis=-1) == np.argmax(yp, axis=-1)))
    return OutputComparison(
        name=name,
        shape=tuple(int(x) for x in yd.shape[1:]),
        relative_error=rel,
        cosine=float(cos.mean()) if cos.size else 1.0,
        max_abs_diff=float(np.abs(diff).max(initial=0.0)),
        argmax_agreement=agree,
    )


@dataclass(frozen=True)
class Comparison:
    """A pruned model against its dense original on the same samples.

    ``agreement`` is the fraction of samples whose top-1 class is unchanged (classifier outputs
    ``(N, C)`` only); the differences are taken elementwise over the chosen output.  For outputs that
    are not class scores, ``relative_error`` and ``cosine`` (see :class:`OutputComparison`) are the
    measures that matter; ``outputs`` compares every evaluated output (several for detectors and
    stateful models).  ``position_agreement``: for a sequence output ``(N, T, C)`` (a CTC recogniser,
    a tagger), the fraction of positions whose argmax class is unchanged.
    """

    samples: int
    output: str
    dense_accuracy: float | None
    pruned_accuracy: float | None
    agreement: float | None
    max_abs_diff: float
    mean_abs_diff: float
    seconds: float
    relative_error: float | None = None
    cosine: float | None = None
    outputs: tuple[OutputComparison, ...] = ()
    position_agreement: float | None = None


def low_agreement_warning(c: Comparison | None, below: float = 0.5) -> str | None:
    """The report's warning when top-1 agreement with dense is below ``below``.  An output ``(N, C)``
    need not hold class scores (an autoencoder's pixels, an embedding): the warning then points to
    the relative error and cosine, which measure it whatever it holds."""
    if c is None or c.agreement is None or c.agreement >= below:
        return None
    text = f"top-1 agreement with the dense model is only {100 * c.agreement:.1f}% (argmax of {c.output!r})"
    if c.relative_error is not None and c.cosine is not None:
        text += (
            f"; if that output is not class scores, its relative error ({c.relative_error:.3g}) and cosine "
            f"with dense ({c.cosine:.4f}) are the measure"
        )
    return text


def evaluate(
    model: str | os.PathLike[str] | bytes,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    output: str | None = None,
) -> Evaluation:
    """Top-1 accuracy of one model (``None`` without labels or for non-classifier outputs)."""
    ref = reference(model, source, specs, output)
    accuracy = ref.accuracy(ref.y)
    return Evaluation(samples=int(ref.y.shape[0]), accuracy=accuracy, seconds=ref.seconds)


def _plain(v: object) -> object:
    """A predicted label as a hashable Python value (``bytes`` decoded)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    return v.item() if isinstance(v, np.generic) else v


@dataclass(frozen=True)
class Reference:
    """The dense model's outputs on an evaluation set, computed once and compared against many times.

    ``y`` is the primary output ``output``; ``others`` holds further outputs that are compared too;
    ``classes`` the class value of each class index when ``y`` holds predicted labels (see :func:`top1`);
    ``index_labels`` when ``y`` is an ``ArgMax`` of class scores, or the first of a ``TopK``'s indices:
    labels that are class indices, per sample or per position (a segmentation map).
    """

    output: str
    y: NDArray[np.floating]
    labels: NDArray[np.int64] | None
    seconds: float
    others: dict[str, NDArray[np.floating]] = field(default_factory=dict)
    classes: tuple[object, ...] | None = None
    index_labels: bool = False
    #: the axis of a TopK's indices output whose first entry is the label (``y`` holds it alone)
    first_along: int | None = None
    #: the TopK values output among the compared ones (sorted: their argmax says nothing)
    topk_values: str = ""

    @property
    def values_only(self) -> bool:
        """``y`` is a TopK's sorted values without its indices: no class can be read from them."""
        return bool(self.topk_values) and self.first_along is None

    def accuracy(self, y: NDArray[Any]) -> float | None:
        """:func:`top1` of ``y`` (this output of a model) against the labels; None for TopK values."""
        return None if self.values_only else top1(y, self.labels, self.classes, self.index_labels)


def _primary_output(session: ort.InferenceSession) -> str:
    """The output to score: the first one, unless it is not floating point and a later one is (a
    scikit-learn classifier's ``output_label`` before its ``output_probability``)."""
    outs = session.get_outputs()
    if outs[0].type not in _FLOAT_OUTPUTS:
        for o in outs[1:]:
            if o.type in _FLOAT_OUTPUTS:
                return str(o.name)
    return str(outs[0].name)


def _proto(model: str | os.PathLike[str] | bytes) -> onnx.ModelProto | None:
    """The graph of a model the session already loaded, without its weights (None if unreadable)."""
    try:
        return (
            onnx.load_model_from_string(model)
            if isinstance(model, bytes)
            else onnx.load(os.fspath(model), load_external_data=False)
        )
    except Exception:  # the session already loaded it; no answer is the safe answer
        return None


def _zipmap_classes(proto: onnx.ModelProto | None) -> tuple[object, ...] | None:
    """The class values of the model's one ``ZipMap`` (``classlabels_int64s`` or ``_strings``), if any."""
    if proto is None:
        return None
    found = [n for n in proto.graph.node if n.op_type == "ZipMap"]
    if len(found) != 1:
        return None
    for a in found[0].attribute:
        if a.name == "classlabels_int64s":
            return tuple(int(v) for v in a.ints)
        if a.name == "classlabels_strings":
            return tuple(v.decode("utf-8", "replace") for v in a.strings)
    return None


_FLOAT_OUTPUTS = ("tensor(float)", "tensor(double)", "tensor(float16)", "tensor(bfloat16)")


def reference(
    dense: str | os.PathLike[str] | bytes,
    source: CalibrationSource,
    specs: Sequence[InputSpec],
    output: str | None = None,
    *,
    all_outputs: bool = False,
) -> Reference:
    """Run the dense model once over ``source``.  With ``all_outputs`` (and no ``output``), every
    floating-point output is kept for comparison, the first output being the primary one."""
    t0 = time.perf_counter()
    session = make_session(dense)
    name = output or _primary_output(session)
    proto = _proto(dense)
    head = label_scores(proto, name) if proto is not None else None
    top_k = head is not None and bool(head.indices)  # a TopK output: its first index is the label
    exported = {o.name for o in session.get_outputs()}
    if head is not None and top_k and head.indices in exported:
        name = head.indices
    first_along = head.axis if head is not None and top_k and name == head.indices else None
    names = [name]
    if all_outputs and output is None:
        names += [o.name for o in session.get_outputs() if o.name != name and o.type in _FLOAT_OUTPUTS]
        names = list(dict.fromkeys(names))
    ys, labels = run_outputs(session, source, specs, names, desc="evaluate")
    others = {n: ys[n] for n in names[1:]}
    y = _first_index(ys[name], first_along)
    integer = np.issubdtype(y.dtype, np.integer)
    classes = _zipmap_classes(proto) if _is_labels(y) else None
    index_labels = bool(integer and head is not None)
    if labels is not None and labels.ndim > 1 and _per_position_top1(y, labels, index_labels) is None:
        log.warning(
            "the labels, %s per sample, do not line up with output %r, %s per sample (nor any is scored): "
            "no accuracy is reported",
            labels.shape[1:],
            name,
            y.shape[1:],
        )
    values = head.values if head is not None and top_k else ""
    return Reference(name, y, labels, time.perf_counter() - t0, others, classes, index_labels, first_along, values)


def _first_index(y: NDArray[Any], axis: int | None) -> NDArray[Any]:
    """``y`` itself, or its first entry along ``axis`` (a TopK's indices: the top-1 class)."""
    return y if axis is None else np.take(y, 0, axis=axis % y.ndim)


def compare_to(
    ref: Reference, pruned: str | os.PathLike[str] | bytes, source: CalibrationSource, specs: Sequence[InputSpec]
) -> Comparison:
    """Evaluate the pruned model on the same ``source`` and compare it with the dense reference."""
    t0 = time.perf_counter()
    names = [ref.output, *ref.others]
    ys, _ = run_outputs(make_session(pruned), source, specs, names, desc="evaluate pruned")
    yp = _first_index(ys[ref.output], ref.first_along)
    yd = ref.y
    if _is_labels(yd) or ref.index_labels:  # predicted labels: a changed label counts 1 (strings: no difference)
        diff = (yd.reshape(-1) != yp.reshape(-1)).astype(np.float64)
        agree: float | None = float(np.mean(diff == 0)) if yd.size else 1.0
    elif not np.issubdtype(yd.dtype, np.number) and yd.dtype != np.bool_:  # any other non-numeric output
        diff = (yd != yp).astype(np.float64)
        agree = None
    else:
        diff = np.abs(yd.astype(np.float64) - yp.astype(np.float64))
        classifier = _is_classifier(yd) and not ref.values_only
        agree = float(np.mean(np.argmax(yd, 1) == np.argmax(yp, 1))) if classifier else None
    per = tuple(
        compare_arrays(n, ref.y if n == ref.output else ref.others[n], yp if n == ref.output else ys[n]) for n in names
    )
    per = tuple(replace(c, argmax_agreement=None) if c.name == ref.topk_values else c for c in per)
    return Comparison(
        samples=int(yd.shape[0]),
        output=ref.output,
        dense_accuracy=ref.accuracy(yd),
        pruned_accuracy=ref.accuracy(yp),
        agreement=agree,
        max_abs_diff=float(diff.max(initial=0.0)),
        mean_abs_diff=float(diff.mean()) if diff.size else 0.0,
        seconds=ref.seconds + time.perf_counter() - t0,
        relative_error=per[0].relative_error,
        cosine=per[0].cosine,
        outputs=per if len(per) > 1 else (),
        position_agreement=per[0].argmax_agreement if yd.ndim == 3 else None,
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
