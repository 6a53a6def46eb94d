"""``--method auto`` at high sparsity on a classifier decides between the layer-wise pass and
``--distill`` on calibration samples held out of both fits (:mod:`chita_onnx.escalate`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import labelled_data, tiny_mlp

from chita_onnx import CompressConfig, escalate
from chita_onnx.graph import find_prunable, get_weights, load_model
from chita_onnx.pipeline import GradientOracle, PhaseTimer, compress, prepare, prune, resolve_method
from chita_onnx.solver.budgets import keep_count


def _files(tmp_path: Path, n: int, *, labels: bool = True, seed: int = 5) -> tuple[Path, Path]:
    model = tiny_mlp(seed=seed, d_in=12, hidden=16, classes=5)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    arrays = labelled_data(model, n=n, seed=seed + 1)
    if not labels:
        arrays.pop("labels")
    data = tmp_path / f"d{n}{'' if labels else 'u'}.npz"
    np.savez(data, **arrays)  # type: ignore[arg-type]
    return path, data


def _nonzeros(path: Path) -> int:
    model = load_model(path)
    values = get_weights(model, [t.name for t in find_prunable(model)])
    return sum(int(np.count_nonzero(v)) for v in values.values())


def test_eligible_only_for_auto_layerwise_at_high_sparsity(tmp_path: Path) -> None:
    path, data = _files(tmp_path, 100)
    prep = prepare(path, data, CompressConfig(sparsity=0.9))
    high = CompressConfig(sparsity=0.9)
    resolved, _ = resolve_method(prep, high)
    assert resolved.method == "layerwise"
    assert escalate.eligible(high, resolved, prep, real_data=True) == ""
    low = CompressConfig(sparsity=0.8)
    assert escalate.eligible(low, resolve_method(prep, low)[0], prep, real_data=True) == "off"
    off = CompressConfig(sparsity=0.9, auto_distill=False)
    assert escalate.eligible(off, resolve_method(prep, off)[0], prep, real_data=True) == "off"
    named = CompressConfig(sparsity=0.9, method="layerwise")  # a method by name is run as asked
    assert escalate.eligible(named, named, prep, real_data=True) == "off"
    assert escalate.eligible(high, resolved, prep, real_data=False) == "random calibration data"


def test_too_many_weights_is_said_in_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path, data = _files(tmp_path, 100)
    monkeypatch.setattr(escalate, "MAX_WEIGHTS", 100)  # the tiny MLP has 272
    report = compress(path, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.9), eval_data=data)
    assert report.method == "layerwise"
    assert "--distill not tried: 272 prunable weights, more than the 100" in report.solver["method_choice"]


def test_the_held_out_decision_keeps_the_candidate_with_the_lower_kl(tmp_path: Path) -> None:
    path, data = _files(tmp_path, 120)
    requested = CompressConfig(sparsity=0.9)
    prep = prepare(path, data, requested, data)  # evaluated on the same file: all 120 calibrate
    config, _ = resolve_method(prep, requested)
    timer = PhaseTimer()
    w, stages, result = prune(prep, config, GradientOracle(prep, config), timer)
    esc = escalate.escalate(prep, requested, config, w, stages, result, timer)
    assert esc.held_out == round(escalate.HELD_OUT_FRACTION * 120)  # 24 of the 120, held out of both fits
    assert esc.layerwise is not None and esc.distill is not None  # both are always scored
    lay, dis = esc.layerwise, esc.distill
    assert esc.kept_distill == (dis.kl < lay.kl)  # the lower held-out KL to dense wins; ties: layer-wise
    assert int(np.count_nonzero(esc.w)) <= keep_count(0.9, prep.layout.p)
    if esc.kept_distill:
        assert esc.config.distill and esc.config.method == "chita++" and "--distill kept" in esc.note
    else:
        assert np.array_equal(esc.w, w) and esc.config is config  # the default's own result, all data
    assert f"on {esc.held_out} calibration samples" in esc.note


def test_a_distill_over_budget_writes_the_default_layer_wise_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, data = _files(tmp_path, 120)
    monkeypatch.setattr(escalate, "DISTILL_BUDGET_SECONDS", 0.0)  # stops after its first stage
    report = compress(path, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.9), eval_data=data)
    assert report.method == "layerwise"
    assert "--distill stopped after 1 of its 30 stages" in report.solver["method_choice"]
    plain = compress(path, tmp_path / "p.onnx", data, CompressConfig(sparsity=0.9, auto_distill=False), eval_data=data)
    assert "distill" not in plain.solver.get("method_choice", "")
    # not kept, the written model is the default's own (fitted on every calibration sample)
    assert (tmp_path / "o.onnx").read_bytes() == (tmp_path / "p.onnx").read_bytes()


def test_default_at_high_sparsity_reports_the_decision_and_keeps_the_budget(tmp_path: Path) -> None:
    path, data = _files(tmp_path, 120)
    out = tmp_path / "o.onnx"
    report = compress(path, out, data, CompressConfig(sparsity=0.9), eval_data=data)
    choice = report.solver["method_choice"]
    assert "held-out KL to dense on 24 calibration samples" in choice
    kept = "--distill kept" in choice
    assert kept == (report.method == "chita++") and kept == report.loss.startswith("--distill")
    assert _nonzeros(out) <= report.k == keep_count(0.9, 272)


def test_below_the_threshold_nothing_changes(tmp_path: Path) -> None:
    path, data = _files(tmp_path, 120)
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    ra = compress(path, a, data, CompressConfig(sparsity=0.8), eval_data=data)
    compress(path, b, data, CompressConfig(sparsity=0.8, auto_distill=False), eval_data=data)
    assert "distill" not in ra.solver.get("method_choice", "")
    assert a.read_bytes() == b.read_bytes()


def test_too_few_samples_or_no_class_distribution_is_not_escalated(tmp_path: Path) -> None:
    path, few = _files(tmp_path, 60)
    report = compress(path, tmp_path / "f.onnx", few, CompressConfig(sparsity=0.9), eval_data=few)
    assert report.method == "layerwise"
    assert (
        f"--distill not tried: 60 calibration samples, fewer than the {escalate.MIN_SAMPLES}"
        in (report.solver["method_choice"])
    )
    path, raw = _files(tmp_path, 120, labels=False)  # raw logits and no labels: no KL to fit
    report = compress(path, tmp_path / "r.onnx", raw, CompressConfig(sparsity=0.9))
    assert report.method == "layerwise"
    assert "is not a class distribution" in report.solver["method_choice"]


def test_sweep_auto_row_makes_the_same_decision_as_compress(tmp_path: Path) -> None:
    from chita_onnx.sweep import sweep

    path, data = _files(tmp_path, 150)
    base = CompressConfig(sparsity=0.5)
    prep = prepare(path, data, base, data)
    result = sweep(prep, base, ["auto"], [0.5, 0.9])
    low, high = result.rows
    assert "distill" not in low.note
    assert "held-out KL to dense on" in high.note
    assert high.nnz <= keep_count(0.9, 272)


def test_a_distill_over_its_time_budget_stops_and_keeps_the_layer_wise_result(tmp_path: Path) -> None:
    path, data = _files(tmp_path, 120)
    requested = CompressConfig(sparsity=0.9)
    prep = prepare(path, data, requested, data)
    config, _ = resolve_method(prep, requested)
    timer = PhaseTimer()
    w, stages, result = prune(prep, config, GradientOracle(prep, config), timer)
    esc = escalate.escalate(prep, requested, config, w, stages, result, timer, budget_seconds=0.0)
    assert not esc.kept_distill and esc.config is config and np.array_equal(esc.w, w)
    assert esc.note.startswith("--distill stopped after 1 of its 30 stages")
    assert "add --distill to run it anyway" in esc.note
