"""Hostile inputs for the surfaces merged after the first fuzz suite (see ``hostile.py`` for the
contract and the :class:`~hostile.Case` type).

Classes (``Case.cls``):

* ``nm-pattern`` — ``--pattern`` values at and past their limits (``0:4``, ``4:4``, ``2:0``,
  ``2:4:8``, ``a:b``, huge M, ...), combined with the flags it excludes, in ``compress``, ``sweep``
  and ``inspect --pattern``; ``--allow-empty`` with every method;
* ``inspect-check`` — ``inspect --check`` with bad data, bad ``--output``, unsupported models,
  and flags that need ``--check``;
* ``working-copy`` — the gradient working copy: Resize, ConvTranspose, LSTM/GRU/RNN, Pad, Slice,
  Split, DepthToSpace, CumSum, normalizations, Gelu, ReduceMax/Min, Pow, ... with malformed,
  extreme or contradictory attributes and inputs on the path from a weight to the loss;
* ``subgraphs`` — If nodes whose condition varies across calibration batches, is not a scalar, or
  depends on the batch size; weights inside branches, shadowed names, nested Ifs; Loop and Scan;
* ``quantized-models`` — quantized graphs beyond plain QDQ (QLinearConv, ConvInteger,
  DynamicQuantizeLinear, com.microsoft QLinear ops, Q/DQ on activations only);
* ``batch-axes`` — static (rank-0 / no batch axis) inputs given with a batch axis and vice versa,
  state tensors in the model's layout instead of samples-first, disagreeing sample counts;
* ``heads-outputs`` — multi-output models with NaN/Inf or all-zero outputs, sigmoid and sequence
  heads with hostile labels, declared output shapes that are wrong, outputs that are inputs or
  constants, and ``--output`` naming them;
* ``graph-mutation`` — seeded random attribute and input mutations of the models above.

Every builder is deterministic (seeded), so a failure reproduces from its case id.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from hostile import (
    CLASSES,
    DATA,
    SCALE,
    Case,
    D,
    E,
    M,
    N,
    _rng,
    _standard,
    command,
    data,
    mlp,
    save,
    zip_bomb,
)
from onnx import TensorProto, helper, numpy_helper

F, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
GRAD_OUTPUTS = ("out/g.npy", "out/g.npy.layout.json")

# ------------------------------------------------------------------------------------ model kit


def vi(name: str, shape: Sequence[int | str] | None, elem: int = F) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


def node(op: str, ins: Sequence[str], outs: Sequence[str], **attrs: Any) -> onnx.NodeProto:
    domain = attrs.pop("domain", "")
    return helper.make_node(
        op, list(ins), list(outs), name=attrs.pop("name", f"{op.lower()}_{outs[0]}"), domain=domain, **attrs
    )


class Weights:
    """Seeded initializers: ``w("W", 4, 3)`` adds a float32 weight and returns its name."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.items: list[TensorProto] = []

    def __call__(self, name: str, *shape: int, scale: float = 0.5) -> str:
        a = scale * self.rng.standard_normal(shape) / np.sqrt(max(1, int(np.prod(shape[1:] or (1,)))))
        self.items.append(numpy_helper.from_array(a.astype(np.float32), name))
        return name

    def const(self, name: str, value: Any, dtype: Any = np.float32) -> str:
        self.items.append(numpy_helper.from_array(np.asarray(value, dtype), name))
        return name


def make(
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    inits: Sequence[TensorProto],
    *,
    opset: int = 17,
    extra_opsets: Sequence[tuple[str, int]] = (),
) -> onnx.ModelProto:
    graph = helper.make_graph(list(nodes), "fuzz", list(inputs), list(outputs), list(inits))
    ops = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, v) for d, v in extra_opsets)]
    model = helper.make_model(graph, opset_imports=ops, producer_name="fuzz")
    model.ir_version = 10 if opset >= 21 else 9 if opset >= 19 else 8
    return model


def logits_out(shape: Sequence[int | str] = ("N", CLASSES)) -> onnx.ValueInfoProto:
    return vi("logits", shape)


# ---- image chain: x[N,2,6,6] → Conv → c[N,4,6,6] → <hostile> → h[N,C,·,·] → GAP → Flatten → MatMul → logits

IMG = (2, 6, 6)


def img_model(
    mid: Callable[[Weights], list[onnx.NodeProto]], channels: int = 4, *, opset: int = 19, seed: int = 0
) -> onnx.ModelProto:
    """The image chain around the nodes ``mid`` builds (``c`` → ``h``, with ``channels`` channels)."""
    w = Weights(seed)
    nodes = [
        node("Conv", ["x", w("conv.w", 4, 2, 3, 3)], ["c"], pads=[1, 1, 1, 1], name="conv"),
        *mid(w),
        node("GlobalAveragePool", ["h"], ["p"], name="gap"),
        node("Flatten", ["p"], ["f"], name="flatten"),
        node("MatMul", ["f", w("fc.w", channels, CLASSES)], ["logits"], name="fc"),
    ]
    return make(nodes, [vi("x", ["N", *IMG])], [logits_out()], w.items, opset=opset)


def img_data(path: Path, n: int = N, seed: int = 1, **override: Any) -> None:
    rng = np.random.default_rng(seed)
    arrays: dict[str, Any] = {
        "x": rng.standard_normal((n, *IMG)).astype(np.float32),
        "labels": rng.integers(0, CLASSES, n).astype(np.int64),
    }
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})


# ---- sequence chain: x[N,T,6] → Transpose → <recurrent> → Y_h[dirs,N,H] → Transpose → Flatten → MatMul → logits

T_SEQ, D_SEQ, H = 5, 6, 4


