"""The `objective` column of `sweep` and the solver minimise the same f (issue 9).

The regression: a model with ReLU units that never fire on the calibration data has identically zero
gradient columns.  CHITA used to drop those weights up front (as the reference code does) while f
charges (λ/2)w̄² for pruning them, so its reported objective came out above magnitude + backsolve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from conftest import labelled_data, tiny_mlp
from onnx import numpy_helper

from chita_onnx.config import CompressConfig
from chita_onnx.pipeline import GradientOracle, initial_weights, prepare, prune
from chita_onnx.solver import objective
from chita_onnx.sweep import sweep


def mlp_with_dead_units(dead: int = 4) -> onnx.ModelProto:
    """tiny_mlp with ``dead`` hidden units switched off by a large negative bias, and large weights
    out of them (so magnitude pruning keeps those, and their gradient columns are all zero)."""
    model = tiny_mlp(seed=3, d_in=12, hidden=16, classes=5)
    inits = {t.name: t for t in model.graph.initializer}
    b1 = numpy_helper.to_array(inits["b1"]).copy()
    b1[:dead] = -100.0
    W2 = numpy_helper.to_array(inits["W2"]).copy()
    W2[:, :dead] = 3.0
    for name, arr in (("b1", b1), ("W2", W2)):
        inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    return model


def test_chita_objective_is_at_most_magnitude_backsolve_on_the_same_x(tmp_path: Path) -> None:
    model = mlp_with_dead_units()
    path = tmp_path / "dead.onnx"
    onnx.save(model, path)
    data = tmp_path / "calib.npz"
    np.savez(data, **labelled_data(model, n=80))
    base = CompressConfig(method="chita", sparsity=0.6, ridge=1e-2)
    prep = prepare(path, data, base)
    oracle = GradientOracle(prep, base)
    w_bar = initial_weights(prep)
    X = oracle.matrix(w_bar)
    assert int(np.count_nonzero(~X.any(axis=0))) >= 4 * 5  # the dead units' W2 columns are zero
    for s in (0.4, 0.6, 0.8):
        cfg = CompressConfig(method="chita", sparsity=s, ridge=1e-2)
        # the solver reports the objective the sweep column evaluates
        w, _, res = prune(prep, cfg, oracle, X0=X)
        assert res.objective == objective(X, w, w_bar, cfg.ridge)
    result = sweep(prep, base, ["magnitude+obs", "chita"], [0.4, 0.6, 0.8])
    by = {(r.method, r.sparsity): r.objective for r in result.rows}
    for s in (0.4, 0.6, 0.8):
        mag, chita = by[("magnitude+obs", s)], by[("chita", s)]
        assert mag is not None and chita is not None
        assert chita <= mag * (1 + 1e-9)
