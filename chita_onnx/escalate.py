"""``--method auto`` at high sparsity on a classifier: try ``--distill`` and keep it where it wins.

The default recipe (the layer-wise pass) takes seconds and keeps about the dense accuracy up to
0.7 on every model measured, but at 0.9 it loses 5 to 45 points of top-1 on most of the held-out
classifiers of BENCHMARKS.md ("`--distill` at 0.9 on held-out classifiers"), where ``--distill``
(multi-stage CHITA++ on the KL to the dense outputs) keeps most of them, at minutes instead of
seconds.  On the rest (the default already near dense) ``--distill`` is slightly worse.  So the
choice is made per model, by measurement on calibration samples that neither candidate is fitted
on:

1. hold out :data:`HELD_OUT_FRACTION` of the calibration samples (seeded);
2. run the layer-wise pass and ``--distill`` on the rest;
3. keep the one with the lower mean KL(dense ‖ pruned) of the class distributions on the held-out
   samples (ties: the layer-wise pass).  Top-1 agreement with dense is reported too, but it does
   not decide: calibration samples are often training samples, on which a pruned model agrees
   with dense more than on new data, so it often ties at 1.0 where the KL still separates the
   two (``benchmarks/bench_auto_distill_rule.py``, BENCHMARKS.md "Stop 48": on the selection splits
   of 19 classifiers the KL rule gave a mean top-1 of 0.835, agreement first 0.831, skipping
   ``--distill`` when the layer-wise pass kept 0.99 held-out agreement 0.830, the layer-wise pass
   alone 0.781).  A kept ``--distill`` result is the one fitted without the held-out samples
   (refitting on all of them would double its minutes); a kept layer-wise result is the default's
   own, fitted on all of them.

It applies only where ``--distill`` is defined and measured: ``--method auto`` that resolved to the
layer-wise pass, unstructured sparsity of at least :data:`DISTILL_FROM`, one class distribution per
sample (a ``(N, C)`` output; per-position heads such as CTC recognisers collapse under it), real
calibration data with at least :data:`MIN_SAMPLES` samples, and at most :data:`MAX_WEIGHTS`
prunable weights (its time grows with them: 28 minutes at 1.66 M).  ``--no-auto-distill`` turns it
off.  The module only orchestrates: the solvers and the graph code are reached through
:func:`chita_onnx.pipeline.prune`.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from .config import CompressConfig
from .data import materialize, split_holdout
from .errors import ChitaError
from .evaluate import make_session, reference, run_model
from .report import StageReport

if TYPE_CHECKING:
    from .pipeline import PhaseTimer, Prepared
    from .solver import SolverResult

log = logging.getLogger(__name__)

#: Lowest target sparsity at which ``auto`` tries ``--distill`` (it was measured to win at 0.9, 0.95
#: and 0.98; at 0.7 and below the layer-wise default was never measured to lose much).
DISTILL_FROM = 0.9
#: Fraction of the calibration samples held out of both candidates' fits to decide between them.
HELD_OUT_FRACTION = 0.2
#: Fewest calibration samples for a decision (a fifth of them are held out).
MIN_SAMPLES = 80
#: Most prunable weights for which ``--distill`` is tried (its stages' gradients grow with them).
MAX_WEIGHTS = 2_000_000
#: Wall-clock budget of the tried ``--distill``, in seconds: it stops (and the layer-wise result is
#: kept) as soon as its stages so far put all of them above it.  Its cost is ``stages × 2n × R``
#: backward passes (R: KL rows per input, up to every class), which only the first stage measures on
#: the machine at hand: 0.2 to 12 minutes on the classifiers of BENCHMARKS.md, 28 on a 1.66 M-weight
#: MobileNetV3.  So this one choice depends on the machine's speed, and the report says when it cut.
DISTILL_BUDGET_SECONDS = 15 * 60.0


class OverBudgetError(Exception):
    """The tried ``--distill`` would exceed its budget (:data:`DISTILL_BUDGET_SECONDS`)."""

    def __init__(self, stage: int, elapsed: float, projected: float) -> None:
        super().__init__(f"stage {stage}: {elapsed:.0f} s, about {projected:.0f} s in all")
        self.stage, self.elapsed, self.projected = stage, elapsed, projected


def budget_guard(
    budget_seconds: float, total: int
) -> Callable[[int, float, SolverResult, NDArray[np.float32], float], StageReport]:
    """An ``on_stage`` callback for :func:`chita_onnx.pipeline.prune` that raises
    :class:`OverBudgetError` once the stages so far (timed from this call) put all ``total`` of
    them above ``budget_seconds``; else it returns the stage's report."""
    t_start = time.perf_counter()

    def on_stage(t: int, level: float, res: SolverResult, wt: NDArray[np.float32], seconds: float) -> StageReport:
        elapsed = time.perf_counter() - t_start
        projected = elapsed * total / t
        if projected > budget_seconds:
            raise OverBudgetError(t, elapsed, projected)
        objective = float(res.objective) if np.isfinite(res.objective) else None
        k = int(np.count_nonzero(wt))
        return StageReport(t, level, k, objective, res.iterations, res.converged, None, None, seconds)

    return on_stage


