"""Wiring of the layer-wise method, the layer-wise update and the statistics correction into a run.

* :func:`allocate` — per-tensor keep counts that add up to exactly ``k``: ``uniform`` (the same
  sparsity everywhere), or one global threshold on a score that is comparable across tensors —
  ``magnitude`` (``|w|``), ``obd`` (the OBD saliency ``F_jj·w_j²`` with the diagonal of the empirical
  Fisher from the per-sample gradients), ``chita`` (the per-tensor counts of the global one-shot
  CHITA solution) — with a floor: every tensor keeps at least ``layer_floor·(1 − s)`` of its weights
  (and ``min_density``).
* :func:`prune_layerwise` / :func:`refit_layerwise` — ``--method layerwise`` (allocation, then
  SparseGPT-style selection and exact re-fit layer by layer) and ``--update layerwise`` (re-fit any
  method's mask layer by layer).
* :func:`correct_statistics` — BatchNorm re-estimation and bias correction, each ``on``, ``off`` or
  ``auto`` (chosen by the KL divergence to the dense outputs on calibration samples held out from
  everything else).

Called by :mod:`chita_onnx.pipeline` only.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper, numpy_helper

from . import runtime
from .activations import (
    OPEN_PROBE_SAMPLES,
    Arrays,
    LayerSite,
    SegmentRunner,
    calibration_batches,
    fixed_batch_size,
    inline_fixed_ifs,
    layerwise_batch_size,
    opened_alike,
    working_copy,
)
from .blas import physical_cores
from .config import CompressConfig
from .data import ArraySource, materialize, split_holdout, static_names
from .data_types import CalibrationSource
from .errors import ChitaError, ConfigError, ModelError
from .gradients.prepare import find_head, hand_written_softmax, scored_output, select_output
from .graph import _constant_values
from .heads import SoftmaxHead, add_class_offset, softmax_head
from .layerstats import rowspace_eligible
from .limits import gib
from .rnnlayers import split_layers
from .sequential import (
    LayerwiseOptions,
    PassResult,
    batchnorm_nodes,
    bias_correction,
    ensure_biases,
    layerwise_prune,
    recalibrate_batchnorm,
    rows_only_bytes,
    rows_only_limit,
    run_outputs,
)
from .solver import Budget, SolverResult, chita_iht, hard_threshold
from .solver.budgets import make_budget
from .solver.layerwise import GRAM_COPIES, WEIGHT_COPIES, solve_cost
from .solver.offsets import fit_class_offsets, kl_rows

if TYPE_CHECKING:
    from .pipeline import Prepared

log = logging.getLogger(__name__)

#: Fraction of the calibration samples held out to decide an ``auto`` statistics correction.
DECISION_FRACTION = 0.2


def options(config: CompressConfig) -> LayerwiseOptions:
    two_cores = physical_cores() > 1  # the dense runner and the solvers' helper each take the second
    return LayerwiseOptions(
        damp=config.damp,
        max_rows=int(config.max_rows),
        recurrent_refits=config.recurrent_refits,
        dense_targets=config.targets == "dense",
        refit=config.refit,
        select=config.select,
        seed=config.seed,
        max_bytes=None if config.max_memory is None else config.max_memory // 4,
        max_memory=config.max_memory,
        spill_dir=config.workdir,
        ahead=two_cores,
        helper=two_cores,
    )


def layer_model(prep: Prepared, batches: Sequence[Arrays]) -> onnx.ModelProto:
    """The model the layer-wise passes run: the runtime working copy with the ``If`` nodes that the
    calibration data decide replaced by their taken branches (:func:`inline_fixed_ifs`)."""
    return inline_fixed_ifs(working_copy(prep.model), batches)


def layer_data(prep: Prepared, config: CompressConfig) -> tuple[onnx.ModelProto, list[Arrays], LayerwiseOptions]:
    """The working copy, the calibration batches and the options that the layer-wise passes run:
    :func:`batches_of` and :func:`options`, or, for a model that fixes its batch to one sample but
    computes every sample on its own, a copy with the batch opened and batches of several samples
    (:func:`open_fixed_batch`): one onnxruntime run per segment and batch instead of per sample,
    with each sample's rows sampled as over batches of one
    (:attr:`~chita_onnx.sequential.LayerwiseOptions.sample_groups`)."""
    opened = open_fixed_batch(prep, config)
    if opened is None:
        return working_copy(prep.model), batches_of(prep, config), options(config)
    size = layerwise_batch_size(prep.model, prep.specs, prep.calib, config.batch_size)
    batches = calibration_batches(prep.calib, prep.specs, config.num_samples, size, honour_fixed=False)
    spec = next(s for s in prep.specs if s.batch_axis is not None)
    groups = tuple(int(np.shape(b[spec.name])[spec.batch_axis or 0]) for b in batches)
    return opened, batches, replace(options(config), sample_groups=groups)


def open_fixed_batch(prep: Prepared, config: CompressConfig) -> onnx.ModelProto | None:
    """The working copy with its fixed batch opened (:func:`~chita_onnx.activations.open_batch`),
    when it computes every probe sample as the original does
    (:func:`~chita_onnx.activations.opened_alike`: :data:`OPEN_PROBE_SAMPLES` samples for a batch of
    one, ``b`` for a batch of ``b``); else None.

    Exports for phones (TFLite through tf2onnx, paddle2onnx, a traced ``batch=1``) often fix the
    batch to one sample in the input shape and in the ``Reshape`` shapes that flatten a sample
    (``[1, -1]``), which the copy opens too; a trace without dynamic axes fixes it to the example's
    batch.  A graph that bakes the batch in otherwise keeps its fixed batches."""
    size = fixed_batch_size(prep.specs)
    if size is None or config.batch_size < 2 or config.num_samples < 2:
        return None
    probe = OPEN_PROBE_SAMPLES if size == 1 else size
    try:
        alone = calibration_batches(prep.calib, prep.specs, probe, 1, honour_fixed=False)
        together = calibration_batches(prep.calib, prep.specs, len(alone), len(alone), honour_fixed=False)[0]
    except ChitaError as exc:
        log.debug("the fixed batch of %d stays: %s", size, exc)
        return None
    opened = opened_alike(working_copy(prep.model), prep.specs, alone, together)
    if opened is not None:
        log.info(
            "the model fixes its batch to %d sample(s) but computes each alone: layer-wise batches of any size", size
        )
    return opened


def batches_of(prep: Prepared, config: CompressConfig, source: ArraySource | None = None) -> list[Arrays]:
    """The calibration batches of the layer-wise passes (of ``source``, all its samples, when given),
    sized so that one batch's activations stay within
    :data:`~chita_onnx.activations.BATCH_ACTIVATION_BYTES` (see :func:`layerwise_batch_size`), and of
    one sample when the model only runs one at a time (:func:`one_sample_at_a_time`)."""
    data = prep.calib if source is None else source
    size = layerwise_batch_size(prep.model, prep.specs, data, config.batch_size)
    if size > 1 and one_sample_at_a_time(prep, data):
        size = 1
    n = config.num_samples if source is None else source.num_samples
    return calibration_batches(data, prep.specs, n, size)


def one_sample_at_a_time(prep: Prepared, data: CalibrationSource) -> bool:
    """Whether onnxruntime refuses two samples at once where it runs one: a static input pins the
    batch (AECMOS's GRU state ``h0 [4, 1, 64]`` next to an input of dynamic batch; the evaluation
    then falls back to one sample at a time, and so must the layer-wise passes, whose GRU otherwise
    failed on a batch of 26).  Only models with a static input and no fixed batch are probed."""
    if not static_names(prep.specs) or fixed_batch_size(prep.specs) is not None:
        return False
    try:
        pair, one = calibration_batches(data, prep.specs, 2, 2), calibration_batches(data, prep.specs, 1, 1)
    except ModelError:  # fewer than two samples
        return False
    batched = [s for s in prep.specs if s.batch_axis is not None]
    if not batched or np.shape(pair[0][batched[0].name])[batched[0].batch_axis or 0] < 2:
        return False
    what = "the model on two calibration samples (does it run several at once?)"
    sess = runtime.session(working_copy(prep.model), what=what, threads=1, check=False)
    try:
        runtime.run(sess, None, pair[0], what=what)
        return False
    except ModelError as exc:
        refusal = str(exc)
    try:
        runtime.run(sess, None, one[0], what="the model on one calibration sample")
    except ModelError:
        return False  # it fails either way: the passes report that themselves
    log.info("onnxruntime runs one sample at a time but not two (%s): layer-wise batches of 1", refusal)
    return True


# ---------------------------------------------------------------------------------------- allocation


def floor_budget(sizes: Sequence[int], config: CompressConfig, sparsity: float) -> Budget:
    """The global budget with every tensor's floor ``max(min_density, layer_floor·(1 − s))``."""
    floor = max(config.min_density, config.layer_floor * (1.0 - sparsity))
    return make_budget(sizes, sparsity, scope="global", min_density=min(floor, 1.0 - sparsity))


