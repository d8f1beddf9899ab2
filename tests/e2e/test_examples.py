"""The manual's library example (docs/api.md), as printed there, under a real `mpiexec -n 2`."""

from __future__ import annotations

import os
import re
import sys

from tests.helpers.launch import REPO, mpiexec, run_bounded

EXAMPLE = REPO / "examples" / "library_loop.py"


def test_the_manual_shows_the_example_verbatim() -> None:
    readme = (REPO / "docs" / "api.md").read_text()
    assert f"```python\n{EXAMPLE.read_text()}```" in readme


def test_the_library_example_runs_and_learns() -> None:
    # From its own folder, as a user runs it; the package is this checkout's (as tests/run.sh
    # arranges for every test), whichever checkout `pip install -e` last pointed at.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    res = run_bounded([mpiexec(), "-n", "2", sys.executable, str(EXAMPLE)], 120, env,
                      cwd=REPO / "examples")
    assert res.returncode == 0, res.stderr
    accuracies = [float(a) for a in re.findall(r"epoch \d: test accuracy ([\d.]+)", res.stdout)]
    assert len(accuracies) == 3 and accuracies[-1] > 0.9  # chance is 0.1
    assert "'rounds': 12" in res.stdout  # 3 epochs x 32 steps / 8 per round, on rank 0 only
    assert res.stdout.count("test accuracy") == 3
