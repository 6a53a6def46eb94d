"""Build a ninth torch audit set: sequence-first models, whose input is ``[T, N, F]`` (time on axis 0,
the samples on axis 1), as ``nn.LSTM``/``nn.GRU``/``nn.TransformerEncoder`` take them by default
(``batch_first=False``).  Trained briefly (seeded) on MNIST rows; same pools, split files and
manifest format as ``benchmarks/make_unseen.py``, so that ``benchmarks/bench_unseen.py --dir OUT``
audits it.  The split files hold the samples on axis 0, ``(N, 28, 28)``, as chita-onnx's data
convention asks; the tool has to find the model's batch axis (axis 1) itself.

Runs in a torch virtual environment (never the project's)::

    python3.11 -m venv TORCHVENV && TORCHVENV/bin/pip install torch==2.13.0 numpy onnx onnxscript
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch9.py \
        [--out ~/.cache/chita-onnx/unseen-torch9] [--only lstm_tm_ts,...] [--n-train 12000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch9 --no-peer --sparsities 0.3,0.5

(torch 2.13.0+cpu was used.)

Models (what tells the batch axis apart from the time axis, both dynamic):

* ``lstm_tm_ts``  ``nn.LSTM`` (2 layers) over the rows, last step → Linear.  TorchScript opset 17,
  dims named ``seq`` and ``batch``: the name says it.
* ``gru_tm_ts``  bidirectional ``nn.GRU``, mean over time → Linear.  TorchScript opset 17, dims named
  ``time`` and ``streams``: only the graph says it (the input feeds the GRU's ``X``, whose axis 1 is
  the batch).
* ``lstm_tm_dyn``  the LSTM model of ``lstm_tm_ts`` by the dynamo exporter (opset 18), both dims
  ``Dim.DYNAMIC`` (generated names).
* ``tfenc_tm_ts`` / ``tfenc_tm_dyn``  ``nn.TransformerEncoder`` (``batch_first=False``, 2 layers, learned
  positions), mean over time → Linear.  TorchScript opset 17 with dims ``frames`` and ``clips``, and
  dynamo opset 18 with generated names: only the output ``[clips, 10]`` says which axis is the batch.
* ``conv_tm_ts``  the rows permuted to ``[N, F, T]`` inside the model, 1-D convolutions with BN,
  global pooling → Linear.  TorchScript opset 17, dims ``T`` and ``utt``: the output says it.

And two batch-first models traced at a fixed batch of 16 (no dynamic axes: every shape, including
the ``Reshape`` targets, names 16), whose files hold 16 samples per call:

* ``cnn_b16_ts``  conv + BN + ReLU stages, flatten, two Linear layers.  TorchScript opset 17 with
  constant folding.
* ``vit_b16_dyn``  a patch-embedding transformer classifier (``nn.TransformerEncoderLayer``,
  ``batch_first=True``).  Dynamo opset 18, static shapes.

and the same two networks as torch ≥ 2.9's default export writes them from a one-sample example:
``cnn_b1_dyn`` and ``vit_b1_dyn`` (dynamo opset 18, no ``dynamic_shapes``: a fixed batch of one).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import builder_main  # numpy only at import

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch9"


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from torch import nn

    audit = shared.mnist_audit(out, seed, mnist, n_train, only)
    want, P = audit.want, audit.pools

    class SamplesFirst(nn.Module):
        """Training and scoring wrapper: samples-first rows ``(N, T, F)`` into the sequence-first core."""

        def __init__(self, core: nn.Module) -> None:
            super().__init__()
            self.core = core

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.core(x.transpose(0, 1))

    def time_major(names: tuple[tuple[str, bool, int, tuple[str, str]], ...], core: nn.Module, epochs: int,
                   lr: float, family: str, bn: str, t0: float) -> None:  # fmt: skip
        """Train ``core`` (input ``[T, N, 28]``) on the rows, export each ``(name, dynamo, opset,
        (time dim, batch dim))``, write the samples-first splits and the manifest entries."""
        net = SamplesFirst(core)
        print(f"{names[0][0]}: {shared.nparams(net)} params", flush=True)
        shared.train(net, shared.as_rows(audit.xtr), audit.ytr, epochs=epochs, lr=lr, seed=seed)
        splits = {k: shared.as_rows(P[k][0])[0] for k in ("calib", "select", "test")}
        acc = float((shared.predict(net, splits["test"]).argmax(-1) == P["test"][1]).mean())
        print(f"  torch test accuracy {acc:.4f}", flush=True)
        args = (torch.from_numpy(splits["test"][:3]).transpose(0, 1).contiguous(),)
        for name, dyn, opset, (tdim, ndim) in names:
            if not want(name):
                continue
            path = out / f"{name}.onnx"
            kw: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
            if dyn:
                kw["dynamic_shapes"] = ({0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC},)
                kw["external_data"] = False
            else:
                kw["dynamic_axes"] = {"input": {0: tdim, 1: ndim}, "logits": {0: ndim}}
                kw["do_constant_folding"] = False
            torch.onnx.export(core, args, str(path), dynamo=dyn, **kw)
            for split, xs in splits.items():
                np.savez(out / f"{name}_{split}.npz", input=xs, labels=P[split][1])
            audit.manifest.record(name, dict(
                family=family, exporter="dynamo" if dyn else "torchscript", opset=opset, bn=bn, task="classifier",
                input="input", batch_axis=1, torch_test_accuracy=acc,
                params=shared.nparams(net), train_s=round(time.time() - t0, 1)))  # fmt: skip

    class LSTMTM(nn.Module):
        def __init__(self, h: int = 64) -> None:
            super().__init__()
            self.rnn = nn.LSTM(28, h, num_layers=2)
            self.head = nn.Linear(h, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [T, N, 28]
            y, _ = self.rnn(x)
            return self.head(y[-1])

    if want("lstm_tm_ts", "lstm_tm_dyn"):
        torch.manual_seed(seed)
        time_major((("lstm_tm_ts", False, 17, ("seq", "batch")), ("lstm_tm_dyn", True, 18, ("", ""))), LSTMTM(), 3,
                   5e-3, "nn.LSTM, 2 layers, sequence-first input, last step", "none", time.time())  # fmt: skip

    class GRUTM(nn.Module):
        def __init__(self, h: int = 48) -> None:
            super().__init__()
            self.rnn = nn.GRU(28, h, bidirectional=True)
            self.head = nn.Linear(2 * h, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.rnn(x)
            return self.head(y.mean(0))

    if want("gru_tm_ts"):
        torch.manual_seed(seed)
        time_major((("gru_tm_ts", False, 17, ("time", "streams")),), GRUTM(), 3, 5e-3,
                   "bidirectional nn.GRU, sequence-first input, mean over time", "none", time.time())  # fmt: skip

    class EncTM(nn.Module):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.embed = nn.Linear(28, d)
            self.pos = nn.Parameter(torch.zeros(28, 1, d))
            layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=False)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.enc(self.embed(x) + self.pos[: x.shape[0]]).mean(0))

    if want("tfenc_tm_ts", "tfenc_tm_dyn"):
        torch.manual_seed(seed)
        time_major((("tfenc_tm_ts", False, 17, ("frames", "clips")), ("tfenc_tm_dyn", True, 18, ("", ""))), EncTM(),
                   3, 2e-3, "nn.TransformerEncoder (batch_first=False), learned positions, mean over time", "none",
                   time.time())  # fmt: skip

    class ConvTM(nn.Module):
        def __init__(self, c: int = 48) -> None:
            super().__init__()
            self.body = nn.Sequential(
                nn.Conv1d(28, c, 3, padding=1), nn.BatchNorm1d(c), nn.ReLU(),
                nn.Conv1d(c, c, 3, padding=1, groups=4), nn.BatchNorm1d(c), nn.ReLU(),
                nn.Conv1d(c, 2 * c, 3, stride=2, padding=1), nn.BatchNorm1d(2 * c), nn.ReLU(),
            )  # fmt: skip
            self.head = nn.Linear(2 * c, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.body(x.permute(1, 2, 0)).amax(-1))

    if want("conv_tm_ts"):
        torch.manual_seed(seed)
        time_major((("conv_tm_ts", False, 17, ("T", "utt")),), ConvTM(), 3, 4e-3,
                   "1-D conv + BN over the rows, input permuted from [T, N, F] inside the model, max over time",
                   "nodes", time.time())  # fmt: skip

    def fixed16(names: tuple[tuple[str, bool, int, int], ...], net: nn.Module, epochs: int, lr: float, family: str,
                bn: str, t0: float) -> None:  # fmt: skip
        """Train ``net`` on the images, export it traced at a fixed batch under each ``(name, dynamo,
        opset, batch)``, write the splits."""
        if not any(want(n[0]) for n in names):
            return
        name = names[0][0]
        print(f"{name}: {shared.nparams(net)} params", flush=True)
        shared.train(net, shared.as_images(audit.xtr), audit.ytr, epochs=epochs, lr=lr, seed=seed)
        splits = {k: shared.as_images(P[k][0])[0] for k in ("calib", "select", "test")}
        acc = float((shared.predict(net, splits["test"], batch=16).argmax(-1) == P["test"][1]).mean())
        print(f"  torch test accuracy {acc:.4f}", flush=True)
        for name, dyn, opset, b in names:
            if not want(name):
                continue
            kw: dict[str, Any] = {"input_names": ["input"], "output_names": ["logits"], "opset_version": opset}
            if dyn:
                kw["external_data"] = False
            x0 = (torch.from_numpy(splits["test"][:b]),)
            torch.onnx.export(net, x0, str(out / f"{name}.onnx"), dynamo=dyn, **kw)
            for split, xs in splits.items():
                np.savez(out / f"{name}_{split}.npz", input=xs, labels=P[split][1])
            audit.manifest.record(name, dict(
                family=family, exporter="dynamo" if dyn else "torchscript", opset=opset, bn=bn, task="classifier",
                input="input", fixed_batch=b, torch_test_accuracy=acc, params=shared.nparams(net),
                train_s=round(time.time() - t0, 1)))  # fmt: skip

    def stage(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

    torch.manual_seed(seed)
    cnn = nn.Sequential(stage(1, 16), stage(16, 32), nn.Flatten(), nn.Linear(32 * 49, 64), nn.ReLU(), nn.Linear(64, 10))
    fixed16((("cnn_b16_ts", False, 17, 16), ("cnn_b1_dyn", True, 18, 1)), cnn, 2, 4e-3,
            "conv+BN stages, flatten, two Linear; traced at a fixed batch", "folded", time.time())  # fmt: skip

    class ViT(nn.Module):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.patch = nn.Conv2d(1, d, 4, 4)
            self.pos = nn.Parameter(torch.zeros(1, 49, d))
            layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.patch(x).flatten(2).transpose(1, 2) + self.pos
            return self.head(self.enc(h).mean(1))

    torch.manual_seed(seed)
    fixed16((("vit_b16_dyn", True, 18, 16), ("vit_b1_dyn", True, 18, 1)), ViT(), 3, 2e-3,
            "patch-embedding transformer classifier; static batch", "none", time.time())  # fmt: skip
    return audit.manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
