"""Audit the default ``compress`` on the "unseen architectures" set (``make_unseen.py``).

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        [--models a,b] [--sparsities 0.3,0.5,0.7] [--json out.json]

For every model of ``~/.cache/chita-onnx/unseen/manifest.json``: the dense model on the TEST split
(onnxruntime 1.19.2 of this venv), then, each in a fresh subprocess, ``compress`` with the default
config and with ``method="magnitude"`` (no statistics correction, as the zoo runs it) at every
sparsity, and the onnxsim peer's SparseGPT at 0.5 when its venv exists (:mod:`chita_onnx.peers`,
run as ``benchmarks/zoo/run.py`` does). Each pruned model is scored on the TEST split: top-1
accuracy and agreement with dense (classifiers), greedy-decode character accuracy and exact-string
agreement with dense (CTC recognisers), foreground IoU and pixel agreement with dense (segmenter).
``compress``'s own check uses 8 SELECTION samples; the calibration file is the model's
``_calib.npz`` (256 samples, labelled for the classifiers). Recorded per run: wall time,
p, the exact budget ``k = round((1−s)·p)`` against the nonzeros counted in the written file, tensors
left unpruned, weights ``inspect`` does not list (big float constants no prunable slot reads).

Then the CLI once per model (``chita-onnx compress IN OUT --sparsity 0.5 --data calib.npz``) and the
output loaded in the plain-onnxruntime venv (``~/.cache/chita-onnx/stock-ort-venv``), its outputs
compared with this venv's on 16 test samples. Bars (issue 9): 0.3 — agreement ≥ 0.99 (classifiers);
0.5 — default loss ≤ ½ magnitude's loss (or both within 0.005 of dense).
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
UNSEEN = Path.home() / ".cache" / "chita-onnx" / "unseen"
STOCK = Path.home() / ".cache" / "chita-onnx" / "stock-ort-venv" / "bin" / "python"
TOL = 0.005
sys.path.insert(0, str(HERE))

from make_unseen import (  # noqa: E402  (numpy only)
    char_accuracy,
    greedy_decode,
)


def load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def feeds(info: dict[str, Any], d: dict[str, np.ndarray], n: int | None = None) -> dict[str, np.ndarray]:
    """The model's inputs from an ``.npz`` split (``info["inputs"]``, or the one ``info["input"]``),
    the first ``n`` samples of each."""
    return {k: d[k][:n] for k in info.get("inputs", [info["input"]])}


def run_model(path: Path, x: dict[str, np.ndarray], batch_axis: int = 0, out_axis: int = 0) -> np.ndarray:
    """The model's first output on ``x`` (samples on axis 0), fed with the samples on ``batch_axis``
    (the manifest's, for a sequence-first model: the bench does not rely on the tool's guess), with
    the samples of the output (on its ``out_axis``, the manifest's ``output_batch_axis``) on axis 0."""
    from chita_onnx.evaluate import make_session

    sess = make_session(path)
    n = len(next(iter(x.values())))
    first = sess.get_inputs()[0]
    fixed = first.shape[batch_axis] if first.name in x and len(first.shape) == np.ndim(x[first.name]) else None
    fixed = fixed if isinstance(fixed, int) and fixed > 0 else None  # a fixed batch (TFLite RNNs: 1; a trace: 16)
    step = fixed or 256

    def chunk(v: np.ndarray, i: int) -> np.ndarray:
        c = v[i : i + step]
        if fixed and len(c) < step:  # pad the last call with copies of its first sample
            c = np.concatenate([c, np.repeat(c[:1], step - len(c), axis=0)])
        return np.moveaxis(c, 0, batch_axis)

    outs = [
        np.moveaxis(sess.run(None, {k: chunk(v, i) for k, v in x.items()})[0], out_axis, 0)[: min(step, n - i)]
        for i in range(0, n, step)
    ]
    y = np.concatenate(outs)
    return y.astype(str) if y.dtype == object else y  # string labels: saved without pickling


def axes(info: dict[str, Any]) -> tuple[int, int]:
    """The manifest's batch axes of the model's input and of its output (default 0)."""
    return int(info.get("batch_axis", 0)), int(info.get("output_batch_axis", 0))


def score(info: dict[str, Any], y: np.ndarray, dense: np.ndarray, test: dict[str, np.ndarray]) -> dict[str, float]:
    if info["task"] == "segment":  # foreground IoU against the true mask; pixel agreement with dense
        cut = info.get("threshold", 0.0)  # logits: 0; a probability map (a Sigmoid output): 0.5
        fg, truth = y > cut, test["mask"] > 0.5
        return {
            "metric": float((fg & truth).sum() / (fg | truth).sum()),
            "agreement": float((fg == (dense > cut)).mean()),
        }
    if info["task"] == "regress":  # R² against the clean target; "agreement": R² against dense
        t = test["target"].reshape(y.shape).astype(np.float64)
        yy, dd = y.astype(np.float64), dense.astype(np.float64)
        return {
            "metric": float(1 - ((yy - t) ** 2).sum() / ((t - t.mean(0)) ** 2).sum()),
            "agreement": float(1 - ((yy - dd) ** 2).sum() / ((dd - dd.mean(0)) ** 2).sum()),
        }
    if info["task"] == "embed":  # mean cosine with dense; nearest class-centroid (dense) agreement
        yy, dd = y.astype(np.float64), dense.astype(np.float64)
        cos = (yy * dd).sum(-1) / (np.linalg.norm(yy, axis=-1) * np.linalg.norm(dd, axis=-1) + 1e-12)
        cent = np.stack([dd[test["labels"] == c].mean(0) for c in np.unique(test["labels"])])
        return {
            "metric": float(cos.mean()),
            "agreement": float(((yy @ cent.T).argmax(-1) == (dd @ cent.T).argmax(-1)).mean()),
        }
    if info["task"] == "ctc":
        same = [a == b for a, b in zip(greedy_decode(y), greedy_decode(dense), strict=True)]
        return {"metric": char_accuracy(y, test["text"]), "agreement": float(np.mean(same))}
    if y.ndim == 1:  # a label output (skl2onnx): class values, mapped to indices by the manifest's classes
        index = {str(c): i for i, c in enumerate(info["classes"])}
        got = np.array([index.get(v.decode() if isinstance(v, bytes) else str(v), -1) for v in y])
        return {"metric": float((got == test["labels"]).mean()), "agreement": float((y == dense).mean())}
    return {
        "metric": float((y.argmax(-1) == test["labels"]).mean()),
        "agreement": float((y.argmax(-1) == dense.argmax(-1)).mean()),
    }


def config_for(method: str, s: float) -> Any:
    from chita_onnx import CompressConfig

    if method == "default":
        return CompressConfig(sparsity=s)
    return CompressConfig(sparsity=s, method="magnitude", bn_recalibrate="off", bias_correction="off")


def written_nnz(path: Path, names: list[str]) -> dict[str, tuple[int, int]]:
    """``{tensor: (nonzeros, size)}`` read back from the written file (sparse initializers densified)."""
    from chita_onnx.graph import densify, get_weights, load_model

    values = get_weights(densify(load_model(path)), names)
    return {k: (int(np.count_nonzero(v)), int(v.size)) for k, v in values.items()}


def unlisted_weights(path: Path) -> list[str]:
    """Float constants of ≥ 2 dimensions and ≥ 256 values that no prunable slot reads directly (a
    weight the tool never sees: behind a Transpose, Cast, Split, ...)."""
    import onnx
    from onnx import numpy_helper

    from chita_onnx import inspect_model
    from chita_onnx.graph import load_model
    from chita_onnx.standardize import DetachedInputs

    record = DetachedInputs()
    m = load_model(path, record=record)
    stand_ins = {r.identity for r in record.projections}  # the split Attention's identities (never written)
    try:  # what the pruning sees: the model after the weight-exposing rewrites (when they exist)
        from chita_onnx.weightchains import expose_weights

        m = expose_weights(m)[0]
    except ImportError:
        pass
    listed = {t.name for t in inspect_model(path)}
    big: list[tuple[str, onnx.TensorProto]] = [(t.name, t) for t in m.graph.initializer]
    big += [
        (n.output[0], a.t) for n in m.graph.node if n.op_type == "Constant" for a in n.attribute if a.name == "value"
    ]
    out = []
    for name, t in big:
        if name in listed or name in stand_ins or len(t.dims) < 2 or int(np.prod(t.dims)) < 256:
            continue
        if not np.issubdtype(numpy_helper.to_array(t).dtype, np.floating):
            continue
        readers = sorted({n.op_type for n in m.graph.node if name in n.input})
        out.append(f"{name} {list(t.dims)} read by {'/'.join(readers) or '-'}")
    return out


def worker(name: str, method: str, s: float, out_json: Path) -> None:
    from chita_onnx import ChitaError, compress

    info = json.loads((UNSEEN / "manifest.json").read_text())[name]
    src = UNSEEN / f"{name}.onnx"
    test = load(UNSEEN / f"{name}_test.npz")
    dense = np.load(UNSEEN / f"{name}_dense_test.npy")
    rec: dict[str, Any] = {"model": name, "method": method, "sparsity": s}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="unseen-") as tmp:
        out = Path(tmp) / "pruned.onnx"
        try:
            if method == "onnxsim-sparsegpt":
                rec.update(peer(src, out, s))
            else:
                sel = load(UNSEEN / f"{name}_select.npz")
                one_label = "labels" in sel and sel["labels"].ndim == 1 and info["task"] == "classifier"
                ev = feeds(info, sel, 8) | ({"labels": sel["labels"][:8]} if one_label else {})
                rep = compress(src, out, UNSEEN / f"{name}_calib.npz", config_for(method, s), eval_data=ev)
                names = [t.name for t in rep.tensors]
                counted = written_nnz(out, names)
                rec.update(
                    status="ok",
                    method_used=rep.method,
                    method_choice=str(rep.solver.get("method_choice", "")),
                    p=rep.p,
                    k=rep.k,
                    nnz=rep.nnz,
                    nnz_file=sum(c for c, _ in counted.values()),
                    unpruned=[n for n, (c, size) in counted.items() if c == size],
                    emptied=[n for n, (c, _) in counted.items() if c == 0],
                    timings=rep.timings,
                    warnings=list(rep.warnings),
                )
            rec["wall_s"] = time.perf_counter() - t0
            y = run_model(out, feeds(info, test), *axes(info))
            rec.update(score(info, y, dense, test))
        except ChitaError as exc:
            rec.update(status="refused", message=str(exc))
        except Exception as exc:  # a crash is a result too
            rec.update(
                status="error", message=f"{type(exc).__name__}: {exc}"[:500], traceback=traceback.format_exc()[-3000:]
            )
    rec.setdefault("wall_s", time.perf_counter() - t0)
    out_json.write_text(json.dumps(rec, indent=2, default=float))


