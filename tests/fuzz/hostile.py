"""A seeded generator of hostile inputs for every chita-onnx command.

Each :class:`Case` builds its own files in an empty case folder — inputs under ``in/``, outputs
expected under ``out/`` — and returns the command line to run there (``cwd`` = the case folder).
``test_fuzz.py`` runs every case and checks the promise: exit 1 or 2, exactly one ``error:`` line,
no traceback, no internal error, inputs byte-identical, nothing new on disk, bounded time and memory.

The classes (``Case.cls``) follow issue 11: malformed protobuf, checker failures, cycles, NaN/Inf
weights, fp16/bf16, quantized ops, external data that escapes / is missing / is truncated, huge
declared dims, sparse-initializer traps, hostile model paths, every ``.npz`` trap, every flag at and
past its limits, and every output-path collision.  Random parts (bytes, cut points, bit flips) come
from one seed, so a failure reproduces.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SEED = 11
D_IN, HIDDEN, CLASSES, N = 6, 8, 3, 32
COMMANDS = ("compress", "evaluate", "gradients", "inspect", "sweep")
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
#: A folder nobody can create files in, root included (a read-only chmod does not stop root).
UNWRITABLE = "/sys/kernel" if Path("/sys/kernel").is_dir() else "/proc"

Build = Callable[[Path], list[str]]


@dataclass(frozen=True)
class Case:
    """One hostile run.  ``codes``: the exit codes that are correct; ``needles``: text the error
    line must contain (the flag, file or tensor at fault); ``outputs``: files a successful run
    (exit 0) must create, relative to the case folder."""

    id: str
    cls: str
    build: Build
    codes: tuple[int, ...] = (1,)
    needles: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    may_succeed: bool = False
    slow: bool = False


# ------------------------------------------------------------------------------------------ models


def mlp(seed: int = 0, *, dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """x[N,6] → MatMul W1 → Add b1 → Relu → Gemm(W2, b2, transB=1) → logits[N,3]."""
    rng = np.random.default_rng(seed)
    np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
    arrays = {
        "W1": rng.standard_normal((D_IN, HIDDEN)) / np.sqrt(D_IN),
        "b1": 0.1 * rng.standard_normal(HIDDEN),
        "W2": rng.standard_normal((CLASSES, HIDDEN)) / np.sqrt(HIDDEN),
        "b2": 0.1 * rng.standard_normal(CLASSES),
    }
    inits = [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()]
    if dtype != TensorProto.FLOAT:
        inits = [
            helper.make_tensor(k, dtype, a.shape, a.astype(np.float32).ravel().tolist()) for k, a in arrays.items()
        ]
        del np_dtype
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu1"),
        helper.make_node("Gemm", ["h2", "W2", "b2"], ["logits"], name="fc2", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", dtype, ["N", D_IN])],
        [helper.make_tensor_value_info("logits", dtype, ["N", CLASSES])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fuzz")
    model.ir_version = 10
    return model


def cnn(seed: int = 0) -> onnx.ModelProto:
    """x[N,2,6,6] → Conv → BatchNormalization → Relu → MaxPool → Flatten → Gemm → logits[N,3] (a second
    base for random mutations: more ops on the path from the weights to the loss)."""
    rng = np.random.default_rng(seed)
    arrays = {
        "conv.weight": 0.5 * rng.standard_normal((4, 2, 3, 3)),
        "conv.bias": 0.1 * rng.standard_normal(4),
        "bn.scale": 1 + 0.1 * rng.standard_normal(4),
        "bn.bias": 0.1 * rng.standard_normal(4),
        "bn.mean": 0.1 * rng.standard_normal(4),
        "bn.var": 0.5 + rng.random(4),
        "fc.weight": 0.3 * rng.standard_normal((CLASSES, 36)),
        "fc.bias": 0.1 * rng.standard_normal(CLASSES),
    }
    nodes = [
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.scale", "bn.bias", "bn.mean", "bn.var"], ["b"], name="bn"),
        helper.make_node("Relu", ["b"], ["r"], name="relu"),
        helper.make_node("MaxPool", ["r"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.weight", "fc.bias"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, 6, 6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", CLASSES])],
        [numpy_helper.from_array(a.astype(np.float32), k) for k, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fuzz")
    model.ir_version = 10
    return model


def _init(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def _set(model: onnx.ModelProto, name: str, array: np.ndarray) -> onnx.ModelProto:
    _init(model, name).CopyFrom(numpy_helper.from_array(array, name))
    return model


def _weights(model: onnx.ModelProto, name: str) -> np.ndarray:
    return numpy_helper.to_array(_init(model, name)).copy()


def save(model: onnx.ModelProto, path: Path) -> None:
    path.write_bytes(model.SerializeToString())


def data(path: Path, *, n: int = N, seed: int = 1, labels: bool = True, **override: object) -> None:
    """Calibration data for :func:`mlp`: ``x`` (n, 6) float32 and ``labels`` (n,) int64."""
    rng = np.random.default_rng(seed)
    arrays: dict[str, object] = {"x": rng.standard_normal((n, D_IN)).astype(np.float32)}
    if labels:
        arrays["labels"] = rng.integers(0, CLASSES, n).astype(np.int64)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})  # type: ignore[arg-type]


def _bytes(path: Path, payload: bytes) -> None:
    path.write_bytes(payload)


def _rng(*key: object) -> np.random.Generator:
    return np.random.default_rng([SEED, *(zlib.crc32(str(k).encode()) for k in key)])


# ------------------------------------------------------------------------------------ command lines

M, D, E = "in/m.onnx", "in/d.npz", "in/e.npz"


def command(cmd: str, model: str = M, dat: str = D, extra: Sequence[str] = ()) -> list[str]:
    """The command line of ``cmd`` on a model and data, with outputs under ``out/``."""
    if cmd == "compress":
        return ["compress", model, "out/o.onnx", "--data", dat, "--num-samples", "24", *extra]
    if cmd == "evaluate":
        return ["evaluate", model, "--data", dat, *extra]
    if cmd == "gradients":
        return ["gradients", model, "--data", dat, "--out", "out/g.npy", *extra]
    if cmd == "inspect":
        return ["inspect", model, *extra]
    if cmd == "sweep":
        return ["sweep", model, "--data", dat, "--methods", "magnitude,chita", "--sparsities", "0.5", "--out", "out/s"]
    raise ValueError(cmd)


def _standard(d: Path, model: onnx.ModelProto | None = None) -> None:
    """A valid model and valid data in ``in/`` (the usual background of a case)."""
    save(model if model is not None else mlp(), d / M)
    data(d / D)


# ------------------------------------------------------------------------------ hostile models


def _truncated(k: int) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        full = mlp().SerializeToString()
        graph = mlp().graph.SerializeToString()
        start = full.find(graph)
        cut = int(_rng("truncate", k).integers(start + 1, start + len(graph) - 1))
        _bytes(d / M, full[:cut])  # cut inside the length-delimited graph field: never a valid prefix

    return make


def _bitflip(k: int) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        raw = bytearray(mlp().SerializeToString())
        rng = _rng("bitflip", k)
        for pos in rng.integers(0, len(raw), 1 + k % 3):
            raw[int(pos)] ^= 1 << int(rng.integers(0, 8))
        _bytes(d / M, bytes(raw))

    return make


def _edit(fn: Callable[[onnx.ModelProto], object]) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        model = mlp()
        fn(model)
        save(model, d / M)

    return make


def _cycle(m: onnx.ModelProto) -> None:
    m.graph.node[0].input[0] = "h2"


def _self_loop(m: onnx.ModelProto) -> None:
    m.graph.node[2].input[0] = "h2"


def _unknown_op(m: onnx.ModelProto) -> None:
    m.graph.node[2].op_type = "NoSuchOp"


def _undefined_input(m: onnx.ModelProto) -> None:
    m.graph.node[1].input[1] = "ghost"


def _dup_init(m: onnx.ModelProto) -> None:
    m.graph.initializer.append(numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "b1"))


def _no_opset(m: onnx.ModelProto) -> None:
    del m.opset_import[:]


def _future_opset(m: onnx.ModelProto) -> None:
    m.opset_import[0].version = 99


def _ir_zero(m: onnx.ModelProto) -> None:
    m.ir_version = 0


def _bad_attr(m: onnx.ModelProto) -> None:
    attr = m.graph.node[3].attribute[0]
    attr.type = onnx.AttributeProto.STRING
    attr.s = b"yes"


def _no_output(m: onnx.ModelProto) -> None:
    del m.graph.output[:]


def _nan_weight(m: onnx.ModelProto) -> None:
    w = _weights(m, "W1")
    w[1, 2] = np.nan
    _set(m, "W1", w)


def _inf_weight(m: onnx.ModelProto) -> None:
    w = _weights(m, "W2")
    w[0, 0] = -np.inf
    _set(m, "W2", w)


def _nan_bias(m: onnx.ModelProto) -> None:
    b = _weights(m, "b1")
    b[:] = np.nan
    _set(m, "b1", b)


def _huge_weight(m: onnx.ModelProto) -> None:
    _set(m, "W1", np.full((D_IN, HIDDEN), 3e38, np.float32))


def _raw_mismatch(m: onnx.ModelProto) -> None:
    _init(m, "W1").raw_data = _init(m, "W1").raw_data[:-4]


def _negative_dim(m: onnx.ModelProto) -> None:
    t = _init(m, "W1")
    t.dims[0] = -6


def _huge_inline_dims(m: onnx.ModelProto) -> None:
    t = _init(m, "W1")
    del t.dims[:]
    t.dims.extend([2**20, 2**20])


def _zero_dim(m: onnx.ModelProto) -> None:
    _set(m, "W1", np.zeros((D_IN, 0), np.float32))


def _huge_input_dims(m: onnx.ModelProto) -> None:
    m.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 2**40


def _string_weight(m: onnx.ModelProto) -> None:
    _init(m, "W1").CopyFrom(helper.make_tensor("W1", TensorProto.STRING, [D_IN, HIDDEN], [b"a"] * (D_IN * HIDDEN)))


def _sparse(values: np.ndarray, indices: np.ndarray, dims: Sequence[int], name: str = "W1") -> onnx.SparseTensorProto:
    return helper.make_sparse_tensor(
        numpy_helper.from_array(values.astype(np.float32), name), numpy_helper.from_array(indices, f"{name}_idx"), dims
    )


def _with_sparse(sp: Callable[[], onnx.SparseTensorProto]) -> Callable[[onnx.ModelProto], None]:
    def edit(m: onnx.ModelProto) -> None:
        inits = [t for t in m.graph.initializer if t.name != "W1"]
        del m.graph.initializer[:]
        m.graph.initializer.extend(inits)
        m.graph.sparse_initializer.append(sp())

    return edit


SPARSE = {
    "sparse-index-out-of-range": lambda: _sparse(np.ones(3), np.array([0, 5, 48], np.int64), [D_IN, HIDDEN]),
    "sparse-negative-index": lambda: _sparse(np.ones(3), np.array([-1, 5, 7], np.int64), [D_IN, HIDDEN]),
    "sparse-count-mismatch": lambda: _sparse(np.ones(3), np.array([0, 1, 2, 3], np.int64), [D_IN, HIDDEN]),
    "sparse-coo-out-of-range": lambda: _sparse(np.ones(2), np.array([[0, 1], [6, 0]], np.int64), [D_IN, HIDDEN]),
    "sparse-float-indices": lambda: _sparse(np.ones(2), np.array([0.0, 1.0], np.float32), [D_IN, HIDDEN]),
    "sparse-huge-dims": lambda: _sparse(np.ones(3), np.array([0, 1, 2], np.int64), [2**17, 2**17]),
    "sparse-2^28-elements": lambda: _sparse(np.ones(3), np.array([0, 1, 2], np.int64), [2**14, 2**14]),
    "sparse-2^40-elements": lambda: _sparse(np.ones(3), np.array([0, 1, 2], np.int64), [2**20, 2**20]),
}


def _fp16(d: Path) -> None:
    save(mlp(dtype=TensorProto.FLOAT16), d / M)


def _bf16(d: Path) -> None:
    save(mlp(dtype=TensorProto.BFLOAT16), d / M)


def _float_io_model(d: Path, name: str, nodes: list[onnx.NodeProto], inits: list[TensorProto], out: int) -> None:
    """Save a model ``x[N,6] → nodes → logits[N,out]`` (float in, float out) as the case's model."""
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", D_IN])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", out])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    save(model, d / M)


