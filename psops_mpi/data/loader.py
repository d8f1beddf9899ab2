"""A user's torch dataset behind a ``DataLoader``: sharded with equal steps, resumable
exactly, checked as it is read.

Map-style sets (``__getitem__`` and ``__len__``) are cut as the built-in sets are: every epoch
one shuffle shared by every rank, cut into disjoint equal shards (the remainder dropped, as
``DistributedSampler(drop_last=True)`` does), so every rank runs the same number of steps.
Each sample is read with the random generators (torch, numpy, ``random``) seeded from (seed,
epoch, index), so its augmentation does not depend on which worker reads it or when: a run
resumed mid-epoch, with workers, reads exactly what the interrupted one would have. A set
that reads a batch at once (``__getitems__``, as ``Subset`` has) is seeded once per batch,
from its first sample's key: its draws then depend on the batch size and the world size
too.

An iterable set shards itself (its factory is told the rank and the world size) and tells
its length; the ranks agree on the smallest number of full batches, and what the others
hold beyond it is dropped and said. The DataLoader's workers take every W-th batch each,
so the batches do not depend on the worker count.

Samples are ``(input, target)`` pairs of tensors, numpy arrays or numbers; floating inputs
become float32. A batch whose samples differ in shape, or whose labels lie outside the
classes, stops the job with one line naming the samples.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import random
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info

from psops_mpi.data.batches import derive_seed, shard_permutation
from psops_mpi.data.source import Batch, BatchSource, check_start_step
from psops_mpi.errors import UsageError

Key = tuple[int, int]  # (epoch, index): an index with what seeds its sample's randomness
# The start of torch's messages for a worker that died ("... (pid 12) is killed by signal").
TORCH_WORKER_DIED = re.compile(r"DataLoader worker \(pids? ")
TEST_EPOCH = -1  # the epoch part of a test sample's key
HOLDOUT_EPOCH = -2
CHECK_EPOCH = -3  # the batch read before training, to check it


def seed_generators(seed: int) -> None:
    """Seed the generators a dataset's transforms draw from: torch's CPU generator (not the
    CUDA ones: ``torch.manual_seed`` would reseed those too), numpy's and Python's."""
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


@contextlib.contextmanager
def kept_generators() -> Iterator[None]:
    """Restore the generators that :func:`seed_generators` reseeds (the main process's own
    streams: dropout, the model's initialisation)."""
    state = torch.get_rng_state(), np.random.get_state(), random.getstate()
    try:
        yield
    finally:
        torch.set_rng_state(state[0])
        np.random.set_state(state[1])
        random.setstate(state[2])


def as_pair(sample: object, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A sample as (input, target) tensors; floating inputs as float32."""
    if not isinstance(sample, (tuple, list)) or len(sample) != 2:
        raise UsageError(f"{where} is a {type(sample).__name__}, not an (input, target) pair")
    x, y = sample
    try:
        x, y = torch.as_tensor(x), torch.as_tensor(y)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise UsageError(f"{where}: input and target must be tensors, numpy arrays or numbers "
                         f"({' '.join(str(exc).split())}); convert images with a transform"
                         ) from None
    return (x.float() if x.is_floating_point() else x), y


class KeyedSamples(Dataset):
    """Map-style wrapper: key (epoch, i) -> (input, target, i), read with the generators
    seeded from (seed, epoch, i)."""

    def __init__(self, dataset: Dataset, seed: int, name: str) -> None:
        self.dataset, self.seed, self.name = dataset, seed, name

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: Key) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: Sequence[Key]) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """A batch of samples (the DataLoader asks for a batch at once). A dataset that reads
        a batch at once (its own ``__getitems__``) is asked so, with the generators seeded
        from the batch's first key; any other is read sample by sample. In the training
        process, its generators are put back once per batch."""
        with kept_generators() if get_worker_info() is None else contextlib.nullcontext():
            if not hasattr(self.dataset, "__getitems__"):
                return [self._read(epoch, index) for epoch, index in keys]
            seed_generators(derive_seed("batch", self.seed, *keys[0]))
            indices = [index for _, index in keys]
            samples = self.dataset.__getitems__(indices)  # type: ignore[attr-defined]
            return [(*as_pair(sample, f"sample {i} of {self.name}"), i)
                    for sample, i in zip(samples, indices, strict=True)]

    def _read(self, epoch: int, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        seed_generators(derive_seed("sample", self.seed, epoch, index))
        x, y = as_pair(self.dataset[index], f"sample {index} of {self.name}")
        return x, y, index


class WorkerSplit(IterableDataset):
    """An iterable set's samples, numbered, in batches: batch b goes whole to DataLoader
    worker b mod W, so the batches and their order are the same for any worker count. Each
    sample is drawn with the generators seeded from (seed, its number), so what it draws does
    not depend on the workers either; the dataset's own ``iter()`` is seeded too."""

    def __init__(self, dataset: Iterable, name: str, seed: int, batch_size: int,
                 drop_last: bool) -> None:
        self.dataset, self.name, self.seed = dataset, name, seed
        self.batch_size, self.drop_last = batch_size, drop_last

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        with kept_generators() if info is None else contextlib.nullcontext():
            seed_generators(derive_seed("iter", self.seed))
            samples = iter(self.dataset)
        batch: list[tuple[torch.Tensor, torch.Tensor, int]] = []
        for index in itertools.count():
            with kept_generators() if info is None else contextlib.nullcontext():
                seed_generators(derive_seed("sample", self.seed, index))
                sample = next(samples, None)
            if sample is None:
                break
            if (index // self.batch_size) % workers == worker:
                batch.append((*as_pair(sample, f"sample {index} of {self.name}"), index))
                if len(batch) == self.batch_size:
                    yield from batch
                    batch = []
        if batch and not self.drop_last:
            yield from batch


def collate(samples: Sequence[tuple[torch.Tensor, torch.Tensor, int]], name: str, task: str,
            num_classes: int) -> Batch:
    """Stack (input, target, index) samples into a batch, checking shapes and labels."""
    xs, ys, indices = zip(*samples, strict=True)
    for x, y, i in zip(xs, ys, indices, strict=True):
        if x.shape != xs[0].shape or y.shape != ys[0].shape:
            raise UsageError(f"samples {indices[0]} and {i} of {name} differ in shape "
                             f"(inputs {tuple(xs[0].shape)} and {tuple(x.shape)}, targets "
                             f"{tuple(ys[0].shape)} and {tuple(y.shape)}): every sample must "
                             "have the same shape")
    x, y = stack(xs), stack(ys)
    check_targets(y, indices, name, task, num_classes)
    return x, y


def stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``; in a DataLoader worker straight into shared memory, as PyTorch's own
    collate does: the batch then crosses to the training process with no copy of its own
    and no private buffer the size of a batch per step (a worker under a memory limit ran
    out of it)."""
    if get_worker_info() is None:
        return torch.stack(tensors)
    first = tensors[0]
    storage = first._typed_storage()._new_shared(len(tensors) * first.numel(),
                                                 device=first.device)
    out = first.new(storage).resize_(len(tensors), *first.shape)
    return torch.stack(tensors, out=out)


def check_targets(y: torch.Tensor, indices: Sequence[int], name: str, task: str,
                  num_classes: int) -> None:
    """Targets that are class indices in ``0..num_classes-1`` (one per sample for a
    classifier, one per input token for a language model)."""
    if y.is_floating_point() or y.dtype == torch.bool:
        raise UsageError(f"sample {indices[0]} of {name}: the target is {y.dtype}, expected an "
                         "integer class index")
    if task == "classification" and y.dim() != 1:
        raise UsageError(f"sample {indices[0]} of {name}: the target has shape "
                         f"{tuple(y.shape[1:])}, expected one class index")
    flat = y.reshape(len(y), -1)
    bad = (flat < 0) | (flat >= num_classes)
    if bool(bad.any()):
        k = int(bad.any(1).nonzero()[0, 0])
        raise UsageError(f"sample {indices[k]} of {name} has label {int(flat[k][bad[k]][0])}, "
                         f"outside the {num_classes} classes (0..{num_classes - 1})")


class EpochShards(Sampler[list[Key]]):
    """Batch sampler: this rank's shard of the epoch's shuffle, in batches, from a step on.

    Set the epoch and the first step with :meth:`set` before each ``iter()``: the sampler is
    iterated in the main process, also when the loader's workers persist across epochs.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, batch_size: int,
                 seed: int) -> None:
        self.num_samples, self.rank, self.batch_size, self.seed = (
            num_samples, rank, batch_size, seed)
        self.shard_len = num_samples // world_size
        self.steps = self.shard_len // batch_size
        self.epoch = self.start_step = 0

    def set(self, epoch: int, start_step: int) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return self.steps - self.start_step

    def __iter__(self) -> Iterator[list[Key]]:
        perm = shard_permutation(self.num_samples, self.seed, self.epoch)
        shard = perm[self.rank * self.shard_len:(self.rank + 1) * self.shard_len].tolist()
        bs = self.batch_size
        for step in range(self.start_step, self.steps):
            yield [(self.epoch, i) for i in shard[step * bs:(step + 1) * bs]]


def chunks(indices: range, size: int, epoch: int) -> list[list[Key]]:
    """Consecutive batches of keys over ``indices`` (the last one may be short)."""
    return [[(epoch, i) for i in indices[k:k + size]] for k in range(0, len(indices), size)]


def part_of(n: int, rank: int, world_size: int) -> range:
    """This rank's contiguous part of ``n`` test samples; the parts cover them exactly once."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class LoaderBatches(BatchSource):
    """A training and a test set (torch datasets) behind DataLoaders; see the module
    docstring.

    Args:
        train, test: map-style ``Dataset`` or ``IterableDataset`` (an iterable one holds this
            rank's shard already).
        name, task, num_classes, input_shape: what the sets are (checked by the caller).
        rank, world_size, batch_size, seed: as for the built-in sets.
        device: where batches go (pinned host memory and copies that do not block on CUDA).
        workers: DataLoader worker processes (0: read in the training process).

    An iterable set's ``batches_per_epoch`` is settled by :meth:`agree_shards` from every
    rank's length.
    """

    def __init__(self, train: Dataset, test: Dataset, *, name: str, task: str,
                 num_classes: int, input_shape: tuple[int, ...], rank: int, world_size: int,
                 batch_size: int, seed: int, device: torch.device, workers: int) -> None:
        self.train, self.test, self.name, self.task = train, test, name, task
        self.num_classes, self.input_shape = num_classes, tuple(input_shape)
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size
        self.seed, self.device, self.workers = seed, torch.device(device), workers
        self.iterable = isinstance(train, IterableDataset)
        self.dropped = 0
        self._reading: tuple[int, int, object] | None = None  # the last batch asked for
        self._collate = functools.partial(collate, name=name, task=task, num_classes=num_classes)
        if self.iterable:
            self.batches_per_epoch, self._num_train = 0, len(train)  # type: ignore[arg-type]
            self._shards: EpochShards | None = None
            self._train_loader: DataLoader | None = None
        else:
            self._num_train = len(train)  # type: ignore[arg-type]
            self._shards = EpochShards(self._num_train, rank, world_size, batch_size, seed)
            self.batches_per_epoch = self._shards.steps
            self._train_loader = self._loader(KeyedSamples(train, seed, name),
                                              batch_sampler=self._shards, persistent=True)

    @property
    def num_train(self) -> int:
        return self._num_train

    def _loader(self, dataset: Dataset, persistent: bool = False, **kwargs: Any) -> DataLoader:
        # A generator of its own: a DataLoader draws its workers' base seed at every iter(),
        # from the global generator (the training process's stream) unless given one.
        generator = torch.Generator().manual_seed(derive_seed("loader", self.seed, self.rank))
        return DataLoader(dataset, num_workers=self.workers, collate_fn=self._collate,
                          pin_memory=self.device.type == "cuda", generator=generator,
                          persistent_workers=persistent and self.workers > 0,
                          prefetch_factor=4 if self.workers else None, **kwargs)

    @property
    def whole_test(self) -> bool:
        return not isinstance(self.test, IterableDataset)

    def shard_info(self) -> int | None:
        return self._num_train if self.iterable else None

    def agree_shards(self, infos: list[int | None]) -> None:
        if not self.iterable:
            return
        lengths = [int(n or 0) for n in infos]
        self.batches_per_epoch, self.dropped = agreed_steps(lengths, self.batch_size)
        self._num_train = sum(lengths)
        if self.batches_per_epoch < 1:
            short = min(range(len(lengths)), key=lengths.__getitem__)
            raise UsageError(f"{self.name}: rank {short}'s part of the training set holds "
                             f"{lengths[short]} samples, not one full batch of "
                             f"{self.batch_size}; use a smaller batch or fewer ranks")

    def describe(self) -> str:
        kind = "an iterable set" if self.iterable else "a map-style set"
        workers = f"{self.workers} worker(s) per rank" if self.workers else "no workers"
        dropped = (f"; {self.dropped} training samples beyond the agreed steps are dropped "
                   "each epoch" if self.dropped else "")
        return f"{self.name}: {kind} read by a DataLoader, {workers}{dropped}"

    # ---- training

    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        check_start_step(start_step, self.batches_per_epoch)
        return self._epoch(epoch, start_step)

    def _epoch(self, epoch: int, start_step: int) -> Iterator[Batch]:
        persistent = self._shards is not None and self._train_loader is not None
        if persistent:
            self._shards.set(epoch, start_step)  # type: ignore[union-attr]
            batches = iter(self._train_loader)  # type: ignore[arg-type]
        else:
            batches = self._iterable_epoch(epoch)
        try:
            for step in range(0 if persistent else start_step):  # a stream has no index
                self._next(batches, epoch, step)
            for step in range(start_step, self.batches_per_epoch):
                x, y = self._next(batches, epoch, step)  # type: ignore[misc]
                yield self._to_device(x), self._to_device(y)
        finally:
            if not persistent:  # an epoch's own loader: its workers end with it
                stop_workers(batches)

    def _iterable_epoch(self, epoch: int) -> Iterator[Batch]:
        seed = derive_seed("stream", self.seed, epoch, self.rank)
        loader = self._loader(WorkerSplit(self.train, self.name, seed, self.batch_size, True),
                              batch_size=self.batch_size, drop_last=True)
        return iter(loader)

    def _next(self, batches: Iterator[Batch], epoch: int, step: int,
              end_is_short: bool = True) -> Batch | None:
        """The next batch; at the end, None if ``end_is_short`` is False (a test set), else
        one line saying the set is shorter than its length promised. A failure becomes one
        line (:func:`loader_error`) and stops the loader's workers."""
        self._reading = (epoch, step, batches)
        try:
            batch = next(batches)
        except StopIteration:
            if not end_is_short:
                return None
            raise UsageError(f"{self.name} ended after {step} batches in epoch {epoch + 1} on "
                             f"rank {self.rank}, fewer than the {self.batches_per_epoch} its "
                             "length promised") from None
        except Exception as exc:
            error = loader_error(exc, self.rank, epoch, step, batches)
            stop_workers(batches)
            raise error from None
        self._reading = (epoch, step + 1, batches)  # what the workers are reading now
        return batch

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.device, non_blocking=True)

    # ---- evaluation and the holdout batch

    def test_batches(self, whole: bool = False) -> Iterator[Batch]:
        if isinstance(self.test, IterableDataset):
            if whole:
                raise UsageError(f"{self.name}: each rank reads its own part of an iterable "
                                 "test set; the whole of it is nowhere")
            loader = self._loader(WorkerSplit(self.test, self.name + " (test)", self.seed,
                                              self.batch_size, False),
                                  batch_size=self.batch_size)
        else:
            ranks = (0, 1) if whole else (self.rank, self.world_size)
            part = part_of(len(self.test), *ranks)  # type: ignore[arg-type]
            loader = self._loader(KeyedSamples(self.test, self.seed, self.name + " (test)"),
                                  batch_sampler=chunks(part, self.batch_size, TEST_EPOCH))
        batches = iter(loader)
        try:
            for step in itertools.count():
                batch = self._next(batches, TEST_EPOCH, step, end_is_short=False)
                if batch is None:
                    return
                yield self._to_device(batch[0]), self._to_device(batch[1])
        finally:
            stop_workers(batches)

    def holdout(self, size: int, seed: int) -> Batch:
        if size < 1:
            raise UsageError(f"the holdout batch size must be positive, got {size}")
        if self.iterable:
            raise UsageError(f"the holdout batch (--fitness holdout, --lr-spread) is the same "
                             f"on every rank; {self.name} is an iterable set that each rank "
                             "reads its own part of: use --fitness train and no --lr-spread")
        n = self._num_train
        generator = torch.Generator().manual_seed(derive_seed("holdout", seed))
        chosen = torch.randperm(n, generator=generator)[:size].tolist()
        keyed = KeyedSamples(self.train, self.seed, self.name)
        x, y = self._collate(keyed.__getitems__([(HOLDOUT_EPOCH, i) for i in chosen]))
        return x.to(self.device), y.to(self.device)

    def explain(self, exc: BaseException) -> BaseException:
        # torch's SIGCHLD handler raises wherever the training process is when a worker
        # dies, most often in the model, not in the read that would have said so.
        if self._reading is None or not TORCH_WORKER_DIED.search(str(exc)):
            return exc
        epoch, step, batches = self._reading
        error = loader_error(exc, self.rank, epoch, step, batches)
        error.__cause__ = exc
        return error

    def close(self) -> None:
        if self._train_loader is not None:
            stop_workers(getattr(self._train_loader, "_iterator", None))
            self._train_loader = None


def loader_error(exc: BaseException, rank: int, epoch: int, step: int,
                 batches: object = None) -> Exception:
    """A DataLoader's failure as one line. A check's UsageError, raised in the training
    process or in a worker (whose traceback the DataLoader folds into the message), comes
    back as one line of itself. A worker that died is said as such, whatever the loader
    raised on finding out (a message about the worker, a connection reset by it); anything
    else (the dataset raised) names the rank, the batch and the error."""
    text = str(exc)
    last = next((line for line in reversed(text.strip().splitlines()) if line.strip()), "")
    if isinstance(exc, UsageError):
        return UsageError(last.removeprefix("psops_mpi.errors.UsageError: "))
    where = "the test set" if epoch == TEST_EPOCH else f"epoch {epoch + 1}, batch {step + 1}"
    dead = dead_workers(batches)
    if dead:
        return RuntimeError(f"a DataLoader worker of rank {rank} died ({dead}) while reading "
                            f"{where}; the data cannot be read without it")
    detail = last if "Original Traceback" in text else " ".join(text.split())
    return RuntimeError(f"reading {where} on rank {rank} failed: {type(exc).__name__}: "
                        f"{detail}")


def stop_workers(batches: object) -> None:
    """End a loader iterator's worker processes now. Left to the garbage collector, an
    iterator abandoned mid-epoch (an error, the end of the run) can keep its caller waiting
    seconds per worker for them to exit."""
    shutdown = getattr(batches, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def dead_workers(batches: object) -> str:
    """'pid N, killed by SIGKILL', ... for the loader's workers that are gone ('' if none,
    or for a loader without workers)."""
    import signal

    gone = []
    for worker in getattr(batches, "_workers", ()):
        for _ in range(3):  # a worker that was just killed: let it be reaped
            try:
                worker.join(timeout=0.5)
                break
            except RuntimeError:  # torch's SIGCHLD handler, reporting the death we look for
                continue
        code = worker.exitcode
        if code is not None and code != 0:
            how = (f"killed by {signal.Signals(-code).name}" if code < 0 else
                   f"exit code {code}")
            gone.append(f"pid {worker.pid}, {how}")
    return "; ".join(gone)


def agreed_steps(lengths: Sequence[int], batch_size: int) -> tuple[int, int]:
    """(batches every rank can read, samples dropped over all ranks) for iterable sets of
    these per-rank lengths."""
    steps = min(n // batch_size for n in lengths)
    return steps, sum(lengths) - steps * batch_size * len(lengths)
