"""One local training step on a rank's own batch, for tests that drive a synchroniser."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn


def local_step(model: nn.Module, opt: torch.optim.Optimizer, sync, step: int,
               comm: MPI.Comm = MPI.COMM_WORLD, nan: bool = False) -> None:
    """One SGD step on this rank's own batch (different on every rank and step) with the
    four loop calls; ``nan``: this rank's weights turn NaN first."""
    sync.after_step(step_before_the_round(model, opt, sync, step, comm, nan))


def step_before_the_round(model: nn.Module, opt: torch.optim.Optimizer, sync, step: int,
                          comm: MPI.Comm = MPI.COMM_WORLD,
                          nan: bool = False) -> torch.Tensor:
    """:func:`local_step` but for its last call, ``sync.after_step`` (where a round may
    run); the step's loss, to hand to it."""
    if nan:
        with torch.no_grad():
            next(model.parameters()).fill_(math.nan)
    gen = torch.Generator().manual_seed(100 * step + comm.Get_rank())
    x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
    opt.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    sync.after_backward()
    opt.step()
    return loss
