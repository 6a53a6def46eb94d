"""``compress`` with ``--structure channel``: prune channels, check, time, write, evaluate, report.

Called by :func:`chita_onnx.pipeline.compress` after the model and data were loaded and validated.
Steps:

1. :func:`~chita_onnx.structured.prune.prune_channels` selects and re-fits channels;
2. the sliced model is checked against the masked model on calibration samples (they must agree);
   groups whose rewrite relied on a run-time-computed shape are kept whole if they do not;
3. the dense and the pruned model are timed side by side (onnxruntime CPU); a candidate slower than
   the input at any checked batch size is re-done with coarser rounding, and if that is still
   slower the input model is written unchanged — a pruned model slower than its input is never
   written;
4. the model is written atomically, passes ``onnx.checker``, and is evaluated like any other run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx
from onnx import helper

from .. import __version__
from ..activations import fixed_batch_size
from ..config import CompressConfig
from ..data import feed, rebatched
from ..data_types import Batch, InputSpec
from ..errors import ModelError
from ..evaluate import compare_to, file_sizes, low_agreement_warning
from ..graph import METADATA_KEY, check_model, layer_name, save_model, walk_graphs
from ..limits import peak_memory
from ..report import FileSizes, Report, StageReport, TensorReport
from ..standardize import DetachedInputs, restore_attention_projections, restore_initializer_inputs
from .capture import session
from .graphutil import Constants
from .latency import batch_feed, count_params, kernel_multiple, paired_speedup, timings
from .prune import ChannelOptions, ChannelResult, node_macs, prune_channels
from .report import ChannelReport, LatencyRow

if TYPE_CHECKING:
    from ..evaluate import Reference
    from ..pipeline import PhaseTimer, Prepared

log = logging.getLogger(__name__)

#: Largest |pruned − masked| output difference always accepted, relative to the output scale.
EQUIVALENCE_RTOL = 1e-4
#: A larger difference is accepted when it is within this factor of the masked model's own rounding
#: noise (:func:`rounding_floor`): a deep network with re-fitted weights can amplify float rounding
#: past EQUIVALENCE_RTOL (1.4e-4 measured on a PP-OCR recogniser), while a wrong rewrite changes the
#: outputs on the scale of the outputs themselves.
ROUNDING_FACTOR = 20.0
LATENCY_THREADS = 1


def _sample(prep: Prepared, n: int = 8) -> Batch:
    first = next(iter(prep.calib))
    return Batch({k: np.asarray(v)[:n] for k, v in first.inputs.items()}, None)


def max_difference(a: onnx.ModelProto, b: onnx.ModelProto, batch: Batch, specs: list[InputSpec]) -> float:
    """Largest |output difference| over all outputs, relative to max(1, largest |output|)."""
    x = feed(batch, specs)
    return _relative_difference(session(a).run(None, x), session(b).run(None, x))


def _relative_difference(ya: list[np.ndarray], yb: list[np.ndarray]) -> float:
    worst = 0.0
    for u, v in zip(ya, yb, strict=True):
        u64, v64 = np.asarray(u, np.float64), np.asarray(v, np.float64)
        if u64.shape != v64.shape:
            return float("inf")
        scale = max(1.0, float(np.abs(u64).max(initial=0.0)))
        worst = max(worst, float(np.abs(u64 - v64).max(initial=0.0)) / scale)
    return worst


def rounding_floor(model: onnx.ModelProto, batch: Batch, specs: list[InputSpec]) -> float:
    """The model's float rounding noise: the relative :func:`max_difference` between onnxruntime
    with every graph optimisation (fused kernels) and with none, on the same inputs."""
    x = feed(batch, specs)
    return _relative_difference(session(model).run(None, x), session(model, optimize=False).run(None, x))


def equivalent(masked: onnx.ModelProto, diff: float, batch: Batch, specs: list[InputSpec]) -> bool:
    """Whether a sliced model that differs from ``masked`` by ``diff`` computes the same function:
    within EQUIVALENCE_RTOL, or within ROUNDING_FACTOR times the masked model's rounding noise."""
    if diff <= EQUIVALENCE_RTOL:
        return True
    floor = rounding_floor(masked, batch, specs)
    log.info("pruned vs masked %.3g; rounding noise of the masked model %.3g", diff, floor)
    return diff <= ROUNDING_FACTOR * floor


