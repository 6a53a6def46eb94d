"""Build the JAX half of the "unseen architectures" audit: small Flax NNX models, trained briefly on
real data, exported with jax2onnx.

Runs in its own virtual environment (never the project's)::

    python3.11 -m venv ~/.cache/chita-onnx/jax-venv
    ~/.cache/chita-onnx/jax-venv/bin/pip install "jax[cpu]==0.10.2" jax2onnx==0.17.1 flax==0.12.8
    OMP_NUM_THREADS=1 ~/.cache/chita-onnx/jax-venv/bin/python benchmarks/make_unseen_jax.py

Writes into ``--out`` (default ``~/.cache/chita-onnx/unseen-keras``, next to the Keras models) in the
layout of ``make_unseen.py``, so that ``bench_unseen.py --dir`` audits both. Same MNIST pools, images
channels-last ``[N, 28, 28, 1]``, sequences ``[N, 28, 28]``; seeded; opset 17 (onnxruntime 1.19.2
reads up to 21; jax2onnx's default is 23).

* ``j_resnet`` CNN: Conv+BatchNorm+ReLU stem (16), two residual blocks, a stride-2 Conv+BN (32),
  mean pool, Linear (jax2onnx keeps BatchNormalization nodes, between NHWC↔NCHW Transposes).
* ``j_attn``   rows as 28 tokens: Linear embedding + learned positions, one pre-norm block of
  ``nnx.MultiHeadAttention`` (4 heads) and a GELU MLP with LayerNorm, mean pool, Linear.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_unseen import builder_main, pools  # numpy only

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-keras"


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> None:
    import jax
    import onnx
    import optax
    from flax import nnx

    P = pools(mnist)
    mpath = out / "manifest.json"
    manifest: dict[str, Any] = json.loads(mpath.read_text()) if mpath.exists() else {}
    xtr, ytr = P["train"][0][:n_train], P["train"][1][:n_train]

    def bn(c: int, rngs: nnx.Rngs) -> nnx.BatchNorm:  # momentum 0.9: statistics catch up in a few hundred steps
        return nnx.BatchNorm(c, momentum=0.9, rngs=rngs)

    class Block(nnx.Module):
        def __init__(self, c: int, rngs: nnx.Rngs) -> None:
            self.c1, self.b1 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs), bn(c, rngs)
            self.c2, self.b2 = nnx.Conv(c, c, (3, 3), use_bias=False, rngs=rngs), bn(c, rngs)

        def __call__(self, x: Any) -> Any:
            return nnx.relu(x + self.b2(self.c2(nnx.relu(self.b1(self.c1(x))))))

    class ResNet(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.stem, self.bn = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs), bn(16, rngs)
            self.blocks = nnx.List([Block(16, rngs), Block(16, rngs)])
            self.down = nnx.Conv(16, 32, (3, 3), strides=2, use_bias=False, rngs=rngs)
            self.bn2 = bn(32, rngs)
            self.fc = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            x = nnx.relu(self.bn(self.stem(x)))
            for b in self.blocks:
                x = b(x)
            return self.fc(nnx.relu(self.bn2(self.down(x))).mean(axis=(1, 2)))

    class Attn(nnx.Module):
        def __init__(self, rngs: nnx.Rngs, d: int = 64) -> None:
            self.embed = nnx.Linear(28, d, rngs=rngs)
            self.pos = nnx.Param(jax.random.normal(rngs.params(), (1, 28, d)) * 0.02)
            self.n1, self.n2, self.n3 = (nnx.LayerNorm(d, rngs=rngs) for _ in range(3))
            self.mha = nnx.MultiHeadAttention(4, d, decode=False, rngs=rngs)
            self.f1, self.f2 = nnx.Linear(d, 128, rngs=rngs), nnx.Linear(128, d, rngs=rngs)
            self.fc = nnx.Linear(d, 10, rngs=rngs)

        def __call__(self, x: Any) -> Any:
            x = self.embed(x) + self.pos[...]
            h = self.n1(x)
            x = x + self.mha(h, h, h)
            x = x + self.f2(nnx.gelu(self.f1(self.n2(x))))
            return self.fc(self.n3(x).mean(axis=1))

    def train(model: nnx.Module, shape: tuple[int, ...], epochs: int, lr: float) -> float:
        steps = epochs * (len(xtr) // 128)
        opt = nnx.Optimizer(model, optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4),
                            wrt=nnx.Param)  # fmt: skip

        @nnx.jit
        def step(model: nnx.Module, opt: nnx.Optimizer, x: Any, y: Any) -> Any:
            def loss(m: nnx.Module) -> Any:
                return optax.softmax_cross_entropy_with_integer_labels(m(x), y).mean()

            v, g = nnx.value_and_grad(loss)(model)
            opt.update(model, g)
            return v

        rng = np.random.default_rng(seed)
        model.train()
        for _ in range(epochs):
            perm = rng.permutation(len(xtr))
            for i in range(len(xtr) // 128):
                idx = perm[i * 128 : (i + 1) * 128]
                step(model, opt, xtr[idx].reshape(-1, *shape), ytr[idx])
        model.eval()
        xt, yt = P["test"]
        pred = np.concatenate([np.asarray(model(xt[i : i + 500].reshape(-1, *shape))) for i in range(0, len(xt), 500)])
        return float((pred.argmax(-1) == yt).mean())

    def finish(name: str, model: nnx.Module, shape: tuple[int, ...], family: str, t0: float, acc: float) -> None:
        path = out / f"{name}.onnx"
        to_onnx(model, [("N", *shape)], opset=17, input_names=["input"], output_names=["logits"],
                return_mode="file", output_path=str(path))  # fmt: skip
        for split in ("calib", "select", "test"):
            x, y = P[split]
            np.savez(out / f"{name}_{split}.npz", input=x.reshape(len(x), *shape), labels=y)
        ops = sorted({n.op_type for n in onnx.load(str(path)).graph.node})
        from importlib.metadata import version

        manifest[name] = dict(family=family, exporter=f"jax2onnx {version('jax2onnx')} (jax {jax.__version__}, "
                              f"flax {version('flax')})", opset=17, task="classifier", input="input",
                              jax_test_accuracy=acc, train_s=round(time.time() - t0, 1), ops=ops)  # fmt: skip
        mpath.write_text(json.dumps(manifest, indent=2))
        print(f"{name}: {manifest[name]}", flush=True)

    from jax2onnx import to_onnx

    if only is None or "j_resnet" in only:
        t0 = time.time()
        m = ResNet(nnx.Rngs(seed))
        acc = train(m, (28, 28, 1), epochs=3, lr=3e-3)
        finish("j_resnet", m, (28, 28, 1), "Flax NNX CNN (Conv+BatchNorm, two residual blocks, strided conv)", t0, acc)
    if only is None or "j_attn" in only:
        t0 = time.time()
        m = Attn(nnx.Rngs(seed))
        acc = train(m, (28, 28), epochs=3, lr=2e-3)
        finish("j_attn", m, (28, 28), "Flax NNX attention block (MultiHeadAttention, LayerNorm, GELU MLP)", t0, acc)


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=20000)


if __name__ == "__main__":
    sys.exit(main())
