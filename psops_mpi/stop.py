"""Stopping early on request: SIGTERM and SIGUSR1 make every rank write a checkpoint at one
step they agree on, then exit with :data:`~psops_mpi.errors.EXIT_STOPPED`.

Who sends them: ``scancel`` and Slurm's preemption send SIGTERM (then SIGKILL after a grace
time, 30 s by default); ``#SBATCH --signal=USR1@120`` sends SIGUSR1 two minutes before the
time limit (``B:USR1@120`` to the batch script, which forwards it: see ``slurm/``); MPICH's
``mpiexec`` forwards both to every rank. A handler only notes the signal; the training loop
polls the note at points where the ranks meet anyway (:class:`StopPoll` in
:mod:`psops_mpi.loop`), so a signal that reached only some ranks still stops them all at
the same step.

Handlers are installed by the command-line entry point only (:meth:`StopRequest.install`),
never at import: a library user's own loop keeps the signal handling it has.
"""

from __future__ import annotations

import signal
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """The note a stop signal leaves: which signal arrived first on this rank (0: none)."""

    def __init__(self) -> None:
        self.signum = 0

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def install(self) -> None:
        """Catch SIGTERM and SIGUSR1 in this process (main thread only, as Python requires)."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._note)

    def _note(self, signum: int, frame: object) -> None:
        # Only a flag: the loop acts on it where every rank can agree. A repeated signal (a
        # launcher that forwards what the rank also got directly) changes nothing.
        if not self.signum:
            self.signum = signum


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class Stopped(Exception):
    """Every rank stopped at ``step`` because of a stop signal (raised on every rank).

    Attributes:
        signum: the signal (the largest number among those the ranks got).
        step: the step every rank stopped after.
        checkpoint: the checkpoint holding that step, or None.
        error: why no checkpoint was written, when one should have been; None otherwise.
    """

    def __init__(self, signum: int, step: int, checkpoint: Path | None,
                 error: str | None = None) -> None:
        super().__init__(f"stopped by {signal_name(signum)} at step {step}")
        self.signum, self.step, self.checkpoint, self.error = signum, step, checkpoint, error
