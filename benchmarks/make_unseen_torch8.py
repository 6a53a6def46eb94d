"""Build an eighth torch audit set: architectures none of the earlier sets has, trained briefly
(seeded) on MNIST and exported to ONNX by torch.  Same pools, split files and manifest format as
``benchmarks/make_unseen.py``, so that ``benchmarks/bench_unseen.py --dir OUT`` audits it; training
loop and export from ``unseen_torch.py``.

Runs in a torch virtual environment (never the project's)::

    python3.11 -m venv TORCHVENV && TORCHVENV/bin/pip install torch==2.13.0 numpy onnx onnxscript
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch8.py \
        [--out ~/.cache/chita-onnx/unseen-torch8] [--only densenet_ts,...] [--n-train 12000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch8 --no-peer --sparsities 0.3,0.5

(torch 2.13.0+cpu was used.)

Models:

* ``densenet_ts`` / ``densenet_dyn``  DenseNet-BC: pre-activation dense layers (BN → ReLU → 1×1 conv →
  BN → ReLU → 3×3 conv) whose outputs are concatenated onto their inputs, transitions (BN → ReLU → 1×1
  conv → average pool).  Every BN sits *before* its conv, on a concatenation, so nothing folds it.
  TorchScript opset 17 and dynamo opset 18.
* ``repvgg_ts``  RepVGG blocks in their training form: a 3×3 conv + BN, a 1×1 conv + BN and (where
  the shapes match) an identity BN, summed, ReLU.  Three branches read the same input.
* ``gru_unrolled_ts`` / ``gru_unrolled_dyn``  a ``GRUCell`` stepped over the 28 image rows in a Python
  loop: the exporters unroll it, so each of its two weight matrices is read by 28 nodes.
* ``rope_gpt_dyn`` / ``rope_gpt_ts``  a decoder-only transformer over the 28 rows: RMSNorm written out,
  rotary position embeddings (sin/cos tables, rotate-half by slicing), causal
  ``scaled_dot_product_attention``, SwiGLU MLP, prediction from the last token.  Dynamo opset 18 and
  TorchScript opset 17.
* ``inception_ts``  Inception blocks: 1×1, 1×1 → 3×3, 1×1 → 5×5 and max-pool → 1×1 branches, each conv
  with BN (TorchScript without constant folding keeps the BN nodes), concatenated.
* ``pardec_dyn`` / ``pardec_ts``  a recogniser of 3–5 digit strips (``make_unseen.strings``) with a
  parallel attention decoder: conv patches, a transformer encoder layer, five learned queries
  cross-attending to it (``MultiheadAttention``), per-position log-probabilities ``[N, 5, 11]``
  (class 10: no digit).  Its labels are per position, so its calibration file has none; the
  selection and test files do, and agreement is per position.  Dynamo opset 18 and TorchScript 17.
* ``tfdecoder_ts`` / ``tfdecoder_dyn``  ``nn.TransformerDecoder`` (two post-norm layers: masked
  self-attention over four learned queries, cross-attention to a conv + encoder-layer memory of the
  rows, FFN), the queries' mean, Linear.  TorchScript opset 17 and dynamo opset 18.
* ``linattn_cumsum_dyn``  causal linear attention over the rows: ``elu + 1`` feature maps, key-value
  sums by ``cumsum`` along time (``CumSum`` on the gradient path), normalised by the cumulative key sum.
  Dynamo opset 18.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import BLANK, builder_main, strings  # numpy only at import

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch8"


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    audit = shared.mnist_audit(out, seed, mnist, n_train, only)
    want, classifier = audit.want, audit.classifier
    rows, images = shared.as_rows, shared.as_images

    # ------------------------------------------------------------------ 1. DenseNet-BC, pre-activation BN
    class DenseLayer(nn.Module):
        def __init__(self, c: int, g: int) -> None:
            super().__init__()
            self.bn1, self.c1 = nn.BatchNorm2d(c), nn.Conv2d(c, 4 * g, 1, bias=False)
            self.bn2, self.c2 = nn.BatchNorm2d(4 * g), nn.Conv2d(4 * g, g, 3, 1, 1, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.c2(F.relu(self.bn2(self.c1(F.relu(self.bn1(x))))))
            return torch.cat([x, y], 1)

    class DenseNet(nn.Module):
        def __init__(self, g: int = 8, layers: int = 3) -> None:
            super().__init__()
            c = 2 * g
            mods: list[nn.Module] = [nn.Conv2d(1, c, 3, 1, 1, bias=False)]
            for b in range(3):
                for _ in range(layers):
                    mods.append(DenseLayer(c, g))
                    c += g
                if b < 2:
                    mods += [nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2)]
                    c //= 2
            mods += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
            self.body = nn.Sequential(*mods)
            self.head = nn.Linear(c, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x))

    if want("densenet_ts", "densenet_dyn"):
        torch.manual_seed(seed)
        classifier((("densenet_ts", False, 17), ("densenet_dyn", True, 18)), DenseNet(), images, 3, 4e-3, ["input"],
                   "DenseNet-BC: pre-activation BN-ReLU-conv dense layers concatenated onto their inputs, "
                   "transitions with 1x1 conv and average pooling", "nodes", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 2. RepVGG, training form
    class RepBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.k3 = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout))
            self.k1 = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, 0, bias=False), nn.BatchNorm2d(cout))
            self.id = nn.BatchNorm2d(cin) if cin == cout and stride == 1 else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.k3(x) + self.k1(x)
            return F.relu(y if self.id is None else y + self.id(x))

    class RepVGG(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            spec = [(1, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 64, 2), (64, 64, 1)]
            self.body = nn.Sequential(*[RepBlock(a, b, s) for a, b, s in spec])
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x).mean((2, 3)))

    if want("repvgg_ts"):
        torch.manual_seed(seed)
        classifier((("repvgg_ts", False, 17),), RepVGG(), images, 3, 4e-3, ["input"],
                   "RepVGG blocks in training form: 3x3 conv+BN, 1x1 conv+BN and identity BN on one input, "
                   "summed", "nodes", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 3. GRUCell stepped in a Python loop
    class GRUUnrolled(nn.Module):
        def __init__(self, h: int = 64) -> None:
            super().__init__()
            self.h = h
            self.cell = nn.GRUCell(28, h)
            self.head = nn.Linear(h, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 28, 28]
            s = x.new_zeros(x.shape[0], self.h)
            for t in range(28):
                s = self.cell(x[:, t, :], s)
            return self.head(s)

    if want("gru_unrolled_ts", "gru_unrolled_dyn"):
        torch.manual_seed(seed)
        classifier((("gru_unrolled_ts", False, 17), ("gru_unrolled_dyn", True, 18)), GRUUnrolled(), rows, 3, 5e-3,
                   ["input"], "GRUCell stepped over the 28 rows in Python: unrolled, each weight read by "
                   "28 nodes", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 4. RoPE decoder
    class RMSNorm(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.ones(d))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.g

    def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin

    class Block(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.heads = heads
            self.n1, self.n2 = RMSNorm(d), RMSNorm(d)
            self.qkv = nn.Linear(d, 3 * d, bias=False)
            self.o = nn.Linear(d, d, bias=False)
            self.up = nn.Linear(d, 4 * d, bias=False)
            self.gate = nn.Linear(d, 4 * d, bias=False)
            self.down = nn.Linear(4 * d, d, bias=False)

        def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
            N, T, d = x.shape
            q, k, v = self.qkv(self.n1(x)).view(N, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            a = F.scaled_dot_product_attention(rotate(q, cos, sin), rotate(k, cos, sin), v, is_causal=True)
            x = x + self.o(a.transpose(1, 2).reshape(N, T, d))
            y = self.n2(x)
            return x + self.down(F.silu(self.gate(y)) * self.up(y))

    class RopeGPT(nn.Module):
        def __init__(self, d: int = 64, heads: int = 4, layers: int = 2) -> None:
            super().__init__()
            self.embed = nn.Linear(28, d)
            self.blocks = nn.ModuleList([Block(d, heads) for _ in range(layers)])
            self.norm = RMSNorm(d)
            self.head = nn.Linear(d, 10)
            hd = d // heads
            inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
            ang = torch.outer(torch.arange(28).float(), inv)
            ang = torch.cat([ang, ang], -1)
            self.register_buffer("cos", ang.cos()[None, None])
            self.register_buffer("sin", ang.sin()[None, None])

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            for b in self.blocks:
                h = b(h, self.cos, self.sin)
            return self.head(self.norm(h)[:, -1])

    if want("rope_gpt_dyn", "rope_gpt_ts"):
        torch.manual_seed(seed)
        classifier((("rope_gpt_dyn", True, 18), ("rope_gpt_ts", False, 17)), RopeGPT(), rows, 3, 3e-3, ["input"],
                   "decoder-only transformer over the rows: RMSNorm, rotary embeddings, causal SDPA, SwiGLU, "
                   "last-token head", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 5. Inception blocks
    def cbr(cin: int, cout: int, k: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, k, 1, k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    class InceptionBlock(nn.Module):
        def __init__(self, cin: int, c: int) -> None:
            super().__init__()
            self.b1 = cbr(cin, c, 1)
            self.b3 = nn.Sequential(cbr(cin, c, 1), cbr(c, c, 3))
            self.b5 = nn.Sequential(cbr(cin, c // 2, 1), cbr(c // 2, c, 5))
            self.bp = nn.Sequential(nn.MaxPool2d(3, 1, 1), cbr(cin, c // 2, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.b1(x), self.b3(x), self.b5(x), self.bp(x)], 1)

    class Inception(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(cbr(1, 16, 3), nn.MaxPool2d(2))
            self.i1 = InceptionBlock(16, 12)  # 12 + 12 + 12 + 6 = 42
            self.i2 = nn.Sequential(nn.MaxPool2d(2), InceptionBlock(42, 16))  # 56
            self.head = nn.Linear(56, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.i2(self.i1(self.stem(x))).mean((2, 3)))

    if want("inception_ts"):
        torch.manual_seed(seed)
        classifier((("inception_ts", False, 17),), Inception(), images, 3, 4e-3, ["input"],
                   "Inception blocks: 1x1, 1x1-3x3, 1x1-5x5 and maxpool-1x1 branches with BN, concatenated",
                   "nodes", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 6. causal linear attention, cumsum
    class LinAttn(nn.Module):
        def __init__(self, d: int = 48) -> None:
            super().__init__()
            self.embed = nn.Linear(28, d)
            self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            self.norm = nn.LayerNorm(d)
            self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)  # [N, T, d]
            q, k, v = F.elu(self.q(h)) + 1, F.elu(self.k(h)) + 1, self.v(h)
            kv = torch.cumsum(k.unsqueeze(-1) * v.unsqueeze(-2), dim=1)  # [N, T, d, d]
            num = (q.unsqueeze(-2) @ kv).squeeze(-2)  # [N, T, d]
            den = (q * torch.cumsum(k, dim=1)).sum(-1, keepdim=True)
            h = self.norm(h + num / den)
            h = h + self.ff(h)
            return self.head(h.mean(1))

    if want("linattn_cumsum_dyn"):
        torch.manual_seed(seed)
        classifier((("linattn_cumsum_dyn", True, 18),), LinAttn(), rows, 3, 3e-3, ["input"],
                   "causal linear attention: elu+1 features, key-value sums by cumsum over time",
                   "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 7. parallel attention decoder
    class ParallelDecoder(nn.Module):
        """Strip ``[N, 1, 14, 84]`` → conv patches → a transformer encoder layer → five learned queries
        cross-attending to it → per-position log-probabilities ``[N, 5, 11]`` (class 10: no digit)."""

        def __init__(self, d: int = 64, heads: int = 4) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1), nn.GELU(), nn.Conv2d(32, d, (14, 4), (14, 2), (0, 1)))
            self.pos = nn.Parameter(0.02 * torch.randn(1, 42, d))
            self.enc = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
            self.queries = nn.Parameter(0.02 * torch.randn(1, 5, d))
            self.cross = nn.MultiheadAttention(d, heads, batch_first=True)
            self.norm = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.head = nn.Linear(d, BLANK + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.stem(x).flatten(2).transpose(1, 2) + self.pos  # [N, 42, d]
            m = self.enc(f)
            q = self.queries.expand(x.shape[0], -1, -1)
            a, _ = self.cross(q, m, m, need_weights=False)
            h = self.norm(q + a)
            return torch.log_softmax(self.head(h + self.mlp(h)), -1)

    def position_nll(lp: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(lp.reshape(-1, BLANK + 1), lab.reshape(-1))

    names = [(n, dyn, op) for n, dyn, op in (("pardec_dyn", True, 18), ("pardec_ts", False, 17)) if want(n)]
    if names:
        t0 = time.time()
        P = audit.pools
        padded = lambda sy: np.where(sy < 0, BLANK, sy)  # noqa: E731  # no digit: class 10
        sx, sy = strings(P["train"], 12000, np.random.default_rng(seed + 11))
        torch.manual_seed(seed)
        net = ParallelDecoder()
        print(f"pardec: {shared.nparams(net)} params", flush=True)
        shared.train(net, sx, padded(sy), epochs=4, lr=3e-3, seed=seed, bs=64, loss_fn=position_nll)
        splits = {k: strings(P[k], n, np.random.default_rng(seed + i))
                  for i, (k, n) in enumerate((("calib", 256), ("select", 1000), ("test", 2000)), 1)}  # fmt: skip
        acc = float((shared.predict(net, splits["test"][0]).argmax(-1) == padded(splits["test"][1])).mean())
        print(f"  torch test accuracy (per position) {acc:.4f}", flush=True)
        for name, dyn, opset in names:
            shared.export(net, name, (torch.from_numpy(splits["test"][0][:2]),), dyn, opset, ["image"], ["logprobs"],
                          out=out)  # fmt: skip
            for split, (x, t) in splits.items():  # labels per position: never in the calibration file
                arrays = {"image": x} if split == "calib" else {"image": x, "labels": padded(t)}
                np.savez(out / f"{name}_{split}.npz", **arrays)  # type: ignore[arg-type]
            audit.manifest.record(name, dict(
                family="parallel attention decoder over a digit strip: conv patches, a transformer encoder "
                "layer, five learned queries cross-attending (MultiheadAttention), per-position classes",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none", task="classifier",
                input="image", torch_test_accuracy=acc, params=shared.nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 8. nn.TransformerDecoder
    class DecoderNet(nn.Module):
        """MNIST rows → conv1d + a transformer encoder layer as memory; an ``nn.TransformerDecoder``
        (two post-norm layers: masked self-attention over four learned queries, cross-attention to
        the memory, FFN) → mean of the queries → Linear."""

        def __init__(self, d: int = 48, heads: int = 4) -> None:
            super().__init__()
            self.embed = nn.Conv1d(28, d, 3, padding=1)
            self.enc = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
            layer = nn.TransformerDecoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True)
            self.dec = nn.TransformerDecoder(layer, 2)
            self.queries = nn.Parameter(0.02 * torch.randn(1, 4, d))
            self.register_buffer("causal", torch.triu(torch.full((4, 4), float("-inf")), 1))
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 28, 28]
            m = self.enc(self.embed(x.transpose(1, 2)).transpose(1, 2))
            h = self.dec(self.queries.expand(x.shape[0], -1, -1), m, tgt_mask=self.causal, tgt_is_causal=True)
            return self.head(h.mean(1))

    if want("tfdecoder_ts", "tfdecoder_dyn"):
        torch.manual_seed(seed)
        classifier((("tfdecoder_ts", False, 17), ("tfdecoder_dyn", True, 18)), DecoderNet(), rows, 3, 3e-3,
                   ["input"], "nn.TransformerDecoder (masked self-attention over learned queries, "
                   "cross-attention to a conv+encoder memory), mean of the queries, Linear", "none",
                   time.time())  # fmt: skip
    return dict(audit.manifest.entries)


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
