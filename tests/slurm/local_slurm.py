"""A one-node Slurm cluster on localhost, for tests: munged, slurmctld and slurmd started from
one temporary folder with their own ports, and stopped by the PIDs they wrote.

Needs root and Debian's ``slurmctld slurmd slurm-client munge`` packages; :func:`why_not`
says in one line why it cannot start here. By hand::

    python -m tests.slurm.local_slurm /tmp/slurm   # starts it, prints SLURM_CONF, waits;
                                                    # Ctrl-C or SIGTERM stops it
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.launch import Result, run_bounded

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("srun", "sbatch", "squeue", "sinfo", "scontrol")
INSTALL = "apt-get install -y --no-install-recommends slurmctld slurmd slurm-client munge"
START_TIMEOUT_S = 30.0
CPUS = 4  # slots on the one node; the tests use 2 ranks


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here; the message says why (a test skips with it)."""


def why_not() -> str | None:
    """Why a local Slurm cannot be started on this machine, or None if it can be tried."""
    if sys.platform != "linux":
        return "a local Slurm needs Linux"
    if os.geteuid() != 0:
        return "a local Slurm needs root (slurmd and munged run as root here)"
    missing = [name for name in DAEMONS + CLIENTS
               if shutil.which(name) is None
               and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"Slurm/munge programs missing ({', '.join(missing)}): {INSTALL}"
    return None


def in_ci(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this is a CI run (``CI=true``, as GitHub, GitLab and most CI services set)."""
    value = (os.environ if environ is None else environ).get("CI", "")
    return value.strip().lower() in ("true", "1", "yes")


def start_for_tests(root: Path, environ: Mapping[str, str] | None = None) -> LocalSlurm:
    """:func:`start` for the test tier. Where a prerequisite is absent (:func:`why_not`) the
    tier skips, saying why; where everything is installed but the cluster does not start, it
    skips too on a workstation, but under ``CI=true`` it fails with the reason: CI installs
    Slurm on purpose, and a tier that silently vanished would let the run pass untested."""
    import pytest

    reason = why_not()
    if reason:
        pytest.skip(reason)
    try:
        return start(root)
    except SlurmUnavailable as exc:
        message = f"local Slurm did not start: {exc}"
    if in_ci(environ):  # outside the except block: the report is the reason alone
        pytest.fail(f"{message}\n(CI=true and Slurm is installed: the Slurm tier must run)",
                    pytrace=False)
    pytest.skip(message)


def _program(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SLURM_CONF = """\
# One-node Slurm for tests; every path lives under {root}.
ClusterName=psops-test
# MPICH names its shared-memory segment after the job step, and a killed job leaves it in
# /dev/shm: a later cluster's job 1 would attach to that stale segment and fail in MPI_Init.
FirstJobId={first_job_id}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/socket
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=pmi2
SlurmdParameters=config_overrides
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
PlugStackConfig={root}/plugstack.conf
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MailProg=/bin/true
KillWait=2
MinJobAge=60
InactiveLimit=0
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES OverSubscribe=FORCE:4 MaxTime=INFINITE State=UP
"""


@dataclass
class LocalSlurm:
    """A running one-node cluster; ``env`` is what clients (srun, sbatch) need to reach it."""

    root: Path
    env: dict[str, str]
    pid_files: list[Path] = field(default_factory=list)

    def command(self, args: list[str], timeout: float, cwd: Path | None = None,
                env: dict[str, str] | None = None) -> Result:
        """Run a Slurm client command; on timeout kill its whole process group and raise."""
        return run_bounded(args, timeout, {**self.env, **(env or {})}, cwd or Path.cwd())

    def wait_job(self, job_id: str, timeout: float) -> dict[str, str]:
        """Poll squeue until the job has left the queue; return its `scontrol show job`
        fields (JobState, ExitCode, ...). Cancels it and raises if it takes too long."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            queued = self.command(["squeue", "-h", "-j", job_id, "-o", "%T"], timeout=30)
            state = queued.stdout.strip()
            if queued.returncode == 0 and state not in ("PENDING", "RUNNING", "CONFIGURING",
                                                         "COMPLETING"):
                return self.job_fields(job_id)
            time.sleep(0.5)
        self.command(["scancel", job_id], timeout=30)
        raise AssertionError(f"job {job_id} still queued after {timeout}s: "
                             f"{self.job_fields(job_id)}")

    def job_fields(self, job_id: str) -> dict[str, str]:
        shown = self.command(["scontrol", "-o", "show", "job", job_id], timeout=30).stdout
        return dict(item.split("=", 1) for item in shown.split() if "=" in item)

    def steps_alive(self, job_id: str) -> bool:
        """Whether a ``slurmstepd`` of this job is still running on the (local) node. A step
        daemon finishes some seconds after its tasks; a requeued run started before then gets
        the same step ids (``JOBID.0``), and the old daemon's clean-up breaks the new step
        (srun: "mpi/pmi2: failed to send temp kvs to compute nodes")."""
        prefix = f"slurmstepd: [{job_id}.".encode()
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):
                if cmdline.read_bytes().startswith(prefix):
                    return True
        return False

    def stop(self, grace_s: float = 10.0) -> None:
        """Cancel every job still running (a hung task would outlive the daemons), then stop
        the daemons by the PIDs they wrote: SIGTERM to all at once (each takes about 2 s to
        shut down), SIGKILL to any still running after ``grace_s``."""
        self._cancel_all(grace_s)
        pids = [pid for pid in map(_read_pid, self.pid_files) if pid is not None]
        for pid in pids:
            _signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.1)
        for pid in pids:
            _signal(pid, signal.SIGKILL)

    def _cancel_all(self, grace_s: float) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.command(["scancel", "--full", f"--user={os.geteuid()}"], timeout=30)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                queued = self.command(["squeue", "-h", "-o", "%i"], timeout=30)
                if queued.returncode != 0 or not queued.stdout.strip():
                    return
                time.sleep(0.2)


