"""Issue 9's zoo bars from zoo.json files: the default against magnitude pruning on every model.

    python benchmarks/zoo/bars.py --runs a/zoo.json,b/zoo.json [--previous old/zoo.json,...]

``--runs``: results of ``run.py`` with ``--methods default,magnitude`` (several files are merged; for
a model and method the last file wins).  ``--previous`` (optional): an earlier run whose ``default``
rows are shown as "previous default" (e.g. one-shot CHITA before the default changed) — its
``magnitude`` rows are used when ``--runs`` has none for that model.

Per model: the primary metric (the first one the zoo entry reports, higher is better), dense and at
0.3 / 0.5; the loss is ``dense − pruned``; **bar 0.5**: the default's loss at most half of
magnitude's (or both within 0.005 of dense); **bar 0.3** (classifiers, i.e. entries that report
top-1 ``agreement``): agreement with dense at least 0.99.  The last column puts the default's
pruning work at 0.5 (gradients + layer-wise pass or solve + statistics, seconds) next to the time the
previous default (one-shot CHITA) took to compute X — from different runs on a shared machine, so
only a rough ratio.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

TOL = 0.005  # a loss this small counts as no loss (one sample in 200)


def load(paths: str) -> dict[str, dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    for p in [x for x in paths.split(",") if x]:
        for entry in json.loads(Path(p).read_text()):
            name = entry["header"]["model"]
            m = models.setdefault(name, {"header": entry["header"], "runs": {}})
            for r in entry["runs"]:
                m["runs"][(r["method"], r["sparsity"])] = r
    return models


def fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", required=True)
    ap.add_argument("--previous", default="")
    args = ap.parse_args()
    runs, prev = load(args.runs), load(args.previous)
    print(
        "| model | metric | dense | default 0.3 | magnitude 0.3 | previous 0.3 | default 0.5 | magnitude 0.5 "
        "| previous 0.5 | loss 0.5 default / magnitude | bar 0.5 (≤ ½) | agreement 0.3 (≥ 0.99) | method used "
        "| pruning s at 0.5: default / previous X |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---|---|")
    for name, m in runs.items():
        dense = m["header"]["dense"]
        key = next(iter(dense))
        d0 = float(dense[key])

        def val(src: dict[str, Any], method: str, s: float, k: str = key) -> float | None:
            r = src.get("runs", {}).get((method, s))
            if r is None or r.get("status") != "ok" or not r.get("metric"):
                return None
            v = r["metric"].get(k)
            return None if v is None else float(v)

        old = prev.get(name, {})
        g3 = val(m, "magnitude", 0.3)
        g3 = g3 if g3 is not None else val(old, "magnitude", 0.3)
        g5 = val(m, "magnitude", 0.5)
        g5 = g5 if g5 is not None else val(old, "magnitude", 0.5)

        d3, d5 = val(m, "default", 0.3), val(m, "default", 0.5)
        p3, p5 = val(prev.get(name, {}), "default", 0.3), val(prev.get(name, {}), "default", 0.5)
        bar5 = "–"
        loss = "–"
        if d5 is not None and g5 is not None:
            ld, lg = d0 - d5, d0 - g5
            loss = f"{ld:.4g} / {lg:.4g}"
            bar5 = "yes" if ld <= TOL or ld <= 0.5 * lg else "**no**"
        agr = "n/a"
        if "agreement" in dense:
            a3 = val(m, "default", 0.3, "agreement")
            agr = "–" if a3 is None else (f"{a3:.3f} yes" if a3 >= 0.99 else f"{a3:.3f} **no**")
        r5 = m["runs"].get(("default", 0.5)) or m["runs"].get(("default", 0.3)) or {}
        used = r5.get("method_used", "–") if r5.get("status") == "ok" else str(r5.get("status", "–"))
        work = ("gradients", "layerwise", "solve", "statistics")
        t_new = sum(float(v) for k, v in (r5.get("timings") or {}).items() if k in work) if r5 else None
        pr5 = prev.get(name, {}).get("runs", {}).get(("default", 0.5)) or {}
        t_x = (pr5.get("timings") or {}).get("gradients")
        times = "–" if not t_new or not t_x else f"{t_new:.0f} / {float(t_x):.0f} ({t_new / float(t_x):.1f}×)"
        cells = [name, key, fmt(d0), fmt(d3), fmt(g3), fmt(p3), fmt(d5), fmt(g5), fmt(p5), loss, bar5, agr, used, times]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
