"""Launching one training job for a benchmark: the one launcher every bench script uses.

A job is ``LAUNCHER -n P python -m psops_mpi.train ARGS --metrics-out F`` (or a script such
as ``bench/ddp_ssgd.py``) started in its own process group, so a timeout or a stopped sweep
kills every rank, not only the launcher; its result is the exit code, the tail of stderr
and the JSON-lines events it wrote.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Job:
    """What one launch gave."""

    cmd: list[str]
    rc: int
    seconds: float
    events: list[dict] = field(default_factory=list)
    error: str = ""

    @property
    def final(self) -> dict | None:
        """The ``final`` event of a run that ended well, else None."""
        if self.rc == 0 and self.events and self.events[-1].get("event") == "final":
            return self.events[-1]
        return None


def mpiexec_prefix() -> list[str]:
    return [shutil.which("mpiexec") or "mpiexec", "-n"]


def run_job(args: list[str], ranks: int, *, launcher: list[str] | None = None,
            script: str | None = None, timeout: float = 900,
            wrap: object = None) -> Job:
    """Run one training job and collect its metrics (``--metrics-out`` is added here).

    Args:
        args: training flags.
        ranks: world size.
        launcher: the command before the rank count (default ``mpiexec -n``).
        script: a script to run instead of ``-m psops_mpi.train`` (same flags).
        timeout: seconds before every rank is killed (exit code 124).
        wrap: a callable that wraps the command (e.g. into an emulated link's namespace).
    """
    with tempfile.TemporaryDirectory(prefix="psops-bench-") as tmp:
        metrics = Path(tmp) / "metrics.jsonl"
        target = [script] if script else ["-m", "psops_mpi.train"]
        cmd = [*(launcher or mpiexec_prefix()), str(ranks), sys.executable, *target, *args,
               "--metrics-out", str(metrics)]
        if wrap is not None:
            cmd = wrap(cmd)  # type: ignore[operator]
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            _, err = proc.communicate(timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            rc = 124
        except BaseException:  # the sweep is stopped (SIGTERM, Ctrl-C): stop its job too
            os.killpg(proc.pid, signal.SIGKILL)
            raise
        events = ([json.loads(line) for line in metrics.read_text().splitlines()]
                  if metrics.exists() else [])
        job = Job(cmd, rc, time.monotonic() - start, events)
        if job.final is None:
            job.error = " ".join(err.split())[-400:] or f"exit code {rc}"
        return job


def shown(cmd: list[str]) -> str:
    """The command as a reader would type it (no temp paths, no interpreter path)."""
    names = {sys.executable: "python", shutil.which("mpiexec"): "mpiexec"}
    out = [names.get(c, c) for c in cmd]
    if "--metrics-out" in out:
        out[out.index("--metrics-out") + 1] = "F.jsonl"
    return " ".join(str(Path(c).relative_to(REPO)) if c.startswith(str(REPO)) else c
                    for c in out)


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
