"""Resuming a run: choose the checkpoint, verify it, map its particles onto this job's ranks,
and restore every rank's state.

Every rank reads and checks on its own, with no collective until all agreed (world.agree), so
a damaged file gives one line and exit code 2 on every rank, never a hang. At another world
size (unless ``--resume-strict``):

- fewer ranks: PSO-PS keeps the particles with the best personal fitness; PA and SSGD keep
  ranks 0..P-1;
- more ranks: PSO-PS starts each new particle at the global best with zero velocity, the
  global best as its personal best and a fresh optimizer state; PA and SSGD copy rank
  ``r mod P_old`` whole (SSGD's ranks must stay identical);
- the data order continues at the same epoch and the same fraction of it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from psops_mpi.checkpoint import state as st
from psops_mpi.checkpoint import store
from psops_mpi.config import UsageError
from psops_mpi.sync import PSOSync
from psops_mpi.world import agree

if TYPE_CHECKING:
    from psops_mpi.train import Run

IDENTITY = ("algo", "dataset", "model")  # another value makes a resume meaningless
# Settings whose change is expected on a resume and not worth a note.
RUN_LOCAL = {"resume", "resume_strict", "checkpoint_dir", "metrics_out", "quiet", "threads",
             "device", "cuda_aware", "allow_gpu_sharing", "data_dir"}


@dataclass
class ResumePoint:
    """Where the training loop starts: step, epoch, step within it, that epoch's sums."""

    step: int = 0
    epoch: int = 0
    start_step: int = 0
    epoch_sums: torch.Tensor | None = None
    elapsed_s: float = 0.0
    folder: Path | None = None
    unchanged: bool = False  # the state is exactly the checkpoint's (no resize)
    evaluated: bool = False  # the checkpoint was taken after its epoch's evaluation (the final)


@dataclass
class Loaded:
    """What one rank read and checked, before anything is changed."""

    folder: Path
    meta: dict[str, Any]
    sources: list[int | None]  # per new rank: the old shard it continues, None = new particle
    shard: st.Shard
    notes: list[str] = field(default_factory=list)


def choose_folder(resume: str, checkpoint_dir: str | None) -> Path | None:
    """The checkpoint to resume from, or None for a fresh start."""
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


def plan_sources(pbest_fitness: list[float], new_size: int, pso: bool) -> list[int | None]:
    """For each rank of the new job, the old particle it continues (None: a new particle)."""
    old_size = len(pbest_fitness)
    if new_size == old_size:
        return list(range(new_size))
    if not pso:
        return [r % old_size for r in range(new_size)]
    if new_size > old_size:
        return [*range(old_size), *([None] * (new_size - old_size))]
    ranked = sorted(range(old_size), key=lambda r: (_finite_or_inf(pbest_fitness[r]), r))
    return sorted(ranked[:new_size])


