"""A user's datasets behind the DataLoader (no MPI): equal shards, the in-memory path's order,
exact resume with workers, iterable sets, and one line for every kind of bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from psops_mpi.data import ShardedBatches, open_source
from psops_mpi.data.formats import Dataset
from psops_mpi.data.loader import (
    EpochShards,
    LoaderBatches,
    agreed_steps,
    part_of,
)
from psops_mpi.data.user import check_user_sets, make_user_sets
from psops_mpi.errors import UsageError
from tests.helpers import user_data

CPU = torch.device("cpu")
SPEC = "tests.helpers.user_data:"


def source(name: str, rank: int = 0, world_size: int = 1, workers: int = 0,
           batch_size: int = 32, data_dir: str | None = None) -> LoaderBatches:
    made = open_source(SPEC + name, data_dir, rank=rank, world_size=world_size,
                       batch_size=batch_size, seed=3, device=CPU, workers=workers)
    assert isinstance(made, LoaderBatches)
    return made


def epoch_batches(src: LoaderBatches, epoch: int, start: int = 0) -> list[tuple]:
    return [(x.clone(), y.clone()) for x, y in src.epoch(epoch, start)]


def test_shards_are_disjoint_equal_and_cover_the_shuffle() -> None:
    shards = [EpochShards(1000, r, 3, 32, seed=5) for r in range(3)]
    for s in shards:
        s.set(epoch=2, start_step=0)
    seen = [[i for batch in s for _, i in batch] for s in shards]
    assert all(len(s) == 10 * 32 for s in seen)  # 333 per rank, 10 full batches
    assert len(set().union(*map(set, seen))) == sum(map(len, seen))
    shards[0].set(epoch=2, start_step=4)
    assert [i for batch in shards[0] for _, i in batch] == seen[0][4 * 32:]


def test_the_loader_path_reads_the_in_memory_path_batches() -> None:
    """A tensor set through the DataLoader: the same shuffle and shards, batch for batch."""
    train, test = user_data.blobs()
    train.augment = False
    mem = ShardedBatches(Dataset("blobs", train.x, train.y, test.x, test.y, 10, False),
                         rank=1, world_size=2, batch_size=32, seed=3)
    src = source("blobs", rank=1, world_size=2)
    src.train.augment = False
    assert src.batches_per_epoch == mem.batches_per_epoch == 16
    for (x, y), (mx, my) in zip(epoch_batches(src, 1), mem.epoch(1), strict=True):
        assert torch.equal(x, mx) and torch.equal(y, my)
    test_x = torch.cat([x for x, _ in src.test_batches()])
    assert torch.equal(test_x, test.x[part_of(256, 1, 2).start:part_of(256, 1, 2).stop])


def test_workers_and_a_resume_mid_epoch_read_exactly_the_same_augmented_batches() -> None:
    """Each sample's noise is drawn from the generators seeded per (seed, epoch, index): two
    workers, none, or a resume at step 5 read the same bytes."""
    whole = epoch_batches(source("blobs", workers=0), 2)
    with_workers = source("blobs", workers=2)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, epoch_batches(with_workers, 2),
                                                        strict=True))
    tail = epoch_batches(with_workers, 2, start=5)
    assert len(tail) == len(whole) - 5
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[5:], tail, strict=True))
    assert not torch.equal(whole[0][0], epoch_batches(source("blobs"), 3)[0][0])
    with_workers.close()


def test_the_main_process_generators_are_left_as_they_were() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    list(source("blobs").epoch(0))
    assert torch.equal(torch.rand(3), expected)


def test_an_iterable_set_agrees_on_the_smallest_shard_and_counts_what_it_drops() -> None:
    assert agreed_steps([900, 937, 974], 32) == (28, 900 + 937 + 974 - 3 * 28 * 32)
    ranks = [source("stream", rank=r, world_size=3, workers=2) for r in range(3)]
    lengths = [r.shard_info() for r in ranks]
    assert lengths == [300, 337, 374]
    for r in ranks:
        r.agree_shards(lengths)
    assert {r.batches_per_epoch for r in ranks} == {300 // 32} == {9}
    assert "are dropped each epoch" in ranks[0].describe()
    whole = epoch_batches(ranks[1], 0)
    assert len(whole) == 9
    alone = source("stream", rank=1, world_size=3, workers=0)  # no worker: the same batches
    alone.agree_shards(lengths)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole, epoch_batches(alone, 0),
                                                        strict=True))
    tail = epoch_batches(ranks[1], 0, start=3)  # a resume skips what was read
    assert all(torch.equal(a[0], b[0]) for a, b in zip(whole[3:], tail, strict=True))
    with pytest.raises(UsageError, match="not one full batch"):
        ranks[0].agree_shards([300, 10, 300])


def test_an_iterable_set_that_ends_early_is_one_line() -> None:
    src = source("stream", rank=0, world_size=2)
    src.agree_shards([src.shard_info(), src.shard_info()])
    src.batches_per_epoch += 1  # as if its len() promised more than it yields
    with pytest.raises(UsageError, match="ended after 14 batches in epoch 1 on rank 0"):
        list(src.epoch(0))


def test_the_holdout_batch_is_the_same_on_every_rank() -> None:
    a = source("blobs", rank=0, world_size=2).holdout(64, seed=1)
    b = source("blobs", rank=1, world_size=2).holdout(64, seed=1)
    assert torch.equal(a[0], b[0]) and len(a[1]) == 64
    with pytest.raises(UsageError, match="--fitness train"):
        source("stream").holdout(64, seed=1)


def test_a_dataset_that_reads_batches_is_asked_for_batches(tmp_path: Path) -> None:
    """examples/own_data.py's set reads a batch at once (__getitems__): the same samples as
    reading them one by one."""
    from examples.own_data import NpyShards

    images = np.arange(50 * 4, dtype=np.uint8).reshape(50, 2, 2)
    for k in range(2):
        np.save(tmp_path / f"train-images-{k:05d}.npy", images[k * 25:(k + 1) * 25])
        np.save(tmp_path / f"train-labels-{k:05d}.npy", np.arange(25) % 10)
    shards = NpyShards(tmp_path, "train")
    asked = [49, 3, 26, 25, 0, 24]
    for (x, y), i in zip(shards.__getitems__(asked), asked, strict=True):
        one = NpyShards(tmp_path, "train")[i]
        assert torch.equal(x, one[0]) and y == one[1] == i % 25 % 10


@pytest.mark.parametrize(("name", "message"), [
    ("missing", "module 'tests.helpers.user_data' has no attribute 'missing'"),
    ("raises", "the factory raised FileNotFoundError: no such folder: None"),
    ("not_a_pair", "returned list, not a (train, test) pair of torch datasets"),
    ("lists", "the training set is a list, not a torch.utils.data.Dataset"),
    ("no_classes", "must say how many classes there are: give it num_classes or classes"),
    ("no_length", "has no len(); give it __len__ (this rank's samples per epoch"),
])
def test_a_wrong_factory_is_one_line(name: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        make_user_sets(SPEC + name, None, 0, 1)
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(("name", "message"), [
    ("tiny", "has 40 training samples, fewer than one batch for every rank (2 ranks x "
             "--batch-size 32)"),
    ("label_outside_listed", "sample 300 of 'tests.helpers.user_data:label_outside_listed' "
                             "(training set) has label 12, outside the 10 classes (0..9)"),
])
def test_what_can_be_seen_before_training_is_one_line(name: str, message: str) -> None:
    sets = make_user_sets(SPEC + name, None, 0, 2)
    with pytest.raises(UsageError) as caught:
        check_user_sets(sets, 0, 2, 32, seed=0)
    assert message in str(caught.value)


@pytest.mark.parametrize(("name", "message"), [
    ("label_outside_unlisted", "sample 7 of tests.helpers.user_data:label_outside_unlisted "
                               "has label -1, outside the 10 classes"),
    ("shapes_differ", "samples"),
])
@pytest.mark.parametrize("workers", [0, 2])
def test_a_bad_sample_found_while_reading_is_one_line(name: str, message: str,
                                                      workers: int) -> None:
    sets = make_user_sets(SPEC + name, None, 0, 1)
    src = LoaderBatches(sets.train, sets.test, name=sets.name, task=sets.task,
                        num_classes=10, input_shape=sets.input_shape, rank=0, world_size=1,
                        batch_size=32, seed=0, device=CPU, workers=workers)
    with pytest.raises(UsageError) as caught:
        list(src.epoch(0))
    assert message in str(caught.value) and "\n" not in str(caught.value)
    if name == "shapes_differ":
        assert "differ in shape (inputs (32,) and (33,)" in str(caught.value)


def test_the_first_batch_is_read_before_training() -> None:
    """A shape that differs in this rank's first batch is found by check_user_sets."""
    sets = make_user_sets(SPEC + "shapes_differ", None, 0, 1)
    with pytest.raises(UsageError, match="differ in shape"):
        check_user_sets(sets, 0, 1, 512, seed=0)  # one batch: every sample