def peer(src: Path, out: Path, s: float) -> dict[str, Any]:
    """onnxsim's SparseGPT at ``s`` on chita-onnx's working copy with the same calibration batches,
    as ``sweep`` and the zoo run it (nothing added after it)."""
    import onnx

    from chita_onnx import CompressConfig
    from chita_onnx.peers import run_onnxsim
    from chita_onnx.pipeline import _model_with, prepare
    from chita_onnx.reconstruct import batches_of

    cfg = CompressConfig(sparsity=s)
    calib = src.with_name(src.stem + "_calib.npz")
    prep = prepare(src, calib, cfg, hold_out=False)
    values, seconds, version = run_onnxsim("onnxsim-sparsegpt", prep.model, prep.layout.names, batches_of(prep, cfg), s)
    w = prep.layout.flatten(values, dtype=np.float32)
    onnx.save(_model_with(prep, w), str(out))
    return {"status": "ok", "method_used": f"onnxsim {version}", "p": prep.layout.p, "nnz": int(np.count_nonzero(w)),
            "timings": {"onnxsim": seconds}}  # fmt: skip


def spawn(name: str, method: str, s: float, tmp: Path) -> dict[str, Any]:
    out_json = tmp / f"{name}_{method}_{s}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--dir", str(UNSEEN), "--worker", name, method, str(s),
           str(out_json)]  # fmt: skip
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if not out_json.exists():
        tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
        return {"model": name, "method": method, "sparsity": s, "status": "error", "message": tail}
    rec: dict[str, Any] = json.loads(out_json.read_text())
    rec["process_s"] = time.time() - t0
    return rec


