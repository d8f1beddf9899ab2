"""Run Python code in a process where ``import mpi4py`` fails, as on a machine without MPI."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers.launch import REPO


def import_blocker(package: str) -> str:
    """Python code that, run first, makes ``import package`` (and its submodules) fail."""
    return f"""
import sys
class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name == {package!r} or name.startswith({package + "."!r}):
            raise ImportError("No module named {package!r}")
sys.meta_path.insert(0, _Blocked())
"""


BLOCK_MPI4PY = import_blocker("mpi4py")


def run_module_without_mpi(module: str, *args: str) -> subprocess.CompletedProcess:
    """``python -m module args`` with mpi4py unimportable."""
    code = BLOCK_MPI4PY + f"""
import runpy
sys.argv = [{module!r}, *sys.argv[1:]]
runpy.run_module({module!r}, run_name="__main__")
"""
    return subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
