"""The orchestrator: the only module that wires the graph layer, the gradient engine and the solvers.

    load ONNX → find prunable weights → per-sample gradients → solver → write pruned ONNX → evaluate

The solvers see flat arrays only (``w̄`` of length p, ``X`` of shape n × p scaled by 1/√n); the graph
layer sees per-tensor arrays only.  :class:`~chita_onnx.layout.Layout` maps between the two.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import TensorProto, numpy_helper

from . import __version__
from .batchprobe import open_settled
from .blas import solver_threads
from .checks import check_gradients, check_no_nan, first_bad, weight_refusal
from .config import DEFAULT_STAGES, CompressConfig, Fisher
from .data import (
    ArraySource,
    DataSpec,
    batch_size,
    materialize,
    open_source,
    split_holdout,
    validate_source,
    without_position_labels,
)
from .data_types import CalibrationSource, InputSpec
from .deploy import PATTERN_STORAGE_NOTE, dense_storage_note, sparse_storage_note, zstd_size
from .errors import ChitaError, ConfigError, DataError, FixedBatchError, GradientError, ModelError, UnsupportedOpError
from .evaluate import (
    Comparison,
    Evaluation,
    Reference,
    compare_to,
    evaluate,
    file_sizes,
    low_agreement_warning,
    make_session,
    reference,
    run_model,
)
from .gradients import GradientEngine, GradientMatrix
from .gradients.prepare import scored_output
from .graph import (
    PrunableTensor,
    check_model,
    densify,
    find_prunable,
    fixed_weights,
    get_weights,
    guessed_batch_names,
    kept_tensors,
    label_scores,
    load_model,
    model_inputs,
    save_model,
    write_weights,
)
from .guard import guarded
from .layout import Layout
from .limits import MAX_SEED, check_int, data_budget, peak_memory
from .paths import Output, OutputPlan, plan_outputs
from .patterns import PatternTensor, check_pattern, pattern_groups, pattern_summary, plan_pattern
from .progress import progress
from .reconstruct import HeadCache, correct_statistics, split_decision
from .report import FileSizes, Report, StageReport, TensorReport
from .solver import Budget, SolverResult, chita_blocked, chita_iht, magnitude, sparsity_schedule
from .solver import cbs as cbs_solver
from .solver import woodfisher as wf_solver
from .solver.budgets import keep_count, make_budget
from .solver.nm import NMStructure, solve_nm
from .standardize import DetachedInputs, restore_attention_projections, restore_initializer_inputs
from .support import assert_supported, no_weights_message, refuse_model
from .weightchains import (
    WeightChain,
    embedding_tables,
    expose_weights,
    fold_computed_weights,
    unfold_weight_chains,
    unprunable_layer_weights,
)

log = logging.getLogger(__name__)

_FLOATS = (TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16)
#: Multiply-adds one exact re-fit may cost when ``--fisher kl`` chooses its rows per input (see
#: :meth:`GradientOracle.plan_rows`): about a second on one core.  ``--distill`` spends
#: :data:`DISTILL_ROWS_BUDGET` (measured in BENCHMARKS.md: more rows per input pay off there).
KL_ROWS_BUDGET = 1e10
DISTILL_ROWS_BUDGET = 5e10
#: Exchange rounds of every --distill stage but the last.
DISTILL_ROUNDS = 2
#: Largest block of gradient rows :meth:`GradientOracle.fisher_diagonal` holds at once (bytes).
DIAGONAL_CHUNK_BYTES = 256 * 2**20
#: Temperature τ of --distill's KL: it fits ``KL(p_τ ‖ q_τ)`` between the dense and the pruned
#: model's distributions softened to ``∝ p^(1/τ)`` (logits divided by τ), so the relative logits
#: of the classes a confident model all but rules out are fitted too.  Chosen on the selection
#: images of BENCHMARKS.md ("--distill, round 2"): 2 (one value tried) against 1, the plain KL.
DISTILL_TEMPERATURE = 2.0


# ------------------------------------------------------------------------------------------ helpers


@dataclass
class PhaseTimer:
    """Wall-clock seconds per named phase.  Phases may repeat (times add up) and nest: time spent in
    an inner phase (gradients computed on demand by the block solver) is not counted again in the
    outer one, so the phases add up to the wall time."""

    seconds: dict[str, float] = field(default_factory=dict)
    _inner: list[float] = field(default_factory=list)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = time.perf_counter() - t0
            self.seconds[name] = self.seconds.get(name, 0.0) + spent - self._inner.pop()
            if self._inner:
                self._inner[-1] += spent


def _versions() -> dict[str, str]:
    import onnxruntime as ort
    import scipy

    return {
        "chita_onnx": __version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "python": platform.python_version(),
    }


def _num_classes(model: onnx.ModelProto, output: str | None) -> int | None:
    """``C`` of a ``[N, C]`` class output (``output``, else :func:`~.gradients.prepare.scored_output`:
    a scikit-learn ``output_label`` gives way to the probabilities the loss is taken of; a label or
    top-k output to the scores it reads, :func:`~.graph.label_scores`)."""
    name = output or scored_output(model)
    head = label_scores(model, name)  # a TopK's values or indices (or an ArgMax): its class scores
    name = name if head is None else head.scores
    known = {v.name: v for v in model.graph.value_info} | {o.name: o for o in model.graph.output}
    if name not in known:
        with suppress(Exception):  # shapes are a hint here; none is a valid answer
            known |= {v.name: v for v in onnx.shape_inference.infer_shapes(model).graph.value_info}
    vi = known.get(name)
    if vi is None or not vi.type.HasField("tensor_type"):
        return None
    dims = vi.type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value > 1:
        return int(dims[1].dim_value)
    return None


@dataclass(frozen=True)
class Prepared:
    """A loaded model, its prunable tensors and the data, validated before any work starts."""

    path: Path
    model: onnx.ModelProto
    tensors: tuple[PrunableTensor, ...]
    layout: Layout
    specs: tuple[InputSpec, ...]
    calib: CalibrationSource
    eval: CalibrationSource | None
    eval_source: str
    #: weights folded out of Transpose/Cast/Reshape chains (restored in the written model)
    chains: tuple[WeightChain, ...] = ()
    #: why no gradients can be built for this model (``--method auto`` only; then the default
    #: allocates by magnitude instead of refusing), or ""
    no_gradients: str = ""
    #: graph inputs that the loader detached from their initializers (put back on writing)
    detached: DetachedInputs = field(default_factory=DetachedInputs)
    #: the prunable tensors that ``--keep`` protects (named directly or by their layer or node)
    kept: frozenset[str] = frozenset()


def prepare(
    model_path: str | os.PathLike[str],
    data: DataSpec | None,
    config: CompressConfig,
    eval_data: DataSpec | None = None,
    *,
    hold_out: bool = True,
) -> Prepared:
    """Load the model and the data and check everything that can be checked up front."""
    path = Path(model_path)
    detached = DetachedInputs()
    model = load_model(path, record=detached)
    refuse_model(model, str(path))
    chains: tuple[WeightChain, ...] = ()
    if config.structure != "channel":  # channel pruning changes weight shapes and writes its own model
        model, chains = expose_weights(model)
    else:  # but a weight computed from constants alone (weight_norm's g·v/‖v‖) is a weight there too,
        # and a per-channel parameter computed from one (a TorchScript PReLU slope) is sliced as one
        model = fold_computed_weights(model, params=True)
    tensors = find_prunable(model)
    if not tensors and config.structure == "channel":
        hidden = [t.name for t in find_prunable(expose_weights(model)[0])]
        if hidden:
            raise ModelError(
                f"{path}: --structure channel finds no layer to slice: its {len(hidden)} prunable weight tensor(s) "
                f"({', '.join(hidden[:4])}{', ...' if len(hidden) > 4 else ''}) are read through an Einsum or a "
                "Transpose/Reshape/Cast chain, which only unstructured pruning rewrites; drop --structure channel"
            )
    if not tensors:
        raise ModelError(no_weights_message(model, str(path)))
    kept, unknown = kept_tensors(tensors, config.keep)
    if unknown:
        raise ConfigError(
            f"--keep={','.join(unknown)}: no prunable tensor, layer or node of that name; run `chita-onnx inspect`"
        )
    tensors = [t for t in tensors if t.name not in kept]
    if not tensors:
        raise ConfigError(f"--keep={','.join(config.keep)}: protects every prunable tensor, nothing left to prune")
    no_gradients = _gradient_refusal(lambda g: _check_prunable(path, model, tensors, config, gradients=g), config)
    specs = tuple(model_inputs(model))
    outputs = [o.name for o in model.graph.output]
    if config.output is not None and config.output not in outputs:
        raise ConfigError(f"--output={config.output!r}: {path} has outputs {outputs}")
    # with gradients: refuse Loop/Scan and ops nothing can differentiate, before any data is read
    if not no_gradients:
        supported = functools.partial(assert_supported, model, str(path), config.output)
        no_gradients = _gradient_refusal(lambda g: supported(gradients=g), config)
    else:
        assert_supported(model, str(path), config.output, gradients=False)  # a quantized model stays refused
    classes = _num_classes(model, config.output)
    calib: CalibrationSource | None = None
    if data is not None:
        kw = {"batch_size": config.batch_size, "seed": config.seed}
        model, specs, calib = open_settled(data, model, specs, str(path), **kw)
        validate_source(calib, specs, num_classes=classes)
    ev: CalibrationSource | None = None
    eval_source = ""
    if eval_data is not None:
        ev = open_source(eval_data, specs, batch_size=config.batch_size, seed=config.seed + 1, name="eval_data")
        validate_source(ev, specs, num_classes=classes)
        eval_source = str(eval_data) if isinstance(eval_data, (str, os.PathLike)) else "evaluation data"
    elif calib is not None and hold_out:
        whole = materialize(calib, specs, batch_size=config.batch_size)
        calib, ev = split_holdout(whole, config.holdout, seed=config.seed)
        eval_source = f"{config.holdout:.0%} of the calibration data, held out from pruning"
    if calib is not None:
        unlabelled = without_position_labels(calib)
        if unlabelled is not calib:
            log.info("the labels hold a class per position: they score the evaluation; the loss follows the model")
        calib = unlabelled
    if calib is not None and config.needs_gradients and any(n.op_type == "If" for n in model.graph.node):
        tensors = _drop_unreached(model, tensors, calib)
    layout = Layout.from_shapes((t.name, t.shape) for t in tensors)
    if calib is None:
        raise ConfigError("--data is required")
    return Prepared(
        path, model, tuple(tensors), layout, specs, calib, ev, eval_source, chains, no_gradients, detached, kept
    )


def _by_magnitude(config: CompressConfig, because: str, why: str, warnings: list[str]) -> tuple[CompressConfig, str]:
    """The default recipe without gradients: ``config`` with the magnitude allocation and the report's
    method line; the warning that says why goes to ``warnings``."""
    why = " ".join(why.split())[:300]
    warnings.append(f"no gradients for this model, so the layer sparsities come from magnitudes ({why})")
    chosen = f"method auto: layerwise with --allocation magnitude, because {because} ({why})"
    return config.with_(allocation="magnitude"), chosen


def refused_weights(
    model: onnx.ModelProto, tensors: Sequence[PrunableTensor], *, gradients: bool = True
) -> dict[str, str]:
    """``{tensor: why}`` for the prunable tensors that ``compress`` refuses: a dtype the gradient engine
    cannot differentiate (when ``gradients``), or a NaN/Inf value.  ``inspect`` marks the same ones."""
    out: dict[str, str] = {}
    for t in tensors:
        reason = weight_refusal(t.dtype, t.size, gradients=gradients)
        if reason is not None:
            out[t.name] = reason
    values = get_weights(model, [t.name for t in tensors if t.name not in out])
    for name, array in values.items():
        bad = first_bad(array)
        if bad is not None:
            out[name] = f"holds {array[bad]} at index {list(bad)}; weights must be finite"
    return out


def _gradient_refusal(check: Callable[[bool], None], config: CompressConfig) -> str:
    """Run ``check(gradients)`` with the method's need for gradients.  The default recipe needs them
    only for its allocation, which magnitudes can replace: for it, a refusal that only gradients
    cause (a weight dtype, an op without gradient) is returned as the reason, once ``check(False)``
    passes (NaN weights and quantized models stay refused); any other method raises it."""
    try:
        check(config.needs_gradients)
        return ""
    except ModelError as exc:
        if config.method != "auto" or not config.needs_gradients:
            raise
        check(False)
        return str(exc)


def _check_prunable(
    path: Path,
    model: onnx.ModelProto,
    tensors: Sequence[PrunableTensor],
    config: CompressConfig,
    *,
    gradients: bool | None = None,
) -> None:
    """Refuse weights the method cannot prune (``gradients``: whether it needs the gradient engine;
    default: ``config.needs_gradients``), NaN constants, and a budget that keeps nothing (unless
    allowed)."""
    needs = config.needs_gradients if gradients is None else gradients
    for name, why in refused_weights(model, tensors, gradients=needs).items():
        raise ModelError(f"{path}: cannot prune weight {name!r}: {why}")
    _check_constants(model, path)
    p = sum(t.size for t in tensors)
    if keep_count(config.sparsity, p) == 0 and not config.allow_empty:
        raise ConfigError(
            f"--sparsity={config.sparsity!r}: keeps round((1 - s)·p) = 0 of the {p:,} prunable weights, an all-zero "
            "model; pass --allow-empty if that is what you want"
        )


def _check_constants(model: onnx.ModelProto, where: str | os.PathLike[str]) -> None:
    """No NaN in any float initializer (see :func:`~chita_onnx.checks.check_no_nan`)."""
    floats = (t for t in model.graph.initializer if t.data_type in _FLOATS)
    check_no_nan(((t.name, numpy_helper.to_array(t)) for t in floats), str(where))


def _drop_unreached(
    model: onnx.ModelProto, tensors: Sequence[PrunableTensor], calib: CalibrationSource
) -> list[PrunableTensor]:
    """Weights used only inside If branches that the calibration data does not take (stored there,
    or main-graph initializers read by them) stay unpruned: no gradient reaches them.  They are left
    out of the prunable set, with a warning."""
    from .gradients.engine import reached_weights

    scoped = [t.name for t in tensors]
    try:
        reached, _ = reached_weights(model, scoped, next(iter(calib)))
    except ChitaError as exc:  # the gradient engine reports them later as zero columns
        log.info("could not tell which If branches the calibration data takes (%s)", exc)
        return list(tensors)
    gone = [n for n in scoped if n not in set(reached)]
    if gone:
        log.warning(
            "%d weight tensor(s) sit in If branches the calibration data never takes; they stay unpruned: %s",
            len(gone),
            ", ".join(gone[:4]) + (" ..." if len(gone) > 4 else ""),
        )
    return [t for t in tensors if t.name not in set(gone)]


# ------------------------------------------------------------------------------------- gradients


def _column_squares(X: NDArray[np.float32]) -> NDArray[np.float32]:
    """Column sums of squares of ``X (rows, p)``, squaring ``X`` in place (a scratch buffer): half the
    passes of a float64 ``einsum`` over a 13.5 M-column chunk.  The float32 sums are over one chunk's
    rows; the caller accumulates chunks in float64."""
    np.square(X, out=X)
    out: NDArray[np.float32] = np.add.reduce(X, axis=0)
    return out


def auto_fisher(fisher: Fisher, *, mini_batch: int = 1, first_order: bool = False) -> Fisher:
    """What ``--fisher auto`` means for ``compress`` and ``gradients``: the true Fisher (``kl``; on a
    non-classifier head the engine makes it the Gauss-Newton probe; see BENCHMARKS.md for the
    measurement behind the choice) when the rows are per sample.  Mini-batch rows
    (``mini_batch > 1``) and ``--first-order`` (its term is the mean of one row per sample) keep the
    engine's ``auto``: the empirical Fisher with labels, else sampled labels.  Other values as given."""
    return "kl" if fisher == "auto" and mini_batch == 1 and not first_order else fisher


