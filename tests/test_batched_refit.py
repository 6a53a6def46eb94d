"""The batched exact re-fit (systems grouped by size, gathered into reused buffers, one direct LAPACK
``posv`` each) gives the per-row ``spd_solve`` re-fit up to rounding, on every kind of row."""

from __future__ import annotations

import numpy as np
import pytest

from chita_onnx.solver import batched_spd
from chita_onnx.solver import layerwise as L  # noqa: N812


def gram(rng: np.random.Generator, d: int, rows: int) -> np.ndarray:
    X = np.maximum(rng.standard_normal((rows, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)), 0)
    return X.T @ X


def mixed_mask(rng: np.random.Generator, M: int, d: int) -> np.ndarray:
    """Rows of every kind: empty, one weight, full, d−1, and kept counts spread over [0, d]
    (so both the kept-set and the pruned-set systems, below and above SINGLE_MIN)."""
    counts = np.concatenate(
        ([0, 1, d, d - 1, L.SINGLE_MIN - 1, L.SINGLE_MIN, d - L.SINGLE_MIN], rng.integers(0, d + 1, M - 7))
    )
    mask = np.zeros((M, d), dtype=bool)
    for i, c in enumerate(counts):
        mask[i, rng.choice(d, int(c), replace=False)] = True
    return mask


