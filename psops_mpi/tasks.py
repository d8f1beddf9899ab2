"""What a batch is trained and judged on: the loss, and the figures that go with it.

A task turns a model's output and a batch's targets into the training loss, and into three
sums on the device (loss x units, hits, units) from which an epoch's figures are read: for a
classifier the mean loss and the accuracy, for a language model the mean loss per token and
the perplexity. The loop, the evaluation and the PSO-PS fitness ask the task; none of them
knows which one it holds.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F


class Task(ABC):
    """The contract; see the module docstring."""

    name: ClassVar[str]
    metric: ClassVar[str]
    """The figure reported beside the loss (``acc``, ``ppl``)."""
    ensembles: ClassVar[bool] = False
    """Whether models' predictions can be averaged into one (:meth:`probabilities`)."""

    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        """A batch's predicted class probabilities (tasks that ``ensembles``)."""
        raise NotImplementedError(f"the {self.name} task has no ensemble")

    @abstractmethod
    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss (what the optimizer minimises)."""

    @abstractmethod
    def hits(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Correct predictions in the batch, a device scalar."""

    def units(self, y: torch.Tensor) -> int:
        """What the loss is a mean over: samples here, tokens for a language model."""
        return len(y)

    def count(self, sums: torch.Tensor, loss: torch.Tensor, out: torch.Tensor,
              y: torch.Tensor) -> None:
        """Add a training batch to ``sums`` = [loss x units, hits, units] on the device (no
        host sync)."""
        n = self.units(y)
        sums[0] += loss.detach() * n
        sums[1] += self.hits(out, y)
        sums[2] += n

    @torch.no_grad()
    def add_eval(self, sums: torch.Tensor, out: torch.Tensor, y: torch.Tensor) -> None:
        """Add an evaluation batch to ``sums`` (the loss summed, not averaged then scaled)."""
        sums[0] += self.loss_sum(out, y)
        sums[1] += self.hits(out, y)
        sums[2] += self.units(y)

    @abstractmethod
    def loss_sum(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch's summed loss."""

    @abstractmethod
    def figures(self, sums: np.ndarray) -> dict[str, float]:
        """``{"loss": ..., metric: ...}`` from summed [loss x units, hits, units]."""

    @abstractmethod
    def example_input(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        """A batch of two zero samples, for the model's shape check."""

    @abstractmethod
    def output_shape(self, input_shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
        """The model's output shape for :meth:`example_input`."""


class Classification(Task):
    """One label per sample; cross-entropy; accuracy."""

    name = "classification"
    metric = "acc"
    ensembles = True

    def probabilities(self, out: torch.Tensor) -> torch.Tensor:
        return torch.softmax(out.float(), dim=1)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y)

    def loss_sum(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out, y, reduction="sum")

    def hits(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out.argmax(1) == y).sum()

    def figures(self, sums: np.ndarray) -> dict[str, float]:
        return {"loss": float(sums[0] / sums[2]), "acc": float(sums[1] / sums[2])}

    def example_input(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(2, *input_shape, dtype=torch.float32)

    def output_shape(self, input_shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
        return (2, num_classes)


class LanguageModel(Task):
    """Next-token prediction: inputs and targets are (batch, T) token ids, the model gives
    (batch, T, vocabulary) logits; the loss is the mean cross-entropy per token and the
    figure its exponential, the perplexity."""

    name = "language-model"
    metric = "ppl"

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, -2), y.flatten())

    def loss_sum(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(out.flatten(0, -2), y.flatten(), reduction="sum")

    def hits(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (out.argmax(-1) == y).sum()

    def units(self, y: torch.Tensor) -> int:
        return y.numel()

    def figures(self, sums: np.ndarray) -> dict[str, float]:
        loss = float(sums[0] / sums[2])
        return {"loss": loss, "ppl": math.exp(loss) if loss < 700 else math.inf}

    def example_input(self, input_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(2, *input_shape, dtype=torch.long)

    def output_shape(self, input_shape: tuple[int, ...], num_classes: int) -> tuple[int, ...]:
        return (2, *input_shape, num_classes)


TASKS: dict[str, type[Task]] = {t.name: t for t in (Classification, LanguageModel)}


def make_task(name: str) -> Task:
    """The task called ``name`` (``classification``, ``language-model``)."""
    return TASKS[name]()
