"""What psops_mpi's own synchronisers share: flat buffers, the exchange, step and round
counting, and the state every one of them checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.exchange import Exchange
from psops_mpi.flat import FlatBuffers, FlatParams
from psops_mpi.sync.base import ResizePlan, Synchronizer, SyncMetrics


class FlatSynchronizer(Synchronizer):
    """Start every rank from rank 0's weights; count steps and rounds; run a round every
    ``sync_every`` steps. Subclasses implement :meth:`_round`.

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
        """Nothing by default: only SSGD acts on gradients."""

    def after_step(self, loss: torch.Tensor | None = None) -> bool:
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
        """A round if local steps were taken since the last one."""
        if self.steps_since_round:
            self.sync_round()

    def metrics(self) -> SyncMetrics:
        return SyncMetrics(self.steps, self.rounds, self.exchange.bytes_sent,
                           self.exchange.seconds)

    def state_dict(self) -> dict[str, Any]:
        """Step and round counters, and the MPI counters so that metrics continue where they
        stopped (the weights are the model's: saved as its own part)."""
        return {"steps": self.steps, "rounds": self.rounds,
                "steps_since_round": self.steps_since_round,
                "comm_bytes": self.exchange.bytes_sent, "comm_s": self.exchange.seconds,
                "comm_calls": self.exchange.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.rounds = int(state["rounds"])
        self.steps_since_round = int(state["steps_since_round"])
        self.exchange.bytes_sent = int(state["comm_bytes"])
        self.exchange.seconds = float(state["comm_s"])
        self.exchange.calls = int(state["comm_calls"])

    def on_resize(self, plan: ResizePlan) -> None:
        """A rank that joins anew counts its own traffic from zero."""
        if plan.sources[self.rank] is None:
            self.exchange.reset_counters()
