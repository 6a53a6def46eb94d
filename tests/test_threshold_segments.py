"""The linear-time per-segment hard threshold agrees with the sorting one (ties included)."""

from __future__ import annotations

import numpy as np
import pytest

from chita_onnx.solver import Budget, _core, hard_threshold


def random_budget(rng: np.random.Generator, sizes: list[int]) -> Budget:
    seg = np.concatenate([[0], np.cumsum(sizes)]).astype(int)
    lower, upper = [], []
    for s in sizes:
        lo = int(rng.integers(0, s + 1))
        hi = int(rng.integers(lo, s + 1))
        lower.append(lo)
        upper.append(hi)
    k = int(rng.integers(sum(lower), sum(upper) + 1))
    return Budget(k=k, segments=tuple(int(x) for x in seg), lower=tuple(lower), upper=tuple(upper)).validated()


@pytest.mark.parametrize("seed", range(30))
def test_few_segment_path_equals_sorting_path(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(seed)
    sizes = [int(x) for x in rng.integers(1, 40, size=int(rng.integers(1, 7)))]
    p = sum(sizes)
    # few distinct values: many ties, which both paths must break by index
    v = rng.integers(-3, 4, size=p).astype(np.float64) if seed % 2 else rng.standard_normal(p)
    budget = random_budget(rng, sizes)
    fast = hard_threshold(v, budget)
    monkeypatch.setattr(_core, "FEW_SEGMENTS", 0)
    slow = hard_threshold(v, budget)
    np.testing.assert_array_equal(fast, slow)
    assert fast.size == budget.k
    seg_ids = budget.segment_ids()[fast]
    counts = np.bincount(seg_ids, minlength=len(sizes))
    assert np.all(counts >= budget.lower) and np.all(counts <= budget.upper)


def test_nan_scores_take_the_sorting_path() -> None:
    v = np.array([np.nan, 1.0, 2.0, 0.5])
    b = Budget(k=2, segments=(0, 2, 4), lower=(1, 0), upper=(2, 2)).validated()
    assert hard_threshold(v, b).size == 2