def verified(
    prep: Prepared, opts: ChannelOptions, blocked: dict[int, str]
) -> tuple[ChannelResult, onnx.ModelProto, float]:
    """Prune, then check sliced == masked; on a mismatch keep the tentative groups whole and retry."""
    batch = _sample(prep)
    specs = list(prep.specs)
    while True:
        result = prune_channels(prep.model, prep.calib, prep.specs, opts, blocked=blocked)
        sliced, masked = result.sliced(), result.masked()
        diff = max_difference(masked, sliced, batch, specs)
        if equivalent(masked, diff, batch, specs):
            return result, sliced, diff
        suspects = {
            g.id: "its rewrite (a shape computed at run time) did not reproduce the masked model"
            for g in result.analysis.groups
            if g.prunable and g.tentative and g.id not in blocked
        }
        if not suspects:
            raise ModelError(
                f"{prep.path}: the channel-pruned model differs from the masked model by {diff:.3g} "
                "(relative); this is a bug in the rewrite, please report it with the model"
            )
        log.warning("pruned != masked (%.3g): keeping %d tentative group(s) whole and retrying", diff, len(suspects))
        blocked = {**blocked, **suspects}


def latency_batches(prep: Prepared, wanted: tuple[int, ...]) -> list[int]:
    """The batch sizes to time: the configured ones, or the model's fixed batch size."""
    dims = {s.shape[0] if s.shape else None for s in prep.specs}
    fixed = [d for d in dims if isinstance(d, int) and d > 0]
    return sorted({fixed[0]}) if fixed else list(wanted)


def time_models(
    dense: onnx.ModelProto, pruned: onnx.ModelProto, prep: Prepared, batches: list[int]
) -> list[LatencyRow]:
    sample = dict(_sample(prep).inputs)
    specs = {s.name: s for s in prep.specs}
    rows = []
    for b in batches:
        x = {k: np.asarray(v, dtype=specs[k].dtype) for k, v in batch_feed(sample, b).items()}
        t = timings([dense, pruned], x, threads=LATENCY_THREADS)
        rows.append(LatencyRow(b, float(np.median(t[:, 0])), float(np.median(t[:, 1])), paired_speedup(t)[1]))
    return rows


def _channel_totals(result: ChannelResult) -> tuple[int, int, int]:
    before = sum(g.channels for g in result.groups)
    after = sum(g.kept for g in result.groups)
    prunable = sum(g.size for g in result.analysis.groups if g.prunable)
    return before, after, prunable


def _changed_tensors(result: ChannelResult, pruned: onnx.ModelProto) -> tuple[TensorReport, ...]:
    graph = result.analysis.model.graph
    consts = Constants(graph)
    new = Constants(pruned.graph)
    new_inputs = {n.output[0]: list(n.input) for n in pruned.graph.node if n.output}
    seen: dict[str, TensorReport] = {}
    for s in result.analysis.slices:
        if s.slot != 1 or (s.kind == "param" and graph.node[s.node].op_type != "Conv"):
            continue
        node = graph.node[s.node]
        name = node.input[1]
        if name in seen:
            continue
        w = consts.value(name)
        after_name = new_inputs.get(node.output[0], [None, None])[1]
        w_new = new.value(after_name) if after_name else None
        if w is None or w_new is None or w_new.size == w.size:
            continue
        seen[name] = TensorReport(
            name,
            node.op_type,
            tuple(int(d) for d in w.shape),
            int(w.size),
            int(w_new.size),
            "x".join(str(d) for d in w_new.shape),
        )
    return tuple(seen.values())


def _rename_sliced_inputs(model: onnx.ModelProto, detached: DetachedInputs, tag: str = "ch") -> None:
    """Give a sliced initializer back the name of the graph input it came from, in place.

    The channel surgery writes each sliced tensor under a fresh name (``fc_w__ch1``).  For a model whose
    initializers were also graph inputs, the writer lists them again; so that the interface keeps its
    names, a detached input whose tensor is gone and was sliced into exactly one new tensor takes that
    tensor's place (every reader, in every subgraph, renamed with it)."""
    if not detached.inputs:
        return
    g = model.graph
    present = {t.name for t in g.initializer}
    wanted = {v.name for v in detached.inputs} - present
    derived: dict[str, list[str]] = {}
    for t in g.initializer:
        base, sep, count = t.name.rpartition(f"__{tag}")
        if sep and count.isdigit() and base in wanted:
            derived.setdefault(base, []).append(t.name)
    rename = {new[0]: base for base, new in derived.items() if len(new) == 1}
    if not rename:
        return
    for t in g.initializer:
        t.name = rename.get(t.name, t.name)
    for _, sub in walk_graphs(g):
        for node in sub.node:
            for i, name in enumerate(node.input):
                if name in rename:
                    node.input[i] = rename[name]


