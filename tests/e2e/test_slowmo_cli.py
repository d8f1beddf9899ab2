"""SlowMo from the command line: it learns, and resumes at another world size."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from psops_mpi.checkpoint import complete_checkpoints
from tests.helpers.launch import launch

RUN = ["--algo", "slowmo", "--dataset", "synthetic", "--epochs", "2", "--quiet",
       "--sync-every", "4"]


def test_slowmo_learns_and_resumes_on_more_ranks(tmp_path: Path) -> None:
    """Two ranks learn (chance is 0.1); their checkpoint of step 20 continues on 3 ranks,
    rank r from old rank r mod 2, the slow momentum and anchor exactly as saved."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    res = launch([*RUN, "--checkpoint-dir", str(ckpt), "--checkpoint-every", "20",
                  "--keep-last", "10", "--metrics-out", str(metrics)], ranks=2)
    assert res.returncode == 0, res.stderr
    final = json.loads(metrics.read_text().splitlines()[-1])
    assert final["world_size"] == 2 and final["test_acc"] > 0.9
    before = dict(complete_checkpoints(ckpt))[20]

    with h5py.File(before / "rank-00000.h5") as old:
        anchor, momentum = old["sync/anchor"][()], old["sync/momentum"][()]
    assert np.any(momentum != 0)  # the checkpoint held real slow momentum
    # --max-steps 1: the mapped position is past it, so the state is saved as loaded.
    resumed = launch([*RUN, "--checkpoint-dir", str(tmp_path / "again"), "--max-steps", "1",
                      "--resume", str(before)], ranks=3)
    assert resumed.returncode == 0, resumed.stderr
    assert "rank r continues old rank r mod 2" in resumed.stdout
    (_, after), = complete_checkpoints(tmp_path / "again")
    with h5py.File(after / "rank-00002.h5") as new:  # rank 2 continues old rank 0
        assert np.array_equal(new["sync/anchor"][()], anchor)
        assert np.array_equal(new["sync/momentum"][()], momentum)
