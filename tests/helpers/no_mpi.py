"""Run Python code in a process where ``import mpi4py`` fails, as on a machine without MPI."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.launch import REPO

BLOCK_MPI4PY = """
import sys
class _NoMPI:
    def find_spec(self, name, path=None, target=None):
        if name == "mpi4py" or name.startswith("mpi4py."):
            raise ImportError("mpi4py is blocked in this test")
sys.meta_path.insert(0, _NoMPI())
"""


def run_module_without_mpi(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` with mpi4py unimportable."""
    code = BLOCK_MPI4PY + f"""
import runpy
sys.argv = [{module!r}, *sys.argv[1:]]
runpy.run_module({module!r}, run_name="__main__")
"""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
