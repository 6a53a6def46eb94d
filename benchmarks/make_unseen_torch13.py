"""Build a thirteenth torch audit set: legacy opsets (7-10), the shape of the classic model-zoo files
that edge toolchains still ship (AlexNet/GoogLeNet-era LRN, ``Upsample``, ``Clip`` with attributes,
``Softmax`` that flattens to 2-D, ``Dropout`` with a ``ratio`` attribute, ``BatchNormalization``
before opset 9, ``Squeeze``/``Unsqueeze``/``Slice``/``Pad`` with attributes).  Trained briefly
(seeded) on MNIST and exported by the TorchScript exporter (no constant folding, so the BN nodes
stay).  Same pools, split files and manifest format as ``benchmarks/make_unseen.py``, so that
``benchmarks/bench_unseen.py --dir OUT`` audits it; training loop and export from ``unseen_torch.py``.

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=2 OPENBLAS_NUM_THREADS=2 nice TORCHVENV/bin/python benchmarks/make_unseen_torch13.py \\
        [--out ~/.cache/chita-onnx/unseen-torch13] [--only alexnet_lrn_op7,...] [--n-train 12000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \\
        --dir ~/.cache/chita-onnx/unseen-torch13 --sparsities 0.3,0.5

(torch 2.13.0+cpu was used; its TorchScript exporter writes opset 7 and up.)  The classifiers return
logits while training and class probabilities (a final ``Softmax``) in eval mode, as the model-zoo
classics do, so the exported files end in ``Softmax``.

Models:

* ``alexnet_lrn_op7`` / ``alexnet_lrn_op8``  AlexNet-style: 5x5 and 3x3 convs with ReLU and
  ``LocalResponseNorm`` after the first two, max pools, then Flatten, Linear-ReLU-Dropout-Linear and
  Softmax; no BN.  Opset 7 and 8.
* ``resnet_clip_op9``  a ResNet with BN kept, ReLU6 (``Clip`` with ``min``/``max`` attributes before
  opset 11), 1x1 projection shortcuts, global average pooling, Flatten, Linear, Softmax.  Opset 9.
* ``fpn_up_op9`` / ``fpn_up_op10``  MobileNet-v1 depthwise-separable stages with BN, and a top-down
  path: the deepest map upsampled 2x (nearest: ``Upsample`` at opset 9, ``Resize`` at 10), added to
  a 1x1 lateral conv of the shallower one, then pooled and classified.  Opset 9 and 10.
* ``crnn_lstm_op9``  a CTC recogniser of 3-5 digit strips (``make_unseen.strings``): conv+BN, a
  bidirectional LSTM (``LSTM``-7 with ``Squeeze`` by attribute), a Linear to 11 classes and
  log-softmax.  Opset 9.
* ``tfenc_op10``  a pre-norm transformer encoder over the 28 image rows written out (LayerNorm
  decomposed, attention as MatMul-Softmax-MatMul, GELU through ``Erf``), mean pool, Linear, Softmax.
  Opset 10.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import BLANK, builder_main, char_accuracy, strings  # numpy only at import

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch13"


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    audit = shared.mnist_audit(out, seed, mnist, n_train, only)
    want, classifier = audit.want, audit.classifier
    images, rows = shared.as_images, shared.as_rows

    class Probabilities(nn.Module):
        """Logits while training, class probabilities (``Softmax``) in eval mode: the exported file
        ends in ``Softmax``, as the model-zoo classics do."""

        def head(self, z: torch.Tensor) -> torch.Tensor:
            return z if self.training else torch.softmax(z, -1)

    # ------------------------------------------------------------------ 1. AlexNet-style with LRN
    class AlexLRN(Probabilities):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 32, 5, padding=2), nn.ReLU(), nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.LocalResponseNorm(5, 1e-4, 0.75, 2.0), nn.MaxPool2d(2),
                nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )  # fmt: skip  # [N, 64, 3, 3]
            self.fc1, self.drop, self.fc2 = nn.Linear(64 * 9, 256), nn.Dropout(0.5), nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.drop(F.relu(self.fc1(torch.flatten(self.features(x), 1))))
            return self.head(self.fc2(h))

    if want("alexnet_lrn_op7", "alexnet_lrn_op8"):
        torch.manual_seed(seed)
        classifier((("alexnet_lrn_op7", False, 7), ("alexnet_lrn_op8", False, 8)), AlexLRN(), images, 2, 2e-3,
                   ["input"], "AlexNet-style: convs with ReLU and LocalResponseNorm, max pools, Linear-ReLU-Dropout-"
                   "Linear, Softmax output", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 2. ResNet with ReLU6 (Clip)
    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
            self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
            self.short = (
                nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                if stride != 1 or cin != cout
                else nn.Identity()
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b2(self.c2(F.relu6(self.b1(self.c1(x)))))
            return F.relu6(y + self.short(x))

    class ResNetClip(Probabilities):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
            self.body = nn.Sequential(Block(16, 16, 1), Block(16, 32, 2), Block(32, 32, 1), Block(32, 64, 2))
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.fc(torch.flatten(F.adaptive_avg_pool2d(self.body(self.stem(x)), 1), 1)))

    if want("resnet_clip_op9"):
        torch.manual_seed(seed)
        classifier((("resnet_clip_op9", False, 9),), ResNetClip(), images, 2, 3e-3, ["input"],
                   "ResNet: BN kept, ReLU6 as Clip with attributes, projection shortcuts, global average "
                   "pool, Softmax output", "kept", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 3. MobileNet-v1 + top-down upsample
    def separable(cin: int, cout: int, stride: int) -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU6(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6(),
        )  # fmt: skip

    class FPNUp(Probabilities):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())  # 14
            self.s1 = nn.Sequential(separable(16, 32, 1), separable(32, 48, 2))  # [N, 48, 7, 7]
            self.s2 = nn.Sequential(separable(48, 64, 1), nn.ZeroPad2d((0, 1, 0, 1)), separable(64, 96, 2))  # 4x4
            self.lateral = nn.Conv2d(48, 96, 1)
            self.smooth = nn.Sequential(nn.Conv2d(96, 96, 3, 1, 1, bias=False), nn.BatchNorm2d(96), nn.ReLU())
            self.fc = nn.Linear(96, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            c1 = self.s1(self.stem(x))
            c2 = self.s2(c1)
            up = F.interpolate(c2, scale_factor=2.0, mode="nearest")[:, :, :7, :7]
            p = self.smooth(self.lateral(c1) + up)
            return self.head(self.fc(p.mean((2, 3))))

    if want("fpn_up_op9", "fpn_up_op10"):
        torch.manual_seed(seed)
        classifier((("fpn_up_op9", False, 9), ("fpn_up_op10", False, 10)), FPNUp(), images, 2, 3e-3, ["input"],
                   "MobileNet-v1 separable stages with BN and ReLU6, a top-down 2x nearest upsample added to a "
                   "lateral 1x1 conv, Softmax output", "kept", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 4. CRNN, LSTM at opset 9
    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d((2, 1)),
            )  # fmt: skip  # [N, 64, 3, 42]
            self.proj = nn.Linear(64 * 3, 96)
            self.rnn = nn.LSTM(96, 64, bidirectional=True, batch_first=True)
            self.out = nn.Linear(128, BLANK + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.cnn(x)
            n, c, h, w = f.shape
            seq = F.relu(self.proj(f.permute(0, 3, 1, 2).reshape(n, w, c * h)))
            y, _ = self.rnn(seq)
            return torch.log_softmax(self.out(y), -1)  # [N, T, 11]

    def ctc_loss(lp: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        lens = (lab >= 0).sum(1)
        T = lp.shape[1]
        return F.ctc_loss(lp.permute(1, 0, 2), lab[lab >= 0], torch.full((len(lab),), T, dtype=torch.long), lens,
                          blank=BLANK, zero_infinity=True)  # fmt: skip

    if want("crnn_lstm_op9"):
        t0 = time.time()
        P = audit.pools
        sx, sy = strings(P["train"], 12000, np.random.default_rng(seed + 11))
        torch.manual_seed(seed)
        net = CRNN()
        print(f"crnn_lstm_op9: {shared.nparams(net)} params", flush=True)
        shared.train(net, sx, sy, epochs=4, lr=3e-3, seed=seed, bs=64, loss_fn=ctc_loss)
        splits = {k: strings(P[k], n, np.random.default_rng(seed + i))
                  for i, (k, n) in enumerate((("calib", 256), ("select", 1000), ("test", 2000)), 1)}  # fmt: skip
        acc = char_accuracy(shared.predict(net, splits["test"][0]), splits["test"][1])
        print(f"  torch char accuracy {acc:.4f}", flush=True)
        shared.export(net, "crnn_lstm_op9", (torch.from_numpy(splits["test"][0][:2]),), False, 9, ["image"],
                      ["logprobs"], out=out)  # fmt: skip
        for split, (x, t) in splits.items():
            arrays = {"image": x} if split == "calib" else {"image": x, "text": t}
            np.savez(out / f"crnn_lstm_op9_{split}.npz", **arrays)  # type: ignore[arg-type]
        audit.manifest.record("crnn_lstm_op9", dict(
            family="CRNN (conv+BN, bidirectional LSTM, CTC) at opset 9", exporter="torchscript", opset=9,
            bn="kept", task="ctc", input="image", torch_test_accuracy=acc, params=shared.nparams(net),
            train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 5. transformer encoder at opset 10
    class EncoderLayer(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, t, d = x.shape
            h = d // self.heads
            q, k, v = self.qkv(self.ln1(x)).reshape(n, t, 3, self.heads, h).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) / h**0.5, -1) @ v
            x = x + self.proj(a.transpose(1, 2).reshape(n, t, d))
            return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))

    class Encoder(Probabilities):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.embed = nn.Linear(28, d)
            self.pos = nn.Parameter(torch.randn(1, 28, d) * 0.02)
            self.blocks = nn.Sequential(EncoderLayer(d, 4), EncoderLayer(d, 4))
            self.norm, self.fc = nn.LayerNorm(d), nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = self.norm(self.blocks(self.embed(x) + self.pos))
            return self.head(self.fc(z.mean(1)))

    if want("tfenc_op10"):
        torch.manual_seed(seed)
        classifier((("tfenc_op10", False, 10),), Encoder(), rows, 3, 2e-3, ["input"],
                   "pre-norm transformer encoder over the rows written out (LayerNorm decomposed, MatMul "
                   "attention, GELU via Erf), Softmax output", "none", time.time())  # fmt: skip
    return audit.manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
