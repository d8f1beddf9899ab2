"""PSO-PS's rules under MPI: the mean pull over either exchange, the centre rule against
SlowMo, and the swarm's mean as its answer."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from psops_mpi import PSOSync, SlowMoSync
from tests.helpers.training import local_step

pytestmark = pytest.mark.mpi(min_size=2)
COMM = MPI.COMM_WORLD
NO_SYNC = SimpleNamespace(after_backward=lambda: True, after_step=lambda loss: False)


def mlp(seed: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    return [torch.as_tensor(a) for a in COMM.allgather(t.detach().clone().numpy())]


def train_swarm(steps: int = 12, nan_at: int = -1, **pso: object) -> PSOSync:
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = PSOSync(model, opt, COMM, sync_every=3, seed=5, **pso)
    for step in range(steps):
        local_step(model, opt, sync, step, nan=step == nan_at and COMM.Get_rank() == 1)
    return sync


@pytest.mark.parametrize("rule", ["particle", "centre"])
def test_best_exchange_with_the_mean_matches_the_allgather(rule: str) -> None:
    pull = {"c3": 0.5} if rule == "particle" else {}
    via_rows = train_swarm(rule=rule, exchange="allgather", **pull)
    via_mean = train_swarm(rule=rule, exchange="best", **pull)
    assert torch.allclose(via_rows.flat.data, via_mean.flat.data, atol=1e-5)
    assert via_rows.swarm.gbest_owner == via_mean.swarm.gbest_owner
    n, p = via_mean.flat.numel, COMM.Get_size()
    # per round: MINLOC of (double, int), a broadcast of N floats and a ring allreduce of
    # [x ; 1]: O(N) bytes at any P, where the allgather sends (P - 1)(N + 1) floats
    per_round = 16 + 4 * n + int(2 * (p - 1) / p * 4 * (n + 1))
    assert via_mean.exchange.bytes_sent == via_mean.rounds * per_round


def test_centre_rule_without_the_pull_is_slowmo_with_momentum_w() -> None:
    sync = train_swarm(rule="centre", w=0.6, c2=0.0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    slowmo = SlowMoSync(model, opt, COMM, 3, outer_lr=1.0, outer_momentum=0.6)
    for step in range(12):
        local_step(model, opt, slowmo, step)
    assert torch.allclose(sync.flat.data, slowmo.flat.data, atol=1e-5)
    assert not torch.allclose(sync.flat.data, torch.cat(
        [p.detach().reshape(-1) for p in mlp().parameters()]))  # it trained


def test_centre_rule_keeps_one_model_pulled_towards_the_best() -> None:
    plain = train_swarm(rule="centre", w=0.6, c2=0.0)
    pulled = train_swarm(rule="centre", w=0.6, c2=1.0)
    for sync in (plain, pulled):
        positions = gathered(sync.flat.data)
        assert all(torch.equal(p, positions[0]) for p in positions)  # every rank at the centre
    assert not torch.allclose(plain.flat.data, pulled.flat.data)


def test_centre_rule_restarts_a_diverged_particle_at_the_centre() -> None:
    sync = train_swarm(rule="centre", nan_at=4)  # rank 1 diverges in the second period
    assert torch.isfinite(sync.flat.data).all()
    assert sync.restarts == (1 if COMM.Get_rank() == 1 else 0)
    positions = gathered(sync.flat.data)
    assert all(torch.equal(p, positions[0]) for p in positions)


def test_mean_answer_evaluates_the_mean_of_the_particles() -> None:
    # the paper's rule, ending mid-period: the particles differ
    sync = train_swarm(rule="particle", answer="mean", steps=13)
    sync.flush()
    mine = sync.flat.data.clone()
    expected = torch.stack(gathered(mine)).mean(0)
    with sync.consensus():
        assert torch.allclose(sync.flat.data, expected, atol=1e-6)
        inside = gathered(sync.flat.data)
    assert all(torch.equal(p, inside[0]) for p in inside)
    assert torch.equal(sync.flat.data, mine)  # the particle itself is back
    assert sync.consensus_source() == (-1, None)


def test_the_elastic_swarm_moves_each_particle_part_of_the_way_to_the_centre() -> None:
    """rho 0.5: after a round each particle is halfway between where its period left it and
    the centre, which moved as the centre rule moves it (here SlowMo's step on the mean);
    the particles stay distinct, the answer is the centre, and a round costs PA's bytes."""
    rho, w = 0.5, 0.4
    centre_only = train_swarm(rule="centre", w=w, c2=0.0, steps=6)  # two rounds, rho 1
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = PSOSync(model, opt, COMM, sync_every=3, seed=5, rule="centre", w=w, c2=0.0, rho=rho)
    before = None
    for step in range(6):
        if step == 5:  # the second round's last step: note where the particle stands
            local_step(model, opt, NO_SYNC, step)
            before = sync.flat.data.clone()
            mean = torch.stack(gathered(before)).mean(0)
            velocity = sync.swarm.v.clone()
            sync.after_step(torch.tensor(1.0))
            continue
        local_step(model, opt, sync, step)
    assert before is not None and sync.rounds == 2 and sync.exchange_kind == "mean"
    centre = mean + w * velocity
    torch.testing.assert_close(sync.anchor, centre, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sync.flat.data, before + rho * (centre - before), rtol=1e-5,
                               atol=1e-6)
    positions = gathered(sync.flat.data)
    assert not all(torch.equal(p, positions[0]) for p in positions)  # distinct particles
    with sync.consensus():
        assert torch.equal(sync.flat.data, sync.anchor)  # the centre is the answer
    assert sync.consensus_source() == (0, "anchor")
    n, p = sync.flat.numel, COMM.Get_size()
    per_round = 16 + int(2 * (p - 1) / p * 4 * (n + 1))  # MINLOC and PA's allreduce
    assert sync.exchange.bytes_sent == sync.rounds * per_round
    # rho 1 is the centre rule exactly: every particle at the same centre
    assert all(torch.equal(q, gathered(centre_only.flat.data)[0])
               for q in gathered(centre_only.flat.data))


def test_the_learning_rate_search_agrees_on_every_multiplier_for_p_scalars_a_round() -> None:
    """Each particle scores its own weights on the same holdout batch before the round;
    every rank then holds the same multipliers, each rank trains with its own, and the
    search costs one float64 per rank per round beyond the exchange."""
    gen = torch.Generator().manual_seed(9)
    hx, hy = torch.randn(32, 6, generator=gen), torch.randint(0, 3, (32,), generator=gen)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    holdout = lambda: F.cross_entropy(model(hx), hy).detach()  # noqa: E731
    plain = train_swarm(rule="centre", c2=0.0, steps=12)
    sync = PSOSync(model, opt, COMM, sync_every=3, seed=5, rule="centre", c2=0.0,
                   lr_spread=3.0, lr_period=2, fitness_fn=holdout)
    scales = []
    for step in range(12):
        scales.append(sync.lr_scale())
        for group in opt.param_groups:
            group["lr"] = 0.1 * sync.lr_scale()
        local_step(model, opt, sync, step)
    assert sync.rounds == 4 and sync.rate is not None and sync.rate.steps == 2
    everyone = COMM.allgather(sync.rate.h.tolist())
    assert all(h == everyone[0] for h in everyone)
    assert scales[0] == pytest.approx(3.0 ** (2 * COMM.Get_rank() / (COMM.Get_size() - 1) - 1))
    assert sync.lr_scale() == sync.rate.multiplier(COMM.Get_rank()) != scales[0]
    extra = 8 * (COMM.Get_size() - 1) * sync.rounds
    assert sync.exchange.bytes_sent == plain.exchange.bytes_sent + extra
    values = sync.metrics().values
    assert [values[f"lr_mult_r{k}"] for k in range(COMM.Get_size())] == pytest.approx(
        [sync.rate.multiplier(k) for k in range(COMM.Get_size())])
