"""Will a model go through?  An up-front check, before any long work.

:func:`check_model_support` answers with a frozen :class:`SupportReport`:

* without data, structurally: the model is not quantized, its prunable weights are float32, its
  opset converts, and every op between a prunable weight and the output either has a gradient in
  onnxruntime-training 1.19.2 or an exact rewrite (counted per op), with Loop/Scan and ops that
  cannot be differentiated refused — one line each, naming the op, the node and what to do;
* with calibration data, for real: the gradient working copy is built (shapes folded, If nodes
  inlined, rewrites made and checked against onnxruntime) and onnxruntime-training's gradient graph
  is built from it, exactly as ``compress`` would.

:func:`assert_supported` raises the first structural refusal (``compress`` calls it before loading
data).  ``chita-onnx inspect MODEL --check [--data D]`` prints the report.
"""

from __future__ import annotations

import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import onnx

from .checks import GRADIENT_DTYPES
from .errors import ChitaError, ModelError, UnsupportedOpError

log = logging.getLogger(__name__)

#: Quantized or integer-arithmetic ops (default domain): gradients do not flow through them.
QUANTIZED_OPS = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "ConvInteger",
        "MatMulInteger",
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
    }
)
#: com.microsoft quantized ops not caught by their prefix (``QLinear*``, ``QOrdered*``, ``DynamicQuantize*``).
_MS_QUANTIZED = frozenset(
    {
        "MatMulIntegerToFloat",
        "QAttention",
        "QGemm",
        "QEmbedLayerNormalization",
        "MatMulNBits",
        "MatMulBnb4",
        "QuantizeLinear",
        "DequantizeLinear",
        "GatherBlockQuantized",
        "QuickGeluQuantized",
    }
)
_MS_PREFIXES = ("QLinear", "QOrdered", "DynamicQuantize")
_FLOAT32_ONLY_HINT = (
    "chita-onnx prunes float32 weights; prune the float32 model, then convert it (e.g. with "
    "onnxconverter-common's float16 converter)"
)


@dataclass(frozen=True)
class SupportReport:
    """The answer of :func:`check_model_support`.

    ``refusals`` are one-line reasons (the first is what ``compress`` would stop with); ``rewrites``
    and ``native`` count, per op type, the nodes on the differentiable path that are rewritten
    exactly or that onnxruntime-training differentiates as they are; ``conditional`` names If nodes
    whose branch is decided by the data; ``unreached`` are weights in If branches the calibration
    data does not take (they stay unpruned); ``static`` summarises shape folding (with data only).
    """

    model: str
    ok: bool
    refusals: tuple[str, ...]
    prunable_tensors: int
    prunable_weights: int
    output: str
    rewrites: tuple[tuple[str, int], ...] = ()
    native: tuple[tuple[str, int], ...] = ()
    conditional: tuple[str, ...] = ()
    subgraph_weights: int = 0
    unreached: tuple[str, ...] = ()
    checked_with_data: bool = False
    static: tuple[tuple[str, int], ...] = ()
    seconds: float = 0.0
    #: not ``ok`` for gradients only: ``compress``'s default (``--method auto``) still prunes the
    #: model, layer-wise with ``--allocation magnitude``; a method that needs gradients is refused
    without_gradients: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------- refusals


