"""The exact re-fit's float32 solves (float64 fallback) and float32 CG products give the float64 minimiser."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg as sla

from chita_onnx.solver import layerwise as L  # noqa: N812


def relu_gram(rng: np.random.Generator, d: int, rows: int) -> np.ndarray:
    A = np.maximum(rng.standard_normal((rows, d)) @ (np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)), 0)
    return A.T @ A


def layer_problem(seed: int, d: int, M: int, rows: int) -> tuple[L.Damped, np.ndarray, np.ndarray, np.ndarray]:
    """A damped ReLU-input Gram, the re-fit's right-hand side, ``W*`` and ``H_λ⁻¹``."""
    rng = np.random.default_rng(seed)
    H = relu_gram(rng, d, rows)
    W_bar = rng.standard_normal((M, d))
    dh = L.damp_gram(H, 0.01)
    rhs, W_star = L.targets(W_bar, dh, H @ W_bar.T)
    return dh, rhs, W_star, L.inverse(dh)


@pytest.mark.parametrize("seed", [0, 1])
def test_refit_above_single_min_matches_float64_rows(seed: int) -> None:
    d, M = 2 * L.SINGLE_MIN + 40, 12
    dh, rhs, W_star, inv = layer_problem(seed, d, M, 3 * d)
    _, mask = L.sparsegpt_sweep(W_star, inv, keep=M * d // 2, block=64)
    mask[0, : d // 4] = False  # rows on both sides of d/2: both the kept-set and the pruned-set systems
    mask[1, : 3 * d // 4] = True
    W, how = L.ridge_refit(dh, rhs, mask, None, inv, W_star)
    assert how == "cholesky"
    ref = np.zeros_like(W)
    for i in range(M):
        S = np.flatnonzero(mask[i])
        ref[i, S] = np.linalg.solve(dh.H[np.ix_(S, S)], rhs[i, S])
    assert np.all(W[~mask] == 0)
    np.testing.assert_allclose(W, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    f, f_ref = L.objective(W, dh, rhs), L.objective(ref, dh, rhs)
    assert abs(f - f_ref) <= 1e-9 * abs(f_ref)


def test_spd_solve_falls_back_to_float64_when_float32_is_not_positive_definite() -> None:
    rng = np.random.default_rng(3)
    m = L.SINGLE_MIN + 8
    Q = np.linalg.qr(rng.standard_normal((m, m)))[0]
    A = (Q * np.logspace(0, -12, m)) @ Q.T  # positive definite in float64, not after rounding to float32
    A = 0.5 * (A + A.T) + 1e-13 * np.eye(m)
    b = rng.standard_normal(m)
    idx = np.arange(m)
    x = L.spd_solve(A, A.astype(np.float32), idx, b)
    ref = sla.cho_solve(sla.cho_factor(A), b)
    np.testing.assert_allclose(x, ref, rtol=1e-6)


def test_spd_solve_float32_path_is_taken_and_accurate_on_a_damped_gram(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    m = L.SINGLE_MIN + 8
    A = L.damp_gram(relu_gram(rng, m, 2 * m), 0.01).H
    b = rng.standard_normal(m)
    calls: list[np.dtype] = []
    real = sla.cho_factor

    def spy(a: np.ndarray, *args: object, **kw: object) -> object:
        calls.append(a.dtype)
        return real(a, *args, **kw)

    monkeypatch.setattr(L.sla, "cho_factor", spy)
    x = L.spd_solve(A, A.astype(np.float32), np.arange(m), b)
    assert calls == [np.dtype(np.float32)]
    ref = np.linalg.solve(A, b)

    def f(v: np.ndarray) -> float:
        return float(0.5 * v @ A @ v - b @ v)

    assert 0 <= f(x) - f(ref) <= 1e-9 * abs(f(ref))  # the float32 rounding of A costs ~nothing
    np.testing.assert_allclose(x, ref, rtol=0, atol=1e-3 * np.abs(ref).max())


def test_float32_cg_products_converge_to_the_exact_refit_and_only_lower_the_objective() -> None:
    d, M = L.SINGLE_MIN + 64, 6
    dh, rhs, W_star, inv = layer_problem(6, d, M, 4 * d)
    W0, mask = L.sparsegpt_sweep(W_star, inv, keep=M * d // 2, block=64)
    exact, _ = L.ridge_refit(dh, rhs, mask, W0, inv, W_star)
    f_exact, f0 = L.objective(exact, dh, rhs), L.objective(W0, dh, rhs)
    prev = f0
    for iters in (5, 20, 300):
        W = L._cg_refit(dh.H, rhs, mask, W0, tol=1e-10, iters=iters)
        assert np.all(W[~mask] == 0)
        f = L.objective(W, dh, rhs)
        assert f <= prev + 1e-9 * abs(f_exact)
        prev = f
    assert prev - f_exact <= 1e-6 * (f0 - f_exact)
