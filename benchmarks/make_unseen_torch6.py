"""Build a sixth "unseen architectures" audit set: model families nobody on the team tried, trained
briefly (seeded) on MNIST, exported to ONNX.  Same pools, split files and manifest format as
``benchmarks/make_unseen.py`` (whose numpy helpers and ``Manifest`` it imports), so that
``benchmarks/bench_unseen.py --dir OUT`` audits it; training loop and export from ``unseen_torch.py``.

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch6.py \
        [--out ~/.cache/chita-onnx/unseen-torch6] [--only conformer_ts,...] [--n-train 12000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch6 --no-peer --sparsities 0.3,0.5

(torch 2.13.0+cpu was used.)

Models:

* ``conformer_ts``  a Conformer block on the 28 image rows as a sequence: Linear embedding, FFN
  half-steps (x + 0.5 FFN(LN x), SiLU), multi-head self-attention by ``F.scaled_dot_product_attention``,
  the conv module (LN, pointwise Conv1d to 2d, GLU, depthwise Conv1d k=7, BatchNorm1d, SiLU, pointwise
  Conv1d), final LN, mean pool, Linear.  TorchScript opset 17 (BN kept).
* ``moe_topk_ts`` / ``moe_topk_dyn``  a mixture-of-experts MLP: a softmax router picks the top 2 of 4
  experts (``torch.topk``, the renormalised gate values ``scatter``-ed into a dense weight vector),
  every expert computed and weighted, residual, Linear head.  TorchScript opset 17 and dynamo opset 18.
* ``perceiver_dyn``  Perceiver-style: a learned latent array (an ``nn.Parameter`` [8, d], expanded over
  the batch) is the query of a cross-attention over the 28 row tokens, then a latent self-attention
  block, mean over latents, Linear.  Dynamo opset 18.
* ``wnorm_ts`` / ``wnorm_dyn``  a CNN whose three Conv2d and two Linear layers carry
  ``torch.nn.utils.parametrizations.weight_norm``: the weight each Conv / Gemm reads is computed in the
  graph from the ``g`` and ``v`` initializers.  TorchScript opset 17 and dynamo opset 18.
* ``stn_ts``  spatial transformer: a localisation CNN regresses a 2x3 affine ``theta`` (initialised to
  the identity), ``F.affine_grid`` + ``F.grid_sample`` (GridSample) resample the image, then a CNN
  classifies.  TorchScript opset 20 (AffineGrid needs 20).
* ``film_ts``  FiLM conditioning: a second input (56-wide noisy row and column means) goes through an
  MLP to per-channel scale and shift for each of three conv stages (``h * (1 + gamma) + beta``).
  TorchScript opset 17, two inputs.
* ``dcn_bag_ts``  tabular Deep & Cross: categorical ids (per row: row index x 29 + ink count, 28 ids
  per sample) pooled by ``nn.EmbeddingBag(mode="mean")``, 28 dense column means, two cross layers
  ``x0 * (W x + b) + x`` and a deep MLP side by side, Linear head.  TorchScript opset 17, an int64
  and a float input.
* ``fasttext_bag_ts``  fastText-style classifier (torch's ``TextClassificationModel``): the same ids
  pooled by ``nn.EmbeddingBag(mode="mean")``, a two-layer MLP head; one int64 input.  TorchScript
  opset 17.
* ``ghost_dyn``  GhostNet bottlenecks: Ghost modules (a 1x1 primary conv, a depthwise "cheap" conv of
  its output, Concat, channel Slice), a stride-2 depthwise conv between the two Ghost modules of a
  downsampling bottleneck, BN.  Dynamo opset 18 (BN folded).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import Manifest, builder_main, pools  # numpy only at import

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch6"


def tabular(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[n, 784] -> [n, 56]: row and column means plus noise."""
    im = x.reshape(-1, 28, 28)
    t = np.concatenate([im.mean(2), im.mean(1)], 1)
    return (t + rng.normal(0, 0.3, t.shape)).astype(np.float32)


