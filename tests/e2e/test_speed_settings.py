"""--compile changes how fast the model runs, not what it learns: a compiled run ends where the
same run without it ends (to float rounding). On the CPU; on a GPU it is measured by
``bench/gpu_check.sh``. (--channels-last: tests/unit/test_models.py, and the CIFAR-10 test of
tests/e2e/test_train_cli.py, where ``auto`` turns it on.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from psops_mpi.models import compile_missing
from tests.e2e.test_train_cli import read_metrics, read_shards
from tests.helpers.launch import launch

COMPILE_MISSING = compile_missing(torch.device("cpu"))  # what torch.compile lacks here, if any


def positions(root: Path, step: int) -> list[np.ndarray]:
    return [s["model/position"] for s in read_shards(root / f"step-{step:08d}",
                                                     "model/position")]


@pytest.mark.skipif(COMPILE_MISSING is not None,
                    reason=f"torch.compile on the CPU needs {COMPILE_MISSING}")
def test_compiled_pso_ps_learns_as_the_eager_model(tmp_path: Path) -> None:
    """PSO-PS rewrites the weights in place at every round, outside the compiled graph: the
    compiled model must read them anew at every step. After three rounds both runs' weights
    agree to float rounding on every rank, and moved since the first round by far more."""
    runs = {"compiled": ["--compile"], "eager": []}
    for name, extra in runs.items():
        root = tmp_path / name
        res = launch(["--device", "cpu", "--max-steps", "24", "--sync-every", "8",
                      "--checkpoint-every", "8", *extra, "--checkpoint-dir", str(root),
                      "--metrics-out", str(root / "m.jsonl")], ranks=2, timeout=300)
        assert res.returncode == 0, res.stderr
        assert (", compiled, " in res.stdout) is (name == "compiled")
    compiled, eager = (positions(tmp_path / name, 24) for name in runs)
    first_round = positions(tmp_path / "compiled", 8)
    for rank, (a, b, before) in enumerate(zip(compiled, eager, first_round, strict=True)):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4, err_msg=f"rank {rank}")
        assert np.abs(a - before).max() > 100 * np.abs(a - b).max(), f"rank {rank}"
    losses = [read_metrics(tmp_path / name / "m.jsonl")[-1]["test_loss"] for name in runs]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
