"""AffineGrid and GridSample (no gradients in onnxruntime-training 1.19.2) are rewritten exactly:
gradients through a spatial-transformer chain match finite differences of the original model, the
rewrite reproduces onnxruntime's kernel on grids that reach far past the borders, and what is not
rewritten is refused in one line naming the node and the attribute."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from rewrite_kit import Init, engine_grads, img_chain, model_of, node, ort_fd_check

from chita_onnx.errors import UnsupportedOpError
from chita_onnx.gradients.rewrites import apply_rewrites

C, HW = 2, (5, 6)  # a non-square image, so that a swapped height and width cannot pass


def _stn(w: Init, mode: str, padding: str, align: int, *, affine: bool = True) -> list[onnx.NodeProto]:
    """z (N, 2, 5, 6) → localisation Gemm → θ (N, 2, 3) → AffineGrid → GridSample(z) → y; or, without
    ``affine``, a free grid from a Gemm and Tanh (deformable-sampling style) scaled past ±1."""
    flat = C * HW[0] * HW[1]
    nodes = [node("Flatten", ["z"], ["zf"])]
    if affine:
        theta0 = [1.1, 0.25, 0.05, -0.2, 0.9, 0.1]  # rotated, scaled, shifted: part of the grid falls outside
        nodes += [
            node("Gemm", ["zf", w("WT", 6, flat, scale=0.05), w.const("tb", theta0)], ["th"], transB=1),
            node("Reshape", ["th", w.const("th_shape", [-1, 2, 3], np.int64)], ["theta"]),
            node("Shape", ["z"], ["zs"]),
            node("AffineGrid", ["theta", "zs"], ["grid"], align_corners=align),
        ]
    else:
        nodes += [
            node("Gemm", ["zf", w("WG", 3 * 4 * 2, flat, scale=0.2)], ["g0"], transB=1),
            node("Tanh", ["g0"], ["g1"]),
            node("Mul", ["g1", w.const("g_scale", 1.3)], ["g2"]),
            node("Reshape", ["g2", w.const("g_shape", [-1, 3, 4, 2], np.int64)], ["grid"]),
        ]
    nodes.append(node("GridSample", ["z", "grid"], ["y"], mode=mode, padding_mode=padding, align_corners=align))
    return nodes


CASES = {
    "linear-zeros-0": ("linear", "zeros", 0, True, 20),
    "linear-zeros-1": ("linear", "zeros", 1, True, 20),
    "linear-border-0": ("linear", "border", 0, True, 20),
    "linear-border-1": ("linear", "border", 1, True, 20),
    "linear-reflection-0": ("linear", "reflection", 0, True, 20),
    "linear-reflection-1-free-grid": ("linear", "reflection", 1, False, 20),
    "nearest-reflection-0": ("nearest", "reflection", 0, True, 20),
    "bilinear-opset16-free-grid": ("bilinear", "zeros", 0, False, 16),
    "nearest-zeros-0": ("nearest", "zeros", 0, True, 20),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_spatial_transformer_gradients_match_finite_differences(case: str) -> None:
    mode, padding, align, affine, opset = CASES[case]
    w = Init(61)
    nodes = _stn(w, mode, padding, align, affine=affine)
    out_hw = HW if affine else (3, 4)
    model = img_chain(nodes, w, C * out_hw[0] * out_hw[1], cin=1, cout=C, hw=HW, opset=opset)
    weights = ["C1", "WT" if affine else "WG", "W2"]
    e, gm, feeds, labels = engine_grads(model, weights, n=3)
    assert e.fwd.rewrites.get("GridSample") == 1, e.fwd.rewrites
    if affine:
        assert e.fwd.rewrites.get("AffineGrid") == 1, e.fwd.rewrites
    # the weights that only move the grid get a nonzero gradient, except through nearest sampling
    grid_w = gm.layout.slots[1]
    moved = float(np.abs(gm.X[:, grid_w.offset : grid_w.stop]).max())
    assert (moved == 0.0) == (mode == "nearest"), moved
    # float32 differences of onnxruntime's own kernel: onnx.reference's GridSample agrees with it in
    # value, but rounds its pixel coordinates in the input's precision, so its float64 differences at
    # h = 1e-5 are off by ~1e-2 (its forward is only float32-exact)
    ort_fd_check(gm, model, feeds, labels, rows=(0, 1, 2))


def _single(
    op: onnx.NodeProto,
    inputs: list[onnx.ValueInfoProto],
    out: onnx.ValueInfoProto,
    inits: tuple[onnx.TensorProto, ...] = (),
) -> onnx.ModelProto:
    return model_of([op], inputs, [out], list(inits), opset=20)


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
@pytest.mark.parametrize("align", [0, 1])
def test_grid_sample_rewrite_reproduces_onnxruntimes_kernel(mode: str, padding: str, align: int) -> None:
    """On grids of scale 1.5 (a third of the points outside), points far outside, points exactly on
    pixel centres and corners, and the borders themselves."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 3, 4, 7)).astype(np.float32)
    grid = (1.5 * rng.standard_normal((2, 5, 6, 2))).astype(np.float32)
    grid[0, 0, :, 0] = np.linspace(-1, 1, 6)  # the outermost corners and centres exactly
    grid[0, 1, :, 1] = [-1.0, 1.0, -1 + 1 / 4, 1 - 1 / 4, 0.0, -1 - 1 / 4]
    grid[1, 0, :, :] = [[40.0, 0.2], [-35.0, 0.3], [25.0, -60.0], [0.1, 30.0], [-0.5, -45.0], [2.0, 1.5]]  # far out
    op = helper.make_node("GridSample", ["x", "g"], ["y"], mode=mode, padding_mode=padding, align_corners=align)
    model = _single(
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, grid.shape)],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 5, 6]),
    )  # fmt: skip
    rewritten, counts = apply_rewrites(copy.deepcopy(model), ["x", "g"], ["y"], onnx.shape_inference.infer_shapes)
    assert counts["GridSample"] == 1 and not any(n.op_type == "GridSample" for n in rewritten.graph.node)

    def run(m: onnx.ModelProto) -> np.ndarray:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(s.run(None, {"x": x, "g": grid})[0])

    want, got = run(model), run(rewritten)
    assert np.all(np.isfinite(want)), "the kernel's reference output must be finite"
    # reflection folds coordinates in float32 its own way: a few ulps of the coordinate
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 if padding == "reflection" else 2e-6)
    if padding == "zeros":
        assert np.any(want == 0.0)  # some points fell outside


