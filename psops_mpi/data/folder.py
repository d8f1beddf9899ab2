"""``--dataset imagefolder``: images in class folders, torchvision's ``ImageFolder`` layout.

    DIR/train/<class>/*.png|jpg|...     DIR/test/<class>/...   (or DIR/val/<class>/...)

Classes are the sorted folder names of ``train``. Every image is decoded with Pillow as RGB
(as torchvision's ImageFolder does: grey images too, so torchvision's models take them) and
brought to ``image_size`` (default: the first image's shorter side), then scaled to [-1, 1].
Training samples get the standard augmentation for their size: up to 64 pixels CIFAR's (a
random crop after padding by an eighth, a horizontal flip), above it ImageNet's (a random
resized crop, a flip); test samples are resized and centre-cropped.

The sets list their files as torchvision's ``datasets.ImageFolder`` does (``classes``,
``samples``, ``targets``; the test set takes the training set's class indices even where it
lacks a class). Where torchvision imports, the recipe is its ``transforms.v2``; elsewhere (its
PyPI wheel does not import beside torch's CPU build) the same recipe runs on Pillow and torch
alone. Either way the random draws come from the generators that the loader seeds per sample
(:mod:`psops_mpi.data.loader`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from psops_mpi.errors import UsageError
from psops_mpi.factories import torchvision_or_none

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
              ".pgm")
SMALL = 64  # up to this size: CIFAR's augmentation; above it: ImageNet's


def find_images(root: Path) -> tuple[list[str], list[tuple[str, int]], Path]:
    """(classes, (path, class index) per image, test folder) of an image-folder tree."""
    if not root.is_dir():
        raise UsageError(f"imagefolder: --data-dir {root} is not a folder; give a folder "
                         "holding train/<class>/... and test/<class>/... (or val/)")
    train = root / "train"
    test = next((root / n for n in ("test", "val") if (root / n).is_dir()), None)
    if not train.is_dir() or test is None:
        raise UsageError(f"imagefolder: {root} must hold train/ and test/ (or val/), each with "
                         "one folder of images per class")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir())
    if not classes:
        raise UsageError(f"imagefolder: {train} has no class folders")
    return classes, list_samples(train, classes), test


def list_samples(split: Path, classes: Sequence[str]) -> list[tuple[str, int]]:
    """Every image file under ``split``/<class>, sorted, with its class index."""
    unknown = sorted({p.name for p in split.iterdir() if p.is_dir()} - set(classes))
    if unknown:
        raise UsageError(f"imagefolder: {split} has class folders that train/ lacks: "
                         f"{', '.join(unknown[:5])}")
    samples = [(str(f), k) for k, name in enumerate(classes) if (split / name).is_dir()
               for f in sorted((split / name).rglob("*"))
               if f.suffix.lower() in EXTENSIONS and f.is_file()]
    if not samples:
        raise UsageError(f"imagefolder: no images ({', '.join(EXTENSIONS)}) under {split}")
    return samples


def check_headers(paths: Sequence[str]) -> None:
    """Open every file's header (not its pixels): a file Pillow cannot read is named now."""
    from PIL import Image, UnidentifiedImageError

    for path in paths:
        try:
            with Image.open(path) as image:
                image.size  # noqa: B018 - reading the header is the check
        except (OSError, UnidentifiedImageError, ValueError) as exc:
            raise UsageError(f"imagefolder: {path} is not an image Pillow can read "
                             f"({' '.join(str(exc).split())})") from None


def load_rgb(path: str) -> Any:
    """One file as an RGB Pillow image; a file that does not decode is named."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as exc:
        raise UsageError(f"imagefolder: cannot decode {path} "
                         f"({' '.join(str(exc).split())})") from None


def shorter_side(path: str) -> int:
    """The first training image's shorter side: the default size of every image."""
    from PIL import Image

    with Image.open(path) as image:
        return min(image.size)


# ---- the recipe on Pillow and torch alone

def _resize_shorter(image: Any, size: int) -> Any:
    from PIL import Image

    w, h = image.size
    if min(w, h) == size:
        return image
    scale = size / min(w, h)
    return image.resize((max(size, round(w * scale)), max(size, round(h * scale))),
                        Image.BILINEAR)


