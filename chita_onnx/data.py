"""Calibration and evaluation data: loaders, validation against the model, held-out splits.

Formats accepted wherever a data source is expected:

* a ``.npz`` file whose keys are the model's input names, plus an optional integer ``labels`` array
  of shape ``(N,)``, or ``(N, ...)`` with a class per position (:func:`per_position`: read for the
  evaluation only); for a single-input model any one non-label array will do.  Every input with a
  batch axis holds its samples on axis 0 whatever the model's batch axis is (``feed`` moves it); an
  input without one (``InputSpec.batch_axis is None``, e.g. a rank-0 sample rate) is stored once
  with the model's shape and shared by all samples;
* a folder of such ``.npz`` files, one batch each, read in name order;
* for a single-input model, a ``.npy`` file holding that input (no labels);
* the word ``random``: Gaussian inputs for a quick try (quality needs real data);
* in the Python API, a mapping ``{input name: array}`` (optionally with ``labels``), or any
  re-iterable :class:`~chita_onnx.data_types.CalibrationSource`; its batches may also be feed dicts
  (optionally with ``labels``) or ``(inputs, labels)`` pairs.  A one-shot iterator (a generator) or
  an object with ``get_next()`` (onnxruntime's ``CalibrationDataReader``) is read once into memory.

``.npz`` and ``.npy`` files are always opened with ``allow_pickle=False``: an object array is refused.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .checks import check_finite, check_fits, check_input_dtype
from .data_types import Batch, CalibrationSource, InputSpec
from .errors import DataError, first_line
from .limits import check_npy, check_npz, check_npz_folder, check_random_size, is_npy

log = logging.getLogger(__name__)

LABELS_KEY = "labels"
DataSpec = str | os.PathLike[str] | Mapping[str, Any] | CalibrationSource


def static_names(specs: Sequence[InputSpec] | None) -> frozenset[str]:
    """The inputs without a batch axis: one value shared by every sample."""
    return frozenset(s.name for s in specs or () if s.batch_axis is None)


#: Names that class labels are often saved under; an array so named that is not a model input, with
#: one integer per sample, gets a hint to rename it (it is not read as labels: only ``labels`` is).
LABEL_ALIASES = frozenset({"label", "y", "y_true", "target", "targets", "class", "classes", "gt", "truth"})


def _label_hint(arrays: Mapping[str, NDArray[np.generic]], inputs: Sequence[str]) -> str:
    """``"; 'y' looks like class labels: …"`` for the first array that is not a model input, is named
    like labels (:data:`LABEL_ALIASES`, any case) and holds one integer per sample; else ``""``."""
    n = next((len(a) for k, a in arrays.items() if k in inputs and np.ndim(a) > 0), None)
    for key, a in arrays.items():
        if key in inputs or key.lower() not in LABEL_ALIASES or np.ndim(a) != 1:
            continue
        if n is not None and len(a) != n:
            continue
        whole = np.issubdtype(a.dtype, np.integer)
        if not whole and np.issubdtype(a.dtype, np.floating):
            f = np.asarray(a, dtype=np.float64)
            whole = bool(np.all(np.isfinite(f))) and bool(np.all(f == np.round(f)))
        if whole:
            return (
                f"; {key!r} looks like class labels: save them under 'labels' to use them "
                "(without labels the loss follows the model's own outputs)"
            )
    return ""


def per_sample_advice(labels: NDArray[np.generic], n: int | None) -> str:
    """The advice for labels of several values per sample (a sequence or a map) where only one class
    index per sample is read (the gradient API)."""
    if labels.ndim < 2 or labels.shape[0] != n:
        return ""
    return (
        ": one class index per sample; labels per position (a sequence or a map) are read by compress, "
        "evaluate and sweep for the evaluation only; leave 'labels' out here"
    )


def per_position(labels: NDArray[np.generic] | None) -> bool:
    """Whether ``labels`` hold a class index per position of each sample (``(n, T)``, ``(n, H, W)``):
    they score a tagger's or segmenter's outputs, where a negative value marks a position that is not
    scored (padding; PyTorch's ignore index ``-100``).  The loss never reads them: it follows the
    model's own outputs, as for a sequence output it always does."""
    return labels is not None and np.ndim(labels) > 1


def _labels_problem(labels: NDArray[np.generic], n: int) -> str | None:
    """Why ``labels`` do not fit ``n`` samples (None when they do): integers, ``(n,)`` with one class
    index per sample or ``(n, ...)`` with one per position."""
    if labels.ndim < 1 or labels.shape[0] != n:
        return f"'labels' has shape {labels.shape}, expected ({n},) or ({n}, positions...)"
    if not np.issubdtype(labels.dtype, np.integer):
        hint = ""
        if labels.ndim == 2 and np.issubdtype(labels.dtype, np.floating) and labels.size:
            f = np.asarray(labels, dtype=np.float64)
            if bool(np.all((f == 0) | (f == 1))) and bool(np.all(f.sum(axis=1) == 1)):
                hint = " (they look one-hot: save labels.argmax(1), one class index per sample)"
        return f"'labels' must be integers, got dtype {labels.dtype}{hint}"
    return None


def _label_range_problem(labels: NDArray[np.generic], num_classes: int | None) -> str | None:
    """Why integer ``labels`` are out of range (None when they are not): a class index per sample must
    lie in ``[0, num_classes)``; per position a negative one is not scored, the rest must be ``≥ 0``."""
    scored = labels[np.asarray(labels) >= 0] if per_position(labels) else labels
    if scored.size and (scored.min() < 0 or (num_classes is not None and scored.max() >= num_classes)):
        bad = int(scored.min()) if scored.min() < 0 else int(scored.max())
        last = (num_classes or 0) - 1
        return f"label {bad} is out of range; the model has {num_classes} classes (0..{last})"
    return None


class ArraySource:
    """In-memory arrays served in batches of ``batch_size`` (re-iterable).

    ``static`` names the inputs without a batch axis: they are passed whole with every batch (after
    the batched ones) instead of being sliced.
    """

    def __init__(
        self,
        inputs: Mapping[str, NDArray[np.generic]],
        labels: NDArray[np.generic] | None = None,
        *,
        batch_size: int = 64,
        origin: str = "arrays",
        static: Sequence[str] | frozenset[str] = (),
    ) -> None:
        if not inputs:
            raise DataError(f"{origin}: no input arrays")
        self.static = frozenset(k for k in static if k in inputs)
        sizes = {k: int(np.shape(v)[0]) if np.ndim(v) else -1 for k, v in inputs.items() if k not in self.static}
        if not sizes:
            raise DataError(f"{origin}: every input is static (no batch axis); nothing holds samples")
        n = next(iter(sizes.values()))
        if any(s != n for s in sizes.values()) or n <= 0:
            raise DataError(f"{origin}: arrays differ in length (axis 0) or are empty: {sizes}")
        if labels is not None:
            labels = np.asarray(labels)
            problem = _labels_problem(labels, n)  # their range is validate_source's
            if problem is not None:
                raise DataError(f"{origin}: {problem}")
        batched = {k: np.asarray(v) for k, v in inputs.items() if k not in self.static}
        self.inputs = {**batched, **{k: np.asarray(v) for k, v in inputs.items() if k in self.static}}
        self.labels: NDArray[np.int64] | None = None if labels is None else labels.astype(np.int64, copy=False)
        self.batch_size = max(1, int(batch_size))
        self.origin = origin

    @property
    def num_samples(self) -> int:
        return int(next(v for k, v in self.inputs.items() if k not in self.static).shape[0])

    def __iter__(self) -> Iterator[Batch]:
        n, b = self.num_samples, self.batch_size
        for start in range(0, n, b):
            sl = slice(start, min(n, start + b))
            yield Batch(
                {k: v if k in self.static else v[sl] for k, v in self.inputs.items()},
                None if self.labels is None else self.labels[sl],
            )

    def take(self, index: NDArray[np.integer]) -> ArraySource:
        """A new source holding the samples at ``index`` (in that order); static inputs are kept."""
        return ArraySource(
            {k: v if k in self.static else v[index] for k, v in self.inputs.items()},
            None if self.labels is None else self.labels[index],
            batch_size=self.batch_size,
            origin=self.origin,
            static=self.static,
        )


def _read_npz(
    path: Path, specs: Sequence[InputSpec] | None
) -> tuple[dict[str, NDArray[np.generic]], NDArray[np.generic] | None]:
    if is_npy(path) and specs is not None and len(specs) == 1:  # one array for a one-input model
        check_npy(path)
        try:
            return {specs[0].name: np.load(path, allow_pickle=False)}, None
        except Exception as exc:
            raise DataError(f"{path}: not a readable .npy array ({type(exc).__name__}: {first_line(exc)})") from None
    check_npz(path)  # headers and sizes first: no FIFO, zip bomb or object array is ever read
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {}
            for key in npz.files:
                try:
                    arrays[key] = npz[key]
                except ValueError as exc:
                    if "allow_pickle" in str(exc) or "Object arrays" in str(exc):
                        raise DataError(
                            f"{path}: array {key!r} holds Python objects; refusing to load it with pickle"
                        ) from None
                    raise
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except Exception as exc:
        raise DataError(f"{path}: not a readable .npz file ({type(exc).__name__}: {first_line(exc)})") from None
    labels = arrays.pop(LABELS_KEY, None)
    if specs is not None:
        names = [s.name for s in specs]
        hint = "" if labels is not None else _label_hint(arrays, names)
        if len(names) == 1 and names[0] not in arrays:
            if len(arrays) != 1:
                raise DataError(
                    f"{path}: the model has one input {names[0]!r}; expected that key or exactly one "
                    f"non-label array, found {sorted(arrays)}{hint}"
                )
            arrays = {names[0]: next(iter(arrays.values()))}
        missing = [n for n in names if n not in arrays]
        if missing:
            raise DataError(f"{path}: missing model input(s) {missing}; found keys {sorted(arrays)}")
        extra = sorted(set(arrays) - set(names))
        if extra:
            log.warning("%s: ignoring arrays that are not model inputs: %s%s", path, extra, hint)
        arrays = {n: arrays[n] for n in names}
    return arrays, labels


class NpzFolderSource:
    """A folder of ``.npz`` files, one batch each, read lazily in file-name order (re-iterable)."""

    def __init__(self, folder: Path, specs: Sequence[InputSpec] | None) -> None:
        self.files = sorted(folder.glob("*.npz"))
        if not self.files:
            raise DataError(f"{folder}: folder holds no .npz files")
        check_npz_folder(self.files)
        self.specs = specs
        self.origin = str(folder)

    def __iter__(self) -> Iterator[Batch]:
        for f in self.files:
            arrays, labels = _read_npz(f, self.specs)
            source = ArraySource(arrays, labels, batch_size=1 << 30, origin=str(f), static=static_names(self.specs))
            yield source.__iter__().__next__()


class RandomSource(ArraySource):
    """Seeded random inputs for a quick try; symbolic dims become 1.  Static inputs (no batch axis)
    get one random value; integer inputs are drawn from {0, 1}."""

    def __init__(
        self, specs: Sequence[InputSpec], *, num_samples: int = 128, seed: int = 0, batch_size: int = 64
    ) -> None:
        rng = np.random.default_rng(seed)
        arrays: dict[str, NDArray[np.generic]] = {}
        for spec in specs:
            sample = [d if isinstance(d, int) and d > 0 else 1 for d in spec.sample_shape]
            shape = sample if spec.batch_axis is None else [num_samples, *sample]
            check_random_size(spec.name, shape)
            if np.issubdtype(spec.dtype, np.floating):
                arrays[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
            elif np.issubdtype(spec.dtype, np.integer) or spec.dtype == np.bool_:
                arrays[spec.name] = rng.integers(0, 2, size=shape).astype(spec.dtype)
            else:
                raise DataError(f"--data random: cannot make random data for input {spec.name!r} of dtype {spec.dtype}")
        super().__init__(arrays, None, batch_size=batch_size, origin="random data", static=static_names(specs))


def _check_shapes(arrays: Mapping[str, NDArray[np.generic]], specs: Sequence[InputSpec] | None, origin: str) -> None:
    """Name the first array whose shape does not fit its input (before lengths are compared)."""
    for spec in specs or ():
        if spec.name in arrays:
            problem = check_array(np.asarray(arrays[spec.name]), spec)
            if problem is not None:
                raise DataError(f"{origin}: {problem}")


def open_source(
    spec: DataSpec,
    specs: Sequence[InputSpec] | None = None,
    *,
    batch_size: int = 64,
    seed: int = 0,
    random_samples: int = 128,
    name: str = "data",
) -> CalibrationSource:
    """Turn any accepted data specification into a re-iterable source (see the module docstring).

    ``name`` labels in-memory data in error messages (``data``, ``eval_data``); files are named by path."""
    if isinstance(spec, str) and spec == "random":
        if specs is None:
            raise DataError("--data random needs the model's inputs")
        log.warning("using random calibration data: fine for a quick try, but pruning quality needs real data")
        return RandomSource(specs, num_samples=random_samples, seed=seed, batch_size=batch_size)
    if isinstance(spec, (str, bytes, os.PathLike)):
        path = Path(os.fsdecode(spec))
        if path.is_dir():
            return NpzFolderSource(path, specs)
        if not path.exists():
            raise DataError(f"{path}: no such file or folder")
        arrays, labels = _read_npz(path, specs)
        _check_shapes(arrays, specs, str(path))
        return ArraySource(arrays, labels, batch_size=batch_size, origin=str(path), static=static_names(specs))
    if isinstance(spec, Mapping):
        arrays = {str(k): np.asarray(v) for k, v in spec.items() if k != LABELS_KEY}
        labels = spec.get(LABELS_KEY)
        if specs is not None and len(specs) == 1 and len(arrays) == 1 and specs[0].name not in arrays:
            arrays = {specs[0].name: next(iter(arrays.values()))}
        _check_shapes(arrays, specs, name)
        return ArraySource(
            arrays,
            None if labels is None else np.asarray(labels),
            batch_size=batch_size,
            origin=name,
            static=static_names(specs),
        )
    if isinstance(spec, np.ndarray):
        names = [s.name for s in specs or ()]
        raise DataError(f"{name}: a bare ndarray; pass a mapping {{input name: array}} (inputs {names}) or a .npz file")
    if callable(getattr(spec, "get_next", None)) or isinstance(spec, CalibrationSource):
        return _user_source(spec, name)
    raise DataError(
        f"{name}: unsupported data specification of type {type(spec).__name__}: pass a .npz path, a folder, "
        "'random', a mapping {input name: array}, an iterable of batches or an object with get_next()"
    )


class _Batches:
    """User batches held in memory (a drained one-shot iterator or reader): re-iterable."""

    def __init__(self, batches: list[Batch], origin: str) -> None:
        self.batches = batches
        self.origin = origin

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.batches)


class _AsBatches:
    """A re-iterable user source whose items are feed dicts or ``(inputs, labels)`` pairs, as Batches."""

    def __init__(self, items: Iterable[Any], origin: str) -> None:
        self.items = items
        self.origin = origin

    def __iter__(self) -> Iterator[Batch]:
        for i, item in enumerate(self.items):
            yield _as_batch(item, f"{self.origin} (batch {i})")


def _as_batch(item: Any, where: str) -> Batch:
    """One user batch as a :class:`Batch`: a Batch, a feed dict (optionally with ``labels``, as
    onnxruntime's ``CalibrationDataReader.get_next()`` returns) or an ``(inputs, labels)`` pair."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, Mapping):
        labels = item.get(LABELS_KEY)
        return Batch({str(k): v for k, v in item.items() if k != LABELS_KEY}, None if labels is None else labels)
    if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], Mapping):
        return Batch(dict(item[0]), None if item[1] is None else item[1])
    raise DataError(
        f"{where}: got a {type(item).__name__}; each batch must be a chita_onnx.Batch, a mapping "
        "{input name: array} (optionally with 'labels') or an (inputs, labels) pair"
    )


def _user_source(spec: Any, origin: str = "data") -> CalibrationSource:
    """A user's source as a re-iterable source of :class:`Batch`.  A one-shot iterator (a generator,
    an onnxruntime ``CalibrationDataReader``) is read once into memory, since the run iterates the
    data several times; a re-iterable of feed dicts or pairs is converted batch by batch."""
    if isinstance(spec, (ArraySource, NpzFolderSource)):
        return spec
    if not isinstance(spec, CalibrationSource):  # get_next() until None
        items: Iterable[Any] = iter(spec.get_next, None)
    elif iter(spec) is spec:  # an iterator: single use
        items = spec
    else:
        first = next(iter(spec), None)
        return spec if first is None or isinstance(first, Batch) else _AsBatches(spec, origin)
    batches = [_as_batch(item, f"{origin} (batch {i})") for i, item in enumerate(items)]
    log.info("read a single-use calibration source (%d batches) into memory", len(batches))
    return _Batches(batches, origin)


def _dim_ok(expected: int | str | None, got: int) -> bool:
    return not isinstance(expected, int) or expected <= 0 or expected == got


def _show(dims: Sequence[int | str | None]) -> tuple[int | str, ...]:
    return tuple(d if isinstance(d, int) and d > 0 else "?" for d in dims)


def expected_shape(spec: InputSpec) -> str:
    """How a calibration array for ``spec`` must look, for error messages."""
    if spec.batch_axis is None:
        return f"{_show(spec.shape)} (no batch axis in the model: one value shared by all samples)"
    if spec.batch_axis == 0:
        return str(_show(spec.shape))
    want = "(" + ", ".join(["samples", *map(str, _show(spec.sample_shape))]) + ")"
    return (
        f"{want}: samples on axis 0, moved to the model's batch axis {spec.batch_axis} of {_show(spec.shape)} when fed"
    )


def _dim_text(d: int | str | None) -> str:
    return str(d) if (isinstance(d, int) and d > 0) or (isinstance(d, str) and d) else "?"


def input_layout(spec: InputSpec) -> str:
    """One line on how calibration arrays for ``spec`` hold their samples (for ``inspect``)."""
    dims = "[" + ", ".join(map(_dim_text, spec.shape)) + "]"
    if spec.batch_axis is None:
        return f"input {spec.name!r} {dims}: no batch axis, one value shared by all samples"
    want = "(" + ", ".join(["samples", *map(_dim_text, spec.sample_shape)]) + ")"
    fixed = spec.shape[spec.batch_axis]
    batch = f", a fixed batch of {fixed}" if isinstance(fixed, int) and fixed > 0 else ""
    fed = f", fed on the model's axis {spec.batch_axis}" if spec.batch_axis else ""
    return f"input {spec.name!r} {dims}: arrays {want}{fed}{batch}"


def check_array(arr: NDArray[np.generic], spec: InputSpec) -> str | None:
    """Why ``arr`` does not fit ``spec`` (samples on axis 0 unless static), or ``None``."""
    want = spec.shape if spec.batch_axis is None else (None, *spec.sample_shape)
    if arr.ndim != len(want) or not all(_dim_ok(e, g) for e, g in zip(want, arr.shape, strict=False)):
        hint = _reorder_hint(arr.shape, want) if spec.batch_axis is not None else ""
        return f"input {spec.name!r} has shape {tuple(arr.shape)}, the model expects {expected_shape(spec)}{hint}"
    return None


def _reorder_hint(got: tuple[int, ...], want: Sequence[int | str | None]) -> str:
    """When the per-sample sizes ``got[1:]`` are the model's fixed ones in another order (an image saved
    channels last for a channels-first model, say), how to reorder the array; else ``""``."""
    sizes = list(want[1:])
    if len(got) != len(want) or not all(isinstance(d, int) and d > 0 for d in sizes):
        return ""
    free = list(range(1, len(got)))
    perm = [0]
    for d in sizes:
        j = next((j for j in free if got[j] == d), None)
        if j is None:
            return ""
        free.remove(j)
        perm.append(j)
    return f" (the same sizes in another order: np.transpose(x, {tuple(perm)}) gives the model's layout)"


def batch_size(batch: Batch, specs: Sequence[InputSpec]) -> int:
    """Samples in ``batch``: axis 0 of its first batched input."""
    for s in specs:
        if s.batch_axis is not None and s.name in batch.inputs:
            return int(np.shape(batch.inputs[s.name])[0])
    return batch.size


def validate_source(
    source: CalibrationSource, specs: Sequence[InputSpec], *, num_classes: int | None = None, origin: str = "data"
) -> int:
    """Check every batch against the model inputs before any work starts; return the sample count.

    Float arrays are accepted for float inputs of another precision (converted on the fly); anything
    else must match the input's dtype.  Labels must be integers in ``[0, num_classes)``, one per
    sample, or one per position (:func:`per_position`; negative ones are not scored).
    """
    origin = getattr(source, "origin", origin)
    names = [s.name for s in specs]
    total = 0
    for spec in specs:
        check_input_dtype(spec.name, spec.dtype)
    labelled: bool | None = None
    files = getattr(source, "files", None)
    for i, batch in enumerate(source):
        where = f"{origin} (batch {i})" if not isinstance(source, ArraySource) else origin
        if isinstance(files, list) and i < len(files):
            where = str(files[i])
        if not (hasattr(batch, "inputs") and hasattr(batch, "labels")):
            raise DataError(
                f"{where}: got a {type(batch).__name__}, not a chita_onnx.Batch; give every batch in one form "
                "(and open user data with chita_onnx.open_source)"
            )
        if labelled is not None and labelled != (batch.labels is not None):
            raise DataError(
                f"{where}: {'has' if batch.labels is not None else 'has no'} 'labels' but the data before it "
                f"{'has none' if batch.labels is not None else 'has'}; label every batch or none"
            )
        labelled = batch.labels is not None
        missing = [n for n in names if n not in batch.inputs]
        if missing:
            raise DataError(f"{where}: missing model input(s) {missing}; found {sorted(batch.inputs)}")
        size = None
        for spec in specs:
            arr = np.asarray(batch.inputs[spec.name])
            problem = check_array(arr, spec)
            if problem is not None:
                raise DataError(f"{where}: {problem}")
            same_kind = (
                np.issubdtype(arr.dtype, np.floating) and np.issubdtype(spec.dtype, np.floating)
            ) or arr.dtype == spec.dtype
            if not same_kind:
                raise DataError(f"{where}: input {spec.name!r} has dtype {arr.dtype}, the model expects {spec.dtype}")
            if spec.batch_axis is None:
                continue
            if size is not None and arr.shape[0] != size:
                raise DataError(f"{where}: inputs differ in batch size ({size} vs {arr.shape[0]} for {spec.name!r})")
            size = arr.shape[0]
            check_finite(arr, where, spec.name, total)
            check_fits(arr, spec.dtype, where, spec.name, total)
        if batch.labels is not None:
            labels = np.asarray(batch.labels)
            if per_position(labels) and num_classes is not None:
                raise DataError(
                    f"{where}: 'labels' has shape {labels.shape}, but the model scores {num_classes} classes once "
                    "per sample: give one class index per sample (from one-hot labels: labels.argmax(1))"
                )
            problem = _labels_problem(labels, int(size or 0)) or _label_range_problem(labels, num_classes)
            if problem is not None:
                raise DataError(f"{where}: {problem}")
        total += int(size or 0)
    if total == 0:
        raise DataError(f"{origin}: no samples")
    return total


def to_model_layout(arr: NDArray[np.generic], spec: InputSpec) -> NDArray[np.generic]:
    """A samples-first array moved to the model's batch axis, contiguous, in the model's dtype."""
    a = np.asarray(arr)
    if spec.batch_axis not in (None, 0):
        a = np.moveaxis(a, 0, spec.batch_axis)
    return np.require(a, dtype=spec.dtype, requirements="C")  # keeps a rank-0 input rank 0


def feed(batch: Batch, specs: Sequence[InputSpec]) -> dict[str, NDArray[np.generic]]:
    """The ORT feed dict of a batch: cast to the model's input dtypes, samples moved from axis 0 to
    each input's batch axis; static inputs as given."""
    return {s.name: to_model_layout(batch.inputs[s.name], s) for s in specs}