def quantized_node(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The first quantized/integer-arithmetic node of ``model`` (any scope), if any."""
    from .graph import walk_graphs

    for _, g in walk_graphs(model.graph):
        for n in g.node:
            default = n.domain in ("", "ai.onnx") and n.op_type in QUANTIZED_OPS
            ms = n.domain == "com.microsoft" and (n.op_type in _MS_QUANTIZED or n.op_type.startswith(_MS_PREFIXES))
            if default or ms:
                found: onnx.NodeProto = n
                return found
    return None


_EVAL_MODE_HINT = "export it in inference mode (PyTorch: call model.eval() before torch.onnx.export)"


def _scalars(graph: onnx.GraphProto) -> dict[str, float]:
    """The graph's stored one-element tensors (initializers and ``Constant`` outputs) by name, as floats."""
    from onnx import numpy_helper

    from .graph import _constant_values

    stored = [(t.name, t) for t in graph.initializer] + [(k, t) for k, (_, t) in _constant_values(graph).items()]
    out: dict[str, float] = {}
    for name, t in stored:
        if int(np.prod(t.dims, dtype=np.int64)) == 1:
            try:
                out[name] = float(numpy_helper.to_array(t).reshape(-1)[0])
            except (ValueError, TypeError):
                continue
    return out


def training_mode_message(model: onnx.ModelProto, name: str) -> str | None:
    """Why ``model`` computes its training-mode function, or None when it does not.

    Refused: a ``BatchNormalization`` in training mode (``training_mode=1`` from opset 14; before it,
    more than one output, which is how onnxruntime reads it), which normalises every sample with its
    batch's statistics, so a sample's output depends on the rest of its batch; and a ``Dropout`` whose
    ``training_mode`` input is a stored true (opset 12+; ratio not a stored zero), which zeroes values
    at random on every run.  Both are what an exporter writes for a model left in training mode.
    """
    from .graph import opset_version, walk_graphs

    opset = opset_version(model)
    found: list[str] = []
    for _, g in walk_graphs(model.graph):
        scalars = _scalars(g)
        for k, n in enumerate(g.node):
            if n.domain not in ("", "ai.onnx"):
                continue
            label = n.name or f"<{n.op_type} #{k}>"
            if n.op_type == "BatchNormalization":
                mode = next((a.i for a in n.attribute if a.name == "training_mode"), 0)
                extra = [o for o in n.output[1:] if o]
                if (opset >= 14 and mode == 1) or (opset < 14 and extra):
                    why = "has training_mode=1" if opset >= 14 else f"has training-mode outputs {extra}"
                    found.append(
                        f"BatchNormalization node {label!r} {why}: it normalises each sample with its batch's "
                        "statistics, so a sample's output depends on the rest of its batch"
                    )
            elif n.op_type == "Dropout" and opset >= 12 and len(n.input) > 2 and scalars.get(n.input[2], 0.0) != 0:
                if n.input[1] and scalars.get(n.input[1]) == 0.0:
                    continue  # a ratio of zero keeps every value
                found.append(
                    f"Dropout node {label!r} has training_mode {n.input[2]!r} = true: it zeroes values at random "
                    "on every run"
                )
    if not found:
        return None
    more = f" (and {len(found) - 1} more such node(s))" if len(found) > 1 else ""
    return f"{name}: the model was exported in training mode: {found[0]}{more}; {_EVAL_MODE_HINT}"


def no_weights_message(model: onnx.ModelProto, name: str) -> str:
    """The one-line refusal of a model without prunable weights; for a classical-ML export
    (skl2onnx's ``LinearClassifier``, ``TreeEnsembleClassifier``, ``SVMClassifier`` ...), what its
    weights are instead."""
    from .graph import walk_graphs

    ml = sorted({n.op_type for _, g in walk_graphs(model.graph) for n in g.node if n.domain == "ai.onnx.ml"})
    ml = [op for op in ml if op.startswith(("Linear", "TreeEnsemble", "SVM"))]
    hint = (
        f"; its {', '.join(ml)} node(s) hold their parameters as attributes of ai.onnx.ml operators, "
        "not as layer weights, which chita-onnx does not prune"
        if ml
        else ""
    )
    return f"{name}: no prunable weights (Conv, Gemm or MatMul fed by a constant weight tensor){hint}"


def _structural_refusals(model: onnx.ModelProto, name: str) -> list[str]:
    """Refusals that need neither data nor shapes: quantized models, models exported in training
    mode and non-float32 weights."""
    from .graph import find_prunable

    q = quantized_node(model)
    if q is not None:
        dom = f"{q.domain}." if q.domain not in ("", "ai.onnx") else ""
        return [
            f"{name}: the model is quantized (node {q.name or '<unnamed>'!r} is {dom}{q.op_type}); "
            "prune the float model before quantizing it"
        ]
    training = training_mode_message(model, name)
    if training is not None:
        return [training]
    tensors = find_prunable(model)
    if not tensors:
        return [no_weights_message(model, name)]
    other = [t for t in tensors if t.dtype not in GRADIENT_DTYPES]
    if other:
        t = other[0]
        return [f"{name}: weight {t.name!r} is {t.dtype} ({len(other)} such tensors); {_FLOAT32_ONLY_HINT}"]
    return []


def differentiated_tensors(model: onnx.ModelProto, output: str | None = None, loss: str = "auto") -> list[str]:
    """The tensors the gradient engine takes its loss of, as :class:`~chita_onnx.gradients.GradientEngine`
    chooses them: every floating-point output when there are several and none is structurally a
    classifier (one Gauss-Newton head over all of them), else the one differentiated tensor."""
    from .gradients.engine import joint_outputs
    from .gradients.prepare import differentiated_tensor

    several = joint_outputs(model, output, loss)
    if len(several) > 1:
        return [differentiated_tensor(model, o) for o in several]
    return [differentiated_tensor(model, output)]


def _op_verdicts(
    model: onnx.ModelProto, output: str | Sequence[str]
) -> tuple[Counter[str], Counter[str], list[str], list[str]]:
    """Per-op counts of exact rewrites and native gradients on the paths from the prunable weights to
    ``output`` (one tensor or several: a node on several paths counts once), the If nodes on them,
    and refusals (op, node, what to do)."""
    from .gradients.prepare import _NO_GRADIENT_HINT, GRADIENT_OPS, LEGALIZED_OPS, cut_to, differentiable_nodes
    from .gradients.prepare import normalize as normalize_model
    from .gradients.rewrites import attribute_refusal, op_key, rewritable_ops
    from .gradients.static import _infer
    from .graph import find_prunable

    targets = [output] if isinstance(output, str) else list(output)
    names = [t.name for t in find_prunable(model) if not t.scope]
    m = _infer(normalize_model(cut_to(model, targets[0] if len(targets) == 1 else targets)))
    rewritable = rewritable_ops() | LEGALIZED_OPS
    rewrites: Counter[str] = Counter()
    native: Counter[str] = Counter()
    conditional: list[str] = []
    refusals: list[str] = []
    inits = {t.name for t in m.graph.initializer}
    present = [w for w in names if w in inits]
    on_path = {k: n for t in targets for k, n in differentiable_nodes(m, present, t)}
    for k, n in sorted(on_path.items(), key=lambda kn: kn[0]):
        key = op_key(n)
        label = n.name or f"<{n.op_type} #{k}>"
        if key == "If":
            conditional.append(label)
        elif key in ("Loop", "Scan"):
            refusals.append(f"cannot differentiate op {key} (node {label!r}): {_NO_GRADIENT_HINT[key]}")
        elif (why := attribute_refusal(n)) is not None:
            refusals.append(f"cannot differentiate op {key} (node {label!r}): {why}")
        elif key in rewritable and _fires(n, m):
            rewrites[key] += 1
        elif key in GRADIENT_OPS:
            native[key] += 1
        else:
            hint = _NO_GRADIENT_HINT.get(
                n.op_type,
                "it has no gradient in onnxruntime-training 1.19.2 and no exact rewrite; pass --output to "
                "differentiate a tensor before it",
            )
            refusals.append(
                f"cannot differentiate op {key} (node {label!r}) on the path from the prunable weights: {hint}"
            )
    return rewrites, native, conditional, refusals


def _fires(n: onnx.NodeProto, m: onnx.ModelProto) -> bool:
    """Whether the exact rewrite of an op that also has a native gradient applies to ``n``: Pad in a
    non-constant mode, Slice with a negative step, Pow with an integer exponent, a scatter that adds."""
    from onnx import numpy_helper

    from .gradients.prepare import attr_str

    if n.op_type == "Pad":
        return attr_str(n, "mode", "constant") != "constant"
    if n.op_type in ("ScatterND", "ScatterElements"):
        return attr_str(n, "reduction", "none") == "add"
    inits = {t.name: t for t in m.graph.initializer}
    if n.op_type == "Slice":
        steps = inits.get(n.input[4]) if len(n.input) > 4 else None
        return steps is not None and bool((numpy_helper.to_array(steps) < 0).any())
    if n.op_type == "Pow":
        e = inits.get(n.input[1])
        return e is not None and e.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    return True


def _branch_weights(model: onnx.ModelProto) -> list[str]:
    """Main-graph If/Loop/Scan nodes whose subgraphs hold prunable weights."""
    from .graph import find_prunable

    owners = {t.scope.split("/")[0] for t in find_prunable(model) if t.scope}
    return [
        n.name or f"<{n.op_type} #{k}>"
        for k, n in enumerate(model.graph.node)
        if (n.name or f"{n.op_type}#{k}") in owners
    ]


def refuse_model(model: onnx.ModelProto, name: str = "model") -> None:
    """Raise :class:`UnsupportedOpError` (one line, with the advice) for a model no method can prune:
    a quantized one, or one exported in training mode (:func:`training_mode_message`)."""
    if quantized_node(model) is not None:
        raise UnsupportedOpError(_structural_refusals(model, name)[0])
    training = training_mode_message(model, name)
    if training is not None:
        raise UnsupportedOpError(training)


def assert_supported(
    model: onnx.ModelProto, name: str = "model", output: str | None = None, *, gradients: bool = True
) -> None:
    """Raise the first structural refusal (see the module docstring): a quantized model; and, when
    ``gradients`` are needed, non-float32 weights, an opset that cannot be converted, or Loop/Scan or
    an op without gradient or exact rewrite between a prunable weight and ``output``."""
    q = quantized_node(model)
    if q is not None or gradients:
        first = _structural_refusals(model, name)
        if first:
            raise (UnsupportedOpError if q is not None else ModelError)(first[0])
    if not gradients:
        return
    *_, refusals = _op_verdicts(model, differentiated_tensors(model, output))
    if refusals:
        raise UnsupportedOpError(refusals[0])


def check_model_support(
    model: str | os.PathLike[str] | onnx.ModelProto,
    data: Any = None,
    *,
    output: str | None = None,
    loss: str = "auto",
    batch_size: int = 64,
) -> SupportReport:
    """Check whether ``model`` goes through (see the module docstring).

    ``data`` (any calibration data specification ``compress`` accepts) turns on the real check: the
    gradient working copy and gradient graph are built on its first batch.  Errors in the model file
    or the data themselves are raised; everything that makes the model unsupported is reported, and
    ``without_gradients`` says whether the default ``compress`` still goes through (without them).
    """
    report = _check_model_support(model, data, output=output, loss=loss, batch_size=batch_size)
    if report.ok or not report.prunable_tensors:  # a quantized model lists none: refused by every method
        return report
    return replace(report, without_gradients=True)  # as compress's _gradient_refusal falls back


def _check_model_support(
    model: str | os.PathLike[str] | onnx.ModelProto, data: Any, *, output: str | None, loss: str, batch_size: int
) -> SupportReport:
    from .graph import find_prunable, load_model, model_inputs

    t0 = time.perf_counter()
    name = os.fspath(model) if not isinstance(model, onnx.ModelProto) else "model"
    m = model if isinstance(model, onnx.ModelProto) else load_model(model)
    if quantized_node(m) is None:
        from .weightchains import expose_weights

        m = expose_weights(m)[0]  # as compress and inspect see the model: weights behind a Transpose too
    refusals = _structural_refusals(m, name)
    tensors = [] if refusals and "quantized" in refusals[0] else find_prunable(m)
    base = SupportReport(
        model=name,
        ok=not refusals,
        refusals=tuple(refusals),
        prunable_tensors=len(tensors),
        prunable_weights=sum(t.size for t in tensors),
        output="",
        subgraph_weights=sum(1 for t in tensors if t.scope),
    )
    if refusals:
        return replace(base, seconds=time.perf_counter() - t0)
    targets = differentiated_tensors(m, output, loss)
    out = ", ".join(targets)  # several: the outputs of one Gauss-Newton head, as the engine builds it
    try:
        rewrites, native, conditional, refusals = _op_verdicts(m, targets)
    except ChitaError as exc:
        return replace(base, ok=False, refusals=(str(exc),), output=out, seconds=time.perf_counter() - t0)
    report = replace(
        base,
        ok=not refusals,
        refusals=tuple(refusals),
        output=out,
        rewrites=tuple(sorted(rewrites.items())),
        native=tuple(sorted(native.items())),
        conditional=tuple(dict.fromkeys([*conditional, *_branch_weights(m)])),
        seconds=time.perf_counter() - t0,
    )
    if data is None or refusals:
        return report
    from .data import open_source, validate_source
    from .gradients import GradientEngine

    specs = model_inputs(m)
    source = open_source(data, specs, batch_size=batch_size)
    validate_source(source, specs)  # as compress does: shapes, dtypes, NaN/Inf, labels are integers
    example = next(iter(source), None)
    if example is None:
        from .errors import DataError

        raise DataError(f"{data}: the calibration data is empty")
    try:
        engine = GradientEngine(m, None, example=example, loss=loss, output=output, method="single")  # type: ignore[arg-type]
    except ChitaError as exc:
        return replace(report, ok=False, refusals=(str(exc),), checked_with_data=True)
    fwd = engine.fwd
    st = fwd.static
    static = (
        ()
        if st is None
        else (
            ("folded tensors", st.folded),
            ("If nodes inlined", len(st.inlined)),
            ("shapes recorded from a run", st.recorded),
            ("onnxruntime runs", st.runs),
        )
    )
    return replace(
        report,
        rewrites=tuple(sorted(fwd.rewrites.items())),
        unreached=tuple(engine.unreached),
        checked_with_data=True,
        static=static,
        seconds=time.perf_counter() - t0,
    )


def format_support(r: SupportReport) -> str:
    """The report as text (what ``chita-onnx inspect --check`` prints)."""
    lines = [
        f"{r.model}: {'supported' if r.ok else 'NOT supported'}"
        + (
            " (checked with data)"
            if r.checked_with_data
            else " (structural check; pass --data for the full check)"
            if r.ok
            else " (refused by the structural check, before any data)"
        )
    ]
    lines.append(
        f"  prunable: {r.prunable_tensors} tensors, {r.prunable_weights:,} weights"
        + (f" ({r.subgraph_weights} tensors inside If branches)" if r.subgraph_weights else "")
    )
    if r.output:
        lines.append(f"  differentiated output: {r.output}")
    if r.rewrites:
        lines.append("  exact rewrites: " + ", ".join(f"{op} ×{k}" for op, k in r.rewrites))
    if r.native:
        lines.append("  native gradients: " + ", ".join(f"{op} ×{k}" for op, k in r.native))
    if r.conditional:
        lines.append(
            f"  If nodes on the path (inlined once the data fixes their condition): {', '.join(r.conditional)}"
        )
    if r.static:
        lines.append("  static shapes: " + ", ".join(f"{k} {v}" for k, v in r.static))
    if r.unreached:
        lines.append(
            f"  {len(r.unreached)} weight tensors sit in If branches the calibration data does not take; they stay "
            f"unpruned: {', '.join(r.unreached[:4])}{' ...' if len(r.unreached) > 4 else ''}"
        )
    for why in r.refusals:
        lines.append(f"  refused: {why}")
    if r.without_gradients:
        lines.append(
            "  compress's default (--method auto) still prunes it, layer-wise with --allocation magnitude instead of "
            "gradients; a method that needs gradients (chita, chita++, wf, cbs, ...) stops with the refusal above"
        )
    lines.append(f"  ({r.seconds:.2f}s)")
    return "\n".join(lines)


__all__ = [
    "QUANTIZED_OPS",
    "SupportReport",
    "assert_supported",
    "check_model_support",
    "format_support",
    "quantized_node",
    "refuse_model",
    "training_mode_message",
]