@dataclass(frozen=True)
class Candidate:
    """One candidate's held-out scores: top-1 agreement with dense and mean KL(dense ‖ pruned)."""

    agreement: float
    kl: float


@dataclass(frozen=True)
class Escalation:
    """What the high-sparsity decision did.

    ``w`` (length p), ``stages``, ``result`` and ``config`` are the kept candidate's (the
    layer-wise ones unchanged when it is kept); ``note`` is one line for the report; ``layerwise``
    and ``distill`` are the held-out scores (None when not measured); ``held_out`` the number of
    held-out samples (0: no decision was made)."""

    w: NDArray[np.float32]
    stages: list[StageReport]
    result: SolverResult
    config: CompressConfig
    note: str
    layerwise: Candidate | None = None
    distill: Candidate | None = None
    held_out: int = 0

    @property
    def kept_distill(self) -> bool:
        return self.config.distill


def _kl(dense: NDArray[np.floating], pruned: NDArray[np.floating]) -> float:
    """Mean KL(dense ‖ pruned) over the rows of class scores ``(N, C)`` (probabilities or logits)."""
    from .reconstruct import _divergence

    return _divergence(dense.astype(np.float64), pruned.astype(np.float64))


def eligible(requested: CompressConfig, config: CompressConfig, prep: Prepared, *, real_data: bool) -> str:
    """Why ``auto`` does not try ``--distill`` here, or "" when it may (before any data is held out)."""
    if requested.method != "auto" or requested.distill or not requested.auto_distill:
        return "off"
    if config.method != "layerwise" or config.nm is not None or config.structure != "none":
        return "off"
    if config.sparsity < DISTILL_FROM:
        return "off"
    if not real_data:
        return "random calibration data"
    if prep.no_gradients:
        return "no gradients"
    if prep.layout.p > MAX_WEIGHTS:
        return (
            f"{prep.layout.p:,} prunable weights, more than the {MAX_WEIGHTS:,} it is tried on "
            "(add --distill to run it)"
        )
    return ""


