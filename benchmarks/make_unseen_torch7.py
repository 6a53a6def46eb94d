"""Build a seventh "unseen architectures" audit set: models whose gradient path runs through the ops
that stop 32 rewrote (scatters, grid sampling), trained briefly (seeded) on MNIST and exported to
ONNX by torch.  Same pools, split files and manifest format as ``benchmarks/make_unseen.py``, so
that ``benchmarks/bench_unseen.py --dir OUT`` audits it; training loop and export from
``unseen_torch.py``.

Runs in a torch virtual environment (never the project's)::

    python3.11 -m venv TORCHVENV && TORCHVENV/bin/pip install torch==2.13.0 numpy onnx onnxscript
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice TORCHVENV/bin/python benchmarks/make_unseen_torch7.py \
        [--out ~/.cache/chita-onnx/unseen-torch7] [--only gnn_scatter_ts,...] [--n-train 12000]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-torch7 --no-peer --sparsities 0.3,0.5

(torch 2.13.0+cpu was used.)

Models:

* ``gnn_scatter_ts`` / ``gnn_scatter_dyn``  message passing on a fixed graph: the 28 image rows are
  the nodes (ring, skip-2 and skip-7 edges both ways), two rounds of messages ``W h[src]`` summed
  into their destinations by ``scatter_add`` (``ScatterElements`` with ``reduction="add"``), a GRU-free
  update ``relu(U [h; agg])``, mean readout, Linear.  TorchScript opset 17 and dynamo opset 18.
  The scatter's data is ``zeros_like(h)``, a constant: its gradient does not matter.
* ``gnn_residual_ts``  the same, with the messages added into ``h`` itself (``h.scatter_add``): the
  data of the adding scatter is a live tensor, whose gradient onnxruntime's builder gets wrong.
  TorchScript opset 17.
* ``yolo_inplace_ts``  a YOLOv5-style head: conv features → per-cell predictions, ``sigmoid``, then the
  in-place box decoding ``y[..., 0:2] = y[..., 0:2] * 2 - 0.5 + grid`` and ``y[..., 2:4] = (y[..., 2:4]
  * 2) ** 2 * anchor`` (``ScatterND`` in the TorchScript export), flattened into a Linear classifier.
  TorchScript opset 17.
* ``deform_sample_ts`` / ``deform_sample_dyn``  deformable sampling: a conv predicts per-pixel offsets
  (``tanh``, scaled), added to the identity grid, ``F.grid_sample`` of the feature map (bilinear,
  reflection padding), then a conv and a Linear head.  TorchScript opset 17 and dynamo opset 18.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import unseen_torch as shared
from make_unseen import Manifest, builder_main, pools  # numpy only at import

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-torch7"


def edges() -> tuple[list[int], list[int]]:
    """The fixed graph on the 28 row nodes: ring, skip-2 and skip-7 edges, both directions."""
    src: list[int] = []
    dst: list[int] = []
    for step in (1, 2, 7):
        for i in range(28):
            j = (i + step) % 28
            src += [i, j]
            dst += [j, i]
    return src, dst


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    torch.set_num_threads(1)
    P = pools(mnist)
    manifest = Manifest(out)
    xtr, ytr = P["train"][0][:n_train], P["train"][1][:n_train]
    audit = shared.Audit(out=out, manifest=manifest, pools=P, xtr=xtr, ytr=ytr, only=only, seed=seed)
    want, classifier = audit.want, audit.classifier
    rows = lambda x: (x.reshape(-1, 28, 28).copy(),)  # noqa: E731
    images = lambda x: (x.reshape(-1, 1, 28, 28),)  # noqa: E731

    # ------------------------------------------------------------------ 1. message passing, scatter_add
    class GNN(nn.Module):
        def __init__(self, d: int = 48, residual: bool = False) -> None:
            super().__init__()
            self.residual = residual
            s, t = edges()
            self.register_buffer("src", torch.tensor(s, dtype=torch.int64))
            self.register_buffer("dst", torch.tensor(t, dtype=torch.int64))
            self.embed = nn.Linear(28, d)
            self.msg = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(2)])
            self.upd = nn.ModuleList([nn.Linear(2 * d, d) for _ in range(2)])
            self.head = nn.Linear(d, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # x [N, 28 nodes, 28 features]
            h = F.relu(self.embed(x))
            for msg, upd in zip(self.msg, self.upd, strict=True):
                m = msg(h)[:, self.src, :]  # [N, E, d]
                idx = self.dst.view(1, -1, 1).expand(m.shape[0], -1, m.shape[2])
                agg = (h if self.residual else torch.zeros_like(h)).scatter_add(1, idx, m)
                h = F.relu(upd(torch.cat([h, agg], dim=2)))
            return self.head(h.mean(1))

    if want("gnn_scatter_ts", "gnn_scatter_dyn"):
        torch.manual_seed(seed)
        classifier((("gnn_scatter_ts", False, 17), ("gnn_scatter_dyn", True, 18)), GNN(), rows, 3, 3e-3, ["input"],
                   "message passing on a fixed 28-node graph (image rows): messages summed by scatter_add "
                   "(ScatterElements reduction=add), two rounds, mean readout", "none", time.time())  # fmt: skip
    if want("gnn_residual_ts"):
        torch.manual_seed(seed)
        classifier((("gnn_residual_ts", False, 17),), GNN(residual=True), rows, 3, 3e-3, ["input"],
                   "the same message passing, the messages added into the node states themselves "
                   "(h.scatter_add: the scatter's data is a live tensor)", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 2. YOLOv5-style in-place decoding
    class YoloHead(nn.Module):
        def __init__(self, a: int = 3, k: int = 8) -> None:
            super().__init__()
            self.a, self.k = a, k
            self.backbone = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.SiLU())
            self.pred = nn.Conv2d(32, a * k, 1)
            gy, gx = torch.meshgrid(torch.arange(7.0), torch.arange(7.0), indexing="ij")
            self.register_buffer("grid", torch.stack([gx, gy], -1).view(1, 1, 7, 7, 2))
            self.register_buffer("anchor", torch.tensor([[1.0, 1.5], [2.0, 1.0], [1.5, 2.5]]).view(1, a, 1, 1, 2))
            self.cls = nn.Linear(a * k * 49, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            p = self.pred(self.backbone(x))  # [N, a*k, 7, 7]
            y = p.view(-1, self.a, self.k, 7, 7).permute(0, 1, 3, 4, 2).sigmoid()  # [N, a, 7, 7, k]
            if self.training:  # autograd cannot go back through Sigmoid after the in-place writes
                y = y.clone()
            y[..., 0:2] = y[..., 0:2] * 2 - 0.5 + self.grid
            y[..., 2:4] = (y[..., 2:4] * 2) ** 2 * self.anchor
            return self.cls(y.reshape(y.shape[0], -1))

    if want("yolo_inplace_ts"):
        torch.manual_seed(seed)
        classifier((("yolo_inplace_ts", False, 17),), YoloHead(), images, 2, 3e-3, ["input"],
                   "YOLOv5-style head: sigmoid predictions, in-place box decoding y[..., 0:2] = ... "
                   "(ScatterND), flattened into a Linear classifier", "none", time.time())  # fmt: skip

    # ------------------------------------------------------------------ 3. deformable sampling
    class Deform(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv2d(1, 16, 3, 1, 1)
            self.off = nn.Conv2d(16, 2, 3, 1, 1)
            self.c2 = nn.Conv2d(16, 32, 3, 2, 1)
            self.head = nn.Linear(32 * 14 * 14, 10)
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, 28), torch.linspace(-1, 1, 28), indexing="ij")
            self.register_buffer("base", torch.stack([xs, ys], -1).view(1, 28, 28, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = F.relu(self.c1(x))
            grid = self.base + 0.15 * torch.tanh(self.off(f)).permute(0, 2, 3, 1)
            s = F.grid_sample(f, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
            return self.head(F.relu(self.c2(s)).flatten(1))

    if want("deform_sample_ts", "deform_sample_dyn"):
        torch.manual_seed(seed)
        classifier((("deform_sample_ts", False, 17), ("deform_sample_dyn", True, 18)), Deform(), images, 2, 2e-3,
                   ["input"], "deformable sampling: conv-predicted offsets on the identity grid, grid_sample "
                   "(bilinear, reflection padding) of the feature map, conv, Linear", "none", time.time())  # fmt: skip
    return manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
