"""What psops_mpi's own synchronisers share: flat buffers, the exchange, step and round
counting, the non-finite guard's bookkeeping, and the state every one of them checkpoints."""

from __future__ import annotations

from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.exchange import Exchange
from psops_mpi.flat import FlatBuffers, FlatParams, all_finite
from psops_mpi.sync.base import NonFiniteStop, ResizePlan, Synchronizer, SyncMetrics

MAX_NONFINITE = 10  # default: consecutive syncs with no finite rank before the job stops


class FlatSynchronizer(Synchronizer):
    """Start every rank from rank 0's weights; count steps and rounds; run a round every
    ``sync_every`` steps. Subclasses implement :meth:`_round`.

    Args:
        model: the model this rank trains; its parameters become views of one flat buffer.
        optimizer: the local optimizer over ``model``'s parameters.
        comm: the communicator of the ranks that train together (default COMM_WORLD).
        sync_every: local steps between two rounds.
        cuda_aware: hand CUDA buffers to MPI directly (only if the MPI library supports it).
        max_nonfinite: raise :class:`NonFiniteStop` after this many consecutive syncs (rounds;
            SSGD: steps) skipped because no rank had finite values.
    """

    extra_slots = 1  # slots after the weights in the flat buffer: the finite flag (PSO-PS:
    # the fitness)
    skipped_name = "skipped_rounds"  # the metric counting syncs that no rank could take part in
    nonfinite = "no rank had finite weights"  # why a sync was skipped, in words
    sync_unit = "rounds"
    # state keys that checkpoints of psops_mpi 0.2.0 lack; they load as 0
    optional_state_keys = ("restarts", "skipped", "consecutive_skipped")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 comm: MPI.Comm | None = None, sync_every: int = 1,
                 cuda_aware: bool = False, *, max_nonfinite: int = MAX_NONFINITE) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be a positive integer, got {sync_every}")
        if max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be a positive integer, got {max_nonfinite}")
        self.model = model
        self.optimizer = optimizer
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.sync_every = sync_every
        self.max_nonfinite = max_nonfinite
        self.flat = FlatParams(model, extra=self.extra_slots)
        self.buffers = FlatBuffers(model, extra=1)
        self.exchange = Exchange(self.comm, cuda_aware=cuda_aware)
        self.exchange.reserve(self._largest_message(), self.flat.packed)
        self.steps = 0
        self.rounds = 0
        self.steps_since_round = 0
        self.restarts = 0  # rounds at which this rank's values were not finite (restarted)
        self.skipped = 0  # syncs skipped on every rank: no rank had finite values
        self.consecutive_skipped = 0
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

    def after_backward(self) -> bool:
        """Nothing by default: only SSGD acts on gradients."""
        return True

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
        """Run one synchronisation round now (every rank first waits for all to arrive)."""
        self.exchange.arrive(lambda: f"round {self.rounds + 1} (step {self.steps})")
        self._round()
        self.rounds += 1
        self.steps_since_round = 0
        self._stop_if_stuck(self.steps)

    def _round(self) -> None:
        raise NotImplementedError

    # ---- the non-finite guard (policy; the mechanism is Exchange.allreduce_finite_mean_)

    def _restart(self) -> None:
        """This rank's values were not finite and it took what the finite ranks agreed on:
        its optimizer state (momentum, no longer finite either) starts afresh."""
        self.restarts += 1
        self.optimizer.state.clear()

    def _count_sync(self, any_finite: bool) -> None:
        """Count a sync (round, or SSGD step) that every rank took or every rank skipped."""
        if any_finite:
            self.consecutive_skipped = 0
        else:
            self.skipped += 1
            self.consecutive_skipped += 1

    def _stop_if_stuck(self, step: int) -> None:
        if self.consecutive_skipped >= self.max_nonfinite:
            raise NonFiniteStop(step, f"{self.nonfinite} in {self.consecutive_skipped} "
                                      f"consecutive {self.sync_unit}, each skipped on every rank")

    def average_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm statistics) over the ranks where they are
        finite; a rank whose statistics are not takes that mean (they stay as they are when
        no rank's are finite)."""
        packed, data = self.buffers.packed, self.buffers.data
        if packed is None or data is None:
            return
        finite = all_finite(data)
        saved = None if finite else data.clone()
        if self.exchange.allreduce_finite_mean_(packed, finite) == 0 and saved is not None:
            data.copy_(saved)

    def flush(self) -> None:
        """A round if local steps were taken since the last one."""
        if self.steps_since_round:
            self.sync_round()

    def metrics(self) -> SyncMetrics:
        return SyncMetrics(self.steps, self.rounds, self.exchange.bytes_sent,
                           self.exchange.seconds, counts={"restarts": self.restarts},
                           shared_counts={self.skipped_name: self.skipped})

    def state_dict(self) -> dict[str, Any]:
        """Step and round counters, the non-finite guard's, and the MPI counters so that
        metrics continue where they stopped (the weights are the model's: saved as its own
        part)."""
        return {"steps": self.steps, "rounds": self.rounds,
                "steps_since_round": self.steps_since_round,
                "comm_bytes": self.exchange.bytes_sent, "comm_s": self.exchange.seconds,
                "comm_calls": self.exchange.calls, "restarts": self.restarts,
                "skipped": self.skipped, "consecutive_skipped": self.consecutive_skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.rounds = int(state["rounds"])
        self.steps_since_round = int(state["steps_since_round"])
        self.exchange.bytes_sent = int(state["comm_bytes"])
        self.exchange.seconds = float(state["comm_s"])
        self.exchange.calls = int(state["comm_calls"])
        self.restarts = int(state.get("restarts", 0))
        self.skipped = int(state.get("skipped", 0))
        self.consecutive_skipped = int(state.get("consecutive_skipped", 0))

    def on_resize(self, plan: ResizePlan) -> None:
        """A rank that joins anew counts its own traffic and restarts from zero."""
        if plan.sources[self.rank] is None:
            self.exchange.reset_counters()
            self.restarts = 0
