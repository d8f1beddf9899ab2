"""Launch checks and per-rank CPU threads (pure functions of the environment)."""

from __future__ import annotations

import pytest

from psops_mpi.errors import UsageError
from psops_mpi.world import check_launch, cpu_threads, error_line


@pytest.mark.parametrize("var", ["SLURM_STEP_NUM_TASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"])
def test_several_tasks_but_world_of_one_is_refused(var: str) -> None:
    with pytest.raises(UsageError, match=r"srun --mpi=pmi2") as info:
        check_launch(1, {var: "4"})
    assert f"{var}=4" in str(info.value) and "\n" not in str(info.value)


def test_consistent_launches_pass() -> None:
    check_launch(1, {})
    check_launch(1, {"SLURM_STEP_NUM_TASKS": "1", "PMI_SIZE": "1"})
    check_launch(4, {"SLURM_STEP_NUM_TASKS": "4"})


def test_threads_requested_or_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    assert cpu_threads(3, 8) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cpu_threads(0, 8) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads(0, 10_000) == 1


def test_error_line_is_one_line() -> None:
    assert error_line("bad\n  thing") == "psops_mpi: error: bad thing"


def test_only_the_launchers_first_task_reports_a_mismatched_launch() -> None:
    from psops_mpi.world import _echo_of_task_zero

    assert _echo_of_task_zero(1, {"SLURM_PROCID": "3"})
    assert not _echo_of_task_zero(1, {"SLURM_PROCID": "0"})
    assert not _echo_of_task_zero(1, {})
    assert not _echo_of_task_zero(4, {"PMI_RANK": "3"})  # a real world: its rank 0 speaks
