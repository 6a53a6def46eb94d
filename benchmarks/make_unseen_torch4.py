"""Build a fourth "unseen architectures" audit set: model families nobody on the team tried, trained
briefly (seeded) on MNIST, exported to ONNX.  Same pools, split files and manifest format as
``benchmarks/make_unseen.py`` (whose numpy helpers and ``Manifest`` it imports), so that
``benchmarks/bench_unseen.py --dir OUT`` audits it.

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch4.py \
        [--out ~/.cache/chita-onnx/unseen-torch4] [--only siamese_ts,siamese_dyn,...] [--n-train 20000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch4 --no-peer --sparsities 0.3,0.5

(TORCHVENV: ``python3.11 -m venv TORCHVENV && TORCHVENV/bin/pip install torch onnx onnxscript numpy``;
torch 2.13.0+cpu was used.)

Models:

* ``siamese_ts`` / ``siamese_dyn``  two image inputs ``a`` and ``b`` through ONE conv tower (every
  tower weight read by two Conv / Gemm nodes), head on ``[|ea - eb|, ea * eb]``, binary "same digit"
  logits ``[N, 2]``; pairs half same-digit, half not.  TorchScript exporter opset 17
  (``do_constant_folding=False``) and dynamo exporter opset 18, same trained weights.
* ``sr_pixelshuffle_ts`` / ``sr_pixelshuffle_dyn``  super-resolution 14x14 (2x2 average-pooled digit)
  -> 28x28: convs, a 1x1 conv to 4 channels, ``PixelShuffle(2)`` (DepthToSpace), plus a nearest
  upsampling of the input (Resize) as residual; regression, metric R^2 against the 28x28 image,
  "agreement" R^2 against dense.  TorchScript opset 17 and dynamo opset 18.
* ``groupnorm_ts`` / ``groupnorm_dyn``  CNN whose normalisations are GroupNorm (4 and 8 groups) and
  one InstanceNorm (affine), no BN.  TorchScript opset 17 (GroupNorm as Reshape + InstanceNormalization)
  and dynamo opset 18.
* ``einsum_ts`` / ``einsum_dyn``  rows of the image as 28 tokens; layers written with ``torch.einsum``:
  ``bti,id->btd`` (weight [in, out]), a multi-head projection ``btd,dhe->bthe`` (a 3-D weight: not a
  plain linear layer), ``bf,cf->bc`` (weight [out, in]).  TorchScript opset 17 (Einsum ops) and dynamo
  opset 18 (which decomposes einsum).
* ``einsum_attn``  a one-block attention classifier over the 28 rows written with ``torch.einsum``:
  q/k/v projections ``btd,dhe->bthe`` and the output projection ``bqhe,hed->bqd`` (3-D weights), the
  weightless score and mixing Einsums ``bqhe,bkhe->bhqk`` / ``bhqk,bkhe->bqhe`` (which
  onnxruntime-training cannot differentiate), an einsum MLP; TorchScript opset 17.
* ``stft_audio``  the digit image flattened to a 784-sample "signal", ``torch.stft`` (n_fft 64, hop 16,
  Hann window, ``STFT`` op in the graph), ``log1p|.|``, Conv1d over the frames, Linear; dynamo opset 18.
* ``groupnorm_op21``  the GroupNorm CNN's weights exported by dynamo at opset 21, which writes the
  native ``GroupNormalization`` op (opset 18 and TorchScript write Reshape + InstanceNormalization).
* ``unet_gn_dyn``  small U-Net segmenter (stride-2 convs, ConvTranspose upsampling, skip Concats,
  GroupNorm, 1x1 logits) on noisy, blotted digits -> foreground mask, dynamo exporter opset 18
  (``make_unseen.py``'s ``unet_seg`` is the TorchScript, BN-folded one).  Metric foreground IoU; the
  ``.npz`` files keep the masks under ``mask`` (not in the calibration file).
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

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch4"
MEAN, STD = 0.1307, 0.3081


def pairs(x: np.ndarray, y: np.ndarray, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``n`` image pairs from one pool, half of them the same digit: ``(a, b, same)``."""
    ia = rng.integers(0, len(x), size=n)
    same = rng.random(n) < 0.5
    by = {c: np.flatnonzero(y == c) for c in range(10)}
    ib = np.empty(n, dtype=np.int64)
    for j, (i, s) in enumerate(zip(ia, same, strict=True)):
        pool = by[int(y[i])] if s else np.flatnonzero(y != y[i])
        ib[j] = rng.choice(pool)
    img = (-1, 1, 28, 28)
    return x[ia].reshape(img), x[ib].reshape(img), (y[ia] == y[ib]).astype(np.int64)