def materialize(source: CalibrationSource, specs: Sequence[InputSpec], *, batch_size: int = 64) -> ArraySource:
    """Gather a (small) source into memory, e.g. to split off a held-out part."""
    if isinstance(source, ArraySource):
        return source
    parts: dict[str, list[NDArray[np.generic]]] = {s.name: [] for s in specs}
    labels: list[NDArray[np.integer]] = []
    has_labels = True
    static = static_names(specs)
    for batch in source:
        for s in specs:
            if s.name not in static or not parts[s.name]:
                parts[s.name].append(np.asarray(batch.inputs[s.name]))
        if batch.labels is None:
            has_labels = False
        else:
            labels.append(np.asarray(batch.labels))
    return ArraySource(
        {k: v[0] if k in static else np.concatenate(v) for k, v in parts.items()},
        np.concatenate(labels) if has_labels and labels else None,
        batch_size=batch_size,
        origin=getattr(source, "origin", "data"),
        static=static,
    )


def rebatched(source: CalibrationSource, specs: Sequence[InputSpec], batch_size: int) -> ArraySource:
    """``source`` in memory, served in batches of exactly ``batch_size`` samples (the last may be
    shorter): for a model whose inputs fix the batch size."""
    whole = materialize(source, specs, batch_size=batch_size)
    return ArraySource(whole.inputs, whole.labels, batch_size=batch_size, origin=whole.origin, static=whole.static)


