"""Build the token-input audit set: small text-style models that read integer token ids and an
attention mask (two ``int64`` graph inputs, an embedding ``Gather``, padding masks on the path),
trained briefly on real data, exported with both of torch's ONNX exporters.

Runs in the torch virtual environment (never the project's: torch must not meet onnxruntime-training)::

    OMP_NUM_THREADS=1 ~/.cache/chita-onnx/torch-venv/bin/python benchmarks/make_unseen_text.py [--only a,b]

Writes to ``--out`` (default ``~/.cache/chita-onnx/unseen-text``) the same files as
``make_unseen.py`` (``<model>.onnx``, ``_calib`` / ``_select`` / ``_test.npz``, ``manifest.json``);
each ``.npz`` holds ``input_ids`` and ``attention_mask`` (``[N, 49]`` int64) and ``labels``.
Score it with ``bench_unseen.py --dir ~/.cache/chita-onnx/unseen-text``.

Tokens: each MNIST image (the same disjoint pools as ``make_unseen.py``) is average-pooled to 14×14
and thresholded; every 2×2 block of that binary image is one token (its 4-bit code + 1, so ids 1–16;
0 is padding), read in raster order: 7×7 = 49 positions. Leading and trailing token rows that are all
background are cut and the rest is left-aligned, so sequences have 7–49 real tokens and a padded tail
with ``attention_mask`` 0 — as a tokenizer's padded batch looks.

Models (name: family; exporter, opset):

* ``t_transformer``     token + learned position embeddings, 2 pre-norm encoder layers (d=64, 4 heads,
  GELU) with the key-padding mask, masked mean pool, LayerNorm, linear head; TorchScript, opset 14.
* ``t_transformer_dyn`` the same weights; dynamo exporter, opset 18.
* ``t_transformer_op23`` the same weights; dynamo exporter, opset 23 (its ``Attention`` op).
* ``t_bilstm``          embedding → bidirectional LSTM(64) → masked mean pool → linear; TorchScript,
  opset 15 (one LSTM node; the padded tail is read by the recurrence, as without packing).
* ``t_bert``            BERT written out (token, position and type embeddings, LayerNorm; 2 post-norm
  layers, d=48, 4 heads, attention as MatMul/Softmax with the additive ``(1 − mask)·−10000`` mask,
  exact GELU through ``Erf``; tanh pooler on the first position); TorchScript, opset 11.
* ``t_textcnn``         embedding → parallel Conv1d (widths 3, 7 and 15, 64 channels each) → ReLU →
  masked max pool over time → linear (Kim-style text CNN); TorchScript, opset 13.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_unseen import Manifest, builder_main, pools

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-text"
L = 49
INPUTS = ["input_ids", "attention_mask"]


def tokenize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised MNIST images ``[N, 28, 28]`` → ``(input_ids, attention_mask)``, both ``[N, 49]`` int64."""
    img = x.reshape(len(x), 28, 28)
    small = img.reshape(len(x), 14, 2, 14, 2).mean(axis=(2, 4)) > 0.5  # [N, 14, 14] binary
    b = small.reshape(len(x), 7, 2, 7, 2).transpose(0, 1, 3, 2, 4).reshape(len(x), 7, 7, 4)
    code = (b * np.array([1, 2, 4, 8])).sum(-1) + 1  # [N, 7, 7], 1..16
    ids = np.zeros((len(x), L), np.int64)
    mask = np.zeros((len(x), L), np.int64)
    for i in range(len(x)):
        rows = np.flatnonzero((code[i] > 1).any(axis=1))
        lo, hi = (rows[0], rows[-1] + 1) if len(rows) else (0, 1)
        seq = code[i, lo:hi].reshape(-1)
        ids[i, : len(seq)] = seq
        mask[i, : len(seq)] = 1
    return ids, mask


