"""Resource limits checked before anything is allocated: model tensor sizes, data files, schedules.

A hostile or broken input must fail fast with a clear message instead of filling the memory or
running forever.  Every limit here is checked against what a file *declares* (tensor dims, a zip
member's uncompressed size, an ``.npy`` header's shape) before the data behind it is read:

* **model tensors** — the dense bytes that a model's initializers, sparse initializers and
  ``Constant`` values declare must fit in :func:`model_limit` (half of the RAM: the pipeline holds
  a model at least twice);
* **data files** — the arrays of an ``.npz`` must fit in :func:`data_limit` (``--max-memory``, at
  least 256 MiB; by default 40% of the RAM), and an array or archive that inflates more than
  :data:`BOMB_RATIO`-fold to more than :data:`BOMB_MIN_BYTES` is refused as a zip bomb (store big
  arrays uncompressed with ``np.savez``); a folder of them must fit the same limit in total;
* **sparse initializers** — one that would densify more than :data:`SPARSE_RATIO`-fold to more
  than :data:`BOMB_MIN_BYTES` is refused before it is densified;
* **schedules and loops** — ``--stages`` is at most :data:`MAX_STAGES`, integer flags at most
  :data:`MAX_INT`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import zipfile
from collections.abc import Iterator
from contextvars import ContextVar
from math import prod
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.lib import format as npy_format

from .errors import ConfigError, DataError, ResourceError, first_line
from .paths import regular_file

if TYPE_CHECKING:
    from .config import CompressConfig

#: CHITA++ stages: every stage recomputes the gradients and solves, so more is never practical.
MAX_STAGES = 1000
#: Largest value of the count-like integer flags (samples, batch sizes, iterations, block size).
MAX_INT = 2**31 - 1
#: Largest ``--seed`` (NumPy seeds are non-negative).
MAX_SEED = 2**63 - 1
#: A zip member larger than this that inflates more than BOMB_RATIO-fold is refused as a zip bomb.
BOMB_MIN_BYTES = 64 * 2**20
BOMB_RATIO = 100
#: A sparse initializer may densify at most this many times its stored bytes (above BOMB_MIN_BYTES):
#: 99.9% sparsity is about 333-fold, so a model pruned by chita-onnx always loads.
SPARSE_RATIO = 1000
#: ``--max-memory`` never limits the data below this (it may be set tiny to force the block path).
DATA_FLOOR = 256 * 2**20
#: Longest ``.npy`` header read (NumPy's own default).
NPY_HEADER_MAX = 10_000
#: Most members of one ``.npz`` file.
MAX_NPZ_MEMBERS = 10_000


def total_memory() -> int:
    """Physical RAM in bytes (8 GiB if unknown)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def peak_memory() -> int | None:
    """The peak resident memory of this process so far, in bytes (``getrusage``'s ``ru_maxrss``: KiB on
    Linux, bytes on macOS); None where the platform does not say (Windows)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    return peak if sys.platform == "darwin" else peak * 1024


def model_limit() -> int:
    """Largest total of declared tensor bytes in a model: half of the RAM."""
    return total_memory() // 2


_DATA_BUDGET: ContextVar[int | None] = ContextVar("chita_onnx_data_budget", default=None)


def data_limit() -> int:
    """Largest in-memory size of one data source: ``--max-memory`` (at least :data:`DATA_FLOOR`)
    while :func:`data_budget` is active, else 40% of the RAM."""
    budget = _DATA_BUDGET.get()
    if budget is None:
        return int(0.4 * total_memory())
    return max(int(budget), DATA_FLOOR)


@contextlib.contextmanager
def data_budget(max_memory: int | None) -> Iterator[None]:
    """Within the block, data files are limited by ``max_memory`` (see :func:`data_limit`)."""
    token = _DATA_BUDGET.set(max_memory)
    try:
        yield
    finally:
        _DATA_BUDGET.reset(token)


def gib(n: int | float) -> str:
    """A byte count for messages: ``1.50 GiB``, ``12.0 MiB``, ``640 bytes``."""
    if n >= 2**30:
        return f"{n / 2**30:,.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    if n >= 2**10:
        return f"{n / 2**10:.1f} KiB"
    return f"{int(n)} bytes"


# ----------------------------------------------------------------------------------------- npz files


def _npy_header(fh: object, where: str) -> tuple[tuple[int, ...], np.dtype[np.generic]]:
    try:
        version = npy_format.read_magic(fh)  # type: ignore[arg-type]
        if version == (1, 0):
            shape, _, dtype = npy_format.read_array_header_1_0(fh, max_header_size=NPY_HEADER_MAX)  # type: ignore[arg-type]
        elif version in ((2, 0), (3, 0)):
            shape, _, dtype = npy_format.read_array_header_2_0(fh, max_header_size=NPY_HEADER_MAX)  # type: ignore[arg-type]
        else:
            raise ValueError(f"unknown .npy format version {version}")
    except (ValueError, EOFError, OSError, SyntaxError, TypeError, zipfile.BadZipFile) as exc:
        msg = first_line(exc)
        raise DataError(f"{where}: not a valid .npy array ({msg})") from None
    if any((not isinstance(d, int)) or d < 0 for d in shape):
        raise DataError(f"{where}: the .npy header declares an invalid shape {shape}")
    return tuple(shape), dtype


def _declared_bytes(where: str, shape: tuple[int, ...], dtype: np.dtype, held: int, holder: str) -> int:
    """The bytes an ``.npy`` header declares, after refusing an object array and a header that declares
    more than the ``held`` bytes its ``holder`` (``"file"``, ``"archive"``) has: truncated or forged."""
    if dtype.hasobject:
        raise DataError(f"{where} holds Python objects; refusing to load it with pickle")
    nbytes = prod(shape) * dtype.itemsize
    if nbytes > held:
        raise DataError(
            f"{where} declares shape {shape} of {dtype} ({gib(nbytes)}) but the {holder} holds {gib(held)}: "
            "truncated or forged"
        )
    return nbytes


def is_npy(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a regular file that starts with the ``.npy`` magic (a lone array)."""
    p = Path(path)
    try:
        if not p.is_file():
            return False
        with open(p, "rb") as fh:
            return fh.read(6) == b"\x93NUMPY"
    except OSError:
        return False


