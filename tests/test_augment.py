"""``--distill``'s extra inputs: convex mixtures of pairs of calibration samples."""

from __future__ import annotations

import numpy as np
import pytest

from chita_onnx.augment import MIX_HIGH, MIX_LOW, mixed_inputs
from chita_onnx.data import ArraySource


def test_mixtures_are_convex_combinations_of_two_samples() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 3, 2)).astype(np.float32)
    y = rng.standard_normal((9, 4)).astype(np.float32)
    scale = np.array(2.5, np.float32)
    src = ArraySource({"x": x, "y": y, "s": scale}, np.arange(9), batch_size=4, static=("s",))
    out = mixed_inputs(src, 6, seed=3)
    assert out is not None and out.num_samples == 12
    np.testing.assert_array_equal(out.inputs["x"][:6], x[:6])  # the samples themselves come first
    assert out.inputs["s"] is not None and float(out.inputs["s"]) == 2.5  # static inputs unchanged
    assert out.inputs["x"].dtype == np.float32
    assert out.labels is not None
    for i in range(6):  # each mixture: one λ in [0.2, 0.8] and one partner j < 6, shared by x and y
        mx, my = out.inputs["x"][6 + i], out.inputs["y"][6 + i]
        fits = []
        for j in range(6):
            d = x[i] - x[j]
            if not np.any(d):
                continue
            lam = float(((mx - x[j]) * d).sum() / (d * d).sum())
            if np.allclose(mx, lam * x[i] + (1 - lam) * x[j], atol=1e-5) and np.allclose(
                my, lam * y[i] + (1 - lam) * y[j], atol=1e-5
            ):
                fits.append((j, lam))
        assert len(fits) == 1
        j, lam = fits[0]
        assert MIX_LOW - 1e-6 <= lam <= MIX_HIGH + 1e-6
        assert out.labels[6 + i] == (i if lam >= 0.5 else j)  # the label of the larger part


def test_nothing_to_mix() -> None:
    ids = ArraySource({"ids": np.arange(10).reshape(5, 2)}, None)
    assert mixed_inputs(ids, 5) is None  # integer inputs (token ids) have no mixtures
    assert mixed_inputs(ArraySource({"x": np.ones((1, 3), np.float32)}, None), 5) is None  # one sample
    src = ArraySource({"x": np.random.default_rng(0).standard_normal((5, 2))}, None)
    a, b = mixed_inputs(src, 5, seed=1), mixed_inputs(src, 5, seed=1)
    assert a is not None and b is not None and a.labels is None
    np.testing.assert_array_equal(a.inputs["x"], b.inputs["x"])  # seeded


def test_more_mixtures_per_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    from chita_onnx import augment

    x = np.random.default_rng(2).standard_normal((8, 3)).astype(np.float32)
    one = mixed_inputs(ArraySource({"x": x}, np.arange(8)), 8, seed=4)
    monkeypatch.setattr(augment, "MIX_COPIES", 2)
    two = mixed_inputs(ArraySource({"x": x}, np.arange(8)), 8, seed=4)
    assert one is not None and two is not None and two.num_samples == 24 and two.labels is not None
    np.testing.assert_array_equal(two.inputs["x"][:16], one.inputs["x"])  # the first draws are the same
    assert set(two.labels[16:]) <= set(range(8))
