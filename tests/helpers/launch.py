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


def launch(args: list[str], ranks: int = 2, timeout: float = 180,
           env: dict[str, str] | None = None, module: str = "psops_mpi.train") -> Result:
    """Run ``python -m module args`` on ``ranks`` ranks (0: without mpiexec, a singleton).

    The job runs in its own process group so a timeout kills every rank, not only mpiexec.
    """
    cmd = [sys.executable, "-m", module, *args]
    if ranks:
        cmd = [mpiexec(), "-n", str(ranks), *cmd]
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    return run_bounded(cmd, timeout, full_env)


def run_bounded(cmd: list[str], timeout: float, env: dict[str, str],
                cwd: Path = REPO) -> Result:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"job did not end within {timeout}s: {cmd}\n{out}\n{err}") from None
    return Result(proc.returncode, out, err, time.monotonic() - start)
