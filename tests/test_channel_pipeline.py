"""``compress --structure channel`` end to end: files, report, CLI flags and errors, stock onnxruntime."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from chita_onnx_cli.main import cli
from click.testing import CliRunner
from test_channels import _data, _tiny_cnn
from test_stock_ort import stock_python  # noqa: F401  (fixture)

import chita_onnx
from chita_onnx.errors import ConfigError
from chita_onnx.structured.capture import session

MODELS = Path(__file__).resolve().parents[1] / "models"


@pytest.fixture
def cnn(tmp_path: Path) -> tuple[Path, Path]:
    model = _tiny_cnn()
    onnx.save(model, tmp_path / "cnn.onnx")
    x = _data(model, 48)
    y = session(model).run(None, x)[0]
    np.savez(tmp_path / "calib.npz", x=x["x"], labels=np.argmax(y, 1))
    return tmp_path / "cnn.onnx", tmp_path / "calib.npz"


def _dims(vi: onnx.ValueInfoProto) -> list[object]:
    return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]


def test_compress_writes_a_smaller_valid_model_with_the_same_interface(cnn: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = cnn
    out = tmp_path / "pruned.onnx"
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_check=False, channel_multiple=4)
    report = chita_onnx.compress(model, out, data, cfg)
    onnx.checker.check_model(str(out), full_check=True)
    dense, pruned = onnx.load(model), onnx.load(out)
    assert [(i.name, _dims(i)) for i in pruned.graph.input] == [(i.name, _dims(i)) for i in dense.graph.input]
    assert [(o.name, _dims(o)) for o in pruned.graph.output] == [(o.name, _dims(o)) for o in dense.graph.output]
    c = report.structured
    assert c.written == "pruned" and c.params_after < c.params_before and c.flops_after < c.flops_before
    assert c.channels_after < c.channels_before and c.equivalence_max_diff < 1e-4
    assert report.evaluation is not None and report.evaluation.samples > 0
    meta = {p.key: p.value for p in pruned.metadata_props}
    assert json.loads(meta["chita_onnx"])["structure"] == "channel"
    text = chita_onnx.format_report(report)
    assert "channel pruning" in text and "parameters" in text and "FLOPs" in text
    json.loads(report.to_json())  # serialisable


def test_latency_check_never_keeps_a_slower_model(cnn: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = cnn
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_batches=(1, 8), method="magnitude")
    report = chita_onnx.compress(model, tmp_path / "p.onnx", data, cfg)
    c = report.structured
    rows = {r.batch: r for r in c.latency}
    assert set(rows) == {1, 8}
    if c.written == "pruned":
        assert all(r.speedup >= 1.0 for r in c.latency)
    else:  # nothing faster was found: the input went out unchanged, and the report says so
        assert any("unchanged" in n for n in c.notes)
        assert c.params_after == c.params_before


def test_keep_protects_a_group(cnn: tuple[Path, Path], tmp_path: Path) -> None:
    model, data = cnn
    cfg = chita_onnx.CompressConfig(
        sparsity=0.5, structure="channel", latency_check=False, keep=("c1.w",), channel_multiple=4
    )
    report = chita_onnx.compress(model, tmp_path / "p.onnx", data, cfg)
    protected = next(g for g in report.structured.groups if "c1_node" in g.producers)
    assert protected.kept == protected.channels and "protected by --keep" in protected.reasons


def test_bundled_cnn_prunes_through_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "digits_pruned.onnx"
    args = ["compress", str(MODELS / "digits_cnn.onnx"), str(out), "--data", str(MODELS / "digits_calib.npz")]
    args += ["--eval-data", str(MODELS / "digits_test.npz"), "--structure", "channel", "--sparsity", "0.5"]
    args += ["--no-latency-check", "--report", str(tmp_path / "r.json")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "channel pruning" in result.output and "kept whole because" in result.output
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["structured"]["channels_after"] < report["structured"]["channels_before"]
    assert report["evaluation"]["pruned_accuracy"] > 0.8  # dense 0.988; half the channels removed


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--structure", "channel", "--method", "wf"], "--method='wf'"),
        (["--sparsity-of", "flops"], "--sparsity-of='flops'"),
        (["--structure", "channel", "--latency-batches", "1,x"], "--latency-batches"),
        (["--structure", "channel", "--channel-multiple", "-1"], "--channel-multiple=-1"),
        # accepted once and silently ran without any re-fit (98.8% → 9.6% on the bundled CNN)
        (["--structure", "channel", "--update", "layerwise"], "--update='layerwise'"),
    ],
)
def test_bad_channel_flags_are_usage_errors(extra: list[str], message: str, tmp_path: Path) -> None:
    args = ["compress", str(MODELS / "digits_cnn.onnx"), str(tmp_path / "o.onnx")]
    args += ["--data", str(MODELS / "digits_calib.npz"), *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="--latency-batches"):
        chita_onnx.CompressConfig(structure="channel", latency_batches=())
    # the default method (auto) is channel pruning's reconstruction-based selection
    assert chita_onnx.CompressConfig(structure="channel").method == "chita"
    with pytest.raises(ConfigError, match="--method='layerwise'"):
        chita_onnx.CompressConfig(structure="channel", method="layerwise")
    with pytest.raises(ConfigError, match="--distill=True"):
        chita_onnx.CompressConfig(structure="channel", distill=True)


SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime as ort
x = np.load(sys.argv[2])["x"]
y = ort.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
np.save(sys.argv[3], y)
print(json.dumps({"version": ort.__version__}))
"""


