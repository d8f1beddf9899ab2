"""HDF5 checkpoints of a training run: the only place that writes training state to disk.

Layout of ``--checkpoint-dir DIR``::

    DIR/step-00001234/rank-00000.h5   one shard per rank: every stateful part of the run
    DIR/step-00001234/rank-00001.h5   (model, optimizer, synchroniser, loop, RNG; see parts)
    DIR/step-00001234/metadata.json   written last by rank 0: the run's description, config,
                                      world size, step, the answer, sha256 and size per shard

A checkpoint is complete exactly when its ``step-N`` folder exists with a metadata file (see
:mod:`~psops_mpi.checkpoint.saver` for the commit protocol). Files hold plain arrays and JSON:
loading never runs code. The package knows no algorithm: it saves and loads named parts.

Importing this package needs neither MPI nor a GPU: ``python -m psops_mpi.checkpoint
export|inspect`` works where mpi4py is absent. Writing and resuming (``saver``, ``resume``)
are imported from their modules by the training loop.
"""

from psops_mpi.checkpoint.export import export_state_dict, inspect_lines
from psops_mpi.checkpoint.store import PAUSE_ENV, complete_checkpoints, read_metadata

__all__ = ["PAUSE_ENV", "complete_checkpoints", "export_state_dict", "inspect_lines",
           "read_metadata"]
