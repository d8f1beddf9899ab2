"""The ``slurm`` fixture: one local one-node Slurm for the whole session, stopped by PID.

Tests that use it skip, saying why, where Slurm cannot be started (not root, packages
missing, a daemon that does not come up).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.slurm.local_slurm import LocalSlurm, SlurmUnavailable, start, why_not


@pytest.fixture(scope="session")
def slurm() -> Iterator[LocalSlurm]:
    reason = why_not()
    if reason:
        pytest.skip(reason)
    # Not under pytest's tmp_path: munged wants every folder above its socket open to all.
    root = Path(tempfile.mkdtemp(prefix="psops-slurm-"))
    try:
        cluster = start(root)
    except SlurmUnavailable as exc:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"local Slurm did not start: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
