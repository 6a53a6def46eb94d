"""The channel-pruning part of a run's report: groups, parameters, FLOPs and side-by-side latency."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..report import Report


@dataclass(frozen=True)
class LatencyRow:
    """Median seconds per run of the dense and the pruned model at one batch size, timed interleaved;
    ``speedup`` is the median over rounds of dense/pruned (the two timed back to back)."""

    batch: int
    dense: float
    pruned: float
    speedup: float


@dataclass(frozen=True)
class GroupRow:
    """One channel group: its producing layers, channels before/after, and why it stayed whole."""

    id: int
    producers: tuple[str, ...]
    channels: int
    kept: int
    reasons: tuple[str, ...]
    objective: float | None
    start_objective: float | None
    swaps: int
    seconds: float = 0.0


@dataclass(frozen=True)
class ChannelReport:
    """What ``--structure channel`` did and measured.

    ``flops_*`` are 2 × multiply-adds of the weight layers for the ``flops_input`` shape;
    ``multiple`` is the rounding of kept channel counts; ``notes`` record fall-backs (a candidate
    that measured slower than the input, a group blocked after the equivalence check).
    """

    method: str
    update: bool
    sparsity: float
    sparsity_of: str
    fraction: float
    multiple: int
    channels_before: int
    channels_after: int
    prunable_channels: int
    params_before: int
    params_after: int
    flops_before: int
    flops_after: int
    flops_input: str
    latency: tuple[LatencyRow, ...]
    latency_threads: int
    equivalence_max_diff: float
    groups: tuple[GroupRow, ...]
    notes: tuple[str, ...]
    written: str  # "pruned" or "input" (no candidate was faster than the input)


def _n(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def channel_summary(r: Report) -> list[str]:
    """The head of ``format_report`` for a channel-pruning run."""
    from ..report import table

    c: ChannelReport = r.structured
    pruned = [g for g in c.groups if g.kept < g.channels]
    head = [
        f"{r.input} -> {r.output}",
        f"channel pruning, method {c.method}{' + least-squares re-fit' if c.update else ''}: "
        f"removed {c.channels_before - c.channels_after:,} of {c.prunable_channels:,} prunable channels "
        f"({100 * (c.channels_before - c.channels_after) / max(c.prunable_channels, 1):.1f}%; "
        f"{c.channels_before:,} in all) in {len(pruned)} of {len(c.groups)} groups; "
        f"target {c.sparsity:g} of {c.sparsity_of}, kept counts rounded to multiples of {c.multiple}",
        "",
    ]
    rows: list[list[str]] = []
    for g in c.groups:
        prod = ", ".join(g.producers[:3]) + (f" +{len(g.producers) - 3}" if len(g.producers) > 3 else "")
        note = "; ".join(g.reasons[:2]) if g.reasons else ""
        obj = "-" if g.objective is None else f"{g.objective:.4f}"
        rows.append([str(g.id), prod, str(g.channels), str(g.kept), obj, note])
    head.append(table(rows, ["group", "producers", "channels", "kept", "rel. error", "kept whole because"]))
    lines = [
        ["parameters", _n(c.params_before), _n(c.params_after), f"{c.params_after / max(c.params_before, 1):.2f}x"],
        [
            f"FLOPs ({c.flops_input})",
            _n(c.flops_before),
            _n(c.flops_after),
            f"{c.flops_after / max(c.flops_before, 1):.2f}x",
        ],
    ]
    for row in c.latency:
        lines.append(
            [
                f"latency, batch {row.batch} (ms)",
                f"{1e3 * row.dense:.3f}",
                f"{1e3 * row.pruned:.3f}",
                f"{row.speedup:.2f}x faster",
            ]
        )
    head += ["", table(lines, ["", "dense", "pruned", "ratio"])]
    if c.latency:
        head.append(
            f"latency: onnxruntime CPU, {c.latency_threads} thread(s), medians of interleaved runs in one process; "
            "ratio = median of the per-round ratios"
        )
    head.append(f"pruned model = masked model (max |output difference| {c.equivalence_max_diff:.2g})")
    head += [f"note: {n}" for n in c.notes]
    return head
