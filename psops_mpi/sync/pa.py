"""Periodic averaging (local SGD): one Allreduce of the flat weights every ``sync_every`` steps."""

from __future__ import annotations

from psops_mpi.flat import all_finite
from psops_mpi.sync.base import NonFiniteStop
from psops_mpi.sync.flat_sync import FlatSynchronizer


class PASync(FlatSynchronizer):
    """Replace every rank's weights by their mean over all ranks once per period.

    A rank whose weights are not finite (one NaN batch is enough) is left out of the mean and
    takes it, with fresh optimizer state (counted in ``restarts``); the flag that says so
    travels in a slot after the weights, in the same Allreduce. PA keeps no earlier weights,
    so a round at which no rank's weights are finite has nothing to go back to: it raises
    :class:`NonFiniteStop` at once.
    """

    def _round(self) -> None:
        finite = all_finite(self.flat.data)
        if self.exchange.allreduce_finite_mean_(self.flat.packed, finite) == 0:
            raise NonFiniteStop(self.steps, "every rank's weights are non-finite, and periodic "
                                            "averaging keeps no earlier weights to go back to",
                                 at_limit=False)
        if not finite:
            self._restart()
        self._count_sync(True)
        self.average_buffers()
