"""--dataset imagefolder on real image files: the layout, the recipe with and without
torchvision, and one line for a folder that is not such a tree."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from psops_mpi.data.folder import image_folder, plain_transform, torchvision_transform
from psops_mpi.data.loader import kept_generators, seed_generators
from psops_mpi.errors import UsageError
from psops_mpi.factories import torchvision_or_none

TV = torchvision_or_none()


def write_images(root: Path, size: tuple[int, int], mode: str = "RGB",
                 classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for k in range(per_class):
                shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
                pixels = rng.integers(0, 256, shape, dtype=np.uint8)
                Image.fromarray(pixels, mode).save(root / split / name / f"{k}.png")


def read(dataset: torch.utils.data.Dataset, index: int, seed: int) -> torch.Tensor:
    with kept_generators():
        seed_generators(seed)
        return dataset[index][0]


@pytest.mark.parametrize(("size", "mode"), [((28, 28), "L"), ((100, 80), "RGB")])
def test_images_become_rgb_at_one_size_with_augmentation_only_in_training(
        tmp_path: Path, size: tuple[int, int], mode: str) -> None:
    """Grey 28x28 (CIFAR's recipe) and RGB 100x80 (ImageNet's, to the shorter side 80)."""
    write_images(tmp_path, size, mode)
    train, test = image_folder(str(tmp_path), 0, rank=0, world_size=1)
    side = min(size)
    assert train.classes == ["cat", "dog"] and train.targets == [0, 0, 0, 1, 1, 1]
    x = read(train, 4, seed=1)
    assert x.shape == (3, side, side) and x.dtype == torch.float32
    assert float(x.min()) >= -1.0 and float(x.max()) <= 1.0
    assert torch.equal(x, read(train, 4, seed=1))  # drawn from the seeded generators
    assert not torch.equal(x, read(train, 4, seed=2))  # and drawn
    assert torch.equal(read(test, 4, seed=1), read(test, 4, seed=2))  # no test augmentation
    assert read(test, 0, seed=0).shape == (3, side, side)
    assert image_folder(str(tmp_path), 16, 0, 1)[0][0][0].shape == (3, 16, 16)


@pytest.mark.skipif(TV is not None, reason="torchvision imports here: its recipe is used")
def test_without_torchvision_the_same_recipe_runs_on_pillow_and_torch(tmp_path: Path) -> None:
    write_images(tmp_path, (32, 32))
    train, _ = image_folder(str(tmp_path), 0, 0, 1)
    assert train.transform.__qualname__.startswith("plain_transform")


@pytest.mark.skipif(TV is None, reason="torchvision does not import beside this torch build")
def test_with_torchvision_its_transforms_v2_make_the_same_shapes(tmp_path: Path) -> None:
    write_images(tmp_path, (40, 40))
    train, test = image_folder(str(tmp_path), 0, 0, 1)
    assert isinstance(train.transform, TV.transforms.v2.Compose)
    ours = plain_transform(40, False)(train.load(train.samples[0][0]))
    theirs = torchvision_transform(TV, 40, False)(train.load(train.samples[0][0]))
    assert torch.allclose(ours, theirs, atol=1e-6)  # eval: the same numbers either way
    assert read(train, 0, 1).shape == read(test, 0, 1).shape == (3, 40, 40)


@pytest.mark.parametrize(("layout", "message"), [
    ("nothing", "is not a folder"),
    ("train only", r"must hold train/ and test/ \(or val/\)"),
    ("no classes", "has no class folders"),
    ("extra test class", "has class folders that train/ lacks: bird"),
    ("no images", "no images"),
])
def test_a_folder_that_is_not_an_image_tree_is_one_line(tmp_path: Path, layout: str,
                                                        message: str) -> None:
    root = tmp_path / "data"
    if layout != "nothing":
        (root / "train").mkdir(parents=True)
    if layout in ("no classes", "extra test class", "no images"):
        (root / "test").mkdir()
    if layout == "extra test class":
        write_images(root, (8, 8))
        (root / "test" / "bird").mkdir()
    if layout == "no images":
        (root / "train" / "cat").mkdir()
        (root / "train" / "cat" / "notes.txt").write_text("no image here")
    with pytest.raises(UsageError, match=message):
        image_folder(str(root), 0, 0, 1)
