"""Which kept channel counts do onnxruntime's CPU kernels like?  (Chooses the channel-pruning rounding.)

Two measurements, each timed side by side in one process (median of interleaved runs, 1 thread):

1. one 3x3 Conv (C -> C channels, 28x28, batch 32) for C = 4 .. 64 in steps of 4, against C = 64;
2. the bundled digits CNN with every prunable group cut to ``(1 - s) * C`` rounded to the nearest
   multiple of 4, 8 or 16, for s = 0.25 .. 0.75, against the dense model, at batch 1, 32 and 256.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_channel_multiples.py --json multiples.json
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from chita_onnx.data_types import Batch
from chita_onnx.graph import load_model, model_inputs
from chita_onnx.structured.capture import probe_shapes
from chita_onnx.structured.groups import analyse
from chita_onnx.structured.latency import batch_feed, kernel_multiple, side_by_side
from chita_onnx.structured.surgery import kept_classes, sliced_model

REPO = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def conv_model(c: int, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    w = numpy_helper.from_array((0.1 * rng.standard_normal((c, c, 3, 3))).astype(np.float32), "w")
    b = numpy_helper.from_array(np.zeros(c, np.float32), "b")
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], pads=[1, 1, 1, 1])
    relu = helper.make_node("Relu", ["y"], ["z"])
    graph = helper.make_graph(
        [node, relu],
        "conv",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 28, 28])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", c, 28, 28])],
        [w, b],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 10
    return m


def single_conv(rounds: int) -> list[dict[str, float]]:
    rows = []
    for c in range(4, 68, 4):
        ref, test = conv_model(64), conv_model(c)
        # each model gets its own input; time per output channel relative to C = 64
        t_ref = side_by_side([ref], {"x": np.ones((32, 64, 28, 28), np.float32)}, rounds=rounds)[0]
        t = side_by_side([test], {"x": np.ones((32, c, 28, 28), np.float32)}, rounds=rounds)[0]
        rows.append(
            {
                "channels": c,
                "ms": 1e3 * t,
                "ms_c64": 1e3 * t_ref,
                "cost_per_channel2_vs_c64": (t / c**2) / (t_ref / 64**2),
            }
        )
        print(
            f"conv {c:3d}->{c:3d}: {1e3 * t:7.3f} ms   (64->64: {1e3 * t_ref:.3f} ms)  "
            f"time/C^2 relative to C=64: {rows[-1]['cost_per_channel2_vs_c64']:.2f}",
            flush=True,
        )
    return rows


def digits(rounds: int) -> list[dict[str, object]]:
    model = load_model(REPO / "models" / "digits_cnn.onnx")
    specs = model_inputs(model)
    x = np.load(REPO / "models" / "digits_calib.npz")["image"]
    probes = [Batch({"image": x[:1]}, None), Batch({"image": x[:2]}, None)]
    a = analyse(model, probe_shapes(model, probes, specs))
    groups = [g for g in a.groups if g.prunable]
    configs: list[tuple[str, float, tuple[int, ...]]] = []
    for s in (0.25, 0.375, 0.5, 0.625, 0.75):
        for m in (4, 8, 16):
            counts = tuple(max(m, min(g.size, m * round((1 - s) * g.size / m))) for g in groups)
            configs.append((f"x{m}", s, counts))
    models = [model] + [
        sliced_model(a, kept_classes(a, {g.id: g.classes[:k] for g, k in zip(groups, c, strict=True)}))
        for _, _, c in configs
    ]
    out = []
    for b in (1, 32, 256):
        t = side_by_side(models, batch_feed({"image": x}, b), rounds=rounds, min_seconds=0.02)
        for (name, s, counts), ti in zip(configs, t[1:], strict=True):
            out.append(
                {
                    "batch": b,
                    "sparsity": s,
                    "multiple": name,
                    "counts": list(counts),
                    "dense_ms": 1e3 * t[0],
                    "pruned_ms": 1e3 * ti,
                    "speedup": t[0] / ti,
                }
            )
            print(
                f"batch {b:3d} s={s:<5} {name:>3} counts {counts}: {t[0] / ti:5.2f}x  "
                f"({1e3 * ti:.3f} vs {1e3 * t[0]:.3f} ms)",
                flush=True,
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=61)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    print(f"CPU: {cpu_name()}; onnxruntime kernel block guess: {kernel_multiple()}")
    result = {"cpu": cpu_name(), "single_conv": single_conv(args.rounds), "digits_cnn": digits(args.rounds)}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
