"""The one kind of error a user should see: bad input, as one line, exit code 2."""

from __future__ import annotations


class UsageError(ValueError):
    """Bad input from the user: reported as one line on stderr, exit code 2, on every rank."""


def error_line(message: str) -> str:
    """The one line a user sees for a bad input."""
    return f"psops_mpi: error: {' '.join(str(message).split())}"
