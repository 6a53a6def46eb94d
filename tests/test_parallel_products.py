"""Large solver products split by rows over two threads (:mod:`chita_onnx.solver.parallel`): the
same values whether the halves ran on two threads or in turn on one (the split depends on the
shapes alone), those of one ``np.matmul`` up to rounding, only on the thread that asked for it,
errors raised in the caller, and the layer solvers and the whole layer-wise pass unchanged up to
rounding."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable

import numpy as np
import pytest
import scipy.linalg as sla
from test_dense_ahead import CASES

import chita_onnx.sequential as sq
from chita_onnx.activations import AheadRunner, SegmentRunner
from chita_onnx.blas import blas_threads, limit_blas_threads
from chita_onnx.sequential import LayerwiseOptions, layerwise_prune
from chita_onnx.solver import batched_spd as bs
from chita_onnx.solver import layerwise as lw
from chita_onnx.solver import parallel
from chita_onnx.solver import rowspace as rs
from chita_onnx.solver.layerwise import prune_layer
from chita_onnx.solver.rowspace import prune_layer_rows

SHAPES = [(513, 200, 170), (64, 600, 500), (2000, 96, 96)]  # each above MIN_MACS


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_split_products_do_not_depend_on_the_second_core(shape: tuple[int, int, int], dtype: type) -> None:
    """A large product is split by its shape alone: the halves on two threads, or both on this one while
    the second core is taken, give the same values bit for bit; they equal one ``np.matmul`` up to
    rounding (bit for bit with OpenBLAS's Zen kernels, not with its Haswell ones)."""
    M, K, N = shape
    rng = np.random.default_rng(M + K)
    A, B = rng.standard_normal((M, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
    want = np.matmul(A, B)
    before, inline = parallel.splits(), parallel.inline()
    with limit_blas_threads(1), parallel.helping():
        assert parallel.active()
        got = parallel.matmul(A, B)
        out = np.full((M, N), np.nan, dtype=dtype)
        same = parallel.matmul(A, B, out=out)
    assert same is out and parallel.splits() == before + 2 and parallel.inline() == inline
    with limit_blas_threads(1), parallel.helping(idle=lambda: False):
        busy = parallel.matmul(A, B)
    assert parallel.splits() == before + 2 and parallel.inline() == inline + 1
    np.testing.assert_array_equal(out, got)
    np.testing.assert_array_equal(busy, got)
    tol = 1e-5 if dtype is np.float32 else 1e-13
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))
    assert not parallel.active()


def test_outside_the_block_small_products_and_other_threads_are_not_split() -> None:
    rng = np.random.default_rng(1)
    A, B = rng.standard_normal((800, 200)), rng.standard_normal((200, 200))
    small = rng.standard_normal((8, 8))
    before = parallel.splits()
    parallel.matmul(A, B)  # no block
    with parallel.helping():
        parallel.matmul(small, small)  # under MIN_MACS
        seen: list[bool] = []

        def other() -> None:
            seen.append(parallel.active())
            np.testing.assert_array_equal(parallel.matmul(A, B), A @ B)

        t = threading.Thread(target=other)
        t.start()
        t.join()
        assert seen == [False]
    with parallel.helping(False):
        assert not parallel.active()
        parallel.matmul(A, B)
    assert parallel.splits() == before


def test_blocks_nest_and_the_helper_thread_ends_with_the_outer_block() -> None:
    names = lambda: {t.name for t in threading.enumerate() if t.name.startswith("chita-solver")}  # noqa: E731
    rng = np.random.default_rng(2)
    A, B = rng.standard_normal((500, 200)), rng.standard_normal((200, 200))
    with parallel.helping():
        parallel.matmul(A, B)
        with parallel.helping():
            assert parallel.active()
            parallel.matmul(A, B)
        assert parallel.active()  # the inner block left the outer helper alone
        parallel.matmul(A, B)
        assert names()
    assert not parallel.active() and not names()


def test_a_failing_half_raises_in_the_caller_and_leaves_no_helper() -> None:
    rng = np.random.default_rng(3)
    A, B = rng.standard_normal((500, 200)), rng.standard_normal((200, 200))
    bad = np.empty((500, 199))  # the wrong shape for out: both halves fail
    with pytest.raises(ValueError, match="mismatch in its core dimension"), parallel.helping():
        parallel.matmul(A, B, out=bad)
    assert not parallel.active()
    assert not [t for t in threading.enumerate() if t.name.startswith("chita-solver")]


def _layer(rng: np.random.Generator, M: int = 256, d: int = 256, n: int = 600) -> tuple[np.ndarray, ...]:
    X = rng.standard_normal((n, d)) * rng.uniform(0.2, 2.0, d)
    W = rng.standard_normal((1, M, d))
    Y = X @ W[0].T + 0.1 * rng.standard_normal((n, M))  # targets off the dense inputs: B and yy
    H = (X.T @ X)[None]
    B = (X.T @ Y)[None]
    yy = np.sum(Y * Y, axis=0)[None]
    return W, H, B, yy


@pytest.mark.parametrize("how", ["cholesky", "cg"])
def test_prune_layer_gives_the_same_weights_with_split_products(how: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A layer whose products (targets, CG's ``V·H``, the errors) are above MIN_MACS, split into row
    halves: the same mask, and the weights and errors of one thread up to rounding."""
    if how == "cg":
        monkeypatch.setattr(lw, "EXACT_FLOPS", 0.0)
    W, H, B, yy = _layer(np.random.default_rng(5))
    assert W.shape[1] * W.shape[2] ** 2 >= parallel.MIN_MACS
    want = prune_layer(W, H, B, yy, keep=W.size // 3, name="dense")
    before = parallel.splits()
    with limit_blas_threads(1), parallel.helping():
        got = prune_layer(W, H, B, yy, keep=W.size // 3, name="dense")
    assert parallel.splits() > before
    with limit_blas_threads(1), parallel.helping(idle=lambda: False):  # the halves in turn, on one thread
        busy = prune_layer(W, H, B, yy, keep=W.size // 3, name="dense")
    np.testing.assert_array_equal(busy.W, got.W)
    assert busy.error == got.error
    assert str(got.info["refit"]).startswith(how)
    np.testing.assert_array_equal(got.mask, want.mask)
    # CG (float32 products) carries the halves' rounding on through its iterations
    tol = 1e-5 if how == "cg" else 1e-9
    np.testing.assert_allclose(got.W, want.W, rtol=tol, atol=tol * float(np.abs(want.W).max()))
    for a, b in ((got.error, want.error), (got.masked_error, want.masked_error), (got.dense_error, want.dense_error)):
        assert a == pytest.approx(b, rel=tol)


@pytest.mark.parametrize("how", ["rowspace", "cg"])
def test_the_row_space_solver_gives_the_same_weights_with_split_products(
    how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wide layer solved from its rows (the sweep's block rows, CG's products with the rows): the
    same mask and weights up to rounding."""
    if how == "cg":
        monkeypatch.setattr(rs, "EXACT_FLOPS", 0.0)
    rng = np.random.default_rng(6)
    A = rng.standard_normal((300, 800)) * rng.uniform(0.2, 2.0, 800)
    W = rng.standard_normal((300, 800))
    Y = A @ W.T + 0.1 * rng.standard_normal((300, 300))
    want = prune_layer_rows(W, A, Y, keep=W.size // 3, name="wide")
    before = parallel.splits()
    with limit_blas_threads(1), parallel.helping():
        got = prune_layer_rows(W, A, Y, keep=W.size // 3, name="wide")
    assert parallel.splits() > before
    assert str(got.info["refit"]).startswith(how)
    np.testing.assert_array_equal(got.mask, want.mask)
    # CG (float32 products, as on the Gram route) carries the halves' rounding on through its iterations
    tol = 1e-5 if how == "cg" else 1e-9
    np.testing.assert_allclose(got.W, want.W, rtol=tol, atol=tol * float(np.abs(want.W).max()))


@pytest.mark.parametrize("case", ["cnn", "LSTM node", "softmax tail"])
def test_the_pass_gives_the_same_weights_with_the_helper(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole pass with the helper, every product split (also the small ones, which OpenBLAS may
    round differently), against one thread: the same weights up to rounding."""
    monkeypatch.setattr(parallel, "MIN_MACS", 0.0)
    monkeypatch.setattr(parallel, "MIN_ROWS", 1)
    model, batches, keep, tail = CASES[case]
    with limit_blas_threads(1):
        want = layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(helper=False), tail=tail)
        before = parallel.splits()
        got = layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(helper=True), tail=tail)
        assert parallel.splits() > before
        real = sq.helping  # the second core taken throughout: every split runs in turn on one thread
        monkeypatch.setattr(sq, "helping", lambda enabled=True, idle=None: real(enabled, lambda: False))
        inline = parallel.inline()
        busy = layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(helper=True), tail=tail)
        assert parallel.inline() > inline
    for name in keep:
        np.testing.assert_array_equal(busy.weights[name], got.weights[name])
        np.testing.assert_array_equal(got.weights[name] != 0, want.weights[name] != 0)
        w = want.weights[name]
        np.testing.assert_allclose(got.weights[name], w, rtol=1e-3, atol=1e-3 * float(np.abs(w).max()))


def test_the_pass_leaves_splitting_to_blas_when_blas_has_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(parallel, "MIN_MACS", 0.0)
    entered: list[bool] = []
    real = sq.helping

    def spy(enabled: bool = True, idle=None):  # type: ignore[no-untyped-def]
        entered.append(enabled)
        return real(enabled, idle)

    monkeypatch.setattr(sq, "helping", spy)
    monkeypatch.setattr(sq, "blas_threads", lambda: 2)
    model, batches, keep, tail = CASES["cnn"]
    before = parallel.splits()
    layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(helper=True), tail=tail)
    assert entered == [False] and parallel.splits() == before
    monkeypatch.setattr(sq, "blas_threads", blas_threads)
    with limit_blas_threads(1):
        layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(helper=True), tail=tail)
    assert entered == [False, True]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_gil_free_lapack_calls_equal_scipys_wrappers(dtype: type, monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact re-fit's per-row ``posv``/``symv`` through ctypes: the same solutions, pivots and
    residuals as SciPy's wrappers, bit for bit, also for a system that is not positive definite."""
    assert bs._native(dtype is np.float32) is not None
    rng = np.random.default_rng(7)
    d, m, r = 60, 25, 9
    X = rng.standard_normal((200, d))
    A = (X.T @ X / 200 + 0.01 * np.eye(d)).astype(dtype)
    A[5, 5] = -1.0  # every row that picks index 5 fails its factorisation
    idx = np.sort(np.argsort(rng.random((r, d)), axis=1)[:, :m], axis=1).astype(np.intp)
    b = rng.standard_normal((r, m)).astype(dtype)
    got = bs._gather_solve(A, idx, b, residual=True)
    monkeypatch.setattr(bs, "_native", lambda single: None)
    want = bs._gather_solve(A, idx, b, residual=True)
    fails = np.any(idx == 5, axis=1)
    assert fails.any() and not fails.all()
    np.testing.assert_array_equal(got[1], ~fails)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0][~fails], want[0][~fails])
    np.testing.assert_array_equal(got[2][~fails], want[2][~fails])  # type: ignore[index]


@pytest.mark.parametrize("sizes", ["two", "spread"])
def test_the_exact_refit_deals_its_systems_to_both_threads_with_the_same_values(sizes: str) -> None:
    """The exact re-fit's systems go to the two threads in pieces balanced by cost: rows of two sizes
    (each size halved), or of a size each (a layer's usual spread, where halving size by size would
    leave one thread idle).  Each system is solved alone, so the values equal one thread's bit for bit."""
    rng = np.random.default_rng(8)
    d, M = 300, 40
    X = rng.standard_normal((900, d))
    A = X.T @ X / 900 + 0.01 * np.eye(d)
    sel = np.zeros((M, d), dtype=bool)
    for i in range(M):
        k = 180 + 10 * (i % 2) if sizes == "two" else 120 + 3 * i
        sel[i, rng.choice(d, k, replace=False)] = True
    R = rng.standard_normal((M, d))
    kw = {"single_min": 128, "tol": 1e-3, "fallback": lambda i, v: np.zeros(i.size)}
    want = bs.solve_subsystems(A, sel, R, **kw)  # type: ignore[arg-type]
    before = parallel.shared()
    with parallel.helping():
        got = bs.solve_subsystems(A, sel, R, **kw)  # type: ignore[arg-type]
    assert parallel.shared() > before
    np.testing.assert_array_equal(got, want)
    with parallel.helping(idle=lambda: False):  # the second core taken: in turn on this thread
        np.testing.assert_array_equal(bs.solve_subsystems(A, sel, R, **kw), want)  # type: ignore[arg-type]


@pytest.mark.parametrize("warm", [False, True])
def test_cg_iterates_its_row_halves_on_two_threads_with_the_same_values(warm: bool) -> None:
    """Each row of the batched CG is its own system, so a float32 iteration splits its rows between
    the threads (products and vector updates alike) and ends at the iterates of the same halves run
    in turn on one thread bit for bit, the early stop included (here the rows converge at different
    iterations); those of one unsplit product up to rounding."""
    rng = np.random.default_rng(11)
    d, M = 256, 500
    X = rng.standard_normal((600, d)) * rng.uniform(0.3, 3.0, d)
    H = X.T @ X / 600 + 0.05 * np.eye(d)
    mask = rng.random((M, d)) < 0.5
    rhs = rng.standard_normal((M, d)) * rng.uniform(0.01, 10.0, (M, 1))
    W0 = rng.standard_normal((M, d)) * mask if warm else None
    assert d >= lw.SINGLE_MIN and M * d * d >= parallel.MIN_MACS
    for iters in (3, 300):
        one = lw._cg_refit(H, rhs, mask, W0, tol=1e-4, iters=iters)
        with limit_blas_threads(1), parallel.helping(idle=lambda: False):  # the halves in turn, one thread
            want = lw._cg_refit(H, rhs, mask, W0, tol=1e-4, iters=iters)
        before = parallel.splits()
        with limit_blas_threads(1), parallel.helping():
            got = lw._cg_refit(H, rhs, mask, W0, tol=1e-4, iters=iters)
        ran = parallel.splits() - before - 2  # one split per iteration, besides the first and last products
        assert (ran == 3) if iters == 3 else (3 < ran < 300), ran  # and it stops once every row has converged
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, one, rtol=1e-3, atol=1e-3 * float(np.abs(one).max()))
    # the systems are solved: on the support, H_S w_S = rhs_S to the tolerance
    r = (rhs - got @ H) * mask
    assert np.all(np.linalg.norm(r, axis=1) <= 2e-4 * np.linalg.norm(rhs * mask, axis=1))


def test_the_row_space_cg_iterates_its_row_halves_on_two_threads_with_the_same_values() -> None:
    """The row-space route's CG (products ``V ↦ V(λI + AᵀA)`` from the rows) splits its rows between
    the threads as the Gram route's does, each half's products by :meth:`RowGram.times32` without a
    split of its own: the iterates of the halves run in turn bit for bit, those of the unsplit
    vector updates up to rounding."""
    rng = np.random.default_rng(12)
    N, d, M = 200, 400, 300
    rg = rs.RowGram.of(rng.standard_normal((N, d)) * rng.uniform(0.3, 3.0, d), 0.01)
    mask = rng.random((M, d)) < 0.4
    rhs = rng.standard_normal((M, d)) * rng.uniform(0.01, 10.0, (M, 1))
    diag = np.einsum("nj,nj->j", rg.A, rg.A) + rg.lam
    split = {"times_rows": functools.partial(rg.times32, split=False), "times_cost": 2.0 * M * N * d}
    assert d >= lw.SINGLE_MIN and split["times_cost"] >= parallel.MIN_MACS  # type: ignore[operator]
    for iters in (3, 300):
        one = lw._cg_refit(None, rhs, mask, None, tol=1e-4, iters=iters, times=rg.times32, diag=diag)
        with limit_blas_threads(1), parallel.helping(idle=lambda: False):  # the halves in turn, one thread
            want = lw._cg_refit(None, rhs, mask, None, tol=1e-4, iters=iters, times=rg.times32, diag=diag, **split)  # type: ignore[arg-type]
        before = parallel.splits()
        with limit_blas_threads(1), parallel.helping():
            got = lw._cg_refit(None, rhs, mask, None, tol=1e-4, iters=iters, times=rg.times32, diag=diag, **split)  # type: ignore[arg-type]
        ran = parallel.splits() - before - 4  # the first and last products: two split products each
        assert (ran == 3) if iters == 3 else (3 < ran < 300), ran
        np.testing.assert_array_equal(got, want)
        np.testing.assert_allclose(got, one, rtol=1e-3, atol=1e-3 * float(np.abs(one).max()))
    r = (rhs - rg.times(got)) * mask  # solved on the support to the tolerance
    assert np.all(np.linalg.norm(r, axis=1) <= 2e-4 * np.linalg.norm(rhs * mask, axis=1))


@pytest.mark.parametrize(("d", "M"), [(300, 1001), (257, 301), (129, 3000)])
def test_the_targets_solve_their_rows_in_two_halves_as_cho_solve_does(d: int, M: int) -> None:
    """``W* = R H_λ⁻¹`` (the layer's unconstrained optimum) by ``potrs`` on the rows: the values of
    SciPy's ``cho_solve`` bit for bit, on one thread and with the halves on two; a C-ordered result."""
    rng = np.random.default_rng(d)
    X = rng.standard_normal((d + 40, d)) * rng.uniform(0.1, 3.0, d)
    dh = lw.damp_gram(X.T @ X / d, 0.01)
    R = rng.standard_normal((M, d))
    R0 = R.copy()
    # SciPy's cho_solve on the factor's reversed coordinates (Damped factors H_λ reversed)
    want = np.ascontiguousarray(sla.cho_solve((dh.factor, True), R.T[::-1], check_finite=False)[::-1].T)
    one = dh.solve_rows(R)
    before = parallel.splits()
    with limit_blas_threads(1), parallel.helping():
        two = dh.solve_rows(R)
    assert parallel.splits() == before + 1
    for got in (one, two):
        assert got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(R, R0)  # the rows are not overwritten
    np.testing.assert_allclose(two @ dh.H, R, rtol=1e-8, atol=1e-8 * float(np.abs(R).max()))
    # a C-ordered factor (not LAPACK's layout) takes SciPy's route, with the same values
    B = np.ascontiguousarray(R[:, ::-1])
    bs.cho_solve_rows(np.ascontiguousarray(dh.factor), B)
    np.testing.assert_array_equal(np.ascontiguousarray(B[:, ::-1]), want)


def test_halves_split_at_a_multiple_of_align() -> None:
    seen: list[tuple[int, int]] = []

    def fn(a: int, z: int) -> None:
        seen.append((a, z))

    with parallel.helping():
        parallel.halves(fn, 200, 1e9, align=64)
        parallel.halves(fn, 100, 1e9, align=64)  # half of it is under one aligned block: no split
        parallel.halves(fn, 9, 1e9)
    assert sorted(seen) == [(0, 4), (0, 64), (0, 100), (4, 9), (64, 200)]


@pytest.mark.parametrize("M", [4100, 2051])
def test_the_sweep_runs_its_column_blocks_in_row_halves_with_the_same_values(M: int) -> None:
    """The OBS sweep's column loop (a GEMV per column) on two threads, its rows split at a multiple of
    ROW_ALIGN: the same mask and weights bit for bit as the halves run in turn, with a budget and
    with a given mask; the mask of one thread, and its weights up to rounding."""
    rng = np.random.default_rng(M)
    d = 200
    X = rng.standard_normal((300, d)) * rng.uniform(0.2, 2.0, d)
    dh = lw.damp_gram(X.T @ X / 300, 0.01)
    W = rng.standard_normal((M, d))
    U = dh.inverse_factor()
    mask = rng.random((M, d)) < 0.4
    for kw in ({"keep": W.size // 3}, {"mask": mask}):
        one = lw.sparsegpt_sweep(W, None, U=U, block=128, **kw)  # type: ignore[arg-type]
        with limit_blas_threads(1), parallel.helping(idle=lambda: False):
            want = lw.sparsegpt_sweep(W, None, U=U, block=128, **kw)  # type: ignore[arg-type]
        before = parallel.splits()
        with limit_blas_threads(1), parallel.helping():
            got = lw.sparsegpt_sweep(W, None, U=U, block=128, **kw)  # type: ignore[arg-type]
        assert parallel.splits() >= before + 2  # both column blocks
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], one[1])
        np.testing.assert_allclose(got[0], one[0], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_posv_equals_scipys_wrapper_and_reports_an_indefinite_system(dtype: type) -> None:
    rng = np.random.default_rng(9)
    X = rng.standard_normal((80, 30))
    G = (X.T @ X + 0.1 * np.eye(30)).astype(dtype)
    b = rng.standard_normal(30).astype(dtype)
    G0, b0 = G.copy(), b.copy()
    x, info = bs.posv(G, b)
    f = sla.lapack.sposv if dtype is np.float32 else sla.lapack.dposv
    _, want, want_info = f(G, b, lower=1)
    assert info == want_info == 0
    np.testing.assert_array_equal(x, want)
    np.testing.assert_array_equal(G, G0)  # the inputs are left alone
    np.testing.assert_array_equal(b, b0)
    G[3, 3] = -1.0
    assert bs.posv(G, b)[1] > 0


def test_no_split_while_the_second_core_is_taken() -> None:
    """``idle`` says whether the dense runner's worker has the second core: no hand-off while it does."""
    rng = np.random.default_rng(10)
    A, B = rng.standard_normal((500, 200)), rng.standard_normal((200, 200))
    free = [False]
    before, inline = parallel.splits(), parallel.inline()
    with parallel.helping(idle=lambda: free[0]):
        busy = parallel.matmul(A, B)  # both halves on this thread
        assert parallel.splits() == before and parallel.inline() == inline + 1
        free[0] = True
        np.testing.assert_array_equal(parallel.matmul(A, B), busy)
        assert parallel.splits() == before + 1 and parallel.inline() == inline + 1


def test_the_dense_runner_is_idle_once_its_queue_has_run(monkeypatch: pytest.MonkeyPatch) -> None:
    model, batches, _, _ = CASES["cnn"]
    runner = SegmentRunner(model, batches)
    gate = threading.Event()
    real = runner.advance

    def held(stop: int, extra: Iterable[str] = ()) -> None:
        gate.wait(10)
        real(stop, extra)

    monkeypatch.setattr(runner, "advance", held)
    ahead = AheadRunner(runner)
    assert ahead.idle()  # nothing queued
    ahead.submit(2)
    assert not ahead.idle()  # the worker holds its segment
    gate.set()
    ahead.advance(2)
    assert ahead.idle()
    ahead.close()


# ------------------------------------------------------------------------------ whole jobs at once


def _heavy(seed: int, n: int = 300) -> np.ndarray:
    """A job that spends its time in one LAPACK call (the GIL released): a Cholesky factor."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((n, n))
    return np.asarray(sla.cholesky(A @ A.T + n * np.eye(n), lower=True))


def test_tasks_run_on_both_threads_in_order_with_nothing_split_inside() -> None:
    """Inside helping: the jobs run on the two threads (largest first, balanced by cost), results in
    job order and equal to running them alone, and no product inside a job is split meanwhile."""
    threads: dict[int, int] = {}
    A = np.random.default_rng(0).standard_normal((800, 400))

    def job(i: int) -> tuple[np.ndarray, int]:
        threads[i] = threading.get_ident()
        before = parallel.splits()
        p = parallel.matmul(A, A.T)  # above MIN_MACS: split were the helper free
        assert parallel.splits() == before and not parallel.active()
        return _heavy(i), int(p.shape[0])

    jobs = [lambda i=i: job(i) for i in range(5)]
    costs = [4e7, 1e7, 1e7, 1e7, 1e7]
    want = [(_heavy(i), 800) for i in range(5)]
    shared = parallel.shared()
    with limit_blas_threads(1), parallel.helping():
        got = parallel.tasks(jobs, costs)
        assert parallel.active()  # the helper is free again
    assert parallel.shared() == shared + 1
    for (a, n), (b, m) in zip(got, want, strict=True):
        np.testing.assert_array_equal(a, b)
        assert n == m
    main = threading.get_ident()
    assert threads[0] != main or all(threads[i] != main for i in range(1, 5))  # the largest alone on one side
    assert len(set(threads.values())) == 2
    # the heaviest job (4e7) goes to one list, the four light ones (4e7 together) to the other
    assert all(threads[i] == threads[1] for i in range(1, 5)) and threads[0] != threads[1]


def test_tasks_run_in_line_outside_helping_below_min_macs_or_with_one_job() -> None:
    main = threading.get_ident()
    seen: list[int] = []

    def job() -> int:
        seen.append(threading.get_ident())
        return len(seen)

    shared = parallel.shared()
    assert parallel.tasks([job, job], [1e9, 1e9]) == [1, 2]  # no helper
    with parallel.helping():
        assert parallel.tasks([job, job], [1.0, 1.0]) == [3, 4]  # too small to hand off
        assert parallel.tasks([job], [1e9]) == [5]
    with parallel.helping(idle=lambda: False):
        assert parallel.tasks([job, job], [1e9, 1e9]) == [6, 7]  # the second core is taken
        assert parallel.active()  # free again for the products after the jobs
    with parallel.helping():
        assert parallel.tasks([job, job], [1e9, 1e9], [6e8, 5e8], 1e9) == [8, 9]  # together over the budget
    assert seen == [main] * 9 and parallel.shared() == shared
    with parallel.helping():
        parallel.tasks([job, job], [1e9, 1e9], [4e8, 5e8], 1e9)  # within it: shared
    assert parallel.shared() == shared + 1
    with pytest.raises(ValueError, match="2 jobs but 1 costs"):
        parallel.tasks([job, job], [1.0])
    with pytest.raises(ValueError, match="and 1 sizes"):
        parallel.tasks([job, job], [1.0, 1.0], [1.0])


def test_jobs_run_in_turn_while_the_core_is_taken_split_nothing_inside() -> None:
    """With the second core taken the jobs run one after the other on this thread, but still whole:
    a product inside a job is not split, as it would not be were the jobs on both threads, so the
    values do not depend on the other core."""
    A = np.random.default_rng(12).standard_normal((800, 400)).astype(np.float32)
    inside: list[bool] = []

    def job() -> np.ndarray:
        inside.append(parallel.active())
        return parallel.matmul(A, A.T)

    before, inline = parallel.splits(), parallel.inline()
    with limit_blas_threads(1), parallel.helping(idle=lambda: False):
        busy = parallel.tasks([job, job], [1e9, 1e9])
    with limit_blas_threads(1), parallel.helping():
        free = parallel.tasks([job, job], [1e9, 1e9])
    assert inside == [False] * 4
    assert parallel.splits() == before and parallel.inline() == inline
    for a, b in zip(busy, free, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, np.matmul(A, A.T))


def test_a_failing_task_stops_both_threads_and_leaves_the_helper_free() -> None:
    """A job that raises: neither thread starts another job, the error comes out once the other
    thread's current job has ended, and the helper splits products again afterwards."""
    import time

    ran: list[int] = []
    started = threading.Event()

    def ok(i: int, wait: float = 0.0) -> int:
        started.set()
        time.sleep(wait)
        ran.append(i)
        return i

    def bad(i: int) -> int:
        assert started.wait(10)  # the helper is inside job 1 when job 0 fails
        ran.append(i)
        raise RuntimeError(f"job {i} failed")

    # equal costs, largest first to the lighter list: jobs 0 and 2 on this thread, 1 and 3 on the helper
    jobs = [lambda: bad(0), lambda: ok(1, 0.3), lambda: ok(2), lambda: ok(3)]
    with parallel.helping():
        with pytest.raises(RuntimeError, match="job 0 failed"):
            parallel.tasks(jobs, [1e9] * 4)
        assert sorted(ran) == [0, 1]  # job 1 was running and ended; 2 and 3 never started
        assert parallel.active()
        A = np.random.default_rng(2).standard_normal((600, 600))
        before = parallel.splits()
        parallel.matmul(A, A)
        assert parallel.splits() == before + 1


def test_a_keyboard_interrupt_in_a_task_comes_out_first() -> None:
    started = threading.Event()

    def interrupted() -> int:
        started.set()
        raise KeyboardInterrupt

    def failing() -> int:
        assert started.wait(10)  # both fail: the helper's job first
        raise RuntimeError("job 0 failed")

    with parallel.helping(), pytest.raises(KeyboardInterrupt):
        parallel.tasks([failing, interrupted], [1e9, 1e9])


def test_the_groups_of_a_grouped_layer_are_solved_at_once_with_the_same_values() -> None:
    """A grouped layer too wide for the batched-groups path (d > 64): with the helper, its groups'
    factorisations and then their sweeps and re-fits run as jobs on both threads; nothing inside a
    job is split, so the weights, masks and errors are those of one thread bit for bit."""
    rng = np.random.default_rng(9)
    g, M, d, n = 3, 40, 200, 400
    X = rng.standard_normal((g, n, d)) * rng.uniform(0.3, 2.0, (g, 1, d))
    W = rng.standard_normal((g, M, d))
    Y = np.einsum("gnd,gmd->gnm", X, W) + 0.1 * rng.standard_normal((g, n, M))
    H, B = np.einsum("gnd,gne->gde", X, X), np.einsum("gnd,gnm->gdm", X, Y)
    yy = np.einsum("gnm,gnm->gm", Y, Y)
    want = prune_layer(W, H, B, yy, keep=W.size // 3, name="grouped")
    shared = parallel.shared()
    with limit_blas_threads(1), parallel.helping():
        got = prune_layer(W, H, B, yy, keep=W.size // 3, name="grouped")
    assert parallel.shared() == shared + 2  # the factorisations, then the sweeps and re-fits
    np.testing.assert_array_equal(got.mask, want.mask)
    np.testing.assert_array_equal(got.W, want.W)
    assert (got.error, got.masked_error, got.dense_error) == (want.error, want.masked_error, want.dense_error)


def test_the_directions_of_a_recurrent_node_are_solved_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bidirectional LSTM: with the helper, the two directions' saliencies, solves and closed-loop
    re-fits run as jobs on both threads, with the weights of solving them one after the other."""
    from test_rnn_layerwise import rnn_model

    from chita_onnx.activations import working_copy

    rng = np.random.default_rng(12)
    D, Hs, F, T = 2, 16, 200, 6
    W, R = 0.2 * rng.standard_normal((D, 4 * Hs, F)), 0.3 * rng.standard_normal((D, 4 * Hs, Hs))
    model = working_copy(rnn_model("LSTM", W, R, np.zeros((D, 8 * Hs)), T=T, head=3))
    batches = [{"x": rng.standard_normal((30, T, F)).astype(np.float32)} for _ in range(2)]
    keep = {"W": W.size // 3, "R": R.size // 2, "Wout": 20}
    opts = LayerwiseOptions(helper=True)
    with limit_blas_threads(1):
        shared = parallel.shared()
        got = layerwise_prune(model, batches, keep=keep, opts=opts)
        assert parallel.shared() >= shared + 3  # saliencies, solves, one closed-loop round
        shared = parallel.shared()
        tight = layerwise_prune(model, batches, keep=keep, opts=LayerwiseOptions(helper=True, max_memory=10**6))
        assert parallel.shared() == shared  # two directions' solves at once would pass a quarter of it
        monkeypatch.setattr(parallel, "tasks", lambda jobs, costs, memory=None, budget=None: [job() for job in jobs])
        want = layerwise_prune(model, batches, keep=keep, opts=opts)
    for name in keep:
        np.testing.assert_array_equal(got.weights[name], want.weights[name])
        np.testing.assert_array_equal(tight.weights[name], want.weights[name])


def test_the_pass_solves_a_grouped_convs_groups_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Conv with two groups of 288 inputs each (too wide for the batched-groups path) through the
    whole pass: with the helper its groups run as jobs, with the weights of solving them in turn."""
    from conftest import make_model
    from onnx import TensorProto, helper, numpy_helper

    from chita_onnx.activations import working_copy

    rng = np.random.default_rng(21)
    Wc = (0.1 * rng.standard_normal((64, 32, 3, 3))).astype(np.float32)
    Wg = (0.1 * rng.standard_normal((10, 64))).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "Wc"], ["c"], group=2, pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("GlobalAveragePool", ["r"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "Wg"], ["y"], transB=1),
    ]
    model = working_copy(
        make_model(
            nodes,
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 64, 8, 8])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
            [numpy_helper.from_array(Wc, "Wc"), numpy_helper.from_array(Wg, "Wg")],
        )
    )
    batches = [{"x": rng.standard_normal((16, 64, 8, 8)).astype(np.float32)} for _ in range(2)]
    keep = {"Wc": Wc.size // 3, "Wg": Wg.size // 2}
    opts = LayerwiseOptions(helper=True)
    with limit_blas_threads(1):
        shared = parallel.shared()
        got = layerwise_prune(model, batches, keep=keep, opts=opts)
        assert parallel.shared() == shared + 2  # the groups' factorisations, then their sweeps and re-fits
        monkeypatch.setattr(parallel, "tasks", lambda jobs, costs, memory=None, budget=None: [job() for job in jobs])
        want = layerwise_prune(model, batches, keep=keep, opts=opts)
    assert int(np.count_nonzero(got.weights["Wc"])) == keep["Wc"]
    for name in keep:
        np.testing.assert_array_equal(got.weights[name], want.weights[name])


# ------------------------------------------------------------------------- the Gram split by its triangle


@pytest.mark.parametrize(("R", "d"), [(1640, 1024), (300, 2000), (5000, 600)])
def test_a_large_gram_update_is_split_by_its_triangle_with_the_same_values_either_way(R: int, d: int) -> None:
    """``H += xᵀx`` as ``AᵀA``, ``BᵀB`` and ``AᵀB`` (``x = [A | B]`` split at a multiple of 64 near
    ``d/√2``): two jobs on two threads, or in turn while the second core is taken, give the same
    ``H`` bit for bit; it is exactly symmetric and the one-call product up to float32 rounding."""
    from chita_onnx.layerstats import SPLIT_GRAM_ALIGN, add_gram, gram_split

    rng = np.random.default_rng(R + d)
    x = (rng.standard_normal((R, d)) * rng.uniform(0.1, 3.0, d)).astype(np.float32)
    H0 = rng.standard_normal((d, d))
    H0 = H0 + H0.T  # what earlier rows left, symmetric
    c = gram_split(R, d)
    assert 0 < c < d and c % SPLIT_GRAM_ALIGN == 0 and abs(c - d / np.sqrt(2)) <= SPLIT_GRAM_ALIGN
    shared = parallel.shared()
    H1 = H0.copy()
    with limit_blas_threads(1), parallel.helping():
        add_gram(H1, x)
    assert parallel.shared() == shared + 1
    H2 = H0.copy()
    with limit_blas_threads(1), parallel.helping(idle=lambda: False):
        add_gram(H2, x)
    H3 = H0.copy()
    add_gram(H3, x)  # no helper at all: the same blocks
    assert parallel.shared() == shared + 1
    np.testing.assert_array_equal(H1, H2)
    np.testing.assert_array_equal(H1, H3)
    np.testing.assert_array_equal(H1, H1.T)
    want = H0 + (x.T @ x).astype(np.float64)
    np.testing.assert_allclose(H1, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def test_a_small_or_narrow_gram_update_is_one_product() -> None:
    from chita_onnx.layerstats import GATHER_MIN_D, SPLIT_GRAM_MACS, add_gram, gram_split

    assert gram_split(10_000, GATHER_MIN_D - 1) == 0  # narrow
    R = int(2 * SPLIT_GRAM_MACS / 1024**2) - 1
    assert gram_split(R, 1024) == 0 and gram_split(R + 2, 1024) > 0  # at the multiply-add threshold
    x = np.random.default_rng(0).standard_normal((R, 1024)).astype(np.float32)
    H = np.zeros((1024, 1024))
    with limit_blas_threads(1), parallel.helping():
        add_gram(H, x)
    np.testing.assert_array_equal(H, (x.T @ x).astype(np.float64))
