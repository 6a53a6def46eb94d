"""End to end: real models, real data, real onnxruntime sessions, every option of `compress`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import pytest
from conftest import MODELS

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.errors import ConfigError
from chita_onnx.graph import METADATA_KEY, find_prunable, get_weights, load_model
from chita_onnx.solver.budgets import keep_count

CNN, MLP = MODELS / "digits_cnn.onnx", MODELS / "digits_mlp.onnx"
CALIB, TEST = MODELS / "digits_calib.npz", MODELS / "digits_test.npz"


def pruned_weights(path: Path) -> dict[str, np.ndarray]:
    m = load_model(path)
    return get_weights(m, [t.name for t in find_prunable(m)])


def test_bundled_models_reach_95_percent() -> None:
    for model in (CNN, MLP):
        assert chita_onnx.evaluate_model(model, TEST).accuracy >= 0.95


@pytest.mark.parametrize("method", ["chita", "chita++", "magnitude", "wf", "cbs", "cbs-s"])
def test_every_method_gives_exact_budget_and_checker_clean_model(tmp_path: Path, method: str) -> None:
    out = tmp_path / "out.onnx"
    cfg = CompressConfig(sparsity=0.7, method=method, stages=3 if method == "chita++" else None)
    report = chita_onnx.compress(CNN, out, CALIB, cfg, eval_data=TEST)
    onnx.checker.check_model(str(out))
    w = pruned_weights(out)
    p = sum(a.size for a in w.values())
    nnz = sum(int(np.count_nonzero(a)) for a in w.values())
    assert p == 10336 and nnz == keep_count(0.7, p) == 3101 == report.nnz
    assert report.evaluation is not None and report.evaluation.samples == 500
    assert report.evaluation.dense_accuracy == pytest.approx(0.988)
    assert len(report.stages) == (3 if method == "chita++" else 1)
    src, dst = onnx.load(CNN), onnx.load(out)
    assert dst.ir_version == src.ir_version and list(dst.opset_import) == list(src.opset_import)
    assert [i.name for i in dst.graph.input] == [i.name for i in src.graph.input]
    meta = {p.key: p.value for p in dst.metadata_props}
    assert json.loads(meta[METADATA_KEY])["method"] == method
    assert {k: v for k, v in meta.items() if k != METADATA_KEY} == {p.key: p.value for p in src.metadata_props}


def test_chita_beats_magnitude_on_the_bundled_cnn(tmp_path: Path) -> None:
    acc = {}
    for method in ("magnitude", "chita", "chita++"):
        cfg = CompressConfig(sparsity=0.8, method=method, stages=5 if method == "chita++" else None)
        # the solvers themselves, without the statistics correction (which lifts magnitude most)
        cfg = cfg.with_(bn_recalibrate="off", bias_correction="off")
        r = chita_onnx.compress(CNN, tmp_path / f"{method}.onnx", CALIB, cfg, eval_data=TEST)
        acc[method] = r.evaluation.pruned_accuracy
    assert acc["chita"] > acc["magnitude"] + 0.1
    assert acc["chita++"] > acc["chita"]
    assert acc["chita++"] > 0.9


def test_chita_plus_plus_reports_every_stage_on_held_out_data(tmp_path: Path) -> None:
    cfg = CompressConfig(sparsity=0.8, method="chita++", stages=4, schedule="linear", start_sparsity=0.5)
    r = chita_onnx.compress(MLP, tmp_path / "o.onnx", CALIB, cfg)
    assert [round(s.sparsity, 3) for s in r.stages] == [0.5, 0.6, 0.7, 0.8]
    assert [s.k for s in r.stages] == [keep_count(s, 6464) for s in (0.5, 0.6, 0.7, 0.8)]
    assert all(s.accuracy is not None and s.objective is not None for s in r.stages)
    assert r.eval_source.startswith("20% of the calibration data")
    assert r.evaluation is not None and r.evaluation.samples == round(0.2 * 256)


def test_sparsity_zero_is_a_no_op(tmp_path: Path) -> None:
    for method in ("chita", "magnitude", "wf"):
        out = tmp_path / f"{method}.onnx"
        r = chita_onnx.compress(MLP, out, CALIB, CompressConfig(sparsity=0.0, method=method), eval_data=TEST)
        before, after = pruned_weights(MLP), pruned_weights(out)
        for name in before:
            np.testing.assert_array_equal(after[name], before[name])
        assert r.evaluation.max_abs_diff == 0.0


def test_layer_scope_gives_the_same_sparsity_in_every_tensor(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    chita_onnx.compress(MLP, out, CALIB, CompressConfig(sparsity=0.75, scope="layer"))
    for name, a in pruned_weights(out).items():
        assert int(np.count_nonzero(a)) == keep_count(0.75, a.size), name


def test_keep_and_min_density(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    r = chita_onnx.compress(MLP, out, CALIB, CompressConfig(sparsity=0.9, keep=("fc3.weight",), min_density=0.05))
    w = pruned_weights(out)
    np.testing.assert_array_equal(w["fc3.weight"], pruned_weights(MLP)["fc3.weight"])
    assert r.p == 4096 + 2048
    assert np.count_nonzero(w["fc1.weight"]) + np.count_nonzero(w["fc2.weight"]) == keep_count(0.9, 6144)
    assert np.count_nonzero(w["fc2.weight"]) >= np.ceil(0.05 * 2048)
    with pytest.raises(ConfigError, match=r"--min-density=0\.2"):
        CompressConfig(sparsity=0.9, min_density=0.2)


def test_block_path_from_the_api_matches_budget_and_stays_close(tmp_path: Path) -> None:
    full = chita_onnx.compress(CNN, tmp_path / "a.onnx", CALIB, CompressConfig(sparsity=0.7), eval_data=TEST)
    blocked = chita_onnx.compress(
        CNN, tmp_path / "b.onnx", CALIB, CompressConfig(sparsity=0.7, max_memory=2**20, block_size=500), eval_data=TEST
    )
    assert blocked.nnz == full.nnz == 3101
    assert blocked.evaluation.pruned_accuracy >= full.evaluation.pruned_accuracy - 0.05


def test_workdir_memory_maps_x_and_leaves_nothing_behind(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    a = chita_onnx.compress(MLP, tmp_path / "a.onnx", CALIB, CompressConfig(sparsity=0.8), eval_data=TEST)
    b = chita_onnx.compress(
        MLP, tmp_path / "b.onnx", CALIB, CompressConfig(sparsity=0.8, workdir=str(work)), eval_data=TEST
    )
    wb = pruned_weights(tmp_path / "b.onnx")
    for name, arr in pruned_weights(tmp_path / "a.onnx").items():  # same support, same values up to BLAS rounding
        np.testing.assert_array_equal(wb[name] != 0, arr != 0)
        np.testing.assert_allclose(wb[name], arr, rtol=1e-5, atol=1e-7)
    assert abs(a.evaluation.pruned_accuracy - b.evaluation.pruned_accuracy) <= 0.002
    assert list(work.iterdir()) == []


def test_random_data_runs_and_warns(tmp_path: Path) -> None:
    r = chita_onnx.compress(MLP, tmp_path / "o.onnx", "random", CompressConfig(sparsity=0.5))
    assert r.nnz == keep_count(0.5, 6464)
    assert any("random calibration data" in w for w in r.warnings)
    assert r.evaluation is not None and r.evaluation.dense_accuracy is None  # no labels


def test_first_order_term_changes_the_result(tmp_path: Path) -> None:
    runs = {}
    for name, cfg in {
        "plain": CompressConfig(sparsity=0.7),
        "first_order": CompressConfig(sparsity=0.7, first_order=True),
    }.items():
        r = chita_onnx.compress(MLP, tmp_path / f"{name}.onnx", CALIB, cfg, eval_data=TEST)
        assert r.nnz == keep_count(0.7, 6464)
        runs[name] = pruned_weights(tmp_path / f"{name}.onnx")["fc1.weight"]
    assert not np.allclose(runs["plain"], runs["first_order"])


def test_large_models_are_written_with_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import chita_onnx.graph as graph

    monkeypatch.setattr(graph, "_EXTERNAL_THRESHOLD", 1000)  # pretend the digits CNN is over 2 GB
    out = tmp_path / "o.onnx"
    r = chita_onnx.compress(CNN, out, CALIB, CompressConfig(sparsity=0.8, storage="sparse"), eval_data=TEST)
    assert (tmp_path / "o.onnx.data").is_file()
    assert not onnx.load(out, load_external_data=False).graph.sparse_initializer  # densified: must be external
    assert r.sizes.pruned_raw == out.stat().st_size + (tmp_path / "o.onnx.data").stat().st_size
    assert r.evaluation.agreement is not None
    assert sum(int(np.count_nonzero(a)) for a in pruned_weights(out).values()) == r.nnz


def test_report_json_round_trips(tmp_path: Path) -> None:
    r = chita_onnx.compress(MLP, tmp_path / "o.onnx", CALIB, CompressConfig(sparsity=0.8), eval_data=TEST)
    d = json.loads(r.to_json())
    assert d["sparsity"] == pytest.approx(r.sparsity) and len(d["tensors"]) == 3
    assert d["sizes"]["dense_raw"] == MLP.stat().st_size and d["sizes"]["pruned_zstd"] < d["sizes"]["dense_zstd"]
    assert set(d["versions"]) >= {"onnx", "onnxruntime", "numpy"}
    text = chita_onnx.format_report(r)
    assert "top-1 accuracy" in text and "zstd" in text and "fc1.weight" in text


def test_model_newer_than_the_bundled_runtime_keeps_its_versions(tmp_path: Path) -> None:
    from conftest import tiny_mlp

    model = onnx.version_converter.convert_version(tiny_mlp(), 23)
    model.ir_version = 11
    onnx.save(model, tmp_path / "new.onnx")
    from conftest import labelled_data

    data = labelled_data(tiny_mlp())
    r = chita_onnx.compress(tmp_path / "new.onnx", tmp_path / "out.onnx", data, CompressConfig(sparsity=0.6))
    out = onnx.load(tmp_path / "out.onnx")
    assert out.ir_version == 11 and [o.version for o in out.opset_import] == [23]
    assert r.evaluation is not None and r.evaluation.dense_accuracy == 1.0
    assert r.nnz == keep_count(0.6, 272)


@pytest.mark.parametrize("rows", [1, 3])
def test_block_columns_are_exact_even_when_one_tensor_does_not_fit(tmp_path: Path, rows: int) -> None:
    """Row chunks (one reused buffer; seeded draws continue across chunks) give the rows of one pass,
    with one row per sample and with three (``--fisher kl`` sketches)."""
    from chita_onnx.pipeline import GradientOracle, PhaseTimer, initial_weights, prepare

    cfg = CompressConfig(sparsity=0.8, max_memory=2**20, fisher="kl", fisher_rows=rows)  # fc1's X: 3.3 MB+
    prep = prepare(MLP, CALIB, cfg, TEST)
    oracle = GradientOracle(prep, cfg)
    w = initial_weights(prep)
    full = oracle.matrix(w).copy()
    assert oracle.reps == rows and full.shape[0] == oracle.rows
    assert not oracle.fits()
    columns = oracle.columns(w, PhaseTimer())
    for a, b in [(0, 700), (3000, 4096), (4096, 6144), (6000, 6464)]:
        got, ref = columns(a, b), full[:, a:b]
        assert got.shape == ref.shape
        # confidently classified rows carry float32 rounding of 1 - p_y (about 1e-4 relative per row)
        assert np.linalg.norm(got - ref) <= 1e-4 * np.linalg.norm(ref)


def test_block_path_keeps_its_gradient_arrays_within_max_memory(tmp_path: Path) -> None:
    """The column group, the tensors' gradients it is cut from, the row-chunk buffers and the block
    solves together stay within ``--max-memory`` (34 MiB here before the row-chunk buffer was reused
    and each group freed before the next was built).  NumPy's allocations are traced by tracemalloc;
    onnxruntime's are not (its session is outside the cap), and the calibration data is loaded first."""
    import tracemalloc

    from conftest import labelled_data, tiny_mlp

    from chita_onnx.pipeline import GradientOracle, PhaseTimer, initial_weights, prepare
    from chita_onnx.solver import Budget
    from chita_onnx.solver.block import chita_blocked

    model = tiny_mlp(seed=3, d_in=256, hidden=512, classes=10)  # 136 k weights
    onnx.save(model, tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", **labelled_data(model, n=256))
    cap = 16 * 2**20
    cfg = CompressConfig(sparsity=0.8, max_memory=cap)
    prep = prepare(tmp_path / "m.onnx", tmp_path / "calib.npz", cfg, None)
    oracle = GradientOracle(prep, cfg)
    p = prep.layout.p
    assert oracle.rows * p * 4 > 6 * cap  # X (112 MB) is many times the cap
    w = initial_weights(prep)
    columns = oracle.columns(w, PhaseTimer())
    budget = Budget.global_(keep_count(0.8, p), p)
    columns(0, 1)  # load the samples and build a gradient session outside the measurement
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        res = chita_blocked(columns, w, budget, cfg.ridge, n=oracle.rows, max_memory_bytes=cap)
        peak = tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()
    assert res.info["groups"] >= 8 and int(np.count_nonzero(res.w)) == budget.k
    # plus O(p) vectors: the weights, the allocation and the result, in float64 (p × 8 bytes each)
    assert peak <= cap + 4 * p * 8, f"{peak / 2**20:.2f} MiB of arrays at once"


def test_phase_timer_does_not_count_nested_phases_twice() -> None:
    import time

    from chita_onnx.pipeline import PhaseTimer

    t = PhaseTimer()
    t0 = time.perf_counter()
    with t.phase("solve"):
        time.sleep(0.02)
        with t.phase("gradients"):
            time.sleep(0.05)
    wall = time.perf_counter() - t0
    assert t.seconds["gradients"] >= 0.05 and 0.02 <= t.seconds["solve"] < 0.05
    assert sum(t.seconds.values()) == pytest.approx(wall, abs=0.01)


def test_workdir_lets_a_matrix_larger_than_max_memory_skip_the_block_path(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    cfg = CompressConfig(sparsity=0.8, max_memory=2**20, workdir=str(work))  # X is 5.3 MB > 1 MiB
    r = chita_onnx.compress(MLP, tmp_path / "o.onnx", CALIB, cfg, eval_data=TEST)
    assert "objective_model" not in r.solver  # the full (unblocked) solver ran on the memory-mapped X
    assert r.nnz == keep_count(0.8, 6464) and list(work.iterdir()) == []