def _quantized(d: Path) -> None:
    """int8 weights behind DequantizeLinear, as a QDQ exporter writes them: nothing float to prune."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("DequantizeLinear", ["W1_q", "s1", "z1"], ["W1"], name="dq1"),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["h2"], name="relu"),
        helper.make_node("DequantizeLinear", ["W2_q", "s2", "z2"], ["W2"], name="dq2"),
        helper.make_node("MatMul", ["h2", "W2"], ["logits"], name="fc2"),
    ]
    inits = [
        numpy_helper.from_array(rng.integers(-100, 100, (D_IN, HIDDEN)).astype(np.int8), "W1_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "s1"),
        numpy_helper.from_array(np.array(0, np.int8), "z1"),
        numpy_helper.from_array(rng.integers(-100, 100, (HIDDEN, CLASSES)).astype(np.int8), "W2_q"),
        numpy_helper.from_array(np.array(0.01, np.float32), "s2"),
        numpy_helper.from_array(np.array(0, np.int8), "z2"),
    ]
    _float_io_model(d, "qdq", nodes, inits, CLASSES)


def _matmul_integer(d: Path) -> None:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"], name="q"),
        helper.make_node("MatMulInteger", ["xq", "Wq"], ["acc"], name="mmi"),
        helper.make_node("Cast", ["acc"], ["logits"], to=TensorProto.FLOAT, name="cast"),
    ]
    inits = [
        numpy_helper.from_array(np.array(0.05, np.float32), "sx"),
        numpy_helper.from_array(np.array(0, np.uint8), "zx"),
        numpy_helper.from_array(np.ones((D_IN, CLASSES), np.uint8), "Wq"),
    ]
    _float_io_model(d, "mmi", nodes, inits, CLASSES)


def _no_prunable(d: Path) -> None:
    _float_io_model(d, "relu", [helper.make_node("Relu", ["x"], ["logits"], name="relu")], [], D_IN)


def _external(
    location: str, *, length: int | None = None, offset: int = 0, payload: str = "full"
) -> Callable[[Path], None]:
    """W1 stored externally at ``location``; ``payload`` says what the file really holds."""

    def make(d: Path) -> None:
        model = mlp()
        t = _init(model, "W1")
        raw = t.raw_data
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        entries = {"location": location, "offset": str(offset)}
        if length is not None:
            entries["length"] = str(length)
        for k, v in entries.items():
            e = t.external_data.add()
            e.key, e.value = k, v
        save(model, d / M)
        target = d / "in" / location
        if payload == "full":
            target.write_bytes(raw)
        elif payload == "short":
            target.write_bytes(raw[: len(raw) // 2])
        elif payload == "fifo":
            os.mkfifo(target)
        elif payload == "dir":
            target.mkdir()
        elif payload == "outside":
            (d / "secret.bin").write_bytes(raw)
        elif payload == "symlink-out":
            (d / "secret.bin").write_bytes(raw)
            target.symlink_to(d / "secret.bin")

    return make


def _huge_external(d: Path) -> None:
    model = mlp()
    t = _init(model, "W1")
    t.ClearField("raw_data")
    del t.dims[:]
    t.dims.extend([2**20, 2**20])
    t.data_location = TensorProto.EXTERNAL
    e = t.external_data.add()
    e.key, e.value = "location", "w.bin"
    save(model, d / M)
    (d / "in/w.bin").write_bytes(b"\0" * 64)


def _model_file(kind: str) -> Build:
    """The model argument itself is hostile: a folder, a FIFO, a device, a loop, an odd name."""

    def build(d: Path) -> list[str]:
        data(d / D)
        if kind == "folder":
            (d / M).mkdir()
            return command("compress")
        if kind == "fifo":
            os.mkfifo(d / M)
            return command("compress")
        if kind == "device":
            return command("compress", model="/dev/zero")
        if kind == "missing":
            return command("compress", model="in/nope.onnx")
        if kind == "symlink-loop":
            (d / "in/a.onnx").symlink_to(d / "in/b.onnx")
            (d / "in/b.onnx").symlink_to(d / "in/a.onnx")
            return command("compress", model="in/a.onnx")
        name = {"newline": "in/m\nnext.onnx", "escape": "in/m\x1b[31mred.onnx", "separator": "in/m\u2028x.onnx"}[kind]
        _bytes(d / name, b"not a model at all")
        return command("compress", model=name)

    return build


def _model_case(name: str, cls: str, make: Callable[[Path], None], cmds: Sequence[str], **kw: object) -> list[Case]:
    out = []
    for cmd in cmds:

        def build(d: Path, cmd: str = cmd) -> list[str]:
            data(d / D)
            make(d)
            return command(cmd)

        out.append(Case(f"model/{name}/{cmd}", cls, build, **kw))  # type: ignore[arg-type]
    return out


def model_cases() -> list[Case]:
    every, train = COMMANDS, ("compress", "gradients", "sweep")
    cases: list[Case] = []
    add = cases.extend
    add(_model_case("empty-file", "malformed-protobuf", lambda d: _bytes(d / M, b""), every))
    add(_model_case("random-bytes", "malformed-protobuf", lambda d: _bytes(d / M, _rng("rb").bytes(2048)), every))
    add(_model_case("text", "malformed-protobuf", lambda d: _bytes(d / M, b"hello, not a model\n" * 50), every))
    for k in range(4):
        add(_model_case(f"truncated-{k}", "malformed-protobuf", _truncated(k), every))
    for k in range(6):
        add(_model_case(f"bitflip-{k}", "malformed-protobuf", _bitflip(k), ("inspect", "evaluate"), may_succeed=True))
    checker = {
        "unknown-op": _unknown_op,
        "undefined-input": _undefined_input,
        "duplicate-initializer": _dup_init,
        "no-opset": _no_opset,
        "future-opset": _future_opset,
        "ir-version-0": _ir_zero,
        "bad-attribute-type": _bad_attr,
        "no-graph-output": _no_output,
        "raw-data-shorter-than-dims": _raw_mismatch,
        "negative-dim": _negative_dim,
        "string-weight": _string_weight,
        "zero-sized-weight": _zero_dim,
    }
    for name, fn in checker.items():
        # a string or empty weight is not prunable: inspect lists the model (and marks the empty one)
        cmds = (
            every
            if name not in ("string-weight", "zero-sized-weight")
            else ("compress", "evaluate", "gradients", "sweep")
        )
        add(_model_case(name, "checker-failure", _edit(fn), cmds))
    add(_model_case("cycle", "cycle", _edit(_cycle), every, needles=("cycle", "fc1")))
    add(_model_case("self-loop", "cycle", _edit(_self_loop), every, needles=("cycle", "relu1")))
    add(_model_case("nan-weight", "nan-inf-weights", _edit(_nan_weight), train, needles=("W1", "nan")))
    add(_model_case("inf-weight", "nan-inf-weights", _edit(_inf_weight), train, needles=("W2", "inf")))
    add(_model_case("nan-bias", "nan-inf-weights", _edit(_nan_bias), ("compress", "gradients"), needles=("b1", "nan")))
    add(_model_case("overflowing-weight", "nan-inf-weights", _edit(_huge_weight), ("compress", "gradients")))
    # a float16 model's gradients come from its float32 twin: every training command takes it
    add(_model_case("float16", "fp16-bf16", _fp16, ("compress",), codes=(0,), outputs=("out/o.onnx",)))
    add(
        _model_case(
            "float16", "fp16-bf16", _fp16, ("gradients",), codes=(0,), outputs=("out/g.npy", "out/g.npy.layout.json")
        )
    )
    add(
        _model_case(
            "float16", "fp16-bf16", _fp16, ("sweep",), codes=(0,), outputs=("out/s.csv", "out/s.json", "out/s.png")
        )
    )
    add(_model_case("bfloat16", "fp16-bf16", _bf16, (*train, "evaluate"), needles=("bfloat16",)))
    add(_model_case("qdq-int8", "quantized-ops", _quantized, train, needles=("quantized",)))
    add(_model_case("matmul-integer", "quantized-ops", _matmul_integer, train, needles=("quantized",)))
    add(_model_case("no-prunable-weights", "quantized-ops", _no_prunable, train, needles=("no prunable",)))
    ext = {
        "absolute": _external("/etc/passwd"),
        "escapes": _external("../secret.bin", payload="outside"),
        "symlink-escapes": _external("w.bin", payload="symlink-out"),
        "missing": _external("w.bin", payload="none"),
        "truncated": _external("w.bin", payload="short"),
        "offset-past-end": _external("w.bin", offset=4096),
        "length-mismatch": _external("w.bin", length=8),
        "fifo": _external("w.bin", payload="fifo"),
        "folder": _external("w.bin", payload="dir"),
        "huge-dims": _huge_external,
    }
    for name, make in ext.items():
        add(_model_case(f"external-{name}", "external-data", make, every))
    add(_model_case("huge-inline-dims", "huge-dims", _edit(_huge_inline_dims), every, needles=("W1",)))
    add(_model_case("huge-input-dims", "huge-dims", _edit(_huge_input_dims), ("compress", "evaluate", "gradients")))
    for name, sp in SPARSE.items():
        add(_model_case(name, "sparse-initializer", _edit(_with_sparse(sp)), every))
    for kind in ("folder", "fifo", "device", "missing", "symlink-loop", "newline", "escape", "separator"):
        codes = (2,) if kind == "folder" else (1,)  # click refuses a folder as a usage error
        cases.append(Case(f"model/path-{kind}/compress", "model-path", _model_file(kind), codes))
    for cmd in ("evaluate", "gradients", "inspect", "sweep"):
        cases.append(
            Case(
                f"model/path-fifo/{cmd}", "model-path", lambda d, c=cmd: (os.mkfifo(d / M), data(d / D), command(c))[2]
            )
        )
    return cases


# ------------------------------------------------------------------------------------------- data


def _crc32_combine(crc1: int, crc2: int, len2: int) -> int:
    """zlib's crc32_combine: the CRC of A + B from crc(A), crc(B) and len(B) (GF(2) matrices)."""

    def times(mat: list[int], vec: int) -> int:
        s, i = 0, 0
        while vec:
            if vec & 1:
                s ^= mat[i]
            vec >>= 1
            i += 1
        return s

    def square(mat: list[int]) -> list[int]:
        return [times(mat, mat[n]) for n in range(32)]

    op = [0xEDB88320] + [1 << n for n in range(31)]  # appends one zero bit
    for _ in range(3):
        op = square(op)  # ... 2, 4, 8 zero bits: one zero byte
    while len2 > 0:
        if len2 & 1:
            crc1 = times(op, crc1)
        len2 >>= 1
        op = square(op)
    return crc1 ^ crc2


