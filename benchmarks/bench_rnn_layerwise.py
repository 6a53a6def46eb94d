"""Recipes on the CRNN digit recognisers (convs + bidirectional LSTM/GRU + CTC head): does the
layer-wise pass with recurrent weights beat what ``method="auto"`` ran before?

Build the models first (torch venv, see ``make_crnn_digits.py``), then::

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_rnn_layerwise.py \
        --models lstm gru --sparsities 0.5 0.7 0.9 --json rnn.json

Variants (every one through :func:`chita_onnx.compress`, calibration ``crnn_digits_calib.npz``, 512
sequences, images only): ``chita`` (one-shot CHITA with the statistics correction on ``auto`` — what
``method="auto"`` runs when a prunable weight is not a Conv/Gemm/MatMul weight), ``magnitude``,
``layerwise`` (the layer-wise pass, LSTM/GRU weights included; what ``auto`` runs now) and
``layerwise-rnn-dense`` (the recurrent weights kept dense with ``keep``, the rest layer-wise: what
``auto`` ran before the recurrent weights were prunable, at the same sparsity of the *other* weights).
Scores: greedy-CTC sequence accuracy (all four digits right) on the selection and test splits.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_crnn_digits import DATA, sequence_accuracy  # noqa: E402

VARIANTS = ("chita", "magnitude", "layerwise", "layerwise-rnn-dense")


def accuracy(model_path: Path, split: str) -> float:
    import onnxruntime as ort

    d = np.load(DATA / f"crnn_digits_{split}.npz")
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    x = d["image"]
    out = np.concatenate([sess.run(None, {"image": x[i : i + 256]})[0] for i in range(0, len(x), 256)])
    return sequence_accuracy(out, d["labels"])


def run(model: Path, variant: str, sparsity: float, out: Path) -> dict[str, object]:
    from chita_onnx import CompressConfig, compress
    from chita_onnx.graph import densify

    m = onnx.load(str(model))
    rnn = [n for n in m.graph.node if n.op_type in ("LSTM", "GRU", "RNN")]
    calib = {"image": np.load(DATA / "crnn_digits_calib.npz")["image"]}
    kw: dict[str, object] = {"sparsity": sparsity, "num_samples": 512}
    if variant == "layerwise-rnn-dense":
        kw["keep"] = tuple(x for n in rnn for x in n.input[1:3])
        kw["method"] = "auto"
    elif variant == "layerwise":
        kw["method"] = "auto"
    else:
        kw["method"] = variant
    t0 = time.perf_counter()
    rep = compress(model, out, calib, CompressConfig(**kw))  # type: ignore[arg-type]
    secs = time.perf_counter() - t0
    pruned = densify(onnx.load(str(out)))
    vals = {t.name: onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer}
    rnn_nnz = sum(int(np.count_nonzero(vals[x])) for n in rnn for x in n.input[1:3])
    rnn_size = sum(int(vals[x].size) for n in rnn for x in n.input[1:3])
    return {
        "variant": variant,
        "sparsity": sparsity,
        "method": rep.method,
        "choice": rep.solver.get("method_choice", ""),
        "k": rep.k,
        "p": rep.p,
        "nnz": rep.nnz,
        "rnn_density": rnn_nnz / rnn_size,
        "select_accuracy": accuracy(out, "select"),
        "test_accuracy": accuracy(out, "test"),
        "seconds": secs,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["lstm"])
    ap.add_argument("--sparsities", nargs="+", type=float, default=[0.5, 0.7, 0.9])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            model = DATA / f"crnn_digits_{name}.onnx"
            dense = {"model": name, "variant": "dense", "sparsity": 0.0}
            dense.update({f"{s}_accuracy": accuracy(model, s) for s in ("select", "test")})
            rows.append(dense)
            print(json.dumps(dense), flush=True)
            for s in args.sparsities:
                for v in args.variants:
                    r = {"model": name, **run(model, v, s, Path(tmp) / f"{name}_{v}_{s}.onnx")}
                    rows.append(r)
                    print(json.dumps(r), flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
