"""Compare pruning methods on one model and one data set: every method at every sparsity.

All methods share the prunable-weight selection, the gradient matrix ``X`` at the trained weights
(computed once and reused by every one-shot method and by the first CHITA++ stage) and the exact
budget ``k = round((1 − s)·p)``, so the comparison is fair.  Each pruned model is evaluated with
onnxruntime against the dense one.  The reported ``objective`` is the one-shot quadratic model at
``w̄`` evaluated at each method's final weights, so it is comparable across methods (CHITA++ itself
optimises a different model in every later stage).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .config import METHODS, CompressConfig, percent_hint
from .data import DataSpec
from .errors import ConfigError
from .escalate import eligible, escalate
from .evaluate import compare_to, reference
from .guard import guarded
from .limits import data_budget
from .paths import Output, plan_outputs
from .peers import ONNXSIM_METHODS, PeerUnavailableError, onnxsim_python, run_onnxsim
from .pipeline import (
    GradientOracle,
    PhaseTimer,
    Prepared,
    _model_with,
    initial_weights,
    prepare,
    prune,
    resolve_method,
)
from .progress import progress
from .reconstruct import batches_of, correct_statistics, split_decision
from .report import table
from .solver import objective
from .solver.budgets import keep_count

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepRow:
    """One method at one sparsity.  Times are wall seconds; ``gradient_s`` counts the shared X once."""

    method: str
    sparsity: float
    k: int
    nnz: int
    accuracy: float | None
    agreement: float | None
    max_abs_diff: float
    objective: float | None
    gradient_s: float
    solve_s: float
    evaluate_s: float
    converged: bool
    statistics: str = ""
    statistics_s: float = 0.0
    note: str = ""


@dataclass(frozen=True)
class SweepResult:
    """The whole comparison plus the dense reference."""

    model: str
    dense_accuracy: float | None
    eval_samples: int
    eval_source: str
    p: int
    n: int
    shared_gradient_s: float
    rows: tuple[SweepRow, ...]
    config: dict[str, object]
    #: rows of X (``n`` samples times the rows per sample of ``--fisher kl``)
    x_rows: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def to_csv(self) -> str:
        buf = io.StringIO()
        names = list(SweepRow.__dataclass_fields__)
        writer = csv.writer(buf)
        writer.writerow(names)
        for r in self.rows:
            writer.writerow([getattr(r, f) for f in names])
        return buf.getvalue()


def _known(method: str) -> bool:
    if method in METHODS or method == "magnitude+obs" or method in ONNXSIM_METHODS:
        return True
    head, _, tail = method.rpartition("+")
    return tail == "layerwise" and head in METHODS


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """Method names: every ``--method``, ``magnitude+obs``, ``<method>+layerwise`` (that method's mask
    re-fitted layer by layer), and the onnxsim peers ``onnxsim-sparsegpt|wanda|magnitude``."""
    items = [m.strip() for m in (text.split(",") if isinstance(text, str) else text) if m.strip()]
    bad = [m for m in items if not _known(m)]
    if bad or not items:
        raise ConfigError(
            f"--methods={','.join(items)}: unknown method {bad[0] if bad else ''!r}; "
            f"choose from {', '.join((*METHODS, 'magnitude+obs', '<method>+layerwise', *ONNXSIM_METHODS))}"
        )
    return tuple(dict.fromkeys(items))


def parse_sparsities(text: str | Sequence[float]) -> tuple[float, ...]:
    try:
        items = [float(s) for s in (text.split(",") if isinstance(text, str) else text) if str(s).strip()]
    except ValueError:
        raise ConfigError(f"--sparsities={text!r}: expected comma-separated numbers such as 0.5,0.7,0.9") from None
    bad = [s for s in items if not 0.0 <= s < 1.0]
    if bad or not items:
        raise ConfigError(
            f"--sparsities={text!r}: every sparsity must be in [0, 1), got {bad[0] if bad else 'none'}"
            + (percent_hint(bad[0]) if bad else "")
        )
    return tuple(sorted(dict.fromkeys(items)))


def _config_for(base: CompressConfig, method: str, sparsity: float) -> CompressConfig:
    base = base if method == "chita++" or not base.distill else base.with_(distill=False, stages=None)
    if method == "magnitude+obs":
        return base.with_(method="magnitude", update="obs", sparsity=sparsity, stages=None, start_sparsity=None)
    if method in ONNXSIM_METHODS:
        return base.with_(method="magnitude", update="auto", sparsity=sparsity, stages=None, start_sparsity=None)
    head, _, tail = method.rpartition("+")
    if tail == "layerwise" and head in METHODS:
        return _config_for(base, head, sparsity).with_(update="layerwise")
    stages = base.stages if method == "chita++" and base.stages and base.stages > 1 else None
    start = min(0.5 if base.start_sparsity is None else base.start_sparsity, sparsity) if method == "chita++" else None
    return base.with_(method=method, sparsity=sparsity, stages=stages, start_sparsity=start)


def sweep(
    prep: Prepared, base: CompressConfig, methods: Sequence[str], sparsities: Sequence[float], *, model_label: str = ""
) -> SweepResult:
    """Prune with every method at every sparsity; evaluate each pruned model with onnxruntime."""
    if prep.eval is None:
        raise ConfigError("sweep needs evaluation data: pass --eval-data or keep --holdout > 0")
    if base.nm is not None:
        raise ConfigError(f"--pattern={base.pattern}: sweep compares sparsities; use compress --pattern instead")
    prep, decide = split_decision(prep, base)
    evaluation = prep.eval
    assert evaluation is not None
    layout = prep.layout
    w_bar = initial_weights(prep)
    ref = reference(prep.path, evaluation, prep.specs, base.output)
    # "auto" is resolved per model as compress resolves it (the sweep's row keeps the name "auto")
    configs = [(m, s, resolve_method(prep, _config_for(base, m, s))[0]) for s in sparsities for m in methods]
    need_x = any(c.needs_gradients for m, _, c in configs if m not in ONNXSIM_METHODS)
    oracle = GradientOracle(prep, base) if need_x else None
    X0 = None
    t_shared = 0.0
    if oracle is not None:
        if not oracle.fits():
            raise ConfigError(
                f"--max-memory={base.max_memory}: the sweep keeps X ({oracle.rows} x {layout.p}) in memory"
            )
        # one X for every sparsity: --fisher kl rows per input that suit the largest k
        oracle.plan_rows(max(keep_count(s, layout.p) for s in sparsities))
        t0 = time.perf_counter()
        X0 = oracle.matrix(w_bar)
        t_shared = time.perf_counter() - t0
    rows: list[SweepRow] = []
    peer_batches = None
    for method, sparsity, cfg in progress(configs, total=len(configs), desc="sweep", unit="run"):
        timer = PhaseTimer()
        note = ""
        if method in ONNXSIM_METHODS:
            if onnxsim_python() is None:
                log.warning("%s skipped: no onnxsim environment", method)
                continue
            if peer_batches is None:
                peer_batches = batches_of(prep, base)
            try:
                values, peer_s, version = run_onnxsim(method, prep.model, layout.names, peer_batches, sparsity)
            except PeerUnavailableError as exc:
                log.warning("%s", exc)
                continue
            w = layout.flatten(values, dtype=np.float32)
            timer.seconds["solve"] = peer_s
            converged, note = True, f"onnxsim {version}, uniform per-layer sparsity"
            short = _peer_shortfall(values, layout.p, sparsity)
            if short:
                log.warning("%s @ %g: %s", method, sparsity, short)
                note += f"; {short}"
        else:
            w, stages, result = prune(prep, cfg, oracle, timer, None, X0=X0)
            requested = _config_for(base, method, sparsity)
            if method == "auto" and not eligible(requested, cfg, prep, real_data=True):
                # as compress decides: --distill too, kept when its held-out KL to dense is lower
                esc = escalate(prep, requested, cfg, w, stages, result, timer)
                w, cfg, result, note = esc.w, esc.config, esc.result, esc.note
            converged = result.converged
        with timer.phase("statistics"):
            corrected, correction = correct_statistics(prep, cfg, w, decide, cfg.output)
        t0 = time.perf_counter()
        model = _model_with(prep, w) if corrected is None else corrected
        cmp = compare_to(ref, model.SerializeToString(), evaluation, prep.specs)
        t_eval = time.perf_counter() - t0
        obj = objective(X0, w, w_bar, cfg.ridge) if X0 is not None else None
        needs = cfg.needs_gradients and method not in ONNXSIM_METHODS
        grad_s = timer.seconds.get("gradients", 0.0) + (t_shared if needs else 0.0)
        row = SweepRow(
            method,
            sparsity,
            keep_count(sparsity, layout.p),
            int(np.count_nonzero(w)),
            cmp.pruned_accuracy,
            cmp.agreement,
            cmp.max_abs_diff,
            obj,
            grad_s,
            timer.seconds.get("solve", 0.0) + timer.seconds.get("layerwise", 0.0),
            t_eval,
            converged,
            correction.short(),
            timer.seconds.get("statistics", 0.0),
            note,
        )
        rows.append(row)
        log.info("%s @ %.3f: accuracy %s, objective %s", method, sparsity, row.accuracy, row.objective)
    return SweepResult(
        model=model_label or str(prep.path),
        dense_accuracy=ref.accuracy(ref.y),
        eval_samples=int(ref.y.shape[0]),
        eval_source=prep.eval_source,
        p=layout.p,
        n=oracle.n if oracle else 0,
        shared_gradient_s=t_shared,
        rows=tuple(rows),
        config=base.to_dict(),
        x_rows=0 if X0 is None else int(X0.shape[0]),
    )


def _peer_shortfall(values: dict[str, np.ndarray], p: int, sparsity: float, tol: float = 0.005) -> str:
    """Why a peer's result is not at ``sparsity``: the sparsity it reached over the ``p`` prunable
    weights and the tensors it left (almost) dense, or "" when it is within ``tol`` of the target."""
    nnz = sum(int(np.count_nonzero(v)) for v in values.values())
    got = 1.0 - nnz / p if p else sparsity
    if got >= sparsity - tol:
        return ""
    dense = [k for k, v in values.items() if v.size and np.count_nonzero(v) >= 0.99 * v.size]
    shown = ", ".join(dense[:3]) + (f" and {len(dense) - 3} more" if len(dense) > 3 else "")
    return f"reached sparsity {got:.3f}, not {sparsity:g}" + (f"; left dense: {shown}" if dense else "")


def format_sweep(result: SweepResult) -> str:
    """The comparison as a readable table (accuracy, agreement, objective, seconds)."""

    def pct(x: float | None) -> str:
        return "-" if x is None else f"{100 * x:.2f}"

    rows = [
        [
            r.method,
            f"{r.sparsity:g}",
            f"{r.nnz:,}",
            f"{1.0 - r.nnz / result.p:.3f}" if result.p else "-",
            pct(r.accuracy),
            pct(r.agreement),
            "-" if r.objective is None else f"{r.objective:.4g}",
            f"{r.gradient_s:.2f}",
            f"{r.solve_s:.2f}",
            f"{r.evaluate_s:.2f}",
            r.statistics or "-",
        ]
        for r in result.rows
    ]
    head = (
        f"{result.model}: p = {result.p:,} prunable weights, "
        + (f"n = {result.n} samples ({result.x_rows} gradient rows), " if result.n else "no gradients, ")
        + f"dense accuracy {pct(result.dense_accuracy)}% on {result.eval_samples} samples ({result.eval_source})"
    )
    return (
        head
        + "\n\n"
        + table(
            rows,
            [
                "method",
                "sparsity",
                "kept",
                "reached",
                "accuracy %",
                "agreement %",
                "objective",
                "gradients s",
                "solve s",
                "evaluate s",
                "statistics",
            ],
        )
    )


def plot_sweep(result: SweepResult, path: str | Path) -> bool:
    """Write a PNG: accuracy against sparsity (one line per method) and solve time per method.

    Returns False (and writes nothing) when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = list(dict.fromkeys(r.method for r in result.rows))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for m in methods:
        pts = [(r.sparsity, 100 * r.accuracy) for r in result.rows if r.method == m and r.accuracy is not None]
        if pts:
            ax1.plot(*zip(*pts, strict=True), marker="o", label=m)
    if result.dense_accuracy is not None:
        ax1.axhline(100 * result.dense_accuracy, color="grey", linestyle="--", linewidth=1, label="dense")
    ax1.set_xlabel("sparsity")
    ax1.set_ylabel("top-1 accuracy (%)")
    ax1.set_title("accuracy after one-shot pruning")
    ax1.grid(alpha=0.3)
    ax1.legend()
    totals = [sum(r.solve_s + r.gradient_s for r in result.rows if r.method == m) for m in methods]
    ax2.bar(methods, totals, color="tab:blue")
    ax2.set_ylabel("seconds (gradients + solve, all sparsities)")
    ax2.set_title("runtime per method")
    ax2.grid(alpha=0.3, axis="y")
    fig.suptitle(Path(result.model).name)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


