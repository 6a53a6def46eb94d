"""``--fisher kl``: the true Fisher (Gauss-Newton of the KL to the model's output), checked exactly.

``XᵀX`` must equal ``Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i`` with ``J_i`` the Jacobian of the logits with
respect to the prunable weights, here from central finite differences on a float64 copy of the model
run with onnxruntime (an independent path: no gradient graph involved).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import labelled_data, tiny_mlp
from onnx import TensorProto, numpy_helper

from chita_onnx import CompressConfig
from chita_onnx.data import ArraySource
from chita_onnx.errors import ConfigError
from chita_onnx.gradients import GradientEngine, GradientMatrix
from chita_onnx.pipeline import GradientOracle, compress, initial_weights, prepare


def float64_with_weight_inputs(model: onnx.ModelProto, weights: list[str]) -> onnx.ModelProto:
    """A float64 copy of ``model`` whose ``weights`` are graph inputs (one session, any values)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    for vi in [*g.input, *g.output, *g.value_info]:
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.DOUBLE
    keep = []
    for init in g.initializer:
        arr = numpy_helper.to_array(init).astype(np.float64)
        if init.name in weights:
            g.input.append(onnx.helper.make_tensor_value_info(init.name, TensorProto.DOUBLE, list(arr.shape)))
        else:
            keep.append(numpy_helper.from_array(arr, init.name))
    del g.initializer[:]
    g.initializer.extend(keep)
    return m