def cli_check(name: str, info: dict[str, Any], tmp: Path) -> dict[str, Any]:
    """The CLI on the model at 0.5, and its output in the plain-onnxruntime venv."""
    src, out = UNSEEN / f"{name}.onnx", tmp / f"{name}_cli.onnx"
    exe = Path(sys.executable).with_name("chita-onnx")
    cmd = [str(exe), "compress", str(src), str(out), "--sparsity", "0.5", "--data", str(UNSEEN / f"{name}_calib.npz")]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    rec: dict[str, Any] = {"exit": proc.returncode, "cli_s": round(time.time() - t0, 1)}
    if proc.returncode != 0:
        rec["message"] = (proc.stderr.strip().splitlines() or [""])[-1][:300]
        return rec
    test = load(UNSEEN / f"{name}_test.npz")
    x = feeds(info, test, 16)
    np.savez(tmp / "x.npz", **x)
    axis, out_axis = axes(info)
    ours = run_model(out, x, axis, out_axis)
    if not STOCK.exists():
        rec["stock_ort"] = "no stock-ort venv"
        return rec
    code = (
        "import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1]); "
        "d = dict(np.load(sys.argv[2])); n = len(next(iter(d.values()))); "
        "ax = int(sys.argv[4]); f = s.get_inputs()[0].shape[ax]; st = f if isinstance(f, int) and f > 0 else n; "
        "y = np.concatenate([np.asarray(s.run(None, {k: np.moveaxis(v[i : i + st], 0, ax) for k, v in d.items()})[0]) "
        "for i in range(0, n, st)], axis=int(sys.argv[5])); y = y.astype(str) if y.dtype == object else y; "
        "np.save(sys.argv[3], y); print(ort.__version__)"
    )
    p2 = subprocess.run([str(STOCK), "-c", code, str(out), str(tmp / "x.npz"), str(tmp / "y.npy"), str(axis),
                         str(out_axis)], capture_output=True, text=True, check=False)  # fmt: skip
    if p2.returncode != 0:
        rec["stock_ort"] = "failed: " + (p2.stderr.strip().splitlines() or [""])[-1][:300]
        return rec
    theirs = np.moveaxis(np.load(tmp / "y.npy"), out_axis, 0)
    if theirs.dtype.kind in "fiu":
        shown = f"max |diff| {float(np.abs(theirs.astype(np.float64) - ours).max()):.2g}"
    else:  # string labels
        shown = f"{int((theirs != ours).sum())} of {theirs.size} labels differ"
    rec["stock_ort"] = f"ok (onnxruntime {p2.stdout.strip()}, {shown})"
    out.unlink(missing_ok=True)
    return rec


