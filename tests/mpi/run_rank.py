"""Run the MPI tests on this rank; only rank 0 prints (pytest-mpi runs them on every rank).

Usage: mpiexec -n P python tests/mpi/run_rank.py [pytest args]. The job fails if any rank's
tests fail: every rank's exit code is combined with an Allreduce(MAX).
"""

from __future__ import annotations

import os
import sys

import pytest
from mpi4py import MPI

comm = MPI.COMM_WORLD
here = os.path.dirname(os.path.abspath(__file__))
args = ["--with-mpi", here, *sys.argv[1:]]
if comm.Get_rank() != 0:
    sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - silence for the life of the process
code = int(pytest.main(args))
worst = comm.allreduce(code, op=MPI.MAX)
if comm.Get_rank() == 0 and worst != code:
    print(f"another rank's MPI tests failed (exit code {worst}); rerun without this wrapper: "
          f"mpiexec -n {comm.Get_size()} python -m pytest --with-mpi {here}", flush=True)
sys.exit(worst)
