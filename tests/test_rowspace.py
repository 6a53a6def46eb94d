"""The row-space layer-wise solver (few input rows of a wide layer, no d × d Gram) against the Gram
route, its factor against the Cholesky factor of H_λ⁻¹, planted recovery, and the pass choosing it."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from conftest import tiny_mlp

import chita_onnx.sequential as seq
import chita_onnx.solver.layerwise as layerwise
import chita_onnx.solver.rowspace as rs
from chita_onnx.errors import SolverError
from chita_onnx.layerstats import LayerGeometry, LayerStats, accumulate, finalize_means
from chita_onnx.solver.layerwise import damp_gram, prune_layer
from chita_onnx.solver.rowspace import RowGram, cheaper, prune_layer_rows


def _problem(N: int, d: int, M: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``A (N, d)`` with uneven column scales, a dense weight ``(M, d)`` and dense targets
    ``Y (N, M)`` from slightly different (dense-model) inputs."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((N, d)) * rng.uniform(0.1, 3.0, d)
    W = rng.standard_normal((M, d))
    Y = (A + 0.1 * rng.standard_normal((N, d))) @ W.T
    return A, W, Y


def _gram(A: np.ndarray, Y: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    H = (A.T @ A)[None]
    if Y is None:
        return H, None, None
    return H, (A.T @ Y)[None], (Y**2).sum(axis=0)[None]


@pytest.mark.parametrize("M", [7, 40])  # fewer outputs than the block (the product) and more (formed rows)
@pytest.mark.parametrize("targets", ["dense", "pruned"])
@pytest.mark.parametrize("select", ["sparsegpt", "magnitude"])
def test_rows_and_gram_give_the_same_layer(M: int, targets: str, select: str) -> None:
    """Same masks, weights and errors as prune_layer on the Gram of the same rows (float64 systems:
    every re-fit system is below SINGLE_MIN, so the Gram route solves in float64 too)."""
    A, W, Y = _problem(30, 200, M)
    Yt = Y if targets == "dense" else None
    rho = np.random.default_rng(5).uniform(0.5, 2.0, M)
    keep = int(0.45 * W.size)
    a = prune_layer(W[None], *_gram(A, Yt), keep=keep, select=select, block=32, row_weight=rho[None])  # type: ignore[arg-type]
    b = prune_layer_rows(W, A, Yt, keep=keep, select=select, block=32, row_weight=rho)  # type: ignore[arg-type]
    assert int(b.mask.sum()) == keep
    np.testing.assert_array_equal(a.mask, b.mask)
    np.testing.assert_allclose(b.W, a.W, rtol=0, atol=1e-8 * np.abs(a.W).max())
    for x, y in [(a.error, b.error), (a.masked_error, b.masked_error), (a.dense_error, b.dense_error)]:
        assert y == pytest.approx(x, rel=1e-7, abs=1e-9 * a.masked_error)
    assert b.info["refit"] == "rowspace" and b.info["rows"] == 30


def test_rows_and_gram_agree_on_a_given_mask() -> None:
    A, W, Y = _problem(25, 150, 9, seed=2)
    mask = np.random.default_rng(3).random(W.shape) < 0.4
    mask[0] = True  # a full row
    mask[1] = False  # an empty row
    a = prune_layer(W[None], *_gram(A, Y), mask=mask[None], select="mask", block=16)
    b = prune_layer_rows(W, A, Y, mask=mask, select="mask", block=16)
    np.testing.assert_array_equal(b.mask[0], mask)
    np.testing.assert_allclose(b.W, a.W, rtol=0, atol=1e-8 * np.abs(a.W).max())
    assert not np.any(b.W[0, 1])


def test_factor_blocks_reproduce_the_cholesky_factor_of_the_inverse() -> None:
    """The diagonal blocks and the products with the rest are those of U, H_λ⁻¹ = UᵀU, from the
    Gram route's factorisation; blocks must come in order."""
    A, _, _ = _problem(20, 90, 1, seed=4)
    rg = RowGram.of(A, 0.01)
    dh = damp_gram(A.T @ A, 0.01)
    assert rg.lam == pytest.approx(dh.lam, rel=1e-12)
    U = dh.inverse_factor()
    np.testing.assert_allclose(rg.inverse_diag(), dh.inverse_diag(), rtol=1e-9)
    for outputs in (1, 64):  # product route and formed-rows route
        for i1 in range(0, 90, 32):
            i2 = min(90, i1 + 32)
            U11, rest = rg.factor_block(i1, i2, outputs=outputs)
            np.testing.assert_allclose(U11, U[i1:i2, i1:i2], rtol=1e-9, atol=1e-12 * np.abs(U).max())
            E = np.random.default_rng(i1).standard_normal((3, i2 - i1))
            np.testing.assert_allclose(rest(E), E @ U[i1:i2, i2:], rtol=1e-8, atol=1e-10 * np.abs(U).max())
    rg.factor_block(0, 32)
    with pytest.raises(SolverError, match="out of order"):
        rg.factor_block(64, 90)