def _zip_one(name: str, deflated: bytes, crc: int, size: int, method: int = 8) -> bytes:
    """A one-member zip archive from an already deflated stream (sizes < 4 GiB)."""
    fname = name.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, method, 0, 0x21, crc, len(deflated), size, len(fname), 0)
    central = struct.pack(
        "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, method, 0, 0x21, crc, len(deflated), size, len(fname),
        0, 0, 0, 0, 0, 0,
    )  # fmt: skip
    body = local + fname + deflated
    cd = central + fname
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(cd), len(body), 0)
    return body + cd + end


_ZIP_BOMB: bytes | None = None


def zip_bomb(mib: int = 2048) -> bytes:
    """A valid ``.npz`` of about 2 MB whose array ``x`` inflates to ``mib`` MiB of zeros (~1000:1)."""
    global _ZIP_BOMB
    if _ZIP_BOMB is not None and mib == 2048:
        return _ZIP_BOMB
    n = mib * 2**20 // 4
    header = b"\x93NUMPY\x01\x00"
    text = f"{{'descr': '<f4', 'fortran_order': False, 'shape': ({n},), }}".encode()
    text += b" " * (63 - (len(header) + 2 + len(text)) % 64) + b"\n"
    header += struct.pack("<H", len(text)) + text
    chunk = bytes(2**20)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(header) + c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(chunk) + c.flush(zlib.Z_FULL_FLUSH)
    stream = first + block * (mib - 1) + c.flush()
    zeros_crc = zlib.crc32(chunk)
    crc, done = zeros_crc, 1
    while done * 2 <= mib:  # CRC of 2^k MiB of zeros by doubling
        crc = _crc32_combine(crc, crc, done * 2**20)
        done *= 2
    rest = zlib.crc32(header)
    for _ in range(mib // done):
        rest = _crc32_combine(rest, crc, done * 2**20)
    for _ in range(mib % done):
        rest = _crc32_combine(rest, zeros_crc, 2**20)
    out = _zip_one("x.npy", stream, rest, len(header) + mib * 2**20)
    if mib == 2048:
        _ZIP_BOMB = out
    return out


def _lying_zip(d: Path) -> None:
    """An archive whose directory claims 3.9 GiB for an array that really holds 24 floats."""
    arr = np.zeros(24, np.float32)
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr)
    raw = buf.getvalue()
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    stream = c.compress(raw) + c.flush()
    _bytes(d / D, _zip_one("x.npy", stream, zlib.crc32(raw), 0xF0000000))