@guarded
def run_sweep(
    model: str | os.PathLike[str],
    data: DataSpec,
    base: CompressConfig,
    methods: Sequence[str],
    sparsities: Sequence[float],
    *,
    eval_data: DataSpec | None = None,
    out: str | os.PathLike[str] | None = None,
) -> tuple[SweepResult, list[Path]]:
    """:func:`sweep` from files: load and check everything, compare, and write ``<out>.csv``,
    ``<out>.json`` and ``<out>.png`` (the plot only with matplotlib) atomically, checked before
    any work like every output (:mod:`chita_onnx.paths`).  Returns the result and the files written."""
    prefix = None if out is None else os.fspath(out)
    exts = ("csv", "json", "png") if prefix is not None else ()
    outputs = [Output("--out", Path(f"{prefix}.{ext}"), ext) for ext in exts]
    plan = plan_outputs(outputs, model=model, data=data, eval_data=eval_data, workdir=base.workdir)
    with plan, data_budget(base.max_memory):
        prep = prepare(model, data, base, eval_data)
        result = sweep(prep, base, methods, sparsities, model_label=os.fspath(model))
        if prefix is not None:
            plan.staged("--out:csv").write_text(result.to_csv())
            plan.staged("--out:json").write_text(result.to_json() + "\n")
            if not plot_sweep(result, plan.staged("--out:png")):
                log.warning("no plot written; install matplotlib (pip install 'chita-onnx[plot]') to get one")
        written = plan.commit()
    return result, written
