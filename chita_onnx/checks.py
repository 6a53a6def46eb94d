"""Checks of weights, data and gradient matrices that need only NumPy (no onnx import).

Each raises a one-line :class:`~chita_onnx.errors.ChitaError` naming the tensor or array, the index
or sample, and the value; :func:`weight_refusal` is the one place that says which weights the
gradient-based methods refuse, so that ``inspect`` marks exactly what ``compress`` refuses.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import DataError, ModelError
from .layout import Layout

#: Weight dtypes the gradient engine differentiates.
GRADIENT_DTYPES = ("float32", "float16", "float64")  # the last two via a float32 twin


def weight_refusal(dtype: str, size: int = 1, *, gradients: bool = True) -> str | None:
    """Why ``compress`` cannot prune a weight of ``dtype`` and ``size`` elements (``None``: it can);
    ``gradients`` says whether the method needs the gradient engine."""
    if size == 0:
        return "has no elements"
    if dtype in GRADIENT_DTYPES or not gradients:
        return None
    return f"{dtype} weights: the gradient engine takes float32, float16 and float64 only (--method magnitude works)"


def check_no_nan(arrays: Iterable[tuple[str, NDArray[np.generic]]], where: str) -> None:
    """Refuse a NaN in any float constant (an Inf may be a legitimate mask; a NaN never is)."""
    for name, array in arrays:
        a = np.asarray(array)
        if np.issubdtype(a.dtype, np.floating) and np.isnan(a).any():
            index = [int(i) for i in np.unravel_index(int(np.argmax(np.isnan(a).reshape(-1))), a.shape)]
            raise ModelError(f"{where}: initializer {name!r} holds nan at index {index}; every output would be NaN")


def first_bad(array: NDArray[np.generic]) -> tuple[int, ...] | None:
    """Index of the first NaN/Inf of a float array (``None`` if all finite, or not float)."""
    a = np.asarray(array)
    if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.complexfloating):
        return None
    finite = np.isfinite(a)
    if finite.all():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmin(finite.reshape(-1))), a.shape))


def check_weights(weights: Mapping[str, NDArray[np.generic]], where: str) -> None:
    """Refuse a NaN or Inf in a prunable weight, naming the tensor, the index and the value."""
    for name, array in weights.items():
        bad = first_bad(array)
        if bad is not None:
            value = np.asarray(array)[bad]
            raise ModelError(f"{where}: weight {name!r} holds {value} at index {list(bad)}; it must be finite")


# ------------------------------------------------------------------------------------------ data


def check_input_dtype(name: str, dtype: np.dtype[np.generic]) -> None:
    """A model input whose dtype NumPy data cannot feed (bfloat16, float8, int4, strings)."""
    if dtype.kind in "V" or dtype.hasobject:
        raise ModelError(f"model input {name!r} has dtype {dtype}, which chita-onnx cannot feed with data")


def check_finite(array: NDArray[np.generic], where: str, name: str, first_sample: int = 0) -> None:
    """Refuse NaN/Inf in a float data array, naming the array and the first bad sample."""
    bad = first_bad(array)
    if bad is not None:
        value = np.asarray(array)[bad]
        raise DataError(
            f"{where}: array {name!r} holds {value} at sample {first_sample + bad[0]} (index {list(bad)}); "
            "data must be finite"
        )


def check_fits(array: NDArray[np.generic], dtype: np.dtype[Any], where: str, name: str, first_sample: int = 0) -> None:
    """Refuse finite float data that the cast to the model's narrower float ``dtype`` (float16 from
    float32, say) would turn into inf, naming the array, the first such sample and the value."""
    a = np.asarray(array)
    if not (np.issubdtype(a.dtype, np.floating) and np.issubdtype(dtype, np.floating)):
        return
    top = float(np.finfo(dtype).max)
    if a.dtype.itemsize <= np.dtype(dtype).itemsize or not a.size or float(np.abs(a).max()) <= top:
        return
    bad = tuple(int(i) for i in np.argwhere(np.abs(a) > top)[0])
    raise DataError(
        f"{where}: array {name!r} holds {a[bad]} at sample {first_sample + bad[0]} (index {list(bad)}), beyond "
        f"the range of the model's {np.dtype(dtype)} input (±{top:g}); it would become inf"
    )


def check_gradients(X: NDArray[np.floating], layout: Layout, *, first_row: int = 0) -> None:
    """Refuse a gradient matrix ``X`` (n, p) with NaN/Inf, naming the weight, its element and the row.

    Reads ``X`` in chunks of rows, so a memory-mapped matrix is never copied whole.
    """
    n, p = X.shape
    step = max(1, 2**22 // max(p, 1))
    for r0 in range(0, n, step):
        finite = np.isfinite(X[r0 : r0 + step]).all(axis=1)
        if finite.all():
            continue
        r = r0 + int(np.argmin(finite))
        c = int(np.flatnonzero(~np.isfinite(X[r]))[0])
        slot = next(s for s in layout.slots if s.offset <= c < s.stop)
        raise DataError(
            f"the gradient of weight {slot.name!r} (element {c - slot.offset}) is {X[r, c]} for calibration row "
            f"{first_row + r}: the model's output or loss overflows on this data (check the weights and the "
            "data's scale)"
        )