def _forged_header(d: Path) -> None:
    """A stored (uncompressed) member whose .npy header declares 2^40 floats."""
    header = b"\x93NUMPY\x01\x00"
    text = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1099511627776,), }"
    text += b" " * (63 - (len(header) + 2 + len(text)) % 64) + b"\n"
    raw = header + struct.pack("<H", len(text)) + text + bytes(96)
    _bytes(d / D, _zip_one("x.npy", raw, zlib.crc32(raw), len(raw), method=0))


def _many_small_bombs(d: Path) -> None:
    """Forty members of 48 MiB each, each under the per-array bomb floor: together 1.9 GiB."""
    import zipfile

    one = zip_bomb(48)
    inner = zipfile.ZipFile(__import__("io").BytesIO(one))
    info = inner.infolist()[0]
    raw_stream = one[30 + len(info.filename) : 30 + len(info.filename) + info.compress_size]
    parts, central, offset = [], [], 0
    for i in range(40):
        name = f"x{i}.npy".encode()
        local = struct.pack(
            "<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, info.CRC, len(raw_stream), info.file_size, len(name), 0
        )
        central.append(
            struct.pack(
                "<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, info.CRC, len(raw_stream), info.file_size,
                len(name), 0, 0, 0, 0, 0, offset,
            ) + name
        )  # fmt: skip
        parts.append(local + name + raw_stream)
        offset += len(parts[-1])
    body, cd = b"".join(parts), b"".join(central)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 40, 40, len(cd), len(body), 0)
    _bytes(d / D, body + cd + end)


def _pickle(d: Path) -> None:
    np.savez(d / D, x=np.array([{"a": 1}, None], dtype=object))


def _npz_with(**arrays: object) -> Callable[[Path], None]:
    return lambda d: np.savez(d / D, **arrays)  # type: ignore[arg-type]


def _x(n: int = N, dtype: object = np.float32, shape: tuple[int, ...] | None = None) -> np.ndarray:
    return np.random.default_rng(2).standard_normal(shape or (n, D_IN)).astype(dtype)  # type: ignore[call-overload]


