"""The default on calibration data WITHOUT labels, with and without output-row weights.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unlabelled.py \\
        --dirs ~/.cache/chita-onnx/unseen-torch3,~/.cache/chita-onnx/unseen-torch5 \\
        [--models a,b] [--split select] [--sparsities 0.3,0.5] [--variants auto,fisher,off] [--json out.json]

The audit sets (``make_unseen*.py``) ship labelled calibration files, so ``bench_unseen.py`` measures
the labelled path: a classifier's raw logits are read as logits there.  A user's calibration set
often has no labels; then raw logits are not known to be a class distribution and the default treats
them as a regression output (the Gauss-Newton of the output error).  This benchmark drops the labels
and runs ``compress`` with the default configuration and ``row_weights`` set to each variant, scoring
each pruned model on ``--split`` (``select`` to choose, ``test`` to report) against the dense model:

* ``rel``: relative output error ``‖y − ȳ‖ / ‖ȳ‖`` over the split (first output);
* ``agree``: top-1 agreement with dense for 2-D outputs (argmax over axis 1 of 4-D outputs);
* ``acc``: top-1 accuracy when the split has labels of the output's batch size.

A first output of class *values* (skl2onnx's ``output_label``) has no ``rel``: it is scored as
``bench_unseen.py`` scores it (``agree``: unchanged labels; ``acc`` through the manifest's ``classes``).

Every model of every ``manifest.json`` of ``--dirs`` is run unless ``--models`` names some.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_unseen import feeds, load, run_model, score  # numpy only at import


def scores(dense: np.ndarray, pruned: np.ndarray, labels: np.ndarray | None) -> dict[str, float]:
    dense, pruned = dense.astype(np.float64), pruned.astype(np.float64)
    a, b = dense.reshape(len(dense), -1), pruned.reshape(len(pruned), -1)
    out = {"rel": float(np.linalg.norm(a - b) / np.linalg.norm(a))}
    if dense.ndim == 2 and dense.shape[1] >= 2:
        out["agree"] = float(np.mean(dense.argmax(1) == pruned.argmax(1)))
        if labels is not None and len(labels) == len(dense):
            out["acc"] = float(np.mean(pruned.argmax(1) == labels))
    elif dense.ndim == 4 and dense.shape[1] >= 2:
        out["agree"] = float(np.mean(dense.argmax(1) == pruned.argmax(1)))
    return out


def run_one(folder: Path, name: str, info: dict[str, Any], split: str, sparsity: float, variant: str) -> dict[str, Any]:
    from chita_onnx import CompressConfig, compress

    calib = load(folder / f"{name}_calib.npz")
    data = load(folder / f"{name}_{split}.npz")
    x = feeds(info, data)
    rec: dict[str, Any] = {
        "set": folder.name,
        "model": name,
        "split": split,
        "sparsity": sparsity,
        "row_weights": variant,
    }
    dense = run_model(folder / f"{name}.onnx", x)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        t0 = time.perf_counter()
        cfg = CompressConfig(sparsity=sparsity, row_weights=variant)  # type: ignore[arg-type]
        rep = compress(folder / f"{name}.onnx", out, feeds(info, calib), cfg)  # no labels
        rec["s"] = round(time.perf_counter() - t0, 1)
        rec.update(method=rep.method, warnings=list(rep.warnings))
        pruned = run_model(out, x)
        if dense.ndim == 1 and "classes" in info:  # a label output (skl2onnx): class values
            got = score(info, pruned, dense, data)
            rec.update(agree=got["agreement"], acc=got["metric"])
        else:
            rec.update(scores(dense, pruned, data.get("labels")))
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dirs", required=True, help="comma-separated audit-set folders (each with manifest.json)")
    ap.add_argument("--models", default="")
    ap.add_argument("--split", default="select", choices=("select", "test"))
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--variants", default="off,fisher", help="row_weights values to compare")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    only = {m for m in args.models.split(",") if m}
    rows: list[dict[str, Any]] = []
    for folder in (Path(os.path.expanduser(d)) for d in args.dirs.split(",")):
        manifest = json.loads((folder / "manifest.json").read_text())
        for name, info in manifest.items():
            if only and name not in only:
                continue
            for s in (float(x) for x in args.sparsities.split(",")):
                for variant in args.variants.split(","):
                    try:
                        rec = run_one(folder, name, info, args.split, s, variant)
                    except Exception as exc:  # a failure is a row too
                        rec = {"set": folder.name, "model": name, "sparsity": s, "row_weights": variant,
                               "error": f"{type(exc).__name__}: {exc}"[:200]}  # fmt: skip
                    rows.append(rec)
                    print(json.dumps(rec), file=sys.stderr, flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
    variants = args.variants.split(",")
    print(f"| model | sparsity | {' | '.join(f'{v}: rel / agree' for v in variants)} |")
    print("|---|---|" + "---|" * len(variants))
    by: dict[tuple[str, str, float], dict[str, dict[str, Any]]] = {}
    for r in rows:
        by.setdefault((r["set"], r["model"], r["sparsity"]), {})[r["row_weights"]] = r
    for (_, model, s), v in by.items():
        cells = []
        for name in variants:
            r = v.get(name, {})
            cells.append(r.get("error", f"{r.get('rel', float('nan')):.4f} / {r.get('agree', float('nan')):.3f}"))
        print(f"| {model} | {s} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
