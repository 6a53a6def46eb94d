"""Build an eleventh torch audit set: deployment-shaped exports none of the earlier sets has, trained
briefly (seeded) on MNIST and exported to ONNX by torch.  Same pools, split files and manifest format
as ``benchmarks/make_unseen.py``, so that ``benchmarks/bench_unseen.py --dir OUT`` audits it; training
loop and export from ``unseen_torch.py``.

Runs in a torch virtual environment (never the project's)::

    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch11.py \
        [--out ~/.cache/chita-onnx/unseen-torch11] [--only argmax_cnn_ts,...] [--n-train 12000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch11 --sparsities 0.3,0.5

(torch 2.13.0+cpu was used.)

Models:

* ``argmax_cnn_ts`` / ``argmax_cnn_dyn``  a residual CNN with BatchNorm whose forward ends in
  ``argmax(-1)``: the file's only output is the int64 label ``[N]`` (no scores).  TorchScript opset 17
  (BN kept) and dynamo opset 18.  Scored as a label output (the manifest's classes are the indices).
* ``argmax_seg_ts`` / ``argmax_seg_dyn``  a small encoder-decoder segmenter (strided convs,
  ``ConvTranspose2d`` upsampling, a skip ``Concat``) on noisy, blotted digits whose forward ends in
  ``argmax(1)`` over its two class maps: the only output is the int64 label map ``[N, 28, 28]``.
* ``u8_nhwc_ts`` / ``u8_nhwc_dyn``  the camera-pipeline input: ``uint8`` images ``[N, 28, 28, 1]``
  (channels last), cast, scaled and normalised in the graph, then permuted to channels first;
  depthwise-separable blocks with BN and ReLU6, pool, Linear.
* ``kvstep_dyn`` / ``kvstep_ts``  one decoding step of a causal transformer with a key/value cache,
  as LLM and ASR decoders are deployed: inputs ``rows [N, 8, 28]`` (the image's last 8 rows) and the
  cache of the first 20 rows, ``past_k{0,1}`` / ``past_v{0,1}`` ``[N, 4, 20, 16]`` (two layers);
  outputs ``logits [N, 10]`` (the last position's), then ``present_k{0,1}`` / ``present_v{0,1}``
  ``[N, 4, 28, 16]``.  Trained on whole images; each split's cache is computed by the trained
  model's prefix, as a deployment's previous steps would.
* ``trainmode_dyn``  a conv classifier with Dropout exported by dynamo while left in training mode
  (``model.eval()`` forgotten): the file's Dropout has a stored ``training_mode`` of true.  Every
  method must refuse it in one line.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import builder_main  # numpy only at import

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch11"


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    audit = shared.mnist_audit(out, seed, mnist, n_train, only)
    want, P = audit.want, audit.pools
    images = shared.as_images

    def export_splits(name: str, splits: dict[str, dict[str, Any]]) -> None:
        for split, arrays in splits.items():
            np.savez(out / f"{name}_{split}.npz", **arrays)

    # ------------------------------------------------------------------ 1. classifier with a label output
    class Block(nn.Module):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
            self.b = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.relu(x + self.b(self.a(x)))

    class ResCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
            self.b1 = Block(16)
            self.down = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
            self.b2 = Block(32)
            self.head = nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.b2(self.down(self.b1(self.stem(x)))).mean((2, 3)))

    class Labels(nn.Module):
        """Inference only: the trained network's label, ``argmax`` over ``dim``."""

        def __init__(self, core: nn.Module, dim: int) -> None:
            super().__init__()
            self.core, self.dim = core, dim

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.core(x).argmax(self.dim)

    if want("argmax_cnn_ts", "argmax_cnn_dyn"):
        torch.manual_seed(seed)
        t0, net = time.time(), ResCNN()
        print(f"argmax_cnn: {shared.nparams(net)} params", flush=True)
        shared.train(net, images(audit.xtr)[0], audit.ytr, epochs=3, lr=3e-3, seed=seed)
        splits = {k: images(P[k][0])[0] for k in ("calib", "select", "test")}
        labels = Labels(net, -1).eval()
        acc = float((shared.predict(labels, splits["test"]) == P["test"][1]).mean())
        print(f"  torch test accuracy {acc:.4f}", flush=True)
        for name, dyn, opset in (("argmax_cnn_ts", False, 17), ("argmax_cnn_dyn", True, 18)):
            if not want(name):
                continue
            shared.export(labels, name, (torch.from_numpy(splits["test"][:2]),), dyn, opset, ["input"], ["label"],
                          out=out)  # fmt: skip
            export_splits(name, {k: {"input": v, "labels": P[k][1]} for k, v in splits.items()})
            audit.manifest.record(name, dict(
                family="residual CNN with BN, argmax label output only", exporter="dynamo" if dyn else "torchscript",
                opset=opset, bn="kept" if not dyn else "exporter's choice", task="classifier", input="input",
                classes=list(range(10)), torch_test_accuracy=acc, params=shared.nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 2. segmenter with a label-map output
    class Seg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.e1 = nn.Sequential(nn.Conv2d(1, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.e2 = nn.Sequential(nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
            self.e3 = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1), nn.BatchNorm2d(32), nn.ReLU())
            self.up = nn.ConvTranspose2d(32, 16, 2, 2)
            self.d1 = nn.Sequential(nn.Conv2d(32, 16, 3, 1, 1), nn.ReLU())
            self.out = nn.Conv2d(16, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a = self.e1(x)
            return self.out(self.d1(torch.cat([self.up(self.e3(self.e2(a))), a], 1)))

    if want("argmax_seg_ts", "argmax_seg_dyn"):
        torch.manual_seed(seed)
        t0, net, rng = time.time(), Seg(), np.random.default_rng(seed + 11)
        xs, ms = shared.blotted(audit.xtr, rng)
        print(f"argmax_seg: {shared.nparams(net)} params", flush=True)
        shared.train(net, xs, ms[:, 0].astype(np.int64), epochs=3, lr=3e-3, seed=seed)
        splits = {k: shared.blotted(P[k][0], rng) for k in ("calib", "select", "test")}
        labels = Labels(net, 1).eval()
        pred = shared.predict(labels, splits["test"][0]) > 0
        truth = splits["test"][1][:, 0] > 0.5
        iou = float((pred & truth).sum() / (pred | truth).sum())
        print(f"  torch foreground IoU {iou:.4f}", flush=True)
        for name, dyn, opset in (("argmax_seg_ts", False, 17), ("argmax_seg_dyn", True, 18)):
            if not want(name):
                continue
            shared.export(labels, name, (torch.from_numpy(splits["test"][0][:2]),), dyn, opset, ["input"], ["mask"],
                          out=out)  # fmt: skip
            export_splits(name, {
                k: ({"input": x} if k == "calib" else {"input": x, "mask": m[:, 0]}) for k, (x, m) in splits.items()
            })  # fmt: skip
            audit.manifest.record(name, dict(
                family="encoder-decoder segmenter (ConvTranspose, skip Concat), argmax label map output only",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="kept", task="segment", input="input",
                threshold=0.5, torch_test_accuracy=iou, params=shared.nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 3. uint8 channels-last camera input
    class DWBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.dw = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin),
                                    nn.ReLU6())  # fmt: skip
            self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU6())

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.pw(self.dw(x))

    class U8Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
            self.blocks = nn.Sequential(DWBlock(16, 32, 1), DWBlock(32, 64, 2), DWBlock(64, 64, 1))
            self.head = nn.Linear(64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # uint8 [N, 28, 28, 1]
            z = (x.float() / 255.0 - 0.1307) / 0.3081
            return self.head(self.blocks(self.stem(z.permute(0, 3, 1, 2))).mean((2, 3)))

    def as_u8(x: Any) -> tuple[Any]:
        """Normalised flat images back to the camera's uint8 pixels, channels last ``(n, 28, 28, 1)``."""
        pix = np.clip(np.rint((x.reshape(-1, 28, 28, 1) * 0.3081 + 0.1307) * 255.0), 0, 255)
        return (pix.astype(np.uint8),)

    if want("u8_nhwc_ts", "u8_nhwc_dyn"):
        torch.manual_seed(seed)

        class Trainable(nn.Module):  # uint8 has no gradient: train on the float pixels, same arithmetic
            def __init__(self, core: U8Net) -> None:
                super().__init__()
                self.core = core

            def forward(self, x: torch.Tensor) -> torch.Tensor:
                z = (x / 255.0 - 0.1307) / 0.3081
                c = self.core
                return c.head(c.blocks(c.stem(z.permute(0, 3, 1, 2))).mean((2, 3)))

        core = U8Net()
        xs = as_u8(audit.xtr)[0].astype(np.float32)
        print(f"u8_nhwc: {shared.nparams(core)} params", flush=True)
        t0 = time.time()
        shared.train(Trainable(core), xs, audit.ytr, epochs=3, lr=3e-3, seed=seed)
        core.eval()
        splits = {k: as_u8(P[k][0])[0] for k in ("calib", "select", "test")}
        acc = float((shared.predict(core, splits["test"]).argmax(-1) == P["test"][1]).mean())
        print(f"  torch test accuracy {acc:.4f}", flush=True)
        for name, dyn, opset in (("u8_nhwc_ts", False, 17), ("u8_nhwc_dyn", True, 18)):
            if not want(name):
                continue
            shared.export(core, name, (torch.from_numpy(splits["test"][:2]),), dyn, opset, ["image"], ["logits"],
                          out=out)  # fmt: skip
            export_splits(name, {k: {"image": v, "labels": P[k][1]} for k, v in splits.items()})
            audit.manifest.record(name, dict(
                family="uint8 NHWC camera input, in-graph normalisation, depthwise-separable CNN",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="kept", task="classifier",
                input="image", torch_test_accuracy=acc, params=shared.nparams(core),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 4. decoder step with a KV cache
    H, DH, PRE = 4, 16, 20

    class Layer(nn.Module):
        def __init__(self, d: int = H * DH) -> None:
            super().__init__()
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)
            self.ff = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

        def forward(self, x: torch.Tensor, pk: torch.Tensor | None, pv: torch.Tensor | None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
            n, t, d = x.shape
            q, k, v = (z.reshape(n, t, H, DH).transpose(1, 2) for z in self.qkv(self.ln1(x)).split(d, -1))
            if pk is not None and pv is not None:
                k, v = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
            past = k.shape[2] - t  # causal over the cache and the new positions
            mask = torch.ones(t, k.shape[2], dtype=torch.bool).tril(past)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            x = x + self.o(a.transpose(1, 2).reshape(n, t, d))
            return x + self.ff(self.ln2(x)), k, v

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(28, H * DH)
            self.pos = nn.Parameter(torch.randn(28, H * DH) * 0.02)
            self.layers = nn.ModuleList([Layer(), Layer()])
            self.norm, self.head = nn.LayerNorm(H * DH), nn.Linear(H * DH, 10)

        def run(self, rows: torch.Tensor, start: int, cache: list[torch.Tensor] | None
                ) -> tuple[torch.Tensor, list[torch.Tensor]]:  # fmt: skip
            x = self.embed(rows) + self.pos[start : start + rows.shape[1]]
            new: list[torch.Tensor] = []
            for i, layer in enumerate(self.layers):
                x, k, v = layer(x, *(cache[2 * i : 2 * i + 2] if cache else (None, None)))
                new += [k, v]
            return self.head(self.norm(x[:, -1])), new

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # training: whole images [N, 28, 28]
            return self.run(x, 0, None)[0]

    class Step(nn.Module):
        """The exported step: the last 8 rows and the cache of the first 20."""

        def __init__(self, core: Decoder) -> None:
            super().__init__()
            self.core = core

        def forward(self, rows: torch.Tensor, pk0: torch.Tensor, pv0: torch.Tensor, pk1: torch.Tensor,
                    pv1: torch.Tensor) -> tuple[torch.Tensor, ...]:  # fmt: skip
            logits, new = self.core.run(rows, PRE, [pk0, pv0, pk1, pv1])
            return (logits, *new)

    if want("kvstep_dyn", "kvstep_ts"):
        torch.manual_seed(seed)
        t0, core = time.time(), Decoder()
        print(f"kvstep: {shared.nparams(core)} params", flush=True)
        shared.train(core, shared.as_rows(audit.xtr)[0], audit.ytr, epochs=3, lr=2e-3, seed=seed)
        names = ["rows", "past_k0", "past_v0", "past_k1", "past_v1"]

        def step_inputs(x: Any) -> dict[str, Any]:
            r = torch.from_numpy(shared.as_rows(x)[0])
            with torch.no_grad():
                _, cache = core.run(r[:, :PRE], 0, None)
            return dict(zip(names, [r[:, PRE:].numpy(), *(c.numpy() for c in cache)], strict=True))

        splits = {k: step_inputs(P[k][0]) for k in ("calib", "select", "test")}
        step = Step(core).eval()
        with torch.no_grad():
            y = step(*[torch.from_numpy(splits["test"][k]) for k in names])[0].numpy()
        acc = float((y.argmax(-1) == P["test"][1]).mean())
        print(f"  torch test accuracy {acc:.4f}", flush=True)
        outs = ["logits", "present_k0", "present_v0", "present_k1", "present_v1"]
        args = tuple(torch.from_numpy(splits["test"][k][:2]) for k in names)
        for name, dyn, opset in (("kvstep_dyn", True, 18), ("kvstep_ts", False, 17)):
            if not want(name):
                continue
            shared.export(step, name, args, dyn, opset, names, outs, out=out)
            export_splits(name, {k: {**v, "labels": P[k][1]} for k, v in splits.items()})
            audit.manifest.record(name, dict(
                family="causal transformer decoding step with a key/value cache (5 inputs, 5 outputs)",
                exporter="dynamo" if dyn else "torchscript", opset=opset, bn="none", task="classifier",
                input="rows", inputs=names, torch_test_accuracy=acc, params=shared.nparams(core),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    # ------------------------------------------------------------------ 5. exported in training mode
    class DropNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.ReLU())
            self.drop, self.head = nn.Dropout(0.3), nn.Linear(32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.drop(self.c1(x).mean((2, 3))))

    if want("trainmode_dyn"):
        torch.manual_seed(seed)
        t0, net = time.time(), DropNet()
        shared.train(net, images(audit.xtr)[0], audit.ytr, epochs=2, lr=3e-3, seed=seed)
        splits = {k: images(P[k][0])[0] for k in ("calib", "select", "test")}
        acc = float((shared.predict(net, splits["test"]).argmax(-1) == P["test"][1]).mean())
        net.train()  # the mistake: exported without model.eval()
        shared.export(net, "trainmode_dyn", (torch.from_numpy(splits["test"][:2]),), True, 18, ["input"], ["logits"],
                      out=out)  # fmt: skip
        export_splits("trainmode_dyn", {k: {"input": v, "labels": P[k][1]} for k, v in splits.items()})
        audit.manifest.record("trainmode_dyn", dict(
            family="conv classifier with Dropout, exported in training mode", exporter="dynamo", opset=18, bn="none",
            task="classifier", input="input", torch_test_accuracy=acc, params=shared.nparams(net),
            train_s=round(time.time() - t0, 1)))  # fmt: skip
    return audit.manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