def allocate(
    prep: Prepared,
    config: CompressConfig,
    w_bar: NDArray[np.float32],
    sparsity: float,
    gradients: Callable[[int | None], NDArray[np.float32] | None],
    diagonal: Callable[[int], NDArray[np.floating] | None] | None = None,
) -> tuple[dict[str, int], str, NDArray[np.float64] | None]:
    """Per-tensor keep counts (exactly ``k`` in total) and the allocation actually used.

    ``gradients(rows)`` returns the scaled per-sample gradient matrix ``X (rows, p)`` at ``w̄`` (or
    None when it cannot be held); it is called by the ``chita`` allocation (on all the samples).
    ``diagonal(rows)`` returns ``diag(XᵀX)`` ``(p,)`` of that matrix on ``rows`` samples without
    necessarily holding it; the ``obd`` allocation calls it (or, when it is not given, sums the
    squares of ``gradients(rows)``) on ``allocation_samples`` samples: the Fisher diagonal of a
    whole tensor needs far fewer than the solvers.  The third value is that Fisher diagonal
    ``(p,)`` (``obd`` only, else None): the layer-wise pass weighs output rows with it.
    """
    layout = prep.layout
    sizes = [s.size for s in layout.slots]
    how = "uniform" if config.scope == "layer" else config.allocation
    fisher: NDArray[np.float64] | None = None
    if how == "uniform":
        budget = make_budget(sizes, sparsity, scope="layer")
        return {s.name: int(c) for s, c in zip(layout.slots, budget.lower, strict=True)}, how, None
    budget = floor_budget(sizes, config, sparsity)
    score: NDArray[np.floating] = np.abs(w_bar)
    if how == "obd":
        rows = config.allocation_samples or None
        if diagonal is not None and rows is not None:
            got = diagonal(rows)
            fisher = None if got is None else np.asarray(got, np.float64)
        else:
            X = gradients(rows)
            fisher = None if X is None else np.einsum("ij,ij->j", X, X, dtype=np.float64)
        if fisher is None:
            log.warning("allocation obd needs per-sample gradients, which are not available: using magnitude")
            how = "magnitude"
        else:
            score = np.asarray(fisher, np.float64) * np.asarray(w_bar, np.float64) ** 2
            if not np.any(score > 0):
                log.warning("the Fisher diagonal is zero: allocating by magnitude")
                score, how, fisher = np.abs(w_bar), "magnitude", None
    elif how == "chita":
        X = gradients(None)
        if X is None:
            log.warning("allocation chita needs the gradient matrix, which does not fit: using magnitude")
            how = "magnitude"
        else:
            res = chita_iht(X, w_bar, budget, config.ridge, None, max_iter=config.max_iter, start=config.rank)
            chosen = np.zeros(layout.p, dtype=bool)
            chosen[res.support] = True
            return {s.name: int(chosen[s.offset : s.stop].sum()) for s in layout.slots}, how, None
    support = hard_threshold(score, budget)
    chosen = np.zeros(layout.p, dtype=bool)
    chosen[support] = True
    return {s.name: int(chosen[s.offset : s.stop].sum()) for s in layout.slots}, how, fisher


# ------------------------------------------------------------------------------------ the two modes


def _flat(prep: Prepared, res: PassResult, w: NDArray[np.float32]) -> NDArray[np.float32]:
    out = np.array(w, dtype=np.float32, copy=True)
    for s in prep.layout.slots:
        if s.name in res.weights:
            out[s.offset : s.stop] = res.weights[s.name].reshape(-1)
    return out


def _info(res: PassResult) -> dict[str, float | int | str]:
    err = sum(r.error for r in res.layers)
    energy = sum(r.energy for r in res.layers)
    worst = max((r.error / r.energy for r in res.layers if r.energy > 0), default=0.0)
    return {
        "layer_error": float(err / energy) if energy > 0 else 0.0,
        "worst_layer_error": float(worst),
        "layer_forward_s": res.seconds.get("forward", 0.0),
        "layer_statistics_s": res.seconds.get("statistics", 0.0),
        "layer_solve_s": res.seconds.get("solve", 0.0),
    }


def use_row_weights(config: CompressConfig, head_kind: str | None) -> bool:
    """Whether the layers weigh their output rows by the allocation's Fisher diagonal:
    ``--row-weights fisher``/``off``, or with ``auto`` unless the head is a sigmoid (``binary``):
    on softmax distributions (``logits``, ``probabilities``) and on the Gauss-Newton of the output
    error (``regression``, which is also what raw logits without labels get), whose Fisher does not
    vanish on outputs the data leave near zero (BENCHMARKS.md, "Output-row weights" and
    "Stop 27: output-row weights on regression heads")."""
    if config.row_weights != "auto":
        return config.row_weights == "fisher"
    on = head_kind in ("logits", "probabilities", "regression")
    log.info("output-row weights %s (the output is %s)", "on" if on else "off", head_kind or "unknown")
    return on


def layer_bytes(site: LayerSite) -> int:
    """Estimated peak bytes of one layer's solve in the layer-wise pass."""
    g = site.geometry
    d, size = g.d, int(np.prod(g.weight_shape))
    return 8 * (GRAM_COPIES * g.groups * d * d + WEIGHT_COPIES * size)


