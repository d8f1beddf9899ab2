"""Checkpoint files and state without launching jobs: shards round-trip exactly, damaged files
are refused with one clear error, checkpoints are found by progress, resizes are planned."""

from __future__ import annotations

import functools
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
from psops_mpi.checkpoint import store
from psops_mpi.checkpoint.parts import (
    ModelPart,
    OptimizerPart,
    RNGPart,
    check_state,
    flatten,
    unflatten,
)
from psops_mpi.checkpoint.resume import same_choice
from psops_mpi.loop import LoopState
from tests.helpers.shards import flip_in_dataset


def plan_sources(fits: list[float], new_size: int, pso: bool) -> list[int | None]:
    """The resize plan of a PSO-PS or a PA synchroniser for old ranks of these fitnesses."""
    sync = trained_sync(PSOSync if pso else PASync, seed=0, steps=0)
    summaries = [{"pbest_fitness": None if math.isinf(f) else f} for f in fits]
    return sync.plan_resize(summaries, {"gbest_owner": 1}, new_size).sources


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
        (folder / store.METADATA).write_text(json.dumps({"progress": epoch + in_epoch / per_epoch}))
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
        tensors += [sync.anchor.clone()] if sync.anchor is not None else []
    return tensors


def parts_of(sync, loop: LoopState) -> dict:
    """The stateful parts a training run checkpoints, around ``sync``."""
    return {"model": ModelPart(sync.model, sync.flat, sync.buffers),
            "optimizer": OptimizerPart(sync.optimizer), "sync": sync, "loop": loop,
            "rng": RNGPart(sync.flat.data.device)}


def capture(parts: dict) -> store.Shard:
    shard = store.Shard(scalars={"rank": 0})
    for name, part in parts.items():
        flatten(name, part.state_dict(), shard)
    return shard


def loop_at(step: int, sums: list[float] | None = None) -> LoopState:
    loop = LoopState(62, torch.device("cpu"))
    loop.step = loop.step_in_epoch = step
    loop.epoch_sums.copy_(torch.tensor(sums or [0.0, 0.0, 0.0], dtype=torch.float64))
    return loop


ELASTIC = functools.partial(PSOSync, pso_preset="elastic", rule="centre", c2=0.0, rho=0.5)


@pytest.mark.parametrize("kind", [PSOSync, PASync, ELASTIC])
def test_state_restores_exactly_and_training_continues_identically(tmp_path: Path,
                                                                   kind: type) -> None:
    original = trained_sync(kind, seed=0, steps=7)  # 7: mid-period, momentum and swarm set
    saved = parts_of(original, loop_at(7, [1.0, 2.0, 3.0]))
    sha, size = store.write_shard(tmp_path / "s.h5", capture(saved), step=7)
    shard = store.read_shard(tmp_path / "s.h5", sha, size)

    restored = trained_sync(kind, seed=1, steps=2)  # other weights, momentum, counters
    parts = parts_of(restored, loop_at(2))
    for name, part in parts.items():
        check_state(name, part, unflatten(name, shard), "s.h5")
    for name, part in parts.items():
        part.load_state_dict(unflatten(name, shard))
    def scalars(parts: dict) -> dict:  # but the training time, which runs on
        return {k: v for k, v in capture(parts).scalars.items() if k != "loop/elapsed_s"}

    assert scalars(parts) == scalars(saved)
    assert torch.equal(parts["loop"].epoch_sums, saved["loop"].epoch_sums)
    run_steps(original, 8, first=7)
    run_steps(restored, 8, first=7)
    for a, b in zip(state_of(original), state_of(restored), strict=True):
        assert torch.equal(a, b)


def test_check_shard_refuses_another_optimizer(tmp_path: Path) -> None:
    sync = trained_sync(PSOSync, seed=0, steps=3)
    shard = capture(parts_of(sync, loop_at(3)))
    shard.scalars["optimizer/class"] = "Adam"
    with pytest.raises(UsageError, match="optimizer state is for Adam"):
        check_state("optimizer", OptimizerPart(sync.optimizer), unflatten("optimizer", shard),
                    "s.h5")


def test_check_shard_refuses_another_model(tmp_path: Path) -> None:
    sync = trained_sync(PSOSync, seed=0, steps=3)
    shard = capture(parts_of(sync, loop_at(3)))
    shard.arrays["sync/swarm/velocity"] = shard.arrays["sync/swarm/velocity"][:-1]
    with pytest.raises(UsageError, match="'sync/swarm/velocity' is"):
        check_state("sync", sync, unflatten("sync", shard), "s.h5")


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
    parts = parts_of(sync, loop_at(4))
    shard = capture(parts)
    assert "rng/torch_cuda" in shard.arrays
    sha, size = store.write_shard(tmp_path / "s.h5", shard, step=4)
    back = store.read_shard(tmp_path / "s.h5", sha, size)
    expected = sync.flat.data.clone()
    sync.flat.data.zero_()
    for name in ("model", "rng"):
        check_state(name, parts[name], unflatten(name, back), "s.h5")
        parts[name].load_state_dict(unflatten(name, back))
    assert torch.equal(sync.flat.data, expected) and sync.flat.data.is_cuda


def test_ranks_resuming_different_checkpoints_is_one_clear_error() -> None:
    same_choice(["d/step-00000008"] * 3)
    same_choice([None, None])
    with pytest.raises(UsageError, match=r"rank 0: d/step-00000008, rank 2: d/step-00000004"):
        same_choice(["d/step-00000008", "d/step-00000008", "d/step-00000004"])
    with pytest.raises(UsageError, match="rank 1: none"):
        same_choice(["d/step-00000008", None])


def test_a_checkpoint_of_the_first_format_gets_one_line_saying_what_to_do(
        tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path, 8, 0, 8, 62)
    (folder / store.METADATA).write_text(json.dumps({"format": store.FORMAT, "version": 1}))
    with pytest.raises(UsageError, match=r"format version 1.*--resume none") as info:
        store.read_metadata(folder)
    assert "\n" not in str(info.value)
