"""Writing checkpoints during training: when (steps, wall-clock, the end), how (atomically,
one shard per rank, metadata last) and pruning to the last N.

The commit protocol: rank 0 makes ``DIR/.tmp-step-N/``; every rank writes its shard there
(under a temporary name, fsynced, then renamed) and sends rank 0 its checksum; rank 0 writes
``metadata.json`` (same way), renames the folder to ``DIR/step-N`` and fsyncs ``DIR``. A crash
at any moment leaves either no ``step-N`` at all or a complete one; readers only ever list
``step-N`` folders that hold a metadata file.
"""

from __future__ import annotations

import math
import shutil
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from psops_mpi.checkpoint import store
from psops_mpi.checkpoint.state import LoopPosition, capture, model_layout
from psops_mpi.sync import PSOSync

if TYPE_CHECKING:
    from psops_mpi.checkpoint.resume import ResumePoint
    from psops_mpi.train import Run


class Checkpointer:
    """Saves the run's state when due; does nothing when no ``--checkpoint-dir`` was given.

    Args:
        run: the training run (config, world, synchroniser, data).
        total_steps: steps of the whole run; the checkpoint after the last one is written by
            :meth:`final`, after the end-of-epoch round.
        resumed: where the run resumed, so an unchanged state is not written twice.
    """

    def __init__(self, run: Run, total_steps: int, resumed: ResumePoint) -> None:
        cfg = run.config
        self.run = run
        self.root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.every = cfg.checkpoint_every
        self.every_s = cfg.checkpoint_every_min * 60.0
        self.total_steps = total_steps
        self.last_saved_step = resumed.step if resumed.unchanged else None
        self.last_time = time.monotonic()
        self.seconds = 0.0  # spent writing, for the user to weigh against training

    def after_step(self, step: int, epoch: int, epoch_sums: torch.Tensor, start: float) -> None:
        """Called once per training step on every rank; writes a checkpoint when one is due."""
        if self.root is None or step >= self.total_steps:
            return
        due = self.every > 0 and step % self.every == 0
        # The clock is read at round boundaries only: each look is a broadcast, and one per
        # step would undo what PA and PSO-PS save by synchronising every n steps.
        if self.every_s > 0 and step % self.run.config.sync_every == 0:
            due = self._clock_due() or due
        if due:
            self.save(self._position(step, epoch, epoch_sums, start, evaluated=False))

    def final(self, step: int, epoch: int, epoch_sums: torch.Tensor, start: float) -> None:
        """The checkpoint at the end of training (skipped if this state is saved already)."""
        if self.root is not None and step != self.last_saved_step:
            self.save(self._position(step, epoch, epoch_sums, start, evaluated=True))

    def _clock_due(self) -> bool:
        """Rank 0 reads its clock and decides for all: the ranks' clocks differ, and every
        rank must take part in the same checkpoints."""
        due = time.monotonic() - self.last_time >= self.every_s
        comm = self.run.world.comm
        return bool(comm.bcast(due, root=0)) if comm.Get_size() > 1 else due

    def _position(self, step: int, epoch: int, epoch_sums: torch.Tensor, start: float,
                  evaluated: bool) -> LoopPosition:
        in_epoch = step - epoch * self.run.batches.steps_per_epoch
        return LoopPosition(step, epoch, in_epoch, epoch_sums, time.perf_counter() - start,
                            evaluated)

    def save(self, position: LoopPosition) -> Path:
        """Write one checkpoint (a collective: every rank calls it at the same step)."""
        began = time.perf_counter()
        world, sync = self.run.world, self.run.sync
        assert self.root is not None and sync is not None
        name = store.step_dir_name(position.step)
        tmp = self.root / (store.TMP_PREFIX + name)
        if world.is_root:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash while writing this step
            tmp.mkdir(parents=True)
        if world.world_size > 1:
            world.comm.Barrier()  # the folder exists before any rank writes into it
        shard = capture(sync, position)
        path = tmp / store.shard_name(world.rank)
        sha256, size = store.write_shard(path, shard, position.step)
        entry = {"rank": world.rank, "file": path.name, "bytes": size, "sha256": sha256,
                 "pbest_fitness": shard.scalars.get("swarm.pbest_fitness")}
        entries = world.comm.gather(entry, root=0) if world.world_size > 1 else [entry]
        final = self.root / name
        if world.is_root:
            self._commit(tmp, final, self._metadata(position, entries))
            self._prune()
        self.last_saved_step = position.step
        self.last_time = time.monotonic()
        self.seconds += time.perf_counter() - began
        return final

    def _metadata(self, position: LoopPosition, entries: list[dict[str, Any]]) -> dict:
        run, sync = self.run, self.run.sync
        assert sync is not None
        swarm = sync.swarm if isinstance(sync, PSOSync) else None
        cfg = run.config
        return {
            "format": store.FORMAT, "version": store.VERSION,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "step": position.step, "epoch": position.epoch,
            "step_in_epoch": position.step_in_epoch,
            "steps_per_epoch": run.batches.steps_per_epoch, "evaluated": position.evaluated,
            "round": sync.rounds, "world_size": run.world.world_size,
            "algo": cfg.algo, "dataset": cfg.dataset, "model": cfg.model,
            "input_shape": list(run.dataset.input_shape),
            "num_classes": run.dataset.num_classes, "num_params": sync.flat.numel,
            "dtype": str(sync.flat.data.dtype).removeprefix("torch."),
            "gbest": {"fitness": swarm.gbest_fitness if swarm else math.inf,
                      "owner": swarm.gbest_owner if swarm else -1},
            "shards": entries, "layout": model_layout(sync), "config": cfg.to_dict(),
            "versions": {"torch": torch.__version__},
        }

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
        """Keep the newest ``--keep-last`` complete checkpoints; remove leftovers of writes
        that a crash interrupted (no write is in progress while rank 0 is here)."""
        assert self.root is not None
        complete = store.complete_checkpoints(self.root)
        for _, folder in complete[: max(0, len(complete) - self.run.config.keep_last)]:
            shutil.rmtree(folder)
        for entry in self.root.iterdir():
            if entry.name.startswith(store.TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
