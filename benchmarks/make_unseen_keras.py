"""Build the Keras half of the "unseen architectures" audit: small Keras 3 models of families nobody on
the team developed on, trained briefly on real data, exported with tf2onnx.

Runs in its own TensorFlow virtual environment (never the project's: tensorflow must not meet
onnxruntime-training)::

    python3.11 -m venv ~/.cache/chita-onnx/tf-venv
    ~/.cache/chita-onnx/tf-venv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0
    OMP_NUM_THREADS=1 ~/.cache/chita-onnx/tf-venv/bin/python benchmarks/make_unseen_keras.py [--only a,b]

Everything goes to ``--out`` (default ``~/.cache/chita-onnx/unseen-keras``) in the layout of
``make_unseen.py`` (``<model>.onnx``, ``<model>_{calib,select,test}.npz``, ``manifest.json``), so that
``bench_unseen.py --dir ~/.cache/chita-onnx/unseen-keras`` audits it. Same disjoint MNIST pools
(calibration 256 labelled, selection 1,000, training, test 5,000), same pixel normalisation; images are
channels-last ``[N, 28, 28, 1]`` (Keras' layout: tf2onnx writes the NHWC→NCHW Transpose into the
graph), sequences ``[N, 28, 28]`` (rows as time steps). Seeded (``--seed``); one CPU thread.

Models (name: family; tf2onnx opset; what it stresses):

* ``k_resnet``      ResNet-style CNN: Conv2D+BatchNormalization+ReLU, three residual stages (16/32/64)
  with 1×1 projection shortcuts on stride 2, residual ``Add``; opset 13 (tf2onnx folds BN into Conv).
* ``k_mobilenet``   MobileNet-like: DepthwiseConv2D + BN + ReLU6, SeparableConv2D, inverted residual
  block with expansion (1×1 → depthwise → 1×1) and a residual add, GlobalAveragePooling; opset 15.
* ``k_lstm``        LSTM(64) over the 28 image rows (last state) → Dense; opset 15.
* ``k_gru``         bidirectional GRU(48) over the rows (full sequence) → Dense on the 3-D tensor →
  GlobalAveragePooling1D → Dense; opset 17.
* ``k_transformer`` one pre-norm Transformer block: Dense embedding of the rows, learned positions,
  MultiHeadAttention (4 heads, EinsumDense projections) + LayerNormalization, a tanh-GELU feed-forward of
  Dense layers on the 3-D tensor, mean pool; opset 17.
* ``k_conv1d``      Conv1D net over the rows (28 channels): Conv1D, dilated Conv1D, SeparableConv1D
  with a residual add, strided Conv1D, BN, Flatten + Dense; opset 13.

``UNSEEN_OPSET=9`` (for example) in the environment exports every model at that opset instead: the
legacy-opset twin of the set, as older tf2onnx conversions in model zoos are (rebuild it into another
``--out``).
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_unseen import builder_main, pools  # numpy only

OUT = Path.home() / ".cache" / "chita-onnx" / "unseen-keras"


def build(only: set[str] | None, out: Path, seed: int, mnist: Path, n_train: int) -> dict[str, Any]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    import tf2onnx
    from keras import layers

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    P = pools(mnist)
    manifest: dict[str, Any] = {}
    mpath = out / "manifest.json"
    if mpath.exists():
        manifest = json.loads(mpath.read_text())
    xtr, ytr = P["train"][0][:n_train], P["train"][1][:n_train]

    def want(name: str) -> bool:
        return only is None or name in only

    def train(model: keras.Model, shape: tuple[int, ...], epochs: int, lr: float) -> float:
        keras.utils.set_random_seed(seed)
        steps = epochs * (len(xtr) // 128)
        sched = keras.optimizers.schedules.CosineDecay(lr, steps, warmup_target=None)
        model.compile(optimizer=keras.optimizers.AdamW(sched, weight_decay=1e-4),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))  # fmt: skip
        model.fit(xtr.reshape(-1, *shape), ytr, batch_size=128, epochs=epochs, shuffle=True, verbose=0)
        xt, yt = P["test"]
        return float((model.predict(xt.reshape(-1, *shape), batch_size=500, verbose=0).argmax(-1) == yt).mean())

    def export(model: keras.Model, name: str, shape: tuple[int, ...], opset: int) -> str:
        spec = (tf.TensorSpec((None, *shape), tf.float32, name="input"),)
        path = str(out / f"{name}.onnx")
        try:
            tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset, output_path=path)
            return "tf2onnx.from_keras"
        except Exception as exc:  # Keras 3 layers from_keras cannot trace: go through a tf.function
            print(f"{name}: from_keras failed ({type(exc).__name__}: {str(exc)[:200]}); from_function", flush=True)
            fn = tf.function(lambda x: model(x, training=False))
            tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset, output_path=path)
            return "tf2onnx.from_function"

    def save_split(name: str, shape: tuple[int, ...]) -> None:
        for split in ("calib", "select", "test"):
            x, y = P[split]
            np.savez(out / f"{name}_{split}.npz", input=x.reshape(len(x), *shape), labels=y)

    def finish(name: str, model: keras.Model, shape: tuple[int, ...], opset: int, family: str, t0: float,
               acc: float) -> None:  # fmt: skip
        opset = int(os.environ.get("UNSEEN_OPSET") or opset)  # the legacy-opset twin of the set
        how = export(model, name, shape, opset)
        save_split(name, shape)
        import onnx

        ops = sorted({n.op_type for n in onnx.load(str(out / f"{name}.onnx")).graph.node})
        manifest[name] = dict(family=family, exporter=f"{how} {tf2onnx.__version__} (tf {tf.__version__}, "
                              f"keras {keras.__version__})", opset=opset, task="classifier", input="input",
                              keras_test_accuracy=acc, train_s=round(time.time() - t0, 1), ops=ops)  # fmt: skip
        mpath.write_text(json.dumps(manifest, indent=2))
        print(f"{name}: {manifest[name]}", flush=True)

    img, seq = (28, 28, 1), (28, 28)

    def bn() -> Any:  # momentum 0.9: the moving statistics must catch up within a few hundred steps
        return layers.BatchNormalization(momentum=0.9)

    # ---------------------------------------------------------------- 1. ResNet-style CNN
    if want("k_resnet"):
        t0 = time.time()
        keras.utils.set_random_seed(seed)

        def cbr(x: Any, c: int, stride: int = 1, relu: bool = True) -> Any:
            x = layers.Conv2D(c, 3, stride, padding="same", use_bias=False)(x)
            x = bn()(x)
            return layers.ReLU()(x) if relu else x

        inp = keras.Input(img, name="input")
        x = cbr(inp, 16)
        for c, stride in ((16, 1), (32, 2), (64, 2)):
            y = cbr(cbr(x, c, stride), c, relu=False)
            s = x
            if stride != 1 or x.shape[-1] != c:
                s = bn()(layers.Conv2D(c, 1, stride, use_bias=False)(x))
            x = layers.ReLU()(layers.Add()([y, s]))
        x = layers.GlobalAveragePooling2D()(x)
        m = keras.Model(inp, layers.Dense(10, name="logits")(x))
        acc = train(m, img, epochs=3, lr=3e-3)
        finish("k_resnet", m, img, 13, "ResNet-style CNN (Conv+BN, residual adds, 1×1 projections)", t0, acc)

    # ---------------------------------------------------------------- 2. MobileNet-like
    if want("k_mobilenet"):
        t0 = time.time()
        keras.utils.set_random_seed(seed)
        inp = keras.Input(img, name="input")
        x = layers.ReLU(6.0)(bn()(layers.Conv2D(16, 3, padding="same", use_bias=False)(inp)))
        x = layers.ReLU(6.0)(bn()(layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)))
        x = layers.ReLU(6.0)(bn()(layers.SeparableConv2D(32, 3, 2, padding="same")(x)))
        for _ in range(2):  # inverted residual, expansion 4
            y = layers.ReLU(6.0)(bn()(layers.Conv2D(128, 1, use_bias=False)(x)))
            y = layers.DepthwiseConv2D(3, padding="same", use_bias=False)(y)
            y = layers.ReLU(6.0)(bn()(y))
            y = bn()(layers.Conv2D(32, 1, use_bias=False)(y))
            x = layers.Add()([x, y])
        x = layers.ReLU(6.0)(bn()(layers.SeparableConv2D(64, 3, 2, padding="same")(x)))
        x = layers.GlobalAveragePooling2D()(x)
        m = keras.Model(inp, layers.Dense(10, name="logits")(x))
        acc = train(m, img, epochs=3, lr=3e-3)
        finish("k_mobilenet", m, img, 15, "MobileNet-like (DepthwiseConv2D, SeparableConv2D, inverted residual, "
               "ReLU6)", t0, acc)  # fmt: skip

    # ---------------------------------------------------------------- 3. LSTM over rows
    if want("k_lstm"):
        t0 = time.time()
        keras.utils.set_random_seed(seed)
        inp = keras.Input(seq, name="input")
        x = layers.LSTM(64)(inp)
        m = keras.Model(inp, layers.Dense(10, name="logits")(x))
        acc = train(m, seq, epochs=2, lr=5e-3)
        finish("k_lstm", m, seq, 15, "LSTM(64) over the 28 rows, last state → Dense", t0, acc)

    # ---------------------------------------------------------------- 4. bidirectional GRU
    if want("k_gru"):
        t0 = time.time()
        keras.utils.set_random_seed(seed)
        inp = keras.Input(seq, name="input")
        x = layers.Bidirectional(layers.GRU(48, return_sequences=True))(inp)
        x = layers.Dense(64, activation="relu")(x)  # Dense on a 3-D tensor
        x = layers.GlobalAveragePooling1D()(x)
        m = keras.Model(inp, layers.Dense(10, name="logits")(x))
        acc = train(m, seq, epochs=2, lr=5e-3)
        finish("k_gru", m, seq, 17, "bidirectional GRU(48) over rows → Dense on 3-D → mean pool", t0, acc)

    # ---------------------------------------------------------------- 5. Transformer block
    if want("k_transformer"):
        t0 = time.time()
        keras.utils.set_random_seed(seed)

        class AddPosition(layers.Layer):
            def build(self, shape: Any) -> None:
                self.pos = self.add_weight(shape=(1, shape[1], shape[2]), initializer="random_normal")

            def call(self, x: Any) -> Any:
                return x + self.pos

        def gelu_tanh(x: Any) -> Any:  # tf2onnx 1.17 has no Erfc: the exact GELU would not export
            return keras.activations.gelu(x, approximate=True)

        d = 64
        inp = keras.Input(seq, name="input")
        x = AddPosition()(layers.Dense(d)(inp))
        for _ in range(2):
            h = layers.LayerNormalization(epsilon=1e-5)(x)
            x = x + layers.MultiHeadAttention(4, d // 4)(h, h)
            h = layers.LayerNormalization(epsilon=1e-5)(x)
            x = x + layers.Dense(d)(layers.Dense(128, activation=gelu_tanh)(h))
        x = layers.GlobalAveragePooling1D()(layers.LayerNormalization(epsilon=1e-5)(x))
        m = keras.Model(inp, layers.Dense(10, name="logits")(x))
        acc = train(m, seq, epochs=2, lr=2e-3)
        finish("k_transformer", m, seq, 17, "Transformer (2 pre-norm blocks, MultiHeadAttention/EinsumDense, "
               "LayerNormalization, GELU)", t0, acc)  # fmt: skip

    # ---------------------------------------------------------------- 6. Conv1D
    if want("k_conv1d"):
        t0 = time.time()
        keras.utils.set_random_seed(seed)
        inp = keras.Input(seq, name="input")
        x = layers.ReLU()(bn()(layers.Conv1D(64, 3, padding="same", use_bias=False)(inp)))
        x = layers.Conv1D(64, 3, padding="same", dilation_rate=2, activation="relu")(x)
        x = x + layers.SeparableConv1D(64, 5, padding="same", activation="relu")(x)
        x = layers.Conv1D(96, 3, strides=2, activation="relu")(x)
        m = keras.Model(inp, layers.Dense(10, name="logits")(layers.Flatten()(x)))
        acc = train(m, seq, epochs=2, lr=3e-3)
        finish("k_conv1d", m, seq, 13, "Conv1D net (BN, dilated, SeparableConv1D residual, strided, Flatten)", t0,
               acc)  # fmt: skip
    return manifest


def main() -> int:
    return builder_main(__doc__, OUT, build, n_train=20000)


if __name__ == "__main__":
    sys.exit(main())