@pytest.mark.stock_ort
def test_pruned_model_runs_in_newest_plain_onnxruntime(
    cnn: tuple[Path, Path],
    tmp_path: Path,
    stock_python: Path,  # noqa: F811
) -> None:
    model, data = cnn
    out = tmp_path / "pruned.onnx"
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_check=False, channel_multiple=4)
    chita_onnx.compress(model, out, data, cfg)
    x = np.load(data)["x"][:8]
    np.savez(tmp_path / "x.npz", x=x)
    proc = subprocess.run(
        [str(stock_python), "-c", SCRIPT, str(out), str(tmp_path / "x.npz"), str(tmp_path / "y.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["version"] != "1.19.2"
    ours = session(onnx.load(out)).run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ours, rtol=1e-5, atol=1e-5)


def test_model_newer_than_the_bundled_runtime_keeps_its_versions(cnn: tuple[Path, Path], tmp_path: Path) -> None:
    import onnx.version_converter

    model, data = cnn
    newer = onnx.version_converter.convert_version(onnx.load(model), 22)
    newer.ir_version = 11
    onnx.save(newer, tmp_path / "new.onnx")
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_check=False, channel_multiple=4)
    report = chita_onnx.compress(tmp_path / "new.onnx", tmp_path / "p.onnx", data, cfg)
    out = onnx.load(tmp_path / "p.onnx")
    onnx.checker.check_model(out)
    assert out.ir_version == 11 and out.opset_import[0].version == 22
    assert report.structured.channels_after < report.structured.channels_before


def test_channel_run_writes_through_the_output_plan(
    cnn: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pruned model is staged and committed with the report: a run that fails after writing the
    model leaves the earlier output untouched and no temporary file; a run that succeeds replaces it."""
    from chita_onnx.paths import STAGING_PREFIX
    from chita_onnx.structured import run

    model, data = cnn
    out, rep = tmp_path / "pruned.onnx", tmp_path / "r.json"
    out.write_bytes(b"an earlier result")
    before = sorted(p.name for p in tmp_path.iterdir())
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_check=False, channel_multiple=4)
    seen: list[Path] = []

    def failing_compare(ref: object, path: Path, *args: object) -> None:
        seen.append(Path(path))
        assert Path(path).is_file() and Path(path) != out  # the staged copy, written before evaluation
        raise RuntimeError("evaluation failed")

    with monkeypatch.context() as m:
        m.setattr(run, "compare_to", failing_compare)
        with pytest.raises(RuntimeError, match="evaluation failed"):
            chita_onnx.compress(model, out, data, cfg, report=rep)
    assert seen and seen[0].parent.name.startswith(STAGING_PREFIX)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert out.read_bytes() == b"an earlier result"
    report = chita_onnx.compress(model, out, data, cfg, report=rep)
    assert report.output == str(out)
    onnx.checker.check_model(str(out), full_check=True)
    assert json.loads(rep.read_text())["structured"]["written"] == "pruned"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)] == []


def test_channel_structure_refuses_an_nm_pattern(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--pattern='2:4'"):
        chita_onnx.CompressConfig(structure="channel", pattern="2:4")
    args = ["compress", str(MODELS / "digits_cnn.onnx"), str(tmp_path / "o.onnx"), "--data"]
    args += [str(MODELS / "digits_calib.npz"), "--structure", "channel", "--pattern", "2:4"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--pattern='2:4'" in result.output, result.output
    assert not (tmp_path / "o.onnx").exists()


def test_sweep_refuses_channel_structure(tmp_path: Path) -> None:
    args = ["sweep", str(MODELS / "digits_cnn.onnx"), "--data", str(MODELS / "digits_calib.npz")]
    args += ["--structure", "channel", "--methods", "magnitude", "--out", str(tmp_path / "sw")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2 and "--structure=channel" in result.output, result.output
    assert "Traceback" not in result.output and list(tmp_path.iterdir()) == []


def test_a_model_with_its_batch_size_fixed_at_one_is_channel_pruned(tmp_path: Path) -> None:
    """Exporters often bake batch 1 into the input; every calibration run must then feed one sample."""
    model = _tiny_cnn()
    x = _data(model, 24)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[0].Clear()
    dims[0].dim_value = 1
    onnx.save(model, tmp_path / "b1.onnx")
    np.savez(tmp_path / "calib.npz", x=x["x"])
    out = tmp_path / "pruned.onnx"
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_check=False, channel_multiple=4)
    report = chita_onnx.compress(tmp_path / "b1.onnx", out, tmp_path / "calib.npz", cfg)
    c = report.structured
    assert c is not None and c.channels_after < c.channels_before and c.equivalence_max_diff < 1e-4
    assert _dims(onnx.load(out).graph.input[0])[0] == 1


def _weight_normed_cnn() -> onnx.ModelProto:
    """Conv whose weight is computed in the graph as ``g * v / ||v||`` (torch's ``weight_norm`` as the
    TorchScript exporter writes it) -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(41)
    w = {
        "v": rng.standard_normal((16, 3, 3, 3)),
        "g": rng.uniform(0.5, 1.5, (16, 1, 1, 1)),
        "b1": rng.standard_normal(16) * 0.1,
        "w2": rng.standard_normal((8, 16, 3, 3)) * 0.3,
        "b2": rng.standard_normal(8) * 0.1,
        "fc": rng.standard_normal((4, 8)),
    }
    nodes = [
        helper.make_node("ReduceL2", ["v"], ["vnorm"], axes=[1, 2, 3], keepdims=1, name="norm"),
        helper.make_node("Div", ["v", "vnorm"], ["vdir"], name="div"),
        helper.make_node("Mul", ["g", "vdir"], ["w1"], name="scale"),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc"),
    ]
    g = helper.make_graph(
        nodes,
        "wn_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(v.astype(np.float32), k) for k, v in w.items()],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_weight_computed_from_constants_is_channel_pruned(tmp_path: Path) -> None:
    """A weight-normalised Conv (its weight ``g * v / ||v||`` computed in the graph from two stored
    tensors) is pruned by the unstructured path, which folds the computation into one weight; channel
    pruning used to skip that fold, so the Conv had "no constant weight" and a weight-norm TCN came
    out with no channel removed."""
    model = _weight_normed_cnn()
    src, out, data = tmp_path / "wn.onnx", tmp_path / "pruned.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    x = _data(model, 48)
    np.savez(data, x=x["x"])
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_check=False, channel_multiple=4)
    report = chita_onnx.compress(src, out, data, cfg)
    c = report.structured
    assert c.written == "pruned" and c.channels_after < c.channels_before
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert "ReduceL2" not in {n.op_type for n in pruned.graph.node}  # the folded weight, sliced
    conv1 = next(n for n in pruned.graph.node if n.op_type == "Conv" and n.input[0] == "x")
    w1 = next(t for t in pruned.graph.initializer if t.name == conv1.input[1])
    assert list(w1.dims) == [8, 3, 3, 3]
    y = session(pruned).run(None, x)[0]
    assert y.shape == (48, 4) and np.isfinite(y).all()


def _prelu_cnn() -> onnx.ModelProto:
    """Conv(3→16) → PRelu whose per-channel slope is ``Unsqueeze(slope[16], axes [1, 2])`` (torch's
    ``PReLU(16)`` as the TorchScript exporter writes it) → Conv(16→8) → Relu → GlobalAveragePool →
    Flatten → Gemm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(43)
    w = {
        "w1": rng.standard_normal((16, 3, 3, 3)) * 0.5,
        "b1": rng.standard_normal(16) * 0.1,
        "slope": rng.uniform(0.05, 0.5, 16),
        "axes": np.array([1, 2], np.int64),
        "w2": rng.standard_normal((8, 16, 3, 3)) * 0.3,
        "b2": rng.standard_normal(8) * 0.1,
        "fc": rng.standard_normal((4, 8)),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Unsqueeze", ["slope", "axes"], ["slope3"], name="unsqueeze"),
        helper.make_node("PRelu", ["c1", "slope3"], ["r1"], name="prelu"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["gap"], name="gap"),
        helper.make_node("Flatten", ["gap"], ["flat"], name="flat"),
        helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1, name="fc"),
    ]
    inits = [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k) for k, v in w.items()]
    g = helper.make_graph(
        nodes,
        "prelu_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def test_a_per_channel_parameter_computed_from_constants_is_sliced(tmp_path: Path) -> None:
    """The unseen-torch5 audit: a TorchScript-exported PReLU's slope is an ``Unsqueeze`` of the stored
    vector, not a stored tensor, so the channels of the Conv before it were pinned ("every channel is
    joined with a tensor no prunable layer produced") while the dynamo export of the same weights
    (slope stored as [1, C, 1, 1]) lost them.  The slope is now folded and sliced with the channels."""
    model = _prelu_cnn()
    src, out, data = tmp_path / "prelu.onnx", tmp_path / "pruned.onnx", tmp_path / "calib.npz"
    onnx.save(model, src)
    x = _data(model, 48)
    np.savez(data, x=x["x"])
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_check=False, channel_multiple=4)
    report = chita_onnx.compress(src, out, data, cfg)
    c = report.structured
    assert c is not None and c.written == "pruned" and c.channels_after < c.channels_before
    assert c.equivalence_max_diff < 1e-4
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    conv1 = next(n for n in pruned.graph.node if n.op_type == "Conv" and n.input[0] == "x")
    w1 = next(t for t in pruned.graph.initializer if t.name == conv1.input[1])
    assert w1.dims[0] < 16
    prelu = next(n for n in pruned.graph.node if n.op_type == "PRelu")
    slope = next(t for t in pruned.graph.initializer if t.name == prelu.input[1])
    assert slope.dims[0] == w1.dims[0]
    y = session(pruned).run(None, x)[0]
    assert y.shape == (48, 4) and np.isfinite(y).all()


def test_a_model_with_no_prunable_channel_group_says_why(tmp_path: Path) -> None:
    """The unseen-torch4 audit: a GroupNorm CNN as torch exports it (Reshape → InstanceNormalization →
    Reshape around every conv output) has no group whose channels can go; the note blamed rounding to
    kernel-friendly counts, which played no part."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(41)
    inits = [
        numpy_helper.from_array((rng.standard_normal((8, 1, 3, 3)) / 3).astype(np.float32), "conv.w"),
        numpy_helper.from_array(np.array([0, 2, -1], np.int64), "groups"),
        numpy_helper.from_array(np.ones(2, np.float32), "gn.scale"),
        numpy_helper.from_array(np.zeros(2, np.float32), "gn.bias"),
        numpy_helper.from_array(np.array([0, 8, 6, 6], np.int64), "back"),
        numpy_helper.from_array((rng.standard_normal((4, 8)) / 3).astype(np.float32), "fc.w"),
    ]
    n = helper.make_node
    nodes = [
        n("Conv", ["x", "conv.w"], ["c"], name="conv"),
        n("Reshape", ["c", "groups"], ["g"], name="to_groups"),
        n("InstanceNormalization", ["g", "gn.scale", "gn.bias"], ["gn"], name="gn"),
        n("Reshape", ["gn", "back"], ["b"], name="from_groups"),
        n("Relu", ["b"], ["r"], name="relu"),
        n("GlobalAveragePool", ["r"], ["p"], name="pool"),
        n("Flatten", ["p"], ["f"], name="flat"),
        n("Gemm", ["f", "fc.w"], ["logits"], transB=1, name="fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "gn_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "gn.onnx")
    x = rng.standard_normal((32, 1, 8, 8)).astype(np.float32)
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_check=False)
    report = chita_onnx.compress(tmp_path / "gn.onnx", tmp_path / "p.onnx", {"x": x}, cfg)
    c = report.structured
    assert c.written == "input" and c.channels_after == c.channels_before
    said = [note for note in c.notes if "no channel was removed" in note]
    assert len(said) == 1 and "no group can lose a channel" in said[0] and "rounding" not in said[0]


def test_weights_only_unstructured_pruning_sees_are_named(tmp_path: Path) -> None:
    """The unseen-torch4 audit: a model whose layers are Einsums (torch.einsum) is pruned unstructured,
    but ``--structure channel`` said it had 'no prunable weights (Conv, Gemm or MatMul fed by a constant
    weight tensor)', which ``inspect`` contradicts: it now names the weights and what to do."""
    from onnx import TensorProto, helper, numpy_helper

    from chita_onnx.errors import ModelError

    rng = np.random.default_rng(43)
    inits = [
        numpy_helper.from_array((rng.standard_normal((16, 6)) / 3).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((4, 16)) / 3).astype(np.float32), "w2"),
    ]
    n = helper.make_node
    nodes = [
        n("Einsum", ["x", "w1"], ["h"], equation="bi,oi->bo", name="fc1"),
        n("Relu", ["h"], ["r"], name="relu"),
        n("Einsum", ["r", "w2"], ["logits"], equation="bi,oi->bo", name="fc2"),
    ]
    graph = helper.make_graph(
        nodes,
        "einsum_mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 4])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, tmp_path / "e.onnx")
    x = {"x": rng.standard_normal((32, 6)).astype(np.float32)}
    cfg = chita_onnx.CompressConfig(sparsity=0.5, structure="channel", latency_check=False)
    with pytest.raises(
        ModelError, match=r"--structure channel finds no layer to slice: its 2 prunable weight tensor\(s\) \(w1, w2\)"
    ):
        chita_onnx.compress(tmp_path / "e.onnx", tmp_path / "p.onnx", x, cfg)
    report = chita_onnx.compress(tmp_path / "e.onnx", tmp_path / "p.onnx", x, chita_onnx.CompressConfig(sparsity=0.5))
    assert report.nnz == report.k == 80