def seq_data(path: Path, n: int = N, t: int = T_SEQ, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    np.savez(
        path,
        x=rng.standard_normal((n, t, D_SEQ)).astype(np.float32),
        labels=rng.integers(0, CLASSES, n).astype(np.int64),
    )


_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def rnn_model(
    op: str = "LSTM",
    *,
    hidden: int = H,
    dirs: int = 1,
    attrs: dict[str, Any] | None = None,
    w_shape: Sequence[int] | None = None,
    r_shape: Sequence[int] | None = None,
    b_len: int | None = None,
    seq_lens: Any = None,
    initial: Sequence[int] | None = None,
    peep: int | None = None,
    t: int | str = "T",
    seed: int = 0,
) -> onnx.ModelProto:
    """A recurrent layer on the gradient path; every shape and attribute can be made hostile."""
    g = _GATES[op]
    w = Weights(seed)
    a = {"hidden_size": hidden, **({"direction": "bidirectional"} if dirs == 2 else {}), **(attrs or {})}
    ins = [
        "xt",
        w("W", *(w_shape or (dirs, g * hidden, D_SEQ))),
        w("R", *(r_shape or (dirs, g * hidden, hidden))),
        w("B", *(dirs, b_len if b_len is not None else 2 * g * hidden)),
    ]
    ins.append(w.const("seq_lens", seq_lens, np.int32) if seq_lens is not None else "")
    if initial is not None:
        ins.append(w.const("h0", np.zeros(initial), np.float32))
        if op == "LSTM":
            ins.append(w.const("c0", np.zeros(initial), np.float32))
    if peep is not None and op == "LSTM":
        while len(ins) < 7:
            ins.append("")
        ins.append(w("P", dirs, peep))
    while ins and ins[-1] == "":
        ins.pop()
    nodes = [
        node("Transpose", ["x"], ["xt"], perm=[1, 0, 2], name="to_time_major"),
        node(op, ins, ["Y", "Y_h"], name="rnn", **a),
        node("Transpose", ["Y_h"], ["yb"], perm=[1, 0, 2], name="to_batch_major"),
        node("Flatten", ["yb"], ["f"], name="flatten"),
        # the head's width follows R (a hostile hidden_size attribute may be negative)
        node("MatMul", ["f", w("fc.w", dirs * (r_shape[-1] if r_shape else hidden), CLASSES)], ["logits"], name="fc"),
    ]
    return make(nodes, [vi("x", ["N", t, D_SEQ])], [logits_out()], w.items)


# ---- vector chain: x[N,6] → MatMul W1 → h[N,8] → <hostile> → z[N,8] → Gemm W2 → logits


def vec_model(
    mid: Callable[[Weights], list[onnx.NodeProto]],
    width: int = 8,
    *,
    opset: int = 17,
    extra_opsets: Sequence[tuple[str, int]] = (),
    inputs: Sequence[onnx.ValueInfoProto] = (),
    outputs: Sequence[onnx.ValueInfoProto] = (),
    seed: int = 0,
) -> onnx.ModelProto:
    w = Weights(seed)
    nodes = [
        node("MatMul", ["x", w("W1", 6, 8)], ["h"], name="fc1"),
        *mid(w),
        node("Gemm", ["z", w("W2", CLASSES, width)], ["logits"], transB=1, name="fc2"),
    ]
    ins = [vi("x", ["N", 6]), *inputs]
    return make(nodes, ins, [logits_out(), *outputs], w.items, opset=opset, extra_opsets=extra_opsets)


# ------------------------------------------------------------------------------------ helpers


def _gradients(extra: Sequence[str] = ()) -> list[str]:
    return ["gradients", M, "--data", D, "--out", "out/g.npy", *extra]


def _check(extra: Sequence[str] = ()) -> list[str]:
    return ["inspect", M, "--check", "--data", D, *extra]


def _argv(cmd: str) -> list[str]:
    """The command line of ``cmd`` for a model case (``check`` is ``inspect --check --data``)."""
    if cmd == "check":
        return _check()
    if cmd == "gradients":
        return _gradients()
    if cmd == "compress":
        return ["compress", M, "out/o.onnx", "--data", D, "--num-samples", "16", "--eval-data", D]
    return command(cmd)


_OUTPUTS = {"gradients": GRAD_OUTPUTS, "compress": ("out/o.onnx",)}


def _model_cases(
    cls: str,
    name: str,
    build_model: Callable[[], onnx.ModelProto],
    write_data: Callable[[Path], None],
    cmds: Sequence[str],
    *,
    may_succeed: bool = False,
    codes: tuple[int, ...] = (1,),
    needles: tuple[str, ...] = (),
    extra: Sequence[str] = (),
) -> list[Case]:
    out = []
    for cmd in cmds:

        def build(d: Path, cmd: str = cmd) -> list[str]:
            save(build_model(), d / M)
            write_data(d / D)
            return [*_argv(cmd), *extra]

        out.append(
            Case(
                f"{cls}/{name}/{cmd}",
                cls,
                build,
                codes=codes,
                needles=needles,
                may_succeed=may_succeed,
                outputs=_OUTPUTS.get(cmd, ()),
            )
        )
    return out


# ------------------------------------------------------------------------------ nm-pattern


def pattern_cases() -> list[Case]:
    c: list[Case] = []
    huge = str(10**30)
    bad = ["0:4", "4:4", "2:0", "2:4:8", "a:b", "-1:4", "2:-4", "5:4", ":", "", "2:4x", "2.0:4", "1e3:4", f"2:{huge}"]
    for value in bad:
        label = value.encode("unicode_escape").decode() or "empty"
        for cmd in ("compress", "inspect"):

            def build(d: Path, cmd: str = cmd, value: str = value) -> list[str]:
                _standard(d)
                return command(cmd, extra=["--pattern", value])

            c.append(Case(f"nm-pattern/{cmd}/{label}", "nm-pattern", build, codes=(2,), needles=("--pattern",)))
    # valid pattern values the model cannot take: huge M, a group larger than every axis
    for value in ("2:1000000000", "1:16", f"1:{2**62}"):
        for cmd in ("compress", "inspect"):

            def build2(d: Path, cmd: str = cmd, value: str = value) -> list[str]:
                _standard(d)
                return command(cmd, extra=["--pattern", value])

            c.append(
                Case(
                    f"nm-pattern/{cmd}/no-eligible-{value}",
                    "nm-pattern",
                    build2,
                    codes=(1, 2),
                    may_succeed=cmd == "inspect",
                )
            )
    flag_clashes: list[tuple[list[str], tuple[str, ...]]] = [
        (["--pattern", "2:4", "--sparsity", "0.5"], ("--sparsity",)),
        (["--pattern", "2:4", "--min-density", "0.1"], ("--min-density",)),
        (["--pattern", "2:4", "--method", "chita++", "--start-sparsity", "0.9"], ("--start-sparsity",)),
        (["--pattern", "2:4", "--check"], ("--pattern",)),
    ]
    for args, needles in flag_clashes:
        label = " ".join(args)

        def build3(d: Path, args: list[str] = args) -> list[str]:
            _standard(d)
            if "--check" in args:
                return ["inspect", M, *args]
            return command("compress", extra=args)

        c.append(Case(f"nm-pattern/clash/{label}", "nm-pattern", build3, codes=(1, 2), needles=needles))
    # the pattern with every method, and with --allow-empty: must work, or fail with one line
    for method in ("magnitude", "wf", "cbs", "cbs-s", "chita", "chita++"):

        def build4(d: Path, method: str = method) -> list[str]:
            _standard(d)
            return command(
                "compress",
                extra=["--pattern", "1:8", "--method", method, "--stages", "2"]
                if method == "chita++"
                else ["--pattern", "1:8", "--method", method],
            )

        c.append(Case(f"nm-pattern/method/{method}", "nm-pattern", build4, may_succeed=True, outputs=("out/o.onnx",)))

        def build5(d: Path, method: str = method) -> list[str]:
            _standard(d)
            extra = ["--sparsity", "0.999999", "--allow-empty", "--method", method]
            return command("compress", extra=extra + (["--stages", "2"] if method == "chita++" else []))

        c.append(
            Case(f"nm-pattern/allow-empty/{method}", "nm-pattern", build5, may_succeed=True, outputs=("out/o.onnx",))
        )
    for extra in (["--scope", "layer"], ["--keep", "W1"], ["--storage", "sparse"], ["--update", "obs"]):

        def build6(d: Path, extra: list[str] = extra) -> list[str]:
            _standard(d)
            return command("compress", extra=["--sparsity", "0.999999", "--allow-empty", *extra])

        c.append(
            Case(
                f"nm-pattern/allow-empty/{' '.join(extra)}",
                "nm-pattern",
                build6,
                may_succeed=True,
                outputs=("out/o.onnx",),
            )
        )

    def sweep_pattern(d: Path) -> list[str]:
        _standard(d)
        return [
            "sweep",
            M,
            "--data",
            D,
            "--methods",
            "magnitude",
            "--sparsities",
            "0.5",
            "--out",
            "out/s",
            "--pattern",
            "2:4:8",
        ]

    c.append(Case("nm-pattern/sweep/2:4:8", "nm-pattern", sweep_pattern, codes=(2,), needles=("--pattern",)))

    # inspect --pattern on models it cannot read or that hold odd tensors
    def fp16(d: Path) -> list[str]:
        save(mlp(dtype=TensorProto.FLOAT16), d / M)
        return ["inspect", M, "--pattern", "2:4"]

    c.append(Case("nm-pattern/inspect/float16", "nm-pattern", fp16, may_succeed=True))

    def nan_weights(d: Path) -> list[str]:
        m = mlp()
        t = next(t for t in m.graph.initializer if t.name == "W2")
        a = numpy_helper.to_array(t).copy()
        a[:] = np.nan
        t.CopyFrom(numpy_helper.from_array(a, "W2"))
        save(m, d / M)
        return ["inspect", M, "--pattern", "2:4", "--json"]

    c.append(Case("nm-pattern/inspect/nan-weights", "nm-pattern", nan_weights, may_succeed=True))
    return c


# ---------------------------------------------------------------------------- inspect --check


def check_cases() -> list[Case]:
    c: list[Case] = []
    for name in (
        "pickled-object-array",
        "zip-bomb-2GiB",
        "nan-inputs",
        "fifo",
        "missing",
        "wrong-feature-dim",
        "empty-arrays",
        "int-inputs",
        "folder-empty",
        "folder-fifo-member",
    ):
        make_data, needles = DATA[name]

        def build(d: Path, make_data: Callable[[Path], None] = make_data) -> list[str]:
            save(mlp(), d / M)
            make_data(d)
            return _check()

        c.append(Case(f"inspect-check/data/{name}", "inspect-check", build, needles=needles))
    for json_flag in ((), ("--json",)):
        for args, codes, needles in [
            (["--output", "nope"], (1, 2), ("nope",)),
            (["--output", ""], (1, 2), ("--output",)),
        ]:
            label = " ".join([*args, *json_flag])

            def build2(d: Path, args: list[str] = args, json_flag: tuple[str, ...] = json_flag) -> list[str]:
                _standard(d)
                return _check([*args, *json_flag])

            c.append(Case(f"inspect-check/flags/{label}", "inspect-check", build2, codes=codes, needles=needles))
    for args, needles in [
        (["--data", D], ("--data", "--check")),
        (["--output", "logits"], ("--output", "--check")),
        (["--check", "--data", "random"], ()),
    ]:

        def build3(d: Path, args: list[str] = args) -> list[str]:
            _standard(d)
            return ["inspect", M, *args]

        c.append(
            Case(
                f"inspect-check/flags/{' '.join(args)}",
                "inspect-check",
                build3,
                codes=(2,),
                needles=needles,
                may_succeed="random" in args,
            )
        )

    def int_output(d: Path) -> list[str]:
        def mid(w: Weights) -> list[onnx.NodeProto]:
            return [node("Relu", ["h"], ["z"])]

        # an integer output that is no ArgMax of scores (those are differentiated through their scores)
        m = vec_model(mid, outputs=[vi("cls", ["N", 3], I64)])
        m.graph.node.append(node("Cast", ["logits"], ["cls"], to=TensorProto.INT64))
        save(m, d / M)
        data(d / D)
        return _check(["--output", "cls"])

    c.append(Case("inspect-check/output-is-int", "inspect-check", int_output, needles=("cls",)))
    for name, builder in (("loop", _loop_model), ("scan", _scan_model), ("qlinearconv", _qlinearconv)):

        def build4(d: Path, builder: Callable[[], onnx.ModelProto] = builder) -> list[str]:
            save(builder(), d / M)
            data(d / D)
            return ["inspect", M, "--check", "--json"]

        c.append(Case(f"inspect-check/refused/{name}", "inspect-check", build4))
    return c


# ------------------------------------------------------------------------------- working copy


def _resize(
    attrs: dict[str, Any], scales: Any = None, sizes: Any = None, roi: Any = None
) -> Callable[[Weights], list[onnx.NodeProto]]:
    def mid(w: Weights) -> list[onnx.NodeProto]:
        ins = ["c", w.const("rz.roi", roi, np.float32) if roi is not None else ""]
        ins.append(w.const("rz.scales", scales, np.float32) if scales is not None else "")
        if sizes is not None:
            ins.append(w.const("rz.sizes", sizes, np.int64))
        while ins[-1] == "":
            ins.pop()
        return [node("Resize", ins, ["h"], name="resize", **attrs)]

    return mid


RESIZE: dict[str, tuple[dict[str, Any], Any, Any]] = {
    "scales-zero": ({}, [1, 1, 0, 0], None),
    "scales-negative": ({}, [1, 1, -2, 2], None),
    "scales-nan": ({}, [1, 1, np.nan, 2], None),
    "scales-inf": ({}, [1, 1, np.inf, 1], None),
    "scales-huge": ({}, [1, 1, 1e4, 1e4], None),
    "scales-tiny": ({}, [1, 1, 1e-6, 1], None),
    "scales-wrong-length": ({}, [2, 2], None),
    "scales-batch-axis": ({}, [2, 1, 1, 1], None),
    "scales-channel-axis": ({}, [1, 2, 1, 1], None),
    "sizes-zero": ({}, None, [N, 4, 0, 6]),
    "sizes-negative": ({}, None, [N, 4, -3, 6]),
    "sizes-huge": ({}, None, [1, 4, 2**31, 2]),
    "sizes-wrong-batch": ({}, None, [7, 4, 12, 12]),
    "sizes-wrong-length": ({}, None, [12, 12]),
    "sizes-and-scales": ({}, [1, 1, 2, 2], [1, 4, 12, 12]),
    "mode-bogus": ({"mode": "bogus"}, [1, 1, 2, 2], None),
    "coord-bogus": ({"coordinate_transformation_mode": "bogus"}, [1, 1, 2, 2], None),
    "nearest-mode-bogus": ({"nearest_mode": "bogus"}, [1, 1, 2, 2], None),
    "cubic-coeff-nan": ({"mode": "cubic", "cubic_coeff_a": float("nan")}, [1, 1, 2, 2], None),
    "cubic-coeff-huge": ({"mode": "cubic", "cubic_coeff_a": 1e30}, [1, 1, 2, 2], None),
    "antialias-up": ({"mode": "linear", "antialias": 1}, [1, 1, 2, 2], None),
    "antialias-down": ({"mode": "cubic", "antialias": 1}, [1, 1, 0.5, 0.5], None),
    "antialias-7": ({"mode": "linear", "antialias": 7}, [1, 1, 0.5, 0.5], None),
    "axes-duplicate": ({"axes": [2, 2]}, [2, 2], None),
    "axes-out-of-range": ({"axes": [7]}, [2], None),
    "axes-negative": ({"axes": [-1]}, [2], None),
    "aspect-policy-bogus": ({"keep_aspect_ratio_policy": "bogus"}, None, [N, 4, 12, 9]),
    "aspect-not-larger": ({"keep_aspect_ratio_policy": "not_larger", "axes": [2, 3]}, None, [12, 9]),
    "tf-crop-and-resize": ({"coordinate_transformation_mode": "tf_crop_and_resize"}, [1, 1, 2, 2], None),
    "exclude-outside-cubic": ({"mode": "cubic", "exclude_outside": 1}, [1, 1, 1.5, 1.5], None),
    "extrapolation-nan": ({"extrapolation_value": float("nan")}, [1, 1, 2, 2], None),
}


def _conv_t(
    attrs: dict[str, Any], w_shape: Sequence[int] = (4, 4, 3, 3), bias: int | None = None
) -> Callable[[Weights], list[onnx.NodeProto]]:
    def mid(w: Weights) -> list[onnx.NodeProto]:
        ins = ["c", w("ct.w", *w_shape)]
        if bias is not None:
            ins.append(w("ct.b", bias))
        return [node("ConvTranspose", ins, ["h"], name="deconv", **attrs)]

    return mid


CONV_T: dict[str, tuple[dict[str, Any], Sequence[int], int | None, int]] = {
    "strides-zero": ({"strides": [0, 0]}, (4, 4, 3, 3), None, 4),
    "strides-negative": ({"strides": [-1, -1]}, (4, 4, 3, 3), None, 4),
    "strides-huge": ({"strides": [2**31, 1]}, (4, 4, 3, 3), None, 4),
    # a stride far past the kernel (gaps of zeros); 6x6 → 303x303: large, but within a fuzz case's time
    "strides-large": ({"strides": [60, 60]}, (4, 4, 3, 3), None, 4),
    "dilations-zero": ({"dilations": [0, 1]}, (4, 4, 3, 3), None, 4),
    "dilations-negative": ({"dilations": [-2, 1]}, (4, 4, 3, 3), None, 4),
    "pads-negative": ({"pads": [-1, -1, -1, -1]}, (4, 4, 3, 3), None, 4),
    "pads-past-output": ({"pads": [100, 100, 100, 100]}, (4, 4, 3, 3), None, 4),
    "pads-wrong-length": ({"pads": [1, 1]}, (4, 4, 3, 3), None, 4),
    "output-padding-past-stride": ({"strides": [2, 2], "output_padding": [3, 3]}, (4, 4, 3, 3), None, 4),
    "output-padding-negative": ({"strides": [2, 2], "output_padding": [-1, -1]}, (4, 4, 3, 3), None, 4),
    "group-zero": ({"group": 0}, (4, 4, 3, 3), None, 4),
    "group-negative": ({"group": -2}, (4, 4, 3, 3), None, 4),
    "group-not-dividing": ({"group": 3}, (4, 4, 3, 3), None, 12),
    "group-depthwise": ({"group": 4}, (4, 1, 3, 3), None, 4),
    "output-shape-huge": ({"output_shape": [100000, 100000]}, (4, 4, 3, 3), None, 4),
    "output-shape-small": ({"output_shape": [2, 2]}, (4, 4, 3, 3), None, 4),
    "output-shape-rank": ({"output_shape": [8]}, (4, 4, 3, 3), None, 4),
    "output-shape-and-pads": ({"output_shape": [9, 9], "pads": [1, 1, 1, 1], "strides": [2, 2]}, (4, 4, 3, 3), None, 4),
    "auto-pad-bogus": ({"auto_pad": "BOGUS"}, (4, 4, 3, 3), None, 4),
    "auto-pad-with-pads": ({"auto_pad": "SAME_UPPER", "pads": [1, 1, 1, 1]}, (4, 4, 3, 3), None, 4),
    "auto-pad-same-strided": ({"auto_pad": "SAME_LOWER", "strides": [3, 2]}, (4, 4, 3, 3), None, 4),
    "kernel-shape-contradicts": ({"kernel_shape": [5, 5]}, (4, 4, 3, 3), None, 4),
    "weight-rank-3": ({}, (4, 4, 3), None, 4),
    "weight-rank-5": ({}, (4, 4, 3, 3, 3), None, 4),
    "weight-channels-wrong": ({}, (3, 4, 3, 3), None, 4),
    "weight-empty-kernel": ({}, (4, 4, 0, 3), None, 4),
    "bias-wrong-length": ({}, (4, 4, 3, 3), 7, 4),
    "kernel-larger-than-input": ({"pads": [0, 0, 0, 0]}, (4, 4, 9, 9), None, 4),
}

#: Recurrent layers: (op, keyword arguments of :func:`rnn_model`).
RECURRENT: dict[str, tuple[str, dict[str, Any]]] = {
    "lstm-hidden-mismatch": ("LSTM", {"hidden": 5, "w_shape": (1, 16, D_SEQ), "r_shape": (1, 16, 4)}),
    "lstm-hidden-zero": ("LSTM", {"hidden": 0, "w_shape": (1, 0, D_SEQ), "r_shape": (1, 0, 0), "b_len": 0}),
    "lstm-direction-bogus": ("LSTM", {"attrs": {"direction": "sideways"}}),
    "lstm-direction-vs-weights": ("LSTM", {"attrs": {"direction": "bidirectional"}}),
    "lstm-activations-unknown": ("LSTM", {"attrs": {"activations": ["Foo", "Bar", "Baz"]}}),
    "lstm-activations-count": ("LSTM", {"attrs": {"activations": ["Sigmoid"]}}),
    "lstm-activations-exotic": (
        "LSTM",
        {
            "attrs": {
                "activations": ["HardSigmoid", "ScaledTanh", "Affine"],
                "activation_alpha": [0.2, 1.0, 2.0],
                "activation_beta": [0.5, 1.0, 0.1],
            }
        },
    ),
    "lstm-activation-alpha-nan": (
        "LSTM",
        {"attrs": {"activations": ["LeakyRelu", "Tanh", "Tanh"], "activation_alpha": [float("nan")]}},
    ),
    "lstm-clip-negative": ("LSTM", {"attrs": {"clip": -1.0}}),
    "lstm-clip-nan": ("LSTM", {"attrs": {"clip": float("nan")}}),
    "lstm-clip-zero": ("LSTM", {"attrs": {"clip": 0.0}}),
    "lstm-input-forget-7": ("LSTM", {"attrs": {"input_forget": 7}}),
    "lstm-layout-batch-first": ("LSTM", {"attrs": {"layout": 1}}),
    "lstm-layout-2": ("LSTM", {"attrs": {"layout": 2}}),
    "lstm-seq-lens-zero": ("LSTM", {"seq_lens": np.zeros(N, np.int32)}),
    "lstm-seq-lens-past-T": ("LSTM", {"seq_lens": np.full(N, 99, np.int32)}),
    "lstm-seq-lens-negative": ("LSTM", {"seq_lens": np.full(N, -1, np.int32)}),
    "lstm-seq-lens-wrong-count": ("LSTM", {"seq_lens": np.full(3, 2, np.int32)}),
    "lstm-initial-state-wrong-batch": ("LSTM", {"initial": (1, 7, H)}),
    "lstm-initial-state-wrong-hidden": ("LSTM", {"initial": (1, N, H + 1)}),
    "lstm-peepholes-wrong-length": ("LSTM", {"peep": 5}),
    "lstm-bias-wrong-length": ("LSTM", {"b_len": 7}),
    "lstm-long-sequence": ("LSTM", {"t": 3000}),
    "gru-linear-before-reset-2": ("GRU", {"attrs": {"linear_before_reset": 2}}),
    "gru-input-forget": ("GRU", {"attrs": {"input_forget": 1}}),
    "gru-weights-transposed": ("GRU", {"w_shape": (1, D_SEQ, 12)}),
    "gru-bidirectional-one-weight": ("GRU", {"attrs": {"direction": "bidirectional"}}),
    "rnn-activations-three": ("RNN", {"attrs": {"activations": ["Tanh", "Tanh", "Tanh"]}}),
    "rnn-hidden-negative": ("RNN", {"hidden": -4, "w_shape": (1, 4, D_SEQ), "r_shape": (1, 4, 4), "b_len": 8}),
    "rnn-reverse-clip": ("RNN", {"attrs": {"direction": "reverse", "clip": 1e-30}}),
}


def _vec_op(
    op: str, ins: Sequence[str] = ("h",), consts: dict[str, Any] | None = None, **attrs: Any
) -> Callable[[Weights], list[onnx.NodeProto]]:
    """``h → op(h, consts...) → z`` (consts: name → value, appended to the inputs in order)."""

    def mid(w: Weights) -> list[onnx.NodeProto]:
        names = list(ins)
        for k, v in (consts or {}).items():
            if v is None:
                names.append("")
            else:
                dtype = np.asarray(v).dtype if np.asarray(v).dtype != np.float64 else np.float32
                names.append(w.const(k, v, dtype))
        return [node(op, names, ["z"], name=f"hostile_{op.lower()}", **attrs)]

    return mid


#: Ops rewritten on the vector chain (h [N,8] → z [N,8]) with hostile attributes and inputs.
VEC_OPS: dict[str, tuple[Callable[[Weights], list[onnx.NodeProto]], int, dict[str, Any]]] = {
    "gelu-approximate-bogus": (_vec_op("Gelu", approximate="bogus"), 8, {"opset": 20}),
    "ms-gelu-bias-wrong-length": (
        _vec_op("BiasGelu", ("h",), {"gb": np.ones(3, np.float32)}, domain="com.microsoft"),
        8,
        {"ms": True},
    ),
    "ms-fastgelu-no-input": (lambda w: [node("FastGelu", [""], ["z"], domain="com.microsoft")], 8, {"ms": True}),
    "ms-fusedmatmul-alpha-nan": (
        _vec_op("FusedMatMul", ("h",), {"fm": np.eye(8, dtype=np.float32)}, domain="com.microsoft", alpha=float("nan")),
        8,
        {"ms": True},
    ),
    "ms-fusedmatmul-trans-bogus": (
        _vec_op("FusedMatMul", ("h",), {"fm2": np.ones((3, 8), np.float32)}, domain="com.microsoft", transB=5),
        3,
        {"ms": True},
    ),
    "reducemax-axes-out-of-range": (
        _vec_op("ReduceMax", ("h",), {"ax": np.array([5], np.int64)}, keepdims=1),
        8,
        {"opset": 18},
    ),
    "reducemax-all-axes-noop": (
        _vec_op("ReduceMax", ("h",), {"ax0": np.array([], np.int64)}, noop_with_empty_axes=1),
        8,
        {"opset": 18},
    ),
    "reducemin-duplicate-axes": (
        _vec_op("ReduceMin", ("h",), {"axd": np.array([1, 1], np.int64)}, keepdims=1),
        8,
        {"opset": 18},
    ),
    "reducemax-keepdims-0": (
        _vec_op("ReduceMax", ("h",), {"ax1": np.array([1], np.int64)}, keepdims=0),
        8,
        {"opset": 18},
    ),
    "pad-reflect-past-dim": (
        _vec_op("Pad", ("h",), {"pp": np.array([0, 20, 0, 20], np.int64)}, mode="reflect"),
        48,
        {},
    ),
    "pad-edge-negative": (_vec_op("Pad", ("h",), {"pn": np.array([0, -3, 0, -3], np.int64)}, mode="edge"), 2, {}),
    "pad-wrap-opset-17": (_vec_op("Pad", ("h",), {"pw": np.array([0, 2, 0, 2], np.int64)}, mode="wrap"), 12, {}),
    "pad-mode-bogus": (_vec_op("Pad", ("h",), {"pb": np.array([0, 1, 0, 1], np.int64)}, mode="bogus"), 10, {}),
    "pad-huge": (_vec_op("Pad", ("h",), {"ph": np.array([0, 2**40, 0, 0], np.int64)}, mode="reflect"), 8, {}),
    "pad-axes-duplicate": (
        _vec_op(
            "Pad",
            ("h",),
            {"pa": np.array([1, 1, 1, 1], np.int64), "pv": None, "paxes": np.array([1, 1], np.int64)},
            mode="edge",
        ),
        8,
        {"opset": 19},
    ),
    "slice-step-zero": (
        _vec_op(
            "Slice",
            ("h",),
            {
                "s0": np.array([0], np.int64),
                "e0": np.array([8], np.int64),
                "a0": np.array([1], np.int64),
                "st0": np.array([0], np.int64),
            },
        ),
        8,
        {},
    ),
    "slice-step-int-min": (
        _vec_op(
            "Slice",
            ("h",),
            {
                "s1": np.array([-1], np.int64),
                "e1": np.array([-(2**63)], np.int64),
                "a1": np.array([1], np.int64),
                "st1": np.array([-(2**63)], np.int64),
            },
        ),
        1,
        {},
    ),
    "slice-negative-step-huge-start": (
        _vec_op(
            "Slice",
            ("h",),
            {
                "s2": np.array([2**62], np.int64),
                "e2": np.array([-(2**62)], np.int64),
                "a2": np.array([1], np.int64),
                "st2": np.array([-3], np.int64),
            },
        ),
        3,
        {},
    ),
    "split-sizes-wrong-sum": (
        lambda w: [node("Split", ["h", w.const("sp", [3, 3], np.int64)], ["z", "z_rest"], axis=1)],
        3,
        {},
    ),
    "split-axis-out-of-range": (lambda w: [node("Split", ["h"], ["z", "z_rest"], axis=4)], 4, {}),
    "split-num-outputs-zero": (lambda w: [node("Split", ["h"], ["z"], axis=1, num_outputs=0)], 8, {"opset": 18}),
    "cumsum-axis-out-of-range": (_vec_op("CumSum", ("h",), {"csa": np.array(9, np.int64)}), 8, {}),
    "cumsum-axis-from-data": (
        lambda w: [
            node("Shape", ["x"], ["xs"]),
            node("ReduceMin", ["xs"], ["xsm"], keepdims=0),
            node("Sub", ["xsm", w.const("five", 5, np.int64)], ["cax"]),
            node("CumSum", ["h", "cax"], ["z"]),
        ],
        8,
        {},
    ),
    "lpnorm-p3": (_vec_op("LpNormalization", p=3, axis=1), 8, {}),
    "lpnorm-axis-out-of-range": (_vec_op("LpNormalization", p=2, axis=7), 8, {}),
    "mvn-axes-bogus": (_vec_op("MeanVarianceNormalization", axes=[5]), 8, {}),
    "celu-alpha-zero": (_vec_op("Celu", alpha=0.0), 8, {}),
    "celu-alpha-nan": (_vec_op("Celu", alpha=float("nan")), 8, {}),
    "selu-gamma-inf": (_vec_op("Selu", gamma=float("inf")), 8, {}),
    "thresholded-relu-nan": (_vec_op("ThresholdedRelu", alpha=float("nan")), 8, {}),
    "prelu-slope-wrong-shape": (_vec_op("PRelu", ("h",), {"slope": np.ones(3, np.float32)}), 8, {}),
    "prelu-slope-on-data": (lambda w: [node("PRelu", ["h", "x"], ["z"])], 8, {}),
    "pow-exponent-huge-int": (_vec_op("Pow", ("h",), {"e": np.array(2**40, np.int64)}), 8, {}),
    "pow-exponent-negative-int": (_vec_op("Pow", ("h",), {"en": np.array(-3, np.int64)}), 8, {}),
    "pow-exponent-nan": (_vec_op("Pow", ("h",), {"enan": np.array(np.nan, np.float32)}), 8, {}),
    "mean-one-input": (_vec_op("Mean"), 8, {}),
    "softplus-on-int": (
        lambda w: [
            node("Cast", ["h"], ["hi"], to=I64),
            node("Softplus", ["hi"], ["zi"]),
            node("Cast", ["zi"], ["z"], to=F),
        ],
        8,
        {},
    ),
    "round-on-path": (_vec_op("Round"), 8, {}),
    "sign-on-path": (_vec_op("Sign"), 8, {}),
    "depth-to-space-blocksize-0": (
        lambda w: [
            node("Reshape", ["h", w.const("r4", [-1, 8, 1, 1], np.int64)], ["h4"]),
            node("DepthToSpace", ["h4"], ["d"], blocksize=0),
            node("Flatten", ["d"], ["z"]),
        ],
        8,
        {},
    ),
    "depth-to-space-mode-bogus": (
        lambda w: [
            node("Reshape", ["h", w.const("r4b", [-1, 8, 1, 1], np.int64)], ["h4"]),
            node("DepthToSpace", ["h4"], ["d"], blocksize=2, mode="XYZ"),
            node("Flatten", ["d"], ["z"]),
        ],
        8,
        {},
    ),
    "space-to-depth-not-divisible": (
        lambda w: [
            node("Reshape", ["h", w.const("r4c", [-1, 1, 8, 1], np.int64)], ["h4"]),
            node("SpaceToDepth", ["h4"], ["d"], blocksize=3),
            node("Flatten", ["d"], ["z"]),
        ],
        8,
        {},
    ),
    "groupnorm-groups-zero": (
        lambda w: [
            node("Reshape", ["h", w.const("r4d", [-1, 8, 1, 1], np.int64)], ["h4"]),
            node(
                "GroupNormalization", ["h4", w.const("gs", np.ones(8)), w.const("gb", np.zeros(8))], ["d"], num_groups=0
            ),
            node("Flatten", ["d"], ["z"]),
        ],
        8,
        {"opset": 21},
    ),
    "groupnorm-groups-not-dividing": (
        lambda w: [
            node("Reshape", ["h", w.const("r4e", [-1, 8, 1, 1], np.int64)], ["h4"]),
            node(
                "GroupNormalization",
                ["h4", w.const("gs3", np.ones(8)), w.const("gb3", np.zeros(8))],
                ["d"],
                num_groups=3,
            ),
            node("Flatten", ["d"], ["z"]),
        ],
        8,
        {"opset": 21},
    ),
    "groupnorm-epsilon-negative": (
        lambda w: [
            node("Reshape", ["h", w.const("r4f", [-1, 8, 1, 1], np.int64)], ["h4"]),
            node(
                "GroupNormalization",
                ["h4", w.const("gsn", np.ones(8)), w.const("gbn", np.zeros(8))],
                ["d"],
                num_groups=2,
                epsilon=-1.0,
            ),
            node("Flatten", ["d"], ["z"]),
        ],
        8,
        {"opset": 21},
    ),
    "ms-skiplayernorm-wrong-gamma": (
        lambda w: [
            node("SkipLayerNormalization", ["h", "h", w.const("sg", np.ones(3))], ["z"], domain="com.microsoft")
        ],
        8,
        {"ms": True},
    ),
    "unknown-ms-op": (lambda w: [node("NoSuchContribOp", ["h"], ["z"], domain="com.microsoft")], 8, {"ms": True}),
    "custom-domain-op": (lambda w: [node("Mystery", ["h"], ["z"], domain="org.example")], 8, {"custom": True}),
    "einsum-on-path": (lambda w: [node("Einsum", ["h"], ["z"], equation="ni->ni")], 8, {}),
    "topk-k-from-data": (
        lambda w: [
            node("Shape", ["x"], ["xs"]),
            node("Slice", ["xs", w.const("k0", [1], np.int64), w.const("k1", [2], np.int64)], ["k"]),
            node("TopK", ["h", "k"], ["z", "zi"], axis=1),
        ],
        6,
        {},
    ),
    "nonzero-shape-on-path": (
        lambda w: [
            node("Relu", ["h"], ["hr"]),
            node("NonZero", ["hr"], ["nz"]),
            node("Shape", ["nz"], ["nzs"]),
            node("Cast", ["nzs"], ["nzf"], to=F),
            node("ReduceSum", ["nzf"], ["nzr"], keepdims=1),
            node("Mul", ["h", "nzr"], ["z"]),
        ],
        8,
        {},
    ),
}


def _if_model(kind: str) -> onnx.ModelProto:
    """x[N,6] → MatMul W1 → h[N,8] → If(cond) → b[N,8] → Gemm W2 → logits, with a hostile If."""
    w = Weights(5)
    rng = np.random.default_rng(7)

    def branch(
        name: str, ops: list[onnx.NodeProto], out: str = "b", shape: Sequence[int | str] | None = None
    ) -> onnx.GraphProto:
        return helper.make_graph(ops, name, [], [vi(out, shape)])

    then_ops = [node("Relu", ["h"], ["b"], name="then_relu")]
    else_ops = [node("Neg", ["h"], ["b"], name="else_neg")]
    pre: list[onnx.NodeProto] = []
    ins = [vi("x", ["N", 6])]
    cond = "cond"
    if kind == "varies-across-batches":  # a batch-level condition: the data makes blocks disagree
        pre = [
            node("ReduceSum", ["x"], ["s"], keepdims=0, name="sum_all"),
            node("Greater", ["s", w.const("zero", 0.0)], ["cond"], name="positive"),
        ]
    elif kind == "per-sample-condition":  # cond of shape [N]: onnxruntime needs exactly one element
        pre = [
            node(
                "Slice",
                ["x", w.const("c0", [0], np.int64), w.const("c1", [1], np.int64), w.const("ca", [1], np.int64)],
                ["x0"],
            ),
            node("Greater", ["x0", w.const("zero", 0.0)], ["cond"], name="positive"),
        ]
    elif kind == "batch-size-condition":
        pre = [
            node("Shape", ["x"], ["xs"]),
            node("Gather", ["xs", w.const("i0", 0, np.int64)], ["nb"], axis=0),
            node("Greater", ["nb", w.const("twenty", 20, np.int64)], ["cond"], name="big_batch"),
        ]
    elif kind in ("static-flag-input", "static-flag-batched"):
        ins.append(vi("flag", [], BOOL))
        cond = "flag"
    elif kind == "float-condition":
        pre = [node("ReduceSum", ["x"], ["cond"], keepdims=0)]
    else:
        pre = [node("Constant", [], ["cond"], value=numpy_helper.from_array(np.array(True), "cv"), name="always")]
    if kind == "weights-in-branches":
        wt = numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "Wt")
        we = numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "We")
        then_ops = [
            node("Constant", [], ["Wt"], value=wt, name="wt"),
            node("MatMul", ["h", "Wt"], ["b"], name="then_mm"),
        ]
        else_ops = [
            node("Constant", [], ["We"], value=we, name="we"),
            node("MatMul", ["h", "We"], ["b"], name="else_mm"),
        ]
    elif kind == "same-name-both-branches":  # one name in two scopes: ambiguous, left unpruned
        wt = numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "Wx")
        we = numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "Wx")
        then_ops = [
            node("Constant", [], ["Wx"], value=wt, name="wt"),
            node("MatMul", ["h", "Wx"], ["b"], name="then_mm"),
        ]
        else_ops = [
            node("Constant", [], ["Wx"], value=we, name="we"),
            node("MatMul", ["h", "Wx"], ["b"], name="else_mm"),
        ]
    elif kind == "shadowed-weight-name":  # the branch defines 'W1' again, as an outer initializer is named
        ws = numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "W1")
        then_ops = [
            node("Constant", [], ["W1"], value=ws, name="shadow"),
            node("MatMul", ["h", "W1"], ["b"], name="then_mm"),
        ]
    elif kind == "branch-initializer-weight":
        g = helper.make_graph(
            [node("MatMul", ["h", "Wb"], ["b"], name="then_mm")],
            "then",
            [],
            [vi("b", None)],
            [numpy_helper.from_array((rng.standard_normal((8, 8)) / 3).astype(np.float32), "Wb")],
        )
    elif kind == "branch-shapes-differ":
        else_ops = [node("Concat", ["h", "h"], ["b"], axis=1, name="else_wide")]
    elif kind == "nested":
        inner = helper.make_node(
            "If",
            ["cond"],
            ["b"],
            name="inner_if",
            then_branch=branch("inner_then", [node("Tanh", ["h"], ["b"], name="inner_tanh")]),
            else_branch=branch("inner_else", [node("Sigmoid", ["h"], ["b"], name="inner_sig")]),
        )
        then_ops = [inner]
    elif kind == "branch-outputs-count":
        then_ops = [node("Relu", ["h"], ["b"]), node("Relu", ["h"], ["b2"])]
    then_g = g if kind == "branch-initializer-weight" else branch("then", then_ops)
    if kind == "branch-outputs-count":
        then_g = helper.make_graph(then_ops, "then", [], [vi("b", None), vi("b2", None)])
    if_node = helper.make_node(
        "If", [cond], ["b"], name="the_if", then_branch=then_g, else_branch=branch("else", else_ops)
    )
    nodes = [node("MatMul", ["x", w("W1", 6, 8)], ["h"], name="fc1"), *pre, if_node]
    nodes.append(node("Gemm", ["b", w("W2", CLASSES, 8)], ["logits"], transB=1, name="fc2"))
    return make(nodes, ins, [logits_out()], w.items)


