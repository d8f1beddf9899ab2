"""Particle state and the particle-swarm rule. No MPI and no I/O: pure tensor math.

One rank is one particle k over a flat vector of N parameters:
    v_k <- w*v_k + c1*r1*(p_k - x_k) + c2*r2*(g - x_k)      (then |v_k| <= vmax if set)
    x_k <- x_k + v_k
with r1, r2 ~ U[0, 1) drawn per element from a generator keyed by (seed, round, rank), so a
resumed run draws the same numbers and no two particles or rounds share them. ``Swarm.move``
applies it with the fused custom op (``psops_mpi.kernels``) unless ``pso_kernel='reference'``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from psops_mpi.config import PSOConfig
from psops_mpi.flat import flat_buffer, load_into
from psops_mpi.kernels import pso_update_fused_

_MASK64 = (1 << 64) - 1


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def rng_key(seed: int, round_index: int, rank: int) -> int:
    """A 63-bit generator seed unique to (seed, round, rank), well mixed in every bit."""
    z = _splitmix64(seed & _MASK64)
    z = _splitmix64(z ^ (round_index & _MASK64))
    z = _splitmix64(z ^ (rank & _MASK64))
    return z >> 1  # torch seeds must fit in a signed 64-bit integer


def pso_update_(
    x: torch.Tensor,
    v: torch.Tensor,
    pbest: torch.Tensor,
    gbest: torch.Tensor,
    *,
    w: float,
    c1: float,
    c2: float,
    vmax: float | None,
    key: int,
    deterministic: bool = False,
) -> None:
    """Apply one PSO step to position ``x`` and velocity ``v`` in place (reference version).

    Plain torch ops, about ten passes over memory, with draws from ``torch.Generator``; the
    fused op (``psops_mpi.kernels.pso_update_fused_``) does it in one pass with Philox draws.

    Args:
        x, v, pbest, gbest: flat tensors of N elements, same dtype and device. # (N,)
        w, c1, c2: inertia, cognitive and social coefficients.
        vmax: clamp for every velocity component, or None.
        key: seed of the random draws (see :func:`rng_key`).
        deterministic: use r1 = r2 = 1 (to compare implementations exactly).
    """
    if deterministic:
        r1 = r2 = torch.ones((), dtype=x.dtype, device=x.device)
    else:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(key)
        r1, r2 = torch.rand((2, x.numel()), generator=gen, dtype=x.dtype, device=x.device)
    v.mul_(w)
    v.add_(r1 * (pbest - x), alpha=c1)
    v.add_(r2 * (gbest - x), alpha=c2)
    if vmax is not None:
        v.clamp_(-vmax, vmax)
    x.add_(v)


def sanitize_fitness(fitness: torch.Tensor) -> torch.Tensor:
    """Non-finite fitness (NaN, inf from a diverged particle) counts as +inf."""
    return torch.where(torch.isfinite(fitness), fitness, torch.full_like(fitness, math.inf))


def select_best(fitness: torch.Tensor) -> tuple[int, float]:
    """Index and value of the lowest fitness; ties go to the lowest index (rank), so every
    rank reaches the same choice from the same numbers without another message."""
    clean = sanitize_fitness(fitness.double())
    index = int(torch.argmin(clean))  # argmin returns the first of equal minima
    return index, float(clean[index])


class Swarm:
    """One particle's state: velocity, personal best and the swarm's global best.

    Args:
        x: the particle's position, usually ``FlatParams.data`` (updated in place).
        config: PSO coefficients and options.
        seed, rank: keys of this particle's random draws.
    """

    def __init__(self, x: torch.Tensor, config: PSOConfig, seed: int, rank: int) -> None:
        if config.pso_kernel == "fused" and x.dtype != torch.float32:
            raise ValueError(f"the fused PSO kernel updates float32 parameters, not {x.dtype}; "
                             "use --pso-kernel reference for this model")
        self.x = x
        self.config = config
        self.seed = seed
        self.rank = rank
        self.v = flat_buffer(x.numel(), x.dtype, x.device)
        self.pbest = flat_buffer(x.numel(), x.dtype, x.device).copy_(x)
        self.pbest_fitness = math.inf
        self.gbest = flat_buffer(x.numel(), x.dtype, x.device).copy_(x)
        self.gbest_fitness = math.inf
        self.gbest_owner = -1
        self.round = 0

    def offer_personal(self, fitness: float) -> None:
        """Keep the current position as personal best if its fitness is better."""
        if math.isfinite(fitness) and fitness < self.pbest_fitness:
            self.pbest.copy_(self.x)
            self.pbest_fitness = fitness

    def accepts_global(self, fitness: float) -> bool:
        """Whether a candidate of this fitness becomes the global best. A non-finite one never
        does; with memory 'round' any finite one replaces the last, with 'all' only a better one."""
        if not math.isfinite(fitness):
            return False
        return self.config.gbest_memory == "round" or fitness < self.gbest_fitness

    def set_global(self, position: torch.Tensor, fitness: float, owner: int) -> None:
        """Record the global best (a copy: the source buffer is reused next round)."""
        if position.data_ptr() != self.gbest.data_ptr():
            self.gbest.copy_(position)
        self.gbest_fitness = fitness
        self.gbest_owner = owner

    def move(self, deterministic: bool = False, key_rank: int | None = None) -> None:
        """One PSO step of this particle, then advance the round counter.

        Before any finite fitness was seen there is no global best: the step is skipped
        rather than pulling particles towards a meaningless point. ``key_rank`` replaces this
        particle's rank in the key of the random draws (the same draws on every rank).
        """
        if self.gbest_owner >= 0:
            cfg = self.config
            update = pso_update_ if cfg.pso_kernel == "reference" else pso_update_fused_
            rank = self.rank if key_rank is None else key_rank
            update(self.x, self.v, self.pbest, self.gbest, w=cfg.w, c1=cfg.c1, c2=cfg.c2,
                   vmax=cfg.vmax, key=rng_key(self.seed, self.round, rank),
                   deterministic=deterministic)
        self.round += 1

    def restart_at_global(self) -> None:
        """Put a diverged particle (non-finite fitness) at the global best with zero velocity,
        then advance the round counter. A PSO move cannot bring back a NaN or inf position:
        without this the particle stays lost, and its rank computes for nothing."""
        self.x.copy_(self.gbest)
        self.v.zero_()
        self.round += 1

    def state_dict(self) -> dict[str, torch.Tensor | int | float]:
        """Velocity, personal and global best, and the scalars that go with them; restoring
        ``round`` restores the random draws."""
        return {"velocity": self.v, "pbest": self.pbest, "gbest": self.gbest,
                "round": self.round, "pbest_fitness": self.pbest_fitness,
                "gbest_fitness": self.gbest_fitness, "gbest_owner": self.gbest_owner}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Set what :meth:`state_dict` gave."""
        load_into(self.v, state["velocity"])
        load_into(self.pbest, state["pbest"])
        load_into(self.gbest, state["gbest"])
        self.round = int(state["round"])
        self.pbest_fitness = float(state["pbest_fitness"])
        self.gbest_fitness = float(state["gbest_fitness"])
        self.gbest_owner = int(state["gbest_owner"])
