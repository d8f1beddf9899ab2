"""Command-line training: ``python -m psops_mpi.train`` (or ``psops-train``) under MPI.

    mpiexec -n 4 python -m psops_mpi.train --algo pso-ps --sync-every 8
    srun -n 16 --mpi=pmi2 python -m psops_mpi.train --dataset cifar10 --data-dir DATA

build (parse, check, data, model, synchroniser) -> resume -> train loop -> final metrics.
Any exception on any rank ends the whole job with one line naming the rank (MPI_Abort).
"""

from __future__ import annotations

from mpi4py import MPI

from psops_mpi.loop import LoopState, train
from psops_mpi.run import announce, build_run, checkpointer, finish, resume_run
from psops_mpi.world import abort_on_error, node_local


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m psops_mpi.train`` and ``psops-train``."""
    comm = MPI.COMM_WORLD
    try:
        run = build_run(argv, comm, node_local(comm))
        state = LoopState(run.batches.steps_per_epoch, run.world.device)
        checkpoints = checkpointer(run, state)
        announce(run, resume_run(run, state, checkpoints))
        finish(run, train(run, state, checkpoints))
    except SystemExit:
        raise
    except BaseException as exc:
        abort_on_error(comm, exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