def _if_data(kind: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        rng = np.random.default_rng(3)
        if kind == "varies-across-files":
            path.mkdir()
            for name, sign in (("a.npz", 1), ("b.npz", -1)):  # 64 each: more than one block of the engine
                x = (sign * np.abs(rng.standard_normal((64, 6)))).astype(np.float32)
                np.savez(path / name, x=x, labels=rng.integers(0, CLASSES, 64).astype(np.int64))
            return
        x = rng.standard_normal((N, 6)).astype(np.float32)
        arrays: dict[str, Any] = {"labels": rng.integers(0, CLASSES, N).astype(np.int64)}
        if kind == "varies-across-batches":
            x = np.abs(x)
            x[N // 2 :] *= -1  # the first blocks sum positive, the last negative
        arrays["x"] = x
        if kind == "static-flag-input":
            arrays["flag"] = np.array(True)
        elif kind == "static-flag-batched":
            arrays["flag"] = np.arange(N) % 2 == 0  # given per sample: the model has no batch axis there
        np.savez(path, **arrays)

    return write


IF_KINDS = (
    "varies-across-batches",
    "per-sample-condition",
    "batch-size-condition",
    "static-flag-input",
    "static-flag-batched",
    "float-condition",
    "weights-in-branches",
    "shadowed-weight-name",
    "branch-initializer-weight",
    "branch-shapes-differ",
    "nested",
    "branch-outputs-count",
)


def _loop_model(trip: int = 3, on_path: bool = True) -> onnx.ModelProto:
    """A Loop whose body multiplies the state by a weight held in the body (on the path), or counts
    to ``trip`` on constants only (off the path, added to the logits)."""
    w = Weights(9)
    if on_path:
        body = helper.make_graph(
            [
                node("Identity", ["cond_in"], ["cond_out"]),
                node("Constant", [], ["Wl"], value=numpy_helper.from_array(np.eye(8, dtype=np.float32), "Wl")),
                node("MatMul", ["s_in", "Wl"], ["s_out"]),
            ],
            "body",
            [vi("i", [], I64), vi("cond_in", [], BOOL), vi("s_in", None)],
            [vi("cond_out", [], BOOL), vi("s_out", None)],
        )
        nodes = [
            node("MatMul", ["x", w("W1", 6, 8)], ["h"], name="fc1"),
            helper.make_node("Loop", [w.const("trip", trip, np.int64), "", "h"], ["b"], body=body, name="loop"),
            node("Gemm", ["b", w("W2", CLASSES, 8)], ["logits"], transB=1, name="fc2"),
        ]
    else:
        body = helper.make_graph(
            [node("Identity", ["cond_in"], ["cond_out"]), node("Add", ["s_in", "one_f"], ["s_out"])],
            "body",
            [vi("i", [], I64), vi("cond_in", [], BOOL), vi("s_in", [])],
            [vi("cond_out", [], BOOL), vi("s_out", [])],
        )
        nodes = [
            node("MatMul", ["x", w("W1", 6, 8)], ["h"], name="fc1"),
            node("Gemm", ["h", w("W2", CLASSES, 8)], ["l0"], transB=1, name="fc2"),
            helper.make_node(
                "Loop",
                [w.const("trip", trip, np.int64), w.const("go", True, np.bool_), w.const("s0", 0.0)],
                ["count"],
                body=body,
                name="loop",
            ),
            node("Mul", ["count", w.const("tiny", 0.0)], ["zero"]),
            node("Add", ["l0", "zero"], ["logits"]),
        ]
        w.const("one_f", 1.0)
    return make(nodes, [vi("x", ["N", 6])], [logits_out()], w.items)


def _scan_model() -> onnx.ModelProto:
    w = Weights(10)
    body = helper.make_graph(
        [node("Add", ["s_in", "e"], ["s_out"]), node("Identity", ["s_out"], ["y"])],
        "body",
        [vi("s_in", [8]), vi("e", [8])],
        [vi("s_out", [8]), vi("y", [8])],
    )
    nodes = [
        node("MatMul", ["x", w("W1", 6, 8)], ["h"], name="fc1"),
        helper.make_node(
            "Scan", [w.const("s0", np.zeros(8)), "h"], ["sN", "b"], body=body, num_scan_inputs=1, name="scan"
        ),
        node("Gemm", ["b", w("W2", CLASSES, 8)], ["logits"], transB=1, name="fc2"),
    ]
    return make(nodes, [vi("x", ["N", 6])], [logits_out()], w.items)


def subgraph_cases() -> list[Case]:
    c: list[Case] = []
    for kind in IF_KINDS:
        cmds = ("gradients", "evaluate") if kind in ("varies-across-batches", "static-flag-batched") else ("gradients",)
        c += _model_cases(
            "subgraphs", f"if-{kind}", lambda kind=kind: _if_model(kind), _if_data(kind), cmds, may_succeed=True
        )
    c += _model_cases(
        "subgraphs",
        "if-varies-across-batches",
        lambda: _if_model("varies-across-batches"),
        _if_data("varies-across-batches"),
        ("compress", "check"),
        may_succeed=True,
    )
    # a data folder of two batches: the first takes one branch, the second the other
    c += _model_cases(
        "subgraphs",
        "if-varies-across-files",
        lambda: _if_model("varies-across-batches"),
        _if_data("varies-across-files"),
        ("gradients", "compress", "check"),
        needles=("the_if",),
        codes=(1,),
        may_succeed=True,
    )
    c += _model_cases(
        "subgraphs",
        "if-same-weight-name-in-both-branches",
        lambda: _if_model("same-name-both-branches"),
        _if_data("same-name-both-branches"),
        ("gradients", "compress"),
        may_succeed=True,
    )
    c += _model_cases("subgraphs", "loop-weight-in-body", _loop_model, data, ("gradients", "check"), needles=("Loop",))
    # a Loop of 2^62 iterations on constants: shape folding would run it forever (a time budget stops it)
    c += _model_cases(
        "subgraphs",
        "loop-huge-trip-off-path",
        lambda: _loop_model(2**62, on_path=False),
        data,
        ("gradients", "check"),
        needles=("did not finish",),
    )
    # a Loop of 200,000 iterations on constants: finishes, and shape folding must not multiply its cost
    c += _model_cases(
        "subgraphs",
        "loop-long-trip-off-path",
        lambda: _loop_model(200_000, on_path=False),
        data,
        ("gradients", "evaluate"),
        may_succeed=True,
    )
    c += _model_cases("subgraphs", "scan-on-path", _scan_model, data, ("gradients",), needles=("Scan",))
    return c


# --------------------------------------------------------------------------- quantized models


def _qlinearconv() -> onnx.ModelProto:
    w = Weights(11)
    nodes = [
        node("QuantizeLinear", ["x", w.const("xs", 0.05), w.const("xz", 0, np.uint8)], ["xq"]),
        node(
            "QLinearConv",
            [
                "xq",
                "xs",
                "xz",
                w.const("wq", np.ones((4, 2, 3, 3)), np.int8),
                w.const("ws", 0.01),
                w.const("wz", 0, np.int8),
                w.const("ys", 0.1),
                w.const("yz", 0, np.uint8),
            ],
            ["yq"],
            pads=[1, 1, 1, 1],
        ),
        node("DequantizeLinear", ["yq", "ys", "yz"], ["c"]),
        node("GlobalAveragePool", ["c"], ["p"]),
        node("Flatten", ["p"], ["f"]),
        node("MatMul", ["f", w("fc.w", 4, CLASSES)], ["logits"]),
    ]
    return make(nodes, [vi("x", ["N", *IMG])], [logits_out()], w.items)


def _quant(kind: str) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        if kind == "qlinearconv":
            return _qlinearconv()
        w = Weights(12)
        if kind == "activation-qdq-only":  # float weights; only the activations are fake-quantized

            def mid(w: Weights) -> list[onnx.NodeProto]:
                return [
                    node("QuantizeLinear", ["h", w.const("s", 0.05), w.const("zp", 0, np.int8)], ["hq"]),
                    node("DequantizeLinear", ["hq", "s", "zp"], ["z"]),
                ]

            return vec_model(mid)
        if kind == "dynamic-quantize":

            def mid2(w: Weights) -> list[onnx.NodeProto]:
                return [
                    node("DynamicQuantizeLinear", ["h"], ["hq", "hs", "hz"]),
                    node("DequantizeLinear", ["hq", "hs", "hz"], ["z"]),
                ]

            return vec_model(mid2)
        if kind == "conv-integer":
            nodes = [
                node("QuantizeLinear", ["x", w.const("xs", 0.05), w.const("xz", 0, np.uint8)], ["xq"]),
                node("ConvInteger", ["xq", w.const("wq", np.ones((4, 2, 3, 3)), np.uint8)], ["ci"], pads=[1, 1, 1, 1]),
                node("Cast", ["ci"], ["c"], to=F),
                node("GlobalAveragePool", ["c"], ["p"]),
                node("Flatten", ["p"], ["f"]),
                node("MatMul", ["f", w("fc.w", 4, CLASSES)], ["logits"]),
            ]
            return make(nodes, [vi("x", ["N", *IMG])], [logits_out()], w.items)
        if kind == "ms-qlinear-add":

            def mid3(w: Weights) -> list[onnx.NodeProto]:
                return [
                    node("QuantizeLinear", ["h", w.const("s", 0.05), w.const("zp", 0, np.uint8)], ["hq"]),
                    node("QLinearAdd", ["hq", "s", "zp", "hq", "s", "zp", "s", "zp"], ["aq"], domain="com.microsoft"),
                    node("DequantizeLinear", ["aq", "s", "zp"], ["z"]),
                ]

            return vec_model(mid3, extra_opsets=[("com.microsoft", 1)])
        if kind == "ms-matmulnbits":

            def mid4(w: Weights) -> list[onnx.NodeProto]:
                return [
                    node(
                        "MatMulNBits",
                        ["h", w.const("qb", np.ones((8, 1, 16)), np.uint8), w.const("qs", np.ones(8))],
                        ["z"],
                        domain="com.microsoft",
                        K=8,
                        N=8,
                        bits=4,
                        block_size=16,
                    )
                ]

            return vec_model(mid4, extra_opsets=[("com.microsoft", 1)])
        raise ValueError(kind)

    return build


def quantized_cases() -> list[Case]:
    c: list[Case] = []
    for kind, data_fn in (
        ("qlinearconv", img_data),
        ("conv-integer", img_data),
        ("activation-qdq-only", data),
        ("dynamic-quantize", data),
        ("ms-qlinear-add", data),
        ("ms-matmulnbits", data),
    ):
        c += _model_cases(
            "quantized-models", kind, _quant(kind), data_fn, ("gradients", "check"), needles=("quantized",)
        )
    return c


# ------------------------------------------------------------------------------ batch axes


def stateful(*, sr_rank: int = 0, state_layout: Sequence[int | str] = (2, "batch", 4)) -> onnx.ModelProto:
    """A silero-like cell: ``x [batch, 8]``, ``state [2, batch, 4]``, a rank-0 int64 ``sr``; outputs a
    probability ``[batch, 1]`` and the next state."""
    w = Weights(13)
    nodes = [
        node("Cast", ["sr"], ["srf"], to=F),
        node("ReduceMax", ["srf"], ["srm"], keepdims=0) if sr_rank else node("Identity", ["srf"], ["srm"]),
        node("Div", ["srm", w.const("c16k", 16000.0)], ["rate"]),
        node("Gather", ["state", w.const("i0", 0, np.int64)], ["s0"], axis=0),
        node("Gather", ["state", w.const("i1", 1, np.int64)], ["s1"], axis=0),
        node("MatMul", ["x", w("W1", 8, 4)], ["h"]),
        node("Add", ["h", "s0"], ["a"]),
        node("Mul", ["a", "rate"], ["a2"]),
        node("Tanh", ["a2"], ["t"]),
        node("MatMul", ["t", w("W2", 4, 4)], ["g0"]),
        node("Add", ["g0", "s1"], ["g"]),
        node("Tanh", ["g"], ["u"]),
        node("MatMul", ["u", w("W3", 4, 1)], ["zz"]),
        node("Sigmoid", ["zz"], ["output"]),
        node("Unsqueeze", ["t", w.const("ax0", [0], np.int64)], ["t0"]),
        node("Unsqueeze", ["u", "ax0"], ["u0"]),
        node("Concat", ["t0", "u0"], ["stateN"], axis=0),
    ]
    sr_shape: list[int | str] = [] if sr_rank == 0 else [1] * sr_rank
    return make(
        nodes,
        [vi("x", ["batch", 8]), vi("state", list(state_layout)), vi("sr", sr_shape, I64)],
        [vi("output", ["batch", 1]), vi("stateN", [2, "batch", 4])],
        w.items,
    )


def _stateful_data(kind: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        rng = np.random.default_rng(14)
        n = N
        arrays: dict[str, Any] = {
            "x": rng.standard_normal((n, 8)).astype(np.float32),
            "state": (0.5 * rng.standard_normal((n, 2, 4))).astype(np.float32),
            "sr": np.asarray(16000, np.int64),
        }
        if kind == "state-model-layout":
            arrays["state"] = np.zeros((2, n, 4), np.float32)
        elif kind == "state-square-ambiguous":
            arrays["state"] = np.zeros((2, 2, 4), np.float32)
        elif kind == "state-missing-axis":
            arrays["state"] = np.zeros((n, 4), np.float32)
        elif kind == "state-fewer-samples":
            arrays["state"] = arrays["state"][: n - 5]
        elif kind == "state-inf":
            arrays["state"][3, 1, 2] = np.inf
        elif kind == "sr-batched":
            arrays["sr"] = np.full(n, 16000, np.int64)
        elif kind == "sr-shape-1":
            arrays["sr"] = np.asarray([16000], np.int64)
        elif kind == "sr-float":
            arrays["sr"] = np.asarray(16000.0, np.float32)
        elif kind == "sr-missing":
            del arrays["sr"]
        elif kind == "sr-zero":
            arrays["sr"] = np.asarray(0, np.int64)
        elif kind == "sr-huge":
            arrays["sr"] = np.asarray(2**62, np.int64)
        elif kind == "x-rank-0":
            arrays["x"] = np.float32(1.0)
        elif kind == "extra-array":
            arrays["bogus"] = np.zeros(3)
        elif kind == "labels-for-sigmoid":
            arrays["labels"] = rng.integers(0, 2, n).astype(np.int64)
        elif kind == "labels-past-binary":
            arrays["labels"] = np.full(n, 5, np.int64)
        np.savez(path, **arrays)

    return write


STATEFUL_KINDS = (
    "state-model-layout",
    "state-square-ambiguous",
    "state-missing-axis",
    "state-fewer-samples",
    "state-inf",
    "sr-batched",
    "sr-shape-1",
    "sr-float",
    "sr-missing",
    "sr-zero",
    "sr-huge",
    "x-rank-0",
    "extra-array",
    "labels-for-sigmoid",
    "labels-past-binary",
)


def _folder_of(kind: str) -> Callable[[Path], None]:
    """A data folder of two files that disagree: ``sr`` differs, or one file has no ``state``."""

    def write(path: Path) -> None:
        path.mkdir()
        _stateful_data("ok")(path / "a.npz")
        rng = np.random.default_rng(15)
        b = {"x": rng.standard_normal((8, 8)).astype(np.float32), "state": np.zeros((8, 2, 4), np.float32)}
        b["sr"] = np.asarray(8000, np.int64) if kind == "sr-differs" else np.asarray(16000, np.int64)
        if kind == "state-layout-differs":
            b["state"] = np.zeros((2, 8, 4), np.float32)
        np.savez(path / "b.npz", **b)

    return write


def batch_axis_cases() -> list[Case]:
    c: list[Case] = []
    for kind in STATEFUL_KINDS:
        cmds = ("gradients", "evaluate") if kind not in ("labels-for-sigmoid",) else ("gradients", "compress")
        # labels of a model without a class-distribution output are not used (a warning says so)
        ok = kind in (
            "sr-zero", "sr-huge", "labels-for-sigmoid", "labels-past-binary", "extra-array", "state-inf", "sr-shape-1"
        )  # fmt: skip
        c += _model_cases("batch-axes", f"stateful-{kind}", stateful, _stateful_data(kind), cmds, may_succeed=ok)
    for kind in ("sr-differs", "state-layout-differs"):
        c += _model_cases(
            "batch-axes", f"folder-{kind}", stateful, _folder_of(kind), ("gradients",), may_succeed=kind == "sr-differs"
        )
    # the model declares a rank-1 sr [1] (no batch: every dim fixed next to dynamic inputs)
    c += _model_cases(
        "batch-axes",
        "sr-rank-1-given-scalar",
        lambda: stateful(sr_rank=1),
        _stateful_data("ok"),
        ("gradients",),
        may_succeed=True,
    )
    # the state declares its batch on axis 0 but under another name than x's
    c += _model_cases(
        "batch-axes",
        "state-other-batch-name",
        lambda: stateful(state_layout=("B", 2, 4)),
        _stateful_data("ok"),
        ("gradients",),
        may_succeed=True,
    )

    # fixed-batch exports: every dim fixed, or the batch only on axis 1
    def fixed(shape: Sequence[int | str]) -> Callable[[], onnx.ModelProto]:
        def build() -> onnx.ModelProto:
            m = mlp()
            tt = m.graph.input[0].type.tensor_type
            del tt.shape.dim[:]
            for d in shape:
                dim = tt.shape.dim.add()
                if isinstance(d, int):
                    dim.dim_value = d
                else:
                    dim.dim_param = d
            return m

        return build

    c += _model_cases("batch-axes", "fixed-batch-5", fixed([5, 6]), data, ("gradients", "evaluate"), may_succeed=True)
    c += _model_cases("batch-axes", "fixed-batch-32-of-32", fixed([N, 6]), data, ("gradients",), may_succeed=True)
    c += _model_cases(
        "batch-axes", "unknown-feature-dim", fixed(["N", "F"]), data, ("gradients", "evaluate"), may_succeed=True
    )
    c += _model_cases("batch-axes", "dim-value-zero", fixed([0, 6]), data, ("gradients", "evaluate"), may_succeed=True)
    return c


# ------------------------------------------------------------------------------ heads / outputs


def multi_head(kind: str) -> onnx.ModelProto:
    """x[N,6] → h → two outputs: ``scores`` (Sigmoid, [N,4]) and ``boxes`` ([N,4]); ``kind`` makes one
    of them hostile (NaN for some samples, Inf, all zero, constant, the input, declared wrong)."""
    w = Weights(16)
    nodes = [
        node("MatMul", ["x", w("W1", 6, 8)], ["h"], name="fc1"),
        node("Tanh", ["h"], ["t"]),
        node("MatMul", ["t", w("Ws", 8, 4)], ["s0"], name="score_fc"),
        node("Sigmoid", ["s0"], ["scores"]),
        node("MatMul", ["t", w("Wb", 8, 4)], ["b0"], name="box_fc"),
    ]
    outs = [vi("scores", ["N", 4]), vi("boxes", ["N", 4])]
    ins = [vi("x", ["N", 6])]
    if kind == "nan-for-some-samples":
        nodes.append(node("Sqrt", ["b0"], ["boxes"]))  # negative pre-activations: NaN
    elif kind == "inf":
        nodes += [node("Mul", ["b0", w.const("big", 1e38)], ["b1"]), node("Mul", ["b1", "big"], ["boxes"])]
    elif kind == "all-zero":
        nodes.append(node("Mul", ["b0", w.const("zero", 0.0)], ["boxes"]))
    elif kind == "constant-output":
        nodes.append(node("Identity", ["b0"], ["b_unused"]))
        w.const("boxes", np.ones((1, 4)))
        outs[1] = vi("boxes", [1, 4])
    elif kind == "input-passthrough":
        outs[1] = vi("x", ["N", 6])
    elif kind == "declared-shape-wrong":
        nodes.append(node("Identity", ["b0"], ["boxes"]))
        outs[1] = vi("boxes", ["N", 5])
    elif kind == "declared-rank-wrong":
        nodes.append(node("Identity", ["b0"], ["boxes"]))
        outs[1] = vi("boxes", ["N", 4, 1])
    elif kind == "declared-batch-wrong":
        nodes.append(node("Identity", ["b0"], ["boxes"]))
        outs[1] = vi("boxes", [3, 4])
    elif kind == "undeclared-shape":
        nodes.append(node("Identity", ["b0"], ["boxes"]))
        outs[1] = vi("boxes", None)
    elif kind == "duplicate-output":
        nodes.append(node("Identity", ["b0"], ["boxes"]))
        outs.append(vi("boxes", ["N", 4]))
    elif kind == "int-output":
        nodes += [node("ArgMax", ["b0"], ["boxes"], axis=1, keepdims=1)]
        outs[1] = vi("boxes", ["N", 1], I64)
    elif kind == "bool-output":
        nodes += [node("Greater", ["b0", w.const("z0", 0.0)], ["boxes"])]
        outs[1] = vi("boxes", ["N", 4], BOOL)
    elif kind == "no-weight-output":
        nodes += [node("Identity", ["b0"], ["b_unused"]), node("Relu", ["x"], ["boxes"])]
        outs[1] = vi("boxes", ["N", 6])
    elif kind == "zero-size-output":
        nodes += [
            node(
                "Slice",
                ["b0", w.const("st", [0], np.int64), w.const("en", [0], np.int64), w.const("ax", [1], np.int64)],
                ["boxes"],
            )
        ]
        outs[1] = vi("boxes", ["N", 0])
    elif kind == "scalar-output":
        nodes += [node("ReduceSum", ["b0"], ["boxes"], keepdims=0)]
        outs[1] = vi("boxes", [])
    elif kind == "sequence-nan-labels":
        nodes.append(node("Identity", ["b0"], ["boxes"]))
    else:
        nodes.append(node("Identity", ["b0"], ["boxes"]))
    return make(nodes, ins, outs, w.items)


HEAD_KINDS = (
    "nan-for-some-samples",
    "inf",
    "all-zero",
    "constant-output",
    "input-passthrough",
    "declared-shape-wrong",
    "declared-rank-wrong",
    "declared-batch-wrong",
    "undeclared-shape",
    "duplicate-output",
    "int-output",
    "bool-output",
    "no-weight-output",
    "zero-size-output",
    "scalar-output",
)


def _unlabelled(path: Path) -> None:
    data(path, labels=False)


def sequence_head(kind: str) -> onnx.ModelProto:
    """x[N,6] → logits [N,3,4] → Softmax over axis 2 (a CTC-like [N, T, C] head)."""
    w = Weights(17)
    nodes = [
        node("MatMul", ["x", w("W1", 6, 12)], ["h"], name="fc1"),
        node("Reshape", ["h", w.const("shp", [-1, 3, 4], np.int64)], ["z3"]),
        node("Softmax", ["z3"], ["probs"], axis=2 if kind != "softmax-axis-0" else 0),
    ]
    shape: list[int | str] = ["N", 3, 4]
    if kind == "declared-wrong":
        shape = ["N", 4, 3]
    return make(nodes, [vi("x", ["N", 6])], [vi("probs", shape)], w.items)


def _seq_labels(kind: str) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        rng = np.random.default_rng(18)
        arrays: dict[str, Any] = {"x": rng.standard_normal((N, 6)).astype(np.float32)}
        if kind == "labels-per-sample":
            arrays["labels"] = rng.integers(0, 4, N).astype(np.int64)
        elif kind == "labels-per-step":
            arrays["labels"] = rng.integers(0, 4, (N, 3)).astype(np.int64)
        elif kind == "labels-past-classes":
            arrays["labels"] = np.full(N, 9, np.int64)
        np.savez(path, **arrays)

    return write


def head_cases() -> list[Case]:
    c: list[Case] = []
    for kind in HEAD_KINDS:
        c += _model_cases(
            "heads-outputs",
            f"multi-{kind}",
            lambda kind=kind: multi_head(kind),
            _unlabelled,
            ("gradients", "compress"),
            may_succeed=True,
        )
    for kind in ("nan-for-some-samples", "all-zero", "inf"):  # the per-output comparison of the report
        c += _model_cases(
            "heads-outputs",
            f"multi-{kind}",
            lambda kind=kind: multi_head(kind),
            _unlabelled,
            ("evaluate",),
            may_succeed=True,
        )
    for out in ("boxes", "x", "nope"):
        for kind in ("ok", "input-passthrough", "int-output"):

            def build(d: Path, kind: str = kind, out: str = out) -> list[str]:
                save(multi_head(kind), d / M)
                _unlabelled(d / D)
                return _gradients(["--output", out])

            c.append(
                Case(
                    f"heads-outputs/--output {out}/{kind}",
                    "heads-outputs",
                    build,
                    codes=(1, 2),
                    may_succeed=True,
                    outputs=GRAD_OUTPUTS,
                )
            )
    for loss in ("ce",):

        def build2(d: Path, loss: str = loss) -> list[str]:
            save(multi_head("ok"), d / M)
            _unlabelled(d / D)
            return _gradients(["--loss", loss, "--output", "boxes"])

        c.append(
            Case(
                f"heads-outputs/--loss {loss} on boxes",
                "heads-outputs",
                build2,
                codes=(1, 2),
                may_succeed=True,
                outputs=GRAD_OUTPUTS,
            )
        )
    for kind in ("labels-per-sample", "labels-per-step", "labels-past-classes", "none"):
        c += _model_cases(
            "heads-outputs",
            f"sequence-{kind}",
            lambda: sequence_head("ok"),
            _seq_labels(kind),
            ("gradients",),
            may_succeed=True,
        )
    for kind in ("softmax-axis-0", "declared-wrong"):
        c += _model_cases(
            "heads-outputs",
            f"sequence-{kind}",
            lambda kind=kind: sequence_head(kind),
            _seq_labels("none"),
            ("gradients", "compress"),
            may_succeed=True,
        )
    return c


# ------------------------------------------------------------------------------ working copy


def _ms_extra(opts: dict[str, Any]) -> list[tuple[str, int]]:
    out = []
    if opts.get("ms"):
        out.append(("com.microsoft", 1))
    if opts.get("custom"):
        out.append(("org.example", 1))
    return out


def working_copy_cases() -> list[Case]:
    c: list[Case] = []
    for name, (attrs, scales, sizes) in RESIZE.items():
        mid = _resize(attrs, scales, sizes, roi=[0, 0, 0, 0, 1, 1, 1, 1] if "tf-crop" in name else None)
        c += _model_cases(
            "working-copy", f"resize-{name}", lambda mid=mid: img_model(mid), img_data, ("gradients",), may_succeed=True
        )
    for name, (attrs, w_shape, bias, ch) in CONV_T.items():
        mid = _conv_t(attrs, w_shape, bias)
        c += _model_cases(
            "working-copy",
            f"convtranspose-{name}",
            lambda mid=mid, ch=ch: img_model(mid, ch),
            img_data,
            ("gradients",),
            may_succeed=True,
        )
    for name, (op, kw) in RECURRENT.items():
        t = kw.get("t", T_SEQ)
        kw2 = {**kw, "t": t}
        c += _model_cases(
            "working-copy",
            name,
            lambda op=op, kw2=kw2: rnn_model(op, **kw2),
            lambda p, t=t: seq_data(p, t=int(t)),
            ("gradients",),
            may_succeed=True,
        )
    for name, (mid, width, opts) in VEC_OPS.items():
        c += _model_cases(
            "working-copy",
            name,
            lambda mid=mid, width=width, opts=opts: vec_model(
                mid, width, opset=opts.get("opset", 17), extra_opsets=_ms_extra(opts)
            ),
            data,
            ("gradients",),
            may_succeed=True,
        )
    # a few through inspect --check --data and compress, the other entry points of the working copy
    for name in ("resize-scales-huge", "convtranspose-group-zero", "lstm-long-sequence", "pad-reflect-past-dim"):
        base = next(x for x in c if x.id == f"working-copy/{name}/gradients")

        def via(d: Path, base: Case = base, cmd: str = "check") -> list[str]:
            base.build(d)
            return _argv(cmd)

        c.append(Case(f"working-copy/{name}/check", "working-copy", via, may_succeed=True))
        c.append(
            Case(
                f"working-copy/{name}/compress",
                "working-copy",
                lambda d, base=base: via(d, base, "compress"),
                may_succeed=True,
                outputs=("out/o.onnx",),
            )
        )
    return c


# ------------------------------------------------------------------------------ random mutations


_ATTR_VALUES: list[Any] = [
    0,
    1,
    -1,
    2,
    3,
    2**31,
    -(2**62),
    0.0,
    -1.5,
    float("nan"),
    float("inf"),
    1e30,
    "",
    "bogus",
    [0, 0],
    [1, -1],
    [2**40, 1],
    [1, 1, 1, 1],
    [-3, -3, -3, -3],
]
_ATTR_NAMES = [
    "strides", "pads", "dilations", "group", "output_padding", "output_shape", "auto_pad", "kernel_shape", "mode",
    "coordinate_transformation_mode", "nearest_mode", "antialias", "axes", "hidden_size", "direction", "clip",
    "layout", "input_forget", "linear_before_reset", "activations", "blocksize", "num_groups", "epsilon", "alpha",
    "axis", "keepdims", "approximate", "exclusive", "reverse", "p", "cubic_coeff_a",
]  # fmt: skip


def _graph_mutant(k: int) -> tuple[Callable[[], onnx.ModelProto], Callable[[Path], None]]:
    """A model of this module with 1-3 attributes of its hostile node replaced or added at random."""
    rng = _rng("graph-mutant", k)
    family = int(rng.integers(0, 4))
    if family == 0:
        name = str(rng.choice(sorted(RESIZE)))
        attrs, scales, sizes = RESIZE[name]
        base = lambda: img_model(_resize(attrs, scales, sizes))  # noqa: E731
        write: Callable[[Path], None] = img_data
        target = "resize"
    elif family == 1:
        name = str(rng.choice(sorted(CONV_T)))
        attrs2, w_shape, bias, ch = CONV_T[name]
        base = lambda: img_model(_conv_t(attrs2, w_shape, bias), ch)  # noqa: E731
        write = img_data
        target = "deconv"
    elif family == 2:
        op = str(rng.choice(["LSTM", "GRU", "RNN"]))
        base = lambda: rnn_model(op, t=T_SEQ)  # noqa: E731
        write = seq_data
        target = "rnn"
    else:
        name = str(rng.choice(sorted(VEC_OPS)))
        mid, width, opts = VEC_OPS[name]
        base = lambda: vec_model(mid, width, opset=opts.get("opset", 17), extra_opsets=_ms_extra(opts))  # noqa: E731
        write = data
        target = ""
    edits = [
        (str(rng.choice(_ATTR_NAMES)), _ATTR_VALUES[int(rng.integers(0, len(_ATTR_VALUES)))])
        for _ in range(1 + int(rng.integers(0, 3)))
    ]
    swap_input = bool(rng.integers(0, 4) == 0)

    def build_model() -> onnx.ModelProto:
        m = base()
        nodes = [n for n in m.graph.node if n.name == target] or [
            n for n in m.graph.node if n.name.startswith("hostile")
        ]
        if not nodes:
            nodes = list(m.graph.node[1:2])
        n = nodes[0]
        for attr, value in edits:
            keep = [a for a in n.attribute if a.name != attr]
            del n.attribute[:]
            n.attribute.extend(keep)
            n.attribute.append(helper.make_attribute(attr, value))
        if swap_input and len(n.input) > 1:
            n.input[1] = n.input[0]
        return m

    return build_model, write


def mutation_cases() -> list[Case]:
    c: list[Case] = []
    for k in range(12 * SCALE):
        build_model, write = _graph_mutant(k)
        c += _model_cases("graph-mutation", str(k), build_model, write, ("gradients",), may_succeed=True)
    return c


def feature_cases() -> list[Case]:
    """Every case of this module."""
    return [
        *pattern_cases(),
        *check_cases(),
        *working_copy_cases(),
        *subgraph_cases(),
        *quantized_cases(),
        *batch_axis_cases(),
        *head_cases(),
        *mutation_cases(),
    ]


_ = (E, zip_bomb, os)
