"""Build a fifth "unseen architectures" audit set: model families nobody on the team tried, trained
briefly (seeded) on MNIST, exported to ONNX.  Same pools, split files and manifest format as
``benchmarks/make_unseen.py`` (whose numpy helpers and ``Manifest`` it imports), so that
``benchmarks/bench_unseen.py --dir OUT`` audits it; training loop and export from ``unseen_torch.py``.

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch5.py \
        [--out ~/.cache/chita-onnx/unseen-torch5] [--only aspp_seg_ts,...] [--n-train 12000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch5 --no-peer --sparsities 0.3,0.5

(torch 2.13.0+cpu was used.)

Models:

* ``aspp_seg_ts``  DeepLab-style segmenter: a stride-2 conv + BN stem, an ASPP head (1x1 conv, 3x3
  convs with dilation 2, 4 and 6, an image-pooling branch: global average pool, 1x1 conv, upsampled by
  ``expand``), Concat, 1x1 projection, bilinear Resize x2, 1x1 logits; noisy blotted digits ->
  foreground mask (as ``unet_gn_dyn``).  TorchScript opset 17 (BN kept).
* ``dscnn_kws_ts``  keyword-spotting DS-CNN: the image as 28 "mel" channels x 28 frames; Conv1d + BN,
  three depthwise-separable Conv1d blocks (depthwise k=3 + BN + ReLU, pointwise + BN + ReLU), average
  pool, Linear.  TorchScript opset 13, BN kept as BatchNormalization.
* ``shufflenet_ts`` / ``shufflenet_dyn``  ShuffleNet-v1 units: 1x1 grouped convs (groups 4), a channel
  shuffle (Reshape / Transpose / Reshape) between them, 3x3 depthwise (stride 2 in downsampling units,
  whose shortcut is an average pool Concat), BN.  TorchScript opset 17 (BN kept) and dynamo opset 18
  (BN folded by its optimizer).
* ``swiglu_dyn``  pre-LN MLP: a LayerNorm before every Linear; two residual SwiGLU blocks
  (``silu(W1 x) * W3 x`` then ``W2``) on the flattened image.  Dynamo opset 18.
* ``vit_cls_ts`` / ``vit_cls_dyn``  ViT: 7x7 patch embedding Conv2d (16 patches), a class token
  (a parameter expanded and Concatenated), a learned positional embedding (Add of a parameter), two
  pre-LN blocks with ONE fused qkv Linear (split by Reshape / Transpose / index), GELU(tanh),
  classification from the class token.  TorchScript opset 17 and dynamo opset 18.
* ``mobile_fused_ts`` / ``mobile_fused_dyn``  a mobile CNN whose Conv+BN(+ReLU) were fused with
  ``torch.ao.quantization.fuse_modules`` before export, a depthwise conv with channel multiplier 2
  (groups=C, 2C outputs), PReLU (per channel), Hardswish, ReLU6 (Clip), Hardsigmoid gate.
  TorchScript opset 14 and dynamo opset 18.
* ``fusion_kiai_ts``  two inputs: the image (conv branch) and a 56-wide "tabular" vector (noisy row and
  column means, MLP branch), Concat, head.  TorchScript opset 11 with ``keep_initializers_as_inputs=True``
  and a dynamic batch axis.
* ``video3d_dyn``  a "video" of 4 frames (the 14x14 digit shifted one pixel per frame): Conv3d + BN3d
  stages, global pool, Linear.  Dynamo opset 18.
* ``attnpool_mask_ts``  sequences of a variable number of image rows (20-28 valid, the rest zero)
  with a 0/1 ``mask`` input: 1x1 Conv1d ("network in network") token layers, attention pooling whose
  scores are masked (``masked_fill`` -> Where) before a Softmax over the sequence, Linear.  TorchScript
  opset 17, two inputs.
"""

from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import Manifest, builder_main, pools  # numpy only at import

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch5"
MEAN, STD = 0.1307, 0.3081


