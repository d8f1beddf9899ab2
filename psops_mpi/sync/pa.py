"""Periodic averaging (local SGD): one Allreduce of the flat weights every ``sync_every`` steps."""

from __future__ import annotations

from psops_mpi.sync.flat_sync import FlatSynchronizer


class PASync(FlatSynchronizer):
    """Replace every rank's weights by their mean over all ranks once per period."""

    def _round(self) -> None:
        self.exchange.allreduce_mean_(self.flat.data)
        self.average_buffers()