def categorical(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, 784] -> ids [n, 28] int64 (row r: 29 r + the row's count of inked pixels) and the dense
    column means [n, 28]."""
    im = x.reshape(-1, 28, 28)
    ink = (im > 0.0).sum(2)
    ids = (np.arange(28)[None] * 29 + ink).astype(np.int64)
    return ids, im.mean(1).astype(np.float32)


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    torch.set_num_threads(1)
    P = pools(mnist)
    manifest = Manifest(out)

    xtr, ytr = P["train"][0][:n_train], P["train"][1][:n_train]
    img = (1, 28, 28)
    audit = shared.Audit(out=out, manifest=manifest, pools=P, xtr=xtr, ytr=ytr, only=only, seed=seed)
    want, classifier = audit.want, audit.classifier

    rows = lambda x: (x.reshape(-1, 28, 28).copy(),)  # noqa: E731
    images = lambda x: (x.reshape(-1, *img),)  # noqa: E731

    # ------------------------------------------------------------------ 1. Conformer block
    class FFN(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.n, self.a, self.b = nn.LayerNorm(d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.silu(self.a(self.n(x))))

    class Conformer(nn.Module):
        def __init__(self, d: int = 64, h: int = 4) -> None:
            super().__init__()
            self.h = h
            self.emb = nn.Linear(28, d)
            self.ff1, self.ff2 = FFN(d), FFN(d)
            self.na = nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.nc = nn.LayerNorm(d)
            self.pw1 = nn.Conv1d(d, 2 * d, 1)
            self.dw = nn.Conv1d(d, d, 7, padding=3, groups=d)
            self.bn = nn.BatchNorm1d(d)
            self.pw2 = nn.Conv1d(d, d, 1)
            self.nf = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T=28, 28]
            x = self.emb(x)
            x = x + 0.5 * self.ff1(x)
            n, t, d = x.shape
            y = self.na(x)
            q, k, v = (m(y).reshape(n, t, self.h, d // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
            x = x + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))
            c = self.nc(x).transpose(1, 2)
            c = self.pw2(F.silu(self.bn(self.dw(F.glu(self.pw1(c), dim=1)))))
            x = x + c.transpose(1, 2)
            x = self.nf(x + 0.5 * self.ff2(x))
            return self.head(x.mean(1))

    if want("conformer_ts"):
        torch.manual_seed(seed)
        classifier((("conformer_ts", False, 17),), Conformer(), rows, 3, 3e-3, ["input"],
                   "Conformer block on image rows: FFN half-steps (SiLU), MHSA (scaled_dot_product_attention), "
                   "conv module (pointwise Conv1d, GLU, depthwise Conv1d k=7, BatchNorm1d, SiLU, pointwise), LN",
                   "BatchNorm1d kept", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 2. MoE, top-2 routing
    class MoE(nn.Module):
        def __init__(self, d: int = 128, e: int = 4, k: int = 2) -> None:
            super().__init__()
            self.k = k
            self.inp = nn.Linear(784, d)
            self.router = nn.Linear(d, e)
            self.experts = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)) for _ in range(e))
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.inp(x))
            gates = torch.softmax(self.router(h), -1)
            topv, topi = gates.topk(self.k, dim=-1)
            w = torch.zeros_like(gates).scatter(1, topi, topv / topv.sum(-1, keepdim=True))
            ex = torch.stack([m(h) for m in self.experts], 1)  # [N, E, d]
            return self.head(F.relu(h + (w.unsqueeze(-1) * ex).sum(1)))

    if want("moe_topk_ts", "moe_topk_dyn"):
        torch.manual_seed(seed)
        classifier((("moe_topk_ts", False, 17), ("moe_topk_dyn", True, 18)), MoE(), lambda x: (x.reshape(-1, 784),),
                   2, 2e-3, ["input"], "mixture of experts MLP: softmax router, top-2 of 4 experts (TopK, "
                   "renormalised gates ScatterElements-ed into a dense weight), weighted sum, residual",
                   "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 3. Perceiver latents
    class Attn(nn.Module):
        def __init__(self, d: int, h: int) -> None:
            super().__init__()
            self.h = h
            self.nq, self.nkv = nn.LayerNorm(d), nn.LayerNorm(d)
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.n2 = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, lat: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
            n, t, d = kv.shape
            m = lat.shape[1]
            q = self.q(self.nq(lat)).reshape(n, m, self.h, d // self.h).transpose(1, 2)
            y = self.nkv(kv)
            k = self.k(y).reshape(n, t, self.h, d // self.h).transpose(1, 2)
            v = self.v(y).reshape(n, t, self.h, d // self.h).transpose(1, 2)
            a = torch.softmax(q @ k.transpose(-2, -1) * (d // self.h) ** -0.5, -1)
            lat = lat + self.o((a @ v).transpose(1, 2).reshape(n, m, d))
            return lat + self.mlp(self.n2(lat))

    class Perceiver(nn.Module):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.emb = nn.Linear(28, d)
            self.pos = nn.Parameter(torch.randn(1, 28, d) * 0.02)
            self.latents = nn.Parameter(torch.randn(8, d) * 0.5)
            self.cross = Attn(d, 1)
            self.self_ = Attn(d, 4)
            self.n = nn.LayerNorm(d)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.emb(x) + self.pos
            lat = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
            lat = self.cross(lat, t)
            lat = self.self_(lat, lat)
            return self.head(self.n(lat).mean(1))

    if want("perceiver_dyn"):
        torch.manual_seed(seed)
        classifier((("perceiver_dyn", True, 18),), Perceiver(), rows, 3, 3e-3, ["input"],
                   "Perceiver: learned latent array (parameter, expanded) queries a cross-attention over row "
                   "tokens, latent self-attention block, mean over latents", "none (LayerNorm)",
                   time.time())  # fmt: skip

    # ------------------------------------------------------------------ 4. weight norm
    def wnorm_net() -> nn.Module:
        from torch.nn.utils.parametrizations import weight_norm

        return nn.Sequential(
            weight_norm(nn.Conv2d(1, 16, 3, 1, 1)), nn.ReLU(), weight_norm(nn.Conv2d(16, 32, 3, 2, 1)), nn.ReLU(),
            weight_norm(nn.Conv2d(32, 32, 3, 2, 1)), nn.ReLU(), nn.Flatten(),
            weight_norm(nn.Linear(32 * 49, 64)), nn.ReLU(), weight_norm(nn.Linear(64, 10)))  # fmt: skip

    if want("wnorm_ts", "wnorm_dyn"):
        torch.manual_seed(seed)
        classifier((("wnorm_ts", False, 17), ("wnorm_dyn", True, 18)), wnorm_net(), images, 2, 3e-3, ["input"],
                   "CNN with parametrizations.weight_norm on 3 Conv2d + 2 Linear: each weight computed in the "
                   "graph from g and v", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 5. spatial transformer
    class STN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.loc = nn.Sequential(nn.Conv2d(1, 8, 7), nn.MaxPool2d(2), nn.ReLU(), nn.Conv2d(8, 10, 5),
                                     nn.MaxPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(10 * 3 * 3, 32), nn.ReLU(),
                                     nn.Linear(32, 6))  # fmt: skip
            self.loc[-1].weight.data.zero_()
            self.loc[-1].bias.data.copy_(torch.tensor([1.0, 0, 0, 0, 1, 0]))
            self.cnn = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(16, 32, 3, 1, 1),
                                     nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU(),
                                     nn.Linear(64, 10))  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            theta = self.loc(x).view(-1, 2, 3)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            return self.cnn(F.grid_sample(x, grid, align_corners=False))

    if want("stn_ts"):
        torch.manual_seed(seed)
        classifier((("stn_ts", False, 20),), STN(), images, 2, 2e-3, ["input"],
                   "spatial transformer: localisation CNN -> affine theta, affine_grid + grid_sample (GridSample), "
                   "then a CNN", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 6. FiLM
    class FiLM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ch = (16, 32, 32)
            self.convs = nn.ModuleList(
                [nn.Conv2d(1, 16, 3, 1, 1), nn.Conv2d(16, 32, 3, 2, 1), nn.Conv2d(32, 32, 3, 2, 1)]
            )
            self.gen = nn.Sequential(nn.Linear(56, 64), nn.ReLU(), nn.Linear(64, 2 * sum(self.ch)))
            self.head = nn.Linear(32, 10)

        def forward(self, image: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
            gb = self.gen(cond)
            h, i = image, 0
            for conv, c in zip(self.convs, self.ch, strict=True):
                g, b = gb[:, i : i + c], gb[:, i + c : i + 2 * c]
                i += 2 * c
                h = F.relu(conv(h) * (1 + g[:, :, None, None]) + b[:, :, None, None])
            return self.head(h.mean((2, 3)))

    if want("film_ts"):
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed + 6)
        classifier((("film_ts", False, 17),), FiLM(), lambda x: (x.reshape(-1, *img), tabular(x, rng)), 2, 3e-3,
                   ["image", "cond"], "FiLM: a second input -> MLP -> per-channel scale (1 + gamma) and shift "
                   "for three conv stages", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 7. Deep & Cross, EmbeddingBag
    class DCN(nn.Module):
        def __init__(self, e: int = 16) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(28 * 29, e, mode="mean")
            d = e + 28
            self.cross = nn.ModuleList(nn.Linear(d, d) for _ in range(2))
            self.deep = nn.Sequential(nn.Linear(d, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU())
            self.head = nn.Linear(d + 64, 10)

        def forward(self, ids: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
            x0 = torch.cat([self.bag(ids), dense], 1)
            x = x0
            for c in self.cross:
                x = x0 * c(x) + x
            return self.head(torch.cat([x, self.deep(x0)], 1))

    if want("dcn_bag_ts"):
        torch.manual_seed(seed)
        classifier((("dcn_bag_ts", False, 17),), DCN(), categorical, 4, 5e-3, ["ids", "dense"],
                   "Deep & Cross on tabular features: EmbeddingBag(mean) over 28 categorical ids + 28 dense, two "
                   "cross layers x0 * (W x + b) + x beside a deep MLP", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 7b. fastText-style EmbeddingBag classifier
    class FastText(nn.Module):
        def __init__(self, e: int = 32) -> None:
            super().__init__()
            self.bag = nn.EmbeddingBag(28 * 29, e, mode="mean")
            self.fc = nn.Sequential(nn.Linear(e, 64), nn.ReLU(), nn.Linear(64, 10))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.fc(self.bag(ids))

    if want("fasttext_bag_ts"):
        torch.manual_seed(seed)
        classifier((("fasttext_bag_ts", False, 17),), FastText(), lambda x: categorical(x)[:1], 4, 5e-3, ["ids"],
                   "fastText-style text classifier (torch's TextClassificationModel): EmbeddingBag(mean) over 28 "
                   "categorical ids, MLP head; the only input is int64", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 8. GhostNet
    class Ghost(nn.Module):
        def __init__(self, cin: int, cout: int, relu: bool) -> None:
            super().__init__()
            self.cout = cout
            init = (cout + 1) // 2
            act: list[nn.Module] = [nn.ReLU()] if relu else []
            self.primary = nn.Sequential(nn.Conv2d(cin, init, 1, bias=False), nn.BatchNorm2d(init), *act)
            self.cheap = nn.Sequential(nn.Conv2d(init, init, 3, 1, 1, groups=init, bias=False), nn.BatchNorm2d(init),
                                       *act)  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.primary(x)
            return torch.cat([a, self.cheap(a)], 1)[:, : self.cout]

    class GhostBottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
            super().__init__()
            self.g1 = Ghost(cin, mid, True)
            self.dw = (nn.Sequential(nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid))
                       if stride == 2 else nn.Identity())  # fmt: skip
            self.g2 = Ghost(mid, cout, False)
            self.short = (nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)))  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.g2(self.dw(self.g1(x))) + self.short(x)

    class GhostNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.blocks = nn.Sequential(GhostBottleneck(16, 48, 24, 2), GhostBottleneck(24, 72, 24, 1),
                                        GhostBottleneck(24, 96, 40, 2))  # fmt: skip
            self.fc = nn.Linear(40, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.blocks(self.stem(x)).mean((2, 3)))

    if want("ghost_dyn"):
        torch.manual_seed(seed)
        classifier((("ghost_dyn", True, 18),), GhostNet(), images, 2, 5e-3, ["input"],
                   "GhostNet bottlenecks: Ghost modules (1x1 primary conv, depthwise cheap conv, Concat, channel "
                   "Slice), stride-2 depthwise between them, BN", "BN (folded by dynamo)", time.time())  # fmt: skip
    return manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
