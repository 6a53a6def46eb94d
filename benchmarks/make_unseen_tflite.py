"""Audit set: Keras models that reach ONNX through TFLite (Keras -> TFLite -> ``tf2onnx --tflite``).

Runs in its own virtual environment, never the project's (TensorFlow and tf2onnx pin their own onnx
and protobuf)::

    python3 -m venv ~/.cache/chita-onnx/tflite-venv
    ~/.cache/chita-onnx/tflite-venv/bin/pip install tensorflow-cpu==2.21.0 tf2onnx==1.17.0 onnx scikit-learn
    ~/.cache/chita-onnx/tflite-venv/bin/python benchmarks/make_unseen_tflite.py [OUT]

Trains, seeded and on one thread, a CNN (Conv, Conv+BatchNorm, Dense), an MLP and a depthwise block
on scikit-learn's digits (8x8, 1297 train / 500 test, stratified, seed 0), converts each to float32
TFLite, a float16-weight TFLite (the CNN) and a batch-1 TFLite (the CNN, same weights), and each
TFLite to ONNX at opset 13.  Writes ``digits_<name>.onnx`` with ``digits_<name>_calib.npz`` (256
training samples and labels, keyed by the ONNX input name) and ``digits_<name>_test.npz`` (the 500
test samples) to OUT (default ``~/.cache/chita-onnx/unseen-tflite``), and the Keras and TFLite
accuracies to ``build_info.json``.  About a minute.  Results: BENCHMARKS.md, "TFLite exports".
"""

import json
import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import onnx
import tensorflow as tf
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

DEFAULT_OUT = os.path.expanduser("~/.cache/chita-onnx/unseen-tflite")
SEED = 0
tf.keras.utils.set_random_seed(SEED)
tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.threading.set_inter_op_parallelism_threads(1)


def digits_split():
    """scikit-learn's digits in [0, 1], ``(n, 8, 8)``: 1297 train / 500 test, stratified, seed 0."""
    d = load_digits()
    X = (d.images / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return train_test_split(X, y, test_size=500, random_state=SEED, stratify=y)


def cnn():
    L = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 1)),
            L.Conv2D(16, 3, padding="same", activation="relu"),
            L.Conv2D(32, 3, padding="same", use_bias=False),
            L.BatchNormalization(),
            L.ReLU(),
            L.MaxPooling2D(2),
            L.Flatten(),
            L.Dense(64, activation="relu"),
            L.Dense(10, activation="softmax"),
        ]
    )


def mlp():
    L = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 1)),
            L.Flatten(),
            L.Dense(64, activation="relu"),
            L.Dense(32, activation="relu"),
            L.Dense(10, activation="softmax"),
        ]
    )


def dw():
    L = tf.keras.layers
    return tf.keras.Sequential(
        [
            tf.keras.Input((8, 8, 1)),
            L.Conv2D(16, 3, padding="same", activation="relu"),
            L.DepthwiseConv2D(3, padding="same"),
            L.BatchNormalization(),
            L.ReLU(),
            L.Conv2D(32, 1, activation="relu"),
            L.GlobalAveragePooling2D(),
            L.Dense(10, activation="softmax"),
        ]
    )


def audit_entry(out: str, name: str, iname: str, x_sel: np.ndarray, y_sel: np.ndarray, keras_acc: float) -> None:
    """Make ``digits_<name>`` auditable by ``bench_unseen.py --dir OUT`` / ``bench_unlabelled.py``: its
    ``_select.npz`` (training samples after the 256 of calibration; the models saw them) and its
    ``manifest.json`` entry."""
    from make_unseen import Manifest  # numpy only

    np.savez(os.path.join(out, f"digits_{name}_select.npz"), **{iname: x_sel, "labels": y_sel})
    Manifest(Path(out)).record(
        f"digits_{name}",
        {"exporter": "tf2onnx --tflite", "opset": 13, "task": "classifier", "input": iname, "dense_keras": keras_acc},
    )


