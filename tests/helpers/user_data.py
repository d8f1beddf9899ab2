"""Datasets of a user's own, as ``--dataset tests.helpers.user_data:NAME`` names them: good
ones (map-style with a random augmentation, iterable with uneven shards, files read
lazily) and bad ones (one per way a factory can be wrong)."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

NUM_CLASSES = 10
DIM = 32


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Ten Gaussian classes in 32 dimensions (the means fixed, the draws from ``seed``)."""
    means = torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(1234)) * 1.5
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return means[y] + torch.randn(n, DIM, generator=g), y


class Blobs(Dataset):
    """Map-style; training samples get noise from torch's global generator (an
    augmentation: what the loader seeds per sample), test samples none."""

    def __init__(self, n: int, seed: int, augment: bool) -> None:
        self.x, self.y = _blobs(n, seed)
        self.augment = augment
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.x[index]
        return (x + 0.3 * torch.randn(DIM) if self.augment else x), int(self.y[index])


def blobs(data_dir: str | None = None) -> tuple[Dataset, Dataset]:
    return Blobs(1024, 1, augment=True), Blobs(256, 2, augment=False)


class Stream(IterableDataset):
    """Iterable, sharded by rank, rank r holding 37*r more samples than rank 0."""

    def __init__(self, n: int, seed: int, rank: int, world_size: int) -> None:
        self.x, self.y = _blobs(n, seed)
        self.mine = range(rank, n, world_size)
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return len(self.mine)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        for i in self.mine:
            yield self.x[i] + 0.3 * torch.randn(DIM), int(self.y[i])


def stream(rank: int, world_size: int) -> tuple[Dataset, Dataset]:
    return Stream(900 + 37 * world_size * rank, 1, rank, world_size), \
        Stream(256, 2, rank, world_size)


class DiskSamples(Dataset):
    """uint8 samples in one raw file on disk, each read with one ``np.fromfile`` when
    asked for: nothing of the file is held in memory. They stay uint8 (the model scales
    them): a quarter of float32's bytes between the DataLoader's processes."""

    def __init__(self, path: Path, shape: tuple[int, ...], labels: np.ndarray) -> None:
        self.path, self.shape, self.targets = path, shape, labels
        self.size = int(np.prod(shape))
        self.num_classes = NUM_CLASSES

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        raw = np.fromfile(self.path, np.uint8, count=self.size, offset=index * self.size)
        return torch.from_numpy(raw.reshape(self.shape)), int(self.targets[index])


def write_disk_samples(folder: Path, n: int, shape: tuple[int, ...], seed: int = 0) -> None:
    """``n`` uint8 samples: one noise pattern plus a brightness that is the sample's class,
    written in chunks (the writer holds no more than a chunk either)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, NUM_CLASSES, n)
    noise = rng.integers(0, 60, int(np.prod(shape)), dtype=np.uint8)
    with (folder / "samples.u8").open("wb") as fh:
        for start in range(0, n, 64):
            base = (labels[start:start + 64] * 18 + 20).astype(np.uint8)[:, None]
            fh.write((noise + base).tobytes())
    np.save(folder / "labels.npy", labels)
    (folder / "shape.txt").write_text(" ".join(map(str, shape)))


def disk_samples(data_dir: str) -> tuple[Dataset, Dataset]:
    folder = Path(data_dir)
    shape = tuple(int(s) for s in (folder / "shape.txt").read_text().split())
    labels = np.load(folder / "labels.npy")
    every = DiskSamples(folder / "samples.u8", shape, labels)
    test = torch.utils.data.Subset(every, range(len(labels) - 256, len(labels)))
    test.num_classes = NUM_CLASSES  # type: ignore[attr-defined]
    return every, test


# ---- bad ones

def raises(data_dir: str | None = None) -> tuple[Dataset, Dataset]:
    raise FileNotFoundError(f"no such folder: {data_dir}")


def not_a_pair() -> list:
    return [1, 2, 3]


def lists() -> tuple[list, list]:
    return [(torch.zeros(3), 0)] * 64, [(torch.zeros(3), 0)] * 8


class _Labelled(Dataset):
    def __init__(self, n: int, label_at: dict[int, int] | None = None,
                 shape_at: dict[int, tuple[int, ...]] | None = None, targets: bool = False,
                 classes: bool = True) -> None:
        self.n, self.label_at, self.shape_at = n, label_at or {}, shape_at or {}
        if classes:
            self.classes = [str(k) for k in range(NUM_CLASSES)]
        if targets:
            self.targets = [self.label_at.get(i, i % NUM_CLASSES) for i in range(n)]

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        shape = self.shape_at.get(index, (DIM,))
        return torch.zeros(shape), self.label_at.get(index, index % NUM_CLASSES)


def label_outside_listed() -> tuple[Dataset, Dataset]:
    """A label of 12 among ten classes, in ``targets``: found before any sample is read."""
    return _Labelled(512, {300: 12}, targets=True), _Labelled(64)


def label_outside_unlisted() -> tuple[Dataset, Dataset]:
    """A label of -1, without ``targets``: found in the batch that holds it."""
    return _Labelled(512, {7: -1}), _Labelled(64)


def shapes_differ() -> tuple[Dataset, Dataset]:
    return _Labelled(512, shape_at={5: (DIM + 1,)}), _Labelled(64)


def no_classes() -> tuple[Dataset, Dataset]:
    return _Labelled(512, classes=False), _Labelled(64)


def tiny() -> tuple[Dataset, Dataset]:
    return _Labelled(40), _Labelled(8)


class _Endless(IterableDataset):
    def __iter__(self) -> Iterator[tuple[torch.Tensor, int]]:
        while True:
            yield torch.zeros(DIM), 0


def no_length() -> tuple[Dataset, Dataset]:
    return _Endless(), _Labelled(8)


class _KillsItsReader(Blobs):
    """A DataLoader worker that reads its ``KILL_AFTER``-th sample is killed with SIGKILL."""

    read = 0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        self.read += 1
        if get_worker_info() is not None and self.read == int(os.environ["KILL_AFTER"]):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().__getitem__(index)


def kills_its_worker() -> tuple[Dataset, Dataset]:
    return _KillsItsReader(1024, 1, augment=True), Blobs(256, 2, augment=False)
