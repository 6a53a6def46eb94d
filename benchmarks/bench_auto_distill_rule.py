"""Selection run for the rule by which ``--method auto`` tries ``--distill`` from 0.9 on classifiers.

    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_auto_distill_rule.py \\
        --models PATH.onnx,...,mlpnet [--sparsity 0.9] --jsonl out.jsonl
    .venv/bin/python benchmarks/bench_auto_distill_rule.py --summarise out.jsonl[,more.jsonl]

Per model (an audit-set classifier ``PATH.onnx`` with ``_calib``/``_select``/``_test`` files, or
``mlpnet``), the three candidates the rule chooses among, built as :mod:`chita_onnx.escalate`
builds them (the same held-out fifth of the calibration samples, the same seed):

* the layer-wise pass on every calibration sample (what the default writes when it keeps it);
* the layer-wise pass and ``--distill`` on the other four fifths, each scored on the held-out fifth
  (top-1 agreement with dense and KL to the dense outputs: what the rule sees).

Both written candidates are scored on the SELECTION split (used to choose the rule) and on the TEST
split (reported, never used to choose).  ``--summarise`` then replays each candidate rule on the
recorded numbers: the mean selection accuracy it would give and the ``--distill`` minutes it costs.
``--distill`` runs under the rule's own 15-minute budget; a model where it stops is recorded so.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
from bench_high_sparsity import _data, accuracy
from bench_mlpnet_bar import MNIST, normalise


def _test_split(name: str) -> dict[str, np.ndarray]:
    if name == "mlpnet":
        d = np.load(MNIST)
        return {"input": normalise(d["x_test"]), "labels": d["y_test"]}
    path = Path(name).expanduser()
    with np.load(path.with_name(path.stem + "_test.npz")) as t:
        return {k: t[k] for k in t.files}


@dataclasses.dataclass
class HeldOut:
    """One model split as :func:`chita_onnx.escalate.escalate` splits it: ``sub`` is the run on the
    fit part, ``scores(w)`` a weight vector's (top-1 agreement, KL) to dense on the held-out fifth."""

    prep: Any
    config: Any
    requested: Any
    sub: Any
    scores: Callable[[np.ndarray], tuple[float, float]]


def held_out_split(model: Path, calib: Path, s: float) -> HeldOut | str:
    """The split of ``escalate`` for ``model`` at sparsity ``s``, or why ``escalate`` would not try
    ``--distill`` there (ineligible, or an output that is not one class distribution per sample)."""
    from chita_onnx import CompressConfig
    from chita_onnx.data import materialize, split_holdout
    from chita_onnx.escalate import HELD_OUT_FRACTION, _kl, eligible
    from chita_onnx.evaluate import make_session, reference, run_model
    from chita_onnx.pipeline import _model_with, prepare, resolve_method

    requested = CompressConfig(sparsity=s)
    prep = prepare(model, calib, requested, hold_out=False)
    config, _ = resolve_method(prep, requested)
    why = eligible(requested, config, prep, real_data=True)
    if why:
        return why
    whole = materialize(prep.calib, prep.specs, batch_size=config.batch_size)
    if whole.num_samples > config.num_samples:
        whole = whole.take(np.arange(config.num_samples))
    fit, held = split_holdout(whole, HELD_OUT_FRACTION, seed=config.seed + 17)
    ref = reference(prep.path, held, prep.specs, config.output)
    if ref.y.ndim != 2:  # escalate does not try it either; and there is no top-1 accuracy to score
        return f"output of shape {ref.y.shape}, not one class distribution per sample"
    sub = dataclasses.replace(prep, calib=fit)

    def scores(w: np.ndarray) -> tuple[float, float]:
        yp, _ = run_model(make_session(_model_with(sub, w).SerializeToString()), held, prep.specs, ref.output)
        return float(np.mean(ref.y.argmax(1) == yp.argmax(1))), _kl(ref.y, yp)

    return HeldOut(prep, config, requested, sub, scores)


def candidates_of(name: str, s: float, tmp: Path) -> dict[str, Any]:
    from chita_onnx.escalate import DISTILL_BUDGET_SECONDS, OverBudgetError, budget_guard
    from chita_onnx.pipeline import GradientOracle, PhaseTimer, _model_with, prune

    label, model, calib, sel = _data(name, tmp)
    test = _test_split(name)
    split = held_out_split(model, calib, s)
    if isinstance(split, str):
        return {"model": label, "skipped": split}
    prep, config, requested, sub, held_scores = split.prep, split.config, split.requested, split.sub, split.scores
    rec: dict[str, Any] = {"model": label, "p": prep.layout.p, "dense_select": accuracy(model, sel)}
    timer = PhaseTimer()

    def scored(w: np.ndarray) -> tuple[float, float]:
        out = tmp / "cand.onnx"
        out.write_bytes(_model_with(prep, w).SerializeToString())
        return accuracy(out, sel), accuracy(out, test)

    t0 = time.perf_counter()
    w_full, _, _ = prune(prep, config, GradientOracle(prep, config), timer)
    sel_full, test_full = scored(w_full)
    rec["layerwise_full"] = {"select": sel_full, "test": test_full, "s": time.perf_counter() - t0}
    t0 = time.perf_counter()
    w_lay, _, _ = prune(sub, config, GradientOracle(sub, config), timer)
    agree, kl = held_scores(w_lay)
    rec["layerwise_fit"] = {"held_agreement": agree, "held_kl": kl, "s": time.perf_counter() - t0}
    dconfig = requested.with_(distill=True)
    t0 = time.perf_counter()
    try:
        w_dis, _, _ = prune(sub, dconfig, None, timer, budget_guard(DISTILL_BUDGET_SECONDS, dconfig.stages or 1))
    except OverBudgetError as exc:
        rec["distill"] = {"stopped": str(exc), "s": time.perf_counter() - t0}
        return rec
    agree, kl = held_scores(w_dis)
    sel_acc, test_acc = scored(w_dis)
    rec["distill"] = {"held_agreement": agree, "held_kl": kl, "select": sel_acc, "test": test_acc,
                      "s": time.perf_counter() - t0}  # fmt: skip
    return rec


