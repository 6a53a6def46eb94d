"""The default against the high-sparsity switch ``--distill`` at high sparsity, on held-out classifiers.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_high_sparsity.py \\
        [--sparsity 0.9] [--models PATH.onnx,...,mlpnet] [--configs layerwise,default,distill] [--json out.json]

Each model is an audit-set classifier (``PATH.onnx`` next to its ``_calib.npz`` and its labelled
``_select.npz``, from ``make_unseen*.py``) or ``mlpnet``: the paper MLPNet with the first 1,000
MNIST training images as calibration (the papers' setting). The score is top-1 accuracy on the
model's SELECTION split (MLPNet: training images 1,000–14,261), never on a test split: these runs
are a comparison of settings, and the test splits stay for the audits. Per model, ``compress`` with

* ``layerwise``: ``CompressConfig(sparsity=s, auto_distill=False)``, the layer-wise pass alone (the
  default before stop 48);
* ``default``: ``CompressConfig(sparsity=s)``, which from 0.9 on a classifier also tries ``--distill``
  when the layer-wise result loses agreement on held-out calibration samples and keeps the better
  (:mod:`chita_onnx.escalate`; its decision line is printed under the table);
* ``distill``: ``CompressConfig(sparsity=s, distill=True)``, ``--distill`` (CHITA++ on the KL to the
  dense model);

each in this process, one after the other, with its wall time. Prints a markdown table. (The
stop-47 comparison with a multi-stage layer-wise pass ran this script's twin on the branch
``layerwise-stages-experiment``.)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from bench_mlpnet_bar import MLPNET, MNIST, normalise

CACHE = Path.home() / ".cache" / "chita-onnx"
MODELS = [
    CACHE / "unseen" / "resnet20_bn.onnx",
    CACHE / "unseen" / "mobilenetv2.onnx",
    CACHE / "unseen" / "transformer.onnx",
    CACHE / "unseen-torch8" / "inception_ts.onnx",
    CACHE / "unseen-torch13" / "tfenc_op10.onnx",
]


def _data(name: str, tmp: Path) -> tuple[str, Path, Path, dict[str, np.ndarray]]:
    """``(label, model, calibration file, selection arrays with 'labels')``."""
    if name == "mlpnet":
        d = np.load(MNIST)
        calib = tmp / "mlpnet_calib.npz"
        np.savez(calib, input=normalise(d["x_train"][:1000]), labels=d["y_train"][:1000].astype(np.int64))
        return (
            "mlpnet_paper",
            MLPNET,
            calib,
            {"input": normalise(d["x_train"][1000:14262]), "labels": d["y_train"][1000:14262]},
        )
    path = Path(name).expanduser()
    with np.load(path.with_name(path.stem + "_select.npz")) as s:
        sel = {k: s[k] for k in s.files}
    return path.stem, path, path.with_name(path.stem + "_calib.npz"), sel


def accuracy(model: Path, sel: dict[str, np.ndarray]) -> float:
    """Top-1 accuracy of ``model`` on ``sel`` (its ``labels`` against the argmax of the first output,
    or against that output itself where the model emits class indices). Every model input found in
    ``sel`` by name is fed (a FiLM model's condition, say); a one-input model takes the one non-label
    array whatever its key."""
    import onnxruntime as ort

    s = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    if all(n in sel for n in names):
        feeds = {n: sel[n] for n in names}
    else:
        feeds = {names[0]: sel[next(k for k in sel if k != "labels")]}
    n = len(sel["labels"])
    fixed = s.get_inputs()[0].shape[0]
    fixed_batch = isinstance(fixed, int) and fixed > 0  # a model exported with a fixed batch
    bs = int(fixed) if fixed_batch else 256

    def batch(v: np.ndarray, i: int) -> np.ndarray:
        part = v[i : i + bs]
        if fixed_batch and len(part) < bs:  # pad the last batch, then trim its outputs
            part = np.concatenate([part, np.repeat(part[-1:], bs - len(part), axis=0)])
        return part

    outs = [s.run(None, {k: batch(v, i) for k, v in feeds.items()})[0][: n - i] for i in range(0, n, bs)]
    out = np.concatenate(outs)
    pred = out.reshape(n) if out.dtype.kind in "iu" and out.size == n else out.reshape(n, -1).argmax(1)
    return float(np.mean(pred == sel["labels"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--models", default=",".join([*map(str, MODELS), "mlpnet"]))
    ap.add_argument("--configs", default="layerwise,default,distill", help="which of the three to run")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    from chita_onnx import CompressConfig, compress

    s = args.sparsity
    known = {
        "layerwise": CompressConfig(sparsity=s, auto_distill=False),
        "default": CompressConfig(sparsity=s),
        "distill": CompressConfig(sparsity=s, distill=True),
    }
    configs = [(c.strip(), known[c.strip()]) for c in args.configs.split(",")]
    choices: list[str] = []
    print(f"sparsity {s}; top-1 accuracy on the selection split (seconds)")
    print("| model | dense | " + " | ".join(c for c, _ in configs) + " |")
    print("|---|---:|" + "---:|" * len(configs))
    records: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="high-sparsity-") as tmpdir:
        tmp = Path(tmpdir)
        for name in args.models.split(","):
            label, model, calib, sel = _data(name.strip(), tmp)
            rec: dict[str, Any] = {"model": label, "dense": accuracy(model, sel)}
            cells = []
            for key, cfg in configs:
                t0 = time.perf_counter()
                rep = compress(model, tmp / "out.onnx", calib, cfg)
                secs = time.perf_counter() - t0
                choice = str(rep.solver.get("method_choice", ""))
                rec[key] = {"accuracy": accuracy(tmp / "out.onnx", sel), "seconds": secs, "choice": choice}
                if key == "default":
                    choices.append(f"{label}: {choice}")
                cells.append(f"{rec[key]['accuracy']:.4f} ({secs:.1f})")
            records.append(rec)
            print(f"| {label} | {rec['dense']:.4f} | " + " | ".join(cells) + " |", flush=True)
    for line in choices:
        print(f"* {line}")
    if args.json:
        args.json.write_text(json.dumps(records, indent=2))


if __name__ == "__main__":
    main()
