"""Checkpoint files and state without launching jobs: shards round-trip exactly, damaged files
are refused with one clear error, checkpoints are found by progress, resizes are planned."""

from __future__ import annotations

import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from psops_mpi import PASync, PSOSync, UsageError
from psops_mpi.checkpoint import plan_sources, store
from psops_mpi.checkpoint import state as st
from tests.helpers.shards import flip_in_dataset


def test_plan_keeps_best_particles_or_adds_new_ones() -> None:
    fits = [0.9, 0.2, math.inf, 0.5]
    assert plan_sources(fits, 4, pso=True) == [0, 1, 2, 3]
    assert plan_sources(fits, 2, pso=True) == [1, 3]  # the two best, in old rank order
    assert plan_sources(fits, 1, pso=True) == [1]
    assert plan_sources(fits, 6, pso=True) == [0, 1, 2, 3, None, None]
    assert plan_sources([0.3, 0.3], 1, pso=True) == [0]  # ties go to the lower rank
    assert plan_sources(fits, 3, pso=False) == [0, 1, 2]
    assert plan_sources([1.0, 2.0], 5, pso=False) == [0, 1, 0, 1, 0]


def test_shard_round_trips_arrays_and_scalars(tmp_path: Path) -> None:
    shard = store.Shard(
        arrays={"model/position": np.arange(5, dtype=np.float32),
                "rng/torch_cpu": np.arange(7, dtype=np.uint8)},
        scalars={"rank": 3, "fit": math.inf, "none": None, "flag": True, "name": "SGD"})
    sha, size = store.write_shard(tmp_path / "s.h5", shard, step=1)
    assert size == (tmp_path / "s.h5").stat().st_size and sha == store.sha256_of(tmp_path / "s.h5")
    back = store.read_shard(tmp_path / "s.h5", sha, size)
    assert back.scalars == shard.scalars
    assert all(np.array_equal(back.arrays[k], v) and back.arrays[k].dtype == v.dtype
               for k, v in shard.arrays.items())
    assert not list(tmp_path.glob("*.part"))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage", "missing"])
def test_damaged_shard_is_one_usage_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "s.h5"
    sha, size = store.write_shard(path, store.Shard({"a": np.ones(100)}, {"rank": 0}), step=1)
    data = path.read_bytes()
    if damage == "flip":
        path.write_bytes(data[:50] + bytes([data[50] ^ 4]) + data[51:])
    elif damage == "truncate":
        path.write_bytes(data[:-10])
    elif damage == "garbage":  # with a matching checksum: the HDF5 parser itself must refuse
        path.write_bytes(b"not hdf5" * 10)
        sha, size = store.sha256_of(path), path.stat().st_size
    else:
        path.unlink()
    with pytest.raises(UsageError) as err:
        store.read_shard(path, sha, size)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_value_changed_inside_an_array_is_caught_by_the_checksum(tmp_path: Path) -> None:
    """A flipped bit in the data region leaves a valid HDF5 file holding one wrong weight:
    only the sha256 against the metadata can refuse it, when loading and when verifying."""
    path = tmp_path / "s.h5"
    position = np.linspace(-1, 1, 100, dtype=np.float32)
    shard = store.Shard({"model/position": position, "swarm/velocity": position}, {"rank": 0})
    sha, size = store.write_shard(path, shard, step=1)
    flip_in_dataset(path, "model/position", index=7)
    with h5py.File(path, "r") as fh:  # h5py alone sees nothing wrong
        damaged = fh["model/position"][()]
    assert np.flatnonzero(damaged != position).tolist() == [7]
    assert path.stat().st_size == size
    with pytest.raises(UsageError, match="does not match its checksum") as err:
        store.read_shard(path, sha, size)
    assert str(path) in str(err.value)
    with pytest.raises(UsageError, match="does not match its size and checksum"):
        store.verify_shard_file(path, sha, size)


def make_checkpoint(root: Path, step: int, epoch: int, in_epoch: int, per_epoch: int,
                    meta: bool = True) -> Path:
    folder = root / store.step_dir_name(step)
    folder.mkdir(parents=True)
    if meta:
        (folder / store.METADATA).write_text(json.dumps(
            {"epoch": epoch, "step_in_epoch": in_epoch, "steps_per_epoch": per_epoch}))
    return folder


