"""Audit set, part 2: sequence models and a full-integer CNN through TFLite (Keras -> TFLite ->
``tf2onnx --tflite``), in the venv of ``make_unseen_tflite.py``::

    ~/.cache/chita-onnx/tflite-venv/bin/python benchmarks/make_unseen_tflite_seq.py [OUT [names]]

Each 8x8 digit of scikit-learn's digits is 8 time steps of 8 features.  Models: ``lstm`` and ``gru``
(Keras LSTM(32)/GRU(32) -> Dense; TFLite needs a batch-1 copy to convert them with builtin ops,
which it writes as a ``WHILE`` loop: tf2onnx makes it an ONNX ``Loop`` with the kernels stored in
the body), ``conv1d``, and ``cnn_int8`` (the CNN of ``make_unseen_tflite.py``, full-integer
quantized: ``compress`` must refuse it in one line).  OUT defaults to
``~/.cache/chita-onnx/unseen-tflite``.  Results: BENCHMARKS.md, "TFLite exports, part 2".
"""

import collections
import contextlib
import io
import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import tensorflow as tf
from make_unseen_tflite import DEFAULT_OUT, SEED, audit_entry, cnn, digits_split, tf2onnx_convert

OUT = sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT
only = sys.argv[2].split(",") if len(sys.argv) > 2 else None
os.makedirs(OUT, exist_ok=True)
Xtr, Xte, ytr, yte = digits_split()
Xtr4, Xte4 = Xtr[..., None], Xte[..., None]
L = tf.keras.layers


def lstm():
    return tf.keras.Sequential([tf.keras.Input((8, 8)), L.LSTM(32), L.Dense(10, activation="softmax")])


def gru():
    return tf.keras.Sequential([tf.keras.Input((8, 8)), L.GRU(32), L.Dense(10, activation="softmax")])


def conv1d():
    return tf.keras.Sequential(
        [
            tf.keras.Input((8, 8)),
            L.Conv1D(16, 3, activation="relu"),
            L.Conv1D(32, 3, activation="relu"),
            L.GlobalAveragePooling1D(),
            L.Dense(10, activation="softmax"),
        ]
    )


def tfl_ops(tfl):
    """``[(TFLite op, count)]`` of a .tflite file, from TensorFlow's analyzer (its error text if it fails)."""
    try:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            tf.lite.experimental.Analyzer.analyze(model_path=tfl)
        return sorted(collections.Counter(re.findall(r"Op#\d+ (\w+)\(", buf.getvalue())).items())
    except Exception as e:
        return str(e)


info = {}
for name, fn, epochs, x_tr, x_te in [
    ("lstm", lstm, 15, Xtr, Xte),
    ("gru", gru, 15, Xtr, Xte),
    ("conv1d", conv1d, 20, Xtr, Xte),
    ("cnn_int8", cnn, 15, Xtr4, Xte4),
]:
    if only and name not in only:
        continue
    tf.keras.utils.set_random_seed(SEED)
    m = fn()
    m.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    m.fit(x_tr, ytr, epochs=epochs, batch_size=32, verbose=0)
    acc = float(m.evaluate(x_te, yte, verbose=0)[1])
    print(name, "keras test acc", acc, flush=True)
    info[name] = {"keras_acc": acc}
    conv = tf.lite.TFLiteConverter.from_keras_model(m)
    if name == "cnn_int8":

        def rep(x_tr=x_tr):
            for i in range(100):
                yield [x_tr[i : i + 1]]

        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = rep
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    tfl = os.path.join(OUT, f"digits_{name}.tflite")
    try:
        Path(tfl).write_bytes(conv.convert())
    except Exception as e:
        print(name, "default TFLite conversion FAILED:", repr(e)[:300])
        info[name]["default_convert_error"] = repr(e)[:1500]
        # (i) SELECT_TF_OPS variant, kept aside for the record (Flex ops)
        c2 = tf.lite.TFLiteConverter.from_keras_model(m)
        c2.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS, tf.lite.OpsSet.SELECT_TF_OPS]
        c2._experimental_lower_tensor_list_ops = False
        flex = os.path.join(OUT, f"digits_{name}_flex.tflite")
        Path(flex).write_bytes(c2.convert())
        info[name]["flex_tflite_ops"] = tfl_ops(flex)
        info[name]["flex_tf2onnx_rc"] = tf2onnx_convert(flex, flex[:-7] + ".onnx")
        # (ii) same weights, batch fixed at 1: the fused-RNN path needs static shapes
        src = tf.keras.Sequential(
            [tf.keras.Input(x_tr.shape[1:], batch_size=1)]
            + [layer.__class__.from_config(layer.get_config()) for layer in m.layers]
        )
        src.set_weights(m.get_weights())
        conv = tf.lite.TFLiteConverter.from_keras_model(src)
        Path(tfl).write_bytes(conv.convert())
        info[name]["used_batch1"] = True
    info[name]["tflite_ops"] = tfl_ops(tfl)
    print(name, "tflite ops", info[name]["tflite_ops"])
    it = tf.lite.Interpreter(model_path=tfl)
    it.allocate_tensors()
    inp, outp = it.get_input_details()[0], it.get_output_details()[0]
    pred = []
    for x in x_te:
        xx = x[None]
        if inp["dtype"] == np.int8:
            s, z = inp["quantization"]
            xx = np.clip(np.round(xx / s + z), -128, 127).astype(np.int8)
        it.resize_tensor_input(inp["index"], xx.shape) if list(inp["shape"]) != list(xx.shape) else None
        it.set_tensor(inp["index"], xx)
        it.invoke()
        pred.append(int(np.argmax(it.get_tensor(outp["index"]))))
    info[name]["tflite_acc"] = float(np.mean(np.array(pred) == yte))
    print(name, "tflite acc", info[name]["tflite_acc"], flush=True)
    onx = os.path.join(OUT, f"digits_{name}.onnx")
    rc = tf2onnx_convert(tfl, onx)
    info[name]["tf2onnx_rc"] = rc
    if rc:
        continue
    om = onnx.load(onx)

    def allops(g):
        c = collections.Counter()
        for n in g.node:
            c[n.op_type] += 1
            for a in n.attribute:
                if a.g.node:
                    c.update({"[sub]" + k: v for k, v in allops(a.g).items()})
        return c

    info[name]["onnx_ops"] = dict(allops(om.graph))
    iname = om.graph.input[0].name
    shp = [dd.dim_value or dd.dim_param for dd in om.graph.input[0].type.tensor_type.shape.dim]
    itype = om.graph.input[0].type.tensor_type.elem_type
    info[name]["onnx_input"] = [iname, shp, onnx.TensorProto.DataType.Name(itype)]
    print(" onnx input", iname, shp, onnx.TensorProto.DataType.Name(itype), "ops", info[name]["onnx_ops"])
    cal, te, sel = x_tr[:256], x_te, x_tr[256:756]
    if itype == onnx.TensorProto.INT8:
        s, z = inp["quantization"]
        cal, te, sel = (np.clip(np.round(a / s + z), -128, 127).astype(np.int8) for a in (cal, te, sel))
    np.savez(os.path.join(OUT, f"digits_{name}_calib.npz"), **{iname: cal, "labels": ytr[:256]})
    np.savez(os.path.join(OUT, f"digits_{name}_test.npz"), **{iname: te, "labels": yte})
    audit_entry(OUT, name, iname, sel, ytr[256:756], acc)
    Path(OUT, f"build_info_{name}.json").write_text(json.dumps(info[name], indent=1))
print(json.dumps(info, indent=1))
