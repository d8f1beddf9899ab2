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

import numpy as np
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


class RateSearch:
    """The swarm's search of the learning rate: one multiplier of the schedule's rate per
    particle, moved by a PSO step on its logarithm. Every rank holds every particle's
    multiplier and computes the same step from the same gathered scores, so a round costs
    P scalars (the scores) and nothing else.

    A particle's score is its loss on the holdout batch (the same on every rank), measured
    on its own weights after its period, before the round. Every ``period`` rounds (an
    epoch's worth or more) the scores are averaged over those rounds, and each log
    multiplier h_k moves: v_k = w v_k + c r_k (h_lead - h_k) + sigma n_k, h_k = clamp(h_k +
    v_k) to [-log bound, log bound], with r_k ~ U[0, 1) and n_k ~ N(0, 1) drawn from (seed,
    step) alike on every rank.

    Against short-horizon bias (Wu et al., ICLR 2018: a greedy comparison over a short
    horizon favours small learning rates) three guards: a multiplier is judged on the mean of
    its scores over a whole period of at least an epoch, never on one round; while the swarm
    learns (its best mean score fell by more than ``TIE`` since the last step), the leader
    is, among the particles within ``TIE`` (relative) of the best mean score, the one with
    the largest multiplier, so near-ties tip towards the larger rate; and the noise keeps
    the multipliers spread, so the swarm can move back up when the run rewards it. When the
    best score did not fall (the first step, a plateau, a swarm stuck at chance where every
    particle ties) a near-tie says nothing about the rate, and the best score leads alone:
    tipping there drove whole swarms to the bound. The other way, a particle that blows up
    at its rate (:meth:`outliers`) halves its multiplier at once and is restarted from the
    others' mean.

    Nothing moves during the schedule's warmup (the first ``hold`` rounds): there the
    schedule's own rate is still a fraction of the target, so a larger multiplier looks
    better only because the warmup keeps it small, and a swarm that followed it would meet
    the full rate at many times the intended one (that drove whole swarms to the bound and
    to chance from a starting rate of 0.1). Outliers are still halved meanwhile.

    Args:
        world_size: the particles.
        spread: multipliers start spread log-evenly over [1/spread, spread] (particle 0 the
            smallest); the bound is spread squared.
        period: rounds between two steps of the multipliers.
        seed: key of the draws.
        hold: rounds before the first score counts (the warmup's).
    """

    W, C, SIGMA, TIE = 0.5, 1.0, 0.1, 0.01
    KAPPA, MARGIN = 2.0, 1.0  # blowing up: twice the best score and a nat above it

    def __init__(self, world_size: int, spread: float, period: int, seed: int,
                 hold: int = 0) -> None:
        span = math.log(spread)
        self.bound = 2 * span
        self.h = (np.linspace(-span, span, world_size) if world_size > 1
                  else np.zeros(1))
        self.v = np.zeros(world_size)
        self.score_sum = np.zeros(world_size)
        self.rounds = 0  # since the last step of the multipliers
        self.steps = 0  # steps of the multipliers so far
        self.period, self.seed = max(1, period), seed
        self.leader = -1
        self.hold = max(0, hold)  # rounds still to wait before scores count
        self.best_before = math.nan  # the best mean score at the last step

    def multiplier(self, rank: int) -> float:
        return float(math.exp(self.h[rank]))

    def outliers(self, scores: np.ndarray) -> np.ndarray:
        """The particles that diverged or are blowing up at their rate: a score that is not
        finite, or more than ``KAPPA`` times the best and ``MARGIN`` above it (late in a
        run, when losses are small, twice the best alone is no sign of trouble). The
        synchroniser leaves them out of the swarm's mean, as it does diverged ones, so that
        they cannot carry the others away."""
        scores = np.asarray(scores, dtype=np.float64)
        finite = np.isfinite(scores)
        if not finite.any():
            return ~finite
        best = scores[finite].min()
        return ~finite | (scores > max(self.KAPPA * best, best + self.MARGIN))

    def observe(self, scores: np.ndarray) -> np.ndarray:
        """Add one round's scores; the outliers (:meth:`outliers`). An outlier's multiplier
        halves at once, at rest, so that a particle restarted from the others does not blow
        up again at the same rate; a non-finite score counts as the worst finite one (1e30
        if none is). Every ``period`` rounds the multipliers take a step."""
        scores = np.asarray(scores, dtype=np.float64)
        out = self.outliers(scores)
        if out.any():
            self.h = np.where(out, np.maximum(self.h - math.log(2), -self.bound), self.h)
            self.v = np.where(out, 0.0, self.v)
        if self.hold > 0:  # still the warmup: the scores would judge the warmup, not the rate
            self.hold -= 1
            return out
        finite = np.isfinite(scores)
        worst = scores[finite].max() if finite.any() else 1e30
        self.score_sum += np.where(finite, scores, worst)
        self.rounds += 1
        if self.rounds >= self.period:
            self.step(self.score_sum / self.rounds)
            self.score_sum[:] = 0.0
            self.rounds = 0
        return out

    def step(self, means: np.ndarray) -> None:
        """One PSO step of every log multiplier towards the leader's."""
        self.leader = self._leader(means)
        self.best_before = float(means.min())
        rng = np.random.default_rng([self.seed & _MASK64, self.steps])
        r = rng.random(len(self.h))
        noise = rng.standard_normal(len(self.h))
        self.v = self.W * self.v + self.C * r * (self.h[self.leader] - self.h) + self.SIGMA * noise
        self.h = np.clip(self.h + self.v, -self.bound, self.bound)
        self.steps += 1

    def _leader(self, means: np.ndarray) -> int:
        """The best mean score; while the swarm learns, the largest multiplier among its
        near-ties."""
        best = float(means.min())
        learning = best < self.best_before - self.TIE * abs(self.best_before)  # False if nan
        if not learning:
            return int(np.argmin(means))
        near = np.flatnonzero(means <= best + self.TIE * abs(best))
        return int(near[np.argmax(self.h[near])])

    def resize(self, sources: list[int | None]) -> None:
        """A job of ``len(sources)`` particles: each continues its old particle's
        multiplier, a new one starts at the leader's (the middle's before any step), at rest."""
        start = self.leader if self.leader >= 0 else len(self.h) // 2
        self.h = np.array([self.h[s if s is not None else start] for s in sources])
        self.v = np.array([self.v[s] if s is not None else 0.0 for s in sources])
        self.score_sum = np.zeros(len(sources))
        self.rounds = 0
        self.leader = -1

    def state_dict(self) -> dict[str, Any]:
        return {"log_multiplier": self.h, "velocity": self.v, "score_sum": self.score_sum,
                "rounds": self.rounds, "steps": self.steps, "leader": self.leader,
                "hold": self.hold, "best_before": self.best_before}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.h = np.array(state["log_multiplier"], dtype=np.float64)
        self.v = np.array(state["velocity"], dtype=np.float64)
        self.score_sum = np.array(state["score_sum"], dtype=np.float64)
        self.rounds, self.steps = int(state["rounds"]), int(state["steps"])
        self.leader = int(state["leader"])
        self.hold = int(state.get("hold", 0))  # checkpoints from before the warmup hold
        self.best_before = float(state.get("best_before", math.nan))  # and the tie rule