def downsample(x: np.ndarray) -> np.ndarray:
    """[n, 784] normalised images -> [n, 1, 14, 14], 2x2 average-pooled."""
    return x.reshape(-1, 1, 14, 2, 14, 2).mean(axis=(3, 5)).astype(np.float32)


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
    want = shared.Audit(out=out, manifest=manifest, pools=P, xtr=xtr, ytr=ytr, only=only, seed=seed).want
    both = (("ts", False, 17), ("dyn", True, 18))

    # ------------------------------------------------------------------ 1. siamese, shared tower
    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(
                nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(32 * 49, 64))  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.f(x)

    class Siamese(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tower = Tower()
            self.head = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 2))

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            ea, eb = self.tower(a), self.tower(b)
            return self.head(torch.cat([(ea - eb).abs(), ea * eb], 1))

    if want("siamese_ts", "siamese_dyn"):
        t0 = time.time()
        rng = np.random.default_rng(seed + 1)
        torch.manual_seed(seed)
        net = Siamese()
        print(f"siamese: {nparams(net)} params", flush=True)
        ta, tb, ts = pairs(xtr, ytr, 2 * n_train, rng)
        train(net, (ta, tb), ts, epochs=2, lr=3e-3)
        splits = {k: pairs(*P[k], n, rng) for k, n in (("calib", 256), ("select", 1000), ("test", 5000))}
        a, b, s = splits["test"]
        acc = float((predict(net, a, b).argmax(-1) == s).mean())
        for tag, dyn, opset in both:
            name = f"siamese_{tag}"
            if not want(name):
                continue
            export(net, name, (torch.zeros(2, *img), torch.zeros(2, *img)), dyn, opset, ["a", "b"], ["logits"])
            for split, (a, b, s) in splits.items():
                np.savez(out / f"{name}_{split}.npz", a=a, b=b, labels=s)
            manifest.record(name, dict(
                family="siamese: two inputs through one shared conv tower (each weight read by two nodes), "
                "|ea-eb|, ea*eb head, same-digit classifier",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none", task="classifier",
                inputs=["a", "b"], input="a", torch_test_accuracy=acc, params=nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 2. super-resolution, PixelShuffle
    class SR(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv2d(1, 32, 5, 1, 2), nn.ReLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(),
                nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.Conv2d(32, 4, 3, 1, 1))  # fmt: skip
            self.shuffle = nn.PixelShuffle(2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.shuffle(self.body(x)) + F.interpolate(x, scale_factor=2.0, mode="nearest")

    if want("sr_pixelshuffle_ts", "sr_pixelshuffle_dyn"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = SR()
        print(f"sr_pixelshuffle: {nparams(net)} params", flush=True)
        train(net, downsample(xtr), xtr.reshape(-1, *img), epochs=3, lr=3e-3, loss_fn=F.mse_loss)
        splits = {k: (downsample(P[k][0]), P[k][0].reshape(-1, *img)) for k in ("calib", "select", "test")}
        xt, ct = splits["test"]
        pr = predict(net, xt).astype(np.float64)
        r2 = float(1 - ((pr - ct) ** 2).sum() / ((ct - ct.mean(0)) ** 2).sum())
        for tag, dyn, opset in both:
            name = f"sr_pixelshuffle_{tag}"
            if not want(name):
                continue
            export(net, name, (torch.zeros(2, 1, 14, 14),), dyn, opset, ["input"], ["image"])
            for split, (x, c) in splits.items():
                extra = {} if split == "calib" else {"target": c}
                np.savez(out / f"{name}_{split}.npz", input=x, **extra)
            manifest.record(name, dict(
                family="super-resolution 14x14 -> 28x28: convs, PixelShuffle (DepthToSpace), nearest-Resize "
                "residual (regression output)",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none", task="regress",
                input="input", torch_test_accuracy=r2, params=nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 3. GroupNorm / InstanceNorm CNN
    class GNNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(
                nn.Conv2d(1, 32, 3, 1, 1), nn.GroupNorm(4, 32), nn.ReLU(),
                nn.Conv2d(32, 32, 3, 2, 1), nn.InstanceNorm2d(32, affine=True), nn.ReLU(),
                nn.Conv2d(32, 64, 3, 1, 1), nn.GroupNorm(8, 64), nn.ReLU(),
                nn.Conv2d(64, 64, 3, 2, 1), nn.GroupNorm(8, 64), nn.ReLU())  # fmt: skip
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.f(x).mean(dim=(2, 3)))

    if want("groupnorm_ts", "groupnorm_dyn", "groupnorm_op21"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = GNNet()
        print(f"groupnorm: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, *img), ytr, epochs=4, lr=5e-3)
        acc = float((predict(net, P["test"][0].reshape(-1, *img)).argmax(-1) == P["test"][1]).mean())
        for tag, dyn, opset in (*both, ("op21", True, 21)):
            name = f"groupnorm_{tag}"
            if not want(name):
                continue
            export(net, name, (torch.zeros(2, *img),), dyn, opset, ["input"], ["logits"])
            for split in ("calib", "select", "test"):
                x, y = P[split]
                np.savez(out / f"{name}_{split}.npz", input=x.reshape(-1, *img), labels=y)
            manifest.record(name, dict(
                family="CNN with GroupNorm (4 and 8 groups) and an affine InstanceNorm, no BN",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none (GroupNorm/InstanceNorm)",
                task="classifier", input="input", torch_test_accuracy=acc, params=nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 4. einsum layers
    class EinsumNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w1 = nn.Parameter(torch.randn(28, 64) / 28**0.5)  # [in, out]
            self.b1 = nn.Parameter(torch.zeros(64))
            self.w2 = nn.Parameter(torch.randn(64, 4, 16) / 8.0)  # [d, heads, e]
            self.w3 = nn.Parameter(torch.randn(10, 64 * 28) / (64 * 28) ** 0.5)  # [out, in]
            self.b3 = nn.Parameter(torch.zeros(10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 28 rows, 28 columns]
            h = F.relu(torch.einsum("bti,id->btd", x, self.w1) + self.b1)
            h = F.relu(torch.einsum("btd,dhe->bthe", h, self.w2))
            return torch.einsum("bf,cf->bc", h.flatten(1), self.w3) + self.b3

    if want("einsum_ts", "einsum_dyn"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = EinsumNet()
        print(f"einsum: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, 28, 28), ytr, epochs=3, lr=3e-3)
        acc = float((predict(net, P["test"][0].reshape(-1, 28, 28)).argmax(-1) == P["test"][1]).mean())
        for tag, dyn, opset in both:
            name = f"einsum_{tag}"
            if not want(name):
                continue
            export(net, name, (torch.zeros(2, 28, 28),), dyn, opset, ["input"], ["logits"])
            for split in ("calib", "select", "test"):
                x, y = P[split]
                np.savez(out / f"{name}_{split}.npz", input=x.reshape(-1, 28, 28), labels=y)
            manifest.record(name, dict(
                family="layers written with torch.einsum (bti,id->btd; btd,dhe->bthe with a 3-D weight; "
                "bf,cf->bc)",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none", task="classifier",
                input="input", torch_test_accuracy=acc, params=nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 4b. einsum attention
    class EinsumAttn(nn.Module):
        def __init__(self, d: int = 48, h: int = 4) -> None:
            super().__init__()
            e = d // h
            self.emb = nn.Parameter(torch.randn(28, d) / 28**0.5)  # [in, d]
            self.pos = nn.Parameter(torch.randn(28, d) * 0.02)
            self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, h, e) / d**0.5) for _ in range(3))
            self.wo = nn.Parameter(torch.randn(h, e, d) / d**0.5)
            self.w1 = nn.Parameter(torch.randn(2 * d, d) / d**0.5)  # [out, in]
            self.w2 = nn.Parameter(torch.randn(d, 2 * d) / (2 * d) ** 0.5)
            self.n1, self.n2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.fc = nn.Parameter(torch.randn(d, 10) / d**0.5)
            self.scale = e**-0.5

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 28 rows, 28 columns]
            t = torch.einsum("bti,id->btd", x, self.emb) + self.pos
            y = self.n1(t)
            q = torch.einsum("btd,dhe->bthe", y, self.wq)
            k = torch.einsum("btd,dhe->bthe", y, self.wk)
            v = torch.einsum("btd,dhe->bthe", y, self.wv)
            a = torch.softmax(torch.einsum("bqhe,bkhe->bhqk", q, k) * self.scale, dim=-1)
            t = t + torch.einsum("bqhe,hed->bqd", torch.einsum("bhqk,bkhe->bqhe", a, v), self.wo)
            f = torch.einsum("btf,df->btd", F.gelu(torch.einsum("btd,fd->btf", self.n2(t), self.w1)), self.w2)
            return torch.einsum("bd,dc->bc", (t + f).mean(1), self.fc)

    if want("einsum_attn"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = EinsumAttn()
        print(f"einsum_attn: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, 28, 28), ytr, epochs=3, lr=3e-3)
        acc = float((predict(net, P["test"][0].reshape(-1, 28, 28)).argmax(-1) == P["test"][1]).mean())
        export(net, "einsum_attn", (torch.zeros(2, 28, 28),), False, 17, ["input"], ["logits"])
        for split in ("calib", "select", "test"):
            x, y = P[split]
            np.savez(out / f"einsum_attn_{split}.npz", input=x.reshape(-1, 28, 28), labels=y)
        manifest.record("einsum_attn", dict(
            family="attention written with torch.einsum: 3-D q/k/v/o weights (btd,dhe->bthe; bqhe,hed->bqd), "
            "weightless score and mixing Einsums (bqhe,bkhe->bhqk; bhqk,bkhe->bqhe), einsum MLP",
            exporter="torchscript", opset=17, bn="none", task="classifier", input="input",
            torch_test_accuracy=acc, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 6. STFT front end
    class STFTNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("window", torch.hann_window(64))
            self.f = nn.Sequential(
                nn.Conv1d(33, 96, 3, 1, 1), nn.ReLU(), nn.Conv1d(96, 96, 3, 2, 1), nn.ReLU())  # fmt: skip
            self.fc = nn.Linear(96, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 784] signal
            spec = torch.stft(x, 64, hop_length=16, window=self.window, center=False, return_complex=True)
            return self.fc(self.f(torch.log1p(spec.abs())).mean(-1))  # spec: [N, 33, 46]

    if want("stft_audio"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = STFTNet()
        print(f"stft_audio: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, 784), ytr, epochs=8, lr=5e-3)
        acc = float((predict(net, P["test"][0].reshape(-1, 784)).argmax(-1) == P["test"][1]).mean())
        export(net, "stft_audio", (torch.zeros(2, 784),), True, 18, ["signal"], ["logits"])
        for split in ("calib", "select", "test"):
            x, y = P[split]
            np.savez(out / f"stft_audio_{split}.npz", signal=x.reshape(-1, 784), labels=y)
        manifest.record("stft_audio", dict(
            family="STFT front end in the graph (digit image flattened to a 784-sample signal, |STFT|, log1p), "
            "Conv1d over time, Linear",
            exporter="dynamo", opset=18, bn="none", task="classifier", input="signal",
            torch_test_accuracy=acc, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 5. U-Net, GroupNorm, dynamo
    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()

            def blk(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
                return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(4, cout), nn.ReLU())

            self.e1 = blk(1, 16)
            self.e2 = blk(16, 32, 2)  # 14x14
            self.e3 = blk(32, 64, 2)  # 7x7
            self.u2 = nn.ConvTranspose2d(64, 32, 2, 2)  # 14x14
            self.d2 = blk(64, 32)
            self.u1 = nn.ConvTranspose2d(32, 16, 2, 2)  # 28x28
            self.d1 = blk(32, 16)
            self.out = nn.Conv2d(16, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s1 = self.e1(x)
            s2 = self.e2(s1)
            h = self.e3(s2)
            h = self.d2(torch.cat([self.u2(h), s2], 1))
            h = self.d1(torch.cat([self.u1(h), s1], 1))
            return self.out(h)

    if want("unet_gn_dyn"):
        t0 = time.time()
        rng = np.random.default_rng(seed + 5)

        torch.manual_seed(seed)
        net = UNet()
        print(f"unet_gn_dyn: {nparams(net)} params", flush=True)
        xin, mtr = shared.blotted(xtr, rng)
        train(net, xin, mtr, epochs=2, lr=3e-3, loss_fn=F.binary_cross_entropy_with_logits)
        splits = {k: shared.blotted(P[k][0], rng) for k in ("calib", "select", "test")}
        xt, mt = splits["test"]
        fg, truth = predict(net, xt) > 0, mt > 0.5
        iou = float((fg & truth).sum() / (fg | truth).sum())
        export(net, "unet_gn_dyn", (torch.zeros(2, *img),), True, 18, ["input"], ["mask_logits"])
        for split, (x, m) in splits.items():
            extra = {} if split == "calib" else {"mask": m}
            np.savez(out / f"unet_gn_dyn_{split}.npz", input=x, **extra)
        manifest.record("unet_gn_dyn", dict(
            family="U-Net segmenter (stride-2 convs, ConvTranspose upsampling, skip Concats, GroupNorm)",
            exporter="dynamo", opset=18, bn="none (GroupNorm)", task="segment", input="input",
            torch_test_accuracy=iou, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip
    return manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=20000)


if __name__ == "__main__":
    sys.exit(main())
