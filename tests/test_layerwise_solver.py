"""Layer-wise reconstruction solver (pure NumPy): planted problems, monotonicity and limit cases."""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest

from chita_onnx.errors import SolverError
from chita_onnx.solver.layerwise import (
    damp_gram,
    inverse,
    objective,
    prune_layer,
    reconstruction_error,
    ridge_refit,
    sparsegpt_sweep,
    split_budget,
    targets,
)


def _stats(Xp: np.ndarray, Xd: np.ndarray, W_bar: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """H, B, yy of one group from rows Xp/Xd (R, d) and W̄ (M, d)."""
    Y = Xd @ W_bar.T
    return Xp.T @ Xp, Xp.T @ Y, (Y**2).sum(0)


def _planted(seed: int, M: int = 8, d: int = 24, R: int = 400, density: float = 0.4):
    """A sparse W_true and inputs such that a *dense* W̄ on the dense inputs gives W_true's outputs on
    the pruned inputs: x_d = A x_p with A invertible, W̄ = W_true A⁻¹."""
    rng = np.random.default_rng(seed)
    W_true = rng.standard_normal((M, d)) * (rng.random((M, d)) < density)
    Xp = rng.standard_normal((R, d))
    A = np.eye(d) + 0.3 * rng.standard_normal((d, d))
    Xd = Xp @ A.T
    W_bar = W_true @ np.linalg.inv(A)
    return W_true, Xp, Xd, W_bar


def test_planted_sparse_layer_is_recovered_exactly_from_dense_targets() -> None:
    W_true, Xp, Xd, W_bar = _planted(0)
    assert np.count_nonzero(W_bar) == W_bar.size  # the dense weight is dense
    H, B, yy = _stats(Xp, Xd, W_bar)
    keep = int(np.count_nonzero(W_true))
    sol = prune_layer(W_bar[None], H[None], B[None], yy[None], keep=keep, damp=1e-10)
    assert int(sol.mask.sum()) == keep
    np.testing.assert_array_equal(sol.mask[0], W_true != 0)
    np.testing.assert_allclose(sol.W[0], W_true, atol=1e-6)
    assert sol.error <= 1e-8 * sol.masked_error
    # magnitude selection on W̄ cannot see the support
    assert not np.array_equal(np.abs(W_bar) >= np.sort(np.abs(W_bar), axis=None)[-keep], W_true != 0)


def test_sweep_alone_finds_the_planted_support_and_refit_makes_it_exact() -> None:
    W_true, Xp, Xd, W_bar = _planted(1, M=5, d=40)
    H, B, yy = _stats(Xp, Xd, W_bar)
    keep = int(np.count_nonzero(W_true))
    sweep = prune_layer(W_bar[None], H[None], B[None], yy[None], keep=keep, refit=False, damp=1e-10)
    np.testing.assert_array_equal(sweep.mask[0], W_true != 0)
    assert sweep.error < 1e-6 * sweep.masked_error


def test_sparsegpt_with_pruned_targets_recovers_duplicated_features() -> None:
    """Features duplicated in the input: W̄ spreads its weight over both copies, magnitude cannot
    tell which copy to keep, the sweep keeps one per pair and moves the weight there (zero error)."""
    rng = np.random.default_rng(2)
    R, k, M = 300, 10, 6
    base = rng.standard_normal((R, k))
    X = np.concatenate([base, base], axis=1)
    a = rng.standard_normal((M, k))
    W_bar = np.concatenate([0.5 * a, 0.5 * a], axis=1)
    sol = prune_layer(W_bar[None], (X.T @ X)[None], keep=M * k, damp=1e-9)
    out = X @ sol.W[0].T
    np.testing.assert_allclose(out, X @ W_bar.T, atol=1e-5)
    assert sol.error < 1e-8 * max(1.0, float(np.sum((X @ W_bar.T) ** 2)))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_refit_never_increases_the_damped_objective_over_masked_weights(seed: int) -> None:
    rng = np.random.default_rng(seed)
    M, d, R = 7, 30, 200
    Xp = rng.standard_normal((R, d)) * rng.random(d) * 3
    Xd = Xp + 0.3 * rng.standard_normal((R, d))
    W_bar = rng.standard_normal((M, d))
    H, B, yy = _stats(Xp, Xd, W_bar)
    mask = rng.random((M, d)) < 0.4
    for Bg in (None, B):
        dh = damp_gram(H, 0.01)
        rhs, _ = targets(W_bar, dh, Bg)
        masked = W_bar * mask
        W, how = ridge_refit(dh, rhs, mask)
        assert how == "cholesky"
        assert np.all(W[~mask] == 0)
        assert objective(W, dh, rhs) <= objective(masked, dh, rhs) + 1e-9
        # and with a tiny damping the raw reconstruction error falls as well
        dh0 = damp_gram(H, 1e-9)
        rhs0, _ = targets(W_bar, dh0, Bg)
        W0, _ = ridge_refit(dh0, rhs0, mask)
        assert reconstruction_error(W0, H, Bg, yy, W_bar) <= reconstruction_error(masked, H, Bg, yy, W_bar) + 1e-9


def test_cg_refit_agrees_with_cholesky(monkeypatch: pytest.MonkeyPatch) -> None:
    import chita_onnx.solver.layerwise as lw

    rng = np.random.default_rng(4)
    M, d = 6, 25
    X = rng.standard_normal((120, d))
    W_bar = rng.standard_normal((M, d))
    dh = damp_gram(X.T @ X, 0.01)
    rhs, _ = targets(W_bar, dh, None)
    mask = rng.random((M, d)) < 0.5
    exact, how = ridge_refit(dh, rhs, mask)
    assert how == "cholesky"
    monkeypatch.setattr(lw, "EXACT_FLOPS", 0.0)
    monkeypatch.setattr(lw, "CG_FLOPS", float("inf"))
    cg, how = ridge_refit(dh, rhs, mask, W_bar * mask)
    assert how == "cg300"
    np.testing.assert_allclose(cg, exact, atol=1e-6 * np.abs(exact).max())


def test_sparsity_zero_keeps_the_dense_layer() -> None:
    rng = np.random.default_rng(5)
    X = rng.standard_normal((100, 12))
    W_bar = rng.standard_normal((1, 4, 12))
    sol = prune_layer(W_bar, (X.T @ X)[None], keep=W_bar.size)
    assert sol.mask.all()
    np.testing.assert_allclose(sol.W, W_bar, atol=1e-9)
    assert sol.error < 1e-9


def test_all_inputs_dead_prunes_by_magnitude_without_error() -> None:
    W_bar = np.arange(1, 25, dtype=float).reshape(1, 4, 6)
    sol = prune_layer(W_bar, np.zeros((1, 6, 6)), keep=10)
    assert int(sol.mask.sum()) == 10
    kept = np.sort(W_bar[sol.mask])
    np.testing.assert_array_equal(kept, np.arange(15, 25))  # nothing to reconstruct: keep the largest
    np.testing.assert_allclose(sol.W[sol.mask], W_bar[sol.mask])
    assert sol.error == 0.0


def test_more_inputs_than_samples_is_damped_and_still_improves() -> None:
    rng = np.random.default_rng(6)
    d, R, M = 60, 20, 5
    X = rng.standard_normal((R, d))
    W_bar = rng.standard_normal((1, M, d))
    H = (X.T @ X)[None]
    sol = prune_layer(W_bar, H, keep=W_bar.size // 2)
    assert int(sol.mask.sum()) == W_bar.size // 2
    assert np.all(np.isfinite(sol.W))
    assert sol.error < sol.masked_error


def test_grouped_layer_splits_the_budget_exactly() -> None:
    rng = np.random.default_rng(7)
    g, M, d = 4, 1, 9  # depthwise 3x3
    Hs, Ws = [], []
    for k in range(g):
        X = rng.standard_normal((200, d)) * (k + 1)  # later groups matter more
        Hs.append(X.T @ X)
        Ws.append(rng.standard_normal((M, d)))
    sol = prune_layer(np.stack(Ws), np.stack(Hs), keep=14)
    assert int(sol.mask.sum()) == 14
    per = sol.mask.reshape(g, -1).sum(1)
    assert per[-1] >= per[0]


def test_not_positive_definite_escalates_damping_with_a_message(caplog: pytest.LogCaptureFixture) -> None:
    H = np.diag([1.0, 1.0, -50.0])  # indefinite: what float rounding can do to a huge Gram
    with caplog.at_level(logging.WARNING):
        dh = damp_gram(H, 0.01, name="conv7")
    assert dh.damp > 0.01
    assert "conv7" in caplog.text and "not positive definite" in caplog.text
    with pytest.raises(SolverError, match="NaN"):
        damp_gram(np.full((2, 2), np.nan))


def test_mask_mode_keeps_the_given_support() -> None:
    rng = np.random.default_rng(8)
    X = rng.standard_normal((80, 10))
    W_bar = rng.standard_normal((1, 3, 10))
    mask = rng.random((1, 3, 10)) < 0.5
    sol = prune_layer(W_bar, (X.T @ X)[None], mask=mask)
    np.testing.assert_array_equal(sol.mask, mask)
    assert np.all(sol.W[~mask] == 0)
    assert sol.error <= sol.masked_error


def test_sweep_keeps_exact_count_across_blocks() -> None:
    rng = np.random.default_rng(9)
    d = 50
    X = rng.standard_normal((300, d))
    W = rng.standard_normal((7, d))
    dh = damp_gram(X.T @ X)
    for keep in (0, 1, 101, 349, 350):
        Wp, m = sparsegpt_sweep(W, inverse(dh), keep=keep, block=16)
        assert int(m.sum()) == keep
        assert np.all(Wp[~m] == 0)


@pytest.mark.parametrize("select", ["sparsegpt", "magnitude"])
def test_batched_groups_agree_with_the_per_group_path(select: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Many small groups (a depthwise Conv) take a batched path; it must match the loop over groups."""
    import chita_onnx.solver.layerwise as lw

    rng = np.random.default_rng(10)
    g, M, d = 12, 2, 9
    Hs, Bs, yys = [], [], []
    W_bar = rng.standard_normal((g, M, d))
    for k in range(g):
        Xp = rng.standard_normal((60, d)) * (1 + k % 3)
        Xd = Xp + 0.2 * rng.standard_normal((60, d))
        H, B, yy = _stats(Xp, Xd, W_bar[k])
        Hs.append(H), Bs.append(B), yys.append(yy)
    H, B, yy = np.stack(Hs), np.stack(Bs), np.stack(yys)
    fast = prune_layer(W_bar, H, B, yy, keep=90, select=select)  # type: ignore[arg-type]
    assert fast.info["refit"] == "batched"
    calls = []
    monkeypatch.setattr(lw, "_prune_groups_batched", lambda *a: calls.append(1))
    slow = prune_layer(W_bar, H, B, yy, keep=90, select=select)  # type: ignore[arg-type]
    assert calls and slow.info["refit"] == "cholesky"
    np.testing.assert_array_equal(fast.mask, slow.mask)
    np.testing.assert_allclose(fast.W, slow.W, atol=1e-8)
    assert fast.error == pytest.approx(slow.error, rel=1e-8)


@pytest.mark.parametrize("select", ["sparsegpt", "magnitude"])
def test_exact_count_for_a_weight_in_fortran_order(select: str) -> None:
    rng = np.random.default_rng(11)
    X = rng.standard_normal((200, 16))
    W = np.asfortranarray(rng.standard_normal((1, 6, 16)))  # as a transposed MatMul weight can arrive
    sol = prune_layer(W, (X.T @ X)[None], keep=30, select=select)  # type: ignore[arg-type]
    assert int(sol.mask.sum()) == 30 and int(np.count_nonzero(sol.W)) <= 30


@pytest.mark.parametrize("density", [0.2, 0.5, 0.85])
def test_refit_through_the_pruned_set_equals_the_kept_set_solve(density: float) -> None:
    """The complement route ``w = w* − H⁻¹[:, T] (H⁻¹)_TT⁻¹ w*_T`` gives the kept-set minimiser."""
    rng = np.random.default_rng(11)
    M, d = 7, 30
    X = rng.standard_normal((50, d)) @ rng.standard_normal((d, d))  # correlated inputs
    W_bar = rng.standard_normal((M, d))
    Bg = X.T @ (X @ W_bar.T + 0.1 * rng.standard_normal((50, M)))
    dh = damp_gram(X.T @ X, 0.01)
    rhs, W_star = targets(W_bar, dh, Bg)
    mask = rng.random((M, d)) < density
    mask[0] = True  # a full row
    mask[1] = False  # an empty one
    direct, _ = ridge_refit(dh, rhs, mask)
    via, how = ridge_refit(dh, rhs, mask, None, inverse(dh), W_star)
    assert how == "cholesky"
    np.testing.assert_allclose(via, direct, atol=1e-8 * np.abs(direct).max())
    assert not np.any(via[~mask])


def test_budgeted_cg_refit_only_lowers_the_objective(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above EXACT_FLOPS the re-fit is CG from the sweep's weights for as many iterations as
    CG_FLOPS pays for: each budget gives an objective ≤ the start's, and a larger one ≤ a smaller one."""
    import chita_onnx.solver.layerwise as lw

    rng = np.random.default_rng(12)
    M, d = 9, 40
    X = rng.standard_normal((60, d)) @ rng.standard_normal((d, d))  # ill-conditioned: CG needs many steps
    W_bar = rng.standard_normal((M, d))
    dh = damp_gram(X.T @ X, 0.01)
    rhs, W_star = targets(W_bar, dh, None)
    mask = rng.random((M, d)) < 0.5
    W0 = W_bar * mask
    exact, _ = ridge_refit(dh, rhs, mask)
    monkeypatch.setattr(lw, "EXACT_FLOPS", 0.0)
    step = lw.refit_cost(mask)[1]
    objs = [lw.objective(W0, dh, rhs)]
    for its in (5, 20, 300):
        monkeypatch.setattr(lw, "CG_FLOPS", its * step)
        W, how = ridge_refit(dh, rhs, mask, W0, inverse(dh), W_star)
        assert how == f"cg{its}" and not np.any(W[~mask])
        objs.append(lw.objective(W, dh, rhs))
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(objs))
    assert objs[-1] <= lw.objective(exact, dh, rhs) + 1e-6 * abs(objs[0])


def test_inverse_from_the_cholesky_factor_is_the_inverse() -> None:
    rng = np.random.default_rng(13)
    X = rng.standard_normal((40, 17))
    dh = damp_gram(X.T @ X, 0.01)
    np.testing.assert_allclose(inverse(dh) @ dh.H, np.eye(17), atol=1e-9)
    np.testing.assert_array_equal(inverse(dh), inverse(dh).T)
    assert inverse(dh).flags.c_contiguous  # the batched re-fit gathers its rows


@pytest.mark.parametrize("lower", [True, False])
def test_mirror_copies_one_triangle_across_blocks(lower: bool) -> None:
    """The in-place symmetrisation behind :func:`inverse` keeps the given triangle and mirrors it, over
    sizes that do and do not divide into its blocks."""
    from chita_onnx.solver.layerwise import _mirror

    rng = np.random.default_rng(14)
    for d in (1, 7, 256, 600):
        A = rng.standard_normal((d, d))
        tri = np.tril(A) if lower else np.triu(A)
        want = tri + np.tril(tri, -1).T if lower else tri + np.triu(tri, 1).T
        _mirror(A, lower, block=256)
        np.testing.assert_array_equal(A, want)


# ------------------------------------------------------------------------------ output-row weights


@pytest.mark.parametrize("grouped", [False, True])
def test_row_weights_of_ones_change_nothing(grouped: bool) -> None:
    """ρ ≡ 1 is the unweighted layer: the same mask and weights (per-group path and batched depthwise path)."""
    rng = np.random.default_rng(3)
    g, M, d = (12, 2, 9) if grouped else (1, 6, 20)
    W_bar = rng.standard_normal((g, M, d))
    X = rng.standard_normal((g, 300, d))
    H = np.einsum("grd,gre->gde", X, X)
    keep = (g * M * d) // 3
    a = prune_layer(W_bar, H, keep=keep)
    b = prune_layer(W_bar, H, keep=keep, row_weight=np.ones((g, M)))
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(a.W, b.W)


@pytest.mark.parametrize("grouped", [False, True])
def test_row_weights_spend_the_budget_on_the_rows_that_matter(grouped: bool) -> None:
    """Two copies of the same rows, one weighed 100× less: with the weights the whole budget of one
    copy goes to the important copy (it is kept dense and exact); without them it is split evenly."""
    rng = np.random.default_rng(4)
    d = 10 if grouped else 16
    g = 10 if grouped else 1
    half = rng.choice([-1.0, 1.0], (g, 3, d)) * rng.uniform(0.5, 1.5, (g, 3, d))  # no weight near 0
    W_bar = np.concatenate([half, half], axis=1)  # rows 0-2 and 3-5 equal
    X = rng.standard_normal((g, 400, d))
    H = np.einsum("grd,gre->gde", X, X)
    keep = g * 3 * d
    rho = np.tile(np.array([1.0, 1.0, 1.0, 1e-6, 1e-6, 1e-6]), (g, 1))
    sol = prune_layer(W_bar, H, keep=keep, row_weight=rho)
    assert int(sol.mask.sum()) == keep
    assert sol.mask[:, :3].all() and not sol.mask[:, 3:].any()
    np.testing.assert_allclose(sol.W[:, :3], half, atol=1e-8)
    plain = prune_layer(W_bar, H, keep=keep)
    assert 0.3 < plain.mask[:, :3].mean() < 0.7


def test_row_weights_are_validated() -> None:
    W_bar = np.ones((1, 2, 3))
    H = np.eye(3)[None]
    with pytest.raises(SolverError, match="row_weight"):
        prune_layer(W_bar, H, keep=3, row_weight=np.array([[1.0, -1.0]]))
    with pytest.raises(SolverError, match="row_weight"):
        prune_layer(W_bar, H, keep=3, row_weight=np.ones((1, 3)))


def test_output_row_weights_recover_a_kronecker_factored_sensitivity() -> None:
    """For F_(i,j) = s_i·H_jj (the Kronecker-factored Fisher of a linear layer), the row weights are
    √s normalised to mean 1, plus the floor; an all-zero F gives None (no information)."""
    from chita_onnx.solver.layerwise import ROW_WEIGHT_FLOOR, output_row_weights

    rng = np.random.default_rng(5)
    g, M, d = 2, 7, 5
    X = rng.standard_normal((g, 50, d)) * rng.uniform(0.1, 3.0, (g, 1, d))
    H = np.einsum("grd,gre->gde", X, X)
    s = rng.uniform(0.0, 4.0, (g, M))
    F = s[:, :, None] * np.einsum("gii->gi", H)[:, None, :] * 3.0  # any overall scale
    rho = output_row_weights(F, H)
    assert rho is not None
    np.testing.assert_allclose(rho, np.sqrt(s) / np.sqrt(s).mean() + ROW_WEIGHT_FLOOR, rtol=1e-10)
    assert output_row_weights(np.zeros_like(F), H) is None


def test_sweep_matches_sequential_obs_on_the_columns_not_yet_processed() -> None:
    """The column sweep (left-looking, blocked, through the Cholesky factor of H_λ⁻¹) is SparseGPT's
    sequence of OBS steps: column j is removed with the inverse of H restricted to the columns j..d−1
    not yet processed, compensating on those.  Checked against that definition, inverting H_F anew at
    every step, across block edges."""
    rng = np.random.default_rng(21)
    d, M = 23, 5
    X = rng.standard_normal((200, d)) @ rng.standard_normal((d, d))
    dh = damp_gram(X.T @ X)
    W = rng.standard_normal((M, d))
    mask = rng.random((M, d)) < 0.5
    got, kept = sparsegpt_sweep(W, inverse(dh), mask=mask, block=7)
    np.testing.assert_array_equal(kept, mask)
    want = W.copy()
    for i in range(M):
        w = want[i]
        for j in range(d):
            F = np.arange(j, d)
            Hinv_F = np.linalg.inv(dh.H[np.ix_(F, F)])
            if not mask[i, j]:
                w[F] -= w[j] / Hinv_F[0, 0] * Hinv_F[:, 0]
                w[j] = 0.0
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_cg_refit_keeps_each_rows_better_end(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are independent problems: the CG re-fit (float32 products at d ≥ SINGLE_MIN, a Gram
    conditioned beyond float32) ends every row at the better of its start and its last iterate, so no
    row's objective rises (in float64), including rows that start at their exact optimum; the
    others improve."""
    import chita_onnx.solver.layerwise as lw

    rng = np.random.default_rng(21)
    M, d = 12, 160
    X = rng.standard_normal((300, d)) * np.logspace(0, 4, d)  # ill-conditioned beyond float32
    W_bar = rng.standard_normal((M, d))
    dh = damp_gram(X.T @ X, 1e-9)
    rhs, W_star = targets(W_bar, dh, None)
    mask = rng.random((M, d)) < 0.5
    exact, _ = ridge_refit(dh, rhs, mask)
    W0 = W_bar * mask
    W0[:4] = exact[:4]  # already optimal
    monkeypatch.setattr(lw, "EXACT_FLOPS", 0.0)
    monkeypatch.setattr(lw, "CG_FLOPS", 5 * lw.refit_cost(mask)[1])

    def per_row(W: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", W @ dh.H, W) - 2 * np.einsum("ij,ij->i", W, rhs)

    W, how = ridge_refit(dh, rhs, mask, W0, inverse(dh), W_star)
    assert how == "cg5" and not np.any(W[~mask])
    start, end = per_row(W0), per_row(W)
    assert np.all(end <= start + 1e-6 * np.abs(start))
    assert np.all(end[4:] < start[4:])  # the others improve


def test_diagnostic_errors_in_float32_match_float64() -> None:
    """The reported masked/dense errors of big layers use float32 products with H: they agree with
    the float64 ones to float32 rounding of the layer's output energy, with and without targets B."""
    from chita_onnx.solver.layerwise import reconstruction_error

    rng = np.random.default_rng(22)
    M, d = 30, 200
    X = rng.standard_normal((500, d))
    H = X.T @ X
    W_bar = rng.standard_normal((M, d))
    W = W_bar * (rng.random((M, d)) < 0.6)
    B = X.T @ (X @ W_bar.T)
    yy = ((X @ W_bar.T) ** 2).sum(axis=0)
    energy = float(yy.sum())
    for b, y in ((None, None), (B, yy)):
        e64 = reconstruction_error(W, H, b, y, W_bar)
        e32 = reconstruction_error(W, H, b, y, W_bar, single=True)
        assert e64 > 1e-3 * energy and abs(e32 - e64) <= 1e-5 * energy


@pytest.mark.parametrize("d", [1, 7, 130])
def test_reversed_cholesky_gives_the_inverse_its_factor_and_solves(d: int) -> None:
    """``Damped``'s one factorisation of the reversed ``H_λ`` gives what the sweep used to get from
    three (factor, invert, factor the inverse): ``U`` upper with ``UᵀU = H_λ⁻¹`` equal to the Cholesky
    factor of the inverse, ``H_λ⁻¹`` itself, its diagonal, and solves against ``H_λ``."""
    rng = np.random.default_rng(d)
    X = rng.standard_normal((d + 3, d)) * np.geomspace(1.0, 1e-2, d)
    dh = damp_gram(X.T @ X, 0.01)
    ref_inv = np.linalg.inv(dh.H)
    scale = np.abs(ref_inv).max()
    np.testing.assert_allclose(dh.inverse(), ref_inv, rtol=0, atol=1e-10 * scale)
    assert dh.inverse().flags.c_contiguous and np.array_equal(dh.inverse(), dh.inverse().T)
    U = dh.inverse_factor()
    assert U.flags.f_contiguous and np.all(np.tril(U, -1) == 0) and np.all(np.diag(U) > 0)
    np.testing.assert_allclose(U, np.linalg.cholesky(ref_inv).T, rtol=0, atol=1e-10 * np.sqrt(scale))
    np.testing.assert_allclose(dh.inverse_diag(), np.diag(ref_inv), rtol=1e-10)
    b = rng.standard_normal((d, 3))
    np.testing.assert_allclose(
        dh.solve_rows(b.T).T, np.linalg.solve(dh.H, b), rtol=0, atol=1e-10 * np.abs(ref_inv @ b).max()
    )
    one = dh.solve_rows(b[:, 0][None])[0]
    np.testing.assert_allclose(one, np.linalg.solve(dh.H, b[:, 0]), rtol=0, atol=1e-10 * scale * 10)


def test_sweep_on_the_given_factor_equals_the_sweep_on_the_inverse() -> None:
    rng = np.random.default_rng(4)
    d, M = 70, 9
    X = rng.standard_normal((200, d))
    W = rng.standard_normal((M, d))
    dh = damp_gram(X.T @ X)
    for kw in ({"keep": 300}, {"mask": rng.random((M, d)) < 0.4}):
        a, ma = sparsegpt_sweep(W, inverse(dh), block=16, **kw)  # type: ignore[arg-type]
        b, mb = sparsegpt_sweep(W, None, block=16, U=dh.inverse_factor(), **kw)  # type: ignore[arg-type]
        np.testing.assert_array_equal(ma, mb)
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * np.abs(a).max())
    with pytest.raises(SolverError, match="factor U"):
        sparsegpt_sweep(W, None, keep=3)


def test_a_gram_that_is_not_positive_definite_is_damped_more_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    H = np.diag([1.0, -5.0, 1.0])  # damping 1% of the mean diagonal (−1) cannot make it definite at first
    with caplog.at_level(logging.WARNING):
        dh = damp_gram(H, 0.01, name="w9")
    assert dh.damp > 0.01 and "w9" in caplog.text
    assert np.all(np.linalg.eigvalsh(dh.H) > 0)
    np.testing.assert_allclose(dh.inverse() @ dh.H, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("g", [1, 3])
def test_the_budget_goes_to_the_groups_holding_the_largest_scores(g: int) -> None:
    """``split_budget``: per group, how many of the ``keep`` largest scores it holds (exactly ``keep``
    in all; one group holds them all without a search); ties in the scores do not change the total."""
    rng = np.random.default_rng(g)
    scores = rng.random((g, 7, 11)) ** (1 + np.arange(g))[:, None, None]
    scores[:, 0, :4] = 0.0  # dead inputs: tied scores
    n = scores.size
    for keep in (0, 1, 5, n // 3, n - 30, n - 1, n):
        counts = split_budget(scores, keep)
        assert counts.dtype == np.int64 and counts.shape == (g,)
        if keep >= n:
            assert np.all(counts == n // g)
            continue
        assert counts.sum() == keep
        thr = np.sort(scores.reshape(-1))[::-1][keep - 1] if keep else np.inf
        above = (scores > thr).reshape(g, -1).sum(axis=1)
        at = (scores >= thr).reshape(g, -1).sum(axis=1)
        assert np.all((above <= counts) & (counts <= at))


def test_the_reported_only_errors_can_be_skipped_without_changing_the_solution() -> None:
    """``diagnostics=False`` leaves the weights, the mask and the error of the result as they were
    bit for bit and reports the two diagnostic errors as NaN; on, they are the errors of the masked
    and the unpruned dense weights.  The pass computes them only when asked (or debug logging is on)."""
    rng = np.random.default_rng(11)
    M, d, N = 40, 24, 300
    X = rng.standard_normal((N, d))
    H = (X.T @ X)[None]
    W_bar = rng.standard_normal((1, M, d))
    on = prune_layer(W_bar, H, keep=M * d // 3)
    off = prune_layer(W_bar, H, keep=M * d // 3, diagnostics=False)
    np.testing.assert_array_equal(on.W, off.W)
    np.testing.assert_array_equal(on.mask, off.mask)
    assert on.error == off.error
    assert np.isnan(off.masked_error) and np.isnan(off.dense_error)
    masked = W_bar[0] * on.mask[0]
    want = float(np.sum(((masked - W_bar[0]) @ X.T) ** 2))
    assert on.masked_error == pytest.approx(want, rel=1e-9)
    assert on.dense_error == pytest.approx(0.0, abs=1e-9 * want)
    assert on.error < on.masked_error


@pytest.mark.parametrize("d", [1, 2, 9])
def test_solve_rows_leaves_its_rows_alone_and_a_one_input_layer_is_refitted(d: int) -> None:
    """``Damped.solve_rows`` returns ``R H_λ⁻¹`` without writing into ``R`` (with one input the
    reversed rows were a view of ``R``, and the targets' right-hand side was overwritten); a layer
    with one input keeps its budget and its kept weights are the exact ridge fit."""
    rng = np.random.default_rng(d)
    X = rng.standard_normal((50, d))
    dh = damp_gram(X.T @ X, 0.01)
    R = rng.standard_normal((6, d))
    R0 = R.copy()
    got = dh.solve_rows(R)
    np.testing.assert_array_equal(R, R0)
    np.testing.assert_allclose(got, np.linalg.solve(dh.H, R.T).T, rtol=1e-10)
    W = rng.standard_normal((1, 8, d))
    Y = X @ W[0].T + 0.1 * rng.standard_normal((50, 8))
    sol = prune_layer(W, (X.T @ X)[None], (X.T @ Y)[None], (Y**2).sum(axis=0)[None], keep=5)
    assert int(sol.mask.sum()) == 5
    lam = sol.damp * float(np.mean(np.diag(X.T @ X)))
    for i in range(8):
        S = np.flatnonzero(sol.mask[0, i])
        if S.size:
            A = (X.T @ X)[np.ix_(S, S)] + lam * np.eye(S.size)
            want = np.linalg.solve(A, (X.T @ Y)[S, i] + lam * W[0, i, S])
            np.testing.assert_allclose(sol.W[0, i, S], want, rtol=1e-8, atol=1e-10)
