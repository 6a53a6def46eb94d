"""Train a small CRNN (convs + bidirectional LSTM or GRU + linear CTC head) on sequences of four
8×8 scikit-learn digits and export it to ONNX with a real ``LSTM`` (``GRU``) node.

Run it with a Python that has torch and scikit-learn (never the project venv), e.g.::

    ~/.cache/chita-onnx/torch-venv/bin/pip install torch==2.13.0 onnx scikit-learn
    ~/.cache/chita-onnx/torch-venv/bin/python benchmarks/make_crnn_digits.py            # LSTM
    ~/.cache/chita-onnx/torch-venv/bin/python benchmarks/make_crnn_digits.py --cell gru # GRU

Data (seed 0): the 1,797 digits of ``sklearn.datasets.load_digits`` (pixels / 16) are split into three
disjoint pools — 1,097 *train* digits, 350 *selection* digits, 350 *test* digits.  A sample is four
digits side by side, ``[1, 8, 32]``, label the four classes.  Training sequences are drawn afresh
from the train pool every epoch; ``crnn_digits_calib.npz`` holds 512 further sequences of train-pool
digits (what the pruning sees), ``crnn_digits_select.npz`` 1,000 sequences of selection-pool digits
(used only to choose the recipe), ``crnn_digits_test.npz`` 1,000 of test-pool digits (the scores).
Every ``.npz`` has keys ``image`` (float32 ``[N, 1, 8, 32]``) and ``labels`` (int64 ``[N, 4]``).

Model: Conv(1→16, 3, pad 1) → ReLU → MaxPool(2, 1) → Conv(16→32, 3, pad 1) → ReLU → MaxPool(2, 2)
→ columns as time steps ``[T=16, N, 64]`` → bidirectional LSTM/GRU (hidden 48) → Linear(96→11) →
log-softmax, output ``logprobs`` ``[N, 16, 11]`` (class 10 = CTC blank).  Trained with CTC loss,
Adam (lr 3e-3), 30 epochs of 4,000 sequences.  Exported with the TorchScript exporter
(``dynamo=False``, opset 17), which writes one ONNX ``LSTM``/``GRU`` node (GRU: linear_before_reset=1).
Accuracy: :func:`sequence_accuracy` (greedy CTC decoding, all four digits right).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
DIGITS = 4
BLANK = 10


def pools(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    perm = np.random.default_rng(seed).permutation(len(x))
    parts = {"train": perm[:1097], "select": perm[1097:1447], "test": perm[1447:]}
    return {k: (x[v], y[v]) for k, v in parts.items()}


def sequences(pool: tuple[np.ndarray, np.ndarray], n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` samples of four pool digits side by side: images ``[n, 1, 8, 32]``, labels ``[n, 4]``."""
    x, y = pool
    idx = rng.integers(0, len(x), size=(n, DIGITS))
    img = np.concatenate([x[idx[:, k]] for k in range(DIGITS)], axis=2)[:, None]
    return img.astype(np.float32), y[idx]


def greedy_decode(logprobs: np.ndarray) -> list[list[int]]:
    """CTC greedy decoding of ``[N, T, C]`` scores: best class per step, repeats merged, blanks dropped."""
    best = np.asarray(logprobs).argmax(-1)
    out = []
    for row in best:
        seq, prev = [], -1
        for c in row:
            if c != prev and c != BLANK:
                seq.append(int(c))
            prev = c
        out.append(seq)
    return out


def sequence_accuracy(logprobs: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of samples whose decoded sequence equals the label sequence exactly."""
    dec = greedy_decode(logprobs)
    return float(np.mean([d == list(map(int, lab)) for d, lab in zip(dec, labels, strict=True)]))


def main() -> int:
    import torch
    from torch import nn

    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", choices=["lstm", "gru"], default="lstm")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    P = pools()

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(
                nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d((2, 1)),
                nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            )  # fmt: skip
            rnn = nn.LSTM if args.cell == "lstm" else nn.GRU
            self.rnn = rnn(64, 48, bidirectional=True)
            self.head = nn.Linear(96, BLANK + 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            f = self.cnn(x)  # [N, 32, 2, 16]
            n, c, h, w = f.shape
            seq = f.reshape(n, c * h, w).permute(2, 0, 1)  # [T, N, 64]
            out, _ = self.rnn(seq)
            return torch.log_softmax(self.head(out), -1).permute(1, 0, 2)  # [N, T, 11]

    net = CRNN()
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    ctc = nn.CTCLoss(blank=BLANK)
    xs, ys = sequences(P["select"], 1000, np.random.default_rng(1))
    for epoch in range(args.epochs):
        xt, yt = sequences(P["train"], 4000, rng)
        net.train()
        for i in range(0, len(xt), 64):
            xb, yb = torch.tensor(xt[i : i + 64]), torch.tensor(yt[i : i + 64])
            lp = net(xb).permute(1, 0, 2)  # [T, N, C]
            T, N = lp.shape[:2]
            loss = ctc(lp, yb, torch.full((N,), T, dtype=torch.long), torch.full((N,), DIGITS, dtype=torch.long))
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch % 5 == 4 or epoch == args.epochs - 1:
            net.eval()
            with torch.no_grad():
                acc = sequence_accuracy(net(torch.tensor(xs)).numpy(), ys)
            print(f"epoch {epoch}: loss {loss.item():.3f}, selection sequence accuracy {acc:.4f}", flush=True)
    net.eval()
    DATA.mkdir(parents=True, exist_ok=True)
    out = args.out or DATA / f"crnn_digits_{args.cell}.onnx"
    torch.onnx.export(
        net,
        torch.zeros(1, 1, 8, 32),
        str(out),
        input_names=["image"],
        output_names=["logprobs"],
        dynamic_axes={"image": {0: "N"}, "logprobs": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )
    splits = {
        "calib": sequences(P["train"], 512, np.random.default_rng(2)),
        "select": (xs, ys),
        "test": sequences(P["test"], 1000, np.random.default_rng(3)),
    }
    for name, (x, y) in splits.items():
        np.savez(DATA / f"crnn_digits_{name}.npz", image=x, labels=y)
    with torch.no_grad():
        xte, yte = splits["test"]
        print(f"test sequence accuracy {sequence_accuracy(net(torch.tensor(xte)).numpy(), yte):.4f}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
