"""Weights read by several nodes (unrolled RNNs): one joint fit over every consumer's input rows, and
the segment runner's snapshot/restore that re-runs the recurrence with the fitted weight."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.activations import SegmentRunner, find_layers
from chita_onnx.sequential import LayerwiseOptions, layerwise_prune


def _two_consumers(rng: np.random.Generator, k: int = 4, out: int = 3) -> tuple[onnx.ModelProto, np.ndarray]:
    """``y1 = [u, u, 0, 0]·W`` and ``y2 = [0, 0, v, v]·W`` with ``W = ½[a; a; b; b]``: a 50% sparse ``W``
    (one copy of each duplicated row) reproduces both outputs exactly, but only a fit that sees both
    consumers' inputs can find it (the first consumer's inputs are zero on the rows of ``b``)."""
    a, b = rng.standard_normal((k, out)), rng.standard_normal((k, out))
    w = 0.5 * np.concatenate([a, a, b, b]).astype(np.float32)  # [4k, out]
    eye, zero = np.eye(k), np.zeros((k, k))
    d1 = np.concatenate([eye, eye, zero, zero], axis=1).astype(np.float32)  # u -> [u, u, 0, 0]
    d2 = np.concatenate([zero, zero, eye, eye], axis=1).astype(np.float32)  # v -> [0, 0, v, v]
    model = make_model(
        [
            helper.make_node("MatMul", ["u", "D1"], ["uu"], name="dup1"),
            helper.make_node("MatMul", ["uu", "W"], ["y1"], name="step1"),
            helper.make_node("MatMul", ["v", "D2"], ["vv"], name="dup2"),
            helper.make_node("MatMul", ["vv", "W"], ["y2"], name="step2"),
        ],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", k]) for n in ("u", "v")],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", out]) for n in ("y1", "y2")],
        [numpy_helper.from_array(m, n) for m, n in ((d1, "D1"), (d2, "D2"), (w, "W"))],
    )
    return model, w


def test_shared_weight_lists_every_consumer_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    model, _ = _two_consumers(np.random.default_rng(0))
    with caplog.at_level(logging.INFO, logger="chita_onnx.activations"):
        (site,) = find_layers(model, ["W"])
    assert site.shared and [c.node for c in site.consumers] == ["step1", "step2"]
    assert site.position == 1 and site.last_position == 3
    assert "fitted once on the inputs of all of them" in caplog.text
    assert "first one only" not in caplog.text


def test_shared_weight_used_differently_falls_back_to_the_first_consumer(caplog: pytest.LogCaptureFixture) -> None:
    w = np.ones((3, 3), np.float32)
    model = make_model(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="right"),
            helper.make_node("MatMul", ["W", "h"], ["y"], name="left"),  # W·h: the other orientation
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 3])],
        [numpy_helper.from_array(w, "W")],
    )
    with caplog.at_level(logging.WARNING, logger="chita_onnx.activations"):
        (site,) = find_layers(model, ["W"])
    assert site.shared and site.consumers == () and "first one only" in caplog.text


def test_joint_fit_recovers_a_planted_sparse_weight_used_by_two_matmuls(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    model, w = _two_consumers(rng)
    path = tmp_path / "shared.onnx"
    onnx.save(model, path)
    data = {n: rng.standard_normal((300, 4)).astype(np.float32) for n in ("u", "v")}
    cfg = CompressConfig(
        sparsity=0.5, method="layerwise", allocation="uniform", damp=1e-6, keep=("D1", "D2"),
        bn_recalibrate="off", bias_correction="off",
    )  # fmt: skip
    r = chita_onnx.compress(path, tmp_path / "p.onnx", data, cfg, eval_data=data)
    assert r.nnz == w.size // 2
    assert r.evaluation is not None and r.evaluation.max_abs_diff < 1e-3
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(tmp_path / "p.onnx").graph.initializer}["W"]
    half = w.shape[0] // 4
    for blk in range(2):  # one copy of each duplicated row of a, and of b, carries twice its weight
        pair = pruned[2 * blk * half : 2 * (blk + 1) * half]
        both = pair[:half] + pair[half:]
        np.testing.assert_allclose(both, 2 * w[2 * blk * half : 2 * blk * half + half], atol=1e-3)
        assert np.all((pair[:half] == 0) | (pair[half:] == 0))


def _recurrence(rng: np.random.Generator, steps: int = 4, h: int = 5, k: int = 3) -> onnx.ModelProto:
    """An unrolled RNN: ``h_{t+1} = tanh(x_t·Wx + h_t·Wh)``, ``y = h_T·Wo``, weights shared by the steps."""
    nodes = [helper.make_node("MatMul", ["x0", "Wx"], ["a0"], name="in0"), helper.make_node("Tanh", ["a0"], ["h1"])]
    for t in range(1, steps):
        nodes += [
            helper.make_node("MatMul", [f"x{t}", "Wx"], [f"p{t}"], name=f"in{t}"),
            helper.make_node("MatMul", [f"h{t}", "Wh"], [f"q{t}"], name=f"rec{t}"),
            helper.make_node("Add", [f"p{t}", f"q{t}"], [f"a{t}"]),
            helper.make_node("Tanh", [f"a{t}"], [f"h{t + 1}"]),
        ]
    nodes.append(helper.make_node("MatMul", [f"h{steps}", "Wo"], ["y"], name="out"))
    inits = [
        numpy_helper.from_array(rng.standard_normal(s).astype(np.float32) * 0.6, n)
        for n, s in (("Wx", (k, h)), ("Wh", (h, h)), ("Wo", (h, 2)))
    ]
    return make_model(
        nodes,
        [helper.make_tensor_value_info(f"x{t}", TensorProto.FLOAT, ["N", k]) for t in range(steps)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2])],
        inits,
    )


def _batches(rng: np.random.Generator, steps: int = 4, k: int = 3) -> list[dict[str, np.ndarray]]:
    return [{f"x{t}": rng.standard_normal((20, k)).astype(np.float32) for t in range(steps)} for _ in range(3)]


def test_restore_reruns_the_segment_with_the_new_weights() -> None:
    """snapshot → advance → change a weight → restore → advance equals a fresh run with that weight."""
    rng = np.random.default_rng(2)
    model = _recurrence(rng)
    batches = _batches(rng)
    new = rng.standard_normal((5, 5)).astype(np.float32)
    r = SegmentRunner(model, batches)
    r.advance(3)
    snap = r.snapshot()
    r.advance(len(r.nodes))
    r.set_initializer("Wh", new)
    r.restore(snap)
    got = r.run_to_end()["y"]
    fresh = SegmentRunner(model, batches)
    fresh.set_initializer("Wh", new)
    want = fresh.run_to_end()["y"]
    old = SegmentRunner(model, batches).run_to_end()["y"]
    for g, w_, o in zip(got, want, old, strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-6, atol=1e-6)
        assert not np.allclose(g, o)


def test_layerwise_pass_on_an_unrolled_rnn_fits_each_weight_once_on_every_step() -> None:
    rng = np.random.default_rng(3)
    model = _recurrence(rng)
    batches = _batches(rng)
    keep = {"Wx": 8, "Wh": 13, "Wo": 5}
    own = LayerwiseOptions(damp=1e-6, dense_targets=False)  # targets W̄·x from each layer's own inputs
    res = layerwise_prune(model, batches, keep=keep, opts=own)
    assert {r.name: r.kept for r in res.layers} == keep
    rows = {r.name: r.rows for r in res.layers}
    assert rows == {"Wx": 4 * 60, "Wh": 3 * 60, "Wo": 60}  # every step's rows, stacked
    # keeping every weight: the joint fit reproduces the dense model (the weights barely move)
    full = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    dense = layerwise_prune(model, batches, keep=full, opts=LayerwiseOptions(damp=1e-9))
    for t in model.graph.initializer:
        np.testing.assert_allclose(dense.weights[t.name], numpy_helper.to_array(t), atol=1e-3)
    # and the output layer after the recurrence saw the pruned recurrence (the runner went back):
    # its fit equals one made by hand on the pruned model's h_T
    pruned_model = onnx.ModelProto()
    pruned_model.CopyFrom(model)
    for t in pruned_model.graph.initializer:
        if t.name in ("Wx", "Wh"):
            t.CopyFrom(numpy_helper.from_array(res.weights[t.name], t.name))
    again = layerwise_prune(pruned_model, batches, keep={"Wo": 5}, opts=own)
    np.testing.assert_allclose(res.weights["Wo"], again.weights["Wo"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("groups", [1, 8])
def test_buffered_gram_accumulation_equals_one_product_over_all_rows(
    groups: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small row blocks (one time step of a few samples) are gathered before the Gram update; the
    statistics equal those of one product over all rows, whatever the flush points."""
    import chita_onnx.layerstats as ls

    rng = np.random.default_rng(4)
    g, d, m = groups, 60, 3
    blocks = [
        (rng.standard_normal((r, g, d)).astype(np.float32), rng.standard_normal((r, g, m)).astype(np.float32))
        for r in (5, 1, 17, 3, 70, 2, 9)
    ]
    geom = ls.LayerGeometry("conv", (g * m, d, 1), group=g, strides=(1,), dilations=(1,))
    x = np.concatenate([b[0] for b in blocks]).astype(np.float64)
    y = np.concatenate([b[1] for b in blocks]).astype(np.float64)
    monkeypatch.setattr(ls, "GATHER_MIN_D", 1)
    for flush_rows in (1, 7, 10_000):
        monkeypatch.setattr(ls, "FLUSH_ROWS", flush_rows)
        st = ls.LayerStats.empty(geom, cross=True)
        for xb, yb in blocks:
            ls._add_rows(st, xb, yb)
        assert flush_rows != 10_000 or st.pending  # the last small blocks wait for more rows
        ls.finalize_means(st)
        assert not st.pending and st.rows == x.shape[0]
        assert st.B is not None and st.yy is not None
        for k in range(g):
            np.testing.assert_allclose(st.H[k], x[:, k].T @ x[:, k], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(st.B[k], x[:, k].T @ y[:, k], rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(st.yy[k], (y[:, k] ** 2).sum(axis=0), rtol=1e-5)
        np.testing.assert_allclose(st.mean_p, x.mean(axis=0), rtol=1e-5, atol=1e-6)


def test_conv_weight_read_with_two_strides_is_fitted_on_both(tmp_path: Path) -> None:
    """One Conv weight read by two Conv nodes with different strides (a CQT-like filter bank applied at
    two hops): each node's sampled im2col rows must follow its own geometry.  The weight is already
    50% sparse, so pruning to 50% must keep it exactly, through the layer-wise pass (no fallback)."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((2, 1, 1, 8)).astype(np.float32)
    w[:, :, :, ::2] = 0.0
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 1, 64])
    outs = [
        helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["N", 2, 1, 8]),
        helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["N", 2, 1, 29]),
    ]
    model = make_model(
        [
            helper.make_node("Conv", ["x", "W"], ["y1"], name="hop8", strides=[1, 8]),
            helper.make_node("Conv", ["x", "W"], ["y2"], name="hop2", strides=[1, 2]),
        ],
        [x],
        outs,
        [numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "bank.onnx"
    onnx.save(model, path)
    data = {"x": rng.standard_normal((40, 1, 1, 64)).astype(np.float32)}
    cfg = CompressConfig(
        sparsity=0.5, method="layerwise", allocation="uniform", damp=1e-6, max_rows=1, bn_recalibrate="off",
        bias_correction="off",
    )  # fmt: skip
    r = chita_onnx.compress(path, tmp_path / "p.onnx", data, cfg, eval_data=data)
    assert r.method == "layerwise"
    assert r.nnz == w.size // 2
    assert r.evaluation is not None and r.evaluation.max_abs_diff < 1e-4


@pytest.mark.parametrize("dense_targets", [True, False])
def test_consumers_of_shared_weights_are_read_in_one_segment_with_the_same_result(
    dense_targets: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The time steps of an unrolled RNN are read in one segment per runner up to the next solve
    (``_prefetch``) instead of one segment per node: the same weights, far fewer sessions."""
    import chita_onnx.activations as act
    import chita_onnx.sequential as seq

    rng = np.random.default_rng(5)
    model = _recurrence(rng, steps=6)
    batches = _batches(rng, steps=6)
    keep = {"Wx": 8, "Wh": 13, "Wo": 5}
    opts = LayerwiseOptions(dense_targets=dense_targets)
    made: list[int] = []
    real = act._session

    def counting(*a: object, **k: object) -> object:
        made.append(1)
        return real(*a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(act, "_session", counting)
    merged = layerwise_prune(model, batches, keep=keep, opts=opts)
    n_merged = len(made)
    made.clear()
    monkeypatch.setattr(seq, "_prefetch_ends", lambda events, sites: list(range(len(events))))
    per_node = layerwise_prune(model, batches, keep=keep, opts=opts)
    assert n_merged < len(made) / 2
    assert [r.name for r in merged.layers] == [r.name for r in per_node.layers]
    for name in keep:
        np.testing.assert_array_equal(merged.weights[name], per_node.weights[name])
    for a, b in zip(merged.layers, per_node.layers, strict=True):
        assert (a.rows, a.kept) == (b.rows, b.kept)
        assert a.error == pytest.approx(b.error, rel=1e-9, abs=1e-12)


def test_prefetch_runs_stop_at_each_solve_and_before_a_recurrent_node() -> None:
    """``_prefetch_ends``: a run starts at a consumer that is not its weight's last, and ends at the next
    last consumer (where the pruned model changes) or before a recurrent node."""
    from chita_onnx.rnnlayers import RecurrentSite
    from chita_onnx.sequential import _prefetch_ends

    class Shared:
        def __init__(self, n: int) -> None:
            self.consumers = tuple(range(n))

    rec = RecurrentSite.__new__(RecurrentSite)
    sites = [Shared(3), Shared(0), Shared(2), rec]
    # positions: A0 A1 B A2 | C0 | R C1
    events = [(0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 0, 2), (4, 2, 0), (5, 3, 0), (6, 2, 1)]
    ends = _prefetch_ends(events, sites)
    assert ends == [2, 1, 2, 3, 4, 5, 6]
