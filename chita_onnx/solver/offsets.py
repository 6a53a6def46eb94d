"""Per-class logit offsets of a softmax head, fitted to the dense model's predictions.

After pruning, the logits ``z̃ (R, C)`` of a softmax head differ from the dense ones by an error that
a least-squares re-fit keeps small on average but not in the exponent: a classifier over thousands of
classes, most of which the calibration data never come near, gets thousands of small upward errors
whose ``exp`` adds up in the softmax normaliser and takes probability away from the classes in use.
A per-class offset ``β (C,)`` added to the logits is the last degree of freedom that costs nothing at
inference (it folds into the head's bias), and its best value is a small convex problem::

    min_β  F(β) = (1/R) Σ_r KL(p_r ‖ softmax(z̃_r + β))
               = const − p̄ᵀβ + (1/R) Σ_r logsumexp(z̃_r + β),        p̄ = (1/R) Σ_r p_r,

with gradient ``∇F = q̄(β) − p̄`` (``q̄``: the pruned model's mean class probabilities).  At the
optimum each class's mean predicted probability is the dense model's — the probability-space
counterpart of restoring each output channel's mean (bias correction).  ``F`` is convex (log-sum-exp
plus a linear term).  Each step is a Newton step on the few classes that carry probability (their
Hessian ``mean_r diag(q_r) − q_r q_rᵀ`` restricted to them, ``K × K``) and the iterative-scaling step
``log(p̄_c / q̄_c)`` on all the others, which interact only through the normaliser; a halving line
search keeps ``F`` from increasing.  Iterative scaling alone stalls on the dominant classes (a CTC
blank, say), Newton on all ``C`` classes would need ``C × C``.  The box ``|β_c| ≤ bound`` keeps
classes that the dense model gives (numerically) zero probability from running off to −∞.

Pure NumPy/SciPy; no onnx imports.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from ..errors import SolverError

#: ``|β_c|`` never exceeds this (``e^20 ≈ 5·10⁸``: far past any useful correction).
OFFSET_BOUND = 20.0
#: Rows of logits shifted at once (:func:`shifted`).
ROW_CHUNK = 64
#: Classes whose dense or pruned mean probability exceeds this get Newton steps (at most
#: :data:`MAX_NEWTON_CLASSES` of them, the largest); the others, iterative scaling.
BIG_CLASS = 1e-3
MAX_NEWTON_CLASSES = 512


@dataclass(frozen=True)
class OffsetFit:
    """The fitted offsets ``beta (C,)``; ``before`` / ``after``: ``F(0)`` and ``F(β)`` up to the same
    constant (``after ≤ before``); ``trace``: the lowest ``F`` found after each evaluation."""

    beta: NDArray[np.float64]
    before: float
    after: float
    iterations: int
    converged: bool
    trace: tuple[float, ...]


@dataclass(frozen=True)
class Shifted:
    """Logits ``Z (R, C)`` held as ``E = exp(Z − m) (R, C)`` in float32 (entries in ``(0, 1]``, a 1 in
    every row) and the row maxima ``m (R,)`` in float64.  Then ``Σ_c exp(z_rc + β_c) = e^{m_r}·(E e^β)_r``,
    so that every evaluation of ``F`` is two matrix-vector products instead of an ``exp`` of every
    logit."""

    E: NDArray[np.float32]
    m: NDArray[np.float64]


def log_softmax(Z: NDArray[np.floating], offset: NDArray[np.floating] | None = None) -> NDArray[np.float64]:
    """``log softmax(Z_r + offset)`` of every row of ``Z (R, C)``, in float64 (``offset`` broadcasts
    over the rows, ``(C,)`` or ``(1, C)``)."""
    z = np.array(Z, dtype=np.float64)
    if offset is not None:
        z += np.asarray(offset, np.float64).reshape(1, -1)
    z -= z.max(axis=1, keepdims=True)
    z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
    return z


def kl_rows(P: NDArray[np.floating], Z: NDArray[np.floating], beta: NDArray[np.float64] | None) -> float:
    """Mean over rows of ``KL(P_r ‖ softmax(Z_r + β))`` (``P, Z (H, C)``), 512 rows at a time."""
    total = 0.0
    for r0 in range(0, Z.shape[0], 512):
        logq = log_softmax(Z[r0 : r0 + 512], beta)
        p = np.asarray(P[r0 : r0 + 512], np.float64)
        total += float(np.sum(p * (np.log(np.maximum(p, 1e-30)) - logq)))
    return float(total) / max(int(Z.shape[0]), 1)


def shifted(Z: NDArray[np.floating], *, overwrite: bool = False) -> Shifted:
    """:class:`Shifted` of ``Z (R, C)``, a chunk of rows at a time; ``overwrite``: ``E`` takes ``Z``'s
    memory when ``Z`` is C-ordered float32 (the caller no longer needs it), else ``Z`` is not modified."""
    R = Z.shape[0]
    inplace = overwrite and Z.dtype == np.float32 and Z.flags.c_contiguous and Z.flags.writeable
    E = Z if inplace else np.empty(Z.shape, np.float32)
    m = np.empty(R)
    for r0 in range(0, R, ROW_CHUNK):
        a = E[r0 : r0 + ROW_CHUNK]
        np.copyto(a, Z[r0 : r0 + ROW_CHUNK], casting="same_kind")
        mr = a.max(axis=1, keepdims=True)
        m[r0 : r0 + a.shape[0]] = mr[:, 0]
        np.subtract(a, mr, out=a)
        np.exp(a, out=a)
    return Shifted(E, m)


def _evaluate(
    Z: NDArray[np.floating] | Shifted, pbar: NDArray[np.float64], beta: NDArray[np.float64], big: NDArray[np.int64]
) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """``F(β)`` (without its constant), ``q̄(β) (C,)`` and the probabilities of the classes ``big``
    in every row, ``(R, K)``, for logits ``Z (R, C)`` (or their :class:`Shifted` form):
    ``s = E e^β``, ``F = mean(m + log s) − p̄ᵀβ``, ``q̄ = e^β ⊙ Eᵀ(1/s) / R``.  The products run in
    float64 on :data:`ROW_CHUNK` rows of ``E`` at a time: a float32 product's rounding (~10⁻⁸ of
    ``F``) would exceed the fit's stopping tolerance and keep it stepping on noise."""
    L = Z if isinstance(Z, Shifted) else shifted(Z)
    R, C = L.E.shape
    eb = np.exp(beta)
    s = np.empty(R)
    qs = np.zeros(C)
    buf = np.empty((min(ROW_CHUNK, R), C))
    for r0 in range(0, R, ROW_CHUNK):
        e = L.E[r0 : r0 + ROW_CHUNK]
        a = buf[: e.shape[0]]
        np.copyto(a, e)
        sc = np.maximum(a @ eb, np.finfo(np.float64).tiny)
        s[r0 : r0 + e.shape[0]] = sc
        qs += (1.0 / sc) @ a
    lse = float(np.sum(L.m) + np.sum(np.log(s)))
    QK = L.E[:, big] * (eb[big] / s[:, None])
    return float(-pbar @ beta + lse / R), qs * eb / R, QK