def check_npy(path: str | os.PathLike[str], flag: str | None = None) -> tuple[tuple[int, ...], np.dtype]:
    """Check a lone ``.npy`` array from its header, before NumPy reads it: not an object array, no
    more bytes declared than the file holds (truncated or forged), within :func:`data_limit`.
    Returns ``(shape, dtype)``."""
    p = Path(path)
    regular_file(p, flag)
    try:
        with open(p, "rb") as fh:
            shape, dtype = _npy_header(fh, str(p))
            offset = fh.tell()
        size = p.stat().st_size
    except OSError as exc:
        raise DataError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    nbytes = _declared_bytes(str(p), shape, dtype, size - offset, "file")
    limit = data_limit()
    if nbytes > limit:
        raise ResourceError(
            f"{p}: the array needs {gib(nbytes)} in memory, more than the data limit of {gib(limit)} (--max-memory)"
        )
    return shape, dtype


def check_npz(path: str | os.PathLike[str], flag: str | None = None) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Check an ``.npz`` file from its headers alone, before NumPy reads any array.

    Refuses a non-regular file (never opened), a file that is not a zip archive (a lone ``.npy`` is
    named as such), encrypted or non-``.npy`` members, object arrays, headers whose shape does not
    fit the member's declared size, zip bombs, and arrays that together exceed :func:`data_limit`.
    Returns ``{array name: (shape, dtype)}``.
    """
    p = Path(path)
    regular_file(p, flag)
    try:
        with open(p, "rb") as fh:
            head = fh.read(6)
        is_zip = zipfile.is_zipfile(p)
    except OSError as exc:
        raise DataError(f"{p}: cannot be read ({exc.strerror or exc})") from None
    if not is_zip:
        if head == b"\x93NUMPY":
            raise DataError(
                f"{p}: is a single .npy array, which feeds only a one-input model; save the inputs with "
                "np.savez(file, **arrays) instead"
            )
        raise DataError(f"{p}: not a .npz file (not a zip archive)")
    limit = data_limit()
    out: dict[str, tuple[tuple[int, ...], np.dtype]] = {}
    total = 0
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            if len(infos) > MAX_NPZ_MEMBERS:
                raise DataError(f"{p}: holds {len(infos):,} members; at most {MAX_NPZ_MEMBERS:,} arrays are read")
            for info in infos:
                name = info.filename
                key = name[:-4] if name.endswith(".npy") else name
                where = f"{p}: array {key!r}"
                if info.is_dir() or not name.endswith(".npy"):
                    raise DataError(f"{p}: member {name!r} is not a .npy array")
                if info.flag_bits & 0x1:
                    raise DataError(f"{where} is encrypted")
                size = int(info.file_size)
                if size > limit:
                    raise ResourceError(
                        f"{where} inflates to {gib(size)}, more than the data limit of {gib(limit)} (--max-memory)"
                    )
                if size > BOMB_MIN_BYTES and size > BOMB_RATIO * max(int(info.compress_size), 1):
                    raise ResourceError(
                        f"{where} inflates {size / max(info.compress_size, 1):,.0f}-fold to {gib(size)}; refusing a "
                        f"likely zip bomb (store large arrays uncompressed with np.savez)"
                    )
                with zf.open(info) as member:
                    shape, dtype = _npy_header(member, where)
                total += _declared_bytes(where, shape, dtype, size, "archive")
                if total > limit:
                    raise ResourceError(
                        f"{p}: its arrays need {gib(total)} in memory, more than the data limit of {gib(limit)} "
                        "(--max-memory)"
                    )
                out[key] = (shape, dtype)
            packed = sum(int(i.compress_size) for i in infos)
            if total > BOMB_MIN_BYTES and total > BOMB_RATIO * max(packed, 1):
                raise ResourceError(
                    f"{p}: its arrays inflate {total / max(packed, 1):,.0f}-fold to {gib(total)}; refusing a likely "
                    "zip bomb (store large arrays uncompressed with np.savez)"
                )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, EOFError, OSError, ValueError) as exc:
        msg = first_line(exc)
        raise DataError(f"{p}: not a readable .npz file ({type(exc).__name__}: {msg})") from None
    return out


# ------------------------------------------------------------------------------------------- flags


def check_int(flag: str, value: object, lo: int, hi: int = MAX_INT) -> int:
    """``value`` as an int in ``[lo, hi]``, else a :class:`ConfigError` naming ``flag``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{flag}={value!r}: must be an integer")
    if not lo <= int(value) <= hi:
        raise ConfigError(f"{flag}={value!r}: must be in [{lo}, {hi}]")
    return int(value)


