"""The recipe under MPI: SSGD clips the averaged gradient, so every rank clips alike and the
run equals one process clipping the whole batch's gradient; with accumulation it reduces
once per optimizer step."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mpi4py import MPI

from psops_mpi import SSGDSync
from psops_mpi.config import TrainConfig
from psops_mpi.loop import LoopState, train_step
from psops_mpi.precision import Precision
from psops_mpi.recipe import make_optimizer
from psops_mpi.tasks import Classification
from tests.mpi.test_sync import flat_of, gathered, global_batch, mlp, my_part

pytestmark = pytest.mark.mpi(min_size=2)
COMM = MPI.COMM_WORLD
CPU = torch.device("cpu")


def run_of(comm: MPI.Comm, config: TrainConfig) -> SimpleNamespace:
    model = mlp(4)
    optimizer = make_optimizer(model, config)
    return SimpleNamespace(model=model, optimizer=optimizer, sync=SSGDSync(model, optimizer, comm),
                           config=config, precision=Precision("fp32", CPU),
                           task=Classification())


@pytest.mark.parametrize("accum", [1, 2])
def test_ssgd_clips_the_averaged_gradient_like_one_process_clipping_the_whole_batch(
        accum: int) -> None:
    """A norm of 0.05 clips every step; clipping each rank's own gradient first would give
    another average (the ranks' gradients differ)."""
    config = TrainConfig(clip_grad_norm=0.05, grad_accum_steps=accum, optimizer="adamw")
    ours, alone = run_of(COMM, config), run_of(MPI.COMM_SELF, config)
    per_rank = 4 * accum
    for step in range(5):
        x, y = global_batch(step, per_rank)
        part = my_part(x, per_rank)
        mine = [(x[part][k:k + 4], y[part][k:k + 4]) for k in range(0, per_rank, 4)]
        train_step(ours, LoopState(10, CPU), mine, lr=0.01)
        train_step(alone, LoopState(10, CPU), [(x, y)], lr=0.01)
    weights = gathered(flat_of(ours.model))
    assert all(torch.equal(w, weights[0]) for w in weights)  # every rank clipped alike
    torch.testing.assert_close(flat_of(ours.model), flat_of(alone.model), rtol=1e-4,
                               atol=1e-6)
    assert ours.sync.metrics().rounds == 5  # one Allreduce per optimizer step
