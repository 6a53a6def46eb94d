"""The standing fuzz suite: every command on every hostile input (``hostile.py``), checked for the
promise of issue 11.

For every case: exit code 1 or 2 (or 0 for the inputs exactly at a limit), exactly one ``error:``
line on stderr and nothing else but log records, no traceback, no internal error, no "out of
memory" (a hostile input must be refused by a check, not by running out), the error names the flag,
file or tensor at fault, every input byte-identical afterwards (sha256) and nothing new on disk,
all within a bounded wall time and peak memory.

The cases run in two worker processes that import chita-onnx once (``worker.py``); a sample of the
most dangerous ones also runs as real ``chita-onnx`` processes, and Ctrl-C / SIGTERM are sent to
real runs to prove that no temporary file survives them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import hostile  # noqa: E402

CASES = hostile.all_cases()
BY_ID = {c.id: c for c in CASES}
WORKERS = max(1, min(2, os.cpu_count() or 1))
#: Per case, in-process: wall seconds and peak resident memory above the worker's baseline.
WALL_LIMIT = 15.0
PEAK_LIMIT = 512 * 2**20
#: A real process: its whole peak resident memory (imports included).
PROCESS_PEAK_LIMIT = 1536 * 2**20
LOG_PREFIXES = ("error:", "WARNING ", "INFO ", "DEBUG ")

#: Run again as real processes: the hangs, bombs and collisions that matter most.
SUBPROCESS_IDS = [
    "model/path-fifo/compress",
    "data/fifo/evaluate",
    "model/external-fifo/inspect",
    "model/path-newline/compress",
    "data/zip-bomb-2GiB/compress",
    "model/sparse-2^28-elements/inspect",
    "path/compress/report-is-output",
    "path/compress/output-is-external-data",
    "flag/compress/--bogus",
    "flag/gradients/--num-samples -1",
]

REQUIRED_CLASSES = {
    "malformed-protobuf",
    "checker-failure",
    "cycle",
    "nan-inf-weights",
    "fp16-bf16",
    "quantized-ops",
    "external-data",
    "huge-dims",
    "sparse-initializer",
    "model-path",
    "npz-trap",
    "flags",
    "output-paths",
}


def _run_workers(root: Path, ids: list[str], *, subprocess_mode: bool = False) -> dict[str, dict[str, object]]:
    """Run ``ids`` over ``WORKERS`` processes; a worker that dies is replaced (its case is lost)."""
    results: dict[str, dict[str, object]] = {}
    pending = list(ids)
    attempt = 0
    while pending and attempt < 5:
        attempt += 1
        chunks = [pending[i::WORKERS] for i in range(WORKERS)]
        procs = []
        for w, chunk in enumerate(chunks):
            if not chunk:
                continue
            ids_file = root / f"ids-{attempt}-{w}.json"
            ids_file.write_text(json.dumps(chunk))
            args = [sys.executable, str(HERE / "worker.py"), str(root / f"run-{attempt}-{w}"), str(ids_file)]
            if subprocess_mode:
                args.append("--subprocess")
            env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
            procs.append((chunk, subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)))
        lost: list[str] = []
        for chunk, proc in procs:
            out, _ = proc.communicate(timeout=900)
            for line in out.decode().splitlines():
                record = json.loads(line)
                results[str(record["id"])] = record
            missing = [i for i in chunk if i not in results]
            if missing:  # the worker died on missing[0]: record that, retry the rest
                results[missing[0]] = {"id": missing[0], "code": f"worker died ({proc.returncode})", "stderr": ""}
                lost.extend(missing[1:])
        pending = lost
    return results


@pytest.fixture(scope="session")
def fuzz_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return _run_workers(tmp_path_factory.mktemp("fuzz"), [c.id for c in CASES])


@pytest.fixture(scope="session")
def process_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, object]]:
    return _run_workers(tmp_path_factory.mktemp("fuzz-proc"), SUBPROCESS_IDS, subprocess_mode=True)


def check(case: hostile.Case, r: dict[str, object]) -> None:
    """The promise, for one run of one case."""
    code, stderr = r["code"], str(r.get("stderr", ""))
    context = f"{case.id}: argv={r.get('argv')!r}\nstderr:\n{stderr}\nstdout:\n{r.get('stdout', '')}"
    assert r.get("uncaught") is None, f"{context}\nuncaught exception:\n{r['uncaught']}"
    allowed = (0, 1, 2) if case.may_succeed else case.codes
    assert code in allowed, f"exit {code}, expected {allowed}\n{context}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    before = dict(r["before"])  # type: ignore[call-overload]
    after = dict(r["after"])  # type: ignore[call-overload]
    if code == 0:
        changed = {k for k in before if after.get(k) != before[k]}
        assert not changed, f"inputs changed: {changed}\n{context}"
        new = set(after) - set(before)
        assert new == set(case.outputs), f"files written: {sorted(new)}, expected {case.outputs}\n{context}"
    else:
        errors = [line for line in lines if line.startswith("error:")]
        assert len(errors) == 1, f"{len(errors)} error lines\n{context}"
        stray = [line for line in lines if not line.startswith(LOG_PREFIXES)]
        assert not stray, f"stderr lines that are neither the error nor log records: {stray}\n{context}"
        assert "Traceback" not in stderr, context
        assert "internal error" not in errors[0], context
        assert "out of memory" not in errors[0], f"a limit must refuse this before memory runs out\n{context}"
        for needle in case.needles:
            assert needle in errors[0], f"the error does not name {needle!r}\n{context}"
        assert after == before, (
            f"files changed: {sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))}\n{context}"
        )
    assert float(r["wall"]) <= WALL_LIMIT, f"took {r['wall']:.1f}s\n{context}"  # type: ignore[str-format]
    peak = r.get("peak")
    if peak is not None:
        limit = PROCESS_PEAK_LIMIT if r.get("process_peak") else PEAK_LIMIT
        assert int(peak) <= limit, f"peak memory {int(peak) / 2**20:.0f} MiB\n{context}"  # type: ignore[call-overload]


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_hostile_input(case_id: str, fuzz_results: dict[str, dict[str, object]]) -> None:
    check(BY_ID[case_id], fuzz_results[case_id])


@pytest.mark.parametrize("case_id", SUBPROCESS_IDS)
def test_hostile_input_in_a_real_process(case_id: str, process_results: dict[str, dict[str, object]]) -> None:
    check(BY_ID[case_id], process_results[case_id])


def test_the_suite_covers_every_class_and_every_command() -> None:
    classes = {c.cls for c in CASES}
    assert classes >= REQUIRED_CLASSES, REQUIRED_CLASSES - classes
    for cmd in hostile.COMMANDS:
        assert any(c.id.endswith("/" + cmd) for c in CASES), cmd
    assert len(CASES) >= 400


# ----------------------------------------------------------------------------- interruptions


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-c", "from chita_onnx_cli.main import main; main()", *args]


def _wait_for(predicate: object, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.002)
    return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_gradients_leave_no_temporary_file(tmp_path: Path, sig: signal.Signals) -> None:
    """Ctrl-C or SIGTERM while the gradient matrix is being filled: the staged .npy goes away."""
    (tmp_path / "in").mkdir()
    (tmp_path / "out").mkdir()
    hostile.save(hostile.mlp(), tmp_path / "in/m.onnx")
    hostile.data(tmp_path / "in/d.npz", n=200_000)
    before = {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()}
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        _cli("gradients", "in/m.onnx", "--data", "in/d.npz", "--out", "out/g.npy"),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    staged = _wait_for(lambda: any((tmp_path / "out").iterdir()), 60)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert staged, "the run never staged its output"
    if proc.returncode == 0:  # finished before the signal arrived: then the outputs are complete
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["g.npy", "g.npy.layout.json"]
        pytest.skip("the run finished before the signal")
    assert proc.returncode == (130 if sig == signal.SIGINT else 128 + sig), err
    assert list((tmp_path / "out").iterdir()) == [], "a temporary or partial file survived"
    assert {p.name: p.read_bytes() for p in (tmp_path / "in").iterdir()} == before
    assert b"Traceback" not in err


def test_terminated_compress_leaves_nothing(tmp_path: Path) -> None:
    """SIGTERM in the middle of a multi-stage compress: no output, no staging folder, input intact."""
    (tmp_path / "out").mkdir()
    model = tmp_path / "m.onnx"
    hostile.save(hostile.mlp(), model)
    hostile.data(tmp_path / "d.npz", n=4000)
    before = model.read_bytes()
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    args = ["-v", "compress", str(model), "out/o.onnx", "--data", "d.npz", "--method", "chita++", "--stages", "400"]
    proc = subprocess.Popen(_cli(*args, "--report", "out/r.json"), cwd=tmp_path, env=env, stderr=subprocess.PIPE)
    assert proc.stderr is not None
    log = b""
    while b"stage 2/400" not in log:  # the run is in the middle of its stages
        line = proc.stderr.readline()
        assert line, f"the run ended early: {log.decode()[-2000:]}"
        log += line
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert list((tmp_path / "out").iterdir()) == []
    assert model.read_bytes() == before
    assert np.load(tmp_path / "d.npz")["x"].shape == (4000, hostile.D_IN)