def too_wide(sites: Sequence[object], max_memory: int) -> tuple[dict[str, str], frozenset[str]]:
    """``({weight: why}, rows_only)`` for the layers whose solve would not fit in ``max_memory`` bytes
    (VGG's 25088-wide fc6: a 5 GB Gram, several times over).  One that a row-space solve from at most
    :data:`~chita_onnx.sequential.ROWS_ONLY_MAX` of its input rows fits
    (:func:`~chita_onnx.sequential.rows_only_bytes`; one group of at least 1,024 inputs) is solved
    that way and listed in ``rows_only``; the others are pruned by their allocation alone, like the
    weights the pass cannot handle, instead of exhausting the machine's memory."""
    out: dict[str, str] = {}
    rows: set[str] = set()
    for site in sites:
        if isinstance(site, LayerSite) and layer_bytes(site) > max_memory:
            g = site.geometry
            if rowspace_eligible(g) and rows_only_bytes(g, WEIGHT_COPIES) <= max_memory:
                rows.add(site.weight)
                log.info(
                    "%s: its Gram (%s) would not fit in --max-memory %s; solved from at most %d of its input rows",
                    site.weight, gib(layer_bytes(site)), gib(max_memory), rows_only_limit(g),
                )  # fmt: skip
                continue
            out[site.weight] = (
                f"its input rows are {g.d:,} wide: its solve needs about {gib(layer_bytes(site))}, "
                f"over --max-memory {gib(max_memory)}"
            )
    return out, frozenset(rows)


def class_head(
    model: onnx.ModelProto, sites: Sequence[object], output: str | None, kind: str | None = None
) -> tuple[str, NDArray[np.float64], int] | None:
    """The layer whose outputs are the classes of the model's softmax (``find_head``: a ``Softmax``,
    a hand-written one, or the scores a label output reads), directly or through an ``Add`` of a
    constant bias, with the softmax over its output channels; and the per-class offset ``(M,)`` from
    the layer's dense output rows (the node's own bias left out, as the pass's targets are) to the
    logits, and the softmax's axis as written (where the graph does not declare the logits' rank,
    the pass checks it on the values).  An output with no softmax in the graph counts as the logits
    of a softmax over its last axis when the gradients read it so (``kind == "logits"``: a
    classifier's raw scores with labels).  None when there is no such layer (a sigmoid, a
    regression, a shared or grouped weight, a softmax over another axis)."""
    try:
        head = find_head(model, select_output(model, output))
    except ChitaError:
        return None
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    if head.kind is None:
        found = hand_written_softmax(g, producer, producer.get(head.tensor), broadcasts=True)
        if found is None and kind == "logits":
            found = (head.tensor, -1)
        if found is None:
            return None
        head = replace(head, kind="logits", tensor=found[0], class_axis=found[1])
    if head.kind != "logits" or head.class_axis is None:
        return None
    tensor = head.tensor
    while (ident := producer.get(tensor)) is not None and ident.op_type == "Identity":  # paddle2onnx writes one
        tensor = ident.input[0]
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    consts = {t.name: t for t in g.initializer}
    consts.update({name: t for name, (_, t) in _constant_values(g).items()})
    by_output = {s.output: s for s in sites if isinstance(s, LayerSite) and not s.consumers}
    site, extra = by_output.get(tensor), None
    node = producer.get(tensor)
    if site is None and node is not None and node.op_type == "Add" and node.domain in ("", "ai.onnx"):
        for a, b in (tuple(node.input), tuple(reversed(node.input))):
            if a in by_output and b in consts and readers.get(a, 0) == 1:
                site, extra = by_output[a], numpy_helper.to_array(consts[b])
                break
    if site is None or site.geometry.groups != 1 or site.shared:
        return None
    geom = site.geometry
    M = geom.outputs_per_group
    axis = head.class_axis
    if geom.kind == "conv":
        if axis != 1:
            return None
    elif geom.kind in ("gemm", "matmul_right"):
        rank = 2 if geom.kind == "gemm" else _rank(model, tensor)
        if axis >= 0 and rank is not None and rank != axis + 1:
            return None
    else:
        return None
    offset = np.zeros(M)
    if site.offset is not None and site.offset in consts:
        c = numpy_helper.to_array(consts[site.offset]).astype(np.float64).reshape(-1) * site.offset_scale
        if c.size not in (1, M):
            return None
        offset = offset + c
    if extra is not None:
        e = np.asarray(extra, np.float64)
        if e.size not in (1, M) or (e.size == M and e.ndim and e.shape[-1 if geom.kind != "conv" else 0] != M):
            return None
        offset = offset + e.reshape(-1)
    return site.weight, offset, axis


def trial_affordable(sites: Sequence[object], head: str) -> bool:
    """Whether ``--head-select auto``'s two trial fits of the softmax layer ``head`` cost at most what
    the solves of the other layers cost (:func:`~chita_onnx.solver.layerwise.solve_cost` per group);
    where the head is most of the pass (a small model with a wide head), the layer's own selection is
    kept instead of tripling the pass."""
    cost = {
        s.weight: s.geometry.groups * solve_cost(s.geometry.outputs_per_group, s.geometry.d)
        for s in sites
        if isinstance(s, LayerSite)
    }
    return 2.0 * cost.get(head, 0.0) <= sum(c for n, c in cost.items() if n != head)