def downsample(x: np.ndarray) -> np.ndarray:
    """[n, 784] normalised images -> [n, 14, 14], 2x2 average-pooled."""
    return x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4)).astype(np.float32)


def video(x: np.ndarray) -> np.ndarray:
    """[n, 784] -> [n, 1, 4, 14, 14]: the downsampled digit shifted one pixel right per frame."""
    s = downsample(x)
    bg = np.float32(-MEAN / STD)
    frames = []
    for t in range(4):
        f = np.full_like(s, bg)
        f[:, :, t:] = s[:, :, : 14 - t]
        frames.append(f)
    return np.stack(frames, 1)[:, None].astype(np.float32)


def tabular(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n, 784] -> [n, 56]: row and column means plus noise."""
    im = x.reshape(-1, 28, 28)
    t = np.concatenate([im.mean(2), im.mean(1)], 1)
    return (t + rng.normal(0, 0.3, t.shape)).astype(np.float32)


def masked_rows(x: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """[n, 784] -> rows [n, 28, 28] with 20-28 valid leading rows (the rest zero) and the 0/1 mask [n, 28]."""
    im = x.reshape(-1, 28, 28).copy()
    lens = rng.integers(20, 29, size=len(im))
    mask = (np.arange(28)[None] < lens[:, None]).astype(np.float32)
    return (im * mask[:, :, None]).astype(np.float32), mask


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    torch.set_num_threads(1)
    P = pools(mnist)
    manifest = Manifest(out)

    train = partial(shared.train, seed=seed)
    export = partial(shared.export, out=out)
    nparams, predict = shared.nparams, shared.predict
    xtr, ytr = P["train"][0][:n_train], P["train"][1][:n_train]
    img = (1, 28, 28)
    audit = shared.Audit(out=out, manifest=manifest, pools=P, xtr=xtr, ytr=ytr, only=only, seed=seed)
    want, classifier = audit.want, audit.classifier

    # ------------------------------------------------------------------ 1. ASPP segmenter
    class ASPP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU(),
                nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())  # fmt: skip
            self.b0 = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.br = nn.ModuleList(
                nn.Sequential(nn.Conv2d(32, 16, 3, 1, d, dilation=d), nn.BatchNorm2d(16), nn.ReLU()) for d in (2, 4, 6)
            )
            self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(32, 16, 1), nn.ReLU())
            self.proj = nn.Sequential(nn.Conv2d(80, 32, 1), nn.BatchNorm2d(32), nn.ReLU())
            self.out = nn.Conv2d(32, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.stem(x)
            g = self.pool(h).expand(-1, -1, h.shape[2], h.shape[3])
            h = self.proj(torch.cat([self.b0(h), *[b(h) for b in self.br], g], 1))
            return self.out(F.interpolate(h, scale_factor=2.0, mode="bilinear", align_corners=False))

    if want("aspp_seg_ts"):
        t0 = time.time()
        rng = np.random.default_rng(seed + 5)

        torch.manual_seed(seed)
        net = ASPP()
        print(f"aspp_seg_ts: {nparams(net)} params", flush=True)
        xin, mtr = shared.blotted(xtr, rng)
        train(net, xin, mtr, epochs=2, lr=3e-3, loss_fn=F.binary_cross_entropy_with_logits)
        splits = {k: shared.blotted(P[k][0], rng) for k in ("calib", "select", "test")}
        xt, mt = splits["test"]
        fg, truth = predict(net, xt) > 0, mt > 0.5
        iou = float((fg & truth).sum() / (fg | truth).sum())
        export(net, "aspp_seg_ts", (torch.zeros(2, *img),), False, 17, ["input"], ["mask_logits"])
        for split, (x, m) in splits.items():
            extra = {} if split == "calib" else {"mask": m}
            np.savez(out / f"aspp_seg_ts_{split}.npz", input=x, **extra)
        manifest.record("aspp_seg_ts", dict(
            family="DeepLab-style ASPP segmenter (dilated 3x3 convs d=2/4/6, image-pooling branch expanded, "
            "Concat, bilinear Resize), BN kept",
            exporter="torchscript", opset=17, bn="BatchNormalization", task="segment", input="input",
            torch_test_accuracy=iou, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 2. DS-CNN keyword spotting
    class DSCNN(nn.Module):
        def __init__(self, c: int = 64) -> None:
            super().__init__()
            layers: list[nn.Module] = [nn.Conv1d(28, c, 3, 1, 1), nn.BatchNorm1d(c), nn.ReLU()]
            for stride in (1, 2, 1):
                layers += [nn.Conv1d(c, c, 3, stride, 1, groups=c), nn.BatchNorm1d(c), nn.ReLU(),
                           nn.Conv1d(c, c, 1), nn.BatchNorm1d(c), nn.ReLU()]  # fmt: skip
            self.f = nn.Sequential(*layers)
            self.fc = nn.Linear(c, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 28 mel, 28 frames]
            return self.fc(self.f(x).mean(-1))

    if want("dscnn_kws_ts"):
        torch.manual_seed(seed)
        classifier((("dscnn_kws_ts", False, 13),), DSCNN(),
                   lambda x: (x.reshape(-1, 28, 28).transpose(0, 2, 1).copy(),),
                   3, 5e-3, ["input"], "DS-CNN keyword spotter: Conv1d + BN, depthwise-separable Conv1d blocks "
                   "(depthwise k=3 + BN + ReLU, pointwise + BN + ReLU), mean pool, Linear",
                   "BatchNormalization", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 3. ShuffleNet units
    class Unit(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, g: int = 4) -> None:
            super().__init__()
            self.stride, self.g = stride, g
            mid = cout // 4
            branch = cout - cin if stride == 2 else cout
            self.c1 = nn.Sequential(nn.Conv2d(cin, mid, 1, groups=g), nn.BatchNorm2d(mid), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid), nn.BatchNorm2d(mid))
            self.c2 = nn.Sequential(nn.Conv2d(mid, branch, 1, groups=g), nn.BatchNorm2d(branch))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.c1(x)
            n, c, hh, ww = h.shape
            h = h.view(n, self.g, c // self.g, hh, ww).transpose(1, 2).reshape(n, c, hh, ww)  # channel shuffle
            h = self.c2(self.dw(h))
            if self.stride == 2:
                return F.relu(torch.cat([F.avg_pool2d(x, 3, 2, 1), h], 1))
            return F.relu(x + h)

    class ShuffleNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU())
            self.units = nn.Sequential(Unit(32, 64, 2), Unit(64, 64, 1), Unit(64, 128, 2), Unit(128, 128, 1))
            self.fc = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.units(self.stem(x)).mean(dim=(2, 3)))

    if want("shufflenet_ts", "shufflenet_dyn"):
        torch.manual_seed(seed)
        classifier((("shufflenet_ts", False, 17), ("shufflenet_dyn", True, 18)), ShuffleNet(),
                   lambda x: (x.reshape(-1, *img),), 2, 5e-3, ["input"],
                   "ShuffleNet-v1 units: grouped 1x1 convs (groups 4), channel shuffle (Reshape/Transpose/Reshape), "
                   "depthwise 3x3, avg-pool Concat shortcut, BN", "BN (kept in TorchScript, folded by dynamo)",
                   time.time())  # fmt: skip

    # ------------------------------------------------------------------ 4. pre-LN SwiGLU MLP
    class SwiGLU(nn.Module):
        def __init__(self, d: int, h: int) -> None:
            super().__init__()
            self.n = nn.LayerNorm(d)
            self.w1, self.w3 = nn.Linear(d, h), nn.Linear(d, h)
            self.n2 = nn.LayerNorm(h)
            self.w2 = nn.Linear(h, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.n(x)
            return x + self.w2(self.n2(F.silu(self.w1(y)) * self.w3(y)))

    class GLUMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.n0 = nn.LayerNorm(784)
            self.inp = nn.Linear(784, 128)
            self.blocks = nn.Sequential(SwiGLU(128, 192), SwiGLU(128, 192))
            self.n = nn.LayerNorm(128)
            self.fc = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.n(self.blocks(self.inp(self.n0(x)))))

    if want("swiglu_dyn"):
        torch.manual_seed(seed)
        classifier((("swiglu_dyn", True, 18),), GLUMLP(), lambda x: (x.reshape(-1, 784),), 2, 2e-3, ["input"],
                   "pre-LN MLP (a LayerNorm before every Linear), residual SwiGLU blocks silu(W1 x) * W3 x -> W2",
                   "none (LayerNorm)", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 5. ViT, class token, fused qkv
    class Block(nn.Module):
        def __init__(self, d: int, h: int) -> None:
            super().__init__()
            self.h = h
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv = nn.Linear(d, 3 * d)
            self.o = nn.Linear(d, d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(approximate="tanh"), nn.Linear(2 * d, d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            n, t, d = x.shape
            qkv = self.qkv(self.n1(x)).reshape(n, t, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0], qkv[1], qkv[2]
            a = torch.softmax(q @ k.transpose(-2, -1) * (d // self.h) ** -0.5, dim=-1)
            x = x + self.o((a @ v).transpose(1, 2).reshape(n, t, d))
            return x + self.mlp(self.n2(x))

    class ViT(nn.Module):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, d, 7, 7)
            self.cls = nn.Parameter(torch.zeros(1, 1, d))
            self.pos = nn.Parameter(torch.randn(1, 17, d) * 0.02)
            self.blocks = nn.Sequential(Block(d, 4), Block(d, 4))
            self.n = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.patch(x).flatten(2).transpose(1, 2)  # [N, 16, d]
            t = torch.cat([self.cls.expand(p.shape[0], -1, -1), p], 1) + self.pos
            return self.head(self.n(self.blocks(t))[:, 0])

    if want("vit_cls_ts", "vit_cls_dyn"):
        torch.manual_seed(seed)
        classifier((("vit_cls_ts", False, 17), ("vit_cls_dyn", True, 18)), ViT(), lambda x: (x.reshape(-1, *img),),
                   3, 3e-3, ["input"], "ViT: 7x7 patch Conv2d, class token (parameter expanded + Concat), learned "
                   "positions (Add of a parameter), fused qkv Linear, GELU(tanh), class-token head",
                   "none (LayerNorm)", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 6. mobile CNN, fuse_modules
    class Mobile(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.b1, self.r1 = nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU()
            self.dw, self.bdw = nn.Conv2d(16, 32, 3, 2, 1, groups=16), nn.BatchNorm2d(32)  # multiplier 2
            self.act1 = nn.PReLU(32)
            self.pw, self.bpw = nn.Conv2d(32, 48, 1), nn.BatchNorm2d(48)
            self.act2 = nn.Hardswish()
            self.c3, self.b3 = nn.Conv2d(48, 64, 3, 2, 1), nn.BatchNorm2d(64)
            self.act3 = nn.ReLU6()
            self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(64, 16, 1), nn.ReLU(),
                                      nn.Conv2d(16, 64, 1), nn.Hardsigmoid())  # fmt: skip
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.r1(self.b1(self.c1(x)))
            h = self.act1(self.bdw(self.dw(h)))
            h = self.act2(self.bpw(self.pw(h)))
            h = self.act3(self.b3(self.c3(h)))
            return self.fc((h * self.gate(h)).mean(dim=(2, 3)))

    if want("mobile_fused_ts", "mobile_fused_dyn"):
        from torch.ao.quantization import fuse_modules

        t0 = time.time()
        torch.manual_seed(seed)
        net = Mobile()
        print(f"mobile_fused: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, *img), ytr, epochs=2, lr=5e-3)
        fused = fuse_modules(net.eval(), [["c1", "b1", "r1"], ["dw", "bdw"], ["pw", "bpw"], ["c3", "b3"]])
        splits = {k: P[k][0].reshape(-1, *img) for k in ("calib", "select", "test")}
        acc = float((predict(fused, splits["test"]).argmax(-1) == P["test"][1]).mean())
        for name, dyn, opset in (("mobile_fused_ts", False, 14), ("mobile_fused_dyn", True, 18)):
            if not want(name):
                continue
            export(fused, name, (torch.zeros(2, *img),), dyn, opset, ["input"], ["logits"])
            for split, x in splits.items():
                np.savez(out / f"{name}_{split}.npz", input=x, labels=P[split][1])
            manifest.record(name, dict(
                family="mobile CNN, Conv+BN(+ReLU) fused by torch.ao fuse_modules before export, depthwise conv "
                "with channel multiplier 2, PReLU, Hardswish, ReLU6 (Clip), Hardsigmoid gate",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="fused before export",
                task="classifier", input="input", torch_test_accuracy=acc, params=nparams(fused),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 7. image + tabular, init-inputs
    class Fusion(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.img = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU(),
                                     nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU())  # fmt: skip
            self.tab = nn.Sequential(nn.Linear(56, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU())
            self.head = nn.Sequential(nn.Linear(96, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, image: torch.Tensor, tab: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.img(image), self.tab(tab)], 1))

    if want("fusion_kiai_ts"):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed + 7)
        classifier((("fusion_kiai_ts", False, 11),), Fusion(),
                   lambda x: (x.reshape(-1, *img), tabular(x, rng)), 2, 3e-3, ["image", "tabular"],
                   "two-input fusion: image conv branch + 56-wide tabular MLP branch, Concat, head; every "
                   "initializer also a graph input", "none", time.time(),
                   extra={"keep_initializers_as_inputs": True})  # fmt: skip

    # ------------------------------------------------------------------ 8. Conv3d video
    class Video(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(
                nn.Conv3d(1, 16, 3, 1, 1), nn.BatchNorm3d(16), nn.ReLU(),
                nn.Conv3d(16, 32, (3, 3, 3), (1, 2, 2), 1), nn.BatchNorm3d(32), nn.ReLU(),
                nn.Conv3d(32, 48, (2, 3, 3), (2, 2, 2), (0, 1, 1)), nn.BatchNorm3d(48), nn.ReLU())  # fmt: skip
            self.fc = nn.Linear(48, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.f(x).mean(dim=(2, 3, 4)))

    if want("video3d_dyn"):
        torch.manual_seed(seed)
        classifier((("video3d_dyn", True, 18),), Video(), lambda x: (video(x),), 2, 5e-3, ["video"],
                   "Conv3d + BN3d video classifier (4 frames of a shifting 14x14 digit), global pool, Linear",
                   "BN3d (folded by dynamo)", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 9. NiN tokens, masked attention pool
    class AttnPool(nn.Module):
        def __init__(self, d: int = 96) -> None:
            super().__init__()
            self.f = nn.Sequential(nn.Conv1d(28, d, 1), nn.ReLU(), nn.Conv1d(d, d, 1), nn.ReLU(),
                                   nn.Conv1d(d, d, 1), nn.ReLU())  # fmt: skip
            self.pos = nn.Parameter(torch.randn(1, d, 28) * 0.1)
            self.score = nn.Conv1d(d, 1, 1)
            self.fc = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:  # x [N, 28 rows, 28], mask [N, 28]
            h = self.f(x.transpose(1, 2)) + self.pos  # [N, d, T]
            s = self.score(h).squeeze(1).masked_fill(mask == 0, float("-inf"))
            a = torch.softmax(s, dim=-1)
            return self.fc((h * a.unsqueeze(1)).sum(-1))

    if want("attnpool_mask_ts"):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed + 9)
        classifier((("attnpool_mask_ts", False, 17),), AttnPool(), lambda x: masked_rows(x, rng), 3, 3e-3,
                   ["input", "mask"], "1x1 Conv1d-only (network in network) token layers over a variable number of "
                   "rows, attention pooling with scores masked (Where) before a Softmax over the sequence",
                   "none", time.time())  # fmt: skip
    return manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
