"""Project-level gates: layering, the installed wheel's contents, lint and types."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "chita_onnx"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_library_never_imports_click() -> None:
    offenders = [p.relative_to(REPO) for p in PACKAGE.rglob("*.py") if "click" in _imports(p)]
    assert offenders == []


def test_solver_never_imports_onnx_or_onnxruntime() -> None:
    for path in (PACKAGE / "solver").glob("*.py"):
        assert not _imports(path) & {"onnx", "onnxruntime", "click"}, path
    code = "import sys, chita_onnx.solver; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "'onnx'" not in loaded and "'onnxruntime'" not in loaded


def test_wheel_installs_the_cli_under_a_specific_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for item in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / item, src / item)
    for folder in ("chita_onnx", "cli"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"), str(src)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("chita_onnx-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "cli" not in tops and "chita_onnx_cli" in tops and "chita_onnx" in tops
    assert "chita_onnx/py.typed" in names
    # Every module of the source tree ships: a subpackage missing from pyproject's package list works
    # in the editable install the tests use and fails with ModuleNotFoundError in `pip install .`.
    shipped = {n for n in names if n.endswith(".py")}
    for folder, installed in (("chita_onnx", "chita_onnx"), ("cli", "chita_onnx_cli")):
        for module in sorted((REPO / folder).rglob("*.py")):
            name = f"{installed}/{module.relative_to(REPO / folder).as_posix()}"
            assert name in shipped, f"{name} is not in the wheel"
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "chita-onnx = chita_onnx_cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()


@pytest.mark.parametrize("tool", ["ruff", "mypy"])
def test_lint_and_types_are_clean(tool: str) -> None:
    exe = shutil.which(tool, path=str(Path(sys.executable).parent)) or shutil.which(tool)
    if exe is None:
        pytest.skip(f"{tool} is not installed (it is part of the [test] extra)")
    cmd = [exe, "check", "."] if tool == "ruff" else [exe]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
