"""Channel pruning of one model: plan kept counts, select channels group by group, re-fit, rewrite.

Groups are processed in graph order.  For each group the inputs of its consumer layers are captured
from the dense model and from the current (partly pruned, *masked*) model on the same calibration
rows, so each re-fit also repairs the error of the groups pruned before it:

    min_{S, B}  Σ_ℓ ‖Y_ℓ^dense − Ã_ℓ,S^current B_ℓ‖² / ‖Y_ℓ^dense‖²     (|S| = k)

``method="chita"`` solves this with :func:`~chita_onnx.solver.channels.select_channels`; the baseline
``method="magnitude"`` keeps the channels of largest filter L1 norm (Li et al. 2017) in the same
groups with the same counts, re-fitted only with ``update=True``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from numpy.typing import NDArray

from ..data_types import Batch, CalibrationSource, InputSpec
from ..errors import ConfigError
from ..progress import progress
from ..solver.channels import (
    DAMP,
    ChannelProblem,
    ChannelSelection,
    elimination_path,
    refit,
    select_channels,
    unfitted_error,
)
from .capture import capture, probe_shapes
from .graphutil import Constants
from .groups import Analysis, Group, analyse
from .layers import LayerView, views, write
from .report import GroupRow
from .stats import Accumulator, row_count, sample_rows
from .surgery import Key, kept_classes, masked_model, sliced_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChannelOptions:
    """What to prune and how (derived from :class:`~chita_onnx.config.CompressConfig`)."""

    sparsity: float
    sparsity_of: str = "channels"  # or "flops"
    multiple: int = 16
    method: str = "chita"  # or "magnitude" (L1 filter norm)
    update: bool = True
    num_samples: int = 256
    seed: int = 0
    damp: float = DAMP
    max_swaps: int = 50
    threads: int = 1
    allocation: str = "errors"  # or "uniform"


@dataclass
class ChannelResult:
    analysis: Analysis
    keep: NDArray[np.bool_]
    weights: dict[Key, NDArray[np.generic]]
    groups: list[GroupRow]
    counts: dict[int, int]
    fraction: float  # the uniform channel fraction removed per group (before rounding)
    timings: dict[str, float] = field(default_factory=dict)

    def masked(self) -> onnx.ModelProto:
        return masked_model(self.analysis, self.keep, self.weights)

    def sliced(self) -> onnx.ModelProto:
        return sliced_model(self.analysis, self.keep, self.weights)


# ------------------------------------------------------------------------------------- planning


def round_count(target: float, size: int, multiple: int, blocks: int = 1) -> int:
    """Kept channels of a group: the count nearest ``target`` among the kernel-friendly ones.

    Friendly counts are the multiples of ``multiple`` (the onnxruntime CPU NCHWc block: 16 with
    AVX-512, 8 with AVX2), plus ``multiple/2`` and ``multiple/4`` below one block (measured fast on
    onnxruntime CPU, BENCHMARKS.md), plus the whole group.  Grouped convolutions also need a
    multiple of their number of ``blocks``.
    """
    return min(friendly_counts(size, multiple, blocks), key=lambda k: (abs(k - target), -k))


def friendly_counts(size: int, multiple: int, blocks: int = 1) -> list[int]:
    """The kept counts :func:`round_count` chooses from, ascending."""
    step = math.lcm(max(1, multiple), max(1, blocks))
    options = {size}
    options.update(range(step, size, step))
    for small in (multiple // 2, multiple // 4):
        if small >= 1 and small % blocks == 0 and small < size:
            options.add(small)
    return sorted(options)


def plan_counts(analysis: Analysis, fraction: float, multiple: int) -> dict[int, int]:
    """Kept channels per prunable group when a ``fraction`` of every group's channels goes."""
    counts: dict[int, int] = {}
    for g in analysis.groups:
        if g.prunable:
            counts[g.id] = round_count((1.0 - fraction) * g.size, g.size, multiple, g.blocks)
    return counts