def _with_nan(where: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        x = _x()
        x[17, 3] = np.nan if where == "nan" else np.inf
        np.savez(d / D, x=x, labels=np.zeros(N, np.int64))

    return make


def _zip_member_text(d: Path) -> None:
    import zipfile

    with zipfile.ZipFile(d / D, "w") as zf:
        zf.writestr("x.npy", b"this is not an array")


def _zip_non_npy(d: Path) -> None:
    import zipfile

    with zipfile.ZipFile(d / D, "w") as zf:
        zf.writestr("readme.txt", b"hello")


def _truncated_zip(d: Path) -> None:
    data(d / "in/full.npz")
    raw = (d / "in/full.npz").read_bytes()
    (d / "in/full.npz").unlink()
    _bytes(d / D, raw[: len(raw) * 2 // 3])


def _npy_file(d: Path, cut: int = 0, objects: bool = False) -> None:
    """A lone .npy array where the .npz is expected (the one-input model reads it; these are broken)."""
    with open(d / D, "wb") as fh:
        np.save(fh, np.array([{"a": 1}, None], dtype=object) if objects else _x(), allow_pickle=objects)
    if cut:
        raw = (d / D).read_bytes()
        (d / D).write_bytes(raw[:-cut])


def _data_folder(kind: str) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        folder = d / D
        folder.mkdir()
        if kind == "empty":
            return
        data(folder / "a.npz", n=8)
        if kind == "mixed-labels":
            data(folder / "b.npz", n=8, labels=False)
        elif kind == "fifo-member":
            os.mkfifo(folder / "b.npz")
        elif kind == "folder-member":
            (folder / "b.npz").mkdir()
        elif kind == "bad-member":
            _bytes(folder / "b.npz", b"garbage")

    return make


DATA: dict[str, tuple[Callable[[Path], None], tuple[str, ...]]] = {
    "pickled-object-array": (_pickle, ("Python objects",)),
    "zip-bomb-2GiB": (lambda d: _bytes(d / D, zip_bomb()), ("zip bomb",)),
    "zip-bomb-split-40-members": (_many_small_bombs, ("d.npz",)),
    "zip-directory-lies": (_lying_zip, ("d.npz",)),
    "npy-header-declares-2^40": (_forged_header, ("d.npz",)),
    "not-a-zip": (lambda d: _bytes(d / D, b"just some text\n" * 20), ("d.npz",)),
    "lone-npy-file-truncated": (lambda d: _npy_file(d, cut=40), ("d.npz", "truncated or forged")),
    "lone-npy-file-objects": (lambda d: _npy_file(d, objects=True), ("d.npz", "Python objects")),
    "truncated-zip": (_truncated_zip, ("d.npz",)),
    "zip-member-not-npy-data": (_zip_member_text, ("d.npz",)),
    "zip-member-not-npy": (_zip_non_npy, ("d.npz", "readme.txt")),
    "int-inputs": (_npz_with(x=_x(dtype=np.int64)), ("'x'", "int64")),
    "complex-inputs": (_npz_with(x=_x(dtype=np.complex64)), ("'x'", "complex64")),
    "string-inputs": (_npz_with(x=np.full((N, D_IN), "a")), ("'x'",)),
    "bool-inputs": (_npz_with(x=np.ones((N, D_IN), bool)), ("'x'", "bool")),
    "structured-inputs": (_npz_with(x=np.zeros((N, D_IN), dtype=[("a", "<f4"), ("b", "<i4")])), ("'x'",)),
    "1-d-inputs": (_npz_with(x=_x(shape=(N,))), ("'x'",)),
    "wrong-feature-dim": (_npz_with(x=_x(shape=(N, D_IN + 1))), ("'x'", "7")),
    "scalar-input": (_npz_with(x=np.float32(1.0)), ("d.npz",)),
    "nan-labels": (_npz_with(x=_x(), labels=np.full(N, np.nan)), ("labels",)),
    "float-labels": (_npz_with(x=_x(), labels=np.ones(N, np.float32)), ("labels", "float32")),
    "negative-labels": (_npz_with(x=_x(), labels=-np.ones(N, np.int64)), ("label -1",)),
    "labels-past-classes": (_npz_with(x=_x(), labels=np.full(N, 7, np.int64)), ("label 7", "3 classes")),
    "labels-2-d": (_npz_with(x=_x(), labels=np.zeros((N, 2), np.int64)), ("labels",)),
    "labels-too-short": (_npz_with(x=_x(), labels=np.zeros(N - 1, np.int64)), ("labels",)),
    "empty-arrays": (_npz_with(x=np.zeros((0, D_IN), np.float32), labels=np.zeros(0, np.int64)), ("d.npz",)),
    "no-arrays": (_npz_with(), ("d.npz",)),
    "two-arrays-for-one-input": (_npz_with(a=_x(), b=_x(n=N - 3)), ("d.npz",)),
    "nan-inputs": (_with_nan("nan"), ("'x'", "sample 17")),
    "inf-inputs": (_with_nan("inf"), ("'x'", "sample 17")),
    "fifo": (lambda d: os.mkfifo(d / D), ("d.npz", "FIFO")),
    "missing": (lambda d: None, ("d.npz",)),
    "folder-empty": (_data_folder("empty"), ("d.npz",)),
    "folder-mixed-labels": (_data_folder("mixed-labels"), ("b.npz", "labels")),
    "folder-fifo-member": (_data_folder("fifo-member"), ("b.npz", "FIFO")),
    "folder-folder-member": (_data_folder("folder-member"), ("b.npz",)),
    "folder-garbage-member": (_data_folder("bad-member"), ("b.npz",)),
}


def data_cases() -> list[Case]:
    cases: list[Case] = []
    for name, (make, needles) in DATA.items():
        cmds = ["compress", "evaluate", "gradients", "sweep"]
        if name in ("labels-2-d",):
            cmds.remove("sweep")
        for cmd in cmds:

            def build(d: Path, cmd: str = cmd, make: Callable[[Path], None] = make) -> list[str]:
                save(mlp(), d / M)
                make(d)
                return command(cmd)

            cases.append(Case(f"data/{name}/{cmd}", "npz-trap", build, needles=needles))
    # evaluation data: the same traps through --eval-data
    for name in ("pickled-object-array", "zip-bomb-2GiB", "nan-inputs", "fifo", "folder-mixed-labels", "float-labels"):
        make, needles = DATA[name]
        for cmd in ("compress", "sweep"):

            def build_eval(d: Path, cmd: str = cmd, make: Callable[[Path], None] = make) -> list[str]:
                save(mlp(), d / M)
                make(d)
                os.replace(d / D, d / E)
                data(d / D)
                argv = command(cmd)
                return [*argv, "--eval-data", E]

            cases.append(
                Case(
                    f"eval-data/{name}/{cmd}",
                    "npz-trap",
                    build_eval,
                    needles=tuple(n.replace("d.npz", "e.npz") for n in needles),
                )
            )

    # a newline in the data file name must not split the message
    def newline(d: Path) -> list[str]:
        save(mlp(), d / M)
        _bytes(d / "in/d\nx.npz", b"garbage")
        return command("compress", dat="in/d\nx.npz")

    cases.append(Case("data/newline-in-name/compress", "npz-trap", newline, needles=("d\\nx.npz",)))
    cases.append(
        Case(
            "data/device/evaluate", "npz-trap", lambda d: (save(mlp(), d / M), command("evaluate", dat="/dev/zero"))[1]
        )
    )
    return cases


# ------------------------------------------------------------------------------------------ flags


def _flag_case(cmd: str, args: Sequence[str], code: int, needles: Sequence[str] = (), **kw: object) -> Case:
    def build(d: Path) -> list[str]:
        _standard(d)
        return command(cmd, extra=args)

    label = " ".join(args).replace("/", "_").encode("unicode_escape").decode() or "none"
    return Case(f"flag/{cmd}/{label}", "flags", build, codes=(code,), needles=tuple(needles), **kw)  # type: ignore[arg-type]


def flag_cases() -> list[Case]:
    huge = str(10**30)
    c: list[Case] = []
    bad_compress: list[tuple[list[str], int, tuple[str, ...]]] = [
        *[(["--sparsity", v], 2, ("--sparsity",)) for v in ("-0.1", "1", "1.5", "nan", "inf", "1e309", "abc")],
        (["--sparsity", "0.999999"], 2, ("--sparsity", "--allow-empty")),
        *[(["--min-density", v], 2, ("--min-density",)) for v in ("-1", "2", "nan", "0.9")],
        *[(["--ridge", v], 2, ("--ridge",)) for v in ("-1", "nan", "inf", "-inf")],
        *[(["--method", "chita++", "--stages", v], 2, ("--stages",)) for v in ("0", "-1", "1001", "1000000000", huge)],
        (["--method", "chita++", "--stages", "2000", "--schedule", "exp"], 2, ("--stages",)),
        (["--stages", "3"], 2, ("--stages",)),
        *[(["--method", "chita++", "--start-sparsity", v], 2, ("--start-sparsity",)) for v in ("-0.1", "0.9", "nan")],
        *[(["--max-iter", v], 2, ("--max-iter",)) for v in ("0", "-1", huge)],
        *[(["--block-size", v], 2, ("--block-size",)) for v in ("0", "-5", huge)],
        *[(["--max-memory", v], 2, ("--max-memory",)) for v in ("0", "1K", "abc", "-1", "999999T", "1e400")],
        *[(["--mini-batch", v], 2, ("--mini-batch",)) for v in ("0", "-1", huge, "1000000")],
        *[(["--num-samples", v], 2, ("--num-samples",)) for v in ("0", "-1", huge)],
        *[(["--seed", v], 2, ("--seed",)) for v in ("-1", str(2**64), huge, "1.5")],
        *[(["--holdout", v], 2, ("--holdout",)) for v in ("0", "1", "-0.5", "nan")],
        *[(["--batch-size", v], 2, ("--batch-size",)) for v in ("0", "-1", huge)],
        (["--keep", "W9"], 2, ("--keep",)),
        (["--keep", "W1,W2"], 2, ("--keep",)),
        (["--output", "probs"], 2, ("--output",)),
        (["--workdir", "in/nowhere"], 2, ("--workdir",)),
        (["--workdir", "in/d.npz"], 2, ("--workdir",)),
        (["--workdir", UNWRITABLE], 1, ("--workdir",)),
        (["--workdir", "in/no\nwhere"], 2, ("--workdir", "no\\nwhere")),
        (["--method", "nope"], 2, ("--method",)),
        (["--schedule", "nope"], 2, ("--schedule",)),
        (["--storage", "nope"], 2, ("--storage",)),
        (["--rank", "nope"], 2, ("--rank",)),
        (["--bogus"], 2, ("--bogus",)),
        (["extra-positional"], 2, ("extra-positional",)),
    ]
    for args, code, needles in bad_compress:
        c.append(_flag_case("compress", args, code, needles))

    def unlabelled(d: Path) -> list[str]:
        save(mlp(), d / M)
        data(d / D, labels=False)
        return command("compress", extra=["--fisher", "empirical"])

    c.append(Case("flag/compress/--fisher empirical without labels", "flags", unlabelled, (1, 2), ("empirical",)))
    c.append(
        Case(
            "flag/compress/missing --data",
            "flags",
            lambda d: (_standard(d), ["compress", M, "out/o.onnx"])[1],
            (2,),
            ("--data",),
        )
    )
    c.append(
        Case(
            "flag/compress/missing OUTPUT",
            "flags",
            lambda d: (_standard(d), ["compress", M, "--data", D])[1],
            (2,),
            ("OUTPUT",),
        )
    )
    for args, needles in [
        (["--batch-size", "0"], ("--batch-size",)),
        (["--batch-size", "-1"], ("--batch-size",)),
        (["--batch-size", huge], ("--batch-size",)),
        (["--output", "nope"], ("--output",)),
        (["--bogus"], ("--bogus",)),
    ]:
        c.append(_flag_case("evaluate", args, 2, needles))
    for args, needles in [
        (["--num-samples", "0"], ("--num-samples",)),
        (["--num-samples", "-1"], ("--num-samples",)),
        (["--mini-batch", "0"], ("--mini-batch",)),
        (["--mini-batch", "1000000"], ("--mini-batch",)),
        (["--seed", "-1"], ("--seed",)),
        (["--loss", "nope"], ("--loss",)),
        (["--fisher", "nope"], ("--fisher",)),
        (["--output", "nope"], ("nope",)),
    ]:
        c.append(_flag_case("gradients", args, 2, needles))
    c.append(
        Case(
            "flag/gradients/missing --out",
            "flags",
            lambda d: (_standard(d), ["gradients", M, "--data", D])[1],
            (2,),
            ("--out",),
        )
    )
    c.append(Case("flag/inspect/missing MODEL", "flags", lambda d: ["inspect"], (2,), ("MODEL",)))
    c.append(
        Case(
            "flag/inspect/--bogus", "flags", lambda d: (_standard(d), ["inspect", M, "--bogus"])[1], (2,), ("--bogus",)
        )
    )

    def sweep(args: Sequence[str], needles: Sequence[str]) -> Case:
        def build(d: Path) -> list[str]:
            _standard(d)
            return ["sweep", M, "--data", D, "--out", "out/s", "--methods", "magnitude", "--sparsities", "0.5", *args]

        return Case(f"flag/sweep/{' '.join(args)}", "flags", build, (2,), tuple(needles))

    for args, needles in [
        (["--methods", "nope"], ("--methods",)),
        (["--methods", ","], ("--methods",)),
        (["--sparsities", "1.5"], ("--sparsities",)),
        (["--sparsities", "abc"], ("--sparsities",)),
        (["--sparsities", ","], ("--sparsities",)),
        (["--sparsities", "0.5,0.999999"], ("--sparsity", "--allow-empty")),
        (["--stages", "2000"], ("--stages",)),
        (["--seed", "-1"], ("--seed",)),
        (["--max-memory", "1K"], ("--max-memory",)),
    ]:
        c.append(sweep(args, needles))
    return c


def positive_cases() -> list[Case]:
    """Flags exactly at their limits: these must work (exit 0) and write only the outputs."""
    out: list[Case] = []
    for args in (
        ["--sparsity", "0"],
        ["--sparsity", "0.999999", "--allow-empty"],
        ["--seed", str(2**63 - 1)],
        ["--max-memory", "1M", "--num-samples", "8"],
        ["--method", "chita++", "--stages", "1"],
        ["--method", "chita++", "--stages", "3", "--schedule", "exp", "--start-sparsity", "0"],
        ["--workdir", "out"],
        ["--report", "out/r.json"],
    ):
        outputs = ("out/o.onnx", "out/r.json") if "--report" in args else ("out/o.onnx",)
        out.append(_flag_case("compress", args, 0, outputs=outputs, slow=True))
    out.append(_flag_case("gradients", ["--num-samples", "1"], 0, outputs=("out/g.npy", "out/g.npy.layout.json")))
    out.append(_flag_case("evaluate", ["--batch-size", str(2**31 - 1)], 0))
    return out


# ----------------------------------------------------------------------------------------- paths


def _paths(cmd: str, extra: Callable[[Path], list[str]], *, ext: bool = False, folder: bool = False) -> Build:
    """A valid model (with external data when ``ext``) and data, then the output flags of ``extra``."""

    def build(d: Path) -> list[str]:
        if ext:
            _external("w.bin")(d)
        else:
            save(mlp(), d / M)
        if folder:
            (d / D).mkdir()
            data(d / D / "a.npz")
        else:
            data(d / D)
        data(d / E, seed=5)
        argv = extra(d)
        return argv

    return build


def _link(kind: str, target: str, name: str) -> Callable[[Path], str]:
    def make(d: Path) -> str:
        link = d / name
        if kind == "symlink":
            link.symlink_to(d / target)
        else:
            os.link(d / target, link)
        return name

    return make


def path_cases() -> list[Case]:
    c: list[Case] = []

    def compress(out: str = "out/o.onnx", *extra: str, ev: bool = True) -> list[str]:
        base = ["compress", M, out, "--data", D, "--num-samples", "24"]
        return [*base, *(["--eval-data", E] if ev else []), *extra]

    collisions: dict[str, tuple[Callable[[Path], list[str]], int, tuple[str, ...], dict[str, bool]]] = {
        "output-is-model": (lambda d: compress(M), 2, ("OUTPUT", "input model"), {}),
        "output-is-data": (lambda d: compress(D), 2, ("OUTPUT", "calibration data"), {}),
        "output-is-eval-data": (lambda d: compress(E), 2, ("OUTPUT", "evaluation data"), {}),
        "output-is-external-data": (lambda d: compress("in/w.bin"), 2, ("OUTPUT", "external-data"), {"ext": True}),
        "output-symlink-to-model": (lambda d: compress(_link("symlink", M, "out/l.onnx")(d)), 2, ("OUTPUT",), {}),
        "output-hardlink-to-model": (lambda d: compress(_link("hard", M, "out/h.onnx")(d)), 2, ("OUTPUT",), {}),
        "output-hardlink-to-data": (lambda d: compress(_link("hard", D, "out/h.npz")(d)), 2, ("OUTPUT",), {}),
        "output-symlink-to-external": (
            lambda d: compress(_link("symlink", "in/w.bin", "out/w.onnx")(d)),
            2,
            ("OUTPUT",),
            {"ext": True},
        ),
        "output-in-data-folder": (
            lambda d: compress("in/d.npz/o.onnx"),
            2,
            ("OUTPUT", "data folder"),
            {"folder": True},
        ),
        "output-is-data-folder": (lambda d: compress(D), 2, ("OUTPUT", "directory"), {"folder": True}),
        "report-is-model": (lambda d: compress("out/o.onnx", "--report", M), 2, ("--report", "input model"), {}),
        "report-is-data": (lambda d: compress("out/o.onnx", "--report", D), 2, ("--report",), {}),
        "report-is-eval-data": (lambda d: compress("out/o.onnx", "--report", E), 2, ("--report",), {}),
        "report-is-external-data": (
            lambda d: compress("out/o.onnx", "--report", "in/w.bin"),
            2,
            ("--report",),
            {"ext": True},
        ),
        "report-is-output": (lambda d: compress("out/o.onnx", "--report", "out/o.onnx"), 2, ("--report", "OUTPUT"), {}),
        "report-via-symlink-is-output": (
            lambda d: compress("out/o.onnx", "--report", (os.symlink("o.onnx", d / "out/r.json"), "out/r.json")[1]),
            2,
            ("--report",),
            {},
        ),
        "report-hardlink-to-model": (
            lambda d: compress("out/o.onnx", "--report", _link("hard", M, "out/r.json")(d)),
            2,
            ("--report",),
            {},
        ),
        "output-folder-missing": (lambda d: compress("out/missing/o.onnx"), 1, ("OUTPUT", "does not exist"), {}),
        "output-folder-unwritable": (lambda d: compress(f"{UNWRITABLE}/o.onnx"), 1, ("OUTPUT", UNWRITABLE), {}),
        "output-is-existing-folder": (lambda d: compress("out"), 2, ("OUTPUT", "directory"), {}),
        "output-is-fifo": (
            lambda d: (os.mkfifo(d / "out/o.onnx"), compress("out/o.onnx"))[1],
            1,
            ("OUTPUT", "FIFO"),
            {},
        ),
        "output-newline-missing-folder": (lambda d: compress("out/a\nb/o.onnx"), 1, ("OUTPUT", "a\\nb"), {}),
        "report-folder-missing": (
            lambda d: compress("out/o.onnx", "--report", "out/nope/r.json"),
            1,
            ("--report",),
            {},
        ),
        "report-folder-unwritable": (
            lambda d: compress("out/o.onnx", "--report", f"{UNWRITABLE}/r.json"),
            1,
            ("--report",),
            {},
        ),
        "report-is-folder": (lambda d: compress("out/o.onnx", "--report", "out"), 2, ("--report",), {}),
        "workdir-is-model": (lambda d: compress("out/o.onnx", "--workdir", M), 2, ("--workdir",), {}),
    }
    for name, (argv, code, needles, kw) in collisions.items():
        c.append(Case(f"path/compress/{name}", "output-paths", _paths("compress", argv, **kw), (code,), needles))
    if not IS_ROOT:  # root ignores a read-only folder; UNWRITABLE covers root

        def readonly(d: Path) -> list[str]:
            (d / "out/ro").mkdir()
            os.chmod(d / "out/ro", 0o555)
            return compress("out/ro/o.onnx")

        c.append(
            Case(
                "path/compress/output-folder-read-only", "output-paths", _paths("compress", readonly), (1,), ("OUTPUT",)
            )
        )

    def evaluate(report: str) -> list[str]:
        return ["evaluate", M, "--data", D, "--report", report]

    for name, (argv, code, needles) in {
        "report-is-model": (lambda d: evaluate(M), 2, ("--report", "input model")),
        "report-is-data": (lambda d: evaluate(D), 2, ("--report", "calibration data")),
        "report-symlink-to-model": (lambda d: evaluate(_link("symlink", M, "out/r.json")(d)), 2, ("--report",)),
        "report-hardlink-to-data": (lambda d: evaluate(_link("hard", D, "out/r.json")(d)), 2, ("--report",)),
        "report-folder-missing": (lambda d: evaluate("out/x/r.json"), 1, ("--report",)),
        "report-folder-unwritable": (lambda d: evaluate(f"{UNWRITABLE}/r.json"), 1, ("--report",)),
        "report-is-folder": (lambda d: evaluate("out"), 2, ("--report",)),
    }.items():
        c.append(Case(f"path/evaluate/{name}", "output-paths", _paths("evaluate", argv), (code,), needles))

    def gradients(out: str) -> list[str]:
        return ["gradients", M, "--data", D, "--out", out]

    def layout_is_model(d: Path) -> list[str]:
        os.replace(d / M, d / "in/g.npy.layout.json")
        return ["gradients", "in/g.npy.layout.json", "--data", D, "--out", "in/g.npy"]

    for name, (argv, code, needles, kw) in {
        "out-is-model": (lambda d: gradients(M), 2, ("--out", "input model"), {}),
        "out-is-data": (lambda d: gradients(D), 2, ("--out",), {}),
        "out-is-external-data": (lambda d: gradients("in/w.bin"), 2, ("--out",), {"ext": True}),
        "layout-file-is-model": (layout_is_model, 2, ("--out", "layout"), {}),
        "out-hardlink-to-model": (lambda d: gradients(_link("hard", M, "out/g.npy")(d)), 2, ("--out",), {}),
        "out-folder-missing": (lambda d: gradients("out/x/g.npy"), 1, ("--out",), {}),
        "out-folder-unwritable": (lambda d: gradients(f"{UNWRITABLE}/g.npy"), 1, ("--out",), {}),
        "out-is-folder": (lambda d: gradients("out"), 2, ("--out",), {}),
    }.items():
        c.append(Case(f"path/gradients/{name}", "output-paths", _paths("gradients", argv, **kw), (code,), needles))

    def sweep(prefix: str, model: str = M, dat: str = D, ev: str | None = None) -> list[str]:
        argv = ["sweep", model, "--data", dat, "--methods", "magnitude", "--sparsities", "0.5", "--out", prefix]
        return [*argv, "--eval-data", ev] if ev else argv

    def sweep_json_is_model(d: Path) -> list[str]:
        os.replace(d / M, d / "in/s.json")
        return sweep("in/s", model="in/s.json")

    def sweep_csv_is_data(d: Path) -> list[str]:
        os.replace(d / D, d / "in/s.csv")
        return sweep("in/s", dat="in/s.csv")

    def sweep_png_is_eval(d: Path) -> list[str]:
        os.replace(d / E, d / "in/s.png")
        return sweep("in/s", ev="in/s.png")

    for name, (argv, code, needles) in {
        "json-is-model": (sweep_json_is_model, 2, ("--out", "input model")),
        "csv-is-data": (sweep_csv_is_data, 2, ("--out", "calibration data")),
        "png-is-eval-data": (sweep_png_is_eval, 2, ("--out", "evaluation data")),
        "json-hardlink-to-model": (lambda d: sweep((_link("hard", M, "out/s.json")(d), "out/s")[1]), 2, ("--out",)),
        "prefix-folder-missing": (lambda d: sweep("out/x/s"), 1, ("--out",)),
        "prefix-folder-unwritable": (lambda d: sweep(f"{UNWRITABLE}/s"), 1, ("--out",)),
    }.items():
        c.append(Case(f"path/sweep/{name}", "output-paths", _paths("sweep", argv), (code,), needles))
    return c


# --------------------------------------------------------------------------- random mutations

#: More random mutations per class: CHITA_FUZZ_SCALE=50 makes a long campaign out of the same generator.
SCALE = max(1, int(os.environ.get("CHITA_FUZZ_SCALE", "1")))
_OPS = [
    "Conv",
    "Gemm",
    "MatMul",
    "Relu",
    "Softmax",
    "Reshape",
    "Transpose",
    "Identity",
    "Add",
    "Mul",
    "Sum",
    "BatchNormalization",
    "If",
    "Loop",
    "QuantizeLinear",
    "Cast",
    "Flatten",
    "Concat",
    "Gather",
    "Where",
    "ConvTranspose",
    "Einsum",
    "Dropout",
    "LayerNormalization",
    "MaxPool",
    "ReduceMean",
    "Split",
    "Pad",
]
_DIMS = [0, 1, 2, 3, 6, 8, -1, 2**31, 2**40, 2**62]


def _mutate(m: onnx.ModelProto, rng: np.random.Generator) -> None:
    """One random structural change: a dtype, dims, an op, an input name, an attribute, a version..."""
    g = m.graph
    kind = int(rng.integers(0, 12))
    init = g.initializer[int(rng.integers(0, len(g.initializer)))] if len(g.initializer) else None
    node = g.node[int(rng.integers(0, len(g.node)))] if len(g.node) else None
    if kind == 0 and init is not None:
        init.data_type = int(rng.integers(0, 30))
    elif kind == 1 and init is not None:
        dims = list(init.dims)
        choice = int(rng.integers(0, 3))
        if choice == 0 and dims:
            dims[int(rng.integers(0, len(dims)))] = int(rng.choice(_DIMS))
        elif choice == 1:
            dims.append(int(rng.choice(_DIMS)))
        elif dims:
            dims.pop()
        del init.dims[:]
        init.dims.extend(dims)
    elif kind == 2 and node is not None:
        node.op_type = str(rng.choice(_OPS))
    elif kind == 3 and node is not None and len(node.input):
        names = [n for x in g.node for n in x.output] + [t.name for t in g.initializer] + ["x", "", "ghost"]
        node.input[int(rng.integers(0, len(node.input)))] = str(rng.choice(names))
    elif kind == 4 and node is not None:
        value = rng.choice([1, -1, 2**40, 0.5, "s"])
        node.attribute.append(
            helper.make_attribute(str(rng.choice(["axis", "transB", "group", "alpha", "pads"])), value)
        )
    elif kind == 5 and node is not None:
        if rng.integers(0, 2):
            g.node.remove(node)
        else:
            g.node.append(node)
    elif kind == 6:
        m.opset_import[0].version = int(rng.integers(1, 30))
    elif kind == 7:
        m.ir_version = int(rng.integers(0, 13))
    elif kind == 8:
        vi = g.input[0].type.tensor_type
        if rng.integers(0, 2):
            vi.elem_type = int(rng.integers(0, 17))
        elif len(vi.shape.dim):
            vi.shape.dim[int(rng.integers(0, len(vi.shape.dim)))].dim_value = int(rng.choice(_DIMS[:7]))
    elif kind == 9 and init is not None:
        init.raw_data = rng.bytes(int(rng.integers(0, 400)))
    elif kind == 10:
        out = g.output[0].type.tensor_type
        out.elem_type = int(rng.integers(0, 17))
    elif kind == 11 and init is not None and init.data_type == TensorProto.FLOAT:
        try:
            w = numpy_helper.to_array(init).astype(np.float32)
        except ValueError:  # an earlier mutation broke its dims: leave it broken
            return
        if w.size:
            w.reshape(-1)[int(rng.integers(0, w.size))] = rng.choice([np.nan, np.inf, -np.inf, 3e38, 1e-45])
            init.CopyFrom(numpy_helper.from_array(w, init.name))


def _mutant(k: int) -> Callable[[Path], None]:
    """A mutated MLP (even ``k``) or CNN (odd ``k``), with valid data for the unmutated model."""

    def make(d: Path) -> None:
        rng = _rng("mutant", k)
        model = (mlp if k % 2 == 0 else cnn)(int(rng.integers(0, 100)))
        for _ in range(1 + int(rng.integers(0, 3))):
            _mutate(model, rng)
        save(model, d / M)
        if k % 2:
            x = np.random.default_rng(k).standard_normal((N, 2, 6, 6)).astype(np.float32)
            np.savez(d / D, x=x, labels=np.arange(N) % CLASSES)
        else:
            data(d / D)

    return make


def _npz_corrupt(k: int) -> Callable[[Path], None]:
    def make(d: Path) -> None:
        rng = _rng("npz", k)
        data(d / D, n=int(rng.integers(1, 40)))
        raw = bytearray((d / D).read_bytes())
        for pos in rng.integers(0, len(raw), 1 + int(rng.integers(0, 4))):
            raw[int(pos)] = int(rng.integers(0, 256))
        _bytes(d / D, bytes(raw))

    return make


_FLAG_VALUES: dict[str, list[str]] = {
    "--sparsity": ["0", "0.3", "0.9", "0.99", "0.999999", "1", "-0", "nan", "1e-300"],
    "--method": ["chita", "chita++", "magnitude", "wf", "cbs", "cbs-s"],
    "--update": ["auto", "none", "obs"],
    "--scope": ["global", "layer"],
    "--keep": ["W1", "W2", "W1,W2", "", ",", "W9"],
    "--min-density": ["0", "0.1", "0.5", "1", "nan"],
    "--ridge": ["0", "1e-12", "1", "1e30", "1e308"],
    "--stages": ["1", "2", "5", "1000", "0"],
    "--schedule": ["poly", "exp", "linear", "const", "geom"],
    "--start-sparsity": ["0", "0.5", "0.9", "0.99"],
    "--max-iter": ["1", "3", "100000"],
    "--rank": ["magnitude", "obd"],
    "--block-size": ["1", "7", "100000"],
    "--max-memory": ["1M", "2M", "1G"],
    "--loss": ["auto", "ce", "mse"],
    "--fisher": ["auto", "empirical", "sampled", "argmax"],
    "--mini-batch": ["1", "3", "24", "25"],
    "--num-samples": ["1", "2", "7", "100000"],
    "--seed": ["0", "1", str(2**63 - 1)],
    "--storage": ["auto", "sparse", "dense"],
    "--holdout": ["0.01", "0.5", "0.97"],
    "--batch-size": ["1", "5", str(2**31 - 1)],
}


def _flag_mutant(k: int) -> Build:
    """``compress`` with 1-4 random flags drawn from values valid, at a limit, and past it."""

    def build(d: Path) -> list[str]:
        rng = _rng("flags", k)
        _standard(d)
        extra: list[str] = []
        for flag in rng.choice(sorted(_FLAG_VALUES), int(rng.integers(1, 5)), replace=False):
            extra += [str(flag), str(rng.choice(_FLAG_VALUES[str(flag)]))]
        if "--stages" in extra and extra[extra.index("--stages") + 1] == "1000":
            extra[extra.index("--stages") + 1] = "20"  # legal, but a thousand stages are too slow for a test
        return command("compress", extra=extra)

    return build


def mutation_cases() -> list[Case]:
    """Seeded random mutations of a valid model and valid data; any outcome but a crash is fine."""
    cases: list[Case] = []
    outputs = {"compress": ("out/o.onnx",), "gradients": ("out/g.npy", "out/g.npy.layout.json")}
    for k in range(20 * SCALE):
        for cmd in ("inspect", "evaluate", "compress"):
            cases.append(
                Case(
                    f"mutant/{k}/{cmd}",
                    "model-mutation",
                    (lambda d, k=k, cmd=cmd: (_mutant(k)(d), command(cmd))[1]),
                    may_succeed=True,
                    outputs=outputs.get(cmd, ()),
                )
            )
    for k in range(20 * SCALE):
        flags = Case(
            f"flag-mutant/{k}/compress", "flags", _flag_mutant(k), may_succeed=True, outputs=outputs["compress"]
        )
        cases.append(flags)
    for k in range(10 * SCALE):
        for cmd in ("evaluate", "gradients"):
            cases.append(
                Case(
                    f"npz-mutant/{k}/{cmd}",
                    "npz-trap",
                    (lambda d, k=k, cmd=cmd: (save(mlp(), d / M), _npz_corrupt(k)(d), command(cmd))[2]),
                    may_succeed=True,
                    outputs=outputs.get(cmd, ()),
                )
            )
    return cases


# --------------------------------------------------------------------------------------------- all


@dataclass
class Suite:
    cases: list[Case] = field(default_factory=list)

    def by_id(self) -> dict[str, Case]:
        return {c.id: c for c in self.cases}


def all_cases() -> list[Case]:
    """Every case, in a stable order; ids are unique."""
    from hostile_features import feature_cases

    cases = [*model_cases(), *data_cases(), *flag_cases(), *positive_cases(), *path_cases(), *mutation_cases()]
    cases += feature_cases()
    ids = [c.id for c in cases]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    return cases