def _centre_crop(image: Any, size: int) -> Any:
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def _to_tensor(image: Any) -> torch.Tensor:
    array = np.asarray(image, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def _random_resized_crop_box(w: int, h: int) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop box (scale 0.08-1, ratio 3/4-4/3), torch RNG."""
    area = w * h
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(0.08, 1.0))
        ratio = math.exp(float(torch.empty(1).uniform_(math.log(3 / 4), math.log(4 / 3))))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            left = int(torch.randint(0, w - cw + 1, (1,)))
            top = int(torch.randint(0, h - ch + 1, (1,)))
            return left, top, left + cw, top + ch
    side = min(w, h)
    return (w - side) // 2, (h - side) // 2, (w + side) // 2, (h + side) // 2


def plain_transform(size: int, train: bool) -> Callable[[Any], torch.Tensor]:
    """The recipe of the module docstring on a Pillow image, without torchvision."""
    from PIL import Image

    def small(image: Any) -> torch.Tensor:
        x = _to_tensor(_centre_crop(_resize_shorter(image, size), size))
        if not train:
            return x
        pad = size // 8
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=-1.0)  # black
        top, left = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
        x = padded[:, top:top + size, left:left + size]
        return x.flip(2) if float(torch.rand(1)) < 0.5 else x

    def large(image: Any) -> torch.Tensor:
        if not train:
            return _to_tensor(_centre_crop(_resize_shorter(image, round(size * 8 / 7)), size))
        box = _random_resized_crop_box(*image.size)
        x = _to_tensor(image.crop(box).resize((size, size), Image.BILINEAR))
        return x.flip(2) if float(torch.rand(1)) < 0.5 else x

    return small if size <= SMALL else large


class ImageFiles(Dataset):
    """Image files with class indices, as torchvision's ImageFolder holds them (``classes``,
    ``samples``, ``targets``), decoded and transformed on reading."""

    def __init__(self, classes: list[str], samples: list[tuple[str, int]],
                 load: Callable[[str], Any], transform: Callable[[Any], torch.Tensor]) -> None:
        self.classes, self.samples = classes, samples
        self.targets = [k for _, k in samples]
        self.load, self.transform = load, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, target = self.samples[index]
        return self.transform(self.load(path)), target


# ---- the recipe with torchvision

def torchvision_transform(tv: Any, size: int, train: bool) -> Any:
    v2 = tv.transforms.v2
    if size <= SMALL:
        steps = [v2.Resize(size), v2.CenterCrop(size)]
        if train:
            steps += [v2.RandomCrop(size, padding=size // 8), v2.RandomHorizontalFlip()]
    elif train:
        steps = [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
    else:
        steps = [v2.Resize(round(size * 8 / 7)), v2.CenterCrop(size)]
    return v2.Compose([v2.PILToTensor(), *steps, v2.ToDtype(torch.float32, scale=True),
                       v2.Normalize([0.5] * 3, [0.5] * 3)])


def image_folder(data_dir: str | None, image_size: int, rank: int,
                 world_size: int) -> tuple[Dataset, Dataset]:
    """The training and test sets of an image-folder tree (see the module docstring); each
    rank checks the headers of its share of the files."""
    if data_dir is None:
        raise UsageError("--dataset imagefolder needs --data-dir pointing at a folder holding "
                         "train/<class>/... and test/<class>/... (or val/)")
    classes, train_samples, test_dir = find_images(Path(data_dir).expanduser())
    test_samples = list_samples(test_dir, classes)
    check_headers([p for p, _ in (train_samples + test_samples)[rank::world_size]])
    size = image_size or shorter_side(train_samples[0][0])
    tv = torchvision_or_none()
    transform = ((lambda train: plain_transform(size, train)) if tv is None
                 else (lambda train: torchvision_transform(tv, size, train)))
    return (ImageFiles(classes, train_samples, load_rgb, transform(True)),
            ImageFiles(classes, test_samples, load_rgb, transform(False)))
