"""Build a twelfth torch audit set: the canonical backbones at their full published width, the sizes
people actually ship (millions of weights, not the tens of thousands of the earlier sets), trained
briefly (seeded) on MNIST and exported to ONNX by torch.  Same pools, split files and manifest format
as ``benchmarks/make_unseen.py``, so that ``benchmarks/bench_unseen.py --dir OUT`` audits it;
training loop and export from ``unseen_torch.py``.

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 nice TORCHVENV/bin/python benchmarks/make_unseen_torch12.py \\
        [--out ~/.cache/chita-onnx/unseen-torch12] [--only resnet18_ts,...] [--n-train 12000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \\
        --dir ~/.cache/chita-onnx/unseen-torch12 --sparsities 0.3,0.5

(torch 2.13.0+cpu was used.)  Every image is an MNIST digit upsampled 2x (nearest), padded to
64 x 64 and repeated over 3 channels, as an RGB camera crop would be; normalised in numpy.

Models (written here from the papers' layer tables; torchvision is not needed):

* ``resnet18_ts`` / ``resnet18_dyn``  ResNet-18 exactly as torchvision builds it (7x7/2 stem, max
  pool, BasicBlocks [2, 2, 2, 2] of widths 64-512 with 1x1 projection shortcuts, BN after every
  conv, global average pool, Linear): 11.2 M weights.  TorchScript opset 17 (BN kept) and dynamo
  opset 18.
* ``mobilenetv2_ts`` / ``mobilenetv2_dyn``  MobileNetV2 at width 1.0 (inverted residuals with
  expansion 6, depthwise 3x3, ReLU6, the 1,280-channel last conv, Dropout 0.2 then Linear): 2.2 M
  weights with a 10-class head.
* ``vit_s_ts`` / ``vit_s_dyn``  a ViT-S-width encoder (width 384, 6 heads, MLP 1,536, GELU,
  pre-norm) of depth 6 on 7x7 patches of the 28x28 digit plus a class token: 10.7 M weights.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import builder_main  # numpy only at import

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch12"
SIDE = 64


def rgb64(x: Any) -> tuple[Any]:
    """Flat normalised MNIST ``(n, 784)`` as ``(n, 3, 64, 64)``: 2x nearest upsampling, padded with the
    background value, the same plane in each channel."""
    import numpy as np

    img = x.reshape(-1, 28, 28).repeat(2, axis=1).repeat(2, axis=2)
    pad = (SIDE - 56) // 2
    out = np.pad(img, ((0, 0), (pad, pad), (pad, pad)), constant_values=float(x.min()))
    return (np.ascontiguousarray(np.repeat(out[:, None], 3, axis=1), dtype=np.float32),)


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    audit = shared.mnist_audit(out, seed, mnist, n_train, only)
    torch.set_num_threads(2)
    want = audit.want

    # ------------------------------------------------------------------ 1. ResNet-18
    from make_resnet_mnist import Block as Basic  # torchvision's BasicBlock (1x1 projection shortcut)

    class ResNet18(nn.Module):
        def __init__(self, classes: int = 10) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
            layers: list[nn.Module] = []
            cin = 64
            for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
                layers += [Basic(cin, cout, stride), Basic(cout, cout, 1)]
                cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(512, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))

    if want("resnet18_ts", "resnet18_dyn"):
        torch.manual_seed(seed)
        audit.classifier((("resnet18_ts", False, 17), ("resnet18_dyn", True, 18)), ResNet18(), rgb64, epochs=2,
                         lr=2e-3, inputs=["input"], family="ResNet-18 (torchvision layout, full width), 64x64 RGB",
                         bn="kept", t0=time.time())  # fmt: skip

    # ------------------------------------------------------------------ 2. MobileNetV2
    class Inverted(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hid = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers += [nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6()]
            layers += [
                nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.ReLU6(),
                nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout),
            ]  # fmt: skip
            self.body = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return x + y if self.residual else y

    class MobileNetV2(nn.Module):
        # (expansion t, channels c, repeats n, first stride s), the paper's Table 2
        TABLE = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                 (6, 320, 1, 1))  # fmt: skip

        def __init__(self, classes: int = 10) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()]
            cin = 32
            for t, c, n, s in self.TABLE:
                for i in range(n):
                    layers.append(Inverted(cin, c, s if i == 0 else 1, t))
                    cin = c
            layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.ReLU6()]
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    if want("mobilenetv2_ts", "mobilenetv2_dyn"):
        torch.manual_seed(seed)
        audit.classifier((("mobilenetv2_ts", False, 17), ("mobilenetv2_dyn", True, 18)), MobileNetV2(), rgb64,
                         epochs=2, lr=3e-3, inputs=["input"],
                         family="MobileNetV2 width 1.0 (inverted residuals, ReLU6, Dropout), 64x64 RGB", bn="kept",
                         t0=time.time())  # fmt: skip

    # ------------------------------------------------------------------ 3. ViT-S width
    class EncoderLayer(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, t, d = x.shape
            q, k, v = self.qkv(self.ln1(x)).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
            x = x + self.proj(a)
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class ViT(nn.Module):
        def __init__(self, d: int = 384, depth: int = 6, heads: int = 6, patch: int = 7, classes: int = 10) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, d, patch, patch)
            tokens = (28 // patch) ** 2
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.pos = nn.Parameter(torch.randn(1, tokens + 1, d) * 0.02)
            self.blocks = nn.Sequential(*[EncoderLayer(d, heads) for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.patch(x).flatten(2).transpose(1, 2)
            z = torch.cat([self.cls.expand(p.shape[0], -1, -1), p], 1) + self.pos
            return self.head(self.norm(self.blocks(z))[:, 0])

    if want("vit_s_ts", "vit_s_dyn"):
        torch.manual_seed(seed)
        audit.classifier((("vit_s_ts", False, 17), ("vit_s_dyn", True, 18)), ViT(), shared.as_images, epochs=2,
                         lr=5e-4, inputs=["input"], family="ViT-S width (384, 6 heads, MLP 1536), depth 6, patch 7",
                         bn="none", t0=time.time())  # fmt: skip
    return audit.manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
