"""The default output loads in OpenVINO and computes what onnxruntime computes.

OpenVINO's ONNX frontend reads only dense ``graph.initializer`` entries (measured with openvino
2026.4: a ``sparse_initializer`` weight fails with "Input tensor isn't found for node ..."), which is
why ``--storage dense`` is the default.  OpenVINO is installed with pip into its own cached virtual
environment (it must not share one with the onnxruntime-training wheel's dependencies); set
``CHITA_OPENVINO_VENV`` to reuse another one.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import cached_venv

import chita_onnx
from chita_onnx import CompressConfig
from chita_onnx.runtime import session

MODELS = Path(__file__).resolve().parents[1] / "models"
VENV = Path(os.environ.get("CHITA_OPENVINO_VENV", Path.home() / ".cache" / "chita-onnx" / "openvino-venv"))

pytestmark = pytest.mark.openvino

SCRIPT = r"""
import json, sys
import numpy as np
import openvino as ov
data = np.load(sys.argv[2])
compiled = ov.Core().compile_model(sys.argv[1], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})  # not bf16 on AMX CPUs
out = compiled({k: data[k] for k in data.files})
np.save(sys.argv[3], np.asarray(out[compiled.output(0)]))
print(json.dumps({"version": ov.__version__}))
"""


@pytest.fixture(scope="session")
def openvino_python() -> Path:
    return cached_venv(VENV, "openvino", "numpy")


def _run_openvino(py: Path, model: Path, feeds: dict[str, np.ndarray], tmp: Path) -> np.ndarray:
    np.savez(tmp / "feeds.npz", **feeds)
    proc = subprocess.run(
        [str(py), "-c", SCRIPT, str(model), str(tmp / "feeds.npz"), str(tmp / "ov.npy")],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["version"]
    return np.load(tmp / "ov.npy")


@pytest.mark.parametrize("name", ["digits_cnn", "digits_mlp"])
def test_the_default_output_runs_in_openvino_as_in_onnxruntime(
    tmp_path: Path, openvino_python: Path, name: str
) -> None:
    out = tmp_path / f"{name}_pruned.onnx"
    # past 2/3 sparsity: the sparsity at which --storage auto would write sparse_initializers
    report = chita_onnx.compress(
        MODELS / f"{name}.onnx", out, MODELS / "digits_calib.npz", CompressConfig(sparsity=0.8)
    )
    assert report.sparsity == pytest.approx(0.8, abs=1e-3) and report.storage_note
    assert len(onnx.load(out).graph.sparse_initializer) == 0
    data = np.load(MODELS / "digits_test.npz")
    sess = session(out, what="the pruned model")
    feeds = {i.name: data[i.name][:32] for i in sess.get_inputs()}
    ref = sess.run(None, feeds)[0]
    got = _run_openvino(openvino_python, out, feeds, tmp_path)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-3, atol=1e-3 * float(np.abs(ref).max()))
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.95
