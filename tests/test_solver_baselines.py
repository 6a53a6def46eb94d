"""Tests of the baseline solvers (magnitude, WoodFisher, CBS) against dense float64 references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from numpy.typing import NDArray

from chita_onnx.errors import ResourceError, SolverError
from chita_onnx.solver._core import Budget, SolverResult, objective
from chita_onnx.solver.baselines import (
    BlockFisherInverse,
    cbs,
    cbs_cost,
    magnitude,
    woodfisher,
    woodfisher_blocks,
)

RIDGE = 1e-2


def _problem(n: int, p: int, seed: int) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """Correlated gradients (low-rank + noise), scaled by 1/√n, and heavy-ish tailed weights."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 5)) @ rng.standard_normal((5, p))
    X = (base + 0.5 * rng.standard_normal((n, p))) / np.sqrt(n)
    w_bar = rng.standard_normal(p) * rng.uniform(0.2, 1.5, p)
    return X.astype(np.float32), w_bar.astype(np.float32)


def _dense_fisher(X: NDArray[np.float32], ridge: float) -> NDArray[np.float64]:
    X64 = X.astype(np.float64)
    return X64.T @ X64 + ridge * np.eye(X.shape[1])


def _phi(X: NDArray[np.float32], w_bar: NDArray[np.float32], support: NDArray[np.int64]) -> float:
    d = w_bar.astype(np.float64).copy()
    d[support] = 0.0
    r = X.astype(np.float64) @ d
    return float(r @ r)


SEGMENTED = Budget(k=24, segments=(0, 50, 80), lower=(6, 10), upper=(12, 18)).validated()
GLOBAL = Budget.global_(24, 80)


def _run(method: str, X: NDArray[np.float32], w_bar: NDArray[np.float32], budget: Budget) -> SolverResult:
    if method == "magnitude":
        return magnitude(w_bar, budget, X=X, ridge=RIDGE)
    if method == "magnitude+obs":
        return magnitude(w_bar, budget, X=X, ridge=RIDGE, update="obs")
    if method == "woodfisher":
        return woodfisher(X, w_bar, budget, RIDGE)
    if method == "woodfisher-block":
        return woodfisher(X, w_bar, budget, RIDGE, block_size=12)
    if method == "woodfisher-s":
        return woodfisher(X, w_bar, budget, RIDGE, update=False)
    if method == "cbs-s":
        return cbs(X, w_bar, budget, RIDGE, update=False)
    if method == "cbs":
        return cbs(X, w_bar, budget, RIDGE)
    raise AssertionError(method)


