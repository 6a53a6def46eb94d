"""Do the default outputs of zoo models load and compute the same in OpenVINO and the newest onnxruntime?

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/check_runtimes.py \
        [--models a,b] [--dir UNSEEN_SET] [--sparsity 0.5] [--storage dense] [--samples 4] [--json out.json]

For every zoo model (``benchmarks/zoo/entries.py``; its wheel and data are cached as ``zoo/run.py``
caches them), or every model of an unseen-architectures set (``--dir``, ``make_unseen*.py``):
``compress`` with the default configuration (``--storage`` overrides the storage) into a
temporary file, then the dense and the pruned model are run on the first ``--samples`` held-out
samples in

* this environment's onnxruntime (1.19.2, the reference),
* the newest plain onnxruntime (``~/.cache/chita-onnx/stock-ort-venv``, as ``tests/test_stock_ort.py``
  makes it),
* the newest OpenVINO (``~/.cache/chita-onnx/openvino-venv``, as ``tests/test_openvino.py`` makes it),
  CPU plugin with ``INFERENCE_PRECISION_HINT=f32`` (its default is bfloat16 on AMX CPUs).

Per model and runtime: whether each model loads, and the largest relative difference of any output
against the reference, ``max|a − b| / max|b|``.  The dense row tells whether a difference is the
runtime's own (it is there before pruning too) or the pruned file's.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "zoo"))

import entries  # noqa: E402
from run import datasets, entry, head_of  # noqa: E402

CACHE = Path.home() / ".cache" / "chita-onnx"
RUNTIMES = {
    "onnxruntime (newest)": CACHE / "stock-ort-venv" / "bin" / "python",
    "openvino (newest)": CACHE / "openvino-venv" / "bin" / "python",
}

SCRIPT = r"""
import json, sys
import numpy as np
kind, model, feeds_path, out_path = sys.argv[1:5]
with np.load(feeds_path) as z:
    feeds = {k: z[k] for k in z.files}
try:
    if kind.startswith("openvino"):
        import openvino as ov
        compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        res = compiled(feeds)
        outs = [np.asarray(res[o]) for o in compiled.outputs]
        version = ov.__version__
    else:
        import onnxruntime as ort
        sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        outs = sess.run(None, {k: v for k, v in feeds.items() if k in names})
        version = ort.__version__
    np.savez(out_path, *outs)
    print(json.dumps({"ok": True, "version": version}))
except Exception as exc:
    print(json.dumps({"ok": False, "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300]}"}))
"""


def run_in(python: Path, kind: str, model: Path, feeds: dict[str, np.ndarray], tmp: Path) -> dict[str, Any]:
    np.savez(tmp / "feeds.npz", **feeds)
    proc = subprocess.run(
        [str(python), "-c", SCRIPT, kind, str(model), str(tmp / "feeds.npz"), str(tmp / "outs.npz")],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        return {"ok": False, "error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    rec: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    if rec["ok"]:
        with np.load(tmp / "outs.npz") as z:
            rec["outputs"] = [z[f"arr_{i}"] for i in range(len(z.files))]
    return rec


def rel_diff(got: list[np.ndarray], ref: list[np.ndarray]) -> float:
    worst = 0.0
    for a, b in zip(got, ref, strict=True):
        a64, b64 = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if a64.shape != b64.shape:
            return float("inf")
        scale = float(np.abs(b64).max()) or 1.0
        worst = max(worst, float(np.abs(a64 - b64).max()) / scale)
    return worst


def model_feed(path: Path, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One feed of the first samples of ``arrays`` as ``compress``'s own evaluation feeds the model:
    each input's batch axis where the model has it, a fixed batch size respected, static inputs whole."""
    from chita_onnx.data import feed, open_source
    from chita_onnx.evaluate import _chunks, _fixed_batch
    from chita_onnx.graph import load_model, model_inputs

    specs = model_inputs(load_model(path))
    batch = next(iter(open_source(arrays, specs, batch_size=len(next(iter(arrays.values()))))))
    piece, _ = next(_chunks(batch, _fixed_batch(specs), specs))
    return {k: np.asarray(v) for k, v in feed(piece, specs).items()}


def check_model(
    name: str, path: Path, calib: Any, feeds_all: dict[str, np.ndarray], sparsity: float, storage: str
) -> dict[str, Any]:
    """``compress`` ``path`` with the default configuration on ``calib``, then run the dense and the
    pruned model on ``feeds_all`` (only the model's inputs are fed) in every runtime."""
    from chita_onnx import CompressConfig, compress
    from chita_onnx.evaluate import make_session

    rec: dict[str, Any] = {"model": name, "sparsity": sparsity, "storage": storage}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        out = tmp / "pruned.onnx"
        report = compress(path, out, calib, CompressConfig(sparsity=sparsity, storage=storage))  # type: ignore[arg-type]
        rec["sparsity_reached"] = report.sparsity
        feeds = model_feed(path, feeds_all)
        for label, model in (("dense", path), ("pruned", out)):
            sess = make_session(model)
            ref = [np.asarray(o) for o in sess.run(None, feeds)]
            for kind, python in RUNTIMES.items():
                if not python.exists():
                    rec[f"{label} {kind}"] = "not installed"
                    continue
                got = run_in(python, kind, model, feeds, tmp)
                rec[f"{label} {kind}"] = (
                    f"{rel_diff(got['outputs'], ref):.2g}" if got["ok"] else f"FAILS: {got['error']}"
                )
    return rec


def check_zoo(name: str, sparsity: float, storage: str, samples: int) -> dict[str, Any]:
    e = entry(name, None)
    calib, held = datasets(e, None)
    return check_model(name, e.path(), calib.inputs, dict(head_of(e, held, samples).inputs), sparsity, storage)


def check_unseen(folder: Path, name: str, sparsity: float, storage: str, samples: int) -> dict[str, Any]:
    """A model of an "unseen architectures" set (``make_unseen*.py``): ``<name>.onnx``, its
    ``_calib.npz`` and the first samples of its ``_test.npz``."""
    with np.load(folder / f"{name}_test.npz") as z:
        feeds = {k: z[k][:samples] for k in z.files if k != "labels"}
    return check_model(name, folder / f"{name}.onnx", folder / f"{name}_calib.npz", feeds, sparsity, storage)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=None, help="zoo models (default: all), or models of --dir")
    ap.add_argument("--dir", default=None, help="an unseen-architectures set (manifest.json) instead of the zoo")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--storage", default="dense", choices=["dense", "auto", "sparse"])
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    folder = Path(args.dir).expanduser() if args.dir else None
    if args.models:
        names = args.models.split(",")
    elif folder is not None:
        names = list(json.loads((folder / "manifest.json").read_text()))
    else:
        names = [e.name for e in entries.ENTRIES if not e.expect_refusal]
    rows = []
    for name in names:
        try:
            if folder is not None:
                rec = check_unseen(folder, name, args.sparsity, args.storage, args.samples)
            else:
                rec = check_zoo(name, args.sparsity, args.storage, args.samples)
        except Exception as exc:  # a crash is a result too
            rec = {"model": name, "error": f"{type(exc).__name__}: {exc}"}
        rows.append(rec)
        print(json.dumps(rec), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    keys = [f"{lab} {k}" for lab in ("dense", "pruned") for k in RUNTIMES]
    print("\n| model | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for r in rows:
        cells = (" ".join(str(r.get(k, r.get("error", "-"))).split())[:160] for k in keys)
        print(f"| {r['model']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
