"""Data: dataset files (:mod:`~psops_mpi.data.formats`) and on-device batching, sharding and
augmentation (:mod:`~psops_mpi.data.batches`)."""

from psops_mpi.data.batches import (
    ShardedBatches,
    eval_shard,
    holdout_batch,
)
from psops_mpi.data.formats import DEFAULT_DATA_DIRS, Dataset, load_dataset

__all__ = ["DEFAULT_DATA_DIRS", "Dataset", "ShardedBatches", "eval_shard",
           "holdout_batch", "load_dataset"]