def bars(runs: list[dict[str, Any]], dense_metric: float, task: str) -> dict[str, str]:
    by = {(r["method"], r["sparsity"]): r for r in runs if r.get("status") == "ok" and "metric" in r}
    res: dict[str, str] = {}
    d3 = by.get(("default", 0.3))
    if task == "classifier":
        res["bar 0.3"] = "–" if d3 is None else f"{d3['agreement']:.4f} {'yes' if d3['agreement'] >= 0.99 else 'NO'}"
    else:
        res["bar 0.3"] = "n/a"
    d5, m5 = by.get(("default", 0.5)), by.get(("magnitude", 0.5))
    if d5 is None or m5 is None:
        res["bar 0.5"] = "–"
    else:
        ld, lm = dense_metric - d5["metric"], dense_metric - m5["metric"]
        ok = ld <= TOL or (lm > 0 and ld <= lm / 2) or (ld <= TOL and lm <= TOL)
        res["bar 0.5"] = f"{ld:.4f} / {lm:.4f} {'yes' if ok else 'NO'}"
    return res


def markdown(results: list[dict[str, Any]], sparsities: list[float]) -> str:
    cols = [f"{m} {s}" for s in sparsities for m in ("default", "magnitude")] + ["onnxsim-sparsegpt 0.5"]
    hdr = ["model", "exporter, opset", "p", "metric", "dense", *cols, "bar 0.3 (agreement ≥ 0.99)",
           "bar 0.5 (loss default / magnitude ≤ ½)", "CLI 0.5 → stock ort"]  # fmt: skip
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for m in results:
        info = m["info"]
        by = {(r["method"], r["sparsity"]): r for r in m["runs"]}
        cells = []
        for c in cols:
            meth, s = c.rsplit(" ", 1)
            r = by.get((meth, float(s)))
            if r is None:
                cells.append("")
            elif r.get("status") != "ok":
                cells.append(f"{r['status']}")
            else:
                cells.append(f"{r['metric']:.4f} ({r['agreement']:.3f})")
        b = m["bars"]
        cli = m["cli"]
        cli_s = f"exit {cli['exit']}" + (
            f", {cli.get('stock_ort', '')}" if cli["exit"] == 0 else f": {cli.get('message', '')}"
        )
        metric = {
            "ctc": "char accuracy (string agreement)",
            "segment": "foreground IoU (pixel agreement)",
            "regress": "R² to target (R² to dense)",
            "embed": "cosine to dense (centroid agreement)",
        }.get(info["task"], "top-1 (agreement)")
        row = [m["model"], f"{info['exporter']}, {info['opset']}", str(m.get("p", "–")), metric,
               f"{m['dense']:.4f}", *cells, b["bar 0.3"], b["bar 0.5"], cli_s]  # fmt: skip
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "| model | method | sparsity | status | method used | k | nnz (report / file) | achieved nnz/p | "
              "unpruned tensors | wall s | message |", "|" + "---|" * 11]  # fmt: skip
    for m in results:
        for r in m["runs"]:
            ach = f"{1 - r['nnz'] / r['p']:.4f}" if r.get("p") and r.get("nnz") is not None else "–"
            nnz = f"{r.get('nnz', '–')} / {r.get('nnz_file', '–')}"
            lines.append(
                f"| {m['model']} | {r['method']} | {r['sparsity']} | {r['status']} | {r.get('method_used', '')} | "
                f"{r.get('k', '–')} | {nnz} | {ach} | {', '.join(r.get('unpruned', [])) or '–'} | "
                f"{r.get('wall_s', 0):.1f} | {r.get('message', '')[:160]} |"
            )
    return "\n".join(lines)


