"""Per-class logit offsets of softmax heads (``--class-offsets``): the convex fit, the graph passes that
find a softmax head and add the offsets, and the step inside ``compress``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.errors import ModelError, SolverError
from chita_onnx.heads import add_class_offset, softmax_head
from chita_onnx.solver.offsets import _evaluate, fit_class_offsets


def softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    z = z - z.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


# ----------------------------------------------------------------------------------------- the fit


def test_planted_offsets_are_recovered() -> None:
    """Pruned logits = dense logits + a per-class shift c: the fit returns −c (up to the constant
    that softmax ignores), and the mean class probabilities match the dense ones."""
    rng = np.random.default_rng(0)
    Zd = 3.0 * rng.standard_normal((400, 40))
    c = 2.0 * rng.standard_normal(40)
    pbar = softmax(Zd).mean(axis=0)
    res = fit_class_offsets((Zd + c).astype(np.float32), pbar, tol=1e-14, max_iter=2000)
    shift = res.beta + c
    assert np.ptp(shift) < 1e-3
    _, qbar, _ = _evaluate((Zd + c).astype(np.float32), pbar, res.beta, np.zeros(0, np.int64))
    assert np.max(np.abs(qbar - pbar)) < 1e-5  # q̄ = p̄
    assert res.converged and res.after <= res.before


def test_objective_never_increases_and_the_box_holds() -> None:
    """A class the dense model never predicts (p̄_c = 0) would go to −∞: it stops at the bound."""
    rng = np.random.default_rng(1)
    Z = rng.standard_normal((300, 12)) * 2
    pbar = softmax(rng.standard_normal((300, 12)) * 2).mean(axis=0)
    pbar[3] = 0.0
    pbar /= pbar.sum()
    res = fit_class_offsets(Z, pbar, bound=2.0)
    assert np.all(np.diff(res.trace) <= 1e-12)
    assert res.after <= res.before
    assert np.max(np.abs(res.beta)) <= 2.0 + 1e-12
    assert res.beta[3] == pytest.approx(-2.0)


def test_no_change_needed_gives_zero_offsets() -> None:
    """When the pruned logits are the dense ones the optimum is β = 0 (up to a constant)."""
    rng = np.random.default_rng(2)
    Z = rng.standard_normal((200, 30)) * 2
    res = fit_class_offsets(Z, softmax(Z).mean(axis=0))
    assert np.ptp(res.beta) < 1e-6
    assert res.after == pytest.approx(res.before, rel=1e-6)  # float32 logits: rounding-level moves only


@pytest.mark.parametrize(
    ("Z", "p"),
    [
        (np.zeros((0, 3)), np.full(3, 1 / 3)),
        (np.zeros((4, 1)), np.ones(1)),
        (np.zeros((4, 3)), np.full(2, 0.5)),
        (np.zeros((4, 3)), np.array([0.5, 0.6, -0.1])),
        (np.full((4, 3), np.nan), np.full(3, 1 / 3)),
    ],
)
def test_bad_input_is_refused(Z: np.ndarray, p: np.ndarray) -> None:
    with pytest.raises(SolverError):
        fit_class_offsets(Z, p)


# ------------------------------------------------------------------------------------- the passes


def head_model(
    *, bias: bool = True, identity: bool = True, raw_output: bool = False, opset: int = 13, rank3: bool = False,
    axis: int = -1, ir: int = 8, seed: int = 0, view: bool = False,
) -> onnx.ModelProto:  # fmt: skip
    """``x [N,F] (or [N,T,F]) → MatMul W → (Add b) → (Identity) → Softmax(axis)``; ``raw_output`` also
    returns the logits (so the Add may not be changed)."""
    rng = np.random.default_rng(seed)
    F, C = 5, 7
    shape_x = ["N", 3, F] if rank3 else ["N", F]
    inits = [numpy_helper.from_array(rng.standard_normal((F, C)).astype(np.float32), "W")]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["mm"])]
    last = "mm"
    if rank3:  # classes on axis 1: [N, T, C] → [N, C, T]
        nodes.append(helper.make_node("Transpose", ["mm"], ["mmt"], perm=[0, 2, 1]))
        last = "mmt"
    if bias:
        b = rng.standard_normal((C, 1) if rank3 else C).astype(np.float32)
        inits.append(numpy_helper.from_array(b, "b"))
        nodes.append(helper.make_node("Add", [last, "b"], ["z"]))
        last = "z"
    if identity:
        nodes.append(helper.make_node("Identity", [last], ["zi"]))
        last = "zi"
    nodes.append(helper.make_node("Softmax", [last], ["probs"], axis=axis))
    if view:  # the output is a transposed view of the probabilities
        nodes.append(helper.make_node("Transpose", ["probs"], ["y"], perm=[1, 0]))
    else:
        nodes.append(helper.make_node("Identity", ["probs"], ["y"]))
    dims = ["N", "a", "b"] if rank3 else ["N", "a"]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)]
    if raw_output:
        outputs.append(helper.make_tensor_value_info(last, TensorProto.FLOAT, dims))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_x)
    graph = helper.make_graph(nodes, "head", [x], outputs, inits)
    if ir < 4:
        graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    m.ir_version = ir
    return m


def run(model: onnx.ModelProto, x: np.ndarray, name: str | None = None) -> np.ndarray:
    s = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return s.run([name] if name else None, {"x": x})[0]


def logits_of(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    head = softmax_head(model)
    assert head is not None
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(helper.make_tensor_value_info(head.logits, TensorProto.FLOAT, None))
    return run(m, x, head.logits)


@pytest.mark.parametrize(
    "kw",
    [
        {},  # MatMul → Add(b) → Identity → Softmax: folded into b
        {"bias": False},  # no bias: a new Add
        {"raw_output": True},  # the logits are an output too: a new Add, the raw output unchanged
        {"identity": False, "opset": 11, "axis": 1},  # opset 11, axis = last
        {"rank3": True, "axis": 1},  # classes on axis 1 of [N, C, ...]: offsets shaped (C, 1)
        {"ir": 3, "opset": 9, "axis": 1, "bias": False},  # IR 3: the new initializer is a graph input too
        {"view": True},  # Softmax → Transpose → output
    ],
)
def test_add_class_offset_shifts_exactly_the_logits(kw: dict[str, object]) -> None:
    model = head_model(**kw)  # type: ignore[arg-type]
    before = model.SerializeToString()
    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 3, 5) if kw.get("rank3") else (4, 5)).astype(np.float32)
    head = softmax_head(model)
    assert head is not None
    z = logits_of(model, x)
    ax = head.class_axis(z.ndim)
    assert ax is not None
    beta = rng.standard_normal(z.shape[ax])
    out = add_class_offset(model, head, beta, z.ndim)
    assert model.SerializeToString() == before  # the input is not modified
    onnx.checker.check_model(out)
    shape = [1] * z.ndim
    shape[ax] = -1
    want = softmax(z.astype(np.float64) + beta.reshape(shape), axis=ax)
    assert head.direct != bool(kw.get("view"))
    if kw.get("view"):
        want = want.T
    np.testing.assert_allclose(run(out, x, "y"), want, rtol=1e-5, atol=1e-6)
    folded = kw.get("bias", True) and not kw.get("raw_output")
    assert len(out.graph.node) == len(model.graph.node) + (0 if folded else 1)
    if kw.get("raw_output"):  # the other reader of the logits sees them unchanged
        np.testing.assert_allclose(run(out, x, "zi"), z, rtol=1e-6)
    np.testing.assert_allclose(  # zero offsets change nothing
        run(add_class_offset(model, head, np.zeros_like(beta), z.ndim), x, "y"), run(model, x, "y"), rtol=1e-6
    )


@pytest.mark.parametrize(("gemm_beta", "bias_shape"), [(1.0, (3,)), (0.5, (1, 3)), (0.0, (3,))])
def test_a_gemm_heads_bias_takes_the_offsets(gemm_beta: float, bias_shape: tuple[int, ...]) -> None:
    """``Gemm(x, W, C)`` → Softmax (tf2onnx's fixed-batch Dense heads): the offsets go into ``C``,
    divided by the Gemm's ``beta``; with ``beta = 0`` the bias is not read, so a new ``Add``."""
    rng = np.random.default_rng(8)
    W = rng.standard_normal((5, 3)).astype(np.float32)
    C = rng.standard_normal(bias_shape).astype(np.float32)
    g = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "W", "C"], ["z"], beta=gemm_beta),
            helper.make_node("Softmax", ["z"], ["y"], axis=1),
        ],
        "gemm_head",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])],
        [numpy_helper.from_array(W, "W"), numpy_helper.from_array(C, "C")],
    )
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    x = rng.standard_normal((4, 5)).astype(np.float32)
    head = softmax_head(model)
    assert head is not None
    beta = rng.standard_normal(3)
    out = add_class_offset(model, head, beta, 2)
    z = x.astype(np.float64) @ W + gemm_beta * C.reshape(1, 3)
    np.testing.assert_allclose(run(out, x, "y"), softmax(z + beta, axis=1), rtol=1e-5, atol=1e-6)
    assert len(out.graph.node) == len(model.graph.node) + (1 if gemm_beta == 0.0 else 0)


