"""The reliability layer piece by piece: the path plan, staging and commit, limits, error translation,
one-line messages, and what inspect marks.  The whole promise on hostile inputs is in tests/fuzz."""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import sys
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from chita_onnx_cli.main import cli
from click.testing import CliRunner
from conftest import labelled_data, tiny_mlp
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.errors import ChitaError, ConfigError, DataError, ModelError, OutputError, ResourceError, one_line
from chita_onnx.guard import translate
from chita_onnx.limits import check_npz, data_budget
from chita_onnx.paths import STAGING_PREFIX, plan_outputs
from chita_onnx.solver.schedule import sparsity_schedule
from chita_onnx.validate import _check_sparse

sys.path.insert(0, str(Path(__file__).parent / "fuzz"))
import hostile


def run(*args: str | Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


# ------------------------------------------------------------------------------------ path plan


def test_plan_refuses_an_output_that_is_an_input_by_any_name(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    (tmp_path / "hard.onnx").hardlink_to(mlp_path)
    (tmp_path / "soft.onnx").symlink_to(mlp_path)
    (tmp_path / "sub").mkdir()
    dotted = tmp_path / "sub" / ".." / mlp_path.name
    for alias in (mlp_path, tmp_path / "hard.onnx", tmp_path / "soft.onnx", dotted):
        with pytest.raises(ConfigError, match="input model"):
            plan_outputs([("OUTPUT", alias)], model=mlp_path, data=mlp_data)
    with pytest.raises(ConfigError, match="calibration data"):
        plan_outputs([("--report", mlp_data)], model=mlp_path, data=mlp_data)
    with pytest.raises(ConfigError, match="is also OUTPUT"):
        plan_outputs([("OUTPUT", tmp_path / "o.onnx"), ("--report", tmp_path / "o.onnx")], model=mlp_path)


def test_plan_allows_replacing_an_earlier_output(tmp_path: Path, mlp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"an earlier result")
    with plan_outputs([("OUTPUT", out)], model=mlp_path) as plan:
        plan.staged("OUTPUT").write_bytes(b"new")
        assert out.read_bytes() == b"an earlier result"  # untouched until the commit
        assert plan.commit() == [out]
    assert out.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)] == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_a_failed_run_leaves_the_old_output_and_no_temporary_file(
    tmp_path: Path, mlp_path: Path, exc: BaseException
) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"an earlier result")
    before = sorted(p.name for p in tmp_path.iterdir())

    def interrupted_run() -> None:
        with plan_outputs([("OUTPUT", out), ("--report", tmp_path / "r.json")]) as plan:
            plan.staged("OUTPUT").write_bytes(b"half")
            plan.staged("--report").write_text("{")
            raise exc

    with pytest.raises(type(exc)):
        interrupted_run()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert out.read_bytes() == b"an earlier result"


def test_plan_refuses_outputs_inside_a_data_folder_and_unwritable_folders(tmp_path: Path, mlp_path: Path) -> None:
    folder = tmp_path / "batches"
    folder.mkdir()
    np.savez(folder / "a.npz", **labelled_data(tiny_mlp()))
    with pytest.raises(ConfigError, match="inside the calibration data folder"):
        plan_outputs([("OUTPUT", folder / "new.onnx")], model=mlp_path, data=folder)
    with pytest.raises(OutputError, match="cannot write"):
        plan_outputs([("OUTPUT", Path(hostile.UNWRITABLE) / "o.onnx")], model=mlp_path)
    with pytest.raises(OutputError, match="does not exist"):
        plan_outputs([("--report", tmp_path / "nope" / "r.json")], model=mlp_path)


def test_fifo_inputs_are_refused_without_being_opened(tmp_path: Path, mlp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.npz")  # opening it for reading would block this test forever
    with pytest.raises(DataError, match="FIFO"):
        plan_outputs([], model=mlp_path, data=tmp_path / "pipe.npz")
    with pytest.raises(DataError, match="FIFO"):
        chita_onnx.open_source(tmp_path / "pipe.npz")
    with pytest.raises(ModelError, match="FIFO"):
        chita_onnx.load_model(tmp_path / "pipe.npz")


# ------------------------------------------------------------------------------ API entry points


def test_compress_writes_model_and_report_together_or_not_at_all(
    tmp_path: Path, mlp_path: Path, mlp_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, report = tmp_path / "out" / "o.onnx", tmp_path / "out" / "r.json"
    out.parent.mkdir()
    cfg = CompressConfig(sparsity=0.5, method="magnitude")
    rep = chita_onnx.compress(mlp_path, out, mlp_data, cfg, report=report)
    assert json.loads(report.read_text())["nnz"] == rep.nnz == 136
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "r.json"]

    # a failure after the model was written (here: the disk fills while measuring sizes)
    import chita_onnx.pipeline as pipeline

    def full_disk(path: object) -> tuple[int, int]:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline, "file_sizes", full_disk)
    old = out.read_bytes(), report.read_bytes()
    with pytest.raises(ResourceError, match="No space left"):
        chita_onnx.compress(mlp_path, out, mlp_data, cfg.with_(sparsity=0.9), report=report)
    assert (out.read_bytes(), report.read_bytes()) == old
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "r.json"]


