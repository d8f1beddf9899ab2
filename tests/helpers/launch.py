"""Launching real jobs from tests: mpiexec with a hard timeout that kills the whole job."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str
    seconds: float


def mpiexec() -> str:
    path = shutil.which("mpiexec")
    if path is None:
        raise RuntimeError("mpiexec not found: install an MPI runtime (pip install mpich)")
    return path


def job_command(args: list[str], ranks: int = 2,
                env: dict[str, str] | None = None,
                module: str = "psops_mpi.train") -> tuple[list[str], dict[str, str]]:
    """The command line and environment of ``python -m module args`` on ``ranks`` ranks (0:
    without mpiexec, a singleton)."""
    cmd = [sys.executable, "-m", module, *args]
    if ranks:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    return cmd, {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}


def launch(args: list[str], ranks: int = 2, timeout: float = 180,
           env: dict[str, str] | None = None, module: str = "psops_mpi.train") -> Result:
    """Run ``python -m module args`` on ``ranks`` ranks (0: without mpiexec, a singleton).

    The job runs in its own process group so a timeout kills every rank, not only mpiexec.
    """
    cmd, full_env = job_command(args, ranks, env, module)
    return run_bounded(cmd, timeout, full_env)


def start(args: list[str], ranks: int = 2, env: dict[str, str] | None = None,
          module: str = "psops_mpi.train") -> subprocess.Popen:
    """Start the job of :func:`launch` without waiting (end it with :func:`finish`); its pid
    is the launcher's (mpiexec), in a process group of its own."""
    cmd, full_env = job_command(args, ranks, env, module)
    return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def finish(proc: subprocess.Popen, timeout: float, started: float | None = None) -> Result:
    """Wait for a job from :func:`start`; on timeout kill its whole group and fail."""
    started = time.monotonic() if started is None else started
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"job did not end within {timeout}s: {proc.args}\n{out}\n"
                             f"{err}") from None
    return Result(proc.returncode, out, err, time.monotonic() - started)


def run_bounded(cmd: list[str], timeout: float, env: dict[str, str],
                cwd: Path = REPO) -> Result:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    return finish(proc, timeout, started)
