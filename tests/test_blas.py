"""The BLAS thread policy of the solvers (chita_onnx/blas.py): the count, and the limit applied
inside a block and restored after it, on the real OpenBLAS NumPy is linked against."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from threadpoolctl import threadpool_info, threadpool_limits

from chita_onnx import blas


def _blas_threads() -> set[int]:
    return {int(i["num_threads"]) for i in threadpool_info() if i["user_api"] == "blas"}


@pytest.fixture
def have_blas() -> None:
    if not _blas_threads():
        pytest.skip("NumPy is not linked against a BLAS threadpoolctl can control")


def test_user_variables_win() -> None:
    for var in blas.USER_VARIABLES:
        assert blas.solver_thread_limit({var: "3"}, cores=8, load=0.0) is None
    assert blas.solver_thread_limit({"OPENBLAS_NUM_THREADS": " "}, cores=8, load=0.0) == 8  # blank: unset


@pytest.mark.parametrize(
    ("cores", "load", "want"),
    [(4, 0.0, 4), (4, 1.0, 4), (4, 1.4, 4), (4, 2.6, 2), (4, 3.0, 2), (4, 9.0, 1), (2, 2.0, 1), (1, 0.0, 1)],
)
def test_count_is_idle_physical_cores(cores: int, load: float, want: int) -> None:
    """Our own process is one unit of load; what other work keeps busy is taken off; at least 1."""
    assert blas.solver_thread_limit({}, cores=cores, load=load) == want


def test_physical_cores_from_topology(tmp_path: Path) -> None:
    # 4 logical CPUs: two hyper-threads on each of two cores of one package
    for cpu, core in enumerate([0, 0, 1, 1]):
        topo = tmp_path / f"cpu{cpu}" / "topology"
        topo.mkdir(parents=True)
        (topo / "physical_package_id").write_text("0\n")
        (topo / "core_id").write_text(f"{core}\n")
    assert blas.physical_cores({0, 1, 2, 3}, sysfs=str(tmp_path)) == 2
    assert blas.physical_cores({0, 1}, sysfs=str(tmp_path)) == 1  # affinity: one core's two threads
    assert blas.physical_cores({0, 2, 7}, sysfs=str(tmp_path)) == 3  # cpu7 unreadable: its own core
    assert 1 <= blas.physical_cores() <= len(os.sched_getaffinity(0))


def _fail_inside_limit(seen: list[set[int]]) -> None:
    with blas.limit_blas_threads(1):
        seen.append(_blas_threads())
        raise RuntimeError


@pytest.mark.usefixtures("have_blas")
def test_limit_applied_inside_and_restored_after() -> None:
    with threadpool_limits(limits=2, user_api="blas"):
        assert _blas_threads() == {2}
        with blas.limit_blas_threads(1):
            assert _blas_threads() == {1}
        assert _blas_threads() == {2}
        seen: list[set[int]] = []
        with pytest.raises(RuntimeError):
            _fail_inside_limit(seen)
        assert seen == [{1}]
        assert _blas_threads() == {2}
        with blas.limit_blas_threads(None):
            assert _blas_threads() == {2}


@pytest.mark.usefixtures("have_blas")
def test_solver_threads_follows_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in blas.USER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    with threadpool_limits(limits=3, user_api="blas"):
        monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))  # a busy machine: one thread
        with blas.solver_threads():
            assert _blas_threads() == {1}
        assert _blas_threads() == {3}
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")  # the user's choice is left alone
        with blas.solver_threads():
            assert _blas_threads() == {3}


@pytest.mark.usefixtures("have_blas")
def test_leave_a_core_takes_one_core_off_the_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Next to the layer-wise pass's dense runner: an idle 3-core machine gives BLAS 2 threads, a
    1-core or busy one still 1, and the user's own setting is left alone."""
    for var in blas.USER_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))
    with threadpool_limits(limits=4, user_api="blas"):
        monkeypatch.setattr(blas, "physical_cores", lambda cpus=None: 3)
        with blas.leave_a_core():
            assert _blas_threads() == {2}
        monkeypatch.setattr(blas, "physical_cores", lambda cpus=None: 1)
        with blas.leave_a_core():
            assert _blas_threads() == {1}
        assert _blas_threads() == {4}
        monkeypatch.setenv("OPENBLAS_NUM_THREADS", "4")
        with blas.leave_a_core():
            assert _blas_threads() == {4}
