"""Build a seventh "unseen architectures" audit set: small PaddlePaddle models trained briefly (seeded)
on MNIST and exported to ONNX by ``paddle.onnx.export`` (paddle2onnx).  Same pools, split files and
manifest format as ``benchmarks/make_unseen.py`` (whose numpy helpers, CTC strings and ``Manifest`` it
imports), so that ``benchmarks/bench_unseen.py --dir OUT`` audits it.

Runs in a paddle virtual environment (never the project's)::

    python3.11 -m venv ~/.cache/chita-onnx/paddle-venv
    ~/.cache/chita-onnx/paddle-venv/bin/python -m pip install paddlepaddle==3.3.1 paddle2onnx==2.1.0 \
        numpy onnx packaging onnxruntime onnx_graphsurgeon sympy
    OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 nice ~/.cache/chita-onnx/paddle-venv/bin/python \
        benchmarks/make_unseen_paddle.py [--out ~/.cache/chita-onnx/unseen-paddle] [--only resnet_p2o,...]
    OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/bench_unseen.py \
        --dir ~/.cache/chita-onnx/unseen-paddle --no-peer --sparsities 0.3,0.5

(paddlepaddle 3.3.1, paddle2onnx 2.1.0 were used.  paddle2onnx imports ``packaging`` without declaring
it, and its constant folding (Polygraphy) pip-installs onnxruntime, onnx_graphsurgeon and sympy on first
use when they are missing: the command above installs them up front.)  ``paddle.onnx.export`` logs
its failures and returns; the builder checks that the file was written.

Models (``_p2o`` names; "default" opset: ``paddle.onnx.export``'s own, 9, raised by paddle2onnx to what
the ops need; the manifest records the opset the file declares):

Training: 12,000 training images (6,000 for ``resnet_p2o`` and ``mbv3_p2o``, 6,000 strings for the
recognisers and 6,000 blotted digits for the segmenter), seeded AdamW, one-cycle schedule.

* ``resnet_p2o``    ResNet-style CNN of ``paddle.vision.models.resnet.BasicBlock``s (Conv-BN-ReLU-Conv-BN
  plus identity or 1x1-conv+BN downsample, residual Add, ReLU), global average pool, Linear.  BN kept.
* ``mbv3_p2o``      MobileNetV3-style: hardswish stem, inverted residuals (1x1 expand, depthwise kxk,
  squeeze-excitation with ReLU and hardsigmoid(slope 0.2), 1x1 project, BN), hardswish head, a softmax
  in eval mode (as PP-OCR's direction classifier head): the output is probabilities.  Opset 13.
* ``crnn_lstm_p2o`` CRNN on strings of 3-5 MNIST digits (``make_unseen.strings``, [1, 14, 84]):
  Conv-BN-ReLU-pool twice, Linear, ``paddle.nn.LSTM(direction="bidirect")``, per-step Linear,
  log-softmax ``[N, T, 11]`` (class 10 = blank), trained with ``F.ctc_loss``; task ``ctc``
  (greedy-decode character accuracy, the ``text`` arrays padded with -1).
* ``crnn_lstm_dynw_p2o`` the same weights exported with a dynamic width (``[N, 1, 14, W]``, as PP-OCR's
  recognisers are), opset 11.
* ``transformer_p2o`` two pre-norm ``paddle.nn.TransformerEncoderLayer`` (d 64, 4 heads, GELU) over the
  28 image rows, learned positions, mean pool, Linear.  Opset 17.
* ``gru_p2o``       ``paddle.nn.GRU`` over the 28 rows, last step, Linear.
* ``conv1d_p2o``    ``paddle.nn.Conv1D`` stack over the rows as 28 channels (a grouped dilated conv, a
  depthwise conv with a residual Add, a strided conv, BN1D), flatten, Linear.  Fixed batch of 1.
* ``svtr_ctc_p2o``  SVTR-style recogniser on the same strings: Conv-BN-hardswish stem, Linear, learned
  positions, a pre-norm ``paddle.nn.MultiHeadAttention`` block and GELU MLP, LayerNorm, a CTC head that
  applies softmax in eval mode (as PP-OCR's ``CTCHead``): the output is probabilities ``[N, 42, 11]``.
  Opset 14 (HardSwish op; LayerNorm decomposed).
* ``dbseg_p2o``     DB-style segmenter on noisy, blotted digits (``unseen_torch.blotted``): a Conv-BN-ReLU
  encoder (two stride-2 stages), ``Conv2DTranspose``-BN-ReLU upsampling with skip Adds, 1x1 conv and a
  sigmoid in eval mode (DB's probability map); task ``segment`` with ``threshold`` 0.5 in the manifest.
  Opset 11.
* ``dbseg_dynhw_p2o`` the same weights exported with dynamic height and width (``[N, 1, H, W]``, as
  PP-OCR's detectors are), opset 16.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_unseen import BLANK, DIGIT, SEQ_W, Manifest, builder_main, char_accuracy, pools, strings  # numpy only

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-paddle"


def train(model: Any, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, *, seed: int, bs: int = 128,
          loss_fn: Callable[[Any, Any], Any] | None = None) -> None:  # fmt: skip
    """Seeded mini-batch AdamW training with a one-cycle schedule (cross-entropy unless ``loss_fn``);
    ``MAKE_NEW_DRY=1`` trains one epoch on two batches.  Leaves the model in eval mode."""
    import paddle
    import paddle.nn.functional as F  # noqa: N812

    paddle.seed(seed)
    if os.environ.get("MAKE_NEW_DRY"):
        x, y, epochs = x[: 2 * bs], y[: 2 * bs], 1
    n = len(y)
    steps = epochs * (n // bs)
    sched = paddle.optimizer.lr.OneCycleLR(max_learning_rate=lr, total_steps=steps)
    opt = paddle.optimizer.AdamW(learning_rate=sched, parameters=model.parameters(), weight_decay=1e-2)
    rng = np.random.default_rng(seed)
    model.train()
    for ep in range(epochs):
        perm = rng.permutation(n)
        tot = 0.0
        for i in range(n // bs):
            idx = perm[i * bs : (i + 1) * bs]
            out = model(paddle.to_tensor(x[idx]))
            lab = paddle.to_tensor(y[idx])
            loss = loss_fn(out, lab) if loss_fn else F.cross_entropy(out, lab)
            loss.backward()
            opt.step()
            opt.clear_grad()
            sched.step()
            tot += float(loss)
        print(f"  epoch {ep}: loss {tot / max(1, n // bs):.4f}", flush=True)
    model.eval()


def predict(model: Any, x: np.ndarray, batch: int = 500) -> np.ndarray:
    import paddle

    with paddle.no_grad():
        return np.concatenate([model(paddle.to_tensor(x[i : i + batch])).numpy() for i in range(0, len(x), batch)])


def nparams(model: Any) -> int:
    return int(sum(int(np.prod(p.shape)) for p in model.parameters()))


def export(model: Any, path: Path, shape: list[int | None], opset: int | None, name: str = "input") -> int:
    """``model`` to ``path`` by ``paddle.onnx.export`` (``opset``: None for the exporter's default); returns
    the opset the file declares.  Raises when paddle2onnx wrote nothing (it logs its errors and returns)."""
    import onnx
    import paddle

    path.unlink(missing_ok=True)
    kw: dict[str, Any] = {} if opset is None else {"opset_version": opset}
    spec = [paddle.static.InputSpec(list(shape), "float32", name)]
    paddle.onnx.export(model, str(path.with_suffix("")), input_spec=spec, **kw)
    if not path.exists():
        raise RuntimeError(f"{path}: paddle.onnx.export wrote no file (opset {opset})")
    m = onnx.load(str(path))
    return int(next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")))


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    import paddle
    import paddle.nn.functional as F  # noqa: N812
    from paddle import nn
    from paddle.vision.models.resnet import BasicBlock

    paddle.set_device("cpu")
    P = pools(mnist)
    manifest = Manifest(out)
    xtr, ytr = P["train"][0][:n_train], P["train"][1][:n_train]

    def want(name: str) -> bool:
        return only is None or name in only

    images = lambda x: x.reshape(-1, 1, 28, 28)  # noqa: E731
    rows = lambda x: x.reshape(-1, 28, 28).copy()  # noqa: E731

    def classifier(name: str, net: Any, prep: Callable[[np.ndarray], np.ndarray], epochs: int, lr: float,
                   family: str, bn: str, opset: int | None, batch: int | None = None,
                   n: int | None = None) -> None:  # fmt: skip
        """Train ``net`` on the first ``n`` (default all) training images, export it, write its splits
        (labelled) and its manifest entry."""
        if not want(name):
            return
        t0 = time.time()
        print(f"{name}: {nparams(net)} params", flush=True)
        train(net, prep(xtr[:n]), ytr[:n], epochs, lr, seed=seed)
        train_s = round(time.time() - t0, 1)
        splits = {k: prep(P[k][0]) for k in ("calib", "select", "test")}
        acc = float((predict(net, splits["test"]).argmax(-1) == P["test"][1]).mean())
        print(f"  paddle test accuracy {acc:.4f} ({train_s} s)", flush=True)
        got = export(net, out / f"{name}.onnx", [batch, *splits["test"].shape[1:]], opset)
        for split, x in splits.items():
            np.savez(out / f"{name}_{split}.npz", input=x, labels=P[split][1])
        manifest.record(name, dict(
            family=family, exporter="paddle2onnx", opset=got, opset_asked=opset or "default", bn=bn,
            task="classifier", input="input", batch=batch or "dynamic", paddle_test_accuracy=acc,
            params=nparams(net), train_s=train_s))  # fmt: skip

    # ------------------------------------------------------------------ 1. ResNet BasicBlocks
    class ResNet(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2D(1, 16, 3, padding=1, bias_attr=False), nn.BatchNorm2D(16), nn.ReLU())

            def down(cin: int, cout: int) -> nn.Layer:
                return nn.Sequential(nn.Conv2D(cin, cout, 1, stride=2, bias_attr=False), nn.BatchNorm2D(cout))

            self.blocks = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 32, 2, down(16, 32)),
                                        BasicBlock(32, 64, 2, down(32, 64)))  # fmt: skip
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.fc = nn.Linear(64, 10)

        def forward(self, x: Any) -> Any:
            return self.fc(paddle.flatten(self.pool(self.blocks(self.stem(x))), 1))

    paddle.seed(seed)
    classifier("resnet_p2o", ResNet(), images, 2, 3e-3, "ResNet-style CNN of paddle.vision BasicBlocks (Conv-BN-"
               "ReLU-Conv-BN, identity or 1x1 conv+BN downsample, residual Add), global average pool, Linear",
               "BN kept", None, n=6000)  # fmt: skip

    # ------------------------------------------------------------------ 2. MobileNetV3-style
    class SE(nn.Layer):
        def __init__(self, c: int) -> None:
            super().__init__()
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.a, self.b = nn.Conv2D(c, max(8, c // 4), 1), nn.Conv2D(max(8, c // 4), c, 1)

        def forward(self, x: Any) -> Any:
            return x * F.hardsigmoid(self.b(F.relu(self.a(self.pool(x)))), slope=0.2, offset=0.5)

    class InvRes(nn.Layer):
        def __init__(self, cin: int, mid: int, cout: int, k: int, s: int, se: bool, hswish: bool) -> None:
            super().__init__()
            act: Callable[[], nn.Layer] = nn.Hardswish if hswish else nn.ReLU
            self.body = nn.Sequential(
                nn.Conv2D(cin, mid, 1, bias_attr=False), nn.BatchNorm2D(mid), act(),
                nn.Conv2D(mid, mid, k, s, k // 2, groups=mid, bias_attr=False), nn.BatchNorm2D(mid), act(),
                *([SE(mid)] if se else []),
                nn.Conv2D(mid, cout, 1, bias_attr=False), nn.BatchNorm2D(cout))  # fmt: skip
            self.res = s == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            y = self.body(x)
            return x + y if self.res else y

    class MBV3(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2D(1, 16, 3, 2, 1, bias_attr=False), nn.BatchNorm2D(16), nn.Hardswish())
            self.blocks = nn.Sequential(
                InvRes(16, 32, 16, 3, 1, True, False), InvRes(16, 64, 24, 3, 2, False, False),
                InvRes(24, 72, 24, 3, 1, False, False), InvRes(24, 96, 40, 5, 1, True, True),
                InvRes(40, 120, 40, 5, 1, True, True))  # fmt: skip
            self.last = nn.Sequential(nn.Conv2D(40, 120, 1, bias_attr=False), nn.BatchNorm2D(120), nn.Hardswish())
            self.pool = nn.AdaptiveAvgPool2D(1)
            self.head = nn.Sequential(nn.Linear(120, 128), nn.Hardswish(), nn.Linear(128, 10))

        def forward(self, x: Any) -> Any:
            logits = self.head(paddle.flatten(self.pool(self.last(self.blocks(self.stem(x)))), 1))
            return logits if self.training else F.softmax(logits, -1)  # as PP-OCR's ClsHead: softmax at inference

    paddle.seed(seed)
    classifier("mbv3_p2o", MBV3(), images, 2, 5e-3, "MobileNetV3-style: hardswish, inverted residuals (1x1 expand, "
               "depthwise 3x3/5x5, squeeze-excitation ReLU + hardsigmoid, 1x1 project, BN), hardswish head, "
               "softmax at inference",
               "BN kept", 13, n=6000)  # fmt: skip

    # ------------------------------------------------------------------ 3. CRNN + CTC
    class CRNN(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(
                nn.Conv2D(1, 32, 3, padding=1, bias_attr=False), nn.BatchNorm2D(32), nn.ReLU(), nn.MaxPool2D(2),
                nn.Conv2D(32, 64, 3, padding=1, bias_attr=False), nn.BatchNorm2D(64), nn.ReLU(),
                nn.MaxPool2D((2, 1)))  # fmt: skip  # [N, 64, 3, 42]
            self.proj = nn.Linear(64 * 3, 96)
            self.rnn = nn.LSTM(96, 64, direction="bidirect")
            self.head = nn.Linear(128, BLANK + 1)

        def forward(self, x: Any) -> Any:
            f = self.cnn(x)
            seq = paddle.flatten(f.transpose([0, 3, 1, 2]), 2)  # [N, T=42, 192]
            y, _ = self.rnn(F.relu(self.proj(seq)))
            return F.log_softmax(self.head(y), -1)  # [N, T, 11]

    def ctc(lp: Any, lab: Any) -> Any:
        lens = (lab >= 0).astype("int64").sum(1)
        n, t = lp.shape[0], lp.shape[1]
        return F.ctc_loss(lp.transpose([1, 0, 2]), paddle.clip(lab, min=0).astype("int32"),
                          paddle.full([n], t, dtype="int64"), lens, blank=BLANK)  # fmt: skip

    def fit_recogniser(name: str, make: Callable[[], Any], epochs: int) -> tuple[Any, dict[str, Any], float, float]:
        """Train a CTC recogniser on 6,000 digit strings (CTC on the log-probabilities; ``F.ctc_loss``
        softmaxes them itself); its net, calibration/selection/test strings, test char accuracy and
        training seconds."""
        t0 = time.time()
        sx, sy = strings(P["train"], 6000, np.random.default_rng(seed + 11))
        paddle.seed(seed)
        net = make()
        print(f"{name}: {nparams(net)} params", flush=True)
        train(net, sx, sy, epochs, 3e-3, seed=seed, bs=64, loss_fn=ctc)
        train_s = round(time.time() - t0, 1)
        splits = {
            "calib": strings(P["calib"], 256, np.random.default_rng(seed + 1)),
            "select": strings(P["select"], 1000, np.random.default_rng(seed + 2)),
            "test": strings(P["test"], 2000, np.random.default_rng(seed + 3)),
        }
        acc = char_accuracy(predict(net, splits["test"][0]), splits["test"][1])
        print(f"  paddle test char accuracy {acc:.4f} ({train_s} s)", flush=True)
        return net, splits, acc, train_s

    def save_strings(name: str, splits: dict[str, Any]) -> None:
        for split, (x, t) in splits.items():
            arrays = {"image": x} if split == "calib" else {"image": x, "text": t}
            np.savez(out / f"{name}_{split}.npz", **arrays)  # type: ignore[arg-type]

    if want("crnn_lstm_p2o") or want("crnn_lstm_dynw_p2o"):
        net, splits, acc, train_s = fit_recogniser("crnn_lstm_p2o", CRNN, 4)
        for name, shape, opset in (("crnn_lstm_p2o", [None, 1, DIGIT, SEQ_W], None),
                                   ("crnn_lstm_dynw_p2o", [None, 1, DIGIT, None], 11)):  # fmt: skip
            if not want(name):
                continue
            fixed = shape[-1] is not None  # (InputSpec turns None into -1 in place)
            got = export(net, out / f"{name}.onnx", shape, opset, name="image")
            save_strings(name, splits)
            manifest.record(name, dict(
                family="CRNN (Conv-BN-ReLU-pool x2, Linear, paddle.nn.LSTM bidirect, per-step Linear, CTC)"
                + ("" if fixed else "; dynamic width, as PP-OCR's recognisers"),
                exporter="paddle2onnx", opset=got, opset_asked=opset or "default", bn="kept", task="ctc",
                input="image", batch="dynamic", paddle_test_accuracy=acc, params=nparams(net),
                train_s=train_s))  # fmt: skip

    # ------------------------------------------------------------------ 4. Transformer encoder
    class Encoder(nn.Layer):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.emb = nn.Linear(28, d)
            self.pos = self.create_parameter([1, 28, d], default_initializer=nn.initializer.Normal(std=0.02))
            layer = nn.TransformerEncoderLayer(d, 4, 2 * d, dropout=0.0, activation="gelu", normalize_before=True)
            self.enc = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(d))
            self.head = nn.Linear(d, 10)

        def forward(self, x: Any) -> Any:
            return self.head(self.enc(self.emb(x) + self.pos).mean(1))

    paddle.seed(seed)
    classifier("transformer_p2o", Encoder(), rows, 3, 3e-3, "Transformer encoder: two pre-norm paddle.nn."
               "TransformerEncoderLayer (d 64, 4 heads, GELU) over the 28 image rows, learned positions, mean pool",
               "none (LayerNorm)", 17)  # fmt: skip

    # ------------------------------------------------------------------ 5. GRU
    class GRUNet(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(28, 96)
            self.fc = nn.Linear(96, 10)

        def forward(self, x: Any) -> Any:
            y, _ = self.rnn(x)
            return self.fc(y[:, -1])

    paddle.seed(seed)
    classifier("gru_p2o", GRUNet(), rows, 3, 5e-3, "GRU classifier: paddle.nn.GRU over the 28 image rows, last "
               "step, Linear", "none", None)  # fmt: skip

    # ------------------------------------------------------------------ 6. Conv1D
    class TCN(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1D(28, 64, 3, padding=1)
            self.c2 = nn.Conv1D(64, 64, 3, padding=2, dilation=2, groups=4)
            self.bn = nn.BatchNorm1D(64)
            self.dw = nn.Conv1D(64, 64, 3, padding=4, dilation=4, groups=64)
            self.c3 = nn.Conv1D(64, 64, 3, stride=2, padding=1)
            self.fc = nn.Linear(64 * 14, 10)

        def forward(self, x: Any) -> Any:  # [N, 28 rows as channels, 28 steps]
            h = F.relu(self.c1(x))
            h = F.relu(self.bn(self.c2(h)))
            h = h + F.relu(self.dw(h))
            return self.fc(paddle.flatten(F.relu(self.c3(h)), 1))

    paddle.seed(seed)
    classifier("conv1d_p2o", TCN(), rows, 3, 3e-3, "1-D conv net: paddle.nn.Conv1D over the rows as 28 channels "
               "(grouped dilated conv + BN1D, depthwise dilated conv with residual Add, strided conv), Linear",
               "BN1D kept", None, batch=1)  # fmt: skip

    # ------------------------------------------------------------------ 7. SVTR-style recogniser, softmax head
    class SVTR(nn.Layer):
        def __init__(self, d: int = 64) -> None:
            super().__init__()
            self.stem = nn.Sequential(
                nn.Conv2D(1, 32, 3, padding=1, bias_attr=False), nn.BatchNorm2D(32), nn.Hardswish(), nn.MaxPool2D(2),
                nn.Conv2D(32, 64, 3, padding=1, bias_attr=False), nn.BatchNorm2D(64), nn.Hardswish(),
                nn.MaxPool2D((2, 1)))  # fmt: skip  # [N, 64, 3, 42]
            self.proj = nn.Linear(64 * 3, d)
            self.pos = self.create_parameter([1, 42, d], default_initializer=nn.initializer.Normal(std=0.02))
            self.n1, self.n2, self.n3 = nn.LayerNorm(d), nn.LayerNorm(d), nn.LayerNorm(d)
            self.attn = nn.MultiHeadAttention(d, 4)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.head = nn.Linear(d, BLANK + 1)

        def forward(self, x: Any) -> Any:
            t = self.proj(paddle.flatten(self.stem(x).transpose([0, 3, 1, 2]), 2)) + self.pos  # [N, 42, d]
            y = self.n1(t)
            t = t + self.attn(y, y, y)
            t = t + self.mlp(self.n2(t))
            logits = self.head(self.n3(t))
            return logits if self.training else F.softmax(logits, -1)  # PP-OCR's CTC head: softmax at inference

    if want("svtr_ctc_p2o"):
        net, splits, acc, train_s = fit_recogniser("svtr_ctc_p2o", SVTR, 5)
        got = export(net, out / "svtr_ctc_p2o.onnx", [None, 1, DIGIT, SEQ_W], 14, name="image")
        save_strings("svtr_ctc_p2o", splits)
        manifest.record("svtr_ctc_p2o", dict(
            family="SVTR-style recogniser (Conv-BN-hardswish stem, Linear, learned positions, pre-norm "
            "paddle.nn.MultiHeadAttention + GELU MLP, CTC head with softmax at inference)",
            exporter="paddle2onnx", opset=got, opset_asked=14, bn="kept", task="ctc", input="image",
            batch="dynamic", paddle_test_accuracy=acc, params=nparams(net), train_s=train_s))  # fmt: skip

    # ------------------------------------------------------------------ 8. DB-style segmenter, sigmoid map
    def cbr(cin: int, cout: int, s: int = 1) -> nn.Layer:
        return nn.Sequential(nn.Conv2D(cin, cout, 3, s, 1, bias_attr=False), nn.BatchNorm2D(cout), nn.ReLU())

    class DBSeg(nn.Layer):
        def __init__(self) -> None:
            super().__init__()
            self.e1, self.e2, self.e3 = cbr(1, 16), cbr(16, 32, 2), cbr(32, 64, 2)  # 28, 14, 7
            self.u2 = nn.Sequential(nn.Conv2DTranspose(64, 32, 2, 2, bias_attr=False), nn.BatchNorm2D(32), nn.ReLU())
            self.u1 = nn.Sequential(nn.Conv2DTranspose(32, 16, 2, 2, bias_attr=False), nn.BatchNorm2D(16), nn.ReLU())
            self.out = nn.Conv2D(16, 1, 1)

        def forward(self, x: Any) -> Any:
            a = self.e1(x)
            b = self.e2(a)
            h = self.u1(self.u2(self.e3(b)) + b) + a
            logit = self.out(h)
            return logit if self.training else F.sigmoid(logit)  # DB's probability map at inference

    if want("dbseg_p2o") or want("dbseg_dynhw_p2o"):
        from unseen_torch import blotted  # numpy only

        t0 = time.time()
        rng = np.random.default_rng(seed + 7)
        sx, sm = blotted(xtr[:6000], rng)
        paddle.seed(seed)
        net = DBSeg()
        print(f"dbseg_p2o: {nparams(net)} params", flush=True)
        train(net, sx, sm, 2, 3e-3, seed=seed, loss_fn=F.binary_cross_entropy_with_logits)
        train_s = round(time.time() - t0, 1)
        splits = {k: blotted(P[k][0], np.random.default_rng(seed + 20 + i))
                  for i, k in enumerate(("calib", "select", "test"))}  # fmt: skip
        prob = predict(net, splits["test"][0])
        fg, truth = prob > 0.5, splits["test"][1] > 0.5
        iou = float((fg & truth).sum() / (fg | truth).sum())
        print(f"  paddle test foreground IoU {iou:.4f} ({train_s} s)", flush=True)
        for name, shape, opset in (
            ("dbseg_p2o", [None, 1, 28, 28], 11),
            ("dbseg_dynhw_p2o", [None, 1, None, None], 16),
        ):
            if not want(name):
                continue
            fixed = shape[-1] is not None
            got = export(net, out / f"{name}.onnx", shape, opset)
            for split, (x, m) in splits.items():
                arrays = {"input": x} if split == "calib" else {"input": x, "mask": m}
                np.savez(out / f"{name}_{split}.npz", **arrays)  # type: ignore[arg-type]
            manifest.record(name, dict(
                family="DB-style segmenter: Conv-BN-ReLU encoder (two stride 2), Conv2DTranspose-BN-ReLU upsampling "
                "with skip Adds, 1x1 conv, sigmoid probability map at inference"
                + ("" if fixed else "; dynamic height and width, as PP-OCR's detectors"), exporter="paddle2onnx",
                opset=got, opset_asked=opset, bn="kept", task="segment", threshold=0.5, input="input", batch="dynamic",
                paddle_test_accuracy=iou, params=nparams(net), train_s=train_s))  # fmt: skip
    return manifest.entries


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=12000)


if __name__ == "__main__":
    sys.exit(main())
