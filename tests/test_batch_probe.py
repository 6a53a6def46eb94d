"""Running the model tells its batch axis from its time axis (``chita_onnx.batchprobe``).

A sequence-first self-attention tagger ``x [s0, s1, F]`` → per-position ``y [s0, s1, C]`` has no name,
no recurrent layer and no output that says which axis holds the samples; the rules guess axis 0,
its time axis.  Fed that way it runs, and the calibration samples attend to each other.  Along its
batch axis the samples are computed apart: the probe finds it, and the tool then prunes exactly as
it prunes the same network exported batch-first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from numpy.typing import NDArray
from test_gradients import Init, mk, node, vi

from chita_onnx import CompressConfig, compress
from chita_onnx.batchprobe import axis_from_shape, probe_batch_name, settle_batch_axes
from chita_onnx.data import ArraySource
from chita_onnx.evaluate import make_session
from chita_onnx.graph import decided_batch_axes, get_weights, guessed_batch_names, model_inputs

T, F, D, C = 6, 4, 8, 3


def tagger(
    time_first: bool, *, mixes: bool = True, seed: int = 0, dims: tuple[Any, Any] = ("s0", "s1")
) -> onnx.ModelProto:
    """One self-attention layer over time and a per-position head.  ``time_first``: the input and the
    output are ``[T, N, ·]`` (transposed inside); else ``[N, T, ·]``.  ``mixes=False``: no attention,
    every position computed apart (then the axes cannot be told apart, and need not be)."""
    w = Init(seed)
    nodes = [node("Transpose", ["x"], ["xb"], perm=[1, 0, 2])] if time_first else [node("Identity", ["x"], ["xb"])]
    nodes += [node("MatMul", ["xb", w("Wv", F, D)], ["v"]), node("Tanh", ["v"], ["h"])]
    if mixes:
        nodes += [
            node("MatMul", ["xb", w("Wq", F, D)], ["q"]),
            node("MatMul", ["xb", w("Wk", F, D)], ["k"]),
            node("Transpose", ["k"], ["kT"], perm=[0, 2, 1]),
            node("MatMul", ["q", "kT"], ["s"]),  # [N, T, T]
            node("Softmax", ["s"], ["p"], axis=-1),
            node("MatMul", ["p", "v"], ["a"]),
            node("Add", ["a", "h"], ["o"]),
        ]
    else:
        nodes.append(node("Identity", ["h"], ["o"]))
    nodes.append(node("MatMul", ["o", w("Wo", D, C)], ["yb"]))  # [N, T, C]
    nodes.append(node("Transpose", ["yb"], ["y"], perm=[1, 0, 2]) if time_first else node("Identity", ["yb"], ["y"]))
    return mk(nodes, [vi("x", [*dims, F])], [vi("y", [*dims, C])], w.items, opset=17)


def samples(n: int, seed: int) -> NDArray[np.float32]:
    """``n`` samples-first sequences ``(n, T, F)``."""
    return np.random.default_rng(seed).standard_normal((n, T, F)).astype(np.float32)


def test_the_rules_can_only_guess_here() -> None:
    model = tagger(time_first=True)
    assert guessed_batch_names(model) == ["s0", "s1"]
    assert model_inputs(model)[0].batch_axis == 0  # the time axis
    # a name that says batch, or an output without the time axis, leaves nothing to guess
    assert guessed_batch_names(tagger(True, dims=("seq", "batch"))) == []


@pytest.mark.parametrize(("time_first", "want"), [(True, "s1"), (False, "s0")])
def test_the_probe_finds_the_axis_along_which_samples_stay_apart(time_first: bool, want: str) -> None:
    model = tagger(time_first)
    source = ArraySource({"x": samples(5, 1)}, batch_size=2)  # the probe reads across batches
    assert probe_batch_name(model, model_inputs(model), source, ["s0", "s1"]) == want


def test_a_model_that_never_mixes_positions_keeps_the_guess() -> None:
    model = tagger(True, mixes=False)
    specs = model_inputs(model)
    source = ArraySource({"x": samples(4, 2)})
    assert probe_batch_name(model, specs, source, ["s0", "s1"]) is None  # both axes keep samples apart
    same, settled = settle_batch_axes(model, specs, source, "m")
    assert same is model and settled[0].batch_axis == 0


def test_equal_samples_decide_nothing() -> None:
    model = tagger(True)
    x = np.repeat(samples(1, 3), 4, axis=0)
    assert probe_batch_name(model, model_inputs(model), ArraySource({"x": x}), ["s0", "s1"]) is None


def test_the_decision_travels_with_the_working_copy() -> None:
    model = tagger(True)
    copy, specs = settle_batch_axes(model, model_inputs(model), ArraySource({"x": samples(4, 4)}), "m")
    assert specs[0].batch_axis == 1 and model_inputs(copy)[0].batch_axis == 1
    assert decided_batch_axes(copy) == {"x": 1} and guessed_batch_names(copy) == []
    assert decided_batch_axes(model) == {} and model_inputs(model)[0].batch_axis == 0  # the original is untouched


def test_the_data_shape_places_a_static_sequence_first_batch() -> None:
    model = tagger(True, dims=(T, 1))  # a static export from one sequence-first sample: [T, 1, F]
    specs = model_inputs(model)
    assert specs[0].batch_axis == 0  # every dim fixed: the rules take axis 0, the time axis
    assert axis_from_shape(specs[0], (T, F)) == 1  # samples (T, F) fit axis 1 only
    assert axis_from_shape(specs[0], (1, F)) is None  # ... while (1, F) fits the rules' axis
    # a static export whose rules' axis is a batch of one keeps it: (1, F) arrays for [1, F, 1] are a layout slip
    assert axis_from_shape(specs[0]._replace(shape=(1, F, 1)), (1, F)) is None
    # only a fixed batch of one moves: data that fits a dynamic or wider axis stays refused by its shape
    assert axis_from_shape(model_inputs(tagger(True))[0]._replace(shape=("s0", F, F)), (F, F + 1)) is None
    _, settled = settle_batch_axes(model, specs, ArraySource({"x": samples(4, 14)}), "m")
    assert settled[0].batch_axis == 1 and settled[0].shape == (T, 1, F)


def test_compress_prunes_a_time_first_export_as_its_batch_first_twin(tmp_path: Path) -> None:
    calib = {"x": samples(40, 5)}
    np.savez(tmp_path / "calib.npz", **calib)
    written = {}
    for time_first in (True, False):
        src, out = tmp_path / f"m{time_first}.onnx", tmp_path / f"out{time_first}.onnx"
        onnx.save(tagger(time_first, seed=6), src)
        compress(src, out, tmp_path / "calib.npz", CompressConfig(sparsity=0.5))
        pruned = onnx.load(out)
        written[time_first] = get_weights(pruned, ["Wq", "Wk", "Wv", "Wo"])
        assert not decided_batch_axes(pruned)  # the working copy's note is not written out
    for name, a in written[True].items():
        b = written[False][name]
        assert np.array_equal(a != 0, b != 0), name  # the same support
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5, err_msg=name)
    # and the time-first output still runs time-first in onnxruntime
    y = make_session(tmp_path / "outTrue.onnx").run(None, {"x": np.ascontiguousarray(samples(3, 7).transpose(1, 0, 2))})
    assert y[0].shape == (T, 3, C)


def test_compress_prunes_a_static_time_first_export_as_its_static_batch_first_twin(tmp_path: Path) -> None:
    np.savez(tmp_path / "calib.npz", x=samples(40, 15))
    weights = []
    # its twin is static too: a fixed batch is fed in groups of its own (the rows sampled differ)
    for name, model in (("static", tagger(True, seed=16, dims=(T, 1))), ("twin", tagger(False, seed=16, dims=(1, T)))):
        onnx.save(model, tmp_path / f"{name}.onnx")
        compress(
            tmp_path / f"{name}.onnx",
            tmp_path / f"{name}_out.onnx",
            tmp_path / "calib.npz",
            CompressConfig(sparsity=0.5),
        )
        weights.append(get_weights(onnx.load(tmp_path / f"{name}_out.onnx"), ["Wq", "Wk", "Wv", "Wo"]))
    for name, a in weights[0].items():
        assert np.array_equal(a != 0, weights[1][name] != 0), name
        np.testing.assert_allclose(a, weights[1][name], rtol=1e-3, atol=1e-5, err_msg=name)
    out = onnx.load(tmp_path / "static_out.onnx")
    assert [d.dim_value for d in out.graph.input[0].type.tensor_type.shape.dim] == [T, 1, F]  # still static


def test_gradients_of_a_time_first_export_are_its_batch_first_twins(tmp_path: Path) -> None:
    from chita_onnx.pipeline import write_gradients

    np.savez(tmp_path / "d.npz", x=samples(12, 9))
    rows = {}
    for time_first in (True, False):
        onnx.save(tagger(time_first, seed=10), tmp_path / f"m{time_first}.onnx")
        write_gradients(tmp_path / f"m{time_first}.onnx", tmp_path / "d.npz", tmp_path / f"g{time_first}.npy")
        rows[time_first] = np.load(tmp_path / f"g{time_first}.npy")
    assert rows[True].shape == rows[False].shape == (12, 3 * F * D + D * C)
    np.testing.assert_allclose(rows[True], rows[False], rtol=1e-4, atol=1e-6)


def test_inspect_says_the_batch_axis_is_a_guess(tmp_path: Path) -> None:
    from chita_onnx_cli.main import cli
    from click.testing import CliRunner

    onnx.save(tagger(True), tmp_path / "m.onnx")
    result = CliRunner().invoke(cli, ["inspect", str(tmp_path / "m.onnx")])
    assert result.exit_code == 0
    assert "the batch axis is a guess: nothing names it among s0, s1" in result.output
    onnx.save(tagger(True, dims=("seq", "batch")), tmp_path / "named.onnx")
    assert "a guess" not in CliRunner().invoke(cli, ["inspect", str(tmp_path / "named.onnx")]).output


def test_the_gradient_api_probes_too() -> None:
    from chita_onnx.gradients import per_sample_gradients

    x = samples(6, 12)
    g = {tf: per_sample_gradients(tagger(tf, seed=13), {"x": x}, ["Wq", "Wo"]).X for tf in (True, False)}
    np.testing.assert_allclose(g[True], g[False], rtol=1e-4, atol=1e-6)


def test_a_one_shot_reader_is_read_once_and_kept() -> None:
    from chita_onnx.batchprobe import open_settled

    class Reader:  # onnxruntime's CalibrationDataReader protocol: get_next() until None
        def __init__(self, x: NDArray[np.float32]) -> None:
            self.items = iter([{"x": x[i : i + 4]} for i in range(0, len(x), 4)])

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            return next(self.items, None)

    model = tagger(True)
    x = samples(12, 17)
    _, specs, source = open_settled(Reader(x), model, model_inputs(model), "m")
    assert specs[0].batch_axis == 1
    got = np.concatenate([np.asarray(b.inputs["x"]) for b in source])
    np.testing.assert_array_equal(got, x)  # every sample still there, after the probe read some


def test_two_inputs_with_the_batch_at_different_axes() -> None:
    # a time-first sequence x [s0, s1, F] and a batch-first per-position weight m [s1, s0], the layout
    # of torch's src [T, N, F] with its key padding mask [N, T]: both names in both inputs, and the
    # shared-name rule picks s0, the time
    w = Init(18)
    nodes = [
        node("Transpose", ["x"], ["xb"], perm=[1, 0, 2]),  # [N, T, F]
        node("Unsqueeze", ["m", w.const("ax2", [2], np.int64)], ["m3"]),  # [N, T, 1]
        node("Mul", ["xb", "m3"], ["xs"]),
        node("MatMul", ["xs", w("Wq", F, D)], ["q"]),
        node("MatMul", ["xs", w("Wk", F, D)], ["k"]),
        node("Transpose", ["k"], ["kT"], perm=[0, 2, 1]),
        node("MatMul", ["q", "kT"], ["s"]),
        node("Softmax", ["s"], ["p"], axis=-1),
        node("MatMul", ["p", "xs"], ["a"]),  # [N, T, F]
        node("Transpose", ["a"], ["y"], perm=[1, 0, 2]),
    ]
    ins = [vi("x", ["s0", "s1", F]), vi("m", ["s1", "s0"])]
    model = mk(nodes, ins, [vi("y", ["s0", "s1", F])], w.items, opset=18)
    specs = model_inputs(model)
    assert [s.batch_axis for s in specs] == [0, 1]
    weights = np.random.default_rng(19).uniform(0.5, 1.5, (5, T)).astype(np.float32)
    _, settled = settle_batch_axes(model, specs, ArraySource({"x": samples(5, 20), "m": weights}), "m")
    assert [s.batch_axis for s in settled] == [1, 0]
