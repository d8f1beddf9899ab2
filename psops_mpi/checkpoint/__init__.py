"""HDF5 checkpoints of a training run: the only place that writes training state to disk.

Layout of ``--checkpoint-dir DIR``::

    DIR/step-00001234/rank-00000.h5   one shard per rank: position, velocity, personal and
    DIR/step-00001234/rank-00001.h5   global best, optimizer state, RNG, data-order position
    DIR/step-00001234/metadata.json   written last by rank 0: config, world size, step, round,
                                      global best, sha256 and size of every shard

A checkpoint is complete exactly when its ``step-N`` folder exists with a metadata file (see
:mod:`~psops_mpi.checkpoint.saver` for the commit protocol). Files hold plain arrays and JSON:
loading never runs code. ``python -m psops_mpi.checkpoint export|inspect`` works on them
without MPI.
"""

from psops_mpi.checkpoint.export import export_state_dict, inspect_lines
from psops_mpi.checkpoint.resume import ResumePoint, plan_sources, resume_run
from psops_mpi.checkpoint.saver import Checkpointer
from psops_mpi.checkpoint.store import PAUSE_ENV, complete_checkpoints, read_metadata

__all__ = ["PAUSE_ENV", "Checkpointer", "ResumePoint", "complete_checkpoints",
           "export_state_dict", "inspect_lines", "plan_sources", "read_metadata", "resume_run"]