class GradientOracle:
    """Per-sample gradient matrices at given weights, scaled by 1/√n for the solvers.

    The gradient graph of each tensor subset is built once (:class:`~chita_onnx.gradients.GradientEngine`);
    later calls only swap the weight values, which is what CHITA++ needs in every stage.
    """

    def __init__(self, prep: Prepared, config: CompressConfig) -> None:
        self.prep, self.config = prep, config
        self._engines: dict[tuple[str, ...], GradientEngine] = {}
        self._kind: str | None = None  # head_kind of the last engine, kept across release()
        total = sum(batch_size(b, prep.specs) for b in prep.calib)
        self.n = min(total, config.num_samples) // config.mini_batch
        if self.n < 1:
            have = f"the {total} calibration samples"
            if config.num_samples < total:
                have = f"--num-samples={config.num_samples}"
            raise ConfigError(f"--mini-batch={config.mini_batch}: larger than {have}")
        self.scale = np.float32(1.0 / math.sqrt(self.n))
        self.alpha: NDArray[np.float64] | None = None  # mean gradient of the last full matrix
        self.offset: NDArray[np.float64] | None = None  # row offsets of the last full matrix (--distill)
        self._samples: ArraySource | None = None  # calibration samples in memory, for row chunks
        self.loss_description = ""  # which loss the gradients are of (set when an engine is built)
        self.reference_probs: NDArray[np.float64] | None = None  # dense class distributions (--distill)
        # Rows of X per input (--fisher kl): at most --fisher-rows, lowered by plan_rows; reps is a
        # guess from the output shape until an engine says.
        self.fisher_rows = max(1, config.fisher_rows)
        self.classes = _num_classes(prep.model, config.output)
        self.fisher = auto_fisher(config.fisher, mini_batch=config.mini_batch, first_order=config.first_order)
        self.reps = 1
        if self.fisher == "kl":
            exact = self.classes is not None and self.classes <= self.fisher_rows
            self.reps = self.classes if exact and self.classes is not None else self.fisher_rows

    def plan_rows(self, k: int) -> int:
        """Choose the rows per input of ``--fisher kl`` for a solve keeping ``k`` weights; returns it.

        The exact re-fit costs about ``N·k·min(N, k)`` multiply-adds for ``N = n·R`` rows, so ``R`` is
        the largest count that keeps this under :data:`KL_ROWS_BUDGET` (:data:`DISTILL_ROWS_BUDGET`
        with ``--distill``) and ``X`` under ``--max-memory``, at most the cap, and at least 1: every
        class exactly when the model has few enough of them, Gaussian sketches otherwise.  The cap
        is ``--fisher-rows``; its default (0) means one row (as cheap as the other Fisher choices),
        or with ``--distill`` every class.  So with many weights (low sparsity) ``R`` is 1, with few
        (high sparsity) the rows can be the exact true Fisher.
        """
        if self.fisher != "kl":
            return 1
        n = self.n
        cap = self.config.fisher_rows or (max(1, self.classes or 1) if self.config.distill else 1)
        budget = DISTILL_ROWS_BUDGET if self.config.distill else KL_ROWS_BUDGET
        assert self.config.max_memory is not None
        mem_rows = max(1, self.config.max_memory // max(1, 4 * n * self.prep.layout.p))

        def ok(R: int) -> bool:
            N = n * R
            return N * k * min(N, k) <= budget and mem_rows >= R

        C = self.classes
        if C is not None and cap >= C and ok(C):
            rows = C
        else:
            rows = 1
            while rows < cap and (C is None or rows + 1 < C) and ok(rows + 1):
                rows += 1
        self.fisher_rows = rows
        self.reps = rows
        return rows

    @property
    def rows(self) -> int:
        """Rows of X: ``n`` inputs times :attr:`reps` rows each."""
        return self.n * self.reps

    def _engine(self, names: tuple[str, ...]) -> GradientEngine:
        if names not in self._engines:
            if not self.fits():
                self._engines.clear()  # block path: one onnxruntime session at a time bounds memory
            example = next(iter(self.prep.calib))
            engine = GradientEngine(
                self.prep.model,
                list(names),
                example=example,
                loss=self.config.loss,
                output=self.config.output,
                mini_batch=self.config.mini_batch,
            )
            self.loss_description = engine.loss_description
            fk = engine.resolve_fisher(self.fisher, example[1] is not None)
            self.reps = engine.rows_per_sample(fk, self.fisher_rows)
            self._engines[names] = engine
        return self._engines[names]

    def fits(self) -> bool:
        """Whether the whole ``n × p`` float32 matrix can be held: in ``--max-memory`` of RAM, or, with
        ``--workdir``, in a memory-mapped file there (if the disk has room).  Otherwise the solvers use
        the block approximation."""
        assert self.config.max_memory is not None
        need = self.rows * self.prep.layout.p * 4
        if self.config.workdir is not None and Path(self.config.workdir).is_dir():
            return need <= 0.9 * shutil.disk_usage(self.config.workdir).free
        return need <= self.config.max_memory

    def matrix(
        self, w: NDArray[np.float32], names: Sequence[str] | None = None, out: NDArray[np.float32] | None = None
    ) -> NDArray[np.float32]:
        """``X`` (n × p_subset, float32) at flat weights ``w``, scaled by 1/√n, for tensors ``names``."""
        layout = self.prep.layout
        key = tuple(names) if names is not None else layout.names
        engine = self._engine(key)
        engine.set_weights({k: v for k, v in layout.unflatten(w).items() if k in key})
        cfg = self.config
        if out is None and cfg.workdir is not None:
            out = self._mapped(sum(layout.slot(k).size for k in key))
        g = engine.compute(
            self.prep.calib,
            fisher=self.fisher,
            num_samples=cfg.num_samples,
            seed=cfg.seed,
            out=out,
            fisher_rows=self.fisher_rows,
            reference=self.reference_probs if names is None and cfg.distill else None,
            temperature=DISTILL_TEMPERATURE if cfg.distill else 1.0,
        )
        X = g.X
        check_gradients(X, engine.layout)
        self.reps = g.rows_per_sample
        # ½‖X(w − w_t) + b‖² is then the Gauss-Newton model of the mean KL from the dense outputs
        self.offset = None if g.offsets is None else g.offsets * float(self.scale)
        if names is None and cfg.first_order:
            if g.rows_per_sample > 1:
                raise ConfigError("--first-order: the mean gradient is not defined for --fisher kl rows")
            self.alpha = X.mean(axis=0, dtype=np.float64)
        X *= self.scale
        return X

    @property
    def head_kind(self) -> str | None:
        """What the loss is computed on (``logits``, ``probabilities``, ``binary``, ``regression``),
        once an engine has been built; else None."""
        return next((e.kind for e in self._engines.values()), self._kind)

    def release(self) -> None:
        """Drop the gradient engines (their onnxruntime training sessions and memory arenas) and the
        calibration samples held for row chunks.  What they said (:attr:`head_kind`,
        :attr:`loss_description`) stays; a later call builds an engine again.  The layer-wise pass
        calls it once its allocation has its gradients: otherwise the sessions, which hold memory for
        a backward pass, stay allocated through the whole pass."""
        self._kind = self.head_kind
        self._engines.clear()
        self._samples = None

    def fisher_diagonal(self, w: NDArray[np.float32], chunk_bytes: int = DIAGONAL_CHUNK_BYTES) -> NDArray[np.float64]:
        """``diag(XᵀX)`` (``(p,)``, float64) of the scaled ``X`` that :meth:`matrix` would return at ``w``,
        without holding ``X``: the rows are computed a chunk of inputs at a time into one reused
        buffer of at most ``chunk_bytes`` (seeded draws continue across chunks, so the rows are those
        of one pass) and only their squares are summed.  For the OBD allocation, which needs nothing
        else: on a 13.5 M-weight model with 51 samples this avoids a 2.75 GB matrix.
        """
        layout = self.prep.layout
        p = layout.p
        engine = self._engine(layout.names)
        R = engine.rows_per_sample(engine.resolve_fisher(self.fisher, engine.has_labels), self.fisher_rows)
        per_chunk = max(1, chunk_bytes // max(1, 4 * p * R))  # inputs per chunk
        if per_chunk >= self.n:  # one chunk: the plain matrix
            diag: NDArray[np.float64] = _column_squares(self.matrix(w)).astype(np.float64)
            return diag
        engine.set_weights(layout.unflatten(w))
        diag = np.zeros(p, np.float64)
        for _, _, Xc in self._row_chunks(engine, per_chunk, R, "Fisher diagonal"):
            diag += _column_squares(Xc)
        diag *= float(self.scale) ** 2
        return diag

    def _row_chunks(
        self, engine: GradientEngine, per_chunk: int, R: int, desc: str
    ) -> Iterator[tuple[int, int, NDArray[np.float32]]]:
        """The unscaled rows of ``engine``'s gradient matrix, ``per_chunk`` inputs (``per_chunk·R`` rows)
        at a time, as ``(first row, stop row, rows)``; the rows are a view into one reused buffer,
        valid until the next step.  Seeded draws (sampled labels, KL sketches) continue where the
        previous chunk stopped, so the rows equal those of an unchunked pass."""
        if self._samples is None:
            self._samples = materialize(self.prep.calib, self.prep.specs, batch_size=self.config.batch_size)
        m = self.config.mini_batch
        per_chunk = min(per_chunk, self.n)
        buf = np.empty((per_chunk * R, engine.layout.p), np.float32)
        chunks = range(0, self.n, per_chunk)
        for r0 in progress(chunks, total=len(chunks), desc=desc, unit="chunk"):
            r1 = min(self.n, r0 + per_chunk)
            part = self._samples.take(np.arange(r0 * m, r1 * m))
            g = engine.compute(
                part,
                fisher=self.fisher,
                seed=self.config.seed,
                fisher_rows=self.fisher_rows,
                first_sample=r0,
                out=buf[: (r1 - r0) * R],
            )
            check_gradients(g.X, engine.layout, first_row=r0 * R)
            yield r0 * R, r1 * R, g.X

    def set_reference(self, w: NDArray[np.float32]) -> None:
        """Remember the class distributions of the model at ``w`` (the dense one) on the calibration
        inputs: the targets of ``--distill``."""
        engine = self._engine(self.prep.layout.names)
        engine.set_weights(self.prep.layout.unflatten(w))
        self.reference_probs = engine.probabilities(self.prep.calib, self.config.num_samples)[: self.n]

    def _mapped(self, p: int) -> NDArray[np.float32]:
        """An (n, p) float32 matrix in an anonymous file under ``--workdir`` (deleted when unmapped)."""
        folder = Path(self.config.workdir or ".")
        if not folder.is_dir():
            raise ConfigError(f"--workdir={folder}: not an existing folder")
        fh = tempfile.TemporaryFile(prefix="chita_gradients_", dir=folder)  # noqa: SIM115 (lives with the map)
        fh.truncate(self.rows * p * 4)
        log.info(
            "gradient matrix (%d x %d, %.2f GiB) memory-mapped under %s",
            self.rows,
            p,
            self.rows * p * 4 / 2**30,
            folder,
        )
        return np.memmap(fh, dtype=np.float32, mode="r+", shape=(self.rows, p))

    def columns(self, w: NDArray[np.float32], timer: PhaseTimer) -> Callable[[int, int], NDArray[np.float32]]:
        """A ``columns(a, b)`` callback for the block solver: scaled gradient columns ``[a, b)`` at ``w``.

        The gradients of the tensors overlapping ``[a, b)`` are computed for all rows at once when
        they fit in a quarter of ``--max-memory``; otherwise the rows are computed in chunks of
        samples into one reused buffer of at most that quarter, and only the requested columns are
        kept.  The block solver holds its column group in half of ``--max-memory`` (see
        :func:`chita_blocked`), so the group being built plus these temporaries stay within
        three quarters of it, and the gradient arrays of the whole path within ``--max-memory``.
        """
        slots = self.prep.layout.slots
        assert self.config.max_memory is not None
        room = self.config.max_memory // 4

        def columns(a: int, b: int) -> NDArray[np.float32]:
            hit = [s for s in slots if s.offset < b and s.stop > a]
            names = [s.name for s in hit]
            start = a - hit[0].offset
            width = sum(s.size for s in hit)
            with timer.phase("gradients"):
                if self.rows * width * 4 <= room:
                    return np.ascontiguousarray(self.matrix(w, names)[:, start : start + (b - a)])
                return self._columns_by_rows(w, names, start, b - a, max(1, room // (width * 4 * self.reps)))

        return columns

    def _columns_by_rows(
        self, w: NDArray[np.float32], names: Sequence[str], start: int, width: int, rows: int
    ) -> NDArray[np.float32]:
        """Columns ``start : start + width`` of the tensors ``names``, computed ``rows`` inputs at a
        time (:meth:`_row_chunks`), so the rows equal those of an unchunked run."""
        key = tuple(names)
        engine = self._engine(key)
        engine.set_weights({k: v for k, v in self.prep.layout.unflatten(w).items() if k in key})
        out = np.empty((self.rows, width), np.float32)
        for a, b, Xc in self._row_chunks(engine, rows, self.reps, "gradient rows"):
            out[a:b] = Xc[:, start : start + width]
        out *= self.scale
        return out


# --------------------------------------------------------------------------------------- solving


def solve(
    method: str,
    config: CompressConfig,
    X: NDArray[np.float32] | None,
    w: NDArray[np.float32],
    budget: Budget,
    alpha: NDArray[np.float64] | None = None,
    blocks: Sequence[tuple[int, int]] | None = None,
    offset: NDArray[np.float64] | None = None,
    max_rounds: int | None = None,
) -> SolverResult:
    """Dispatch one solve of ``method`` on the (already scaled) gradient matrix ``X`` (n × p).

    ``blocks`` are WoodFisher's diagonal blocks when the budget's segments are not the tensors.
    ``offset`` (``--distill``, CHITA only): row offsets ``b`` of the least-squares model
    ``½‖X(w − w̄) + b‖²`` (see :func:`chita_iht`)."""
    if method == "magnitude" and config.update != "obs":
        return magnitude(w, budget, X=X, ridge=config.ridge)
    if X is None:
        raise ValueError(f"method {method} needs the gradient matrix")
    if method in ("chita", "chita++"):
        return chita_iht(
            X,
            w,
            budget,
            config.ridge,
            alpha,
            max_iter=config.max_iter,
            start=config.rank,
            offset=offset,
            max_rounds=max_rounds,
        )
    if method == "magnitude":
        return magnitude(w, budget, X=X, ridge=config.ridge, update="obs", alpha=alpha)
    if method == "wf":
        return wf_solver(X, w, budget, config.ridge, update=config.update != "none", blocks=blocks)
    if method in ("cbs", "cbs-s"):
        return cbs_solver(X, w, budget, config.ridge, update=method == "cbs" and config.update != "none")
    raise ConfigError(f"--method={method!r}: unknown")


def pattern_structure(prep: Prepared, config: CompressConfig) -> tuple[tuple[PatternTensor, ...], NMStructure] | None:
    """For ``--pattern N:M``: every tensor's reduction axis (or why it stays dense) and the solvers'
    :class:`NMStructure` over the layout; ``None`` for unstructured pruning."""
    nm = config.nm
    if nm is None:
        return None
    plan = plan_pattern(prep.model, prep.tensors, nm)
    groups = pattern_groups(plan, prep.layout, nm.m)
    if groups.shape[0] == 0:
        raise ConfigError(
            f"--pattern={nm}: no prunable tensor of {prep.path} has a reduction axis whose length is a multiple of "
            f"{nm.m} ({'; '.join(f'{t.name}: {t.reason}' for t in plan[:3])})"
        )
    return plan, NMStructure.build(prep.layout.p, groups, nm, prep.layout.segments)


def _model_with(prep: Prepared, w: NDArray[np.float32]) -> onnx.ModelProto:
    return write_weights(prep.model, prep.layout.unflatten(w), storage="dense")[0]


def initial_weights(prep: Prepared) -> NDArray[np.float32]:
    """``w̄``: the trained prunable weights as one flat float32 vector (p,)."""
    return prep.layout.flatten(get_weights(prep.model, prep.layout.names), dtype=np.float32)


def prune(
    prep: Prepared,
    config: CompressConfig,
    oracle: GradientOracle | None = None,
    timer: PhaseTimer | None = None,
    on_stage: Callable[[int, float, SolverResult, NDArray[np.float32], float], StageReport] | None = None,
    X0: NDArray[np.float32] | None = None,
    structure: NMStructure | None = None,
    head_cache: HeadCache | None = None,
) -> tuple[NDArray[np.float32], list[StageReport], SolverResult]:
    """Run the configured method (every stage of CHITA++) and return the pruned flat weights.

    ``X0`` is an already computed, scaled gradient matrix at ``w̄`` that the first stage may reuse
    (the sweep shares it between methods).  Later CHITA++ stages recompute X at the current weights.
    With ``--pattern N:M`` every solve keeps at most N of every group (``structure``, built from the
    graph when not given); CHITA++ stages tighten the per-group cap towards N (``NMStructure.budget``).
    ``head_cache``: filled by the layer-wise pass for the statistics correction (:class:`HeadCache`).
    """
    timer = timer or PhaseTimer()
    if config.method == "layerwise":
        return _prune_layerwise(prep, config, oracle, timer, on_stage, X0, head_cache)
    if config.distill and X0 is None:
        prep, mixed = _with_mixtures(prep, config)
        if mixed is not config:
            config, oracle = mixed, None  # (an oracle of the calibration inputs alone is rebuilt below)
    w = initial_weights(prep)
    sizes = [s.size for s in prep.layout.slots]
    if structure is None and config.nm is not None:
        planned = pattern_structure(prep, config)
        assert planned is not None
        structure = planned[1]
    target = config.sparsity if structure is None else structure.pattern.sparsity
    if config.method == "chita++":
        assert config.stages is not None and config.start_sparsity is not None
        levels = sparsity_schedule(config.stages, target, config.schedule, min(config.start_sparsity, target))
    else:
        levels = (target,)
    if config.needs_gradients and oracle is None:
        oracle = GradientOracle(prep, config)
    stages: list[StageReport] = []
    result: SolverResult | None = None
    for t, level in enumerate(levels, start=1):
        t0 = time.perf_counter()
        if structure is None:
            budget = make_budget(sizes, level, scope=config.scope, min_density=config.min_density)
        else:
            budget = structure.budget(level)
        if oracle is not None and not (X0 is not None and t == 1):
            oracle.plan_rows(budget.k)
        if oracle is None:
            with timer.phase("solve"), solver_threads():
                result = _solve_stage(config, None, w, budget, None, structure, level)
        elif not oracle.fits():
            if structure is not None:
                raise ConfigError(
                    f"--pattern={structure.pattern}: the gradient matrix needs "
                    f"{oracle.n * prep.layout.p * 4 / 2**30:.2f} GiB, more than --max-memory, and the block "
                    "approximation does not support N:M patterns; raise --max-memory or give --workdir"
                )
            if config.method not in ("chita", "chita++"):
                raise ConfigError(
                    f"--max-memory={config.max_memory}: the gradient matrix needs "
                    f"{oracle.rows * prep.layout.p * 4 / 2**30:.2f} GiB and only chita and chita++ have a block path"
                )
            log.info("X (%d x %d) exceeds --max-memory: block approximation", oracle.rows, prep.layout.p)
            if config.first_order or config.rank != "magnitude" or config.distill:
                log.warning("the block path ranks by magnitude and ignores --first-order, --rank and --distill")
            assert config.max_memory is not None
            with timer.phase("solve"), solver_threads():
                result = chita_blocked(
                    oracle.columns(w, timer),
                    w,
                    budget,
                    config.ridge,
                    None,
                    block_size=config.block_size,
                    max_memory_bytes=config.max_memory,
                    n=oracle.rows,
                    max_iter=config.max_iter,
                )
        else:
            if config.distill and t == 1:
                with timer.phase("gradients"):
                    oracle.set_reference(w)  # the dense outputs: at w̄ the KL and its gradient are 0
            if X0 is not None and t == 1:
                X = X0
            else:
                with timer.phase("gradients"):
                    X = oracle.matrix(w)
            alpha = oracle.alpha if config.first_order else None
            offset = oracle.offset if config.distill and t > 1 else None
            # --distill: the next stage re-linearises and searches again, so only the last stage
            # runs the exchange search to convergence (BENCHMARKS.md §6)
            rounds = DISTILL_ROUNDS if config.distill and t < len(levels) else None
            with timer.phase("solve"), solver_threads():
                result = _solve_stage(config, X, w, budget, alpha, structure, level, offset, rounds)
            del X
        if not result.converged:
            log.warning(
                "stage %d: the %s solver did not converge in %d iterations", t, config.method, result.iterations
            )
        w = np.asarray(result.w, dtype=np.float32)
        if int(np.count_nonzero(w)) > budget.k:
            raise AssertionError(f"solver kept {np.count_nonzero(w)} > k={budget.k} weights")
        if on_stage is not None:
            stages.append(on_stage(t, level, result, w, time.perf_counter() - t0))
        else:
            stages.append(
                StageReport(
                    t,
                    level,
                    budget.k,
                    _finite(result.objective),
                    result.iterations,
                    result.converged,
                    None,
                    None,
                    time.perf_counter() - t0,
                )
            )
        log.info("stage %d/%d: sparsity %.4f, objective %s", t, len(levels), level, stages[-1].objective)
    assert result is not None
    if config.update == "layerwise":
        from .reconstruct import refit_layerwise

        with timer.phase("layerwise"), solver_threads():
            w, extra = refit_layerwise(prep, config, w)
        result = dataclasses.replace(result, w=w, info={**result.info, **extra})
    return w, stages, result


def _with_mixtures(prep: Prepared, config: CompressConfig) -> tuple[Prepared, CompressConfig]:
    """``--distill``: the calibration inputs followed by mixtures of pairs of them, the inputs
    the KL to the dense outputs is fitted on (:func:`chita_onnx.augment.mixed_inputs`; BENCHMARKS.md,
    "The high-sparsity switch").  Unchanged when the inputs cannot be mixed."""
    from .augment import mixed_inputs

    whole = materialize(prep.calib, prep.specs, batch_size=config.batch_size)
    mixed = mixed_inputs(whole, config.num_samples, config.seed)
    if mixed is None:
        log.info("--distill: the calibration inputs are not all floating point; fitting on them alone")
        return prep, config
    n = min(whole.num_samples, config.num_samples)
    log.info("--distill: fitting on %d calibration inputs and %d mixtures of them", n, mixed.num_samples - n)
    return dataclasses.replace(prep, calib=mixed), config.with_(num_samples=mixed.num_samples)


def _solve_stage(
    config: CompressConfig,
    X: NDArray[np.float32] | None,
    w: NDArray[np.float32],
    budget: Budget,
    alpha: NDArray[np.float64] | None,
    structure: NMStructure | None,
    level: float,
    offset: NDArray[np.float64] | None = None,
    max_rounds: int | None = None,
) -> SolverResult:
    """One solve: plain, or under the N:M pattern (permuted problem, see :func:`solve_nm`).

    ``offset`` (row space, ``--distill``) is unchanged by the column permutation of the N:M path."""
    if structure is None:
        return solve(config.method, config, X, w, budget, alpha, offset=offset, max_rounds=max_rounds)

    def run(Xp: NDArray[np.floating] | None, wp: NDArray[np.floating], b: Budget, ap: NDArray[np.floating] | None,
            blocks: tuple[tuple[int, int], ...]) -> SolverResult:  # fmt: skip
        Xf = None if Xp is None else np.asarray(Xp, dtype=np.float32)
        a64 = None if ap is None else np.asarray(ap, dtype=np.float64)
        return solve(
            config.method, config, Xf, np.asarray(wp, dtype=np.float32), b, a64, blocks, offset, max_rounds
        )

    return solve_nm(run, X, w, structure, alpha, level)
def _prune_layerwise(
    prep: Prepared,
    config: CompressConfig,
    oracle: GradientOracle | None,
    timer: PhaseTimer,
    on_stage: Callable[[int, float, SolverResult, NDArray[np.float32], float], StageReport] | None,
    X0: NDArray[np.float32] | None,
    head_cache: HeadCache | None = None,
) -> tuple[NDArray[np.float32], list[StageReport], SolverResult]:
    """``--method layerwise``: budget allocation, then select and re-fit layer by layer in graph order."""
    from .reconstruct import prune_layerwise

    t0 = time.perf_counter()
    w_bar = initial_weights(prep)
    grad_oracle = oracle

    def oracle_for(rows: int | None) -> GradientOracle:
        """The oracle on ``rows`` calibration samples (all of --num-samples when None), built once."""
        nonlocal grad_oracle
        cfg = config if rows is None else config.with_(num_samples=min(rows, config.num_samples))
        if grad_oracle is None or grad_oracle.config.num_samples != cfg.num_samples:
            grad_oracle = GradientOracle(prep, cfg)
        return grad_oracle

    def gradients(rows: int | None = None) -> NDArray[np.float32] | None:
        """X at w̄ on ``rows`` calibration samples (all of --num-samples when None); reuses ``X0``."""
        if X0 is not None and (rows is None or X0.shape[0] <= rows):
            return X0
        try:
            o = oracle_for(rows)
            if not o.fits():
                return None
            with timer.phase("gradients"):
                X = o.matrix(w_bar)
            o.release()  # the pass needs no more gradients: free the sessions' memory for it
            return X
        except UnsupportedOpError as exc:  # e.g. a recurrent node too long to unroll: the pass needs no gradients
            log.warning("no gradients for the allocation (%s)", exc)
            return None

    def diagonal(rows: int) -> NDArray[np.float64] | None:
        """diag(XᵀX) at w̄ on ``rows`` calibration samples, a chunk of rows at a time; reuses ``X0``."""
        if X0 is not None and X0.shape[0] <= rows:
            d0: NDArray[np.float64] = np.einsum("ij,ij->j", X0, X0, dtype=np.float64)
            return d0
        try:
            o = oracle_for(rows)
            with timer.phase("gradients"):
                diag = o.fisher_diagonal(w_bar)
            o.release()  # the pass needs no more gradients: free the sessions' memory for it
            return diag
        except UnsupportedOpError as exc:
            log.warning("no gradients for the allocation (%s)", exc)
            return None

    def head_kind() -> str | None:
        return None if grad_oracle is None else grad_oracle.head_kind

    with timer.phase("layerwise"), solver_threads():
        result = prune_layerwise(prep, config, w_bar, gradients, diagonal, head_kind, head_cache)
    if oracle is not None and grad_oracle is not None and grad_oracle is not oracle:
        oracle.loss_description = grad_oracle.loss_description  # the allocation's gradients, for the report
    w = np.asarray(result.w, dtype=np.float32)
    k = keep_count(config.sparsity, prep.layout.p)
    if int(np.count_nonzero(w)) > k:
        raise AssertionError(f"layer-wise pass kept {np.count_nonzero(w)} > k={k} weights")
    seconds = time.perf_counter() - t0
    if on_stage is not None:
        stage = on_stage(1, config.sparsity, result, w, seconds)
    else:
        stage = StageReport(1, config.sparsity, k, None, 1, True, None, None, seconds)
    return w, [stage], result


def resolve_method(prep: Prepared, config: CompressConfig) -> tuple[CompressConfig, str]:
    """``--method auto`` (the default): the configuration to run and one line saying why.

    The default recipe is layer-wise reconstruction (``layerwise``: OBD allocation of the global
    budget, SparseGPT selection and an exact ridge re-fit per layer on its input Gram) wherever every
    prunable weight is the weight of a Conv, Gemm or MatMul of the main graph (after the ``If`` nodes
    that the calibration data decide are inlined, :func:`~chita_onnx.activations.inline_fixed_ifs`), chosen on held-out
    selection data (README, "Default recipe"; BENCHMARKS.md §7), or the ``W``/``R`` of an LSTM, GRU or
    RNN node (:mod:`chita_onnx.rnnlayers`; BENCHMARKS.md, "Recurrent weights in the layer-wise
    pass").  Weights the pass cannot reconstruct (weights inside subgraphs the data do not decide,
    the ``R`` of a GRU with ``linear_before_reset=0`` and a non-Sigmoid reset gate, a MatMul's 3-D
    constant weight, ...; :func:`~chita_onnx.rnnlayers.split_layers`) degrade per weight: while they
    hold at most half of the ``p`` prunable weights the method stays ``layerwise`` and they are only
    pruned to their allocated share before the pass (:func:`~chita_onnx.reconstruct.prune_refused`;
    the reason names them).  Beyond that, and with options only CHITA has
    (``--update``, ``--first-order``, ``--rank obd``), it is one-shot ``chita``.  With ``--pattern
    N:M`` it is ``chita++`` (10 stages), the best N:M method on 5 of the 6 models of the N:M
    benchmark.  Any other method is returned unchanged with an empty reason.
    """
    if config.method != "auto":
        return config, ""
    from .reconstruct import batches_of, layer_model
    from .rnnlayers import RecurrentSite, split_layers

    rnn = False
    refused: dict[str, str] = {}

    why = ""
    if config.nm is not None:
        # N:M: multi-stage CHITA++ was the best 2:4 method on 5 of the 6 models measured (BENCHMARKS.md,
        # N:M section: +0.1 to +51 points over one-shot CHITA; -9.6 on the PP-OCR tiny recogniser); the
        # layer-wise pass does not keep patterns
        return (
            config.with_(method="chita++", stages=DEFAULT_STAGES),
            f"method auto: chita++ with {DEFAULT_STAGES} stages, the best method for --pattern {config.pattern}",
        )
    if config.update != "auto":
        why = f"--update {config.update} is given"
    elif config.first_order or config.rank != "magnitude":
        why = "--first-order/--rank obd are CHITA options"
    else:
        try:
            sites, refused = split_layers(layer_model(prep, batches_of(prep, config)), prep.layout.names)
            rnn = any(isinstance(s, RecurrentSite) for s in sites)
            # (layers too wide to solve in memory are handled sites here: the pass prunes them by their
            # allocation, reconstruct.too_wide; chita's X would not fit either)
        except ChitaError as exc:
            why = f"the layer-wise pass cannot handle every weight ({exc})"
        if refused:
            # per weight: the pass reconstructs the rest and prunes these by their allocation alone
            # (reconstruct.prune_refused), as long as they hold at most half of the prunable weights
            sizes = {sl.name: sl.size for sl in prep.layout.slots}
            left = sum(sizes[n] for n in refused)
            listed = "; ".join(f"{n} ({r})" for n, r in list(refused.items())[:5])
            more = f"; and {len(refused) - 5} more" if len(refused) > 5 else ""
            if 2 * left > prep.layout.p or not sites:
                why = (
                    f"the layer-wise pass cannot handle {left:,} of the {prep.layout.p:,} prunable weights "
                    f"(more than half): {listed}{more}"
                )
    if not why:
        # after the layer-wise re-fit (which fits the dense layer outputs, means included) the automatic
        # statistics correction changed the selection scores by at most 0.2 points at 0.5-0.9 and cost
        # 25-50% more time (BENCHMARKS.md §7): the default leaves it off; --method layerwise keeps auto
        stats = {k: "off" for k in ("bn_recalibrate", "bias_correction") if getattr(config, k) == "auto"}
        rec = "; LSTM/GRU/RNN W and R fitted per direction on [x_t; h_t-1]" if rnn else ""
        if refused:
            return (
                config.with_(method="layerwise", **stats),
                f"method auto: layerwise{f' ({rec[2:]})' if rec else ''}; {len(refused)} tensor(s) with {left:,} of "
                f"the {prep.layout.p:,} prunable weights are not reconstructed: each is pruned to its allocated "
                f"share of the budget by its allocation saliency before the pass, nothing re-fitted: {listed}{more}",
            )
        return (
            config.with_(method="layerwise", **stats),
            f"method auto: layerwise (every prunable weight is a layer's weight{rec})",
        )
    return config.with_(method="chita"), f"method auto: chita, because {why}"


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------------------------ entry point


def _check_paths(*args: tuple[str, object]) -> None:
    """Path arguments of the Python entry points are paths (or ``None`` where optional)."""
    for what, value in args:
        if value is not None and not isinstance(value, (str, os.PathLike)):
            hint = " (save it with onnx.save first)" if isinstance(value, onnx.ModelProto) else ""
            raise ConfigError(f"{what}: expected a file path, got a {type(value).__name__}{hint}")


@guarded
def compress(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    data: DataSpec,
    config: CompressConfig | None = None,
    *,
    eval_data: DataSpec | None = None,
    report: str | os.PathLike[str] | None = None,
) -> Report:
    """Prune ``model`` to ``config.sparsity`` with ``config.method`` and write it to ``output``.

    ``data`` is the calibration data (a ``.npz`` path, a folder of them, ``"random"``, a mapping of
    arrays, or any re-iterable source of batches).  The dense and pruned models are evaluated with
    onnxruntime on ``eval_data``, or on a held-out part of ``data`` that is never used for pruning.
    ``report`` is an optional path for the report as JSON.

    Every path is checked before any work (:mod:`chita_onnx.paths`): no output may be an input or
    another output.  The inputs are never modified; the outputs appear together and atomically
    when the run succeeds, and nothing is left behind when it fails.
    """
    _check_paths(("MODEL", model), ("OUTPUT", output), ("--report", report))
    if config is not None and not isinstance(config, CompressConfig):
        raise ConfigError(
            f"config: expected a chita_onnx.CompressConfig, got a {type(config).__name__} (CompressConfig(**fields))"
        )
    config = config or CompressConfig()
    plan = plan_outputs(
        [("OUTPUT", output), ("--report", report)], model=model, data=data, eval_data=eval_data, workdir=config.workdir
    )
    with plan, data_budget(config.max_memory):
        result = _compress(model, plan, data, config, eval_data)
        if report is not None:
            plan.staged("--report").write_text(result.to_json() + "\n")
        plan.commit()
    return result


def written_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Each stored tensor's shape in ``model`` (dense or sparse initializer): the report shows a
    weight's shape as the written file holds it, not as the pruning saw it (an Einsum's 3-D weight
    was pruned as its MatMul's 2-D one, a weight read through a Transpose as the transposed one)."""
    shapes = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    shapes.update({sp.values.name: tuple(int(d) for d in sp.dims) for sp in model.graph.sparse_initializer})
    return shapes


def blame_data(model: Path, calibration: CalibrationSource, specs: Sequence[InputSpec]) -> None:
    """After onnxruntime failed to run a graph somewhere inside pruning (the gradient graph, a segment
    of the layer-wise pass: messages that cannot name the data), run the dense model over every calibration
    batch; when that fails too, the data is at fault: raise a :class:`DataError` naming the file and
    batch (an out-of-range token id, say).  Otherwise return, and the original error stands."""
    try:
        run_model(make_session(model), calibration, specs, desc="calibration check")
    except ModelError as exc:
        raise DataError(f"the calibration data does not run through the dense model: {exc}") from None
    except ChitaError:
        return


def _compress(
    model: str | os.PathLike[str], plan: OutputPlan, data: DataSpec, config: CompressConfig, eval_data: DataSpec | None
) -> Report:
    """The run itself; the pruned model is written to ``plan.staged("OUTPUT")``."""
    timer = PhaseTimer()
    in_path, out_path, staged = Path(model), plan.path("OUTPUT"), plan.staged("OUTPUT")
    with timer.phase("load"):
        prep = prepare(in_path, data, config, eval_data)
        calibration = prep.calib  # all of it: split_decision below holds some out
        requested = config
        config, chosen = resolve_method(prep, config)
        planned = pattern_structure(prep, config)
        # channel pruning makes no statistics-correction decision: all the calibration data is its own
        prep, decide = (prep, None) if config.structure == "channel" else split_decision(prep, config)
    structure = None if planned is None else planned[1]
    warnings: list[str] = []
    if prep.no_gradients and config.needs_gradients:
        if config.method != "layerwise":
            raise ModelError(f"{prep.no_gradients} ({chosen})")  # the default chose a method that needs them
        config, chosen = _by_magnitude(config, "no gradients can be built", prep.no_gradients, warnings)
    if chosen:
        log.info("%s", chosen)
    if isinstance(data, str) and data == "random":
        warnings.append("pruned with random calibration data: quality needs real data")
    identities = {r.identity for r in prep.detached.projections}  # stand-ins that the writer removes
    fixed = fixed_weights(prep.model)
    if fixed:
        warnings.append(
            f"{len(fixed)} layer weight tensor(s) hold only integers, a fixed operator (as YOLOv8's DFL Conv "
            f"arange(16)), and are left exactly as they are: {', '.join(fixed[:5])}{' ...' if len(fixed) > 5 else ''}"
        )
    dense_layers = unprunable_layer_weights(
        prep.model, {t.name for t in prep.tensors} | prep.kept | identities | set(fixed)
    )
    if dense_layers:
        listed = ", ".join(f"{n} ({op}, {size:,})" for n, op, size in dense_layers[:5])
        more = f" and {len(dense_layers) - 5} more" if len(dense_layers) > 5 else ""
        warnings.append(
            f"{len(dense_layers)} layer weight tensor(s) with {sum(s for *_, s in dense_layers):,} weights are not "
            f"prunable and stay dense, outside the sparsity budget: {listed}{more}"
        )
    tables = embedding_tables(prep.model, {t.name for t in prep.tensors})
    if tables:
        table_names = {n for n, _ in tables}
        others: dict[str, set[str]] = {}  # a tied table is also a layer's weight (an LM's output projection)
        for node in prep.model.graph.node:
            if node.op_type != "Gather":
                for name in table_names.intersection(node.input):
                    others.setdefault(name, set()).add(node.op_type)

        def tied(n: str) -> str:
            ops = others.get(n)
            return f"; also read by {'/'.join(sorted(ops))}: tied weights, left dense for both uses" if ops else ""

        listed = ", ".join(f"{n} ({size:,}{tied(n)})" for n, size in tables[:5])
        more = f" and {len(tables) - 5} more" if len(tables) > 5 else ""
        warnings.append(
            f"{len(tables)} embedding table(s) read by Gather with {sum(s for _, s in tables):,} weights are not "
            f"pruned (as usual for embeddings) and stay dense, outside the sparsity budget: {listed}{more}"
        )

    ref: Reference | None = None
    if prep.eval is not None:
        with timer.phase("evaluate"):
            ref = reference(in_path, prep.eval, prep.specs, config.output, all_outputs=True)
    if config.structure == "channel":  # channel pruning: its own orchestration (chita_onnx.structured)
        from .structured.run import compress_channels

        return compress_channels(prep, out_path, staged, config, ref, timer, warnings)

    def stage_eval(t: int, level: float, res: SolverResult, w: NDArray[np.float32], seconds: float) -> StageReport:
        acc = agree = None
        t0 = time.perf_counter() - seconds  # the stage's gradients and solve, plus this evaluation
        if config.method == "chita++" and ref is not None and prep.eval is not None:
            with timer.phase("evaluate"):
                c = compare_to(ref, _model_with(prep, w).SerializeToString(), prep.eval, prep.specs)
            acc, agree = c.pruned_accuracy, c.agreement
        k = keep_count(level, prep.layout.p) if structure is None else structure.budget(level).k
        return StageReport(
            t, level, k, _finite(res.objective), res.iterations, res.converged, acc, agree, time.perf_counter() - t0
        )

    oracle = GradientOracle(prep, config) if config.needs_gradients else None
    head_cache = HeadCache()  # the layer-wise pass's head tensors, for the class offsets
    try:
        try:
            w, stages, result = prune(
                prep, config, oracle, timer, stage_eval, structure=structure, head_cache=head_cache
            )
        except FixedBatchError as exc:
            if requested.method != "auto" or config.method != "layerwise" or config.allocation not in ("obd", "chita"):
                raise
            # a fixed batch the graph bakes in: no per-sample gradients, but the pass runs the model's
            # own batches; the layer sparsities come from magnitudes, and the report says why
            log.info("no per-sample gradients (%s): layer-wise with the magnitude allocation", exc)
            config, chosen = _by_magnitude(config, "its fixed batch cannot be opened", str(exc), warnings)
            w, stages, result = prune(
                prep, config, None, timer, stage_eval, structure=structure, head_cache=head_cache
            )
    except Exception as exc:
        if isinstance(exc, ChitaError) and exc.run_failed:
            blame_data(in_path, calibration, prep.specs)  # raises a DataError naming the file and batch
        if requested.method != "auto" or config.method != "layerwise" or isinstance(exc, (MemoryError, DataError)):
            raise  # a data error is about the data, which chita would read too: it stands, said once
        if prep.no_gradients:  # chita would need the gradients that cannot be built: the pass's error stands
            raise
        # the default recipe must not refuse a model CHITA can prune: fall back, and say so
        why = " ".join(f"{type(exc).__name__}: {exc}".split())[:300]
        # warned once chita has pruned: when it fails too, the magnitude allocation below is what ran
        log.info("the layer-wise pass failed (%s): trying chita", why)
        layer_prep, layer_decide, layer_config = prep, decide, config  # the default's own statistics settings
        config = config.with_(
            method="chita", bn_recalibrate=requested.bn_recalibrate, bias_correction=requested.bias_correction
        )
        chosen = f"method auto: chita, because the layer-wise pass failed ({why})"
        prep, decide = split_decision(prep, config)
        oracle = GradientOracle(prep, config)
        try:
            w, stages, result = prune(prep, config, oracle, timer, stage_eval, structure=structure)
        except (ModelError, GradientError) as exc2:  # the model, not the flags: a ConfigError stands
            if layer_config.allocation not in ("obd", "chita"):
                raise
            # no gradients at all (e.g. onnxruntime-training cannot build them past a Loop upstream of
            # the weights): layer-wise reconstruction with the gradient-free magnitude allocation
            why = f"{type(exc2).__name__}: {exc2}"
            # the report's warning says it; a log warning too would print it twice
            log.info("no gradients for this model (%s): layer-wise with the magnitude allocation", why)
            prep, decide = layer_prep, layer_decide
            config, chosen = _by_magnitude(layer_config, "gradients failed", why, warnings)
            w, stages, result = prune(prep, config, None, timer, stage_eval, structure=structure)
        else:
            log.warning("the layer-wise pass failed (%s): fell back to chita", why)
    from .escalate import eligible, escalate

    why_not = eligible(requested, config, prep, real_data=not (isinstance(data, str) and data == "random"))
    if why_not not in ("", "off"):
        log.info("--distill not tried: %s", why_not)
        chosen = f"{chosen}; --distill not tried: {why_not}"
    if not why_not:
        if oracle is not None:
            oracle.release()  # the escalation builds its own engines on a part of the data
        esc = escalate(prep, requested, config, w, stages, result, timer)
        if esc.kept_distill:
            config, stages, result, w = esc.config, esc.stages, esc.result, esc.w
            head_cache.probs = head_cache.logits = None  # the layer-wise pass's head tensors: not this model's
        chosen = f"{chosen}; {esc.note}" if chosen else esc.note
    with timer.phase("statistics"):
        try:
            corrected, correction = correct_statistics(prep, config, w, decide, config.output, head_cache)
        except ChitaError as exc:
            if exc.run_failed:
                blame_data(in_path, calibration, prep.specs)
            raise
    head_cache.probs = head_cache.logits = None  # done with them: free the memory
    layout = prep.layout
    k_final = keep_count(config.sparsity, layout.p) if structure is None else structure.budget().k
    meta = {
        "tool": f"chita-onnx {__version__}",
        "method": config.method,
        "sparsity": config.sparsity if structure is None else 1.0 - k_final / layout.p,
        "k": k_final,
        "p": layout.p,
        "scope": config.scope,
        "tensors": list(layout.names),
        **({} if structure is None else {"pattern": config.pattern}),
    }
    storage = config.storage
    if structure is not None:
        storage = "dense"  # TensorRT, the consumer of N:M models, parses only dense graph.initializer
        if config.storage == "sparse":
            warnings.append(f"--storage sparse ignored: {PATTERN_STORAGE_NOTE}")
    with timer.phase("write"):
        meta["statistics"] = correction.describe()
        base = prep.model if corrected is None else corrected
        pruned, stored = write_weights(base, layout.unflatten(w), storage=storage, metadata=meta)
        pruned = unfold_weight_chains(pruned, prep.chains)
        pruned = restore_initializer_inputs(restore_attention_projections(pruned, prep.detached), prep.detached)
        still_sparse = {sp.values.name for sp in pruned.graph.sparse_initializer}  # restored inputs are dense
        stored = [
            s if s.storage != "sparse" or s.name in still_sparse else dataclasses.replace(s, storage="dense")
            for s in stored
        ]
        written = save_model(pruned, staged, input_path=in_path)
        check_model(staged)
        # read the written file back and count every group (independent of the solver's projection)
        pattern_info = (
            None
            if structure is None
            else pattern_summary(check_pattern(staged, structure.pattern), structure.pattern)
        )
    if pattern_info is not None and not pattern_info["satisfied"]:
        warnings.append(f"the written model violates {config.pattern} in {pattern_info['violated']}")
    comparison: Comparison | None = None
    if ref is not None and prep.eval is not None:
        with timer.phase("evaluate"):
            comparison = compare_to(ref, staged, prep.eval, prep.specs)
    with timer.phase("sizes"):
        dr, dz = file_sizes(in_path)
        pr, pz = file_sizes(staged)
    by_name = {s.name: s for s in stored}
    file_shapes = written_shapes(pruned)

    def shape_of(t: PrunableTensor) -> tuple[int, ...]:
        shape = file_shapes.get(t.name, t.shape)
        return shape if int(np.prod(shape, dtype=np.int64)) == t.size else t.shape

    tensors = tuple(
        TensorReport(
            t.name,
            t.op_type,
            shape_of(t),
            t.size,
            by_name[t.name].nnz,
            by_name[t.name].storage,
            t.layer,
        )
        for t in prep.tensors
    )
    nnz = sum(t.nnz for t in tensors)
    sparse_names = [s.name for s in stored if s.storage == "sparse"]
    storage_note = ""
    if sparse_names and len(written) == 1:
        with timer.phase("sizes"):
            zeros_zstd = zstd_size(densify(pruned).SerializeToString())
        warnings.append(sparse_storage_note(len(sparse_names), pr, pz, zeros_zstd))
    elif storage == "dense" and structure is None:
        smaller = [s for s in stored if s.sparse_bytes < s.dense_bytes]
        if smaller:
            storage_note = dense_storage_note(len(smaller), sum(s.dense_bytes - s.sparse_bytes for s in smaller))
    if (low := low_agreement_warning(comparison)) is not None:
        warnings.append(low)
    return Report(
        input=str(in_path),
        output=str(out_path),
        method=config.method,
        config=config.to_dict(),
        p=layout.p,
        k=k_final,
        nnz=nnz,
        tensors=tensors,
        stages=tuple(stages),
        evaluation=comparison,
        eval_source=prep.eval_source,
        sizes=FileSizes(dr, dz, pr, pz),
        timings=dict(timer.seconds),
        versions=_versions(),
        peak_memory=peak_memory(),
        solver={
            "objective": _finite(result.objective),
            "iterations": result.iterations,
            "converged": result.converged,
            **dict(result.info),
            "statistics": correction.describe(),
            **({"method_choice": chosen} if chosen else {}),
        },
        warnings=tuple(warnings),
        storage_note=storage_note,
        pattern=pattern_info,
        loss=_loss_line(config, "" if oracle is None else oracle.loss_description),
    )


def _loss_line(config: CompressConfig, described: str) -> str:
    """The report's ``loss:`` line: what the gradients were of (``--distill`` fits the dense model's
    outputs, in an oracle of its own, so it is named here)."""
    if not config.distill:
        return described
    distill = f"--distill: KL(dense ‖ pruned) of the class distributions at temperature {DISTILL_TEMPERATURE:g}"
    return f"{distill}; {described}" if described else distill


@guarded
def evaluate_model(
    model: str | os.PathLike[str],
    data: DataSpec,
    *,
    output: str | None = None,
    batch_size: int = 64,
    report: str | os.PathLike[str] | None = None,
) -> Evaluation:
    """Top-1 accuracy of one ONNX model on labelled data, measured with onnxruntime.

    ``report`` is an optional path for the result as JSON, checked before any work and written
    atomically (never onto the model or the data).
    """
    _check_paths(("MODEL", model), ("--report", report))
    check_int("--batch-size", batch_size, 1)
    with plan_outputs([("--report", report)], model=model, data=data) as plan:
        m = load_model(model)
        outputs = [o.name for o in m.graph.output]
        if output is not None and output not in outputs:
            raise ConfigError(f"--output={output!r}: {model} has outputs {outputs}")
        specs = model_inputs(m)
        m, settled, source = open_settled(data, m, specs, str(model), batch_size=batch_size)
        validate_source(source, settled, num_classes=_num_classes(m, output))
        result = evaluate(model, source, settled, output)
        if report is not None:
            payload = {"model": str(model), **dataclasses.asdict(result)}
            plan.staged("--report").write_text(json.dumps(payload, indent=2) + "\n")
        plan.commit()
    return result


@guarded
def inspect_model(model: str | os.PathLike[str]) -> list[PrunableTensor]:
    """The prunable tensors of an ONNX model file (name, op, consuming nodes, shape, size)."""
    return find_prunable(expose_weights(load_model(model))[0])


@guarded
def inspect_weights(model: str | os.PathLike[str]) -> tuple[list[PrunableTensor], dict[str, str], str]:
    """The prunable tensors of a model file, ``{tensor: why}`` for those ``compress`` refuses (see
    :func:`refused_weights`), and why ``compress`` refuses the whole model when it is quantized
    (else "").  The model is validated exactly as ``compress`` validates it."""
    loaded = load_model(model)
    try:
        refuse_model(loaded, str(model))
        whole = ""
    except ChitaError as exc:
        whole = str(exc)
    m = expose_weights(loaded)[0]
    tensors = find_prunable(m)
    return tensors, refused_weights(m, tensors), whole


def input_layouts(model: str | os.PathLike[str]) -> list[str]:
    """One line per model input: how calibration arrays hold its samples and on which of the model's
    axes they are fed (:func:`chita_onnx.data.input_layout`)."""
    from .data import input_layout

    m = load_model(model)
    guessed = guessed_batch_names(m)
    lines = [input_layout(s) for s in model_inputs(m)]
    if guessed:  # compress, evaluate and gradients run the model on the data to decide
        lines.append(
            f"the batch axis is a guess: nothing names it among {', '.join(guessed)}; with --data the model is "
            "run to find the one along which the samples are computed apart"
        )
    return lines


@guarded
def write_gradients(
    model: str | os.PathLike[str],
    data: DataSpec,
    out: str | os.PathLike[str],
    *,
    loss: str = "auto",
    fisher: str = "auto",
    output: str | None = None,
    mini_batch: int = 1,
    num_samples: int | None = None,
    seed: int = 0,
    fisher_rows: int = 1,
) -> GradientMatrix:
    """Compute the raw per-sample gradient matrix straight into ``out`` (.npy), written atomically.

    ``fisher="auto"`` gives the rows ``compress`` uses by default: the true Fisher (``kl``) with
    ``fisher_rows`` rows per input (0 or 1: one, as ``compress``'s default without ``--distill``);
    with ``mini_batch > 1`` (which ``kl`` does not allow) the empirical Fisher when there are labels,
    else sampled labels.

    The rows are filled in place in a memory-mapped ``.npy`` file (never held twice in RAM); the
    column layout is written next to it as ``<out>.layout.json``.  Both paths are checked before any
    work (never an input), and both appear only when the run succeeds.
    """
    from numpy.lib.format import open_memmap

    from .gradients import GradientEngine

    check_int("--mini-batch", mini_batch, 1)
    if num_samples is not None:
        check_int("--num-samples", num_samples, 1)
    check_int("--seed", seed, 0, MAX_SEED)
    dest = Path(out)
    layout_path = Path(str(dest) + ".layout.json")
    outputs = [Output("--out", dest), Output("--out", layout_path, "layout")]
    with plan_outputs(outputs, model=model, data=data) as plan:
        m = load_model(model)
        refuse_model(m, str(model))
        m = expose_weights(m)[0]  # the weights compress prunes (a layer reading one through a Transpose too)
        tensors = find_prunable(m)
        if not tensors:
            raise ModelError(no_weights_message(m, str(model)))
        assert_supported(m, str(model), output, gradients=True)
        for name, why in refused_weights(m, tensors).items():
            raise ModelError(f"{model}: cannot differentiate weight {name!r}: {why}")
        _check_constants(m, model)
        specs = model_inputs(m)
        m, settled, source = open_settled(data, m, specs, str(model))
        total = validate_source(source, settled, num_classes=_num_classes(m, output))
        engine = GradientEngine(
            m,
            [t.name for t in tensors],
            example=next(iter(source)),
            loss=loss,  # type: ignore[arg-type]
            output=output,
            mini_batch=mini_batch,
        )
        n = min(total, num_samples or total) // mini_batch
        if n < 1:
            have = f"--num-samples={num_samples}" if num_samples and num_samples < total else f"the {total} samples"
            raise ConfigError(f"--mini-batch={mini_batch}: larger than {have} in --data")
        check_int("--fisher-rows", fisher_rows, 0, 65536)
        fisher_rows = fisher_rows or 1  # 0: compress's automatic choice, which is one row without --distill
        has_labels = next(iter(source))[1] is not None
        fisher = auto_fisher(fisher, mini_batch=mini_batch)  # type: ignore[arg-type]  # the rows compress computes
        n *= engine.rows_per_sample(engine.resolve_fisher(fisher, has_labels), fisher_rows)
        X = open_memmap(plan.staged("--out"), mode="w+", dtype=np.float32, shape=(n, engine.layout.p))
        g = engine.compute(
            source,
            fisher=fisher,
            num_samples=num_samples,
            seed=seed,
            out=X,
            fisher_rows=fisher_rows,
        )
        check_gradients(X, engine.layout)
        X.flush()
        del X
        layout = [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "size": s.size} for s in g.layout.slots]
        meta = {
            "n": g.n,
            "p": g.layout.p,
            "loss": g.loss,
            "fisher": g.fisher,
            "mini_batch": g.mini_batch,
            "rows_per_sample": g.rows_per_sample,
            "output": g.output,
            "tensors": layout,
        }
        plan.staged("--out:layout").write_text(json.dumps(meta, indent=2) + "\n")
        plan.commit()
    return g
