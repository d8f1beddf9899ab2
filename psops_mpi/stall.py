"""Waiting for the other ranks, and saying which ones do not come.

A rank that never reaches a collective (stuck in user code, on a hung node whose process
lives on) leaves the others waiting inside MPI forever, and nothing says who is missing. Every
place where ranks wait for each other (the setup agreement, a round, a step of SSGD, the
checkpoint and stop agreements, evaluation) first passes :meth:`StallWatch.arrive`: a
non-blocking barrier, polled without pause for ``SPIN_S`` (as MPI itself waits), then with
sleeps that grow with the wait (a long wait costs no core, and ends at most ~3% late),
after which the collective itself runs as usual: every rank is known to be there. Polling a
large collective directly would slow it down, since MPI moves data only while it is called;
the barrier costs one small message latency (a few microseconds on one node, measured in
``bench/exchange_bench.py``).

Who is missing: a rank that has waited ``NOTICE_S`` sends rank 0 a tiny message naming the
wait (every wait has a number, the same on every rank), and rank 0 answers it. These
messages travel on a private duplicate of the communicator, made when the watch is, so they
can never match a library user's own receives on it. After
``report_s`` rank 0 prints the ranks it has not heard from, and again every ``report_s``
while the wait lasts; if rank 0 is the one missing, rank 1 says so (it got no answer). With
``abort_s`` set, the wait ends the job with one line and :data:`EXIT_STALLED`. What rank 0
(or rank 1) knows of the current wait is also what a stop that times out reports
(:meth:`StallWatch.stop_view`, for :mod:`psops_mpi.stop`).

Nothing here runs at import; one watch per communicator (:meth:`StallWatch.of`, a
collective the first time: every rank makes it at the same point), shared by everything that
waits on it, so that the wait numbers match across ranks. A notice can still be
in flight when its wait ends, and MPICH ends a job whose ranks finalize with messages nobody
received with exit code 9: before MPI is finalized, :meth:`StallWatch.close` (run at exit for
every watch) receives every notice and answer still due, counted on both sides.
"""

from __future__ import annotations

import atexit
import os
import sys
import time
from collections.abc import Callable
from typing import ClassVar, TextIO

import numpy as np
from mpi4py import MPI

from psops_mpi.errors import EXIT_STALLED
from psops_mpi.stop import StopRequest

REPORT_S = 120.0  # default: a first report after two minutes (Horovod's stall check: 60 s)
NOTICE_TAG, ANSWER_TAG = 0x5053, 0x5054  # point-to-point tags of the notices ("PS")
# Poll without sleeping this long, yielding the core between polls, as a blocking MPICH call
# does: the skew between ranks at a round is usually shorter, and a sleeping rank wakes late
# (on a shared core, much later: sleeping from the start made a round 2.7x slower here).
SPIN_S = 0.1
MAX_SLEEP_S = 0.02  # longest sleep between two polls (also the most a wait ends late by)

Where = str | Callable[[], str]


def _text(where: Where) -> str:
    return where() if callable(where) else where


def _seconds(seconds: float) -> str:
    """Whole seconds, or tenths below ten (short limits, as tests use)."""
    return f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}".removesuffix(".0")


def _ranks(ranks: list[int]) -> str:
    return ", ".join(str(r) for r in ranks) if ranks else "none"


