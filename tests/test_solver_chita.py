"""CHITA-IHT, the ridge backsolve and the sparsity schedules: seeded, every check can fail."""

from __future__ import annotations

import itertools
import logging
import tracemalloc

import numpy as np
import pytest

from chita_onnx.errors import SolverError
from chita_onnx.solver import (
    Budget,
    chita_iht,
    hard_threshold,
    objective,
    ridge_backsolve,
    sparsity_schedule,
)

F64 = np.float64


def low_rank_problem(seed: int, n: int, p: int, dtype: type = F64) -> tuple[np.ndarray, np.ndarray]:
    """Low-rank-plus-noise gradients scaled by 1/√n, Laplace weights."""
    rng = np.random.default_rng(seed)
    r = 8
    U = rng.standard_normal((n, r)) * (np.arange(1, r + 1) ** -1.0)
    X = (U @ rng.standard_normal((r, p)) + 0.3 * rng.standard_normal((n, p))) / np.sqrt(n)
    wb = 0.05 * rng.laplace(size=p)
    return X.astype(dtype), wb.astype(dtype)


def dense_ridge(X: np.ndarray, wb: np.ndarray, S: np.ndarray, lam: float, alpha: np.ndarray | None) -> np.ndarray:
    """Reference: minimise f on the support S with an explicit |S|×|S| float64 solve."""
    p = X.shape[1]
    X = X.astype(F64)
    out = np.ones(p, dtype=bool)
    out[S] = False
    c = X[:, out] @ wb[out].astype(F64)
    A = X[:, S]
    H = A.T @ A + lam * np.eye(S.size)
    b = A.T @ c - (0.0 if alpha is None else alpha[S])
    u = np.linalg.lstsq(H, b, rcond=None)[0]
    w = np.zeros(p)
    w[S] = wb[S] + u
    return w


# --------------------------------------------------------------------------------------------- backsolve


@pytest.mark.parametrize("s", [30, 150])  # s ≤ n: Cholesky on s×s; s > n: Woodbury in n×n
@pytest.mark.parametrize("with_alpha", [False, True])
def test_backsolve_matches_dense_solve(s: int, with_alpha: bool) -> None:
    X, wb = low_rank_problem(0, 60, 200)
    rng = np.random.default_rng(1)
    alpha = 0.01 * rng.standard_normal(200) if with_alpha else None
    S = np.sort(rng.choice(200, s, replace=False))
    for lam in (1e-3, 1e-1):
        w = ridge_backsolve(X, wb, S, lam, alpha)
        ref = dense_ridge(X, wb, S, lam, alpha)
        assert w.dtype == np.float32
        np.testing.assert_allclose(w, ref, rtol=1e-5, atol=1e-6 * np.abs(ref).max())
        assert np.all(w[np.setdiff1d(np.arange(200), S)] == 0)


def test_backsolve_float32_woodbury_small_ridge_matches_float64() -> None:
    """k > n and tiny λ: the float64 n×n solve keeps a float32 X accurate."""
    X, wb = low_rank_problem(2, 50, 400)
    S = hard_threshold(wb, Budget.global_(200, 400))
    lam = 1e-7
    w32 = ridge_backsolve(X.astype(np.float32), wb, S, lam)
    f32 = objective(X, w32, wb, lam)
    f64 = objective(X, dense_ridge(X, wb, S, lam, None), wb, lam)
    assert f32 <= f64 * (1 + 1e-2) + 1e-9


def test_backsolve_zero_ridge_is_min_norm_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    X, wb = low_rank_problem(3, 40, 120)
    X[:, 5] = X[:, 7]  # exact duplicate columns: singular for s ≤ n too
    S = np.arange(0, 120, 2)  # 60 > n = 40: Woodbury
    with caplog.at_level(logging.WARNING):
        w = ridge_backsolve(X, wb, S, 0.0)
    out = np.setdiff1d(np.arange(120), S)
    u = np.linalg.lstsq(X[:, S], X[:, out] @ wb[out], rcond=None)[0]  # minimum-norm interpolation
    np.testing.assert_allclose(w[S], wb[S] + u, rtol=1e-4, atol=1e-6)
    # s ≤ n with duplicate columns: singular; falls back to the pseudo-inverse with a warning
    S2 = np.array([5, 7, 9, 11])
    with caplog.at_level(logging.WARNING):
        w2 = ridge_backsolve(X, wb, S2, 0.0)
    assert np.all(np.isfinite(w2))
    assert any("pseudo-inverse" in r.getMessage() for r in caplog.records)


