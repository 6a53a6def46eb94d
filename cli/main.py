"""The ``chita-onnx`` command line: a thin click layer over :mod:`chita_onnx`.

Every ``compress`` flag maps one to one onto a :class:`chita_onnx.CompressConfig` field.  Errors from
the library are printed as one line and mapped to exit codes: 2 for usage errors, 1 for bad input.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import re
import signal
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

import chita_onnx
from chita_onnx.config import ALLOCATIONS, METHODS, CompressConfig
from chita_onnx.errors import ChitaError, ConfigError, ModelError, one_line
from chita_onnx.guard import translate
from chita_onnx.progress import set_progress
from chita_onnx.report import format_report, shows_layers, table

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("chita_onnx")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def _parse_bytes(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    if value is None:
        return None
    m = _SIZE.match(value)
    if not m:
        raise click.BadParameter(f"{value!r} is not a size such as 4G, 512M or 1000000", ctx, param)
    return int(float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower()))


def _parse_ints(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in (value or "").split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers", ctx, param) from None


def _parse_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in (value or "").split(",") if v.strip())


def _run(fn: F) -> F:
    """Map library errors to a one-line message and the error's exit code, without a traceback.

    Exceptions of other libraries that user input can cause are translated by
    :func:`chita_onnx.guard.translate`; only what it does not know is an internal error (a bug).
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ChitaError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except Exception as exc:
            if log.isEnabledFor(logging.DEBUG):
                raise
            mapped = translate(exc)
            if mapped is not None:
                click.echo(f"error: {mapped}", err=True)
                sys.exit(mapped.exit_code)
            first = one_line(" ".join(str(exc).split()))[:300]
            click.echo(f"error: internal error {type(exc).__name__}: {first} (run with -v -v for details)", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


#: click >= 8.2 raises this (a UsageError whose message is the whole help) for a group run without
#: arguments; older versions print the help themselves.
_NO_ARGS_IS_HELP: Any = getattr(click.exceptions, "NoArgsIsHelpError", ())


class _OneLineGroup(click.Group):
    """A click group whose usage errors print as one ``error:`` line (exit 2), like every other error."""

    def main(
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, False, **extra)
        except _NO_ARGS_IS_HELP as exc:  # `chita-onnx` alone: the help, as click itself shows it (exit 2)
            exc.show()
            sys.exit(exc.exit_code)
        except click.UsageError as exc:
            hint = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
            click.echo(f"error: {one_line(exc.format_message())}{hint}", err=True)
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {one_line(exc.format_message())}", err=True)
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


DATA_HELP = "Calibration data: .npz, a folder of .npz batches, .npy (one-input models) or 'random'."


@click.group(cls=_OneLineGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(chita_onnx.__version__, prog_name="chita-onnx")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -v -v debug).")
@click.option(
    "-q", "--quiet", is_flag=True, help="Log only errors, no progress bars (the result summary still goes to stdout)."
)
@click.option("--progress/--no-progress", default=None, help="Force progress bars on or off (default: on a terminal).")
def cli(verbose: int, quiet: bool, progress: bool | None) -> None:
    """Prune ONNX models with CHITA: combinatorial optimisation over a Fisher model of the loss."""
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    # force=True: importing onnxruntime(-training) already configured the root logger
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True)
    logging.getLogger("chita_onnx").setLevel(level)
    warnings.showwarning = _log_warning
    set_progress(False if quiet else progress)


def _log_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, *args: object, **kwargs: object
) -> None:
    """Python warnings (NumPy's on NaN input, say) as one-line log records, never a stray source line."""
    log.warning("%s", one_line(f"{category.__name__}: {message} ({Path(filename).name}:{lineno})"))