def main() -> None:
    global UNSEEN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="")
    ap.add_argument("--sparsities", default="0.3,0.5,0.7")
    ap.add_argument("--json", type=Path, default=None, help="default: DIR/bench_unseen.json")
    ap.add_argument("--no-cli", action="store_true")
    ap.add_argument("--no-peer", action="store_true", help="skip the onnxsim peer")
    ap.add_argument(
        "--render",
        help="only print the tables of these JSON files (comma-separated; a later file's "
        "record of a model replaces an earlier one)",
    )
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, default=UNSEEN, help=f"the audit set (default {UNSEEN}; make_unseen*.py --out)")
    args = ap.parse_args()
    UNSEEN = args.dir.expanduser()
    args.json = args.json or UNSEEN / "bench_unseen.json"
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        name, method, s, out_json = args.worker
        worker(name, method, float(s), Path(out_json))
        return
    if args.render:
        merged: dict[str, dict[str, Any]] = {}
        for f in args.render.split(","):
            merged.update({m["model"]: m for m in json.loads(Path(f).read_text())})
        print(markdown(list(merged.values()), [float(x) for x in args.sparsities.split(",")]))
        return
    from chita_onnx.peers import onnxsim_python

    sys.path.insert(0, str(HERE / "zoo"))
    from run import machine_line  # the zoo's machine line (benchmarks/zoo/run.py)

    manifest = json.loads((UNSEEN / "manifest.json").read_text())
    names = [n for n in args.models.split(",") if n] or list(manifest)
    sparsities = [float(x) for x in args.sparsities.split(",")]
    results: list[dict[str, Any]] = []
    print(f"machine: {machine_line()} (shared); {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-unseen-") as tmpd:
        tmp = Path(tmpd)
        for name in names:
            info = manifest[name]
            test = load(UNSEEN / f"{name}_test.npz")
            try:
                dense = run_model(UNSEEN / f"{name}.onnx", feeds(info, test), *axes(info))
            except Exception as exc:  # an exporter's invalid graph (jax2onnx's j_resnet): a result, not a crash
                print(f"== {name}: the dense model does not run: {type(exc).__name__}: {exc}"[:400], flush=True)
                continue
            np.save(UNSEEN / f"{name}_dense_test.npy", dense)
            dense_metric = score(info, dense, dense, test)["metric"]
            try:
                unlisted = unlisted_weights(UNSEEN / f"{name}.onnx")
            except Exception as exc:  # a model the tool refuses: its runs below record the refusal
                unlisted = [f"(not loaded: {type(exc).__name__}: {str(exc)[:160]})"]
            print(
                f"== {name}: dense {dense_metric:.4f}; weights not listed as prunable: {unlisted or 'none'}", flush=True
            )
            runs = []
            jobs = [(m, s) for s in sparsities for m in ("default", "magnitude")]
            if not args.no_peer and onnxsim_python() is not None:
                jobs.append(("onnxsim-sparsegpt", 0.5))
            for method, s in jobs:
                rec = spawn(name, method, s, tmp)
                runs.append(rec)
                shown = rec.get("message")
                if "metric" in rec:
                    shown = (
                        f"{rec['metric']:.4f} agr {rec['agreement']:.4f} nnz {rec.get('nnz')}/{rec.get('p')} "
                        f"file {rec.get('nnz_file')} unpruned {rec.get('unpruned')}"
                    )
                print(f"   {method} @ {s}: {rec['status']} {shown} ({rec.get('wall_s', 0):.1f} s)", flush=True)
                for w in rec.get("warnings", []):
                    print(f"      warning: {w}", flush=True)
            cli = {"exit": "not run"} if args.no_cli else cli_check(name, info, tmp)
            print(f"   CLI: {cli}", flush=True)
            p = next((r["p"] for r in runs if r.get("p")), None)
            results.append({"model": name, "info": info, "dense": dense_metric, "p": p, "unlisted": unlisted,
                            "runs": runs, "cli": cli, "bars": bars(runs, dense_metric, info["task"])})  # fmt: skip
            args.json.write_text(json.dumps(results, indent=2, default=float))
    md = markdown(results, sparsities)
    args.json.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