def test_backsolve_bad_support_raises() -> None:
    X, wb = low_rank_problem(0, 10, 20)
    with pytest.raises(SolverError, match="duplicate"):
        ridge_backsolve(X, wb, np.array([1, 1]), 0.1)
    with pytest.raises(SolverError, match=r"\[0, 20\)"):
        ridge_backsolve(X, wb, np.array([3, 25]), 0.1)
    with pytest.raises(SolverError, match="-1"):
        ridge_backsolve(X, wb, np.array([3]), -1.0)


# ------------------------------------------------------------------------------------------------ CHITA


def planted_problem(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """y = X w* with w* 12-sparse; w̄ = w* + e, e in the null space of X with large entries, so that
    the 12 largest |w̄| are mostly NOT the planted support but X w̄ = X w*."""
    rng = np.random.default_rng(seed)
    n, p, k = 120, 400, 12
    X = rng.standard_normal((n, p)) / np.sqrt(n)
    S = np.sort(rng.choice(p, k, replace=False))
    w_star = np.zeros(p)
    w_star[S] = rng.choice([-1.0, 1.0], k) * (1.0 + rng.random(k))
    Q, _ = np.linalg.qr(X.T)
    e = 1.5 * rng.standard_normal(p)
    e -= Q @ (Q.T @ e)
    return X, w_star + e, S


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_support_recovered_where_magnitude_fails(seed: int) -> None:
    X, wb, S = planted_problem(seed)
    k = S.size
    budget = Budget.global_(k, X.shape[1])
    mag = hard_threshold(wb, budget)
    assert np.intersect1d(mag, S).size <= k - 4, "magnitude must be wrong for the test to mean anything"
    res = chita_iht(X, wb, budget, 1e-6)
    np.testing.assert_array_equal(res.support, S)
    assert res.converged
    assert res.objective < 0.01 * objective(X, ridge_backsolve(X, wb, mag, 1e-6), wb, 1e-6)


@pytest.mark.parametrize("seed", range(5))
def test_never_worse_than_magnitude_plus_backsolve(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n, p = 60, int(rng.integers(300, 700))
    X, wb = low_rank_problem(seed, n, p)
    k = int(rng.integers(5, 3 * n))  # both k < n and k > n
    lam = float(10.0 ** rng.uniform(-5, -1))
    budget = Budget.global_(k, p)
    f_mag = objective(X, ridge_backsolve(X, wb, hard_threshold(wb, budget), lam), wb, lam)
    res = chita_iht(X, wb, budget, lam)
    assert res.objective <= f_mag * (1 + 1e-9) + 1e-12
    assert res.objective == pytest.approx(objective(X, res.w, wb, lam), rel=1e-9, abs=1e-12)
    assert res.support.dtype == np.int64
    assert res.support.size == k
    assert np.all(np.diff(res.support) > 0)
    assert np.count_nonzero(res.w[np.setdiff1d(np.arange(p), res.support)]) == 0
    # final objective after the backsolve is ≤ the one before it
    assert res.trace[-1] <= float(res.info["objective_before_backsolve"]) * (1 + 1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("method", ["iht", "swap"])
def test_trace_never_increases(seed: int, dtype: type, method: str) -> None:
    X, wb = low_rank_problem(seed, 80, 1500, dtype)
    budget = Budget.global_(40 + 60 * seed, 1500)
    res = chita_iht(X, wb, budget, 1e-4, init="magnitude", max_iter=200, method=method)  # type: ignore[arg-type]
    assert res.info["mode"] == method
    tr = np.asarray(res.trace)
    rel = 1e-9 if dtype is np.float64 else 1e-5
    assert len(tr) > 2
    assert np.all(np.diff(tr) <= rel * np.abs(tr[:-1]))
    assert tr[-1] < tr[0]  # it did something


def test_k_equal_p_is_closed_form_ridge_and_wbar_without_alpha() -> None:
    X, wb = low_rank_problem(4, 30, 80)
    full = Budget.global_(80, 80)
    res = chita_iht(X, wb, full, 1e-2)
    np.testing.assert_array_equal(res.w, wb.astype(np.float32))  # sparsity 0 is a no-op
    assert abs(res.objective) < 1e-12
    assert res.support.size == 80
    assert res.iterations == 0
    alpha = 0.05 * np.random.default_rng(0).standard_normal(80)
    res_a = chita_iht(X, wb, full, 1e-2, alpha)
    closed = wb - np.linalg.solve(X.T @ X + 1e-2 * np.eye(80), alpha)
    np.testing.assert_allclose(res_a.w, closed, rtol=1e-5, atol=1e-6)


def test_k_zero_prunes_everything() -> None:
    X, wb = low_rank_problem(5, 20, 50)
    res = chita_iht(X, wb, Budget.global_(0, 50), 1e-3)
    assert res.support.size == 0
    assert not np.any(res.w)
    assert res.objective == pytest.approx(objective(X, np.zeros(50), wb, 1e-3))


def test_with_alpha_still_beats_its_starting_mask() -> None:
    X, wb = low_rank_problem(6, 50, 600)
    alpha = 0.02 * np.random.default_rng(6).standard_normal(600)
    budget = Budget.global_(60, 600)
    res = chita_iht(X, wb, budget, 1e-3, alpha)
    f_start = objective(X, ridge_backsolve(X, wb, hard_threshold(wb, budget), 1e-3, alpha), wb, 1e-3, alpha)
    assert res.objective <= f_start + 1e-9 * abs(f_start)
    assert np.all(np.diff(res.trace) <= 1e-9 * np.abs(np.asarray(res.trace[:-1])))


# ---------------------------------------------------------------------------------------------- budgets


def seg_counts(support: np.ndarray, segments: tuple[int, ...]) -> list[int]:
    return [int(c) for c in np.diff(np.searchsorted(support, segments))]


def test_layer_scope_gives_exact_counts_and_lower_bounds_hold() -> None:
    X, wb = low_rank_problem(7, 60, 900)
    wb[:300] *= 0.01  # segment 0 has tiny weights: magnitude would give it nothing
    segments = (0, 300, 700, 900)
    layer = Budget(k=90, segments=segments, lower=(30, 40, 20), upper=(30, 40, 20)).validated()
    res = chita_iht(X, wb, layer, 1e-4)
    assert seg_counts(res.support, segments) == [30, 40, 20]
    lower = Budget(k=90, segments=segments, lower=(25, 0, 0), upper=(300, 400, 10)).validated()
    res2 = chita_iht(X, wb, lower, 1e-4)
    c = seg_counts(res2.support, segments)
    assert c[0] >= 25
    assert c[2] <= 10
    assert sum(c) == 90
    f_mag = objective(X, ridge_backsolve(X, wb, hard_threshold(wb, lower), 1e-4), wb, 1e-4)
    assert res2.objective <= f_mag * (1 + 1e-9)


def test_zero_gradient_columns_compete_by_their_ridge_cost() -> None:
    """A weight whose gradient column is identically zero still costs (λ/2)w̄² in f when pruned: with
    λ > 0 it competes for the budget like any other weight (so chita minimises the f it reports and
    stays below magnitude + backsolve); with λ = 0 pruning it is free and it only takes budget that
    would otherwise go unspent."""
    X, wb = low_rank_problem(8, 40, 300)
    zero = np.arange(0, 300, 3)  # 100 dead weights ...
    X[:, zero] = 0.0
    wb[zero] = 10.0 + np.arange(100)  # ... with by far the largest magnitudes
    live = np.setdiff1d(np.arange(300), zero)
    for k in (50, 220):
        budget = Budget.global_(k, 300)
        res = chita_iht(X, wb, budget, 1e-3)
        f_mag = objective(X, ridge_backsolve(X, wb, hard_threshold(wb, budget), 1e-3), wb, 1e-3)
        assert res.objective <= f_mag * (1 + 1e-9)
        live_only = live[hard_threshold(wb[live], Budget.global_(min(k, 200), 200))]
        if k > 200:
            live_only = np.union1d(live_only, zero[-(k - 200) :])
        f_live = objective(X, ridge_backsolve(X, wb, live_only, 1e-3), wb, 1e-3)
        assert res.objective <= f_live * (1 + 1e-9)  # what dropping the dead weights up front gives
        dead_kept = np.intersect1d(res.support, zero)
        np.testing.assert_allclose(res.w[dead_kept], wb[dead_kept], rtol=1e-6)  # only ridge: stay at w̄
    # λ = 0: the dead weights cost nothing to prune and get budget only when it would go unspent
    res0 = chita_iht(X, wb, Budget.global_(50, 300), 0.0)
    assert np.intersect1d(res0.support, zero).size == 0
    res2 = chita_iht(X, wb, Budget.global_(220, 300), 0.0)
    assert np.intersect1d(res2.support, live).size == 200
    np.testing.assert_array_equal(np.intersect1d(res2.support, zero), np.sort(zero[-20:]))
    seg = Budget(k=60, segments=(0, 30, 300), lower=(25, 0), upper=(30, 270)).validated()
    res3 = chita_iht(X, wb, seg, 0.0)
    in0 = res3.support[res3.support < 30]
    assert in0.size >= 25
    assert np.intersect1d(in0, zero).size == 25 - 20  # 20 live columns in [0, 30)


def test_no_active_set_and_active_set_both_respect_budget() -> None:
    X, wb = low_rank_problem(9, 50, 800)
    budget = Budget.global_(40, 800)
    f_mag = objective(X, ridge_backsolve(X, wb, hard_threshold(wb, budget), 1e-4), wb, 1e-4)
    for active in (True, False):
        res = chita_iht(X, wb, budget, 1e-4, active_set=active)
        assert res.support.size == 40
        assert res.objective <= f_mag


def test_float32_input_is_not_copied_to_float64() -> None:
    rng = np.random.default_rng(10)
    X = rng.standard_normal((200, 100_000), dtype=np.float32) * np.float32(0.07)
    wb = rng.standard_normal(100_000).astype(np.float32)
    tracemalloc.start()
    try:
        res = chita_iht(X, wb, Budget.global_(300, 100_000), 1e-3, max_iter=20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res.support.size == 300
    assert peak < X.nbytes  # a float64 copy would be 2 × X.nbytes


def test_nonconvergence_is_reported_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    X, wb = low_rank_problem(11, 60, 1000)
    with caplog.at_level(logging.WARNING):
        res = chita_iht(X, wb, Budget.global_(30, 1000), 1e-4, init="magnitude", max_iter=2)
    assert not res.converged
    assert any("did not converge" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ridge": -0.5}, "-0.5"),
        ({"ridge": float("nan")}, "nan"),
        ({"max_iter": -3}, "-3"),
        ({"tol": -1.0}, "tol"),
        ({"init": "random"}, "random"),
        ({"w_bar": np.zeros(7)}, r"\(7,\)"),
        ({"alpha": np.ones(5)}, r"\(5,\)"),
    ],
)
def test_bad_inputs_raise_solver_error(kwargs: dict[str, object], match: str) -> None:
    X, wb = low_rank_problem(12, 10, 30)
    args: dict[str, object] = {"X": X, "w_bar": wb, "budget": Budget.global_(5, 30), "ridge": 1e-3}
    args.update(kwargs)
    with pytest.raises(SolverError, match=match):
        chita_iht(**args)  # type: ignore[arg-type]


def test_bad_arrays_raise_solver_error() -> None:
    X, wb = low_rank_problem(12, 10, 30)
    Xn = X.copy()
    Xn[3, 17] = np.nan
    with pytest.raises(SolverError, match="column 17"):
        chita_iht(Xn, wb, Budget.global_(5, 30), 1e-3)
    with pytest.raises(SolverError, match="int64"):
        chita_iht(np.ones((10, 30), dtype=np.int64), wb, Budget.global_(5, 30), 1e-3)
    with pytest.raises(SolverError, match="31"):
        chita_iht(X, wb, Budget.global_(5, 31), 1e-3)


# -------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("kind", ["poly", "exp", "linear", "const", "geom"])
@pytest.mark.parametrize("stages", [1, 2, 5, 16])
def test_schedule_monotone_and_ends_at_target(kind: str, stages: int) -> None:
    s = sparsity_schedule(stages, 0.98, kind, 0.3)  # type: ignore[arg-type]
    assert len(s) == stages
    assert s[-1] == 0.98
    assert all(b >= a for a, b in itertools.pairwise(s))
    assert all(0.3 <= x <= 0.98 for x in s)
    if stages > 1 and kind not in ("const", "geom"):  # geom's first stage already prunes beyond the start
        assert s[0] == pytest.approx(0.3)


def test_schedule_values() -> None:
    assert sparsity_schedule(1, 0.9, "poly", 0.5) == (0.9,)
    assert sparsity_schedule(3, 0.9, "linear", 0.5) == pytest.approx((0.5, 0.7, 0.9))
    assert sparsity_schedule(3, 0.9, "poly", 0.5) == pytest.approx((0.5, 0.9 - 0.4 / 8, 0.9))
    assert sparsity_schedule(3, 0.9, "exp", 0.5) == pytest.approx((0.5, 0.5 + 0.4 * 4 / 3 * 0.5, 0.9))
    # geom: the density shrinks by the same factor (0.1/0.5)^(1/3) in each of the 3 stages
    assert sparsity_schedule(3, 0.9, "geom", 0.5) == pytest.approx(tuple(1 - 0.5 * 0.2 ** (t / 3) for t in (1, 2, 3)))


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((0, 0.9, "poly", 0.1), "stages"),
        ((3, 1.0, "poly", 0.1), "1.0"),
        ((3, 0.9, "cubic", 0.1), "cubic"),
        ((3, 0.5, "poly", 0.7), "0.7"),
        ((2.5, 0.9, "poly", 0.1), "2.5"),
    ],
)
def test_schedule_bad_inputs(args: tuple[object, ...], match: str) -> None:
    with pytest.raises(SolverError, match=match):
        sparsity_schedule(*args)  # type: ignore[arg-type]


def test_idle_support_slots_go_to_dead_weights_and_lower_the_objective() -> None:
    """Late CHITA++ stages: few live weights, many dead units (zero gradient columns, w̄ ≠ 0)."""
    rng = np.random.default_rng(5)
    n, p, k = 30, 60, 20
    X = rng.standard_normal((n, p)).astype(np.float32)
    X[:, 40:] = 0.0  # dead: identically zero gradient columns
    w_bar = np.zeros(p)
    w_bar[:10] = rng.standard_normal(10)  # 10 live weights that still exist
    w_bar[40:] = rng.standard_normal(20)  # 20 dead weights that still exist
    budget = Budget.global_(k, p)
    res = chita_iht(X, w_bar, budget, 1e-3)
    assert np.count_nonzero(res.w) == k  # the budget is spent on weights that exist
    assert set(range(10)) <= set(res.support.tolist())
    plain = np.zeros(p)
    plain[:10] = w_bar[:10]  # what keeping zeros in the idle slots would give
    assert res.objective < objective(X, plain, w_bar, 1e-3)


def test_obd_start_ranks_by_curvature_and_keeps_the_contract() -> None:
    """With a column of huge curvature next to a slightly larger weight of no curvature, the OBD
    saliency keeps the curved one where magnitude would not; either start gives an exact budget and a
    non-increasing trace."""
    rng = np.random.default_rng(11)
    n, p = 40, 30
    X = 0.01 * rng.standard_normal((n, p))
    X[:, 0] *= 300.0  # weight 0: small but costly to prune
    w_bar = rng.uniform(0.5, 1.0, p)
    w_bar[0] = 0.4
    budget = Budget.global_(10, p)
    for start in ("magnitude", "obd"):
        res = chita_iht(X, w_bar, budget, 1e-4, start=start, max_iter=0)  # max_iter=0: the start itself
        assert np.count_nonzero(res.w) == 10
        assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in itertools.pairwise(res.trace))
        assert (0 in res.support.tolist()) == (start == "obd")
    with pytest.raises(SolverError, match="start must be"):
        chita_iht(X, w_bar, budget, 1e-4, start="random")  # type: ignore[arg-type]
