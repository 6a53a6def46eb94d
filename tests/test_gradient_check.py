"""The gradient engine checks its own per-sample gradients against finite differences of the model's
loss (one row of the first block, along the row's direction) before anything uses them."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import labelled_data, tiny_cnn, tiny_mlp
from onnx import helper

import chita_onnx
import chita_onnx.gradients.engine as engine_mod
from chita_onnx import CompressConfig
from chita_onnx.errors import WrongGradientError
from chita_onnx.gradients import per_sample_gradients


def _scaled_gradient(name: str, factor: float):  # type: ignore[no-untyped-def]
    """A gradient-graph builder whose ``<name>_grad`` output is ``factor`` times the true one: a wrong
    gradient kernel, built into a real gradient graph run by onnxruntime."""
    real = engine_mod.build_gradient_model

    def build(model: onnx.ModelProto, xs, loss):  # type: ignore[no-untyped-def]
        gm = real(model, xs, loss)
        out = f"{name}_grad"
        for node in gm.graph.node:
            for k, o in enumerate(node.output):
                if o == out:
                    node.output[k] = f"{out}_true"
        f = helper.make_tensor(f"{out}_factor", onnx.TensorProto.FLOAT, [], [factor])
        gm.graph.initializer.append(f)
        gm.graph.node.append(helper.make_node("Mul", [f"{out}_true", f"{out}_factor"], [out]))
        return gm

    return build


@pytest.mark.parametrize("make", [tiny_mlp, tiny_cnn])
def test_true_gradients_pass_the_directional_check(make, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    model = make(seed=3)
    data = labelled_data(model, n=8)
    with caplog.at_level(logging.DEBUG, logger="chita_onnx.gradients.engine"):
        g = per_sample_gradients(model, data, num_samples=8)
    assert np.all(np.isfinite(g.X))
    checks = [r.getMessage() for r in caplog.records if "directional check" in r.getMessage()]
    assert checks and all(c.endswith("agrees") for c in checks), checks
    # the whole row along its gradient and along its weights, then each kind of layer (Gemm, MatMul /
    # Conv, Gemm) along its weights
    assert "(all, along the gradient)" in checks[0] and "(all, along the weights)" in checks[1]
    assert len(checks) == 4 and all("along the weights" in c for c in checks[2:])


@pytest.mark.parametrize(("weight", "factor"), [("W1", 3.0), ("W1", 0.2), ("W2", -1.0)])
def test_a_wrong_gradient_kernel_is_caught_and_named(
    weight: str, factor: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tensor's gradient off by a factor (or of the wrong sign) fails the check along the row's own
    direction, and the per-tensor checks name it.  (A gradient that is wrongly *zero* is invisible
    along that direction: the check is for wrong values, as a broken kernel writes.)"""
    model = tiny_mlp(seed=3)
    data = labelled_data(model, n=8)
    monkeypatch.setattr(engine_mod, "build_gradient_model", _scaled_gradient(weight, factor))
    with pytest.raises(WrongGradientError, match=rf"finite differences.*wrong for {weight} "):
        per_sample_gradients(model, data, num_samples=8)


def test_a_tiny_error_is_not_flagged(monkeypatch: pytest.MonkeyPatch) -> None:
    """1% off in one tensor is within what the check can tell from rounding and curvature: not flagged."""
    model = tiny_mlp(seed=3)
    data = labelled_data(model, n=8)
    monkeypatch.setattr(engine_mod, "build_gradient_model", _scaled_gradient("W2", 1.01))
    per_sample_gradients(model, data, num_samples=8)


def test_a_wrong_gradient_leaves_the_default_on_the_magnitude_allocation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The default still prunes (its layer-wise pass needs no gradients) but does not allocate with
    the wrong ones; an explicit ``--method chita`` refuses with the reason."""
    model = tiny_mlp(seed=3)
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    data = labelled_data(model, n=64)
    monkeypatch.setattr(engine_mod, "build_gradient_model", _scaled_gradient("W1", 3.0))
    with caplog.at_level(logging.WARNING):
        rep = chita_onnx.compress(path, tmp_path / "p.onnx", data, CompressConfig(sparsity=0.5))
    assert rep.solver["allocation"] == "magnitude"
    assert any("finite differences" in r.getMessage() for r in caplog.records)
    with pytest.raises(WrongGradientError, match="finite differences"):
        chita_onnx.compress(path, tmp_path / "c.onnx", data, CompressConfig(sparsity=0.5, method="chita"))
    assert not (tmp_path / "c.onnx").exists()


@pytest.mark.parametrize(("weight", "factor"), [("W1", 0.0), ("W2", 0.0)])
def test_a_gradient_that_is_wrongly_zero_is_caught(weight: str, factor: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Invisible along the row's own direction; the direction that moves every weight in proportion
    to its size sees it."""
    model = tiny_mlp(seed=3)
    data = labelled_data(model, n=8)
    monkeypatch.setattr(engine_mod, "build_gradient_model", _scaled_gradient(weight, factor))
    with pytest.raises(WrongGradientError, match=rf"wrong for {weight} "):
        per_sample_gradients(model, data, num_samples=8)


@pytest.mark.parametrize(("channels", "length", "group", "stride"), [(8, 8, 4, 2), (16, 8, 16, 2), (4, 28, 4, 1)])
def test_onnxruntime_trainings_grouped_conv1d_gradient_bug_is_caught(
    channels: int, length: int, group: int, stride: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real kernel bug: onnxruntime-training 1.19.2's grouped 1-D ConvGrad (worked around by running
    such a Conv as a 2-D one, see test_gradients.py).  With the workaround switched off, the check
    refuses the gradients."""
    from test_gradients import conv1d_grouped, data_for

    from chita_onnx.gradients.prepare import _Rewriter

    monkeypatch.setattr(_Rewriter, "conv", _Rewriter.explicit_pads)
    model = conv1d_grouped(channels, length, group, stride)
    feeds, labels = data_for(model, 8, classes=3)
    src = {**feeds, "labels": labels}
    with pytest.raises(WrongGradientError, match="finite differences"):
        per_sample_gradients(model, src, method="single", num_samples=8)
    monkeypatch.undo()
    per_sample_gradients(model, src, method="single", num_samples=8)  # the workaround: no complaint


def test_the_cli_refuses_a_gradient_method_on_wrong_gradients_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chita_onnx_cli.main import cli
    from click.testing import CliRunner

    model = tiny_mlp(seed=3)
    path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(model, path)
    np.savez(calib, **labelled_data(model, n=64))
    monkeypatch.setattr(engine_mod, "build_gradient_model", _scaled_gradient("W1", 3.0))
    out = tmp_path / "p.onnx"
    args = ["compress", str(path), str(out), "--sparsity", "0.5", "--data", str(calib), "--method", "chita"]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip() and ln.startswith("error:")]
    assert res.exit_code == 1, res.stderr
    assert len(lines) == 1 and "finite differences" in lines[0] and "W1" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
