"""Where the default loses agreement on issue 9's file-type model (magika standard_v3_3).

    python benchmarks/make_issue9_heldout.py                     # builds the model and its data
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/diag_file_type.py run 0.3 [KEY=VALUE ...]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 python benchmarks/diag_file_type.py run 0.3 damp=0.1 --fix-from P.onnx
    python benchmarks/diag_file_type.py attribute P.onnx          # each pruned tensor's share of the flips
    python benchmarks/diag_file_type.py margins P.onnx [P2.onnx]  # dense top-2 margins against the changes
    python benchmarks/diag_file_type.py winners P.onnx 0.03,0.3,3  # re-fit the conv on max-pool winners

``run`` prunes with ``compress`` as the user's command does (20% of the calibration files held out),
with ``CompressConfig`` fields given as ``KEY=VALUE`` (Python literals), and prints top-1 agreement
with the dense model on the calibration, selection and test files and every tensor's density.
``--fix-from`` forces the per-tensor keep counts of an earlier run's output, so that a setting of the
layer-wise pass is compared on the same allocation (diagnosis only: it patches the allocation).
``attribute`` puts an output's pruned tensors into the dense model in every combination and scores
the selection files.  ``margins`` relates the dense model's top-2 log-probability margins on the
test files to how far pruning moves them.  ``winners`` tests whether the layer objective spends its
accuracy on positions the global max-pool after the convolution discards: it re-fits each output
channel ``c`` of ``P``'s convolution on its kept weights, with rows only at the position where the
dense model's activation wins the max-pool, per calibration file,
``min ‖A_c w − y_c‖² + α (w − w₀)ᵀ H (w − w₀) + λ‖w − w₀‖²`` (``A_c``: the winners' patches of the
pruned model's convolution input, ``y_c``: the dense convolution's outputs there, ``w₀``: ``P``'s
weights, ``H``: the all-position Gram of 100 files scaled to the file count, ``λ`` = 1% of its mean
diagonal), for each ``α``.  This is a diagnosis; no default is chosen from it.
"""

from __future__ import annotations

import argparse
import ast
import functools
import itertools
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from numpy.typing import NDArray
from onnx import numpy_helper

DATA = Path(os.environ.get("ISSUE9_HELDOUT", Path.home() / ".cache/chita-onnx/issue9-heldout")) / "file-type"
MODEL = DATA / "model.onnx"
SPLITS = ("calib", "select", "test")


def inputs(split: str) -> NDArray[np.int32]:
    x: NDArray[np.int32] = np.load(DATA / f"{split}.npz")["bytes"]
    return x


def tensors(model: onnx.ModelProto | Path, names: list[str], x: NDArray[np.int32]) -> list[NDArray[np.float32]]:
    """Tensors ``names`` of ``model`` on byte features ``x (N, 2048)``; intermediate ones are exposed as
    extra outputs."""
    m = onnx.load(model) if isinstance(model, Path) else model
    extra = [n for n in names if n not in {o.name for o in m.graph.output}]
    if extra:
        copy = onnx.ModelProto()
        copy.CopyFrom(m)
        copy.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in extra)
        m = copy
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    parts = [sess.run(names, {"bytes": x[i : i + 100]}) for i in range(0, len(x), 100)]
    return [np.concatenate([p[j] for p in parts]) for j in range(len(names))]


def probabilities(model: onnx.ModelProto | Path, x: NDArray[np.int32]) -> NDArray[np.float32]:
    """The model's class probabilities ``(N, 214)``."""
    m = onnx.load(model) if isinstance(model, Path) else model
    return tensors(m, [m.graph.output[0].name], x)[0]


@functools.cache
def dense_top(split: str) -> NDArray[np.intp]:
    """The dense model's top-1 class on each file of ``split``."""
    top: NDArray[np.intp] = probabilities(MODEL, inputs(split)).argmax(1)
    return top


def agreements(model: onnx.ModelProto | Path) -> str:
    """Top-1 agreement with the dense model on each split."""
    return " ".join(
        f"{split} {(dense_top(split) == probabilities(model, inputs(split)).argmax(1)).mean():.4f}" for split in SPLITS
    )


def big_weights(model: onnx.ModelProto) -> dict[str, NDArray[np.float32]]:
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer if int(np.prod(i.dims)) > 1000}


def fix_allocation(path: Path) -> None:
    """Patch the layer-wise allocation to keep as many weights per tensor as ``path`` holds."""
    from chita_onnx import reconstruct

    counts = {name: int(np.count_nonzero(w)) for name, w in big_weights(onnx.load(path)).items()}
    original = reconstruct.allocate

    def allocate(*args: Any, **kwargs: Any) -> Any:
        keep, how, fisher = original(*args, **kwargs)
        fixed = {name: counts.get(name, c) for name, c in keep.items()}
        largest = max(fixed, key=lambda n: fixed[n])
        fixed[largest] += sum(keep.values()) - sum(fixed.values())  # the same exact budget
        return fixed, how, fisher

    reconstruct.allocate = allocate


def cmd_run(args: argparse.Namespace) -> None:
    from chita_onnx import CompressConfig, compress

    fields = {k: ast.literal_eval(v) for k, v in (kv.split("=", 1) for kv in args.fields)}
    if args.fix_from:
        fix_allocation(Path(args.fix_from))
    out = Path(args.out or f"/tmp/file_type_{args.sparsity}.onnx")
    compress(MODEL, out, DATA / "calib.npz", CompressConfig(sparsity=args.sparsity, **fields))
    dens = [f"{np.count_nonzero(w) / w.size:.3f}" for w in big_weights(onnx.load(out)).values()]
    print(args.sparsity, fields, "fixed" if args.fix_from else "", agreements(out), "densities", dens, out)