def _as_written(model: onnx.ModelProto, record: DetachedInputs) -> onnx.ModelProto:
    """``model`` with the onnxruntime ``Attention`` nodes that loading split put back together (a copy;
    ``model`` itself when none was split): what is timed and counted is what gets written, without
    the identity stand-in and its extra product (a 3H×3H product per token)."""
    if not record.projections:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return restore_attention_projections(out, record)


def compress_channels(
    prep: Prepared,
    out_path: Path,
    staged: Path,
    config: CompressConfig,
    ref: Reference | None,
    timer: PhaseTimer,
    warnings: list[str],
) -> Report:
    """Channel-prune ``prep.model`` and report (see the module docstring).

    The model is written to ``staged``, the output plan's temporary file (:mod:`chita_onnx.paths`),
    which the caller commits to ``out_path`` when the whole run succeeded; ``out_path`` is what the
    report names.
    """
    from ..pipeline import _versions

    fixed = fixed_batch_size(prep.specs)
    if fixed is not None:  # a batch size baked into the model (often 1): every run feeds exactly that many
        prep = replace(prep, calib=rebatched(prep.calib, prep.specs, fixed))
    multiple = config.channel_multiple or kernel_multiple()
    update = config.update == "obs" or (config.update == "auto" and config.method == "chita")
    opts = ChannelOptions(
        sparsity=config.sparsity,
        sparsity_of=config.sparsity_of,
        multiple=multiple,
        method=config.method,
        update=update,
        num_samples=config.num_samples,
        seed=config.seed,
    )
    blocked: dict[int, str] = {}
    if config.keep:
        blocked = _keep_blocked(prep, config.keep)
    dense = _as_written(prep.model, prep.detached)
    batches = latency_batches(prep, config.latency_batches)
    notes: list[str] = []
    attempts = [multiple, 2 * multiple] if config.latency_check else [multiple]
    chosen: tuple[ChannelResult, onnx.ModelProto, onnx.ModelProto, float, list[LatencyRow], int] | None = None
    written = "pruned"
    for m in attempts:
        with timer.phase("prune"):
            result, sliced, diff = verified(prep, replace(opts, multiple=m), blocked)
            restored = _as_written(sliced, prep.detached)
        rows: list[LatencyRow] = []
        if config.latency_check:
            with timer.phase("latency"):
                rows = time_models(dense, restored, prep, batches)
        chosen = (result, sliced, restored, diff, rows, m)
        slow = [r for r in rows if r.speedup < 1.0]
        if not slow:
            break
        notes.append(
            f"kept counts rounded to multiples of {m} measured slower than the input at batch "
            + ", ".join(f"{r.batch} ({1e3 * r.pruned:.3f} vs {1e3 * r.dense:.3f} ms)" for r in slow)
        )
    else:
        if config.latency_check:
            notes.append("no pruned candidate was faster than the input: the input model was written unchanged")
            written = "input"
    assert chosen is not None
    result, sliced, restored, diff, rows, m = chosen
    before, after, prunable = _channel_totals(result)
    if all(g.kept == g.channels for g in result.groups):
        why = (
            "rounding to kernel-friendly counts keeps every group whole at this sparsity"
            if prunable
            else "no group can lose a channel: the table says why for each"
        )
        notes.append(f"no channel was removed ({why}): the output is the input model")
        written = "input"
    if m != multiple and written == "pruned":
        notes.append(f"used rounding to multiples of {m} instead of {multiple}")
    for g in result.analysis.groups:
        if g.id in blocked and blocked[g.id].startswith("its rewrite"):
            notes.append(f"group {g.id} kept whole: {blocked[g.id]}")
    final = restored if written == "pruned" else dense  # Attention nodes put back together
    if written == "input":
        after = before
    meta = {
        "tool": f"chita-onnx {__version__}",
        "structure": "channel",
        "method": config.method,
        "update": update,
        "sparsity": config.sparsity,
        "sparsity_of": config.sparsity_of,
        "channel_multiple": m,
        "channels_before": before,
        "channels_after": after,
    }
    out_model = onnx.ModelProto()
    out_model.CopyFrom(final)
    entries = [e for e in out_model.metadata_props if e.key != METADATA_KEY]
    del out_model.metadata_props[:]
    out_model.metadata_props.extend(entries)
    helper.set_model_props(out_model, {**{e.key: e.value for e in entries}, METADATA_KEY: json.dumps(meta)})
    with timer.phase("write"):
        _rename_sliced_inputs(out_model, prep.detached)
        restore_initializer_inputs(out_model, prep.detached)  # typed from the sliced tensors
        save_model(out_model, staged, input_path=prep.path)
        check_model(staged)
    comparison = None
    if ref is not None and prep.eval is not None:
        with timer.phase("evaluate"):
            comparison = compare_to(ref, staged, prep.eval, prep.specs)
    with timer.phase("sizes"):
        dr, dz = file_sizes(prep.path)
        pr, pz = file_sizes(staged)
    sample = _sample(prep, 1)
    shapes = {k: tuple(np.shape(v)) for k, v in sample.inputs.items()}
    from .capture import probe_shapes

    # FLOPs on the split forms: a fused Attention's Q/K/V projection is a MatMul there, which
    # node_macs counts (and it skips the identity product), while the fused node counts nothing
    split_dense = prep.model
    split_final = sliced if written == "pruned" else split_dense
    flops_before = 2 * sum(node_macs(split_dense, probe_shapes(split_dense, [sample], prep.specs)[0]).values())
    flops_after = 2 * sum(node_macs(split_final, probe_shapes(split_final, [sample], prep.specs)[0]).values())
    params_before, params_after = count_params(dense), count_params(final)
    if (low := low_agreement_warning(comparison)) is not None:
        warnings.append(low)
    objective = sum(g.objective for g in result.groups if g.objective is not None)
    report = ChannelReport(
        method=config.method,
        update=update,
        sparsity=config.sparsity,
        sparsity_of=config.sparsity_of,
        fraction=result.fraction,
        multiple=m,
        channels_before=before,
        channels_after=after,
        prunable_channels=prunable,
        params_before=params_before,
        params_after=params_after,
        flops_before=flops_before,
        flops_after=flops_after,
        flops_input=", ".join(f"{k} {'x'.join(map(str, v))}" for k, v in shapes.items()),
        latency=tuple(rows),
        latency_threads=LATENCY_THREADS,
        equivalence_max_diff=diff,
        groups=tuple(g if written == "pruned" else replace(g, kept=g.channels) for g in result.groups),
        notes=tuple(notes),
        written=written,
    )
    stage = StageReport(
        1,
        config.sparsity,
        params_after,
        objective,
        sum(g.swaps for g in result.groups),
        True,
        None if comparison is None else comparison.pruned_accuracy,
        None if comparison is None else comparison.agreement,
        sum(timer.seconds.values()),
    )
    return Report(
        input=str(prep.path),
        output=str(out_path),
        method=config.method,
        config=config.to_dict(),
        p=params_before,
        k=params_after,
        nnz=params_after,
        tensors=_changed_tensors(result, final) if written == "pruned" else (),
        stages=(stage,),
        evaluation=comparison,
        eval_source=prep.eval_source,
        sizes=FileSizes(dr, dz, pr, pz),
        timings=dict(timer.seconds),
        versions=_versions(),
        peak_memory=peak_memory(),
        solver={"objective": objective, "swaps": sum(g.swaps for g in result.groups)},
        warnings=tuple(warnings),
        structured=report,
    )


def _keep_blocked(prep: Prepared, keep: tuple[str, ...]) -> dict[int, str]:
    """Groups whose producing layer's weight, node or layer (:func:`.graph.layer_name`) is named in
    ``--keep``: kept whole."""
    from .capture import probe_shapes
    from .groups import analyse
    from .prune import probe_batches

    analysis = analyse(prep.model, probe_shapes(prep.model, probe_batches(prep.calib, prep.specs), prep.specs))
    graph = prep.model.graph
    names: dict[str, set[str]] = {}
    for s in analysis.slices:
        if s.kind == "producer":
            node = graph.node[s.node]
            for gid in analysis.group_of_units(s.units):
                names.setdefault(str(gid), set()).update({node.input[1], node.name, layer_name(node)})
    return {int(g): "protected by --keep" for g, n in names.items() if n & set(keep)}