def build(only: set[str] | None, out: Path, seed: int, mnist: Path) -> dict[str, Any]:
    import torch
    from torch import nn
    from torch.nn import functional as F  # noqa: N812

    torch.set_num_threads(1)
    P = {k: (*tokenize(x), y) for k, (x, y) in pools(mnist).items()}
    manifest = Manifest(out)

    def want(name: str) -> bool:
        return only is None or name in only

    def train(model: nn.Module, epochs: int, lr: float, bs: int = 128) -> None:
        torch.manual_seed(seed)
        ids, mask, y = (torch.from_numpy(a) for a in P["train"])
        steps = epochs * (len(ids) // bs)
        o = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-2)
        sched = torch.optim.lr_scheduler.OneCycleLR(o, max_lr=lr, total_steps=steps)
        model.train()
        for _ in range(epochs):
            perm = torch.randperm(len(ids))
            for i in range(len(ids) // bs):
                idx = perm[i * bs : (i + 1) * bs]
                loss = F.cross_entropy(model(ids[idx], mask[idx]), y[idx])
                o.zero_grad()
                loss.backward()
                o.step()
                sched.step()
        model.eval()

    def accuracy(model: nn.Module) -> float:
        ids, mask, y = P["test"]
        with torch.no_grad():
            pred = model(torch.from_numpy(ids), torch.from_numpy(mask)).argmax(-1).numpy()
        return float((pred == y).mean())

    def export(model: nn.Module, name: str, dynamo: bool, opset: int) -> None:
        ids, mask = torch.from_numpy(P["calib"][0][:2]), torch.from_numpy(P["calib"][1][:2])
        kw: dict[str, Any] = {"input_names": INPUTS, "output_names": ["logits"], "opset_version": opset}
        if dynamo:
            n = torch.export.Dim("N", min=1, max=4096)
            kw.update(dynamic_shapes=({0: n}, {0: n}), external_data=False)
        else:
            kw["dynamic_axes"] = {"input_ids": {0: "N"}, "attention_mask": {0: "N"}, "logits": {0: "N"}}
        torch.onnx.export(model, (ids, mask), str(out / f"{name}.onnx"), dynamo=dynamo, **kw)
        for split in ("calib", "select", "test"):
            i, m, y = P[split]
            np.savez(out / f"{name}_{split}.npz", input_ids=i, attention_mask=m, labels=y)

    def record(name: str, **info: Any) -> None:
        manifest.record(name, info | {"input": INPUTS[0], "inputs": INPUTS, "task": "classifier"})

    def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    class TokTransformer(nn.Module):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.tok = nn.Embedding(17, d, padding_idx=0)
            self.pos = nn.Embedding(L, d)
            layer = nn.TransformerEncoderLayer(d, 4, 128, dropout=0.0, activation="gelu", batch_first=True,
                                               norm_first=True)  # fmt: skip
            self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)
            self.fc = nn.Linear(d, 10)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
            h = self.enc(h, src_key_padding_mask=mask == 0)
            return self.fc(self.norm(masked_mean(h, mask)))

    class TokLSTM(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(17, 32, padding_idx=0)
            self.rnn = nn.LSTM(32, 64, batch_first=True, bidirectional=True)
            self.fc = nn.Linear(128, 10)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            h, _ = self.rnn(self.tok(ids))
            return self.fc(masked_mean(h, mask))

    class BertLayer(nn.Module):  # written out as BERT's reference code does (no fused attention)
        def __init__(self, d: int = 48, heads: int = 4) -> None:
            super().__init__()
            self.heads = heads
            self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
            self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.f1, self.f2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

        def forward(self, x: torch.Tensor, ext: torch.Tensor) -> torch.Tensor:
            n, t, d = x.shape
            hd = d // self.heads

            def split(z: torch.Tensor) -> torch.Tensor:
                return z.view(n, t, self.heads, hd).permute(0, 2, 1, 3)

            scores = torch.matmul(split(self.q(x)), split(self.k(x)).transpose(-1, -2)) / math.sqrt(hd) + ext
            a = torch.matmul(scores.softmax(-1), split(self.v(x))).permute(0, 2, 1, 3).reshape(n, t, d)
            x = self.ln1(x + self.o(a))
            h = self.f1(x)
            return self.ln2(x + self.f2(0.5 * h * (1.0 + torch.erf(h / math.sqrt(2.0)))))  # exact GELU

    class MiniBert(nn.Module):
        def __init__(self, d: int = 48) -> None:
            super().__init__()
            self.tok, self.pos, self.typ = nn.Embedding(17, d), nn.Embedding(L, d), nn.Embedding(2, d)
            self.ln = nn.LayerNorm(d)
            self.layers = nn.ModuleList([BertLayer(d), BertLayer(d)])
            self.pool, self.cls = nn.Linear(d, d), nn.Linear(d, 10)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
            x = self.ln(self.tok(ids) + self.pos(pos) + self.typ(torch.zeros_like(ids)))
            ext = (1.0 - mask[:, None, None, :].to(x.dtype)) * -10000.0  # BERT's additive mask
            for layer in self.layers:
                x = layer(x, ext)
            return self.cls(torch.tanh(self.pool(x[:, 0])))

    class TextCNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.tok = nn.Embedding(17, 32, padding_idx=0)
            self.c3 = nn.Conv1d(32, 64, 3, padding=1)
            self.c7 = nn.Conv1d(32, 64, 7, padding=3)
            self.c15 = nn.Conv1d(32, 64, 15, padding=7)  # spans two token rows (7 per row)
            self.fc = nn.Linear(192, 10)

        def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            e = self.tok(ids).transpose(1, 2)  # [N, 32, L]
            neg = (1.0 - mask.unsqueeze(1).to(e.dtype)) * -1e4
            pooled = [(F.relu(c(e)) + neg).amax(-1) for c in (self.c3, self.c7, self.c15)]
            return self.fc(torch.cat(pooled, 1))

    specs: list[tuple[str, type[nn.Module], int, float, list[tuple[str, bool, int]]]] = [
        (
            "transformer",
            TokTransformer,
            20,
            2e-3,
            [("t_transformer", False, 14), ("t_transformer_dyn", True, 18), ("t_transformer_op23", True, 23)],
        ),
        ("bilstm", TokLSTM, 20, 3e-3, [("t_bilstm", False, 15)]),
        ("bert", MiniBert, 12, 2e-3, [("t_bert", False, 11)]),
        ("textcnn", TextCNN, 20, 3e-3, [("t_textcnn", False, 13)]),
    ]
    for _, cls, epochs, lr, exports in specs:
        if not any(want(name) for name, _, _ in exports):
            continue
        t0 = time.time()
        torch.manual_seed(seed)
        net = cls()
        train(net, epochs, lr)
        acc = accuracy(net)
        for name, dyn, opset in exports:
            if not want(name):
                continue
            try:
                export(net, name, dyn, opset)
            except Exception as exc:  # an exporter failure is recorded, not fatal
                print(f"{name}: export failed: {exc}", flush=True)
                continue
            record(name, family=f"token classifier: {cls.__name__}", exporter="dynamo" if dyn else "torchscript",
                   opset=opset, torch_test_accuracy=acc, train_s=round(time.time() - t0, 1))  # fmt: skip
    return manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build)


if __name__ == "__main__":
    sys.exit(main())
