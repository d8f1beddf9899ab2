"""Datasets of the user's own, made and checked before training: ``--dataset
package.module:function`` and ``--dataset imagefolder``.

The factory is called with the keyword arguments it takes of ``data_dir`` (``--data-dir``,
a string or None), ``rank`` and ``world_size``, and returns ``(train, test)``: two torch
datasets, each map-style (``__getitem__`` and ``__len__``) or an ``IterableDataset`` that
yields this rank's part and whose ``len()`` says how many samples that is. A sample is an
``(input, target)`` pair. The training set says what it is with attributes, as torchvision's
datasets do:

* ``classes`` (a list of names) or ``num_classes``: the number of classes;
* ``task``: ``"classification"`` (the default) or ``"language-model"`` (targets are the
  next tokens, ``num_classes`` or ``vocab_size`` the vocabulary);
* ``targets`` (optional): every label, checked before training.

Everything here raises :class:`~psops_mpi.errors.UsageError` with one line, on the rank
that finds it; no collectives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.data import Dataset, IterableDataset

from psops_mpi.data.folder import image_folder
from psops_mpi.data.loader import (
    CHECK_EPOCH,
    EpochShards,
    KeyedSamples,
    as_pair,
    check_targets,
    collate,
    kept_generators,
)
from psops_mpi.errors import UsageError
from psops_mpi.factories import call_factory, load_callable
from psops_mpi.tasks import TASKS


@dataclass
class UserSets:
    """A user's training and test sets and what they are."""

    name: str
    train: Dataset
    test: Dataset
    task: str
    num_classes: int
    input_shape: tuple[int, ...]


def make_user_sets(spec: str, data_dir: str | None, rank: int, world_size: int,
                   image_size: int = 0) -> UserSets:
    """Call the factory (or read the image folder) and say what the sets are."""
    if spec == "imagefolder":
        train, test = image_folder(data_dir, image_size, rank, world_size)
    else:
        made = call_factory("dataset", spec, load_callable("dataset", spec),
                            data_dir=data_dir, rank=rank, world_size=world_size)
        if not (isinstance(made, (tuple, list)) and len(made) == 2):
            raise UsageError(f"dataset {spec!r}: the factory returned "
                             f"{type(made).__name__}, not a (train, test) pair of torch datasets")
        train, test = made
    for which, dataset in (("training", train), ("test", test)):
        check_kind(spec, which, dataset)
    task = getattr(train, "task", "classification")
    if task not in TASKS:
        raise UsageError(f"dataset {spec!r}: task {task!r} is not one of {', '.join(TASKS)}")
    x, y = first_sample(spec, "training", train)
    x_test, _ = first_sample(spec, "test", test)
    if x_test.shape != x.shape:
        raise UsageError(f"dataset {spec!r}: test inputs have shape {tuple(x_test.shape)}, "
                         f"training inputs {tuple(x.shape)}")
    if task == "language-model" and y.shape != x.shape:
        raise UsageError(f"dataset {spec!r}: a language model's targets are the next tokens, "
                         f"shaped as its inputs {tuple(x.shape)}, got {tuple(y.shape)}")
    return UserSets(spec, train, test, task, number_of_classes(spec, train, task),
                    tuple(x.shape))


def check_kind(spec: str, which: str, dataset: object) -> None:
    if not isinstance(dataset, Dataset):
        raise UsageError(f"dataset {spec!r}: the {which} set is a {type(dataset).__name__}, "
                         "not a torch.utils.data.Dataset or IterableDataset")
    try:
        len(dataset)  # type: ignore[arg-type]
    except TypeError:
        need = ("this rank's samples per epoch, so that the ranks can agree on the steps of "
                "an epoch" if isinstance(dataset, IterableDataset) else "its number of samples")
        raise UsageError(f"dataset {spec!r}: the {which} set has no len(); give it __len__ "
                         f"({need})") from None


def first_sample(spec: str, which: str, dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"dataset {spec!r}: the first {which} sample"
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise UsageError(f"dataset {spec!r}: the {which} set is empty")
    try:
        with kept_generators():  # the training process's streams stay as they were
            sample = (next(iter(dataset)) if isinstance(dataset, IterableDataset)
                      else dataset[0])
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"{where} could not be read: {type(exc).__name__}: "
                         f"{' '.join(str(exc).split())}") from None
    return as_pair(sample, where)


def number_of_classes(spec: str, train: Dataset, task: str) -> int:
    names = ("num_classes", "classes") if task == "classification" else (
        "num_classes", "vocab_size")
    for name in names:
        value = getattr(train, name, None)
        if value is not None:
            count = len(value) if name == "classes" else value
            if isinstance(count, int) and not isinstance(count, bool) and count >= 1:
                return count
            raise UsageError(f"dataset {spec!r}: the training set's {name} must be a positive "
                             f"number{' of names' if name == 'classes' else ''}, got {value!r}")
    raise UsageError(f"dataset {spec!r}: the training set must say how many classes there "
                     f"are: give it {' or '.join(names)}")


def check_user_sets(sets: UserSets, rank: int, world_size: int, batch_size: int,
                    seed: int) -> None:
    """What can be checked before training: sizes, listed labels, the first batch."""
    train = sets.train
    if not isinstance(train, IterableDataset):
        n = len(train)  # type: ignore[arg-type]
        if n < world_size * batch_size:
            raise UsageError(f"dataset {sets.name!r} has {n} training samples, fewer than one "
                             f"batch for every rank ({world_size} ranks x --batch-size "
                             f"{batch_size}); use a smaller batch or fewer ranks")
    for which, dataset in (("training", train), ("test", sets.test)):
        targets = getattr(dataset, "targets", None)
        if targets is not None and sets.task == "classification":
            labels = torch.as_tensor(targets)
            check_targets(labels, range(len(labels)), f"{sets.name!r} ({which} set)",
                          sets.task, sets.num_classes)
    if not isinstance(train, IterableDataset):  # this rank's first batch, read and collated
        keyed = KeyedSamples(train, seed, sets.name)
        first = next(iter(EpochShards(len(train), rank, world_size,  # type: ignore[arg-type]
                                      batch_size, seed)))
        collate(keyed.__getitems__([(CHECK_EPOCH, i) for _, i in first]), sets.name,
                sets.task, sets.num_classes)