def jacobians_by_finite_differences(
    model: onnx.ModelProto, x: np.ndarray, names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    """``(J, p)``: ``J`` (n, C, p) the logits' Jacobian by central differences in float64, ``p`` the softmax."""
    inits = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}
    m64 = float64_with_weight_inputs(model, names)
    sess = ort.InferenceSession(m64.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {"x": x.astype(np.float64), **{k: inits[k] for k in names}}
    flat = np.concatenate([inits[k].ravel() for k in names])
    sizes = [inits[k].size for k in names]

    def logits(w: np.ndarray) -> np.ndarray:
        parts = np.split(w, np.cumsum(sizes)[:-1])
        f = dict(feeds)
        f.update({k: v.reshape(inits[k].shape) for k, v in zip(names, parts, strict=True)})
        return np.asarray(sess.run(None, f)[0])

    z0 = logits(flat)
    n, C = z0.shape
    J = np.zeros((n, C, flat.size))
    h = 1e-6
    for j in range(flat.size):
        e = np.zeros_like(flat)
        e[j] = h
        J[:, :, j] = (logits(flat + e) - logits(flat - e)) / (2 * h)
    p = np.exp(z0 - z0.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return J, p


def true_fisher(J: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i``."""
    return sum(J[i].T @ (np.diag(p[i]) - np.outer(p[i], p[i])) @ J[i] for i in range(J.shape[0]))


def true_fisher_by_finite_differences(model: onnx.ModelProto, x: np.ndarray, names: list[str]) -> np.ndarray:
    """``Σ_i J_iᵀ(diag p_i − p_i p_iᵀ)J_i`` (p × p), J by central differences in float64."""
    return true_fisher(*jacobians_by_finite_differences(model, x, names))


def engine_rows(
    model: onnx.ModelProto, x: np.ndarray, fisher_rows: int, seed: int = 0, reference: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    g = engine_matrix(model, x, fisher_rows, seed, reference)
    return g.X.astype(np.float64), g.rows_per_sample


def engine_matrix(
    model: onnx.ModelProto,
    x: np.ndarray,
    fisher_rows: int,
    seed: int = 0,
    reference: np.ndarray | None = None,
    temperature: float = 1.0,
) -> GradientMatrix:
    src = ArraySource({"x": x}, None, batch_size=5)
    eng = GradientEngine(model, ["W1", "W2"], example=next(iter(src)), loss="ce")  # no labels: say "logits"
    return eng.compute(
        src, fisher="kl", fisher_rows=fisher_rows, seed=seed, reference=reference, temperature=temperature
    )


def test_kl_rows_give_exactly_the_true_fisher() -> None:
    model = tiny_mlp(seed=2, d_in=12, hidden=16, classes=5)
    x = np.random.default_rng(4).standard_normal((12, 12)).astype(np.float32)
    X, reps = engine_rows(model, x, fisher_rows=8)  # 5 classes ≤ 8: every class, exactly
    assert reps == 5 and X.shape == (12 * 5, 12 * 16 + 5 * 16)
    F = true_fisher_by_finite_differences(model, x, ["W1", "W2"])
    err = np.linalg.norm(X.T @ X - F) / np.linalg.norm(F)
    assert err < 1e-4
    # the empirical Fisher with the argmax labels is a different (smaller) matrix
    src = ArraySource({"x": x}, None, batch_size=5)
    eng = GradientEngine(model, ["W1", "W2"], example=next(iter(src)), loss="ce")
    Xa = eng.compute(src, fisher="argmax").X.astype(np.float64)
    assert np.trace(Xa.T @ Xa) < np.trace(F)


def test_kl_sketch_rows_are_unbiased_combinations_of_the_class_rows() -> None:
    model = tiny_mlp(seed=2, d_in=12, hidden=16, classes=5)
    x = np.random.default_rng(4).standard_normal((6, 12)).astype(np.float32)
    exact, _ = engine_rows(model, x, fisher_rows=5)
    F = exact.T @ exact
    acc = np.zeros_like(F)
    seeds = 60
    for seed in range(seeds):
        Xs, reps = engine_rows(model, x, fisher_rows=2, seed=seed)  # 5 classes > 2: sketches
        assert reps == 2 and Xs.shape[0] == 12
        for i in range(6):  # every sketch row is a combination of its own input's class rows
            A = exact[5 * i : 5 * i + 5].T
            for row in Xs[2 * i : 2 * i + 2]:
                coef = np.linalg.lstsq(A, row, rcond=None)[0]
                assert np.linalg.norm(A @ coef - row) <= 1e-4 * max(np.linalg.norm(row), 1e-12)
        acc += Xs.T @ Xs
    err = np.linalg.norm(acc / seeds - F) / np.linalg.norm(F)
    assert err < 0.2  # Monte Carlo: 60 draws of 2 rows per input (about 1/sqrt(120) per entry)


def test_oracle_scales_kl_rows_per_input_and_the_block_path_runs(tmp_path: Path) -> None:
    model = tiny_mlp(seed=5, d_in=12, hidden=16, classes=5)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "d.npz"
    np.savez(data, **labelled_data(model, n=40))
    cfg = CompressConfig(method="chita", sparsity=0.5, fisher="kl", fisher_rows=10)
    prep = prepare(path, data, cfg, data)  # evaluation data given: the calibration data stays whole, in order
    oracle = GradientOracle(prep, cfg)
    X = oracle.matrix(initial_weights(prep))
    assert oracle.reps == 5 and X.shape == (oracle.n * 5, 272)
    raw, _ = engine_rows(model, np.load(data)["x"][: oracle.n], fisher_rows=10)
    want = raw.T @ raw / oracle.n  # float32 rows: entries far below the largest carry its rounding
    np.testing.assert_allclose(X.astype(np.float64).T @ X, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    # the block path (X over --max-memory) gets its columns with the same rows per input
    report = compress(
        path, tmp_path / "out.onnx", data, CompressConfig(method="chita", sparsity=0.5, fisher="kl", max_memory=2**20)
    )
    assert report.nnz <= report.k
    with pytest.raises(ConfigError, match=r"--fisher='kl'.*mini-batch"):
        CompressConfig(fisher="kl", mini_batch=4)


def test_kl_offsets_give_the_gradient_of_the_kl_and_midpoint_curvature() -> None:
    """With reference distributions p (the dense model's, in --distill), the exact class rows carry
    the curvature at the midpoint r = (q + p)/2 and offsets b with Σ b·row = Σ_i J_iᵀ(q_i − p_i), the
    gradient of Σ_i KL(p_i ‖ q_i): ½‖Xδ + b‖² is the Gauss-Newton model of the KL."""
    model = tiny_mlp(seed=2, d_in=12, hidden=16, classes=5)
    x = np.random.default_rng(4).standard_normal((12, 12)).astype(np.float32)
    J, q = jacobians_by_finite_differences(model, x, ["W1", "W2"])
    ref = np.random.default_rng(5).dirichlet(np.ones(5), size=12)
    g = engine_matrix(model, x, fisher_rows=8, reference=ref[:, None, :])
    X, b = g.X.astype(np.float64), g.offsets
    assert b is not None and b.shape == (60,)
    grad = sum(J[i].T @ (q[i] - ref[i]) for i in range(12))
    np.testing.assert_allclose(X.T @ b, grad, rtol=1e-4, atol=1e-6 * np.abs(grad).max())
    F_mid = true_fisher(J, 0.5 * (q + ref))
    assert np.linalg.norm(X.T @ X - F_mid) / np.linalg.norm(F_mid) < 1e-4
    # at the reference itself the offsets vanish and the curvature is the true Fisher
    g0 = engine_matrix(model, x, fisher_rows=8, reference=q[:, None, :])
    assert g0.offsets is not None and np.abs(g0.offsets).max() < 1e-6


def test_rows_per_input_follow_the_compute_budget(tmp_path: Path) -> None:
    """--fisher kl plans its rows per input from the cost of the exact re-fit, N·k·min(N, k): one row
    by default, every class when they fit under the cap (--fisher-rows, or every class with
    --distill), fewer (sketches) when k is large."""
    from chita_onnx import pipeline

    model = tiny_mlp(seed=5, d_in=12, hidden=16, classes=5)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "d.npz"
    np.savez(data, **labelled_data(model, n=40))

    def oracle(**kw: object) -> GradientOracle:
        cfg = CompressConfig(method="chita", sparsity=0.5, **kw)  # type: ignore[arg-type]
        return GradientOracle(prepare(path, data, cfg, data), cfg)

    n = 40
    assert oracle().plan_rows(100) == 1  # the default (--fisher auto is kl): one sketch per input
    assert oracle(fisher_rows=3).plan_rows(100) == 3  # below the 5 classes: three sketches
    assert oracle(fisher_rows=8).plan_rows(100) == 5  # every class
    assert oracle(distill=True).plan_rows(100) == 5  # --distill: up to every class by default
    # a budget that allows N·k·min(N, k) for N = 2n rows but not 3n: two sketches
    k = 100
    budget = 2 * n * k * min(2 * n, k)
    old = pipeline.KL_ROWS_BUDGET
    try:
        pipeline.KL_ROWS_BUDGET = budget
        assert oracle(fisher_rows=8).plan_rows(k) == 2
    finally:
        pipeline.KL_ROWS_BUDGET = old
    assert oracle(fisher="empirical", fisher_rows=8).plan_rows(k) == 1


@pytest.mark.parametrize(("fisher", "rows"), [("kl", 2), ("sampled", 1)])
def test_rows_computed_in_chunks_equal_one_pass(fisher: str, rows: int) -> None:
    """The block path computes X in chunks of samples; the seeded draws continue across chunks."""
    model = tiny_mlp(seed=2, d_in=12, hidden=16, classes=5)
    x = np.random.default_rng(4).standard_normal((12, 12)).astype(np.float32)
    eng = GradientEngine(model, ["W1", "W2"], example=(({"x": x[:5]}), None), loss="ce")
    whole = eng.compute(ArraySource({"x": x}, None, batch_size=5), fisher=fisher, fisher_rows=rows, seed=3).X.copy()
    parts = [
        eng.compute(
            ArraySource({"x": x[a:b]}, None, batch_size=5), fisher=fisher, fisher_rows=rows, seed=3, first_sample=a
        ).X.copy()
        for a, b in [(0, 5), (5, 12)]
    ]
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=1e-5, atol=1e-7)


def test_distill_is_one_switch_for_multi_stage_kl_pruning(tmp_path: Path) -> None:
    model = tiny_mlp(seed=5, d_in=12, hidden=16, classes=5)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "d.npz"
    np.savez(data, **labelled_data(model, n=60))
    cfg = CompressConfig(sparsity=0.8, distill=True, stages=3)
    assert cfg.method == "chita++" and cfg.fisher == "kl"
    assert CompressConfig(sparsity=0.8, distill=True).stages == 30
    report = compress(path, tmp_path / "out.onnx", data, cfg)
    assert report.method == "chita++" and len(report.stages) == 3
    assert report.nnz <= report.k
    assert all(s.objective is not None and np.isfinite(s.objective) for s in report.stages)
    with pytest.raises(ConfigError, match="--distill"):
        CompressConfig(distill=True, method="magnitude")
    with pytest.raises(ConfigError, match="--fisher"):
        CompressConfig(distill=True, fisher="empirical")


@pytest.mark.parametrize("tau", [2.0, 0.5])
def test_kl_temperature_rows_model_the_softened_kl(tau: float) -> None:
    """At temperature τ (``--distill``) the rows and offsets are the Gauss-Newton model of
    Σ_i KL(p_τ,i ‖ q_τ,i), p_τ ∝ p^(1/τ) (the logits divided by τ): Σ b·row is its gradient,
    checked against central differences of the softened KL itself, and XᵀX is the Fisher of the
    logits z/τ at the softened midpoint.  Without a reference the temperature changes nothing."""
    model = tiny_mlp(seed=2, d_in=12, hidden=16, classes=5)
    x = np.random.default_rng(4).standard_normal((12, 12)).astype(np.float32)
    J, q = jacobians_by_finite_differences(model, x, ["W1", "W2"])
    ref = np.random.default_rng(5).dirichlet(np.ones(5), size=12)

    def soft(p: np.ndarray) -> np.ndarray:
        e = p ** (1.0 / tau)
        return e / e.sum(-1, keepdims=True)

    g = engine_matrix(model, x, fisher_rows=8, reference=ref[:, None, :], temperature=tau)
    X, b = g.X.astype(np.float64), g.offsets
    assert b is not None
    grad = sum(J[i].T @ (soft(q[i]) - soft(ref[i])) / tau for i in range(12))
    np.testing.assert_allclose(X.T @ b, grad, rtol=1e-4, atol=1e-6 * np.abs(grad).max())
    # the same gradient from the softened KL's values (central differences, float64 weights as inputs)
    m64 = float64_with_weight_inputs(model, ["W1", "W2"])
    sess = ort.InferenceSession(m64.SerializeToString(), providers=["CPUExecutionProvider"])
    w0 = {t.name: numpy_helper.to_array(t).astype(np.float64) for t in model.graph.initializer}

    def kl_at(w1: np.ndarray) -> float:
        z = np.asarray(sess.run(None, {"x": x.astype(np.float64), "W1": w1, "W2": w0["W2"]})[0])
        e = np.exp((z - z.max(-1, keepdims=True)) / tau)
        qt, pt = e / e.sum(-1, keepdims=True), soft(ref)
        return float((pt * (np.log(pt) - np.log(qt))).sum())

    for j in (3, 17, 40):
        d = np.zeros(w0["W1"].size)
        d[j] = 1e-5
        d = d.reshape(w0["W1"].shape)
        fd = (kl_at(w0["W1"] + d) - kl_at(w0["W1"] - d)) / 2e-5
        assert fd == pytest.approx(grad[j], rel=1e-3, abs=1e-7)
    F_mid = sum(
        J[i].T @ (np.diag(m) - np.outer(m, m)) @ J[i] / tau**2
        for i, m in enumerate(0.5 * (soft(q) + soft(ref)))
    )
    assert np.linalg.norm(X.T @ X - F_mid) / np.linalg.norm(F_mid) < 1e-4
    same = engine_matrix(model, x, fisher_rows=8, temperature=tau)  # no reference: the plain true Fisher
    np.testing.assert_array_equal(same.X, engine_matrix(model, x, fisher_rows=8).X)
