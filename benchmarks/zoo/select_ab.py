"""A/B of ``CompressConfig`` variants on one zoo model, in ONE process, scored on a SELECTION set.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice python benchmarks/zoo/select_ab.py dnsmos 0.5 \\
        '[{}, {"max_rows": 64}, {"seed": 1}, {"seed": 1, "max_rows": 64}]' --out ab.jsonl

The selection set is drawn from the entry's own generator with seed 3 (the zoo's calibration set is
seed 1, its held-out set seed 2), as many samples as the held-out set, and cached beside the zoo's
data (``<zoo cache>/data/MODEL/select_N.npz``).
Choices of defaults are made on it, never on the held-out set.  ``--heldout`` also scores the zoo's
held-out set: for diagnosis only (e.g. reproducing a number of the zoo table).

Each variant is ``CompressConfig(sparsity=s, **variant)`` run like ``run.py``'s worker: the whole
calibration set prunes, because ``eval_data`` is given (the first few selection samples).  Without
``eval_data``, ``compress`` would hold 20% of the calibration data out of the pruning for its own
before/after report, and the numbers would not be those of the zoo.  One JSON line per variant.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import entries  # type: ignore[import-not-found]  # noqa: E402
import run as zoo  # type: ignore[import-not-found]  # noqa: E402

SEED_SELECT = 3


def selection_set(e: Any) -> Any:
    """The entry's selection set (generator seed 3, ``e.heldout`` samples), cached with its zoo data."""
    path = zoo.data_dir(e) / f"select_{e.heldout}_{zoo.generator_fingerprint(e)}.npz"
    if not path.exists():
        zoo.save_dataset(path, e.make(e, zoo.rng_for(e.name, SEED_SELECT), e.heldout, "heldout"))
    return zoo.load_dataset(path)


def main() -> None:
    from chita_onnx import CompressConfig, compress
    from chita_onnx.evaluate import make_session

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("sparsity", type=float)
    ap.add_argument("variants", help="JSON list of CompressConfig keyword dicts, e.g. '[{}, {\"max_rows\": 64}]'")
    ap.add_argument("--heldout", action="store_true", help="also score the zoo's held-out set (diagnosis only)")
    ap.add_argument("--out", type=Path, default=None, help="append the JSON lines to this file too")
    a = ap.parse_args()
    e = entries.BY_NAME[a.model]
    calib, held = zoo.datasets(e, None)
    sel = selection_set(e)
    sets = {"selection": sel, **({"heldout": held} if a.heldout else {})}
    session = make_session(e.path())
    dense = {k: e.run(e, session, d) for k, d in sets.items()}
    report_data = zoo.head_of(e, sel, zoo.EVAL_SAMPLES).inputs
    for variant in json.loads(a.variants):
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "pruned.onnx"
            rep = compress(
                e.path(), out, calib.inputs, CompressConfig(sparsity=a.sparsity, **variant), eval_data=report_data
            )
            seconds = time.perf_counter() - t0
            pruned = make_session(out)
            metrics = {k: e.metric(e, dense[k], e.run(e, pruned, d), d) for k, d in sets.items()}
        line = json.dumps(
            {
                "model": a.model,
                "sparsity": a.sparsity,
                "variant": variant,
                **{k: {m: round(v, 4) for m, v in ms.items()} for k, ms in metrics.items()},
                "seconds": round(seconds, 1),
                "timings": {k: round(v, 1) for k, v in rep.timings.items()},
            }
        )
        print(line, flush=True)
        if a.out is not None:
            with a.out.open("a") as f:
                f.write(line + "\n")


if __name__ == "__main__":
    main()
