"""A pruned model loads in the newest *plain* onnxruntime, installed in its own virtual environment.

The project runs on the onnxruntime-training wheel (ORT 1.19.2), which must never share an environment
with the plain ``onnxruntime`` wheel.  Users deploy with the plain one, so this test installs the
newest plain onnxruntime into a separate, cached virtual environment and checks there that the sparse
output gives exactly the outputs of the dense-with-zeros model.  Set ``CHITA_STOCK_ORT_VENV`` to reuse
another environment.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cached_venv, tiny_cnn

import chita_onnx
from chita_onnx.graph import densify

pytestmark = pytest.mark.stock_ort

VENV = Path(os.environ.get("CHITA_STOCK_ORT_VENV", Path.home() / ".cache" / "chita-onnx" / "stock-ort-venv"))

SCRIPT = r"""
import json, sys
import numpy as np
import onnxruntime as ort
x = np.load(sys.argv[3])["x"]
outs = []
for path in sys.argv[1:3]:
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    outs.append(sess.run(None, {"x": x})[0])
np.save(sys.argv[4], outs[0])
print(json.dumps({"version": ort.__version__, "identical": bool(np.array_equal(outs[0], outs[1]))}))
"""


@pytest.fixture(scope="session")
def stock_python() -> Path:
    return cached_venv(VENV, "onnxruntime", "numpy")


def test_pruned_sparse_model_runs_in_newest_plain_onnxruntime(tmp_path: Path, stock_python: Path) -> None:
    onnx.save(tiny_cnn(), tmp_path / "cnn.onnx")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 2, 6, 6)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    cfg = chita_onnx.CompressConfig(sparsity=0.8, method="magnitude", storage="sparse")
    chita_onnx.compress(tmp_path / "cnn.onnx", tmp_path / "sparse.onnx", {"x": x}, cfg)
    assert len(onnx.load(tmp_path / "sparse.onnx").graph.sparse_initializer) == 3
    onnx.save(densify(onnx.load(tmp_path / "sparse.onnx")), tmp_path / "dense_zeros.onnx")

    proc = subprocess.run(
        [
            str(stock_python),
            "-c",
            SCRIPT,
            str(tmp_path / "sparse.onnx"),
            str(tmp_path / "dense_zeros.onnx"),
            str(tmp_path / "x.npz"),
            str(tmp_path / "y.npy"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["version"] != "1.19.2", "the stock environment must hold the plain, newest onnxruntime"
    assert result["identical"], "sparse and dense-with-zeros outputs differ in stock onnxruntime"
    from chita_onnx.evaluate import make_session

    ours = make_session(tmp_path / "sparse.onnx").run(None, {"x": x})[0]
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), ours, rtol=1e-5, atol=1e-6)
