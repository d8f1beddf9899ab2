"""The contract between a training loop, a synchroniser and the checkpoint: read this file to
know what an algorithm must provide. Adding one is one new file in ``sync/``.

A training loop uses any synchroniser the same way::

    loss.backward(); sync.after_backward(); optimizer.step(); sync.after_step(loss)

and, before evaluating, ``sync.flush()`` then ``with sync.consensus(): evaluate(model)``
(``sync.flush(final=False)`` between epochs).
For checkpoints a synchroniser is a stateful part like a torch optimizer (``state_dict`` /
``load_state_dict``), plus what a resume at another world size needs: a plan of which old
rank each new rank continues (:meth:`Synchronizer.plan_resize`) and a hook run after loading
(:meth:`Synchronizer.on_resize`).

Non-finite values (one NaN batch on one rank) must not reach the other ranks: a synchroniser
leaves them out of what it exchanges. When the step's averaged gradient is not finite,
``after_backward`` returns False and sets the gradients to None, so the ``optimizer.step()``
that follows changes nothing (torch optimizers skip parameters without a gradient: neither
the weights nor the momentum move), whether or not the loop looks at the result. A rank whose
weights are not finite at a round restarts from what the others agree on. When no rank has
finite values for ``max_nonfinite`` syncs in a row, the four calls raise
:class:`NonFiniteStop` on every rank at the same step.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from psops_mpi.flat import FlatBuffers, FlatParams


class NonFiniteStop(RuntimeError):
    """No rank had finite values for too many syncs in a row: raised on every rank at the
    same step (the decision is taken from values every rank holds alike).

    Attributes:
        step: the step (this synchroniser's count) at which it stopped.
        reason: what happened, in words, for the one line the user sees.
        at_limit: True when ``max_nonfinite`` skipped syncs in a row stopped it; False when
            there was nothing left to skip back to.
    """

    def __init__(self, step: int, reason: str, at_limit: bool = True) -> None:
        super().__init__(f"stopped at step {step}: {reason}")
        self.step, self.reason, self.at_limit = step, reason, at_limit


@dataclass
class SyncMetrics:
    """What a synchroniser reports for the epoch metrics.

    ``counts`` are events of this rank (restarted particles, skipped steps) that the loop sums
    over the ranks; ``shared_counts`` are events that happen on every rank together (a step
    every rank skipped), reported once, not summed; ``values`` are the same on every rank (the
    global best's fitness) and are reported as they are.
    """

    steps: int
    rounds: int
    comm_bytes: int
    comm_s: float
    counts: dict[str, int] = field(default_factory=dict)
    values: dict[str, float] = field(default_factory=dict)
    shared_counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float]:
        """Everything in one flat dict, for printing."""
        return {"steps": self.steps, "rounds": self.rounds, "comm_bytes": self.comm_bytes,
                "comm_s": self.comm_s, **self.counts, **self.shared_counts, **self.values}


@dataclass(frozen=True)
class ResizePlan:
    """How a job of ``len(sources)`` ranks continues a checkpoint of another world size.

    ``sources[r]`` is the checkpoint rank whose state rank r continues, or None: rank r joins
    anew, takes the shared state from the shard of rank ``template`` and starts its own
    optimizer and random state fresh. ``note`` says what happened, in one line.
    """

    sources: list[int | None]
    template: int
    note: str

    @property
    def joins(self) -> bool:
        """Whether some rank joins anew."""
        return None in self.sources


class Synchronizer(ABC):
    """What the loop and the checkpoint ask of every synchronisation algorithm.

    Attributes:
        model: the model this rank trains.
        optimizer: its local optimizer.
        flat: the model's trainable parameters as views of one flat buffer
            (:mod:`psops_mpi.flat`); the checkpoint saves it whole.
        buffers: the model's floating-point buffers (BatchNorm statistics), flat likewise.
        rank: this rank in the communicator the ranks train over.
        world_size: the number of ranks in it.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    flat: FlatParams
    buffers: FlatBuffers
    rank: int
    world_size: int

    # ---- the four calls of a training step, and evaluation

    @abstractmethod
    def after_backward(self) -> bool:
        """Called after ``loss.backward()``, before ``optimizer.step()``. False: the step is
        skipped on every rank (its gradients are set to None, so ``optimizer.step()`` changes
        nothing; a loop may also leave that call out)."""

    @abstractmethod
    def after_step(self, loss: torch.Tensor | None = None) -> bool:
        """Called after ``optimizer.step()`` with the step's loss; True when a round ran."""

    @abstractmethod
    def flush(self, final: bool = True) -> None:
        """Synchronise what is pending, so evaluation sees one consistent model per rank.
        ``final`` False: an evaluation between epochs, where a synchroniser that leaves
        rounds in flight may evaluate the last round's result instead of synchronising."""

    @contextmanager
    def consensus(self) -> Iterator[None]:
        """The weights every rank evaluates (after :meth:`flush`): the model as it is."""
        yield

    def consensus_source(self) -> tuple[int, str | None]:
        """Where a checkpoint holds the weights :meth:`consensus` evaluates: (rank, key of
        this synchroniser's state holding them), or (rank, None) for that rank's model;
        rank -1: the mean over all ranks."""
        return 0, None

    def lr_scale(self) -> float:
        """This rank's multiplier of the schedule's learning rate (1 but for a swarm that
        searches the rate)."""
        return 1.0

    # ---- metrics

    def describe(self) -> str:
        """One line on what a round does, printed at start ('' for nothing to add)."""
        return ""

    def round_collective(self) -> str:
        """How a round moves the weights, for the ``start`` metrics: an ``allreduce`` here;
        PSO-PS's ``allgather`` or ``best``."""
        return "allreduce"

    @abstractmethod
    def metrics(self) -> SyncMetrics:
        """Counters so far (steps, rounds, bytes, seconds in MPI, events, shared values)."""

    def summary(self) -> dict[str, Any]:
        """JSON values worth showing with a checkpoint, the same on every rank."""
        return {}

    def rank_summary(self) -> dict[str, Any]:
        """JSON values of this rank worth showing with a checkpoint (and planning a resize)."""
        return {}

    def legend(self) -> dict[str, str]:
        """What each figure of :meth:`summary` and :meth:`rank_summary` is, in words, for a
        person reading the checkpoint (``python -m psops_mpi.checkpoint inspect``)."""
        return {}

    # ---- checkpoints

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """This rank's state: tensors and plain scalars, nested dicts allowed."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` gave (tensors may come as numpy arrays)."""

    def plan_resize(self, rank_summaries: list[dict[str, Any]], summary: dict[str, Any],
                    new_size: int) -> ResizePlan:
        """Which checkpoint rank each rank of a job of ``new_size`` continues, from the
        checkpoint's :meth:`rank_summary` per rank and :meth:`summary`. By default rank r
        continues old rank r mod P_old, whole (replicas stay replicas)."""
        old_size = len(rank_summaries)
        return ResizePlan([r % old_size for r in range(new_size)], 0,
                          f"rank r continues old rank r mod {old_size}")

    def on_resize(self, plan: ResizePlan) -> None:
        """Called after :meth:`load_state_dict` when the checkpoint had another world size;
        nothing to do by default."""
        return
