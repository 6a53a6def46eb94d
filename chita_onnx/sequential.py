"""Sequential passes through the graph: layer-wise pruning, bias correction, BatchNorm re-estimation.

Each pass walks the prunable layers (or BN nodes) in graph order with a
:class:`~chita_onnx.activations.SegmentRunner` on the model being changed and, where targets are
needed, a second runner on the dense model advanced in lockstep (with a second core, the
layer-wise pass runs it one layer ahead on a worker thread:
:class:`~chita_onnx.activations.AheadRunner`).  Every layer therefore sees its inputs from the
already-changed upstream model, and the whole pass costs about one forward pass of each model over
the calibration batches (plus the per-layer statistics and solves).

The math is elsewhere: rows and Grams in :mod:`chita_onnx.layerstats`, the per-layer solve in
:mod:`chita_onnx.solver.layerwise`; this module only moves arrays between them and the graph.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper

from .activations import AheadRunner, Arrays, LayerSite, SegmentRunner, find_layers
from .blas import blas_threads, leave_a_core
from .graph import _constant_values, write_weights
from .layerstats import (
    LayerGeometry,
    LayerStats,
    RowSampler,
    accumulate,
    dense_weight_t,
    finalize_means,
    input_rows,
    num_rows,
    output_rows,
    rows_to_weight,
    rowspace_capacity,
    weight_rows,
)
from .progress import progress
from .solver.layerwise import LayerSolution, class_weighted_mask, output_row_weights, prune_layer
from .solver.offsets import kl_rows, log_softmax
from .solver.parallel import helping
from .solver.rowspace import cheaper as cheaper_rows
from .solver.rowspace import prune_layer_rows
from .standardize import fresh_namer

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class LayerwiseOptions:
    """Settings of the layer-wise pass (see :class:`~chita_onnx.config.CompressConfig`)."""

    damp: float = 0.01
    block: int = 128
    max_rows: int = 0  # cap on rows per layer as a multiple of d (0: every row)
    dense_targets: bool = True
    refit: bool = True
    select: str = "sparsegpt"
    seed: int = 0
    threads: int = 1
    #: Run the dense model's segments ahead of the pass on a worker thread (same values; one more
    #: layer's dense activations in memory).  Worth it with a second core.
    ahead: bool = False
    #: Split the solvers' large matrix products by rows with a helper thread while BLAS runs one
    #: thread per call (:mod:`chita_onnx.solver.parallel`; the same values).  Worth it with a second core.
    helper: bool = False
    max_bytes: int | None = None  # per runner: kept activations above this go to memory-mapped files
    spill_dir: str | None = None
    recurrent_refits: int = 1  # closed-loop re-fit rounds of a recurrent node (chita_onnx.rnnlayers)
    #: Samples in each calibration batch when the batches of a model that fixes its batch to one were
    #: joined (chita_onnx.reconstruct.layer_data): the row cap then samples every sample's rows alike,
    #: as over batches of one.  Empty: the rows of each batch are sampled together.
    sample_groups: tuple[int, ...] = ()
    #: Weights whose Gram would not fit in memory, solved from at most :data:`ROWS_ONLY_MAX` of their
    #: input rows instead (:func:`chita_onnx.reconstruct.too_wide`).
    rows_only: frozenset[str] = frozenset()
    #: ``--max-memory`` (bytes, None: no cap): independent solves run at once only while two of them
    #: together stay within a quarter of it (:func:`chita_onnx.solver.parallel.tasks`).
    max_memory: int | None = None
    #: Also compute each layer's reported-only errors (:attr:`LayerReport.masked_error` and
    #: :attr:`~LayerReport.dense_error`, else NaN): two more products with its Gram.  The pass turns
    #: them on by itself when debug logging is.
    diagnostics: bool = False
    #: The weight of a softmax head (its outputs are the classes; one group) and the per-class offset
    #: ``(M,)`` from its dense output rows to the logits: that layer keeps the weights that
    #: :func:`~chita_onnx.solver.layerwise.class_weighted_mask` chooses from the dense class
    #: probabilities (``--head-select classes``), then re-fits them as any layer.  None: no such layer.
    class_head: str | None = None
    class_offset: tuple[float, ...] = ()
    #: With :attr:`class_head`: choose between the class-weighted selection and the layer's own one
    #: by the KL divergence to the dense output on held-out calibration batches (:func:`_choose_head`;
    #: ``--head-select auto``), instead of always using the class-weighted one.
    class_choose: bool = False
    #: The softmax's axis on the logits (as written), checked against the layer's outputs.
    class_axis: int = -1

    @property
    def shared_solve_bytes(self) -> float | None:
        """How much memory two independent solves may hold together to run at once (a quarter of
        :attr:`max_memory`; None: no cap)."""
        return None if self.max_memory is None else self.max_memory / 4


@dataclass(frozen=True)
class LayerReport:
    """What the pass did to one tensor (errors are summed squared output errors vs the dense layer;
    ``masked_error`` and ``dense_error`` only with :attr:`LayerwiseOptions.diagnostics`, else NaN)."""

    name: str
    size: int
    kept: int
    rows: int
    error: float
    masked_error: float
    dense_error: float
    energy: float
    damp: float
    seconds: float


@dataclass
class PassResult:
    weights: dict[str, NDArray[np.float32]]
    layers: list[LayerReport]
    seconds: dict[str, float] = field(default_factory=dict)
    #: The ``tail`` tensors asked of :func:`layerwise_prune`, per batch: the first names' of the dense
    #: model and the second names' of the pruned one (all layers pruned); None when not asked or not
    #: available.
    tail: tuple[dict[str, list[NDArray[np.generic]]], dict[str, list[NDArray[np.generic]]]] | None = None
    #: ``--head-select auto``: what :func:`_choose_head` chose for the softmax head and why (empty
    #: when there was no choice to make).
    head_choice: dict[str, float | int | str] = field(default_factory=dict)


#: Held-out rows of the softmax head kept for :func:`_choose_head`, at most about this many bytes.
HEAD_HELD_BYTES = 256 * 2**20


#: ``--head-select auto`` holds every ``HEAD_HOLDOUT``-th calibration sample out of the head's trial fits.
HEAD_HOLDOUT = 5


@dataclass
class _HeadSplit:
    """The softmax head's statistics without the held-out samples (``fit``), the held-out samples'
    input rows ``x (R, d)`` and dense output rows ``y (R, M)`` (the node's own bias left out), and
    how many samples have been seen."""

    fit: LayerStats
    x: list[NDArray[np.float32]] = field(default_factory=list)
    y: list[NDArray[np.float32]] = field(default_factory=list)
    nbytes: int = 0
    samples: int = 0


def _split_rows(
    split: _HeadSplit,
    a: NDArray[np.float32],
    z: NDArray[np.floating],
    offset: NDArray[np.float64] | None,
    idx: NDArray[np.int64] | None,
    geom: LayerGeometry,
) -> None:
    """Send one batch's rows (input ``a``, dense output ``z``; ``idx`` the sampled rows, as
    :func:`~chita_onnx.layerstats.accumulate` takes them) of the softmax head to ``split``: those of
    every :data:`HEAD_HOLDOUT`-th sample (counted over the batches) to its held-out rows (up to
    :data:`HEAD_HELD_BYTES`), the others to ``split.fit``.  Rows are sample-major, as
    :func:`~chita_onnx.layerstats.input_rows` lays them out."""
    n = int(a.shape[0])
    total = num_rows(tuple(a.shape), geom)
    rows = np.arange(total, dtype=np.int64) if idx is None else np.asarray(idx, np.int64)
    sample = split.samples + rows // max(1, total // max(1, n))
    split.samples += n
    held = sample % HEAD_HOLDOUT == HEAD_HOLDOUT - 1
    if np.any(~held):
        accumulate(split.fit, a, z_dense=z, offset=offset, index=rows[~held], geom=geom)
    if np.any(held) and split.nbytes < HEAD_HELD_BYTES:
        split.x.append(input_rows(a, geom, rows[held])[:, 0, :])
        split.y.append(output_rows(z, geom, rows[held], offset)[:, 0, :])
        split.nbytes += split.x[-1].nbytes + split.y[-1].nbytes


def _finish(
    stats: LayerStats, geom: LayerGeometry, Wr: NDArray[np.float64], fraction: float, opts: LayerwiseOptions
) -> None:
    """:func:`~chita_onnx.layerstats.finalize_means` for a layer about to keep ``fraction`` of its
    weights ``Wr (g, M, d)``: its rows stay rows where the row-space solve is the cheaper one."""
    rows = stats.rowspace and (
        stats.rows_only or cheaper_rows(stats.pending_rows, geom.d, Wr.shape[1], fraction, opts.block)
    )
    finalize_means(stats, rows=rows)


def head_kl(
    x: NDArray[np.float32], y: NDArray[np.float32], W: NDArray[np.float64], offset: NDArray[np.float64]
) -> float:
    """Mean KL divergence from the dense softmax ``softmax(y + offset)`` to the pruned head's
    ``softmax(x Wᵀ + offset)`` over the rows (``x (R, d)``, ``y (R, M)``, ``W (M, d)``)."""
    total, R = 0.0, x.shape[0]
    for r0 in range(0, R, 1024):
        P = np.exp(log_softmax(y[r0 : r0 + 1024], offset))
        Z = x[r0 : r0 + 1024].astype(np.float64) @ W.T
        total += kl_rows(P, Z, offset) * Z.shape[0]
    return float(total / max(1, R))


def _choose_head(
    name: str,
    Wr: NDArray[np.float64],
    stats: LayerStats,
    split: _HeadSplit,
    geom: LayerGeometry,
    keep: Mapping[str, int],
    row_fisher: Mapping[str, NDArray[np.floating]] | None,
    opts: LayerwiseOptions,
) -> dict[str, float | int | str]:
    """``--head-select auto``: fit the softmax head both ways on ``split.fit`` (the calibration
    samples not held out), score each by :func:`head_kl` on the held-out rows, and leave ``stats``
    set for the winner (its class energy dropped when the layer's own selection wins; a tie or no
    held-out rows go that way too).  Returns what was chosen and the two scores."""
    if not split.x:
        stats.class_energy = None
        return {"head_select": "layer", "head_held_rows": 0}
    fit = split.fit
    _finish(fit, geom, Wr, int(keep[name]) / max(1, Wr.size), opts)
    x, y = np.concatenate(split.x), np.concatenate(split.y)
    offset = np.asarray(opts.class_offset, np.float64).reshape(1, -1)
    scores = {}
    for label in ("classes", "layer"):
        if label == "layer":
            fit.class_energy = None
        sol = _solve_layer(name, Wr, fit, geom, keep, None, row_fisher, opts)
        scores[label] = head_kl(x, y, sol.W[0] * sol.mask[0], offset)
    pick = "classes" if scores["classes"] < scores["layer"] else "layer"
    if pick == "layer":
        stats.class_energy = None
    log.info(
        "%s: %s selection for the softmax head (KL to dense on %d held-out rows: layer %.4g, classes %.4g)",
        name, pick, x.shape[0], scores["layer"], scores["classes"],
    )  # fmt: skip
    return {
        "head_select": pick, "head_kl_layer": scores["layer"], "head_kl_classes": scores["classes"],
        "head_held_rows": int(x.shape[0]),
    }  # fmt: skip


def _classes_on_channels(z: Sequence[NDArray[np.generic]] | None, geom: LayerGeometry, axis: int) -> bool:
    """Whether the softmax's axis ``axis`` (as written on the logits) is the output-channel axis of
    a layer whose outputs ``z`` (per batch) have the logits' shape: the last axis of a Gemm/MatMul,
    axis 1 of a Conv (checked here, on the values, where the graph does not declare the rank)."""
    if not z:
        return False
    rank = np.ndim(z[0])
    channel = 1 if geom.kind == "conv" else rank - 1
    return rank > 0 and -rank <= axis < rank and axis % rank == channel


def _add_consumer(
    stats: LayerStats,
    site: LayerSite,
    pruned: SegmentRunner,
    dense: SegmentRunner | AheadRunner | None,
    W_bar_rows: NDArray[np.float64],
    opts: LayerwiseOptions,
    seed: int,
    share: int = 1,
    split: _HeadSplit | None = None,
) -> None:
    """Add one consuming node's rows over all batches to ``stats`` (and, with ``split``, to the softmax
    head's split, :func:`_split_rows`).  ``pruned`` stands before the
    node; the dense targets come from the dense runner's node *output* (minus the node's own bias),
    or — when that bias is not a constant — from its input times ``W̄``.  ``share``: how many
    consumers split the ``max_rows`` cap (each gets ``1/share`` of it)."""
    geom = site.geometry
    xs = pruned.values(site.input)
    z: Sequence[NDArray[np.generic]] | None = None
    ad: Sequence[NDArray[np.generic]] | None = None
    offset = None
    if dense is not None:
        dense.advance(*_dense_call(site))
        if site.opaque_offset:
            ad = dense.values(site.input)
        else:
            z = dense.values(site.output)
            if site.offset is not None:
                c = np.asarray(dense.initializer(site.offset), np.float64).reshape(-1) * site.offset_scale
                m = geom.outputs_per_group * geom.groups
                offset = np.full(m, c[0]) if c.size == 1 else c
    if stats.class_offset is not None and not _classes_on_channels(z, geom, opts.class_axis):
        log.info("%s: the softmax does not run over this layer's outputs: selected as the other layers", site.weight)
        stats.class_offset = None
        split = None
    total = sum(num_rows(tuple(a.shape), geom) for a in xs)
    cap = -(-opts.max_rows * geom.d // max(1, share)) if opts.max_rows > 0 else None
    if stats.rows_only:  # no Gram: a random subset of rows that fits the row-space solve
        most = max(1, rows_only_limit(geom) // max(1, share))
        cap = most if cap is None else min(cap, most)
    sampler = RowSampler(total, cap, seed=seed)
    wT = dense_weight_t(W_bar_rows) if ad is not None and stats.B is not None else None  # once, not per batch
    for b, a in enumerate(xs):
        a32 = np.asarray(a, np.float32)
        idx = sampler.pick(num_rows(tuple(a32.shape), geom), opts.sample_groups[b] if opts.sample_groups else 1)
        if z is not None:
            zb = np.asarray(z[b], np.float32)
            accumulate(stats, a32, z_dense=zb, offset=offset, index=idx, geom=geom)
            if split is not None:
                _split_rows(split, a32, zb, offset, idx, geom)
        elif ad is not None:
            accumulate(
                stats, a32, a_dense=np.asarray(ad[b], np.float32), w_dense_t=wT, index=idx, geom=geom
            )
        else:
            accumulate(stats, a32, index=idx, geom=geom)


#: At most this many input rows for a weight solved from its rows because its Gram would not fit
#: (:attr:`LayerwiseOptions.rows_only`): the row space's sweep and re-fits grow with ``N²`` and
#: ``N·d²``, and the classifier heads this is for get one row per calibration sample.
ROWS_ONLY_MAX = 1024


def rows_only_limit(geom: LayerGeometry) -> int:
    """Rows kept for a :attr:`LayerwiseOptions.rows_only` layer: :data:`ROWS_ONLY_MAX`, and at most
    half of what its row-space statistics hold (:func:`~chita_onnx.layerstats.rowspace_capacity`; the
    sampler rounds each batch's share up)."""
    return int(min(ROWS_ONLY_MAX, max(1, rowspace_capacity(geom) // 2)))


def rows_only_bytes(geom: LayerGeometry, weight_copies: int) -> int:
    """Estimated peak bytes of a :attr:`LayerwiseOptions.rows_only` layer's solve: its rows in float32
    and three float64 copies (rows, column-major, the re-fit's gathers), ``K``, and ``weight_copies``
    float64 copies of the weight."""
    n, d = rows_only_limit(geom), geom.d
    size = int(np.prod(geom.weight_shape))
    return 4 * n * (d + geom.outputs_per_group) + 8 * (3 * n * d + 2 * n * n + weight_copies * size)


def _solve_layer(
    name: str,
    Wr: NDArray[np.float64],
    stats: LayerStats,
    geom: LayerGeometry,
    keep: Mapping[str, int] | None,
    masks: Mapping[str, NDArray[np.bool_]] | None,
    row_fisher: Mapping[str, NDArray[np.floating]] | None,
    opts: LayerwiseOptions,
) -> LayerSolution:
    """Select and re-fit one layer from its statistics: to its count ``keep[name]`` or on
    ``masks[name]``; a softmax head with class energies (:attr:`LayerwiseOptions.class_head`) keeps
    the weights :func:`~chita_onnx.solver.layerwise.class_weighted_mask` chooses and is re-fitted on
    them; few rows of a wide layer (:attr:`LayerStats.X`, one group) go to
    :func:`~chita_onnx.solver.rowspace.prune_layer_rows`, as :func:`prune_layer` would on their Gram."""
    if stats.class_energy is not None and keep is not None:
        chosen = class_weighted_mask(Wr[0], stats.class_energy, int(keep[name]))
        log.debug("%s: kept weights chosen by the dense class probabilities", name)
        kept = rows_to_weight(chosen[None].astype(np.float64), geom) != 0
        return _solve_layer(name, Wr, stats, geom, None, {name: kept}, None, opts)
    if stats.X is not None:  # few rows of a wide layer: the row-space solver, no Gram
        log.debug("%s: row-space solve (%d rows of %d inputs, no Gram)", name, stats.X.shape[0], stats.X.shape[1])
        common = {
            "refit": opts.refit, "damp": opts.damp, "block": opts.block, "name": name, "diagnostics": opts.diagnostics,
        }  # fmt: skip
        if keep is not None:
            rho_rows = None
            if row_fisher is not None and name in row_fisher:
                sq = np.einsum("nd,nd->", stats.X, stats.X, dtype=np.float64)
                r = output_row_weights(weight_rows(row_fisher[name], geom), None, energy=np.array([sq]))
                rho_rows = None if r is None else r[0]
            return prune_layer_rows(
                Wr[0], stats.X, stats.Y, keep=int(keep[name]), select=opts.select, row_weight=rho_rows, **common  # type: ignore[arg-type]
            )
        assert masks is not None
        m_rows = weight_rows(np.asarray(masks[name], dtype=np.float64), geom)[0] != 0
        return prune_layer_rows(Wr[0], stats.X, stats.Y, mask=m_rows, select="mask", **common)  # type: ignore[arg-type]
    if keep is not None:
        rho = None
        if row_fisher is not None and name in row_fisher:
            rho = output_row_weights(weight_rows(row_fisher[name], geom), stats.H)
        return prune_layer(
            Wr, stats.H, stats.B, stats.yy, keep=int(keep[name]), select=opts.select,  # type: ignore[arg-type]
            refit=opts.refit, damp=opts.damp, block=opts.block, name=name, row_weight=rho,
            diagnostics=opts.diagnostics,
        )  # fmt: skip
    assert masks is not None
    m = weight_rows(np.asarray(masks[name], dtype=np.float64), geom) != 0
    return prune_layer(
        Wr, stats.H, stats.B, stats.yy, mask=m, select="mask", refit=opts.refit, damp=opts.damp,
        block=opts.block, name=name, diagnostics=opts.diagnostics,
    )  # fmt: skip


def _prefetch_ends(events: Sequence[tuple[int, int, int]], sites: Sequence[object]) -> list[int]:
    """For each event (one consuming node, see :func:`layerwise_prune`), the last event of the run of
    consumers that can be read in the same segment with it: it starts a run when it is not its
    weight's last consumer (a shared weight: an unrolled RNN's time steps), and the run goes on
    through the following consumers up to and including the next last consumer (where a weight is
    solved and the pruned model changes) or the event before a recurrent node.  Events inside a run
    and events that start none map to themselves."""
    from .rnnlayers import RecurrentSite

    def last(e: tuple[int, int, int]) -> bool:
        site = sites[e[1]]
        return isinstance(site, RecurrentSite) or e[2] == len(_consumers(site)) - 1  # type: ignore[arg-type]

    ends = list(range(len(events)))
    e = 0
    while e < len(events):
        m = e
        if not last(events[e]):
            while m + 1 < len(events) and not isinstance(sites[events[m + 1][1]], RecurrentSite):
                m += 1
                if last(events[m]):
                    break
        ends[e] = m
        e = m + 1
    return ends


def _consumers(site: LayerSite) -> tuple[LayerSite, ...]:
    return site.consumers or (site,)


def _dense_call(site: LayerSite) -> tuple[int, tuple[str, ...]]:
    """The dense runner's ``advance`` for one consuming node's targets: past the node, keeping its
    output, or (an opaque offset) up to it, where its input is."""
    return (site.position, ()) if site.opaque_offset else (site.position + 1, (site.output,))


def _dense_prefetch_call(consumers: Sequence[LayerSite]) -> tuple[int, tuple[str, ...]]:
    """The dense runner's ``advance`` that serves all of ``consumers`` in one segment."""
    last = consumers[-1]
    kept = tuple(c.input if c.opaque_offset else c.output for c in consumers)
    return (last.position if last.opaque_offset else last.position + 1), kept


def _dense_calls(
    events: Sequence[tuple[int, int, int]], sites: Sequence[object], run_ends: Sequence[int], n: int
) -> list[tuple[int, tuple[str, ...]]]:
    """The dense runner's ``advance`` calls that :func:`layerwise_prune` makes at event ``n``, in
    order (for :class:`~chita_onnx.activations.AheadRunner` to run them before they are made);
    ``run_ends`` is :func:`_prefetch_ends` of ``events``."""
    from .rnnlayers import RecurrentSite, recurrent_dense_calls

    site = sites[events[n][1]]
    if isinstance(site, RecurrentSite):
        return recurrent_dense_calls(site)
    calls = []
    if run_ends[n] > n:
        calls.append(_dense_prefetch_call([_consumers(sites[k])[jj] for _, k, jj in events[n : run_ends[n] + 1]]))  # type: ignore[arg-type]
    calls.append(_dense_call(_consumers(site)[events[n][2]]))  # type: ignore[arg-type]
    return calls


def _prefetch(consumers: Sequence[LayerSite], pruned: SegmentRunner, dense: SegmentRunner | AheadRunner | None) -> None:
    """Run both runners up to the last of ``consumers`` (each a consuming node, in graph order; the
    pruned runner stands at the first) in one segment each, keeping every tensor that
    :func:`_add_consumer` reads for them: their inputs in the pruned model, and their dense outputs
    (or inputs, with an opaque offset).  One onnxruntime session per runner instead of one per node;
    the later :func:`_add_consumer` calls then find their tensors kept."""
    pruned.advance(consumers[-1].position, extra=[c.input for c in consumers])
    if dense is not None:
        dense.advance(*_dense_prefetch_call(consumers))


@dataclass
class _Open:
    """A weight whose consumers are being visited: its statistics so far."""

    site: LayerSite
    rows: NDArray[np.float64]  # W̄ as (g, M_g, d)
    stats: LayerStats
    seen: int = 0
    split: _HeadSplit | None = None


def layerwise_prune(
    model: onnx.ModelProto,
    batches: Sequence[Arrays],
    *,
    keep: Mapping[str, int] | None = None,
    masks: Mapping[str, NDArray[np.bool_]] | None = None,
    opts: LayerwiseOptions | None = None,
    row_fisher: Mapping[str, NDArray[np.floating]] | None = None,
    fixed: Mapping[str, NDArray[np.floating]] | None = None,
    tail: tuple[Sequence[str], Sequence[str]] = ((), ()),
) -> PassResult:
    """Prune the tensors in ``keep`` (exact counts) or re-fit them on ``masks`` (True = kept), layer
    by layer in graph order.  ``model`` is a :func:`~chita_onnx.activations.working_copy`; it is not
    modified.  Returns the new weights (ONNX shapes, float32) and a report per tensor.

    ``row_fisher`` (optional, per tensor in its ONNX shape): the diagonal of the Fisher of the
    model's loss in those weights.  A layer then weighs each output row ``i`` by its output
    sensitivity ``ρ_i`` (:func:`~chita_onnx.solver.layerwise.output_row_weights`) when it selects
    which weights to remove.

    A weight used by several nodes (:attr:`~chita_onnx.activations.LayerSite.consumers`: the time
    steps of an unrolled RNN) is fitted once, after its last consumer, on the input rows of all of
    them stacked (one joint Gram and cross term); the pruned runner then goes back to the first of
    those consumers and re-runs the nodes since then with the new weights, so that the layers after
    them see the pruned recurrence.

    ``fixed`` (optional, per tensor in its ONNX shape): weights outside ``keep``/``masks`` that hold
    these values in the pruned model from the start (already pruned, not re-fitted); the dense
    targets still come from ``model`` as it is.

    ``tail`` (optional): tensors of the dense model and of the pruned one to run the two on to the
    end for, after the last layer, and return (:attr:`PassResult.tail`; the softmax head's
    probabilities and logits, for the class offsets); only the nodes after the last layer run again.
    """
    opts = opts or LayerwiseOptions()
    if not opts.diagnostics and log.isEnabledFor(logging.DEBUG):  # the debug lines report them
        opts = replace(opts, diagnostics=True)
    names = list(keep if keep is not None else masks or {})
    from .rnnlayers import RecurrentSite, layer_sites, prune_recurrent

    model, sites = layer_sites(model, names)  # LSTM/GRU/RNN weights: chita_onnx.rnnlayers
    t0 = time.perf_counter()
    kw = {"threads": opts.threads, "max_bytes": opts.max_bytes, "spill_dir": opts.spill_dir}
    start = write_weights(model, fixed, storage="dense")[0] if fixed else model
    pruned = SegmentRunner(start, batches, **kw)  # type: ignore[arg-type]
    dense: SegmentRunner | AheadRunner | None = None
    if opts.dense_targets:
        dense = SegmentRunner(model, batches, **kw)  # type: ignore[arg-type]
        if opts.ahead:  # the dense model's segments run one event ahead, on a second core
            dense = AheadRunner(dense)
    weights: dict[str, NDArray[np.float32]] = {}
    head_choice: dict[str, float | int | str] = {}
    reports: list[LayerReport] = []
    t_stats = t_solve = 0.0
    # one event per consuming node, in graph order; a weight is solved at its last consumer
    events: list[tuple[int, int, int]] = []
    for i, s in enumerate(sites):
        if isinstance(s, RecurrentSite):
            events.append((s.position, i, 0))
        else:
            events.extend((c.position, i, j) for j, c in enumerate(_consumers(s)))
    events.sort()
    run_ends = _prefetch_ends(events, sites)
    open_: dict[int, _Open] = {}
    rewind: tuple[int, dict[str, list[NDArray[np.generic]]]] | None = None  # before the first open shared weight
    stack = contextlib.ExitStack()
    if isinstance(dense, AheadRunner):
        stack.enter_context(leave_a_core())
    idle = dense.idle if isinstance(dense, AheadRunner) else None  # its worker has the second core first
    stack.enter_context(helping(opts.helper and blas_threads() == 1, idle))
    try:
        for n_event, (pos, i, j) in enumerate(progress(events, total=len(events), desc="layer-wise", unit="layer")):
            site = sites[i]
            if isinstance(dense, AheadRunner):  # this event's and (memory allowing) the next one's segments
                for n in (n_event,) if dense.spilling else (n_event, n_event + 1):
                    if n < len(events):
                        for call in _dense_calls(events, sites, run_ends, n):
                            dense.submit(*call)
                    elif tail[0] and tail[1]:
                        dense.submit(len(dense.nodes), tail[0])
            pruned.advance(pos)
            if isinstance(site, RecurrentSite):
                new, rep, ts_, tv_ = prune_recurrent(site, pruned, dense, opts, keep=keep, masks=masks, layer_index=i)
                weights.update(new)
                reports.append(rep)
                t_stats, t_solve = t_stats + ts_, t_solve + tv_
                continue
            consumers = _consumers(site)
            ts = time.perf_counter()
            if i not in open_:
                if len(consumers) > 1 and rewind is None:
                    rewind = pruned.snapshot()
                W0 = np.asarray(pruned.initializer(site.weight), dtype=np.float64)
                stats0 = LayerStats.empty(
                    site.geometry, cross=dense is not None, rowspace=True, rows_only=site.weight in opts.rows_only
                )
                split = None
                if site.weight == opts.class_head and site.geometry.groups == 1 and dense is not None:
                    stats0.class_offset = np.asarray(opts.class_offset, np.float64)
                    if opts.class_choose and keep is not None:
                        fit0 = LayerStats.empty(
                            site.geometry, cross=True, rowspace=True, rows_only=site.weight in opts.rows_only
                        )
                        fit0.class_offset = stats0.class_offset
                        split = _HeadSplit(fit0)
                open_[i] = _Open(site, weight_rows(W0, site.geometry), stats0, split=split)
            cur = open_[i]
            Wr = cur.rows
            if run_ends[n_event] > n_event:
                run = events[n_event : run_ends[n_event] + 1]
                tp = time.perf_counter()
                _prefetch([_consumers(sites[k])[jj] for _, k, jj in run], pruned, dense)  # type: ignore[arg-type]
                ts += time.perf_counter() - tp  # forward time (the runners count it), not statistics
            seed = opts.seed * 1_000_003 + i + 7_919 * j
            _add_consumer(cur.stats, consumers[j], pruned, dense, Wr, opts, seed, share=len(consumers), split=cur.split)
            cur.seen += 1
            t_stats += time.perf_counter() - ts
            if cur.seen < len(consumers):
                continue
            del open_[i]
            stats = cur.stats
            geom = site.geometry
            if keep is not None:
                fraction = int(keep[site.weight]) / max(1, Wr.size)
            else:
                assert masks is not None
                fraction = float(np.count_nonzero(masks[site.weight])) / max(1, Wr.size)
            _finish(stats, geom, Wr, fraction, opts)
            ts = time.perf_counter()
            if cur.split is not None and keep is not None and stats.class_energy is not None:
                head_choice = _choose_head(site.weight, Wr, stats, cur.split, geom, keep, row_fisher, opts)
            sol = _solve_layer(site.weight, Wr, stats, geom, keep, masks, row_fisher, opts)
            t_solve += time.perf_counter() - ts
            W = rows_to_weight(sol.W, geom).astype(np.float32)
            W[rows_to_weight(sol.mask.astype(np.float64), geom) == 0] = 0.0
            weights[site.weight] = W
            pruned.set_initializer(site.weight, W)
            if rewind is not None and not any(len(o.site.consumers) > 1 for o in open_.values()):
                pruned.restore(rewind)  # re-run the recurrence with the pruned shared weights
                rewind = None
            if stats.yy is not None:
                energy = float(np.sum(stats.yy))
            elif stats.X is not None:
                energy = float(np.sum((Wr[0] @ stats.X.T.astype(np.float64)) ** 2))
            else:
                energy = float(np.einsum("gij,gjk,gik->", Wr, stats.H, Wr))
            reports.append(
                LayerReport(
                    site.weight, int(W.size), int(np.count_nonzero(W)), stats.rows - stats.dropped, sol.error,
                    sol.masked_error, sol.dense_error, energy, sol.damp, time.perf_counter() - ts,
                )
            )  # fmt: skip
            log.debug(
                "%s: kept %d/%d, rows %d, relative error %.4g (masked %.4g)",
                site.weight, int(np.count_nonzero(W)), W.size, stats.rows - stats.dropped,
                sol.error / energy if energy else 0.0, sol.masked_error / energy if energy else 0.0,
            )  # fmt: skip
        tails = None
        if tail[0] and tail[1] and dense is not None:
            try:
                dense.advance(len(dense.nodes), extra=tail[0])
                pruned.advance(len(pruned.nodes), extra=tail[1])
                tails = ({n: list(dense.values(n)) for n in tail[0]}, {n: list(pruned.values(n)) for n in tail[1]})
            except MemoryError:
                raise
            except Exception as exc:  # optional: e.g. produced before the last layer and not kept
                log.debug("no tail tensors from the pass: %s", exc)
    except BaseException:
        pruned.close()
        if isinstance(dense, AheadRunner):
            dense.close(abandon=True)
        elif dense is not None:
            dense.close()
        raise
    finally:
        stack.close()
    total = time.perf_counter() - t0
    fwd = pruned.seconds + (dense.seconds if dense is not None else 0.0)
    pruned.close()
    if dense is not None:
        dense.close()
    seconds = {"forward": fwd, "statistics": t_stats, "solve": t_solve, "total": total}
    return PassResult(weights, reports, seconds, tails, head_choice)


# ------------------------------------------------------------------------------ statistics correction


def _channel_mean(values: Sequence[NDArray[np.generic]], axis: int) -> tuple[NDArray[np.float64], int]:
    """Per-channel sum over every other axis and the count, summed over batches."""
    total: NDArray[np.float64] | None = None
    count = 0
    for v in values:
        a = np.asarray(v, np.float64)
        ax = axis % a.ndim
        s = a.sum(axis=tuple(i for i in range(a.ndim) if i != ax))
        total = s if total is None else total + s
        count += a.size // a.shape[ax]
    assert total is not None
    return total, count


def ensure_biases(model: onnx.ModelProto, weights: Sequence[str]) -> tuple[onnx.ModelProto, dict[str, str]]:
    """A copy of ``model`` in which every layer of ``weights`` adds a constant per-channel bias that
    can be corrected: Conv gets a zero ``B`` input, Gemm a zero ``C``, and MatMul a following
    ``Add`` of a zero vector unless its only consumer already adds a constant of shape ``[N]``.
    The outputs are unchanged.  Returns the copy and ``{weight: bias initializer}``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    weight_tensors = {**{n: t for n, (_, t) in _constant_values(g).items()}, **inits}
    fresh = fresh_namer(
        {t.name for t in g.initializer} | {o for n in g.node for o in n.output} | {i.name for i in g.input}
    )

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def uses(name: str) -> int:
        return len(consumers.get(name, []))

    graph_outputs = {o.name for o in g.output}
    out: dict[str, str] = {}
    new_nodes: list[onnx.NodeProto] = []
    from .rnnlayers import linear_weights

    sites = {s.weight: s for s in find_layers(m, linear_weights(m, weights))}  # LSTM/GRU/RNN biases: not here
    at = {s.position: s for s in sites.values()}
    for pos, original in enumerate(g.node):
        node = onnx.NodeProto()
        node.CopyFrom(original)
        new_nodes.append(node)
        site = at.get(pos)
        if site is None:
            continue
        w = weight_tensors[site.weight]
        dtype = helper.tensor_dtype_to_np_dtype(w.data_type)
        geom = site.geometry
        channels = geom.outputs_per_group * geom.groups
        if (
            site.bias is not None
            and tuple(inits[site.bias].dims) in ((channels,), (1, channels))
            and uses(site.bias) == 1
        ):
            out[site.weight] = site.bias
            continue
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            if len(node.input) >= 3 and node.input[2]:
                log.info("%s: its bias is not a per-channel initializer; no bias correction", site.weight)
                continue
            name = fresh(f"{site.weight}_bias")
            g.initializer.append(numpy_helper.from_array(np.zeros(channels, dtype), name))
            if len(node.input) >= 3:
                node.input[2] = name
            else:
                node.input.append(name)
            if node.op_type == "Gemm":  # beta had no effect without C; make it 1 for the new bias
                keep_attrs = [a for a in node.attribute if a.name != "beta"]
                del node.attribute[:]
                node.attribute.extend(keep_attrs)
            out[site.weight] = name
            continue
        if node.op_type == "MatMul":
            z = node.output[0]
            users = consumers.get(z, [])
            bshape = (channels,) if geom.kind == "matmul_right" else (channels, 1)
            if len(users) == 1 and z not in graph_outputs and users[0].op_type == "Add":
                other = [i for i in users[0].input if i != z]
                if (
                    len(other) == 1
                    and other[0] in inits
                    and tuple(inits[other[0]].dims) == bshape
                    and uses(other[0]) == 1
                ):
                    out[site.weight] = other[0]
                    continue
            name = fresh(f"{site.weight}_bias")
            g.initializer.append(numpy_helper.from_array(np.zeros(bshape, dtype), name))
            mid = fresh(f"{z}_unbiased")
            node.output[0] = mid
            new_nodes.append(helper.make_node("Add", [mid, name], [z], name=fresh(f"{site.node}_bias_add")))
            out[site.weight] = name
            continue
        log.info("%s: no per-channel bias to correct", site.weight)
    del g.node[:]
    g.node.extend(new_nodes)
    return m, out


def _producer_positions(model: onnx.ModelProto) -> dict[str, int]:
    return {o: i for i, n in enumerate(model.graph.node) for o in n.output if o}


def _consumer_of_bias(model: onnx.ModelProto, bias: str) -> tuple[int, str]:
    """The node that adds ``bias`` and its output tensor."""
    for i, n in enumerate(model.graph.node):
        if bias in n.input:
            return i, n.output[0]
    raise KeyError(bias)


def bias_correction(
    dense_model: onnx.ModelProto,
    pruned_model: onnx.ModelProto,
    weights: Sequence[str],
    batches: Sequence[Arrays],
    *,
    threads: int = 1,
    max_bytes: int | None = None,
    spill_dir: str | None = None,
) -> tuple[onnx.ModelProto, dict[str, float]]:
    """Restore each output channel's mean, layer by layer: ``bias += mean(dense out) − mean(pruned out)``.

    Both models are working copies with the same graph (the pruned one has different weights).  The
    result has a bias per corrected layer (see :func:`ensure_biases`).  Returns the corrected model
    and the relative size of each correction (‖Δb‖ / ‖output mean‖).
    """
    dm, bias_d = ensure_biases(dense_model, weights)
    pm, bias_p = ensure_biases(pruned_model, weights)
    dense = SegmentRunner(dm, batches, threads=threads, max_bytes=max_bytes, spill_dir=spill_dir)
    pruned = SegmentRunner(pm, batches, threads=threads, max_bytes=max_bytes, spill_dir=spill_dir)
    from .rnnlayers import linear_weights

    sites = {s.weight: s for s in find_layers(pm, linear_weights(pm, weights))}
    order = sorted(bias_p, key=lambda w: _consumer_of_bias(pm, bias_p[w])[0])
    moved: dict[str, float] = {}
    for w in order:
        pos, out = _consumer_of_bias(pm, bias_p[w])
        dense.advance(pos + 1, extra=[out])
        pruned.advance(pos + 1, extra=[out])
        axis = sites[w].channel_axis
        sd, c = _channel_mean(dense.values(out), axis)
        sp, _ = _channel_mean(pruned.values(out), axis)
        delta = (sd - sp) / max(c, 1)
        b = pruned.initializer(bias_p[w]).astype(np.float64)
        pruned.set_initializer(bias_p[w], (b + delta.reshape(b.shape)).astype(np.float32))
        vals = pruned.values(out)
        for k, v in enumerate(vals):
            shape = [1] * v.ndim
            shape[axis % v.ndim] = -1
            vals[k] = (np.asarray(v) + delta.reshape(shape).astype(v.dtype)).astype(v.dtype)
        ref = float(np.linalg.norm(sd / max(c, 1)))
        moved[w] = float(np.linalg.norm(delta)) / ref if ref > 0 else 0.0
    del bias_d
    dense.close()
    out = pruned.current_model()
    pruned.close()
    return out, moved


def batchnorm_nodes(model: onnx.ModelProto) -> list[int]:
    """Positions of the BatchNormalization nodes whose statistics are initializers."""
    inits = {t.name for t in model.graph.initializer}
    return [
        i
        for i, n in enumerate(model.graph.node)
        if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx") and len(n.input) >= 5
        and n.input[3] in inits and n.input[4] in inits
    ]  # fmt: skip


def recalibrate_batchnorm(
    pruned_model: onnx.ModelProto,
    batches: Sequence[Arrays],
    *,
    threads: int = 1,
    max_bytes: int | None = None,
    spill_dir: str | None = None,
) -> tuple[onnx.ModelProto, dict[str, float]]:
    """Re-estimate every BatchNormalization's running mean and variance from the calibration batches,
    BN by BN in graph order (each with the upstream BNs already re-estimated).  Returns the model and,
    per BN node, the relative change of its mean."""
    runner = SegmentRunner(pruned_model, batches, threads=threads, max_bytes=max_bytes, spill_dir=spill_dir)
    changed: dict[str, float] = {}
    for pos in batchnorm_nodes(pruned_model):
        node = runner.nodes[pos]
        runner.advance(pos)
        xs = runner.values(node.input[0])
        s, c = _channel_mean(xs, 1)
        mean = s / max(c, 1)
        sq = 0.0
        for v in xs:
            a = np.asarray(v, np.float64)
            shape = [1] * a.ndim
            shape[1] = -1
            diff = a - mean.reshape(shape)
            sq = sq + (diff**2).sum(axis=tuple(i for i in range(a.ndim) if i != 1))
        var = np.asarray(sq) / max(c, 1)
        old = runner.initializer(node.input[3]).astype(np.float64)
        runner.set_initializer(node.input[3], mean.reshape(old.shape))
        runner.set_initializer(node.input[4], var.reshape(old.shape))
        denom = float(np.linalg.norm(old))
        changed[node.name or f"<BatchNormalization #{pos}>"] = (
            float(np.linalg.norm(mean - old.reshape(-1))) / denom if denom > 0 else 0.0
        )
    out = runner.current_model()
    runner.close()
    return out, changed


def run_outputs(
    model: onnx.ModelProto, batches: Sequence[Arrays], output: str, *, threads: int = 1
) -> NDArray[np.float64]:
    """One full forward pass; the named tensor (a graph output or any tensor it computes) concatenated
    over batches (float64)."""
    r = SegmentRunner(model, batches, threads=threads)
    r.advance(len(r.nodes), extra=[output])
    out = np.concatenate([np.asarray(v, np.float64) for v in r.values(output)])
    r.close()
    return out
