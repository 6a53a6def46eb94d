"""Every path a command reads or writes, decided in one place and checked before any work starts.

A command lists its inputs (the model and its external-data files, the calibration and evaluation
data: files, folders and the files inside them) and its outputs (one ``(flag, path)`` per file it
will write).  :func:`plan_outputs` then refuses, with one line naming the flag and the path:

* an input that is missing or is not a regular file (a FIFO would block the read, a device never
  ends): the check uses ``stat`` and never opens it;
* an output that is an input, or another output: the same path after symlinks, or the same file
  through a hard link (same ``(st_dev, st_ino)``);
* an output inside a data folder (it would become part of the data), or one that is an existing
  folder or a non-regular file;
* an output folder that is missing or not writable, and a ``--workdir`` that is not a writable
  folder (both probed by creating and removing a temporary file, which is what root and read-only
  mounts answer truthfully).

Outputs are written into a hidden staging folder next to their destination (so the final rename
never crosses a file system) and moved into place by :meth:`OutputPlan.commit` — fsync, rename,
fsync of the folder — once the whole command has succeeded.  Leaving the ``with`` block any other
way (an error, Ctrl-C, SIGTERM) removes the staging folders: no temporary file and no partial
output survive, and nothing at a destination is touched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from .errors import ConfigError, DataError, ModelError, OutputError

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]

#: Prefix of the hidden staging folders; a leftover one (after a power cut) can be deleted.
STAGING_PREFIX = ".chita-onnx-"

_KINDS = {
    stat.S_IFREG: "a regular file",
    stat.S_IFLNK: "a symbolic link",
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


def file_kind(mode: int) -> str:
    """A readable name of the file type in ``st_mode``."""
    return _KINDS.get(stat.S_IFMT(mode), "not a regular file")


def _stat(path: Path) -> os.stat_result | None:
    """``stat`` (symlinks followed), ``None`` if nothing is there."""
    try:
        return path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # ELOOP (symlink loop), ENAMETOOLONG, EACCES on a parent, ...
        raise DataError(f"{path}: {exc.strerror or exc}") from None
    except ValueError:  # a NUL character
        raise DataError(f"{path!r}: not a valid path") from None


def regular_file(path: PathLike, flag: str | None = None, *, error: type[Exception] = DataError) -> os.stat_result:
    """``stat`` of ``path`` if it is an existing regular file (symlinks followed); otherwise raise
    ``error`` naming ``flag``.  Never opens the file, so a FIFO cannot block."""
    p = Path(path)
    label = f"{flag}={p}" if flag else str(p)
    st = _stat(p)
    if st is None:
        raise error(f"{label}: no such file")
    if not stat.S_ISREG(st.st_mode):
        raise error(f"{label}: is {file_kind(st.st_mode)}, not a regular file; refusing to read it")
    return st


# -------------------------------------------------------------------------------------------- inputs

_DATA_NAMES = {"--data": "calibration data", "--eval-data": "evaluation data"}


@dataclass
class Inputs:
    """The files and folders a command reads: ``(what it is, path)``; ``what`` names the flag."""

    files: list[tuple[str, Path]] = field(default_factory=list)
    folders: list[tuple[str, Path]] = field(default_factory=list)
    models: list[tuple[str, Path]] = field(default_factory=list)

    def add_model(self, path: PathLike, flag: str = "MODEL") -> None:
        """The model file (its external-data files are added by :meth:`add_external_data`)."""
        regular_file(path, flag, error=ModelError)
        self.files.append((f"the input model ({flag}={path})", Path(path)))
        self.models.append((flag, Path(path)))

    def add_external_data(self, outputs: Sequence[Path]) -> None:
        """The external-data files of each model, found from its header, when an output could be one.

        External data lies inside the model's folder (the loader refuses anything else), so only an
        output inside that folder, or an existing file (a hard link), can be one: for all other
        outputs the model is not parsed twice.
        """
        for flag, model in self.models:
            base = _real(model.parent)
            if not any(_real(o).is_relative_to(base) or _stat(o) is not None for o in outputs):
                continue
            for extra in external_data_files(model):
                st = _stat(extra)
                if st is not None and stat.S_ISREG(st.st_mode):
                    self.files.append((f"an external-data file of the input model ({flag}={model})", extra))

    def add_data(self, flag: str, spec: object) -> None:
        """A data specification: a ``.npz`` file, a folder of them, or anything that is not a path."""
        if not isinstance(spec, (str, os.PathLike)) or (isinstance(spec, str) and spec == "random"):
            return
        p = Path(spec)
        what = _DATA_NAMES.get(flag, "data")
        st = _stat(p)
        if st is None:
            raise DataError(f"{flag}={p}: no such file or folder")
        if stat.S_ISDIR(st.st_mode):
            self.folders.append((f"the {what} folder ({flag}={p})", p))
            for f in sorted(p.glob("*.npz")):
                regular_file(f, flag)
                self.files.append((f"a file of the {what} folder ({flag}={p})", f))
            return
        regular_file(p, flag)
        self.files.append((f"the {what} ({flag}={p})", p))


def external_data_files(model_path: Path) -> list[Path]:
    """The external-data files named in a model's header (empty if the header cannot be parsed:
    loading the model reports that, with its own message)."""
    from .graph import model_files

    try:
        return [f for f in model_files(model_path)[1:] if "\0" not in str(f)]
    except Exception:  # a broken model is reported by the loader, with its own message
        return []


# ------------------------------------------------------------------------------------------- outputs


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _same_file(a: Path, st_a: os.stat_result | None, b: Path, st_b: os.stat_result | None) -> bool:
    if _real(a) == _real(b):
        return True
    return st_a is not None and st_b is not None and (st_a.st_dev, st_a.st_ino) == (st_b.st_dev, st_b.st_ino)


def _probe_folder(folder: Path) -> OSError | None:
    """Create and remove a temporary file in ``folder``; the error if that fails."""
    try:
        with tempfile.TemporaryFile(prefix=STAGING_PREFIX, dir=folder):
            pass
    except OSError as exc:
        return exc
    return None


@dataclass(frozen=True)
class Output:
    """One file a command writes: the flag that named it, its path, and what it is."""

    flag: str
    path: Path
    what: str = ""

    def label(self) -> str:
        return f"{self.flag}={self.path}" + (f" ({self.what})" if self.what else "")


def _writable_folder(folder: Path, label: str, missing: type[Exception]) -> None:
    """``folder`` must exist, be a folder, and take a new file; else raise naming ``label``."""
    st = _stat(folder)
    if st is None:
        raise missing(f"{label}: the folder {folder} does not exist")
    if not stat.S_ISDIR(st.st_mode):
        raise missing(f"{label}: {folder} is {file_kind(st.st_mode)}, not a folder")
    exc = _probe_folder(folder)
    if exc is not None:
        raise OutputError(f"{label}: cannot write in the folder {folder} ({exc.strerror or exc})")


def check_workdir(workdir: PathLike) -> None:
    """``--workdir`` must be an existing folder in which files can be created."""
    _writable_folder(Path(workdir), f"--workdir={workdir}", ConfigError)


class OutputPlan:
    """The checked outputs of one command, staged next to their destinations and committed at once.

    Use as a context manager: ``with plan_outputs(...) as plan: write to plan.staged(flag) ...;
    plan.commit()``.  Leaving the block without :meth:`commit` removes everything staged.
    """

    def __init__(self, outputs: Sequence[Output], inputs: Inputs) -> None:
        self.outputs = {o.flag if not o.what else f"{o.flag}:{o.what}": o for o in outputs}
        self.inputs = inputs
        self._staging: dict[Path, Path] = {}  # destination folder -> staging folder
        self._named: dict[Path, Path] = {}  # staged file -> the output path as the caller gave it
        self._committed = False

    # -- checks ---------------------------------------------------------------------------------

    def check(self) -> None:
        """Refuse every conflict before any work starts (see the module docstring)."""
        self.inputs.add_external_data([o.path for o in self.outputs.values()])
        in_stats = [(what, p, _stat(p)) for what, p in self.inputs.files]
        seen: list[tuple[Output, os.stat_result | None]] = []
        for out in self.outputs.values():
            st = _stat(out.path)
            if st is not None and stat.S_ISDIR(st.st_mode):
                raise OutputError(f"{out.label()}: is a folder; give a file name")
            for what, p, st_in in in_stats:
                if _same_file(out.path, st, p, st_in):
                    raise ConfigError(f"{out.label()}: is {what}; refusing to overwrite an input, choose another file")
            for what, folder in self.inputs.folders:
                if _real(out.path).is_relative_to(_real(folder)):
                    raise ConfigError(f"{out.label()}: is inside {what}; choose another folder")
            for other, st_other in seen:
                if _same_file(out.path, st, other.path, st_other):
                    raise ConfigError(f"{out.label()}: is also {other.label()}; give them different paths")
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise OutputError(f"{out.label()}: exists and is {file_kind(st.st_mode)}; refusing to replace it")
            _writable_folder(out.path.parent if str(out.path.parent) else Path("."), out.label(), OutputError)
            seen.append((out, st))

    # -- staging --------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The final destination of output ``key`` (its flag, or ``flag:what``)."""
        return self.outputs[key].path

    def staged(self, key: str) -> Path:
        """Where to write output ``key`` now: same name, in a hidden staging folder next to it."""
        dest = self.outputs[key].path
        folder = _real(dest.parent if str(dest.parent) else Path("."))
        if folder not in self._staging:
            try:
                with _signals_held():  # a signal between mkdtemp and the record would orphan the folder
                    self._staging[folder] = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
            except OSError as exc:
                raise OutputError(f"{self.outputs[key].label()}: cannot write in {folder} ({exc.strerror})") from None
        self._named[self._staging[folder] / dest.name] = dest
        return self._staging[folder] / dest.name

    def commit(self) -> list[Path]:
        """Move every staged file into place (fsync, rename, fsync of the folder); return the paths.

        Files a writer added next to a staged output (a model's ``.data`` file) move with it; each
        destination is checked once more against the inputs before it is replaced.
        """
        moves: list[tuple[Path, Path]] = []
        for folder, staging in self._staging.items():
            for f in sorted(staging.iterdir()):
                moves.append((f, folder / f.name))
        in_stats = [(what, p, _stat(p)) for what, p in self.inputs.files]
        for _, dest in moves:
            st = _stat(dest)
            for what, p, st_in in in_stats:
                if _same_file(dest, st, p, st_in):
                    raise ConfigError(f"{dest}: is {what}; refusing to overwrite an input")
        for src, _ in moves:  # data on disk before any name points at it
            _fsync(src)
        written: list[Path] = []
        with _signals_held():  # Ctrl-C lands before or after the renames, never between two of them
            for src, dest in moves:
                try:
                    os.replace(src, dest)
                except OSError as exc:
                    raise OutputError(f"{dest}: cannot write the output ({exc.strerror or exc})") from None
                written.append(self._named.get(src, dest))
        for folder in self._staging:
            with contextlib.suppress(OSError):  # not every file system syncs folders
                _fsync(folder)
        self._committed = True
        log.debug("wrote %s", ", ".join(map(str, written)))
        self._cleanup()
        return written

    def _cleanup(self) -> None:
        for staging in self._staging.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._staging.clear()

    def __enter__(self) -> OutputPlan:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._cleanup()


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM for the block (main thread); they are delivered after it.

    A process-directed signal goes to any thread that does not block it (onnxruntime and BLAS start
    threads), so a signal mask on the main thread is not enough: Python would still run the handler
    inside the block.  Instead the block runs under handlers that only record the signal, and the
    recorded signals are raised again, with the previous handlers back in place, when it ends.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    hold = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.getsignal(s) for s in hold}
    if any(h is None for h in before.values()):  # a handler not set from Python cannot be restored
        yield
        return
    pending: list[int] = []

    def record(signum: int, frame: object) -> None:
        pending.append(signum)

    for s in hold:
        signal.signal(s, record)
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)
        for signum in dict.fromkeys(pending):
            signal.raise_signal(signum)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def plan_outputs(
    outputs: Iterable[tuple[str, PathLike | None] | Output],
    *,
    model: PathLike | None = None,
    data: Any = None,
    eval_data: Any = None,
    workdir: PathLike | None = None,
) -> OutputPlan:
    """Check a command's inputs and outputs before any work starts; see the module docstring.

    ``outputs`` are ``(flag, path)`` pairs (``None`` paths are skipped) or :class:`Output` objects;
    ``model``, ``data`` (``--data``) and ``eval_data`` (``--eval-data``) are the inputs, ``workdir``
    the scratch folder.  Raises a :class:`~chita_onnx.errors.ChitaError` naming the flag and path.
    """
    inputs = Inputs()
    if model is not None:
        inputs.add_model(model)
    inputs.add_data("--data", data)
    inputs.add_data("--eval-data", eval_data)
    outs: list[Output] = []
    for o in outputs:
        if isinstance(o, Output):
            outs.append(o)
        elif o[1] is not None:
            outs.append(Output(o[0], Path(o[1])))
    plan = OutputPlan(outs, inputs)
    plan.check()
    if workdir is not None:
        check_workdir(workdir)
    return plan