def _config_options(fn: F) -> F:
    """The flags of every ``CompressConfig`` field (one flag per field, same name)."""
    d = CompressConfig()
    options = [
        click.option(
            "--sparsity",
            type=float,
            default=d.sparsity,
            show_default=True,
            help="Fraction of the prunable weights set to zero; keeps exactly round((1-s)·p).",
        ),
        click.option(
            "--method",
            type=click.Choice(METHODS),
            default=d.method,
            show_default=True,
            help="auto (the default recipe: layer-wise reconstruction with a Fisher-based allocation, chita "
            "where that cannot run), layerwise, chita (one shot), chita++ (multi-stage), or a baseline: "
            "magnitude, wf, cbs, cbs-s.",
        ),
        click.option(
            "--update",
            type=click.Choice(["auto", "none", "obs", "layerwise"]),
            default=d.update,
            show_default=True,
            help="Weight update after selection: the method's own (auto), none, a ridge backsolve (obs), or an "
            "exact layer-by-layer least-squares re-fit of the kept weights on calibration activations (layerwise).",
        ),
        click.option(
            "--scope",
            type=click.Choice(["global", "layer"]),
            default=d.scope,
            show_default=True,
            help="One budget over all tensors, or the same sparsity in every tensor.",
        ),
        click.option("--keep", callback=_parse_list, default="", help="Comma-separated tensors never to prune."),
        click.option(
            "--min-density",
            type=float,
            default=d.min_density,
            show_default=True,
            help="Every tensor keeps at least this fraction of its weights.",
        ),
        click.option(
            "--ridge",
            type=float,
            default=d.ridge,
            show_default=True,
            help="λ: damping of the Fisher, the trust region around the trained weights.",
        ),
        click.option(
            "--first-order/--no-first-order",
            default=d.first_order,
            show_default=True,
            help="Add the mean-gradient term αᵀ(w − w̄) to the quadratic model.",
        ),
        click.option("--stages", type=int, default=None, help="CHITA++ stages (default 10 for chita++, else 1)."),
        click.option(
            "--schedule",
            type=click.Choice(["poly", "exp", "linear", "const", "geom"]),
            default=d.schedule,
            show_default=True,
            help="How CHITA++ raises sparsity over the stages.",
        ),
        click.option(
            "--start-sparsity",
            type=float,
            default=None,
            help="CHITA++ sparsity of the first stage (default min(0.5, --sparsity); with --pattern N:M, half "
            "the pattern's).",
        ),
        click.option("--max-iter", type=int, default=d.max_iter, show_default=True, help="Solver iteration cap."),
        click.option(
            "--rank",
            type=click.Choice(["magnitude", "obd"]),
            default=d.rank,
            show_default=True,
            help="CHITA's starting support: largest |w| (never worse than magnitude + backsolve), or largest "
            "OBD saliency (‖X_j‖² + λ)·w_j² (measured better in many-stage CHITA++ at high sparsity).",
        ),
        click.option(
            "--block-size",
            type=int,
            default=d.block_size,
            show_default=True,
            help="Weights per block of the block approximation.",
        ),
        click.option(
            "--max-memory",
            callback=_parse_bytes,
            default=None,
            help="Largest gradient matrix held in memory, e.g. 4G; above it chita's block path is used, "
            "which keeps its gradient arrays within this (default 40% of RAM).  Also caps the "
            "decompressed size of a data file (at least 256M).",
        ),
        click.option(
            "--loss",
            type=click.Choice(["auto", "ce", "mse"]),
            default=d.loss,
            show_default=True,
            help="Loss for the gradients: cross-entropy, or Gauss-Newton (mse) for non-classifiers.",
        ),
        click.option(
            "--fisher",
            type=click.Choice(["auto", "empirical", "sampled", "argmax", "kl"]),
            default=d.fisher,
            show_default=True,
            help="Targets: true labels (empirical), sampled from the model, or its argmax; kl: the true "
            "Fisher (Gauss-Newton of the KL to the model's output) over all classes, --fisher-rows rows per input.",
        ),
        click.option("--output", default=None, help="Model output to use (multi-output models)."),
        click.option(
            "--mini-batch",
            type=int,
            default=d.mini_batch,
            show_default=True,
            help="Each gradient row is the mean over this many samples.",
        ),
        click.option(
            "--num-samples",
            type=int,
            default=d.num_samples,
            show_default=True,
            help="Calibration samples used for the gradients (at most).",
        ),
        click.option("--seed", type=int, default=d.seed, show_default=True, help="Seed of every random choice."),
        click.option(
            "--storage",
            type=click.Choice(["auto", "sparse", "dense"]),
            default=d.storage,
            show_default=True,
            help="dense with zeros (read by every runtime), or sparse_initializer where smaller (auto) or "
            "always (sparse): smaller raw files that only full onnxruntime builds load.",
        ),
        click.option(
            "--holdout",
            type=float,
            default=d.holdout,
            show_default=True,
            help="Fraction of the calibration data held out for evaluation when --eval-data is absent.",
        ),
        click.option(
            "--batch-size",
            type=int,
            default=d.batch_size,
            show_default=True,
            help="Batch size for reading data and evaluating.",
        ),
        click.option(
            "--workdir",
            type=click.Path(file_okay=False),
            default=None,
            help="Keep the gradient matrix in a memory-mapped file in this folder: for matrices larger than "
            "RAM, the full (unblocked) solvers then run on it from disk.",
        ),
        click.option(
            "--pattern",
            default=d.pattern,
            show_default=True,
            help="unstructured, or N:M such as 2:4 / 4:8: at most N nonzeros in every M consecutive weights along "
            "the reduction axis (TensorRT sparse tensor cores); sets the sparsity, so --sparsity is not used.",
        ),
        click.option(
            "--allow-empty",
            is_flag=True,
            default=d.allow_empty,
            help="Accept a --sparsity that keeps no weight at all (an all-zero model); refused otherwise.",
        ),
        click.option(
            "--fisher-rows",
            type=int,
            default=d.fisher_rows,
            show_default=True,
            help="--fisher kl: at most this many rows per input, as many as a compute budget allows "
            "(every class exactly when they fit, else Gaussian sketches); 0: one, or up to every class "
            "with --distill.",
        ),
        click.option(
            "--distill",
            is_flag=True,
            default=d.distill,
            help="High-sparsity switch: CHITA++ (30 stages unless --stages) where every stage minimises the "
            "Gauss-Newton model of the KL from the dense model's outputs, both softened at temperature 2 "
            "(first-order term included, "
            "--fisher kl with up to every class per input), fitted on the calibration inputs and as many "
            "mixtures of pairs of them; the statistics correction stays off unless set to on.",
        ),
        click.option(
            "--auto-distill/--no-auto-distill",
            default=d.auto_distill,
            show_default=True,
            help="--method auto from 90% sparsity on a classifier (one class distribution per sample, at least "
            "80 calibration samples, at most 2M prunable weights): also run --distill (within 15 minutes) and "
            "keep whichever of the two has the lower KL to the dense outputs on a fifth of the calibration "
            "samples held out of both fits. It takes minutes instead of seconds; --no-auto-distill skips it.",
        ),
        click.option(
            "--allocation",
            type=click.Choice(ALLOCATIONS),
            default=d.allocation,
            show_default=True,
            help="--method layerwise: how the global budget is split over the tensors: the same sparsity "
            "everywhere (uniform), or one global threshold on |w| (magnitude), on the OBD saliency F_jj·w_j² "
            "from the gradients (obd), or the per-tensor counts of global one-shot CHITA (chita).",
        ),
        click.option(
            "--layer-floor",
            type=float,
            default=d.layer_floor,
            show_default=True,
            help="--method layerwise: every tensor keeps at least this fraction of the overall density (1 - s).",
        ),
        click.option(
            "--damp",
            type=float,
            default=d.damp,
            show_default=True,
            help="Layer-wise: damping of each layer's input Gram, relative to its mean diagonal.",
        ),
        click.option(
            "--max-rows",
            type=int,
            default=d.max_rows,
            show_default=True,
            help="Layer-wise: at most this many input rows per row length d in a layer's Gram (a seeded "
            "random subset of the im2col rows); 0 uses every row.",
        ),
        click.option(
            "--recurrent-refits",
            type=int,
            default=d.recurrent_refits,
            show_default=True,
            help="Layer-wise LSTM/GRU/RNN: rounds of closed-loop re-fit (rows from the pruned node's own "
            "recurrence, a step kept only if the hidden states get closer to the dense model's); 0: off.",
        ),
        click.option(
            "--targets",
            type=click.Choice(["dense", "pruned"]),
            default=d.targets,
            show_default=True,
            help="Layer-wise targets: the dense model's layer outputs (dense), or the dense weights applied "
            "to the pruned model's inputs (pruned, as SparseGPT).",
        ),
        click.option(
            "--refit/--no-refit",
            default=d.refit,
            show_default=True,
            help="Layer-wise: exact ridge re-fit of every row on its kept weights after the OBS sweep.",
        ),
        click.option(
            "--bn-recalibrate",
            type=click.Choice(["auto", "on", "off"]),
            default=d.bn_recalibrate,
            show_default=True,
            help="Re-estimate BatchNormalization statistics on the calibration data after pruning; auto "
            "decides on held-out calibration samples.",
        ),
        click.option(
            "--bias-correction",
            type=click.Choice(["auto", "on", "off"]),
            default=d.bias_correction,
            show_default=True,
            help="Restore each pruned layer's per-channel output mean through its bias (adds a bias where "
            "there is none); auto decides on held-out calibration samples.",
        ),
        click.option(
            "--class-offsets",
            type=click.Choice(["auto", "on", "off"]),
            default=d.class_offsets,
            show_default=True,
            help="Softmax heads: re-fit one offset per class on the logits (folded into the head's bias) so "
            "that the pruned model's mean class probabilities on the calibration data match the dense "
            "model's; auto decides on held-out calibration samples.",
        ),
        click.option(
            "--allocation-samples",
            type=int,
            default=d.allocation_samples,
            show_default=True,
            help="--allocation obd: calibration samples for the Fisher diagonal (0: --num-samples).",
        ),
        click.option(
            "--select",
            type=click.Choice(["sparsegpt", "magnitude"]),
            default=d.select,
            show_default=True,
            help="--method layerwise: which weights each layer keeps: SparseGPT's OBS column sweep with "
            "adaptive masks, or the largest least-squares weights; the kept ones are re-fitted either way.",
        ),
        click.option(
            "--row-weights",
            type=click.Choice(["auto", "fisher", "off"]),
            default=d.row_weights,
            show_default=True,
            help="--method layerwise with --allocation obd: weigh each output row of a layer by the loss's "
            "sensitivity to it (from the allocation's Fisher diagonal) when choosing which weights to remove "
            "(fisher), or count every output row alike (off); auto: fisher unless the model's output is a "
            "sigmoid (softmax, regression, and raw logits without labels get it).",
        ),
        click.option(
            "--head-select",
            type=click.Choice(["auto", "layer", "classes"]),
            default=d.head_select,
            show_default=True,
            help="--method layerwise: which weights a softmax classifier's last layer keeps: the layer's own "
            "selection, like every other layer (layer), or the weights its classes use, weighed by the dense "
            "model's class probabilities on the calibration data, with a floor per class (classes); auto: the "
            "one whose trial fit has the lower KL to dense on every fifth calibration sample, held out of it.",
        ),
        click.option(
            "--structure",
            type=click.Choice(["none", "channel"]),
            default=d.structure,
            show_default=True,
            help="channel: remove whole channels (filters) and write a smaller, faster dense model; "
            "--sparsity is then the fraction of channels (or FLOPs, --sparsity-of).",
        ),
        click.option(
            "--sparsity-of",
            type=click.Choice(["channels", "flops"]),
            default=d.sparsity_of,
            show_default=True,
            help="With --structure channel: remove this fraction of the channels, or of the FLOPs.",
        ),
        click.option(
            "--channel-multiple",
            type=int,
            default=d.channel_multiple,
            show_default=True,
            help="Round kept channel counts to multiples of this (0: the CPU kernel block, 16 with AVX-512, else 8).",
        ),
        click.option(
            "--latency-check/--no-latency-check",
            default=d.latency_check,
            show_default=True,
            help="With --structure channel: time the pruned model against the input and never write a slower one.",
        ),
        click.option(
            "--latency-batches",
            callback=_parse_ints,
            default=",".join(map(str, d.latency_batches)),
            show_default=True,
            help="Batch sizes of the latency check (a model with a fixed batch size is timed at that size).",
        ),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


def _refuse_sparsity_with_pattern(kwargs: dict[str, Any]) -> None:
    """``--sparsity`` given explicitly together with ``--pattern N:M`` is a usage error (the pattern sets it)."""
    ctx = click.get_current_context()
    pattern = str(kwargs.get("pattern", "unstructured")).strip().lower()
    if pattern != "unstructured" and ctx.get_parameter_source("sparsity") == click.core.ParameterSource.COMMANDLINE:
        raise ConfigError(
            f"--sparsity={kwargs['sparsity']}: not used with --pattern {pattern}, which keeps N of every M weights "
            "of each eligible tensor; drop --sparsity"
        )


def _config_from(kwargs: dict[str, Any]) -> CompressConfig:
    names = {f.name for f in dataclasses.fields(CompressConfig)}
    return CompressConfig(**{k: v for k, v in kwargs.items() if k in names})


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.argument("output_path", metavar="OUTPUT", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--eval-data", default=None, help="Labelled evaluation data (default: hold out part of --data).")
@click.option(
    "--report", "report_path", default=None, type=click.Path(dir_okay=False), help="Write the report as JSON."
)
@_config_options
@_run
def compress(
    model: str, output_path: str, data: str, eval_data: str | None, report_path: str | None, **kwargs: Any
) -> None:
    """Prune MODEL and write the pruned model to OUTPUT, with an accuracy report."""
    _refuse_sparsity_with_pattern(kwargs)
    config = _config_from(kwargs)
    report = chita_onnx.compress(model, output_path, data, config, eval_data=eval_data, report=report_path)
    click.echo(format_report(report))


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option(
    "--pattern",
    default=None,
    help="Check an N:M pattern such as 2:4 instead: per tensor, every group of M weights along the reduction "
    "axis must hold at most N nonzeros.  Exits 1 when some group holds more.",
)
@click.option(
    "--check",
    is_flag=True,
    help="Report whether MODEL will go through compress with gradients (exit 1 if not; the report says when the "
    "default still prunes it without them): refusals, exact rewrites, ops on the gradient path.",
)
@click.option("--data", default=None, help="With --check: calibration data, to build the gradient graph for real.")
@click.option("--output", default=None, help="With --check: the model output to differentiate (default: the first).")
@_run
def inspect(
    model: str, as_json: bool, pattern: str | None, check: bool, data: str | None, output: str | None
) -> None:
    """List the prunable weight tensors of MODEL (marking those that compress refuses); with --check:
    will it go through compress?; with --pattern: does it satisfy an N:M pattern (exit 1 if not)?"""
    from chita_onnx.pipeline import input_layouts, inspect_weights

    if check and pattern is not None:
        raise ConfigError("--check and --pattern: choose one")
    for flag, value in (("--data", data), ("--output", output)):
        if value is not None and not check:
            raise ConfigError(f"{flag}={value!r} is only used with --check")
    if check:
        _inspect_check(model, data, output, as_json)
        return
    if pattern is not None:
        _inspect_pattern(model, pattern, as_json)
        return
    tensors, refused, whole = inspect_weights(model)
    if as_json:
        items = [{**dataclasses.asdict(t), "size": t.size, "refused": refused.get(t.name)} for t in tensors]
        click.echo(json.dumps(items, indent=2))
        if whole:  # stdout stays a JSON list; the whole-model refusal goes to stderr
            click.echo(f"warning: compress refuses this model: {whole}", err=True)
        return
    with_layer = shows_layers(tensors)  # as compress's report
    rows = []
    for t in tensors:
        layer = [t.layer or "-"] if with_layer else []
        rows.append([t.name, *layer, t.op_type, ",".join(t.nodes), "x".join(map(str, t.shape)), f"{t.size:,}"])
    head = ["tensor", *(["layer"] if with_layer else []), "op", "node", "shape", "weights"]
    if refused:
        notes = [f"refused: {refused[t.name]}" if t.name in refused else "" for t in tensors]
        rows = [[*r, note] for r, note in zip(rows, notes, strict=True)]
        head.append("compress")
    click.echo(table(rows, head))
    click.echo(f"\n{len(tensors)} prunable tensors, {sum(t.size for t in tensors):,} weights in total")
    for line in input_layouts(model):
        click.echo(line)
    if refused:
        click.echo(f"{len(refused)} of them refused by compress (see the last column)")
    if whole:
        click.echo(f"compress refuses this model: {whole}")


def _inspect_pattern(model: str, pattern: str, as_json: bool) -> None:
    from chita_onnx.patterns import check_pattern, pattern_summary
    from chita_onnx.report import format_pattern
    from chita_onnx.solver.nm import MAX_GROUP, NMPattern

    try:
        nm = NMPattern.parse(pattern)
    except ChitaError:
        nm = None
    if nm is None:
        raise ConfigError(f"--pattern={pattern!r}: must be N:M with 0 < N < M ≤ {MAX_GROUP}, e.g. 2:4")
    info = pattern_summary(check_pattern(model, nm), nm)
    violated = bool(info["eligible"]) and not info["satisfied"]
    failure = ModelError(
        f"{model} does not satisfy {nm}: {info['violating_groups']:,} of {info['checked_groups']:,} groups in "
        f"{len(info['violated'])} tensor(s) hold more than {nm.n} nonzeros (first: {', '.join(info['violated'][:3])})"
    )
    if as_json:
        click.echo(json.dumps({"model": model, **info}, indent=2))
        if violated:  # a gate, like --check: the report first, then exit 1
            raise failure
        return
    lines = format_pattern(info, model)
    click.echo(lines[1])
    if not info["eligible"]:
        click.echo(f"\n{model} has no tensor eligible for {nm} (no reduction axis of a multiple of {nm.m} weights)")
        return
    verdict = "satisfies" if info["satisfied"] else "does NOT satisfy"
    dense = f"; {len(info['dense'])} tensor(s) not eligible (dense)" if info["dense"] else ""
    click.echo(
        f"\n{model} {verdict} {nm} on its {len(info['eligible'])} eligible tensor(s): "
        f"{info['violating_groups']:,} of {info['checked_groups']:,} groups hold more than {nm.n} nonzeros{dense}"
    )
    if violated:
        raise failure


def _inspect_check(model: str, data: str | None, output: str | None, as_json: bool) -> None:
    """``inspect --check``: print the support report; exit 1 with the first refusal."""
    from chita_onnx.errors import UnsupportedOpError
    from chita_onnx.support import check_model_support, format_support

    report = check_model_support(model, data, output=output)
    click.echo(json.dumps(report.to_dict(), indent=2) if as_json else format_support(report))
    if not report.ok:
        raise UnsupportedOpError(report.refusals[0])


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help="Labelled data: .npz or a folder of .npz batches.")
@click.option("--output", default=None, help="Model output to score (default: the first).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option(
    "--report", "report_path", default=None, type=click.Path(dir_okay=False), help="Write the result as JSON."
)
@_run
def evaluate(model: str, data: str, output: str | None, batch_size: int, report_path: str | None) -> None:
    """Measure MODEL's top-1 accuracy with onnxruntime."""
    ev = chita_onnx.evaluate_model(model, data, output=output, batch_size=batch_size, report=report_path)
    acc = "n/a (no labels or not a classifier)" if ev.accuracy is None else f"{100 * ev.accuracy:.2f}%"
    click.echo(f"{model}: top-1 accuracy {acc} on {ev.samples} samples ({ev.seconds:.2f}s)")


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help=DATA_HELP)
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Where to write the (n, p) float32 matrix (.npy); the layout goes to OUT.layout.json.",
)
@click.option("--loss", type=click.Choice(["auto", "ce", "mse"]), default="auto", show_default=True)
@click.option(
    "--fisher", type=click.Choice(["auto", "empirical", "sampled", "argmax", "kl"]), default="auto", show_default=True
)
@click.option("--output", default=None, help="Model output to use (multi-output models).")
@click.option("--mini-batch", type=int, default=1, show_default=True)
@click.option("--num-samples", type=int, default=None, help="Use at most this many samples (default: all).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option(
    "--fisher-rows",
    type=int,
    default=0,
    show_default=True,
    help="--fisher kl (and auto, which is kl as in compress): rows per input; 0 as in compress: one.",
)
@_run
def gradients(
    model: str,
    data: str,
    out_path: str,
    loss: str,
    fisher: str,
    output: str | None,
    mini_batch: int,
    num_samples: int | None,
    seed: int,
    fisher_rows: int,
) -> None:
    """Write the per-sample gradient matrix X of MODEL's prunable weights (rows: samples)."""
    from chita_onnx.pipeline import write_gradients

    g = write_gradients(
        model,
        data,
        out_path,
        loss=loss,
        fisher=fisher,
        output=output,
        mini_batch=mini_batch,
        num_samples=num_samples,
        seed=seed,
        fisher_rows=fisher_rows,
    )
    rows = [[s.name, "x".join(map(str, s.shape)), f"{s.offset:,}", f"{s.size:,}"] for s in g.layout.slots]
    click.echo(table(rows, ["tensor", "shape", "first column", "columns"]))
    click.echo(
        f"\nwrote {out_path}: {g.n} x {g.layout.p} float32 ({g.loss} loss, {g.fisher} Fisher, "
        f"{g.timings.get('total', 0.0):.2f}s)"
    )


