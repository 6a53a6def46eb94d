"""The one configuration object of a compression run.

Every field maps one to one onto a ``chita-onnx compress`` flag of the same name (``min_density`` ↔
``--min-density``, ``first_order`` ↔ ``--first-order`` ...).  The object is frozen and validated on
construction; a bad value raises :class:`~chita_onnx.errors.ConfigError` naming the flag.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

import numpy as np

from .errors import ConfigError, SolverError
from .limits import check_limits, total_memory
from .solver.nm import MAX_GROUP, NMPattern

Method = Literal["auto", "chita", "chita++", "magnitude", "wf", "cbs", "cbs-s", "layerwise"]
#: ``auto`` (the default) is ``layerwise`` where the layer-wise pass can run on the model, else
#: ``chita`` (see :func:`chita_onnx.pipeline.resolve_method` and the README's "Default recipe").
METHODS: tuple[str, ...] = ("auto", "chita", "chita++", "magnitude", "wf", "cbs", "cbs-s", "layerwise")
Update = Literal["auto", "none", "obs", "layerwise"]
Scope = Literal["global", "layer"]
Storage = Literal["auto", "sparse", "dense"]
Schedule = Literal["poly", "exp", "linear", "const", "geom"]
Loss = Literal["auto", "ce", "mse"]
Fisher = Literal["auto", "empirical", "sampled", "argmax", "kl"]
Rank = Literal["magnitude", "obd"]
Allocation = Literal["uniform", "magnitude", "obd", "chita"]
ALLOCATIONS: tuple[str, ...] = ("uniform", "magnitude", "obd", "chita")
Targets = Literal["dense", "pruned"]
Switch = Literal["auto", "on", "off"]
Select = Literal["sparsegpt", "magnitude"]
RowWeights = Literal["auto", "fisher", "off"]
HeadSelect = Literal["auto", "layer", "classes"]
Structure = Literal["none", "channel"]
SparsityOf = Literal["channels", "flops"]

#: Default ridge λ of the quadratic model (the trust region around the trained weights).  Chosen by
#: measurement on the MLPNet/MNIST sweep, see BENCHMARKS.md.
DEFAULT_RIDGE = 1e-3
#: Stages of CHITA++ when --stages is not given (the number of stages matters most for quality).
DEFAULT_STAGES = 10
#: Stages of --distill when --stages is not given (measured on the paper MLPNet, BENCHMARKS.md §6).
DISTILL_STAGES = 30


def default_max_memory() -> int:
    """Bytes the gradient matrix X may take before the block approximation is used: 40% of RAM."""
    return int(0.4 * total_memory())


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


_FLOATS = ("sparsity", "min_density", "ridge", "holdout", "layer_floor", "damp", "start_sparsity")
_INTS = (
    "max_iter",
    "block_size",
    "mini_batch",
    "num_samples",
    "seed",
    "batch_size",
    "fisher_rows",
    "max_rows",
    "recurrent_refits",
    "allocation_samples",
    "channel_multiple",
    "stages",
    "max_memory",
)
_BOOLS = ("first_order", "allow_empty", "distill", "auto_distill", "refit", "latency_check")
_OPTIONAL = ("start_sparsity", "stages", "max_memory", "output", "workdir")
#: Fields that ``__post_init__`` may resolve from what the caller gave (a ``None`` default, or what
#: ``--distill`` / ``--structure channel`` imply); :meth:`CompressConfig.with_` starts from the given values.
_RESOLVED = (
    "method",
    "fisher",
    "bn_recalibrate",
    "bias_correction",
    "class_offsets",
    "stages",
    "start_sparsity",
    "max_memory",
)


def _names(value: object) -> tuple[str, ...] | None:
    """``--keep`` from Python: a comma-separated string (as on the command line) or names."""
    if isinstance(value, str):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


def _sizes(value: object) -> tuple[int, ...] | None:
    """``--latency-batches`` from Python: ``"1,32"`` (as on the command line) or integers."""
    parts: list[object] = list(value.split(",")) if isinstance(value, str) else []
    if isinstance(value, (list, tuple)):
        parts = list(value)
    out = []
    for v in parts:
        if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            return None
        out.append(int(v))
    return tuple(out) if parts else None


def percent_hint(value: object) -> str:
    """``"; it is a fraction, not a percentage: 0.7 for 70%"`` for a sparsity that reads as a
    percentage (1 < value < 100), else ``""``."""
    if isinstance(value, (int, float)) and 1.0 < float(value) < 100.0:
        return f"; it is a fraction, not a percentage: {float(value) / 100:g} for {float(value):g}%"
    return ""


@dataclass(frozen=True)
class CompressConfig:
    """Validated settings of one run.  ``None`` fields are resolved to documented defaults."""

    sparsity: float = 0.7
    method: Method = "auto"
    update: Update = "auto"
    scope: Scope = "global"
    keep: tuple[str, ...] = ()
    min_density: float = 0.0
    ridge: float = DEFAULT_RIDGE
    first_order: bool = False
    stages: int | None = None
    schedule: Schedule = "poly"
    start_sparsity: float | None = None
    max_iter: int = 100
    rank: Rank = "magnitude"
    block_size: int = 2000
    max_memory: int | None = None
    loss: Loss = "auto"
    fisher: Fisher = "auto"
    output: str | None = None
    mini_batch: int = 1
    num_samples: int = 1000
    seed: int = 0
    storage: Storage = "dense"
    holdout: float = 0.2
    batch_size: int = 64
    workdir: str | None = None
    pattern: str = "unstructured"
    allow_empty: bool = False
    fisher_rows: int = 0
    distill: bool = False
    auto_distill: bool = True
    # layer-wise reconstruction (--method layerwise, --update layerwise) and statistics correction
    allocation: Allocation = "obd"
    layer_floor: float = 0.2
    damp: float = 0.01
    max_rows: int = 16
    recurrent_refits: int = 1
    targets: Targets = "dense"
    refit: bool = True
    bn_recalibrate: Switch = "auto"
    bias_correction: Switch = "auto"
    class_offsets: Switch = "auto"
    allocation_samples: int = 64
    select: Select = "sparsegpt"
    row_weights: RowWeights = "auto"
    head_select: HeadSelect = "auto"
    structure: Structure = "none"
    sparsity_of: SparsityOf = "channels"
    channel_multiple: int = 0
    latency_check: bool = True
    latency_batches: tuple[int, ...] = (1, 32)

    def __post_init__(self) -> None:
        def bad(name: str, value: object, why: str) -> ConfigError:
            return ConfigError(f"{_flag(name)}={value!r}: {why}")

        self._check_types(bad)
        object.__setattr__(self, "_given", {name: getattr(self, name) for name in _RESOLVED})

        if not isinstance(self.sparsity, (int, float)) or not 0.0 <= float(self.sparsity) < 1.0:
            raise bad("sparsity", self.sparsity, "must be in [0, 1)" + percent_hint(self.sparsity))
        choices: dict[str, tuple[str, ...]] = {
            "method": METHODS,
            "update": ("auto", "none", "obs", "layerwise"),
            "scope": ("global", "layer"),
            "storage": ("auto", "sparse", "dense"),
            "schedule": ("poly", "exp", "linear", "const", "geom"),
            "loss": ("auto", "ce", "mse"),
            "fisher": ("auto", "empirical", "sampled", "argmax", "kl"),
            "rank": ("magnitude", "obd"),
            "allocation": ALLOCATIONS,
            "targets": ("dense", "pruned"),
            "bn_recalibrate": ("auto", "on", "off"),
            "bias_correction": ("auto", "on", "off"),
            "class_offsets": ("auto", "on", "off"),
            "select": ("sparsegpt", "magnitude"),
            "row_weights": ("auto", "fisher", "off"),
            "head_select": ("auto", "layer", "classes"),
            "structure": ("none", "channel"),
            "sparsity_of": ("channels", "flops"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, getattr(self, name), f"must be one of {', '.join(allowed)}")
        if not 0.0 <= self.min_density <= 1.0:
            raise bad("min_density", self.min_density, "must be in [0, 1]")
        if self.min_density > 1.0 - self.sparsity + 1e-12 and self.sparsity > 0:
            raise bad(
                "min_density", self.min_density, f"exceeds the overall density 1 - sparsity = {1 - self.sparsity:g}"
            )
        if not (self.ridge >= 0.0 and self.ridge < float("inf")):
            raise bad("ridge", self.ridge, "must be a finite number ≥ 0")
        if self.distill and self.method not in ("auto", "chita", "chita++"):
            raise bad("distill", self.distill, f"is a CHITA++ objective; --method={self.method} does not use it")
        if self.distill:  # the high-sparsity switch: multi-stage CHITA on the KL to the dense model
            object.__setattr__(self, "method", "chita++")
        if self.stages is not None and self.stages < 1:
            raise bad("stages", self.stages, "must be ≥ 1")
        if self.stages is not None and self.stages > 1 and self.method != "chita++":
            raise bad("stages", self.stages, "multi-stage pruning is --method chita++")
        nm = self._parse_pattern()
        if nm is None:
            object.__setattr__(self, "pattern", "unstructured")
            if self.start_sparsity is not None and not 0.0 <= self.start_sparsity <= self.sparsity:
                raise bad("start_sparsity", self.start_sparsity, f"must be in [0, --sparsity={self.sparsity}]")
        else:
            # --pattern N:M fixes the sparsity: N of every M kept on each eligible tensor (see the README)
            if self.min_density > 0:
                raise bad("min_density", self.min_density, f"not used with --pattern {nm} (it fixes every density)")
            if self.start_sparsity is not None and not 0.0 <= self.start_sparsity <= nm.sparsity:
                raise bad("start_sparsity", self.start_sparsity, f"must be in [0, {nm.sparsity:g}] with --pattern {nm}")
            object.__setattr__(self, "pattern", str(nm))
            if self.start_sparsity is None:  # CHITA++ tightens the per-group cap from about half the pattern
                object.__setattr__(self, "start_sparsity", nm.sparsity / 2)
        for name in ("max_iter", "block_size", "mini_batch", "num_samples", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise bad(name, getattr(self, name), "must be ≥ 1")
        if self.max_memory is not None and self.max_memory < 2**20:
            raise bad("max_memory", self.max_memory, "must be at least 1 MiB")
        check_limits(self)
        if not 0.0 < self.holdout < 1.0:
            raise bad("holdout", self.holdout, "must be in (0, 1)")
        if not isinstance(self.fisher_rows, int) or not 0 <= self.fisher_rows <= 65536:
            raise bad("fisher_rows", self.fisher_rows, "must be an integer in [0, 65536] (0: automatic)")
        if self.distill and self.first_order:
            raise bad("distill", self.distill, "replaces --first-order (the linear term is the KL's gradient)")
        if self.distill and self.mini_batch != 1:
            raise bad("distill", self.distill, f"needs per-sample rows; got --mini-batch={self.mini_batch}")
        if self.distill and self.fisher not in ("auto", "kl"):
            raise bad("fisher", self.fisher, "--distill uses the KL's own curvature: --fisher kl (or auto)")
        if self.distill:
            object.__setattr__(self, "fisher", "kl")
            # --distill fits the dense outputs themselves, so the statistics correction has nothing
            # to restore; deciding it on `auto` would hold out 20% of the calibration data from the
            # fit (BENCHMARKS.md, "The high-sparsity switch"). `on` still forces it.
            for name in ("bn_recalibrate", "bias_correction", "class_offsets"):
                if getattr(self, name) == "auto":
                    object.__setattr__(self, name, "off")
        if self.fisher == "kl" and self.mini_batch != 1:
            raise bad("fisher", self.fisher, f"kl needs per-sample rows; got --mini-batch={self.mini_batch}")
        if not 0.0 <= self.layer_floor <= 1.0:
            raise bad("layer_floor", self.layer_floor, "must be in [0, 1]")
        if not (self.damp > 0.0 and self.damp < float("inf")):
            raise bad("damp", self.damp, "must be a finite number > 0")
        if (
            isinstance(self.recurrent_refits, bool)
            or not isinstance(self.recurrent_refits, int)
            or not (0 <= self.recurrent_refits <= 10)
        ):
            raise bad("recurrent_refits", self.recurrent_refits, "must be an integer in [0, 10]")
        for name in ("max_rows", "allocation_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2**31 - 1:
                raise bad(name, value, "must be an integer in [0, 2147483647] (0: see --help)")
        layerwise = self.method == "layerwise" or self.update == "layerwise"
        if self.pattern.strip().lower() != "unstructured" and layerwise:  # (auto then resolves to chita)
            raise bad("pattern", self.pattern, "the layer-wise pass does not keep N:M patterns; use another --method")
        if self.update == "none" and self.method in ("auto", "chita", "chita++"):
            raise bad("update", self.update, "CHITA always updates the kept weights (use --method magnitude)")
        if self.structure == "channel" and self.distill:  # (--distill has set the method to chita++ by now)
            raise bad("distill", self.distill, "is a weight-pruning objective; --structure channel does not use it")
        if self.structure == "channel" and self.method == "auto":  # channel pruning's own default selection
            object.__setattr__(self, "method", "chita")
        if self.structure == "channel" and self.method not in ("chita", "magnitude"):
            raise bad("method", self.method, "channel pruning (--structure channel) supports chita and magnitude")
        if self.structure == "channel" and self.update == "layerwise":
            raise bad(
                "update", self.update, "channel pruning re-fits by least squares itself; use --update auto, obs or none"
            )
        if self.structure == "channel" and nm is not None:
            raise bad("pattern", self.pattern, "is weight pruning; --structure channel removes whole channels instead")
        if self.structure != "channel" and self.sparsity_of != "channels":
            raise bad("sparsity_of", self.sparsity_of, "counts FLOPs only with --structure channel")
        if self.channel_multiple < 0:
            raise bad("channel_multiple", self.channel_multiple, "must be ≥ 0 (0: the CPU's kernel block)")
        if not self.latency_batches or any(int(b) < 1 for b in self.latency_batches):
            raise bad("latency_batches", self.latency_batches, "must be batch sizes ≥ 1")
        object.__setattr__(self, "latency_batches", tuple(int(b) for b in self.latency_batches))
        object.__setattr__(self, "sparsity", float(self.sparsity))
        object.__setattr__(self, "keep", tuple(self.keep))
        if self.stages is None:
            default = DISTILL_STAGES if self.distill else DEFAULT_STAGES
            object.__setattr__(self, "stages", default if self.method == "chita++" else 1)
        if self.start_sparsity is None:
            object.__setattr__(self, "start_sparsity", min(0.5, self.sparsity))
        if self.max_memory is None:
            object.__setattr__(self, "max_memory", default_max_memory())

    def _check_types(self, bad: Callable[[str, object, str], ConfigError]) -> None:
        """Python callers: each field has its flag's type (numbers as numbers, switches as bools),
        converted to plain ``float``/``int``/``bool``; strings for ``keep`` and ``latency_batches``
        are read as on the command line."""
        for name in (*_FLOATS, *_INTS, *_BOOLS, "output", "workdir"):
            value = getattr(self, name)
            if value is None and name in _OPTIONAL:
                continue
            if name in _BOOLS:
                if not isinstance(value, (bool, np.bool_)):
                    raise bad(name, value, "must be True or False")
                value = bool(value)
            elif name == "output":
                if not isinstance(value, str):
                    raise bad(name, value, "must be a string (an output name) or None")
            elif name == "workdir":
                if not isinstance(value, (str, os.PathLike)):
                    raise bad(name, value, "must be a path or None")
                value = os.fspath(value)
            elif isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
                raise bad(name, value, "must be an integer" if name in _INTS else "must be a number")
            elif name in _INTS:
                if not (isinstance(value, numbers.Integral) or float(value).is_integer()):
                    raise bad(name, value, "must be an integer")
                value = int(value) if isinstance(value, numbers.Integral) else int(float(value))
            else:
                value = float(value)
            object.__setattr__(self, name, value)
        keep = _names(self.keep)
        if keep is None:
            raise bad("keep", self.keep, "must be tensor names (a tuple of strings, or one comma-separated string)")
        object.__setattr__(self, "keep", keep)
        sizes = _sizes(self.latency_batches)
        if sizes is None:
            raise bad("latency_batches", self.latency_batches, "must be batch sizes ≥ 1 (integers, or '1,32')")
        object.__setattr__(self, "latency_batches", sizes)

    def _parse_pattern(self) -> NMPattern | None:
        try:
            return NMPattern.parse(str(self.pattern))
        except SolverError:
            msg = f"must be unstructured or N:M with 0 < N < M ≤ {MAX_GROUP}, e.g. 2:4"
            raise ConfigError(f"--pattern={self.pattern!r}: {msg}") from None

    @property
    def nm(self) -> NMPattern | None:
        """The N:M pattern, or ``None`` for unstructured pruning."""
        return NMPattern.parse(self.pattern)

    @property
    def needs_gradients(self) -> bool:
        """Whether the method uses the per-sample gradient matrix X."""
        if self.method == "layerwise":
            return self.allocation in ("obd", "chita")
        return not (self.method == "magnitude" and self.update != "obs")

    @property
    def layerwise_update(self) -> bool:
        """Whether the kept weights are re-fitted layer by layer after the method's selection."""
        return self.method == "layerwise" or self.update == "layerwise"

    def with_(self, **changes: Any) -> CompressConfig:
        """A validated copy with some fields changed: what the constructor gives for this config's
        arguments with ``changes`` applied (resolved defaults such as ``stages`` are resolved again)."""
        names = [f.name for f in fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ConfigError(f"unknown field(s) {unknown} of CompressConfig; the fields are the compress flags")
        given = {name: getattr(self, name) for name in names} | getattr(self, "_given", {})
        return CompressConfig(**(given | changes))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["keep"] = list(self.keep)
        d["latency_batches"] = list(self.latency_batches)
        return d
