"""Writing checkpoints: when (every K steps, every so many minutes, at the end), how
(atomically, one shard per rank, metadata last) and pruning to the last N.

The commit protocol: rank 0 makes ``DIR/.tmp-step-N/``; every rank writes its shard there
(under a temporary name, fsynced, then renamed) and sends rank 0 its checksum; rank 0 writes
``metadata.json`` (same way), renames the folder to ``DIR/step-N`` and fsyncs ``DIR``. A crash
at any moment leaves either no ``step-N`` at all or a complete one; readers only ever list
``step-N`` folders that hold a metadata file.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mpi4py import MPI

from psops_mpi.checkpoint import store
from psops_mpi.checkpoint.parts import Stateful, flatten


class Checkpointer:
    """Saves named stateful parts when due; does nothing without a folder.

    Args:
        root: the checkpoint folder (``--checkpoint-dir``), or None for no checkpoints.
        comm: the ranks that checkpoint together; each writes its own shard.
        parts: the run's stateful parts by name (model, optimizer, sync, loop, rng, ...).
        metadata: rank 0's description of the run at this moment (JSON values, with the
            ``progress`` that orders checkpoints: epochs done, fractions included).
        rank_summary: this rank's JSON values for its entry in the metadata.
        every: steps between two checkpoints (0: only the final one).
        every_min: minutes of wall-clock between two checkpoints (0: off).
        keep_last: complete checkpoints kept; older ones are pruned.
    """

    def __init__(self, root: Path | None, comm: MPI.Comm, parts: dict[str, Stateful],
                 metadata: Callable[[], dict[str, Any]],
                 rank_summary: Callable[[], dict[str, Any]], *, every: int = 0,
                 every_min: float = 0.0, keep_last: int = 3) -> None:
        self.root, self.comm, self.parts = root, comm, parts
        self.metadata, self.rank_summary = metadata, rank_summary
        self.every, self.every_s, self.keep_last = every, every_min * 60.0, keep_last
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.last_saved_step: int | None = None
        self.last_time = time.monotonic()
        self.seconds = 0.0  # spent writing, for the user to weigh against training

    def after_step(self, step: int, poll_clock: bool) -> None:
        """Called after every training step but the last, on every rank; writes a checkpoint
        when one is due. The clock is read only where ``poll_clock`` (the loop says when):
        each look is a broadcast, and one per step would undo what rare rounds save."""
        if self.root is None:
            return
        due = self.every > 0 and step % self.every == 0
        if self.every_s > 0 and poll_clock:
            due = self._clock_due() or due
        if due:
            self.save(step)

    def final(self, step: int) -> None:
        """The checkpoint at the end of training (skipped if this state is saved already)."""
        if self.root is not None and step != self.last_saved_step:
            self.save(step)

    def mark_saved(self, step: int) -> None:
        """The state at ``step`` is on disk already (a resume that changed nothing)."""
        self.last_saved_step = step

    def _clock_due(self) -> bool:
        """Rank 0 reads its clock and decides for all: the ranks' clocks differ, and every
        rank must take part in the same checkpoints."""
        due = time.monotonic() - self.last_time >= self.every_s
        return bool(self.comm.bcast(due, root=0)) if self.world_size > 1 else due

    def save(self, step: int) -> Path:
        """Write one checkpoint (a collective: every rank calls it at the same step)."""
        assert self.root is not None
        began = time.perf_counter()
        name = store.step_dir_name(step)
        tmp = self.root / (store.TMP_PREFIX + name)
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing this step
            tmp.mkdir(parents=True)
        if self.world_size > 1:
            self.comm.Barrier()  # the folder exists before any rank writes into it
        shard = store.Shard(scalars={"rank": self.rank, "world_size": self.world_size,
                                     "step": step})
        for part_name, part in self.parts.items():
            flatten(part_name, part.state_dict(), shard)
        path = tmp / store.shard_name(self.rank)
        sha256, size = store.write_shard(path, shard, step)
        entry = {"rank": self.rank, "file": path.name, "bytes": size, "sha256": sha256,
                 "summary": self.rank_summary()}
        entries = self.comm.gather(entry, root=0) if self.world_size > 1 else [entry]
        final = self.root / name
        if self.rank == 0:
            meta = {"format": store.FORMAT, "version": store.VERSION,
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "step": step, **self.metadata(), "world_size": self.world_size,
                    "shards": entries}
            self._commit(tmp, final, meta)
            self._prune()
        self.last_saved_step = step
        self.last_time = time.monotonic()
        self.seconds += time.perf_counter() - began
        return final

    def _commit(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        """Rank 0, once every shard is on disk: metadata, then the folder's final name."""
        store.fsync_dir(tmp)
        store.write_metadata(tmp, meta)
        store.fsync_dir(tmp)
        if final.exists():  # the same step written before (a resume from an older one)
            old = final.with_name(store.TMP_PREFIX + "old-" + final.name)
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old)
        tmp.rename(final)
        store.fsync_dir(final.parent)

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; remove leftovers of writes that
        a crash interrupted (no write is in progress while rank 0 is here)."""
        assert self.root is not None
        complete = store.complete_checkpoints(self.root)
        for _, folder in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(folder)
        for entry in self.root.iterdir():
            if entry.name.startswith(store.TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