def test_evaluate_and_sweep_write_their_files_through_the_plan(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    ev = chita_onnx.evaluate_model(mlp_path, mlp_data, report=tmp_path / "ev.json")
    assert json.loads((tmp_path / "ev.json").read_text())["accuracy"] == ev.accuracy == 1.0
    from chita_onnx.sweep import run_sweep

    base = CompressConfig(sparsity=0.5, method="chita++", stages=2)
    result, written = run_sweep(mlp_path, mlp_data, base, ["magnitude"], [0.5], out=tmp_path / "s")
    assert {p.name for p in written} <= {"s.csv", "s.json", "s.png"} and {"s.csv", "s.json"} <= {
        p.name for p in written
    }
    assert json.loads((tmp_path / "s.json").read_text())["p"] == result.p == 272
    shutil.copy(mlp_path, tmp_path / "x.json")  # the model under a name that --out x would write
    with pytest.raises(ConfigError, match=r"--out=.*x\.json \(json\): is the input model"):
        run_sweep(tmp_path / "x.json", mlp_data, base, ["magnitude"], [0.5], out=tmp_path / "x")


def test_a_budget_of_zero_weights_needs_allow_empty(tmp_path: Path, mlp_path: Path, mlp_data: Path) -> None:
    cfg = CompressConfig(sparsity=0.999999, method="magnitude")
    with pytest.raises(ConfigError, match="--allow-empty"):
        chita_onnx.compress(mlp_path, tmp_path / "o.onnx", mlp_data, cfg)
    assert not (tmp_path / "o.onnx").exists()
    rep = chita_onnx.compress(mlp_path, tmp_path / "o.onnx", mlp_data, cfg.with_(allow_empty=True))
    assert rep.k == rep.nnz == 0


# ---------------------------------------------------------------------------------- inspect


def test_inspect_marks_exactly_the_weights_compress_refuses(tmp_path: Path) -> None:
    half = hostile.mlp(dtype=TensorProto.BFLOAT16)  # float16 has a float32 twin for its gradients
    hostile.save(half, tmp_path / "half.onnx")
    code, out, _ = run("inspect", tmp_path / "half.onnx")
    assert code == 0 and "refused: bfloat16 weights" in out and "2 of them refused by compress" in out
    hostile.save(hostile.mlp(dtype=TensorProto.FLOAT16), tmp_path / "f16.onnx")
    code, out, _ = run("inspect", tmp_path / "f16.onnx")
    assert code == 0 and "refused" not in out
    nan = hostile.mlp()
    hostile._nan_weight(nan)
    hostile.save(nan, tmp_path / "nan.onnx")
    code, out, _ = run("inspect", "--json", tmp_path / "nan.onnx")
    refused = {t["name"]: t["refused"] for t in json.loads(out)}
    assert code == 0 and refused["W2"] is None and "nan at index [1, 2]" in refused["W1"]
    hostile.data(tmp_path / "d.npz")
    code, _, err = run("compress", tmp_path / "nan.onnx", tmp_path / "o.onnx", "--data", tmp_path / "d.npz")
    assert code == 1 and "'W1'" in err and "nan at index [1, 2]" in err
    code, _, err = run(  # magnitude pruning needs no gradients: float16 weights are fine there
        "compress", tmp_path / "f16.onnx", tmp_path / "o.onnx", "--data", tmp_path / "d.npz", "--method", "magnitude"
    )
    assert code == 0, err


def test_a_graph_out_of_order_is_sorted_and_a_cycle_is_named(tmp_path: Path) -> None:
    model = tiny_mlp()
    nodes = list(model.graph.node)[::-1]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, tmp_path / "reversed.onnx")
    loaded = chita_onnx.load_model(tmp_path / "reversed.onnx")
    assert [n.name for n in loaded.graph.node] == ["fc1", "fc1_bias", "relu1", "fc2"]
    hostile.save(hostile.mlp(), tmp_path / "m.onnx")
    cyclic = hostile.mlp()
    hostile._cycle(cyclic)
    hostile.save(cyclic, tmp_path / "c.onnx")
    with pytest.raises(ModelError, match=r"cycle: 'fc1' \(MatMul\) -> 'fc1_bias' \(Add\) -> 'relu1' \(Relu\) -> 'fc1'"):
        chita_onnx.inspect_model(tmp_path / "c.onnx")


