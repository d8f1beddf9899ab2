"""Writing checkpoints: when (every K steps, every so many minutes, at the end), how
(atomically, one shard per rank, metadata last) and pruning to the last N.

The commit protocol: rank 0 makes ``DIR/.tmp-step-N/``; every rank writes its shard there
(under a temporary name, fsynced, then renamed) and sends rank 0 its checksum; rank 0 writes
``metadata.json`` (same way), renames the folder to ``DIR/step-N`` and fsyncs ``DIR``. A crash
at any moment leaves either no ``step-N`` at all or a complete one; readers only ever list
``step-N`` folders that hold a metadata file.

A write that fails with an OS error (a full or read-only file system, a quota) on any rank
fails on every rank alike: rank 0 learns of it through the gather of checksums and broadcasts
the outcome, removes the partial folder and prints one line naming the file, the reason and
the newest complete checkpoint. Training goes on; the caller decides what a failure means
(the final checkpoint's: a non-zero exit code).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mpi4py import MPI

from psops_mpi.checkpoint import store
from psops_mpi.checkpoint.parts import Stateful, flatten
from psops_mpi.stall import StallWatch


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

    Attributes:
        report: where rank 0 tells the user of each checkpoint written (one line with its
            folder, size and seconds), or None for silence; the loop sets it to its progress
            lines, so ``--quiet`` silences it as it does the epoch lines.
    """

    def __init__(self, root: Path | None, comm: MPI.Comm, parts: dict[str, Stateful],
                 metadata: Callable[[], dict[str, Any]],
                 rank_summary: Callable[[], dict[str, Any]], *, every: int = 0,
                 every_min: float = 0.0, keep_last: int = 3) -> None:
        self.root, self.comm, self.parts = root, comm, parts
        self.metadata, self.rank_summary = metadata, rank_summary
        self.every, self.every_s, self.keep_last = every, every_min * 60.0, keep_last
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.watch = StallWatch.of(comm)
        self.last_saved_step: int | None = None
        self.last_saved: Path | None = None
        self.last_error: str | None = None  # why the last checkpoint failed (None: it did not)
        self.failures = 0
        self.last_time = time.monotonic()
        self.seconds = 0.0  # spent writing, for the user to weigh against training
        self.report: Callable[[str], None] | None = None

    def after_step(self, step: int, timed: bool = False) -> Path | None:
        """Called after every training step but the last, on every rank; writes a checkpoint
        when one is due: every ``every`` steps, or when ``timed`` (the ranks agreed that
        :meth:`clock_due` on rank 0 said so, or that the run stops here). Returns the
        checkpoint written, if any."""
        if self.root is None:
            return None
        if timed or (self.every > 0 and step % self.every == 0):
            return self.save(step)
        return None

    def clock_due(self) -> bool:
        """Whether ``every_min`` passed since the last checkpoint, by this rank's clock (the
        ranks' clocks differ: the loop agrees on rank 0's)."""
        return (self.root is not None and self.every_s > 0
                and time.monotonic() - self.last_time >= self.every_s)

    def final(self, step: int) -> bool:
        """The checkpoint at the end of training (skipped if this state is saved already);
        False if it could not be written."""
        if self.root is not None and step != self.last_saved_step:
            return self.save(step, required="final") is not None
        return True

    def at_stop(self, step: int) -> Path | None:
        """The checkpoint of a run that stops early at ``step`` (on a signal): this state's
        folder, or None when there is no folder or the write failed."""
        if self.root is None:
            return None
        if step == self.last_saved_step and self.last_saved is not None:
            return self.last_saved
        return self.save(step, required="stop")

    def mark_saved(self, step: int) -> None:
        """The state at ``step`` is on disk already (a resume that changed nothing)."""
        self.last_saved_step = step

    def save(self, step: int, required: str | None = None) -> Path | None:
        """Write one checkpoint (a collective: every rank calls it at the same step). Returns
        its folder, or None on every rank if an OS error on any rank stopped it (rank 0 has
        then printed one line, a warning for a periodic one, an error for one the run
        ``required`` (its name: "final", "stop"); :attr:`last_error` says why)."""
        assert self.root is not None
        self.watch.arrive(f"checkpoint step {step}")
        began = time.perf_counter()
        name = store.step_dir_name(step)
        tmp = self.root / (store.TMP_PREFIX + name)
        failed = self._attempt(tmp, lambda: self._make_folder(tmp)) if self.rank == 0 else None
        if self.world_size > 1:  # the folder exists (or not, for all) before any rank writes
            failed = self.comm.bcast(failed, root=0)
        entry: dict[str, Any] = {"rank": self.rank}
        if failed is None:
            entry = self._write_shard(tmp, step)
        if self.world_size > 1:
            self.watch.arrive(f"checkpoint step {step}, after writing the shards")
        entries = self.comm.gather(entry, root=0) if self.world_size > 1 else [entry]
        final_dir = self.root / name
        num_bytes = 0
        if self.rank == 0:
            assert entries is not None
            failed = failed or next((e["error"] for e in entries if "error" in e), None)
            if failed is None:
                failed = self._attempt(tmp, lambda: self._commit(tmp, final_dir,
                                                                 self._meta(step, entries)))
            if failed is None:
                num_bytes = sum(e["bytes"] for e in entries)
                self._prune()
            else:
                shutil.rmtree(tmp, ignore_errors=True)  # the partial files, all ranks' alike
        if self.world_size > 1:
            failed = self.comm.bcast(failed, root=0)
        self.last_time = time.monotonic()  # a failure too: the next try is a period away
        took = time.perf_counter() - began
        self.seconds += took
        if failed is not None:
            self._failed(final_dir, failed, required)
            return None
        if self.rank == 0 and self.report is not None:
            self.report(f"psops_mpi: checkpoint {final_dir} written: {_megabytes(num_bytes)} MB "
                        f"in {took:.1f} s")
        self.last_saved_step, self.last_saved, self.last_error = step, final_dir, None
        return final_dir

    # ---- the parts of a save

    def _make_folder(self, tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing this step
        tmp.mkdir(parents=True)

    def _write_shard(self, tmp: Path, step: int) -> dict[str, Any]:
        """This rank's shard: its entry for the metadata, or ``{"error": ...}``."""
        shard = store.Shard(scalars={"rank": self.rank, "world_size": self.world_size,
                                     "step": step})
        for part_name, part in self.parts.items():
            flatten(part_name, part.state_dict(), shard)
        path = tmp / store.shard_name(self.rank)
        written: list[tuple[str, int]] = []
        failed = self._attempt(path, lambda: written.append(store.write_shard(path, shard, step)))
        if failed is not None:
            return {"rank": self.rank, "error": f"{failed} (rank {self.rank})"}
        sha256, size = written[0]
        return {"rank": self.rank, "file": path.name, "bytes": size, "sha256": sha256,
                "summary": self.rank_summary()}

    def _meta(self, step: int, entries: list[dict[str, Any]]) -> dict[str, Any]:
        return {"format": store.FORMAT, "version": store.VERSION,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "step": step, **self.metadata(), "world_size": self.world_size,
                "shards": entries}

    def _commit(self, tmp: Path, final: Path, meta: dict[str, Any]) -> None:
        """Rank 0, once every shard is on disk: metadata, then the folder's final name."""
        store.fsync_dir(tmp)
        store.write_metadata(tmp, meta)
        store.fsync_dir(tmp)
        if final.exists():  # the same step written before (a resume from an older one)
            old = final.with_name(store.TMP_PREFIX + "old-" + final.name)
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        tmp.rename(final)  # the commit: from here on the checkpoint exists
        # Only a crash of the node before the rename reaches the disk could lose it, and then
        # readers never see it: not a reason to report a good checkpoint as failed.
        with contextlib.suppress(OSError):
            store.fsync_dir(final.parent)

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` complete checkpoints; remove leftovers of writes that
        a crash interrupted (no write is in progress while rank 0 is here). A folder that
        cannot be removed is left for the next time, with a line saying so."""
        assert self.root is not None
        try:
            complete = store.complete_checkpoints(self.root)
            for _, folder in complete[: max(0, len(complete) - self.keep_last)]:
                shutil.rmtree(folder)
            for entry in self.root.iterdir():
                if entry.name.startswith(store.TMP_PREFIX) and entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
        except OSError as exc:
            _warn(f"psops_mpi: warning: cannot remove old checkpoints in {self.root}: "
                  f"{describe_os_error(exc, self.root)}")

    @staticmethod
    def _attempt(path: Path, action: Callable[[], object]) -> str | None:
        """Run ``action``; an OS error becomes one line naming the file and the reason."""
        try:
            action()
        except OSError as exc:
            return describe_os_error(exc, path)
        return None

    def _failed(self, folder: Path, reason: str, required: str | None) -> None:
        self.failures += 1
        self.last_error = f"checkpoint {folder} not written: {reason}"
        if self.rank != 0:
            return
        assert self.root is not None
        complete = store.complete_checkpoints(self.root)
        newest = (f"the newest complete checkpoint is {complete[-1][1]}" if complete
                  else "there is no complete checkpoint")
        if required:
            _warn(f"psops_mpi: error: the {required} {self.last_error}; partial files removed; "
                  f"{newest}")
        else:
            _warn(f"psops_mpi: warning: {self.last_error}; partial files removed; {newest}; "
                  "training goes on and the next checkpoint tries again")


def describe_os_error(exc: OSError, path: Path) -> str:
    """``FILE: reason`` for an OS error, the reason as the C library words it (h5py folds
    its whole error stack into the message; the errno says the same in four words)."""
    where = exc.filename or path
    if exc.errno:
        return f"{where}: {os.strerror(exc.errno)}"
    return f"{where}: {' '.join(str(exc).split())[:200]}"


def _megabytes(num_bytes: int) -> str:
    """Megabytes (10^6 bytes) in words short enough for a log line; small ones keep two
    significant digits rather than read as 0.0."""
    mb = num_bytes / 1e6
    return f"{mb:.1f}" if mb >= 1 else f"{mb:.2g}"


def _warn(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
