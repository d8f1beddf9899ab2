"""What a run tells its user: rank-0 progress bar and lines, JSON-lines metrics, TensorBoard
scalars, versions."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from psops_mpi import __version__
from psops_mpi.errors import UsageError

GIT_TIMEOUT_S = 1.0  # per git call: a slow file system costs the start at most this, twice


def jsonable(value: Any) -> Any:
    """JSON has no inf/NaN: write them as null rather than produce an invalid file."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


class MetricsWriter:
    """One JSON object per line, flushed at once so a killed job keeps what it wrote; and,
    with a TensorBoard folder, every number of each ``epoch`` record as a scalar at its
    global step (``step``), under the record's own names.

    The file is opened at the first write: truncated for a fresh run, appended to when
    ``rewrite_from`` was set by then (a run resumed from a checkpoint continues its file rather
    than erase what the interrupted run wrote). TensorBoard starts a new event file per launch
    in the same folder, which it reads as one run; a resumed run's file purges the points
    from ``rewrite_from`` on that the interrupted run wrote, so each step shows once, as the
    resumed run computed it.

    Args:
        path: the file to write, or None to write nothing. Only rank 0 passes a path.
        tensorboard: the TensorBoard log folder, or None. Only rank 0 passes one.
    """

    def __init__(self, path: str | None, tensorboard: str | None = None) -> None:
        self.path = path
        self.tensorboard = tensorboard
        # Resumed from a checkpoint: the first step whose epoch this run reports (again).
        self.rewrite_from: int | None = None
        self._fh: TextIO | None = None
        self._board: Any = None  # a SummaryWriter, made at the first epoch

    def write(self, event: str, **fields: Any) -> None:
        if self.tensorboard is not None and event == "epoch":
            self._scalars(fields)
        if self.path is None:
            return
        if self._fh is None:
            self._fh = self._open(self.path)
        self._fh.write(json.dumps(jsonable({"event": event, **fields})) + "\n")
        self._fh.flush()

    def _scalars(self, record: dict[str, Any]) -> None:
        if self._board is None:
            from torch.utils.tensorboard import SummaryWriter  # checked before training

            # Hide the interrupted run's points from there on: this run writes them again.
            self._board = SummaryWriter(self.tensorboard, purge_step=self.rewrite_from)
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._board.add_scalar(key, value, global_step=record["step"])
        self._board.flush()  # as the JSON lines: a killed job keeps its epochs

    def _open(self, path: str) -> TextIO:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return Path(path).open("w" if self.rewrite_from is None else "a", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"cannot write metrics file {path}: {exc.strerror}") from None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
        if self._board is not None:
            self._board.close()


TENSORBOARD_MISSING = ("--tensorboard needs the tensorboard package: "
                       "pip install 'psops_mpi[tensorboard]'")


def check_tensorboard(log_dir: str, writer: bool) -> None:
    """Fail before training, not at the first epoch, when TensorBoard logs cannot be written:
    the package is missing (every rank: cheap) or does not import with torch's writer
    (``writer``: the rank that writes), or the folder cannot be made."""
    try:
        import tensorboard  # noqa: F401

        if writer:
            import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        raise UsageError(TENSORBOARD_MISSING) from None
    folder = Path(log_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"cannot write TensorBoard logs to {log_dir}: it is not a directory")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot write TensorBoard logs to {log_dir}: {exc.strerror}") from None


def check_writable(path: str) -> None:
    """Fail before training, not after it, when the metrics file cannot be created."""
    parent = Path(path).resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"cannot write metrics file {path}: {probe} is not a directory")
    if Path(path).is_dir():
        raise UsageError(f"cannot write metrics file {path}: it is a directory")
    try:  # really open it, but without erasing what a resumed run will append to
        parent.mkdir(parents=True, exist_ok=True)
        Path(path).open("a", encoding="utf-8").close()
    except OSError as exc:
        raise UsageError(f"cannot write metrics file {path}: {exc.strerror}") from None


