"""Agreement with dense, split by how decided the dense model is (issue 9's 0.3 bar; stop 55).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_margin_agreement.py \\
        --dir ~/.cache/chita-onnx/unseen-torch5 [--dir ...] [--file-type] [--sparsities 0.3,0.5] \\
        [--models a,b] [--jsonl out.jsonl]

For every classifier of each ``--dir`` (``manifest.json``, ``task == "classifier"``), and with
``--file-type`` issue 9's file-type model (``make_issue9_heldout.py``'s ``file-type`` folder:
``model.onnx``, ``calib.npz``, ``test.npz``): ``compress`` with the default config on the
calibration file, as the user's command runs it, then both models on the TEST split.  The dense
model's top-2 log-probability margin ``m = log p₁ − log p₂`` of each test input puts it in a bin,
and top-1 agreement with dense is given per bin: all inputs, ``m ≤ 0.1``, ``0.1 < m ≤ 0.5``,
``0.5 < m ≤ 1`` and ``m > 1`` nats, with each bin's share of the inputs.  One JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ab_audit_select import _emit, _outputs

BINS: tuple[tuple[str, float, float], ...] = (
    ("m<=0.1", -np.inf, 0.1),
    ("0.1<m<=0.5", 0.1, 0.5),
    ("0.5<m<=1", 0.5, 1.0),
    ("m>1", 1.0, np.inf),
)


def margins(p: NDArray[np.float64]) -> NDArray[np.float64]:
    """``log p₁ − log p₂`` per row of the class distributions ``p`` ``(N, C)``."""
    top = np.sort(np.log(np.maximum(p, 1e-30)), axis=1)[:, -2:]
    return np.asarray(top[:, 1] - top[:, 0], np.float64)


def cases(dirs: list[Path], wanted: set[str], file_type: bool) -> list[tuple[str, str, Path, Path, Path]]:
    out = []
    for folder in dirs:
        manifest = json.loads((folder / "manifest.json").read_text())
        for model, info in manifest.items():
            if info.get("task") == "classifier" and (not wanted or model in wanted):
                out.append((folder.name, model, folder / f"{model}.onnx", folder / f"{model}_calib.npz",
                            folder / f"{model}_test.npz"))  # fmt: skip
    if file_type:
        ft = Path.home() / ".cache/chita-onnx/issue9-heldout/file-type"
        out.append(("issue9-heldout", "file-type", ft / "model.onnx", ft / "calib.npz", ft / "test.npz"))
    return out


def main() -> None:
    from chita_onnx import CompressConfig, compress

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, action="append", default=[])
    ap.add_argument("--file-type", action="store_true", help="also issue 9's file-type model")
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--models", default="")
    ap.add_argument("--jsonl", type=Path, default=None)
    a = ap.parse_args()
    for set_name, model, path, calib, test in cases(a.dir, {m for m in a.models.split(",") if m}, a.file_type):
        data: dict[str, Any] = dict(np.load(test))
        p = _outputs(path, data)
        m = margins(p)
        for s in (float(v) for v in a.sparsities.split(",")):
            t0 = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "pruned.onnx"
                compress(path, out, calib, CompressConfig(sparsity=s))
                q = _outputs(out, data)
            same = p.argmax(1) == q.argmax(1)
            record: dict[str, Any] = {"set": set_name, "model": model, "sparsity": s, "n": len(m),
                                      "agreement": round(float(same.mean()), 4)}  # fmt: skip
            for name, lo, hi in BINS:
                sel = (m > lo) & (m <= hi)
                record[name] = [round(float(sel.mean()), 4), round(float(same[sel].mean()), 4) if sel.any() else None]
            record["m>0.5"] = [round(float((m > 0.5).mean()), 4), round(float(same[m > 0.5].mean()), 4)]
            record["seconds"] = round(time.perf_counter() - t0, 1)
            _emit(record, a.jsonl)


if __name__ == "__main__":
    main()
