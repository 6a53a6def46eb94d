"""The command line: end-to-end runs on real files, and one-line errors with the right exit codes."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from chita_onnx_cli.main import cli
from click.testing import CliRunner
from conftest import make_model, tiny_mlp
from onnx import TensorProto, helper, numpy_helper

from chita_onnx.config import CompressConfig


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_every_config_field_has_exactly_one_flag() -> None:
    compress = cli.commands["compress"]
    flags = {p.name for p in compress.params if isinstance(p, __import__("click").Option)}
    fields = {f.name for f in dataclasses.fields(CompressConfig)}
    assert fields <= flags
    assert flags - fields == {"data", "eval_data", "report_path"}


def test_inspect_lists_tensors_and_total(mlp_path: Path) -> None:
    code, out, _ = run("inspect", mlp_path)
    assert code == 0
    assert "W1" in out and "MatMul" in out and "fc1" in out and "12x16" in out
    assert "2 prunable tensors, 272 weights in total" in out


def test_compress_magnitude_end_to_end(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    before = mlp_path.read_bytes()
    out = tmp_path / "pruned.onnx"
    report = tmp_path / "report.json"
    code, stdout, err = run(
        "compress", mlp_path, out, "--sparsity", "0.7", "--data", mlp_data, "--method", "magnitude", "--report", report
    )
    assert code == 0, err
    assert mlp_path.read_bytes() == before  # the input is never modified
    onnx.checker.check_model(str(out))
    from chita_onnx.graph import find_prunable, get_weights, load_model

    pruned = load_model(out)
    w = get_weights(pruned, [t.name for t in find_prunable(pruned)])
    nnz = sum(int(np.count_nonzero(a)) for a in w.values())
    assert nnz == round(0.3 * 272)
    data = json.loads(report.read_text())
    assert data["nnz"] == nnz and data["k"] == nnz and data["p"] == 272
    assert data["evaluation"]["samples"] == 13  # 20% of 64 held out
    assert data["evaluation"]["dense_accuracy"] == 1.0  # labels are the dense argmax
    assert set(data["timings"]) >= {"load", "solve", "write", "evaluate"}
    assert "top-1 accuracy" in stdout and "file size" in stdout


def test_evaluate_command(mlp_path: Path, mlp_data: Path) -> None:
    code, out, _ = run("evaluate", mlp_path, "--data", mlp_data)
    assert code == 0 and "top-1 accuracy 100.00% on 64 samples" in out


# ----------------------------------------------------------------------------------- bad input


def test_missing_model_file(tmp_path: Path, mlp_data: Path) -> None:
    code, _, err = run("compress", tmp_path / "nope.onnx", tmp_path / "o.onnx", "--data", mlp_data)
    assert_one_line_error(code, err, 1, "nope.onnx", "no such file")


def test_not_an_onnx_file(tmp_path: Path, mlp_data: Path) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_text("hello, I am a text file\n" * 20)
    code, _, err = run("compress", bad, tmp_path / "o.onnx", "--data", mlp_data)
    assert_one_line_error(code, err, 1, "bad.onnx", "not a valid ONNX model")


@pytest.mark.parametrize("value", ["1.0", "-0.1", "1.5"])
def test_sparsity_out_of_range_is_a_usage_error(tmp_path: Path, mlp_path: Path, mlp_data: Path, value: str) -> None:
    code, _, err = run("compress", mlp_path, tmp_path / "o.onnx", "--sparsity", value, "--data", mlp_data)
    assert_one_line_error(code, err, 2, f"--sparsity={float(value)!r}", "[0, 1)")
    if float(value) <= 1.0:  # 1.0 and -0.1 are out of range, not percentages
        assert "percentage" not in err


@pytest.mark.parametrize(
    ("command", "flag", "value"), [("compress", "--sparsity", "70"), ("sweep", "--sparsities", "0.5,70")]
)
def test_a_percentage_for_a_sparsity_gets_the_fraction_in_its_error(
    tmp_path: Path, mlp_path: Path, mlp_data: Path, command: str, flag: str, value: str
) -> None:
    out = [tmp_path / "o.onnx"] if command == "compress" else []
    code, _, err = run(command, mlp_path, *out, flag, value, "--data", mlp_data)
    assert_one_line_error(code, err, 2, "70.0", "a fraction, not a percentage: 0.7 for 70%")
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input(mlp_path: Path, mlp_data: Path) -> None:
    before = mlp_path.read_bytes()
    code, _, err = run("compress", mlp_path, mlp_path, "--data", mlp_data)
    assert_one_line_error(code, err, 2, str(mlp_path), "input model")
    assert mlp_path.read_bytes() == before


def test_npz_with_missing_input(tmp_path: Path, mlp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", a=np.zeros((4, 12), np.float32), b=np.zeros((4, 12), np.float32))
    code, _, err = run("compress", mlp_path, tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert_one_line_error(code, err, 1, "d.npz", "'x'")


def test_npz_with_misshaped_input(tmp_path: Path, mlp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 3, 4), np.float32))
    code, _, err = run("compress", mlp_path, tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert_one_line_error(code, err, 1, "d.npz", "input 'x' has shape (4, 3, 4)")


def test_labels_out_of_range(tmp_path: Path, mlp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 12), np.float32), labels=np.array([0, 1, 7, 2]))
    code, _, err = run("compress", mlp_path, tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert_one_line_error(code, err, 1, "d.npz", "label 7 is out of range", "5 classes")


def test_model_without_prunable_weights(tmp_path: Path) -> None:
    model = make_model(
        [helper.make_node("Relu", ["x"], ["y"], name="relu")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
        [],
    )
    onnx.save(model, tmp_path / "relu.onnx")
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 4), np.float32))
    code, _, err = run("compress", tmp_path / "relu.onnx", tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert_one_line_error(code, err, 1, "relu.onnx", "no prunable weights")


def test_npz_with_object_arrays(tmp_path: Path, mlp_path: Path) -> None:
    np.savez(tmp_path / "evil.npz", x=np.array([object(), None], dtype=object))
    code, _, err = run("compress", mlp_path, tmp_path / "o.onnx", "--data", tmp_path / "evil.npz")
    assert_one_line_error(code, err, 1, "evil.npz", "'x'", "Python objects")


def test_external_data_outside_model_folder(tmp_path: Path, mlp_data: Path) -> None:
    model = tiny_mlp()
    model.graph.initializer[0].data_location = TensorProto.EXTERNAL
    model.graph.initializer[0].ClearField("raw_data")
    entry = model.graph.initializer[0].external_data.add()
    entry.key, entry.value = "location", "/etc/passwd"
    onnx.save(model, tmp_path / "evil.onnx")
    code, _, err = run("compress", tmp_path / "evil.onnx", tmp_path / "o.onnx", "--data", mlp_data)
    assert_one_line_error(code, err, 1, "evil.onnx", "/etc/passwd", "outside the model's folder")
    assert not (tmp_path / "o.onnx").exists()


def test_unknown_keep_tensor_is_a_usage_error(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    code, _, err = run("compress", mlp_path, tmp_path / "o.onnx", "--data", mlp_data, "--keep", "W9")
    assert_one_line_error(code, err, 2, "--keep=W9")


def test_unknown_method_is_a_click_usage_error(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    code, _, err = run("compress", mlp_path, tmp_path / "o.onnx", "--data", mlp_data, "--method", "nope")
    assert code == 2 and "nope" in err and "Traceback" not in err


def test_inspect_of_a_model_with_bias_only_constants_lists_nothing(tmp_path: Path) -> None:
    w = np.ones((2, 2), np.float32)
    model = make_model(
        [helper.make_node("Add", ["x", "W"], ["y"], name="add")],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [numpy_helper.from_array(w, "W")],
    )
    onnx.save(model, tmp_path / "add.onnx")
    code, out, _ = run("inspect", tmp_path / "add.onnx")
    assert code == 0 and "0 prunable tensors, 0 weights in total" in out


def test_gradients_command_writes_matrix_and_layout(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    out = tmp_path / "g.npy"
    code, stdout, err = run("gradients", mlp_path, "--data", mlp_data, "--out", out, "--mini-batch", "4")
    assert code == 0, err
    X = np.load(out)
    assert X.shape == (16, 272) and X.dtype == np.float32 and np.abs(X).sum() > 0
    layout = json.loads((tmp_path / "g.npy.layout.json").read_text())
    assert [(t["name"], t["offset"], t["size"]) for t in layout["tensors"]] == [("W1", 0, 192), ("W2", 192, 80)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp file left
    assert "16 x 272 float32" in stdout


def test_gradients_command_defaults_to_the_rows_compress_uses(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    """``gradients`` with no flags writes the X of ``compress``'s default (the true Fisher, one row
    per input), not the empirical Fisher: two code paths, one matrix."""
    from chita_onnx.pipeline import GradientOracle, initial_weights, prepare

    out = tmp_path / "g.npy"
    code, stdout, err = run("gradients", mlp_path, "--data", mlp_data, "--out", out)
    assert code == 0, err
    layout = json.loads((tmp_path / "g.npy.layout.json").read_text())
    assert layout["fisher"] == "kl" and layout["rows_per_sample"] == 1 and "kl Fisher" in stdout
    config = CompressConfig(sparsity=0.5)
    prep = prepare(mlp_path, mlp_data, config, hold_out=False)
    oracle = GradientOracle(prep, config)
    X = oracle.matrix(initial_weights(prep))
    raw = np.load(out)
    assert raw.shape == X.shape
    np.testing.assert_allclose(raw * oracle.scale, X, rtol=1e-5, atol=1e-7)
    # --fisher-rows takes compress's values: 0 (automatic) is one row, as 1 is
    for rows in ("0", "1"):
        code, _, err = run(
            "gradients", mlp_path, "--data", mlp_data, "--out", tmp_path / f"r{rows}.npy", "--fisher-rows", rows
        )
        assert code == 0, err
        np.testing.assert_array_equal(np.load(tmp_path / f"r{rows}.npy"), raw)
    code, _, err = run("gradients", mlp_path, "--data", mlp_data, "--out", tmp_path / "bad.npy", "--fisher-rows", "-1")
    assert code == 2 and "--fisher-rows" in err


@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "chita++", "--stages", "3", "--schedule", "exp", "--start-sparsity", "0.3"],
        ["--scope", "layer", "--storage", "dense"],
    ],
)
def test_compress_options_from_the_cli(tmp_path: Path, mlp_path: Path, mlp_data: Path, extra: list[str]) -> None:
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    code, stdout, err = run("compress", mlp_path, out, "--sparsity", "0.8", "--data", mlp_data,
                            "--report", report, *extra)  # fmt: skip
    assert code == 0, err
    onnx.checker.check_model(str(out))
    data = json.loads(report.read_text())
    assert data["nnz"] == round(0.2 * 272)
    if "chita++" in extra:
        assert [round(s["sparsity"], 4) for s in data["stages"]] == [0.3, 0.6333, 0.8]
        assert "stage" in stdout and all(s["accuracy"] is not None for s in data["stages"])


def test_block_path_from_the_cli(tmp_path: Path) -> None:
    models = Path(__file__).resolve().parents[1] / "models"
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    # X of the bundled MLP is 204 x 6464 float32 = 5.3 MB: --max-memory 1M forces the block path
    code, _, err = run(
        "compress",
        models / "digits_mlp.onnx",
        out,
        "--sparsity",
        "0.9",
        "--data",
        models / "digits_calib.npz",
        "--method",
        "chita",
        "--max-memory",
        "1M",
        "--block-size",
        "500",
        "--report",
        report,
    )
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["config"]["max_memory"] == 2**20 and data["solver"]["objective_model"] == "block-diagonal"
    assert data["nnz"] == round(0.1 * 6464)


def test_bad_output_folder_and_output_name_fail_before_any_work(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    code, out, err = run("compress", mlp_path, tmp_path / "missing" / "o.onnx", "--data", mlp_data)
    assert_one_line_error(code, err, 1, "missing", "does not exist")
    assert out == ""  # nothing was pruned or reported
    code, out, err = run("compress", mlp_path, tmp_path / "o.onnx", "--data", mlp_data, "--output", "probs")
    assert_one_line_error(code, err, 2, "--output='probs'", "logits")


def test_a_classical_ml_export_is_refused_with_what_its_weights_are(tmp_path: Path) -> None:
    """skl2onnx writes a logistic regression as ``ai.onnx.ml.LinearClassifier``: its coefficients
    are attributes, not layer weights; the refusal says so instead of only "no prunable weights"."""
    coef = np.random.default_rng(0).standard_normal(3 * 4).astype(np.float32)
    node = helper.make_node(
        "LinearClassifier", ["x"], ["label", "probs"], domain="ai.onnx.ml",
        coefficients=coef.tolist(), intercepts=[0.0, 0.0, 0.0], classlabels_ints=[0, 1, 2],
    )  # fmt: skip
    g = helper.make_graph(
        [node], "lr", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["N", 3])],
    )  # fmt: skip
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    m.ir_version = 8
    path, data = tmp_path / "lr.onnx", tmp_path / "d.npz"
    onnx.save(m, path)
    np.savez(data, x=np.zeros((8, 4), np.float32))
    code, _, err = run("compress", path, tmp_path / "o.onnx", "--data", data)
    assert_one_line_error(code, err, 1, "lr.onnx", "no prunable weights", "LinearClassifier", "attributes")
    assert not (tmp_path / "o.onnx").exists()


def test_compress_with_mini_batch_rows_keeps_the_engines_auto_fisher(
    tmp_path: Path, mlp_path: Path, mlp_data: Path
) -> None:
    """``--fisher auto`` is the true Fisher only for per-sample rows; with ``--mini-batch 4`` the
    default used to ask for it anyway and fail ("fisher='kl' needs per-sample rows")."""
    from chita_onnx.pipeline import auto_fisher

    assert auto_fisher("auto") == "kl" and auto_fisher("auto", mini_batch=4) == "auto"
    assert auto_fisher("auto", first_order=True) == "auto" and auto_fisher("sampled") == "sampled"
    out = tmp_path / "o.onnx"
    code, stdout, err = run(
        "compress", mlp_path, out, "--sparsity", "0.5", "--method", "chita", "--mini-batch", "4", "--data", mlp_data
    )
    assert code == 0, err
    assert "sparsity 50.00%" in stdout and out.exists()


def test_no_arguments_shows_the_help_not_an_escaped_error_line() -> None:
    code, out, err = run()
    assert "\\n" not in out + err and not err.startswith("error:"), err
    assert "Usage: " in out + err and "compress" in out + err
    assert code in (0, 2)


def test_the_report_gives_the_peak_memory_of_the_process(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    """``peak memory`` in the printed report and ``peak_memory`` (bytes) in the JSON: at least what the
    process has touched (a 200 MB block here, so a unit off by 1024 fails) and below the machine's RAM."""
    from chita_onnx.limits import total_memory

    block = np.ones(200 * 2**20 // 8)  # written, so resident
    report = tmp_path / "report.json"
    code, stdout, err = run(
        "compress", mlp_path, tmp_path / "p.onnx", "--sparsity", "0.5", "--data", mlp_data, "--method", "magnitude",
        "--report", report,
    )  # fmt: skip
    assert code == 0, err
    peak = json.loads(report.read_text())["peak_memory"]
    assert block.nbytes <= peak < total_memory()
    lines = [line for line in stdout.splitlines() if line.startswith("peak memory: ")]
    assert len(lines) == 1 and lines[0].split()[3] in ("MB", "GB"), lines
    del block