def tf2onnx_convert(tfl, onx):
    r = subprocess.run(
        [sys.executable, "-m", "tf2onnx.convert", "--tflite", tfl, "--output", onx, "--opset", "13"],
        capture_output=True,
        text=True,
    )
    log = onx + ".tf2onnx.log"
    Path(log).write_text(r.stdout + r.stderr)
    print("tf2onnx", os.path.basename(tfl), "rc", r.returncode)
    if r.returncode:
        print(r.stderr[-2000:])
    return r.returncode


def main(OUT):
    os.makedirs(OUT, exist_ok=True)
    Xtr, Xte, ytr, yte = digits_split()
    np.savez(os.path.join(OUT, "split.npz"), Xtr=Xtr, Xte=Xte, ytr=ytr, yte=yte)
    Xtr4, Xte4 = Xtr[..., None], Xte[..., None]  # NHWC
    info = {}
    for name, fn, epochs in [("cnn", cnn, 15), ("mlp", mlp, 30), ("dw", dw, 25)]:
        tf.keras.utils.set_random_seed(SEED)
        m = fn()
        m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
        m.fit(Xtr4, ytr, epochs=epochs, batch_size=32, verbose=0)
        acc = float(m.evaluate(Xte4, yte, verbose=0)[1])
        print(name, "keras test acc", acc)
        info[name] = {"keras_acc": acc}
        m.save(os.path.join(OUT, f"digits_{name}.keras"))
        variants = [("", None)]
        if name == "cnn":
            variants += [("_fp16", "fp16"), ("_b1", "b1")]
        for suf, q in variants:
            src = m
            if q == "b1":  # same weights, input batch fixed at 1
                src = tf.keras.Sequential(
                    [tf.keras.Input((8, 8, 1), batch_size=1)]
                    + [layer.__class__.from_config(layer.get_config()) for layer in m.layers]
                )
                src.set_weights(m.get_weights())
            conv = tf.lite.TFLiteConverter.from_keras_model(src)
            if q == "fp16":
                conv.optimizations = [tf.lite.Optimize.DEFAULT]
                conv.target_spec.supported_types = [tf.float16]
            tfl = os.path.join(OUT, f"digits_{name}{suf}.tflite")
            Path(tfl).write_bytes(conv.convert())
            # TFLite interpreter accuracy
            it = tf.lite.Interpreter(model_path=tfl)
            it.allocate_tensors()
            inp, outp = it.get_input_details()[0], it.get_output_details()[0]
            pred = []
            for x in Xte4:  # batch 1 even for dynamic-batch models
                it.set_tensor(inp["index"], x[None])
                it.invoke()
                pred.append(int(np.argmax(it.get_tensor(outp["index"]))))
            info[name + suf + "_tflite_acc"] = float(np.mean(np.array(pred) == yte))
            onx = os.path.join(OUT, f"digits_{name}{suf}.onnx")
            if tf2onnx_convert(tfl, onx):
                continue
            om = onnx.load(onx)
            iname = om.graph.input[0].name
            shp = [dd.dim_value or dd.dim_param for dd in om.graph.input[0].type.tensor_type.shape.dim]
            print(" onnx input", iname, shp, "outputs", [o.name for o in om.graph.output])
            xs = Xtr4[:256] if len(shp) == 4 else Xtr[:256]
            np.savez(os.path.join(OUT, f"digits_{name}{suf}_calib.npz"), **{iname: xs[:256], "labels": ytr[:256]})
            np.savez(
                os.path.join(OUT, f"digits_{name}{suf}_test.npz"),
                **{iname: Xte4 if len(shp) == 4 else Xte, "labels": yte},
            )
            audit_entry(OUT, name + suf, iname, (Xtr4 if len(shp) == 4 else Xtr)[256:756], ytr[256:756], acc)

    Path(OUT, "build_info.json").write_text(json.dumps(info, indent=1))
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
