"""Resuming a PSO-PS checkpoint at another world size (real mpiexec jobs): fewer ranks keep
the best particles, more ranks add particles at the global best; --resume-strict refuses."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from psops_mpi.checkpoint import complete_checkpoints
from tests.helpers.launch import launch

RUN = ["--dataset", "synthetic", "--epochs", "2", "--sync-every", "4"]


def shard(folder: Path, rank: int) -> h5py.File:
    return h5py.File(folder / f"rank-{rank:05d}.h5", "r")


def newest(root: Path) -> Path:
    return complete_checkpoints(root)[-1][1]


@pytest.fixture(scope="module")
def two_rank_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("two_ranks")
    res = launch([*RUN, "--checkpoint-dir", str(root), "--max-steps", "30", "--quiet"], ranks=2)
    assert res.returncode == 0, res.stderr
    return root


def copy_of(root: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(root, tmp_path / "ckpt"))


def test_fewer_ranks_keep_the_best_particle_and_strict_refuses(
        two_rank_checkpoint: Path, tmp_path: Path) -> None:
    root = copy_of(two_rank_checkpoint, tmp_path)
    ckpt = ["--checkpoint-dir", str(root)]
    before = newest(root)
    meta = json.loads((before / "metadata.json").read_text())
    fits = [math.inf if s["summary"]["pbest_fitness"] is None else s["summary"]["pbest_fitness"]
            for s in meta["shards"]]
    best = int(np.argmin(fits))

    strict = launch([*RUN, *ckpt, "--max-steps", "30", "--resume-strict"], ranks=1)
    assert strict.returncode == 2
    assert strict.stderr.strip().count("\n") == 0 and "--resume-strict" in strict.stderr
    assert "Traceback" not in strict.stderr

    # Same --max-steps: the mapped position is past it, so the state is saved as loaded.
    res = launch([*RUN, *ckpt, "--max-steps", "30"], ranks=1)
    assert res.returncode == 0, res.stderr
    assert f"kept the particles with the best personal fitness, old rank(s) {best}" \
        in res.stdout
    after = newest(root)
    assert after != before and json.loads((after / "metadata.json").read_text())[
        "world_size"] == 1
    with shard(before, best) as old, shard(after, 0) as new:
        for name in ("model/position", "sync/swarm/velocity", "sync/swarm/pbest",
                     "sync/swarm/gbest"):
            assert np.array_equal(new[name][()], old[name][()]), name
        assert new["sync/swarm"].attrs["pbest_fitness"] == old["sync/swarm"].attrs["pbest_fitness"]


def test_more_ranks_start_new_particles_at_the_global_best(
        two_rank_checkpoint: Path, tmp_path: Path) -> None:
    root = copy_of(two_rank_checkpoint, tmp_path)
    ckpt = ["--checkpoint-dir", str(root)]
    before = newest(root)

    res = launch([*RUN, *ckpt, "--max-steps", "1"], ranks=3)  # loads, trains nothing, saves
    assert res.returncode == 0, res.stderr
    assert "rank(s) 2 start new particles at the global best" in res.stdout
    after = newest(root)
    assert json.loads((after / "metadata.json").read_text())["world_size"] == 3
    with shard(before, 1) as old, shard(after, 1) as kept, shard(after, 2) as new:
        assert np.array_equal(kept["model/position"][()], old["model/position"][()])
        assert np.array_equal(kept["sync/swarm/velocity"][()], old["sync/swarm/velocity"][()])
        gbest = old["sync/swarm/gbest"][()]
        assert not np.array_equal(gbest, old["model/position"][()])  # a real distinction
        assert np.array_equal(new["model/position"][()], gbest)
        assert np.array_equal(new["sync/swarm/pbest"][()], gbest)
        assert not new["sync/swarm/velocity"][()].any()
        assert "optimizer/0" not in new and "optimizer/0" in kept  # fresh momentum
        assert new["sync/swarm"].attrs["pbest_fitness"] == old["sync/swarm"].attrs["gbest_fitness"]

    # And training goes on at the new size.
    res = launch([*RUN, *ckpt, "--quiet"], ranks=3)
    assert res.returncode == 0, res.stderr
    final = json.loads((newest(root) / "metadata.json").read_text())
    assert final["world_size"] == 3 and final["step"] == 2 * final["steps_per_epoch"]
