"""Stopping early on request: SIGTERM, SIGUSR1 and SIGINT make every rank write a checkpoint
at one step they agree on, then exit with :data:`~psops_mpi.errors.EXIT_STOPPED`; a stop
that the ranks cannot agree on in time, or a second signal, ends the job at once.

Who sends them: ``scancel`` and Slurm's preemption send SIGTERM (then SIGKILL after a grace
time, 30 s by default); ``#SBATCH --signal=USR1@120`` sends SIGUSR1 two minutes before the
time limit (``B:USR1@120`` to the batch script, which forwards it: see ``slurm/``); Ctrl-C
sends SIGINT; MPICH's ``mpiexec`` forwards them to every rank. A handler only notes the
signal; the training loop polls the note at points where the ranks meet anyway
(:class:`StopPoll` in :mod:`psops_mpi.loop`), so a signal that reached only some ranks still
stops them all at the same step.

A stop is bounded, as Lightning's and torchrun's are: a rank stuck in its model factory, in
a round or in a checkpoint write cannot answer, and the others would wait for it until
SIGKILL came, without a word. So a thread of the rank that got the signal watches the clock:
if the graceful stop has not ended within ``--stop-timeout-s``, it ends the job with one
line (which signal; on the rank that can tell, which ranks did not answer and where they
were last seen; that no new checkpoint was written, and which one a relaunch continues from)
and exit code 128+N. A second signal ends the job at once with the same kind of line. The
thread hears the signals through :func:`signal.set_wakeup_fd`, whose bytes the interpreter
writes whatever the main thread is doing, inside MPI included.

Handlers are installed by the command-line entry point only (:meth:`StopRequest.install`),
never at import: a library user's own loop keeps the signal handling it has.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
STOP_TIMEOUT_S = 60.0  # default bound: well inside Slurm's usual USR1@120 warning
REPORT_GRACE_S = 2.0  # a rank that cannot say who is missing lets the one that can go first
ECHO_S = 0.5  # a signal this soon after the first is the launcher forwarding the same one


class StopRequest:
    """The note a stop signal leaves: which signal arrived first on this rank (0: none),
    and, once installed, the watch that bounds the stop.

    Attributes:
        signum: the first stop signal this rank got, 0 for none.
        timeout_s: how long the ranks may take to stop gracefully (0: no bound).
        explain: when this rank should say that a stop failed (``now``, ``later``,
            ``never``) and its view of who is missing and where (the stall watch's).
        resume_note: what a relaunch continues from, in words.
    """

    active: ClassVar[StopRequest | None] = None  # the installed one, for the stall watch

    def __init__(self, timeout_s: float = STOP_TIMEOUT_S, rank: int = 0) -> None:
        self.signum = 0
        self.rank = rank
        self.timeout_s = timeout_s
        self.explain: Callable[[], tuple[str, str]] = lambda: ("now", "")
        self.resume_note: Callable[[], str] = lambda: ""
        self.end: Callable[[int], None] = _exit_now
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._deadline: float | None = None  # when a stop that began must have ended
        self._first_at: float | None = None

    @property
    def requested(self) -> bool:
        return self.signum != 0

    def install(self) -> None:
        """Catch the stop signals in this process (main thread only, as Python requires),
        and start the thread that bounds a stop and acts on a second signal."""
        for signum in STOP_SIGNALS:
            signal.signal(signum, self._note)
        read, write = os.pipe()
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        StopRequest.active = self
        threading.Thread(target=self._watch, args=(read,), name="psops-stop", daemon=True
                         ).start()

    def finished(self) -> None:
        """The run ended on its own (a graceful stop included): nothing is left to bound."""
        with self._lock:
            self._finished.set()

    def agreed(self) -> None:
        """Every rank agreed to stop: the checkpoint of the stop gets a bound of its own."""
        with self._lock:
            if self._deadline is not None and self.timeout_s:
                self._deadline = time.monotonic() + self.timeout_s

    def _note(self, signum: int, frame: object) -> None:
        # Only a flag: the loop acts on it where every rank can agree. A repeated signal (a
        # launcher that forwards what the rank also got directly) changes nothing here; the
        # watch thread counts signals itself.
        if not self.signum:
            self.signum = signum

    def _watch(self, read: int) -> None:
        while not self._finished.is_set():
            with self._lock:
                deadline = self._deadline
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if _readable(read, timeout):
                for signum in os.read(read, 64):
                    if signum in STOP_SIGNALS:
                        self._count(signum)
                continue
            with self._lock:  # agreed() may have moved the deadline while we waited
                due = self._deadline is not None and time.monotonic() >= self._deadline
            if due:
                self._give_up(f"the ranks did not stop within {self.timeout_s:g} s "
                              "(--stop-timeout-s)")

    def _count(self, signum: int) -> None:
        """The watch thread's view of one stop signal: the first starts the bound, a second
        (not the launcher's echo of the first, which comes within milliseconds) ends now."""
        now = time.monotonic()
        if self._first_at is None:
            self._first_at = now
            self.signum = self.signum or signum
            with self._lock:
                self._deadline = now + self.timeout_s if self.timeout_s else None
        elif now - self._first_at > ECHO_S:
            self._give_up(f"a second {signal_name(signum)} asked to end the job now",
                          report_anyway=True)

    def _give_up(self, why: str, report_anyway: bool = False) -> None:
        """End the job: the line on the rank that can tell who is missing (for a second
        signal: rank 0, or another if rank 0 has not ended the job by then), then exit code
        128+N. Nothing here touches a file system, which may be the one that hangs."""
        when, missing = self.explain()
        if report_anyway:
            when = "now" if self.rank == 0 else "later"
        if when != "now":
            time.sleep(REPORT_GRACE_S)  # the rank that can tell goes first
        with self._lock:
            if self._finished.is_set():  # the run ended well meanwhile
                return
            code = 128 + self.signum
            if when != "never":
                note = self.resume_note()
                parts = [f"psops_mpi: error: stopped by {signal_name(self.signum)}: {why}",
                         *([missing] if missing else []), "no new checkpoint was written",
                         *([note] if note else [])]
                print("; ".join(parts) + f" (exit code {code})", file=sys.stderr, flush=True)
            self.end(code)
            self._finished.set()  # (the end does not return, but where a test replaces it)


def _readable(fd: int, timeout: float | None) -> bool:
    import select

    ready, _, _ = select.select([fd], [], [], timeout)  # retried on EINTR (PEP 475)
    return bool(ready)


def _exit_now(code: int) -> None:
    """End the whole job from any thread: MPI_Abort where MPI runs, else this process."""
    sys.stdout.flush()
    try:
        from mpi4py import MPI

        # MPI_Abort from this thread needs MPI_THREAD_MULTIPLE (mpi4py's default); without
        # it, this process ends alone and the launcher ends the others.
        if (MPI.Is_initialized() and not MPI.Is_finalized()
                and MPI.Query_thread() == MPI.THREAD_MULTIPLE):
            time.sleep(0.5)  # let the launcher forward the line before it tears the job down
            MPI.COMM_WORLD.Abort(code)
    finally:
        os._exit(code)


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
