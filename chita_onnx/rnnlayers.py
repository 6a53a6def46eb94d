"""Layer-wise reconstruction of the ``W``/``R`` weights of ONNX ``LSTM``/``GRU``/``RNN`` nodes.

A recurrent node is a linear layer per direction once its input rows ``z_t = [x_t ; h_{t−1}]`` are
known (:mod:`chita_onnx.rnnstats`).  :func:`recurrent_sites` finds the nodes whose weights are to be
pruned (and names the ``Y`` output of the working copy where the exporter left it unnamed);
:func:`prune_recurrent` is the step of :func:`chita_onnx.sequential.layerwise_prune` for one node:

* rows from the *pruned* model: its ``X``/``initial_h``/``sequence_lens`` at the node, and its ``Y``
  computed by the node itself with its weights still dense (one extra run of that node alone);
* targets from the *dense* model: ``[W̄ R̄] z̄_t`` with ``z̄_t`` from the dense model's ``X`` and ``Y``;
* one budget ``keep[W] + keep[R]`` for the node, split over the exact linear blocks (per direction;
  GRU's candidate gate in two) by one threshold on their OBS saliencies, then SparseGPT selection and
  the exact ridge re-fit per block (:func:`chita_onnx.solver.layerwise.prune_layer`).

Graph code only: rows, Grams and solves are in :mod:`chita_onnx.rnnstats`,
:mod:`chita_onnx.layerstats` and :mod:`chita_onnx.solver.layerwise`.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import helper

from . import activations, runtime
from .activations import AheadRunner, SegmentRunner, _attr, _session
from .errors import ChitaError, ModelError
from .layerstats import LayerGeometry, LayerStats, RowSampler, accumulate, dense_weight_t, finalize_means
from .rnnstats import (
    GATES,
    Part,
    RecurrentGeometry,
    allot,
    joint_weight,
    num_step_rows,
    part_rows,
    parts,
    saliency,
    split_joint,
    step_rows,
)
from .solver import parallel
from .solver.layerwise import LayerSolution, prune_layer, solve_bytes, solve_cost, warm_refit

if TYPE_CHECKING:
    from .activations import LayerSite
    from .sequential import LayerReport, LayerwiseOptions

RECURRENT = tuple(GATES)
log = logging.getLogger(__name__)
#: closed-loop re-fit: the step sizes tried toward each round's re-fit (the best one is kept)
STEPS = (1.0, 0.5)
#: closed-loop re-fit: CG iterations per round, from the current weights
CLOSED_LOOP_CG = 10


@dataclass(frozen=True)
class RecurrentSite:
    """A recurrent node with weights to prune: ``W``/``R`` are the initializer names when they are
    in the pruned set (None when that tensor stays as it is)."""

    node: str
    position: int
    W: str | None
    R: str | None
    weight_name: str
    recurrence_name: str
    input: str
    output: str
    initial_h: str | None
    lens: str | None
    geometry: RecurrentGeometry
    bias: str | None = None

    @property
    def weight(self) -> str:
        """The name the pass reports this node under."""
        return "+".join(n for n in (self.W, self.R) if n)


def _geometry(node: onnx.NodeProto, w_shape: tuple[int, ...]) -> RecurrentGeometry:
    D, GH, n_in = (int(x) for x in w_shape)
    direction = _attr(node, "direction", b"forward")
    dstr = direction.decode() if isinstance(direction, bytes) else str(direction)
    acts = [a.decode() if isinstance(a, bytes) else str(a) for a in _attr(node, "activations", []) or []]  # type: ignore[attr-defined]
    per = {"LSTM": 3, "GRU": 2, "RNN": 1}[node.op_type]
    return RecurrentGeometry(
        node.op_type, D, GH // GATES[node.op_type], n_in, direction=dstr,
        layout=int(_attr(node, "layout", 0)),  # type: ignore[call-overload]
        linear_before_reset=bool(_attr(node, "linear_before_reset", 0)),
        clip=float(_attr(node, "clip", 0.0) or 0.0),  # type: ignore[arg-type]
        sigmoid_gates=all(a.lower() == "sigmoid" for a in acts[::per]) if acts else True,
    )  # fmt: skip


def recurrent_sites(
    model: onnx.ModelProto, names: Sequence[str]
) -> tuple[onnx.ModelProto, list[RecurrentSite], list[str]]:
    """The recurrent nodes that consume any of ``names`` (as ``W`` or ``R``), and the other names.

    Returns ``model`` (a copy with the unnamed ``Y`` outputs of those nodes named, when there are
    any), the sites in graph order, and the names left for :func:`~chita_onnx.activations.find_layers`.
    A weight read by anything else than one recurrent node's ``W``/``R`` input raises ModelError.
    """
    wanted = set(names)
    hits: list[tuple[int, onnx.NodeProto]] = []
    taken: set[str] = set()
    for pos, node in enumerate(model.graph.node):
        recurrent = node.op_type in RECURRENT and node.domain in ("", "ai.onnx")
        if recurrent and any(n in wanted for n in node.input[1:3]):
            hits.append((pos, node))
            taken.update(n for n in node.input[1:3] if n in wanted)
    if not hits:
        return model, [], list(names)
    for node in model.graph.node:
        for slot, n in enumerate(node.input):
            if n in taken and not (node.op_type in RECURRENT and slot in (1, 2)):
                raise ModelError(f"weight {n!r} of a recurrent node also feeds {node.op_type} node {node.name!r}")
    readers: dict[str, int] = {}
    for _, node in hits:
        for n in {x for x in node.input[1:3] if x in wanted}:
            readers[n] = readers.get(n, 0) + 1
    shared = sorted(n for n, c in readers.items() if c > 1)
    if shared:
        raise ModelError(f"recurrent weight(s) {shared} feed more than one node")
    m = model
    if any(not node.output or not node.output[0] for _, node in hits):
        m = onnx.ModelProto()
        m.CopyFrom(model)
    used = {o for n in m.graph.node for o in n.output} | {t.name for t in m.graph.initializer}
    inits = {t.name: t for t in m.graph.initializer}
    sites = []
    for pos, _ in hits:
        node = m.graph.node[pos]
        label = node.name or f"<{node.op_type} #{pos}>"
        if not node.output:
            node.output.append("")
        if not node.output[0]:
            y, k = f"{label}_Y", 0
            while y in used:
                k += 1
                y = f"{label}_Y_{k}"
            used.add(y)
            node.output[0] = y
        w, r = node.input[1], node.input[2]
        if w not in inits or r not in inits:
            raise ModelError(f"{node.op_type} node {label!r}: W and R must be initializers")
        geom = _geometry(node, tuple(int(d) for d in inits[w].dims))
        ins = list(node.input) + [""] * (8 - len(node.input))
        sites.append(
            RecurrentSite(
                label, pos, w if w in wanted else None, r if r in wanted else None, w, r, ins[0], node.output[0],
                ins[5] or None, ins[4] or None, geom, ins[3] or None,
            )
        )  # fmt: skip
        parts(geom, w in wanted, r in wanted, name=label)  # refuses what cannot be fitted exactly
    return m, sites, [n for n in names if n not in taken]


def linear_weights(model: onnx.ModelProto, names: Sequence[str]) -> list[str]:
    """``names`` without the ``W``/``R`` inputs of recurrent nodes (for the passes that handle
    Conv/Gemm/MatMul layers only: bias correction)."""
    rec = {n for node in model.graph.node if node.op_type in RECURRENT for n in node.input[1:3]}
    return [n for n in names if n not in rec]


def layer_sites(
    model: onnx.ModelProto, names: Sequence[str]
) -> tuple[onnx.ModelProto, list[LayerSite | RecurrentSite]]:
    """Every site of the layer-wise pass for ``names`` in graph order, and the model they refer to
    (:func:`recurrent_sites`' copy); raises ModelError when a weight cannot be handled."""
    m, rsites, rest = recurrent_sites(model, names)
    sites: list[LayerSite | RecurrentSite] = [*activations.find_layers(m, rest), *rsites]
    return m, sorted(sites, key=lambda s: s.position)


def check_layers(model: onnx.ModelProto, names: Sequence[str]) -> list[LayerSite | RecurrentSite]:
    """Every site of the layer-wise pass for ``names`` in graph order (raises ModelError when a weight
    cannot be handled)."""
    return layer_sites(model, names)[1]


def split_layers(
    model: onnx.ModelProto, names: Sequence[str]
) -> tuple[list[LayerSite | RecurrentSite], dict[str, str]]:
    """Like :func:`check_layers`, but tolerant: the sites of the names the layer-wise pass can handle
    (graph order) and ``{name: why}`` for the others, instead of raising.

    When the whole set is not handled, each name is checked alone (a GRU's ``W`` and ``R`` are
    checked separately, so one refused tensor does not take the other with it); the handled ones are
    then checked together again, and a failure there still raises ModelError."""
    try:
        return check_layers(model, names), {}
    except ChitaError:
        pass
    refused: dict[str, str] = {}
    for n in names:
        try:
            layer_sites(model, [n])
        except ChitaError as exc:
            refused[n] = " ".join(str(exc).split())
    handled = [n for n in names if n not in refused]
    return (check_layers(model, handled) if handled else []), refused


def _run_node(runner: SegmentRunner, position: int, output: str) -> list[NDArray[np.generic]]:
    """``output`` of the node at ``position`` alone, per batch, on the runner's current values (the
    runner stands at ``position`` and does not move)."""
    node = runner.nodes[position]
    reads = list(dict.fromkeys(n for n in node.input if n))
    ins = [n for n in reads if n not in runner.inits]
    inits = [runner.inits[n] for n in reads if n in runner.inits]
    g = helper.make_graph(
        [node], f"node_{position}", [runner._value_info(n) for n in ins], [onnx.ValueInfoProto(name=output)], inits
    )
    m = helper.make_model(g, opset_imports=list(runner.model.opset_import))
    m.ir_version = runner.model.ir_version
    what = f"the recurrent node at position {position}"
    sess = _session(m, runner.threads, what)
    feeds = [{n: runner.state[n][b] for n in ins} for b in range(runner.num_batches)]
    return [runtime.run(sess, [output], feed, what=what)[0] for feed in feeds]


@dataclass
class _Rows:
    X: list[NDArray[np.generic]]
    Y: list[NDArray[np.generic]]
    h0: list[NDArray[np.generic]] | None
    lens: list[NDArray[np.generic]] | None

    def count(self, b: int, geom: RecurrentGeometry) -> int:
        return num_step_rows(self.X[b], geom, None if self.lens is None else np.asarray(self.lens[b]))

    def rows(self, b: int, geom: RecurrentGeometry, k: int) -> NDArray[np.float32]:
        return step_rows(
            self.X[b], self.Y[b], geom, k,
            initial_h=None if self.h0 is None else self.h0[b],
            lens=None if self.lens is None else np.asarray(self.lens[b]),
        )  # fmt: skip


def _rows_at(runner: SegmentRunner, site: RecurrentSite, Y: list[NDArray[np.generic]]) -> _Rows:
    return _Rows(
        runner.values(site.input),
        Y,
        runner.values(site.initial_h) if site.initial_h else None,
        runner.values(site.lens) if site.lens else None,
    )


def part_stats(
    site: RecurrentSite,
    pruned: _Rows,
    dense: _Rows | None,
    J_bar: NDArray[np.float64],
    plist: Sequence[Part],
    *,
    bias: NDArray[np.floating] | None = None,
    max_rows: int = 0,
    seed: int = 0,
    J_rows: NDArray[np.float64] | None = None,
    groups: Sequence[int] = (),
) -> list[LayerStats]:
    """Per part, the statistics of :mod:`chita_onnx.layerstats` (``H``, and with ``dense`` the cross
    term ``B`` and energy ``yy`` of the targets ``W̄_part z̄``) over all batches.  ``bias``: the node's
    ``B`` ``(D, 2·G·H)`` (for the reset gate of a GRU with ``linear_before_reset=0``).  ``J_rows``:
    the joint weight whose reset gate the *pruned* rows use (default ``J_bar``: the rows of the node
    run with its dense weights; the closed-loop re-fit passes the node's current weights).
    ``groups``: samples per batch whose rows the row cap samples alike
    (:attr:`~chita_onnx.sequential.LayerwiseOptions.sample_groups`)."""
    J_p = J_bar if J_rows is None else J_rows
    geom = site.geometry
    out = []
    for p in plist:
        M, d = p.shape(geom)
        out.append(LayerStats.empty(LayerGeometry("matmul_right", (d, M)), cross=dense is not None))
    samplers = {}
    # each part's dense weight as accumulate multiplies by it, made once instead of once per batch
    dense_t = (
        [dense_weight_t(J_bar[p.direction, p.r0 : p.r1, p.col_slice(geom)][None]) for p in plist]
        if dense is not None
        else [None] * len(plist)
    )
    for k in range(geom.directions):
        total = sum(pruned.count(b, geom) for b in range(len(pruned.X)))
        samplers[k] = RowSampler(total, max_rows * geom.d if max_rows > 0 else None, seed=seed + k)
    for b in range(len(pruned.X)):
        for k in range(geom.directions):
            zp = pruned.rows(b, geom, k)
            zd = dense.rows(b, geom, k) if dense is not None else None
            if zd is not None and zd.shape != zp.shape:
                raise ModelError(f"{site.node}: the dense and pruned models have different sequence lengths")
            idx = samplers[k].pick(zp.shape[0], groups[b] if groups else 1)
            for p, st, wT in zip(plist, out, dense_t, strict=True):
                if p.direction != k:
                    continue
                bk = None if bias is None else bias[k]
                xp = part_rows(zp, p, geom, J_p[k], bk)
                if zd is None:
                    accumulate(st, xp, index=idx)
                else:
                    accumulate(st, xp, a_dense=part_rows(zd, p, geom, J_bar[k], bk), w_dense_t=wT, index=idx)
    for st in out:
        finalize_means(st)
    return out


def recurrent_dense_calls(site: RecurrentSite) -> list[tuple[int, tuple[str, ...]]]:
    """The dense runner's two ``advance`` calls for a recurrent node: up to it (its inputs), then
    past it, keeping its output."""
    return [(site.position, ()), (site.position + 1, (site.output,))]


def prune_recurrent(
    site: RecurrentSite,
    pruned: SegmentRunner,
    dense: SegmentRunner | AheadRunner | None,
    opts: LayerwiseOptions,
    *,
    keep: Mapping[str, int] | None = None,
    masks: Mapping[str, NDArray[np.bool_]] | None = None,
    layer_index: int = 0,
) -> tuple[dict[str, NDArray[np.float32]], LayerReport, float, float]:
    """Prune (``keep``) or re-fit (``masks``) one recurrent node's ``W``/``R``.  ``pruned`` stands at the
    node (it does not move: its next segment runs the node with the new weights); ``dense`` is
    advanced past it.  Returns the new tensors, the report, and the seconds of statistics and solve."""
    from .sequential import LayerReport

    t0 = time.perf_counter()
    geom = site.geometry
    pos = site.position
    pruned_rows = _rows_at(pruned, site, _run_node(pruned, pos, site.output))
    dense_rows = None
    if dense is not None:
        to_node, past_node = recurrent_dense_calls(site)
        dense.advance(*to_node)
        xd = dense.values(site.input)
        h0d = dense.values(site.initial_h) if site.initial_h else None
        lens = dense.values(site.lens) if site.lens else None
        dense.advance(*past_node)
        dense_rows = _Rows(xd, dense.values(site.output), h0d, lens)
    Wb = np.asarray(pruned.initializer(site.weight_name), np.float64)
    Rb = np.asarray(pruned.initializer(site.recurrence_name), np.float64)
    J_bar = joint_weight(Wb, Rb)
    plist = parts(geom, site.W is not None, site.R is not None, name=site.node)
    bias = np.asarray(pruned.values(site.bias)[0], np.float64) if site.bias else None
    stats = part_stats(
        site, pruned_rows, dense_rows, J_bar, plist, bias=bias, max_rows=opts.max_rows, groups=opts.sample_groups,
        seed=opts.seed * 1_000_003 + layer_index,
    )  # fmt: skip
    t_stats = time.perf_counter() - t0
    t1 = time.perf_counter()
    blocks = [J_bar[p.direction, p.r0 : p.r1, p.col_slice(geom)] for p in plist]
    J = J_bar.copy()
    err = masked = dense_err = 0.0
    damp = 0.0
    costs, sizes, budget = _part_loads(blocks, opts)  # independent parts: solved at once, memory allowing
    if keep is not None:
        total = sum(int(keep[n]) for n in (site.W, site.R) if n)
        select = "sparsegpt" if opts.select == "sparsegpt" else "magnitude"
        scores = parallel.tasks(
            [
                functools.partial(saliency, w, st.H[0], None if st.B is None else st.B[0], opts.damp, select)
                for w, st in zip(blocks, stats, strict=True)
            ],
            costs,
            sizes,
            budget,
        )
        counts = allot(scores, total)
    else:
        assert masks is not None
        mj = _joint_mask(site, masks, J_bar.shape)

    def solve(i: int) -> LayerSolution:
        p, st, w = plist[i], stats[i], blocks[i]
        name = f"{site.node} direction {p.direction} rows {p.r0}:{p.r1} ({p.cols})"
        common = {
            "refit": opts.refit, "damp": opts.damp, "block": opts.block, "name": name, "diagnostics": opts.diagnostics,
        }  # fmt: skip
        if keep is not None:
            return prune_layer(w[None], st.H, st.B, st.yy, keep=counts[i], select=opts.select, **common)  # type: ignore[arg-type]
        m = mj[p.direction, p.r0 : p.r1, p.col_slice(geom)]
        return prune_layer(w[None], st.H, st.B, st.yy, mask=m[None], select="mask", **common)  # type: ignore[arg-type]

    solutions = parallel.tasks([functools.partial(solve, i) for i in range(len(plist))], costs, sizes, budget)
    part_masks = []
    for p, sol in zip(plist, solutions, strict=True):
        J[p.direction, p.r0 : p.r1, p.col_slice(geom)] = np.where(sol.mask[0], sol.W[0], 0.0)
        part_masks.append(sol.mask)
        err, masked, dense_err = err + sol.error, masked + sol.masked_error, dense_err + sol.dense_error
        damp = max(damp, sol.damp)
    _set_joint(pruned, site, J)
    if dense_rows is not None and opts.refit and opts.recurrent_refits > 0:
        J = _closed_loop_refit(site, pruned, dense_rows, J_bar, J, plist, part_masks, bias, opts, layer_index)
    W, R = split_joint(J, geom.input_size)  # ``pruned`` already holds them (_set_joint)
    out = {n: v.astype(np.float32) for n, v in ((site.W, W), (site.R, R)) if n}
    energy = float(sum(float(np.sum(st.yy)) for st in stats if st.yy is not None))
    if not energy:
        energy = float(sum(np.einsum("ij,jk,ik->", w, st.H[0], w) for w, st in zip(blocks, stats, strict=True)))
    size = sum(int(np.prod(a.shape)) for n, a in ((site.W, W), (site.R, R)) if n)
    kept = sum(int(np.count_nonzero(v)) for v in out.values())
    t_solve = time.perf_counter() - t1
    rows = max((st.rows for st in stats), default=0)
    report = LayerReport(site.weight, size, kept, rows, err, masked, dense_err, energy, damp, t_stats + t_solve)
    return out, report, t_stats, t_solve


def _part_loads(
    blocks: Sequence[NDArray[np.floating]], opts: LayerwiseOptions
) -> tuple[list[float], list[float], float | None]:
    """What :func:`~chita_onnx.solver.parallel.tasks` needs to run the parts' solves at once: their
    costs and memory (:func:`~chita_onnx.solver.layerwise.solve_cost`, ``solve_bytes``, from each
    ``(M, d)`` block's shape) and the budget for two of them together."""
    shapes = [(int(w.shape[-2]), int(w.shape[-1])) for w in blocks]
    return [solve_cost(*s) for s in shapes], [solve_bytes(*s) for s in shapes], opts.shared_solve_bytes


def _set_joint(runner: SegmentRunner, site: RecurrentSite, J: NDArray[np.float64]) -> None:
    """Store the joint weight ``J`` ``(D, G·H, i + H)`` in ``runner`` as the node's pruned ``W``/``R``."""
    W, R = split_joint(J, site.geometry.input_size)
    for n, v in ((site.W, W), (site.R, R)):
        if n:
            runner.set_initializer(n, v.astype(np.float32))


def _output_error(Y: Sequence[NDArray[np.generic]], Y_dense: Sequence[NDArray[np.generic]]) -> float:
    """``Σ_b ‖Y_b − Ȳ_b‖²``: the node's hidden states against the dense model's, over all batches."""
    pairs = zip(Y, Y_dense, strict=True)
    return float(sum(np.sum((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2) for a, b in pairs))


def _closed_loop_refit(
    site: RecurrentSite,
    pruned: SegmentRunner,
    dense_rows: _Rows,
    J_bar: NDArray[np.float64],
    J: NDArray[np.float64],
    plist: Sequence[Part],
    part_masks: Sequence[NDArray[np.bool_]],
    bias: NDArray[np.float64] | None,
    opts: LayerwiseOptions,
    layer_index: int,
) -> NDArray[np.float64]:
    """Re-fit the pruned ``J`` on its support with rows from its *own* recurrence, keeping a round only
    if it brings the node's hidden states closer to the dense model's.

    The first fit reads ``h_{t−1}`` from the node run with its dense weights on the pruned inputs, so it
    fits ``[W R] z_t ≈ [W̄ R̄] z̄_t`` as if each step started from the dense recurrence.  Once pruned,
    the node feeds back its own ``h_{t−1}``: each round runs the node with the current weights, takes
    its rows ``z_t = [x_t ; h_{t−1}]`` (same dense targets) and solves the exact ridge re-fit on the
    fixed support.  Fed back, a full step can overshoot, so the steps :data:`STEPS` toward it are tried
    and the one with the lowest ``Σ ‖Y − Ȳ‖²`` (all steps, directions and batches) is kept if it is
    lower than before; else the rounds stop.  ``pruned`` ends holding the returned weights.  Up to
    ``opts.recurrent_refits`` rounds."""
    geom = site.geometry
    Y = _run_node(pruned, site.position, site.output)
    best = _output_error(Y, dense_rows.Y)
    for r in range(opts.recurrent_refits):
        t0 = time.perf_counter()
        rows = _rows_at(pruned, site, Y)
        stats = part_stats(
            site, rows, dense_rows, J_bar, plist, bias=bias, max_rows=opts.max_rows, groups=opts.sample_groups,
            seed=opts.seed * 1_000_003 + layer_index + 104_729 * (r + 1), J_rows=J,
        )  # fmt: skip
        J_new = J.copy()
        ats = [(p.direction, slice(p.r0, p.r1), p.col_slice(geom)) for p in plist]

        def refit(
            i: int, r: int = r, stats: list[LayerStats] = stats, ats: list[tuple[int, slice, slice]] = ats,
            J: NDArray[np.float64] = J,
        ) -> NDArray[np.float64]:  # fmt: skip
            p, st, m, at = plist[i], stats[i], part_masks[i], ats[i]
            name = f"{site.node} direction {p.direction} rows {p.r0}:{p.r1} ({p.cols}), closed-loop round {r + 1}"
            B = None if st.B is None else st.B[0]
            return warm_refit(J_bar[at], st.H[0], B, m[0], J[at], damp=opts.damp, iterations=CLOSED_LOOP_CG, name=name)

        costs, sizes, budget = _part_loads([J_bar[at] for at in ats], opts)
        fitted = parallel.tasks([functools.partial(refit, i) for i in range(len(plist))], costs, sizes, budget)
        for at, m, W in zip(ats, part_masks, fitted, strict=True):
            J_new[at] = np.where(m[0], W, 0.0)
        t1 = time.perf_counter()
        step: tuple[float, NDArray[np.float64], list[NDArray[np.generic]]] | None = None
        for alpha in STEPS:  # the step from J toward the re-fit: the feedback can overshoot
            J_try = J + alpha * (J_new - J)
            _set_joint(pruned, site, J_try)
            Y_try = _run_node(pruned, site.position, site.output)
            e = _output_error(Y_try, dense_rows.Y)
            if e < (best if step is None else step[0]):
                step = (e, J_try, Y_try)
        log.debug("%s: closed-loop round %d: hidden-state error %.6g -> %s (re-fit %.2f s, steps %.2f s)",
                  site.node, r + 1, best, "no step lowers it" if step is None else f"{step[0]:.6g}",
                  t1 - t0, time.perf_counter() - t1)  # fmt: skip
        if step is None:
            break
        best, J, Y = step
    _set_joint(pruned, site, J)
    return J


def _joint_mask(
    site: RecurrentSite, masks: Mapping[str, NDArray[np.bool_]], shape: tuple[int, ...]
) -> NDArray[np.bool_]:
    """The kept entries of ``[W R]`` (a tensor that is not re-fitted counts as all kept)."""
    D, GH, d = shape
    i = site.geometry.input_size
    mw = np.asarray(masks[site.W], bool) if site.W else np.ones((D, GH, i), bool)
    mr = np.asarray(masks[site.R], bool) if site.R else np.ones((D, GH, d - i), bool)
    return np.concatenate([mw.reshape(D, GH, i), mr.reshape(D, GH, d - i)], axis=2)
