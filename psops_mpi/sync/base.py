"""What every synchroniser shares: flat buffers, the exchange, step counting and the
four calls a training loop makes.

A training loop uses any synchroniser the same way::

    loss.backward(); sync.after_backward(); optimizer.step(); sync.after_step(loss)

and, before evaluating, ``sync.flush()`` then ``with sync.consensus(): evaluate(model)``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.exchange import Exchange
from psops_mpi.flat import FlatBuffers, FlatParams


class Synchronizer:
    """Base class: start every rank from rank 0's weights and count steps and rounds.

    Args:
        model: the model this rank trains; its parameters become views of one flat buffer.
        optimizer: the local optimizer over ``model``'s parameters.
        comm: the communicator of the ranks that train together (default COMM_WORLD).
        sync_every: local steps between two rounds.
        cuda_aware: hand CUDA buffers to MPI directly (only if the MPI library supports it).
    """

    extra_slots = 0  # slots after the weights in the flat buffer (PSO-PS: the fitness)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 comm: MPI.Comm | None = None, sync_every: int = 1,
                 cuda_aware: bool = False) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be a positive integer, got {sync_every}")
        self.model = model
        self.optimizer = optimizer
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.sync_every = sync_every
        self.flat = FlatParams(model, extra=self.extra_slots)
        self.buffers = FlatBuffers(model)
        self.exchange = Exchange(self.comm, cuda_aware=cuda_aware)
        self.exchange.reserve(self._largest_message(), self.flat.packed)
        self.steps = 0
        self.rounds = 0
        self.steps_since_round = 0
        self._broadcast_initial_state()

    def _largest_message(self) -> int:
        """Elements in the largest buffer this synchroniser hands to the exchange."""
        return self.flat.packed.numel()

    def _broadcast_initial_state(self) -> None:
        """All ranks start from rank 0's weights; setup traffic is not counted as training."""
        self.exchange.bcast_(self.flat.data, root=0)
        if self.buffers.data is not None:
            self.exchange.bcast_(self.buffers.data, root=0)
        self.exchange.reset_counters()

    def after_backward(self) -> None:
        """Called after ``loss.backward()``, before ``optimizer.step()``."""

    def after_step(self, loss: torch.Tensor | None = None) -> bool:
        """Called after ``optimizer.step()`` with the step's loss; True when a round ran."""
        self.steps += 1
        self.steps_since_round += 1
        self._observe(loss)
        if self._round_due():
            self.sync_round()
            return True
        return False

    def _round_due(self) -> bool:
        return self.steps_since_round >= self.sync_every

    def _observe(self, loss: torch.Tensor | None) -> None:
        """Hook for synchronisers that need the loss (PSO-PS fitness)."""

    def sync_round(self) -> None:
        """Run one synchronisation round now."""
        self._round()
        self.rounds += 1
        self.steps_since_round = 0

    def _round(self) -> None:
        raise NotImplementedError

    def average_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm statistics) over all ranks."""
        if self.buffers.data is not None:
            self.exchange.allreduce_mean_(self.buffers.data)

    def flush(self) -> None:
        """Synchronise what is pending (a round if local steps were taken since the last one)
        so that evaluation sees one consistent model on every rank."""
        if self.steps_since_round:
            self.sync_round()

    @contextmanager
    def consensus(self) -> Iterator[None]:
        """The weights every rank evaluates (after :meth:`flush`): the model as it is."""
        yield

    def stats(self) -> dict[str, float]:
        """Counters for metrics: steps, rounds, bytes sent and seconds spent in MPI."""
        return {"steps": self.steps, "rounds": self.rounds, **self.exchange.counters()}

    def checkpoint_state(self) -> dict[str, int | float]:
        """Scalar state a resumed run needs: step and round counters, and the MPI counters so
        that metrics continue where they stopped."""
        counters = self.exchange
        return {"steps": self.steps, "rounds": self.rounds,
                "steps_since_round": self.steps_since_round, "comm_bytes": counters.bytes_sent,
                "comm_s": counters.seconds, "comm_calls": counters.calls}

    def restore_checkpoint_state(self, state: dict[str, int | float]) -> None:
        """Set the counters of :meth:`checkpoint_state` (the tensors are restored by the
        caller: they are the model's, the optimizer's and the swarm's)."""
        self.steps = int(state["steps"])
        self.rounds = int(state["rounds"])
        self.steps_since_round = int(state["steps_since_round"])
        self.exchange.bytes_sent = int(state["comm_bytes"])
        self.exchange.seconds = float(state["comm_s"])
        self.exchange.calls = int(state["comm_calls"])