class _Unlabelled:
    """``source``'s batches without their labels (re-iterable)."""

    def __init__(self, source: CalibrationSource) -> None:
        self.source = source
        self.origin = getattr(source, "origin", "data")

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.source:
            yield Batch(batch[0], None)


def without_position_labels(source: CalibrationSource) -> CalibrationSource:
    """``source`` itself, or without its labels when they are per position (:func:`per_position`):
    the pruning reads none of those (they score the evaluation), so no loss is taken against them."""
    if isinstance(source, ArraySource):
        if not per_position(source.labels):
            return source
        return ArraySource(
            dict(source.inputs),
            None,
            batch_size=source.batch_size,
            origin=source.origin,
            static=source.static,
        )
    first = next(iter(source), None)
    if first is None or not per_position(None if first[1] is None else np.asarray(first[1])):
        return source
    return _Unlabelled(source)


def split_holdout(source: ArraySource, fraction: float, *, seed: int = 0) -> tuple[ArraySource, ArraySource]:
    """Split off a seeded random ``fraction`` of the samples for evaluation; return (calib, held-out)."""
    n = source.num_samples
    n_hold = round(fraction * n)
    if n_hold < 1 or n - n_hold < 1:
        raise DataError(f"{source.origin}: {n} samples are too few to hold out {fraction:.0%} for evaluation")
    perm = np.random.default_rng(seed).permutation(n)
    return source.take(np.sort(perm[n_hold:])), source.take(np.sort(perm[:n_hold]))
