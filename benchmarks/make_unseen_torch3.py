"""Build a third "unseen architectures" audit set: model families nobody on the team tried, trained
briefly (seeded) on MNIST, exported to ONNX.  Same pools, split files and manifest format as
``benchmarks/make_unseen.py`` (whose numpy helpers and ``Manifest`` it imports), so that
``benchmarks/bench_unseen.py --dir OUT`` audits it.

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch3.py \
        [--out ~/.cache/chita-onnx/unseen-torch3] [--only wn_tcn_ts,wn_tcn_dyn,...] [--n-train 20000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch3 --no-peer --sparsities 0.3,0.5

(TORCHVENV: ``python3.11 -m venv TORCHVENV && TORCHVENV/bin/pip install torch onnx onnxscript numpy``;
torch 2.13.0+cpu was used.)

Models:

* ``wn_tcn_ts`` / ``wn_tcn_dyn``  TCN over the 28 image rows as time steps (28 features): dilated
  causal Conv1d blocks whose weights are ``torch.nn.utils.parametrizations.weight_norm`` (each conv
  weight computed in the graph as g * v / ||v|| from two initializers), residual, mean pool, Linear;
  TorchScript exporter opset 17 (``do_constant_folding=False``) and dynamo exporter opset 18.
* ``tied_head`` / ``tied_head_dyn``  a tiny next-token model over pixel tokens (MNIST 14x14, 16 grey levels, 196 tokens,
  input = the first 195, labels = the next token at each position): embedding (Gather) -> causal
  Conv1d blocks -> LayerNorm -> logits = h @ E^T with the SAME embedding initializer (tied weights);
  TorchScript exporter opset 17, and dynamo opset 18.  Output ``logits [N, 195, 16]``; metric next-token accuracy (the
  calibration file holds no labels: compress takes one label per sample only).
* ``mixer``      MLP-Mixer: 4x4 patches (49 tokens), token-mixing MLP over the transposed patch axis,
  channel-mixing MLP, LayerNorm, GELU; dynamo exporter, opset 18.
* ``resnext_grouped`` ResNeXt-style blocks: 1x1 -> grouped 3x3 (groups=4) -> 1x1, BN, residual;
  TorchScript exporter, opset 13, BN kept (``do_constant_folding=False``).
* ``dae_regress`` denoising autoencoder (MLP 784-256-64-256-784 on noisy digits -> clean digits),
  regression output; metric R^2 against the clean image, "agreement" R^2 against dense.
* ``multitask``  two inputs (image, a 2-vector ``aux``) and two outputs (``logits`` and ``value`` =
  regression of label * aux0 + aux1); dynamo exporter opset 18.  Metric on ``logits``.
* ``embed_l2``   conv embedding net whose output ``embedding [N, 32]`` is L2-normalised (trained with a
  cosine-softmax head that is not exported); metric mean cosine with the dense embeddings,
  agreement nearest-class-centroid agreement with dense (centroids from the dense calib embeddings).
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

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch3"
MEAN, STD = 0.1307, 0.3081


def pixel_tokens(x: np.ndarray) -> np.ndarray:
    """[n, 784] normalised images -> [n, 196] int64 tokens: 2x2 average-pooled, 16 grey levels."""
    raw = x.reshape(-1, 28, 28) * STD + MEAN
    small = raw.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
    return np.clip(np.floor(small * 16), 0, 15).astype(np.int64).reshape(len(x), 196)


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812
    from torch.nn.utils.parametrizations import weight_norm

    torch.set_num_threads(1)
    P = pools(mnist)
    manifest = Manifest(out)

    def want(name: str) -> bool:
        return only is None or name in only

    train = partial(shared.train, seed=seed)
    export = partial(shared.export, out=out)

    def nparams(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    def acc_of(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
        with torch.no_grad():
            return float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())

    xtr, ytr = P["train"][0][:n_train], P["train"][1][:n_train]
    img = (1, 28, 28)

    # ------------------------------------------------------------------ 1. weight-normed TCN
    class WNBlock(nn.Module):
        def __init__(self, cin: int, cout: int, dil: int) -> None:
            super().__init__()
            self.pad = 2 * dil
            self.c1 = weight_norm(nn.Conv1d(cin, cout, 3, dilation=dil))
            self.c2 = weight_norm(nn.Conv1d(cout, cout, 3, dilation=dil))
            self.down = nn.Conv1d(cin, cout, 1) if cin != cout else None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.c1(F.pad(x, (self.pad, 0))))
            y = F.relu(self.c2(F.pad(y, (self.pad, 0))))
            return F.relu(y + (x if self.down is None else self.down(x)))

    class WNTCN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(WNBlock(28, 48, 1), WNBlock(48, 48, 2), WNBlock(48, 64, 4))
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, 28 rows, 28 columns]
            return self.fc(self.blocks(x.transpose(1, 2)).mean(-1))

    if want("wn_tcn_ts") or want("wn_tcn_dyn"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = WNTCN()
        print(f"wn_tcn: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, 28, 28), ytr, epochs=3, lr=3e-3)
        acc = acc_of(net, P["test"][0].reshape(-1, 28, 28), P["test"][1])
        for name, dyn, opset in (("wn_tcn_ts", False, 17), ("wn_tcn_dyn", True, 18)):
            if not want(name):
                continue
            export(net, name, (torch.zeros(2, 28, 28),), dyn, opset, ["input"], ["logits"])
            for split in ("calib", "select", "test"):
                x, y = P[split]
                np.savez(out / f"{name}_{split}.npz", input=x.reshape(-1, 28, 28), labels=y)
            manifest.record(name, dict(
                family="TCN with weight_norm convs (w = g*v/||v|| computed in the graph), dilated causal, residual",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none", task="classifier",
                input="input", torch_test_accuracy=acc, params=nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 2. tied embedding / head
    class CausalBlock(nn.Module):
        def __init__(self, d: int, dil: int) -> None:
            super().__init__()
            self.pad = 2 * dil
            self.norm = nn.LayerNorm(d)
            self.conv = nn.Conv1d(d, 2 * d, 3, dilation=dil)
            self.proj = nn.Linear(d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, d]
            y = self.norm(x).transpose(1, 2)
            y = F.glu(self.conv(F.pad(y, (self.pad, 0))), dim=1).transpose(1, 2)
            return x + self.proj(y)

    class TiedLM(nn.Module):
        def __init__(self, vocab: int = 16, d: int = 64) -> None:
            super().__init__()
            self.emb = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(torch.randn(1, 195, d) * 0.02)
            self.blocks = nn.Sequential(*[CausalBlock(d, k) for k in (1, 2, 4, 8, 14)])
            self.norm = nn.LayerNorm(d)

        def forward(self, tok: torch.Tensor) -> torch.Tensor:
            h = self.norm(self.blocks(self.emb(tok) + self.pos))
            return h @ self.emb.weight.t()  # tied output projection

    if want("tied_head") or want("tied_head_dyn"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = TiedLM()
        print(f"tied_head: {nparams(net)} params", flush=True)
        tt = pixel_tokens(xtr)

        def lm_loss(o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(o.reshape(-1, o.shape[-1]), y.reshape(-1))

        train(net, tt[:, :-1].copy(), tt[:, 1:].copy(), epochs=2, lr=3e-3, loss_fn=lm_loss)
        te = pixel_tokens(P["test"][0])
        with torch.no_grad():
            acc = float((net(torch.from_numpy(te[:, :-1].copy())).argmax(-1).numpy() == te[:, 1:]).mean())
        for name, dyn, opset in (("tied_head", False, 17), ("tied_head_dyn", True, 18)):
            if not want(name):
                continue
            export(net, name, (torch.zeros(2, 195, dtype=torch.long),), dyn, opset, ["tokens"], ["logits"])
            for split in ("calib", "select", "test"):
                t = pixel_tokens(P[split][0])
                # per-position labels are refused by compress ("expected (n,)"): the calibration file has none
                lab = {} if split == "calib" else {"labels": t[:, 1:].copy()}
                np.savez(out / f"{name}_{split}.npz", tokens=t[:, :-1].copy(), **lab)
            manifest.record(name, dict(
                family="next-token model over pixel tokens, embedding tied to the output projection "
                "(Gather + MatMul of E^T)",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none", task="classifier",
                input="tokens", torch_test_accuracy=acc, params=nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 3. MLP-Mixer
    class MixerBlock(nn.Module):
        def __init__(self, tokens: int, d: int) -> None:
            super().__init__()
            self.n1 = nn.LayerNorm(d)
            self.t1 = nn.Linear(tokens, 2 * tokens)
            self.t2 = nn.Linear(2 * tokens, tokens)
            self.n2 = nn.LayerNorm(d)
            self.c1 = nn.Linear(d, 2 * d)
            self.c2 = nn.Linear(2 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, tokens, d]
            y = self.n1(x).transpose(1, 2)
            x = x + self.t2(F.gelu(self.t1(y))).transpose(1, 2)
            return x + self.c2(F.gelu(self.c1(self.n2(x))))

    class Mixer(nn.Module):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.stem = nn.Conv2d(1, d, 4, 4)  # 7x7 = 49 patches
            self.blocks = nn.Sequential(*[MixerBlock(49, d) for _ in range(3)])
            self.norm = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            t = self.stem(x).flatten(2).transpose(1, 2)
            return self.fc(self.norm(self.blocks(t)).mean(1))

    if want("mixer"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = Mixer()
        print(f"mixer: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, *img), ytr, epochs=3, lr=3e-3)
        acc = acc_of(net, P["test"][0].reshape(-1, *img), P["test"][1])
        export(net, "mixer", (torch.zeros(2, *img),), True, 18, ["input"], ["logits"])
        for split in ("calib", "select", "test"):
            x, y = P[split]
            np.savez(out / f"mixer_{split}.npz", input=x.reshape(-1, *img), labels=y)
        manifest.record("mixer", dict(
            family="MLP-Mixer (token-mixing Linear over the transposed patch axis, channel-mixing Linear, LayerNorm)",
            exporter="dynamo", opset=18, bn="none", task="classifier", input="input",
            torch_test_accuracy=acc, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 4. ResNeXt, grouped convs
    class XBlock(nn.Module):
        def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, mid, 1, bias=False)
            self.b1 = nn.BatchNorm2d(mid)
            self.c2 = nn.Conv2d(mid, mid, 3, stride, 1, groups=4, bias=False)
            self.b2 = nn.BatchNorm2d(mid)
            self.c3 = nn.Conv2d(mid, cout, 1, bias=False)
            self.b3 = nn.BatchNorm2d(cout)
            self.short = None
            if stride != 1 or cin != cout:
                self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.b1(self.c1(x)))
            y = F.relu(self.b2(self.c2(y)))
            y = self.b3(self.c3(y))
            return F.relu(y + (x if self.short is None else self.short(x)))

    class ResNeXt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.layers = nn.Sequential(XBlock(32, 32, 64, 1), XBlock(64, 64, 128, 2), XBlock(128, 64, 128, 1))
            self.fc = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))

    if want("resnext_grouped"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = ResNeXt()
        print(f"resnext_grouped: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, *img), ytr, epochs=2, lr=0.05, opt="sgd")
        acc = acc_of(net, P["test"][0].reshape(-1, *img), P["test"][1])
        export(net, "resnext_grouped", (torch.zeros(2, *img),), False, 13, ["input"], ["logits"])
        for split in ("calib", "select", "test"):
            x, y = P[split]
            np.savez(out / f"resnext_grouped_{split}.npz", input=x.reshape(-1, *img), labels=y)
        manifest.record("resnext_grouped", dict(
            family="ResNeXt style (grouped 3x3 convs, groups=4, BN kept, residual)", exporter="torchscript",
            opset=13, bn="kept", task="classifier", input="input",
            torch_test_accuracy=acc, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 5. denoising autoencoder
    class DAE(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.enc = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 64), nn.ReLU())
            self.dec = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 784))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dec(self.enc(x))

    if want("dae_regress"):
        t0 = time.time()
        rng = np.random.default_rng(seed + 5)

        def noisy(x: np.ndarray) -> np.ndarray:
            return (x + rng.normal(0, 0.8, x.shape)).astype(np.float32)

        torch.manual_seed(seed)
        net = DAE()
        print(f"dae_regress: {nparams(net)} params", flush=True)
        clean = xtr.reshape(-1, 784)
        train(net, noisy(clean), clean, epochs=4, lr=2e-3, loss_fn=F.mse_loss)
        splits = {}
        for split in ("calib", "select", "test"):
            c = P[split][0].reshape(-1, 784)
            splits[split] = (noisy(c), c)
        with torch.no_grad():
            xt, ct = splits["test"]
            pr = net(torch.from_numpy(xt)).numpy()
        r2 = float(1 - ((pr - ct) ** 2).sum() / ((ct - ct.mean(0)) ** 2).sum())
        export(net, "dae_regress", (torch.zeros(2, 784),), False, 17, ["input"], ["recon"])
        for split, (x, c) in splits.items():
            np.savez(
                out / f"dae_regress_{split}.npz", **({"input": x} if split == "calib" else {"input": x, "target": c})
            )
        manifest.record("dae_regress", dict(
            family="denoising autoencoder MLP (regression output, no classes)", exporter="torchscript", opset=17,
            bn="none", task="regress", input="input", torch_test_accuracy=r2, params=nparams(net),
            train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 6. two inputs, two outputs
    class MultiTask(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv2d(1, 16, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(16, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 32, 3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())  # fmt: skip
            self.aux = nn.Linear(2, 32)
            self.trunk = nn.Linear(64, 64)
            self.cls = nn.Linear(64, 10)
            self.reg = nn.Linear(64, 1)

        def forward(self, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            h = F.relu(self.trunk(torch.cat([self.conv(x), F.relu(self.aux(a))], 1)))
            return self.cls(h), self.reg(h)

    if want("multitask"):
        t0 = time.time()
        rng = np.random.default_rng(seed + 6)
        torch.manual_seed(seed)
        net = MultiTask()
        print(f"multitask: {nparams(net)} params", flush=True)

        def aux_of(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            a = rng.uniform(-1, 1, (len(y), 2)).astype(np.float32)
            return a, (y * a[:, 0] + a[:, 1]).astype(np.float32)[:, None]

        atr, vtr = aux_of(ytr)
        yy = np.concatenate([ytr[:, None].astype(np.float32), vtr], 1)

        def mt_loss(o: tuple[torch.Tensor, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(o[0], t[:, 0].long()) + 0.02 * F.mse_loss(o[1], t[:, 1:])

        train(net, (xtr.reshape(-1, *img), atr), yy, epochs=6, lr=3e-3, loss_fn=mt_loss)
        splits = {k: (P[k][0].reshape(-1, *img), *aux_of(P[k][1]), P[k][1]) for k in ("calib", "select", "test")}
        with torch.no_grad():
            x, a, v, y = splits["test"]
            lo, vo = net(torch.from_numpy(x), torch.from_numpy(a))
        acc = float((lo.argmax(-1).numpy() == y).mean())
        export(net, "multitask", (torch.zeros(2, *img), torch.zeros(2, 2)), True, 18, ["image", "aux"],
               ["logits", "value"])  # fmt: skip
        for split, (x, a, v, y) in splits.items():
            np.savez(out / f"multitask_{split}.npz", image=x, aux=a, labels=y, value=v)
        manifest.record("multitask", dict(
            family="two inputs (image, aux 2-vector), two outputs (class logits, regression value)",
            exporter="dynamo", opset=18, bn="none", task="classifier", inputs=["image", "aux"], input="image",
            torch_test_accuracy=acc, value_mse=float(((vo.numpy() - v) ** 2).mean()), params=nparams(net),
            train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 7. L2-normalised embedding
    class Embedder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f = nn.Sequential(
                nn.Conv2d(1, 32, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, 1, 1), nn.ReLU(), nn.MaxPool2d(2),
                nn.Flatten(), nn.Linear(64 * 49, 128), nn.ReLU(), nn.Linear(128, 32))  # fmt: skip

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.normalize(self.f(x), dim=-1)

    class CosHead(nn.Module):
        def __init__(self, e: Embedder) -> None:
            super().__init__()
            self.e = e
            self.w = nn.Parameter(torch.randn(10, 32))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 16.0 * self.e(x) @ F.normalize(self.w, dim=-1).t()

    if want("embed_l2"):
        t0 = time.time()
        torch.manual_seed(seed)
        emb = Embedder()
        head = CosHead(emb)
        print(f"embed_l2: {nparams(emb)} params", flush=True)
        train(head, xtr.reshape(-1, *img), ytr, epochs=2, lr=3e-3)
        acc = acc_of(head, P["test"][0].reshape(-1, *img), P["test"][1])
        export(emb, "embed_l2", (torch.zeros(2, *img),), False, 17, ["input"], ["embedding"])
        for split in ("calib", "select", "test"):
            x, y = P[split]
            extra = {} if split == "calib" else {"labels": y}  # no labels for the pruning: not a classifier
            np.savez(out / f"embed_l2_{split}.npz", input=x.reshape(-1, *img), **extra)
        manifest.record("embed_l2", dict(
            family="conv embedding net, L2-normalised output (cosine-softmax head not exported)",
            exporter="torchscript", opset=17, bn="none", task="embed", input="input",
            torch_test_accuracy=acc, params=nparams(emb), train_s=round(time.time() - t0, 1)))  # fmt: skip
    return manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=20000)


if __name__ == "__main__":
    sys.exit(main())
