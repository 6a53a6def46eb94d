"""Run fuzz cases and print one JSON line per case.

    python worker.py ROOT IDS.json [--subprocess]

Each case gets a fresh folder under ROOT, is built there, and is run through the real click command
— in this process, so the imports are paid once, or with ``--subprocess`` as a real ``chita-onnx``
process of its own (exit code, stderr and peak memory as a user sees them).  For every case the
worker records the exit code, stderr, wall time, the peak resident memory of the case (``VmHWM``
reset through ``/proc/self/clear_refs`` before it, or the process's ``ru_maxrss``), and a snapshot
(type and sha256) of every file in the case folder before and after.  A case that runs past
``TIMEOUT_S`` is stopped by SIGALRM.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import stat
import sys
import time
import traceback
from pathlib import Path
from types import FrameType

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hostile  # noqa: E402
from chita_onnx_cli.main import cli  # noqa: E402
from click.testing import CliRunner  # noqa: E402

from chita_onnx import runtime  # noqa: E402

#: The time budget of analysis runs (constant folding, rewrite checks), shortened from its default
#: so that the compute-bomb cases cost seconds: the mechanism that enforces it is the same.
runtime.ANALYSIS_SECONDS = 3.0

TIMEOUT_S = 30
#: Address space allowed above the worker's own at start: a runaway allocation fails instead of
#: taking the machine (the test then sees "out of memory", which it rejects).
HEADROOM = 6 * 2**30


class CaseTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so that no ``except Exception`` in the code swallows it."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise CaseTimeout


def _status(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def snapshot(root: Path) -> dict[str, str]:
    """``{relative path: kind or sha256}`` of everything under ``root`` (symlinks not followed)."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "symlink:" + os.readlink(p)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir:" + oct(stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(p, "rb") as fh:
                    for block in iter(lambda fh=fh: fh.read(1 << 20), b""):
                        h.update(block)
                out[rel] = "sha256:" + h.hexdigest()
            else:
                out[rel] = "special:" + oct(stat.S_IFMT(st.st_mode))
    return out


def _slug(case_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in case_id)[:120]


def _setup(case: hostile.Case, root: Path, index: int) -> tuple[Path, list[str], dict[str, str]]:
    """The case folder with ``in/`` and ``out/``, the command line, and the snapshot before."""
    d = root / f"{index:04d}-{_slug(case.id)}"
    (d / "in").mkdir(parents=True)
    (d / "out").mkdir()
    argv = case.build(d)
    return d, argv, snapshot(d)


def _record(
    case: hostile.Case, d: Path, argv: list[str], before: dict[str, str], **fields: object
) -> dict[str, object]:
    """The JSON record of one run (``fields``: code, stdout, stderr, uncaught, wall, peak, ...)."""
    for p in d.rglob("*"):  # leave nothing unreadable behind for pytest's tmp cleanup
        if p.is_dir() and not p.is_symlink():
            os.chmod(p, 0o755)
    record: dict[str, object] = {"id": case.id, "argv": argv, "before": before, "after": snapshot(d), **fields}
    record["stdout"] = str(record.get("stdout", ""))[-2000:]
    record["stderr"] = str(record.get("stderr", ""))[-4000:]
    return record


def run_case(case: hostile.Case, root: Path, index: int) -> dict[str, object]:
    """Run ``case`` in this process through click's test runner."""
    d, argv, before = _setup(case, root, index)
    os.chdir(d)
    can_measure = _reset_peak()
    rss0 = _status("VmRSS") or 0
    uncaught = None
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT_S)
    t0 = time.perf_counter()
    try:
        result = CliRunner().invoke(cli, argv, catch_exceptions=True)
        code: int | str = result.exit_code
        out, err = result.stdout, result.stderr
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            uncaught = "".join(traceback.format_exception(result.exception))[-3000:]
    except CaseTimeout:
        code, out, err = "timeout", "", ""
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        wall = time.perf_counter() - t0
        os.chdir(root)
    peak = (_status("VmHWM") or 0) - rss0 if can_measure else None
    return _record(case, d, argv, before, code=code, stdout=out, stderr=err, uncaught=uncaught, wall=wall, peak=peak)


#: The console entry point, reporting its peak resident memory (bytes) to $CHITA_FUZZ_RSS at exit.
WRAPPER = """
import atexit, os, resource
def _report():
    with open(os.environ["CHITA_FUZZ_RSS"], "w") as fh:
        fh.write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
atexit.register(_report)
from chita_onnx_cli.main import main
main()
"""


def run_case_subprocess(case: hostile.Case, root: Path, index: int) -> dict[str, object]:
    """Run ``case`` as a real ``chita-onnx`` process."""
    import subprocess

    d, argv, before = _setup(case, root, index)
    rss_file = root / f".rss-{index}"
    env = {**os.environ, "CHITA_FUZZ_RSS": str(rss_file), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            [sys.executable, "-c", WRAPPER, *argv], cwd=d, env=env, capture_output=True, text=True, timeout=TIMEOUT_S
        )
        code: int | str = proc.returncode
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        code, out, err = "timeout", "", ""
    wall = time.perf_counter() - t0
    peak = int(rss_file.read_text()) if rss_file.exists() else None
    return _record(
        case, d, argv, before, code=code, stdout=out, stderr=err, uncaught=None, wall=wall, peak=peak, process_peak=True
    )


def main() -> None:
    root, ids_file = Path(sys.argv[1]), Path(sys.argv[2])
    runner = run_case_subprocess if "--subprocess" in sys.argv[3:] else run_case
    root.mkdir(parents=True, exist_ok=True)
    ids = json.loads(ids_file.read_text())
    cases = {c.id: c for c in hostile.all_cases()}
    size = _status("VmSize")
    if size is not None and runner is run_case:
        resource.setrlimit(resource.RLIMIT_AS, (size + HEADROOM, resource.RLIM_INFINITY))
    signal.signal(signal.SIGALRM, _alarm)
    for i, case_id in enumerate(ids):
        try:
            record = runner(cases[case_id], root, i)
        except Exception as exc:  # the case could not even be built: report it, keep going
            record = {"id": case_id, "code": "build-failed", "uncaught": repr(exc), "stderr": "", "wall": 0.0}
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
