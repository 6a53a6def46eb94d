"""N:M patterns in the solvers: exact projection, group bookkeeping, every solver honours the pattern."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from chita_onnx.errors import SolverError
from chita_onnx.solver import cbs as cbs_solver
from chita_onnx.solver import chita_iht, hard_threshold, magnitude, objective
from chita_onnx.solver import woodfisher as wf_solver
from chita_onnx.solver.nm import (
    NMPattern,
    NMStructure,
    count_violations,
    group_indices,
    nm_mask,
    nm_project,
    permuted_columns,
    solve_nm,
)


def assert_top_n_per_group(v: np.ndarray, keep: np.ndarray, groups: np.ndarray, n: int) -> None:
    """Property: every group keeps exactly n entries, and no dropped |v| exceeds a kept one."""
    a = np.abs(v)
    for g in groups:
        kept, dropped = g[keep[g]], g[~keep[g]]
        assert kept.size == n
        if dropped.size:
            assert a[kept].min() >= a[dropped].max()


# ----------------------------------------------------------------------------------- projection


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8), (3, 4)])
@pytest.mark.parametrize("seed", range(4))
def test_nm_mask_keeps_the_n_largest_of_every_group(n: int, m: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (3, 2 * m, 2, 3)
    for axis in (1, -3):
        s = rng.standard_normal(shape)
        if seed == 3:
            s = np.round(s, 0)  # many ties
        keep = nm_mask(s, n, m, axis)
        assert keep.shape == shape and keep.dtype == bool
        # checked by explicit loops over every (position, group)
        for i, k, q in itertools.product(range(3), range(2), range(3)):
            for start in range(0, 2 * m, m):
                vals, kk = s[i, start : start + m, k, q], keep[i, start : start + m, k, q]
                assert kk.sum() == n
                if (~kk).any():
                    assert vals[kk].min() >= vals[~kk].max()


def test_nm_mask_on_a_matmul_weight_and_errors() -> None:
    W = np.arange(16, dtype=float).reshape(8, 2)  # [K, N], groups along K (axis 0)
    keep = nm_mask(np.abs(W), 2, 4, axis=0)
    assert keep[:, 0].tolist() == [False, False, True, True] * 2
    with pytest.raises(SolverError, match="not a multiple of 4"):
        nm_mask(np.ones((6, 2)), 2, 4, axis=0)
    with pytest.raises(SolverError, match="0 < N < M"):
        nm_mask(np.ones((8, 2)), 4, 4, axis=0)


@pytest.mark.parametrize("seed", range(5))
def test_projection_of_flat_vector_and_of_the_permuted_budget_agree(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pat = NMPattern(2, 4)
    g1 = group_indices((4, 8, 3, 3), 1, 4)  # conv
    g2 = group_indices((12, 6), 0, 4, offset=288)  # MatMul B [K, N]
    g3 = group_indices((5, 16), 1, 4, offset=288 + 72 + 20)  # Gemm transB=1 after a dense tensor of 20
    groups = np.concatenate([g1, g2, g3])
    p = 288 + 72 + 20 + 80
    v = rng.standard_normal(p)
    supp = nm_project(v, groups, 2)
    keep = np.zeros(p, dtype=bool)
    keep[supp] = True
    assert_top_n_per_group(v, keep, groups, 2)
    assert keep[360:380].all()  # the dense tensor
    st = NMStructure.build(p, groups, pat, (0, 288, 360, 380, p))
    supp_perm = hard_threshold(st.permute(v), st.budget())
    assert np.array_equal(np.sort(st.perm[supp_perm]), supp)
    assert count_violations(np.where(keep, v, 0.0), groups, 2) == 0
    assert count_violations(v, groups, 2) == groups.shape[0]


def test_group_indices_follow_the_axis() -> None:
    g = group_indices((2, 8, 3), 1, 4, offset=10)
    assert g.shape == (12, 4)
    idx = np.arange(48).reshape(2, 8, 3) + 10
    assert g[0].tolist() == idx[0, 0:4, 0].tolist()
    assert sorted(g.reshape(-1).tolist()) == list(range(10, 58))
    with pytest.raises(SolverError, match="not a multiple"):
        group_indices((2, 6, 3), 1, 4)


def test_structure_budgets_tighten_to_the_pattern() -> None:
    pat = NMPattern(2, 4)
    groups = group_indices((6, 8), 1, 4)
    st = NMStructure.build(48 + 10, groups, pat, (0, 48, 58))
    assert sorted(st.perm.tolist()) == list(range(58))
    assert st.groups == 12 and st.dense == 10
    for s, cap in [(0.0, 4), (0.2, 4), (0.25, 3), (0.4, 3), (0.5, 2)]:
        b = st.budget(s)
        assert st.cap(s) == cap
        assert b.k == (24 if s == 0.5 else round((1 - s) * 48)) + 10
        assert all(lo == 2 and hi == cap for lo, hi, g in zip(b.lower, b.upper, st.is_group, strict=True) if g)
    with pytest.raises(SolverError, match="stage sparsity"):
        st.budget(0.6)
    with pytest.raises(SolverError, match="overlap"):
        NMStructure.build(48, np.concatenate([groups[:2], groups[:1]]), pat)
    with pytest.raises(SolverError, match="straddles"):
        NMStructure.build(48, groups, pat, (0, 2, 48))


def test_permuted_columns_restores_x_exactly_even_on_error() -> None:
    rng = np.random.default_rng(0)
    X = rng.standard_normal((7, 30)).astype(np.float32)
    X0 = X.copy()
    perm = rng.permutation(30)
    with permuted_columns(X, perm) as Xp:
        assert Xp is X and np.array_equal(Xp, X0[:, perm])
    assert np.array_equal(X, X0)
    with pytest.raises(RuntimeError), permuted_columns(X, perm):
        raise RuntimeError("boom")
    assert np.array_equal(X, X0)
    X.flags.writeable = False
    with permuted_columns(X, perm) as Xp:
        assert Xp is not X and np.array_equal(Xp, X0[:, perm])


# ----------------------------------------------------------------------------------------- solvers


def problem(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray, NMStructure]:
    rng = np.random.default_rng(seed)
    groups = np.concatenate([group_indices((6, 8, 2, 2), 1, 4), group_indices((16, 5), 0, 4, offset=192)])
    p = 192 + 80 + 12  # + a dense tensor of 12
    U = rng.standard_normal((n, 6))
    X = ((U @ rng.standard_normal((6, p)) + 0.5 * rng.standard_normal((n, p))) / np.sqrt(n)).astype(np.float32)
    wb = rng.laplace(size=p).astype(np.float32)
    return X, wb, groups, NMStructure.build(p, groups, NMPattern(2, 4), (0, 192, 272, p))


SOLVERS = {
    "magnitude": lambda X, w, b, a, blocks: magnitude(w, b),
    "magnitude+obs": lambda X, w, b, a, blocks: magnitude(w, b, X=X, ridge=1e-3, update="obs"),
    "wf": lambda X, w, b, a, blocks: wf_solver(X, w, b, 1e-3, blocks=blocks),
    "cbs": lambda X, w, b, a, blocks: cbs_solver(X, w, b, 1e-3),
    "chita-swap": lambda X, w, b, a, blocks: chita_iht(X, w, b, 1e-3, a, method="swap"),
    "chita-iht": lambda X, w, b, a, blocks: chita_iht(X, w, b, 1e-3, a, method="iht"),
}


@pytest.mark.parametrize("name", list(SOLVERS))
@pytest.mark.parametrize("stage", [None, 0.3])
def test_every_solver_honours_the_pattern(name: str, stage: float | None) -> None:
    X, wb, groups, st = problem(1)
    alpha = np.random.default_rng(2).standard_normal(wb.shape[0]) * 1e-3 if name.startswith("chita") else None
    X0 = X.copy()
    res = solve_nm(SOLVERS[name], X if name != "magnitude" else None, wb, st, alpha, stage)
    assert np.array_equal(X, X0)  # restored
    counts = np.count_nonzero(res.w[groups], axis=1)
    cap = st.cap(0.5 if stage is None else stage)
    assert counts.max() <= cap
    kept = np.zeros(wb.shape[0], dtype=bool)
    kept[res.support] = True
    assert kept[272:].all()  # the dense tensor keeps every weight
    assert res.support.shape[0] == st.budget(stage).k
    if stage is None:
        assert (kept[groups].sum(axis=1) == 2).all()
    else:
        assert (kept[groups].sum(axis=1) >= 2).all()
    if res.method != "magnitude":
        assert res.objective == pytest.approx(objective(X, res.w, wb, 1e-3, alpha), rel=1e-5, abs=1e-9)


def planted(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, NMStructure, np.ndarray]:
    """w̄ = w* + v: w* is 2:4-sparse, v lies in the null space of X and is large off the support of w*.

    Xw̄ = Xw*, so the 2:4 support of w* fits the data (nearly) exactly, while magnitude keeps the
    wrong weights in many groups (it finds about 60% of the planted support)."""
    rng = np.random.default_rng(seed)
    K, N = 16, 4  # MatMul B [K, N]: groups along axis 0
    p = K * N
    groups = group_indices((K, N), 0, 4)
    n = 40
    X = rng.standard_normal((n, p)) / np.sqrt(n)
    w_star = np.zeros(p)
    for g in groups:
        on = rng.choice(g, 2, replace=False)
        w_star[on] = rng.choice([-1, 1], 2) * rng.uniform(0.5, 1.0, 2)
    u = np.where(w_star == 0, rng.choice([-1, 1], p) * 1.5, 0.0)
    null = np.eye(p) - np.linalg.pinv(X) @ X
    wb = w_star + null @ u
    st = NMStructure.build(p, groups, NMPattern(2, 4))
    return X.astype(np.float64), wb, groups, st, w_star


@pytest.mark.parametrize("seed", range(3))
def test_planted_problem_chita_with_pattern_beats_magnitude_2_4(seed: int) -> None:
    X, wb, groups, st, _ = planted(seed)
    lam = 1e-6
    mag = solve_nm(lambda X_, w, b, a, bl: magnitude(w, b, X=X_, ridge=lam), X, wb, st)
    obs = solve_nm(lambda X_, w, b, a, bl: magnitude(w, b, X=X_, ridge=lam, update="obs"), X, wb, st)
    swap = solve_nm(lambda X_, w, b, a, bl: chita_iht(X_, w, b, lam, method="swap"), X, wb, st)
    iht = solve_nm(lambda X_, w, b, a, bl: chita_iht(X_, w, b, lam, method="iht"), X, wb, st)
    for res in (swap, iht):
        assert count_violations(res.w, groups, 2) == 0
        assert res.objective < obs.objective < mag.objective
    # measured 20-100x lower than magnitude 2:4 + backsolve on these seeds; assert a clear margin
    assert swap.objective < 0.2 * obs.objective