# ----------------------------------------------------------------------------------- limits


def test_legitimate_compressed_data_is_not_mistaken_for_a_bomb(tmp_path: Path) -> None:
    x = np.zeros((2000, 1000), np.float32)  # 8 MB that compress ~1000-fold, but under the 64 MiB floor
    np.savez_compressed(tmp_path / "zeros.npz", x=x)
    assert check_npz(tmp_path / "zeros.npz") == {"x": ((2000, 1000), np.dtype(np.float32))}
    rng = np.random.default_rng(0)
    np.savez_compressed(tmp_path / "noise.npz", x=rng.standard_normal((500, 100)), labels=np.arange(500))
    assert set(check_npz(tmp_path / "noise.npz")) == {"x", "labels"}


def test_declared_sizes_meet_max_memory_before_anything_is_read(tmp_path: Path) -> None:
    stored = b"\x93NUMPY\x01\x00" + b"x" * 100  # a stored member claiming 300 MiB
    (tmp_path / "big.npz").write_bytes(hostile._zip_one("x.npy", stored, zlib.crc32(stored), 300 * 2**20, method=0))
    with data_budget(2**20), pytest.raises(ResourceError, match=r"data limit of 256\.0 MiB"):
        check_npz(tmp_path / "big.npz")  # --max-memory 1M: the 256 MiB floor applies
    with pytest.raises(ResourceError, match="zip bomb"):
        check_npz(tmp_path / "big.npz")


def test_a_sparse_tensor_from_a_real_pruning_is_not_refused() -> None:
    dims, nnz = [4096, 8192], 4096 * 8192 // 300  # 128 MiB dense at 99.7% sparsity: ~100-fold
    idx = np.sort(np.random.default_rng(0).choice(dims[0] * dims[1], nnz, replace=False)).astype(np.int64)
    sp = helper.make_sparse_tensor(
        numpy_helper.from_array(np.ones(nnz, np.float32), "W"), numpy_helper.from_array(idx, "W_i"), dims
    )
    _check_sparse(sp, "m.onnx")  # no error, and nothing was densified
    sp.dims[1] = 8192 * 64
    with pytest.raises(ResourceError, match="densify"):
        _check_sparse(sp, "m.onnx")


def test_exp_schedule_has_no_overflow_and_keeps_its_values() -> None:
    long = sparsity_schedule(1000, 0.9, "exp", 0.5)
    assert long[0] == 0.5 and long[-1] == 0.9 and all(b >= a for a, b in itertools.pairwise(long))
    n, S, b = 7, 0.8, 0.3
    old = [b + (S - b) * 2.0 ** (n - 1) / (2.0 ** (n - 1) - 1.0) * (2.0**t - 1.0) / 2.0**t for t in range(n)]
    assert np.allclose(sparsity_schedule(n, S, "exp", b), old, rtol=0, atol=1e-12)


# ------------------------------------------------------------------------------------- errors


def test_messages_stay_on_one_line() -> None:
    assert one_line("a\nb\r\x1b[31m\u2028\u202e") == "a\\nb\\r\\x1b[31m\\u2028\\u202e"
    assert str(DataError("bad/file\nname.npz: broken")) == "bad/file\\nname.npz: broken"
    assert one_line("naïve 数据 ok") == "naïve 数据 ok"


def test_library_exceptions_are_translated_and_bugs_are_not() -> None:
    from google.protobuf.message import DecodeError

    assert isinstance(translate(DecodeError("Truncated"), model="m.onnx"), ModelError)
    assert "m.onnx" in str(translate(DecodeError("Truncated"), model="m.onnx"))
    full = translate(OSError(errno.ENOSPC, "No space left on device", "out/o.onnx"))
    assert isinstance(full, ResourceError) and "out/o.onnx" in str(full)
    assert isinstance(translate(PermissionError(errno.EACCES, "Permission denied", "/x")), OutputError)
    assert isinstance(translate(MemoryError()), ResourceError)
    assert translate(KeyError("a bug")) is None and translate(ZeroDivisionError()) is None
    assert isinstance(translate(ConfigError("x")), ChitaError)


def test_usage_errors_are_one_line_with_exit_2(mlp_path: Path) -> None:
    code, _, err = run("compress", mlp_path, "--sparsity", "x")
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and "--help" in err
    code, out, _ = run("--help")
    assert code == 0 and "compress" in out
