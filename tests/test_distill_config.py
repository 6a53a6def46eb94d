"""``--distill`` fits the dense outputs, so it leaves the statistics correction off unless asked for,
and fits on every calibration sample (no 20% held out for an ``auto`` decision)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from conftest import labelled_data, tiny_mlp

from chita_onnx import CompressConfig, pipeline
from chita_onnx.graph import find_prunable, get_weights, load_model
from chita_onnx.pipeline import compress
from chita_onnx.reconstruct import needs_decision
from chita_onnx.solver.budgets import keep_count


def test_distill_turns_the_automatic_statistics_correction_off() -> None:
    cfg = CompressConfig(sparsity=0.95, distill=True)
    assert (cfg.bn_recalibrate, cfg.bias_correction, cfg.class_offsets) == ("off", "off", "off")
    assert not needs_decision(cfg)
    forced = CompressConfig(
        sparsity=0.95, distill=True, bias_correction="on", bn_recalibrate="on", class_offsets="on"
    )
    assert (forced.bn_recalibrate, forced.bias_correction, forced.class_offsets) == ("on", "on", "on")
    assert needs_decision(CompressConfig(sparsity=0.95, method="chita++"))  # unchanged without --distill
    assert cfg.with_(stages=3) == CompressConfig(sparsity=0.95, distill=True, stages=3)  # idempotent


def test_distill_fits_every_calibration_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    init = pipeline.GradientOracle.__init__

    def spy(self: pipeline.GradientOracle, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        seen.append(self.n)

    monkeypatch.setattr(pipeline.GradientOracle, "__init__", spy)
    model = tiny_mlp(seed=5, d_in=12, hidden=16, classes=5)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "d.npz"
    np.savez(data, **labelled_data(model, n=50))  # type: ignore[arg-type]
    report = compress(
        path, tmp_path / "out.onnx", data, CompressConfig(sparsity=0.8, distill=True, stages=2), eval_data=data
    )
    assert report.nnz <= report.k
    assert seen[-1] == 2 * 50  # every sample (and a mixture of each) in the fit, none set aside to decide
    assert report.config["num_samples"] == 1000  # the user's setting is reported as given
    # the printed report says the objective was the distillation KL (its oracle is its own)
    assert report.loss.startswith("--distill: KL(dense ‖ pruned)") and "temperature 2" in report.loss
    seen.clear()
    chita = compress(
        path, tmp_path / "c.onnx", data, CompressConfig(sparsity=0.8, method="chita++", stages=2), eval_data=data
    )
    assert chita.nnz <= chita.k
    assert seen == [40]  # (without --distill, `auto` holds 20% out to decide)


def test_distill_fits_the_kl_at_its_temperature(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--distill's gradient matrices carry the reference distributions and DISTILL_TEMPERATURE;
    without --distill neither (the temperature only acts on the KL to a reference)."""
    from chita_onnx.gradients import GradientEngine

    seen: list[tuple[bool, float]] = []
    compute = GradientEngine.compute

    def spy(self: GradientEngine, *args: Any, **kwargs: Any) -> Any:
        seen.append((kwargs.get("reference") is not None, kwargs.get("temperature", 1.0)))
        return compute(self, *args, **kwargs)

    monkeypatch.setattr(GradientEngine, "compute", spy)
    model = tiny_mlp(seed=6, d_in=12, hidden=16, classes=5)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = tmp_path / "d.npz"
    np.savez(data, **labelled_data(model, n=30))  # type: ignore[arg-type]
    compress(path, tmp_path / "o.onnx", data, CompressConfig(sparsity=0.8, distill=True, stages=2), eval_data=data)
    assert seen and all(ref and t == pipeline.DISTILL_TEMPERATURE for ref, t in seen)
    assert pipeline.DISTILL_TEMPERATURE > 1.0
    seen.clear()
    compress(path, tmp_path / "c.onnx", data, CompressConfig(sparsity=0.8, method="chita++", stages=2), eval_data=data)
    assert seen and all(not ref and t == 1.0 for ref, t in seen)


def test_distill_on_an_output_that_is_not_a_class_distribution_is_a_one_line_usage_error(tmp_path: Path) -> None:
    """Raw outputs without labels are read as regression (dnsmos's MOS scores, say): there is no
    class distribution to fit a KL to, so ``--distill`` is refused naming the flag and the output."""
    from chita_onnx_cli.main import cli
    from click.testing import CliRunner

    model = tiny_mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save(model, path)
    data = tmp_path / "unlabelled.npz"
    np.savez(data, **{k: v for k, v in labelled_data(model).items() if k != "labels"})
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(
        cli, ["compress", str(path), str(out), "--data", str(data), "--sparsity", "0.9", "--distill"]
    )
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert "--distill" in lines[-1] and "'logits'" in lines[-1] and "not a class distribution" in lines[-1]
    assert "Traceback" not in result.output
    assert not out.exists()
    # the output has a class axis: the error says how to have it read as a classifier's logits, and that works
    assert "add --loss ce" in lines[-1]
    result = CliRunner().invoke(
        cli,
        ["compress", str(path), str(out), "--data", str(data), "--sparsity", "0.9", "--distill", "--loss", "ce",
         "--stages", "3"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    pruned = load_model(out)
    weights = get_weights(pruned, [t.name for t in find_prunable(pruned)]).values()
    assert sum(int(np.count_nonzero(w)) for w in weights) == keep_count(0.9, sum(w.size for w in weights))
