"""Layer-wise reconstruction of LSTM/GRU/RNN weights (chita_onnx.rnnstats, chita_onnx.rnnlayers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.activations import Arrays, working_copy
from chita_onnx.errors import ModelError
from chita_onnx.graph import densify, find_prunable
from chita_onnx.rnnlayers import recurrent_sites
from chita_onnx.rnnstats import (
    Part,
    RecurrentGeometry,
    allot,
    gate_preactivations,
    num_step_rows,
    part_rows,
    parts,
    step_rows,
)
from chita_onnx.sequential import LayerwiseOptions, layerwise_prune
from chita_onnx.solver.budgets import keep_count

G = {"LSTM": 4, "GRU": 3, "RNN": 1}


def rnn_model(
    op: str,
    W: np.ndarray,
    R: np.ndarray,
    B: np.ndarray,
    *,
    T: int,
    direction: str = "bidirectional",
    lens: np.ndarray | None = None,
    h0: bool = False,
    head: int = 0,
    Y_named: bool = True,
    **attrs: Any,
) -> onnx.ModelProto:
    """``x [T, N, F] → op → Y``, or with ``head`` classes ``x [N, T, F] → Transpose → op → Y_h
    batch-major, flattened → MatMul Wout → logits`` (layout 0: onnxruntime has no layout-1 kernel)."""
    D, GH, F = W.shape
    H = GH // G[op]
    N = "N"
    inits = [numpy_helper.from_array(W.astype(np.float32), "W"), numpy_helper.from_array(R.astype(np.float32), "R")]
    inits.append(numpy_helper.from_array(B.astype(np.float32), "B"))
    ins = ["xt" if head else "x", "W", "R", "B", "", ""]
    graph_inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [N, T, F] if head else [T, N, F])]
    if lens is not None:
        inits.append(numpy_helper.from_array(lens.astype(np.int32), "lens"))
        ins[4] = "lens"
    if h0:
        graph_inputs.append(helper.make_tensor_value_info("h0", TensorProto.FLOAT, [D, N, H]))
        ins[5] = "h0"
    while not ins[-1]:
        ins.pop()
    y = "Y" if Y_named else ""
    nodes = [helper.make_node(op, ins, [y, "Yh"], hidden_size=H, direction=direction, **attrs)]
    if head:
        rng = np.random.default_rng(5)
        inits.append(numpy_helper.from_array(np.array([0, -1], np.int64), "flat"))
        inits.append(numpy_helper.from_array((0.3 * rng.standard_normal((D * H, head))).astype(np.float32), "Wout"))
        nodes.insert(0, helper.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2]))
        nodes += [
            helper.make_node("Transpose", ["Yh"], ["hb"], perm=[1, 0, 2]),
            helper.make_node("Reshape", ["hb", "flat"], ["hf"]),
            helper.make_node("MatMul", ["hf", "Wout"], ["logits"]),
        ]
        outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [N, head])]
    else:
        outputs = [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 4)]
    g = helper.make_graph(nodes, "rnn", graph_inputs, outputs, inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 14)])
    m.ir_version = 8
    onnx.checker.check_model(m)
    return m


def _run(m: onnx.ModelProto, feeds: dict[str, np.ndarray], out: str = "Y") -> np.ndarray:
    s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(s.run([out], feeds)[0])


def _sig(a: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-a)))


def reference_lstm_preacts(
    x: np.ndarray, W: np.ndarray, R: np.ndarray, B: np.ndarray, h0: np.ndarray, lens: np.ndarray, reverse: list[bool]
) -> list[list[np.ndarray]]:
    """Gate pre-activations of an LSTM by its own recurrence (float64, time-major ``x [T, N, F]``):
    per direction, per valid step in time-major order (``t`` outer, ``n`` inner), ``(4H,)``."""
    T, N, _ = x.shape
    D, GH, _ = W.shape
    H = GH // 4
    out: list[list[np.ndarray]] = []
    for d in range(D):
        pre = np.zeros((T, N, GH))
        for n in range(N):
            h, c = h0[d, n].astype(np.float64), np.zeros(H)
            steps = range(lens[n] - 1, -1, -1) if reverse[d] else range(lens[n])
            for t in steps:
                g = W[d] @ x[t, n] + R[d] @ h + B[d, :GH] + B[d, GH:]
                pre[t, n] = g
                i, o, f, cc = _sig(g[:H]), _sig(g[H : 2 * H]), _sig(g[2 * H : 3 * H]), np.tanh(g[3 * H :])
                c = f * c + i * cc
                h = o * np.tanh(c)
        out.append([pre[t, n] for t in range(T) for n in range(N) if t < lens[n]])
    return out


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("direction", ["bidirectional", "reverse"])
def test_rows_times_weights_are_the_gate_preactivations(layout: int, direction: str) -> None:
    rng = np.random.default_rng(3)
    T, N, F, H = 5, 3, 4, 3
    D = 2 if direction == "bidirectional" else 1
    W, R = 0.6 * rng.standard_normal((D, 4 * H, F)), 0.6 * rng.standard_normal((D, 4 * H, H))
    B = 0.2 * rng.standard_normal((D, 8 * H))
    lens = np.array([5, 2, 4])
    x = rng.standard_normal((T, N, F)).astype(np.float32)
    h0 = (0.5 * rng.standard_normal((D, N, H))).astype(np.float32)
    m = rnn_model("LSTM", W, R, B, T=T, direction=direction, lens=lens, h0=True)
    Y = _run(m, {"x": x, "h0": h0})  # [T, D, N, H]
    # layout 1 holds the same tensors batch-major: X [N, T, F], Y [N, T, D, H], initial_h [N, D, H]
    xf = x if layout == 0 else np.swapaxes(x, 0, 1)
    hf = h0 if layout == 0 else np.swapaxes(h0, 0, 1)
    Y = Y if layout == 0 else np.transpose(Y, (2, 0, 1, 3))
    geom = RecurrentGeometry("LSTM", D, H, F, direction=direction, layout=layout)
    ref = reference_lstm_preacts(x, W, R, B, h0, lens, [geom.reverse(d) for d in range(D)])
    for d in range(D):
        got = gate_preactivations(xf, Y, W, R, geom, d, initial_h=hf, lens=lens) + B[d, : 4 * H] + B[d, 4 * H :]
        assert got.shape == (int(lens.sum()), 4 * H)
        np.testing.assert_allclose(got, np.stack(ref[d]), atol=2e-5)


def test_rows_without_initial_state_or_lengths_start_from_zeros() -> None:
    rng = np.random.default_rng(4)
    T, N, F, H = 4, 2, 3, 2
    W, R, B = rng.standard_normal((1, 4 * H, F)), rng.standard_normal((1, 4 * H, H)), np.zeros((1, 8 * H))
    x = rng.standard_normal((T, N, F)).astype(np.float32)
    Y = _run(rnn_model("LSTM", W, R, B, T=T, direction="forward"), {"x": x})
    geom = RecurrentGeometry("LSTM", 1, H, F)
    z = step_rows(x, Y, geom, 0)
    np.testing.assert_array_equal(z[:N, F:], 0.0)  # h_{-1} = 0
    np.testing.assert_allclose(z[N:, F:], Y[:-1, 0].reshape(-1, H))
    ref = reference_lstm_preacts(x, W, R, B, np.zeros((1, N, H)), np.full(N, T), [False])
    np.testing.assert_allclose(gate_preactivations(x, Y, W, R, geom, 0), np.stack(ref[0]), atol=2e-5)


def test_parts_and_budget_split() -> None:
    lstm = RecurrentGeometry("LSTM", 2, 3, 4, direction="bidirectional")
    assert [(p.direction, p.r0, p.r1, p.cols) for p in parts(lstm)] == [(0, 0, 12, "xh"), (1, 0, 12, "xh")]
    assert [p.cols for p in parts(lstm, fit_r=False)] == ["x", "x"]
    gru = RecurrentGeometry("GRU", 1, 3, 4, linear_before_reset=True)
    assert [(p.r0, p.r1, p.cols) for p in parts(gru)] == [(0, 6, "xh"), (6, 9, "x"), (6, 9, "h")]
    assert [p.cols for p in parts(RecurrentGeometry("GRU", 1, 3, 4))] == ["xh", "x", "rh"]
    assert [p.cols for p in parts(RecurrentGeometry("GRU", 1, 3, 4), fit_w=False)] == ["h", "rh"]
    with pytest.raises(ModelError, match="linear_before_reset=0"):
        parts(RecurrentGeometry("GRU", 1, 3, 4, sigmoid_gates=False))
    assert [p.cols for p in parts(RecurrentGeometry("GRU", 1, 3, 4, sigmoid_gates=False), fit_r=False)] == ["x"]
    scores = [np.array([[5.0, 1.0], [0.5, 4.0]]), np.array([[3.0, 0.1, 2.0]])]
    assert allot(scores, 3) == [2, 1]
    assert allot(scores, 7) == [4, 3]
    assert sum(allot(scores, 5)) == 5


def _planted(op: str, D: int, H: int, F: int, density: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    W = rng.standard_normal((D, G[op] * H, F)) * (rng.random((D, G[op] * H, F)) < density)
    R = 0.7 * rng.standard_normal((D, G[op] * H, H)) * (rng.random((D, G[op] * H, H)) < density)
    return W, R


@pytest.mark.parametrize(
    ("op", "attrs"), [("LSTM", {}), ("GRU", {"linear_before_reset": 1}), ("GRU", {"clip": 1.5}), ("RNN", {})]
)
def test_planted_sparse_recurrent_weights_are_recovered(op: str, attrs: dict[str, Any]) -> None:
    """The dense model's W/R are exactly sparse: pruning to their count finds their support and the
    values (the targets are exactly reachable; only the tiny ridge damping pulls)."""
    D, H, F, T = 2, 4, 5, 6
    W, R = _planted(op, D, H, F, 0.35, seed=11)
    B = 0.1 * np.random.default_rng(2).standard_normal((D, 2 * G[op] * H))
    m = working_copy(rnn_model(op, W, R, B, T=T, Y_named=False, head=3, **attrs))
    rng = np.random.default_rng(7)
    batches: list[Arrays] = [{"x": rng.standard_normal((16, T, F)).astype(np.float32)} for _ in range(3)]
    kW, kR = int(np.count_nonzero(W)), int(np.count_nonzero(R))
    res = layerwise_prune(m, batches, keep={"W": kW, "R": kR}, opts=LayerwiseOptions(damp=1e-6))
    Wn, Rn = res.weights["W"], res.weights["R"]
    assert np.count_nonzero(Wn) + np.count_nonzero(Rn) == kW + kR
    np.testing.assert_array_equal(Wn != 0, W != 0)
    np.testing.assert_array_equal(Rn != 0, R != 0)
    np.testing.assert_allclose(Wn, W, atol=1e-3)
    np.testing.assert_allclose(Rn, R, atol=1e-3)
    assert res.layers[0].error <= 1e-6 * res.layers[0].energy


def test_refit_on_a_mask_and_the_budget_across_directions() -> None:
    """A wrong budget per tensor (all of it on W) still spends exactly keep[W] + keep[R] on the node;
    the mask re-fit keeps exactly the mask and lowers the error of the masked dense weights."""
    D, H, F, T = 2, 3, 4, 5
    rng = np.random.default_rng(1)
    W, R = rng.standard_normal((D, 4 * H, F)), 0.5 * rng.standard_normal((D, 4 * H, H))
    m = working_copy(rnn_model("LSTM", W, R, np.zeros((D, 8 * H)), T=T, head=2))
    batches: list[Arrays] = [{"x": rng.standard_normal((20, T, F)).astype(np.float32)} for _ in range(2)]
    res = layerwise_prune(m, batches, keep={"W": 40, "R": 0}, opts=LayerwiseOptions())
    assert sum(int(np.count_nonzero(v)) for v in res.weights.values()) == 40
    masks = {"W": np.abs(W) > 0.8, "R": np.abs(R) > 0.4}
    ref = layerwise_prune(m, batches, masks=masks, opts=LayerwiseOptions(diagnostics=True))
    np.testing.assert_array_equal(ref.weights["W"] != 0, masks["W"])
    np.testing.assert_array_equal(ref.weights["R"] != 0, masks["R"])
    rep = ref.layers[0]
    assert rep.error <= rep.masked_error


def test_gru_reset_rows_reproduce_the_candidate_preactivation() -> None:
    """linear_before_reset=0: the candidate gate reads W_h x + R_h (r ⊙ h); the rows r ⊙ h built from
    the step rows and the dense reset gate agree with a GRU recurrence run independently (clip on)."""
    rng = np.random.default_rng(8)
    T, N, F, H, D, clip = 5, 3, 4, 3, 2, 1.2
    W, R = rng.standard_normal((D, 3 * H, F)), rng.standard_normal((D, 3 * H, H))
    B = 0.3 * rng.standard_normal((D, 6 * H))
    lens = np.array([5, 3, 1])
    x = rng.standard_normal((T, N, F)).astype(np.float32)
    Y = _run(rnn_model("GRU", W, R, B, T=T, lens=lens, clip=clip), {"x": x})
    geom = RecurrentGeometry("GRU", D, H, F, direction="bidirectional", clip=clip)
    for d in range(D):
        pre = np.zeros((T, N, H))

        def gate(k: int, xt: np.ndarray, h: np.ndarray, d: int = d) -> np.ndarray:
            sl = slice(k * H, (k + 1) * H)
            out: np.ndarray = W[d, sl] @ xt + R[d, sl] @ h + B[d, sl] + B[d, 3 * H + k * H : 3 * H + (k + 1) * H]
            return out

        for n in range(N):
            h = np.zeros(H)
            for t in range(lens[n] - 1, -1, -1) if d == 1 else range(lens[n]):
                zt = _sig(np.clip(gate(0, x[t, n], h), -clip, clip))
                rt = _sig(np.clip(gate(1, x[t, n], h), -clip, clip))
                a = W[d, 2 * H :] @ x[t, n] + R[d, 2 * H :] @ (rt * h) + B[d, 2 * H : 3 * H] + B[d, 5 * H :]
                pre[t, n] = a
                h = (1 - zt) * np.tanh(np.clip(a, -clip, clip)) + zt * h
        ref = [pre[t, n] for t in range(T) for n in range(N) if t < lens[n]]
        z = step_rows(x, Y, geom, d, lens=lens)
        J = np.concatenate([W, R], axis=2)[d]
        got = part_rows(z, Part(d, 2 * H, 3 * H, "x"), geom) @ W[d, 2 * H :].T
        got = got + part_rows(z, Part(d, 2 * H, 3 * H, "rh"), geom, J, B[d]) @ R[d, 2 * H :].T
        got = got + B[d, 2 * H : 3 * H] + B[d, 5 * H :]
        np.testing.assert_allclose(got, np.stack(ref), atol=3e-5)


def test_gru_with_a_non_sigmoid_reset_gate_is_refused_by_the_pass() -> None:
    W, R = _planted("GRU", 1, 3, 4, 1.0, seed=0)
    acts: dict[str, Any] = {"activations": ["HardSigmoid", "Tanh"]}
    m = working_copy(rnn_model("GRU", W, R, np.zeros((1, 18)), T=3, direction="forward", **acts))
    with pytest.raises(ModelError, match="linear_before_reset=0"):
        recurrent_sites(m, ["W", "R"])
    _, sites, rest = recurrent_sites(m, ["W"])  # W alone reads x only: exact
    assert len(sites) == 1 and sites[0].R is None and rest == []


def test_default_compress_prunes_an_lstm_classifier_layer_by_layer(tmp_path: Path) -> None:
    D, H, F, T = 2, 6, 5, 7
    rng = np.random.default_rng(9)
    W, R = 0.6 * rng.standard_normal((D, 4 * H, F)), 0.4 * rng.standard_normal((D, 4 * H, H))
    src, out = tmp_path / "lstm.onnx", tmp_path / "out.onnx"
    onnx.save(rnn_model("LSTM", W, R, np.zeros((D, 8 * H)), T=T, head=4), src)
    assert {"W", "R"} <= {t.name for t in find_prunable(onnx.load(src))}
    x = rng.standard_normal((200, T, F)).astype(np.float32)
    report = chita_onnx.compress(src, out, {"x": x}, CompressConfig(sparsity=0.6, num_samples=160))
    assert report.method == "layerwise"
    assert str(report.solver["method_choice"]).startswith("method auto: layerwise")
    pruned = densify(onnx.load(out))
    vals = {t.name: numpy_helper.to_array(t) for t in pruned.graph.initializer}
    nnz = sum(int(np.count_nonzero(vals[n])) for n in ("W", "R", "Wout"))
    assert nnz == report.k == keep_count(0.6, report.p)
    assert report.evaluation is not None and report.evaluation.agreement is not None
    assert report.evaluation.agreement >= 0.8


def test_a_sequence_too_long_to_unroll_still_gets_the_layerwise_default(tmp_path: Path) -> None:
    """Gradients refuse to unroll 1,100 steps (clear error); the default needs them only for the OBD
    allocation, which then falls back to magnitude, and still keeps exactly k weights."""
    D, H, F, T = 1, 3, 2, 1100
    rng = np.random.default_rng(2)
    W, R = rng.standard_normal((D, 4 * H, F)), 0.3 * rng.standard_normal((D, 4 * H, H))
    src, out = tmp_path / "long.onnx", tmp_path / "out.onnx"
    onnx.save(rnn_model("LSTM", W, R, np.zeros((D, 8 * H)), T=T, direction="forward", head=2), src)
    x = rng.standard_normal((24, T, F)).astype(np.float32)
    with pytest.raises(chita_onnx.ChitaError, match="too many to unroll"):
        chita_onnx.compress(src, tmp_path / "chita.onnx", {"x": x}, CompressConfig(sparsity=0.5, method="chita"))
    report = chita_onnx.compress(src, out, {"x": x}, CompressConfig(sparsity=0.5))
    assert report.method == "layerwise" and report.solver["allocation"] == "magnitude"
    assert report.nnz == report.k


@pytest.mark.parametrize("layout", [0, 1])
@pytest.mark.parametrize("lens", [None, [5, 0, 2, 7]])
def test_num_step_rows_counts_what_step_rows_builds(layout: int, lens: list[int] | None) -> None:
    rng = np.random.default_rng(3)
    T, N, D, H, F = 5, 4, 2, 3, 2
    geom = RecurrentGeometry("LSTM", D, H, F, direction="bidirectional", layout=layout)
    X = rng.normal(size=(T, N, F) if layout == 0 else (N, T, F))
    Y = rng.normal(size=(T, D, N, H) if layout == 0 else (N, T, D, H))
    L = None if lens is None else np.asarray(lens, np.int64)
    for k in range(D):
        assert num_step_rows(X, geom, L) == step_rows(X, Y, geom, k, lens=L).shape[0]


def _with(m: onnx.ModelProto, weights: dict[str, np.ndarray]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(m)
    for t in out.graph.initializer:
        if t.name in weights:
            t.CopyFrom(numpy_helper.from_array(weights[t.name].astype(np.float32), t.name))
    return out


@pytest.mark.parametrize(("op", "attrs"), [("LSTM", {}), ("GRU", {"linear_before_reset": 1}), ("GRU", {})])
def test_closed_loop_refit_keeps_the_support_and_brings_the_hidden_states_closer(
    op: str, attrs: dict[str, Any]
) -> None:
    """The closed-loop rounds re-fit on the support the first fit chose (same budget, same mask) and
    only ever lower the node's hidden-state error against the dense model, measured here with
    onnxruntime on the calibration batches; with a strong recurrence (the first fit's rows, from the
    dense recurrence, then differ most from the pruned node's own) they lower it."""
    D, H, F, T = 2, 6, 5, 12
    rng = np.random.default_rng(3)
    W, R = rng.standard_normal((D, G[op] * H, F)) / 2, 4.0 * rng.standard_normal((D, G[op] * H, H)) / np.sqrt(H)
    B = 0.1 * rng.standard_normal((D, 2 * G[op] * H))
    model = rnn_model(op, W, R, B, T=T, **attrs)  # x [T, N, F] -> Y [T, D, N, H]
    m = working_copy(model)
    batches: list[Arrays] = [{"x": rng.standard_normal((T, 24, F)).astype(np.float32)} for _ in range(2)]
    keep = {"W": W.size // 3, "R": R.size // 3}
    results = {n: layerwise_prune(m, batches, keep=keep, opts=LayerwiseOptions(recurrent_refits=n)) for n in (0, 1, 3)}
    for res in results.values():
        for name in ("W", "R"):
            np.testing.assert_array_equal(res.weights[name] != 0, results[0].weights[name] != 0)
    dense = [_run(model, b) for b in batches]

    def hidden_error(weights: dict[str, np.ndarray]) -> float:
        pruned = _with(model, weights)
        return float(
            sum(np.sum((_run(pruned, b).astype(np.float64) - y) ** 2) for b, y in zip(batches, dense, strict=True))
        )

    errors = {n: hidden_error(res.weights) for n, res in results.items()}
    assert errors[3] <= errors[1] * (1 + 1e-5) and errors[1] <= errors[0] * (1 + 1e-5)
    assert errors[3] < 0.95 * errors[0]


@pytest.mark.parametrize("bad", [-1, 11, 1.5, True])
def test_recurrent_refits_is_validated(bad: Any) -> None:
    from chita_onnx.errors import ConfigError

    with pytest.raises(ConfigError, match="--recurrent-refits"):
        CompressConfig(recurrent_refits=bad)
