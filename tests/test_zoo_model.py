"""One real third-party model end to end: openwakeword's speech-embedding model (tf2onnx, NHWC
Keras conv net, LeakyRelu, an embedding output), from its pinned PyPI wheel.

The wheel is downloaded with pip into ``~/.cache/chita-onnx/zoo`` (reused when present); the test
is skipped, saying why, only when that download fails.  Calibration and held-out data come from the
zoo's own offline generator (synthetic audio through the wheel's melspectrogram model), with
different seeds.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "benchmarks" / "zoo"))

import entries
import wheels

from chita_onnx import CompressConfig, compress
from chita_onnx.evaluate import make_session

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def embedding() -> entries.Entry:
    e = entries.BY_NAME["openwakeword-embedding"]
    try:
        wheels.download(e.wheel, e.version)
    except Exception as exc:  # no registry access: nothing to test against
        pytest.skip(f"cannot download {e.wheel}=={e.version} with pip: {exc}")
    return e


def test_openwakeword_embedding_prunes_end_to_end(embedding: entries.Entry, tmp_path: Path) -> None:
    e = embedding
    calib = e.make(e, np.random.default_rng(101), 96)
    held = e.make(e, np.random.default_rng(202), 48)
    assert calib.inputs["input_1"].shape == (96, 76, 32, 1)
    assert not np.array_equal(calib.inputs["input_1"][:4], held.inputs["input_1"][:4])
    dense = e.run(e, make_session(e.path()), held)
    out = tmp_path / "pruned.onnx"
    report = compress(e.path(), out, calib.inputs, CompressConfig(sparsity=0.5), eval_data=held.inputs)
    assert report.nnz <= report.k == round(0.5 * report.p)
    assert report.p > 300_000
    assert "Gauss-Newton" in report.loss
    pruned = e.run(e, make_session(out), held)  # loads in onnxruntime and runs
    metric = e.metric(e, dense, pruned, held)
    assert metric["cosine"] > 0.83, metric
    # magnitude pruning of the same model without any weight update is clearly worse
    mag = compress(e.path(), tmp_path / "mag.onnx", calib.inputs, CompressConfig(sparsity=0.5, method="magnitude"))
    assert mag.nnz <= mag.k
    worse = e.metric(e, dense, e.run(e, make_session(tmp_path / "mag.onnx"), held), held)
    assert metric["cosine"] > worse["cosine"], (metric, worse)
