"""A signal that lands just as an output's staging folder is created must not orphan the folder."""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path

import pytest

from chita_onnx import paths
from chita_onnx.paths import STAGING_PREFIX, plan_outputs


def test_sigint_right_after_mkdtemp_leaves_no_staging_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp_then_interrupt(*args: object, **kwargs: object) -> str:
        made = real_mkdtemp(*args, **kwargs)  # type: ignore[call-overload]
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C between the folder's creation and its record
        return str(made)

    monkeypatch.setattr(paths.tempfile, "mkdtemp", mkdtemp_then_interrupt)
    with pytest.raises(KeyboardInterrupt), plan_outputs([("--out", tmp_path / "g.npy")]) as plan:
        plan.staged("--out").write_text("partial")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(STAGING_PREFIX)]