def node_macs(model: onnx.ModelProto, shapes: dict[str, tuple[int, ...]]) -> dict[int, int]:
    """Multiply-adds of every weight layer on the probe shapes."""
    consts = Constants(model.graph)
    macs: dict[int, int] = {}
    for i, node in enumerate(model.graph.node):
        out = shapes.get(node.output[0]) if node.output else None
        if out is None:
            continue
        if node.op_type == "Conv":
            w = consts.value(node.input[1])
            if w is not None:
                macs[i] = int(np.prod(out)) * int(np.prod(w.shape[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a = shapes.get(node.input[0])
            if a is not None:
                trans_a = any(x.name == "transA" and x.i for x in node.attribute)
                macs[i] = int(np.prod(out)) * int(a[0] if trans_a else a[-1])
        elif node.op_type in ("LSTM", "GRU", "RNN"):
            w, r = consts.value(node.input[1]), consts.value(node.input[2])
            x = shapes.get(node.input[0])
            if w is not None and r is not None and x is not None:
                macs[i] = int(x[0]) * int(x[1]) * (int(w.size) + int(r.size))
    return macs


def flops_after(analysis: Analysis, macs: dict[int, int], counts: dict[int, int]) -> int:
    """MACs of the pruned model when group ``g`` keeps ``counts[g]`` channels (any channels)."""
    keep = np.ones(analysis.unit_class.size, dtype=bool)
    for gid, k in counts.items():
        g = analysis.groups[gid]
        keep[g.classes[k:]] = False
    factor = dict.fromkeys(macs, 1.0)
    for s in analysis.slices:
        if s.slot == 1 and s.node in factor and s.units.size:
            factor[s.node] *= float(keep[analysis.unit_class[s.units]].mean())
    return int(sum(m * factor[i] for i, m in macs.items()))


def plan(analysis: Analysis, opts: ChannelOptions, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[int, int], float]:
    """Kept counts per group and the uniform fraction they come from.

    With ``sparsity_of="flops"`` the fraction is found by bisection so that the multiply-adds of
    the weight layers drop by ``sparsity`` (as close as the rounding allows).
    """
    if opts.sparsity_of == "channels":
        return plan_counts(analysis, opts.sparsity, opts.multiple), opts.sparsity
    macs = node_macs(analysis.model, shapes)
    total = sum(macs.values())
    goal = (1.0 - opts.sparsity) * total
    lo, hi = 0.0, 0.99
    best = (plan_counts(analysis, 0.0, opts.multiple), 0.0)
    for _ in range(30):
        mid = 0.5 * (lo + hi)
        counts = plan_counts(analysis, mid, opts.multiple)
        if flops_after(analysis, macs, counts) > goal:
            lo = mid
        else:
            hi = mid
            best = (counts, mid)
    if best[1] == 0.0:
        best = (plan_counts(analysis, hi, opts.multiple), hi)
    return best


#: With a channel budget, the allocation also saves at least this share of the FLOPs that pruning every
#: group by the same fraction would save (the speed-up of channel pruning comes from the FLOPs).
FLOP_SHARE = 1.0

#: A group keeps at least this fraction of its uniform share (allocation "errors").
FLOOR = 0.5


def allocate(
    analysis: Analysis,
    curves: dict[int, dict[int, float]],
    fraction: float,
    opts: ChannelOptions,
    macs: dict[int, int],
) -> dict[int, int]:
    """Kept counts that meet the budget where it costs the least reconstruction error.

    ``curves[g][k]`` is group ``g``'s error when it keeps ``k`` channels (``k`` a kernel-friendly
    count).  Two budgets must be met: the channels (``fraction`` of every group's channels, with
    ``sparsity_of="channels"``) and the FLOPs — at least what the uniform plan saves, or
    ``sparsity`` of them with ``sparsity_of="flops"``.  The FLOP budget matters: a channel of a wide
    layer at 1×1 resolution costs almost no error to remove but saves almost no time either, so a
    channel budget alone would take the speed-up away.  Starting from every group whole, the greedy
    lowers the group whose next friendly count adds the least error per unit of the budgets still
    unmet, until both are met.  Every group keeps at least ``FLOOR`` of its share ``(1 - fraction) · C``.
    """
    counts = {g: analysis.groups[g].size for g in curves}
    sizes = {g: analysis.groups[g].size for g in counts}
    total_flops = float(flops_after(analysis, macs, counts)) if macs else 0.0
    if opts.sparsity_of == "flops":
        goal_c = 0.0
        goal_f = (1.0 - opts.sparsity) * total_flops
    else:
        goal_c = sum((1.0 - fraction) * n for n in sizes.values())
        uniform = {
            g: round_count((1.0 - fraction) * n, n, opts.multiple, analysis.groups[g].blocks) for g, n in sizes.items()
        }
        goal_f = float(flops_after(analysis, macs, uniform)) if macs else 0.0
        goal_f = total_flops - FLOP_SHARE * (total_flops - goal_f)
    floor = {g: FLOOR * (1.0 - fraction) * n for g, n in sizes.items()}
    options = {g: sorted(k for k in curves[g] if floor[g] <= k < n) for g, n in sizes.items()}
    limit_c = goal_c if opts.sparsity_of == "channels" else 0.0
    budget_c = max(sum(sizes.values()) - goal_c, 1.0)
    need_f = max(total_flops - goal_f, 1.0)

    def greedy(start: dict[int, int], price: float, by_flops: bool) -> dict[int, int]:
        """Lower groups one friendly count at a time, cheapest first, until the goal (or no step).

        By FLOPs: cost ``Δerror + price · Δchannels / channel budget`` per FLOP saved, never past
        the channel budget, until the FLOP goal; by channels: ``Δerror`` per channel, stopping at the
        total closest to the channel goal.
        """
        counts = dict(start)
        chans = float(sum(counts.values()))
        flops = float(flops_after(analysis, macs, counts)) if macs else 0.0
        while (flops > goal_f + 1e-9) if by_flops else (chans > goal_c + 1e-9):
            best: tuple[float, int, int, float, float] | None = None
            for g, ks in options.items():
                lower = [k for k in ks if k < counts[g]]
                if not lower:
                    continue
                k = max(lower)
                c_after = chans - (counts[g] - k)
                if by_flops and c_after < limit_c - 1e-9:
                    continue
                f_after = float(flops_after(analysis, macs, {**counts, g: k})) if macs else 0.0
                d_err = curves[g][k] - curves[g][counts[g]]
                if by_flops:
                    if flops - f_after <= 0:
                        continue
                    rate = (d_err + price * (chans - c_after) / budget_c) / ((flops - f_after) / need_f)
                else:
                    rate = d_err / (chans - c_after)
                if best is None or rate < best[0]:
                    best = (rate, g, k, c_after, f_after)
            if best is None:
                break
            if not by_flops and best[3] < goal_c and goal_c - best[3] > chans - goal_c:
                break  # the step would overshoot the goal more than we are short of it
            counts[best[1]] = best[2]
            chans, flops = best[3], best[4]
        return counts

    full = {g: n for g, n in sizes.items()}
    counts = full
    if macs and goal_f < total_flops:
        # 1. the FLOP budget: the smallest price of channels that reaches it within the channel budget
        def reaches(c: dict[int, int]) -> bool:
            return float(flops_after(analysis, macs, c)) <= goal_f + 1e-9

        counts = greedy(full, 0.0, True)
        if not reaches(counts):
            lo, hi = 0.0, 1.0
            best_counts = greedy(full, hi, True)
            while not reaches(best_counts) and hi < 1e6:
                hi *= 10.0
                best_counts = greedy(full, hi, True)
            for _ in range(12):
                mid = 0.5 * (lo + hi)
                trial = greedy(full, mid, True)
                if reaches(trial):
                    hi, best_counts = mid, trial
                else:
                    lo = mid
            counts = best_counts
    # 2. the rest of the channel budget, by error per channel
    return greedy(counts, 0.0, False) if opts.sparsity_of == "channels" else counts


# ------------------------------------------------------------------------------------ selection


def l1_scores(analysis: Analysis, group: Group) -> NDArray[np.float64]:
    """Filter L1 norm per channel of ``group``: the producers' output-channel weights, each producer
    normalised by its mean so that every producer counts equally."""
    graph = analysis.model.graph
    consts = Constants(graph)
    order = {int(c): k for k, c in enumerate(group.classes.tolist())}
    score = np.zeros(group.size)
    for s in analysis.slices:
        if s.kind != "producer":
            continue
        cls = analysis.unit_class[s.units]
        hit = np.array([int(c) in order for c in cls.tolist()])
        if not hit.any():
            continue
        w = np.abs(np.asarray(consts.value(graph.node[s.node].input[s.slot]), dtype=np.float64))
        norms = np.moveaxis(w, s.axis, 0).reshape(w.shape[s.axis], -1).sum(axis=1)
        norms = norms / max(float(norms.mean()), 1e-30)
        for pos in np.flatnonzero(hit):
            score[order[int(cls[pos])]] += norms[pos]
    return score


ViewKey = tuple[int, int]  # (consumer index, conv group)


class _DenseTargets:
    """Sampled rows of every consumer view and the dense model's outputs there, per batch.

    Computed in one pass of the dense model; every group's statistics reuse them, so each group
    needs only one pass of the current model (the same rows, its own inputs).
    """

    def __init__(self, analysis: Analysis, consumers: list[int], shapes: dict[str, tuple[int, ...]]) -> None:
        self.views: dict[ViewKey, LayerView] = {}
        for k in consumers:
            cons = analysis.consumers[k]
            for v in views(analysis, cons, shapes[cons.input]):
                self.views[(k, v.part)] = v
        self.rows: dict[ViewKey, list[NDArray[np.int64]]] = {key: [] for key in self.views}
        self.targets: dict[ViewKey, list[NDArray[np.float32]]] = {key: [] for key in self.views}

    @property
    def inputs(self) -> list[str]:
        return list(dict.fromkeys(v.consumer.input for v in self.views.values()))

    def add(self, dense: dict[str, NDArray[np.floating]], share: float, rng: np.random.Generator) -> None:
        for key, v in self.views.items():
            x = dense[v.consumer.input]
            total = row_count(x.shape, v.consumer.axis, v.geom)
            rows = sample_rows(total, max(1, math.ceil(_row_budget(v.W.shape[1]) * share)), rng)
            self.rows[key].append(rows)
            self.targets[key].append(v.target(v.rows(x, rows)).astype(np.float32))


class _Problems:
    """Least-squares statistics of the consumers of one group, on the current model."""

    def __init__(self, analysis: Analysis, group: Group, keep: NDArray[np.bool_], dense: _DenseTargets) -> None:
        self.analysis = analysis
        self.dense = dense
        order = {int(c): k for k, c in enumerate(group.classes.tolist())}
        self.keys: list[ViewKey] = [key for key in dense.views if key[0] in group.consumers]
        self.views = [dense.views[key] for key in self.keys]
        self.cols: list[NDArray[np.int64]] = []  # current (existing) columns of each view
        self.channel: list[NDArray[np.int64]] = []
        for v in self.views:
            cls = analysis.unit_class[v.col_units]
            cols = np.flatnonzero(keep[cls])
            self.cols.append(cols)
            self.channel.append(np.array([order.get(int(c), -1) for c in cls[cols].tolist()], np.int64))
        self.acc = [
            Accumulator(c.size, v.W.shape[0], intercept=v.bias is not None)
            for v, c in zip(self.views, self.cols, strict=True)
        ]

    @property
    def inputs(self) -> list[str]:
        return list(dict.fromkeys(v.consumer.input for v in self.views))

    def add(self, batch: int, current: dict[str, NDArray[np.floating]]) -> None:
        """Add batch number ``batch`` of the current model's consumer inputs."""
        for key, v, cols, acc in zip(self.keys, self.views, self.cols, self.acc, strict=True):
            rows = self.dense.rows[key][batch]
            acc.add(v.rows(current[v.consumer.input], rows)[:, cols], self.dense.targets[key][batch])

    def problems(self) -> list[ChannelProblem]:
        out = []
        yy_by_consumer: dict[int, float] = {}
        for v, acc in zip(self.views, self.acc, strict=True):
            yy_by_consumer[v.consumer.node] = yy_by_consumer.get(v.consumer.node, 0.0) + acc.yy
        for v, acc, ch, cols in zip(self.views, self.acc, self.channel, self.cols, strict=True):
            n = max(acc.n, 1)
            channel = np.concatenate([ch, [-1]]) if acc.intercept else ch
            w0 = v.W[:, cols].T
            if acc.intercept and v.bias is not None:
                w0 = np.vstack([w0, v.bias[None, :]])
            yy = yy_by_consumer[v.consumer.node]
            out.append(ChannelProblem(acc.H / n, acc.G / n, acc.yy / n, channel, 1.0 / max(yy / n, 1e-30), w0))
        return out

    def weights(self, sel: ChannelSelection, base: dict[Key, NDArray[np.generic]]) -> dict[Key, NDArray[np.generic]]:
        """Overrides with the re-fitted consumers (removed columns zero)."""
        by_consumer: dict[int, list[tuple[LayerView, NDArray[np.float64], NDArray[np.float64] | None]]] = {}
        for v, cols, acc, kept_cols, coef in zip(self.views, self.cols, self.acc, sel.columns, sel.coefs, strict=True):
            W_new = np.zeros_like(v.W)
            b_new = None
            if acc.intercept:
                is_b = kept_cols == cols.size
                b_new = coef[is_b][0] if is_b.any() else np.zeros(v.W.shape[0])
                kept_cols, coef = kept_cols[~is_b], coef[~is_b]
            W_new[:, cols[kept_cols]] = coef.T
            by_consumer.setdefault(v.consumer.node, []).append((v, W_new, b_new))
        out: dict[Key, NDArray[np.generic]] = {}
        for node, parts in by_consumer.items():
            cons = next(v.consumer for v in self.views if v.consumer.node == node)
            out.update(write(self.analysis, cons, parts, base))
        return out


def _row_budget(q: int) -> int:
    return int(min(65536, max(8192, 32 * (q + 1))))


def prune_channels(
    model: onnx.ModelProto,
    calib: CalibrationSource,
    specs: Sequence[InputSpec],
    opts: ChannelOptions,
    *,
    blocked: dict[int, str] | None = None,
    probes: Sequence[Batch] | None = None,
) -> ChannelResult:
    """Select and re-fit channels group by group; nothing is written here (see :class:`ChannelResult`).

    ``blocked`` keeps extra groups whole (group id → reason), e.g. after a failed equivalence check.
    """
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    probe = list(probes) if probes is not None else probe_batches(calib, specs)
    shapes_all = probe_shapes(model, probe, specs)
    analysis = analyse(model, shapes_all)
    for gid, reason in (blocked or {}).items():
        analysis.groups[gid].reasons.append(reason)
    shapes = shapes_all[0]
    counts, fraction = plan(analysis, opts, shapes)
    timings["analyse"] = time.perf_counter() - t0
    keep = kept_classes(analysis, {})
    weights: dict[Key, NDArray[np.generic]] = {}
    results: dict[int, GroupRow] = {}
    need_stats = opts.method == "chita" or opts.update
    allocate_by_errors = opts.method == "chita" and opts.allocation == "errors"
    candidates = [
        g for g in analysis.groups if g.prunable and (counts.get(g.id, g.size) < g.size or allocate_by_errors)
    ]
    sizes = _batch_sizes(calib, opts.num_samples)
    n_use = sum(sizes)
    rng = np.random.default_rng(opts.seed)
    dense_bytes = model.SerializeToString()
    dense: _DenseTargets | None = None
    if need_stats and candidates:
        t2 = time.perf_counter()
        dense = _DenseTargets(analysis, sorted({k for g in candidates for k in g.consumers}), shapes)
        whole = {g.id: _Problems(analysis, g, keep, dense) for g in candidates if allocate_by_errors and g.consumers}
        values = capture(dense_bytes, dense.inputs, calib, specs, max_samples=n_use, threads=opts.threads)
        for b, (size, vals) in enumerate(zip(sizes, values, strict=False)):
            dense.add(vals, size / n_use, rng)
            for group_stats in whole.values():
                group_stats.add(b, vals)
        timings["dense targets"] = time.perf_counter() - t2
        if whole:
            t3 = time.perf_counter()
            curves = {}
            probe_set: dict[int, NDArray[np.int64]] = {}
            local: dict[int, float] = {}
            for gid, group_stats in whole.items():
                g = analysis.groups[gid]
                options = friendly_counts(g.size, opts.multiple, g.blocks) if g.blocks == 1 else [counts[gid]]
                sets: dict[int, NDArray[np.int64]] = {}
                problems_g = group_stats.problems()
                curves[gid] = elimination_path(problems_g, g.size, options, damp=opts.damp, sets=sets)
                if counts[gid] in sets:
                    probe_set[gid] = sets[counts[gid]]
                    local[gid] = unfitted_error(problems_g, sets[counts[gid]])
            # the local errors do not say how much of an error reaches the output (an early layer's
            # passes through the whole network): scale each curve by its group's measured amplification
            t5 = time.perf_counter()
            gain = amplification(analysis, probe_set, local, model, calib, specs, opts)
            for gid, factor in gain.items():
                curves[gid] = {k: factor * v for k, v in curves[gid].items()}
            timings["amplification"] = time.perf_counter() - t5
            for g in candidates:  # groups nobody reads cost nothing to prune
                curves.setdefault(g.id, dict.fromkeys(friendly_counts(g.size, opts.multiple, g.blocks), 0.0))
            counts = allocate(analysis, curves, fraction, opts, node_macs(model, shapes))
            timings["allocate"] = time.perf_counter() - t3
            del whole
    todo = [g for g in candidates if counts.get(g.id, g.size) < g.size]
    first_node = {g.id: min((analysis.consumers[k].node for k in g.consumers), default=10**9) for g in todo}
    todo.sort(key=lambda g: first_node[g.id])
    t_sel = 0.0
    cache: dict[str, list[NDArray[np.floating]]] = {}  # current-model tensors still valid, per batch
    for g in progress(todo, desc="channel groups", unit="group"):
        t1 = time.perf_counter()
        k = counts[g.id]
        sel: ChannelSelection | None = None
        problems: list[ChannelProblem] = []
        probs: _Problems | None = None
        if dense is not None and g.consumers:
            probs = _Problems(analysis, g, keep, dense)
            changed = bool(weights) or bool((~keep).any())
            current = (
                masked_model(analysis, keep, weights, zero_producers=False).SerializeToString()
                if changed
                else dense_bytes
            )
            captured: dict[str, list[NDArray[np.floating]]] = {n: [] for n in probs.inputs}
            for b, cur_vals in enumerate(
                capture(current, probs.inputs, calib, specs, max_samples=n_use, given=cache, threads=opts.threads)
            ):
                probs.add(b, cur_vals)
                for n, v in cur_vals.items():
                    captured[n].append(v)
            problems = probs.problems()
            cache = captured
        blocks = g.block_of if g.blocks > 1 else None
        if opts.method == "chita" and problems:
            sel = select_channels(problems, g.size, k, blocks=blocks, damp=opts.damp, max_swaps=opts.max_swaps)
            kept_idx = sel.kept
        else:
            score = l1_scores(analysis, g)
            kept_idx = _top_k(score, k, blocks)
            if problems:
                sel = refit(problems, kept_idx, damp=opts.damp)
        keep[g.classes] = False
        keep[g.classes[kept_idx]] = True
        if sel is not None and probs is not None and opts.update:
            new = probs.weights(sel, weights)
            weights.update(new)
            stale = downstream(analysis.model, {node for node, _slot in new})
            cache = {n: v for n, v in cache.items() if n not in stale}
        results[g.id] = GroupRow(
            g.id,
            tuple(g.producers),
            g.size,
            int(kept_idx.size),
            (),
            None if sel is None else sel.objective,
            None if sel is None else sel.start_objective,
            0 if sel is None else sel.swaps,
            time.perf_counter() - t1,
        )
        t_sel += time.perf_counter() - t1
        log.info("group %d (%s): kept %d of %d channels", g.id, ", ".join(g.producers[:3]), kept_idx.size, g.size)
    timings["select"] = t_sel
    out = []
    for g in analysis.groups:
        if g.id in results:
            out.append(results[g.id])
        else:
            why = "the allocation keeps every channel" if allocate_by_errors else "rounding keeps every channel"
            reasons = tuple(g.reasons) if g.reasons else (why,)
            out.append(GroupRow(g.id, tuple(g.producers), g.size, g.size, reasons, None, None, 0, 0.0))
    return ChannelResult(analysis, keep, weights, out, counts, fraction, timings)


#: Calibration samples used to measure how much each group's error reaches the outputs.
AMPLIFICATION_SAMPLES = 32


def amplification(
    analysis: Analysis,
    kept: dict[int, NDArray[np.int64]],
    local: dict[int, float],
    model: onnx.ModelProto,
    calib: CalibrationSource,
    specs: Sequence[InputSpec],
    opts: ChannelOptions,
) -> dict[int, float]:
    """Per group: relative output error of the model with only that group pruned to ``kept[g]``
    (trained weights, no re-fit), divided by the group's local relative error ``local[g]`` for the
    same channels.  Measured with onnxruntime on the first calibration samples."""
    outputs = [o.name for o in model.graph.output]
    n = AMPLIFICATION_SAMPLES
    dense = [
        np.concatenate(v)
        for v in zip(
            *[
                [b[o] for o in outputs]
                for b in capture(model, outputs, calib, specs, max_samples=n, threads=opts.threads)
            ],
            strict=True,
        )
    ]
    energy = sum(float(np.sum(np.asarray(y, np.float64) ** 2)) for y in dense)
    gain: dict[int, float] = {}
    for gid, ids in kept.items():
        g = analysis.groups[gid]
        keep = kept_classes(analysis, {gid: g.classes[ids]})
        masked = masked_model(analysis, keep, zero_producers=False)
        got = [
            np.concatenate(v)
            for v in zip(
                *[
                    [b[o] for o in outputs]
                    for b in capture(masked, outputs, calib, specs, max_samples=n, threads=opts.threads)
                ],
                strict=True,
            )
        ]
        err = sum(
            float(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
            for a, b in zip(dense, got, strict=True)
        )
        if local.get(gid, 0.0) > 0 and energy > 0:
            gain[gid] = (err / energy) / local[gid]
    if gain:  # groups without a measurement get the median factor
        median = float(np.median(list(gain.values())))
        for gid in kept:
            gain.setdefault(gid, median)
    return gain


def downstream(model: onnx.ModelProto, nodes: set[int]) -> set[str]:
    """Every tensor computed from the outputs of ``nodes`` (their values change when they do)."""
    graph = model.graph
    readers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for x in node.input:
            readers.setdefault(x, []).append(i)
    seen: set[str] = set()
    todo = [o for i in nodes for o in graph.node[i].output]
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        for r in readers.get(t, []):
            todo.extend(graph.node[r].output)
    return seen


def _batch_sizes(calib: CalibrationSource, limit: int) -> list[int]:
    sizes: list[int] = []
    for b in calib:
        take = min(b.size, limit - sum(sizes))
        if take <= 0:
            break
        sizes.append(take)
    return sizes


def _top_k(score: NDArray[np.float64], k: int, blocks: NDArray[np.int64] | None) -> NDArray[np.int64]:
    if blocks is None:
        return np.sort(np.argsort(-score, kind="stable")[:k]).astype(np.int64)
    n_blocks = int(blocks.max()) + 1
    per = k // n_blocks
    chosen = []
    for b in range(n_blocks):
        idx = np.flatnonzero(blocks == b)
        chosen.extend(idx[np.argsort(-score[idx], kind="stable")[:per]].tolist())
    return np.sort(np.asarray(chosen, np.int64))


def probe_batches(calib: CalibrationSource, specs: Sequence[InputSpec] = ()) -> list[Batch]:
    """One-sample and two-sample batches of real data (two batch sizes tell batch dims apart);
    only the one-sample batch when the model's batch size is fixed."""
    first = next(iter(calib))
    one = Batch({k: np.asarray(v)[:1] for k, v in first.inputs.items()}, None)
    if any(s.shape and isinstance(s.shape[0], int) and s.shape[0] > 0 for s in specs):
        return [one]
    if first.size >= 2:
        two = Batch({k: np.asarray(v)[:2] for k, v in first.inputs.items()}, None)
    else:
        two = Batch({k: np.concatenate([np.asarray(v)[:1]] * 2) for k, v in first.inputs.items()}, None)
    return [one, two]


def check_options(opts: ChannelOptions) -> None:
    if opts.method not in ("chita", "magnitude"):
        raise ConfigError(f"--method={opts.method!r}: channel pruning supports chita and magnitude (L1 filter norm)")