def cmd_attribute(args: argparse.Namespace) -> None:
    dense = onnx.load(MODEL)
    pruned = big_weights(onnx.load(args.pruned))
    names = list(big_weights(dense))
    x = inputs("select")
    p = probabilities(dense, x)
    for chosen in itertools.product((False, True), repeat=len(names)):
        m = onnx.ModelProto()
        m.CopyFrom(dense)
        for init in m.graph.initializer:
            if init.name in names and chosen[names.index(init.name)]:
                init.CopyFrom(numpy_helper.from_array(pruned[init.name], init.name))
        q = probabilities(m, x)
        kl = np.mean(np.sum(p * (np.log(p + 1e-12) - np.log(q + 1e-12)), 1))
        which = [n for n, c in zip(names, chosen, strict=True) if c] or ["(none)"]
        print(f"pruned {', '.join(which)}: agreement {(p.argmax(1) == q.argmax(1)).mean():.4f}  KL {kl:.4f}")


def cmd_margins(args: argparse.Namespace) -> None:
    x = inputs("test")
    a = np.log(probabilities(MODEL, x) + 1e-30)
    order = np.argsort(a, 1)
    top, second = order[:, -1], order[:, -2]
    idx = np.arange(len(x))
    margin = a[idx, top] - a[idx, second]
    print("dense top-2 margin: " + "  ".join(f"<{d:g}: {(margin < d).mean():.3f}" for d in (0.01, 0.03, 0.1, 0.3, 1.0)))
    for path in args.pruned:
        b = np.log(probabilities(Path(path), x) + 1e-30)
        moved = np.abs(b[idx, top] - b[idx, second] - margin)
        q50, q90 = np.quantile(moved, [0.5, 0.9])
        print(f"{path}: agreement {(b.argmax(1) == top).mean():.4f}  |margin change| median {q50:.3f} q90 {q90:.3f}")


CONV = "jax2tf_get_logits_/pjit_get_logits_/MagikaV2/"
CONV_IN, CONV_OUT, CONV_W = CONV + "Conv_0/Conv2D__120:0", CONV + "Conv_0/Conv2D:0", CONV + "Conv_0/transpose_3:0"
ACTIVATION = CONV + "ApplyActivation_1/Mul_5:0"  # the GELU the global max-pool reads


def cmd_winners(args: argparse.Namespace) -> None:
    dense, pruned = onnx.load(MODEL), onnx.load(args.pruned)
    x = inputs("calib")
    y, act = (t[..., 0] if t.ndim == 4 else t for t in tensors(dense, [CONV_OUT, ACTIVATION], x))  # (N, Co, Lo)
    (u,) = tensors(pruned, [CONV_IN], x)
    u = u[..., 0]  # (N, Ci, L): the pruned upstream's input to the convolution
    n, ci, _ = u.shape
    co, lo = y.shape[1], y.shape[2]
    weight = big_weights(pruned)[CONV_W]
    shape = weight.shape
    w0 = weight.reshape(co, -1).astype(np.float64)
    taps = shape[2]
    win = act.argmax(2)  # (N, Co): the position each channel's max-pool takes, per file
    window = np.arange(lo)[:, None] + np.arange(taps)[None, :]
    gram = np.zeros((ci * taps, ci * taps))
    for i in range(min(100, n)):
        patches = u[i][:, window].transpose(1, 0, 2).reshape(lo, -1).astype(np.float64)
        gram += patches.T @ patches
    gram *= n / (min(100, n) * lo)
    lam = 0.01 * float(np.mean(np.diag(gram)))
    alphas = [float(a) for a in args.alphas.split(",")]
    fitted = {a: w0.copy() for a in alphas}
    for c in range(co):
        kept = np.flatnonzero(w0[c] != 0)
        rows = u[np.arange(n)[:, None], :, win[:, c][:, None] + np.arange(taps)[None, :]]  # (N, taps, Ci)
        a_c = rows.transpose(0, 2, 1).reshape(n, -1)[:, kept].astype(np.float64)
        y_c = y[np.arange(n), c, win[:, c]].astype(np.float64)
        h_k, start = gram[np.ix_(kept, kept)], w0[c, kept]
        for a in alphas:
            lhs = a_c.T @ a_c + a * h_k + lam * np.eye(kept.size)
            fitted[a][c, kept] = np.linalg.solve(lhs, a_c.T @ y_c + a * h_k @ start + lam * start)
    for a in alphas:
        m = onnx.ModelProto()
        m.CopyFrom(pruned)
        for init in m.graph.initializer:
            if init.name == CONV_W:
                init.CopyFrom(numpy_helper.from_array(fitted[a].reshape(shape).astype(np.float32), CONV_W))
        print(f"alpha {a:g}: {agreements(m)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run")
    run.add_argument("sparsity", type=float)
    run.add_argument("fields", nargs="*", help="CompressConfig fields, KEY=VALUE")
    run.add_argument("--fix-from", help="force the per-tensor keep counts of this pruned model")
    run.add_argument("--out")
    att = sub.add_parser("attribute")
    att.add_argument("pruned")
    mar = sub.add_parser("margins")
    mar.add_argument("pruned", nargs="+")
    win = sub.add_parser("winners")
    win.add_argument("pruned")
    win.add_argument("alphas", help="comma-separated weights of the all-position term")
    args = ap.parse_args()
    if not MODEL.exists():
        sys.exit(f"{MODEL} is missing: run benchmarks/make_issue9_heldout.py first")
    {"run": cmd_run, "attribute": cmd_attribute, "margins": cmd_margins, "winners": cmd_winners}[args.cmd](args)


if __name__ == "__main__":
    main()
