"""Build the zoo's own current-PyTorch model: a small vision transformer with a conv stem, trained
briefly on scikit-learn's digits (upscaled to 32×32) and exported with
``torch.onnx.export(..., dynamo=True)`` at opset 20: ``Gelu``, fused ``LayerNormalization``,
attention (MatMul + Softmax), a BatchNorm in the stem folded by the exporter's optimizer, weights
in external data.

Two roles:

* ``ensure_model()`` (called by the zoo, in the project venv) creates a separate virtual
  environment ``~/.cache/chita-onnx/zoo/torch-venv`` with ``torch==2.13.0`` and ``onnxscript``
  (torch never enters the project venv) and runs this file there;
* ``python build_vit.py OUT_DIR`` (inside that venv) trains and exports.

Seeded; the digits train split trains the model, the test split (never seen in training) feeds the
zoo's calibration and held-out sets.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TORCH = "torch==2.13.0"
VENV_PACKAGES = (TORCH, "onnxscript", "onnx", "numpy", "scikit-learn")
IMG = 32


def digits_split() -> tuple[object, object, object, object]:
    """scikit-learn digits (8×8, 0..16) upscaled to 32×32 in [0, 1]; 1,000 train / 797 test."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    x = np.kron(x, np.ones((1, IMG // 8, IMG // 8), np.float32))[:, None]  # nearest upscale
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:1000], perm[1000:]
    return x[tr], y[tr], x[te], y[te]


def ensure_model(out_dir: Path) -> Path:
    """The exported model under ``out_dir``, built in the torch venv when missing."""
    onnx_path = out_dir / "vit_digits.onnx"
    if onnx_path.exists():
        return onnx_path
    venv = out_dir.parent.parent / "torch-venv"
    py = venv / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    probe = subprocess.run([str(py), "-c", "import torch, onnxscript, sklearn"], capture_output=True, check=False)
    if probe.returncode != 0:
        subprocess.run([str(py), "-m", "pip", "install", "-q", *VENV_PACKAGES], check=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([str(py), __file__, str(out_dir)], capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0 or not onnx_path.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
        raise RuntimeError(f"building the ViT in {venv} failed: {tail[0] if tail else proc.returncode}")
    return onnx_path


def build(out_dir: Path) -> None:  # runs in the torch venv
    import numpy as np
    import torch
    from torch import nn

    torch.manual_seed(0)
    xtr, ytr, xte, yte = digits_split()

    class Block(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.ln1(x)
            x = x + self.attn(h, h, h, need_weights=False)[0]
            return x + self.mlp(self.ln2(x))

    class ViT(nn.Module):
        def __init__(self, d: int = 64, depth: int = 3, heads: int = 4, patch: int = 4) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.GELU())
            self.patch = nn.Conv2d(16, d, patch, stride=patch)
            n = (IMG // patch) ** 2
            self.pos = nn.Parameter(torch.zeros(1, n, d))
            self.blocks = nn.Sequential(*[Block(d, heads) for _ in range(depth)])
            self.ln = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.patch(self.stem(x)).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.ln(self.blocks(t)).mean(dim=1))

    model = ViT()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-2)
    xt, yt = torch.from_numpy(xtr), torch.from_numpy(ytr)
    for _ in range(15):
        model.train()
        perm = torch.randperm(len(yt))
        for i in range(0, len(yt), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    print(f"digits test accuracy {acc:.4f}")
    example = (torch.from_numpy(xte[:2]),)
    prog = torch.onnx.export(
        model,
        example,
        dynamo=True,
        opset_version=20,
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        optimize=True,
    )
    prog.save(str(out_dir / "vit_digits.onnx"), external_data=True)
    np.save(out_dir / "torch_test_accuracy.npy", np.asarray(acc))


if __name__ == "__main__":
    build(Path(sys.argv[1]))
