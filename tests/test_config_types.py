"""CompressConfig from Python: a value of the wrong type is a one-line ConfigError naming the flag,
never a TypeError, and never silently reinterpreted (``allow_empty="no"`` must not allow an empty
model; ``keep="W1"`` must not become the tensors ``W`` and ``1``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chita_onnx import CompressConfig, ConfigError


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("min_density", "0.1", r"--min-density='0.1': must be a number"),
        ("ridge", "1", r"--ridge='1': must be a number"),
        ("sparsity", True, r"--sparsity=True: must be a number"),
        ("block_size", None, r"--block-size=None: must be an integer"),
        ("channel_multiple", 1.5, r"--channel-multiple=1.5: must be an integer"),
        ("fisher_rows", True, r"--fisher-rows=True: must be an integer"),
        ("allow_empty", "no", r"--allow-empty='no': must be True or False"),
        ("first_order", "no", r"--first-order='no': must be True or False"),
        ("refit", 0, r"--refit=0: must be True or False"),
        ("latency_check", None, r"--latency-check=None: must be True or False"),
        ("output", 5, r"--output=5: must be a string \(an output name\) or None"),
        ("workdir", 5, r"--workdir=5: must be a path or None"),
        ("keep", None, r"--keep=None: must be tensor names"),
        ("keep", ("W1", 3), r"--keep=\('W1', 3\): must be tensor names"),
        ("latency_batches", (1.5,), r"--latency-batches=\(1.5,\): must be batch sizes"),
        ("latency_batches", "1,x", r"--latency-batches='1,x': must be batch sizes"),
    ],
)
def test_wrong_types_are_config_errors(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CompressConfig(**{field: value})  # type: ignore[arg-type]


def test_strings_and_numpy_values_are_read_as_the_flags_read_them(tmp_path: Path) -> None:
    c = CompressConfig(
        keep="W1, W2",  # type: ignore[arg-type]
        latency_batches="1,32",  # type: ignore[arg-type]
        sparsity=np.float32(0.5),
        seed=np.int64(3),
        max_memory=4e9,  # type: ignore[arg-type]
        refit=np.bool_(False),  # type: ignore[arg-type]
        workdir=tmp_path,  # type: ignore[arg-type]
    )
    assert c.keep == ("W1", "W2") and c.latency_batches == (1, 32)
    assert type(c.sparsity) is float and c.sparsity == 0.5
    assert type(c.seed) is int and c.seed == 3 and type(c.max_memory) is int and c.max_memory == 4_000_000_000
    assert c.refit is False and c.workdir == str(tmp_path)
    assert c.with_(sparsity=0.6) == CompressConfig(**{**c.to_dict(), "sparsity": 0.6, "keep": c.keep})
