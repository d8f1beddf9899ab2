"""The MPI world one rank lives in: communicator, ranks, device, and how a job ends.

Nothing here touches ``MPI.COMM_WORLD`` at import time; :func:`init_world` takes the
communicator (COMM_WORLD by default) when the caller asks for it.
"""

from __future__ import annotations

import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NoReturn, TypeVar

import torch
from mpi4py import MPI

from psops_mpi.cuda_aware import CudaAwareDecision, resolve
from psops_mpi.errors import UsageError, error_line
from psops_mpi.stall import StallWatch

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
# The same launchers' index of this task: in such a mismatched launch every task is rank 0 of
# its own world, and only the launcher's task 0 should print the error (not one line per task).
LAUNCHER_RANK_VARS = ("SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


@dataclass
class World:
    """This rank's place in the job."""

    comm: MPI.Comm
    rank: int
    world_size: int
    local_rank: int
    local_size: int
    device: torch.device
    cuda_aware: CudaAwareDecision = field(
        default_factory=lambda: CudaAwareDecision(False, "tensors live on the cpu", needed=False))
    """Whether CUDA buffers go to MPI directly or through pinned host memory, and why."""
    gpu_sharing: str = ""
    """When ranks of this node share GPUs: how many on how many, in words ('' otherwise)."""

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


@dataclass(frozen=True)
class NodeLocal:
    """This rank's place among the ranks of its node, and the GPUs each of them sees."""

    rank: int
    size: int
    gpus: tuple[tuple[str, ...], ...] = ()
    """Per node-local rank, the physical ids of the GPUs it sees, in its CUDA index order;
    empty when unknown (then every rank is taken to see what this one sees)."""


def visible_gpus() -> tuple[str, ...]:
    """Physical ids (UUIDs) of the GPUs this process sees, in CUDA index order.

    UUIDs, not indices: under Slurm every task may see its own GPU as ``cuda:0`` (with
    ``CUDA_VISIBLE_DEVICES=0`` in each), and only the UUID tells whether two tasks were given
    the same one.
    """
    if not torch.cuda.is_available():
        return ()
    listed = [x.strip() for x in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")]
    ids = []
    for index in range(torch.cuda.device_count()):
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        fallback = listed[index] if index < len(listed) and listed[index] else str(index)
        ids.append(str(uuid) if uuid else fallback)
    return tuple(ids)


def assign_gpus(visible: Sequence[Sequence[str]], allow_sharing: bool = False) -> list[int | None]:
    """Which GPU each rank of one node uses, as an index into the GPUs that rank sees.

    Ranks in node-local order take the first of their GPUs that no rank took before. So with
    every rank seeing all the node's GPUs, local rank r gets ``cuda:r``; with Slurm narrowing
    ``CUDA_VISIBLE_DEVICES`` to one GPU per task (``--gpus-per-task=1``), every rank gets its
    ``cuda:0``. Every rank computes the same answer from the same gathered lists.

    Args:
        visible: per node-local rank, the physical ids of the GPUs it sees (:func:`visible_gpus`).
        allow_sharing: when a rank finds all its GPUs taken, give it the one that the fewest
            ranks use (round-robin) instead of refusing.

    Returns:
        Per node-local rank, an index into its own list, or None for a rank that sees no GPU.

    Raises:
        UsageError: a rank would share a GPU and sharing was not allowed.
    """
    users: dict[str, int] = {}
    chosen: list[int | None] = []
    for gpus in visible:
        if not gpus:
            chosen.append(None)
            continue
        free = [i for i, gpu in enumerate(gpus) if gpu not in users]
        if free:
            index = free[0]
        elif allow_sharing:
            index = min(range(len(gpus)), key=lambda i: users[gpus[i]])
        else:
            num_gpus = len({gpu for gpus in visible for gpu in gpus})
            raise UsageError(
                f"{len(visible)} ranks on this node but only {num_gpus} GPU(s) for them, so "
                "ranks would share a GPU: start at most one rank per GPU (for example "
                f"`--ntasks-per-node={num_gpus} --gpus-per-task=1`), pass --allow-gpu-sharing "
                "or --device auto to share them round-robin, or use --device cpu"
            )
        users[gpus[index]] = users.get(gpus[index], 0) + 1
        chosen.append(index)
    return chosen


def sharing_note(visible: Sequence[Sequence[str]], chosen: Sequence[int | None]) -> str:
    """'N ranks share M GPU(s)' when some GPU of the node serves several ranks, else ''."""
    used = [gpus[i] for gpus, i in zip(visible, chosen, strict=True) if i is not None]
    if len(set(used)) == len(used):
        return ""
    return f"{len(used)} ranks share {len(set(used))} GPU(s) round-robin"


def pick_gpu(kind: str, visible: Sequence[Sequence[str]], rank: int,
             allow_sharing: bool = False) -> tuple[int | None, str]:
    """Node-local rank ``rank``'s GPU (an index into its own list, None for none) and
    :func:`sharing_note` for its node.

    ``auto`` shares GPUs round-robin when the node has fewer than ranks: it promises a run,
    on whatever the node has, and a shared GPU still trains (rank 0 says so at start).
    ``cuda`` asks for a GPU per rank and refuses to share unless ``allow_sharing``: a job
    that was sized for one GPU per rank should not run at a fraction of its speed unnoticed.
    """
    chosen = assign_gpus(visible, allow_sharing or kind == "auto")
    return chosen[rank], sharing_note(visible, chosen)


def choose_gpu(kind: str, local: NodeLocal,
               allow_sharing: bool = False) -> tuple[torch.device, str]:
    """One device per rank: its own GPU (:func:`pick_gpu`) when CUDA is wanted and present,
    else the CPU; and the node's sharing note ('' when no GPU is shared)."""
    if kind == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for but torch sees no CUDA device")
    if kind == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu"), ""
    visible = local.gpus or (visible_gpus(),) * local.size
    try:
        index, note = pick_gpu(kind, visible, local.rank, allow_sharing)
    except UsageError as exc:
        raise UsageError(f"node {socket.gethostname()}: {exc}") from None
    if index is None:  # pragma: no cover - CUDA is available to this rank, so it sees one
        return torch.device("cpu"), ""
    torch.cuda.set_device(index)
    return torch.device("cuda", index), note and f"node {socket.gethostname()}: {note}"


def cpu_threads(requested: int, local_size: int) -> int:
    """Threads per rank: the requested count, OMP_NUM_THREADS, or this rank's fair share of
    the cores it may run on (ranks on one node must not oversubscribe them)."""
    if requested > 0:
        return requested
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return core_share(local_size)


def core_share(local_size: int) -> int:
    """The cores this rank may use: its affinity mask where the launcher bound it, else an
    even share of the node's cores among its ``local_size`` ranks."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    # Slurm and mpiexec often bind each rank to its own cores already: then the affinity
    # mask is this rank's share and must not be divided again.
    share = cores if cores < (os.cpu_count() or cores) else cores // local_size
    return max(1, share)


def data_workers(requested: int | None, local_size: int) -> int:
    """DataLoader workers per rank: the requested count, else one less than this rank's
    cores (the training process keeps one), at most 4, and none for a rank of one or two
    cores: there the workers share the training process's cores, and passing their batches
    between processes cost more than they saved (``bench/data_bench.py``: at 1 and 2 ranks
    on a 2-core machine, 0 workers beat 1 and 2; on 16 cores, 4 beat 0)."""
    if requested is not None:
        return requested
    cores = core_share(local_size)
    return 0 if cores <= 2 else min(4, cores - 1)


def node_local(comm: MPI.Comm) -> NodeLocal:
    """This rank's index among the ranks on its node, their number, and the GPUs each sees
    (a collective: one small allgather within the node)."""
    local = comm.Split_type(MPI.COMM_TYPE_SHARED, key=comm.Get_rank())
    try:
        mine = visible_gpus()
        gpus = tuple(local.allgather(mine)) if local.Get_size() > 1 else (mine,)
        return NodeLocal(local.Get_rank(), local.Get_size(), gpus)
    finally:
        local.Free()


def init_world(comm: MPI.Comm, local: NodeLocal | tuple[int, int], device: str = "auto",
               threads: int = 0, allow_gpu_sharing: bool = False,
               cuda_aware: str = "auto") -> World:
    """Describe this rank: ranks, device, CPU threads and how CUDA buffers reach MPI. No
    collectives, so it may fail on some ranks only (inside :func:`agree`).

    Args:
        comm: the job's communicator.
        local: from :func:`node_local`.
        device, threads, allow_gpu_sharing, cuda_aware: as the flags of the same names.

    Raises:
        UsageError: the launch is inconsistent or the device cannot be had.
    """
    check_launch(comm.Get_size())
    if not isinstance(local, NodeLocal):
        local = NodeLocal(*local)
    dev, sharing = choose_gpu(device, local, allow_gpu_sharing)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads(threads, local.size))
    return World(comm, comm.Get_rank(), comm.Get_size(), local.rank, local.size, dev,
                 resolve(cuda_aware, dev.type), sharing)


def agree(comm: MPI.Comm, fn: Callable[[], T], where: str = "the start-up checks") -> T:
    """Run ``fn`` on every rank; if it raises UsageError on any rank, every rank exits with 2.
    ``fn`` must not call collectives: a rank that fails early would miss them.

    Bad input is found before training by every rank, but not always by all of them (a file
    missing on one node): a small allgather of the messages lets every rank stop together
    and rank 0 print one line, instead of some ranks waiting forever in the next collective.
    A rank that takes too long (data on a slow file system, a hung node) is named by rank 0
    while the others wait (:mod:`psops_mpi.stall`; ``where`` names the wait).
    """
    result: T | None = None
    message = None
    try:
        result = fn()
    except UsageError as exc:
        message = str(exc)
    if comm.Get_size() > 1:
        StallWatch.of(comm).arrive(where)
    messages = comm.allgather(message) if comm.Get_size() > 1 else [message]
    failed = [(rank, msg) for rank, msg in enumerate(messages) if msg is not None]
    if not failed:
        return result  # type: ignore[return-value]
    if comm.Get_rank() == 0 and not _echo_of_task_zero(comm.Get_size()):
        rank, msg = failed[0]
        where = "" if len(failed) == len(messages) else f"on rank {rank}: "
        print(error_line(where + msg), file=sys.stderr, flush=True)
    sys.exit(2)


def _echo_of_task_zero(world_size: int, environ: dict[str, str] | None = None) -> bool:
    """True for a size-1 world that the launcher started as task 1, 2, ... of several: its
    error line would repeat task 0's."""
    environ = os.environ if environ is None else environ
    if world_size != 1:
        return False
    return any(environ.get(var, "").isdigit() and int(environ[var]) > 0
               for var in LAUNCHER_RANK_VARS)


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
