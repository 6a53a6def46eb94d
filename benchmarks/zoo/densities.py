"""Where the budget of one zoo run went: the density of every pruned tensor, and what each costs.

    python benchmarks/zoo/densities.py MODEL --sparsity 0.3 [--method magnitude] [--rank obd]
                                       [--alone] [--restore a,b --floor 0.7] [--heldout 64]

Prunes ``MODEL`` (a name from ``entries.py``) once through ``chita_onnx.compress`` with the zoo's
cached calibration data, prints every prunable tensor's density (least dense first) with its weight
scale, and the zoo metric on the held-out data.  Then, with plain magnitude masks at those densities
(no weight update, so it isolates *where* the budget went from *how* the kept weights were set):

* ``--alone``: each tensor pruned on its own at its density, the rest dense: which layer's cut the
  metric cannot take;
* ``--restore a,b --floor f``: all tensors at their densities, then the named ones raised to at least
  ``f``, one more at a time: how few weights given back to a starved layer recover the metric.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import entries  # noqa: E402
import run  # noqa: E402

from chita_onnx import CompressConfig, compress  # noqa: E402
from chita_onnx.graph import find_prunable, get_weights, load_model, write_weights  # noqa: E402


def magnitude_mask(w: NDArray[Any], density: float) -> NDArray[Any]:
    """``w`` with all but its ``round(density · size)`` largest-magnitude entries set to zero."""
    k = round(density * w.size)
    if k >= w.size:
        return w
    keep = np.zeros(w.size, dtype=bool)
    if k > 0:
        keep[np.argpartition(np.abs(w).ravel(), w.size - k)[w.size - k :]] = True
    return np.where(keep.reshape(w.shape), w, 0).astype(w.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=list(entries.BY_NAME))
    ap.add_argument("--sparsity", type=float, required=True)
    ap.add_argument("--method", default="chita")
    ap.add_argument("--rank", default="magnitude", help="CompressConfig.rank (CHITA's starting support)")
    ap.add_argument("--heldout", type=int, default=64, help="held-out samples for the masked variants")
    ap.add_argument("--alone", action="store_true")
    ap.add_argument("--restore", default="", help="comma-separated tensor names")
    ap.add_argument("--floor", type=float, default=0.7)
    args = ap.parse_args()

    e = entries.BY_NAME[args.model]
    calib, held = run.datasets(e, None)
    model = load_model(e.path())
    tensors = find_prunable(model)
    dense_w = get_weights(model, [t.name for t in tensors])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1

    def session(m: Any) -> ort.InferenceSession:
        return ort.InferenceSession(m.SerializeToString(), opts)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pruned.onnx"
        cfg = CompressConfig(sparsity=args.sparsity, method=args.method, rank=args.rank)
        report = compress(e.path(), out, calib.inputs, cfg)
        pruned = load_model(out)
        pw = get_weights(pruned, [t.name for t in tensors])
        dense_out = e.run(e, session(model), held)
        metric = e.metric(e, dense_out, e.run(e, session(pruned), held), held)
    density = {t.name: np.count_nonzero(pw[t.name]) / pw[t.name].size for t in tensors}
    print(f"{args.model} {report.method} rank={args.rank} sparsity {args.sparsity}: {metric}")
    print("| tensor | op | shape | size | density | max abs w | mean abs w |\n|---|---|---|---|---|---|---|")
    for t in sorted(tensors, key=lambda t: density[t.name]):
        a = np.abs(dense_w[t.name])
        cells = f"| `{t.name}` | {t.op_type} | {t.shape} | {t.size} | {density[t.name]:.3f}"
        print(f"{cells} | {a.max():.3g} | {a.mean():.3g} |")

    n = args.heldout
    part = entries.Dataset({k: v[:n] for k, v in held.inputs.items()}, {k: v[:n] for k, v in held.meta.items()})
    ref = e.run(e, session(model), part)

    def score(weights: dict[str, NDArray[Any]]) -> dict[str, float]:
        m, _ = write_weights(model, weights, storage="dense")
        return e.metric(e, ref, e.run(e, session(m), part), part)

    if args.alone:
        print(f"\neach tensor alone at its density, magnitude mask ({n} held-out samples):")
        for t in tensors:
            r = score({t.name: magnitude_mask(dense_w[t.name], density[t.name])})
            key = next(iter(r))
            print(f"  {t.name:32s} density {density[t.name]:.3f}: {key} {r[key]:.3f}", flush=True)
    names = [x for x in args.restore.split(",") if x]
    for i in range(len(names) + 1 if names else 0):
        d = {t.name: max(density[t.name], args.floor) if t.name in names[:i] else density[t.name] for t in tensors}
        extra = sum(round((d[t.name] - density[t.name]) * t.size) for t in tensors)
        r = score({t.name: magnitude_mask(dense_w[t.name], d[t.name]) for t in tensors})
        print(f"all at their densities, {names[:i]} raised to >= {args.floor} (+{extra} weights): {r}", flush=True)


if __name__ == "__main__":
    main()