def _finite_or_inf(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def check_compatible(meta: dict[str, Any], run: Run, folder: Path) -> None:
    """Refuse a checkpoint this run cannot continue meaningfully."""
    cfg, sync = run.config, run.sync
    assert sync is not None
    mine = {k: getattr(cfg, k) for k in IDENTITY}
    theirs = {k: meta[k] for k in IDENTITY}
    if mine != theirs:
        raise UsageError(
            f"checkpoint {folder} is from a {theirs['algo']} run on {theirs['dataset']} with "
            f"model {theirs['model']}; this run is {mine['algo']} on {mine['dataset']} with "
            f"{mine['model']}: use the same settings, --resume none or another --checkpoint-dir")
    if meta["num_params"] != sync.flat.numel:
        raise UsageError(f"checkpoint {folder} holds {meta['num_params']:,} parameters per "
                         f"particle; model {cfg.model} here has {sync.flat.numel:,}")
    layout = st.model_layout(sync)
    if [list(p) for p in meta["layout"].get("params", [])] != [list(p) for p in layout["params"]]:
        raise UsageError(f"checkpoint {folder}: the model's parameter names or shapes differ "
                         f"from those of {cfg.model} here")
    if meta["epoch"] >= cfg.epochs:
        raise UsageError(f"checkpoint {folder} is in epoch {meta['epoch'] + 1}; --epochs "
                         f"{cfg.epochs} ends before it")
    if meta["world_size"] != run.world.world_size and cfg.resume_strict:
        raise UsageError(f"checkpoint {folder} was written by {meta['world_size']} rank(s), "
                         f"this job has {run.world.world_size}; --resume-strict refuses to "
                         "resume at another world size")


def load(run: Run) -> Loaded | None:
    """Read and check this rank's part of the checkpoint (no collectives: may fail alone)."""
    cfg, world, sync = run.config, run.world, run.sync
    assert sync is not None
    if cfg.checkpoint_dir:
        _check_checkpoint_dir(Path(cfg.checkpoint_dir))
    folder = choose_folder(cfg.resume, cfg.checkpoint_dir)
    if folder is None:
        return None
    meta = store.read_metadata(folder)
    check_compatible(meta, run, folder)
    shards = meta["shards"]
    pso = isinstance(sync, PSOSync)
    sources = plan_sources([store.fitness(s.get("pbest_fitness")) for s in shards],
                           world.world_size, pso)
    mine = sources[world.rank]
    template = mine if mine is not None else _gbest_shard(meta)
    # Every shard gets checked by some rank, also those no rank continues.
    for index in range(world.rank, len(shards), world.world_size):
        if index != template:
            store.verify_shard_file(folder / store.shard_name(index), shards[index]["sha256"],
                                    shards[index]["bytes"])
    path = folder / store.shard_name(template)
    shard = store.read_shard(path, shards[template]["sha256"], shards[template]["bytes"])
    st.check_shard(shard, sync, str(path))
    expected = {"rank": template, "world_size": meta["world_size"], "step": meta["step"]}
    for key, value in expected.items():
        if shard.scalars[key] != value:
            raise UsageError(f"{path}: {key} is {shard.scalars[key]}, the metadata says {value}"
                             ": the shard belongs to another checkpoint")
    return Loaded(folder, meta, sources, shard, _changed_settings(meta, cfg.to_dict()))


def _check_checkpoint_dir(root: Path) -> None:
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot use --checkpoint-dir {root}: {exc.strerror}") from None


def _gbest_shard(meta: dict[str, Any]) -> int:
    owner = meta["gbest"].get("owner", -1)
    return owner if isinstance(owner, int) and 0 <= owner < meta["world_size"] else 0


def _changed_settings(meta: dict[str, Any], now: dict[str, Any]) -> list[str]:
    before = meta["config"]
    pso_before = before.get("pso")
    flat_before = {**before, **(pso_before if isinstance(pso_before, dict) else {})}
    flat_now = {**now, **now["pso"]}
    return [f"{k} {flat_before.get(k)!r} -> {v!r}" for k, v in flat_now.items()
            if k != "pso" and k not in RUN_LOCAL and flat_before.get(k) != v]


# ---- applying (after every rank agreed: nothing below may fail)

def apply(run: Run, loaded: Loaded) -> ResumePoint:
    """Restore this rank's state and return where the loop continues."""
    sync, shard = run.sync, loaded.shard
    assert sync is not None
    new_particle = loaded.sources[run.world.rank] is None
    st.restore_model(sync, shard)
    st.restore_optimizer(sync, shard)
    counters = st.sync_scalars(shard)
    if not new_particle:
        st.restore_rng(sync, shard)
    if isinstance(sync, PSOSync):
        st.restore_swarm(sync, shard)
        _remap_owner(sync, loaded.sources)
        if new_particle:
            counters = _start_new_particle(sync, counters)
    sync.restore_checkpoint_state(counters)
    return _resume_point(run, loaded, new_particle)


def _remap_owner(sync: PSOSync, sources: list[int | None]) -> None:
    """The owner is an old rank number; keep it pointing at the same particle (0 when that
    particle was dropped: the global best itself is still known)."""
    owner = sync.swarm.gbest_owner
    if owner >= 0:
        sync.swarm.gbest_owner = sources.index(owner) if owner in sources else 0


def _start_new_particle(sync: PSOSync, counters: dict[str, Any]) -> dict[str, Any]:
    """A particle added by a resize: at the global best, at rest, with fresh momentum."""
    swarm = sync.swarm
    if swarm.gbest_owner >= 0:  # before the first round there is no global best yet
        sync.flat.data.copy_(swarm.gbest)
    swarm.v.zero_()
    swarm.pbest.copy_(sync.flat.data)
    swarm.pbest_fitness = swarm.gbest_fitness
    sync.optimizer.state.clear()
    # The fitness in progress counts the global best's for the steps already taken.
    done = int(counters["steps_since_round"])
    loss_sum = done * swarm.gbest_fitness if math.isfinite(swarm.gbest_fitness) else 0.0
    return {**counters, "loss_sum": loss_sum, "last_fitness": math.inf, "comm_bytes": 0,
            "comm_s": 0.0, "comm_calls": 0}


def _resume_point(run: Run, loaded: Loaded, new_particle: bool) -> ResumePoint:
    meta, shard = loaded.meta, loaded.shard
    spe_old, spe = meta["steps_per_epoch"], run.batches.steps_per_epoch
    epoch, in_epoch = meta["epoch"], meta["step_in_epoch"]
    if spe != spe_old:  # the same fraction of the epoch, in this job's steps
        in_epoch = min(spe, round(in_epoch * spe / spe_old))
    device = run.world.device
    resized = loaded.sources != list(range(len(meta["shards"])))
    sums = (torch.zeros(3, dtype=torch.float64, device=device) if new_particle else
            torch.from_numpy(shard.arrays["loop/epoch_sums"].copy()).to(device))
    return ResumePoint(step=epoch * spe + in_epoch, epoch=epoch, start_step=in_epoch,
                       epoch_sums=sums, elapsed_s=float(shard.scalars["elapsed_s"]),
                       folder=loaded.folder, unchanged=not resized and spe == spe_old,
                       evaluated=bool(meta.get("evaluated", False)))


def describe(run: Run, loaded: Loaded, point: ResumePoint) -> list[str]:
    """What the resume did, for rank 0 to print."""
    meta, size = loaded.meta, run.world.world_size
    lines = [f"psops_mpi: resuming from {loaded.folder} at step {meta['step']} (epoch "
             f"{meta['epoch'] + 1}, step {meta['step_in_epoch']} of {meta['steps_per_epoch']})"]
    if loaded.notes:
        lines.append("psops_mpi: settings changed since the checkpoint: "
                     + ", ".join(loaded.notes))
    old = meta["world_size"]
    if old == size:
        return lines
    lines.append(_resize_line(meta, loaded.sources, size, isinstance(run.sync, PSOSync)))
    if point.start_step != meta["step_in_epoch"]:
        lines.append(f"psops_mpi: data order continues in epoch {point.epoch + 1} at step "
                     f"{point.start_step} of {run.batches.steps_per_epoch} (the same fraction)")
    return lines


def _resize_line(meta: dict[str, Any], sources: list[int | None], size: int, pso: bool) -> str:
    old = meta["world_size"]
    head = f"psops_mpi: the checkpoint has {old} rank(s), this job {size}: "
    if not pso:
        return head + "rank r continues old rank r mod " + str(old)
    if size < old:
        fits = [store.fitness(s.get("pbest_fitness")) for s in meta["shards"]]
        kept = ", ".join(f"{r} ({fits[r]:.4g})" for r in sources if r is not None)
        dropped = ", ".join(str(r) for r in range(old) if r not in sources)
        return head + (f"kept the particles with the best personal fitness, old rank(s) "
                       f"{kept}; dropped old rank(s) {dropped}")
    new = [r for r, s in enumerate(sources) if s is None]
    where = (f"the global best (fitness {store.fitness(meta['gbest'].get('fitness')):.4g})"
             if meta["gbest"].get("owner", -1) >= 0 else "particle 0's position (no round yet)")
    return head + (f"rank(s) {', '.join(map(str, new))} start new particles at {where} with "
                   "zero velocity and fresh optimizer state")


def resume_run(run: Run) -> ResumePoint:
    """Resume ``run`` as its config says (a collective); a fresh start gives step 0."""
    comm = run.world.comm
    loaded = agree(comm, lambda: load(run))
    # Each rank chose by listing the folder itself; a shared file system may show nodes
    # different listings for a while, and ranks resuming different steps would deadlock.
    choices = comm.allgather(None if loaded is None else str(loaded.folder))
    agree(comm, lambda: _same_choice(choices))
    if loaded is None:
        return ResumePoint()
    point = apply(run, loaded)
    if run.world.is_root:
        resized = loaded.meta["world_size"] != run.world.world_size
        for i, line in enumerate(describe(run, loaded, point)):
            if not run.config.quiet or (resized and i > 0):
                print(line, flush=True)
    return point


def _same_choice(choices: list[str | None]) -> None:
    if len(set(choices)) > 1:
        first_rank: dict[str | None, int] = {}
        for rank, choice in enumerate(choices):
            first_rank.setdefault(choice, rank)
        seen = ", ".join(f"rank {r}: {c or 'none'}" for c, r in first_rank.items())
        raise UsageError(f"ranks chose different checkpoints to resume from ({seen}); the file "
                         "system shows the nodes different files: pass --resume PATH")