def test_complete_checkpoints_by_progress_ignoring_partial_ones(tmp_path: Path) -> None:
    a = make_checkpoint(tmp_path, 40, 0, 40, 62)
    b = make_checkpoint(tmp_path, 30, 0, 30, 31)  # after a resize to more ranks: fewer steps
    make_checkpoint(tmp_path, 50, 0, 50, 62, meta=False)  # never committed
    (tmp_path / ".tmp-step-00000060").mkdir()  # being written
    assert store.complete_checkpoints(tmp_path) == [(40, a), (30, b)]
    damaged = make_checkpoint(tmp_path, 10, 0, 10, 62)
    (damaged / store.METADATA).write_text("{")
    assert store.complete_checkpoints(tmp_path)[-1] == (10, damaged)  # reported, not skipped


def net() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def trained_sync(kind: type, seed: int, steps: int) -> tuple:
    torch.manual_seed(seed)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sync = kind(model, opt, MPI.COMM_SELF, sync_every=3)
    run_steps(sync, steps, first=0)
    return sync


def run_steps(sync, steps: int, first: int) -> None:
    for step in range(first, first + steps):
        gen = torch.Generator().manual_seed(step)
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        loss = F.cross_entropy(sync.model(x), y)
        sync.optimizer.zero_grad(set_to_none=False)
        loss.backward()
        sync.after_backward()
        sync.optimizer.step()
        sync.after_step(loss)


def state_of(sync) -> list[torch.Tensor]:
    tensors = [sync.flat.data.clone(), sync.buffers.data.clone()]
    tensors += [s["momentum_buffer"].clone() for s in sync.optimizer.state.values()]
    if isinstance(sync, PSOSync):
        tensors += [sync.swarm.v.clone(), sync.swarm.pbest.clone(), sync.swarm.gbest.clone()]
    return tensors


@pytest.mark.parametrize("kind", [PSOSync, PASync])
def test_state_restores_exactly_and_training_continues_identically(tmp_path: Path,
                                                                   kind: type) -> None:
    original = trained_sync(kind, seed=0, steps=7)  # 7: mid-period, momentum and swarm set
    position = st.LoopPosition(7, 0, 7, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), 1.5)
    sha, size = store.write_shard(tmp_path / "s.h5", st.capture(original, position), step=7)
    shard = store.read_shard(tmp_path / "s.h5", sha, size)

    restored = trained_sync(kind, seed=1, steps=2)  # other weights, momentum, counters
    st.check_shard(shard, restored, "s.h5")
    st.restore_model(restored, shard)
    st.restore_optimizer(restored, shard)
    st.restore_rng(restored, shard)
    if kind is PSOSync:
        st.restore_swarm(restored, shard)
    restored.restore_checkpoint_state(st.sync_scalars(shard))
    assert restored.checkpoint_state() == original.checkpoint_state()
    run_steps(original, 8, first=7)
    run_steps(restored, 8, first=7)
    for a, b in zip(state_of(original), state_of(restored), strict=True):
        assert torch.equal(a, b)


def test_check_shard_refuses_another_optimizer(tmp_path: Path) -> None:
    sync = trained_sync(PSOSync, seed=0, steps=3)
    shard = st.capture(sync, st.LoopPosition(3, 0, 3, torch.zeros(3, dtype=torch.float64), 0.0))
    shard.scalars["optimizer.class"] = "Adam"
    with pytest.raises(UsageError, match="optimizer state is for Adam"):
        st.check_shard(shard, sync, "s.h5")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_state_round_trips_with_its_rng(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = net().cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sync = PSOSync(model, opt, MPI.COMM_SELF, sync_every=3)
    x, y = torch.randn(16, 6, device="cuda"), torch.randint(0, 3, (16,), device="cuda")
    for _ in range(4):
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        sync.after_step(loss)
    shard = st.capture(sync, st.LoopPosition(4, 0, 4, torch.zeros(3, dtype=torch.float64), 0.0))
    assert "rng/torch_cuda" in shard.arrays
    sha, size = store.write_shard(tmp_path / "s.h5", shard, step=4)
    back = store.read_shard(tmp_path / "s.h5", sha, size)
    expected = sync.flat.data.clone()
    sync.flat.data.zero_()
    st.check_shard(back, sync, "s.h5")
    st.restore_model(sync, back)
    st.restore_rng(sync, back)
    assert torch.equal(sync.flat.data, expected) and sync.flat.data.is_cuda


def test_ranks_resuming_different_checkpoints_is_one_clear_error() -> None:
    from psops_mpi.checkpoint.resume import _same_choice

    _same_choice(["d/step-00000008"] * 3)
    _same_choice([None, None])
    with pytest.raises(UsageError, match=r"rank 0: d/step-00000008, rank 2: d/step-00000004"):
        _same_choice(["d/step-00000008", "d/step-00000008", "d/step-00000004"])
    with pytest.raises(UsageError, match="rank 1: none"):
        _same_choice(["d/step-00000008", None])
