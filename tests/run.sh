#!/usr/bin/env bash
# The whole test suite: lint, unit + end-to-end tests, the MPI tier at 2 and 8 ranks, then the
# Slurm tier (a one-node Slurm on localhost; its tests skip, saying why, where Slurm is not
# installed or not usable here; under CI=true a Slurm that is installed but does not start
# fails the run). Every tier lists its skipped tests with the reason (-rs).
# Every MPI launch is bounded by `timeout` so a failing rank can never hang the run.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1  # 4 ranks on a 2-core machine must not fight over threads
# Test this checkout even if `pip install -e` last pointed at another one.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

ruff check .
python -m pytest tests/unit tests/e2e -q -rs
# Triton reads TRITON_INTERPRET when it is imported: its kernel's tests run in a process of their own.
TRITON_INTERPRET=1 python -m pytest tests/unit/test_kernels_triton.py -q -rs
for ranks in 2 8; do
    echo "== MPI tests on $ranks ranks"
    # 8 ranks share 2 cores: whether a local step waits on the device does not depend on the
    # number of ranks, and 2 ranks check it.
    skip=(); (( ranks == 8 )) && skip=(--ignore tests/mpi/test_step_sync.py)
    # Only rank 0 reports; the other ranks' results reach it through the exit code.
    timeout -k 10 300 mpiexec -n "$ranks" python tests/mpi/run_rank.py -q -rs -p no:cacheprovider \
        "${skip[@]}"
done
echo "== Slurm tests"
timeout -k 10 600 python -m pytest tests/slurm -q -rs -p no:cacheprovider
