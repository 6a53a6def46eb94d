"""The training loop, the ONNX export and the segmentation data that the torch audit-set builders
share (``make_unseen_torch3.py``, ``make_unseen_torch4.py``, ``make_unseen_torch5.py``).  Imports
torch only when called: run it in a torch virtual environment, never the project's."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def train(model: Any, x: Any, y: Any, epochs: int, lr: float, *, seed: int, bs: int = 128,
          loss_fn: Any = None, opt: str = "adamw") -> None:  # fmt: skip
    """Seeded mini-batch training of ``model`` on ``x`` (an array or a tuple of arrays: the model's
    inputs) and ``y``: AdamW (or ``opt="sgd"``: Nesterov SGD) with a one-cycle schedule, cross-entropy
    unless ``loss_fn``; ``MAKE_NEW_DRY=1`` trains one epoch on two batches (a smoke run).  Leaves the
    model in eval mode."""
    import torch
    from torch.nn import functional as F  # noqa: N812

    torch.manual_seed(seed)
    xs = x if isinstance(x, tuple) else (x,)
    if os.environ.get("MAKE_NEW_DRY"):
        xs, y, epochs = tuple(a[: 2 * bs] for a in xs), y[: 2 * bs], 1
    X = [torch.from_numpy(a) for a in xs]
    Y = torch.from_numpy(y)
    n = len(Y)
    steps = epochs * (n // bs)
    o: torch.optim.Optimizer
    if opt == "sgd":
        o = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    else:
        o = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=steps)
    model.train()
    for ep in range(epochs):
        perm = torch.randperm(n)
        tot = 0.0
        for i in range(n // bs):
            idx = perm[i * bs : (i + 1) * bs]
            out_ = model(*[a[idx] for a in X])
            loss = loss_fn(out_, Y[idx]) if loss_fn else F.cross_entropy(out_, Y[idx])
            o.zero_grad()
            loss.backward()
            o.step()
            sched.step()
            tot += float(loss)
        print(f"  epoch {ep}: loss {tot / (n // bs):.4f}", flush=True)
    model.eval()


def blotted(x: Any, rng: Any) -> tuple[Any, Any]:
    """Segmentation pairs from digits ``x (n, 784)``: the digits with Gaussian noise and two random 4x4
    blots each (inputs ``(n, 1, 28, 28)``) and their foreground masks (same shape), from ``rng``."""
    import numpy as np

    mask = (x > 0.0).astype(np.float32).reshape(-1, 28, 28)
    y = x.reshape(-1, 28, 28) + rng.normal(0, 0.7, (len(x), 28, 28))
    for i in range(len(y)):
        for _ in range(2):
            r, c = rng.integers(0, 24, size=2)
            y[i, r : r + 4, c : c + 4] += rng.uniform(1.0, 2.5)
    return y[:, None].astype(np.float32), mask[:, None]


def export(model: Any, name: str, args: tuple[Any, ...], dynamo: bool, opset: int,
           inputs: list[str], outputs: list[str], *, out: Path,
           extra: dict[str, Any] | None = None) -> None:  # fmt: skip
    """``model`` to ``out/<name>.onnx`` with a dynamic batch axis ``N`` on every input (and output):
    the dynamo exporter (weights inside the file) or TorchScript (no constant folding); ``extra``:
    more ``torch.onnx.export`` keywords (e.g. ``keep_initializers_as_inputs``).

    ``UNSEEN_STATIC=1`` in the environment exports from a one-sample example with no dynamic axes,
    as ``torch.onnx.export(model, x[:1])`` does by default: a fixed batch of one (rebuild a set into
    another ``--out`` to audit its static twin)."""
    import torch

    path = out / f"{name}.onnx"
    kw: dict[str, Any] = {"input_names": inputs, "output_names": outputs, "opset_version": opset}
    if os.environ.get("UNSEEN_STATIC"):
        args = tuple(a[:1] for a in args)
        if dynamo:
            kw["external_data"] = False
        else:
            kw["do_constant_folding"] = False
    elif dynamo:
        N = torch.export.Dim("N", min=1, max=4096)
        kw["dynamic_shapes"] = tuple({0: N} for _ in inputs)
        kw["external_data"] = False
    else:
        kw["dynamic_axes"] = {k: {0: "N"} for k in inputs + outputs}
        kw["do_constant_folding"] = False
    kw.update(extra or {})
    torch.onnx.export(model, args, str(path), dynamo=dynamo, **kw)


def nparams(model: Any) -> int:
    """Number of parameters of a torch module."""
    return int(sum(p.numel() for p in model.parameters()))


def predict(model: Any, *xs: Any, batch: int = 512) -> Any:
    """``model``'s output on the arrays ``xs`` (the model's inputs, samples on axis 0), in batches."""
    import numpy as np
    import torch

    with torch.no_grad():
        return np.concatenate(
            [model(*[torch.from_numpy(a[i : i + batch]) for a in xs]).numpy() for i in range(0, len(xs[0]), batch)]
        )


@dataclass
class Audit:
    """What the builders' classifiers share: the pools (``make_unseen.pools``), the training images
    ``xtr``/labels ``ytr``, the output folder and its manifest, the models asked for (``only``) and
    the training seed."""

    out: Path
    manifest: Any
    pools: dict[str, Any]
    xtr: Any
    ytr: Any
    only: set[str] | None
    seed: int

    def want(self, *names: str) -> bool:
        return self.only is None or any(n in self.only for n in names)

    def classifier(self, names: tuple[tuple[str, bool, int], ...], net: Any, prep: Any, epochs: int, lr: float,
                   inputs: list[str], family: str, bn: str, t0: float, extra: dict[str, Any] | None = None,
                   prep_split: Any = None) -> None:  # fmt: skip
        """Train ``net`` on ``prep(xtr)`` (a tuple of input arrays), export it under each
        ``(name, dynamo, opset)`` of ``names`` (``extra`` export keywords for TorchScript only), and
        write its calibration, selection and test splits (``prep_split``, default ``prep``, of the
        pools, with their labels) and its manifest entry."""
        import numpy as np
        import torch

        P = self.pools
        print(f"{names[0][0]}: {nparams(net)} params", flush=True)
        train(net, prep(self.xtr), self.ytr, epochs=epochs, lr=lr, seed=self.seed)
        splits = {k: (prep_split or prep)(P[k][0]) for k in ("calib", "select", "test")}
        acc = float((predict(net, *splits["test"]).argmax(-1) == P["test"][1]).mean())
        print(f"  torch test accuracy {acc:.4f}", flush=True)
        for name, dyn, opset in names:
            if not self.want(name):
                continue
            args = tuple(torch.from_numpy(a[:2]) for a in splits["test"])
            export(net, name, args, dyn, opset, inputs, ["logits"], out=self.out, extra=None if dyn else extra)
            for split, xs in splits.items():
                np.savez(self.out / f"{name}_{split}.npz", **dict(zip(inputs, xs, strict=True)), labels=P[split][1])
            self.manifest.record(name, dict(
                family=family, exporter="dynamo" if dyn else "torchscript", opset=opset, bn=bn, task="classifier",
                **({"inputs": inputs} if len(inputs) > 1 else {}), input=inputs[0], torch_test_accuracy=acc,
                params=nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip


def mnist_audit(out: Path, seed: int, mnist: Path, n_train: int, only: set[str] | None) -> Audit:
    """The usual start of a torch MNIST builder: one torch thread, the pools
    (``make_unseen.pools``), the set's manifest and an :class:`Audit` over the first ``n_train``
    training images."""
    import torch
    from make_unseen import Manifest, pools

    torch.set_num_threads(1)
    P = pools(mnist)
    xtr, ytr = P["train"][0][:n_train], P["train"][1][:n_train]
    return Audit(out=out, manifest=Manifest(out), pools=P, xtr=xtr, ytr=ytr, only=only, seed=seed)


def as_rows(x: Any) -> tuple[Any]:
    """Flat MNIST images ``(n, 784)`` as sequences of 28 rows, ``(n, 28, 28)``."""
    return (x.reshape(-1, 28, 28).copy(),)


def as_images(x: Any) -> tuple[Any]:
    """Flat MNIST images ``(n, 784)`` as ``(n, 1, 28, 28)``."""
    return (x.reshape(-1, 1, 28, 28),)