@pytest.mark.parametrize("align", [0, 1])
def test_affine_grid_3d_rewrite_reproduces_onnxruntimes_kernel(align: int) -> None:
    theta = np.random.default_rng(3).standard_normal((2, 3, 4)).astype(np.float32)
    size = helper.make_tensor("size", TensorProto.INT64, [5], [2, 1, 3, 4, 5])
    op = helper.make_node("AffineGrid", ["theta", "size"], ["grid"], align_corners=align)
    model = _single(
        op,
        [helper.make_tensor_value_info("theta", TensorProto.FLOAT, theta.shape)],
        helper.make_tensor_value_info("grid", TensorProto.FLOAT, [2, 3, 4, 5, 3]),
        (size,),
    )
    rewritten, counts = apply_rewrites(copy.deepcopy(model), ["theta"], ["grid"], onnx.shape_inference.infer_shapes)
    assert counts["AffineGrid"] == 1

    def run(m: onnx.ModelProto) -> np.ndarray:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(s.run(None, {"theta": theta})[0])

    np.testing.assert_allclose(run(rewritten), run(model), rtol=0, atol=2e-6)


@pytest.mark.parametrize(("attr", "value"), [("mode", "cubic"), ("mode", "bicubic")])
def test_unrewritten_grid_sampling_is_refused_naming_node_and_attribute(attr: str, value: str) -> None:
    w = Init(5)
    nodes = _stn(w, "linear", "zeros", 0)
    gs = nodes[-1]
    for a in gs.attribute:
        if a.name == attr:
            a.s = value.encode()
    model = img_chain(nodes, w, C * HW[0] * HW[1], cin=1, cout=C, hw=HW, opset=20)
    with pytest.raises(UnsupportedOpError, match=rf"GridSample.*GridSample_y.*{attr}='{value}'"):
        engine_grads(model, ["C1", "WT", "W2"])


