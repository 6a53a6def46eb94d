"""Models and data splits for the recipe benchmarks (bench_fisher.py, bench_distill.py).

Every model gets three disjoint roles for its data:

* ``calib`` — what the pruning sees (gradients, distillation targets);
* ``select`` — held-out images used to *choose* settings (never the test set);
* ``test`` — the score.

Splits (written once into ``benchmarks/data/``, git-ignored):

* paper MLPNet (``/work/shared/data/mlpnet_paper.onnx``) and the small MNIST CNN: calib = the first
  1,000 MNIST training images of ``/work/shared/data/mnist.npz`` (the papers' setting), select =
  training images 1,000–5,999, test = the full 10k test set; input ``[N, 1, 28, 28]``.
* our MLPNet (``make_mlpnet.py``): its own seeded calibration subset, select = 5,000 other training
  images, test = the 10k test set; input ``[N, 784]``.
* the bundled digits MLP / CNN: calib = ``models/digits_calib.npz`` (256), select = the other 1,041
  images of the training split (``models/build_models.py`` recomputes it), test =
  ``models/digits_test.npz`` (500).

The small MNIST CNN is trained with PyTorch in its own environment (``make_mnist_cnn.py``); models
that are missing are skipped with a message.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from make_mlpnet import DATA_DIR, DEFAULT_MNIST, REPO_ROOT, ensure_mlpnet, load_build_models

log = logging.getLogger("recipe_data")

PAPER_MLPNET = Path("/work/shared/data/mlpnet_paper.onnx")
MNIST_CNN = DATA_DIR / "mnist_cnn.onnx"


@dataclass(frozen=True)
class Entry:
    """One model and its three splits (paths)."""

    name: str
    model: Path
    calib: Path
    select: Path
    test: Path


def _norm(x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float32) / 255 - 0.1307) / 0.3081).astype(np.float32)


def _mnist_4d() -> tuple[Path, Path, Path]:
    paths = tuple(DATA_DIR / f"mnist4d_{s}.npz" for s in ("calib", "select", "test"))
    if not all(p.is_file() for p in paths):
        DATA_DIR.mkdir(parents=True, exist_ok=True)
        d = np.load(DEFAULT_MNIST)
        x, y = d["x_train"], d["y_train"].astype(np.int64)
        np.savez(paths[0], input=_norm(x[:1000])[:, None], labels=y[:1000])
        np.savez(paths[1], input=_norm(x[1000:6000])[:, None], labels=y[1000:6000])
        np.savez(paths[2], input=_norm(d["x_test"])[:, None], labels=d["y_test"].astype(np.int64))
    return paths  # type: ignore[return-value]


def _own_mlpnet_select() -> Path:
    path = DATA_DIR / "mnistflat_select.npz"
    if not path.is_file():
        bm = load_build_models()
        train, _ = bm.load_mnist(DEFAULT_MNIST)
        calib = np.random.default_rng(bm.MNIST_SEED).choice(len(train), size=bm.MNIST_CALIB_SIZE, replace=False)
        rest = np.setdiff1d(np.arange(len(train)), calib)[:5000]
        np.savez(path, image=train.image[rest], labels=train.labels[rest])
    return path


def _digits_select() -> Path:
    path = DATA_DIR / "digits_select.npz"
    if not path.is_file():
        bm = load_build_models()
        dd = bm.load_digits_splits()
        calib = np.random.default_rng(bm.DIGITS_SEED).choice(len(dd.train), size=bm.DIGITS_CALIB_SIZE, replace=False)
        if not np.array_equal(dd.train.image[calib], dd.calib.image):
            raise RuntimeError("the digits calibration split could not be reproduced")
        rest = np.setdiff1d(np.arange(len(dd.train)), calib)
        np.savez(path, image=dd.train.image[rest], labels=dd.train.labels[rest])
    return path


def entries(names: list[str] | None = None) -> list[Entry]:
    """The available models (building data splits on first use), in a fixed order."""
    out: list[Entry] = []
    want = set(names) if names else None

    def wanted(name: str) -> bool:
        return want is None or name in want

    if wanted("digits_mlp") or wanted("digits_cnn"):
        sel = _digits_select()
        for name in ("digits_mlp", "digits_cnn"):
            if wanted(name):
                models = REPO_ROOT / "models"
                out.append(
                    Entry(name, models / f"{name}.onnx", models / "digits_calib.npz", sel, models / "digits_test.npz")
                )
    if wanted("own_mlpnet"):
        files = ensure_mlpnet()
        out.append(Entry("own_mlpnet", files.model, files.calib, _own_mlpnet_select(), files.test))
    if wanted("mnist_cnn") or wanted("paper_mlpnet"):
        calib, select, test = _mnist_4d()
        if wanted("mnist_cnn"):
            if MNIST_CNN.is_file():
                out.append(Entry("mnist_cnn", MNIST_CNN, calib, select, test))
            else:
                log.warning("skipping mnist_cnn: build it with make_mnist_cnn.py (PyTorch venv)")
        if wanted("paper_mlpnet"):
            if PAPER_MLPNET.is_file():
                out.append(Entry("paper_mlpnet", PAPER_MLPNET, calib, select, test))
            else:
                log.warning("skipping paper_mlpnet: %s is missing", PAPER_MLPNET)
    return out
