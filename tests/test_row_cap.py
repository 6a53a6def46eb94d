"""The default cap on a layer's rows (``max_rows``·d sampled im2col rows): the sampled Gram is the
full one in expectation, and a planted sparse Conv is still recovered through the graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from conftest import make_model
from onnx import TensorProto, helper, numpy_helper

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.activations import LayerSite, find_layers
from chita_onnx.layerstats import LayerGeometry, LayerStats, RowSampler, accumulate, finalize_means, num_rows


def _conv_site(C: int, M: int) -> LayerSite:
    w = np.zeros((M, C, 3, 3), np.float32)
    model = make_model(
        [helper.make_node("Conv", ["x", "W"], ["y"], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 10, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", M, 10, 10])],
        [numpy_helper.from_array(w, "W")],
    )
    (site,) = find_layers(model, ["W"])
    return site


def _gram(xs: list[np.ndarray], geom: LayerGeometry, cap: int | None, seed: int) -> np.ndarray:
    st = LayerStats.empty(geom, cross=False)
    total = sum(num_rows(tuple(x.shape), geom) for x in xs)
    sampler = RowSampler(total, cap, seed=seed)
    for x in xs:
        accumulate(st, x, index=sampler.pick(num_rows(tuple(x.shape), geom)))
    finalize_means(st)
    return np.asarray(st.H[0] / st.rows)


def test_capped_gram_is_the_full_gram_in_expectation() -> None:
    rng = np.random.default_rng(0)
    site = _conv_site(2, 3)
    geom = site.geometry
    d = geom.d
    xs = [np.maximum(rng.standard_normal((8, 2, 10, 10)), 0).astype(np.float32) + 0.1 for _ in range(5)]
    full = _gram(xs, geom, None, 0)
    cap = CompressConfig().max_rows * d
    assert cap < sum(num_rows(tuple(x.shape), geom) for x in xs)  # the cap really samples here
    one = _gram(xs, geom, cap, 1)
    mean = np.mean([_gram(xs, geom, cap, s) for s in range(40)], axis=0)
    err1 = np.linalg.norm(one - full) / np.linalg.norm(full)
    err40 = np.linalg.norm(mean - full) / np.linalg.norm(full)
    assert err1 < 0.15  # one capped Gram is already close
    assert err40 < 0.5 * err1  # and the average over seeds converges to the full Gram (unbiased)


def test_planted_sparse_conv_is_recovered_with_the_default_row_cap(tmp_path: Path) -> None:
    """Channels duplicated by a 1×1 Conv, then a 3×3 Conv whose weight spreads equally over both
    copies: at 50% the layer-wise pass keeps one copy of each tap and reproduces the dense outputs,
    with far fewer rows in its Gram than the data has (the default cap)."""
    rng = np.random.default_rng(5)
    C, M = 2, 3
    a = rng.standard_normal((M, C, 3, 3)).astype(np.float32)
    w = np.concatenate([0.5 * a, 0.5 * a], axis=1)  # (M, 2C, 3, 3)
    dup = np.concatenate([np.eye(C), np.eye(C)]).reshape(2 * C, C, 1, 1).astype(np.float32)
    model = make_model(
        [
            helper.make_node("Conv", ["x", "D"], ["xx"], name="dup"),
            helper.make_node("Conv", ["xx", "W"], ["y"], pads=[1, 1, 1, 1], name="conv"),
        ],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", M, 8, 8])],
        [numpy_helper.from_array(dup, "D"), numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "planted_conv.onnx"
    onnx.save(model, path)
    x = rng.standard_normal((200, C, 8, 8)).astype(np.float32)
    cfg = CompressConfig(
        sparsity=0.5, method="layerwise", allocation="uniform", damp=1e-6, keep=("D",),
        bn_recalibrate="off", bias_correction="off",
    )  # fmt: skip
    assert cfg.max_rows * 2 * C * 9 < 200 * 64  # the cap samples the rows
    r = chita_onnx.compress(path, tmp_path / "p.onnx", {"x": x}, cfg, eval_data={"x": x})
    assert r.nnz == w.size // 2
    assert r.evaluation is not None
    assert r.evaluation.max_abs_diff < 1e-3
    mag = chita_onnx.compress(path, tmp_path / "m.onnx", {"x": x}, cfg.with_(method="magnitude"), eval_data={"x": x})
    assert mag.evaluation is not None
    assert mag.evaluation.max_abs_diff > 0.1