def test_the_default_prunes_a_spatial_transformer_with_gradients(tmp_path: object) -> None:
    """compress's default on an STN: the allocation's gradients are built (no magnitude fallback)."""
    from pathlib import Path

    from chita_onnx import CompressConfig, compress

    w = Init(9)
    nodes = _stn(w, "linear", "zeros", 0)
    model = img_chain(nodes, w, C * HW[0] * HW[1], cin=1, cout=C, hw=HW, opset=20)
    d = Path(str(tmp_path))
    onnx.save(model, d / "stn.onnx")
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.standard_normal((32, 1, *HW)).astype(np.float32), labels=rng.integers(0, 3, 32))
    report = compress(d / "stn.onnx", d / "out.onnx", d / "calib.npz", CompressConfig(sparsity=0.5))
    assert report.method == "layerwise"
    assert report.solver.get("allocation") == "obd", report.solver
    assert not any("no gradients" in m for m in report.warnings), report.warnings


@pytest.mark.parametrize("padding", ["zeros", "border", "reflection"])
def test_nearest_sampling_of_half_pixels_matches_onnxruntime(padding: str) -> None:
    """Pixel coordinates −6, −5.5, …, 6 on a row of 4 (exact in binary without align_corners): where
    the rounding rule and the order of rounding and reflecting decide the pixel."""
    x = (10.0 * np.arange(4, dtype=np.float32)).reshape(1, 1, 1, 4)
    pix = np.arange(-6.0, 6.01, 0.5)
    gx = (2 * pix + 1) / 4 - 1
    grid = np.stack([gx, np.zeros_like(gx)], -1).reshape(1, 1, -1, 2).astype(np.float32)
    op = helper.make_node("GridSample", ["x", "g"], ["y"], mode="nearest", padding_mode=padding, align_corners=0)
    model = _single(
        op,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x.shape),
         helper.make_tensor_value_info("g", TensorProto.FLOAT, grid.shape)],
        helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 1, 1, pix.size]),
    )  # fmt: skip
    rewritten, _ = apply_rewrites(copy.deepcopy(model), ["x", "g"], ["y"], onnx.shape_inference.infer_shapes)

    def run(m: onnx.ModelProto) -> np.ndarray:
        s = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
        return np.asarray(s.run(None, {"x": x, "g": grid})[0])

    np.testing.assert_array_equal(run(rewritten), run(model))


def test_inspect_check_refuses_bicubic_sampling_before_any_data() -> None:
    from chita_onnx.support import check_model_support

    w = Init(5)
    ok = img_chain(_stn(w, "linear", "reflection", 0), w, C * HW[0] * HW[1], cin=1, cout=C, hw=HW, opset=20)
    rep = check_model_support(ok)
    assert rep.ok and dict(rep.rewrites) == {"AffineGrid": 1, "GridSample": 1}, rep
    w2 = Init(5)
    nodes = _stn(w2, "linear", "zeros", 0)
    for a in nodes[-1].attribute:
        if a.name == "mode":
            a.s = b"cubic"
    rep = check_model_support(img_chain(nodes, w2, C * HW[0] * HW[1], cin=1, cout=C, hw=HW, opset=20))
    assert not rep.ok and "mode='cubic'" in rep.refusals[0] and "GridSample_y" in rep.refusals[0]
