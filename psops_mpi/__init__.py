"""psops_mpi: communication-efficient data-parallel training over MPI.

Public API: the synchronisers a training loop uses, and the settings they take. Importing
the package does not load MPI: the synchronisers (which need mpi4py) load on first use.
"""

from __future__ import annotations

from typing import Any

from psops_mpi.config import PSOConfig, TrainConfig
from psops_mpi.errors import UsageError

__all__ = [
    "NonFiniteStop",
    "PASync",
    "PSOConfig",
    "PSOSync",
    "SSGDSync",
    "SlowMoSync",
    "SyncMetrics",
    "Synchronizer",
    "TrainConfig",
    "UsageError",
    "make_sync",
]
__version__ = "0.2.0"
_FROM_SYNC = {"NonFiniteStop", "PASync", "PSOSync", "SSGDSync", "SlowMoSync", "SyncMetrics",
              "Synchronizer", "make_sync"}


def __getattr__(name: str) -> Any:
    if name in _FROM_SYNC:
        from psops_mpi import sync

        return getattr(sync, name)
    raise AttributeError(f"module 'psops_mpi' has no attribute {name!r}")
