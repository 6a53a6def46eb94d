"""Fisher choices and the high-sparsity recipe, side by side on several models (issue 9).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_recipes.py --suite fisher [--json out.json]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_recipes.py --suite distill [--json out.json]

Models and splits: ``recipe_data.py`` (calib / select / test, disjoint; settings are *chosen* on the
select split, the test split is only reported).  Every cell is one ``prune`` through the pipeline
(real gradients from onnxruntime, the pruned model evaluated with onnxruntime), all in one process
so the times are comparable; ``seconds`` is gradients + solve of that run.

* ``--suite fisher``: the Fisher choices (``empirical`` = labels, ``sampled`` = one label drawn from
  the model, ``kl`` = the true Fisher with one Gaussian sketch row per input, ``kl rows`` = up to
  every class per input under the re-fit budget) for one-shot CHITA at 0.5 / 0.7 / 0.9 and CHITA++
  (10 stages) at 0.9.
* ``--suite distill``: the paper MLPNet at 0.95 and 0.98, and the other models at 0.9 and 0.95:
  CHITA++ with the labels' Fisher (the old default), CHITA++ with the defaults, and CHITA++
  ``--distill``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_chita import cpu_name
from recipe_data import Entry, entries

from chita_onnx import CompressConfig
from chita_onnx.data import open_source
from chita_onnx.evaluate import compare_to, reference, top1
from chita_onnx.pipeline import PhaseTimer, _model_with, prepare, prune

log = logging.getLogger("bench_recipes")

FISHER = [
    ("empirical", {"fisher": "empirical"}),
    ("sampled", {"fisher": "sampled"}),
    ("kl", {"fisher": "kl"}),
    ("kl rows", {"fisher": "kl", "fisher_rows": 16}),
]


def run(entry: Entry, cells: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    prep = prepare(str(entry.model), str(entry.calib), CompressConfig(), str(entry.test))
    refs = {}
    for split, path in (("select", entry.select), ("test", entry.test)):
        src = open_source(str(path), prep.specs, batch_size=512)
        refs[split] = (reference(prep.path, src, prep.specs), src)
    out = []
    for label, kw in cells:
        cfg = CompressConfig(**kw)
        timer = PhaseTimer()
        t0 = time.perf_counter()
        w, _, _ = prune(prep, cfg, None, timer)
        secs = time.perf_counter() - t0
        model = _model_with(prep, w).SerializeToString()
        rec: dict[str, Any] = {"model": entry.name, "cell": label, "sparsity": cfg.sparsity, "method": cfg.method}
        for split, (ref, src) in refs.items():
            c = compare_to(ref, model, src, prep.specs)
            rec[split] = 100 * (c.pruned_accuracy or 0.0)
        rec["dense_test"] = 100 * (top1(refs["test"][0].y, refs["test"][0].labels) or 0.0)
        rec["seconds"] = secs
        out.append(rec)
        log.info("%s %-28s select %.2f test %.2f  %.1fs", entry.name, label, rec["select"], rec["test"], secs)
    return out


def fisher_cells() -> list[tuple[str, dict[str, Any]]]:
    cells = []
    for s in (0.5, 0.7, 0.9):
        cells += [(f"chita {s} {name}", {"method": "chita", "sparsity": s, **kw}) for name, kw in FISHER]
    cells += [(f"chita++ 0.9 {name}", {"method": "chita++", "sparsity": 0.9, **kw}) for name, kw in FISHER]
    return cells


def distill_cells(levels: tuple[float, ...]) -> list[tuple[str, dict[str, Any]]]:
    cells = []
    for s in levels:
        cells += [
            (f"chita++ {s} labels", {"method": "chita++", "sparsity": s, "fisher": "empirical"}),
            (f"chita++ {s} default", {"method": "chita++", "sparsity": s}),
            (f"chita++ {s} --distill", {"method": "chita++", "sparsity": s, "distill": True}),
        ]
    return cells


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", choices=["fisher", "distill"], required=True)
    ap.add_argument("--models", default="", help="comma-separated subset (default: all available)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("chita_onnx").setLevel(logging.ERROR)
    records: list[dict[str, Any]] = []
    for entry in entries([m for m in args.models.split(",") if m] or None):
        if args.suite == "fisher":
            cells = fisher_cells()
        else:
            levels = (0.95, 0.98) if entry.name == "paper_mlpnet" else (0.9, 0.95)
            cells = distill_cells(levels)
        records += run(entry, cells)
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, one BLAS thread\n")
    print("| model | cell | select % | test % | seconds |")
    print("|---|---|---:|---:|---:|")
    for r in records:
        print(f"| {r['model']} | {r['cell']} | {r['select']:.2f} | {r['test']:.2f} | {r['seconds']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "records": records}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