def test_a_planted_sparse_layer_is_recovered_exactly() -> None:
    """A dense weight that is itself sparse, fitted from fewer rows than inputs: pruning it to its
    own count keeps exactly its support and its values (zero error)."""
    rng = np.random.default_rng(7)
    N, d, M = 40, 300, 6
    A = rng.standard_normal((N, d))
    W = rng.standard_normal((M, d)) * (rng.random((M, d)) < 0.3)
    Y = A @ W.T
    sol = prune_layer_rows(W, A, Y, keep=int(np.count_nonzero(W)), block=64)
    np.testing.assert_array_equal(sol.mask[0], W != 0)
    np.testing.assert_allclose(sol.W[0], W, atol=1e-9)
    assert sol.error <= 1e-12 * sol.dense_error + 1e-12


def test_refit_never_increases_the_damped_objective() -> None:
    """The exact re-fit (and CG when the exact one is too costly) ends at or below the sweep's weights
    on the damped objective of every row."""
    A, W, Y = _problem(30, 240, 12, seed=9)
    rg = RowGram.of(A, 0.01)
    rhs = Y.T @ A + rg.lam * W

    def f(V: np.ndarray) -> np.ndarray:
        return np.einsum("ij,ij->i", rg.times(V), V) - 2 * np.einsum("ij,ij->i", V, rhs)

    swept = prune_layer_rows(W, A, Y, keep=W.size // 3, refit=False, block=32)
    refit = prune_layer_rows(W, A, Y, keep=W.size // 3, block=32)
    np.testing.assert_array_equal(swept.mask, refit.mask)
    assert np.all(f(refit.W[0]) <= f(swept.W[0]) + 1e-9 * np.abs(f(swept.W[0])))
    # the optimum: the gradient vanishes on the support
    grad = rg.times(refit.W[0]) - rhs
    assert np.abs(grad[refit.mask[0]]).max() <= 1e-8 * np.abs(rhs).max()


def test_cg_branch_when_the_exact_refit_is_too_costly(monkeypatch: pytest.MonkeyPatch) -> None:
    """CG (products through the rows) closes the gap from the sweep's weights to the exact re-fit on
    the damped objective."""
    A, W, Y = _problem(30, 240, 12, seed=10)
    rg = RowGram.of(A, 0.01)
    rhs = Y.T @ A + rg.lam * W

    def f(V: np.ndarray) -> float:
        return float(np.einsum("ij,ij->", rg.times(V), V) - 2 * np.einsum("ij,ij->", V, rhs))

    swept = prune_layer_rows(W, A, Y, keep=W.size // 2, block=32, refit=False)
    exact = prune_layer_rows(W, A, Y, keep=W.size // 2, block=32)
    monkeypatch.setattr(rs, "EXACT_FLOPS", 0.0)
    monkeypatch.setattr(layerwise, "CG_FLOPS", 1e12)
    cg = prune_layer_rows(W, A, Y, keep=W.size // 2, block=32)
    assert str(cg.info["refit"]).startswith("cg")
    np.testing.assert_array_equal(cg.mask, exact.mask)
    gap = f(swept.W[0]) - f(exact.W[0])
    assert gap > 0
    assert f(cg.W[0]) - f(exact.W[0]) <= 1e-4 * gap


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_float32_products_agree_with_the_float64_ones(dtype: type) -> None:
    """``times32`` (the CG's products on a wide layer) is ``V H_λ`` up to float32 rounding; rows given
    in float32 are used as they are, not copied."""
    A, W, _ = _problem(50, 300, 9, seed=11)
    A = A.astype(dtype)
    rg = RowGram.of(A, 0.01)
    exact = rg.times(W)
    fast = rg.times32(W)
    assert fast.dtype == np.float64
    assert np.abs(fast - exact).max() <= 1e-5 * np.abs(exact).max()
    assert not np.array_equal(fast, exact)  # it did take the float32 route
    assert rg._a32 is not None and np.shares_memory(rg._a32, A) == (dtype is np.float32)


def test_bad_rows_are_refused_by_name() -> None:
    A, W, Y = _problem(10, 50, 3)
    A[2, 3] = np.nan
    with pytest.raises(SolverError, match=r"head.*NaN"):
        prune_layer_rows(W, A, Y, keep=10, name="head")
    with pytest.raises(SolverError, match="expected"):
        prune_layer_rows(W, A[:, :40], Y, keep=10, name="head")


def test_cost_rule_limits() -> None:
    """Few rows of a wide layer go through the rows, as many rows as inputs through the Gram."""
    assert cheaper(200, 6272, 10, 0.5)
    assert cheaper(64, 1280, 2, 0.5)
    assert not cheaper(1024, 1024, 10, 0.5)
    assert not cheaper(1000, 1024, 1000, 0.5)
    # more rows never make the rows cheaper
    flips = [cheaper(n, 2048, 100, 0.5) for n in range(16, 2049, 16)]
    assert flips == sorted(flips, reverse=True)


def test_cost_rule_costs_each_route_as_its_refit_runs() -> None:
    """Each route's re-fit is costed as :func:`ridge_refit` / :func:`prune_layer_rows` will run it
    (exact within ``EXACT_FLOPS``, else ``CG_FLOPS`` of CG), and the rows are never chosen for a worse
    re-fit: never CG against the Gram's exact one, never fewer CG iterations."""
    # ResNet-18's last stage at 64 × 64 pixels: 512 × 4,608, 820 rows, 29% kept.  Both re-fits are
    # CG; the rows set up for a quarter of the Gram's cost and run 25 iterations to its 9.
    assert cheaper(820, 4608, 512, 0.29)
    chosen = 0
    for N in (64, 256, 820, 2000):
        for d in (1000, 2300, 4600):
            for M in (10, 128, 512):
                for f in (0.1, 0.3, 0.5, 0.7):
                    if not cheaper(N, d, M, f):
                        continue
                    chosen += 1
                    mask = np.zeros((M, d), dtype=bool)
                    mask[:, : round(f * d)] = True
                    gram_exact, gram_step = layerwise.refit_cost(mask, complement=True)
                    rows_exact, rows_step = RowGram(np.zeros((N, 1)), 1.0, 0.01, np.eye(1)).refit_cost(mask)
                    rows_cg = rows_exact > layerwise.EXACT_FLOPS
                    assert not rows_cg or gram_exact > layerwise.EXACT_FLOPS, (N, d, M, f)
                    if rows_cg:
                        assert layerwise.cg_iterations(rows_step) >= layerwise.cg_iterations(gram_step), (N, d, M, f)
    assert 10 < chosen < 144  # the rule does choose the rows, not always


def test_layer_stats_keep_the_rows_while_they_are_few() -> None:
    """The kept rows are the rows the Gram is made of; too many rows fall back to the Gram, with the
    same statistics as accumulating it from the start."""
    rng = np.random.default_rng(11)
    geom = LayerGeometry("gemm", (6, 1100), trans_b=True)
    W = rng.standard_normal((1, 6, 1100))
    batches = [rng.standard_normal((n, 1100)).astype(np.float32) for n in (30, 50)]
    st = LayerStats.empty(geom, cross=True, rowspace=True)
    ref = LayerStats.empty(geom, cross=True)
    for a in batches:
        accumulate(st, a, a_dense=a, w_dense_rows=W)
        accumulate(ref, a, a_dense=a, w_dense_rows=W)
    assert st.rowspace and st.H.shape == (1, 0, 0)
    finalize_means(st, rows=True)
    finalize_means(ref)
    assert st.X is not None and st.Y is not None and st.X.shape == (80, 1100)
    X = st.X.astype(np.float64)
    np.testing.assert_allclose(X.T @ X, ref.H[0], rtol=1e-5, atol=1e-3)
    assert ref.B is not None and ref.yy is not None and st.yy is not None
    np.testing.assert_allclose(X.T @ st.Y.astype(np.float64), ref.B[0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(st.yy, ref.yy, rtol=1e-5)
    np.testing.assert_allclose(st.mean_p, ref.mean_p, rtol=1e-6)
    # declined at the end: the Gram, as without row-space mode
    st2 = LayerStats.empty(geom, cross=True, rowspace=True)
    for a in batches:
        accumulate(st2, a, a_dense=a, w_dense_rows=W)
    finalize_means(st2, rows=False)
    assert st2.X is None and not st2.rowspace
    np.testing.assert_allclose(st2.H, ref.H, rtol=1e-6)
    # more rows than inputs: the Gram from then on
    st3 = LayerStats.empty(geom, cross=True, rowspace=True)
    for _ in range(15):
        a = rng.standard_normal((80, 1100)).astype(np.float32)
        accumulate(st3, a, a_dense=a, w_dense_rows=W)
    assert not st3.rowspace and st3.H.shape == (1, 1100, 1100) and st3.rows == 1200
    # a grouped Conv never keeps rows
    assert not LayerStats.empty(LayerGeometry("conv", (4, 600, 3, 3), group=2), cross=False, rowspace=True).rowspace


@pytest.mark.parametrize("case", ["keep", "masks", "pruned targets"])
def test_the_pass_solves_a_wide_head_from_its_rows(
    case: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Through onnxruntime: an MLP with a 1,200-wide hidden layer and 60 samples; its head is solved in
    row space (counts to select, a given mask to re-fit, or targets from the pruned inputs) and gives
    the weights the Gram route gives on the same pass."""
    model = tiny_mlp(seed=3, d_in=20, hidden=1200, classes=5)
    x = np.random.default_rng(4).standard_normal((60, 20)).astype(np.float32)
    batches = [{"x": x[:35]}, {"x": x[35:]}]
    keep = {"W1": 12_000, "W2": 2_500}
    rng = np.random.default_rng(8)
    masks = {"W1": rng.random((20, 1200)) < 0.5, "W2": rng.random((5, 1200)) < 0.4}
    kw = {"masks": masks} if case == "masks" else {"keep": keep}
    if case == "pruned targets":
        kw["opts"] = seq.LayerwiseOptions(dense_targets=False)
    with caplog.at_level(logging.DEBUG, logger="chita_onnx.sequential"):
        rows = seq.layerwise_prune(model, batches, **kw)  # type: ignore[arg-type]
    assert "W2: row-space solve (60 rows of 1200 inputs" in caplog.text
    monkeypatch.setattr(seq, "cheaper_rows", lambda *a: False)
    gram = seq.layerwise_prune(model, batches, **kw)  # type: ignore[arg-type]
    np.testing.assert_array_equal(rows.weights["W1"], gram.weights["W1"])
    want = int(np.count_nonzero(masks["W2"])) if case == "masks" else keep["W2"]
    for r in (rows, gram):
        assert int(np.count_nonzero(r.weights["W2"])) == want
    np.testing.assert_array_equal(rows.weights["W2"] != 0, gram.weights["W2"] != 0)
    if case == "masks":
        np.testing.assert_array_equal(rows.weights["W2"] != 0, masks["W2"])
    w = gram.weights["W2"]  # two solvers on an ill-conditioned (60 rows, 1,200 inputs) damped problem
    np.testing.assert_allclose(rows.weights["W2"], w, rtol=0, atol=3e-3 * np.abs(w).max())
    e_rows = next(r for r in rows.layers if r.name == "W2")
    e_gram = next(r for r in gram.layers if r.name == "W2")
    assert e_rows.error == pytest.approx(e_gram.error, rel=0.05, abs=1e-6 * e_gram.energy)
    assert e_rows.energy == pytest.approx(e_gram.energy, rel=1e-4)


def test_rows_only_statistics_drop_what_does_not_fit() -> None:
    """Without a Gram to fall back to, rows past the capacity are dropped, never a d × d matrix."""
    from chita_onnx.layerstats import rowspace_capacity

    geom = LayerGeometry("gemm", (4, 1100), trans_b=True)
    W = np.random.default_rng(0).standard_normal((1, 4, 1100))
    st = LayerStats.empty(geom, cross=True, rows_only=True)
    for _ in range(3):
        a = np.random.default_rng(1).standard_normal((500, 1100)).astype(np.float32)
        accumulate(st, a, a_dense=a, w_dense_rows=W)
    cap = rowspace_capacity(geom)
    assert st.rowspace and st.H.shape == (1, 0, 0) and st.rows == 1500
    assert st.pending_rows == cap and st.dropped == 1500 - cap
    finalize_means(st, rows=False)  # asked for the Gram anyway: still the rows
    assert st.X is not None and st.X.shape == (cap, 1100) and st.H.shape == (1, 0, 0)
    empty = LayerStats.empty(geom, cross=True, rows_only=True)
    finalize_means(empty, rows=True)
    assert empty.X is not None and empty.X.shape == (1, 1100) and not np.any(empty.X)
    with pytest.raises(ValueError, match="cannot be solved from its rows"):
        LayerStats.empty(LayerGeometry("gemm", (4, 100), trans_b=True), cross=True, rows_only=True)


def test_a_head_too_wide_for_its_gram_is_solved_from_its_rows(
    tmp_path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """--max-memory below the head's Gram route but above its row-space solve: the head is
    reconstructed from (a random subset of) its rows instead of being pruned by its allocation
    alone, keeps the exact budget, and the pruned model's outputs are closer to the dense ones."""
    import onnx
    import onnxruntime as ort

    import chita_onnx
    import chita_onnx.reconstruct as rc
    from chita_onnx import CompressConfig

    model = tiny_mlp(seed=5, d_in=30, hidden=1200, classes=5)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    rng = np.random.default_rng(6)
    x = {"x": rng.standard_normal((800, 30)).astype(np.float32)}
    test = rng.standard_normal((400, 30)).astype(np.float32)
    cfg = CompressConfig(sparsity=0.6, max_memory=40 * 2**20, bn_recalibrate="off", bias_correction="off")

    def out_error(path) -> float:  # type: ignore[no-untyped-def]
        dense = ort.InferenceSession(str(src)).run(None, {"x": test})[0]
        got = ort.InferenceSession(str(path)).run(None, {"x": test})[0]
        return float(np.linalg.norm(got - dense) / np.linalg.norm(dense))

    with caplog.at_level(logging.INFO, logger="chita_onnx.reconstruct"):
        rows = chita_onnx.compress(src, out, x, cfg)
    assert "W2: its Gram" in caplog.text and "solved from at most" in caplog.text
    assert rows.method == "layerwise" and "not_reconstructed" not in rows.solver
    nnz = int(
        sum(
            np.count_nonzero(onnx.numpy_helper.to_array(t))
            for t in onnx.load(out).graph.initializer
            if t.name in ("W1", "W2")
        )
    )
    assert nnz == rows.nnz
    e_rows = out_error(out)
    monkeypatch.setattr(rc, "rowspace_eligible", lambda g: False)  # the old behaviour: allocation alone
    alone = chita_onnx.compress(src, out, x, cfg)
    assert alone.solver["not_reconstructed"] == "W2" and alone.nnz == rows.nnz
    e_alone = out_error(out)
    assert e_rows < e_alone


def test_the_pass_solves_a_wide_token_layer_from_its_rows(monkeypatch: pytest.MonkeyPatch) -> None:
    """A MatMul on token rows (``[N, T, 1200] · [1200, 6]``, one row per sample and token) and a
    MatMul with the weight on the left (``[6, 1100] · [N, 1100, 3]``, one row per output column)
    take the row space as the Gemm head does, with the Gram route's masks up to rounding."""
    from conftest import make_model
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(12)
    w1 = (rng.standard_normal((16, 1200)) / 4).astype(np.float32)
    w2 = (rng.standard_normal((1200, 6)) / 35).astype(np.float32)
    w3 = (rng.standard_normal((6, 1100)) / 33).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["tok"]),
        helper.make_node("MatMul", ["W3", "z"], ["left"]),
    ]
    f = TensorProto.FLOAT
    model = make_model(
        nodes,
        [helper.make_tensor_value_info("x", f, ["N", 5, 16]), helper.make_tensor_value_info("z", f, ["N", 1100, 3])],
        [helper.make_tensor_value_info("tok", f, ["N", 5, 6]), helper.make_tensor_value_info("left", f, ["N", 6, 3])],
        [numpy_helper.from_array(a, n) for a, n in [(w1, "W1"), (w2, "W2"), (w3, "W3")]],
    )
    batches = [
        {
            "x": rng.standard_normal((n, 5, 16)).astype(np.float32),
            "z": rng.standard_normal((n, 1100, 3)).astype(np.float32),
        }
        for n in (20, 16)
    ]
    keep = {"W1": 9_000, "W2": 3_000, "W3": 2_500}
    solved: list[str] = []
    real = seq.prune_layer_rows

    def spy(*a, **k):  # type: ignore[no-untyped-def]
        solved.append(k["name"])
        return real(*a, **k)

    monkeypatch.setattr(seq, "prune_layer_rows", spy)
    rows = seq.layerwise_prune(model, batches, keep=keep)
    assert solved == ["W2", "W3"]
    monkeypatch.setattr(seq, "cheaper_rows", lambda *a: False)
    gram = seq.layerwise_prune(model, batches, keep=keep)
    for name, n_rows in (("W2", 180), ("W3", 108)):
        r = next(x for x in rows.layers if x.name == name)
        assert r.rows == n_rows and int(np.count_nonzero(rows.weights[name])) == keep[name]
        a, b = rows.weights[name], gram.weights[name]
        # the Gram route forms its Gram in float32: rounding may swap a near-tie of the sweep
        assert np.mean((a != 0) != (b != 0)) <= 1e-3
        both = (a != 0) & (b != 0)
        np.testing.assert_allclose(a[both], b[both], rtol=0, atol=2e-2 * np.abs(b).max())
        g = next(x for x in gram.layers if x.name == name)
        assert r.error == pytest.approx(g.error, rel=0.05)


def test_rows_skip_the_reported_only_errors_when_asked() -> None:
    """``diagnostics=False``: the same weights, mask and error, NaN for the two reported-only errors."""
    A, W, Y = _problem(30, 200, 9, seed=4)
    keep = int(0.4 * W.size)
    on = prune_layer_rows(W, A, Y, keep=keep, block=32)
    off = prune_layer_rows(W, A, Y, keep=keep, block=32, diagnostics=False)
    np.testing.assert_array_equal(on.W, off.W)
    np.testing.assert_array_equal(on.mask, off.mask)
    assert on.error == off.error and np.isfinite(on.masked_error) and np.isfinite(on.dense_error)
    assert np.isnan(off.masked_error) and np.isnan(off.dense_error)
