"""Train a small MNIST CNN with PyTorch and export it to ONNX (for the recipe benchmarks).

Run it with a Python that has torch (never in the project venv), e.g.::

    python3 -m venv ~/.cache/chita-onnx/torch-venv && ~/.cache/chita-onnx/torch-venv/bin/pip install torch==2.13.0 onnx
    ~/.cache/chita-onnx/torch-venv/bin/python benchmarks/make_mnist_cnn.py

Conv(1→8, 3) → ReLU → MaxPool(2) → Conv(8→16, 3) → ReLU → MaxPool(2) → Linear(400→64) → ReLU →
Linear(64→10), 27,464 prunable weights; Adam (lr 2e-3, batch 64), 4 epochs on the 14,262 MNIST training
images of ``/work/shared/data/mnist.npz`` (seed 0); about 97.6% on the 10k test set.  A confident
model: most calibration images get a predicted probability near 1.  Written to
``benchmarks/data/mnist_cnn.onnx`` (opset 17, input ``input`` [N, 1, 28, 28], output ``logits``).
"""

import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "data" / "mnist_cnn.onnx"


def main() -> int:
    torch.manual_seed(0)
    d = np.load("/work/shared/data/mnist.npz")

    def norm(x: np.ndarray) -> torch.Tensor:
        return torch.tensor(((x.astype(np.float32) / 255 - 0.1307) / 0.3081)[:, None])

    xtr, ytr = norm(d["x_train"]), torch.tensor(d["y_train"].astype(np.int64))
    xte, yte = norm(d["x_test"]), torch.tensor(d["y_test"].astype(np.int64))
    net = nn.Sequential(
        nn.Conv2d(1, 8, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )
    opt = torch.optim.Adam(net.parameters(), 2e-3)
    for epoch in range(4):
        perm = torch.randperm(len(xtr))
        for i in range(0, len(xtr), 64):
            idx = perm[i : i + 64]
            loss = nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            print(f"epoch {epoch}: test accuracy {(net(xte).argmax(1) == yte).float().mean().item():.4f}", flush=True)
    net.eval()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    torch.onnx.export(
        net,
        torch.zeros(1, 1, 28, 28),
        str(out),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
