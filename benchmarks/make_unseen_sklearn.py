"""Build the scikit-learn audit set: MLP classifiers trained on scikit-learn's handwritten digits and
exported with skl2onnx, in the forms skl2onnx writes (a label output first, then the probabilities
as a ``ZipMap`` or a tensor; a ``Scaler`` in front for a pipeline; string class labels).

Runs in its own virtual environment (scikit-learn and skl2onnx only)::

    python3 -m venv ~/.cache/chita-onnx/skl-venv
    ~/.cache/chita-onnx/skl-venv/bin/pip install scikit-learn skl2onnx
    ~/.cache/chita-onnx/skl-venv/bin/python benchmarks/make_unseen_sklearn.py [--only a,b]

Writes to ``--out`` (default ``~/.cache/chita-onnx/unseen-sklearn``) the files ``bench_unseen.py
--dir`` reads: ``<model>.onnx``, ``_calib`` / ``_select`` / ``_test.npz`` (input ``X`` and
``labels``, the class *index*: the position in the classifier's ``classes_``) and ``manifest.json``
(with ``classes``, the value of each index, for scoring the label output).

Data: ``sklearn.datasets.load_digits`` (1,797 8×8 images), shuffled with ``--seed``: 1,000
training, 256 calibration, 200 selection, 341 test.

Models: ``s_mlp`` (StandardScaler + MLP 128-64, ZipMap), ``s_mlp_nozip`` (the same estimator,
``zipmap=False``), ``s_binary`` (MLP 64 on digit ≥ 5; skl2onnx's Sigmoid/Concat binary head and
ZipMap), ``s_strlabels`` (MLP 64 on pixel/16 with the digits' English names as classes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_unseen import Manifest

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-sklearn"
NAMES = np.array(["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--only", default="")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import skl2onnx
    import sklearn
    from skl2onnx import to_onnx
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    only = {s for s in args.only.split(",") if s}
    X, y = load_digits(return_X_y=True)
    X = X.astype(np.float32)
    order = np.random.default_rng(args.seed).permutation(len(X))
    X, y = X[order], y[order]
    splits = {
        "train": slice(0, 1000),
        "calib": slice(1000, 1256),
        "select": slice(1256, 1456),
        "test": slice(1456, None),
    }
    manifest = Manifest(out)
    exporter = f"skl2onnx {skl2onnx.__version__} (scikit-learn {sklearn.__version__})"

    def mlp(hidden: tuple[int, ...]) -> Any:
        return MLPClassifier(hidden_layer_sizes=hidden, max_iter=400, random_state=args.seed)

    specs: list[tuple[str, Any, np.ndarray, np.ndarray, bool, str]] = [
        ("s_mlp", make_pipeline(StandardScaler(), mlp((128, 64))), X, y, True, "StandardScaler + MLP 128-64"),
        (
            "s_mlp_nozip",
            make_pipeline(StandardScaler(), mlp((128, 64))),
            X,
            y,
            False,
            "StandardScaler + MLP 128-64, zipmap=False",
        ),
        ("s_binary", mlp((64,)), X / 16, (y >= 5).astype(np.int64), True, "MLP 64, binary (digit ≥ 5)"),
        ("s_strlabels", mlp((64,)), X / 16, NAMES[y], True, "MLP 64, string class labels"),
    ]
    for name, est, xs, ys, zipmap, family in specs:
        if only and name not in only:
            continue
        tr = splits["train"]
        est.fit(xs[tr], ys[tr])
        last = est.steps[-1][1] if hasattr(est, "steps") else est
        options = None if zipmap else {id(last): {"zipmap": False}}
        onx = to_onnx(est, xs[:1], target_opset={"": 15, "ai.onnx.ml": 1}, options=options)
        (out / f"{name}.onnx").write_bytes(onx.SerializeToString())
        classes = list(last.classes_)
        index = np.searchsorted(np.asarray(last.classes_), ys).astype(np.int64)  # classes_ is sorted
        for split in ("calib", "select", "test"):
            sl = splits[split]
            np.savez(out / f"{name}_{split}.npz", X=xs[sl].astype(np.float32), labels=index[sl])
        acc = float(est.score(xs[splits["test"]], ys[splits["test"]]))
        manifest.record(
            name,
            {
                "family": f"scikit-learn {family}",
                "exporter": exporter,
                "opset": 15,
                "task": "classifier",
                "input": "X",
                "classes": [c.item() if isinstance(c, np.generic) else c for c in classes],
                "sklearn_test_accuracy": acc,
            },
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
