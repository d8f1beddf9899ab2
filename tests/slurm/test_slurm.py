"""psops_mpi under a real Slurm (one node on localhost): srun worlds, the CPU sbatch template,
and the clear stop when srun's process management does not match the MPI library."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tests.helpers.launch import REPO
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
