"""Benchmark of the per-sample gradient engine (chita_onnx.gradients) against the physical floor.

For each model this measures, each in a fresh subprocess (so that peak memory is per run):

* ``single``  — per-sample gradients, one gradient-graph run per sample (recipe A′);
* ``batched`` — per-sample gradients, batched forward/backward + per-sample weight gradients in
  NumPy (recipe B, self-checked; it falls back to ``single`` when the check fails);
* ``floor``   — one plain batched forward+backward per batch of ``--floor-batch`` samples that
  computes the weight gradient once per batch (the same gradient graph with the batch fixed to
  ``--floor-batch`` and the summed loss): what a training step costs, no per-sample rows.

Times are for the gradient loop only (the n×p matrix is allocated and pre-faulted beforehand; the
allocation time is reported separately).  Models: the bundled digits MLP/CNN (calibration images
tiled to ``n``), a CIFAR-size ResNet-20 (3×32×32, 16/32/64 channels, 3 stages × 3 basic blocks,
BatchNormalization, ~270k prunable weights) and a 784-1024-192-10 MLP (1.0M weights), with random
inputs and labels.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_gradients.py --json bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import itertools

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
ALL_MODELS = ("digits_mlp", "digits_cnn", "resnet20", "mlp1m")


# ---------------------------------------------------------------------------------------- models


def resnet20(seed: int = 0, classes: int = 10) -> onnx.ModelProto:
    """CIFAR ResNet-20 (He et al. 2016, option B shortcuts) with random weights and BN statistics."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    count = [0]

    def fresh(prefix: str) -> str:
        count[0] += 1
        return f"{prefix}{count[0]}"

    def init(name: str, a: NDArray[np.floating]) -> str:
        inits.append(numpy_helper.from_array(a.astype(np.float32), name))
        return name

    def conv(x: str, cin: int, cout: int, stride: int, k: int = 3) -> str:
        w = init(fresh("conv") + ".weight", rng.standard_normal((cout, cin, k, k)) * np.sqrt(2.0 / (cin * k * k)))
        y = fresh("conv_out")
        nodes.append(
            helper.make_node("Conv", [x, w], [y], kernel_shape=[k, k], strides=[stride] * 2, pads=[k // 2] * 4, name=y)
        )
        return y

    def bn(x: str, c: int) -> str:
        tag = fresh("bn")
        args = [
            init(f"{tag}.scale", 1 + 0.1 * rng.standard_normal(c)),
            init(f"{tag}.bias", 0.1 * rng.standard_normal(c)),
            init(f"{tag}.mean", 0.1 * rng.standard_normal(c)),
            init(f"{tag}.var", 1 + 0.1 * rng.random(c)),
        ]
        nodes.append(helper.make_node("BatchNormalization", [x, *args], [tag], epsilon=1e-5, name=tag))
        return tag

    def relu(x: str) -> str:
        y = fresh("relu")
        nodes.append(helper.make_node("Relu", [x], [y], name=y))
        return y

    x = relu(bn(conv("input", 3, 16, 1), 16))
    cin = 16
    for stage, c in enumerate((16, 32, 64)):
        for block in range(3):
            stride = 2 if stage > 0 and block == 0 else 1
            y = bn(conv(relu(bn(conv(x, cin, c, stride), c)), c, c, 1), c)
            shortcut = bn(conv(x, cin, c, stride, k=1), c) if stride != 1 or cin != c else x
            s = fresh("add")
            nodes.append(helper.make_node("Add", [y, shortcut], [s], name=s))
            x, cin = relu(s), c
    nodes += [
        helper.make_node("GlobalAveragePool", [x], ["pooled"], name="gap"),
        helper.make_node("Flatten", ["pooled"], ["flat"], name="flatten"),
        helper.make_node(
            "Gemm",
            [
                "flat",
                init("fc.weight", 0.1 * rng.standard_normal((classes, 64))),
                init("fc.bias", np.zeros(classes)),
            ],
            ["logits"],
            transB=1,
            name="fc",
        ),
    ]
    graph = helper.make_graph(
        nodes,
        "resnet20",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def mlp(dims: tuple[int, ...] = (784, 1024, 192, 10), seed: int = 0) -> onnx.ModelProto:
    """MatMul/Add/Relu MLP; the default has 1,001,344 prunable weights."""
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    x = "input"
    for i, (a, b) in enumerate(itertools.pairwise(dims)):
        inits += [
            numpy_helper.from_array((rng.standard_normal((a, b)) / np.sqrt(a)).astype(np.float32), f"fc{i}.weight"),
            numpy_helper.from_array(np.zeros(b, np.float32), f"fc{i}.bias"),
        ]
        nodes += [
            helper.make_node("MatMul", [x, f"fc{i}.weight"], [f"mm{i}"], name=f"fc{i}"),
            helper.make_node("Add", [f"mm{i}", f"fc{i}.bias"], [f"z{i}"], name=f"fc{i}_bias"),
        ]
        x = f"z{i}"
        if i < len(dims) - 2:
            nodes.append(helper.make_node("Relu", [x], [f"a{i}"], name=f"relu{i}"))
            x = f"a{i}"
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", dims[0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", dims[-1]])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    return model


def load_case(name: str, n: int, seed: int = 0) -> tuple[onnx.ModelProto, dict[str, NDArray[Any]], NDArray[np.int64]]:
    rng = np.random.default_rng(seed)
    if name.startswith("digits_"):
        with np.load(MODELS / "digits_calib.npz", allow_pickle=False) as z:
            image, labels = z["image"], z["labels"]
        reps = -(-n // len(labels))
        return (
            onnx.load(str(MODELS / f"{name}.onnx")),
            {"image": np.tile(image, (reps, 1, 1, 1))[:n]},
            np.tile(labels, reps)[:n].astype(np.int64),
        )
    if name == "resnet20":
        return (
            resnet20(),
            {"input": rng.standard_normal((n, 3, 32, 32)).astype(np.float32)},
            rng.integers(0, 10, n),
        )
    if name == "mlp1m":
        return mlp(), {"input": rng.standard_normal((n, 784)).astype(np.float32)}, rng.integers(0, 10, n)
    raise SystemExit(f"unknown model {name!r}")


def available(name: str) -> bool:
    if name.startswith("digits_"):
        return (MODELS / f"{name}.onnx").exists() and (MODELS / "digits_calib.npz").exists()
    return True


# ---------------------------------------------------------------------------------------- worker


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One measurement in this (fresh) process; returns a JSON-able record."""
    from chita_onnx.data import ArraySource
    from chita_onnx.gradients import GradientEngine

    model, feeds, labels = load_case(spec["model"], spec["n"])
    src = ArraySource(feeds, labels, batch_size=64)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kind = spec["kind"]
    mini_batch = spec["floor_batch"] if kind == "floor" else 1
    methods: dict[str, Literal["auto", "single", "batched"]] = {"auto": "auto", "batched": "batched"}
    method = methods.get(kind, "single")  # the floor runs the one-sample path at batch --floor-batch
    t0 = time.perf_counter()
    engine = GradientEngine(
        model, None, example=next(iter(src)), mini_batch=mini_batch, method=method, threads=spec["threads"]
    )
    build = time.perf_counter() - t0
    g = engine.compute(src)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = g.timings
    return {
        **spec,
        "p": g.layout.p,
        "rows": g.n,
        "used": g.method,
        "wall_s": t["gradients"],
        "cpu_s": t["gradients_cpu"],
        "alloc_s": t["allocate"],
        "build_s": build + t.get("batched_build", 0.0),
        "self_check_s": t.get("self_check", 0.0),
        "peak_rss_mb": rss1 / 1024,
        "rss_delta_mb": (rss1 - rss0) / 1024,
        "checksum": float(np.abs(g.X).sum(dtype=np.float64)),
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"},
    )
    if out.returncode != 0:
        raise SystemExit(f"worker failed for {spec}:\n{out.stderr[-3000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma-separated subset of {ALL_MODELS}")
    ap.add_argument("--n", type=int, default=1000, help="samples per model (default 1000)")
    ap.add_argument("--floor-batch", type=int, default=64, help="batch size of the floor measurement")
    ap.add_argument("--paths", default="single,batched,auto", help="per-sample paths to time: single,batched,auto")
    ap.add_argument("--threads", default="1", help="onnxruntime intra-op threads, comma-separated (e.g. 1,2)")
    ap.add_argument("--json", type=Path, help="also write the records to this JSON file")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return 0

    records: list[dict[str, Any]] = []
    notes: list[str] = []
    for name in [m for m in args.models.split(",") if m]:
        if not available(name):
            notes.append(f"{name}: skipped (models/{name}.onnx or models/digits_calib.npz not found)")
            continue
        for threads in [int(t) for t in args.threads.split(",")]:
            base = {"model": name, "n": args.n, "floor_batch": args.floor_batch, "threads": threads}
            floor = run_worker({**base, "kind": "floor"})
            records.append(floor)
            for path in [p for p in args.paths.split(",") if p]:
                rec = run_worker({**base, "kind": path})
                rec["x_floor_wall"] = rec["wall_s"] / floor["wall_s"]
                rec["x_floor_cpu"] = rec["cpu_s"] / floor["cpu_s"]
                records.append(rec)
                done = f"{rec['wall_s']:.2f} s wall, {rec['x_floor_wall']:.2f}x floor"
                print(f"# {name} t={threads} {path}: {done}", file=sys.stderr)

    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(
        f"per-sample gradients, n = {args.n}, floor = batched fwd+bwd at batch {args.floor_batch} "
        f"({machine}, load {os.getloadavg()[0]:.1f})\n"
    )
    print(
        "| model | p | threads | path (used) | wall s | CPU s | samples/s | ms/sample (CPU) | × floor wall | "
        "× floor CPU | alloc s | build s | peak RSS MB (Δ) |"
    )
    print("|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in records:
        path = "floor" if r["kind"] == "floor" else f"{r['kind']} ({r['used']})"
        xw = f"{r['x_floor_wall']:.2f}" if "x_floor_wall" in r else "1"
        xc = f"{r['x_floor_cpu']:.2f}" if "x_floor_cpu" in r else "1"
        print(
            f"| {r['model']} | {r['p']:,} | {r['threads']} | {path} | {r['wall_s']:.3f} | {r['cpu_s']:.3f} | "
            f"{r['n'] / r['wall_s']:,.0f} | {1e3 * r['cpu_s'] / r['n']:.3f} | {xw} | {xc} | "
            f"{r['alloc_s']:.2f} | {r['build_s']:.2f} | {r['peak_rss_mb']:,.0f} ({r['rss_delta_mb']:+,.0f}) |"
        )
    for note in notes:
        print(f"\n{note}")
    if args.json:
        args.json.write_text(
            json.dumps({"n": args.n, "floor_batch": args.floor_batch, "records": records, "notes": notes}, indent=2)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
