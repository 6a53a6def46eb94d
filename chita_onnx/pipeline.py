"""The orchestrator: the only module that wires the graph layer, the gradient engine and the solvers.

    load ONNX → find prunable weights → per-sample gradients → solver → write pruned ONNX → evaluate

The solvers see flat arrays only (``w̄`` of length p, ``X`` of shape n × p scaled by 1/√n); the graph
layer sees per-tensor arrays only.  :class:`~chita_onnx.layout.Layout` maps between the two.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from numpy.typing import NDArray

from . import __version__
from .config import CompressConfig
from .data import ArraySource, DataSpec, materialize, open_source, split_holdout, validate_source
from .data_types import CalibrationSource, InputSpec
from .errors import ConfigError, ModelError, OutputError
from .evaluate import Comparison, Evaluation, Reference, compare_to, evaluate, file_sizes, reference
from .gradients import GradientEngine, GradientMatrix
from .graph import (
    PrunableTensor,
    check_model,
    find_prunable,
    get_weights,
    load_model,
    model_inputs,
    save_model,
    write_weights,
)
from .layout import Layout
from .progress import progress
from .reconstruct import correct_statistics, split_decision
from .report import FileSizes, Report, StageReport, TensorReport
from .solver import Budget, SolverResult, chita_blocked, chita_iht, magnitude, sparsity_schedule
from .solver import cbs as cbs_solver
from .solver import woodfisher as wf_solver
from .solver.budgets import keep_count, make_budget

log = logging.getLogger(__name__)


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
    outs = {o.name: o for o in model.graph.output}
    vi = outs.get(output) if output else model.graph.output[0]
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
    model = load_model(path)
    tensors = find_prunable(model)
    if not tensors:
        raise ModelError(f"{path}: no prunable weights (Conv, Gemm or MatMul fed by a constant weight tensor)")
    names = {t.name for t in tensors}
    unknown = [n for n in config.keep if n not in names]
    if unknown:
        raise ConfigError(f"--keep={','.join(unknown)}: no prunable tensor of that name; run `chita-onnx inspect`")
    tensors = [t for t in tensors if t.name not in config.keep]
    if not tensors:
        raise ConfigError(f"--keep={','.join(config.keep)}: protects every prunable tensor, nothing left to prune")
    specs = tuple(model_inputs(model))
    outputs = [o.name for o in model.graph.output]
    if config.output is not None and config.output not in outputs:
        raise ConfigError(f"--output={config.output!r}: {path} has outputs {outputs}")
    classes = _num_classes(model, config.output)
    calib: CalibrationSource | None = None
    if data is not None:
        calib = open_source(data, specs, batch_size=config.batch_size, seed=config.seed)
        validate_source(calib, specs, num_classes=classes)
    ev: CalibrationSource | None = None
    eval_source = ""
    if eval_data is not None:
        ev = open_source(eval_data, specs, batch_size=config.batch_size, seed=config.seed + 1)
        validate_source(ev, specs, num_classes=classes)
        eval_source = str(eval_data) if isinstance(eval_data, (str, os.PathLike)) else "evaluation data"
    elif calib is not None and hold_out:
        whole = materialize(calib, specs, batch_size=config.batch_size)
        calib, ev = split_holdout(whole, config.holdout, seed=config.seed)
        eval_source = f"{config.holdout:.0%} of the calibration data, held out from pruning"
    layout = Layout.from_shapes((t.name, t.shape) for t in tensors)
    if calib is None:
        raise ConfigError("--data is required")
    return Prepared(path, model, tuple(tensors), layout, specs, calib, ev, eval_source)


# ------------------------------------------------------------------------------------- gradients


class GradientOracle:
    """Per-sample gradient matrices at given weights, scaled by 1/√n for the solvers.

    The gradient graph of each tensor subset is built once (:class:`~chita_onnx.gradients.GradientEngine`);
    later calls only swap the weight values, which is what CHITA++ needs in every stage.
    """

    def __init__(self, prep: Prepared, config: CompressConfig) -> None:
        self.prep, self.config = prep, config
        self._engines: dict[tuple[str, ...], GradientEngine] = {}
        total = sum(b.size for b in prep.calib)
        self.n = min(total, config.num_samples) // config.mini_batch
        if self.n < 1:
            raise ConfigError(f"--mini-batch={config.mini_batch}: larger than the {total} calibration samples")
        self.scale = np.float32(1.0 / math.sqrt(self.n))
        self.alpha: NDArray[np.float64] | None = None  # mean gradient of the last full matrix
        self._samples: ArraySource | None = None  # calibration samples in memory, for row chunks

    def _engine(self, names: tuple[str, ...]) -> GradientEngine:
        if names not in self._engines:
            if not self.fits():
                self._engines.clear()  # block path: one onnxruntime session at a time bounds memory
            example = next(iter(self.prep.calib))
            self._engines[names] = GradientEngine(
                self.prep.model,
                list(names),
                example=example,
                loss=self.config.loss,
                output=self.config.output,
                mini_batch=self.config.mini_batch,
            )
        return self._engines[names]

    def fits(self) -> bool:
        """Whether the whole ``n × p`` float32 matrix can be held: in ``--max-memory`` of RAM, or, with
        ``--workdir``, in a memory-mapped file there (if the disk has room).  Otherwise the solvers use
        the block approximation."""
        assert self.config.max_memory is not None
        need = self.n * self.prep.layout.p * 4
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
        g = engine.compute(self.prep.calib, fisher=cfg.fisher, num_samples=cfg.num_samples, seed=cfg.seed, out=out)
        X = g.X
        if names is None and cfg.first_order:
            self.alpha = X.mean(axis=0, dtype=np.float64)
        X *= self.scale
        return X

    def _mapped(self, p: int) -> NDArray[np.float32]:
        """An (n, p) float32 matrix in an anonymous file under ``--workdir`` (deleted when unmapped)."""
        folder = Path(self.config.workdir or ".")
        if not folder.is_dir():
            raise ConfigError(f"--workdir={folder}: not an existing folder")
        fh = tempfile.TemporaryFile(prefix="chita_gradients_", dir=folder)  # noqa: SIM115 (lives with the map)
        fh.truncate(self.n * p * 4)
        log.info(
            "gradient matrix (%d x %d, %.2f GiB) memory-mapped under %s", self.n, p, self.n * p * 4 / 2**30, folder
        )
        return np.memmap(fh, dtype=np.float32, mode="r+", shape=(self.n, p))

    def columns(self, w: NDArray[np.float32], timer: PhaseTimer) -> Callable[[int, int], NDArray[np.float32]]:
        """A ``columns(a, b)`` callback for the block solver: scaled gradient columns ``[a, b)`` at ``w``.

        The gradients of the tensors overlapping ``[a, b)`` are computed for all rows at once when
        they fit in half of ``--max-memory``; otherwise (one huge tensor) the rows are computed in
        chunks of samples and only the requested columns are kept, so memory stays bounded.
        """
        slots = self.prep.layout.slots
        assert self.config.max_memory is not None
        room = self.config.max_memory // 2

        def columns(a: int, b: int) -> NDArray[np.float32]:
            hit = [s for s in slots if s.offset < b and s.stop > a]
            names = [s.name for s in hit]
            start = a - hit[0].offset
            width = sum(s.size for s in hit)
            with timer.phase("gradients"):
                if self.n * width * 4 <= room:
                    return np.ascontiguousarray(self.matrix(w, names)[:, start : start + (b - a)])
                return self._columns_by_rows(w, names, start, b - a, max(1, room // (width * 4)))

        return columns

    def _columns_by_rows(
        self, w: NDArray[np.float32], names: Sequence[str], start: int, width: int, rows: int
    ) -> NDArray[np.float32]:
        """Columns ``start : start + width`` of the tensors ``names``, computed ``rows`` rows at a time.

        With ``--fisher sampled`` each chunk draws its own seeded labels, so rows differ from an
        unchunked run (both are valid samples of the Fisher); with labels they are identical.
        """
        if self._samples is None:
            self._samples = materialize(self.prep.calib, self.prep.specs, batch_size=self.config.batch_size)
        key = tuple(names)
        engine = self._engine(key)
        engine.set_weights({k: v for k, v in self.prep.layout.unflatten(w).items() if k in key})
        m = self.config.mini_batch
        out = np.empty((self.n, width), np.float32)
        for r0 in progress(range(0, self.n, rows), total=-(-self.n // rows), desc="gradient rows", unit="chunk"):
            r1 = min(self.n, r0 + rows)
            part = self._samples.take(np.arange(r0 * m, r1 * m))
            g = engine.compute(part, fisher=self.config.fisher, seed=self.config.seed + r0)
            out[r0:r1] = g.X[:, start : start + width]
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
) -> SolverResult:
    """Dispatch one solve of ``method`` on the (already scaled) gradient matrix ``X`` (n × p)."""
    if method == "magnitude" and config.update != "obs":
        return magnitude(w, budget, X=X, ridge=config.ridge)
    if X is None:
        raise ValueError(f"method {method} needs the gradient matrix")
    if method in ("chita", "chita++"):
        return chita_iht(X, w, budget, config.ridge, alpha, max_iter=config.max_iter, start=config.rank)
    if method == "magnitude":
        return magnitude(w, budget, X=X, ridge=config.ridge, update="obs", alpha=alpha)
    if method == "wf":
        return wf_solver(X, w, budget, config.ridge, update=config.update != "none")
    if method in ("cbs", "cbs-s"):
        return cbs_solver(X, w, budget, config.ridge, update=method == "cbs" and config.update != "none")
    raise ConfigError(f"--method={method!r}: unknown")


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
) -> tuple[NDArray[np.float32], list[StageReport], SolverResult]:
    """Run the configured method (every stage of CHITA++) and return the pruned flat weights.

    ``X0`` is an already computed, scaled gradient matrix at ``w̄`` that the first stage may reuse
    (the sweep shares it between methods).  Later CHITA++ stages recompute X at the current weights.
    """
    timer = timer or PhaseTimer()
    if config.method == "layerwise":
        return _prune_layerwise(prep, config, oracle, timer, on_stage, X0)
    w = initial_weights(prep)
    sizes = [s.size for s in prep.layout.slots]
    if config.method == "chita++":
        assert config.stages is not None and config.start_sparsity is not None
        levels = sparsity_schedule(config.stages, config.sparsity, config.schedule, config.start_sparsity)
    else:
        levels = (config.sparsity,)
    if config.needs_gradients and oracle is None:
        oracle = GradientOracle(prep, config)
    stages: list[StageReport] = []
    result: SolverResult | None = None
    for t, level in enumerate(levels, start=1):
        t0 = time.perf_counter()
        budget = make_budget(sizes, level, scope=config.scope, min_density=config.min_density)
        if oracle is None:
            with timer.phase("solve"):
                result = solve(config.method, config, None, w, budget)
        elif not oracle.fits():
            if config.method not in ("chita", "chita++"):
                raise ConfigError(
                    f"--max-memory={config.max_memory}: the gradient matrix needs "
                    f"{oracle.n * prep.layout.p * 4 / 2**30:.2f} GiB and only chita and chita++ have a block path"
                )
            log.info("X (%d x %d) exceeds --max-memory: block approximation", oracle.n, prep.layout.p)
            if config.first_order or config.rank != "magnitude":
                log.warning("the block path ranks by magnitude and ignores --first-order and --rank")
            assert config.max_memory is not None
            with timer.phase("solve"):
                result = chita_blocked(
                    oracle.columns(w, timer),
                    w,
                    budget,
                    config.ridge,
                    None,
                    block_size=config.block_size,
                    max_memory_bytes=config.max_memory,
                    n=oracle.n,
                    max_iter=config.max_iter,
                )
        else:
            if X0 is not None and t == 1:
                X = X0
            else:
                with timer.phase("gradients"):
                    X = oracle.matrix(w)
            with timer.phase("solve"):
                result = solve(config.method, config, X, w, budget, oracle.alpha if config.first_order else None)
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

        with timer.phase("layerwise"):
            w, extra = refit_layerwise(prep, config, w)
        result = dataclasses.replace(result, w=w, info={**result.info, **extra})
    return w, stages, result


def _prune_layerwise(
    prep: Prepared,
    config: CompressConfig,
    oracle: GradientOracle | None,
    timer: PhaseTimer,
    on_stage: Callable[[int, float, SolverResult, NDArray[np.float32], float], StageReport] | None,
    X0: NDArray[np.float32] | None,
) -> tuple[NDArray[np.float32], list[StageReport], SolverResult]:
    """``--method layerwise``: budget allocation, then select and re-fit layer by layer in graph order."""
    from .reconstruct import prune_layerwise

    t0 = time.perf_counter()
    w_bar = initial_weights(prep)
    grad_oracle = oracle

    def gradients(rows: int | None = None) -> NDArray[np.float32] | None:
        """X at w̄ on ``rows`` calibration samples (all of --num-samples when None); reuses ``X0``."""
        nonlocal grad_oracle
        cfg = config if rows is None else config.with_(num_samples=min(rows, config.num_samples))
        if X0 is not None and (rows is None or X0.shape[0] <= rows):
            return X0
        if grad_oracle is None or grad_oracle.config.num_samples != cfg.num_samples:
            grad_oracle = GradientOracle(prep, cfg)
        if not grad_oracle.fits():
            return None
        with timer.phase("gradients"):
            return grad_oracle.matrix(w_bar)

    with timer.phase("layerwise"):
        result = prune_layerwise(prep, config, w_bar, gradients)
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


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------------------------ entry point


def compress(
    model: str | os.PathLike[str],
    output: str | os.PathLike[str],
    data: DataSpec,
    config: CompressConfig | None = None,
    *,
    eval_data: DataSpec | None = None,
) -> Report:
    """Prune ``model`` to ``config.sparsity`` with ``config.method`` and write it to ``output``.

    ``data`` is the calibration data (a ``.npz`` path, a folder of them, ``"random"``, a mapping of
    arrays, or any re-iterable source of batches).  The dense and pruned models are evaluated with
    onnxruntime on ``eval_data``, or on a held-out part of ``data`` that is never used for pruning.
    The input file is never modified; the output is written atomically.
    """
    config = config or CompressConfig()
    timer = PhaseTimer()
    in_path, out_path = Path(model), Path(output)
    if out_path.exists() and in_path.exists() and out_path.resolve() == in_path.resolve():
        raise ConfigError(f"OUTPUT={out_path}: the output path is the input model; choose another file")
    if out_path.is_dir():
        raise OutputError(f"{out_path}: the output path is a directory")
    if not (out_path.parent if str(out_path.parent) else Path(".")).is_dir():
        raise OutputError(f"{out_path}: the output folder {out_path.parent} does not exist")
    with timer.phase("load"):
        prep = prepare(in_path, data, config, eval_data)
        prep, decide = split_decision(prep, config)
    warnings: list[str] = []
    if isinstance(data, str) and data == "random":
        warnings.append("pruned with random calibration data: quality needs real data")

    ref: Reference | None = None
    if prep.eval is not None:
        with timer.phase("evaluate"):
            ref = reference(in_path, prep.eval, prep.specs, config.output)

    def stage_eval(t: int, level: float, res: SolverResult, w: NDArray[np.float32], seconds: float) -> StageReport:
        acc = agree = None
        t0 = time.perf_counter() - seconds  # the stage's gradients and solve, plus this evaluation
        if config.method == "chita++" and ref is not None and prep.eval is not None:
            with timer.phase("evaluate"):
                c = compare_to(ref, _model_with(prep, w).SerializeToString(), prep.eval, prep.specs)
            acc, agree = c.pruned_accuracy, c.agreement
        k = keep_count(level, prep.layout.p)
        return StageReport(
            t, level, k, _finite(res.objective), res.iterations, res.converged, acc, agree, time.perf_counter() - t0
        )

    w, stages, result = prune(prep, config, None, timer, stage_eval)
    with timer.phase("statistics"):
        corrected, correction = correct_statistics(prep, config, w, decide, config.output)
    layout = prep.layout
    meta = {
        "tool": f"chita-onnx {__version__}",
        "method": config.method,
        "sparsity": config.sparsity,
        "k": keep_count(config.sparsity, layout.p),
        "p": layout.p,
        "scope": config.scope,
        "tensors": list(layout.names),
    }
    with timer.phase("write"):
        meta["statistics"] = correction.describe()
        base = prep.model if corrected is None else corrected
        pruned, stored = write_weights(base, layout.unflatten(w), storage=config.storage, metadata=meta)
        save_model(pruned, out_path, input_path=in_path)
        check_model(out_path)
    comparison: Comparison | None = None
    if ref is not None and prep.eval is not None:
        with timer.phase("evaluate"):
            comparison = compare_to(ref, out_path, prep.eval, prep.specs)
    with timer.phase("sizes"):
        dr, dz = file_sizes(in_path)
        pr, pz = file_sizes(out_path)
    by_name = {s.name: s for s in stored}
    tensors = tuple(
        TensorReport(t.name, t.op_type, t.shape, t.size, by_name[t.name].nnz, by_name[t.name].storage)
        for t in prep.tensors
    )
    nnz = sum(t.nnz for t in tensors)
    if comparison is not None and comparison.agreement is not None and comparison.agreement < 0.5:
        warnings.append(f"top-1 agreement with the dense model is only {100 * comparison.agreement:.1f}%")
    return Report(
        input=str(in_path),
        output=str(out_path),
        method=config.method,
        config=config.to_dict(),
        p=layout.p,
        k=keep_count(config.sparsity, layout.p),
        nnz=nnz,
        tensors=tensors,
        stages=tuple(stages),
        evaluation=comparison,
        eval_source=prep.eval_source,
        sizes=FileSizes(dr, dz, pr, pz),
        timings=dict(timer.seconds),
        versions=_versions(),
        solver={
            "objective": _finite(result.objective),
            "iterations": result.iterations,
            "converged": result.converged,
            **dict(result.info),
            "statistics": correction.describe(),
        },
        warnings=tuple(warnings),
    )


def evaluate_model(
    model: str | os.PathLike[str], data: DataSpec, *, output: str | None = None, batch_size: int = 64
) -> Evaluation:
    """Top-1 accuracy of one ONNX model on labelled data, measured with onnxruntime."""
    m = load_model(model)
    specs = model_inputs(m)
    source = open_source(data, specs, batch_size=batch_size)
    validate_source(source, specs, num_classes=_num_classes(m, output))
    return evaluate(model, source, specs, output)


def inspect_model(model: str | os.PathLike[str]) -> list[PrunableTensor]:
    """The prunable tensors of an ONNX model file (name, op, consuming nodes, shape, size)."""
    return find_prunable(load_model(model))


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
) -> GradientMatrix:
    """Compute the raw per-sample gradient matrix straight into ``out`` (.npy), written atomically.

    The rows are filled in place in a memory-mapped ``.npy`` file (never held twice in RAM); the
    column layout is written next to it as ``<out>.layout.json``.
    """
    from numpy.lib.format import open_memmap

    from .gradients import GradientEngine

    m = load_model(model)
    tensors = find_prunable(m)
    if not tensors:
        raise ModelError(f"{model}: no prunable weights (Conv, Gemm or MatMul fed by a constant weight tensor)")
    specs = model_inputs(m)
    source = open_source(data, specs)
    total = validate_source(source, specs, num_classes=_num_classes(m, output))
    engine = GradientEngine(
        m,
        [t.name for t in tensors],
        example=next(iter(source)),
        loss=loss,  # type: ignore[arg-type]
        output=output,
        mini_batch=mini_batch,
    )
    n = min(total, num_samples or total) // mini_batch
    dest = Path(out)
    tmp = dest.with_name(f".{dest.name}.tmp.npy")
    X = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(n, engine.layout.p))
    try:
        g = engine.compute(source, fisher=fisher, num_samples=num_samples, seed=seed, out=X)  # type: ignore[arg-type]
        X.flush()
        del X
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    layout = [{"name": s.name, "shape": list(s.shape), "offset": s.offset, "size": s.size} for s in g.layout.slots]
    meta = {
        "n": g.n,
        "p": g.layout.p,
        "loss": g.loss,
        "fisher": g.fisher,
        "mini_batch": g.mini_batch,
        "output": g.output,
        "tensors": layout,
    }
    Path(str(dest) + ".layout.json").write_text(json.dumps(meta, indent=2) + "\n")
    return g
