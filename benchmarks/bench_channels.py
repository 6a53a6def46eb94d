"""Channel pruning against the L1-filter baseline: latency, parameters, FLOPs and the task metric.

For every model and channel sparsity, three prunings through ``chita_onnx.compress(...,
CompressConfig(structure="channel"))`` — exactly what the CLI runs, latency guard included:

* ``chita``:   group-sparse selection on the layer-wise reconstruction objective + least-squares re-fit
               (+ error-curve allocation of channels between groups);
* ``l1``:      the baseline, filter L1 norm (Li et al. 2017), same groups, uniform fraction, no update;
* ``l1+refit``: the baseline's channels with our re-fit (tells selection and update apart).

Then, in one process, the dense model and the three pruned ones are timed side by side with
onnxruntime CPU (1 thread; interleaved rounds over five sets of freshly created sessions; medians,
and the speed-up as the median of the per-round ratios) at batch 1 and 32, and scored on held-out data.

Tasks are pluggable: the bundled digits CNN is built in; other models come from ``--tasks FILE.py``, a
module with ``TASKS = {name: Task(...)}`` (see :class:`Task`) — e.g. the zoo's data generators.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/bench_channels.py \\
        --tasks benchmarks/zoo/channel_tasks.py --json bench_channels.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

import chita_onnx
from chita_onnx.graph import load_model, model_inputs
from chita_onnx.structured.capture import probe_shapes, session
from chita_onnx.structured.latency import batch_feed, count_params, paired_speedup, timings
from chita_onnx.structured.prune import node_macs

REPO = Path(__file__).resolve().parents[1]
Arrays = dict[str, np.ndarray]


@dataclass
class Task:
    """One benchmark model: its file, calibration and held-out inputs, and the task metric.

    ``metric(outputs)`` scores the model's first output on ``eval_inputs`` (concatenated over the
    batch axis ``batch_axis``) and returns named numbers, higher is better; the first one is the
    headline metric.
    """

    model: Path
    calib: Arrays
    eval_inputs: Arrays
    metric: Callable[[np.ndarray], dict[str, float]]
    batch_axis: int = 0  # of the first output (ddddocr's is [T, N, C])
    num_samples: int = 128
    notes: list[str] = field(default_factory=list)
    #: scores a whole model on the held-out data instead of ``metric`` (the zoo's runners and metrics)
    score: Callable[[onnx.ModelProto], dict[str, float]] | None = None

    def evaluate(self, model: onnx.ModelProto, chunk: int) -> dict[str, float]:
        if self.score is not None:
            return self.score(model)
        return self.metric(outputs(model, self.eval_inputs, self, chunk))


def digits_task() -> Task:
    calib = np.load(REPO / "models" / "digits_calib.npz")
    test = np.load(REPO / "models" / "digits_test.npz")
    labels = test["labels"]
    return Task(
        REPO / "models" / "digits_cnn.onnx",
        {"image": calib["image"]},
        {"image": test["image"]},
        lambda y: {"top1": float(np.mean(np.argmax(y, 1) == labels))},
        num_samples=256,
    )


def load_tasks(path: str | None, only: list[str] | None = None) -> dict[str, Task]:
    """The digits CNN and the tasks of ``path`` (built only when named in ``only``, if given)."""
    makers: dict[str, Callable[[], Task]] = {"digits_cnn": digits_task}
    if path:
        spec = importlib.util.spec_from_file_location("bench_tasks", path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        makers.update({k: (lambda k=k: module.TASKS[k]) for k in module.TASKS})
    return {k: make() for k, make in makers.items() if only is None or k in only}


def fixed_batch(model: onnx.ModelProto) -> bool:
    return any(s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 for s in model_inputs(model))


def symbolic_batch(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose inputs have a symbolic batch dimension (to time a fixed-batch-1 model at 32)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for vi in out.graph.input:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            dims[0].dim_param = "batch"
    return out


def outputs(model: onnx.ModelProto, x: Arrays, task: Task, chunk: int) -> np.ndarray:
    sess = session(model, threads=2)
    name = sess.get_outputs()[0].name
    n = next(iter(x.values())).shape[0]
    parts = [sess.run([name], {k: v[i : i + chunk] for k, v in x.items()})[0] for i in range(0, n, chunk)]
    return np.concatenate(parts, axis=task.batch_axis)


def flops(model: onnx.ModelProto, sample: Arrays) -> int:
    from chita_onnx.data_types import Batch

    shapes = probe_shapes(model, [Batch(sample, None)], model_inputs(model))[0]
    return 2 * sum(node_macs(model, shapes).values())


METHODS = {
    "chita": {"method": "chita"},
    "l1": {"method": "magnitude", "update": "none"},
    "l1+refit": {"method": "magnitude", "update": "obs"},
}


def run(
    name: str, task: Task, sparsities: list[float], methods: list[str], workdir: Path, budget: float
) -> list[dict[str, object]]:
    dense = load_model(task.model)
    fixed = fixed_batch(dense)
    chunk = 1 if fixed else 64
    first = {k: v[:1] for k, v in task.eval_inputs.items()}
    dense_metric = task.evaluate(dense, chunk)
    rows: list[dict[str, object]] = []
    print(f"\n== {name}: dense {dense_metric}", flush=True)
    for s in sparsities:
        pruned: dict[str, onnx.ModelProto] = {}
        info: dict[str, dict[str, object]] = {}
        for meth in methods:
            out = workdir / f"{name}_{s}_{meth}.onnx"
            cfg = chita_onnx.CompressConfig(
                sparsity=s,
                structure="channel",
                num_samples=task.num_samples,
                batch_size=1 if fixed else 32,
                **METHODS[meth],  # type: ignore[arg-type]
            )
            t0 = time.perf_counter()
            report = chita_onnx.compress(task.model, out, dict(task.calib), cfg)
            seconds = time.perf_counter() - t0
            c = report.structured
            pruned[meth] = load_model(out)
            info[meth] = {
                "seconds": seconds,
                "written": c.written,
                "channels": [c.channels_after, c.channels_before],
                "guard": [{"batch": r.batch, "speedup": r.speedup} for r in c.latency],
                "notes": list(c.notes),
                "multiple": c.multiple,
                "prunable_channels": c.prunable_channels,
                # groups kept whole by the analysis (not by the allocation): producers, channels, why
                "whole": [
                    [list(g.producers), g.channels, list(g.reasons)]
                    for g in c.groups
                    if g.reasons and not any("keeps every channel" in why or "--keep" in why for why in g.reasons)
                ],
            }
            print(
                f"  s={s} {meth}: {seconds:.0f}s, kept {c.channels_after}/{c.channels_before} channels, "
                f"written {c.written}, guard {[round(r.speedup, 2) for r in c.latency]}",
                flush=True,
            )
        # an identical copy of the dense model is timed too: its "speed-up" shows the measurement noise
        models = [dense, dense, *pruned.values()]
        timing: dict[int, list[float]] = {}
        ratio: dict[int, list[float]] = {}
        for b in (1, 32):
            timed = [symbolic_batch(m) for m in models] if fixed and b > 1 else models
            t = timings(timed, batch_feed(first, b), budget=budget, trials=5)
            timing[b], ratio[b] = [float(v) for v in np.median(t, axis=0)], paired_speedup(t)
        control = {b: ratio[b][1] for b in ratio}
        print(f"  s={s} control (dense vs its copy): b1 {control[1]:.2f}x b32 {control[32]:.2f}x", flush=True)
        for k, meth in enumerate(pruned, start=2):
            m = pruned[meth]
            score = task.evaluate(m, chunk)
            row = {
                "model": name,
                "sparsity": s,
                "method": meth,
                "metric": score,
                "dense_metric": dense_metric,
                "params": [count_params(m), count_params(dense)],
                "flops": [flops(m, first), flops(dense, first)],
                "latency_ms": {b: [1e3 * timing[b][k], 1e3 * timing[b][0]] for b in timing},
                "speedup": {b: ratio[b][k] for b in timing},
                "control_speedup": control,
                **info[meth],
            }
            rows.append(row)
            head = next(iter(score))
            print(
                f"  s={s} {meth:9s} {head} {score[head]:.4f} (dense {dense_metric[head]:.4f})  "
                f"speedup b1 {row['speedup'][1]:.2f}x b32 {row['speedup'][32]:.2f}x  "
                f"params {row['params'][0] / row['params'][1]:.2f}  flops {row['flops'][0] / row['flops'][1]:.2f}",
                flush=True,
            )
    return rows


def markdown(rows: list[dict[str, object]]) -> str:
    """The results as a Markdown table (``--render``): per model, sparsity and method."""
    out = [
        "| model | channels removed (of prunable) | method | metric (dense) | params | FLOPs | batch 1: speed-up (ms) "
        "| batch 32: speed-up (ms) | control b1 / b32 | written |",
        "|---|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        m, dm = r["metric"], r["dense_metric"]
        assert isinstance(m, dict) and isinstance(dm, dict)
        head = next(iter(m))
        ch, p, f = r["channels"], r["params"], r["flops"]
        lat, sp, c = r["latency_ms"], r["speedup"], r["control_speedup"]
        assert isinstance(ch, list) and isinstance(p, list) and isinstance(f, list)
        assert isinstance(lat, dict) and isinstance(sp, dict) and isinstance(c, dict)
        lat = {str(k): v for k, v in lat.items()}
        sp = {str(k): v for k, v in sp.items()}
        c = {str(k): v for k, v in c.items()}
        out.append(
            f"| {r['model']} | {r['sparsity']:g} ({ch[1] - ch[0]}/{r.get('prunable_channels', ch[1])}) | {r['method']} "
            f"| {head} {100 * m[head]:.1f} ({100 * dm[head]:.1f}) | {p[0] / p[1]:.2f} | {f[0] / f[1]:.2f} "
            f"| {sp['1']:.2f}x ({lat['1'][0]:.3g} vs {lat['1'][1]:.3g}) "
            f"| {sp['32']:.2f}x ({lat['32'][0]:.3g} vs {lat['32'][1]:.3g}) | {c['1']:.2f} / {c['32']:.2f} "
            f"| {r['written']} |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default=None, help="Python file defining TASKS = {name: Task}")
    ap.add_argument("--only", default=None, help="comma-separated task names")
    ap.add_argument("--sparsities", default="0.25,0.5")
    ap.add_argument("--methods", default="chita,l1,l1+refit")
    ap.add_argument("--json", default=None)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds of timing per model set and batch size")
    ap.add_argument("--render", default=None, help="only print the Markdown table of these JSON files (comma-sep.)")
    args = ap.parse_args()
    if args.render:
        print(markdown([r for f in args.render.split(",") for r in json.loads(Path(f).read_text())["rows"]]))
        return
    tasks = load_tasks(args.tasks, args.only.split(",") if args.only else None)
    import onnxruntime as ort

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in Path("/proc/cpuinfo").read_text().splitlines()
            if ln.startswith("model name")
        ),
        platform.processor(),
    )
    print(f"CPU {cpu}; onnxruntime {ort.__version__}; chita-onnx {chita_onnx.__version__}")
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, task in tasks.items():
            sparsities = [float(v) for v in args.sparsities.split(",")]
            rows += run(name, task, sparsities, args.methods.split(","), Path(tmp), args.budget)
            if args.json:
                Path(args.json).write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
