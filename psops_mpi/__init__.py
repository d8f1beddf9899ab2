"""psops_mpi: communication-efficient data-parallel training over MPI.

Public API: the synchronisers a training loop uses, and the settings they take.
"""

from psops_mpi.config import PSOConfig, TrainConfig, UsageError
from psops_mpi.sync import PASync, PSOSync, SSGDSync, Synchronizer, make_sync

__all__ = [
    "PASync",
    "PSOConfig",
    "PSOSync",
    "SSGDSync",
    "Synchronizer",
    "TrainConfig",
    "UsageError",
    "make_sync",
]
__version__ = "0.1.0"
