"""The package's edges: importing it does not start MPI, and the checkpoint tools work where
mpi4py cannot be imported at all."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.helpers.launch import REPO
from tests.helpers.no_mpi import run_module_without_mpi


def python(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_importing_the_package_does_not_load_mpi() -> None:
    res = python("""
        import sys
        import psops_mpi, psops_mpi.checkpoint, psops_mpi.config, psops_mpi.cli
        assert "mpi4py" not in sys.modules, "mpi4py was imported"
        psops_mpi.PSOSync  # the synchronisers load MPI on first use
        assert "mpi4py.MPI" in sys.modules
    """)
    assert res.returncode == 0, res.stderr


def test_checkpoint_tools_run_without_mpi4py(tmp_path) -> None:
    res = run_module_without_mpi("psops_mpi.checkpoint", "inspect", str(tmp_path))
    assert "mpi4py" not in res.stderr, res.stderr  # it got as far as reading the folder
    assert res.returncode == 2 and res.stderr.startswith("psops_mpi: error: ")
    assert "is neither a complete checkpoint" in res.stderr