def fit_class_offsets(
    Z: NDArray[np.floating],
    pbar: NDArray[np.floating],
    *,
    bound: float = OFFSET_BOUND,
    max_iter: int = 50,
    tol: float = 1e-9,
    start: NDArray[np.floating] | None = None,
    overwrite_z: bool = False,
) -> OffsetFit:
    """Minimise ``F(β) = −p̄ᵀβ + mean_r logsumexp(z̃_r + β)`` over ``|β| ≤ bound`` (see the module doc).

    ``Z (R, C)``: the pruned model's logits, one row per prediction (sample, or sample and position of
    a sequence); ``pbar (C,)``: the dense model's class probabilities averaged over the same kind of
    rows (a distribution: non-negative, summing to 1).  Starts from ``start`` (default ``β = 0``;
    clipped to the box); ``F`` never increases.  Stops when an iteration lowers ``F`` by at most
    ``tol·max(1, |F|)``, or after ``max_iter``.  ``before`` is ``F`` at the start.  ``overwrite_z``:
    ``Z`` may be overwritten (saves a copy of it; see :func:`shifted`).
    """
    Z = np.asarray(Z)
    p = np.asarray(pbar, np.float64)
    if Z.ndim != 2 or Z.shape[0] == 0 or Z.shape[1] < 2:
        raise SolverError(f"logits must be (R ≥ 1, C ≥ 2), got {Z.shape}")
    if p.shape != (Z.shape[1],):
        raise SolverError(f"mean probabilities have shape {p.shape}, expected {(Z.shape[1],)}")
    if not np.all(np.isfinite(Z)) or not np.all(np.isfinite(p)) or np.any(p < 0) or abs(float(p.sum()) - 1.0) > 1e-3:
        raise SolverError("logits must be finite and the mean probabilities a distribution")
    if not bound > 0:
        raise SolverError(f"bound must be > 0, got {bound}")
    p = p / p.sum()
    C = Z.shape[1]
    log_p = np.log(np.maximum(p, 1e-300))
    beta = np.zeros(C) if start is None else np.clip(np.asarray(start, np.float64).reshape(-1), -bound, bound)
    if beta.shape != (C,) or not np.all(np.isfinite(beta)):
        raise SolverError(f"start must be {C} finite offsets")
    L = shifted(Z, overwrite=overwrite_z)
    _, q0, _ = _evaluate(L, p, beta, np.zeros(0, np.int64))
    weight = np.maximum(p, q0)
    big = np.flatnonzero(weight > BIG_CLASS)
    if big.size > MAX_NEWTON_CLASSES:
        big = np.sort(np.argpartition(-weight, MAX_NEWTON_CLASSES - 1)[:MAX_NEWTON_CLASSES])
    f, q, QK = _evaluate(L, p, beta, big)
    trace = [f]
    converged = False
    iterations = 0
    while iterations < max_iter:
        iterations += 1
        # scaling: log(p̄ / q̄); each entry has the sign of −∇F = p̄ − q̄, so it descends even clipped to the box
        scaling = np.clip(log_p - np.log(np.maximum(q, 1e-300)), -bound, bound)
        steps = [scaling]
        if big.size:  # Newton on the classes that carry probability (they are coupled through the normaliser)
            H = np.diag(QK.mean(axis=0)) - QK.T @ QK / Z.shape[0]
            H[np.diag_indices_from(H)] += 1e-9 * max(float(np.max(np.diag(H))), 1e-30)
            with contextlib.suppress(np.linalg.LinAlgError):  # singular: keep the scaling step there
                newton = scaling.copy()
                newton[big] = -np.linalg.solve(H, (q - p)[big])
                steps.insert(0, newton)
        for step in steps:  # a Newton step clipped to the box need not descend: then the scaling step
            t = 1.0
            while True:
                cand = np.clip(beta + t * step, -bound, bound)
                fc, qc, Qc = _evaluate(L, p, cand, big)
                if fc < f or t < 1e-3:
                    break
                t *= 0.5
            if fc < f:  # strict: a step the box clips to nothing is no step
                break
        if not fc < f:
            converged = True  # no descent left along either direction
            break
        small = f - fc <= tol * max(1.0, abs(f))
        beta, f, q, QK = cand, fc, qc, Qc
        trace.append(f)
        if small:
            converged = True
            break
    return OffsetFit(beta, trace[0], f, iterations, converged, tuple(trace))
