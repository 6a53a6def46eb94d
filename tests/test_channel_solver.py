"""The group-sparse channel solver (pure NumPy): planted support, local optimality, exact re-fit."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from chita_onnx.errors import SolverError
from chita_onnx.solver.channels import ChannelProblem, elimination_path, objective_of, refit, select_channels


def _problem(A: np.ndarray, Y: np.ndarray, channel: np.ndarray, W0: np.ndarray | None = None) -> ChannelProblem:
    A1 = np.hstack([A, np.ones((A.shape[0], 1))])
    ch = np.concatenate([channel, [-1]])
    n = A.shape[0]
    if W0 is not None:
        W0 = np.vstack([W0, np.zeros((1, Y.shape[1]))])
    yy = float((Y * Y).sum()) / n
    return ChannelProblem(A1.T @ A1 / n, A1.T @ Y / n, yy, ch, 1.0 / yy, W0)


def _random(seed: int, C: int = 10, m: int = 1, n: int = 200, out: int = 3) -> ChannelProblem:
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, C * m)) @ rng.standard_normal((C * m, C * m))
    Y = A @ rng.standard_normal((C * m, out)) + rng.standard_normal((n, out))
    return _problem(A, Y, np.repeat(np.arange(C), m))


def test_planted_channels_are_recovered() -> None:
    rng = np.random.default_rng(0)
    C, m, n, out = 12, 4, 600, 5  # 4 columns per channel, like a 2x2 kernel
    A = rng.standard_normal((n, C * m)) + 0.5 * rng.standard_normal((n, 1))
    W = np.zeros((C * m, out))
    planted = [1, 4, 7, 10]
    for c in planted:
        W[c * m : (c + 1) * m] = rng.standard_normal((m, out))
    Y = A @ W + 0.01 * rng.standard_normal((n, out)) + 3.0
    sel = select_channels([_problem(A, Y, np.repeat(np.arange(C), m))], C, 4)
    assert sel.kept.tolist() == planted
    assert sel.objective < 1.01 * sel.start_objective  # the other channels cost (almost) nothing


@pytest.mark.parametrize("seed", range(4))
def test_result_is_a_local_optimum_and_close_to_brute_force(seed: int) -> None:
    p = _random(seed)
    k = 4
    sel = select_channels([p], 10, k)
    assert sel.objective == pytest.approx(objective_of([p], sel.kept), rel=1e-9)
    kept = set(sel.kept.tolist())
    for c_out in kept:  # no single swap improves the result
        for c_in in set(range(10)) - kept:
            swapped = np.array(sorted(kept - {c_out} | {c_in}))
            assert objective_of([p], swapped) >= sel.objective - 1e-9
    best = min(objective_of([p], np.array(s)) for s in itertools.combinations(range(10), k))
    assert sel.objective <= 1.15 * best


def test_selection_beats_magnitude_on_the_same_objective() -> None:
    wins = 0
    for seed in range(5):
        p = _random(seed, C=16, m=2)
        sel = select_channels([p], 16, 6)
        order = np.argsort(-np.abs(np.diag(p.H))[:-1].reshape(16, 2).sum(axis=1))
        wins += sel.objective <= objective_of([p], np.sort(order[:6]))
    assert wins == 5


def test_refit_is_the_ridge_least_squares_towards_the_trained_weights() -> None:
    rng = np.random.default_rng(3)
    n, C, out = 50, 8, 4
    A = rng.standard_normal((n, C))
    W0 = rng.standard_normal((C, out))
    Y = A @ W0 + 0.1 * rng.standard_normal((n, out))
    p = _problem(A, Y, np.arange(C), W0)
    kept = np.array([0, 2, 3, 6])
    sel = refit([p], kept)
    cols = sel.columns[0]
    assert cols.tolist() == [0, 2, 3, 6, C]  # kept channels and the intercept
    lam = 0.01 * float(np.mean(np.diag(p.H)))
    Hs = p.H[np.ix_(cols, cols)] + lam * np.eye(cols.size)
    W0_full = np.vstack([W0, np.zeros((1, out))])
    expected = np.linalg.solve(Hs, p.G[cols] + lam * W0_full[cols])
    np.testing.assert_allclose(sel.coefs[0], expected, rtol=1e-8, atol=1e-10)


def test_several_consumers_share_one_channel_choice() -> None:
    rng = np.random.default_rng(5)
    n, C = 300, 8
    A = rng.standard_normal((n, C))
    # consumer 1 needs channels 0-3, consumer 2 needs channel 0-1 and 6-7
    Y1 = A[:, :4] @ rng.standard_normal((4, 3))
    Y2 = A[:, [0, 1, 6, 7]] @ rng.standard_normal((4, 3))
    p1, p2 = _problem(A, Y1, np.arange(C)), _problem(A, Y2, np.arange(C))
    sel = select_channels([p1, p2], C, 6)
    assert sel.kept.tolist() == [0, 1, 2, 3, 6, 7]
    assert len(sel.coefs) == 2


def test_blocks_keep_equal_counts() -> None:
    p = _random(1, C=12)
    blocks = np.repeat(np.arange(3), 4)
    sel = select_channels([p], 12, 6, blocks=blocks)
    assert np.bincount(blocks[sel.kept], minlength=3).tolist() == [2, 2, 2]
    with pytest.raises(SolverError):
        select_channels([p], 12, 5, blocks=blocks)


def test_elimination_path_matches_exact_objectives_of_its_sets() -> None:
    p = _random(7, C=12, m=2)
    path = elimination_path([p], 12, [10, 8, 6, 4])
    assert sorted(path) == [4, 6, 8, 10, 12]
    assert path[12] <= path[10] <= path[8] <= path[6] <= path[4]  # no trust-region term here: monotone


def test_bad_budget_is_refused() -> None:
    p = _random(0)
    with pytest.raises(SolverError, match="k=0"):
        select_channels([p], 10, 0)


def test_unfitted_error_is_the_error_of_the_trained_weights_on_the_kept_columns() -> None:
    from chita_onnx.solver.channels import unfitted_error

    rng = np.random.default_rng(11)
    n, C, out = 80, 6, 3
    A = rng.standard_normal((n, C))
    W0 = rng.standard_normal((C, out))
    Y = A @ W0 + 0.1 * rng.standard_normal((n, out))
    p = _problem(A, Y, np.arange(C), W0)
    kept = np.array([1, 2, 5])
    residual = Y - A[:, kept] @ W0[kept]
    expected = p.weight * float((residual**2).sum()) / n
    assert unfitted_error([p], kept) == pytest.approx(expected, rel=1e-9)
    assert unfitted_error([p], np.arange(C)) < unfitted_error([p], kept)
