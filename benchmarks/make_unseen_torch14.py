"""Build a fourteenth torch audit set: ResNet-50 and EfficientNet-B0, two backbones at their
published width (23.5 M and 4.0 M weights with a 10-class head; the first twice the twelfth set's
largest), trained briefly (seeded) on MNIST and exported to ONNX by torch.  Same pools, split files
and manifest format as ``benchmarks/make_unseen.py``, so that ``benchmarks/bench_unseen.py --dir OUT``
audits it; training loop and export from ``unseen_torch.py``; images as in ``make_unseen_torch12.py``
(64 x 64 RGB).

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 nice TORCHVENV/bin/python benchmarks/make_unseen_torch14.py \\
        [--out ~/.cache/chita-onnx/unseen-torch14] [--only resnet50_ts,...] [--n-train 6000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \\
        --dir ~/.cache/chita-onnx/unseen-torch14 --sparsities 0.3,0.5

(torch 2.13.0+cpu was used.)

* ``resnet50_ts`` / ``resnet50_dyn``  ResNet-50 as torchvision builds it (v1.5: the stride on the
  3x3 conv of each stage's first bottleneck): 7x7/2 stem, max pool, Bottlenecks [3, 4, 6, 3] of
  widths 64-512 with expansion 4 (1x1 reduce, 3x3, 1x1 expand to 256-2,048 channels), a 1x1
  projection shortcut at each stage's first block, BN after every conv, global average pool,
  Linear 2,048 -> 10.  TorchScript opset 17 (BN kept) and dynamo opset 18.
* ``effnetb0_ts`` / ``effnetb0_dyn``  EfficientNet-B0 at width and depth 1.0, the phone backbone:
  MBConv blocks (expansion 6, depthwise 3x3 and 5x5, squeeze-and-excitation with 1x1 convs and a
  Sigmoid gate, SiLU written as x * Sigmoid(x) by the exporters), the 1,280-channel last conv,
  Dropout 0.2 then Linear: 4.0 M weights with a 10-class head.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import builder_main  # numpy only at import
from make_unseen_torch12 import rgb64

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch14"


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    audit = shared.mnist_audit(out, seed, mnist, n_train, only)
    torch.set_num_threads(2)

    class Bottleneck(nn.Module):
        def __init__(self, cin: int, width: int, stride: int) -> None:
            super().__init__()
            cout = 4 * width
            self.body = nn.Sequential(
                nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )  # fmt: skip
            self.short: nn.Module = nn.Identity()
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(self.body(x) + self.short(x))

    class ResNet50(nn.Module):
        def __init__(self, classes: int = 10) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)
            )
            blocks: list[nn.Module] = []
            cin = 64
            for width, repeats, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
                for i in range(repeats):
                    blocks.append(Bottleneck(cin, width, stride if i == 0 else 1))
                    cin = 4 * width
            self.layers = nn.Sequential(*blocks)
            self.fc = nn.Linear(cin, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))

    if audit.want("resnet50_ts", "resnet50_dyn"):
        torch.manual_seed(seed)
        audit.classifier((("resnet50_ts", False, 17), ("resnet50_dyn", True, 18)), ResNet50(), rgb64, epochs=1,
                         lr=2e-3, inputs=["input"], family="ResNet-50 (torchvision v1.5 layout, full width), 64x64 RGB",
                         bn="kept", t0=time.time())  # fmt: skip

    # ------------------------------------------------------------------ 2. EfficientNet-B0
    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int) -> None:
            super().__init__()
            hid = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers += [nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.SiLU()]
            layers += [nn.Conv2d(hid, hid, k, stride, k // 2, groups=hid, bias=False), nn.BatchNorm2d(hid), nn.SiLU()]
            self.expand = nn.Sequential(*layers)
            squeeze = max(1, cin // 4)  # SE ratio 0.25 of the block's input channels
            self.se = nn.Sequential(
                nn.AdaptiveAvgPool2d(1), nn.Conv2d(hid, squeeze, 1), nn.SiLU(), nn.Conv2d(squeeze, hid, 1), nn.Sigmoid()
            )
            self.project = nn.Sequential(nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.expand(x)
            y = self.project(h * self.se(h))
            return x + y if self.residual else y

    class EfficientNetB0(nn.Module):
        # (expansion, channels, repeats, first stride, kernel), the paper's Table 1
        TABLE = ((1, 16, 1, 1, 3), (6, 24, 2, 2, 3), (6, 40, 2, 2, 5), (6, 80, 3, 2, 3), (6, 112, 3, 1, 5),
                 (6, 192, 4, 2, 5), (6, 320, 1, 1, 3))  # fmt: skip

        def __init__(self, classes: int = 10) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.SiLU()]
            cin = 32
            for t, c, n, s, k in self.TABLE:
                for i in range(n):
                    layers.append(MBConv(cin, c, k, s if i == 0 else 1, t))
                    cin = c
            layers += [nn.Conv2d(cin, 1280, 1, bias=False), nn.BatchNorm2d(1280), nn.SiLU()]
            self.features = nn.Sequential(*layers)
            self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(torch.flatten(F.adaptive_avg_pool2d(self.features(x), 1), 1))

    if audit.want("effnetb0_ts", "effnetb0_dyn"):
        torch.manual_seed(seed)
        audit.classifier((("effnetb0_ts", False, 17), ("effnetb0_dyn", True, 18)), EfficientNetB0(), rgb64,
                         epochs=2, lr=3e-3, inputs=["input"],
                         family="EfficientNet-B0 (MBConv with SE, SiLU, depthwise 3x3/5x5, full width), 64x64 RGB",
                         bn="kept", t0=time.time())  # fmt: skip
    return audit.manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=6000)


if __name__ == "__main__":
    sys.exit(main())
