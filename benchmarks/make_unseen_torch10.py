"""Build a tenth torch audit set: edge architectures none of the earlier sets has, trained briefly
(seeded) on MNIST and exported to ONNX by torch.  Same pools, split files and manifest format as
``benchmarks/make_unseen.py``, so that ``benchmarks/bench_unseen.py --dir OUT`` audits it; training
loop and export from ``unseen_torch.py`` (``UNSEEN_STATIC=1`` builds the static batch-1 twins).

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch10.py \
        [--out ~/.cache/chita-onnx/unseen-torch10] [--only effnet_ts,...] [--n-train 12000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch10 --sparsities 0.3,0.5

(torch 2.13.0+cpu was used.)

Models:

* ``effnet_ts`` / ``effnet_dyn``  EfficientNet-style MBConv blocks: 1×1 expansion + BN + SiLU,
  depthwise 3×3 + BN + SiLU, squeeze-and-excitation (global pool → 1×1 conv → SiLU → 1×1 conv →
  sigmoid → scale), 1×1 projection + BN, identity residual where the shapes match; 1×1 head conv,
  pool, Linear.  TorchScript opset 17 (no constant folding: the BN nodes stay) and dynamo opset 18.
* ``swin_dyn`` / ``swin_ts``  Swin-style window attention on a 14×14 patch grid: 7×7 windows cut by
  reshape/permute, a cyclic shift (``torch.roll``) with the shifted-window attention mask in the
  second block, a learned relative-position bias table read through a stored index (``Gather`` on a
  parameter), patch merging (2×2 neighbours concatenated → LayerNorm → Linear), mean over tokens.
* ``mamba_dyn`` / ``mamba_ts``  a selective state-space block over the 28 rows (Mamba's structure,
  written out): input projection to ``x`` and a gate ``z``, causal depthwise ``Conv1d`` (padding then
  a slice), SiLU, input-dependent ``dt`` (softplus of a low-rank projection), ``B`` and ``C``;
  the recurrence ``h ← exp(dt·A)·h + dt·B·x`` unrolled over the 28 steps (``A = −exp(A_log)``, a
  parameter read through ``Exp``), ``y = C·h + D·x``, gated by ``silu(z)``, output projection,
  residual, RMSNorm; the last step predicts.
* ``wavenet_ts``  WaveNet-style dilated causal ``Conv1d`` stack over the rows (dilations 1, 2, 4, 8,
  left padding by ``F.pad``), gated activations (``tanh ⊙ sigmoid`` of the two halves of one conv,
  ``chunk`` → ``Split``), residual and skip 1×1 convs, skips summed, ReLU, 1×1 conv, mean over time.
* ``tagger_tm_dyn`` / ``tagger_tm_ts``  ``nn.TransformerEncoder`` with time first (``[T, N, 28]``) and
  per-position logits ``[T, N, 10]`` (every row labelled with the digit; trained on the positions'
  mean): dynamo with generated dim names, TorchScript with ``frames``/``clips``.  Nothing in the
  signature or the graph says which axis holds the samples; its calibration file is unlabelled, the
  selection and test files have per-position labels ``[N, 28]``.
* ``mobilevit_dyn``  a MobileViT block: local 3×3 conv + BN + SiLU and 1×1 conv to the transformer
  width, unfolded into 2×2 patches by reshape/permute (the batch merged with the patch position),
  a transformer encoder layer over the 49 patches, folded back, 1×1 conv, concatenated with the
  block's input, 3×3 fusion conv; pool, Linear.  Dynamo opset 18.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import builder_main  # numpy only at import

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch10"


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    audit = shared.mnist_audit(out, seed, mnist, n_train, only)
    want, classifier = audit.want, audit.classifier
    rows, images = shared.as_rows, shared.as_images

    # ------------------------------------------------------------------ 1. EfficientNet-style MBConv + SE
    class SE(nn.Module):
        def __init__(self, c: int, r: int) -> None:
            super().__init__()
            self.down, self.up = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = F.adaptive_avg_pool2d(x, 1)
            return x * torch.sigmoid(self.up(F.silu(self.down(s))))

    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int = 4) -> None:
            super().__init__()
            c = cin * expand
            self.expand = nn.Sequential(nn.Conv2d(cin, c, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
            self.dw = nn.Sequential(nn.Conv2d(c, c, 3, stride, 1, groups=c, bias=False), nn.BatchNorm2d(c), nn.SiLU())
            self.se = SE(c, max(4, cin // 4))
            self.project = nn.Sequential(nn.Conv2d(c, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.project(self.se(self.dw(self.expand(x))))
            return x + y if self.residual else y

    class EffNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
            self.blocks = nn.Sequential(MBConv(16, 16, 1), MBConv(16, 24, 2), MBConv(24, 24, 1), MBConv(24, 40, 1))
            self.head = nn.Sequential(nn.Conv2d(40, 96, 1, bias=False), nn.BatchNorm2d(96), nn.SiLU())
            self.fc = nn.Linear(96, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))

    if want("effnet_ts", "effnet_dyn"):
        torch.manual_seed(seed)
        classifier((("effnet_ts", False, 17), ("effnet_dyn", True, 18)), EffNet(), images, 3, 4e-3, ["input"],
                   "EfficientNet-style MBConv: expansion, depthwise, squeeze-and-excitation, projection, SiLU",
                   "nodes", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 2. Swin-style window attention
    W = 7  # window side

    def windows(x: torch.Tensor) -> torch.Tensor:  # [N, H, W, C] -> [N·nw, W·W, C]
        n, h, w, c = x.shape
        x = x.reshape(n, h // W, W, w // W, W, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(-1, W * W, c)

    def unwindows(x: torch.Tensor, n: int, h: int, w: int) -> torch.Tensor:
        c = x.shape[-1]
        x = x.reshape(n, h // W, w // W, W, W, c).permute(0, 1, 3, 2, 4, 5)
        return x.reshape(n, h, w, c)

    class WindowAttention(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads, self.hd = heads, d // heads
            self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.table = nn.Parameter(torch.randn((2 * W - 1) ** 2, heads) * 0.02)
            yy, xx = torch.meshgrid(torch.arange(W), torch.arange(W), indexing="ij")
            coords = torch.stack([yy.flatten(), xx.flatten()])  # [2, 49]
            rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (W - 1)
            self.register_buffer("index", (rel[..., 0] * (2 * W - 1) + rel[..., 1]).flatten(), persistent=False)

        def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
            b, t, d = x.shape
            q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
            a = (q @ k.transpose(-1, -2)) * self.hd**-0.5
            a = a + self.table[self.index].reshape(t, t, self.heads).permute(2, 0, 1)[None]
            if mask is not None:  # [nw, t, t]
                nw = mask.shape[0]
                a = a.reshape(b // nw, nw, self.heads, t, t) + mask[None, :, None]
                a = a.reshape(b, self.heads, t, t)
            return self.proj((a.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d))

    class SwinBlock(nn.Module):
        def __init__(self, d: int, heads: int, side: int, shift: int) -> None:
            super().__init__()
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = WindowAttention(d, heads)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.shift = shift
            mask = None
            if shift:
                region = torch.zeros(1, side, side, 1)
                cuts = (slice(0, -W), slice(-W, -shift), slice(-shift, None))
                r = 0
                for hs in cuts:
                    for ws in cuts:
                        region[:, hs, ws] = r
                        r += 1
                lab = windows(region).squeeze(-1)  # [nw, 49]
                mask = (lab[:, None, :] != lab[:, :, None]).float() * -100.0
            self.register_buffer("mask", mask, persistent=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, H, W, C]
            n, h, w, _ = x.shape
            y = self.n1(x)
            if self.shift:
                y = torch.roll(y, (-self.shift, -self.shift), (1, 2))
            y = unwindows(self.attn(windows(y), self.mask), n, h, w)
            if self.shift:
                y = torch.roll(y, (self.shift, self.shift), (1, 2))
            x = x + y
            return x + self.mlp(self.n2(x))

    class Swin(nn.Module):
        def __init__(self, d: int = 32) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, d, 2, 2)
            self.norm = nn.LayerNorm(d)
            self.b1, self.b2 = SwinBlock(d, 2, 14, 0), SwinBlock(d, 2, 14, 3)
            self.merge_norm, self.merge = nn.LayerNorm(4 * d), nn.Linear(4 * d, 2 * d, bias=False)
            self.b3 = SwinBlock(2 * d, 4, 7, 0)
            self.out_norm, self.head = nn.LayerNorm(2 * d), nn.Linear(2 * d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.norm(self.patch(x).permute(0, 2, 3, 1))  # [N, 14, 14, d]
            x = self.b2(self.b1(x))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            x = self.b3(self.merge(self.merge_norm(x)))  # [N, 7, 7, 2d]
            return self.head(self.out_norm(x).mean((1, 2)))

    if want("swin_dyn", "swin_ts"):
        torch.manual_seed(seed)
        classifier((("swin_dyn", True, 18), ("swin_ts", False, 17)), Swin(), images, 3, 2e-3, ["input"],
                   "Swin-style shifted-window attention, relative-position bias table, patch merging",
                   "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 3. Mamba-style selective SSM
    class Selective(nn.Module):
        def __init__(self, d: int = 48, state: int = 8, conv: int = 4, expand: int = 2) -> None:
            super().__init__()
            di = expand * d
            self.di, self.state, self.rank = di, state, max(4, d // 8)
            self.in_proj = nn.Linear(d, 2 * di, bias=False)
            self.conv = nn.Conv1d(di, di, conv, groups=di, padding=conv - 1)
            self.x_proj = nn.Linear(di, self.rank + 2 * state, bias=False)
            self.dt_proj = nn.Linear(self.rank, di)
            self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(di, 1))
            self.D = nn.Parameter(torch.ones(di))
            self.out_proj = nn.Linear(di, d, bias=False)

        def forward(self, u: torch.Tensor) -> torch.Tensor:  # [N, T, d]
            t = u.shape[1]
            x, z = self.in_proj(u).chunk(2, -1)
            x = F.silu(self.conv(x.transpose(1, 2))[..., :t].transpose(1, 2))
            dt, B, C = self.x_proj(x).split([self.rank, self.state, self.state], -1)
            dt = F.softplus(self.dt_proj(dt))  # [N, T, di]
            A = -torch.exp(self.A_log)  # [di, S]
            h = torch.zeros(u.shape[0], self.di, self.state, dtype=u.dtype)
            ys = []
            for i in range(28):
                dA = torch.exp(dt[:, i, :, None] * A)
                h = dA * h + (dt[:, i, :, None] * B[:, i, None, :]) * x[:, i, :, None]
                ys.append((h * C[:, i, None, :]).sum(-1))
            y = torch.stack(ys, 1) + x * self.D
            return self.out_proj(y * F.silu(z))

    class Mamba(nn.Module):
        def __init__(self, d: int = 48) -> None:
            super().__init__()
            self.embed = nn.Linear(28, d)
            self.mix = Selective(d)
            self.g = nn.Parameter(torch.ones(d))
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            h = h + self.mix(h)
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * self.g
            return self.head(h[:, -1])

    if want("mamba_dyn", "mamba_ts"):
        torch.manual_seed(seed)
        classifier((("mamba_dyn", True, 18), ("mamba_ts", False, 17)), Mamba(), rows, 3, 4e-3, ["input"],
                   "Mamba-style selective state-space block, recurrence unrolled over 28 rows, RMSNorm",
                   "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 4. WaveNet-style gated dilated TCN
    class GatedLayer(nn.Module):
        def __init__(self, c: int, dilation: int) -> None:
            super().__init__()
            self.pad = 2 * dilation
            self.conv = nn.Conv1d(c, 2 * c, 3, dilation=dilation)
            self.res, self.skip = nn.Conv1d(c, c, 1), nn.Conv1d(c, c, 1)

        def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            f, g = self.conv(F.pad(x, (self.pad, 0))).chunk(2, 1)
            y = torch.tanh(f) * torch.sigmoid(g)
            return x + self.res(y), self.skip(y)

    class WaveNet(nn.Module):
        def __init__(self, c: int = 32) -> None:
            super().__init__()
            self.inp = nn.Conv1d(28, c, 1)
            self.layers = nn.ModuleList(GatedLayer(c, d) for d in (1, 2, 4, 8))
            self.out = nn.Conv1d(c, c, 1)
            self.head = nn.Linear(c, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, 28]
            h = self.inp(x.transpose(1, 2))
            s = torch.zeros_like(h)
            for layer in self.layers:
                h, k = layer(h)
                s = s + k
            return self.head(self.out(F.relu(s)).mean(-1))

    if want("wavenet_ts"):
        torch.manual_seed(seed)
        classifier((("wavenet_ts", False, 17),), WaveNet(), rows, 3, 4e-3, ["input"],
                   "WaveNet-style gated dilated causal Conv1d stack, residual and skip 1x1 convs",
                   "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 5. MobileViT block
    class MobileViTBlock(nn.Module):
        def __init__(self, c: int, d: int) -> None:
            super().__init__()
            self.local = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU(),
                                       nn.Conv2d(c, d, 1, bias=False))  # fmt: skip
            self.tf = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
            self.back = nn.Sequential(nn.Conv2d(d, c, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())
            self.fuse = nn.Sequential(nn.Conv2d(2 * c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.SiLU())

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, c, 14, 14]
            y = self.local(x)
            n, d, h, w = y.shape
            # 2×2 patches: [N, d, 7, 2, 7, 2] -> [N·4, 49, d] (the pixel inside the patch joins the batch)
            p = y.reshape(n, d, h // 2, 2, w // 2, 2).permute(0, 3, 5, 2, 4, 1).reshape(n * 4, (h // 2) * (w // 2), d)
            p = self.tf(p)
            y = p.reshape(n, 2, 2, h // 2, w // 2, d).permute(0, 5, 3, 1, 4, 2).reshape(n, d, h, w)
            return self.fuse(torch.cat([x, self.back(y)], 1))

    class MobileViT(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 24, 3, 2, 1, bias=False), nn.BatchNorm2d(24), nn.SiLU())
            self.block = MobileViTBlock(24, 48)
            self.down = nn.Sequential(nn.Conv2d(24, 48, 3, 2, 1, bias=False), nn.BatchNorm2d(48), nn.SiLU())
            self.head = nn.Linear(48, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.down(self.block(self.stem(x))).mean((2, 3)))

    if want("mobilevit_dyn"):
        torch.manual_seed(seed)
        classifier((("mobilevit_dyn", True, 18),), MobileViT(), images, 3, 3e-3, ["input"],
                   "MobileViT block: local conv, 2x2 patches unfolded into the batch, transformer, fold, fuse",
                   "folded", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 6. sequence-first per-position tagger
    class TaggerTM(nn.Module):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.embed = nn.Linear(28, d)
            self.pos = nn.Parameter(torch.zeros(28, 1, d))
            layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=False)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [T, N, 28] -> [T, N, 10]
            return self.head(self.enc(self.embed(x) + self.pos[: x.shape[0]]))

    class MeanOverTime(nn.Module):
        """Training only: samples-first rows in, the positions' mean logits out."""

        def __init__(self, core: nn.Module) -> None:
            super().__init__()
            self.core = core

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.core(x.transpose(0, 1)).mean(0)

    if want("tagger_tm_dyn", "tagger_tm_ts"):
        import numpy as np

        torch.manual_seed(seed)
        t0, core, P = time.time(), TaggerTM(), audit.pools
        net = MeanOverTime(core)
        print(f"tagger_tm: {shared.nparams(net)} params", flush=True)
        shared.train(net, rows(audit.xtr), audit.ytr, epochs=3, lr=2e-3, seed=seed)
        splits = {k: rows(P[k][0])[0] for k in ("calib", "select", "test")}
        with torch.no_grad():
            y = core(torch.from_numpy(splits["test"]).transpose(0, 1)).numpy()  # [T, N, 10]
        acc = float((y.argmax(-1) == P["test"][1][None, :]).mean())
        print(f"  torch per-position test accuracy {acc:.4f}", flush=True)
        args = (torch.from_numpy(splits["test"][:3]).transpose(0, 1).contiguous(),)
        for name, dyn, opset in (("tagger_tm_dyn", True, 18), ("tagger_tm_ts", False, 17)):
            if not want(name):
                continue
            kw: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
            if os.environ.get("UNSEEN_STATIC"):  # torch's default export from one sample: [28, 1, 28]
                kw.update({"external_data": False} if dyn else {"do_constant_folding": False})
                torch.onnx.export(core, (args[0][:, :1],), str(out / f"{name}.onnx"), dynamo=dyn, **kw)
            elif dyn:  # generated dim names: nothing says which axis holds the samples
                kw["dynamic_shapes"] = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},)
                kw["external_data"] = False
            else:  # named, but neither name says batch, and the output keeps both
                kw["dynamic_axes"] = {"input": {0: "frames", 1: "clips"}, "logits": {0: "frames", 1: "clips"}}
                kw["do_constant_folding"] = False
            if not os.environ.get("UNSEEN_STATIC"):
                torch.onnx.export(core, args, str(out / f"{name}.onnx"), dynamo=dyn, **kw)
            for split, xs in splits.items():
                per_position = np.repeat(P[split][1][:, None], 28, axis=1)  # [N, T]: the digit at every row
                labels = {} if split == "calib" else {"labels": per_position}  # calibration: unlabelled
                np.savez(out / f"{name}_{split}.npz", input=xs, **labels)
            audit.manifest.record(name, dict(
                family="nn.TransformerEncoder (batch_first=False), per-position logits [T, N, 10]",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none", task="classifier",
                input="input", batch_axis=1, output_batch_axis=1, torch_test_accuracy=acc,
                params=shared.nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip
    return audit.manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
