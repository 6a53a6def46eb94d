"""CHITA's exchange search (k ≫ n): planted supports, exactness, never worse than magnitude + backsolve."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from chita_onnx.errors import SolverError
from chita_onnx.solver import Budget, chita_iht, hard_threshold, magnitude, objective, ridge_backsolve
from chita_onnx.solver.exchange import exchange_search


def planted(seed: int, n: int = 80, p: int = 1500, u: int = 12) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """k > n problem whose magnitude support is wrong.

    Most columns live in the first n − u row directions; each of the u planted weights owns one of
    the last u directions alone (a large column there) and has a small trained value.  Pruning a
    planted weight leaves a residual that no other column can absorb, so every good support keeps
    all of them, while magnitude pruning drops them first.
    """
    rng = np.random.default_rng(seed)
    X = np.zeros((n, p))
    X[: n - u] = rng.standard_normal((n - u, p)) / np.sqrt(n)
    U = np.sort(rng.choice(p, u, replace=False))
    X[:, U] = 0.0
    X[n - u + np.arange(u), U] = 3.0
    w_bar = rng.standard_normal(p)
    w_bar[U] = 0.08 * np.sign(w_bar[U])
    return X, w_bar, U


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_support_is_found_when_k_exceeds_n(seed: int) -> None:
    X, w_bar, U = planted(seed)
    budget = Budget.global_(700, 1500)  # k = 700 > n = 80
    lam = 1e-2
    mag = magnitude(w_bar, budget, X=X, ridge=lam, update="obs")
    assert np.intersect1d(mag.support, U).size == 0  # magnitude drops every planted weight
    res = chita_iht(X, w_bar, budget, lam)
    assert res.info["mode"] == "exchange"
    assert set(U.tolist()) <= set(res.support.tolist())
    assert res.objective < 0.75 * mag.objective
    # the plain IHT stays at the magnitude support here (what the exchange search fixes)
    iht = chita_iht(X, w_bar, budget, lam, method="iht")
    assert np.intersect1d(iht.support, U).size == 0


def random_problem(seed: int, n: int, p: int, dtype: type = np.float64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # gradient-like: a few strong directions plus noise, some identically zero columns
    X = rng.standard_normal((n, 5)) @ rng.standard_normal((5, p)) + 0.3 * rng.standard_normal((n, p))
    X[:, rng.choice(p, p // 20, replace=False)] = 0.0
    X /= np.sqrt(n)
    return X.astype(dtype), rng.standard_normal(p) * rng.uniform(0.2, 2.0, p)


BUDGETS = {
    "global": lambda p, k: Budget.global_(k, p),
    "segments": lambda p, k: Budget(
        k=k, segments=(0, p // 4, p // 2, p), lower=(k // 8, 0, 0), upper=(p // 4, k // 3, p // 2)
    ).validated(),
    "layer": lambda p, k: Budget(
        k=k, segments=(0, p // 2, p), lower=(k // 2, k - k // 2), upper=(k // 2, k - k // 2)
    ).validated(),
}


@pytest.mark.parametrize(
    ("seed", "kind", "k", "lam", "with_alpha", "dtype"),
    [
        (3, "global", 250, 1e-3, False, np.float64),
        (4, "global", 40, 1e-2, True, np.float64),
        (5, "segments", 200, 1e-3, False, np.float32),
        (6, "layer", 300, 1e-4, True, np.float32),
        (7, "segments", 120, 1e-1, True, np.float64),
    ],
)
def test_never_worse_than_magnitude_backsolve_and_exact_on_its_support(
    seed: int, kind: str, k: int, lam: float, with_alpha: bool, dtype: type
) -> None:
    n, p = 50, 480
    X, w_bar = random_problem(seed, n, p, dtype)
    alpha = np.random.default_rng(seed + 100).standard_normal(p) * 1e-3 if with_alpha else None
    budget = BUDGETS[kind](p, k)
    start = hard_threshold(w_bar if alpha is None else w_bar - alpha / lam, budget)
    f_start = objective(X, ridge_backsolve(X, w_bar, start, lam, alpha), w_bar, lam, alpha)
    ex = exchange_search(X, w_bar, budget, lam, alpha, start, max_iter=200)
    # budget respected, per segment
    assert ex.support.size == k
    seg = np.searchsorted(ex.support, np.asarray(budget.segments), side="left")
    counts = np.diff(seg)
    assert all(lo <= c <= hi for c, lo, hi in zip(counts, budget.lower, budget.upper, strict=True))
    # the weights are the exact re-fit on the support, and the trace is that objective, decreasing
    w_exact = ridge_backsolve(X, w_bar, ex.support, lam, alpha)
    np.testing.assert_allclose(ex.w, w_exact, rtol=2e-4, atol=2e-5 * np.abs(w_bar).max())
    f = objective(X, ex.w, w_bar, lam, alpha)
    assert ex.trace[-1] == pytest.approx(f, rel=1e-4)
    assert ex.trace[0] == pytest.approx(f_start, rel=1e-4)
    assert all(b < a for a, b in itertools.pairwise(ex.trace))
    assert f <= f_start * (1 + 1e-6)
    # through chita_iht (auto picks the exchange search when k > 500 or on request)
    res = chita_iht(X, w_bar, budget, lam, alpha, method="exchange")
    assert res.info["mode"] == "exchange"
    f_mag = objective(X, ridge_backsolve(X, w_bar, hard_threshold(w_bar, budget), lam, alpha), w_bar, lam, alpha)
    if alpha is None:
        assert res.objective <= f_mag * (1 + 1e-9)
    assert res.objective <= f_start * (1 + 1e-9)


def test_auto_uses_exchange_above_the_swap_threshold_and_iht_without_ridge() -> None:
    X, w_bar = random_problem(8, 40, 2000)
    budget = Budget.global_(800, 2000)
    assert chita_iht(X, w_bar, budget, 1e-3).info["mode"] == "exchange"
    assert chita_iht(X, w_bar, budget, 0.0).info["mode"] == "iht"
    assert chita_iht(X, w_bar, Budget.global_(100, 2000), 1e-3).info["mode"] == "swap"
    with pytest.raises(SolverError, match="ridge > 0"):
        exchange_search(X, w_bar, budget, 0.0, None, hard_threshold(w_bar, budget))


def test_exchange_stops_at_once_when_magnitude_is_optimal() -> None:
    """Orthogonal, equally curved columns: magnitude + backsolve is the exact optimum."""
    n, p, k = 200, 200, 120
    X = np.eye(n, p) * 0.5
    w_bar = np.random.default_rng(9).standard_normal(p)
    budget = Budget.global_(k, p)
    start = hard_threshold(w_bar, budget)
    ex = exchange_search(X, w_bar, budget, 1e-3, None, start)
    assert ex.swaps == 0 and ex.converged
    np.testing.assert_array_equal(ex.support, start)


@pytest.mark.parametrize(("k", "with_offset"), [(30, False), (30, True), (90, True)])
def test_dual_and_primal_forms_agree(k: int, with_offset: bool) -> None:
    """The n × n (row space) and k × k (weight space) forms give the same search, k < n and k > n."""
    n, p = 60, 300
    X, w_bar = random_problem(11, n, p)
    offset = np.random.default_rng(12).standard_normal(n) * 0.05 if with_offset else None
    budget = BUDGETS["segments"](p, k)
    start = hard_threshold(w_bar, budget)
    res = {
        form: exchange_search(X, w_bar, budget, 1e-3, None, start, offset=offset, form=form)
        for form in ("dual", "primal")
    }
    np.testing.assert_array_equal(res["dual"].support, res["primal"].support)
    np.testing.assert_allclose(res["dual"].trace, res["primal"].trace, rtol=1e-8)
    np.testing.assert_allclose(res["dual"].w, res["primal"].w, rtol=1e-6, atol=1e-9)
    alpha = None if offset is None else X.T @ offset
    assert res["primal"].trace[-1] == pytest.approx(objective(X, res["primal"].w, w_bar, 1e-3, alpha), rel=1e-6)
