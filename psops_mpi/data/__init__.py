"""Data: the batch source the loop reads (:mod:`~psops_mpi.data.source`), with the built-in
sets on the device (:mod:`~psops_mpi.data.formats`, :mod:`~psops_mpi.data.batches`) and a
user's torch datasets behind a DataLoader (:mod:`~psops_mpi.data.user`,
:mod:`~psops_mpi.data.loader`, :mod:`~psops_mpi.data.folder`)."""

from __future__ import annotations

import torch

from psops_mpi.data.batches import (
    ShardedBatches,
    eval_shard,
    holdout_batch,
)
from psops_mpi.data.formats import BUILT_IN_SETS, DEFAULT_DATA_DIRS, Dataset, load_dataset
from psops_mpi.data.loader import LoaderBatches
from psops_mpi.data.source import Batch, BatchSource
from psops_mpi.data.user import check_user_sets, make_user_sets

__all__ = ["BUILT_IN_SETS", "DEFAULT_DATA_DIRS", "Batch", "BatchSource", "Dataset", "LoaderBatches",
           "ShardedBatches", "eval_shard", "holdout_batch", "load_dataset", "open_source"]

def open_source(name: str, data_dir: str | None, *, rank: int, world_size: int,
                batch_size: int, seed: int, device: torch.device, workers: int = 0,
                image_size: int = 0) -> BatchSource:
    """The batch source of ``--dataset name``: a built-in set on the device, or a user's
    (``imagefolder``, ``package.module:function``) behind a DataLoader, checked before
    training (UsageError; no collectives: an iterable set's steps are agreed afterwards with
    :meth:`BatchSource.agree_shards`)."""
    if name in BUILT_IN_SETS:
        return ShardedBatches(load_dataset(name, data_dir, device), rank, world_size,
                              batch_size, seed)
    sets = make_user_sets(name, data_dir, rank, world_size, image_size)
    check_user_sets(sets, rank, world_size, batch_size, seed)
    return LoaderBatches(sets.train, sets.test, name=sets.name, task=sets.task,
                         num_classes=sets.num_classes, input_shape=sets.input_shape,
                         rank=rank, world_size=world_size, batch_size=batch_size, seed=seed,
                         device=device, workers=workers)
