"""The other side of the fuzz suite: valid models must still load.  Run by hand (about a minute):

    .venv/bin/python tests/fuzz/valid_models.py [MORE.onnx ...]

Loads, through :func:`chita_onnx.load_model` (every check that every command runs), each model of
onnx's operator test cases that onnx's own full check accepts, every model file in onnx's test data,
and any model named on the command line; prints each refusal and exits 1 if there is one.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import onnx

from chita_onnx.errors import ChitaError
from chita_onnx.graph import load_model


def main() -> int:
    warnings.simplefilter("ignore")
    from onnx.backend.test.case.node import collect_testcases

    folder = Path(tempfile.mkdtemp())
    files: list[Path] = []
    for case in collect_testcases(None):
        if case.model is None:
            continue
        try:
            onnx.checker.check_model(case.model, full_check=True)
        except Exception:  # not valid for the installed onnx: not a false refusal either way
            continue
        files.append(folder / f"{len(files):05d}-{case.name}.onnx")
        onnx.save(case.model, files[-1])
    files += sorted((Path(onnx.__file__).parent / "backend" / "test" / "data").rglob("*.onnx"))
    files += [Path(a) for a in sys.argv[1:]]
    refused = 0
    for f in files:
        try:
            load_model(f)
        except ChitaError as exc:
            refused += 1
            print(f"refused {f}: {exc}")
    print(f"{len(files) - refused} of {len(files)} valid models load; {refused} refused")
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
