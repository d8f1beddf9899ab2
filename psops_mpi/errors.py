"""How a run ends, as a user sees it: bad input as one line with exit code 2, and the exit
codes of every other way a job can end (listed in the manual, docs/troubleshooting.md)."""

from __future__ import annotations

EXIT_OK = 0
EXIT_FAILED = 1  # an exception on some rank: traceback, one line naming the rank, MPI_Abort
EXIT_USAGE = 2  # bad input, found before training
EXIT_NONFINITE = 3  # stopped by non-finite values, or the final test loss is not finite
EXIT_CHECKPOINT = 4  # a checkpoint that had to be written was not (the final one, or a stop's)
EXIT_STALLED = 5  # ranks waited longer than --stall-abort-s for others
EXIT_STOPPED = 75  # stopped by SIGTERM/SIGUSR1 after a checkpoint: run again to continue
# (75 is EX_TEMPFAIL of sysexits.h: "a temporary failure; the user is invited to retry")


class UsageError(ValueError):
    """Bad input from the user: reported as one line on stderr, exit code 2, on every rank."""


def error_line(message: str) -> str:
    """The one line a user sees for a bad input."""
    return f"psops_mpi: error: {' '.join(str(message).split())}"
