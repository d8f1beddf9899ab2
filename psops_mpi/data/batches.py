"""Mini-batches of the built-in sets, already on the rank's device (the fast path of
:class:`~psops_mpi.data.source.BatchSource`): the per-rank shards every algorithm trains on,
CIFAR augmentation, the holdout batch and each rank's part of the test set."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from psops_mpi.data.formats import Dataset
from psops_mpi.data.source import Batch, BatchSource, check_start_step
from psops_mpi.errors import UsageError

_PAD = 4  # CIFAR augmentation: zero padding on each side before the random crop
EVAL_BATCH = 1024  # test samples per forward pass


def derive_seed(tag: str, *nums: int) -> int:
    """A 63-bit seed that depends on every part, so distinct streams never share a seed."""
    text = ",".join([tag, *(str(int(n)) for n in nums)])
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big") >> 1


def _generator(seed: int) -> torch.Generator:
    # A CPU generator for what every rank must draw alike whatever its device (the shuffle,
    # the holdout batch); a CUDA generator's numbers differ from a CPU one's.
    return torch.Generator().manual_seed(seed)


def _crop_flip(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor,
               flip: torch.Tensor) -> torch.Tensor:
    """Crop HxW at per-sample offsets from the zero-padded batch, mirrored where ``flip``."""
    b, c, h, w = x.shape
    padded = F.pad(x, (_PAD, _PAD, _PAD, _PAD))
    cols = torch.arange(w, device=x.device)
    rows = top[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = left[:, None] + torch.where(flip[:, None], cols.flip(0), cols)  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * _PAD))
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def holdout_batch(dataset: Dataset, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``min(size, N)`` training samples chosen from ``seed`` alone: the same on every rank."""
    if size < 1:
        raise UsageError(f"the holdout batch size must be positive, got {size}")
    n = dataset.x_train.shape[0]
    idx = torch.randperm(n, generator=_generator(derive_seed("holdout", seed)))[:size]
    idx = idx.to(dataset.x_train.device)
    return dataset.x_train.index_select(0, idx), dataset.y_train.index_select(0, idx)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")


def eval_shard(dataset: Dataset, rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous part of the test set; the parts cover it exactly once."""
    _check_rank(rank, world_size)
    base, extra = divmod(dataset.x_test.shape[0], world_size)
    start = rank * base + min(rank, extra)
    stop = start + base + (rank < extra)
    return dataset.x_test[start:stop], dataset.y_test[start:stop]


def shard_permutation(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The epoch's shuffle of ``n`` training indices, the same on every rank (on the CPU)."""
    return torch.randperm(n, generator=_generator(derive_seed("shuffle", seed, epoch)))


class ShardedBatches(BatchSource):
    """Per-rank mini-batches: each epoch one shared shuffle, cut into disjoint equal shards.

    Args:
        dataset: from :func:`psops_mpi.data.load_dataset`, on this rank's device.
        rank, world_size: this rank and the number of ranks that train together.
        batch_size: samples per batch on this rank.
        seed: the data order's seed (the same on every rank).

    Every rank gets ``batches_per_epoch`` batches per epoch, the same number everywhere (rounds
    are collectives); ``epoch(e)`` yields them as (inputs, labels) on the dataset's device.
    """

    def __init__(self, dataset: Dataset, rank: int, world_size: int, batch_size: int,
                 seed: int) -> None:
        _check_rank(rank, world_size)
        n = dataset.x_train.shape[0]
        if world_size > n:
            raise UsageError(f"more ranks ({world_size}) than training samples ({n}) in "
                             f"{dataset.name}; use fewer ranks")
        self.shard_len = n // world_size  # the remainder is dropped: equal shards everywhere
        if batch_size < 1:
            raise UsageError(f"--batch-size must be a positive integer, got {batch_size}")
        if batch_size > self.shard_len:
            raise UsageError(f"--batch-size {batch_size} is larger than each rank's shard of "
                             f"{self.shard_len} samples; use a smaller batch or fewer ranks")
        self.dataset, self.rank, self.world_size = dataset, rank, world_size
        self.batch_size, self.seed = batch_size, seed
        self.name, self.input_shape = dataset.name, dataset.input_shape
        self.num_classes, self.task = dataset.num_classes, dataset.task
        # Ranks run collectives in lock step, so every rank must run this many steps.
        self.batches_per_epoch = self.shard_len // batch_size

    @property
    def num_train(self) -> int:
        return self.dataset.x_train.shape[0]

    def shard_indices(self, epoch: int) -> torch.Tensor:
        """This rank's training-set indices for ``epoch``, on the data's device."""
        perm = shard_permutation(self.num_train, self.seed, epoch)
        start = self.rank * self.shard_len
        return perm[start:start + self.shard_len].to(self.dataset.x_train.device)

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """Yield (x, y) batches of ``epoch`` from ``start_step`` on (to resume mid-epoch)."""
        check_start_step(start_step, self.batches_per_epoch)
        return self._batches(epoch, start_step)

    def test_batches(self, whole: bool = False) -> Iterator[Batch]:
        x, y = eval_shard(self.dataset, 0 if whole else self.rank, 1 if whole else self.world_size)
        for start in range(0, len(x), EVAL_BATCH):
            yield x[start:start + EVAL_BATCH], y[start:start + EVAL_BATCH]

    def holdout(self, size: int, seed: int) -> Batch:
        return holdout_batch(self.dataset, size, seed)

    def augment_draws(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's crop offsets (steps, 2, B) and flips (steps, B) for every batch of
        ``epoch``, drawn at once on the data's device from one generator of (seed, rank,
        epoch).

        One draw per epoch instead of one per step: no host sync and no host-to-device copy
        per batch on a GPU, and batch ``step`` takes row ``step`` whatever step the epoch
        starts at, so a run resumed mid-epoch augments exactly as one never stopped, with no
        generator state to save. The numbers depend on the device type (CPU and CUDA
        generators differ), not on which GPU.
        """
        device = self.dataset.x_train.device
        generator = torch.Generator(device=device)
        generator.manual_seed(derive_seed("augment", self.seed, self.rank, epoch))
        shape = (self.batches_per_epoch, self.batch_size)
        offsets = torch.randint(0, 2 * _PAD + 1, (shape[0], 2, shape[1]), generator=generator,
                                device=device)
        flips = torch.rand(shape, generator=generator, device=device) < 0.5
        return offsets, flips

    def _batches(self, epoch: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds, bs = self.dataset, self.batch_size
        idx = self.shard_indices(epoch)
        if ds.augment and ds.x_train.dim() != 4:
            raise UsageError(f"augmentation expects (N, C, H, W) images, got shape "
                             f"{tuple(ds.x_train.shape)}")
        offsets, flips = self.augment_draws(epoch) if ds.augment else (None, None)
        for step in range(start_step, self.batches_per_epoch):
            batch = idx[step * bs:(step + 1) * bs]
            x = ds.x_train.index_select(0, batch)
            if offsets is not None and flips is not None:
                x = _crop_flip(x, offsets[step, 0], offsets[step, 1], flips[step])
            yield x, ds.y_train.index_select(0, batch)