class StallWatch:
    """Waits on the ranks of ``comm`` and reports those that do not arrive.

    Args:
        comm: the communicator whose ranks wait for each other.
        report_s: seconds of waiting before rank 0 names the missing ranks (repeated every
            ``report_s``); 0 turns reports off.
        abort_s: seconds of waiting after which the job ends (MPI_Abort, exit code
            :data:`EXIT_STALLED`); 0: never.
        stream: where reports go (stderr).
    """

    _watches: ClassVar[dict[int, StallWatch]] = {}

    def __init__(self, comm: MPI.Comm, report_s: float = REPORT_S, abort_s: float = 0.0,
                 stream: TextIO | None = None) -> None:
        self.comm = comm
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.report_s, self.abort_s = report_s, abort_s
        self.stream = stream
        self.count = 0  # waits so far; the same on every rank, so it names a wait
        # the notices' own communicator: a user's receives on comm can never take them
        self.notices = comm.Dup() if self.world_size > 1 else comm
        # what this rank knows of its current wait, for a stop that times out
        self.waiting_at: Where | None = None
        self.last_done: Where | None = None
        self.heard: set[int] = set()
        self.answered = False
        self._sends: list[tuple[MPI.Request, np.ndarray]] = []
        # notices and answers sent to / received from each rank, for close()
        self._sent = np.zeros(self.world_size, dtype=np.int64)
        self._received = np.zeros(self.world_size, dtype=np.int64)

    @classmethod
    def of(cls, comm: MPI.Comm) -> StallWatch:
        """The watch of ``comm`` (made on first use with the defaults; see :meth:`configure`)."""
        key = comm.py2f()
        watch = cls._watches.get(key)
        if watch is None or watch.comm != comm:
            if not cls._watches:
                atexit.register(cls.close_all)  # before mpi4py finalizes MPI
            watch = cls._watches[key] = cls(comm)
        return watch

    @classmethod
    def close_all(cls) -> None:
        """:meth:`close` every watch whose communicator is still usable."""
        for watch in list(cls._watches.values()):
            watch.close()
        cls._watches.clear()

    def close(self) -> None:
        """Receive every notice and answer other ranks sent this one and nobody received yet,
        and complete this rank's own sends. Collective: every rank of the communicator calls
        it (at exit, as MPI_Finalize is)."""
        if self.world_size == 1 or MPI.Is_finalized() or self.notices == MPI.COMM_NULL:
            return  # (no rank skips on counts of its own: another may owe it messages)
        due = np.zeros_like(self._sent)
        self.notices.Alltoall(self._sent, due)
        payload = np.zeros(1, dtype=np.int64)
        for source in range(self.world_size):
            tag = ANSWER_TAG if source == 0 else NOTICE_TAG
            for _ in range(int(due[source] - self._received[source])):
                self.notices.Recv(payload, source=source, tag=tag)
        MPI.Request.Waitall([req for req, _ in self._sends])
        self._sends.clear()
        self._sent[:] = 0
        self._received[:] = 0
        self.notices.Free()

    def configure(self, report_s: float, abort_s: float) -> None:
        """Set the limits (every rank the same: the run's settings)."""
        self.report_s, self.abort_s = report_s, abort_s

    @property
    def enabled(self) -> bool:
        """Waits are watched when the ranks may report or abort on them, or once a stop
        signal arrived (a stop that times out asks who is missing)."""
        stop = StopRequest.active
        return self.world_size > 1 and (self.report_s > 0 or self.abort_s > 0 or (
            stop is not None and stop.requested))

    def arrive(self, where: Where) -> None:
        """Return once every rank has called ``arrive`` for the same wait (a barrier).
        ``where`` names the wait in reports (a callable is only called for a report)."""
        if not self.enabled:
            return
        self.wait(self.comm.Ibarrier(), where)

    def wait(self, request: MPI.Request, where: Where, busy: bool = False) -> None:
        """Complete ``request``, a non-blocking collective every rank started, watching for
        ranks that do not come. ``busy``: poll without sleeping to the end (a collective
        that moves data, which MPI moves only while it is called), as MPI's own wait does.
        ``request`` needs only ``Test()`` and ``Wait()``."""
        if not self.enabled:
            request.Wait()
            return
        self.count += 1
        started = time.monotonic()
        while time.monotonic() - started < SPIN_S:
            if request.Test():
                self.last_done = where
                return
            os.sched_yield()
        self._slow_wait(request, where, started, busy)

    def _slow_wait(self, request: MPI.Request, where: Where, started: float,
                   busy: bool) -> None:
        limit = self.report_s or self.abort_s
        notice_s = min(1.0, limit / 4) if limit else 1.0
        next_report = self.report_s or float("inf")
        self.heard = set()  # rank 0: who has told us it waits here
        self.answered = noticed = reported = False
        self.waiting_at = where
        elapsed = 0.0
        while not request.Test():
            elapsed = time.monotonic() - started
            if self.rank == 0:
                self.heard |= self._take_notices()
            else:
                if not noticed and elapsed >= notice_s:
                    self._send(0, NOTICE_TAG)
                    noticed = True
                self.answered = self._take_answer() or self.answered
            if elapsed >= next_report:
                reported = self._report(elapsed, where, self.heard, self.answered) or reported
                next_report += self.report_s
            if self.abort_s and elapsed >= self.abort_s:
                self._abort(elapsed, where, self.heard, self.answered)
            if busy:
                os.sched_yield()
            else:
                time.sleep(min(MAX_SLEEP_S, elapsed / 32))  # at most ~3% late
        self.waiting_at, self.last_done = None, where
        self._finish_sends()
        if reported:
            self._print(f"psops_mpi: every rank arrived at {_text(where)} after "
                        f"{_seconds(time.monotonic() - started)} s")

    # ---- notices: point-to-point messages that only slow waits send

    def _send(self, dest: int, tag: int) -> None:
        payload = np.array([self.count], dtype=np.int64)
        self._sent[dest] += 1
        self._sends.append((self.notices.Isend(payload, dest=dest, tag=tag), payload))

    def _finish_sends(self) -> None:
        self._sends = [(req, buf) for req, buf in self._sends if not req.Test()]

    def _take_notices(self) -> set[int]:
        """Rank 0: the ranks whose notice for this wait came in (answered at once); notices
        of earlier waits, sent just before those ended, are dropped."""
        arrived: set[int] = set()
        status = MPI.Status()
        payload = np.zeros(1, dtype=np.int64)
        while self.notices.Iprobe(source=MPI.ANY_SOURCE, tag=NOTICE_TAG, status=status):
            source = status.Get_source()
            self.notices.Recv(payload, source=source, tag=NOTICE_TAG)
            self._received[source] += 1
            if int(payload[0]) == self.count:
                arrived.add(source)
                self._send(source, ANSWER_TAG)
        return arrived

    def _take_answer(self) -> bool:
        payload = np.zeros(1, dtype=np.int64)
        answered = False
        while self.notices.Iprobe(source=0, tag=ANSWER_TAG):
            self.notices.Recv(payload, source=0, tag=ANSWER_TAG)
            self._received[0] += 1
            answered = answered or int(payload[0]) == self.count
        return answered

    def stop_view(self) -> tuple[str, str]:
        """For a stop that did not end in time (:mod:`psops_mpi.stop`, from its thread):
        when this rank should say so (``now``, ``later``: if the job still runs after a
        grace time, ``never``) and who is missing and where. Rank 0 says it at once when it is
        waiting (it knows who has not arrived); rank 1 when rank 0 has not answered its
        notice; rank 0 not waiting (busy, or the one waited for) only if nobody did."""
        where = self.waiting_at
        if self.world_size == 1:
            return "now", ""
        if where is None:
            return ("later" if self.rank == 0 else "never"), ""
        seen = f"; last seen at {_text(self.last_done)}" if self.last_done else ""
        if self.rank == 0:
            return "now", (f"rank(s) {_ranks(self.missing(self.heard))} did not answer "
                           f"(waited for at {_text(where)}{seen})")
        if self.rank == 1 and not self.answered:
            return "now", f"rank 0 did not answer (waited for at {_text(where)}{seen})"
        return "never", ""

    def missing(self, heard: set[int]) -> list[int]:
        """Rank 0's view: the ranks that have not told it they wait (itself excluded)."""
        return [r for r in range(1, self.world_size) if r not in heard]

    # ---- what the user sees

    def _report(self, elapsed: float, where: Where, heard: set[int], answered: bool) -> bool:
        if self.rank == 0:
            self._print(f"psops_mpi: waiting {_seconds(elapsed)} s at {_text(where)} for rank(s) "
                        f"{_ranks(self.missing(heard))}")
            return True
        if self.rank == 1 and not answered:  # rank 0 is not waiting here: it is missing
            self._print(f"psops_mpi: rank 1 waiting {_seconds(elapsed)} s at {_text(where)}; "
                        "rank 0 has not arrived (other ranks may be missing too)")
            return True
        return False

    def _abort(self, elapsed: float, where: Where, heard: set[int], answered: bool) -> None:
        reporter = self.rank == 0 or (self.rank == 1 and not answered)
        who = _ranks(self.missing(heard)) if self.rank == 0 else "0"
        if reporter:
            self._print(f"psops_mpi: error: rank(s) {who} did not arrive at {_text(where)} "
                        f"within {_seconds(elapsed)} s (--stall-abort-s {self.abort_s:g}): "
                        "aborting the job")
        elif elapsed < self.abort_s + 5:  # give the reporter the time to say why
            return
        time.sleep(1.0)  # let the launcher forward the line before it tears the job down
        self.comm.Abort(EXIT_STALLED)

    def _print(self, line: str) -> None:
        print(line, file=self.stream or sys.stderr, flush=True)
