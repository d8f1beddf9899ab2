"""Your own data and your own model, trained by ``python -m psops_mpi.train``.

The data are stored as a set too large for memory would be: numbered shards of ``.npy``
files (``train-images-00000.npy`` with ``train-labels-00000.npy``, ...), memory-mapped,
each sample read from disk when the DataLoader asks for it. ``write`` makes such a folder
from Fashion-MNIST (Debian's ``dataset-fashion-mnist`` package, or any folder of its four
``.gz`` files):

    python examples/own_data.py write /tmp/fashion-npy
    mpiexec -n 2 python -m psops_mpi.train --dataset examples.own_data:fashion_shards \\
        --model examples.own_data:small_cnn --data-dir /tmp/fashion-npy --epochs 2

``--dataset`` and ``--model`` name a function as ``package.module:function``; run from the
repository's root, ``examples.own_data`` is this file.
"""

from __future__ import annotations

import gzip
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
           "Sneaker", "Bag", "Ankle boot"]
MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST's pixel statistics, for inputs around 0


class NpyShards(Dataset):
    """Samples in ``{split}-images-NNNNN.npy`` / ``{split}-labels-NNNNN.npy`` shards under
    ``folder``. The labels (small) are read at once, as ``targets``, so that psops_mpi checks
    them before training; the images are memory-mapped, so a sample is read from disk when
    it is asked for and memory stays bounded however large the set (the pages read are the
    operating system's cache, which it reclaims)."""

    def __init__(self, folder: str | Path, split: str) -> None:
        self.images = sorted(Path(folder).glob(f"{split}-images-*.npy"))
        if not self.images:
            raise FileNotFoundError(f"no {split}-images-*.npy in {folder}")
        labels = [np.load(str(p).replace("-images-", "-labels-")) for p in self.images]
        self.targets = np.concatenate(labels).astype(np.int64)
        self.classes = CLASSES
        self.starts = np.cumsum([0, *(len(a) for a in labels)])
        self.maps: dict[int, np.ndarray] = {}  # shard -> its memory map, opened on first use

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        """A batch at once (PyTorch's DataLoader asks for one where a dataset has this):
        one read and one normalisation per shard, not per sample."""
        indices_np = np.asarray(indices)
        shards = np.searchsorted(self.starts, indices_np, side="right") - 1
        out = torch.empty(len(indices), 1, *self._map(shards[0]).shape[1:])
        for shard in np.unique(shards):
            rows = np.flatnonzero(shards == shard)
            pixels = self._map(shard)[np.sort(indices_np[rows] - self.starts[shard])]
            order = np.argsort(np.argsort(indices_np[rows]))  # back to the asked order
            out[torch.from_numpy(rows)] = torch.from_numpy(pixels[order].astype(np.float32)
                                                           ).unsqueeze(1)
        out.div_(255).sub_(MEAN).div_(STD)
        return [(x, int(self.targets[i])) for x, i in zip(out, indices, strict=True)]

    def _map(self, shard: int) -> np.ndarray:
        if shard not in self.maps:  # opened in the process that reads: each worker its own
            self.maps[shard] = np.load(self.images[shard], mmap_mode="r")
        return self.maps[shard]


def fashion_shards(data_dir: str) -> tuple[Dataset, Dataset]:
    """The dataset factory: psops_mpi calls it with --data-dir (it could also take ``rank``
    and ``world_size``; a map-style set needs neither: psops_mpi shards it)."""
    return NpyShards(data_dir, "train"), NpyShards(data_dir, "test")


def small_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model factory: two conv blocks and a linear layer, for any (C, H, W) input."""
    channels = input_shape[0]
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64 * 16, num_classes))


def write(folder: str, source: str = "/usr/share/datasets/fashion-mnist",
          per_shard: int = 10_000) -> None:
    """Write Fashion-MNIST's IDX files as ``.npy`` shards of ``per_shard`` samples."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        with gzip.open(Path(source) / f"{prefix}-images-idx3-ubyte.gz") as fh:
            images = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
        with gzip.open(Path(source) / f"{prefix}-labels-idx1-ubyte.gz") as fh:
            labels = np.frombuffer(fh.read(), np.uint8, offset=8)
        for k, start in enumerate(range(0, len(images), per_shard)):
            np.save(out / f"{split}-images-{k:05d}.npy", images[start:start + per_shard])
            np.save(out / f"{split}-labels-{k:05d}.npy", labels[start:start + per_shard])
    print(f"wrote {out}")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] != "write":
        sys.exit("usage: python examples/own_data.py write FOLDER [FASHION_MNIST_FOLDER]")
    write(*sys.argv[2:])
