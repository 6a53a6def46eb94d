"""Diagnosis: how far can *fitting the calibration data* take a pruned classifier? (issue 9, stop 55)

    OPENBLAS_NUM_THREADS=2 .venv/bin/python benchmarks/diag_finetune.py DENSE.onnx PRUNED.onnx \\
        CALIB.npz SELECT.npz TEST.npz [--train 800] [--lr 1e-4] [--epochs 4] [--batch 64]

``PRUNED`` is the output of ``compress`` (its zeros are the mask).  This script fine-tunes its kept
weights end to end, mask fixed, by Adam on the soft cross-entropy to the dense model's class
probabilities (knowledge distillation: the gradient of ``Σ KL(p_dense ‖ q)``), on the first
``--train`` calibration samples, in shuffled mini-batches.  The gradients are onnxruntime-training's,
from chita-onnx's own engine: each mini-batch's per-sample gradient rows are summed.  The engine's
loss weights are replaced by the dense probabilities for the duration (:func:`_soft_targets`); that
is the only change.  After every epoch it prints top-1 agreement and the mean KL to the dense model
on the fitted samples (``fit``), the rest of the calibration file (``rest``), the selection split
(``sel``) and the test split (``test``).

It is an upper-bound probe, not a method: if fitting the calibration samples end to end, far past
what the one-shot pass does, does not move the held-out agreement, then the gap is in the data, not
in the layer-wise pass.  Inputs named ``labels`` are ignored: the targets are the dense model's.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

import chita_onnx.gradients.engine as engine_mod
from chita_onnx.data import ArraySource

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_audit_select import _outputs as probabilities

Arrays = dict[str, NDArray[Any]]


def kl(p: NDArray[np.float64], q: NDArray[np.float64]) -> float:
    return float(np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), 1)))


@contextlib.contextmanager
def _soft_targets(ref: list[NDArray[np.float64]]) -> Iterator[None]:
    """Within the block, the engine's loss weights are ``T = −p_ref/m`` (``ref[0]``: the current
    mini-batch's dense probabilities ``(count, C)``), so a row is the gradient of the soft
    cross-entropy ``−Σ_c p_c log q_c`` of its sample."""
    original = engine_mod.make_targets

    def soft(head: Any, fisher: str, labels: Any, preds: Any, rng: Any, count: int, size: int,
             mini_batch: int, rows: int = 1, row0: int = 0, *_: Any) -> NDArray[np.float32]:  # fmt: skip
        per = head.shape[1:]
        T = np.zeros((size, *per), np.float32)
        p = ref[0][row0 : row0 + count]
        other = [d for k, d in enumerate(per, start=1) if k != head.class_axis]
        W = (-p / mini_batch).astype(np.float32).reshape(count, *other, head.num_classes)
        T[:count] = np.moveaxis(W, -1, head.class_axis)
        return T

    engine_mod.make_targets = soft  # type: ignore[assignment]
    try:
        yield
    finally:
        engine_mod.make_targets = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("dense", "pruned", "calib", "select", "test"):
        ap.add_argument(name)
    ap.add_argument("--train", type=int, default=800, help="calibration samples fitted (the rest are scored)")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    def load(path: str) -> Arrays:
        return {k: v for k, v in np.load(path).items() if k != "labels"}

    calib = load(a.calib)
    splits = {
        "fit": {k: v[: a.train] for k, v in calib.items()},
        "rest": {k: v[a.train :] for k, v in calib.items()},
        "sel": load(a.select),
        "test": load(a.test),
    }
    dense_p = {s: probabilities(Path(a.dense), d) for s, d in splits.items()}
    model = onnx.load(a.pruned)
    dense_zeros = {
        t.name: float(np.mean(numpy_helper.to_array(t) == 0))
        for t in onnx.load(a.dense).graph.initializer
        if t.data_type == onnx.TensorProto.FLOAT
    }
    W: dict[str, NDArray[np.float32]] = {}
    for t in model.graph.initializer:  # the pruned tensors: those with more zeros than in the dense model
        if t.data_type == onnx.TensorProto.FLOAT and t.name in dense_zeros:
            w = numpy_helper.to_array(t).astype(np.float32)
            if np.mean(w == 0) > dense_zeros[t.name] + 0.01:
                W[t.name] = w
    mask = {n: w != 0 for n, w in W.items()}
    fit = splits["fit"]
    first = ArraySource({k: v[: a.batch] for k, v in fit.items()}, None, batch_size=a.batch)
    eng = engine_mod.GradientEngine(model, list(W), example=next(iter(first)), loss="ce")
    print(f"{len(W)} pruned tensors, {sum(w.size for w in W.values()):,} weights, {a.train} fitted samples")

    def score(tag: str) -> None:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in m.graph.initializer:
            if t.name in W:
                t.CopyFrom(numpy_helper.from_array(W[t.name], t.name))
        cells = []
        for s, d in splits.items():
            q = probabilities(m, d)
            cells.append(f"{s} {np.mean(dense_p[s].argmax(1) == q.argmax(1)):.4f} / {kl(dense_p[s], q):.5f}")
        print(f"{tag:>8}: " + "  ".join(cells), flush=True)

    score("start")
    m1 = {n: np.zeros_like(w) for n, w in W.items()}
    m2 = {n: np.zeros_like(w) for n, w in W.items()}
    rng = np.random.default_rng(a.seed)
    n_fit, step, t0 = len(next(iter(fit.values()))), 0, time.perf_counter()
    ref: list[NDArray[np.float64]] = [dense_p["fit"][:0]]
    with _soft_targets(ref):
        for epoch in range(a.epochs):
            order = rng.permutation(n_fit)
            for lo in range(0, n_fit - a.batch + 1, a.batch):
                idx = order[lo : lo + a.batch]
                ref[0] = dense_p["fit"][idx]
                G = eng.compute(ArraySource({k: v[idx] for k, v in fit.items()}, None, batch_size=a.batch),
                                fisher="argmax", num_samples=a.batch)  # fmt: skip
                g = G.X.sum(0) / a.batch
                step += 1
                for s in G.layout.slots:
                    gi = g[s.offset : s.stop].reshape(W[s.name].shape)
                    m1[s.name] = 0.9 * m1[s.name] + 0.1 * gi
                    m2[s.name] = 0.999 * m2[s.name] + 0.001 * gi * gi
                    upd = (m1[s.name] / (1 - 0.9**step)) / (np.sqrt(m2[s.name] / (1 - 0.999**step)) + 1e-8)
                    W[s.name] = ((W[s.name] - a.lr * upd) * mask[s.name]).astype(np.float32)
                eng.set_weights(W)
            score(f"epoch {epoch + 1}")
    print(f"{step} steps in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
