"""The MPI world one rank lives in: communicator, ranks, device, and how a job ends.

Nothing here touches ``MPI.COMM_WORLD`` at import time; :func:`init_world` takes the
communicator (COMM_WORLD by default) when the caller asks for it.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn, TypeVar

import torch
from mpi4py import MPI

from psops_mpi.config import UsageError

T = TypeVar("T")
ABORT_GRACE_S = 1.0  # seconds for the launcher to forward a failing rank's last words

# Variables that launchers set to the number of tasks they started. If one of them says "more
# than one" while COMM_WORLD has size 1, the MPI library and the launcher do not speak the
# same process-management protocol (e.g. `srun --mpi=none`, or Open MPI's mpirun running a
# Python whose mpi4py is linked to MPICH): every task would train alone, silently.
LAUNCHER_SIZE_VARS = {
    "SLURM_STEP_NUM_TASKS": "Slurm (srun)",
    "OMPI_COMM_WORLD_SIZE": "Open MPI (mpirun)",
    "PMI_SIZE": "a PMI launcher (MPICH/Hydra mpiexec, Intel MPI)",
    "MV2_COMM_WORLD_SIZE": "MVAPICH (mpirun_rsh)",
}


@dataclass
class World:
    """This rank's place in the job."""

    comm: MPI.Comm
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    device: torch.device

    @property
    def is_root(self) -> bool:
        return self.rank == 0


def check_launch(world_size: int, environ: dict[str, str] | None = None) -> None:
    """Refuse to run when the launcher started several tasks but MPI sees only one.

    Raises:
        UsageError: with a sentence telling the user how to launch correctly.
    """
    environ = os.environ if environ is None else environ
    if world_size != 1:
        return
    for var, launcher in LAUNCHER_SIZE_VARS.items():
        value = environ.get(var, "")
        if value.isdigit() and int(value) > 1:
            raise UsageError(
                f"{launcher} started {value} tasks ({var}={value}) but MPI sees a world of "
                "size 1, so each task would train alone: the launcher and the MPI library that "
                "mpi4py uses do not match; under Slurm use `srun --mpi=pmi2` (MPICH) or "
                "`--mpi=pmix` (Open MPI), otherwise use the mpiexec of the MPI that mpi4py "
                "was built with (`python -c 'import mpi4py; print(mpi4py.get_config())'`)"
            )


def choose_device(kind: str, local_rank: int) -> torch.device:
    """One device per rank: ``cuda:<local rank>`` when CUDA is wanted and present, else CPU."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    if kind in ("auto", "cuda") and torch.cuda.is_available():
        num_gpus = torch.cuda.device_count()
        if local_rank >= num_gpus:
            raise UsageError(
                f"local rank {local_rank} has no GPU of its own: this node shows {num_gpus} "
                "GPU(s); start at most one rank per GPU or use --device cpu"
            )
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def cpu_threads(requested: int, local_size: int) -> int:
    """Threads per rank: the requested count, OMP_NUM_THREADS, or this rank's fair share of
    the cores it may run on (ranks on one node must not oversubscribe them)."""
    if requested > 0:
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    # Slurm and mpiexec often bind each rank to its own cores already: then the affinity
    # mask is this rank's share and must not be divided again.
    share = cores if cores < (os.cpu_count() or cores) else cores // local_size
    return max(1, share)


def node_local(comm: MPI.Comm) -> tuple[int, int]:
    """This rank's index among the ranks on its node, and their number (a collective)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        return local.Get_rank(), local.Get_size()
    finally:
        local.Free()


def init_world(comm: MPI.Comm, local: tuple[int, int], device: str = "auto",
               threads: int = 0) -> World:
    """Describe this rank: ranks, device and CPU threads. No collectives, so it may fail on
    some ranks only (inside :func:`agree`).

    Args:
        comm: the job's communicator.
        local: (node-local rank, ranks on the node), from :func:`node_local`.
        device, threads: as ``--device`` and ``--threads``.

    Raises:
        UsageError: the launch is inconsistent or the device cannot be had.
    """
    check_launch(comm.Get_size())
    local_rank, local_size = local
    dev = choose_device(device, local_rank)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads(threads, local_size))
    return World(comm, comm.Get_rank(), comm.Get_size(), local_rank, local_size, dev)


def error_line(message: str) -> str:
    """The one line a user sees for a bad input."""
    return f"psops_mpi: error: {' '.join(str(message).split())}"


def agree(comm: MPI.Comm, fn: Callable[[], T]) -> T:
    """Run ``fn`` on every rank; if it raises UsageError on any rank, every rank exits with 2.
    ``fn`` must not call collectives: a rank that fails early would miss them.

    Bad input is found before training by every rank, but not always by all of them (a file
    missing on one node): a small allgather of the messages lets every rank stop together
    and rank 0 print one line, instead of some ranks waiting forever in the next collective.
    """
    result: T | None = None
    message = None
    try:
        result = fn()
    except UsageError as exc:
        message = str(exc)
    messages = comm.allgather(message) if comm.Get_size() > 1 else [message]
    failed = [(rank, msg) for rank, msg in enumerate(messages) if msg is not None]
    if not failed:
        return result  # type: ignore[return-value]
    if comm.Get_rank() == 0:
        rank, msg = failed[0]
        where = "" if len(failed) == len(messages) else f"on rank {rank}: "
        print(error_line(where + msg), file=sys.stderr, flush=True)
    sys.exit(2)


def abort_on_error(comm: MPI.Comm, exc: BaseException) -> NoReturn:
    """End the whole job because this rank failed: one line naming the rank, then MPI_Abort.

    Without the abort, the other ranks would wait in their next collective until the
    allocation runs out.
    """
    rank = comm.Get_rank()
    detail = "".join(traceback.format_exception(exc))
    summary = " ".join(f"{type(exc).__name__}: {exc}".split())
    print(f"{detail}psops_mpi: rank {rank} failed, aborting the job: {summary}",
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    # Output travels through pipes to the launcher, which may tear the job down on MPI_Abort
    # before forwarding them: without this pause the reason was lost in about 1 run in 4.
    time.sleep(ABORT_GRACE_S)
    comm.Abort(1)
    raise SystemExit(1)  # pragma: no cover - Abort does not return


def print0(world: World, *args: object, **kwargs: object) -> None:
    """print() on rank 0 only."""
    if world.is_root:
        print(*args, **kwargs, flush=True)  # type: ignore[call-overload]
