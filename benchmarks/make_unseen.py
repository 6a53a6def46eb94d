"""Build the "unseen architectures" audit set: small models of families nobody on the team developed
on, trained briefly on real data, exported with both of torch's ONNX exporters.

Runs in the torch virtual environment (never the project's: torch must not meet onnxruntime-training)::

    OMP_NUM_THREADS=1 ~/.cache/chita-onnx/torch-venv/bin/python benchmarks/make_unseen.py [--only a,b]

Everything goes to ``--out`` (default ``~/.cache/chita-onnx/unseen``): ``<model>.onnx`` and, per
model, ``<model>_calib.npz`` (256 labelled samples: what the pruning sees), ``<model>_select.npz``
(1,000 samples for choosing anything, never scored) and ``<model>_test.npz`` (the scores), plus
``manifest.json`` (exporter, opset, task, dense accuracy measured in torch). Seeded (``--seed``).

Data: ``shared/data/mnist.npz``. Disjoint image pools: ``x_train[:256]`` calibration,
``x_train[256:1256]`` selection, ``x_train[1256:]`` training, ``x_test[:5000]`` test (sequence
tasks: strings built from the digits of each pool only). Pixels are ``(x/255 - 0.1307)/0.3081``.

Models (name: family; exporter, opset; what it stresses):

* ``resnet20_bn``     CIFAR-style ResNet-20 (3×3 basic blocks 16/32/64, option-A shortcuts: strided
  slice + zero channel pad), BN kept as BatchNormalization; TorchScript exporter, opset 13.
* ``resnet20_folded`` the same weights with BN folded into the convolutions by the exporter's
  constant folding; TorchScript exporter, opset 16.
* ``resnet20_initinputs`` the same weights, BN kept, with ``keep_initializers_as_inputs=True`` (every
  initializer also a graph input, as IR 3 required); TorchScript exporter, opset 11.
* ``resnet20_functions`` the same weights, BN folded, with ``export_modules_as_functions={Basic}``
  (each residual block a model-local function that reads its convolution weights as parameters);
  TorchScript exporter, opset 17.
* ``mobilenetv2``     MobileNetV2-style (depthwise separable, inverted residuals with expansion 4,
  ReLU6 → Clip, BN kept: exported with ``optimize=False``, since the dynamo exporter's optimizer
  folds eval-mode BN into the convolutions); dynamo exporter, opset 18.
* ``transformer``     encoder classifier, rows of the image as 28 tokens (learned positions, 2 pre-norm
  layers, d=64, 4 heads, GELU, LayerNorm, mean pool); dynamo exporter, opset 18.
* ``transformer_ts``  the same weights, TorchScript exporter, opset 14 (LayerNorm decomposed).
* ``crnn_gru``        CRNN on strings of 3–5 MNIST digits (14×14 each, random gaps, [1, 14, 84]):
  conv+BN stages, a bidirectional GRU, a linear CTC head (class 10 = blank), ``logprobs [N, T, 11]``;
  TorchScript exporter, opset 15 (one GRU node). Test metric: greedy-decode character accuracy
  (1 − edit distance / length). Its ``.npz`` files keep the strings under ``text`` (padded with −1),
  except the calibration file, which holds the images only (compress's ``labels`` are per sample).
* ``crnn_lstm_dyn``   the same recogniser with a bidirectional LSTM, dynamo exporter, opset 18 (its
  optimizer folds the BN into the convolutions and writes the LSTM's W/R as Concats of Slices).
* ``tcn1d``           1-D conv net over the 28 rows as time steps (28 channels): Conv1d, a grouped
  conv (groups 4, dilation 2), a depthwise conv (dilation 4) with a residual add, strided conv, flatten
  + linear; TorchScript exporter, opset 15.
* ``unet_seg``        U-Net-style segmenter (two stride-2 Conv+BN stages, two ConvTranspose
  upsamplings with skip Concats, 1×1 logits) on noisy, blotted digits → foreground mask; TorchScript
  exporter, opset 17. Test metric: foreground IoU against the true mask (logit > 0); the ``.npz``
  files keep the masks under ``mask`` (not in the calibration file).
* ``stress_mlp``      a trained MLP written by hand with ``onnx.helper`` in odd but valid forms: a Gemm
  with ``transB=0``, a MatMul with the weight on the left (``(W·hᵀ)ᵀ``), one weight behind a
  ``Transpose`` node read by two MatMuls (tied layer), a Gemm with ``transA=1``; opset 13.
* ``stress_cast``     the same MLP whose weights are float16 initializers behind ``Cast(to=float)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

MEAN, STD = 0.1307, 0.3081
BLANK = 10
SEQ_W, DIGIT = 84, 14  # strings: up to 5 digits of 14x14 plus gaps in an 84-pixel-wide strip
OUT = Path.home() / ".cache" / "chita-onnx" / "unseen"
MNIST = Path("/work/shared/data/mnist.npz")


def pools(mnist: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    d = np.load(mnist)
    x = ((d["x_train"].astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)
    y = d["y_train"].astype(np.int64)
    xt = ((d["x_test"].astype(np.float32) / 255.0 - MEAN) / STD).astype(np.float32)
    yt = d["y_test"].astype(np.int64)
    return {
        "calib": (x[:256], y[:256]),
        "select": (x[256:1256], y[256:1256]),
        "train": (x[1256:], y[1256:]),
        "test": (xt[:5000], yt[:5000]),
    }


def strings(pool: tuple[np.ndarray, np.ndarray], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` strips ``[n, 1, 14, 84]`` of 3–5 pool digits (2× average-pooled to 14×14) with random
    gaps of 0–2 pixels; labels ``[n, 5]`` padded with −1."""
    x, y = pool
    small = x.reshape(-1, 14, 2, 14, 2).mean(axis=(2, 4))
    bg = np.float32((0.0 - MEAN) / STD)
    img = np.full((n, 1, DIGIT, SEQ_W), bg, dtype=np.float32)
    lab = np.full((n, 5), -1, dtype=np.int64)
    for i in range(n):
        k = int(rng.integers(3, 6))
        idx = rng.integers(0, len(x), size=k)
        gaps = rng.integers(0, 3, size=k)
        col = int(rng.integers(0, SEQ_W - k * DIGIT - int(gaps.sum()) + 1))
        for j in range(k):
            col += int(gaps[j])
            img[i, 0, :, col : col + DIGIT] = small[idx[j]]
            col += DIGIT
        lab[i, :k] = y[idx]
    return img, lab


def greedy_decode(logprobs: np.ndarray) -> list[list[int]]:
    """CTC greedy decoding of ``[N, T, C]``: best class per step, repeats merged, blanks dropped."""
    out = []
    for row in np.asarray(logprobs).argmax(-1):
        seq, prev = [], -1
        for c in row:
            if c != prev and c != BLANK:
                seq.append(int(c))
            prev = int(c)
        out.append(seq)
    return out


def edit_distance(a: list[int], b: list[int]) -> int:
    d = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, d[0] = d[0], i
        for j, cb in enumerate(b, 1):
            prev, d[j] = d[j], min(d[j] + 1, d[j - 1] + 1, prev + (ca != cb))
    return d[len(b)]


def char_accuracy(logprobs: np.ndarray, text: np.ndarray) -> float:
    """1 − (total edit distance) / (total label length) over the samples, decoded greedily."""
    dec = greedy_decode(logprobs)
    truth = [[int(c) for c in row if c >= 0] for row in text]
    return 1.0 - sum(edit_distance(d, t) for d, t in zip(dec, truth, strict=True)) / sum(len(t) for t in truth)


# --------------------------------------------------------------------------------------------- torch


class Manifest:
    """An audit set's ``manifest.json``: the entries already there, and :meth:`record`, which adds one
    and rewrites the file (so an interrupted build keeps what it made)."""

    def __init__(self, out: Path) -> None:
        self.path = out / "manifest.json"
        self.entries: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def record(self, name: str, info: dict[str, Any]) -> None:
        self.entries[name] = info
        self.path.write_text(json.dumps(self.entries, indent=2))
        print(f"{name}: {info}", flush=True)


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
        X, Y = torch.from_numpy(x), torch.from_numpy(y)
        steps = epochs * (len(X) // bs)
        o: torch.optim.Optimizer
        if opt == "sgd":
            o = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
        else:
            o = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=steps)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(X))
            for i in range(len(X) // bs):
                idx = perm[i * bs : (i + 1) * bs]
                out_ = model(X[idx])
                loss = loss_fn(out_, Y[idx]) if loss_fn else F.cross_entropy(out_, Y[idx])
                o.zero_grad()
                loss.backward()
                o.step()
                sched.step()
        model.eval()

    def accuracy(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
        with torch.no_grad():
            return float((model(torch.from_numpy(x)).argmax(-1).numpy() == y).mean())

    def save_split(name: str, key: str, shape: tuple[int, ...]) -> None:
        for split in ("calib", "select", "test"):
            x, y = P[split]
            np.savez(out / f"{name}_{split}.npz", **{key: x.reshape(len(x), *shape)}, labels=y)

    def export(model: nn.Module, name: str, x: Any, dynamo: bool, opset: int, inp: str = "input",
               outname: str = "logits", fold: bool = True, optimize: bool = True,
               extra: dict[str, Any] | None = None) -> None:  # fmt: skip
        path = out / f"{name}.onnx"
        kw: dict[str, Any] = {"input_names": [inp], "output_names": [outname], "opset_version": opset}
        kw.update(extra or {})
        if dynamo:
            kw["dynamic_shapes"] = ({0: torch.export.Dim("N", min=1, max=4096)},)
            kw["external_data"] = False
            kw["optimize"] = optimize  # the exporter's optimizer folds eval-mode BN into the Conv
        else:
            kw["dynamic_axes"] = {inp: {0: "N"}, outname: {0: "N"}}
            kw["do_constant_folding"] = fold
            if not fold:  # PRESERVE (the model is in eval mode) skips the exporter's Conv+BN fusion
                kw["training"] = torch.onnx.TrainingMode.PRESERVE
        torch.onnx.export(model, (x,), str(path), dynamo=dynamo, **kw)

    def record(name: str, **info: Any) -> None:
        manifest.record(name, info)

    xtr, ytr = P["train"]
    img = (1, 28, 28)

    # ---------------------------------------------------------------- 1. ResNet-20 (CIFAR style)
    class Basic(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.b1 = nn.BatchNorm2d(cout)
            self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b2 = nn.BatchNorm2d(cout)
            self.pad = cout - cin
            self.stride = stride

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
            s = x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x
            if self.pad:  # option A: zero channels, no projection weights
                s = F.pad(s, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(y + s)

    class ResNet20(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 16, 3, 1, 1, bias=False)
            self.bn = nn.BatchNorm2d(16)
            layers: list[nn.Module] = []
            cin = 16
            for cout, stride in ((16, 1), (32, 2), (64, 2)):
                for i in range(3):
                    layers.append(Basic(cin, cout, stride if i == 0 else 1))
                    cin = cout
            self.layers = nn.Sequential(*layers)
            self.fc = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.layers(F.relu(self.bn(self.conv(x))))
            return self.fc(x.mean(dim=(2, 3)))

    # the same trained network in four exports: BN kept / folded, and two legacy forms of the
    # TorchScript exporter (initializers listed as graph inputs; residual blocks as local functions)
    variants: tuple[tuple[str, bool, int, dict[str, Any]], ...] = (
        ("resnet20_bn", False, 13, {}),
        ("resnet20_folded", True, 16, {}),
        ("resnet20_initinputs", False, 11, {"keep_initializers_as_inputs": True}),
        ("resnet20_functions", True, 17, {"export_modules_as_functions": {Basic}}),
    )
    if any(want(v[0]) for v in variants):
        t0 = time.time()
        torch.manual_seed(seed)
        net = ResNet20()
        train(net, xtr.reshape(-1, *img), ytr, epochs=3, lr=0.1)
        acc = accuracy(net, P["test"][0].reshape(-1, *img), P["test"][1])
        x0 = torch.zeros(2, *img)
        for name, fold, opset, extra in variants:
            if not want(name):
                continue
            export(net, name, x0, dynamo=False, opset=opset, fold=fold, extra=extra)
            save_split(name, "input", img)
            record(name, family="ResNet-20 (CIFAR style, option-A shortcuts)", exporter="torchscript",
                   opset=opset, bn="kept" if not fold else "folded", task="classifier", input="input",
                   torch_test_accuracy=acc, train_s=round(time.time() - t0, 1),
                   **{k: sorted(c.__name__ for c in v) if isinstance(v, set) else v
                      for k, v in extra.items()})  # fmt: skip

    # ---------------------------------------------------------------- 2. MobileNetV2 style
    class InvRes(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, t: int = 4) -> None:
            super().__init__()
            h = cin * t
            self.body = nn.Sequential(
                nn.Conv2d(cin, h, 1, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                nn.Conv2d(h, h, 3, stride, 1, groups=h, bias=False), nn.BatchNorm2d(h), nn.ReLU6(),
                nn.Conv2d(h, cout, 1, bias=False), nn.BatchNorm2d(cout),
            )  # fmt: skip
            self.res = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.body(x)
            return x + y if self.res else y

    class MobileNetV2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
            cfg = [(16, 16, 1), (16, 24, 2), (24, 24, 1), (24, 32, 2), (32, 32, 1), (32, 48, 1)]
            self.blocks = nn.Sequential(*[InvRes(a, b, s) for a, b, s in cfg])
            self.head = nn.Sequential(nn.Conv2d(48, 128, 1, bias=False), nn.BatchNorm2d(128), nn.ReLU6())
            self.fc = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.head(self.blocks(self.stem(x)))
            return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    if want("mobilenetv2"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = MobileNetV2()
        train(net, xtr.reshape(-1, *img), ytr, epochs=3, lr=0.05)
        acc = accuracy(net, P["test"][0].reshape(-1, *img), P["test"][1])
        export(net, "mobilenetv2", torch.zeros(2, *img), dynamo=True, opset=18, optimize=False)
        save_split("mobilenetv2", "input", img)
        record("mobilenetv2", family="MobileNetV2 style (depthwise, inverted residuals, ReLU6)", exporter="dynamo",
               opset=18, bn="kept", task="classifier", input="input", torch_test_accuracy=acc,
               train_s=round(time.time() - t0, 1))  # fmt: skip

    # ---------------------------------------------------------------- 3. Transformer encoder
    class ViTRows(nn.Module):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.embed = nn.Linear(28, d)
            self.pos = nn.Parameter(torch.randn(1, 28, d) * 0.02)
            layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, activation="gelu", batch_first=True,
                                               norm_first=True)  # fmt: skip
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.enc(self.embed(x) + self.pos)
            return self.fc(self.norm(h).mean(1))

    if want("transformer") or want("transformer_ts"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = ViTRows()
        train(net, xtr, ytr, epochs=10, lr=2e-3, opt="adamw")
        acc = accuracy(net, P["test"][0], P["test"][1])
        for name, dyn, opset in (("transformer", True, 18), ("transformer_ts", False, 14)):
            try:
                export(net, name, torch.zeros(2, 28, 28), dynamo=dyn, opset=opset)
            except Exception as exc:  # an exporter failure is recorded, not fatal
                print(f"{name}: export failed: {exc}", flush=True)
                continue
            save_split(name, "input", (28, 28))
            record(name, family="Transformer encoder (rows as tokens, MHA, LayerNorm, GELU)",
                   exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none", task="classifier",
                   input="input", torch_test_accuracy=acc, train_s=round(time.time() - t0, 1))  # fmt: skip

    # ---------------------------------------------------------------- 4. CRNN + CTC
    class CRNN(nn.Module):
        def __init__(self, cell: str) -> None:
            super().__init__()
            self.cnn = nn.Sequential(
                nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d((2, 1)),
            )  # fmt: skip  # [N, 64, 3, 42]
            self.proj = nn.Linear(64 * 3, 96)
            rnn = nn.GRU if cell == "gru" else nn.LSTM
            self.rnn = rnn(96, 64, bidirectional=True, batch_first=True)
            self.head = nn.Linear(128, BLANK + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.cnn(x)
            n, c, h, w = f.shape
            seq = F.relu(self.proj(f.permute(0, 3, 1, 2).reshape(n, w, c * h)))  # [N, T, 192] -> [N, T, 96]
            y, _ = self.rnn(seq)
            return torch.log_softmax(self.head(y), -1)  # [N, T, 11]

    def ctc_loss(lp: torch.Tensor, lab: torch.Tensor) -> torch.Tensor:
        lens = (lab >= 0).sum(1)
        flat = lab[lab >= 0]
        T = lp.shape[1]
        return F.ctc_loss(lp.permute(1, 0, 2), flat, torch.full((len(lab),), T, dtype=torch.long), lens,
                          blank=BLANK, zero_infinity=True)  # fmt: skip

    for name, cell, dyn, opset in (("crnn_gru", "gru", False, 15), ("crnn_lstm_dyn", "lstm", True, 18)):
        if not want(name):
            continue
        t0 = time.time()
        rng = np.random.default_rng(seed + 11)
        sx, sy = strings(P["train"], 12000, rng)
        torch.manual_seed(seed)
        net = CRNN(cell)
        train(net, sx, sy, epochs=4, lr=3e-3, bs=64, loss_fn=ctc_loss, opt="adamw")
        splits = {
            "calib": strings(P["calib"], 256, np.random.default_rng(seed + 1)),
            "select": strings(P["select"], 1000, np.random.default_rng(seed + 2)),
            "test": strings(P["test"], 2000, np.random.default_rng(seed + 3)),
        }
        with torch.no_grad():
            acc = char_accuracy(net(torch.from_numpy(splits["test"][0])).numpy(), splits["test"][1])
        try:
            export(net, name, torch.zeros(2, 1, DIGIT, SEQ_W), dynamo=dyn, opset=opset, inp="image",
                   outname="logprobs")  # fmt: skip
        except Exception as exc:
            print(f"{name}: export failed: {exc}", flush=True)
            continue
        for split, (x, t) in splits.items():
            arrays = {"image": x} if split == "calib" else {"image": x, "text": t}
            np.savez(out / f"{name}_{split}.npz", **arrays)  # type: ignore[arg-type]
        record(name, family=f"CRNN (conv+BN, bidirectional {cell.upper()}, CTC)",
               exporter="dynamo" if dyn else "torchscript", opset=opset, task="ctc", input="image",
               bn="folded by the exporter" if dyn else "kept",
               torch_test_accuracy=acc, train_s=round(time.time() - t0, 1))  # fmt: skip

    # ---------------------------------------------------------------- 5. 1-D conv net
    class TCN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(28, 64, 3, padding=1)
            self.c2 = nn.Conv1d(64, 64, 3, padding=2, dilation=2, groups=4)
            self.c3 = nn.Conv1d(64, 64, 5, padding=8, dilation=4, groups=64)
            self.c4 = nn.Conv1d(64, 64, 1)
            self.c5 = nn.Conv1d(64, 96, 3, stride=2, padding=1)
            self.fc = nn.Linear(96 * 14, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [N, 28 time steps, 28 features]
            h = F.relu(self.c1(x.transpose(1, 2)))
            h = h + self.c4(F.relu(self.c3(F.relu(self.c2(h)))))
            h = F.relu(self.c5(F.relu(h)))
            return self.fc(torch.flatten(h, 1))

    if want("tcn1d"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = TCN()
        train(net, xtr, ytr, epochs=8, lr=0.05)
        acc = accuracy(net, P["test"][0], P["test"][1])
        export(net, "tcn1d", torch.zeros(2, 28, 28), dynamo=False, opset=15)
        save_split("tcn1d", "input", (28, 28))
        record("tcn1d", family="1-D conv net (grouped, depthwise, dilated, residual)", exporter="torchscript",
               opset=15, bn="none", task="classifier", input="input", torch_test_accuracy=acc,
               train_s=round(time.time() - t0, 1))  # fmt: skip

    # ---------------------------------------------------------------- 7. U-Net-style segmenter
    class UNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1 = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.e2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.e3 = nn.Sequential(nn.Conv2d(32, 64, 3, 2, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU())
            self.u2 = nn.ConvTranspose2d(64, 32, 2, 2)
            self.d2 = nn.Sequential(nn.Conv2d(64, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.u1 = nn.ConvTranspose2d(32, 16, 2, 2)
            self.d1 = nn.Sequential(nn.Conv2d(32, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.out = nn.Conv2d(16, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.e1(x)
            b = self.e2(a)
            c = self.e3(b)
            d = self.d2(torch.cat([self.u2(c), b], 1))
            return self.out(self.d1(torch.cat([self.u1(d), a], 1)))

    if want("unet_seg"):
        t0 = time.time()
        noise = np.random.default_rng(seed + 7)
        bg = np.float32((0.0 - MEAN) / STD)

        def noisy(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            """Digits with Gaussian noise and random 4x4 blots (input) and their foreground mask."""
            mask = (x > 0.0).astype(np.float32)  # pixels above ~0.13 of full intensity
            y = x + noise.normal(0, 0.8, x.shape).astype(np.float32)
            for i in range(len(y)):
                r, c = noise.integers(0, 24, size=2)
                y[i, r : r + 4, c : c + 4] = bg + 2.5
            return y[:, None].astype(np.float32), mask[:, None]

        torch.manual_seed(seed)
        net = UNet()
        xs, ms = noisy(xtr)
        train(net, xs, ms, epochs=3, lr=0.05, loss_fn=lambda o, t: F.binary_cross_entropy_with_logits(o, t))
        splits = {k: noisy(P[k][0]) for k in ("calib", "select", "test")}
        with torch.no_grad():
            pred = net(torch.from_numpy(splits["test"][0])).numpy() > 0
        truth = splits["test"][1] > 0.5
        acc = float((pred & truth).sum() / (pred | truth).sum())
        export(net, "unet_seg", torch.zeros(2, 1, 28, 28), dynamo=False, opset=17)
        for split, (x, m) in splits.items():
            np.savez(out / f"unet_seg_{split}.npz", **({"input": x} if split == "calib" else {"input": x, "mask": m}))
        record("unet_seg", family="U-Net-style segmenter (ConvTranspose upsampling, skip Concats, BN folded)",
               exporter="torchscript", opset=17, bn="folded by the exporter", task="segment", input="input",
               torch_test_accuracy=acc, train_s=round(time.time() - t0, 1))  # fmt: skip

    # ---------------------------------------------------------------- 6. graph-side stress MLP
    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(784, 128)
            self.b = nn.Linear(128, 64)
            self.s = nn.Linear(64, 64)  # applied twice (tied)
            self.c = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = F.relu(self.b(F.relu(self.a(x.flatten(1)))))
            h = F.relu(self.s(h))
            h = F.relu(self.s(h))
            return self.c(h)

    if want("stress_mlp") or want("stress_cast"):
        t0 = time.time()
        torch.manual_seed(seed)
        net = MLP()
        train(net, xtr.reshape(-1, 784), ytr, epochs=12, lr=0.05)
        acc = accuracy(net, P["test"][0].reshape(-1, 784), P["test"][1])
        w = {k: v.detach().numpy().astype(np.float32) for k, v in net.state_dict().items()}
        for name, half in (("stress_mlp", False), ("stress_cast", True)):
            if want(name):
                write_stress(out / f"{name}.onnx", w, half)
                save_split(name, "input", (784,))
                record(name, family="MLP in odd graph forms (Gemm transB=0/transA=1, weight-left MatMul, "
                       "tied weight behind Transpose" + (", fp16 weights behind Cast)" if half else ")"),
                       exporter="onnx.helper", opset=13, bn="none", task="classifier", input="input",
                       torch_test_accuracy=acc, train_s=round(time.time() - t0, 1))  # fmt: skip
    return manifest.entries


def write_stress(path: Path, w: dict[str, np.ndarray], half: bool) -> None:
    """The trained MLP as an ONNX graph in forms the torch exporters rarely write (see module doc)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, arr: np.ndarray) -> str:
        """An initializer (float16 behind a Cast to float when ``half``); returns the float tensor's name."""
        if not half:
            inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
            return name
        inits.append(numpy_helper.from_array(arr.astype(np.float16), name + "_fp16"))
        nodes.append(helper.make_node("Cast", [name + "_fp16"], [name], to=TensorProto.FLOAT, name=f"cast_{name}"))
        return name

    def const(name: str, arr: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(arr.astype(np.float32), name))
        return name

    # layer a: Gemm with transB=0, weight stored [K, N]
    a_in = ["input", weight("a_weight_kn", w["a.weight"].T), const("a_bias", w["a.bias"])]
    nodes.append(helper.make_node("Gemm", a_in, ["a_out"], transB=0, name="gemm_a"))
    nodes.append(helper.make_node("Relu", ["a_out"], ["a_act"], name="relu_a"))
    # layer b: weight on the left of a MatMul, (W_b · hᵀ)ᵀ
    nodes.append(helper.make_node("Transpose", ["a_act"], ["a_t"], perm=[1, 0], name="t_in_b"))
    nodes.append(helper.make_node("MatMul", [weight("b_weight", w["b.weight"]), "a_t"], ["b_t"], name="matmul_b"))
    nodes.append(helper.make_node("Transpose", ["b_t"], ["b_mm"], perm=[1, 0], name="t_out_b"))
    nodes.append(helper.make_node("Add", ["b_mm", const("b_bias", w["b.bias"])], ["b_out"], name="add_b"))
    nodes.append(helper.make_node("Relu", ["b_out"], ["b_act"], name="relu_b"))
    # tied layer s: one [out, in] weight behind a Transpose, read by two MatMuls
    nodes.append(helper.make_node("Transpose", [weight("s_weight", w["s.weight"])], ["s_weight_t"], perm=[1, 0],
                                  name="t_s"))  # fmt: skip
    prev = "b_act"
    for i in (1, 2):
        nodes.append(helper.make_node("MatMul", [prev, "s_weight_t"], [f"s{i}_mm"], name=f"matmul_s{i}"))
        nodes.append(helper.make_node("Add", [f"s{i}_mm", "s_bias" if i == 2 else const("s_bias", w["s.bias"])],
                                      [f"s{i}_out"], name=f"add_s{i}"))  # fmt: skip
        nodes.append(helper.make_node("Relu", [f"s{i}_out"], [f"s{i}_act"], name=f"relu_s{i}"))
        prev = f"s{i}_act"
    # head c: Gemm with transA=1 on the transposed activations
    nodes.append(helper.make_node("Transpose", [prev], ["c_in_t"], perm=[1, 0], name="t_in_c"))
    nodes.append(helper.make_node("Gemm", ["c_in_t", weight("c_weight", w["c.weight"]), const("c_bias", w["c.bias"])],
                                  ["logits"], transA=1, transB=1, name="gemm_c"))  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "stress_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="make_unseen")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def builder_args(doc: str | None, out: Path, n_train: int | None = None) -> tuple[argparse.Namespace, set[str] | None]:
    """The command line every audit-set builder takes (``--out --mnist --only --seed``, and
    ``--n-train`` when given a default); returns the arguments (``--out`` created) and the ``--only``
    names (None: all)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--mnist", type=Path, default=MNIST)
    ap.add_argument("--only", default="", help="comma-separated model names (default: all)")
    ap.add_argument("--seed", type=int, default=0)
    if n_train is not None:
        ap.add_argument("--n-train", type=int, default=n_train, help="training images used (from the training pool)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args, {s for s in args.only.split(",") if s} or None


def builder_main(doc: str | None, out: Path, build: Callable[..., Any], n_train: int | None = None) -> int:
    """The whole run of an audit-set builder: its command line (:func:`builder_args`), then
    ``build(only, out, seed, mnist[, n_train])``, timed."""
    args, only = builder_args(doc, out, n_train)
    t0 = time.time()
    extra = () if n_train is None else (args.n_train,)
    build(only, args.out, args.seed, args.mnist, *extra)
    print(f"done in {time.time() - t0:.0f}s -> {args.out}")
    return 0


def main() -> int:
    return builder_main(__doc__, OUT, build)


if __name__ == "__main__":
    sys.exit(main())
