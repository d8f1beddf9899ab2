"""psops_mpi under a real Slurm (one node on localhost): srun worlds, the CPU sbatch template,
and the clear stop when srun's process management does not match the MPI library."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.helpers.launch import REPO
from tests.helpers.user_models import PID_DIR_ENV
from tests.slurm.local_slurm import LocalSlurm

JOB_ENV = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
TRAIN = [sys.executable, "-m", "psops_mpi.train"]


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_srun_two_tasks_train_as_one_world_of_two(slurm: LocalSlurm, tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    res = slurm.command(["srun", "-n", "2", *TRAIN, "--epochs", "1", "--dataset", "synthetic",
                         "--metrics-out", str(metrics)], timeout=120, cwd=REPO, env=JOB_ENV)
    assert res.returncode == 0, res.stderr
    events = read_metrics(metrics)
    assert events[0]["world_size"] == 2 and events[-1]["world_size"] == 2
    assert events[-1]["event"] == "final" and events[-1]["test_acc"] > 0.2  # chance: 0.1
    assert events[-1]["comm_bytes_per_rank"] > 0  # the two tasks did exchange weights
    assert "2 rank(s) on cpu" in res.stdout
    assert res.stdout.count("CUDA-aware MPI not needed") == 1  # once, by rank 0


def test_srun_mpi_none_stops_at_once_saying_use_pmi2(slurm: LocalSlurm) -> None:
    start = time.monotonic()
    res = slurm.command(["srun", "--mpi=none", "-n", "2", *TRAIN, "--epochs", "1"],
                        timeout=120, cwd=REPO, env=JOB_ENV)
    seconds = time.monotonic() - start
    assert res.returncode == 2, (res.stdout, res.stderr)
    errors = [line for line in res.stderr.splitlines() if line.startswith("psops_mpi: error:")]
    assert len(errors) == 1, res.stderr  # one line, not one per task
    assert "SLURM_STEP_NUM_TASKS=2" in errors[0] and "srun --mpi=pmi2" in errors[0]
    assert "epoch" not in res.stdout and "final:" not in res.stdout  # nobody trained alone
    assert seconds < 60


def test_cpu_template_runs_to_completion_through_sbatch(slurm: LocalSlurm,
                                                        tmp_path: Path) -> None:
    results, out = tmp_path / "results", tmp_path / "job.out"
    env = {**JOB_ENV, "PSOPS_ARGS": "--dataset synthetic --epochs 2 --quiet",
           "PSOPS_RESULTS": str(results), "PSOPS_PYTHON": sys.executable}
    # The local node declares more CPUs than the machine has; one thread per rank, as a user
    # sets --cpus-per-task for their nodes (two threads each made this run 100x slower here).
    submitted = slurm.command(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={out}",
                               str(REPO / "slurm" / "train_cpu.sbatch")],
                              timeout=60, cwd=REPO, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    fields = slurm.wait_job(job_id, timeout=180)
    log = out.read_text() if out.exists() else "(no output file)"
    assert fields.get("JobState") == "COMPLETED" and fields.get("ExitCode") == "0:0", log
    assert f"job {job_id}: 2 ranks on 1 node(s)" in log
    assert "final: test acc" in log
    final = read_metrics(results / "metrics.jsonl")[-1]
    assert final["world_size"] == 2 and final["config"]["epochs"] == 2
    assert final["config"]["dataset"] == "synthetic"  # PSOPS_ARGS reached the training
    checkpoints = sorted((results / "checkpoints").glob("step-*/metadata.json"))
    assert len(checkpoints) == 1  # the final one


def test_cpu_template_stops_on_usr1_requeues_itself_and_finishes(slurm: LocalSlurm,
                                                                 tmp_path: Path) -> None:
    """What the time limit's `--signal=B:USR1@120` does, sent by hand: the batch script
    passes USR1 to srun, every rank checkpoints and exits 75, the script requeues the job,
    and the requeued job (same id, same results folder) resumes and completes."""
    results, out, pids = tmp_path / "results", tmp_path / "job.out", tmp_path / "pids"
    pids.mkdir()
    env = {**JOB_ENV, "PSOPS_ARGS": "--dataset synthetic --epochs 2 --quiet --model "
                                    "tests.helpers.user_models:slow_with_pid",
           "PSOPS_RESULTS": str(results), "PSOPS_PYTHON": sys.executable,
           PID_DIR_ENV: str(pids)}
    submitted = slurm.command(["sbatch", "--parsable", "--cpus-per-task=1", f"--output={out}",
                               str(REPO / "slurm" / "train_cpu.sbatch")],
                              timeout=60, cwd=REPO, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.monotonic() + 120
    while not (pids / "rank-1.pid").exists():  # both ranks are training
        assert time.monotonic() < deadline, (slurm.job_fields(job_id),
                                             out.read_text() if out.exists() else "")
        time.sleep(0.2)
    signalled = slurm.command(["scancel", "--signal=USR1", "--batch", job_id], timeout=30)
    assert signalled.returncode == 0, signalled.stderr
    fields = wait_requeued_then_done(slurm, job_id, timeout=240)
    log = out.read_text() if out.exists() else "(no output file)"
    assert fields.get("JobState") == "COMPLETED" and fields.get("Restarts") == "1", (fields, log)
    assert "psops_mpi: stopped by SIGUSR1 at step" in log
    assert f"requeueing job {job_id} to continue" in log and "final: test acc" in log
    events = read_metrics(results / "metrics.jsonl")
    assert [e["event"] for e in events if e["event"] != "epoch"] == ["start", "stopped",
                                                                      "start", "final"]
    # By name, not position: whether epoch 1 ended before the signal depends on timing.
    stopped = next(e for e in events if e["event"] == "stopped")
    resumed = [e for e in events if e["event"] == "start"][1]
    assert stopped["reason"] == "SIGUSR1" and resumed["resumed_from"] == stopped["checkpoint"]
    assert events[-1]["ok"] is True and events[-1]["steps"] == 64


def wait_requeued_then_done(slurm: LocalSlurm, job_id: str, timeout: float) -> dict[str, str]:
    """Poll until the job ran again after its requeue and ended. Slurm holds a requeued
    job for two minutes (its begin time); the test releases it as soon as the first run's
    step daemons are gone (see :meth:`LocalSlurm.steps_alive`), and again while it waits
    for that time (the hold is set again while the first run's step completes)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = slurm.job_fields(job_id)
        state, restarts = fields.get("JobState", ""), fields.get("Restarts", "0")
        if (restarts != "0" and state == "PENDING" and fields.get("Reason") == "BeginTime"
                and not slurm.steps_alive(job_id)):
            slurm.command(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        if restarts != "0" and state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            return fields
        time.sleep(0.5)
    slurm.command(["scancel", job_id], timeout=30)
    raise AssertionError(f"job {job_id} did not finish after its requeue within {timeout}s: "
                         f"{slurm.job_fields(job_id)}")
