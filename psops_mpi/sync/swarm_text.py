"""What a swarm says about itself: the line at start, and the checkpoint's legend of its
figures (PSO-PS's :meth:`describe` and :meth:`legend`; ``sync`` is the
:class:`~psops_mpi.sync.pso_ps.PSOSync`, read, never imported: it imports this module)."""

from __future__ import annotations

from typing import Any

PSOSync = Any  # psops_mpi.sync.pso_ps.PSOSync


def describe(sync: PSOSync) -> str:
    """One line on what a round does."""
    if sync.world_size == 1:
        return one_particle_note(sync)
    cfg, kind = sync.config, sync.exchange_kind
    how = {"allgather": "every rank receives every particle",
           "best": "MINLOC and a broadcast of the best particle",
           "mean": "one Allreduce of the weights (no best particle needed)"}[kind]
    if sync.encoded:
        how = (f"the mean{' and the best particle' if kind == 'best' else ''} in "
               f"{sync.exchange_dtype}, in one Alltoall and one Allgather")
    auto = " (auto: the cheaper for this swarm)" if cfg.exchange == "auto" and kind != "mean" \
        else ""
    search = ""
    if sync.rate is not None:
        s = cfg.lr_spread
        search = (f"; the particles search the learning rate: multipliers from "
                  f"{1 / s:.3g} to {s:g}, moved every {sync.rate.period} round(s)")
        if sync.rate.hold:
            search += f"; the search waits out the warmup ({sync.rate.hold} rounds)"
    return (f"PSO-PS preset {cfg.pso_preset} (rule {cfg.rule}), exchange {kind}{auto}: "
            f"{how}{search}")


def one_particle_note(sync: PSOSync) -> str:
    """What a swarm of one is: its own global best, so no particle learns from another."""
    cfg = sync.config
    if cfg.rule == "centre":  # m = g = x: v = w v + (x - a), a slow momentum on local SGD
        does = (f"local SGD plus a slow momentum step (w {cfg.w}) at every round, as SlowMo "
                "on one rank")
    elif cfg.c1 > 0:  # g = x: only the pull to its own personal best is left
        does = f"local SGD pulled towards its own personal best (c1 {cfg.c1})"
    else:  # g = x and c1 = 0: v stays 0 from its start at 0
        does = "plain local SGD"
    return (f"note: PSO-PS on one rank is one particle and no swarm: {does}; start several "
            "ranks (e.g. mpiexec -n 4) to train a swarm")


def legend(sync: PSOSync) -> dict[str, str]:
    """Which round each fitness is from: with memory 'round' g is the last round's best,
    which can be worse than every personal best (each the lowest of its particle's rounds,
    set at an earlier round on other batches)."""
    cfg, owner = sync.config, sync.swarm.gbest_owner
    measured = ("its mean training loss over the steps since the round before"
                if cfg.fitness == "train" else "its loss on the fixed holdout batch")
    last = (f"the last round (round {sync.rounds}, step {sync.steps - sync.steps_since_round})"
            if sync.rounds else "no round yet")
    if cfg.gbest_memory == "round":
        g = (f"g, the lowest fitness among the particles at {last}, rank {owner}'s; not "
             "the best ever seen: it can be worse than every personal best")
    else:
        g = (f"g, the lowest fitness of any particle at any round up to {last}, rank "
             f"{owner}'s (--gbest-memory all)")
    return {"fitness": f"a particle's fitness is {measured}, measured at each round; lower "
                       "is better",
            "gbest_fitness": g,
            "pbest_fitness": "the lowest fitness of this particle over all its rounds so far, "
                             "as measured at the round that set it (inf: none finite yet)"}
