"""PSO-PS: every rank is a particle; every ``sync_every`` steps a particle-swarm step
replaces averaging (Ye et al., IJCNN 2020, arXiv 2009.03816).

A round: fitness f_k -> exchange (one Allgather of [x_k ; f_k]; or MINLOC + Bcast of the best,
plus one Allreduce when the swarm's mean m is needed) -> personal and global bests -> the move,
by ``rule``:

- ``particle`` (the paper's): PSO move of x_k, v_k in place (a particle whose fitness is NaN or
  inf restarts at the global best instead), then with c3 > 0 a pull towards the mean,
  x_k += c3 (m - x_k);
- ``centre``: the swarm moves as one. From the centre a of the last round,
  v = w v + (m - a) + c2 r2 (g - m) and the centre moves to c = a + v: periodic averaging
  with inertia w as a slow momentum (SlowMo with alpha 1, beta w, when c2 = 0), pulled
  towards the round's best particle. r2 is drawn the same on every rank. Each particle then
  moves the share rho of the way to the centre, x_k += rho (c - x_k): with rho = 1 (the
  ``centre`` preset) every particle sits at the centre; below 1 (``elastic``: EASGD's
  elastic pull, Zhang et al. 2015) the particles stay distinct around it, and the centre is
  the answer. With c2 = 0 the best particle is not needed: a round is one Allreduce of the
  weights (PA's bytes) and a MINLOC of the fitness (``exchange mean``);

-> average BatchNorm buffers. Evaluation and export use the global best g, or the swarm's mean
(``answer``).

With ``lr_spread`` > 1 the particles also search the learning rate
(:class:`~psops_mpi.swarm.RateSearch`): before the exchange, each particle's loss on the
holdout batch (its own weights, after its period) goes to every rank in one small Allgather
of P scalars, and every ``lr_period`` rounds the multipliers move towards the best one.

At another world size (a resume): fewer ranks keep the particles with the best personal
fitness; more ranks start each new particle at the global best, at rest, with fresh momentum.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.config import PSOConfig
from psops_mpi.costmodel import choose_exchange
from psops_mpi.flat import flat_buffer, load_into
from psops_mpi.inflight import Both, Done, Pending
from psops_mpi.swarm import RateSearch, Swarm, select_best
from psops_mpi.sync import swarm_text
from psops_mpi.sync.base import ResizePlan, SyncMetrics
from psops_mpi.sync.flat_sync import MAX_NONFINITE, FlatSynchronizer
from psops_mpi.sync.mean import RankMean
from psops_mpi.sync.resize import plan_swarm_resize


class PSOSync(FlatSynchronizer):
    """Particle-swarm synchronisation of the ranks' weights.

    The model, optimizer, communicator, ``sync_every`` and ``cuda_aware`` are as for
    :class:`FlatSynchronizer`.

    Args:
        config: PSO coefficients and options (default :class:`PSOConfig`); keyword overrides
            such as ``w=0.6`` may be given instead.
        seed: key of the swarm's random draws (with round and rank).
        fitness_fn: returns this particle's loss on the holdout batch: its fitness for
            ``config.fitness == 'holdout'`` (by default the fitness is the mean training loss
            passed to :meth:`after_step` since the last round), and the score of its learning
            rate when it searches the rate.
        rounds_per_epoch: rounds in an epoch (the learning-rate search's default period).
        warmup_rounds: rounds within the schedule's warmup (the search waits them out).
        reset_momentum: clear the local optimizer's state (momentum) after every round.
        max_nonfinite: as :class:`FlatSynchronizer`; a round is skipped when no particle has
            a finite fitness.
    """

    extra_slots = 1
    nonfinite = "no particle had a finite fitness"
    # the search's state, absent from runs without it (and from psops_mpi 0.2.0's)
    optional_state_keys = (*FlatSynchronizer.optional_state_keys, "rate")

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 comm: MPI.Comm | None = None, sync_every: int = 8, *,
                 config: PSOConfig | None = None, seed: int = 0,
                 fitness_fn: Callable[[], torch.Tensor] | None = None,
                 reset_momentum: bool = False, cuda_aware: bool = False,
                 max_nonfinite: int = MAX_NONFINITE, rounds_per_epoch: int = 1,
                 warmup_rounds: int = 0, overlap_steps: int = 0,
                 exchange_dtype: str = "fp32", warm_steps: int = 0,
                 loss_scale: Callable[[], float] | None = None,
                 average_state: bool = False, **overrides: object) -> None:
        cfg = config or PSOConfig()
        self.config = PSOConfig(**{**vars(cfg), **overrides}) if overrides else cfg
        self.exchange_kind = ""  # allgather or best: chosen once the sizes are known
        if exchange_dtype != "fp32" and self.config.rule != "centre":
            raise ValueError(f"an {exchange_dtype} exchange sends differences from the centre; "
                             "the particle rule has none")
        super().__init__(model, optimizer, comm, sync_every, cuda_aware,
                         max_nonfinite=max_nonfinite, overlap_steps=overlap_steps,
                         exchange_dtype=exchange_dtype, warm_steps=warm_steps,
                         loss_scale=loss_scale, average_state=average_state)
        if (self.config.fitness == "holdout" or self.config.lr_spread > 1) and fitness_fn is None:
            raise ValueError("fitness 'holdout' and the learning-rate search need a fitness_fn "
                             "that returns the holdout loss")
        self.rate = (RateSearch(self.world_size, self.config.lr_spread,
                                self.config.lr_period or rounds_per_epoch, seed,
                                hold=warmup_rounds)
                     if self.config.lr_spread > 1 else None)
        self._rate_loaded = False
        self.fitness_fn = fitness_fn
        self.reset_momentum = reset_momentum
        self.swarm = Swarm(self.flat.data, self.config, seed, self.rank)
        n = self.flat.numel
        self._loss_sum = torch.zeros((), dtype=torch.float64, device=self.flat.data.device)
        dtype, device = self.flat.data.dtype, self.flat.data.device
        self._gathered = (flat_buffer(self.world_size * (n + 1), dtype, device)
                          .view(self.world_size, n + 1)
                          if self._chosen_exchange() == "allgather" else None)
        centre = self.config.rule == "centre"
        if self._gathered is None and (centre or self.config.c3 > 0):
            # the mean without the allgather's rows, in a buffer of its own; encoded, with
            # every fitness and the best particle in the same two collectives
            self.mean = RankMean(self.exchange, n, self.flat.data, exchange_dtype,
                                 in_flight=bool(overlap_steps), own_buffer=True,
                                 with_best=self.exchange_kind == "best")
        self.encoded = self.mean is not None and self.mean.dtype != "fp32"
        # a broadcast best in flight lands here, not in g: until the round lands every rank
        # (its owner too) keeps the last round's g
        self._incoming = (flat_buffer(n, dtype, device)
                          if overlap_steps and self._gathered is None and not self.encoded
                          and self.exchange_kind == "best" else None)
        self.anchor = flat_buffer(n, dtype, device).copy_(self.flat.data) if centre else None
        # the elastic swarm: each particle's own position while the centre is computed
        self._own = flat_buffer(n, dtype, device) if self.config.rho < 1 else None
        self.last_fitness = math.inf
        # this round's best particle, as the exchange found it: (fitness, owner, taken as g)
        self._best: tuple[float, int, bool] = (math.inf, -1, False)

    @property
    def needs_own_position(self) -> bool:  # type: ignore[override]
        """A particle moved from its own position: the paper's rule, the elastic pull, c3."""
        cfg = self.config
        return cfg.rule == "particle" or cfg.rho < 1 or cfg.c3 > 0

    def _chosen_exchange(self) -> str:
        """allgather or best, as configured or, for auto, as the cost model prefers; mean
        when the rule needs no best particle (the centre rule with c2 = 0)."""
        if not self.exchange_kind:
            cfg = self.config
            if cfg.rule == "centre" and cfg.c2 == 0:
                self.exchange_kind = "mean"
            else:
                self.exchange_kind = cfg.exchange if cfg.exchange != "auto" else choose_exchange(
                    self.world_size, self.flat.numel,
                    needs_mean=cfg.rule == "centre" or cfg.c3 > 0, dtype=self.exchange_dtype)
        return self.exchange_kind

    def _largest_message(self) -> int:
        if self._chosen_exchange() == "allgather":  # staged as one [send ; recv] buffer
            return (self.world_size + 1) * self.flat.packed.numel()
        return super()._largest_message()

    def round_collective(self) -> str:
        return self._chosen_exchange()

    def describe(self) -> str:
        return swarm_text.describe(self)

    def _observe(self, loss: torch.Tensor | None) -> None:
        if loss is not None:
            self._loss_sum += loss.detach().to(self._loss_sum.dtype)  # stays on device

    def _fitness(self) -> torch.Tensor:
        """This particle's fitness for the round, as a 0-d tensor on the device."""
        if self.config.fitness == "holdout":
            return self.fitness_fn().detach().to(self._loss_sum.dtype)  # type: ignore[misc]
        return self._loss_sum / max(self.steps_since_round, 1)

    def lr_scale(self) -> float:
        if self.rate is None or self.warming_up:  # SSGD's steps: one rate on every rank
            return 1.0
        return self.rate.multiplier(self.rank)


    def _start(self) -> Pending:
        """Fitness (and the learning-rate search's scores: P scalars, blocking), personal
        best, then the exchange: the allgather of every particle, or the mean and the best
        particle (MINLOC, blocking: 16 bytes; then its broadcast)."""
        sent, n = self._sent(), self.flat.numel
        fitness = self._fitness()
        sent[n:].copy_(fitness)
        self.last_fitness = float(fitness)  # one host sync per round, not per step
        self._loss_sum.zero_()
        if self.rate is not None:  # the same holdout batch, this particle's own weights
            score = (self.last_fitness if self.config.fitness == "holdout"
                     else float(self.fitness_fn()))  # type: ignore[misc]
            if self.rate.observe(self.exchange.allgather_scalar(score))[self.rank]:
                self.last_fitness = math.inf  # blowing up: out of the mean, as a diverged
                sent[n:].fill_(math.inf)  # particle, and restarted
        self.swarm.offer_personal(self.last_fitness)
        self.sent_finite = math.isfinite(self.last_fitness)
        if self._gathered is not None:
            if not self.overlap_steps:
                self.exchange.allgather(sent, self._gathered)
                return Done()
            return self.exchange.start_allgather(sent, self._gathered)
        if self.encoded:  # the fitnesses and the best particle travel with the mean
            return self.mean.start(sent, self.sent_finite, self.anchor,  # type: ignore[union-attr]
                                   fitness=self.last_fitness)
        pending = [self.mean.start(sent, self.sent_finite, self.anchor)
                   if self.mean is not None else Done()]
        pending.append(self._start_best(sent[:n], send=self.exchange_kind != "mean"))
        return Both(*pending)

    def _start_best(self, x: torch.Tensor, send: bool) -> Pending:
        """MINLOC of the fitness, then (``send``) the best particle ``x`` from its owner."""
        local = self.last_fitness if math.isfinite(self.last_fitness) else math.inf
        best, owner = self.exchange.minloc(local)
        # Every rank holds the same (best, owner), so all take the same branch.
        taken = self.swarm.accepts_global(best)
        self._best = (best, owner, taken)
        if not (taken and send):
            return Done()
        if self._incoming is None:
            if self.rank == owner:
                self.swarm.gbest.copy_(x)
            self.exchange.bcast_(self.swarm.gbest, root=owner)
            return Done()
        if self.rank == owner:
            self._incoming.copy_(x)
        return self.exchange.start_bcast(self._incoming, root=owner)

    def _finish(self) -> None:
        if self._gathered is not None:
            any_finite = self._take_best_row()
            mean = self._mean_of_rows()
        else:
            mean = self.mean.result(self.anchor) if self.mean is not None else None
            any_finite = self._take_encoded_best() if self.encoded else self._take_best()
        self._count_sync(any_finite)
        finite = self.sent_finite
        diverged = not finite and (self.swarm.gbest_owner >= 0 or self.anchor is not None)
        if self.anchor is not None:
            self._move_centre(mean)
        elif diverged:
            self.swarm.restart_at_global()
        else:
            self.swarm.move()
            if self.config.c3 > 0 and mean is not None:
                self.flat.data.add_(mean.sub_(self.flat.data), alpha=self.config.c3)
        self.average_buffers()
        if diverged:  # its momentum diverged too: restarted with fresh optimizer state
            self._restart()
        if self.reset_momentum:
            self.optimizer.state.clear()

    def _move_centre(self, mean: torch.Tensor | None) -> None:
        """The centre moves (see the module docstring) to c = a + v; each particle the share
        rho of the way to it (a particle that diverged: all the way)."""
        x, anchor, swarm, own = self.flat.data, self.anchor, self.swarm, self._own
        assert anchor is not None
        if own is not None:
            own.copy_(x)
        if mean is None:  # no particle with a finite fitness: stay where the period began
            x.copy_(anchor)
            swarm.round += 1
            return
        x.copy_(mean)
        if swarm.gbest_owner >= 0:  # v' = w v + c2 r2 (g - m), x = m + v'
            swarm.move(key_rank=0)  # the same draws on every rank: one common move
        else:
            x.add_(swarm.v, alpha=self.config.w)
            swarm.round += 1
        swarm.v.copy_(x).sub_(anchor)  # v = x - a = w v + (m - a) + c2 r2 (g - m)
        anchor.copy_(x)
        if own is not None and math.isfinite(self.last_fitness):
            torch.lerp(own, anchor, self.config.rho, out=x)  # x_k + rho (c - x_k)

    def _take_best_row(self) -> bool:
        """The allgather's best row as the global best; True if some fitness is finite."""
        gathered = self._gathered
        assert gathered is not None
        owner, best = select_best(gathered[:, -1])
        if self.swarm.accepts_global(best):
            self.swarm.set_global(gathered[owner, :-1], best, owner)
        return math.isfinite(best)

    def _take_best(self) -> bool:
        """The broadcast best particle as the global best; True if some fitness is finite."""
        best, owner, taken = self._best
        if taken:
            incoming = self._incoming if self._incoming is not None else self.swarm.gbest
            self.swarm.set_global(incoming, best, owner)
        return math.isfinite(best)

    def _take_encoded_best(self) -> bool:
        """The best particle that came with the encoded mean (the centre plus its decoded
        difference: the same on every rank); True if some fitness is finite."""
        assert self.mean is not None and self.anchor is not None
        owner, best = select_best(torch.from_numpy(self.mean.fitness))
        if self.swarm.accepts_global(best):
            if self.exchange_kind == "best":
                self.mean.best(self.anchor, self.swarm.gbest)
            self.swarm.set_global(self.swarm.gbest, best, owner)
        return math.isfinite(best)

    def _mean_of_rows(self) -> torch.Tensor | None:
        """The mean over this round's gathered particles with a finite fitness (a diverged
        particle would make the mean NaN); None if none or not needed."""
        rows = self._gathered
        assert rows is not None
        if self.anchor is None and self.config.c3 == 0:
            return None
        finite = torch.isfinite(rows[:, -1])
        if bool(finite.all()):
            return rows[:, :-1].mean(0)
        return rows[finite, :-1].mean(0) if bool(finite.any()) else None

    def _consensus_weights(self) -> torch.Tensor | None:
        """The swarm's answer: the centre (when the particles are not all at it: the
        elastic pull, or a round in flight), the global best, or the mean of the particles."""
        if self.anchor is not None:  # the centre: where every particle sits when rho is 1
            return self.anchor if self._own is not None or self.overlap_steps else None
        if self.config.answer == "mean":
            mean = self.flat.data.clone()
            self.exchange.allreduce_mean_(mean)
            return mean
        # no finite fitness yet: nothing better to offer than the particle itself
        return self.swarm.gbest if self.swarm.gbest_owner >= 0 else None

    def _answer_source(self) -> tuple[int, str | None]:
        owner = self.swarm.gbest_owner
        if self._own is not None or (self.anchor is not None and self.overlap_steps):
            return 0, "anchor"
        if self.anchor is not None or (self.config.answer == "gbest" and owner < 0):
            return 0, None
        if self.config.answer == "mean":
            return -1, None
        return owner, "swarm/gbest"

    def metrics(self) -> SyncMetrics:
        base = super().metrics()  # restarts: diverged particles restarted at g
        base.values["gbest_fitness"] = self.swarm.gbest_fitness
        if self.rate is not None:  # every particle's multiplier, the same on every rank
            base.values.update({f"lr_mult_r{k}": self.rate.multiplier(k)
                                for k in range(self.world_size)})
        return base

    def summary(self) -> dict[str, Any]:
        what = "the last round's best" if self.config.gbest_memory == "round" else "best ever seen"
        return {**super().summary(), "gbest_fitness": self.swarm.gbest_fitness,
                "gbest_owner": self.swarm.gbest_owner, "gbest_is": what,
                "exchange": self.exchange_kind}

    def legend(self) -> dict[str, str]:
        return swarm_text.legend(self)

    def rank_summary(self) -> dict[str, Any]:
        return {"pbest_fitness": self.swarm.pbest_fitness}

    def state_dict(self) -> dict[str, Any]:
        """Adds the particle and the fitness in progress: the loss summed since the last round
        (float64, so a resumed round computes the very same fitness)."""
        state = {**super().state_dict(), "loss_sum": float(self._loss_sum),
                 "last_fitness": self.last_fitness, "swarm": self.swarm.state_dict()}
        if self.anchor is not None:
            state["anchor"] = self.anchor
        if self.rate is not None:
            state["rate"] = self.rate.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self._loss_sum.fill_(float(state["loss_sum"]))
        self.last_fitness = float(state["last_fitness"])
        self.swarm.load_state_dict(state["swarm"])
        if self.anchor is not None:
            load_into(self.anchor, state["anchor"])
        self._rate_loaded = self.rate is not None and "rate" in state
        if self._rate_loaded:  # else: a run that searched nothing starts a search afresh
            self.rate.load_state_dict(state["rate"])  # type: ignore[union-attr]

    def _landed_state(self) -> dict[str, Any]:
        """The gathered rows, or the mean and this round's best particle."""
        if self._gathered is not None:
            return {"rows": self._gathered}
        state = super()._landed_state()
        if self.encoded:  # the fitnesses and the best came with the mean
            return state
        best, owner, taken = self._best
        state.update(best=best, owner=owner, taken=taken)
        if taken and self._incoming is not None:
            state["gbest"] = self._incoming
        return state

    def _load_landed_state(self, state: dict[str, Any]) -> None:
        if self._gathered is not None:
            load_into(self._gathered, state["rows"])
            return
        super()._load_landed_state(state)
        if self.encoded:
            return
        self._best = (float(state["best"]), int(state["owner"]), bool(state["taken"]))
        if "gbest" in state and self._incoming is not None:
            load_into(self._incoming, state["gbest"])

    def plan_resize(self, rank_summaries: list[dict[str, Any]], summary: dict[str, Any],
                    new_size: int) -> ResizePlan:
        """Fewer ranks keep the particles with the best personal fitness; more ranks start new
        particles from the global best's owner (at the centre, under the centre rule)."""
        return plan_swarm_resize(rank_summaries, summary, new_size,
                                 centre=self.anchor is not None)

    def on_resize(self, plan: ResizePlan) -> None:
        super().on_resize(plan)
        if self.rate is not None and self._rate_loaded:  # every rank holds every
            self.rate.resize(plan.sources)  # multiplier: re-index them
        owner = self.swarm.gbest_owner  # an old rank number: keep it on the same particle
        if owner >= 0:  # (0 when that particle was dropped: the global best is still known)
            self.swarm.gbest_owner = plan.sources.index(owner) if owner in plan.sources else 0
        if plan.sources[self.rank] is None:
            self._start_new_particle()

    def _start_new_particle(self) -> None:
        """A particle added by a resize: at the centre (the centre rule) or the global best,
        at rest; its fitness in progress counts the global best's for the steps of this
        period already taken."""
        swarm = self.swarm
        if self.anchor is not None:
            self.flat.data.copy_(self.anchor)
        elif swarm.gbest_owner >= 0:  # before the first round there is no global best yet
            self.flat.data.copy_(swarm.gbest)
        swarm.v.zero_()
        swarm.pbest.copy_(self.flat.data)
        swarm.pbest_fitness = swarm.gbest_fitness
        finite = math.isfinite(swarm.gbest_fitness)
        self._loss_sum.fill_(self.steps_since_round * swarm.gbest_fitness if finite else 0.0)
        self.last_fitness = math.inf
        self.restarts = 0