def test_heads_that_are_not_one_softmax_axis() -> None:
    m = head_model(rank3=True, axis=1, opset=11)  # opset 11: softmax over the flattened [C·F] tail
    head = softmax_head(m)
    assert head is not None and head.class_axis(3) is None
    with pytest.raises(ModelError, match="not one class axis"):
        add_class_offset(m, head, np.zeros(3), 3)
    sig = head_model()
    sig.graph.node[-2].op_type = "Sigmoid"
    del sig.graph.node[-2].attribute[:]
    assert softmax_head(sig) is None


# --------------------------------------------------------------------------------- inside compress


def many_class_model(seed: int = 0, F: int = 16, H: int = 24, C: int = 300) -> onnx.ModelProto:
    """``x → MatMul W1 → Relu → MatMul W2 → Add b → Softmax``: 300 classes, of which the data
    (below) make the dense model predict only a handful — a recogniser with a large dictionary."""
    rng = np.random.default_rng(seed)
    W2 = 0.4 * rng.standard_normal((H, C))
    W2[:, :6] *= 6.0
    inits = [
        numpy_helper.from_array((0.6 * rng.standard_normal((F, H))).astype(np.float32), "W1"),
        numpy_helper.from_array(W2.astype(np.float32), "W2"),
        numpy_helper.from_array(np.zeros(C, np.float32), "b2"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["m"]),
        helper.make_node("Add", ["m", "b2"], ["z"]),
        helper.make_node("Softmax", ["z"], ["y"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "many",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", F])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", C])],
        inits,
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_compress_fits_offsets_and_auto_keeps_the_better_candidate(tmp_path: Path) -> None:
    src = tmp_path / "in.onnx"
    onnx.save(many_class_model(), src)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    x = np.random.default_rng(3).standard_normal((200, 16)).astype(np.float32)
    reports = {}
    for mode in ("off", "on", "auto"):
        out = tmp_path / f"{mode}.onnx"
        reports[mode] = chita_onnx.compress(src, out, {"x": x}, CompressConfig(sparsity=0.8, class_offsets=mode))
        onnx.checker.check_model(str(out))
        run(onnx.load(str(out)), x[:4])  # loads and runs in stock onnxruntime
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest  # the input is never modified
    stats = {k: r.solver["statistics"] for k, r in reports.items()}
    assert "class offsets off" in stats["off"]
    assert "class offsets on" in stats["on"]
    # auto: chosen by the KL on held-out calibration samples, the lower of the two recorded scores
    auto = stats["auto"]
    assert "chosen by KL" in auto
    scores = dict(part.rsplit(" ", 1) for part in auto.split("samples: ")[1].rstrip(")").split(", "))
    on = float(scores["offsets"]) < float(scores["none"])
    assert ("class offsets on" in auto) == on
    # the offsets sit in the head's bias: no node was added
    assert len(onnx.load(str(tmp_path / "on.onnx")).graph.node) == 5