#: The candidate rules replayed by ``--summarise``: given the record, does the default keep --distill,
#: and did it run it?
RULES: dict[str, Callable[[dict[str, Any]], tuple[bool, bool]]] = {}


def _rule(name: str) -> Callable[[Callable[[dict[str, Any]], tuple[bool, bool]]], Any]:
    def add(f: Callable[[dict[str, Any]], tuple[bool, bool]]) -> Any:
        RULES[name] = f
        return f

    return add


def _better(r: dict[str, Any]) -> bool:
    lay, dis = r["layerwise_fit"], r["distill"]
    return (dis["held_agreement"], -dis["held_kl"]) > (lay["held_agreement"], -lay["held_kl"])


@_rule("layer-wise alone")
def _never(r: dict[str, Any]) -> tuple[bool, bool]:
    return False, False


@_rule("skip at held-out agreement >= 0.99 (stop 48, first version)")
def _skip99(r: dict[str, Any]) -> tuple[bool, bool]:
    if r["layerwise_fit"]["held_agreement"] >= 0.99:
        return False, False
    return ("stopped" not in r["distill"] and _better(r)), True


@_rule("always try, keep by (agreement, KL)")
def _always(r: dict[str, Any]) -> tuple[bool, bool]:
    return ("stopped" not in r["distill"] and _better(r)), True


@_rule("always try, keep by KL (the default since stop 48)")
def _always_kl(r: dict[str, Any]) -> tuple[bool, bool]:
    ok = "stopped" not in r["distill"] and r["distill"]["held_kl"] < r["layerwise_fit"]["held_kl"]
    return ok, True


def summarise(paths: list[Path]) -> None:
    recs = [json.loads(line) for p in paths for line in p.read_text().splitlines() if line.strip()]
    recs = [r for r in recs if "layerwise_full" in r]
    print(f"{len(recs)} models; mean SELECTION top-1 (mean TEST top-1), --distill minutes run")
    print("| rule | selection | test | minutes |\n|---|---:|---:|---:|")
    for name, rule in RULES.items():
        sel, test, minutes = [], [], 0.0
        for r in recs:
            keep, ran = rule(r)
            cand = r["distill"] if keep else r["layerwise_full"]
            sel.append(cand["select"])
            test.append(cand["test"])
            minutes += r["distill"]["s"] / 60 if ran else 0.0
        print(f"| {name} | {np.mean(sel):.4f} | {np.mean(test):.4f} | {minutes:.0f} |")
    print(
        "\n| model | layer-wise sel/test | --distill sel/test | held-out agreement lay/dis | held-out KL lay/dis | s |"
    )
    print("|---|---|---|---|---|---:|")
    for r in recs:
        lf, lw, d = r["layerwise_full"], r["layerwise_fit"], r["distill"]
        if "stopped" in d:
            print(f"| {r['model']} | {lf['select']:.4f}/{lf['test']:.4f} | stopped ({d['stopped']}) | "
                  f"{lw['held_agreement']:.3f}/– | {lw['held_kl']:.4g}/– | {d['s']:.0f} |")  # fmt: skip
            continue
        print(f"| {r['model']} | {lf['select']:.4f}/{lf['test']:.4f} | {d['select']:.4f}/{d['test']:.4f} | "
              f"{lw['held_agreement']:.3f}/{d['held_agreement']:.3f} | {lw['held_kl']:.4g}/{d['held_kl']:.4g} | "
              f"{d['s']:.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--jsonl", type=Path)
    ap.add_argument("--summarise", default="")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.summarise:
        summarise([Path(p) for p in args.summarise.split(",")])
        return
    with tempfile.TemporaryDirectory(prefix="auto-distill-rule-") as tmpdir:
        for name in args.models.split(","):
            t0 = time.perf_counter()
            try:
                rec = candidates_of(name.strip(), args.sparsity, Path(tmpdir))
            except Exception as exc:  # a failure is a record too
                rec = {"model": name, "error": f"{type(exc).__name__}: {exc}"[:300]}
            rec["wall_s"] = time.perf_counter() - t0
            print(json.dumps(rec), flush=True)
            if args.jsonl:
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    main()
