"""The ``slurm`` fixture: one local one-node Slurm for the whole session, stopped by PID.

Tests that use it skip, saying why, where a prerequisite is missing (not root, packages
absent). Where Slurm is installed but does not start they skip on a workstation and fail
under ``CI=true`` (see :func:`tests.slurm.local_slurm.start_for_tests`).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.local_slurm import LocalSlurm, start_for_tests


@pytest.fixture(scope="session")
def slurm() -> Iterator[LocalSlurm]:
    # Not under pytest's tmp_path: munged wants every folder above its socket open to all.
    root = Path(tempfile.mkdtemp(prefix="psops-slurm-"))
    try:
        cluster = start_for_tests(root)
    except BaseException:  # skipped or failed: nothing is left running
        shutil.rmtree(root, ignore_errors=True)
        raise
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