def exact64(A: np.ndarray, mask: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    out = np.zeros_like(rhs)
    for i in range(mask.shape[0]):
        S = np.flatnonzero(mask[i])
        if S.size:
            out[i, S] = np.linalg.solve(A[np.ix_(S, S)], rhs[i, S])
    return out


def problem(seed: int, d: int, M: int) -> tuple[L.Damped, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    dh = L.damp_gram(gram(rng, d, 2 * d))
    rhs, W_star = L.targets(rng.standard_normal((M, d)), dh, None)
    return dh, rhs, W_star, L.inverse(dh), mixed_mask(rng, M, d)


@pytest.mark.parametrize("complement", [False, True])
def test_batched_refit_equals_the_per_row_path_in_float64(complement: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    dh, rhs, W_star, inv, mask = problem(0, 2 * L.SINGLE_MIN + 44, 40)
    monkeypatch.setattr(L, "SINGLE_MIN", 10**9)  # every system in float64: the two paths differ by rounding only
    args = (inv, W_star) if complement else (None, None)
    old = L._exact_refit(dh, rhs, mask, *args, batched=False)
    new = L._exact_refit(dh, rhs, mask, *args, batched=True)
    assert np.all(new[~mask] == 0)
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-9 * np.abs(old).max())


@pytest.mark.parametrize("complement", [False, True])
def test_batched_refit_with_float32_systems_is_as_accurate_as_the_per_row_path(complement: bool) -> None:
    dh, rhs, W_star, inv, mask = problem(1, 2 * L.SINGLE_MIN + 44, 40)
    args = (inv, W_star) if complement else (None, None)
    old = L._exact_refit(dh, rhs, mask, *args, batched=False)
    new = L._exact_refit(dh, rhs, mask, *args, batched=True)
    ref = exact64(dh.H, mask, rhs)
    scale = np.abs(ref).max()
    assert np.all(new[~mask] == 0)
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-4 * scale)  # both carry float32 rounding
    small = (
        np.minimum(mask.sum(1), mask.shape[1] - mask.sum(1)) < L.SINGLE_MIN
        if complement
        else mask.sum(1) < L.SINGLE_MIN
    )
    np.testing.assert_allclose(new[small], old[small], rtol=0, atol=1e-9 * scale)  # float64 rows
    err_new, err_old = np.abs(new - ref).max(), np.abs(old - ref).max()
    assert err_new <= 4 * err_old + 1e-9 * scale
    f, f_ref = L.objective(new, dh, rhs), L.objective(ref, dh, rhs)
    assert 0 <= f - f_ref <= 1e-6 * abs(f_ref)


@pytest.mark.parametrize(("smallest", "factor_ok"), [(1e-7, True), (1e-11, False)])
def test_ill_conditioned_gram_falls_back_to_float64(
    smallest: float, factor_ok: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Condition 1e7: float32 Cholesky succeeds but the residual check fails; 1e11: it breaks down."""
    rng = np.random.default_rng(2)
    d, M = L.SINGLE_MIN + 40, 6
    Q = np.linalg.qr(rng.standard_normal((d, d)))[0]
    A = (Q * np.geomspace(1.0, smallest, d)) @ Q.T
    A = 0.5 * (A + A.T) + 1e-12 * np.eye(d)
    dh = L.Damped.of(A)
    rhs = rng.standard_normal((M, d))
    mask = np.ones((M, d), dtype=bool)
    for i in range(M):
        mask[i, rng.choice(d, 3 + 5 * i, replace=False)] = False  # every system ≥ SINGLE_MIN unknowns
    calls: list[tuple[np.dtype, int, bool]] = []
    real = batched_spd._gather_solve

    def spy(A: np.ndarray, idx: np.ndarray, b: np.ndarray, residual: bool) -> tuple:
        out = real(A, idx, b, residual)
        calls.append((A.dtype, idx.shape[0], bool(np.all(out[1]))))
        return out

    monkeypatch.setattr(batched_spd, "_gather_solve", spy)
    new = L._exact_refit(dh, rhs, mask, None, None, batched=True)
    old = L._exact_refit(dh, rhs, mask, None, None, batched=False)
    assert sum(r for dt, r, _ in calls if dt == np.float32) == M
    assert all(ok == factor_ok for dt, _, ok in calls if dt == np.float32)
    assert sum(r for dt, r, _ in calls if dt == np.float64) == M  # every row redone in float64
    ref = exact64(A, mask, rhs)
    np.testing.assert_allclose(new, old, rtol=0, atol=1e-6 * np.abs(old).max())
    np.testing.assert_allclose(new, ref, rtol=0, atol=1e-6 * np.abs(ref).max())


def test_a_failed_float64_factorisation_goes_to_the_per_row_fallback() -> None:
    A = np.diag([1.0, 2.0, -1.0, 4.0])
    sel = np.array([[True, True, False, False], [True, False, True, True], [False, False, False, False]])
    R = np.ones((3, 4))
    seen: list[list[int]] = []

    def fallback(idx: np.ndarray, b: np.ndarray) -> np.ndarray:
        seen.append(idx.tolist())
        return np.full(idx.size, 7.0)

    X = batched_spd.solve_subsystems(A, sel, R, single_min=128, tol=1e-3, fallback=fallback)
    assert seen == [[0, 2, 3]]
    np.testing.assert_allclose(X, [[1.0, 0.5, 0, 0], [7.0, 0, 7.0, 7.0], [0, 0, 0, 0]])
    with pytest.raises(np.linalg.LinAlgError):  # the layer's own fallback raises as the per-row path does
        L._solve_rows(A, sel, R)


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_sparse_layer_is_recovered_through_prune_layer(seed: int) -> None:
    rng = np.random.default_rng(seed)
    d, M, R = 2 * L.SINGLE_MIN + 20, 6, 4000
    density = np.array([0.05, 0.3, 0.5, 0.6, 0.8, 0.97])[:, None]  # kept and pruned sets, float32 and float64
    W_true = rng.standard_normal((M, d)) * (rng.random((M, d)) < density)
    X = rng.standard_normal((R, d))
    H = X.T @ X
    keep = int(np.count_nonzero(W_true))
    sol = L.prune_layer(W_true[None], H[None], keep=keep, damp=1e-10)
    assert sol.info["refit"] == "cholesky"
    np.testing.assert_array_equal(sol.mask[0], W_true != 0)
    np.testing.assert_allclose(sol.W[0], W_true, rtol=0, atol=1e-5 * np.abs(W_true).max())


def test_a_fortran_ordered_matrix_gives_the_same_solutions() -> None:
    """LAPACK hands back Fortran-ordered inverses; the solver gathers rows of the same (symmetric)
    matrix either way and returns the same solutions."""
    _, rhs, _, inv, mask = problem(3, L.SINGLE_MIN + 20, 12)

    def fallback(idx: np.ndarray, b: np.ndarray) -> np.ndarray:
        raise AssertionError("no float64 breakdown expected")

    kw = {"single_min": L.SINGLE_MIN, "tol": 1e-3, "fallback": fallback}
    c = batched_spd.solve_subsystems(np.ascontiguousarray(inv), mask, rhs, **kw)  # type: ignore[arg-type]
    f = batched_spd.solve_subsystems(np.asfortranarray(inv), mask, rhs, **kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(c, f)