def _rank(model: onnx.ModelProto, tensor: str) -> int | None:
    """The declared or inferred rank of ``tensor``, or None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # an inconsistent graph: unknown
        return None
    g = inferred.graph
    for v in (*g.value_info, *g.output, *g.input):
        if v.name == tensor and v.type.tensor_type.HasField("shape"):
            return len(v.type.tensor_type.shape.dim)
    return None


def prune_layerwise(
    prep: Prepared,
    config: CompressConfig,
    w_bar: NDArray[np.float32],
    gradients: Callable[[int | None], NDArray[np.float32] | None],
    diagonal: Callable[[int], NDArray[np.floating] | None] | None = None,
    head_kind: Callable[[], str | None] | None = None,
    head_cache: HeadCache | None = None,
) -> SolverResult:
    """``--method layerwise``: allocate the budget (see :func:`allocate` for ``gradients`` and
    ``diagonal``), then select and re-fit layer by layer.  Weights the pass cannot reconstruct
    (:func:`~chita_onnx.rnnlayers.split_layers`) are pruned to their allocated counts first
    (:func:`prune_refused`), so that the layers after them are fitted on their pruned outputs.
    ``head_kind()``, asked after the allocation: what its gradients' loss was computed on (see
    :func:`use_row_weights`).  ``head_cache``, when given, gets the softmax head's tensors on the
    calibration samples (:class:`HeadCache`) if the statistics correction may fit class offsets."""
    t0 = time.perf_counter()
    keep, how, fisher = allocate(prep, config, w_bar, config.sparsity, gradients, diagonal)
    t_alloc = time.perf_counter() - t0
    base, batches, opts = layer_data(prep, config)
    rows = None
    if fisher is not None and use_row_weights(config, None if head_kind is None else head_kind()):
        rows = {s.name: fisher[s.offset : s.stop].reshape(s.shape) for s in prep.layout.slots}
    model = inline_fixed_ifs(base, batches)
    sites, refused = split_layers(model, prep.layout.names)
    assert config.max_memory is not None
    big, rows_only = too_wide(sites, config.max_memory)
    if rows_only:
        opts = replace(opts, rows_only=rows_only)
    if big:
        log.warning(
            "%d layer(s) too wide for the layer-wise solve are pruned by their allocation alone: %s",
            len(big),
            "; ".join(f"{n} ({why})" for n, why in big.items()),
        )
    if config.head_select != "layer":
        found = class_head(model, sites, config.output, None if head_kind is None else head_kind())
        auto = config.head_select == "auto"
        if found is not None and auto and not trial_affordable(sites, found[0]):
            log.info("%s: the softmax head's trial fits would cost more than the other layers' solves: "
                     "it is selected as they are", found[0])  # fmt: skip
        elif found is not None and found[0] not in big:
            if not auto:
                log.info("%s: the softmax head keeps the weights its classes use (--head-select classes)", found[0])
            offset = tuple(float(v) for v in found[1])
            opts = replace(opts, class_head=found[0], class_offset=offset, class_choose=auto, class_axis=found[2])
        elif not auto:
            log.warning("--head-select classes: no prunable layer computes the logits of a softmax; nothing changes")
    if refused and len(refused) == len(prep.layout.names):
        first = next(iter(refused.items()))
        raise ModelError(f"the layer-wise pass cannot handle any prunable weight: {first[0]} ({first[1]})")
    refused = {**refused, **big}
    salience = None if fisher is None else fisher * np.asarray(w_bar, np.float64) ** 2
    start, fixed = prune_refused(prep, w_bar, keep, refused, salience)
    handled = {n: c for n, c in keep.items() if n not in refused}
    if not handled:  # every layer too wide: the allocation alone
        info0: dict[str, float | int | str] = {"allocation": how, "allocation_s": t_alloc}
        info0["not_reconstructed"] = ", ".join(sorted(refused))
        return SolverResult(
            start, np.flatnonzero(start).astype(np.int64), float("nan"), (), 1, True, "layerwise", info0
        )
    head = None
    if head_cache is not None and config.class_offsets != "off" and opts.dense_targets:
        head = softmax_head(model, config.output)
    tail: tuple[tuple[str, ...], tuple[str, ...]] = ((), ()) if head is None else ((head.probs,), (head.logits,))
    res = layerwise_prune(model, batches, keep=handled, opts=opts, row_fisher=rows, fixed=fixed, tail=tail)
    w = _flat(prep, res, start)
    if head is not None and head_cache is not None and res.tail is not None:
        _fill(head_cache, head, res.tail, [_samples(b) for b in batches], w)
    support = np.flatnonzero(w).astype(np.int64)
    info: dict[str, float | int | str] = {**_info(res), "allocation": how, "allocation_s": t_alloc, **res.head_choice}
    if refused:
        info["not_reconstructed"] = ", ".join(sorted(refused))
    return SolverResult(w, support, float("nan"), (), 1, True, "layerwise", info)


def _fill(
    cache: HeadCache,
    head: SoftmaxHead,
    tail: tuple[Mapping[str, list[NDArray[np.generic]]], Mapping[str, list[NDArray[np.generic]]]],
    sizes: Sequence[int],
    w: NDArray[np.float32],
) -> None:
    """Put the pass's head tensors (``tail``: dense and pruned values per batch of ``sizes``) into
    ``cache``, one array per sample; nothing when they cannot be split by sample or hold more than
    :data:`OFFSET_MAX_ELEMENTS` logits (the offsets then sample rows as they run the models)."""
    probs = _per_sample(tail[0][head.probs], sizes, head)
    logits = _per_sample(tail[1][head.logits], sizes, head)
    if probs is None or logits is None or sum(int(a.size) for a in logits) > OFFSET_MAX_ELEMENTS:
        return
    cache.probs_name, cache.logits_name = head.probs, head.logits
    cache.probs, cache.logits, cache.w = probs, logits, np.array(w, np.float32)


def prune_refused(
    prep: Prepared,
    w_bar: NDArray[np.float32],
    keep: Mapping[str, int],
    refused: Mapping[str, str],
    saliency: NDArray[np.float64] | None,
) -> tuple[NDArray[np.float32], dict[str, NDArray[np.float32]]]:
    """The weights the layer-wise pass does not reconstruct (``refused``: name → why), each pruned to
    its allocated count ``keep[name]`` by the allocation's ``saliency (p,)`` (``F_jj·w_j²``; ``|w|``
    when None or zero on the tensor), with nothing re-fitted.  Returns ``w̄ (p,)`` with them pruned and
    the pruned tensors in their ONNX shapes (for :func:`~chita_onnx.sequential.layerwise_prune`'s
    ``fixed``, so that the layers downstream are fitted on their pruned outputs)."""
    out = np.array(w_bar, dtype=np.float32, copy=True)
    fixed: dict[str, NDArray[np.float32]] = {}
    for s in prep.layout.slots:
        if s.name not in refused:
            continue
        w = out[s.offset : s.stop]
        score, by = np.abs(w).astype(np.float64), "magnitude"
        if saliency is not None and np.any(saliency[s.offset : s.stop] > 0):
            score, by = np.asarray(saliency[s.offset : s.stop], np.float64), "OBD saliency"
        kept = np.argsort(-score, kind="stable")[: int(keep[s.name])]
        pruned = np.zeros_like(w)
        pruned[kept] = w[kept]
        out[s.offset : s.stop] = pruned
        fixed[s.name] = pruned.reshape(s.shape)
        log.warning(
            "%s is not reconstructed by the layer-wise pass (%s): pruned to its allocated %d of %d weights by %s, "
            "not re-fitted", s.name, refused[s.name], len(kept), s.size, by,
        )  # fmt: skip
    return out, fixed


def refit_layerwise(
    prep: Prepared, config: CompressConfig, w: NDArray[np.float32]
) -> tuple[NDArray[np.float32], dict[str, float | int | str]]:
    """``--update layerwise``: re-fit the kept weights of ``w`` layer by layer, from the dense ones."""
    layout = prep.layout
    dense, batches, opts = layer_data(prep, config)
    masks = {s.name: w[s.offset : s.stop].reshape(s.shape) != 0 for s in layout.slots}
    res = layerwise_prune(dense, batches, masks=masks, opts=opts)
    return _flat(prep, res, w), _info(res)


# ------------------------------------------------------------------------------ statistics correction


@dataclass(frozen=True)
class Correction:
    """What the statistics correction did: the chosen steps, the held-out scores of the candidates."""

    bn_recalibrate: str  # "on", "off" or "n/a" (no BatchNormalization with constant statistics)
    bias_correction: str  # "on" or "off"
    scores: dict[str, float] = field(default_factory=dict)
    decided_on: int = 0
    seconds: float = 0.0
    #: Why an ``auto`` correction was not tried (it failed on this model); empty otherwise.
    skipped: str = ""
    #: Per-class logit offsets of the softmax head: "on", "off" or "n/a" (no softmax head).
    class_offsets: str = "n/a"

    def short(self) -> str:
        """``none``, ``bn``, ``bias``, ``offsets`` or a ``+`` of them, marked ``auto:`` when chosen by
        measurement."""
        label = _label((self.bn_recalibrate, self.bias_correction))
        if self.class_offsets == "on":
            label = "offsets" if label == "none" else f"{label}+offsets"
        return f"auto:{label}" if self.scores else label

    def describe(self) -> str:
        parts = [f"BN re-estimation {self.bn_recalibrate}", f"bias correction {self.bias_correction}"]
        if self.class_offsets != "n/a":
            parts.append(f"class offsets {self.class_offsets}")
        if self.scores:
            s = ", ".join(f"{k} {v:.4g}" for k, v in self.scores.items())
            parts.append(f"(chosen by KL to dense on {self.decided_on} held-out calibration samples: {s})")
        if self.skipped:
            parts.append(f"(auto: not applied, it could not run on this model: {self.skipped})")
        return "; ".join(parts)


def needs_decision(config: CompressConfig) -> bool:
    """Whether calibration samples are held out from everything for an ``auto`` BN re-estimation or
    bias correction (``auto`` class offsets make their own split, after the pass; see
    :func:`correct_statistics`)."""
    return "auto" in (config.bn_recalibrate, config.bias_correction)


def split_decision(prep: Prepared, config: CompressConfig) -> tuple[Prepared, list[Arrays] | None]:
    """Hold out :data:`DECISION_FRACTION` of the calibration samples for the ``auto`` decisions.

    Returns the prepared run whose calibration excludes them (everything else — gradients, layer
    statistics, corrections — uses only the rest) and the held-out batches (None when nothing is
    ``auto``).
    """

    if not needs_decision(config):
        return prep, None
    whole = materialize(prep.calib, prep.specs, batch_size=config.batch_size)
    if not isinstance(whole, ArraySource) or whole.num_samples < 10:
        log.warning("too few calibration samples to decide the statistics correction: leaving it off")
        return prep, []
    fit, decide = split_holdout(whole, DECISION_FRACTION, seed=config.seed + 7)
    return replace(prep, calib=fit), batches_of(prep, config, decide)


def _divergence(dense: NDArray[np.float64], pruned: NDArray[np.float64], axis: int | None = None) -> float:
    """Mean KL(dense ‖ pruned) over samples for class scores ``(N, C)``, or over every position of
    scores with the classes on ``axis`` (a softmax head's output); else the relative MSE."""
    if axis is not None and dense.ndim > 1 and dense.shape[axis] > 1:
        C = dense.shape[axis]
        dense = np.moveaxis(dense, axis, -1).reshape(-1, C)
        pruned = np.moveaxis(pruned, axis, -1).reshape(-1, C)
    if dense.ndim == 2 and dense.shape[1] > 1:

        def logp(z: NDArray[np.float64]) -> NDArray[np.float64]:
            z = z - z.max(axis=1, keepdims=True)
            out: NDArray[np.float64] = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            return out

        if np.all(dense >= 0) and np.allclose(dense.sum(axis=1), 1.0, atol=1e-3):  # probabilities
            ld, lp = np.log(np.clip(dense, 1e-30, None)), np.log(np.clip(pruned, 1e-30, None))
        else:
            ld, lp = logp(dense), logp(pruned)
        return float(np.mean(np.sum(np.exp(ld) * (ld - lp), axis=1)))
    scale = float(np.mean(dense**2)) or 1.0
    return float(np.mean((dense - pruned) ** 2) / scale)


def _with_weights(model: onnx.ModelProto, weights: dict[str, NDArray[np.float32]]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for init in m.graph.initializer:
        if init.name in weights:
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)  # a float16 model keeps float16 weights
            init.CopyFrom(numpy_helper.from_array(np.asarray(weights[init.name], dtype=dtype), init.name))
    return m


def correct_statistics(
    prep: Prepared,
    config: CompressConfig,
    w: NDArray[np.float32],
    decide: list[Arrays] | None,
    output: str | None,
    cache: HeadCache | None = None,
) -> tuple[onnx.ModelProto | None, Correction]:
    """Apply (or choose and apply) BN re-estimation and bias correction to the pruned weights ``w``.

    ``cache``: the head tensors the layer-wise pass left (:class:`HeadCache`), which the class
    offsets use instead of running the models again where they apply.

    Returns the corrected model in the *input's* format (same opset, IR, Constant nodes) with the
    pruned weights in place, or None when no step is applied, and what was done.  A correction left
    on ``auto`` is a measured option, not a promise: when its layer-by-layer runs fail on a model
    (an export whose graph cannot be run in segments, for example), it is skipped with a warning
    and the report says why; an explicit ``on`` raises instead.
    """
    t0 = time.perf_counter()
    try:
        return _correct_statistics(prep, config, w, decide, output, t0, cache)
    except Exception as exc:  # auto mode falls back to no correction, explicitly reported
        if "on" in (config.bn_recalibrate, config.bias_correction, config.class_offsets) or isinstance(
            exc, MemoryError
        ):
            raise
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        log.warning("statistics correction skipped (auto): %s", why)
        return None, Correction("off", "off", seconds=time.perf_counter() - t0, skipped=why)


def _correct_statistics(
    prep: Prepared,
    config: CompressConfig,
    w: NDArray[np.float32],
    decide: list[Arrays] | None,
    output: str | None,
    t0: float,
    cache: HeadCache | None = None,
) -> tuple[onnx.ModelProto | None, Correction]:
    dense = working_copy(prep.model)
    has_bn = bool(batchnorm_nodes(dense))
    bn_opts = (
        ["off"]
        if config.bn_recalibrate == "off" or not has_bn
        else (["on"] if config.bn_recalibrate == "on" else ["off", "on"])
    )
    bias_opts = (
        ["off"] if config.bias_correction == "off" else (["on"] if config.bias_correction == "on" else ["off", "on"])
    )
    if decide is not None and len(decide) == 0:  # too few samples to decide: auto means off
        bn_opts = [o for o in bn_opts if o == "off" or config.bn_recalibrate == "on"] or ["off"]
        bias_opts = [o for o in bias_opts if o == "off" or config.bias_correction == "on"] or ["off"]
    head = softmax_head(dense, output)
    off_opts = ["off"] if config.class_offsets == "off" or head is None else ["on"]
    if config.class_offsets == "auto" and head is not None:
        off_opts = ["off", "on"]
    if decide is not None and len(decide) == 0:
        off_opts = [o for o in off_opts if o == "off" or config.class_offsets == "on"] or ["off"]
    bn_label = "n/a" if not has_bn else ""
    off_label = "n/a" if head is None else "off"
    names = list(prep.layout.names)
    weights = prep.layout.unflatten(np.asarray(w, dtype=np.float32))
    pruned = _with_weights(dense, weights)
    if bn_opts == ["off"] and bias_opts == ["off"] and off_opts == ["off"]:
        return None, Correction(bn_label or "off", "off", seconds=time.perf_counter() - t0, class_offsets=off_label)
    fit = batches_of(prep, config)
    spill = {"max_bytes": options(config).max_bytes, "spill_dir": config.workdir}
    candidates: dict[tuple[str, str], onnx.ModelProto] = {}
    for bias in bias_opts:
        base = pruned if bias == "off" else bias_correction(dense, pruned, names, fit, **spill)[0]  # type: ignore[arg-type]
        for bn in bn_opts:
            candidates[(bn, bias)] = base if bn == "off" else recalibrate_batchnorm(base, fit, **spill)[0]  # type: ignore[arg-type]
    scores: dict[str, float] = {}
    out = output or scored_output(dense)
    ref: NDArray[np.float64] | None = None
    axis: int | None = None
    if len(candidates) > 1:
        assert decide
        ref = run_outputs(dense, decide, out)
        axis = None if head is None or not head.direct else head.class_axis(ref.ndim)
        for key, m in candidates.items():
            scores[_label(key)] = _divergence(ref, run_outputs(m, decide, out), axis)
        best = min(candidates, key=lambda k: (scores[_label(k)], (k[0] == "on") + (k[1] == "on")))
    else:
        best = next(iter(candidates))
    chosen = candidates[best]
    n_dec = sum(_samples(b) for b in decide) if decide else 0
    offsets: tuple[SoftmaxHead, NDArray[np.float64], int] | None = None
    if head is not None and "on" in off_opts:
        usable = None
        if (
            cache is not None
            and cache.probs is not None
            and (cache.probs_name, cache.logits_name) == (head.probs, head.logits)
        ):
            usable = cache
            if not (best == ("off", "off") and cache.w is not None and np.array_equal(cache.w, w)):
                cache.logits = None  # the pass's pruned model is not ``chosen``
        try:
            offsets, held = _class_offsets(
                dense, chosen, head, _label(best), len(off_opts) > 1, prep, config, fit, decide, spill, scores, usable
            )
            n_dec = held or n_dec
        except ModelError as exc:  # a softmax the offsets cannot follow: they are left off, the rest stays
            if config.class_offsets == "on":
                raise
            log.warning("class offsets skipped: %s", exc)
            off_label = "n/a"
    if best == ("off", "off") and offsets is None:
        return None, Correction(
            bn_label or best[0], best[1], scores, n_dec, time.perf_counter() - t0, class_offsets=off_label
        )
    result = prep.model
    if best != ("off", "off"):
        result = _transplant(prep.model, chosen, pruned, names, weights, bias=best[1] == "on")
    if offsets is not None:
        target = softmax_head(result, output)
        if target is None:
            raise ModelError(f"output {out!r} of the input model is not a softmax's: cannot add class offsets")
        result = add_class_offset(result, target, offsets[1], offsets[2])
    corr = Correction(
        bn_label or best[0], best[1], scores, n_dec, time.perf_counter() - t0,
        class_offsets=off_label if offsets is None else "on",
    )  # fmt: skip
    return result, corr


def _class_offsets(
    dense: onnx.ModelProto,
    chosen: onnx.ModelProto,
    head: SoftmaxHead,
    base_label: str,
    decide_auto: bool,
    prep: Prepared,
    config: CompressConfig,
    fit: Sequence[Arrays],
    decide: Sequence[Arrays] | None,
    spill: Mapping[str, object],
    scores: dict[str, float],
    cache: HeadCache | None = None,
) -> tuple[tuple[SoftmaxHead, NDArray[np.float64], int] | None, int]:
    """The class offsets to add to ``chosen`` (the head, ``β``, the logits' rank) or None, and how
    many held-out samples decided (0: no decision).  ``decide_auto``: decide on held-out samples
    (``scores`` gets both KLs) rather than always fit them.

    Decided on held-out samples: those of the statistics decision when there is one, else a fifth of
    at most :data:`DECISION_SAMPLES` calibration samples picked here (the pass itself used all of
    them: a large gain shows on few samples, a small one is small).  The offsets compared there are
    fitted without them; the ones kept continue that fit on all the fitting samples.  The pruned
    head's output is softmax(logits), so both candidates' held-out KL comes from one forward pass.

    ``cache``: the dense probabilities and the pruned (``chosen``) logits of the fitting samples,
    one array per sample, where the layer-wise pass left them (None: run the model).  They are taken
    out of it (it is emptied), and dropped once the rows are built, before the last fit."""
    n_fit = sum(_samples(b) for b in fit)
    known: tuple[Sequence[NDArray[np.generic]] | None, Sequence[NDArray[np.generic]] | None] = (None, None)
    if cache is not None:
        known = (cache.probs, cache.logits)
        cache.probs = cache.logits = None
    if any(k is not None and len(k) != n_fit for k in known):
        known = (None, None)

    def of(index: NDArray[np.int64] | None) -> tuple[list[NDArray[np.generic]] | None, ...]:
        """``known`` for the fitting samples ``index`` (all when None)."""
        return tuple(None if k is None else list(k) if index is None else [k[int(i)] for i in index] for k in known)

    if not decide_auto:
        kp, kl = of(None)
        rows = _head_rows(dense, chosen, head, fit, spill, 0.0, config.seed, probs=kp, logits=kl)
        known, kp, kl = (None, None), None, None  # free them before the fit
        beta = _fit_rows(rows.Z, rows.psum_all, head, OFFSET_ITERATIONS, overwrite=True)
        return (head, beta, rows.rank), 0
    own = decide is None
    if own:
        whole, pick = _decision_pick(prep, config)
        sub = batches_of(prep, config, whole.take(pick))
        within = bool(pick.size) and int(pick[-1]) < n_fit  # the decision samples are fitting samples
        kp, kl = of(pick) if within else (None, None)
        rows = held = _head_rows(
            dense, chosen, head, sub, spill, DECISION_FRACTION, config.seed, n_fit, probs=kp, logits=kl
        )
    else:
        kp, kl = of(None)
        rows = _head_rows(dense, chosen, head, fit, spill, 0.0, config.seed, probs=kp, logits=kl)
        held = _head_rows(dense, chosen, head, decide or [], spill, 1.0, config.seed)
    if not (np.any(held.held) and np.any(~rows.held)):
        log.warning("too few calibration samples to decide the class offsets: leaving them off")
        return None, 0
    Zh = held.Z[held.held]
    some = bool(np.any(rows.held))  # then the fitting rows are a copy, which the fit may overwrite
    beta0 = _fit_rows(rows.Z[~rows.held] if some else rows.Z, rows.psum_fit, head, DECISION_ITERATIONS, overwrite=some)
    label = "offsets" if base_label == "none" else f"{base_label}+offsets"
    scores[base_label] = kl_rows(held.P_held, Zh, None)
    scores[label] = kl_rows(held.P_held, Zh, beta0)
    if not scores[label] < scores[base_label]:
        return None, held.held_samples
    if own:  # kept: fitted on all the fitting samples, from there (the decision's rows reused)
        rest = np.setdiff1d(np.arange(n_fit), pick)
        if within:
            more = None
            if rest.size:
                kp, kl = of(rest)
                more = _head_rows(dense, chosen, head, batches_of(prep, config, whole.take(rest)), spill, 0.0,
                                  config.seed, n_fit, probs=kp, logits=kl)  # fmt: skip
            rows = _joined(rows, more)
        else:
            kp, kl = of(None)
            rows = _head_rows(dense, chosen, head, fit, spill, 0.0, config.seed, probs=kp, logits=kl)
    known, kp, kl = (None, None), None, None  # free them before the last fit
    Zf = rows.Z[~rows.held] if np.any(rows.held) else rows.Z
    beta = _fit_rows(Zf, rows.psum_fit, head, OFFSET_ITERATIONS, start=beta0, overwrite=True)
    return (head, beta, rows.rank), held.held_samples


#: Logit elements (rows × classes) the class offsets are fitted on at most; above it rows are sampled
#: as they are collected (:func:`_head_rows`).
OFFSET_MAX_ELEMENTS = 2**27
#: Iterations of the class-offset fit that an ``auto`` decision compares (the first few iterations
#: take most of the gain), and of the fit that is kept.
DECISION_ITERATIONS = 5
OFFSET_ITERATIONS = 30


#: Calibration samples (at most) on which an ``auto`` class-offset decision is made when no statistics
#: decision holds samples out; a fifth of them are held out.
DECISION_SAMPLES = 64


def _decision_pick(prep: Prepared, config: CompressConfig) -> tuple[ArraySource, NDArray[np.int64]]:
    """The calibration samples in memory, and a seeded sorted subset of at most
    :data:`DECISION_SAMPLES` of their indices."""
    whole = materialize(prep.calib, prep.specs, batch_size=config.batch_size)
    n = whole.num_samples
    pick = np.sort(np.random.default_rng(config.seed + 13).permutation(n)[: min(n, DECISION_SAMPLES)])
    return whole, pick.astype(np.int64)


@dataclass
class _HeadRows:
    """A softmax head's predictions on calibration batches, one row per prediction (a sample, or a
    sample and position): the pruned logits ``Z (R, C)``, which rows belong to held-out samples
    ``held (R,)``, the dense probabilities of those rows ``P_held (H, C)``, and the sums of the dense
    probabilities over the other rows ``psum_fit (C,)`` and over all ``psum_all (C,)``."""

    Z: NDArray[np.float32]
    held: NDArray[np.bool_]
    P_held: NDArray[np.float32]
    psum_fit: NDArray[np.float64]
    psum_all: NDArray[np.float64]
    rank: int
    held_samples: int


def _head_rows(
    dense: onnx.ModelProto,
    pruned: onnx.ModelProto,
    head: SoftmaxHead,
    batches: Sequence[Arrays],
    spill: Mapping[str, object],
    held_fraction: float,
    seed: int,
    budget_samples: int | None = None,
    probs: Sequence[NDArray[np.generic]] | None = None,
    logits: Sequence[NDArray[np.generic]] | None = None,
) -> _HeadRows:
    """Run the dense and the pruned model once over ``batches`` and collect :class:`_HeadRows`; a
    seeded ``held_fraction`` of the samples is held out (0: none, 1: all; none below 10 samples).
    Rows follow the samples along the first axis of the output as long as the batch (``[N, T, C]``
    or ``[T, N, C]``), else whole batches are held out together.  Beyond
    :data:`OFFSET_MAX_ELEMENTS` logits (over ``budget_samples`` samples when given, of which these
    batches are a part) a seeded share of the rows is kept (the same rows of both models); the
    probability sums cover every row.

    ``probs`` / ``logits``: the dense probabilities / pruned logits of the samples of ``batches``,
    one array per sample (:func:`_per_sample`), when they are known already (the layer-wise pass
    left them, :class:`HeadCache`); the model is then not run for them."""
    sizes = [_samples(b) for b in batches]
    dense_v: Sequence[NDArray[np.generic]] | None = None
    pruned_v: Sequence[NDArray[np.generic]] | None = None
    if probs is not None or logits is not None:
        dense_v, pruned_v = probs, logits
        if dense_v is None:
            dense_v = _per_sample(_head_values(dense, batches, head.probs, spill), sizes, head)
        if pruned_v is None:
            pruned_v = _per_sample(_head_values(pruned, batches, head.logits, spill), sizes, head)
        if dense_v is not None and pruned_v is not None and len(dense_v) == len(pruned_v) == sum(sizes):
            sizes = [1] * len(dense_v)
        else:
            dense_v = pruned_v = None
    if dense_v is None:
        dense_v = _head_values(dense, batches, head.probs, spill)
    total = sum(sizes)
    held_sample = np.zeros(total, dtype=bool)
    if held_fraction >= 1.0:
        held_sample[:] = True
    elif held_fraction > 0 and total >= 10:
        count = min(total - 1, max(1, round(held_fraction * total)))
        held_sample[np.random.default_rng(seed + 11).permutation(total)[:count]] = True
    starts = np.cumsum([0, *sizes])
    # the samples' axis ([N, T, C] or CTC's [T, N, C]); None: whole batches are held out together
    sample_axis = _sample_axis([np.shape(v) for v in dense_v], sizes, head)

    def rows_of(v: NDArray[np.generic], k: int) -> tuple[NDArray[np.floating], NDArray[np.bool_], int]:
        a = np.asarray(v)
        ax = head.class_axis(a.ndim)
        if ax is None:
            raise ModelError(f"softmax {head.probs!r}: axis {head.axis} of a rank-{a.ndim} input is not one class axis")
        r = np.moveaxis(a, ax, -1).reshape(-1, a.shape[ax])
        bax = sample_axis if sizes[k] > 1 else None
        if bax is None:
            flags = np.full(r.shape[0], held_sample[starts[k]])
        else:
            sid = np.arange(sizes[k]).reshape([sizes[k] if i == bax else 1 for i in range(a.ndim)])
            sid = np.moveaxis(np.broadcast_to(sid, a.shape), ax, -1)[..., 0].reshape(-1)
            flags = held_sample[starts[k] + sid]
        return r, flags, a.ndim

    P_held: list[NDArray[np.float32]] = []
    held: list[NDArray[np.bool_]] = []
    kept: list[NDArray[np.bool_]] = []
    share = 1.0
    rng = np.random.default_rng(seed + 17)
    psum_fit: NDArray[np.float64] | None = None
    psum_all: NDArray[np.float64] | None = None
    for k, v in enumerate(dense_v):
        p, flags, _ = rows_of(v, k)
        p = np.exp(np.asarray(p, np.float64)) if head.op_type == "LogSoftmax" else np.asarray(p, np.float64)
        s_all, s_fit = p.sum(axis=0), p[~flags].sum(axis=0)
        psum_all = s_all if psum_all is None else psum_all + s_all
        psum_fit = s_fit if psum_fit is None else psum_fit + s_fit
        if k == 0:  # the expected logits of all batches, from the first one's rows per sample
            expected = p.shape[0] / max(sizes[0], 1) * max(total, budget_samples or 0) * p.shape[1]
            share = min(1.0, OFFSET_MAX_ELEMENTS / max(expected, 1.0))
        keep = np.asarray(rng.random(p.shape[0]) < share, dtype=bool)  # all rows when share = 1
        kept.append(keep)
        P_held.append(p[flags & keep].astype(np.float32))
        held.append(flags[keep])
    del dense_v
    Z: list[NDArray[np.float32]] = []
    rank = 0
    if pruned_v is None:
        pruned_v = _head_values(pruned, batches, head.logits, spill)
    for k, v in enumerate(pruned_v):
        z, _, rank = rows_of(v, k)
        Z.append(np.asarray(z[kept[k]], np.float32))
    assert psum_all is not None and psum_fit is not None
    return _HeadRows(
        np.concatenate(Z), np.concatenate(held), np.concatenate(P_held), psum_fit, psum_all, rank,
        int(held_sample.sum()),
    )  # fmt: skip


def _samples(batch: Arrays) -> int:
    """Samples in a calibration batch: the first axis of its first input (as the batches are built)."""
    return int(next(iter(batch.values())).shape[0])


def _head_values(
    model: onnx.ModelProto, batches: Sequence[Arrays], name: str, spill: Mapping[str, object]
) -> list[NDArray[np.generic]]:
    """Tensor ``name`` of ``model`` on each of ``batches``."""
    runner = SegmentRunner(model, batches, **spill)  # type: ignore[arg-type]
    try:
        runner.advance(len(runner.nodes), extra=[name])
        return [np.asarray(v) for v in runner.values(name)]
    finally:
        runner.close()


def _per_sample(
    values: Sequence[NDArray[np.generic]], sizes: Sequence[int], head: SoftmaxHead
) -> list[NDArray[np.generic]] | None:
    """Head tensors of batches of ``sizes`` samples split into one array per sample (the batch axis
    kept, of size 1), along :func:`_sample_axis` (as :func:`_head_rows` reads them); None when a
    batch of several samples has no such axis."""
    bax = _sample_axis([np.shape(v) for v in values], sizes, head)
    out: list[NDArray[np.generic]] = []
    for v, n in zip(values, sizes, strict=True):
        a = np.asarray(v)
        if n == 1:
            out.append(a)
            continue
        if bax is None:
            return None
        out.extend(np.split(a, n, axis=bax))
    return out


def _sample_axis(shapes: Sequence[tuple[int, ...]], sizes: Sequence[int], head: SoftmaxHead) -> int | None:
    """The axis of a head tensor that runs over the samples: the one non-class axis as long as the
    batch in every batch of several samples (``[N, T, C]``, CTC's ``[T, N, C]``).  None when no axis
    is, or when more than one is (``T = N`` in every batch: which is which cannot be told)."""
    many = [(sh, n) for sh, n in zip(shapes, sizes, strict=True) if n > 1]
    if not many:
        return None
    rank = len(many[0][0])
    ax = head.class_axis(rank)
    if ax is None or any(len(sh) != rank for sh, _ in many):
        return None
    found = [i for i in range(rank) if i != ax and all(sh[i] == n for sh, n in many)]
    return found[0] if len(found) == 1 else None


@dataclass
class HeadCache:
    """A softmax head's tensors on the calibration samples as the layer-wise pass leaves them, for the
    class offsets (:func:`correct_statistics`), which otherwise run the dense and the pruned model
    over those samples once more: the dense probabilities ``probs`` and the pruned logits ``logits``
    (one array per sample, :func:`_per_sample`), their tensor names, and the pruned weights ``w (p,)``
    the logits belong to.  Filled by :func:`prune_layerwise` when asked (empty otherwise)."""

    probs_name: str = ""
    logits_name: str = ""
    probs: list[NDArray[np.generic]] | None = None
    logits: list[NDArray[np.generic]] | None = None
    w: NDArray[np.float32] | None = None


def _joined(a: _HeadRows, b: _HeadRows | None) -> _HeadRows:
    """The rows of ``a`` and ``b`` (other samples of the same model) as fitting rows: none held out."""
    if b is None:
        Z, psum = a.Z, a.psum_all
    else:
        Z, psum = np.concatenate([a.Z, b.Z]), a.psum_all + b.psum_all
    none = np.zeros(Z.shape[0], dtype=bool)
    return _HeadRows(Z, none, np.zeros((0, Z.shape[1]), np.float32), psum, psum, a.rank, 0)


def _fit_rows(
    Z: NDArray[np.float32],
    psum: NDArray[np.float64],
    head: SoftmaxHead,
    iterations: int,
    start: NDArray[np.float64] | None = None,
    overwrite: bool = False,
) -> NDArray[np.float64]:
    """The class offsets ``β (C,)`` fitted to the pruned logits ``Z (R, C)`` and the dense
    probabilities summed over the same rows ``psum (C,)`` in at most ``iterations`` (see
    :func:`~chita_onnx.solver.offsets.fit_class_offsets`, from ``start``); ``overwrite``: ``Z`` is
    not needed afterwards and may be overwritten."""
    res = fit_class_offsets(Z, psum / psum.sum(), max_iter=iterations, start=start, overwrite_z=overwrite)
    log.info(
        "class offsets of %r: F %.6g -> %.6g in %d iterations (|beta| max %.3g)",
        head.probs, res.before, res.after, res.iterations, float(np.max(np.abs(res.beta))),
    )  # fmt: skip
    return res.beta


def _label(key: tuple[str, str]) -> str:
    bn, bias = key
    return "+".join([p for p, on in (("bn", bn == "on"), ("bias", bias == "on")) if on]) or "none"


def _transplant(
    original: onnx.ModelProto,
    corrected: onnx.ModelProto,
    pruned: onnx.ModelProto,
    names: Sequence[str],
    weights: dict[str, NDArray[np.float32]],
    *,
    bias: bool,
) -> onnx.ModelProto:
    """The input model with the corrected statistics: initializers that differ between ``corrected``
    and ``pruned`` (working copies) are copied over by name; new biases are added the same way."""
    from .graph import write_weights

    target = original
    new_bias: dict[str, str] = {}
    if bias:
        target, new_bias = ensure_biases(original, names)
        _, work_bias = ensure_biases(pruned, names)
        rename = {work_bias[k]: new_bias[k] for k in work_bias if k in new_bias}
    else:
        rename = {}
    before = {t.name: t for t in pruned.graph.initializer}
    changed: dict[str, NDArray[np.floating]] = {}
    for t in corrected.graph.initializer:
        if t.name in weights:
            continue
        old = before.get(t.name)
        if old is not None and old.SerializeToString() == t.SerializeToString():
            continue
        changed[rename.get(t.name, t.name)] = numpy_helper.to_array(t)
    have = {t.name for t in target.graph.initializer}
    missing = [k for k in changed if k not in have]
    if missing:
        raise ConfigError(f"statistics correction changed tensors the input model does not hold: {missing[:3]}")
    out, _ = write_weights(target, {**changed, **weights}, storage="dense")
    return out
