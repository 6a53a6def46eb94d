"""Progress bars for long phases: shown on a terminal, silent when stderr is not a TTY."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")

_enabled: bool | None = None  # None: decide from whether stderr is a terminal


def set_progress(enabled: bool | None) -> None:
    """Force progress bars on (True), off (False), or back to automatic (None)."""
    global _enabled
    _enabled = enabled


def progress_enabled() -> bool:
    return sys.stderr.isatty() if _enabled is None else _enabled


def progress(iterable: Iterable[T], *, total: int | None = None, desc: str = "", unit: str = "it") -> Iterator[T]:
    """Wrap ``iterable`` in a tqdm bar on stderr when progress is enabled."""
    if not progress_enabled():
        yield from iterable
        return
    yield from tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True)
