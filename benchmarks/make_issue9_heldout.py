"""The two third-party models issue 9 opens with, and data for them: a final out-of-sample check.

    python benchmarks/make_issue9_heldout.py [--out ~/.cache/chita-onnx/issue9-heldout]

Issue 9 measured a new user's run on two pretrained models from the package registry.  They were
kept out of every selection since (BENCHMARKS.md, "How the default was chosen"), and this script
builds them only to score the finished default on them; nothing is chosen on their test splits.

* **text-orientation** — ``rapidocr-onnxruntime==1.4.4``'s ``ch_ppocr_mobile_v2.0_cls_infer.onnx``
  (PaddleOCR's MobileNetV3 line classifier, 124,072 prunable weights, classes ``0`` / ``180``).
  Data: lines of text rendered by ``zoo/render.py`` (``text_line`` + ``line_image``), half of them
  turned by 180°, labelled; rapidocr's own preprocessing: BGR, height 48, width ``≤ 192`` keeping
  the aspect ratio, ``(x/255 − 0.5)/0.5``, zero padding on the right.  Seeds 1 / 2 / 3 for the
  calibration (256), selection (300) and test (1,000) splits.
* **file-type** — ``magika==1.0.3``'s ``standard_v3_3/model.onnx`` (tf2onnx from JAX: a byte
  embedding, a 5-tap convolution and a 214-class softmax head; 781,376 prunable weights).  No
  labels.  Data: files on this machine, at most 25 of each file-name extension under a fixed list
  of system and project folders (seeded shuffle), turned into model inputs by magika's own feature
  extraction (the first and last 1,024 bytes, padding token 256), run in its own virtual
  environment (``magika`` depends on plain onnxruntime, which must not meet onnxruntime-training).
  The first 1,000 files are the calibration split, the next 300 the selection split, the rest test.
  Which files a machine has differs, so the file-type figures are this machine's.

Writes ``<out>/<name>/{model.onnx, calib.npz, select.npz, test.npz}`` (``x``/``labels`` for the
line classifier, ``bytes`` for the file-type model) and, for the file-type model, ``files.txt``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "zoo"))

import render  # type: ignore[import-not-found]  # noqa: E402
import wheels  # type: ignore[import-not-found]  # noqa: E402

CLS = ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx")
MAGIKA = ("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx")
FILE_ROOTS = (
    "/usr/lib/python3",
    "/usr/share",
    "/etc",
    "/usr/bin",
    "/usr/include",
    "/usr/lib/x86_64-linux-gnu",
    sys.base_prefix + "/lib",
    str(HERE.parent),
    "/opt",
    "/usr/local/lib",
    "/var/lib",
)


def line_input(img: Image.Image) -> np.ndarray:
    """rapidocr's classifier input ``(3, 48, 192)`` float32 for one RGB line image."""
    a = np.ascontiguousarray(np.asarray(img.convert("RGB"))[:, :, ::-1])  # BGR, as cv2 reads it
    h, w = a.shape[:2]
    rw = min(192, math.ceil(48 * w / h))
    r = np.asarray(Image.fromarray(a).resize((rw, 48), Image.Resampling.BILINEAR), np.float32)
    out = np.zeros((3, 48, 192), np.float32)
    out[:, :, :rw] = (r.transpose(2, 0, 1) / 255.0 - 0.5) / 0.5
    return out


def lines(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` rendered lines (half turned by 180°, label 1) as ``(x (n, 3, 48, 192), labels (n,))``."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for _ in range(n):
        text = render.text_line(rng, max_chars=int(rng.integers(6, 20)))
        img = render.line_image(rng, text, int(rng.integers(28, 64)))
        label = int(rng.random() < 0.5)
        xs.append(line_input(img.rotate(180) if label else img))
        ys.append(label)
    return np.stack(xs), np.asarray(ys, np.int64)


def make_cls(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wheels.extract(*CLS), out / "model.onnx")
    for name, seed, n in (("calib", 1, 256), ("select", 2, 300), ("test", 3, 1000)):
        x, y = lines(seed, n)
        np.savez(out / f"{name}.npz", x=x, labels=y)
        print(f"text-orientation {name}: {x.shape}, {y.mean():.2f} turned")


EXTRACT = textwrap.dedent(
    """
    import os, random, sys, collections
    from pathlib import Path
    import numpy as np
    from magika import Magika
    out, roots = Path(sys.argv[1]), sys.argv[2:]
    by_ext = collections.defaultdict(list)
    for root in roots:
        for dp, dn, fn in os.walk(root):
            if "/.git" in dp or "/.venv" in dp:
                continue
            for f in fn:
                p = os.path.join(dp, f)
                try:
                    if os.path.islink(p) or not os.path.isfile(p) or os.path.getsize(p) < 64:
                        continue
                except OSError:
                    continue
                by_ext[Path(f).suffix.lower() or "<none>"].append(p)
    rng = random.Random(0)
    paths = []
    for ext in sorted(by_ext):
        ps = sorted(by_ext[ext]); rng.shuffle(ps); paths.extend(ps[:25])
    rng.shuffle(paths)
    m = Magika(); cfg = m._model_config
    rows, kept = [], []
    for p in paths:
        try:
            _, feats = m._get_result_or_features_from_path(Path(p))
        except Exception:
            continue
        if feats is not None:  # None: magika answers without its model (tiny or empty files)
            rows.append(list(feats.beg[: cfg.beg_size]) + list(feats.end[-cfg.end_size :]))
            kept.append(p)
    X = np.asarray(rows, np.int32)
    for name, (a, b) in {"calib": (0, 1000), "select": (1000, 1300), "test": (1300, len(X))}.items():
        np.savez(out / f"{name}.npz", bytes=X[a:b])
        print(f"file-type {name}: {X[a:b].shape}")
    (out / "files.txt").write_text("\\n".join(kept))
    """
)


def make_magika(out: Path, venv: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wheels.extract(*MAGIKA), out / "model.onnx")
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"magika=={MAGIKA[1]}"], check=True)
    subprocess.run([str(py), "-c", EXTRACT, str(out), *FILE_ROOTS], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path.home() / ".cache" / "chita-onnx" / "issue9-heldout")
    ap.add_argument("--magika-venv", type=Path, default=Path.home() / ".cache" / "chita-onnx" / "magika-venv")
    ap.add_argument("--only", default="text-orientation,file-type")
    args = ap.parse_args()
    only = set(args.only.split(","))
    if "text-orientation" in only:
        make_cls(args.out / "text-orientation")
    if "file-type" in only:
        make_magika(args.out / "file-type", args.magika_venv)


if __name__ == "__main__":
    main()
