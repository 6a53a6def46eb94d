"""``CompressConfig.with_`` is "a validated copy with some fields changed": the copy is what the
same constructor call with those fields changed gives.  Defaults that the constructor resolves
(``stages``, ``start_sparsity``, what ``--distill`` implies) are resolved again for the copy,
not carried over as if the user had set them."""

from __future__ import annotations

from typing import Any

import pytest

from chita_onnx import CompressConfig, ConfigError

CASES: list[tuple[dict[str, Any], dict[str, Any]]] = [
    ({"method": "chita++"}, {"method": "chita"}),
    ({}, {"method": "chita++"}),
    ({"sparsity": 0.9}, {"sparsity": 0.3}),
    ({"method": "chita++", "sparsity": 0.3}, {"sparsity": 0.9}),
    ({"distill": True}, {"distill": False}),
    ({"pattern": "2:4"}, {"pattern": "unstructured"}),
    ({"structure": "channel"}, {"structure": "none"}),
    ({"method": "chita++", "stages": 4}, {"sparsity": 0.8}),
    ({"keep": ("a",)}, {"seed": 3}),
]


@pytest.mark.parametrize(("given", "changes"), CASES)
def test_with_is_the_constructor_with_the_changes(given: dict[str, Any], changes: dict[str, Any]) -> None:
    assert CompressConfig(**given).with_(**changes) == CompressConfig(**{**given, **changes})


def test_with_keeps_what_the_user_set() -> None:
    assert CompressConfig().with_(method="chita++").stages == 10  # not the 1 resolved for auto
    assert CompressConfig(method="chita++", stages=4).with_(sparsity=0.8).stages == 4
    with pytest.raises(ConfigError, match=r"--stages=4: multi-stage pruning is --method chita\+\+"):
        CompressConfig(method="chita++", stages=4).with_(method="chita")  # stages was set by the user
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['sparsty'\]"):
        CompressConfig().with_(sparsty=0.5)
