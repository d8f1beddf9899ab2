"""Command-line training: ``python -m psops_mpi.train`` (or ``psops-train``) under MPI.

    mpiexec -n 4 python -m psops_mpi.train --algo pso-ps --sync-every 8
    srun -n 16 --mpi=pmi2 python -m psops_mpi.train --dataset cifar10 --data-dir DATA

build (parse, check, data, model, synchroniser) -> resume -> train loop -> final metrics.
Any exception on any rank ends the whole job with one line naming the rank (MPI_Abort).
SIGTERM and SIGUSR1 stop every rank at one step after a checkpoint; the exit codes are in
:mod:`psops_mpi.errors`.
"""

from __future__ import annotations

from mpi4py import MPI

from psops_mpi.loop import LoopState, train
from psops_mpi.run import (
    announce,
    build_run,
    checkpointer,
    finish,
    resume_run,
    stopped_by_nonfinite,
    stopped_by_signal,
)
from psops_mpi.stop import Stopped, StopRequest
from psops_mpi.sync import NonFiniteStop
from psops_mpi.world import abort_on_error, node_local


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m psops_mpi.train`` and ``psops-train``; the exit code."""
    comm = MPI.COMM_WORLD
    stop = StopRequest()
    stop.install()  # from now on a stop signal is noted, and acted on at the next agreement
    run = None
    try:
        run = build_run(argv, comm, node_local(comm))
        state = LoopState(run.steps_per_epoch, run.world.device)
        checkpoints = checkpointer(run, state)
        announce(run, resume_run(run, state, checkpoints))
        return finish(run, train(run, state, checkpoints, stop))
    except Stopped as stopped:  # raised on every rank at the same step
        assert run is not None
        return stopped_by_signal(run, stopped)
    except NonFiniteStop as exc:  # raised on every rank at the same step
        assert run is not None
        return stopped_by_nonfinite(run, exc)
    except SystemExit:
        raise
    except BaseException as exc:
        abort_on_error(comm, exc)
    finally:
        if run is not None:
            run.batches.close()  # DataLoader workers end now, not at the interpreter's exit


if __name__ == "__main__":
    raise SystemExit(main())