def test_a_kept_auto_decision_runs_every_sample_once_and_fits_on_all_of_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``auto`` decides on a subset of the calibration samples; when it keeps the offsets, the final
    fit reuses that subset's rows and runs only the other samples: every sample goes through the
    models once, and the fit sees the same rows (up to order) as one run over all of them."""
    import chita_onnx.reconstruct as rc

    calls: list[tuple[onnx.ModelProto, list[dict[str, np.ndarray]]]] = []
    fits: list[tuple[np.ndarray, np.ndarray]] = []
    head_rows, fit_rows = rc._head_rows, rc._fit_rows

    def spy_rows(dense, pruned, head, batches, *a, **k):  # type: ignore[no-untyped-def]
        calls.append((pruned, list(batches)))
        return head_rows(dense, pruned, head, batches, *a, **k)

    def spy_fit(Z, psum, *a, **k):  # type: ignore[no-untyped-def]
        fits.append((np.array(Z), np.array(psum)))
        return fit_rows(Z, psum, *a, **k)

    monkeypatch.setattr(rc, "_head_rows", spy_rows)
    monkeypatch.setattr(rc, "_fit_rows", spy_fit)
    src = tmp_path / "in.onnx"
    dense = many_class_model()
    onnx.save(dense, src)
    x = np.random.default_rng(3).standard_normal((100, 16)).astype(np.float32)
    cfg = CompressConfig(sparsity=0.9, class_offsets="auto", auto_distill=False)  # the layer-wise path under test
    rep = chita_onnx.compress(src, tmp_path / "o.onnx", {"x": x}, cfg)
    assert "class offsets on" in rep.solver["statistics"]  # kept on this model: the path under test
    assert len(calls) == 2 and len(fits) == 2
    seen = np.concatenate([b["x"] for _, batches in calls for b in batches])
    assert np.unique(seen, axis=0).shape[0] == seen.shape[0] >= 64 + 1  # each fitting sample once
    assert all(np.any(np.all(x == row, axis=1)) for row in seen)
    head = softmax_head(dense)
    assert head is not None
    full = head_rows(dense, calls[0][0], head, [{"x": seen}], {}, 0.0, 0)
    Z, psum = fits[-1]
    order = np.lexsort(Z.T[::-1])
    np.testing.assert_allclose(Z[order], full.Z[np.lexsort(full.Z.T[::-1])], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(psum / psum.sum(), full.psum_all / full.psum_all.sum(), rtol=1e-6)


def test_the_pass_leaves_the_head_tensors_and_the_offsets_then_run_no_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The layer-wise pass runs both models to the head after its last layer; the class offsets then
    use those tensors instead of running the dense and the pruned model again, and the written model
    is the one they give when they do run them."""
    import chita_onnx.reconstruct as rc
    from chita_onnx.sequential import layerwise_prune

    src = tmp_path / "in.onnx"
    dense = many_class_model()
    onnx.save(dense, src)
    x = np.random.default_rng(3).standard_normal((100, 16)).astype(np.float32)
    head = softmax_head(dense)
    assert head is not None
    # the pass's tail: both models' head tensors, the pruned one with the pass's weights
    batches = [{"x": x[:60]}, {"x": x[60:]}]
    res = layerwise_prune(dense, batches, keep={"W1": 100, "W2": 700}, tail=((head.probs,), (head.logits,)))
    assert res.tail is not None
    pruned = onnx.ModelProto()
    pruned.CopyFrom(dense)
    for t in pruned.graph.initializer:
        if t.name in res.weights:
            t.CopyFrom(numpy_helper.from_array(res.weights[t.name], t.name))
    for k, b in enumerate(batches):
        np.testing.assert_allclose(res.tail[0][head.probs][k], run(dense, b["x"]), rtol=1e-5, atol=1e-7)
        z = ort.InferenceSession(_with_output(pruned, head.logits).SerializeToString()).run([head.logits], b)[0]
        np.testing.assert_allclose(res.tail[1][head.logits][k], z, rtol=1e-5, atol=1e-5)

    runs: list[str] = []
    head_values = rc._head_values

    def spy(model, batches, name, spill):  # type: ignore[no-untyped-def]
        runs.append(name)
        return head_values(model, batches, name, spill)

    monkeypatch.setattr(rc, "_head_values", spy)
    cfg = CompressConfig(sparsity=0.9, class_offsets="auto", auto_distill=False)
    rep = chita_onnx.compress(src, tmp_path / "cached.onnx", {"x": x}, cfg)
    assert "class offsets on" in rep.solver["statistics"] and runs == []
    monkeypatch.setattr(rc, "_fill", lambda *a, **k: None)  # no cache: the models run
    rep2 = chita_onnx.compress(src, tmp_path / "run.onnx", {"x": x}, cfg)
    assert "class offsets on" in rep2.solver["statistics"] and runs
    a = run(onnx.load(str(tmp_path / "cached.onnx")), x)
    b = run(onnx.load(str(tmp_path / "run.onnx")), x)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _with_output(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    m.graph.output.append(onnx.ValueInfoProto(name=name))
    return m


def test_overwriting_the_logits_fits_the_same_offsets() -> None:
    """``overwrite_z`` (the fit may use ``Z``'s memory) changes nothing but ``Z``; without it ``Z`` is
    left as it was."""
    rng = np.random.default_rng(12)
    Z = (3 * rng.standard_normal((300, 40))).astype(np.float32)
    pbar = softmax(rng.standard_normal(40))
    before = Z.copy()
    kept = fit_class_offsets(Z, pbar, max_iter=20)
    np.testing.assert_array_equal(Z, before)
    over = fit_class_offsets(Z, pbar, max_iter=20, overwrite_z=True)
    np.testing.assert_array_equal(over.beta, kept.beta)
    assert over.trace == kept.trace
    assert not np.array_equal(Z, before)  # its memory was used


@pytest.mark.parametrize("chunk", [7, 10_000])
def test_the_factored_evaluation_matches_float64_log_sum_exp(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """``F``, ``q̄`` and the big classes' probabilities from ``E = exp(Z − m)`` and two products agree
    with a direct float64 log-sum-exp, whatever the row chunking, up to float32 rounding, also at
    the box's edges (``β = ±20``) and with logits far apart."""
    import chita_onnx.solver.offsets as so

    monkeypatch.setattr(so, "ROW_CHUNK", chunk)
    rng = np.random.default_rng(4)
    Z = (8 * rng.standard_normal((203, 50))).astype(np.float32)
    pbar = softmax(rng.standard_normal(50))
    beta = np.clip(8 * rng.standard_normal(50), -20, 20)
    beta[:3] = [20.0, -20.0, 20.0]
    big = np.array([1, 7, 30])
    f, qbar, QK = _evaluate(Z, pbar, beta, big)
    z = Z.astype(np.float64) + beta
    lse = np.log(np.exp(z - z.max(axis=1, keepdims=True)).sum(axis=1)) + z.max(axis=1)
    q = np.exp(z - lse[:, None])
    assert f == pytest.approx(float(lse.mean() - pbar @ beta), rel=1e-6)
    np.testing.assert_allclose(qbar, q.mean(axis=0), rtol=1e-5, atol=1e-12)
    np.testing.assert_allclose(QK, q[:, big], rtol=1e-5, atol=1e-12)


def test_class_offsets_is_not_applicable_without_a_softmax(tmp_path: Path) -> None:
    m = many_class_model()
    m.graph.node[-1].op_type = "Sigmoid"
    del m.graph.node[-1].attribute[:]
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    x = np.random.default_rng(3).standard_normal((60, 16)).astype(np.float32)
    rep = chita_onnx.compress(src, tmp_path / "o.onnx", {"x": x}, CompressConfig(sparsity=0.5, class_offsets="on"))
    assert "class offsets" not in rep.solver["statistics"] or "n/a" in rep.solver["statistics"]


def test_a_warm_start_continues_the_fit() -> None:
    """Five iterations, then more from there, reach at least what the same total from zero reaches;
    from the optimum nothing moves."""
    rng = np.random.default_rng(4)
    Zd = 2.0 * rng.standard_normal((300, 60))
    Zd[:, 0] += 4.0  # a dominant class (a CTC blank)
    pbar = softmax(Zd).mean(axis=0)
    Zp = Zd + rng.standard_normal(60) + 0.5 * rng.standard_normal((300, 60))
    first = fit_class_offsets(Zp, pbar, max_iter=5)
    more = fit_class_offsets(Zp, pbar, max_iter=30, start=first.beta)
    assert more.before == pytest.approx(first.after)
    assert more.after <= first.after
    full = fit_class_offsets(Zp, pbar, max_iter=200, tol=1e-15)
    again = fit_class_offsets(Zp, pbar, start=full.beta, tol=1e-15)
    assert again.after == pytest.approx(full.after, rel=1e-7)
    with pytest.raises(SolverError, match="start"):
        fit_class_offsets(Zp, pbar, start=np.zeros(3))


@pytest.mark.parametrize("rank3", [False, True])
def test_held_out_kl_from_the_logits_equals_the_kl_of_the_offset_model(rank3: bool) -> None:
    """The ``auto`` decision scores the candidates from one pass over the pruned logits; that must be
    the KL the model with the offsets added (a second pass) has on the same samples."""
    from chita_onnx.reconstruct import _divergence, _head_rows
    from chita_onnx.sequential import run_outputs
    from chita_onnx.solver.offsets import kl_rows

    dense = head_model(rank3=rank3, axis=1 if rank3 else -1)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(dense)
    w = numpy_helper.to_array(pruned.graph.initializer[0]).copy()
    w[np.abs(w) < 0.6] = 0.0
    pruned.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "W"))
    rng = np.random.default_rng(6)
    batches = [{"x": rng.standard_normal((5, 3, 5) if rank3 else (5, 5)).astype(np.float32)} for _ in range(3)]
    head = softmax_head(pruned)
    assert head is not None
    rows = _head_rows(dense, pruned, head, batches, {}, 1.0, 0)
    assert rows.held.all() and rows.held_samples == 15
    beta = rng.standard_normal(7)
    ref = run_outputs(dense, batches, "y")
    axis = head.class_axis(ref.ndim)
    got = kl_rows(rows.P_held, rows.Z, beta)
    want = _divergence(ref, run_outputs(add_class_offset(pruned, head, beta, rows.rank), batches, "y"), axis)
    assert got == pytest.approx(want, rel=1e-4)
    plain = _divergence(ref, run_outputs(pruned, batches, "y"), axis)
    assert kl_rows(rows.P_held, rows.Z, None) == pytest.approx(plain, rel=1e-4)
    # a fifth of the samples held out: whole samples, the same rows as the flags say
    part = _head_rows(dense, pruned, head, batches, {}, 0.2, 0)
    assert part.held_samples == 3 and part.held.sum() == 3 * (3 if rank3 else 1)
    np.testing.assert_allclose(part.psum_all, rows.psum_all, rtol=1e-6)