def _read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait_for(what: str, ready, timeout: float, logs: list[Path]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.2)
    tails = "\n".join(f"--- {log}\n{log.read_text()[-2000:]}" for log in logs if log.exists())
    raise SlurmUnavailable(f"{what} did not come up within {timeout:.0f}s\n{tails}")


def _run_daemon(args: list[str], log: Path) -> None:
    """Start a daemon that forks into the background; fail with its output if it cannot."""
    with log.open("ab") as out:
        done = subprocess.run(args, stdout=out, stderr=subprocess.STDOUT, timeout=30,
                              check=False)
    if done.returncode != 0:
        raise SlurmUnavailable(f"{' '.join(args)} failed ({done.returncode}): "
                               f"{log.read_text()[-2000:]}")


def start(root: Path, timeout: float = START_TIMEOUT_S) -> LocalSlurm:
    """Start munged, slurmctld and slurmd under ``root`` and wait until the node is idle.

    Raises:
        SlurmUnavailable: why_not() objects, or a daemon did not start (with its log).
    """
    reason = why_not()
    if reason:
        raise SlurmUnavailable(reason)
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)  # munged refuses folders that others may write to
    host = socket.gethostname().split(".")[0]
    munge = root / "munge"
    for sub in (munge, root / "state", root / "spool"):
        sub.mkdir(mode=0o755, exist_ok=True)
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, host=host, cpus=CPUS,
                                      ctld_port=_free_port(), slurmd_port=_free_port(),
                                      first_job_id=random.randrange(10**5, 6 * 10**7)))
    (root / "plugstack.conf").write_text("")  # no site plugins (the system one may have some)
    cluster = LocalSlurm(root, {**os.environ, "SLURM_CONF": str(conf)},
                         [root / "slurmd.pid", root / "slurmctld.pid", munge / "munged.pid"])
    try:
        key = munge / "key"
        if not key.exists():
            _run_daemon([_program("mungekey"), "--create", f"--keyfile={key}"], root / "setup.log")
            key.chmod(0o400)
        _run_daemon([_program("munged"), f"--key-file={key}", f"--socket={munge / 'socket'}",
                     f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                     f"--seed-file={munge / 'seed'}"], root / "setup.log")
        _run_daemon([_program("slurmctld"), "-f", str(conf), "-c"], root / "setup.log")
        _run_daemon([_program("slurmd"), "-f", str(conf)], root / "setup.log")
        logs = [root / "setup.log", root / "slurmctld.log", root / "slurmd.log"]
        _wait_for("the local Slurm node", lambda: _node_state(cluster) == "idle", timeout, logs)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _node_state(cluster: LocalSlurm) -> str:
    try:
        shown = cluster.command(["sinfo", "-h", "-o", "%T"], timeout=10)
    except AssertionError:
        return ""
    return shown.stdout.strip() if shown.returncode == 0 else ""


if __name__ == "__main__":
    cluster = start(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/psops-slurm").resolve())
    print(f"export SLURM_CONF={cluster.env['SLURM_CONF']}  # Ctrl-C or SIGTERM stops it",
          flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # both stop the daemons too
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
