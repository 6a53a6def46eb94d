"""The report of a compression run: a frozen record, a readable table, and JSON."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from .evaluate import Comparison

if TYPE_CHECKING:
    from .graph import PrunableTensor


@dataclass(frozen=True)
class TensorReport:
    """One prunable tensor after pruning."""

    name: str
    op_type: str
    shape: tuple[int, ...]
    size: int
    nnz: int
    storage: str
    #: the layer of its first consumer (:func:`chita_onnx.graph.layer_name`), ``""`` when unknown
    layer: str = ""

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.size if self.size else 0.0


@dataclass(frozen=True)
class StageReport:
    """One stage of CHITA++ (a one-shot method has a single stage)."""

    stage: int
    sparsity: float
    k: int
    objective: float | None
    iterations: int
    converged: bool
    accuracy: float | None
    agreement: float | None
    seconds: float


@dataclass(frozen=True)
class FileSizes:
    """Bytes on disk, raw and zstd-compressed, of the dense input and the pruned output."""

    dense_raw: int
    dense_zstd: int
    pruned_raw: int
    pruned_zstd: int


@dataclass(frozen=True)
class Report:
    """Everything a run did and measured.  ``timings`` holds seconds per phase."""

    input: str
    output: str
    method: str
    config: dict[str, Any]
    p: int
    k: int
    nnz: int
    tensors: tuple[TensorReport, ...]
    stages: tuple[StageReport, ...]
    evaluation: Comparison | None
    eval_source: str
    sizes: FileSizes | None
    timings: dict[str, float]
    versions: dict[str, str]
    solver: dict[str, object] = field(default_factory=dict)
    warnings: tuple[str, ...] = field(default_factory=tuple)
    pattern: dict[str, Any] | None = None
    #: the loss whose per-sample gradients were used, and why it was chosen ("" without gradients)
    loss: str = ""
    structured: Any = None  # a chita_onnx.structured.report.ChannelReport for --structure channel
    #: how the weights were stored, when another --storage would have made a smaller raw file
    storage_note: str = ""
    #: peak resident memory of the process by the end of the run, bytes (None where unknown); for the
    #: CLI that is the run's own peak, inside a longer-lived process it may be an earlier one's
    peak_memory: int | None = None

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / self.p if self.p else 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["sparsity"] = self.sparsity
        for t, td in zip(self.tensors, d["tensors"], strict=True):
            td["sparsity"] = t.sparsity
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _size(b: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024  # type: ignore[assignment]
    return str(b)


def table(rows: list[list[str]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), line]
    out += [fmt.format(*[str(c) for c in r]) for r in rows]
    return "\n".join(out)


#: Weight names that exporters generate and that say nothing about the layer: dynamo's ``val_12``,
#: TorchScript's ``onnx::MatMul_345``, tf2onnx's ``const_fold_opt__17``, bare numbers.
GENERATED_NAME = re.compile(r"^(val_\d+|onnx::.*|const_fold_opt__\d+|_?v_\d+|\d+)$")


def shows_layers(tensors: Iterable[TensorReport | PrunableTensor]) -> bool:
    """Whether a table of ``tensors`` needs a ``layer`` column: some weight's name is generated
    (:data:`GENERATED_NAME`) and its layer is known, so that the rows can be told apart."""
    return any(t.layer and GENERATED_NAME.match(t.name) for t in tensors)


def _tensor_table(tensors: tuple[TensorReport, ...]) -> str:
    """The per-tensor table (with a ``layer`` column where :func:`shows_layers`)."""
    with_layer = shows_layers(tensors)
    rows = [
        [
            t.name,
            *([t.layer or "-"] if with_layer else []),
            t.op_type,
            "x".join(map(str, t.shape)),
            f"{t.size:,}",
            f"{t.nnz:,}",
            _pct(t.sparsity),
            t.storage,
        ]
        for t in tensors
    ]
    header = ["tensor", *(["layer"] if with_layer else []), "op", "shape", "weights", "nonzero", "sparsity", "stored"]
    return table(rows, header)


def head_line(solver: Mapping[str, object]) -> str:
    """The report's line on ``--head-select auto``'s choice for the softmax head."""
    if "head_kl_layer" not in solver:
        return f"softmax head: {solver['head_select']} selection (no held-out samples to compare on)"
    return (
        f"softmax head: {solver['head_select']} selection (KL to dense on {solver['head_held_rows']} held-out "
        f"rows: layer {float(solver['head_kl_layer']):.4g}, classes {float(solver['head_kl_classes']):.4g})"  # type: ignore[arg-type]
    )


def format_report(r: Report) -> str:
    """The human-readable summary printed by ``chita-onnx compress``."""
    parts = [
        f"{r.input} -> {r.output}",
        f"method {r.method}: kept {r.nnz:,} of {r.p:,} prunable weights (k = {r.k:,}), "
        f"sparsity {100 * r.sparsity:.2f}%",
        *([f"loss: {r.loss}"] if r.loss else []),
        "",
        _tensor_table(r.tensors),
    ]
    if r.pattern is not None:
        parts += ["", *format_pattern(r.pattern, r.output)]
    if "head_select" in r.solver:
        parts.insert(2, head_line(r.solver))
    if "statistics" in r.solver:
        parts.insert(2, f"statistics correction: {r.solver['statistics']}")
    if "method_choice" in r.solver:
        parts.insert(2, str(r.solver["method_choice"]))
    if r.structured is not None:  # channel pruning: groups, parameters, FLOPs and latency instead
        from .structured.report import channel_summary

        parts = channel_summary(r)
    if len(r.stages) > 1:
        parts += [
            "",
            table(
                [
                    [
                        str(s.stage),
                        _pct(s.sparsity),
                        "-" if s.objective is None else f"{s.objective:.4g}",
                        _pct(s.accuracy),
                        _pct(s.agreement),
                        f"{s.seconds:.2f}s",
                    ]
                    for s in r.stages
                ],
                ["stage", "sparsity", "objective", "accuracy", "agreement", "time"],
            ),
        ]
    if r.evaluation is not None:
        e = r.evaluation
        parts += [
            "",
            f"evaluation on {e.samples} samples ({r.eval_source}), output {e.output!r}:",
            table(
                [
                    ["top-1 accuracy", _pct(e.dense_accuracy), _pct(e.pruned_accuracy)],
                    ["top-1 agreement with dense", "", _pct(e.agreement)],
                    *(
                        [["per-position argmax agreement", "", _pct(e.position_agreement)]]
                        if e.position_agreement is not None
                        else []
                    ),
                    ["max |output difference|", "", f"{e.max_abs_diff:.4g}"],
                    ["mean |output difference|", "", f"{e.mean_abs_diff:.4g}"],
                    *(
                        [
                            ["relative output error", "", f"{e.relative_error:.4g}"],
                            ["cosine similarity with dense", "", f"{e.cosine:.5f}"],
                        ]
                        if e.relative_error is not None and e.cosine is not None
                        else []
                    ),
                ],
                ["", "dense", "pruned"],
            ),
        ]
        if e.outputs:
            parts += [
                "",
                table(
                    [
                        [
                            o.name,
                            "x".join(map(str, o.shape)),
                            f"{o.relative_error:.4g}",
                            f"{o.cosine:.5f}",
                            _pct(o.argmax_agreement),
                        ]
                        for o in e.outputs
                    ],
                    ["output", "shape", "rel. error", "cosine", "argmax agreement"],
                ),
            ]
    if r.sizes is not None:
        s = r.sizes
        parts += [
            "",
            table(
                [
                    ["raw", _size(s.dense_raw), _size(s.pruned_raw), f"{s.pruned_raw / s.dense_raw:.2f}x"],
                    ["zstd", _size(s.dense_zstd), _size(s.pruned_zstd), f"{s.pruned_zstd / s.dense_zstd:.2f}x"],
                ],
                ["file size", "dense", "pruned", "ratio"],
            ),
        ]
        if r.storage_note:
            parts.append(f"storage: {r.storage_note}")
    parts += ["", "time: " + ", ".join(f"{k} {v:.2f}s" for k, v in r.timings.items())]
    if r.peak_memory is not None:
        parts.append(f"peak memory: {_size(r.peak_memory)} (resident, this process)")
    parts += [f"warning: {w}" for w in r.warnings]
    return "\n".join(parts)


def format_pattern(info: dict[str, Any], output: str) -> list[str]:
    """The N:M section of the report: per-tensor check of the written file, then how to deploy it."""
    pat = info["pattern"]
    n, m = pat.split(":")
    rows = [
        [
            t["name"],
            t["op_type"],
            "-" if t["axis"] is None else str(t["axis"]),
            f"{t['groups']:,}" if t["status"] != "dense" else "-",
            f"{t['violating']:,}" if t["status"] != "dense" else "-",
            t["status"] if t["status"] != "dense" else f"dense: {t['reason']}",
        ]
        for t in info["tensors"]
    ]
    verdict = (
        f"all {info['checked_groups']:,} groups of {len(info['eligible'])} tensor(s) hold at most {n} nonzeros"
        if info["satisfied"]
        else f"{info['violating_groups']:,} of {info['checked_groups']:,} groups hold more than {n} nonzeros"
    )
    return [
        f"pattern {pat}: at most {n} nonzeros in every {m} consecutive weights along each tensor's reduction axis "
        "(the pattern sets the sparsity; --sparsity is not used)",
        table(rows, ["tensor", "op", "axis", "groups", "violating", "status"]),
        f"checked by reading {output} back: {verdict}; eligible sparsity {_pct(info['eligible_sparsity'])}",
        f"TensorRT: trtexec --onnx={output} --sparsity=enable --fp16 (or --int8); weights are stored dense, as its "
        "parser requires; sparse kernels are picked only where they time faster (mostly convs with >= 256 channels)",
    ]
