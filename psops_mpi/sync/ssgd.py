"""Synchronous SGD: one Allreduce of the flat gradient every step."""

from __future__ import annotations

from psops_mpi.sync.flat_sync import FlatSynchronizer


class SSGDSync(FlatSynchronizer):
    """Average gradients over all ranks after every backward pass (``sync_every`` is unused:
    weights never diverge, so only BatchNorm statistics are averaged, at :meth:`flush`)."""

    def after_backward(self) -> None:
        self.flat.attach_grads()
        self.exchange.allreduce_mean_(self.flat.grad)

    def _round_due(self) -> bool:
        return False  # gradients were averaged already; rounds happen only at flush()

    def _round(self) -> None:
        self.average_buffers()