def check_limits(config: CompressConfig) -> None:
    """The upper limits of a :class:`~chita_onnx.config.CompressConfig` (its own checks cover the
    lower ones): counts, ``--seed``, ``--stages`` and a ``--max-memory`` beyond the machine's RAM."""
    for name in ("max_iter", "block_size", "mini_batch", "num_samples", "batch_size"):
        check_int("--" + name.replace("_", "-"), getattr(config, name), 1)
    check_int("--seed", config.seed, 0, MAX_SEED)
    if config.stages is not None:
        check_int("--stages", config.stages, 1, MAX_STAGES)
    max_memory = config.max_memory
    if max_memory is not None and max_memory > total_memory():
        raise ConfigError(
            f"--max-memory={max_memory}: more than this machine's memory ({gib(total_memory())}); "
            "use --workdir for a gradient matrix larger than the RAM"
        )


def check_npz_folder(files: list[Path]) -> None:
    """A folder of ``.npz`` batches: each file as :func:`check_npz`, and all of them together within
    :func:`data_limit` (they are gathered in memory to hold out evaluation data)."""
    limit = data_limit()
    total = 0
    for f in files:
        total += sum(prod(shape) * dtype.itemsize for shape, dtype in check_npz(f).values())
        if total > limit:
            raise ResourceError(
                f"{f.parent}: the arrays of its .npz files need more than the data limit of {gib(limit)} (--max-memory)"
            )


def check_random_size(name: str, shape: list[int]) -> None:
    """``--data random`` for an input of declared ``shape``: its float64 draw must fit :func:`data_limit`."""
    need = prod(shape) * 8
    if need > data_limit():
        raise ResourceError(
            f"--data random: input {name!r} declares shape {shape[1:]}; {shape[0]} random samples would take "
            f"{gib(need)}, more than the data limit of {gib(data_limit())}"
        )
