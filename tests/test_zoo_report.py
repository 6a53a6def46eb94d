"""The zoo report names the least dense pruned tensor of each run, so a layer starved by a global
budget is visible next to the task metric (not only as a collapse of it)."""

from __future__ import annotations

import sys

import numpy as np
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "zoo"))

import densities
import run

from chita_onnx.report import TensorReport


def _t(name: str, size: int, nnz: int) -> TensorReport:
    return TensorReport(name=name, op_type="Conv", shape=(size,), size=size, nnz=nnz, storage="dense")


def test_least_dense_tensor_and_empty_tensors_are_recorded_and_rendered() -> None:
    rec = run.density_extremes([_t("a", 100, 70), _t("head", 50, 0), _t("b", 10, 3)])
    assert rec == {"lowest_density": ["head", 0.0], "empty_tensors": ["head"]}
    assert run.least_dense(rec) == "0.000 (`head`), 1 empty"
    rec = run.density_extremes([_t("a", 100, 70), _t("b", 10, 3)])
    assert rec["lowest_density"] == ["b", 0.3] and rec["empty_tensors"] == []
    assert run.least_dense(rec) == "0.300 (`b`)"
    assert run.least_dense({}) == "–"  # runs recorded before the field existed, refusals


def test_per_model_table_has_the_column_for_old_and_new_records() -> None:
    header = {
        "model": "m", "wheel": "w==1", "file": "m.onnx", "exporter": "x", "task": "t", "note": "",
        "licence": "MIT", "producer": "p", "opset": 13, "file_mb": 1.0, "p": 160,
        "calib_samples": 4, "heldout_samples": 4, "dense": {"acc": 1.0},
    }  # fmt: skip
    new = {"sparsity": 0.3, "method": "magnitude", "status": "ok", "metric": {"acc": 0.5}}
    new.update(run.density_extremes([_t("a", 100, 70), _t("b", 60, 0)]))
    old = {"sparsity": 0.5, "method": "magnitude", "status": "ok", "metric": {"acc": 0.4}}
    md = run.markdown([{"header": header, "runs": [new, old]}], "machine", None)
    rows = [ln for ln in md.splitlines() if ln.startswith("| 0")]
    assert len({ln.count("|") for ln in rows}) == 1  # dense, new and old rows have the same columns
    assert "0.000 (`b`), 1 empty" in rows[1] and "| – |" in rows[2]


def test_magnitude_mask_keeps_exactly_the_largest_entries() -> None:
    w = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    for d in (0.0, 0.1, 0.5, 0.93, 1.0):
        m = densities.magnitude_mask(w, d)
        k = round(d * w.size)
        assert np.count_nonzero(m) == k
        kept = np.abs(w[m != 0])
        if 0 < k < w.size:  # every kept entry is at least as large as every dropped one
            assert kept.min() >= np.abs(w[m == 0]).max()
        np.testing.assert_array_equal(m[m != 0], w[m != 0])
