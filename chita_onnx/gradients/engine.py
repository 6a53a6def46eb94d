"""Per-sample loss gradients of an ONNX model with onnxruntime-training, in inference semantics.

The public entry point is :func:`per_sample_gradients`; :class:`GradientEngine` is the reusable
lower level (build once, ``compute`` many times, ``set_weights`` between stages).

Row ``i`` of the result ``X`` (shape ``(n, p)``, float32) is the gradient, with respect to the
prunable weights laid out by :class:`~chita_onnx.layout.Layout`, of the loss of sample ``i`` (or the
mean loss of the ``i``-th group of ``mini_batch`` consecutive samples).  The loss depends on the head:

* logits (a Softmax/LogSoftmax output, walked back through ZipMap/Identity/Cast; or any output with
  a class axis when labels are given): cross-entropy ``−log softmax(z)_y``;
* probabilities (skl2onnx's ``Concat[1−σ, σ]`` binary head, or rows that are non-negative and sum to
  one): ``−log clip(p_y, 1e-30, 1)``;
* anything else, or ``loss="mse"``: a Gauss-Newton probe ``½‖y − t‖²`` with ``t = y + ε``,
  ``ε ~ N(0, I)`` seeded, so a row is ``−Jᵀε`` and ``E[g gᵀ] = JᵀJ``.

The class ``y`` is the label (``fisher="empirical"``), a draw from the model's own predictive
distribution (``"sampled"``, seeded) or its arg-max (``"argmax"``).

``fisher="kl"`` estimates the Gauss-Newton matrix of the KL divergence to the model's own output, i.e.
the *true* Fisher ``E_x Σ_c p_c ∇log p_c ∇log p_cᵀ = E_x Jᵀ(diag p − ppᵀ)J``, with ``R`` rows per input
(``fisher_rows``): the class rows ``√p_c ∇log p_c`` of every class (exact, ``R = C``) when the head
has at most ``R`` classes and one position, otherwise ``R`` Gaussian sketches ``Σ_c ε_c √p_c ∇log p_c
/ √R`` (``ε ~ N(0, I)``, seeded; unbiased).  Unlike one sampled or empirical label, whose gradient
vanishes as the predicted probability goes to 1, every class contributes in proportion to its
probability.  ``X`` then has ``n·R`` rows (input ``i``'s rows are consecutive) and ``XᵀX/n`` is the
estimate.

Two code paths produce identical rows: the one-sample path (recipe A′ of docs/ort-gradients.md:
the gradient graph run once per row, with each ``<w>_grad`` output bound straight to its slice of
the row) and the batched path (see :mod:`.batched`), which is checked against the one-sample path
on the first rows of every run and abandoned if it disagrees.  Both are then checked against the
model itself, once per engine: one row of the first block against central differences of its loss
(:meth:`GradientEngine._check_direction`); a confirmed disagreement (onnxruntime-training computing a
wrong gradient for some op) raises :class:`~chita_onnx.errors.WrongGradientError`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper

from ..data import DataSpec, per_sample_advice
from ..data_types import Batch, CalibrationSource
from ..errors import ChitaError, ConfigError, DataError, ModelError, WrongGradientError, first_line
from ..graph import get_weights, label_scores, load_model, model_inputs
from ..layout import Layout
from ..progress import progress
from ._ort import Runner, build_gradient_model
from .batched import BatchedPath, NotEligibleError
from .precision import float32_twin, needs_twin
from .prepare import (
    Forward,
    Head,
    HeadKind,
    _shape_table,
    attach_loss,
    build_forward,
    cut_to,
    default_class_axis,
    find_head,
    normalize,
    select_output,
    with_head,
)

log = logging.getLogger(__name__)

Loss = Literal["auto", "ce", "mse"]
Fisher = Literal["auto", "empirical", "sampled", "argmax", "kl"]
Method = Literal["auto", "single", "batched"]

#: Rows checked against the one-sample path before the batched path is trusted.
CHECK_ROWS = 4
#: Relative error allowed between the two paths on the check rows (random probe targets):
#: over the whole check block (Frobenius) and on any single row.
CHECK_RTOL = 1e-5
CHECK_ROW_RTOL = 1e-4
_PROBE_SEED = 0x5EED
#: The head's reading when its output has a class axis but no softmax and the data no labels
#: (read as regression; ``--loss ce`` reads it as a classifier's logits, as the ``--distill``
#: refusal then suggests).
RAW_LOGITS = "not a class distribution: no softmax and no labels; --loss ce reads it as logits"
#: Samples of the example batch used to measure the output scales of a multi-output head.
SCALE_SAMPLES = 16
#: A single Gauss-Newton output that a ``Concat`` joins from parts whose RMS norms differ by at
#: least this factor (YOLOv8's ``output0``: box coordinates in pixels next to sigmoid class scores)
#: is differentiated as those parts, each divided by its RMS norm like the outputs of a multi-output
#: head; otherwise the largest part drowns the others (measured on nudenet's YOLOv8n: the class
#: branch starved to 14% density at 30% sparsity).  Parts of comparable scale leave the head as it is.
MIXED_SCALE_RATIO = 10.0
#: Floor of √p in the KL offsets (a class the model gives probability ≲ 1e-20 adds no curvature).
_ROOT_FLOOR = 1e-10
#: ``method="auto"`` uses the batched path (when it is eligible and passes its check) only when the
#: prunable layers cost at most this many multiply-adds per sample (about a millisecond of one core:
#: there per-call overhead dominates the one-sample path).  A count from the graph's shapes, not a
#: timing, so that the same run always takes the same path: the two paths agree only to ~1e-7 and
#: CHITA++'s stages amplify that into different models.
AUTO_BATCHED_MAX_MACS = 2_000_000
#: The directional check of the first block's gradients (:meth:`GradientEngine._check_direction`):
#: central differences of the loss along the row's own direction ``u = g/‖g‖`` with steps
#: ``ε = DIRECTION_STEP·‖w‖`` (``w``: the weights differentiated), then ε/8, ε/64, … until one
#: agrees (BN-folded and CTC models needed the small steps: their loss bends within ε).
DIRECTION_STEP = 1e-3
DIRECTION_SHRINK = 8.0
DIRECTION_STEPS = 8
#: Along the gradient itself the loss bends the most (its largest curvature is usually there): that
#: ladder starts this many steps down (ε/64).
DIRECTION_GRADIENT_START = 2
#: A difference quotient within this relative distance of ``‖g‖`` confirms the gradient ...
DIRECTION_AGREE = 0.1
#: ... and the gradient is wrong when no step confirms it, the quotients of DIRECTION_RUN consecutive
#: steps (a 64-fold range, from the first or second step) agree with each other to DIRECTION_STABLE
#: (the loss is smooth there, so they are its derivative: the error of a central difference falls
#: with the square of the step, rounding grows with its inverse, a kink moves it) and they miss by
#: more than DIRECTION_WRONG.
DIRECTION_RUN = 3
DIRECTION_STABLE = 0.05
#: Steps whose float32 weights keep less than this share of the displacement are not used (each
#: quotient is compared with the derivative the gradient gives for the displacement actually made).
DIRECTION_KEPT = 0.5
#: ... and steps whose loss change, seen and predicted, is below this share of the loss (float32
#: rounding of a sum over the outputs).
DIRECTION_NOISE = 1e-6
DIRECTION_WRONG = 0.25
#: On a wrong gradient, this many tensors (those with the largest gradient) are checked alone to
#: name the culprits.
DIRECTION_TENSORS = 24


def row_macs(fwd: Forward) -> int | None:
    """Multiply-adds per sample of the Conv/Gemm/MatMul nodes that read a weight of ``fwd``, from the
    shapes of its graph (``numel(output) · weight size / output channels``, divided by the batch);
    None when an output shape is unknown."""
    table = _shape_table(fwd.model)
    weights = fwd.weight_inputs
    total = 0
    for node in fwd.model.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        w = next((x for x in node.input if x in weights), None)
        if w is None:
            continue
        dims = table.get(node.output[0], (0, None))[1]
        if not dims or any(d is None or d <= 0 for d in dims):
            return None
        known = [int(d) for d in dims if d is not None]
        if node.op_type == "Conv":
            channels = known[1]
        elif node.op_type == "MatMul" and node.input[0] == w:
            channels = known[-2] if len(known) > 1 else known[-1]
        else:
            channels = known[-1]
        total += math.prod(known) * math.prod(weights[w]) // max(1, channels)
    return total // max(1, fwd.batch)


def _disagreement(got: NDArray[np.float32], ref: NDArray[np.float32]) -> tuple[float, float]:
    """``(‖got − ref‖_F / ‖ref‖_F, max over rows of the per-row relative error)``; NaN → inf."""
    d = got.astype(np.float64) - ref
    r = np.linalg.norm(ref.astype(np.float64), axis=1)
    e = np.linalg.norm(d, axis=1)
    total = float(np.sqrt((e**2).sum()) / max(float(np.sqrt((r**2).sum())), 1e-300))
    rows = e / np.maximum(r, 1e-300)
    worst = float(rows.max()) if rows.size else 0.0
    if not (np.isfinite(total) and np.isfinite(worst)):
        return float("inf"), float("inf")
    return total, worst


@dataclass(frozen=True)
class GradientMatrix:
    """Per-sample gradients ``X`` (``(n, p)`` float32, raw: not scaled) and how they were made.

    ``loss`` is ``"ce"`` (cross-entropy on logits or NLL on probabilities, see ``head``) or ``"mse"``
    (Gauss-Newton probe); ``fisher`` the label choice; ``timings`` seconds per phase.
    """

    X: NDArray[np.float32]
    layout: Layout
    loss: Literal["ce", "mse"]
    fisher: Literal["empirical", "sampled", "argmax", "kl"]
    n: int
    timings: dict[str, float] = field(default_factory=dict)
    head: HeadKind = "logits"
    output: str = ""
    mini_batch: int = 1
    method: Literal["single", "batched"] = "single"
    loss_description: str = ""
    #: Rows per input (``fisher="kl"``); ``n`` counts rows, so ``n // rows_per_sample`` inputs.
    rows_per_sample: int = 1
    #: ``(n,)`` float64 row offsets ``b`` (``fisher="kl"`` with reference distributions): with raw rows
    #: ``x_r``, ``Σ_r ½(x_rᵀδ + b_r)²`` is the Gauss-Newton model of ``Σ_inputs KL(ref ‖ model)``
    #: around the current weights, first-order term ``Σ_r b_r x_r`` included (in expectation over the
    #: sketches; exactly with every class).
    offsets: NDArray[np.float64] | None = None


# ------------------------------------------------------------------------------------------- data


@dataclass
class _Block:
    inputs: dict[str, NDArray[Any]]
    labels: NDArray[np.int64] | None
    count: int


@dataclass(frozen=True)
class _InputSpec:
    """A data input of the working copy: ``sample_shape`` excludes the batch axis (samples are on axis
    0 of the calibration arrays); a static input (``batch_axis is None``) has its full shape there."""

    name: str
    dtype: np.dtype[Any]
    sample_shape: tuple[int, ...]
    batch_axis: int | None = 0


def _check_batch(
    batch: Batch, specs: Sequence[_InputSpec], labels_expected: bool | None
) -> tuple[dict[str, NDArray[Any]], NDArray[np.int64] | None, int]:
    inputs, raw_labels = batch[0], batch[1]
    arrays: dict[str, NDArray[Any]] = {}
    size = -1
    for s in specs:
        if s.name not in inputs:
            raise DataError(f"the calibration data has no array for model input {s.name!r} (has {sorted(inputs)})")
        arr = np.asarray(inputs[s.name])
        if s.batch_axis is None:
            if tuple(arr.shape) != s.sample_shape:
                raise DataError(
                    f"calibration input {s.name!r} has shape {list(arr.shape)}; expected {list(s.sample_shape)} "
                    "(the model gives it no batch axis: one value for all samples)"
                )
            arrays[s.name] = arr if arr.dtype == s.dtype else arr.astype(s.dtype)
            continue
        if arr.ndim == 0 or tuple(arr.shape[1:]) != s.sample_shape:
            raise DataError(
                f"calibration input {s.name!r} has shape {list(arr.shape)}; "
                f"expected (batch, {', '.join(map(str, s.sample_shape))})"
            )
        if size >= 0 and arr.shape[0] != size:
            raise DataError(f"calibration arrays differ in batch size ({size} vs {arr.shape[0]} for {s.name!r})")
        size = int(arr.shape[0])
        if arr.dtype != s.dtype:
            if not np.can_cast(arr.dtype, s.dtype, "same_kind"):
                raise DataError(f"calibration input {s.name!r} has dtype {arr.dtype}; the model expects {s.dtype}")
            arr = arr.astype(s.dtype)
        arrays[s.name] = arr
    labels: NDArray[np.int64] | None = None
    if raw_labels is not None:
        lab = np.asarray(raw_labels)
        if lab.shape != (size,):
            raise DataError(f"labels have shape {list(lab.shape)}; expected ({size},){per_sample_advice(lab, size)}")
        if not np.issubdtype(lab.dtype, np.integer):
            raise DataError(f"labels must be integer class indices, got dtype {lab.dtype}")
        labels = lab.astype(np.int64, copy=False)
    if labels_expected is True and labels is None:
        raise DataError("some calibration batches have labels and others do not")
    return arrays, labels, size


def _count_samples(data: CalibrationSource, limit: int | None, batched: Sequence[str]) -> tuple[int, bool]:
    total, has_labels = 0, False
    for batch in data:
        first = next((batch[0][k] for k in batched if k in batch[0]), None)
        total += int(np.shape(first)[0]) if first is not None else Batch(batch[0], batch[1]).size
        has_labels = has_labels or batch[1] is not None
        if limit is not None and total >= limit:
            break
    return total, has_labels


def _stream(
    data: CalibrationSource, specs: Sequence[_InputSpec], size: int, limit: int, need_labels: bool, pad: bool
) -> Iterator[_Block]:
    """Blocks of exactly ``size`` consecutive samples (the last may be short; padded with zeros
    when ``pad``) until ``limit`` samples were served."""
    pend: dict[str, list[NDArray[Any]]] = {s.name: [] for s in specs}
    pend_lab: list[NDArray[np.int64]] = []
    have = taken = 0
    static: dict[str, NDArray[Any]] = {}

    def emit() -> _Block:
        nonlocal have
        inputs: dict[str, NDArray[Any]] = {}
        for s in specs:
            if s.batch_axis is None:
                inputs[s.name] = static[s.name]
                continue
            parts = pend[s.name]
            arr = np.ascontiguousarray(parts[0]) if len(parts) == 1 else np.concatenate(parts)
            if pad and have < size:
                arr = np.concatenate([arr, np.zeros((size - have, *s.sample_shape), s.dtype)])
            inputs[s.name] = arr
            parts.clear()
        labels = None
        if need_labels:
            labels = pend_lab[0] if len(pend_lab) == 1 else np.concatenate(pend_lab)
            pend_lab.clear()
        block = _Block(inputs, labels, have)
        have = 0
        return block

    for batch in data:
        arrays, labels, b = _check_batch(batch, specs, True if need_labels else None)
        for s in specs:
            if s.batch_axis is None:
                if s.name in static and not np.array_equal(static[s.name], arrays[s.name]):
                    raise DataError(f"calibration input {s.name!r} has no batch axis but differs between batches")
                static[s.name] = arrays[s.name]
        pos = 0
        while pos < b and taken < limit:
            k = min(b - pos, size - have, limit - taken)
            for s in specs:
                if s.batch_axis is None:
                    continue
                pend[s.name].append(arrays[s.name][pos : pos + k])
            if need_labels:
                assert labels is not None
                pend_lab.append(labels[pos : pos + k])
            have += k
            taken += k
            pos += k
            if have == size:
                yield emit()
        if taken >= limit:
            break
    if have:
        yield emit()


# ---------------------------------------------------------------------------------------- targets


def _softmax(z: NDArray[np.floating], axis: int) -> NDArray[np.float64]:
    z64 = z.astype(np.float64)
    z64 = z64 - z64.max(axis=axis, keepdims=True)
    e = np.exp(z64)
    return cast(NDArray[np.float64], e / e.sum(axis=axis, keepdims=True))


def head_probabilities(head: Head, preds: NDArray[np.floating]) -> NDArray[np.float64]:
    """``(count, P, C)`` float64 class distributions from the head tensor (``(count, *head.shape[1:])``)."""
    axis, C, P = head.class_axis, head.num_classes, head.positions
    assert axis is not None and C is not None
    q = np.moveaxis(preds, axis, -1).reshape(preds.shape[0], P, C)
    if head.kind == "logits":
        return _softmax(q, -1)
    q64 = np.clip(q.astype(np.float64), 0.0, None)
    s = q64.sum(-1, keepdims=True)
    return cast(NDArray[np.float64], np.where(s > 0, q64 / np.where(s > 0, s, 1.0), 1.0 / C))


def _tempered(p: NDArray[np.float64], tau: float) -> NDArray[np.float64]:
    """``p^(1/τ)`` renormalised over the last axis (the softmax of the logits divided by ``τ``)."""
    return _softmax(np.log(np.maximum(p, np.finfo(np.float64).tiny)) / tau, -1)


def make_targets(
    head: Head,
    fisher: str,
    labels: NDArray[np.int64] | None,
    preds: NDArray[np.floating] | None,
    rng: np.random.Generator,
    count: int,
    size: int,
    mini_batch: int,
    rows: int = 1,
    row0: int = 0,
    reference: NDArray[np.floating] | None = None,
    offsets: NDArray[np.float64] | None = None,
    temperature: float = 1.0,
) -> NDArray[np.float32]:
    """The loss weights ``T`` (``(size, *head.shape[1:])``) for ``count`` samples; rows ≥ count are 0.

    The graph loss is ``Σ T ⊙ f(h)``: ``T = −onehot(y)/m`` gives the mean cross-entropy/NLL of the
    ``m`` samples of a row; ``T = −ε/m`` gives the Gauss-Newton probe.  ``rng`` is consumed in sample
    order, so blocks of any size see the same draws.  ``fisher="kl"``: each input is repeated over
    ``rows`` consecutive rows and ``row0`` is the global index of this block's first row; the row
    ``r`` of an input gets ``T = −√p ⊙ e_r`` (exact class rows, when ``rows`` equals the number of
    classes and there is one position) or ``T = −√p ⊙ ε/√rows`` (Gaussian sketch).  With ``reference``
    class distributions (``(n_inputs, P, C)``) it also writes each row's offset ``b = Σ ε_c(p_c −
    ref_c)/√p_c`` into ``offsets[row0 : row0 + count]`` (see :class:`GradientMatrix`).
    ``temperature`` τ (with ``reference`` only): the rows and offsets model ``KL(p_τ ‖ q_τ)`` with
    ``p_τ ∝ p^(1/τ)`` (the softmax of the logits divided by τ): the rows above at the softened
    distributions, divided by τ, and the same offsets.
    """
    per = head.shape[1:]
    T = np.zeros((size, *per), np.float32)
    scale = -1.0 / mini_batch
    if count == 0:
        return T
    if head.kind == "regression":
        eps = rng.standard_normal((count, *per))
        T[:count] = (eps * scale).astype(np.float32)
        return T
    if head.kind == "binary":
        T[:count] = _binary_targets(head, fisher, labels, preds, rng, count) / mini_batch
        return T
    axis = head.class_axis
    C = head.num_classes
    assert axis is not None
    assert C is not None
    P = head.positions
    if fisher == "empirical":
        if labels is None:
            raise DataError("fisher='empirical' needs labels in the calibration data")
        if P != 1:
            raise DataError(f"labels of shape (batch,) cannot label an output of shape {list(head.shape)}")
        lab = labels[:count]
        bad = np.flatnonzero((lab < 0) | (lab >= C))
        if bad.size:
            i = int(bad[0])
            raise DataError(
                f"label {int(lab[i])} of calibration sample {i} (in its block) is outside [0, {C}): "
                f"the output {head.tensor!r} has {C} classes"
            )
        idx = lab.reshape(count, 1)
    else:
        assert preds is not None
        probs = head_probabilities(head, preds[:count])
        if fisher == "kl":
            ref = None if reference is None else reference[(row0 + np.arange(count)) // rows]
            tau = 1.0 if ref is None else float(temperature)
            if tau != 1.0 and ref is not None:
                probs, ref = _tempered(probs, tau), _tempered(np.asarray(ref, np.float64), tau)
            # curvature at the model's distribution q, or with a reference p at the midpoint r = (q + p)/2
            # (the KL's Hessian in the logits is diag(q) − qqᵀ *at the current q*; far from p its
            # Gauss-Newton step (p − q)/q explodes where q ≪ p, the midpoint keeps it near 2)
            r = probs if ref is None else 0.5 * (probs + ref)
            root = np.sqrt(r)
            if P == 1 and rows == C:
                eps = np.zeros_like(root)
                eps[np.arange(count), 0, (row0 + np.arange(count)) % C] = 1.0
            else:
                eps = rng.standard_normal(root.shape) / math.sqrt(rows)
            # T = (I − r1ᵀ)(√r ⊙ ε): a zero-sum target, so the row is Jᵀ(diag √r − r√rᵀ)ε whatever q is
            weights = root * eps
            weights -= r * (root * eps).sum(-1, keepdims=True)
            # with a temperature the logits are z/τ: the Jacobian and so every row carry 1/τ, and
            # Σ b·row = Jᵀ(q_τ − p_τ)/τ, the gradient of KL_τ, with b as below
            weights /= tau
            if ref is not None and offsets is not None:
                # the row is −Jᵀ(diag √r − r√rᵀ)ε (the loss is −Σ T log q), so b = −εᵀu with
                # u = (q − p)/√r gives Σ_rows b·row = Jᵀ(q − p) (in expectation over ε; exactly with every
                # class): the gradient of the KL from p to the model, in the span of the rows
                u = (probs - ref) / np.maximum(root, _ROOT_FLOOR)
                offsets[row0 : row0 + count] = -(eps * u).sum(axis=(1, 2))
            other = [d for k, d in enumerate(per, start=1) if k != axis]
            W = (scale * weights).astype(np.float32).reshape(count, *other, C)
            T[:count] = np.moveaxis(W, -1, axis)
            return T
        if fisher == "argmax":
            idx = probs.argmax(-1)
        else:
            u = rng.random((count, P))
            idx = np.minimum((np.cumsum(probs, -1) < u[..., None]).sum(-1), C - 1)
    onehot = np.zeros((count, P, C), np.float32)
    onehot[np.arange(count)[:, None], np.arange(P)[None, :], idx] = scale
    other = [d for k, d in enumerate(per, start=1) if k != axis]
    T[:count] = np.moveaxis(onehot.reshape(count, *other, C), -1, axis)
    return T


def _binary_targets(
    head: Head,
    fisher: str,
    labels: NDArray[np.int64] | None,
    preds: NDArray[np.floating] | None,
    rng: np.random.Generator,
    count: int,
) -> NDArray[np.float32]:
    """``T = σ(z) − y`` per element of a sigmoid head on its logits ``z``: the gradient of the binary
    cross-entropy ``softplus(z) − y·z`` is ``(σ(z) − y)·∂z``.  ``y`` is the label (empirical, one
    output per sample only), a Bernoulli draw from ``σ(z)`` (sampled: ``E[g gᵀ]`` is the Bernoulli
    Fisher ``Jᵀ diag(σ(1 − σ)) J``) or ``σ(z) > ½`` (argmax)."""
    per = head.shape[1:]
    assert preds is not None
    z = preds[:count].astype(np.float64)
    p = 0.5 * (1.0 + np.tanh(0.5 * z))  # σ(z) without overflow
    if fisher == "empirical":
        if labels is None:
            raise DataError("fisher='empirical' needs labels in the calibration data")
        if head.positions != 1:
            raise DataError(f"labels of shape (batch,) cannot label an output of shape {list(head.shape)}")
        lab = labels[:count]
        if np.any((lab < 0) | (lab > 1)):
            raise DataError(f"the sigmoid output {head.tensor!r} needs labels 0 or 1, got {sorted(set(lab.tolist()))}")
        y = lab.reshape(count, *per).astype(np.float64)
    elif fisher == "argmax":
        y = (p > 0.5).astype(np.float64)
    else:
        y = (rng.random((count, *per)) < p).astype(np.float64)
    return (p - y).astype(np.float32)


# ----------------------------------------------------------------------------------------- engine


@contextlib.contextmanager
def _blas_threads(n: int) -> Iterator[None]:
    """Limit NumPy's BLAS to ``n`` threads while the batched path runs (busy-waiting BLAS threads
    competing with onnxruntime made the im2col GEMMs many times slower)."""
    from ..blas import limit_blas_threads

    with limit_blas_threads(n):
        yield


def _np_dtype(elem_type: int) -> np.dtype[Any]:
    return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))


def _default_weights(model: onnx.ModelProto) -> list[str]:
    from ..graph import find_prunable

    return [t.name for t in find_prunable(model)]


def _tensor_shapes(model: onnx.ModelProto) -> dict[str, tuple[tuple[int, ...], int]]:
    """Initializers and Constant-node tensors of every scope: ``name -> (shape, elem_type)``."""
    from ..graph import walk_graphs

    out: dict[str, tuple[tuple[int, ...], int]] = {}
    for _, g in walk_graphs(model.graph):
        out.update({t.name: (tuple(int(d) for d in t.dims), int(t.data_type)) for t in g.initializer})
        for n in g.node:
            if n.op_type == "Constant" and n.output:
                for a in n.attribute:
                    if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                        out[n.output[0]] = (tuple(int(d) for d in a.t.dims), int(a.t.data_type))
    return out


class GradientEngine:
    """Builds the gradient graph(s) of one model once; computes per-sample gradient matrices.

    ``example`` is one calibration batch: it fixes the per-sample input shapes (dynamic dims are set
    to them, the batch dim to ``mini_batch``) and tells whether labels exist.  The weights are graph
    inputs of the gradient graphs, so :meth:`set_weights` changes them without rebuilding.
    ``method``: ``"single"`` (one gradient-graph run per row), ``"batched"`` (recipe B, verified,
    falls back to single), or ``"auto"`` (batched when eligible, verified and the prunable layers
    cost at most :data:`AUTO_BATCHED_MAX_MACS` per sample: a count, not a timing, so runs repeat).
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        weights: Sequence[str] | None = None,
        *,
        example: Batch,
        loss: Loss = "auto",
        output: str | None = None,
        mini_batch: int = 1,
        method: Method = "auto",
        chunk: int = 32,
        threads: int = 1,
    ) -> None:
        t0 = time.perf_counter()
        if loss not in ("auto", "ce", "mse"):
            raise ConfigError(f"loss must be auto, ce or mse, got {loss!r}")
        if method not in ("auto", "single", "batched"):
            raise ConfigError(f"method must be auto, single or batched, got {method!r}")
        if not isinstance(mini_batch, (int, np.integer)) or mini_batch < 1:
            raise ConfigError(f"mini_batch must be a positive integer, got {mini_batch!r}")
        self.m = int(mini_batch)
        self.method: Method = method
        self.chunk = max(1, int(chunk) // self.m) * self.m
        self.threads = max(1, int(threads))
        self.timings: dict[str, float] = {}

        names = list(weights) if weights is not None else _default_weights(model)
        if needs_twin(model, names):  # float16/float64 weights: differentiate a float32 twin
            model = float32_twin(model)
        model = _open_fixed_batch(model, example, self.m)
        known = _tensor_shapes(model)
        if not names:
            raise ModelError("no prunable weights: nothing to differentiate")
        if len(set(names)) != len(names):
            raise ConfigError(f"weights are listed twice: {sorted({w for w in names if names.count(w) > 1})}")
        for w in names:
            if w not in known:
                raise ConfigError(f"weight {w!r} is neither an initializer nor a Constant node of the model")
            if known[w][1] != onnx.TensorProto.FLOAT:
                raise ModelError(
                    f"weight {w!r} is {helper.tensor_dtype_to_np_dtype(known[w][1])}; "
                    "only float32 weights (float16/float64 through a float32 twin) are supported"
                )
        self.weights = tuple(names)
        self.layout = Layout.from_shapes((w, known[w][0]) for w in names)
        prunable = [w for w in self._prunable(model) if w in known and known[w][1] == onnx.TensorProto.FLOAT]
        self.updatable = tuple(dict.fromkeys([*names, *prunable]))

        # the example's shapes and labels; every batched input has its samples on axis 0 of the data
        # and its own batch axis in the model (static inputs: one value, the model's shape)
        from ..graph import model_inputs

        ex_inputs = example[0]
        self.batch_axes: dict[str, int | None] = {s.name: s.batch_axis for s in model_inputs(model)}
        self.sample_shapes = {
            k: tuple(int(d) for d in (np.shape(v) if self.batch_axes.get(k, 0) is None else np.shape(v)[1:]))
            for k, v in ex_inputs.items()
        }
        self.has_labels = example[1] is not None

        # output, head
        self.output = select_output(model, output)
        prod = {o: n for n in model.graph.node for o in n.output}

        def walk_back(t: str) -> str:
            while (node := prod.get(t)) is not None and node.op_type in ("ZipMap", "Identity", "Cast"):
                t = node.input[0]
            label = label_scores(model, t)  # a label output: its class scores
            return t if label is None else label.scores

        several = joint_outputs(model, output, loss)
        self._scales: tuple[float, ...] | None = None
        if len(several) > 1:
            # several outputs and none is a classifier (a detector, a recurrent model): one
            # Gauss-Newton head over all of them, each normalised by its scale (see .heads)
            tensors = tuple(walk_back(o) for o in several)
            self.output = ", ".join(several)
            self.norm = normalize(cut_to(model, list(tensors)))
        else:
            t = walk_back(self.output)
            self.norm = normalize(cut_to(model, t))
        self.example_inputs = {k: np.asarray(v) for k, v in ex_inputs.items()}
        #: The last forward :meth:`_forward` built while the engine is built: deciding the head builds
        #: a probe of the head tensor that the one-sample path then needs again (read as its kind).
        self._forward_memo: tuple[tuple[int, str | tuple[str, ...], tuple[float, ...] | None], Forward] | None = None
        self._remember_forward = True
        present = set(_tensor_shapes(self.norm))
        self.values: dict[str, NDArray[np.float32]] = {
            w: np.ascontiguousarray(v, dtype=np.float32)
            for w, v in get_weights(self.norm, [w for w in self.updatable if w in present]).items()
        }
        head_tensor: str | tuple[str, ...]
        kind: HeadKind
        if len(several) > 1:
            kind, head_tensor, axis = "regression", tensors, None
            self._scales = self._output_scales(tensors, ex_inputs)
            shown = ", ".join(f"{o} ({sc:.3g})" for o, sc in zip(several, self._scales, strict=True))
            why = f"{len(several)} outputs, none a class distribution; each divided by its RMS norm: {shown}"
        else:
            guess = find_head(self.norm, t)
            label = label_scores(model, self.output)
            if guess.kind is None and label is not None:  # the cut model ends before the ArgMax/TopK
                guess = find_head(model, self.output)
            kind, head_tensor, axis, why = self._decide_head(guess, loss, ex_inputs)
            if kind == "regression" and loss == "auto" and isinstance(head_tensor, str):
                mixed = self._mixed_scale_parts(head_tensor, ex_inputs)
                if mixed is not None:
                    head_tensor, self._scales = mixed
                    shown = ", ".join(f"{o} ({sc:.3g})" for o, sc in zip(head_tensor, self._scales, strict=True))
                    why = f"{why}; a Concat of parts on different scales, each divided by its RMS norm: {shown}"
        self.kind: HeadKind = kind
        self.head_reason = why  # why the head was read so (the --distill refusal repeats it)
        self.loss: Literal["ce", "mse"] = "mse" if kind == "regression" else "ce"
        if kind == "regression" and loss != "mse" and self.has_labels:
            hint = ""
            if len(several) > 1:
                hint = " (to fit one output's class scores to the labels instead: --output NAME)"
            log.warning("the calibration labels are not used: %s, so the loss is Gauss-Newton (%s)%s", why, kind, hint)
        self._head_args: tuple[HeadKind, str | tuple[str, ...], int | None] = (kind, head_tensor, axis)

        # the one-sample path
        self.fwd = self._forward(self.m)
        self._forward_memo, self._remember_forward = None, False
        self.head = self.fwd.head
        self.loss_description = describe_loss(self.head, head_tensor, why)
        log.info("loss: %s", self.loss_description)
        self.on_path = self.fwd.on_path
        self.guards = tuple(self.fwd.static.guards) if self.fwd.static is not None else ()
        if self.fwd.rewrites:
            log.info(
                "exact rewrites for gradients: %s",
                ", ".join(f"{k} ×{v}" for k, v in sorted(self.fwd.rewrites.items())),
            )
        # weights the cut model holds (in any scope) that the working copy lost: If inlining drops
        # those of untaken branches, and the dead code after it those of a taken branch that do not
        # feed the head (an If whose other outputs are not the loss): only the former are unreached
        present_now, present_cut = set(self.fwd.weight_inputs), set(_tensor_shapes(self.norm))
        lost = [w for w in self.weights if w in present_cut and w not in present_now]
        self.unreached = tuple(lost)
        if lost:
            from .static import weights_reached

            try:
                taken, _ = weights_reached(model, self._example_feeds(self.m), lost)  # every output kept
                self.unreached = tuple(w for w in lost if w not in set(taken))
            except ChitaError as exc:  # keep the coarser answer
                log.debug("could not tell untaken If branches from dead code (%s)", exc)
        if self.unreached:
            log.warning(
                "%d weight(s) sit in If branches the calibration data does not take; their gradient columns "
                "are zero: %s",
                len(self.unreached),
                ", ".join(self.unreached[:5]) + (" ..." if len(self.unreached) > 5 else ""),
            )
        missing = [w for w in self.weights if w not in self.on_path and w not in self.unreached]
        if missing:
            log.warning(
                "%d weight(s) do not influence the loss; their gradient columns are zero: %s",
                len(missing),
                ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else ""),
            )
        tb = time.perf_counter()
        self._single: Runner | None = None
        self._target = ""
        self._loss_name = ""
        if self.on_path:
            lm, self._target, lname = attach_loss(self.fwd)
            self._loss_name = lname
            gm = build_gradient_model(lm, self.on_path, lname)
            self.timings["build"] = time.perf_counter() - tb
            ts = time.perf_counter()
            self._single = Runner(gm, self.values, self.threads, check=False)
            self.timings["session"] = time.perf_counter() - ts
        self._predictor: Runner | None = None
        self._pred_buf: NDArray[Any] | None = None
        self._fast_pred: tuple[Runner, NDArray[Any]] | None = None
        self._fast_pred_ok = False
        self._fast_pred_failed = False
        self._batched: BatchedPath | None = None
        self._batched_failed = ""
        self._direction_checked = False
        #: ``((seed, fisher, rows per input, head), next first_sample, generator)`` after a call: a call
        #: that goes on from there (the chunks of a streamed pass) continues the generator instead of
        #: re-drawing every earlier chunk's targets to skip them (quadratic in the chunks).
        self._draws: tuple[tuple[int, str, int, str], int, np.random.Generator] | None = None
        self.timings["engine"] = time.perf_counter() - t0

    # -- construction helpers -------------------------------------------------------------------

    @staticmethod
    def _prunable(model: onnx.ModelProto) -> list[str]:
        try:
            return _default_weights(model)
        except ChitaError:
            return []

    def _forward(
        self,
        batch: int,
        kind: HeadKind | None = None,
        tensor: str | tuple[str, ...] | None = None,
        axis: int | None = None,
        scales: tuple[float, ...] | None = None,
    ) -> Forward:
        k, t, a = self._head_args if kind is None else (kind, tensor, axis)
        assert t is not None
        sc = self._scales if kind is None else scales
        key = (batch, t, sc)
        memo = self._forward_memo
        if memo is not None and memo[0] == key and isinstance(t, str):
            again = with_head(memo[1], k, t, a)  # the same graph (the probe of _decide_head), read as k
            if again is not None:
                return again
        fwd = build_forward(
            self.norm,
            k,
            t,
            a,
            batch=batch,
            sample_shapes=self.sample_shapes,
            batch_axes=self.batch_axes,
            weights=self.weights,
            updatable=self.updatable,
            scales=sc,
            feeds=self._example_feeds(batch),
            # other batch sizes (batched path, block predictions) are checked against this one
            self_check=batch == self.m,
        )
        if self._remember_forward:
            kept = onnx.ModelProto()
            kept.CopyFrom(fwd.model)  # never handed out: a caller may change its own copy
            self._forward_memo = (key, replace(fwd, model=kept))
        return fwd

    def _run_probe(self, probe: Forward, ex_inputs: Mapping[str, Any], b: int) -> NDArray[Any]:
        """The head tensor of ``probe`` on the first ``b`` example samples (dense weights)."""
        runner = Runner(probe.model, self.values, self.threads)
        arrays, _, _ = _check_batch(Batch(ex_inputs, None), self._specs(probe), None)
        for name, arr in self._model_feed(arrays, 0, b).items():
            runner.bind_input(name, arr)
        y = np.zeros(probe.head.shape, _np_dtype(probe.head.elem_type))
        runner.bind_output_array(probe.head.tensor, y)
        runner.run()
        return y

    def _probe_batch(self, ex_inputs: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        size = self._block_size(ex_inputs)
        b = self.m if size >= self.m else size
        return {
            k: np.asarray(v) if self.batch_axes.get(k, 0) is None else np.asarray(v)[:b] for k, v in ex_inputs.items()
        }, b

    def _output_scales(self, tensors: tuple[str, ...], ex_inputs: Mapping[str, Any]) -> tuple[float, ...]:
        """Per-output scales of the combined Gauss-Newton head, from up to :data:`SCALE_SAMPLES`
        samples of the example batch (at once, or ``mini_batch`` at a time for a fixed-batch model)."""
        from .heads import output_scales

        full = min(self._block_size(ex_inputs), SCALE_SAMPLES)
        try:
            probe = self._forward(full, "regression", tensors, None, None)
            y = self._run_probe(probe, ex_inputs, full)
        except ChitaError:
            probe = self._forward(self.m, "regression", tensors, None, None)
            parts = []
            for lo in range(0, max(full - self.m + 1, 1), self.m):
                part = {k: v if self.batch_axes.get(k, 0) is None else np.asarray(v)[lo:] for k, v in ex_inputs.items()}
                parts.append(self._run_probe(probe, part, self.m))
            y = np.concatenate(parts)
        return tuple(output_scales(y.reshape(y.shape[0], -1), probe.segments))

    def _mixed_scale_parts(
        self, tensor: str, ex_inputs: Mapping[str, Any]
    ) -> tuple[tuple[str, ...], tuple[float, ...]] | None:
        """The inputs of the ``Concat`` that computes ``tensor`` and their RMS norms, when those
        differ by at least :data:`MIXED_SCALE_RATIO` (else ``None``: the head stays ``tensor``)."""
        node = next((n for n in self.norm.graph.node if tensor in n.output), None)
        if node is None or node.op_type != "Concat" or node.domain not in ("", "ai.onnx"):
            return None
        parts = tuple(dict.fromkeys(i for i in node.input if i))
        if len(parts) < 2 or len(parts) != len([i for i in node.input if i]):
            return None  # a part repeated (or an empty name): the parts are not the output's elements once
        try:
            scales = self._output_scales(parts, ex_inputs)
        except Exception as exc:  # a part whose shape cannot be inferred or run alone: keep the plain head
            log.debug("Concat parts of %r not measured (%s)", tensor, first_line(exc))
            return None
        if max(scales) < MIXED_SCALE_RATIO * min(scales):
            return None
        return parts, scales

    def _example_feeds(self, batch: int) -> dict[str, NDArray[Any]]:
        """The first ``batch`` samples of the example (repeated when it has fewer), in the model's
        input dtypes: shape folding runs the working copy on them."""
        dtypes = {
            vi.name: np.dtype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type))
            for vi in self.norm.graph.input
        }
        out: dict[str, NDArray[Any]] = {}
        for name, v in self.example_inputs.items():
            axis = self.batch_axes.get(name, 0)
            if axis is None:  # a static input: one value for every sample
                arr = v
            else:
                arr = v[:batch] if v.shape[0] >= batch else np.resize(v, (batch, *v.shape[1:]))
                if axis != 0:
                    arr = np.moveaxis(arr, 0, axis)
            want = dtypes.get(name)
            if want is not None and arr.dtype != want and np.can_cast(arr.dtype, want, "same_kind"):
                arr = arr.astype(want)
            out[name] = np.require(arr, requirements="C")  # np.ascontiguousarray would make a scalar 1-D
        return out

    def _check_guards(self, inputs: Mapping[str, NDArray[Any]], block: int) -> None:
        """Every calibration block must take the If branches the working copy was built with."""
        if not self.guards:
            return
        from .static import weights_reached

        _, seen = weights_reached(self.norm, self._model_feed(inputs, 0, self._block_size(inputs)), ())
        now = {g.node: g.value for g in seen}
        for g in self.guards:
            if g.node in now and now[g.node] != g.value:
                raise DataError(
                    f"calibration block {block} takes the other branch of If node {g.node!r} (condition "
                    f"{g.tensor!r} is {now[g.node]}, the first batch gave {g.value}); all calibration "
                    "batches must agree"
                )

    def _decide_head(
        self, guess: Any, loss: Loss, ex_inputs: Mapping[str, Any]
    ) -> tuple[HeadKind, str, int | None, str]:
        if loss == "mse":
            return "regression", guess.output, None, "loss='mse'"
        if guess.kind is not None:
            return cast(HeadKind, guess.kind), guess.tensor, guess.class_axis, guess.reason
        # Decide from the data: a forward run on the example batch.
        ex_inputs, b = self._probe_batch(ex_inputs)
        probe = self._forward(b, "regression", guess.tensor, None)
        shape = probe.head.shape
        axis = default_class_axis(shape)
        y: NDArray[Any] | None = None
        if axis is not None and shape[axis] >= 2:
            y = self._run_probe(probe, ex_inputs, b)
            sums = y.astype(np.float64).sum(axis=axis)
            if y.min() >= -1e-6 and np.all(np.abs(sums - 1.0) <= 1e-4):
                return "probabilities", guess.tensor, axis, "non-negative rows summing to one"
        has_class_axis = axis is not None and shape[axis] >= 2 and int(np.prod(shape[1:])) == shape[axis]
        if loss == "ce" or (self.has_labels and has_class_axis):
            if not has_class_axis:
                raise ConfigError(f"loss='ce': the output {guess.output!r} of shape {list(shape)} has no class axis")
            return (
                "logits",
                guess.tensor,
                axis,
                (
                    "loss='ce': output used as logits"
                    if loss == "ce"
                    else "no softmax; labels given: output used as logits"
                ),
            )
        if has_class_axis:  # could be a classifier's raw logits: say how to have them read as such
            return "regression", guess.tensor, None, RAW_LOGITS
        return "regression", guess.tensor, None, "not a class distribution"

    # -- public API -----------------------------------------------------------------------------

    @property
    def output_scales(self) -> tuple[float, ...] | None:
        """The scales that divide each output of a multi-output Gauss-Newton head (else ``None``)."""
        return self._scales

    def set_weights(self, values: Mapping[str, NDArray[np.floating]]) -> None:
        """Replace weight values (any of :attr:`updatable`) without rebuilding the gradient graphs."""
        new: dict[str, NDArray[np.float32]] = {}
        for name, v in values.items():
            if name not in self.values:
                if name in self.updatable:  # cut away with everything that does not reach the loss: no effect
                    continue
                raise ConfigError(f"cannot set weight {name!r}: not an updatable weight of this engine")
            arr = np.ascontiguousarray(v, dtype=np.float32)
            if arr.shape != self.values[name].shape:
                raise ConfigError(f"weight {name!r}: shape {list(arr.shape)}, expected {list(self.values[name].shape)}")
            new[name] = arr.copy()
        self.values.update(new)
        for r in (self._single, self._predictor, self._fast_pred[0] if self._fast_pred else None):
            if r is not None:
                r.bind_weights(new)
        self._fast_pred_ok = False  # re-check the batched forward with the new weights
        if self._batched is not None:
            self._batched.bind_weights(new)

    def resolve_fisher(self, fisher: Fisher, has_labels: bool) -> Literal["empirical", "sampled", "argmax", "kl"]:
        if fisher not in ("auto", "empirical", "sampled", "argmax", "kl"):
            raise ConfigError(f"fisher must be auto, empirical, sampled, argmax or kl, got {fisher!r}")
        if self.kind == "regression":
            if fisher in ("empirical", "argmax"):
                raise ConfigError(
                    f"fisher={fisher!r} is not defined for the Gauss-Newton (mse) loss; use 'sampled' or 'auto'"
                )
            return "sampled"
        if fisher == "auto":
            # labels of shape (batch,) label one prediction per sample, not a map or a sequence
            return "empirical" if has_labels and self.head.positions == 1 else "sampled"
        if fisher == "empirical" and not has_labels:
            raise DataError("fisher='empirical' needs labels in the calibration data")
        if fisher == "kl" and self.m != 1:
            raise ConfigError(f"fisher='kl' needs per-sample rows (mini_batch=1), got mini_batch={self.m}")
        return fisher

    def rows_per_sample(self, fisher: str, fisher_rows: int = 1) -> int:
        """Rows of ``X`` per input: 1, or for ``fisher="kl"`` the number of classes when the head has
        at most ``fisher_rows`` of them and one position (exact), else ``fisher_rows`` (sketch)."""
        if fisher != "kl" or self.kind == "regression":
            return 1
        if int(fisher_rows) < 1:
            raise ConfigError(f"fisher_rows must be ≥ 1, got {fisher_rows}")
        C = self.head.num_classes
        if C is not None and self.head.positions == 1 and fisher_rows >= C:
            return int(C)
        return int(fisher_rows)

    def compute(
        self,
        data: CalibrationSource,
        *,
        fisher: Fisher = "auto",
        num_samples: int | None = None,
        seed: int = 0,
        out: NDArray[np.float32] | None = None,
        workdir: str | os.PathLike[str] | None = None,
        fisher_rows: int = 1,
        reference: NDArray[np.floating] | None = None,
        first_sample: int = 0,
        temperature: float = 1.0,
    ) -> GradientMatrix:
        """The gradient matrix of ``data`` (first ``num_samples`` samples; ``n = ⌊N/m⌋`` rows, times
        :meth:`rows_per_sample` for ``fisher="kl"``).  ``reference`` (``fisher="kl"`` only): the
        class distributions ``(n, P, C)`` of a reference model on the same samples (e.g. the dense
        model's :meth:`probabilities`); the result then carries the row ``offsets`` of the KL from
        them to the model (at ``temperature`` τ: of ``KL(p_τ ‖ q_τ)``, see :func:`make_targets`).
        ``first_sample``: ``data`` starts at that row (of ``m`` samples) of a longer source, so
        the seeded draws (sampled labels, sketches, probes) are the ones that source would get
        there: rows computed in chunks equal the rows of one pass."""
        t0 = time.perf_counter()
        c0 = time.process_time()
        with _blas_threads(self.threads):
            return self._compute(
                data, fisher, num_samples, seed, out, workdir, t0, c0, fisher_rows, reference, first_sample, temperature
            )

    def _compute(
        self,
        data: CalibrationSource,
        fisher: Fisher,
        num_samples: int | None,
        seed: int,
        out: NDArray[np.float32] | None,
        workdir: str | os.PathLike[str] | None,
        t0: float,
        c0: float,
        fisher_rows: int = 1,
        reference: NDArray[np.floating] | None = None,
        first_sample: int = 0,
        temperature: float = 1.0,
    ) -> GradientMatrix:
        if not temperature > 0:
            raise ConfigError(f"temperature must be positive, got {temperature}")
        if num_samples is not None and num_samples < 1:
            raise ConfigError(f"num_samples must be positive, got {num_samples}")
        batched = [k for k, a in self.batch_axes.items() if a is not None]
        total, has_labels = _count_samples(data, num_samples, batched)
        used = min(total, num_samples) if num_samples is not None else total
        n = used // self.m
        if n < 1:
            raise DataError(f"the calibration data has {total} sample(s); mini_batch={self.m} needs at least {self.m}")
        fk = self.resolve_fisher(fisher, has_labels)
        if reference is not None and (fk != "kl" or self.kind == "regression"):
            raise ConfigError("reference distributions (the KL offsets) need fisher='kl' on a classifier head")
        need_labels = fk == "empirical" and self.kind != "regression"
        reps = self.rows_per_sample(fk, fisher_rows)
        rows_of_inputs = n
        if reps > 1:  # every input is repeated over its rows (consecutive), each with its own target
            data = _Repeated(data, reps, batched)
            n *= reps
        offsets = None if reference is None else np.zeros(n, np.float64)
        if reference is not None and reference.shape[0] * reps < n:
            raise ConfigError(f"reference distributions cover {reference.shape[0]} inputs, need {n // reps}")
        p = self.layout.p
        timings = dict(self.timings)
        ta = time.perf_counter()
        timings["count"] = ta - t0
        X = self._allocate(n, p, out, workdir)
        tg = time.perf_counter()
        cg = time.process_time()
        timings["allocate"] = tg - ta
        draws_key = (seed, fk, reps, self.kind)
        kept, self._draws = self._draws, None
        if first_sample and kept is not None and kept[:2] == (draws_key, first_sample):
            rng = kept[2]  # the previous call ended where this one starts: its generator goes on
        else:
            rng = np.random.default_rng(seed)
            if first_sample:
                self._skip_draws(rng, fk, reps, first_sample * self.m)  # first_sample counts rows
        specs = self._specs(self.fwd)

        # "batched": build the batched path now.  "auto": the same, when there is more than one block
        # and the rows are cheap (it saves per-call overhead; on layers costing more than
        # AUTO_BATCHED_MAX_MACS per row its NumPy GEMMs are no faster than onnxruntime's and it cannot
        # win back its build and check).  Decided before the first block, from counts only, so every
        # call with the same data computes every row the same way.
        may_batch = self._single is not None and self.method != "single" and not self._batched_failed
        wanted = self.method == "batched" or self._batched is not None
        if may_batch and not wanted and self.method == "auto" and n * self.m > self.chunk:
            macs = self.macs_per_row
            wanted = macs is not None and macs <= AUTO_BATCHED_MAX_MACS
            if not wanted:
                log.debug("rows cost %s multiply-adds: the batched path cannot pay off", macs)
        use_batched = may_batch and wanted and self._try_batched()
        chosen: Literal["single", "batched"] = "batched" if use_batched else "single"
        if self._single is None:
            X[...] = 0
        else:
            size = self.chunk if may_batch else self.m * max(1, 64 // self.m)
            verified = False
            row = 0
            t_fwd = t_chk = 0.0
            nblocks = -(-(n * self.m) // size)
            for block_no, block in enumerate(
                progress(
                    _stream(data, specs, size, n * self.m, need_labels, pad=may_batch),
                    total=nblocks,
                    desc="per-sample gradients",
                    unit="block",
                )
            ):
                self._check_guards(block.inputs, block_no)
                rows = block.count // self.m
                preds = None
                if self.kind == "binary" or (fk != "empirical" and self.kind != "regression"):
                    tf = time.perf_counter()
                    preds = self._predict(block.inputs, block.count)
                    t_fwd += time.perf_counter() - tf
                T = make_targets(
                    self.head,
                    fk,
                    block.labels,
                    preds,
                    rng,
                    block.count,
                    self._block_size(block.inputs),
                    self.m,
                    reps,
                    row,
                    reference,
                    offsets,
                    temperature,
                )
                if use_batched and self._batched is not None:
                    if not verified:
                        tc = time.perf_counter()
                        verified = True
                        if not self._verify(block, T, X, row, rows):
                            use_batched, chosen = False, "single"
                        self._check_direction(block.inputs, T, X, row, rows)
                        t_chk += time.perf_counter() - tc
                        row += rows
                        continue
                    self._batched.run(
                        self._model_feed(block.inputs, 0, self._block_size(block.inputs)), T, X, row, rows
                    )
                else:
                    self._single_rows(block.inputs, T, X, row, rows)
                    if not self._direction_checked:
                        tc = time.perf_counter()
                        self._check_direction(block.inputs, T, X, row, rows)
                        t_chk += time.perf_counter() - tc
                row += rows
            if row != n:  # pragma: no cover - guarded by the counting pass
                raise DataError(
                    f"the calibration source yielded {row * self.m} samples on the second pass, "
                    f"{n * self.m} on the first"
                )
            timings["forward"] = t_fwd
            timings["self_check"] = t_chk
            for s in self.layout.slots:
                if s.name not in self.on_path:
                    X[:, s.offset : s.stop] = 0
        timings["gradients"] = time.perf_counter() - tg
        timings["gradients_cpu"] = time.process_time() - cg
        timings["total"] = time.perf_counter() - t0
        timings["total_cpu"] = time.process_time() - c0
        for key, value in self.timings.items():  # engine-level phases (build, batched build, ...)
            timings.setdefault(key, value)
        self._draws = (draws_key, first_sample + rows_of_inputs, rng)
        return GradientMatrix(
            X=X,
            layout=self.layout,
            loss=self.loss,
            fisher=fk,
            n=n,
            timings=timings,
            head=self.kind,
            output=self.output,
            mini_batch=self.m,
            method=chosen,
            loss_description=self.loss_description,
            rows_per_sample=reps,
            offsets=offsets,
        )

    def probabilities(self, data: CalibrationSource, num_samples: int | None = None) -> NDArray[np.float64]:
        """The model's class distributions ``(n, P, C)`` (float64) on the first ``num_samples`` samples,
        at the current weights (one forward pass per block; for ``soft`` targets later)."""
        if self.kind == "regression":
            logits = self.head_reason.startswith(RAW_LOGITS)
            raise ConfigError(
                f"--distill: output {self.output!r} is not a class distribution (logits or probabilities), "
                "so there is no KL to the dense model to fit; drop --distill"
                + (", or add --loss ce if it holds a classifier's raw logits (no softmax, no labels)" if logits else "")
            )
        batched = [k for k, a in self.batch_axes.items() if a is not None]
        total, _ = _count_samples(data, num_samples, batched)
        n = min(total, num_samples) if num_samples is not None else total
        specs = self._specs(self.fwd)
        C, P = self.head.num_classes, self.head.positions
        assert C is not None
        out = np.zeros((n, P, C), np.float64)
        row = 0
        size = self.chunk
        with _blas_threads(self.threads):
            for block in _stream(data, specs, size, n, False, pad=True):
                preds = self._predict(block.inputs, block.count)
                out[row : row + block.count] = head_probabilities(self.head, preds[: block.count])
                row += block.count
        return out

    # -- internals ------------------------------------------------------------------------------

    def _skip_draws(self, rng: np.random.Generator, fk: str, reps: int, samples: int) -> None:
        """Advance ``rng`` past the draws :func:`make_targets` makes for ``samples`` samples."""
        per = self.head.shape[1:]
        C, P = self.head.num_classes, self.head.positions
        if self.kind == "regression":
            rng.standard_normal((samples, *per))
        elif fk == "sampled":
            rng.random((samples, P))
        elif fk == "kl" and C is not None and not (P == 1 and reps == C):
            rng.standard_normal((samples * reps, P, C))

    @staticmethod
    def _allocate(
        n: int, p: int, out: NDArray[np.float32] | None, workdir: str | os.PathLike[str] | None
    ) -> NDArray[np.float32]:
        if out is not None:
            if out.shape != (n, p) or out.dtype != np.float32 or not out.flags.c_contiguous or not out.flags.writeable:
                raise ConfigError(
                    f"out must be a writeable C-contiguous float32 array of shape ({n}, {p}); "
                    f"got {out.dtype} {out.shape}"
                )
            return out
        if workdir is not None:
            folder = os.fspath(workdir)
            if not os.path.isdir(folder):
                raise ConfigError(f"workdir {folder!r} is not a folder")
            fd, path = tempfile.mkstemp(prefix="chita_gradients_", suffix=".f32", dir=folder)
            os.close(fd)
            log.info("gradient matrix (%d x %d, %.2f GiB) memory-mapped at %s", n, p, n * p * 4 / 2**30, path)
            return np.memmap(path, dtype=np.float32, mode="w+", shape=(n, p))
        X = np.zeros((n, p), np.float32)
        X.reshape(-1)[:: 4096 // 4] = 0  # fault every page in now, not inside onnxruntime's writes
        return X

    def _specs(self, fwd: Forward) -> list[_InputSpec]:
        """The working copy's data inputs with per-sample shapes (batch axis removed)."""
        out = []
        for name, dtype, shape in fwd.data_inputs:
            axis = self.batch_axes.get(name, 0)
            sample = shape if axis is None else shape[:axis] + shape[axis + 1 :]
            out.append(_InputSpec(name, dtype, tuple(sample), axis))
        return out

    def _model_feed(self, inputs: Mapping[str, NDArray[Any]], lo: int, hi: int) -> dict[str, NDArray[Any]]:
        """Samples ``lo:hi`` of samples-first block arrays, each moved to its model batch axis
        (contiguous); static inputs as they are."""
        out: dict[str, NDArray[Any]] = {}
        for name, arr in inputs.items():
            axis = self.batch_axes.get(name, 0)
            if axis is None:
                out[name] = np.require(arr, requirements="C")
            elif axis == 0:
                out[name] = arr[lo:hi] if arr[lo:hi].flags.c_contiguous else np.ascontiguousarray(arr[lo:hi])
            else:
                out[name] = np.ascontiguousarray(np.moveaxis(arr[lo:hi], 0, axis))
        return out

    def _bind_block(self, runner: Runner, inputs: Mapping[str, NDArray[Any]], lo: int, hi: int) -> None:
        for name, arr in self._model_feed(inputs, lo, hi).items():
            runner.bind_input(name, arr)

    def _check_direction(
        self,
        inputs: Mapping[str, NDArray[Any]],
        T: NDArray[np.float32],
        X: NDArray[np.float32],
        row0: int,
        rows: int,
    ) -> None:
        """Check one row of the first block against the model's own loss, once per engine.

        For the row ``g`` of largest norm among the first rows of the block ``X[row0 : row0 + rows]``
        (its inputs and targets ``T`` as computed), the derivative ``g·u`` along a unit direction
        ``u`` must match central differences of the loss ``(ℓ(w + εu) − ℓ(w − εu))/2ε`` (forward-only
        runs of the gradient graph with the weights moved).  Directions: ``g/‖g‖`` over all the
        weights (sees wrong values wherever the gradient is large), then for each kind of consuming
        node (Conv, Gemm, LSTM, ...) a random-sign direction that moves each of its weights in
        proportion to its size (sees a kernel that is wrong for one kind of layer, including a
        gradient that is wrongly zero).  Steps: :data:`DIRECTION_STEP`, shrinking until one agrees.
        A disagreement that holds still over the large steps means onnxruntime-training computes a
        wrong gradient for some op of this model (as its grouped 1-D ConvGrad did): raises
        :class:`~chita_onnx.errors.WrongGradientError`, naming the tensors whose own check fails.
        Quotients that drift with the step (a kink or a sharp feature next to ``w``, or rounding)
        leave it unconfirmed (debug log)."""
        runner = self._single
        if self._direction_checked or runner is None or rows < 1:
            return
        self._direction_checked = True
        slots = [s for s in self.layout.slots if s.name in self.on_path and s.name in runner.input_names]
        if not slots:
            return
        block = X[row0 : row0 + min(rows, CHECK_ROWS)]
        sq = sum(np.einsum("ij,ij->i", block[:, s.offset : s.stop], block[:, s.offset : s.stop]) for s in slots)
        r = int(np.argmax(sq))
        if not np.isfinite(sq[r]):
            return
        grad = {s.name: block[r, s.offset : s.stop] for s in slots}  # float32 views
        m = self.m
        loss = np.zeros((), np.float32)
        self._bind_block(runner, inputs, r * m, (r + 1) * m)
        runner.bind_input(self._target, T[r * m : (r + 1) * m])
        runner.io.clear_binding_outputs()
        runner.bind_output_array(self._loss_name, loss)
        flat = {s.name: self.values[s.name].reshape(-1) for s in slots}
        w_norm = math.sqrt(sum(float(np.dot(v, v)) for v in flat.values()))
        eps = DIRECTION_STEP * max(w_norm, 1e-6)
        rng = np.random.default_rng(_PROBE_SEED)

        def check(part: Sequence[Any], along: str) -> tuple[float, list[float], str]:
            """``(a, quotients, verdict)`` for the direction ``along`` ("gradient" or "weights") over
            the tensors ``part``.  Each quotient is compared with the derivative the gradient gives
            for the displacement float32 really makes; the "weights" direction's tolerance scales
            with ``√Σ u_j² g_j²`` (the size ``a`` has for random signs: ``a`` may be near 0 by
            chance)."""
            if along == "gradient":
                u = {s.name: grad[s.name].astype(np.float32) for s in part}
            else:
                pm = np.asarray([-1.0, 1.0], np.float32)
                u = {s.name: np.abs(flat[s.name]) * rng.choice(pm, size=s.size) for s in part}
            norm = math.sqrt(sum(float(np.dot(v, v)) for v in u.values()))
            if not norm > 0:
                return 0.0, [], "unconfirmed"
            for v in u.values():
                v /= norm
            a = sum(float(np.dot(u[s.name], grad[s.name])) for s in part)
            spread = math.sqrt(sum(float(np.dot(u[s.name] * grad[s.name], u[s.name] * grad[s.name])) for s in part))
            scale = abs(a) if along == "gradient" else max(abs(a), spread)
            quot: list[float] = []
            want: list[float] = []
            tol: list[float] = []
            plus = {s.name: np.empty(s.size, np.float32) for s in part}
            minus = {s.name: np.empty(s.size, np.float32) for s in part}
            first_k = DIRECTION_GRADIENT_START if along == "gradient" else 0
            for k in range(first_k, first_k + DIRECTION_STEPS):
                step = eps / DIRECTION_SHRINK**k
                for s in part:
                    np.multiply(u[s.name], np.float32(step), out=minus[s.name])
                    np.add(flat[s.name], minus[s.name], out=plus[s.name])
                    np.subtract(flat[s.name], minus[s.name], out=minus[s.name])
                vals = []
                for moved in (plus, minus):
                    runner.bind_weights({s.name: moved[s.name].reshape(s.shape) for s in part})
                    runner.run()
                    vals.append(float(loss))
                d_g = d_d = 0.0  # the displacement float32 made, against g and against itself
                for s in part:
                    np.subtract(plus[s.name], minus[s.name], out=plus[s.name])
                    d_g += float(np.dot(plus[s.name], grad[s.name]))
                    d_d += float(np.dot(plus[s.name], plus[s.name]))
                kept = math.sqrt(d_d) / (2.0 * step)  # 1 unless rounded away
                floor = DIRECTION_NOISE * max(abs(vals[0]), abs(vals[1]))
                if kept < DIRECTION_KEPT or max(abs(vals[0] - vals[1]), abs(d_g)) <= floor:
                    break  # float32 rounds this step away (the weights, or the loss): smaller ones say nothing
                quot.append((vals[0] - vals[1]) / (2.0 * step))
                want.append(d_g / (2.0 * step))
                tol.append(DIRECTION_AGREE * scale * kept)
                if abs(quot[-1] - want[-1]) <= tol[-1]:
                    break
            runner.bind_weights({s.name: self.values[s.name] for s in part})
            if quot and abs(quot[-1] - want[-1]) <= tol[-1]:
                return a, quot, "agrees"
            # a run of steps from the largest ones over which the quotient holds still (in a smooth region
            # the large steps settle first; a run that starts further down is rounding or a sharp feature)
            for k in range(min(2, len(quot) - DIRECTION_RUN + 1)):
                run = quot[k : k + DIRECTION_RUN]
                mid = float(np.median(run))
                still = mid != 0 and all(abs(q - mid) <= DIRECTION_STABLE * abs(mid) for q in run)
                pairs = zip(run, want[k : k + DIRECTION_RUN], strict=True)
                if still and all(abs(q - w_) > DIRECTION_WRONG * max(abs(q), abs(w_)) for q, w_ in pairs):
                    return a, quot, "wrong"
            return a, quot, "unconfirmed"

        def show(q: list[float]) -> str:
            return " / ".join(f"{v:.4g}" for v in q)

        op_of = {i: n.op_type for n in self.fwd.model.graph.node for i in n.input}
        kinds: dict[str, list[Any]] = {}
        for s in slots:
            kinds.setdefault(op_of.get(s.name, "?"), []).append(s)
        checks = [("all", slots, "gradient"), ("all", slots, "weights")]
        if len(kinds) > 1:
            checks += [(k, v, "weights") for k, v in sorted(kinds.items())]
        wrong: list[Any] = []
        first: tuple[float, list[float]] = (0.0, [])
        try:
            for label, part, along in checks:
                a, quot, how = check(part, along)
                log.debug("directional check of row %d (%s, along the %s): derivative %.6g, difference "
                          "quotients %s: %s", row0 + r, label, along, a, show(quot), how)  # fmt: skip
                if how == "wrong":
                    wrong, first = part, (a, quot)
                    break
            if not wrong:
                return
            energy = {s.name: float(np.dot(grad[s.name], grad[s.name])) for s in wrong}
            ranked = sorted(wrong, key=lambda s: (-energy[s.name], -s.size))[:DIRECTION_TENSORS]
            bad = []
            for s in ranked:
                for along in ("gradient", "weights"):
                    a_s, q_s, how_s = check([s], along)
                    log.debug("  %s along the %s: derivative %.6g, difference quotients %s: %s",
                              s.name, along, a_s, show(q_s), how_s)  # fmt: skip
                    if how_s == "wrong":
                        bad.append(f"{s.name} (derivative {a_s:.3g}, differences {q_s[-1]:.3g})")
                        break
        finally:
            runner.io.clear_binding_outputs()
        named = "; wrong for " + ", ".join(bad[:5]) if bad else ""
        raise WrongGradientError(
            f"onnxruntime-training's per-sample gradient disagrees with finite differences of the model's own "
            f"loss (sample {row0 + r}: directional derivative {first[0]:.4g}, differences {show(first[1])})"
            f"{named}; an op of this model has a wrong gradient kernel"
        )

    def _single_rows(
        self,
        inputs: Mapping[str, NDArray[Any]],
        T: NDArray[np.float32],
        X: NDArray[np.float32],
        row0: int,
        rows: int,
    ) -> None:
        """Rows ``row0 : row0 + rows`` with one gradient-graph run each (recipe A′)."""
        runner = self._single
        assert runner is not None
        m = self.m
        base = X.ctypes.data
        p = X.shape[1]
        slots = [(f"{s.name}_grad", s.shape, s.offset) for s in self.layout.slots if s.name in self.on_path]
        for r in range(rows):
            self._bind_block(runner, inputs, r * m, (r + 1) * m)
            runner.bind_input(self._target, T[r * m : (r + 1) * m])
            addr = base + 4 * (row0 + r) * p
            for name, shape, off in slots:
                runner.bind_output_at(name, shape, addr + 4 * off)
            runner.run()

    def _predict(self, inputs: Mapping[str, NDArray[Any]], count: int) -> NDArray[np.float32]:
        """The head tensor (logits/probabilities) for the first ``count`` samples of a block.

        Uses one forward run per block at the block's batch size once that forward has been checked
        against the batch-``m`` forward on the first block (fixed-batch exports fail the check or
        the build, and then every ``m`` samples get their own run).
        """
        size = self._block_size(inputs)
        out = np.zeros((size, *self.head.shape[1:]), np.float32)
        fast = self._block_predictor(size)
        if fast is not None and (self._fast_pred_ok or count >= self.m):
            runner, buf = fast
            for name, arr in self._model_feed(inputs, 0, size).items():
                runner.bind_input(name, arr)
            runner.run()
            if self._fast_pred_ok:
                out[:count] = buf[:count]
                return out
            k = min(count, CHECK_ROWS * self.m)
            ref = self._predict_small(inputs, k, size)
            scale = max(float(np.abs(ref[:k]).max()), 1e-30)
            if float(np.abs(buf[:k] - ref[:k]).max()) <= 1e-5 * scale:
                self._fast_pred_ok = True
                out[:count] = buf[:count]
                return out
            log.info("batched forward disagrees with the batch-%d forward: predicting %d at a time", self.m, self.m)
            self._fast_pred = None
            self._fast_pred_failed = True
        return self._predict_small(inputs, count, size)

    def _block_predictor(self, size: int) -> tuple[Runner, NDArray[Any]] | None:
        if size == self.m or self._fast_pred_failed:
            return None
        if self._fast_pred is not None and self._fast_pred[1].shape[0] == size:
            return self._fast_pred
        try:
            fwd = self._forward(size)
            runner = Runner(fwd.model, self.values, self.threads)
            buf = np.zeros(fwd.head.shape, _np_dtype(fwd.head.elem_type))
            runner.bind_output_array(fwd.head.tensor, buf)
        except ChitaError as exc:
            log.info("no batched forward for predictions (%s)", exc)
            self._fast_pred_failed = True
            return None
        self._fast_pred = (runner, buf)
        self._fast_pred_ok = False
        return self._fast_pred

    def _block_size(self, inputs: Mapping[str, NDArray[Any]]) -> int:
        for name, arr in inputs.items():
            if self.batch_axes.get(name, 0) is not None:
                return len(arr)
        raise DataError("the calibration data has no input with a batch axis")

    def _predict_small(self, inputs: Mapping[str, NDArray[Any]], count: int, size: int) -> NDArray[np.float32]:
        m = self.m
        if self._predictor is None:
            self._predictor = Runner(self.fwd.model, self.values, self.threads)
            self._pred_buf = np.zeros(self.head.shape, _np_dtype(self.head.elem_type))
            self._predictor.bind_output_array(self.head.tensor, self._pred_buf)
        assert self._pred_buf is not None
        out = np.zeros((size, *self.head.shape[1:]), np.float32)
        for r in range(count // m):
            self._bind_block(self._predictor, inputs, r * m, (r + 1) * m)
            self._predictor.run()
            out[r * m : (r + 1) * m] = self._pred_buf
        return out

    def _try_batched(self) -> bool:
        if self._batched is not None:
            return True
        if self._batched_failed:
            return False
        tb = time.perf_counter()
        try:
            fwd = self._forward(self.chunk)
            self._batched = BatchedPath(fwd, self.on_path, self.layout, self.m, self.values, self.threads)
            self.timings["batched_build"] = time.perf_counter() - tb
            return True
        except (NotEligibleError, ChitaError) as exc:
            self._batched_failed = str(exc) or type(exc).__name__
            (log.warning if self.method == "batched" else log.info)(
                "batched gradient path not used (%s); using the one-sample path", self._batched_failed
            )
            return False

    def _verify(self, block: _Block, T: NDArray[np.float32], X: NDArray[np.float32], row0: int, rows: int) -> bool:
        """Check the batched path against the one-sample path, pick one, fill the first block's rows.

        Both paths compute ``Jᵀ T`` for any target ``T``, so the check uses a random Gaussian probe
        target on the first :data:`CHECK_ROWS` rows: with the real one-hot targets the rows of
        confidently classified samples carry float32 cancellation (``1 − p_y``) on either path and
        cannot be compared tightly.  Both paths are timed for the log; the choice does not depend on
        it.  Returns whether the batched path is used for the following blocks.
        """
        assert self._batched is not None
        k = min(CHECK_ROWS, rows)
        p = X.shape[1]
        probe = np.zeros_like(T)
        rng = np.random.default_rng(_PROBE_SEED)
        probe[: k * self.m] = rng.standard_normal((k * self.m, *T.shape[1:])).astype(np.float32)
        ref = np.zeros((k, p), np.float32)
        got = np.zeros((k, p), np.float32)
        self._single_rows(block.inputs, probe, ref, 0, k)  # warm-up (and page faults), not timed
        ts = time.perf_counter()
        self._single_rows(block.inputs, probe, ref, 0, k)
        t_single = (time.perf_counter() - ts) / k
        try:
            self._batched.run(self._model_feed(block.inputs, 0, self._block_size(block.inputs)), probe, got, 0, k)
            err, worst = _disagreement(got, ref)
            ok = err <= CHECK_RTOL and worst <= CHECK_ROW_RTOL
            if not ok:
                log.warning(
                    "batched gradient path disagrees with the one-sample path (relative error %.2e, worst "
                    "row %.2e); using the one-sample path",
                    err,
                    worst,
                )
        except ChitaError as exc:
            log.warning("batched gradient path failed (%s); using the one-sample path", exc)
            ok = False
        if not ok:
            self._batched = None
            self._batched_failed = "self-check failed"
            self._single_rows(block.inputs, T, X, row0, rows)
            return False
        # verified: this block's rows from the batched path, timed for the race
        tb = time.perf_counter()
        self._batched.run(self._model_feed(block.inputs, 0, self._block_size(block.inputs)), T, X, row0, rows)
        t_batch = (time.perf_counter() - tb) / max(rows, 1)
        log.debug("batched path verified (%.3g vs %.3g ms/row one-sample)", 1e3 * t_batch, 1e3 * t_single)
        return True

    @functools.cached_property
    def macs_per_row(self) -> int | None:
        """:func:`row_macs` of this engine's forward graph."""
        return row_macs(self.fwd)


_FLOAT_ELEMS = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.BFLOAT16,
)


def joint_outputs(model: onnx.ModelProto, output: str | None, loss: str) -> list[str]:
    """The outputs one Gauss-Newton head spans (several, none a classifier, no ``--output`` and no
    ``loss='ce'``); ``[]`` when one tensor is differentiated alone.  The engine and the support
    check both decide with this."""
    return [] if output is not None or loss == "ce" else _non_classifier_outputs(model)


def _non_classifier_outputs(model: onnx.ModelProto) -> list[str]:
    """The floating-point outputs, when there are several and none is structurally a classifier
    (softmax logits or class probabilities); otherwise ``[]`` (the first output is used alone)."""
    outs = [
        o.name
        for o in model.graph.output
        if o.type.HasField("tensor_type") and o.type.tensor_type.elem_type in _FLOAT_ELEMS
    ]
    if len(outs) < 2:
        return []
    if any(find_head(model, o).kind in ("logits", "probabilities") for o in outs):
        return []
    return outs


def describe_loss(head: Head, tensor: str | Sequence[str], why: str) -> str:
    """One line saying which loss the gradients are of, on what, and why it was chosen."""
    if head.kind == "regression":
        what = "Gauss-Newton (sampled ½‖y − (y + ε)‖²)"
    elif head.kind == "binary":
        what = "binary cross-entropy per element (Bernoulli Fisher)"
    else:
        base = "cross-entropy" if head.kind == "logits" else "NLL on probabilities"
        what = base if head.positions == 1 else f"per-position {base} ({head.positions} positions per sample)"
    on = tensor if isinstance(tensor, str) else f"{len(tensor)} outputs"
    return f"{what} on {on!r} ({why})" if isinstance(tensor, str) else f"{what} on {on} ({why})"
class _Repeated:
    """The samples of ``data`` each repeated ``reps`` times in a row (labels too); re-iterable.

    Only the ``batched`` inputs (samples first) are repeated; static inputs pass unchanged."""

    def __init__(self, data: CalibrationSource, reps: int, batched: Sequence[str]) -> None:
        self.data, self.reps, self.batched = data, reps, frozenset(batched)

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.data:
            inputs = {
                k: np.repeat(np.asarray(v), self.reps, axis=0) if k in self.batched else v
                for k, v in batch[0].items()
            }
            labels = None if batch[1] is None else np.repeat(np.asarray(batch[1]), self.reps)
            yield Batch(inputs, labels)


def _first_batch(data: CalibrationSource) -> Batch:
    for batch in data:
        return Batch(batch[0], batch[1])
    raise DataError("the calibration data is empty")


def reached_weights(model: onnx.ModelProto, names: Sequence[str], example: Batch) -> tuple[list[str], list[Any]]:
    """Which of ``names`` (weights inside If branches) the example batch reaches: every If is
    resolved on it (:func:`.static.weights_reached`).  Returns ``(reached, guards)``."""
    from ..data import to_model_layout
    from ..graph import model_inputs
    from .static import weights_reached

    specs = {s.name: s for s in model_inputs(model)}
    feeds = {
        k: to_model_layout(np.asarray(v), specs[k]) if k in specs else np.asarray(v) for k, v in example[0].items()
    }
    reached, guards = weights_reached(model, feeds, names)
    return reached, list(guards)


def _open_fixed_batch(model: onnx.ModelProto, example: Batch, mini_batch: int) -> onnx.ModelProto:
    """``model``, or, when it fixes its batch to ``b`` samples (a trace without dynamic axes) and the
    engine does not feed ``mini_batch = b > 1`` per call, a copy with the batch opened
    (:func:`chita_onnx.activations.opened_alike`, probed on the first ``b`` samples of ``example``,
    3 for ``b = 1``) when it computes each sample as the original does: the batched paths then run
    several samples per call.  Otherwise the model as it is: ``b = 1`` runs one sample per call,
    ``b > 1`` is refused by the shape folding in one line naming the input and its fixed batch."""
    from ..activations import OPEN_PROBE_SAMPLES, fixed_batch_size, opened_alike, working_copy
    from ..data import to_model_layout

    specs = model_inputs(model)
    size = fixed_batch_size(specs)
    if size is None or (size == mini_batch and size > 1):
        return model
    probe = OPEN_PROBE_SAMPLES if size == 1 else size
    arrays = {s.name: np.asarray(example[0][s.name]) for s in specs if s.name in example[0]}
    if len(arrays) != len(specs) or any(len(arrays[s.name]) < probe for s in specs if s.batch_axis is not None):
        return model

    def feed(lo: int, hi: int) -> dict[str, NDArray[np.generic]]:
        return {
            s.name: to_model_layout(arrays[s.name] if s.batch_axis is None else arrays[s.name][lo:hi], s) for s in specs
        }

    base = working_copy(model)
    opened = opened_alike(base, specs, [feed(i, i + 1) for i in range(probe)], feed(0, probe))
    if opened is None:
        return model
    log.info("the model fixes its batch to %d sample(s) but computes each alone: gradients on an opened copy", size)
    return opened


def per_sample_gradients(
    model: onnx.ModelProto | str | os.PathLike[str],
    data: DataSpec,
    weights: Sequence[str] | None = None,
    *,
    loss: Loss = "auto",
    fisher: Fisher = "auto",
    output: str | None = None,
    mini_batch: int = 1,
    num_samples: int | None = None,
    seed: int = 0,
    out: NDArray[np.float32] | None = None,
    workdir: str | os.PathLike[str] | None = None,
    method: Method = "auto",
    threads: int = 1,
    fisher_rows: int = 1,
) -> GradientMatrix:
    """Per-sample loss gradients ``X`` (``(n, p)`` float32) of ``model`` on ``data``.

    ``weights`` picks (and orders) the tensors, default all prunable ones; ``n = ⌊min(N,
    num_samples)/mini_batch⌋``.  ``out`` (a C-contiguous float32 ``(n, p)`` array or memmap) is filled
    in place; otherwise ``workdir`` holds a memory-mapped file, otherwise RAM.  See the module
    docstring for ``loss``/``fisher``/``output``/``fisher_rows``; ``method`` and ``threads`` are
    tuning knobs.  ``model`` may be a file path (loaded with :func:`~chita_onnx.graph.load_model`);
    ``data`` is anything :func:`chita_onnx.open_source` accepts (a ``.npz`` path, a
    mapping of arrays, a source of batches).
    """
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    elif not isinstance(model, onnx.ModelProto):
        raise ConfigError(f"model: expected an onnx.ModelProto or a file path, got a {type(model).__name__}")
    from ..batchprobe import open_settled  # imports the graph layer, which imports this package

    model, _, data = open_settled(data, model, model_inputs(model), "the model")
    example = _first_batch(data)
    engine = GradientEngine(
        model,
        weights,
        example=example,
        loss=loss,
        output=output,
        mini_batch=mini_batch,
        method=method,
        threads=threads,
    )
    return engine.compute(
        data, fisher=fisher, num_samples=num_samples, seed=seed, out=out, workdir=workdir, fisher_rows=fisher_rows
    )