def test_log_softmax_head_gets_offsets_from_its_probabilities(tmp_path: Path) -> None:
    """A LogSoftmax head: the dense probabilities are exp(output); with the offsets forced on, the
    written model's output is log_softmax(pruned logits + β) with the β that matches the mean class
    probabilities of the dense model on the calibration data."""
    m = many_class_model(C=40)
    m.graph.node[-1].op_type = "LogSoftmax"
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    x = np.random.default_rng(8).standard_normal((120, 16)).astype(np.float32)
    out = tmp_path / "o.onnx"
    cfg = CompressConfig(sparsity=0.7, class_offsets="on")
    rep = chita_onnx.compress(src, out, {"x": x}, cfg, eval_data={"x": x[:8]})  # all of x calibrates
    assert "class offsets on" in rep.solver["statistics"]
    dense = np.exp(run(m, x).astype(np.float64))
    pruned = np.exp(run(onnx.load(str(out)), x).astype(np.float64))
    np.testing.assert_allclose(pruned.sum(axis=1), 1.0, atol=1e-5)
    # the fit's optimality condition, on the calibration data: mean probabilities match
    np.testing.assert_allclose(pruned.mean(axis=0), dense.mean(axis=0), atol=2e-3)


def test_head_rows_keep_a_share_of_the_rows_beyond_the_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above OFFSET_MAX_ELEMENTS logits only a seeded share of the rows is kept, the same rows of
    both models (the held-out KL then still matches the rewritten model on those rows), while the
    probability sums still cover every row."""
    import chita_onnx.reconstruct as rc

    dense = head_model(rank3=True, axis=1)
    pruned = onnx.ModelProto()
    pruned.CopyFrom(dense)
    rng = np.random.default_rng(9)
    batches = [{"x": rng.standard_normal((10, 3, 5)).astype(np.float32)} for _ in range(4)]
    head = softmax_head(pruned)
    assert head is not None
    full = rc._head_rows(dense, pruned, head, batches, {}, 1.0, 0)
    assert full.Z.shape == (120, 7)
    monkeypatch.setattr(rc, "OFFSET_MAX_ELEMENTS", 7 * 40)
    part = rc._head_rows(dense, pruned, head, batches, {}, 1.0, 0)
    assert 10 < part.Z.shape[0] < 80 and part.P_held.shape == part.Z.shape
    np.testing.assert_allclose(part.psum_all, full.psum_all, rtol=1e-6)
    # every kept row is one of the full rows, paired with its own probabilities
    idx = [int(np.flatnonzero(np.all(z == full.Z, axis=1))[0]) for z in part.Z]
    np.testing.assert_array_equal(part.P_held, full.P_held[idx])


def ctc_model(seed: int = 0, F: int = 5, C: int = 7, T: int = 3) -> onnx.ModelProto:
    """``x [N, T, F] → MatMul W → Add b → Transpose → [T, N, C] → LogSoftmax(axis=2)``: the CTC
    layout PyTorch recognisers export (time first)."""
    rng = np.random.default_rng(seed)
    nodes = [
        helper.make_node("MatMul", ["x", "W"], ["mm"]),
        helper.make_node("Add", ["mm", "b"], ["z"]),
        helper.make_node("Transpose", ["z"], ["zt"], perm=[1, 0, 2]),
        helper.make_node("LogSoftmax", ["zt"], ["y"], axis=2),
    ]
    graph = helper.make_graph(
        nodes,
        "ctc",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", T, F])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, "N", C])],
        [
            numpy_helper.from_array((2 * rng.standard_normal((F, C))).astype(np.float32), "W"),
            numpy_helper.from_array(rng.standard_normal(C).astype(np.float32), "b"),
        ],
    )
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    m.ir_version = 8
    return m


def test_time_first_outputs_hold_out_whole_samples() -> None:
    """``[T, N, C]``: the held-out rows are all the time steps of the held-out samples."""
    from chita_onnx.reconstruct import _head_rows

    m = ctc_model()
    rng = np.random.default_rng(10)
    x = rng.standard_normal((20, 3, 5)).astype(np.float32)
    head = softmax_head(m)
    assert head is not None
    rows = _head_rows(m, m, head, [{"x": x[:10]}, {"x": x[10:]}], {}, 0.2, 0)
    assert rows.held_samples == 4 and int(rows.held.sum()) == 4 * 3
    dense = np.exp(run(m, x).astype(np.float64))  # [T, N, C]
    per_sample = [dense[:, s, :] for s in range(20)]
    found = {s for p in rows.P_held for s in range(20) if np.any(np.all(np.isclose(per_sample[s], p), axis=1))}
    assert len(found) == 4  # four whole samples, three rows each


@pytest.mark.parametrize("ctc", [True, False])
def test_rows_from_per_sample_tensors_are_the_rows_from_running_the_models(ctc: bool) -> None:
    """The pass's head tensors split by sample (``[T, N, C]`` along N) give the same rows, the same
    held-out samples and the same probability sums as running the two models over the batches."""
    from chita_onnx.reconstruct import _head_rows, _head_values, _per_sample

    dense = ctc_model() if ctc else head_model(rank3=True, axis=-1)
    pruned = ctc_model(seed=1) if ctc else head_model(rank3=True, axis=-1, seed=1)
    rng = np.random.default_rng(11)
    batches = [{"x": rng.standard_normal((n, 3, 5)).astype(np.float32)} for n in (7, 1, 12)]
    head = softmax_head(dense)
    assert head is not None
    sizes = [7, 1, 12]
    probs = _per_sample(_head_values(dense, batches, head.probs, {}), sizes, head)
    logits = _per_sample(_head_values(pruned, batches, head.logits, {}), sizes, head)
    assert probs is not None and logits is not None and len(probs) == len(logits) == 20
    ran = _head_rows(dense, pruned, head, batches, {}, 0.2, 0)
    known = _head_rows(dense, pruned, head, batches, {}, 0.2, 0, probs=probs, logits=logits)
    assert known.held_samples == ran.held_samples == 4 and known.rank == ran.rank
    np.testing.assert_allclose(known.psum_all, ran.psum_all, rtol=1e-12)
    np.testing.assert_allclose(known.psum_fit, ran.psum_fit, rtol=1e-12)

    def rows(a: np.ndarray) -> np.ndarray:
        return a[np.lexsort(a.T[::-1])]

    np.testing.assert_array_equal(rows(known.Z), rows(ran.Z))
    np.testing.assert_array_equal(rows(known.Z[known.held]), rows(ran.Z[ran.held]))
    np.testing.assert_array_equal(rows(known.P_held), rows(ran.P_held))


def test_the_sample_axis_is_told_apart_from_an_equally_long_time_axis() -> None:
    """CTC's ``[T, N, C]`` with ``T = 3``: batches of 3 and 2 samples show that axis 1 runs over the
    samples; batches that are all of 3 cannot tell, and then nothing is split by sample."""
    from chita_onnx.reconstruct import _per_sample, _sample_axis

    head = softmax_head(ctc_model())
    assert head is not None
    assert _sample_axis([(3, 3, 7), (3, 2, 7)], [3, 2], head) == 1
    assert _sample_axis([(3, 3, 7), (3, 3, 7)], [3, 3], head) is None
    assert _sample_axis([(3, 1, 7)], [1], head) is None  # one sample a batch: nothing to split
    assert _sample_axis([(4, 3, 7)], [3], head) == 1
    values = [np.zeros((3, 3, 7), np.float32), np.ones((3, 2, 7), np.float32)]
    split = _per_sample(values, [3, 2], head)
    assert split is not None and [a.shape for a in split] == [(3, 1, 7)] * 5
    assert _per_sample([np.zeros((3, 3, 7), np.float32)] * 2, [3, 3], head) is None


def test_an_offset_the_graph_cannot_take_leaves_the_other_corrections(tmp_path: Path) -> None:
    """Opset 11 Softmax over axis 1 of a rank-3 tensor (over the flattened tail, not one class axis):
    `auto` leaves them out (n/a) and keeps the bias correction; `on` refuses."""
    m = head_model(rank3=True, axis=1, opset=11)
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    x = np.random.default_rng(2).standard_normal((40, 3, 5)).astype(np.float32)
    rep = chita_onnx.compress(src, tmp_path / "o.onnx", {"x": x}, CompressConfig(sparsity=0.5, bias_correction="on"))
    assert "class offsets" not in rep.solver["statistics"]  # n/a: not listed
    assert "bias correction on" in rep.solver["statistics"]
    with pytest.raises(ModelError, match="not one class axis"):
        chita_onnx.compress(src, tmp_path / "o2.onnx", {"x": x}, CompressConfig(sparsity=0.5, class_offsets="on"))
    assert not (tmp_path / "o2.onnx").exists()


def test_offsets_reach_a_model_whose_bias_is_a_constant_node(tmp_path: Path) -> None:
    """paddle2onnx writes weights as Constant nodes; the written model (in the input's own format)
    gets the offsets by a new Add in front of the softmax, and still runs."""
    m = many_class_model()
    b2 = next(t for t in m.graph.initializer if t.name == "b2")
    m.graph.node.insert(0, helper.make_node("Constant", [], ["b2"], value=b2))
    m.graph.initializer.remove(b2)
    src = tmp_path / "in.onnx"
    onnx.save(m, src)
    x = np.random.default_rng(3).standard_normal((200, 16)).astype(np.float32)
    out = tmp_path / "o.onnx"
    rep = chita_onnx.compress(src, out, {"x": x}, CompressConfig(sparsity=0.8, class_offsets="on"))
    assert "class offsets on" in rep.solver["statistics"]
    written = onnx.load(str(out))
    onnx.checker.check_model(written)
    assert [n.op_type for n in written.graph.node].count("Add") == 2  # the bias Add and the offsets' Add
    y = run(written, x[:16])
    np.testing.assert_allclose(y.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("seed", range(8))
def test_the_fit_ends_at_a_box_constrained_minimum(seed: int) -> None:
    """KKT conditions at the end: ``∇F = q̄ − p̄`` is zero on free offsets and points out of the box on
    offsets at a bound.  Classes the dense model never predicts push offsets onto the bound, where a
    Newton step clipped to the box can fail to descend; the fit must then go on with the scaling step
    instead of stopping early (it did stop at −1.92 of −2 on one machine's LAPACK)."""
    rng = np.random.default_rng(seed)
    R, C = 200 + 50 * seed, 6 + seed
    Z = rng.standard_normal((R, C)) * (1 + seed % 3)
    pbar = softmax(rng.standard_normal((R, C)) * 2).mean(axis=0)
    pbar[rng.choice(C, size=1 + seed % 3, replace=False)] = 0.0
    pbar /= pbar.sum()
    bound = 2.0
    res = fit_class_offsets(Z, pbar, bound=bound, max_iter=500, tol=1e-15)
    _, qbar, _ = _evaluate(Z, pbar, res.beta, np.zeros(0, np.int64))
    g = qbar - pbar
    low, high = res.beta <= -bound + 1e-9, res.beta >= bound - 1e-9
    free = ~(low | high)
    assert np.all(np.abs(g[free]) <= 1e-4), (res.beta, g)
    assert np.all(g[low] >= -1e-4) and np.all(g[high] <= 1e-4)
    assert np.all(np.diff(res.trace) <= 1e-12)