@cli.command()
@click.argument("model", type=click.Path(dir_okay=False))
@click.option("--data", required=True, help=DATA_HELP)
@click.option("--eval-data", default=None, help="Labelled evaluation data (default: hold out part of --data).")
@click.option(
    "--methods",
    default="magnitude,wf,cbs,chita,chita++,layerwise",
    show_default=True,
    help="Comma-separated methods: any --method (auto is the default recipe), magnitude+obs, <method>+layerwise "
    "(that method's mask re-fitted layer by layer), onnxsim-sparsegpt|wanda|magnitude (the peer, in its own venv).",
)
@click.option("--sparsities", default="0.5,0.7,0.9", show_default=True, help="Comma-separated sparsities.")
@click.option(
    "--out",
    "out_prefix",
    default="sweep",
    show_default=True,
    type=click.Path(dir_okay=False),
    help="Writes OUT.csv, OUT.json and OUT.png.",
)
@_config_options
@_run
def sweep(
    model: str, data: str, eval_data: str | None, methods: str, sparsities: str, out_prefix: str, **kwargs: Any
) -> None:
    """Compare pruning methods on MODEL across sparsities: table, JSON/CSV and a plot."""
    from chita_onnx.sweep import format_sweep, parse_methods, parse_sparsities, run_sweep

    if str(kwargs.get("pattern", "unstructured")).strip().lower() != "unstructured":
        raise ConfigError(f"--pattern={kwargs['pattern']}: sweep compares sparsities; use compress --pattern instead")
    if kwargs.get("structure", "none") != "none":
        raise ConfigError(f"--structure={kwargs['structure']}: sweep compares weight pruning; use compress --structure")
    ctx = click.get_current_context()
    for name, plural in (("method", "--methods"), ("sparsity", "--sparsities")):
        if ctx.get_parameter_source(name) == click.core.ParameterSource.COMMANDLINE:
            flag = "--" + name
            raise ConfigError(f"{flag}={kwargs[name]}: sweep takes {plural} (comma-separated) instead")
    method_list, levels = parse_methods(methods), parse_sparsities(sparsities)
    kwargs.pop("method", None)
    kwargs.pop("sparsity", None)
    stages = kwargs.pop("stages", None)
    base = _config_from(kwargs).with_(method="chita++", stages=stages, sparsity=max(levels))
    result, written = run_sweep(model, data, base, method_list, levels, eval_data=eval_data, out=out_prefix)
    click.echo(format_sweep(result))
    click.echo("\nwrote " + ", ".join(map(str, written)))


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so that staged outputs are removed on the way out."""
    raise SystemExit(128 + signum)


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _terminate)
    cli(prog_name="chita-onnx")


if __name__ == "__main__":
    main()
