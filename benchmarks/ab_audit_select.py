"""A/B of ``CompressConfig`` variants on the audit sets' classifiers, scored on their SELECTION splits.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/ab_audit_select.py \\
        --dir ~/.cache/chita-onnx/unseen-torch3 [--dir ...] --sparsities 0.5,0.7 \\
        '[{}, {"head_select": "layer"}]' [--models a,b] [--out ab.jsonl]

For every classifier of each ``--dir`` (``manifest.json``; ``task == "classifier"``), each variant is
``compress(MODEL.onnx, …, MODEL_calib.npz, CompressConfig(sparsity=s, **variant))`` as the user's
command runs it (20% of the calibration samples held out for its own report), and the output is
scored on ``MODEL_select.npz`` against the dense model: top-1 agreement and the mean KL divergence
from the dense class distribution (a softmax of the outputs when their rows do not sum to one), with
what ``--head-select auto`` chose (empty when it made no choice).
Defaults are chosen on these splits, never on the ``_test`` splits.  One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import onnx
from numpy.typing import NDArray


def _outputs(model: Path | onnx.ModelProto, data: dict[str, NDArray[Any]]) -> NDArray[np.float64]:
    """The model's (a file or in memory) first output on ``data`` (its graph inputs only), 64 samples
    per run, as ``(N, classes)`` class distributions."""
    import onnxruntime as ort

    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    fixed = sess.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else 64
    n = len(next(iter(data[k] for k in names)))
    parts = []
    for i in range(0, n, step):  # a fixed batch: the last one padded by repeating its first sample
        feed = {k: data[k][i : i + step] for k in names}
        m = len(next(iter(feed.values())))
        if m < step and step == fixed:
            feed = {k: np.concatenate([v, np.repeat(v[:1], step - m, axis=0)]) for k, v in feed.items()}
        parts.append(sess.run(None, feed)[0][:m])
    out = np.concatenate(parts).astype(np.float64).reshape(n, -1)
    if not (np.all(out >= 0) and np.allclose(out.sum(1), 1.0, atol=1e-3)):
        out = np.exp(out - out.max(1, keepdims=True))
        out /= out.sum(1, keepdims=True)
    return out


def _emit(record: dict[str, Any], path: Path | None) -> None:
    """Print ``record`` as one JSON line, and append it to ``path`` when given."""
    line = json.dumps(record)
    print(line, flush=True)
    if path is not None:
        with path.open("a") as f:
            f.write(line + "\n")


def main() -> None:
    from chita_onnx import CompressConfig, compress

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", help="JSON list of CompressConfig keyword dicts")
    ap.add_argument("--dir", type=Path, action="append", required=True)
    ap.add_argument("--sparsities", default="0.5,0.7")
    ap.add_argument("--models", default="", help="comma-separated names (default: every classifier)")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    ap.add_argument("--unlabelled", action="store_true", help="calibrate without the labels (inputs only)")
    ap.add_argument(
        "--softmax", action="store_true", help="append a Softmax to each model's output (implies --unlabelled)"
    )
    a = ap.parse_args()
    wanted = {m for m in a.models.split(",") if m}
    for folder in a.dir:
        manifest = json.loads((folder / "manifest.json").read_text())
        for model, info in manifest.items():
            if info.get("task") != "classifier" or (wanted and model not in wanted):
                continue
            path = folder / f"{model}.onnx"
            sel = dict(np.load(folder / f"{model}_select.npz"))
            calib: Path | dict[str, NDArray[Any]] = folder / f"{model}_calib.npz"
            tmpdir = tempfile.TemporaryDirectory()
            if a.softmax:
                m = onnx.load(path)
                first = m.graph.output[0]
                m.graph.node.append(onnx.helper.make_node("Softmax", [first.name], ["ab_probs"], axis=-1))
                first.name = "ab_probs"
                path = Path(tmpdir.name) / f"{model}.onnx"
                onnx.save(m, path)
            if a.unlabelled or a.softmax:
                inputs = {i.name for i in onnx.load(path, load_external_data=False).graph.input}
                calib = {k: v for k, v in np.load(calib).items() if k in inputs}
            p = _outputs(path, sel)
            for s in (float(v) for v in a.sparsities.split(",")):
                for variant in json.loads(a.variants):
                    t0 = time.perf_counter()
                    with tempfile.TemporaryDirectory() as tmp:
                        out = Path(tmp) / "pruned.onnx"
                        rep = compress(path, out, calib, CompressConfig(sparsity=s, **variant))
                        seconds = time.perf_counter() - t0
                        q = _outputs(out, sel)
                    kl = float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), 1)))
                    record = {
                        "set": folder.name,
                        "model": model,
                        "sparsity": s,
                        "variant": variant,
                        "labels": not (a.unlabelled or a.softmax),
                        "softmax": a.softmax,
                        "agreement": round(float(np.mean(p.argmax(1) == q.argmax(1))), 4),
                        "kl": round(kl, 5),
                        "seconds": round(seconds, 1),
                        "head_select": rep.solver.get("head_select", ""),
                    }
                    _emit(record, a.out)


if __name__ == "__main__":
    main()
