"""Build the development CNN with BatchNorm and residual connections: a ResNet-14 on MNIST.

Runs in its own virtual environment with PyTorch (never in the project's: torch must not meet
onnxruntime-training)::

    python3 -m venv ~/.cache/chita-onnx/torch-venv
    ~/.cache/chita-onnx/torch-venv/bin/pip install torch==2.13.0 numpy onnx onnxscript
    OMP_NUM_THREADS=2 ~/.cache/chita-onnx/torch-venv/bin/python benchmarks/make_resnet_mnist.py

Data: ``shared/data/mnist.npz`` (14,262 training and 10,000 test images).  The network trains on
``x_train[2000:]``; ``x_train[:1000]`` (with labels) is the calibration set (as for MLPNet),
``x_train[1000:2000]`` a selection set that neither training nor calibration sees, and the full
``x_test`` the scored test set.  Writes to ``--out`` (default ``~/.cache/chita-onnx/dev``):

* ``resnet_mnist_bn.onnx``      — BatchNormalization nodes kept (eval mode),
* ``resnet_mnist_folded.onnx``  — the same network with every BN folded into its convolution,
* ``mnist_calib.npz``, ``mnist_select.npz``, ``mnist_test.npz`` — key ``input`` [N,1,28,28]
  float32 normalised as (x/255 − 0.1307)/0.3081, and ``labels``.

ResNet-14: a 3×3 stem (16 channels), three stages of two basic blocks (16, 32, 64 channels, stride 2
with a 1×1 projection at the start of stages 2 and 3), global average pooling, a linear classifier;
about 175k prunable weights.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

MEAN, STD = 0.1307, 0.3081


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.short(x))


class ResNet14(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        chans = [(16, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)]
        self.blocks = nn.Sequential(*[Block(a, b, s) for a, b, s in chans])
        self.fc = nn.Linear(64, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.blocks(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def fold(model: nn.Module) -> nn.Module:
    """Every Conv2d followed by its BatchNorm2d becomes one Conv2d with a bias (eval mode)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    model = model.eval()
    m = ResNet14()
    m.load_state_dict(model.state_dict())
    m.eval()
    m.stem = fuse_conv_bn_eval(m.stem, m.bn)
    m.bn = nn.Identity()  # type: ignore[assignment]
    for b in m.blocks:
        b.conv1 = fuse_conv_bn_eval(b.conv1, b.bn1)
        b.bn1 = nn.Identity()
        b.conv2 = fuse_conv_bn_eval(b.conv2, b.bn2)
        b.bn2 = nn.Identity()
        if isinstance(b.short, nn.Sequential):
            b.short = fuse_conv_bn_eval(b.short[0], b.short[1])
    return m


def normalise(x: np.ndarray) -> np.ndarray:
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD)[:, None, :, :]


def export(model: nn.Module, path: Path) -> None:
    model.eval()
    x = torch.zeros(2, 1, 28, 28)
    torch.onnx.export(
        model,
        (x,),
        str(path),
        input_names=["input"],
        output_names=["logits"],
        dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        dynamo=False,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mnist", default=str(Path(__file__).resolve().parents[1].parent.parent / "shared/data/mnist.npz"))
    ap.add_argument("--out", default=str(Path.home() / ".cache/chita-onnx/dev"))
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    mnist = Path(args.mnist)
    if not mnist.exists():
        mnist = Path("/work/shared/data/mnist.npz")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    d = np.load(mnist)
    xtr, ytr = normalise(d["x_train"]), d["y_train"].astype(np.int64)
    xte, yte = normalise(d["x_test"]), d["y_test"].astype(np.int64)
    np.savez(out / "mnist_calib.npz", input=xtr[:1000], labels=ytr[:1000])
    np.savez(out / "mnist_select.npz", input=xtr[1000:2000], labels=ytr[1000:2000])
    np.savez(out / "mnist_test.npz", input=xte, labels=yte)
    X, Y = torch.from_numpy(xtr[2000:]), torch.from_numpy(ytr[2000:])
    model = ResNet14()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = args.epochs * (len(X) // 128)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    t0 = time.time()
    for epoch in range(args.epochs):
        model.train()
        perm = torch.randperm(len(X))
        for i in range(len(X) // 128):
            idx = perm[i * 128 : (i + 1) * 128]
            loss = F.cross_entropy(model(X[idx]), Y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        model.eval()
        with torch.no_grad():  # a quick look on the selection images (the test set is scored later)
            sel = torch.from_numpy(xtr[1000:2000])
            acc = (model(sel).argmax(1).numpy() == ytr[1000:2000]).mean()
        print(
            f"epoch {epoch + 1}: loss {loss.item():.4f}, selection accuracy {100 * acc:.2f}% ({time.time() - t0:.0f}s)"
        )
    export(model, out / "resnet_mnist_bn.onnx")
    folded = fold(model)
    with torch.no_grad():
        a = model(torch.from_numpy(xte[:256]))
        b = folded(torch.from_numpy(xte[:256]))
    print(f"folded vs BN max |diff| {float((a - b).abs().max()):.2e}")
    export(folded, out / "resnet_mnist_folded.onnx")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
