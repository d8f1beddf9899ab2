"""Resuming: choose the checkpoint, verify it, plan which old rank each rank continues, and
load every stateful part.

Every rank reads and checks on its own, with no collective until all agreed (world.agree), so
a damaged file gives one line and exit code 2 on every rank, never a hang. Nothing here knows
an algorithm: the caller checks the metadata against its run and says, through ``plan``, which
checkpoint rank each rank continues (a synchroniser's ``plan_resize``). A rank that continues
no old rank loads the shared parts from the plan's template shard and leaves its ``own_parts``
(optimizer, random state) as they were built.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from mpi4py import MPI

from psops_mpi.checkpoint import store
from psops_mpi.checkpoint.parts import Stateful, check_state, unflatten
from psops_mpi.errors import UsageError
from psops_mpi.world import agree


class Plan(Protocol):
    """What ``plan`` returns (psops_mpi.sync.ResizePlan)."""

    sources: list[int | None]
    template: int
    note: str


@dataclass
class Loaded:
    """What one rank read and checked, before anything is changed."""

    folder: Path
    meta: dict[str, Any]
    plan: Plan
    shard: store.Shard
    source: int | None  # the checkpoint rank this rank continues; None: it joins anew

    @property
    def resized(self) -> bool:
        return self.plan.sources != list(range(self.meta["world_size"]))


def choose_folder(resume: str, checkpoint_dir: str | None) -> Path | None:
    """The checkpoint to resume from (``--resume``: auto, none or a folder), or None."""
    if resume == "none":
        return None
    if resume == "auto":
        if not checkpoint_dir:
            return None
        found = store.complete_checkpoints(Path(checkpoint_dir))
        return found[-1][1] if found else None
    folder = Path(resume)
    if not (folder / store.METADATA).is_file():
        hint = ("; it holds checkpoints: pass one of its step-N folders, or use it as "
                "--checkpoint-dir with --resume auto"
                if store.complete_checkpoints(folder) else "")
        raise UsageError(f"--resume {resume}: not a complete checkpoint folder (no "
                         f"{store.METADATA}){hint}")
    return folder


def _check_checkpoint_dir(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use --checkpoint-dir {root}: {exc.strerror}") from None


def read(folder: Path, rank: int, parts: dict[str, Stateful],
         check_meta: Callable[[dict[str, Any], Path], None],
         plan: Callable[[dict[str, Any]], Plan]) -> Loaded:
    """Read and check this rank's part of the checkpoint (no collectives: may fail alone)."""
    meta = store.read_metadata(folder)
    check_meta(meta, folder)
    chosen = plan(meta)
    shards = meta["shards"]
    source = chosen.sources[rank]
    template = source if source is not None else chosen.template
    # Every shard gets checked by some rank, also those no rank continues.
    for index in range(rank, len(shards), len(chosen.sources)):
        if index != template:
            store.verify_shard_file(folder / store.shard_name(index), shards[index]["sha256"],
                                    shards[index]["bytes"])
    path = folder / store.shard_name(template)
    shard = store.read_shard(path, shards[template]["sha256"], shards[template]["bytes"])
    expected = {"rank": template, "world_size": meta["world_size"], "step": meta["step"]}
    for key, value in expected.items():
        if shard.scalars.get(key) != value:
            raise UsageError(f"{path}: {key} is {shard.scalars.get(key)}, the metadata says "
                             f"{value}: the shard belongs to another checkpoint")
    for name, part in parts.items():
        check_state(name, part, unflatten(name, shard), str(path))
    return Loaded(folder, meta, chosen, shard, source)


def restore(loaded: Loaded, parts: dict[str, Stateful], own_parts: Collection[str]) -> None:
    """Load every part from the shard (after every rank agreed: nothing here may fail)."""
    for name, part in parts.items():
        if loaded.source is None and name in own_parts:
            continue
        part.load_state_dict(unflatten(name, loaded.shard))


def resume(comm: MPI.Comm, resume_setting: str, checkpoint_dir: str | None,
           parts: dict[str, Stateful], check_meta: Callable[[dict[str, Any], Path], None],
           plan: Callable[[dict[str, Any]], Plan],
           own_parts: Collection[str] = ()) -> Loaded | None:
    """Resume as ``--resume`` says (a collective); None for a fresh start."""
    rank = comm.Get_rank()

    def load() -> Loaded | None:
        if checkpoint_dir:  # checked now, not at the first save after hours of training
            _check_checkpoint_dir(Path(checkpoint_dir))
        folder = choose_folder(resume_setting, checkpoint_dir)
        return None if folder is None else read(folder, rank, parts, check_meta, plan)

    loaded = agree(comm, load, "the checks of the checkpoint to resume from")
    # Each rank chose by listing the folder itself; a shared file system may show nodes
    # different listings for a while, and ranks resuming different steps would deadlock.
    choices = comm.allgather(None if loaded is None else str(loaded.folder))
    agree(comm, lambda: same_choice(choices), "the choice of the checkpoint to resume from")
    if loaded is not None:
        restore(loaded, parts, own_parts)
    return loaded


def same_choice(choices: list[str | None]) -> None:
    """Raise UsageError unless every rank chose the same checkpoint."""
    if len(set(choices)) > 1:
        first_rank: dict[str | None, int] = {}
        for rank, choice in enumerate(choices):
            first_rank.setdefault(choice, rank)
        seen = ", ".join(f"rank {r}: {c or 'none'}" for c, r in first_rank.items())
        raise UsageError(f"ranks chose different checkpoints to resume from ({seen}); the file "
                         "system shows the nodes different files: pass --resume PATH")