LAUNCHERS = ("mpiexec", "mpiexec.hydra", "mpirun", "orterun", "prterun", "srun")


def _launcher_stderr_is_terminal(max_depth: int = 6) -> bool:
    """Whether the MPI launcher this rank descends from writes to a terminal (Linux /proc).

    mpiexec starts ranks in sessions of their own with piped output, so a rank cannot see the
    terminal its user watches; the launcher's own stderr tells.
    """
    pid = os.getppid()
    for _ in range(max_depth):
        try:
            name = Path(f"/proc/{pid}/comm").read_text().strip()
            if name in LAUNCHERS:
                return os.readlink(f"/proc/{pid}/fd/2").startswith(("/dev/pts/", "/dev/tty"))
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            return False
        if pid <= 1:
            return False
    return False


def interactive(stream: TextIO) -> bool:
    """Whether a person watches this run: the stream is a terminal, or the MPI launcher's is.
    Batch jobs and CI get plain lines instead of a progress bar."""
    return stream.isatty() or _launcher_stderr_is_terminal()


class Progress:
    """Rank 0's progress bar (TTY only) and epoch lines; silent elsewhere and with quiet."""

    def __init__(self, total_steps: int, enabled: bool, quiet: bool,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.lines = enabled and not quiet
        self.shown = self.lines and interactive(self.stream)
        self.bar = tqdm(total=total_steps, disable=not self.shown, file=self.stream,
                        dynamic_ncols=True, unit="step", leave=False)

    def update(self, steps: int, **postfix: float) -> None:
        self.bar.update(steps)
        if postfix:
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

    def line(self, text: str) -> None:
        if self.lines:
            if self.bar.disable:
                print(text, file=sys.stdout, flush=True)
            else:
                self.bar.write(text, file=sys.stdout)

    def close(self) -> None:
        self.bar.close()


def git_revision(timeout_s: float = GIT_TIMEOUT_S) -> dict[str, Any] | None:
    """The commit of the git checkout this package runs from: ``{"commit": short hash,
    "dirty": whether tracked files differ from it}`` (dirty None when git took too long to
    say). None when the package is not a checkout's (an installed copy), git is missing, or
    it does not answer within ``timeout_s``: a version stamp must never stop or stall a run.
    """
    package = Path(__file__).resolve().parent
    # GIT_OPTIONAL_LOCKS=0: git status must not take the index lock, which concurrent runs
    # (or the user's own git) on the same checkout would fight over.
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0", "LC_ALL": "C"}

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(package), *args], capture_output=True,
                              text=True, timeout=timeout_s, check=True, env=env).stdout

    try:
        top, commit = git("rev-parse", "--show-toplevel", "--short", "HEAD").splitlines()
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    if Path(top).resolve() != package.parent:  # installed inside some other repository
        return None
    try:
        dirty: bool | None = bool(git("status", "--porcelain", "--untracked-files=no").strip())
    except (OSError, subprocess.SubprocessError):
        dirty = None
    return {"commit": commit, "dirty": dirty}


def describe_version(env: dict[str, Any]) -> str:
    """``version 0.2.0 (git 1a2b3c4, uncommitted changes)`` from :func:`environment`."""
    git = env.get("git")
    if not git:
        return f"version {env['psops_mpi']}"
    state = {True: ", uncommitted changes", False: "", None: ", changes unknown"}[git["dirty"]]
    return f"version {env['psops_mpi']} (git {git['commit']}{state})"


def environment(git: bool = True) -> dict[str, Any]:
    """Versions and machine facts stored with every result; ``git``: look up the commit of
    the checkout (only the rank that writes results needs it)."""
    import mpi4py  # here, not at import: checkpoint tools use this module without MPI
    from mpi4py import MPI

    return {
        "psops_mpi": __version__,
        "git": git_revision() if git else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "mpi4py": mpi4py.__version__,
        "mpi_library": " ".join(MPI.Get_library_version().splitlines()[0].split()),
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }
