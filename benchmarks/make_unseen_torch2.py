"""Build a second "unseen architectures" audit set: four model families nobody on the team developed
on, trained briefly (seeded) on MNIST, exported to ONNX.  Same pools, split files and manifest format
as ``benchmarks/make_unseen.py`` (whose numpy helpers and ``Manifest`` it imports), so that
``benchmarks/bench_unseen.py --dir OUT`` audits it.

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch2.py \
        [--out ~/.cache/chita-onnx/unseen-torch2] [--only convnext_dyn,effnet_se_bn,bottleneck_opt,conformer_ctc]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch2 --no-peer

(TORCHVENV: ``python3.11 -m venv TORCHVENV && TORCHVENV/bin/pip install torch onnx onnxscript numpy``;
torch 2.14.1 was used.)

Models:

* ``convnext_dyn``    ConvNeXt-style: patchify stem, blocks of depthwise 7x7 conv -> permute to NHWC
  -> nn.LayerNorm(C) -> Linear(C,4C) -> GELU -> Linear(4C,C) -> layer-scale gamma -> permute back ->
  residual; LayerNorm + 2x2 stride-2 conv downsample; dynamo exporter, opset 18.
* ``effnet_se_bn``    EfficientNet-style: MBConv (1x1 expand, BN, SiLU, depthwise 3x3, BN, SiLU,
  squeeze-excitation: global avg pool, 1x1 conv, SiLU, 1x1 conv, Sigmoid, Mul; 1x1 project, BN,
  residual); eval mode, TorchScript exporter, opset 13, do_constant_folding=False.
* ``bottleneck_opt``  bottleneck ResNet (1x1-3x3-1x1, BN, projection shortcut 1x1 convs with stride 2);
  dynamo exporter, opset 18, optimize=True (onnxscript optimizer; BN folded into the convs).
* ``conformer_ctc``   Conformer-ish CTC recogniser on strips of 3-5 MNIST digits ([N,1,14,84], the
  strips of make_unseen.strings): conv front end -> Linear -> 2 Conformer blocks (half-step FFN,
  nn.MultiheadAttention, conv module with pointwise Conv1d + GLU + depthwise Conv1d + BatchNorm1d +
  SiLU + pointwise Conv1d, half-step FFN, LayerNorm) -> Linear -> log_softmax ``logprobs [N,T,11]``;
  dynamo exporter, opset 18.
* ``conformer_ctc_op23`` the same trained weights, dynamo exporter, opset 23.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_unseen import (  # numpy only at import
    BLANK,
    DIGIT,
    SEQ_W,
    Manifest,
    builder_main,
    char_accuracy,
    pools,
    strings,
)

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch2"


def build(only: set[str] | None, out: Path, seed: int, mnist: Path) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    torch.set_num_threads(1)
    P = pools(mnist)
    manifest = Manifest(out)

    def want(name: str) -> bool:
        return only is None or name in only

    def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, bs: int = 128,
              loss_fn: Any = None, opt: str = "sgd") -> None:  # fmt: skip
        torch.manual_seed(seed)
        if os.environ.get("MAKE_NEW_DRY"):  # smoke test of the exports: 2 steps only
            x, y, epochs = x[: 2 * bs], y[: 2 * bs], 1
        X, Y = torch.from_numpy(x), torch.from_numpy(y)
        steps = epochs * (len(X) // bs)
        o: torch.optim.Optimizer
        if opt == "sgd":
            o = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        else:
            o = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=steps)
        model.train()
        for ep in range(epochs):
            perm = torch.randperm(len(X))
            tot = 0.0
            for i in range(len(X) // bs):
                idx = perm[i * bs : (i + 1) * bs]
                out_ = model(X[idx])
                loss = loss_fn(out_, Y[idx]) if loss_fn else F.cross_entropy(out_, Y[idx])
                o.zero_grad()
                loss.backward()
                o.step()
                sched.step()
                tot += float(loss)
            print(f"  epoch {ep}: loss {tot / (len(X) // bs):.4f}", flush=True)
        model.eval()

    def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
        with torch.no_grad():
            return float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())

    def save_split(name: str, key: str, shape: tuple[int, ...]) -> None:
        for split in ("calib", "select", "test"):
            x, y = P[split]
            np.savez(out / f"{name}_{split}.npz", **{key: x.reshape(len(x), *shape)}, labels=y)

    def export(model: nn.Module, name: str, x: Any, dynamo: bool, opset: int, inp: str = "input",
               outname: str = "logits", optimize: bool = False) -> None:  # fmt: skip
        path = out / f"{name}.onnx"
        kw: dict[str, Any] = {"input_names": [inp], "output_names": [outname], "opset_version": opset}
        if dynamo:
            kw["dynamic_shapes"] = ({0: torch.export.Dim("N", min=1, max=4096)},)
            kw["external_data"] = False
            kw["optimize"] = optimize
        else:
            kw["dynamic_axes"] = {inp: {0: "N"}, outname: {0: "N"}}
            kw["do_constant_folding"] = False
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, **kw)

    def nparams(m: nn.Module) -> int:
        return sum(p.numel() for p in m.parameters())

    xtr, ytr = P["train"]
    img = (1, 28, 28)

    # ------------------------------------------------------------------ a. ConvNeXt style
    class CNXBlock(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
            self.norm = nn.LayerNorm(c, eps=1e-6)
            self.pw1 = nn.Linear(c, 4 * c)
            self.pw2 = nn.Linear(4 * c, c)
            self.gamma = nn.Parameter(torch.full((c,), 0.1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.dw(x).permute(0, 2, 3, 1)  # NHWC
            y = self.gamma * self.pw2(F.gelu(self.pw1(self.norm(y))))
            return x + y.permute(0, 3, 1, 2)

    class LayerNorm2d(nn.LayerNorm):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    class ConvNeXt(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 2, 2), LayerNorm2d(32, eps=1e-6))  # 14x14
            self.s1 = nn.Sequential(CNXBlock(32), CNXBlock(32))
            self.down = nn.Sequential(LayerNorm2d(32, eps=1e-6), nn.Conv2d(32, 64, 2, 2))  # 7x7
            self.s2 = nn.Sequential(CNXBlock(64), CNXBlock(64))
            self.norm = nn.LayerNorm(64, eps=1e-6)
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.s2(self.down(self.s1(self.stem(x))))
            return self.fc(self.norm(x.mean(dim=(2, 3))))

    if want("convnext_dyn"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = ConvNeXt()
        print(f"convnext_dyn: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, *img), ytr, epochs=3, lr=2e-3, opt="adamw")
        acc = accuracy(net, P["test"][0].reshape(-1, *img), P["test"][1])
        export(net, "convnext_dyn", torch.zeros(2, *img), dynamo=True, opset=18)
        save_split("convnext_dyn", "input", img)
        manifest.record("convnext_dyn", dict(
            family="ConvNeXt style (depthwise 7x7, channels-last LayerNorm + Linear MLP, GELU, layer scale)",
            exporter="dynamo", opset=18, bn="none", task="classifier", input="input",
            torch_test_accuracy=acc, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ b. EfficientNet style
    class SE(nn.Module):
        def __init__(self, c: int, r: int) -> None:
            super().__init__()
            self.reduce = nn.Conv2d(c, r, 1)
            self.expand = nn.Conv2d(r, c, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = F.adaptive_avg_pool2d(x, 1)
            return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))

    class MBConv(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int = 4) -> None:
            super().__init__()
            h = cin * t
            self.expand = nn.Sequential(nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.SiLU())
            self.dw = nn.Sequential(nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.SiLU())
            self.se = SE(h, max(4, cin // 4))
            self.project = nn.Sequential(nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout))
            self.res = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.project(self.se(self.dw(self.expand(x))))
            return x + y if self.res else y

    class EffNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.SiLU())
            cfg = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 40, 2), (40, 40, 1), (40, 48, 1)]
            self.blocks = nn.Sequential(*[MBConv(a, b, s) for a, b, s in cfg])
            self.head = nn.Sequential(nn.Conv2d(48, 160, 1, bias=False), nn.BatchNorm2d(160), nn.SiLU())
            self.fc = nn.Linear(160, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    if want("effnet_se_bn"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = EffNet()
        print(f"effnet_se_bn: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, *img), ytr, epochs=3, lr=0.05)
        acc = accuracy(net, P["test"][0].reshape(-1, *img), P["test"][1])
        export(net, "effnet_se_bn", torch.zeros(2, *img), dynamo=False, opset=13)
        save_split("effnet_se_bn", "input", img)
        manifest.record("effnet_se_bn", dict(
            family="EfficientNet style (MBConv, SiLU, squeeze-excitation gate, BN)", exporter="torchscript",
            opset=13, bn="as exported (eval, do_constant_folding=False)", task="classifier", input="input",
            torch_test_accuracy=acc, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ c. bottleneck ResNet
    class Bottleneck(nn.Module):
        def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, mid, 1, bias=False)
            self.b1 = nn.BatchNorm2d(mid)
            self.c2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False)
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

    class BottleNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.layers = nn.Sequential(
                Bottleneck(32, 16, 64, 1), Bottleneck(64, 16, 64, 1),
                Bottleneck(64, 32, 128, 2), Bottleneck(128, 32, 128, 1),
                Bottleneck(128, 64, 256, 2),
            )  # fmt: skip
            self.fc = nn.Linear(256, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.layers(self.stem(x)).mean(dim=(2, 3)))

    if want("bottleneck_opt"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = BottleNet()
        print(f"bottleneck_opt: {nparams(net)} params", flush=True)
        train(net, xtr.reshape(-1, *img), ytr, epochs=2, lr=0.1)
        acc = accuracy(net, P["test"][0].reshape(-1, *img), P["test"][1])
        export(net, "bottleneck_opt", torch.zeros(2, *img), dynamo=True, opset=18, optimize=True)
        save_split("bottleneck_opt", "input", img)
        manifest.record("bottleneck_opt", dict(
            family="Bottleneck ResNet (1x1-3x3-1x1, BN, stride-2 projection shortcuts)", exporter="dynamo",
            opset=18, optimize=True, bn="folded by the optimizer", task="classifier", input="input",
            torch_test_accuracy=acc, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ d. Conformer-ish CTC
    class FFN(nn.Module):
        def __init__(self, d: int) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.l1 = nn.Linear(d, 2 * d)
            self.l2 = nn.Linear(2 * d, d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.l2(F.silu(self.l1(self.norm(x))))

    class ConvModule(nn.Module):
        def __init__(self, d: int, k: int = 7) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(d)
            self.pw1 = nn.Conv1d(d, 2 * d, 1)
            self.dw = nn.Conv1d(d, d, k, padding=k // 2, groups=d)
            self.bn = nn.BatchNorm1d(d)
            self.pw2 = nn.Conv1d(d, d, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # [N, T, d]
            y = self.norm(x).transpose(1, 2)
            y = F.glu(self.pw1(y), dim=1)
            y = self.pw2(F.silu(self.bn(self.dw(y))))
            return y.transpose(1, 2)

    class ConformerBlock(nn.Module):
        def __init__(self, d: int, heads: int) -> None:
            super().__init__()
            self.ff1 = FFN(d)
            self.ln_att = nn.LayerNorm(d)
            self.att = nn.MultiheadAttention(d, heads, batch_first=True)
            self.conv = ConvModule(d)
            self.ff2 = FFN(d)
            self.ln = nn.LayerNorm(d)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x + 0.5 * self.ff1(x)
            h = self.ln_att(x)
            x = x + self.att(h, h, h, need_weights=False)[0]
            x = x + self.conv(x)
            x = x + 0.5 * self.ff2(x)
            return self.ln(x)

    class Conformer(nn.Module):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.front = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [N,16,7,42]
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1)),  # [N,32,3,42]
            )  # fmt: skip
            self.proj = nn.Linear(32 * 3, d)
            self.pos = nn.Parameter(torch.randn(1, SEQ_W // 2, d) * 0.02)
            self.blocks = nn.Sequential(ConformerBlock(d, 4), ConformerBlock(d, 4))
            self.head = nn.Linear(d, BLANK + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.front(x)
            n, c, h, w = f.shape
            seq = self.proj(f.permute(0, 3, 1, 2).reshape(n, w, c * h)) + self.pos
            return torch.log_softmax(self.head(self.blocks(seq)), -1)  # [N, 42, 11]

    def ctc_loss(lp: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        lens = (lab >= 0).sum(1)
        flat = lab[lab >= 0]
        T = lp.shape[1]
        return F.ctc_loss(lp.permute(1, 0, 2), flat, torch.full((len(lab),), T, dtype=torch.long), lens,
                          blank=BLANK, zero_infinity=True)  # fmt: skip

    # the same trained recogniser in two exports: opset 18, and opset 23 (where the dynamo exporter may
    # write the attention as ONNX's own Attention op)
    conformer_variants = (("conformer_ctc", 18), ("conformer_ctc_op23", 23))
    if any(want(n) for n, _ in conformer_variants):
        t0 = time.time()
        rng = np.random.default_rng(seed + 11)
        sx, sy = strings(P["train"], 12000, rng)
        torch.manual_seed(seed)
        net = Conformer()
        print(f"conformer: {nparams(net)} params", flush=True)
        train(net, sx, sy, epochs=6, lr=2e-3, bs=64, loss_fn=ctc_loss, opt="adamw")
        splits = {
            "calib": strings(P["calib"], 256, np.random.default_rng(seed + 1)),
            "select": strings(P["select"], 1000, np.random.default_rng(seed + 2)),
            "test": strings(P["test"], 2000, np.random.default_rng(seed + 3)),
        }
        with torch.no_grad():
            acc = char_accuracy(net(torch.from_numpy(splits["test"][0])).numpy(), splits["test"][1])
        for name, opset in conformer_variants:
            if not want(name):
                continue
            try:
                export(net, name, torch.zeros(2, 1, DIGIT, SEQ_W), dynamo=True, opset=opset, inp="image",
                       outname="logprobs")  # fmt: skip
            except Exception as exc:  # an exporter failure is recorded, not fatal
                print(f"{name}: export failed: {exc}", flush=True)
                continue
            for split, (x, t) in splits.items():
                arrays = {"image": x} if split == "calib" else {"image": x, "text": t}
                np.savez(out / f"{name}_{split}.npz", **arrays)  # type: ignore[arg-type]
            manifest.record(name, dict(
                family="Conformer-ish CTC (MHA, GLU + depthwise Conv1d + BatchNorm1d conv module, macaron FFN)",
                exporter="dynamo", opset=opset, bn="kept (BatchNorm1d in conv module)", task="ctc", input="image",
                torch_test_accuracy=acc, params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip
    return manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build)


if __name__ == "__main__":
    sys.exit(main())
