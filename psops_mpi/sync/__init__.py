"""Synchronisation policies: when and what the ranks exchange. One file per algorithm; the
contract they all follow is :class:`~psops_mpi.sync.base.Synchronizer`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.config import TrainConfig
from psops_mpi.sync.base import NonFiniteStop, ResizePlan, Synchronizer, SyncMetrics
from psops_mpi.sync.flat_sync import FlatSynchronizer
from psops_mpi.sync.pa import PASync
from psops_mpi.sync.pso_ps import PSOSync
from psops_mpi.sync.slowmo import SlowMoSync
from psops_mpi.sync.ssgd import SSGDSync

__all__ = ["FlatSynchronizer", "NonFiniteStop", "PASync", "PSOSync", "ResizePlan", "SSGDSync",
           "SlowMoSync", "SyncMetrics", "Synchronizer", "make_sync"]


def make_sync(config: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer,
              comm: MPI.Comm, fitness_fn: Callable[[], torch.Tensor] | None = None,
              cuda_aware: bool = False, loss_scale: Callable[[], float] | None = None,
              rounds_per_epoch: int = 1) -> Synchronizer:
    """The synchroniser ``config.algo`` names, set up from the config; ``loss_scale``: fp16's
    current loss scale (see :class:`SSGDSync`); ``rounds_per_epoch``: PSO-PS's default
    period of its learning-rate search."""
    limit = config.max_nonfinite
    rounds = {"overlap_steps": config.landing_steps, "exchange_dtype": config.exchange_dtype,
              "warm_steps": config.local_after_steps, "loss_scale": loss_scale,
              "average_state": config.average_optimizer_state}
    if config.algo == "ssgd":
        return SSGDSync(model, optimizer, comm, 1, cuda_aware, max_nonfinite=limit,
                        loss_scale=loss_scale)
    if config.algo == "pa":
        return PASync(model, optimizer, comm, config.sync_every, cuda_aware, max_nonfinite=limit,
                      **rounds)
    if config.algo == "slowmo":
        return SlowMoSync(model, optimizer, comm, config.sync_every, outer_lr=config.outer_lr,
                          outer_momentum=config.outer_momentum,
                          outer_nesterov=config.outer_nesterov,
                          reset_momentum=config.reset_momentum, cuda_aware=cuda_aware,
                          max_nonfinite=limit, **rounds)
    return PSOSync(model, optimizer, comm, config.sync_every, config=config.pso,
                   seed=config.seed, fitness_fn=fitness_fn,
                   reset_momentum=config.reset_momentum, cuda_aware=cuda_aware,
                   max_nonfinite=limit, rounds_per_epoch=rounds_per_epoch,
                   warmup_rounds=-(-(config.warmup_steps or 0) // config.sync_every), **rounds)
