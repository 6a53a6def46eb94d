"""Issue 9's time bar on the audit sets: the default's pruning time next to the time of chita's X.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_time_unseen.py \\
        --dir ~/.cache/chita-onnx/unseen [--dir ...] [--models a,b] [--repeat 2] [--json out.json]

The zoo's time bar (``bench_layerwise_time.py``) covers the zoo models. This runs the same
measurement on every model of the audit sets that the ``make_unseen*.py`` builders write (their
``manifest.json`` and ``<name>_calib.npz``, 256 samples, labelled for the classifiers; with
``--num-samples 1000``, the issue's own n = 1,000, from the calibration and selection splits), i.e.
on models like the held-out ones issue 9 will be measured on.

For each model, in ONE fresh subprocess (so the two times share the machine's load), ``--repeat``
alternating rounds of

* ``X s``: computing X for ``--method chita`` at 0.5, as its first ``gradients`` phase does
  (:func:`bench_layerwise_time.x_seconds`: the ``auto`` decision split, ``plan_rows``,
  ``GradientOracle.matrix``);
* ``default s``: ``compress`` with ``CompressConfig(sparsity=0.5)``, its ``gradients`` +
  ``layerwise`` + ``statistics`` phases (the same phases ``bench_layerwise_time.py`` counts);

the minimum of each over the rounds, and the largest peak resident memory of the process during each
(``bench_layerwise_time.peak_rss``). A model the default prunes with a method other than the
layer-wise pass is listed with that method. Issue 9's bar: ratio ≤ 2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
SPARSITY = 0.5
PHASES = ("gradients", "layerwise", "statistics", "solve")


def calibration(src: Path, num: int, tmp: Path) -> Path:
    """The model's ``_calib.npz``, or with ``num > 0`` its first ``num`` samples of the calibration and
    then the selection split (the keys of the calibration file; a timing input only, never scored)."""
    calib = src.with_name(src.stem + "_calib.npz")
    if num <= 0:
        return calib
    import numpy as np

    with np.load(calib) as c, np.load(src.with_name(src.stem + "_select.npz")) as s:
        both = {k: np.concatenate([c[k], s[k]])[:num] for k in c.files}
    out = tmp / f"{src.stem}_calib{num}.npz"
    np.savez(out, **both)  # type: ignore[arg-type]
    return out


def worker(src: Path, num: int, repeat: int, out_json: Path) -> None:
    """Both measurements on one model, alternating; writes a record to ``out_json``."""
    import logging

    from bench_layerwise_time import note_peak, peak_rss, x_seconds

    from chita_onnx import CompressConfig, compress

    logging.basicConfig(level=logging.ERROR)
    calib = calibration(src, num, out_json.parent)
    rec: dict[str, Any] = {"model": src.stem, "calibration": str(calib)}
    defaults: list[float] = []
    xs: list[float] = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory(prefix="timebar-") as tmp:
            rep, before, peak = peak_rss(
                lambda: compress(src, Path(tmp) / "pruned.onnx", calib, CompressConfig(sparsity=SPARSITY))
            )
        note_peak(rec, "default", before, peak)
        t = rep.timings
        defaults.append(sum(float(t.get(k, 0.0)) for k in PHASES))
        if defaults[-1] == min(defaults):
            rec["phases"] = {k: round(float(v), 3) for k, v in t.items()}
        rec["method_used"] = rep.method
        rec["p"] = rep.p
        (secs, shape), before, peak = peak_rss(lambda: x_seconds(src, calib, SPARSITY))  # type: ignore[arg-type]
        note_peak(rec, "x", before, peak)
        xs.append(secs)
        rec["x_shape"] = list(shape)
    rec.update(default_s=min(defaults), x_s=min(xs), default_runs=defaults, x_runs=xs)
    rec["ratio"] = rec["default_s"] / rec["x_s"]
    out_json.write_text(json.dumps(rec, indent=2))


def spawn(src: Path, num: int, repeat: int, tmp: Path) -> dict[str, Any]:
    out_json = tmp / f"{src.stem}.json"
    cmd = [sys.executable, __file__, "--worker", str(src), str(num), str(repeat), str(out_json)]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if not out_json.exists():
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"model": src.stem, "error": tail[:300], "process_s": time.time() - t0}
    rec: dict[str, Any] = json.loads(out_json.read_text())
    rec["process_s"] = time.time() - t0
    return rec


def row(d: str, r: dict[str, Any]) -> str:
    from bench_layerwise_time import mb

    if "error" in r:
        return f"| {d} | {r['model']} | – | – | – | – | – | – | error: {r['error']} |"
    ph = r.get("phases", {})
    alloc = float(ph.get("gradients", 0.0))
    rest = r["default_s"] - alloc
    n, p = r["x_shape"]
    ok = "yes" if r["ratio"] <= 2 else "**no**"
    return (
        f"| {d} | {r['model']} | {n} × {p:,} | {r['x_s']:.1f} | {r['default_s']:.1f} | {r['ratio']:.2f} | {ok} "
        f"| {mb(r.get('default_peak_mb'))} / {mb(r.get('x_peak_mb'))} | {alloc:.1f} / {rest:.1f} ({r['method_used']}) |"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, action="append", default=[], help="an audit set (repeatable)")
    ap.add_argument("--models", default=None, help="comma-separated model names (default: every manifest entry)")
    ap.add_argument("--repeat", type=int, default=1, help="alternating rounds per model; the minimum of each is kept")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument(
        "--num-samples",
        type=int,
        default=0,
        help="calibration samples: the first N of the calibration, then the selection split (default: _calib.npz, 256)",
    )
    ap.add_argument("--worker", nargs=4, metavar=("MODEL", "NUM", "REPEAT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        src, num, repeat, out = args.worker
        worker(Path(src), int(num), int(repeat), Path(out))
        return
    wanted = set(args.models.split(",")) if args.models else None
    sys.path.insert(0, str(HERE / "zoo"))
    from run import machine_line  # type: ignore[import-not-found]

    print(f"machine: {machine_line()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    print(
        "| set | model | X rows × p | X s | default s | ratio | ≤ 2× | peak RSS MB: default / X "
        "| allocation / pass s (method) |"
    )
    print("|---|---|---|---:|---:|---:|---|---|---|")
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="timebar-") as tmp:
        for d in args.dir:
            manifest = json.loads((d / "manifest.json").read_text())
            for name in manifest:
                src = d / f"{name}.onnx"
                if (
                    (wanted and name not in wanted)
                    or not src.exists()
                    or not src.with_name(name + "_calib.npz").exists()
                ):
                    continue
                r = spawn(src, args.num_samples, args.repeat, Path(tmp))
                r["set"] = d.name
                rows.append(r)
                print(row(d.name, r), flush=True)
                if args.json:
                    args.json.write_text(json.dumps(rows, indent=2))
    done = [r for r in rows if "ratio" in r]
    over = [r for r in done if r["ratio"] > 2]
    print(f"\n{len(done)} measured, {len(rows) - len(done)} errors; ratio > 2 on {len(over)}: "
          + ", ".join(f"{r['model']} {r['ratio']:.2f}" for r in over))  # fmt: skip


if __name__ == "__main__":
    main()
