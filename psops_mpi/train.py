"""Command-line training: ``python -m psops_mpi.train`` (or ``psops-train``) under MPI.

    mpiexec -n 4 python -m psops_mpi.train --algo pso-ps --sync-every 8
    srun -n 16 --mpi=pmi2 python -m psops_mpi.train --dataset cifar10 --data-dir DATA

build (parse, check, data, model, synchroniser) -> resume -> train loop -> final metrics.
Any exception on any rank ends the whole job with one line naming the rank (MPI_Abort).
SIGTERM, SIGUSR1 and SIGINT stop every rank at one step after a checkpoint, or end the job
when the ranks cannot agree within ``--stop-timeout-s`` or a second signal comes; the exit
codes are in :mod:`psops_mpi.errors`.
"""

from __future__ import annotations

from mpi4py import MPI

from psops_mpi.cli import parse_config
from psops_mpi.errors import UsageError
from psops_mpi.loop import LoopState, train
from psops_mpi.run import (
    announce,
    build_run,
    checkpointer,
    finish,
    relaunch_note,
    resume_run,
    stopped_by_nonfinite,
    stopped_by_signal,
)
from psops_mpi.stall import StallWatch
from psops_mpi.stop import STOP_TIMEOUT_S, Stopped, StopRequest
from psops_mpi.sync import NonFiniteStop
from psops_mpi.world import abort_on_error, node_local


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m psops_mpi.train`` and ``psops-train``; the exit code."""
    comm = MPI.COMM_WORLD
    stop = bounded_stop(argv, StallWatch.of(comm))  # every rank makes the watch here, at once
    run = None
    try:
        run = build_run(argv, comm, node_local(comm))
        state = LoopState(run.steps_per_epoch, run.world.device)
        checkpoints = checkpointer(run, state)
        before = stop.resume_note()  # what a relaunch continues from, known without I/O:
        stop.resume_note = lambda: (  # the checkpoint this run last wrote, or that
            f"the same command continues from {checkpoints.last_saved}"
            if checkpoints.last_saved else before)
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
        abort_on_error(comm, run.batches.explain(exc) if run is not None else exc)
    finally:
        stop.finished()
        if run is not None:
            run.batches.close()  # DataLoader workers end now, not at the interpreter's exit


def bounded_stop(argv: list[str] | None, watch: StallWatch) -> StopRequest:
    """From now on a stop signal is noted and acted on at the next agreement, within
    ``--stop-timeout-s`` (bad settings are reported by the run's own checks, later)."""
    try:
        config = parse_config(argv)
    except UsageError:
        config = None
    stop = StopRequest(config.stop_timeout_s if config else STOP_TIMEOUT_S, rank=watch.rank)
    note = relaunch_note(config.checkpoint_dir if config else None)  # here: no I/O later
    stop.explain = watch.stop_view
    stop.resume_note = lambda: note
    stop.install()
    return stop


if __name__ == "__main__":
    raise SystemExit(main())
