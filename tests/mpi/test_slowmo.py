"""SlowMo under MPI: PA as its special case, bit for bit, and two rounds computed by hand."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI
from torch import nn

from psops_mpi import PASync, SlowMoSync
from tests.helpers.training import local_step

pytestmark = pytest.mark.mpi(min_size=2)
COMM = MPI.COMM_WORLD


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def test_outer_lr_one_and_no_momentum_is_pa_bit_for_bit() -> None:
    models = [mlp(1), mlp(1)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in models]
    pa = PASync(models[0], opts[0], COMM, 3)
    slowmo = SlowMoSync(models[1], opts[1], COMM, 3, outer_lr=1.0, outer_momentum=0.0)
    for step in range(10):  # three rounds, then a partial period flushed
        for model, opt, sync in zip(models, opts, (pa, slowmo), strict=True):
            local_step(model, opt, sync, step)
    pa.flush()
    slowmo.flush()
    assert slowmo.rounds == pa.rounds == 4
    assert torch.equal(slowmo.flat.data, pa.flat.data)
    start = torch.cat([p.detach().reshape(-1) for p in mlp(1).parameters()])
    assert not torch.equal(pa.flat.data, start)  # and it trained


@pytest.mark.parametrize("nesterov", [False, True])
def test_two_rounds_match_the_update_rule_by_hand(nesterov: bool) -> None:
    """One weight w, SGD without momentum at rate g: each rank r sets w to anchor - g * c_r
    before a round, so the mean pseudo-gradient is mean(c_r), and the rule gives
    u1 = d1, a1 = a0 - alpha g (u1 or d1 + beta u1);
    u2 = beta u1 + d2, a2 = a1 - alpha g (u2 or d2 + beta u2)."""
    rank, size = COMM.Get_rank(), COMM.Get_size()
    alpha, beta, g = 0.5, 0.75, 0.25
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(2.0 if rank == 0 else 7.0)  # rank 0's value is broadcast
    opt = torch.optim.SGD(model.parameters(), lr=g)
    sync = SlowMoSync(model, opt, COMM, 1, outer_lr=alpha, outer_momentum=beta,
                      outer_nesterov=nesterov)
    anchor, u = 2.0, 0.0
    for c in ([r + 1.0 for r in range(size)], [2.0 * (r + 1) ** 2 for r in range(size)]):
        with torch.no_grad():
            model.weight.fill_(anchor - g * c[rank])
        sync.after_step()
        d = sum(c) / size
        u = beta * u + d
        anchor -= alpha * g * ((d + beta * u) if nesterov else u)
        assert model.weight.item() == pytest.approx(anchor, rel=1e-6)
        assert sync.momentum.item() == pytest.approx(u, rel=1e-6)
    agreed = COMM.allgather(model.weight.item())
    assert all(a == agreed[0] for a in agreed)  # one model on every rank