def escalate(
    prep: Prepared,
    requested: CompressConfig,
    config: CompressConfig,
    w: NDArray[np.float32],
    stages: list[StageReport],
    result: SolverResult,
    timer: PhaseTimer,
    *,
    budget_seconds: float | None = None,
) -> Escalation:
    """Decide between the layer-wise result ``w`` (fitted on all of ``prep.calib``) and ``--distill``
    at ``config.sparsity``, as the module docstring says.  ``requested`` is the configuration the
    user gave (``--method auto``), ``config`` the resolved layer-wise one."""
    from .pipeline import GradientOracle, _model_with, prune

    budget_seconds = DISTILL_BUDGET_SECONDS if budget_seconds is None else budget_seconds

    same = Escalation(w, stages, result, config, "")
    whole = materialize(prep.calib, prep.specs, batch_size=config.batch_size)
    n = min(whole.num_samples, config.num_samples)
    if n < MIN_SAMPLES:
        note = (
            f"--distill not tried: {whole.num_samples} calibration samples, fewer than the {MIN_SAMPLES} to decide on"
        )
        log.info("%s", note)
        return dataclasses.replace(same, note=note)
    if whole.num_samples > config.num_samples:
        whole = whole.take(np.arange(config.num_samples))  # the samples the pass itself reads
    fit, held = split_holdout(whole, HELD_OUT_FRACTION, seed=config.seed + 17)
    with timer.phase("evaluate"):
        ref = reference(prep.path, held, prep.specs, config.output)
    yd = ref.y
    if not (yd.ndim == 2 and yd.shape[1] > 1 and np.issubdtype(yd.dtype, np.floating)):
        note = (
            f"--distill not tried: output {ref.output!r} of shape {list(yd.shape)} is not one class distribution "
            "per sample"
        )
        log.info("%s", note)
        return dataclasses.replace(same, note=note)
    probabilities = bool(np.all(yd >= -1e-6) and np.allclose(yd.sum(axis=1), 1.0, atol=1e-4))
    if not (probabilities or config.loss == "ce" or ref.labels is not None):
        note = (
            f"--distill not tried: output {ref.output!r} is not a class distribution (no softmax and no labels; "
            "--loss ce reads it as logits)"
        )
        log.info("%s", note)
        return dataclasses.replace(same, note=note)
    sub = dataclasses.replace(prep, calib=fit)

    def score(wc: NDArray[np.float32], p: Prepared) -> Candidate:
        with timer.phase("evaluate"):
            session = make_session(_model_with(p, wc).SerializeToString())
            yp, _ = run_model(session, held, prep.specs, ref.output, desc="held-out")
        agree = float(np.mean(np.argmax(yd, axis=1) == np.argmax(yp, axis=1)))
        return Candidate(agree, _kl(yd, yp))

    h = held.num_samples
    log.info("sparsity %g on a classifier: deciding layer-wise against --distill on %d held-out calibration samples",
             config.sparsity, h)  # fmt: skip
    w_l, _, _ = prune(sub, config, GradientOracle(sub, config), timer, None)
    lay = score(w_l, sub)
    dconfig = requested.with_(distill=True)
    log.warning(
        "sparsity %g on a classifier: trying --distill against the layer-wise pass (held-out KL %.4g, top-1 agreement "
        "%.3f on %d calibration samples), which takes minutes (--no-auto-distill skips it)",
        config.sparsity, lay.kl, lay.agreement, h,
    )  # fmt: skip
    total = dconfig.stages or 1
    try:
        w_d, st_d, res_d = prune(sub, dconfig, None, timer, budget_guard(budget_seconds, total))
    except OverBudgetError as over:
        note = (
            f"--distill stopped after {over.stage} of its {total} stages: {over.elapsed:.0f} s so far put all of "
            f"them at about {over.projected / 60:.0f} minutes, more than the {budget_seconds / 60:.0f}-minute budget "
            f"of the automatic choice; the layer-wise result is kept (held-out top-1 agreement {lay.agreement:.3f} "
            f"on {h} calibration samples); add --distill to run it anyway"
        )
        log.warning("%s", note)
        return dataclasses.replace(same, note=note, layerwise=lay, held_out=h)
    except (ChitaError, MemoryError) as exc:
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        note = f"--distill tried and failed ({why}); the layer-wise result is kept"
        log.warning("%s", note)
        return dataclasses.replace(same, note=note, layerwise=lay, held_out=h)
    dis = score(w_d, sub)
    scores = (
        f"held-out KL to dense on {h} calibration samples: --distill {dis.kl:.4g} (top-1 agreement "
        f"{dis.agreement:.3f}), layer-wise {lay.kl:.4g} (agreement {lay.agreement:.3f})"
    )
    if dis.kl < lay.kl:
        note = f"--distill kept ({scores}; fitted on the other {fit.num_samples})"
        log.info("%s", note)
        return Escalation(w_d, st_d, res_d, dconfig, note, lay, dis, h)
    note = f"--distill tried and not kept ({scores})"
    log.info("%s", note)
    return dataclasses.replace(same, note=note, layerwise=lay, distill=dis, held_out=h)
