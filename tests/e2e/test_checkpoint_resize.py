"""Resuming a checkpoint at another world size (real mpiexec jobs): PSO-PS at fewer ranks keeps
the best particles and still verifies the dropped ones, at more ranks adds particles at the
global best; PA's rank r continues old rank r mod P_old; the data order continues at the same
fraction of the epoch; --resume-strict refuses."""

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
from tests.helpers.shards import flip_in_dataset

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
    res = launch([*RUN, *ckpt, "--max-steps", "30", "--lr", "0.05"], ranks=1)
    assert res.returncode == 0, res.stderr
    assert f"kept the particles with the best personal fitness, old rank(s) {best}" \
        in res.stdout
    # Only the setting that changed is named (not the run-local --checkpoint-dir).
    assert "psops_mpi: settings changed since the checkpoint: lr 0.1 -> 0.05\n" in res.stdout
    # Step 30 of 32 at 2 ranks is step 60 of 64 at one rank: the same fraction of the epoch.
    assert (meta["step_in_epoch"], meta["steps_per_epoch"]) == (30, 32)
    assert "data order continues in epoch 1 at step 60 of 64 (the same fraction)" in res.stdout
    after = newest(root)
    resumed = json.loads((after / "metadata.json").read_text())
    assert resumed["world_size"] == 1 and after != before
    assert (resumed["epoch"], resumed["step_in_epoch"], resumed["steps_per_epoch"]) == (0, 60, 64)
    with shard(before, best) as old, shard(after, 0) as new:
        for name in ("model/position", "sync/swarm/velocity", "sync/swarm/pbest",
                     "sync/swarm/gbest"):
            assert np.array_equal(new[name][()], old[name][()]), name
        assert new["sync/swarm"].attrs["pbest_fitness"] == old["sync/swarm"].attrs["pbest_fitness"]


def test_more_ranks_start_new_particles_at_the_centre(
        two_rank_checkpoint: Path, tmp_path: Path) -> None:
    """The default rule (centre) starts an added particle at the swarm's centre, at rest."""
    root = copy_of(two_rank_checkpoint, tmp_path)
    ckpt = ["--checkpoint-dir", str(root)]
    before = newest(root)

    res = launch([*RUN, *ckpt, "--max-steps", "1"], ranks=3)  # loads, trains nothing, saves
    assert res.returncode == 0, res.stderr
    assert "rank(s) 2 start new particles at the swarm's centre (the centre rule)" in res.stdout
    after = newest(root)
    resumed = json.loads((after / "metadata.json").read_text())
    # 3 ranks: 682 samples each, 21 steps of 32; 30/32 of an epoch is step 19.69, so 20.
    assert resumed["world_size"] == 3
    assert (resumed["epoch"], resumed["step_in_epoch"], resumed["steps_per_epoch"]) == (0, 20, 21)
    with shard(before, 1) as old, shard(after, 1) as kept, shard(after, 2) as new:
        assert np.array_equal(kept["model/position"][()], old["model/position"][()])
        assert np.array_equal(kept["sync/swarm/velocity"][()], old["sync/swarm/velocity"][()])
        centre = old["sync/anchor"][()]
        assert not np.array_equal(centre, old["sync/swarm/gbest"][()])  # a real distinction
        assert np.array_equal(new["model/position"][()], centre)
        assert np.array_equal(new["sync/anchor"][()], centre)
        assert np.array_equal(new["sync/swarm/pbest"][()], centre)
        assert not new["sync/swarm/velocity"][()].any()
        assert "optimizer/0" not in new and "optimizer/0" in kept  # fresh momentum
        assert new["sync/swarm"].attrs["pbest_fitness"] == old["sync/swarm"].attrs["gbest_fitness"]

    # And training goes on at the new size.
    res = launch([*RUN, *ckpt, "--quiet"], ranks=3)
    assert res.returncode == 0, res.stderr
    final = json.loads((newest(root) / "metadata.json").read_text())
    assert final["world_size"] == 3 and final["step"] == 2 * final["steps_per_epoch"]


def test_fewer_ranks_still_verify_the_particles_they_drop(two_rank_checkpoint: Path,
                                                          tmp_path: Path) -> None:
    """One rank continues the best particle; the other shard is read by nobody, yet a weight
    flipped inside it must stop the job: the checkpoint as a whole is damaged."""
    root = copy_of(two_rank_checkpoint, tmp_path)
    folder = newest(root)
    meta = json.loads((folder / "metadata.json").read_text())
    fits = [math.inf if s["summary"]["pbest_fitness"] is None else s["summary"]["pbest_fitness"]
            for s in meta["shards"]]
    dropped = 1 - int(np.argmin(fits))
    flip_in_dataset(folder / f"rank-{dropped:05d}.h5", "model/position", index=3)
    res = launch([*RUN, "--checkpoint-dir", str(root), "--max-steps", "30"], ranks=1)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psops_mpi: error: "), res.stderr
    assert f"rank-{dropped:05d}.h5 does not match its size and checksum" in lines[0]


def test_pa_at_more_ranks_continues_old_rank_r_mod_p(tmp_path: Path) -> None:
    """A PA checkpoint taken mid-period (the two ranks' weights differ) resumed at 3 ranks:
    ranks 0, 1, 2 continue old ranks 0, 1, 0. Each keeps its source's momentum exactly, and
    the end-of-epoch round then averages the three: (2 x_0 + x_1) / 3."""
    run = ["--algo", "pa", "--dataset", "synthetic", "--epochs", "2", "--sync-every", "4"]
    old_root, new_root = tmp_path / "old", tmp_path / "new"
    res = launch([*run, "--checkpoint-dir", str(old_root), "--checkpoint-every", "6",
                  "--max-steps", "8", "--quiet"], ranks=2)
    assert res.returncode == 0, res.stderr
    old = old_root / "step-00000006"  # 2 steps after the round at step 4
    res = launch([*run, "--checkpoint-dir", str(new_root), "--resume", str(old),
                  "--max-steps", "1", "--quiet"], ranks=3)
    assert res.returncode == 0, res.stderr
    assert "the checkpoint has 2 rank(s), this job 3: rank r continues old rank r mod 2" \
        in res.stdout
    new = newest(new_root)
    with shard(old, 0) as a, shard(old, 1) as b:
        old_state = [{name: fh[name][()] for name in names(fh)} for fh in (a, b)]
    x0, x1 = old_state[0]["model/position"], old_state[1]["model/position"]
    assert not np.allclose(x0, x1)  # mid-period: the ranks had not been averaged
    for rank in range(3):
        source = old_state[rank % 2]
        with shard(new, rank) as fh:
            state = {name: fh[name][()] for name in names(fh)}
        momentum = sorted(n for n in source if n.startswith("optimizer/"))
        assert momentum and momentum == sorted(n for n in state if n.startswith("optimizer/"))
        for name in [*momentum, "loop/epoch_sums"]:
            assert np.array_equal(state[name], source[name]), (rank, name)
        np.testing.assert_allclose(state["model/position"], (2 * x0 + x1) / 3,
                                   rtol=1e-5, atol=1e-6)


def names(fh: h5py.File) -> list[str]:
    found: list[str] = []
    fh.visititems(lambda n, o: found.append(n) if isinstance(o, h5py.Dataset) else None)
    return found
