"""The batch source: the one interface through which the loop gets its data.

Two kinds sit behind it: the built-in sets as tensors already on the device
(:class:`~psops_mpi.data.batches.ShardedBatches`, the fast path) and a user's torch dataset
behind a ``DataLoader`` (:class:`~psops_mpi.data.loader.LoaderBatches`). The loop asks for an
epoch's batches from a step on, for this rank's part of the test set and for the holdout
batch; it never asks which kind it holds.

Position: the data order is a function of (seed, epoch, world size, batch size) alone, so
the position in it is (epoch, step), which the loop's checkpoint part holds (``loop/epoch``,
``loop/step_in_epoch``; a step is ``--grad-accum-steps`` batches). A source's own part
(``data/...``) records what the order was cut from, so that a resume onto other data is
refused instead of continuing a different order.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch

from psops_mpi.errors import UsageError

Batch = tuple[torch.Tensor, torch.Tensor]


class BatchSource(ABC):
    """Per-rank batches for training, evaluation and the PSO-PS holdout fitness.

    Attributes:
        name: the dataset's name, for the start line and the results.
        task: what the batches are for (a :mod:`psops_mpi.tasks` name).
        input_shape: one sample's shape (no batch dimension).
        num_classes: outputs of the model (classes; a language model's vocabulary).
        batch_size: samples per batch on this rank.
        batches_per_epoch: batches per epoch, the same on every rank (rounds are collectives).
    """

    name: str
    task: str = "classification"
    input_shape: tuple[int, ...]
    num_classes: int
    batch_size: int
    batches_per_epoch: int

    @abstractmethod
    def epoch(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        """This rank's batches of ``epoch`` from ``start_step`` on, on its device."""

    @abstractmethod
    def test_batches(self, whole: bool = False) -> Iterator[Batch]:
        """This rank's part of the test set, on its device; the parts cover it once. With
        ``whole``, all of it, in the same order on every rank (UsageError for a set that
        each rank holds a part of only)."""

    @abstractmethod
    def holdout(self, size: int, seed: int) -> Batch:
        """``min(size, N)`` training samples chosen from ``seed`` alone: the same on every
        rank."""

    @property
    def whole_test(self) -> bool:
        """Whether every rank can read the whole test set (``test_batches(whole=True)``)."""
        return True

    def describe(self) -> str:
        """How batches are made, for the start line ('' for nothing to add)."""
        return ""

    def shard_info(self) -> int | None:
        """What the ranks must agree on before training (an iterable set's length on this
        rank), gathered by the caller for :meth:`agree_shards`."""
        return None

    def agree_shards(self, infos: list[int | None]) -> None:
        """Settle ``batches_per_epoch`` from every rank's :meth:`shard_info` (the same list on
        every rank); UsageError if no step is left."""
        return

    def close(self) -> None:
        """Release what the source holds (worker processes)."""
        return

    def explain(self, exc: BaseException) -> BaseException:
        """A failure that escaped the loop, said in the source's terms where it is the
        source's (a worker that died while the model was training); else ``exc``."""
        return exc

    # ---- a checkpoint part: what the data order was cut from

    def identity(self) -> dict[str, Any]:
        """What must match for a checkpoint's data order to continue here."""
        return {"num_train": self.num_train}

    @property
    @abstractmethod
    def num_train(self) -> int:
        """Training samples the order is cut from (for a set that shards itself: over all
        ranks, once they agreed)."""

    def state_dict(self) -> dict[str, Any]:
        return self.identity()

    def check_state(self, state: dict[str, Any], where: str) -> None:
        """Refuse a checkpoint whose data order was cut from other data."""
        mine = self.identity()
        theirs = {k: state.get(k) for k in mine}
        if any(v is not None and int(v) != mine[k] for k, v in theirs.items()):
            raise UsageError(f"{where}: the checkpoint's training set had "
                             f"{theirs['num_train']} samples, {self.name} here has "
                             f"{mine['num_train']}: its data order cannot continue; use the "
                             "same data, --resume none or another --checkpoint-dir")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        return  # nothing to restore: the position is the loop's (see the module docstring)


def check_start_step(start: int, batches_per_epoch: int) -> None:
    if not 0 <= start <= batches_per_epoch:
        raise UsageError(f"start batch {start} is outside 0..{batches_per_epoch}, the batches "
                         "of one epoch")