METHODS = ["magnitude", "magnitude+obs", "woodfisher", "woodfisher-block", "woodfisher-s", "cbs-s", "cbs"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("budget", [GLOBAL, SEGMENTED], ids=["global", "segmented"])
def test_exact_budget(method: str, budget: Budget) -> None:
    X, w_bar = _problem(20, 80, seed=1)
    res = _run(method, X, w_bar, budget)
    assert res.w.dtype == np.float32
    assert res.w.shape == (80,)
    assert res.support.shape == (budget.k,)
    assert np.all(np.diff(res.support) > 0)
    assert np.count_nonzero(res.w) == budget.k
    outside = np.ones(80, dtype=bool)
    outside[res.support] = False
    assert np.all(res.w[outside] == 0)
    counts = np.bincount(budget.segment_ids()[res.support], minlength=len(budget.lower))
    assert np.all(counts >= np.asarray(budget.lower))
    assert np.all(counts <= np.asarray(budget.upper))
    assert res.objective == pytest.approx(objective(X, res.w, w_bar, RIDGE), rel=1e-9)


@pytest.mark.parametrize(("n", "p"), [(15, 60), (60, 25)], ids=["woodbury", "direct"])
def test_wf_inverse_matches_dense(n: int, p: int) -> None:
    X, _ = _problem(n, p, seed=2)
    Finv = np.linalg.inv(_dense_fisher(X, RIDGE))
    inv = BlockFisherInverse(X, 0, p, RIDGE)
    assert inv.direct == (p <= n)
    np.testing.assert_allclose(inv.diag(), np.diag(Finv), rtol=1e-8)
    u = np.random.default_rng(3).standard_normal(p)
    np.testing.assert_allclose(inv.matvec(u), Finv @ u, rtol=1e-7, atol=1e-9 * np.abs(Finv @ u).max())
    # a sub-block is the inverse of the corresponding diagonal block of F
    sub = BlockFisherInverse(X, 5, 20, RIDGE)
    Fb_inv = np.linalg.inv(_dense_fisher(X[:, 5:20], RIDGE))
    np.testing.assert_allclose(sub.diag(), np.diag(Fb_inv), rtol=1e-8)
    np.testing.assert_allclose(sub.matvec(u[5:20]), Fb_inv @ u[5:20], rtol=1e-7, atol=1e-9)


def test_wf_single_pruned_weight_is_exact_obs() -> None:
    X, w_bar = _problem(15, 40, seed=4)
    p = 40
    res = woodfisher(X, w_bar, Budget.global_(p - 1, p), RIDGE)
    F = _dense_fisher(X, RIDGE)
    rho = w_bar.astype(np.float64) ** 2 / np.diag(np.linalg.inv(F))
    q = int(np.argmin(rho))
    assert np.setdiff1d(np.arange(p), res.support).tolist() == [q]
    # exact minimiser of ½(w−w̄)ᵀF(w−w̄) s.t. w_q = 0, computed on the kept coordinates
    S = res.support
    wb = w_bar.astype(np.float64)
    w_ref = np.zeros(p)
    w_ref[S] = wb[S] + np.linalg.solve(F[np.ix_(S, S)], F[S, q] * wb[q])
    np.testing.assert_allclose(res.w, w_ref, rtol=1e-4, atol=1e-5)
    # and the objective is the OBS loss increase ½ w̄_q² / [F⁻¹]_qq
    assert res.objective == pytest.approx(0.5 * rho[q], rel=1e-4)


def test_woodfisher_blocks_partition() -> None:
    budget = Budget(k=10, segments=(0, 1000, 1000, 1250, 1300), lower=(0, 0, 0, 0), upper=(1000, 0, 250, 50))
    blocks = woodfisher_blocks(budget, 300)
    assert blocks[0][0] == 0
    assert blocks[-1][1] == 1300
    assert all(a[1] == b[0] for a, b in itertools.pairwise(blocks))
    assert [b - a for a, b in blocks] == [333, 333, 334, 250, 50]
    assert woodfisher_blocks(budget) == [(0, 1000), (1000, 1250), (1250, 1300)]


@pytest.mark.parametrize("budget", [Budget.global_(30, 120), SEGMENTED], ids=["global", "segmented"])
def test_cbs_s_phi_monotone_and_beats_magnitude(budget: Budget) -> None:
    X, w_bar = _problem(25, budget.p, seed=5)
    res = cbs(X, w_bar, budget, RIDGE, update=False)
    mp = magnitude(w_bar, budget, X=X, ridge=RIDGE)
    tr = np.asarray(res.trace)
    assert tr.shape[0] == res.iterations + 1
    assert np.all(np.diff(tr) <= 1e-9 * tr[0])
    assert tr[0] == pytest.approx(_phi(X, w_bar, mp.support), rel=1e-9)
    assert tr[-1] == pytest.approx(_phi(X, w_bar, res.support), rel=1e-9)
    assert int(res.info["swaps"]) > 0  # the search really moved (else the test would be vacuous)
    assert tr[-1] < tr[0] - 1e-4
    assert res.converged
    # CBS-S does not update: kept weights are w̄
    np.testing.assert_array_equal(res.w[res.support], w_bar[res.support])


def test_cbs_window_and_eps_stop() -> None:
    X, w_bar = _problem(25, 120, seed=6)
    b = Budget.global_(30, 120)
    huge_eps = cbs(X, w_bar, b, RIDGE, update=False, eps=1e9)
    np.testing.assert_array_equal(huge_eps.support, magnitude(w_bar, b).support)
    assert huge_eps.info["swaps"] == 0
    assert huge_eps.iterations == 1
    capped = cbs(X, w_bar, b, RIDGE, update=False, max_passes=1)
    assert capped.iterations == 1
    assert len(capped.trace) == 2


@pytest.mark.parametrize(("n", "k"), [(12, 40), (60, 20)], ids=["n<k", "n>k"])
def test_cbs_u_equals_dense_obs_formula(n: int, k: int) -> None:
    p = 70
    X, w_bar = _problem(n, p, seed=7)
    res = cbs(X, w_bar, Budget.global_(k, p), RIDGE)
    Finv = np.linalg.inv(_dense_fisher(X, RIDGE))
    P = np.setdiff1d(np.arange(p), res.support)
    wb = w_bar.astype(np.float64)
    dw = -Finv[:, P] @ np.linalg.solve(Finv[np.ix_(P, P)], wb[P])
    w_ref = wb + dw
    np.testing.assert_allclose(w_ref[P], 0.0, atol=1e-8)  # the formula zeroes P by itself
    np.testing.assert_allclose(res.w, w_ref, rtol=1e-4, atol=1e-5 * np.abs(wb).max())
    # CBS-U is the minimiser of f on the support: not worse than the CBS-S weights
    res_s = cbs(X, w_bar, Budget.global_(k, p), RIDGE, update=False)
    np.testing.assert_array_equal(res_s.support, res.support)
    assert res.objective <= res_s.objective


@pytest.mark.parametrize("budget", [GLOBAL, SEGMENTED], ids=["global", "segmented"])
def test_magnitude_obs_not_worse_than_magnitude(budget: Budget) -> None:
    X, w_bar = _problem(20, 80, seed=8)
    mp = magnitude(w_bar, budget, X=X, ridge=RIDGE)
    obs = magnitude(w_bar, budget, X=X, ridge=RIDGE, update="obs")
    np.testing.assert_array_equal(mp.support, obs.support)
    assert obs.objective < mp.objective
    np.testing.assert_array_equal(mp.w[mp.support], w_bar[mp.support])
    assert np.isnan(magnitude(w_bar, budget).objective)
    with pytest.raises(SolverError):
        magnitude(w_bar, budget, update="obs")


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_zero_is_noop(method: str) -> None:
    X, w_bar = _problem(20, 80, seed=9)
    res = _run(method, X, w_bar, Budget.global_(80, 80))
    np.testing.assert_array_equal(res.w, w_bar)
    np.testing.assert_array_equal(res.support, np.arange(80))
    assert res.objective == 0.0


@pytest.mark.parametrize("method", METHODS)
def test_sparsity_one_prunes_everything(method: str) -> None:
    X, w_bar = _problem(20, 80, seed=12)
    res = _run(method, X, w_bar, Budget.global_(0, 80))
    assert res.support.shape == (0,)
    assert not np.any(res.w)
    assert res.objective == pytest.approx(objective(X, np.zeros(80, np.float32), w_bar, RIDGE), rel=1e-9)


def test_woodfisher_needs_ridge() -> None:
    X, w_bar = _problem(10, 30, seed=10)
    with pytest.raises(SolverError, match="ridge"):
        woodfisher(X, w_bar, Budget.global_(10, 30), 0.0)


def test_cbs_resource_error_reports_estimate() -> None:
    X, w_bar = _problem(10, 30, seed=11)
    b = Budget.global_(10, 30)
    mem, secs = cbs_cost(10, 30, 10)
    assert mem > 10 * 30 * 4
    assert secs > 0
    with pytest.raises(ResourceError, match=r"GiB and up to \d+ s") as ei:
        cbs(X, w_bar, b, RIDGE, max_seconds=1e-12)
    assert "cbs-s" in str(ei.value)
    with pytest.raises(ResourceError, match="GiB"):
        cbs(X, w_bar, b, RIDGE, max_bytes=100)
    # cost grows with the problem; a MobileNet-size search is refused at the default limit
    big_mem, big_secs = cbs_cost(1000, 4_200_000, 420_000)
    assert big_secs > 3600.0
    assert big_mem > 1000 * 4_200_000 * 4
    assert cbs_cost(1000, 32_360, 3_236)[1] < 3600.0
