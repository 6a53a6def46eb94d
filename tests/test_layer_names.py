"""Layer names from the exporters' records: reports tell generated weight names apart, and ``--keep``
takes a layer or node as well as a tensor name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import labelled_data, tiny_mlp
from onnx import helper, numpy_helper

from chita_onnx import CompressConfig, compress
from chita_onnx.errors import ConfigError
from chita_onnx.graph import NAME_SCOPES_KEY, find_prunable, kept_tensors, layer_name
from chita_onnx.report import format_report


def _scoped(scopes: str, name: str = "node_linear_1") -> onnx.NodeProto:
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name=name)
    helper.set_metadata_props(node, {NAME_SCOPES_KEY: scopes})
    return node


@pytest.mark.parametrize(
    ("node", "layer"),
    [
        (_scoped("['', 'blocks.0', 'blocks.0.qkv', 'linear_1']"), "blocks.0.qkv"),  # dynamo: innermost module
        (_scoped("['', 'embed', 'linear']"), "embed"),
        (_scoped("['', 'linear']", name="node_MatMul_2"), "node_MatMul_2"),  # no module: the node's name
        (helper.make_node("MatMul", ["x", "w"], ["y"], name="/blocks.0/qkv/MatMul"), "/blocks.0/qkv"),  # TorchScript
        (helper.make_node("MatMul", ["x", "w"], ["y"], name="model/dense/MatMul"), "model/dense"),  # tf2onnx
        (helper.make_node("MatMul", ["x", "w"], ["y"], name="fc1"), "fc1"),
        (helper.make_node("MatMul", ["x", "w"], ["y"], name="/MatMul"), "/MatMul"),
        (helper.make_node("MatMul", ["x", "w"], ["y"]), ""),
    ],
)
def test_layer_name_reads_each_exporters_record(node: onnx.NodeProto, layer: str) -> None:
    assert layer_name(node) == layer


def dynamo_like_mlp() -> onnx.ModelProto:
    """tiny_mlp with dynamo's generated weight names (``val_N``) and its module scopes on the nodes."""
    model = tiny_mlp()
    rename = {"W1": "val_3", "W2": "val_7"}
    for init in model.graph.initializer:
        init.name = rename.get(init.name, init.name)
    scopes = {"fc1": "['', 'encoder', 'encoder.fc', 'linear']", "fc2": "['', 'head', 'linear_1']"}
    for node in model.graph.node:
        node.input[:] = [rename.get(i, i) for i in node.input]
        if node.name in scopes:
            helper.set_metadata_props(node, {NAME_SCOPES_KEY: scopes[node.name]})
    return model


def test_prunable_tensors_carry_their_layer() -> None:
    found = {t.name: t.layer for t in find_prunable(dynamo_like_mlp())}
    assert found == {"val_3": "encoder.fc", "val_7": "head"}


def test_keep_matches_tensor_layer_or_node_and_names_what_matches_nothing() -> None:
    tensors = find_prunable(dynamo_like_mlp())
    assert kept_tensors(tensors, ["head"]) == (frozenset({"val_7"}), [])
    assert kept_tensors(tensors, ["fc1", "val_7"]) == (frozenset({"val_3", "val_7"}), [])  # a node; a tensor
    assert kept_tensors(tensors, ["encoder", "head"]) == (frozenset({"val_7"}), ["encoder"])  # not a prefix match


@pytest.fixture
def dynamo_files(tmp_path: Path) -> tuple[Path, Path]:
    model = dynamo_like_mlp()
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "d.npz"
    np.savez(data, **labelled_data(model, n=96))
    return path, data


def test_keep_by_layer_leaves_that_weight_as_it_was_and_the_report_shows_layers(
    dynamo_files: tuple[Path, Path], tmp_path: Path
) -> None:
    path, data = dynamo_files
    out = tmp_path / "o.onnx"
    rep = compress(path, out, data, CompressConfig(sparsity=0.5, method="magnitude", keep=("head",)))
    written = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}
    original = {i.name: numpy_helper.to_array(i) for i in onnx.load(path).graph.initializer}
    np.testing.assert_array_equal(written["val_7"], original["val_7"])
    assert np.count_nonzero(written["val_3"]) == written["val_3"].size // 2
    assert [(t.name, t.layer) for t in rep.tensors] == [("val_3", "encoder.fc")]
    text = format_report(rep)
    header = next(line for line in text.splitlines() if line.startswith("tensor"))
    assert header.split()[:3] == ["tensor", "layer", "op"]
    assert any(line.split()[:2] == ["val_3", "encoder.fc"] for line in text.splitlines())


def test_keep_naming_nothing_is_refused(dynamo_files: tuple[Path, Path], tmp_path: Path) -> None:
    path, data = dynamo_files
    with pytest.raises(ConfigError, match=r"--keep=encoder: no prunable tensor, layer or node of that name"):
        compress(path, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.5, method="magnitude", keep=("encoder",)))
    assert not (tmp_path / "o.onnx").exists()


def test_descriptive_weight_names_get_no_layer_column(tmp_path: Path) -> None:
    model = tiny_mlp()
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "d.npz", **labelled_data(model, n=96))
    rep = compress(tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "d.npz", CompressConfig(sparsity=0.5))
    assert [t.layer for t in rep.tensors] == ["fc1", "fc2"]
    header = next(line for line in format_report(rep).splitlines() if line.startswith("tensor"))
    assert header.split()[:2] == ["tensor", "op"]


def test_inspect_and_the_cli_keep_use_the_layer_names(dynamo_files: tuple[Path, Path], tmp_path: Path) -> None:
    from click.testing import CliRunner

    from cli.main import cli

    path, data = dynamo_files
    res = CliRunner().invoke(cli, ["inspect", str(path)], catch_exceptions=False)
    assert res.exit_code == 0
    rows = [line.split() for line in res.stdout.splitlines()]
    assert rows[0][:3] == ["tensor", "layer", "op"]
    assert rows[2][:4] == ["val_3", "encoder.fc", "MatMul", "fc1"]
    out = tmp_path / "o.onnx"
    args = ["compress", str(path), str(out), "--data", str(data), "--sparsity", "0.5", "--method", "magnitude"]
    res = CliRunner().invoke(cli, [*args, "--keep", "head"], catch_exceptions=False)
    assert res.exit_code == 0, res.stderr
    kept = {i.name: numpy_helper.to_array(i) for i in onnx.load(out).graph.initializer}["val_7"]
    assert np.count_nonzero(kept) == kept.size
    res = CliRunner().invoke(cli, [*args, "--keep", "nowhere"], catch_exceptions=False)
    assert res.exit_code == 2 and "--keep=nowhere: no prunable tensor, layer or node" in res.stderr
