"""One translator from the exceptions that user input can raise inside other libraries to ChitaErrors.

The library validates what it can up front, but a hostile file can still make protobuf, onnx, NumPy,
onnxruntime or the operating system raise from deep inside a call.  :func:`translate` maps those
known exception types to a one-line :class:`~chita_onnx.errors.ChitaError` naming the file (from the
exception, or the command's model) and the cause; :func:`user_errors` applies it to a block and
:func:`guarded` to a public entry point.  Anything it does not know stays as it is: that is a bug,
and the command line reports it as an internal error.
"""

from __future__ import annotations

import errno
import functools
import os
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from .errors import ChitaError, DataError, GradientError, ModelError, OutputError, ResourceError

F = TypeVar("F", bound=Callable[..., Any])

_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def _first(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return (text[:300] + " ...") if len(text) > 300 else (text or type(exc).__name__)


def _type_name(exc: BaseException) -> str:
    return f"{type(exc).__module__}.{type(exc).__name__}"


def translate(exc: BaseException, *, model: object = None) -> ChitaError | None:
    """The :class:`ChitaError` for a known exception caused by user input, or ``None`` (a bug).

    ``model`` names the model file for errors that carry no file name (protobuf, onnx, onnxruntime).
    """
    if isinstance(exc, ChitaError):
        return exc
    where = f"{os.fspath(model)}: " if isinstance(model, (str, os.PathLike)) else ""
    if isinstance(exc, MemoryError):
        return ResourceError(f"{where}out of memory; lower --num-samples or --max-memory, or use --workdir")
    if isinstance(exc, RecursionError):
        return ModelError(f"{where}the model is nested too deeply to process")
    if isinstance(exc, OSError):
        name = exc.filename if exc.filename is not None else exc.filename2
        place = f"{os.fsdecode(name)}: " if name is not None else where
        reason = exc.strerror or _first(exc)
        if exc.errno in _SPACE:
            return ResourceError(f"{place}{reason} (no space left for the output or --workdir)")
        if exc.errno in _DENIED:
            return OutputError(f"{place}{reason}")
        return DataError(f"{place}{reason}")
    if isinstance(exc, (zipfile.BadZipFile, zipfile.LargeZipFile)):
        return DataError(f"not a readable .npz file ({_first(exc)})")
    module = _type_name(exc)
    if module.startswith("google.protobuf."):
        return ModelError(f"{where}not a valid ONNX model (protobuf: {_first(exc)})")
    if module.startswith("onnx.onnx_cpp2py_export.checker"):
        return ModelError(f"{where}fails onnx.checker: {_first(exc)}")
    if module.startswith("onnx.onnx_cpp2py_export.shape_inference"):
        return ModelError(f"{where}onnx shape inference fails: {_first(exc)}")
    if module.startswith("onnxruntime.capi.onnxruntime_pybind11_state."):
        return GradientError(f"{where}onnxruntime cannot run the model: {_first(exc)}")
    return None


@contextmanager
def user_errors(*, model: object = None) -> Iterator[None]:
    """Re-raise known exceptions from the block as their :class:`ChitaError` (see :func:`translate`)."""
    try:
        yield
    except ChitaError:
        raise
    except Exception as exc:
        mapped = translate(exc, model=model)
        if mapped is None:
            raise
        raise mapped from exc


def guarded(fn: F) -> F:
    """Apply :func:`user_errors` to a public entry point whose first argument is the model path."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        model = args[0] if args else kwargs.get("model")
        with user_errors(model=model):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
