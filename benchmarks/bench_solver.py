"""Benchmark of the CHITA solvers on synthetic per-sample gradients with an MLP's structure.

Run ``python benchmarks/bench_solver.py`` (``--help`` for options).  Prints Markdown tables:

* **scaling** — :func:`chita_iht` (and the magnitude + backsolve baseline) as ``p`` doubles at fixed
  ``n`` and sparsity: time should grow about linearly in ``n·p``;
* **block** — :func:`chita_blocked` on a large ``p`` whose gradient columns are generated on the fly,
  with wall time and peak memory (``VmHWM``; each size runs in a fresh subprocess so the peaks do
  not mix);
* **block sizes** (``--block-sizes``) — quality vs time of the block approximation;
* **ridge** (``--ridge-sweep``) — held-out quadratic loss vs λ (the Fisher estimated from ``n``
  samples, the solution scored on the Fisher of 8× as many fresh samples).

Synthetic gradients: for a Linear layer ``W[out, in]`` the per-sample gradient is the outer product
``δᵢ aᵢᵀ`` (backpropagated signal × input activation).  ``aᵢ`` are ReLU of a low-rank latent plus
noise, ``δᵢ`` a low-rank latent times a heavy-tailed per-sample scale.  So ``X`` (rows = samples,
scaled by 1/√n) has the Kronecker-like, low-rank-ish structure of real gradients, and any column
range ``X[:, a:b]`` costs only ``O(n·(b − a))`` to generate, deterministically.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

from chita_onnx.solver import Budget, chita_blocked, chita_iht, hard_threshold, objective, ridge_backsolve


@dataclass
class MLPGradients:
    """Per-sample gradients of an MLP with layer shapes ``[(out, in), ...]``; ``X`` is ``(n, p)``."""

    shapes: Sequence[tuple[int, int]]
    n: int
    seed: int = 0
    rank: int = 8
    deltas: list[np.ndarray] = field(default_factory=list, init=False)
    acts: list[np.ndarray] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        rng = np.random.default_rng(self.seed)
        scale = np.exp(0.7 * rng.standard_normal(self.n))[:, None]  # heavy-tailed per-sample size
        z = rng.standard_normal((self.n, self.rank))
        for out, inp in self.shapes:
            a = z @ rng.standard_normal((self.rank, inp)) * 0.5 + rng.standard_normal((self.n, inp))
            self.acts.append(np.maximum(a, 0.0).astype(np.float32))
            d = z @ rng.standard_normal((self.rank, out)) + 0.5 * rng.standard_normal((self.n, out))
            self.deltas.append((scale * d / np.sqrt(out * inp) / np.sqrt(self.n)).astype(np.float32))

    @property
    def segments(self) -> tuple[int, ...]:
        return (0, *np.cumsum([o * i for o, i in self.shapes]).tolist())

    @property
    def p(self) -> int:
        return self.segments[-1]

    def weights(self) -> np.ndarray:
        rng = np.random.default_rng(self.seed + 1)
        return np.concatenate([rng.laplace(size=o * i) / np.sqrt(i) for o, i in self.shapes]).astype(np.float32)

    def columns(self, a: int, b: int) -> np.ndarray:
        """``X[:, a:b]`` (n, b − a) float32, generated row block by row block of each layer."""
        out = np.empty((self.n, b - a), dtype=np.float32)
        seg = self.segments
        for t, (_, i_dim) in enumerate(self.shapes):
            lo, hi = max(a, seg[t]), min(b, seg[t + 1])
            if lo >= hi:
                continue
            j = lo
            while j < hi:
                o, i = divmod(j - seg[t], i_dim)
                stop = min(hi, j + (i_dim - i))
                np.multiply(
                    self.deltas[t][:, o : o + 1], self.acts[t][:, i : i + stop - j], out=out[:, j - a : stop - a]
                )
                j = stop
        return out

    def matrix(self) -> np.ndarray:
        return self.columns(0, self.p)


def mlp_shapes(m: int) -> list[tuple[int, int]]:
    """MLPNet (784-40-20-10) with an ``m``-times wider input: p = 31,360·m + 1,000."""
    return [(40, 784 * m), (20, 40), (10, 20)]


def peak_rss_bytes() -> int:
    """Peak resident memory of this process: ``VmHWM`` (Linux; unlike ``ru_maxrss`` it does not
    inherit the parent's peak across fork/exec), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def timed(fn: Any, *args: Any, **kw: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args, **kw)
    return out, time.perf_counter() - t


def bench_scaling(
    n: int, sparsity: float, ms: Sequence[int], ridge: float, fixed_k: int | None = None
) -> list[dict[str, Any]]:
    rows = []
    for m in ms:
        g = MLPGradients(mlp_shapes(m), n, seed=m)
        X, wb = g.matrix(), g.weights()
        k = round((1 - sparsity) * g.p) if fixed_k is None else fixed_k
        budget = Budget.global_(k, g.p)
        w_mag, t_bs = timed(ridge_backsolve, X, wb, hard_threshold(wb, budget), ridge)
        f_mag = objective(X, w_mag, wb, ridge)
        res, t_chita = timed(chita_iht, X, wb, budget, ridge)
        rows.append(
            {
                "p": g.p,
                "n": n,
                "k": k,
                "bso_s": t_bs,
                "chita_s": t_chita,
                "f_bso": f_mag,
                "f_chita": res.objective,
                "iterations": res.iterations,
                "outer": res.info["outer_iterations"],
                "mode": res.info["mode"],
                "active": res.info["active_set_size"],
                "swapped_in": res.info["new_vs_start"],
                "converged": res.converged,
                "us_per_np": 1e6 * t_chita / (n * g.p),
            }
        )
        print(f"scaling p={g.p}: chita {t_chita:.2f}s", file=sys.stderr, flush=True)
    return rows


def big_shapes(p_target: int) -> list[tuple[int, int]]:
    """Two square-ish layers totalling about ``p_target`` weights."""
    side = max(8, int(np.sqrt(p_target * 2 / 3)))
    return [(side, side), (max(1, side // 2), side)]


def bench_block_one(
    p_target: int, n: int, sparsity: float, ridge: float, solve: str, block_size: int, max_mem: int
) -> dict[str, Any]:
    g = MLPGradients(big_shapes(p_target), n, seed=7)
    wb = g.weights()
    k = round((1 - sparsity) * g.p)
    budget = Budget(k=k, segments=g.segments, lower=(0, 0), upper=tuple(np.diff(g.segments).tolist()))
    calls = [0]

    def columns(a: int, b: int) -> np.ndarray:
        calls[0] += 1
        return g.columns(a, b)

    res, t = timed(
        chita_blocked,
        columns,
        wb,
        budget.validated(),
        ridge,
        n=n,
        block_size=block_size,
        max_memory_bytes=max_mem,
        solve=solve,
    )
    rss = peak_rss_bytes()
    return {
        "p": g.p,
        "n": n,
        "k": k,
        "solve": solve,
        "block_size": res.info["block_size"],
        "blocks": res.info["blocks"],
        "groups": res.info["groups"],
        "calls": calls[0],
        "time_s": t,
        "fetch_s": res.info["fetch_s"],
        "solve_s": res.info["solve_s"],
        "peak_rss_gb": rss / 2**30,
        "full_X_gb": 4 * n * g.p / 2**30,
        "f_model_mask": res.trace[0],
        "f_model": res.objective,
    }


def bench_block(
    ps: Sequence[int], n: int, sparsity: float, ridge: float, solve: str, block_size: int, max_mem: int
) -> list[dict[str, Any]]:
    rows = []
    for p in ps:  # fresh interpreter per size: ru_maxrss is a process-lifetime peak
        cmd = [
            sys.executable,
            __file__,
            "--_block-child",
            json.dumps([p, n, sparsity, ridge, solve, block_size, max_mem]),
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"block p={p}: {rows[-1]['time_s']:.1f}s", file=sys.stderr, flush=True)
    return rows


def bench_block_sizes(n: int, m: int, sparsity: float, ridge: float, sizes: Sequence[int]) -> list[dict[str, Any]]:
    g = MLPGradients(mlp_shapes(m), n, seed=11)
    X, wb = g.matrix(), g.weights()
    k = round((1 - sparsity) * g.p)
    sizes_t = tuple(np.diff(g.segments).tolist())
    budget = Budget(k=k, segments=g.segments, lower=(0,) * 3, upper=sizes_t).validated()
    full, t_full = timed(chita_iht, X, wb, budget, ridge)
    f_mag = objective(X, ridge_backsolve(X, wb, hard_threshold(wb, budget), ridge), wb, ridge)
    rows = [
        {
            "block_size": "none (global)",
            "solve": "chita",
            "f_full_X": full.objective,
            "rel_to_global": 1.0,
            "time_s": t_full,
        },
        {
            "block_size": "none (global)",
            "solve": "backsolve",
            "f_full_X": f_mag,
            "rel_to_global": f_mag / full.objective,
            "time_s": float("nan"),
        },
    ]
    for solve in ("backsolve", "chita"):
        for bs in sizes:
            res, t = timed(chita_blocked, g.columns, wb, budget, ridge, n=n, block_size=bs, solve=solve)
            f = objective(X, res.w, wb, ridge)
            rows.append(
                {"block_size": bs, "solve": solve, "f_full_X": f, "rel_to_global": f / full.objective, "time_s": t}
            )
    return rows


def bench_ridge(n: int, m: int, sparsities: Sequence[float], ridges: Sequence[float]) -> list[dict[str, Any]]:
    """Fit with the n-sample Fisher, score on an independent 8n-sample Fisher (held-out loss)."""
    g_all = MLPGradients(mlp_shapes(m), 9 * n, seed=21)
    X_all, wb = g_all.matrix(), g_all.weights()
    X_fit = X_all[:n] * np.float32(np.sqrt(9 * n / n))  # rescale rows: 1/√n instead of 1/√(9n)
    X_test = X_all[n:] * np.float32(np.sqrt(9 * n / (8 * n)))
    scale = float(np.einsum("ij,ij->", X_fit, X_fit, dtype=np.float64)) / g_all.p  # mean diag of F̂
    rows = []
    for s in sparsities:
        k = round((1 - s) * g_all.p)
        budget = Budget.global_(k, g_all.p)
        mag = np.where(np.isin(np.arange(g_all.p), hard_threshold(wb, budget)), wb, 0)
        row: dict[str, Any] = {"sparsity": s, "heldout_magnitude": objective(X_test, mag, wb, 0.0)}
        for lam in ridges:
            res = chita_iht(X_fit, wb, budget, lam)
            row[f"lam={lam:g}"] = objective(X_test, res.w, wb, 0.0)
        rows.append(row)
    rows.append({"sparsity": "mean diag F̂", "heldout_magnitude": scale})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--n", type=int, default=1000, help="gradient rows (samples)")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument(
        "--scaling-m",
        type=int,
        nargs="*",
        default=[1, 2, 4, 8, 16],
        help="input-width multipliers of MLPNet (p ≈ 31,360·m); [] skips the scaling table",
    )
    ap.add_argument(
        "--scaling-k",
        type=int,
        default=None,
        help="fixed k for the scaling table instead of --sparsity (e.g. 300: the swap search)",
    )
    ap.add_argument(
        "--block-p",
        type=int,
        nargs="*",
        default=[1_000_000, 4_000_000],
        help="weights of the block benchmark (e.g. 25000000); [] skips it",
    )
    ap.add_argument("--block-solve", choices=["backsolve", "chita"], default="backsolve")
    ap.add_argument("--block-size", type=int, default=2000)
    ap.add_argument("--max-memory", type=int, default=1 << 30, help="max_memory_bytes of the block path")
    ap.add_argument(
        "--block-sizes",
        type=int,
        nargs="*",
        default=[],
        help="block sizes to compare on the m=--bs-m problem (e.g. 250 500 1000 2000 4000)",
    )
    ap.add_argument("--bs-m", type=int, default=1)
    ap.add_argument(
        "--ridge-sweep",
        type=float,
        nargs="*",
        default=[],
        help="ridges for the held-out-loss sweep (e.g. 1e-6 1e-5 1e-4 1e-3 1e-2)",
    )
    ap.add_argument("--json", help="also write all tables to this JSON file")
    ap.add_argument("--_block-child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args._block_child:
        p, n, s, lam, solve, bs, mem = json.loads(args._block_child)
        print(json.dumps(bench_block_one(p, n, s, lam, solve, bs, mem)))
        return

    out: dict[str, list[dict[str, Any]]] = {}
    if args.scaling_m:
        out["scaling"] = bench_scaling(args.n, args.sparsity, args.scaling_m, args.ridge, args.scaling_k)
    if args.block_p:
        out["block"] = bench_block(
            args.block_p, args.n, args.sparsity, args.ridge, args.block_solve, args.block_size, args.max_memory
        )
    if args.block_sizes:
        out["block_sizes"] = bench_block_sizes(args.n, args.bs_m, args.sparsity, args.ridge, args.block_sizes)
    if args.ridge_sweep:
        out["ridge"] = bench_ridge(args.n, args.bs_m, [0.9, 0.95, 0.98], args.ridge_sweep)
    for name, rows in out.items():
        print(f"\n### {name}\n\n{markdown(rows)}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
