"""The synchronisers under MPI: SSGD, PA and PSO-PS against what each rank can compute alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from psops_mpi import PASync, PSOConfig, PSOSync, SSGDSync
from psops_mpi.swarm import select_best

pytestmark = pytest.mark.mpi(min_size=2)
COMM = MPI.COMM_WORLD
PAPER = PSOConfig.from_preset("paper")  # the particle rule, as Ye et al. define it


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def bn_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def global_batch(step: int, per_rank: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """The same batch of size P*per_rank on every rank, different per step."""
    gen = torch.Generator().manual_seed(1000 + step)
    n = per_rank * COMM.Get_size()
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def my_part(x: torch.Tensor, per_rank: int = 4) -> slice:
    return slice(COMM.Get_rank() * per_rank, (COMM.Get_rank() + 1) * per_rank)


def gathered(t: torch.Tensor) -> list[torch.Tensor]:
    return [torch.as_tensor(a) for a in COMM.allgather(t.detach().clone().numpy())]


def flat_of(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def sgd_step(model, opt, sync, x, y) -> torch.Tensor:
    opt.zero_grad(set_to_none=False)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    if sync is not None:
        sync.after_backward()
    opt.step()
    if sync is not None:
        sync.after_step(loss)
    return loss


@pytest.mark.parametrize("cls", [SSGDSync, PASync, PSOSync])
def test_every_rank_starts_from_rank_zero_weights(cls) -> None:
    model = bn_net(seed=COMM.Get_rank())  # deliberately different on every rank
    expected = flat_of(bn_net(seed=0))
    cls(model, torch.optim.SGD(model.parameters(), lr=0.1), COMM)
    assert torch.equal(flat_of(model), expected)


def test_ssgd_matches_single_process_sgd_on_the_concatenated_batch() -> None:
    model, reference = mlp(1), mlp(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sync = SSGDSync(model, opt, COMM)
    for step in range(10):
        x, y = global_batch(step)
        part = my_part(x)
        sgd_step(model, opt, sync, x[part], y[part])
        sgd_step(reference, ref_opt, None, x, y)
    weights = gathered(flat_of(model))
    assert all(torch.equal(w, weights[0]) for w in weights)  # identical on every rank
    assert torch.allclose(flat_of(model), flat_of(reference), atol=1e-5)
    assert not torch.allclose(flat_of(model), flat_of(mlp(1)))  # and it did train


def test_pa_every_step_with_plain_sgd_matches_ssgd() -> None:
    pa_model, ssgd_model = mlp(2), mlp(2)
    pa_opt = torch.optim.SGD(pa_model.parameters(), lr=0.2)
    ssgd_opt = torch.optim.SGD(ssgd_model.parameters(), lr=0.2)
    pa, ssgd = PASync(pa_model, pa_opt, COMM, 1), SSGDSync(ssgd_model, ssgd_opt, COMM)
    for step in range(8):
        x, y = global_batch(step)
        part = my_part(x)
        sgd_step(pa_model, pa_opt, pa, x[part], y[part])
        sgd_step(ssgd_model, ssgd_opt, ssgd, x[part], y[part])
    assert pa.rounds == 8
    assert torch.allclose(flat_of(pa_model), flat_of(ssgd_model), atol=1e-6)


def fitness_of(rank: int, round_index: int, size: int) -> float:
    """Known on every rank: ties on purpose, and rank 0 is NaN on odd rounds."""
    if rank == 0 and round_index % 2 == 1:
        return math.nan
    return float((3 * rank + 5 * round_index) % max(size - 1, 1))


def run_rounds(exchange: str, memory: str, num_rounds: int = 6) -> list[tuple]:
    """Train a PSO-PS swarm whose losses are fixed numbers; return what rank saw per round."""
    model = mlp(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    cfg = PSOConfig.from_preset("paper", w=0.5, c1=0.5, c2=1.0, exchange=exchange,
                                gbest_memory=memory)
    sync = PSOSync(model, opt, COMM, sync_every=2, config=cfg, seed=7)
    rank, size = COMM.Get_rank(), COMM.Get_size()
    seen = []
    for r in range(num_rounds):
        for step in range(2):
            x, y = global_batch(10 * r + step)
            part = my_part(x)
            sgd_step(model, opt, None, x[part], y[part])
            positions = gathered(sync.flat.data)  # what each particle is before the round
            sync.after_step(torch.tensor(fitness_of(rank, r, size)))
        seen.append((sync.swarm.gbest_owner, sync.swarm.gbest_fitness,
                     sync.swarm.gbest.clone(), positions, flat_of(model)))
    return seen


@pytest.mark.parametrize("exchange", ["allgather", "best"])
def test_every_rank_agrees_on_gbest_and_nan_never_wins(exchange: str) -> None:
    size = COMM.Get_size()
    for r, (owner, fitness, gbest, positions, _) in enumerate(run_rounds(exchange, "round")):
        expected_owner, expected = select_best(
            torch.tensor([fitness_of(k, r, size) for k in range(size)]))
        assert (owner, fitness) == (expected_owner, expected)
        assert torch.equal(gbest, positions[owner])  # the owner's position, sent exactly
        assert math.isfinite(fitness)
        agreed = COMM.allgather((owner, fitness, gbest.sum().item()))
        assert all(a == agreed[0] for a in agreed)


def test_both_exchanges_follow_the_same_trajectory() -> None:
    via_allgather = run_rounds("allgather", "all")
    via_best = run_rounds("best", "all")
    for a, b in zip(via_allgather, via_best, strict=True):
        assert a[:2] == b[:2]
        assert torch.equal(a[4], b[4])  # same weights after every round
    fitness = [f for _, f, *_ in via_allgather]
    assert fitness == sorted(fitness, reverse=True)  # memory 'all' never gets worse


def new_sync(cls: type, model: nn.Module, opt, sync_every: int, **kw):
    if cls is SSGDSync:
        return SSGDSync(model, opt, COMM)
    return cls(model, opt, COMM, sync_every, **kw)


@pytest.mark.parametrize("cls", [PASync, SSGDSync, PSOSync])
def test_a_round_replaces_batchnorm_statistics_by_their_mean_over_ranks(cls) -> None:
    """Every rank feeds the net differently scaled data, so its running statistics differ;
    the round (PA, PSO-PS: every 3 steps; SSGD: at flush) must leave every rank holding the
    mean of all ranks' statistics as they were just before it, gathered here."""
    model = bn_net(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sync = new_sync(cls, model, opt, 3, **({"reset_momentum": True} if cls is PSOSync else {}))
    rank = COMM.Get_rank()
    for step in range(3):
        x, y = global_batch(step)
        part = my_part(x)
        opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(model(x[part] * (rank + 1) + rank), y[part])
        loss.backward()
        sync.after_backward()
        opt.step()
        if step == 2:
            before = gathered(sync.buffers.data)  # every rank's statistics before the round
        sync.after_step(loss)
    sync.flush()  # SSGD averages its statistics here; PA and PSO-PS have nothing pending
    # one round each (PA, PSO-PS); SSGD's rounds are its 3 gradient Allreduces, and the
    # averaging at flush is not one
    assert sync.rounds == (3 if cls is SSGDSync else 1)
    expected = torch.stack(before).mean(0)
    assert not torch.allclose(before[0], expected, atol=1e-3)  # rank 0's copy is not the mean
    assert torch.allclose(sync.buffers.data, expected, rtol=1e-6, atol=1e-6)
    running_mean = model[1].running_mean  # the module's own buffer is a view of the flat one
    assert torch.equal(running_mean, sync.buffers.data[: running_mean.numel()])
    if cls is PSOSync:
        assert len(opt.state) == 0  # reset_momentum cleared the momentum at the round


def allreduce_bytes(numel: int, size: int) -> int:
    """docs/algorithms.md: an allreduce sends 2(P-1)/P of a buffer of 4-byte floats per rank."""
    return 2 * (size - 1) * 4 * numel // size


@pytest.mark.parametrize("algo", ["ssgd", "pa", "pso-allgather", "pso-best"])
def test_bytes_sent_per_rank_follow_the_readme(algo: str) -> None:
    """Two rounds of a BatchNorm net (N parameters, B float buffers), counted against the
    the manual's table: SSGD 2(P-1)/P*4N per step, PA 2(P-1)/P*4(N+1) per round (the weights and
    their finite flag), PSO-PS (P-1)*4(N+1) with allgather or 4N + 16 with best (Bcast of the
    best particle plus the MINLOC pair), and every round's averaging of the buffers and
    their flag 2(P-1)/P*4(B+1)."""
    model = bn_net(8)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    size = COMM.Get_size()
    num_params = sum(p.numel() for p in model.parameters())
    num_buffers = sum(b.numel() for b in model.buffers() if b.is_floating_point())
    assert (num_params, num_buffers) == (99, 16)  # by hand: 6*8+8 + 8+8 + 8*3+3; 8 + 8
    if algo == "ssgd":
        sync = SSGDSync(model, opt, COMM)
    elif algo == "pa":
        sync = PASync(model, opt, COMM, 2)
    else:
        # the paper's rule: no mean to allreduce beside the best particle
        sync = PSOSync(model, opt, COMM, 2,
                       config=PSOConfig.from_preset("paper", exchange=algo.removeprefix("pso-")))
    assert sync.exchange.bytes_sent == 0  # the initial broadcast is setup, not training
    for step in range(4):
        x, y = global_batch(step)
        part = my_part(x)
        sgd_step(model, opt, sync, x[part], y[part])
    sync.flush()
    buffers = allreduce_bytes(num_buffers + 1, size)
    expected = {
        "ssgd": 4 * allreduce_bytes(num_params, size) + buffers,  # 4 steps, 1 round at flush
        "pa": 2 * (allreduce_bytes(num_params + 1, size) + buffers),
        "pso-allgather": 2 * ((size - 1) * 4 * (num_params + 1) + buffers),
        "pso-best": 2 * (4 * num_params + 16 + buffers),
    }[algo]
    calls = {"ssgd": 4 + 1, "pa": 2 * 2, "pso-allgather": 2 * 2, "pso-best": 2 * 3}[algo]
    assert sync.exchange.counters()["comm_bytes"] == sync.exchange.bytes_sent == expected
    assert sync.exchange.counters()["comm_calls"] == calls


def test_holdout_fitness_decides_the_global_best_not_the_training_loss() -> None:
    """The training losses rank the particles one way (rank 0 best), the holdout fitness the
    other way (the last rank best): with fitness 'holdout' the last rank's particle must be
    the global best on every rank, with its holdout value as the global fitness."""
    rank, size = COMM.Get_rank(), COMM.Get_size()
    calls = []

    def holdout() -> torch.Tensor:
        calls.append(1)
        return torch.tensor(10.0 * (size - rank))

    model = mlp(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sync = PSOSync(model, opt, COMM, sync_every=2, fitness="holdout", fitness_fn=holdout)
    for step in range(2):
        x, y = global_batch(step)
        part = my_part(x)
        opt.zero_grad()
        F.cross_entropy(model(x[part]), y[part]).backward()
        opt.step()
        positions = gathered(sync.flat.data)
        sync.after_step(torch.tensor(float(rank)))  # the "training loss": rank 0 is best
    assert sync.rounds == 1 and len(calls) == 1  # one holdout evaluation per round
    assert (sync.swarm.gbest_owner, sync.swarm.gbest_fitness) == (size - 1, 10.0)
    assert torch.equal(sync.swarm.gbest, positions[size - 1])


def test_consensus_evaluates_gbest_then_restores_the_particle() -> None:
    model = mlp(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    sync = PSOSync(model, opt, COMM, sync_every=100, config=PAPER)  # particles differ
    x, y = global_batch(0)
    part = my_part(x)
    sgd_step(model, opt, sync, x[part], y[part])
    sync.flush()
    mine = flat_of(model)
    with sync.consensus():
        inside = gathered(flat_of(model))
    assert all(torch.equal(w, inside[0]) for w in inside)  # one model on every rank
    assert torch.equal(inside[0], sync.swarm.gbest)
    assert torch.equal(flat_of(model), mine)


def test_library_loop_learns_with_holdout_fitness() -> None:
    """A user's own loop: four calls per step, as the manual shows (docs/api.md)."""
    gen = torch.Generator().manual_seed(5)
    centers = torch.randn(3, 6, generator=gen) * 3
    labels = torch.randint(0, 3, (600,), generator=gen)
    data = centers[labels] + torch.randn(600, 6, generator=gen)
    model = mlp(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

    def holdout() -> torch.Tensor:
        with torch.no_grad():
            return F.cross_entropy(model(data[:100]), labels[:100])

    sync = PSOSync(model, opt, COMM, sync_every=4, fitness="holdout", fitness_fn=holdout)
    start = holdout().item()
    rank, size = COMM.Get_rank(), COMM.Get_size()
    num_steps = 600 // (16 * size)  # the same on every rank, or their rounds fall out of step
    for _epoch in range(5):
        for step in range(num_steps):
            i = (step * size + rank) * 16
            loss = F.cross_entropy(model(data[i : i + 16]), labels[i : i + 16])
            opt.zero_grad()
            loss.backward()
            sync.after_backward()
            opt.step()
            sync.after_step(loss)
    sync.flush()
    with sync.consensus():
        end = holdout().item()
    assert sync.rounds >= 5 and end < 0.5 * start


def test_a_diverged_particle_restarts_at_the_global_best() -> None:
    """Rank 1's weights turn NaN: after the round it sits at g with zero velocity and fresh
    momentum, and trains on with finite losses; the other ranks move as usual."""
    model = mlp(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    sync = PSOSync(model, opt, COMM, sync_every=2, seed=3, config=PAPER)
    rank = COMM.Get_rank()
    for r in range(4):
        if r == 2 and rank == 1:
            with torch.no_grad():
                sync.flat.data.fill_(math.nan)
        for step in range(2):
            x, y = global_batch(10 * r + step)
            part = my_part(x)
            loss = sgd_step(model, opt, sync, x[part], y[part])
        if r == 2:
            assert sync.restarts == (1 if rank == 1 else 0)
            if rank == 1:  # nothing moved it since the round: it is g exactly
                assert torch.equal(sync.flat.data, sync.swarm.gbest)
                assert torch.count_nonzero(sync.swarm.v) == 0 and not opt.state
            else:
                assert torch.isfinite(sync.flat.data).all()
    assert math.isfinite(loss.item()) and torch.isfinite(sync.flat.data).all()
    assert sync.metrics().counts["restarts"] == (1 if rank == 1 else 0)


@pytest.mark.parametrize("c3", [0.5, 1.0])
def test_pull_to_the_swarm_mean(c3: float) -> None:
    """With c3 the move is followed by x += c3 (mean - x), the mean over the positions the
    round gathered; c3 = 1 puts every particle at that mean."""
    model = mlp(7)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sync = PSOSync(model, opt, COMM, sync_every=2, seed=1, config=PAPER, w=0.5, c3=c3)
    twin = mlp(7)  # the same swarm without the pull, kept at the same positions
    reference = PSOSync(twin, torch.optim.SGD(twin.parameters(), lr=0.05), COMM,
                        sync_every=2, seed=1, config=PAPER, w=0.5)
    for r in range(3):
        for step in range(2):
            x, y = global_batch(10 * r + step)
            part = my_part(x)
            sgd_step(model, opt, None, x[part], y[part])
            before = gathered(sync.flat.data)
            reference.flat.data.copy_(sync.flat.data)
            reference.swarm.v.copy_(sync.swarm.v)
            reference.steps_since_round = sync.steps_since_round
            reference.after_step(torch.tensor(1.0 + COMM.Get_rank()))
            sync.after_step(torch.tensor(1.0 + COMM.Get_rank()))
        mean = torch.stack(before).mean(0)
        moved = reference.flat.data  # where the plain PSO move put this particle
        assert torch.allclose(sync.flat.data, moved + c3 * (mean - moved), atol=1e-6)
        if c3 == 1.0:  # every particle at the mean, up to the rounding of x + (mean - x)
            assert all(torch.allclose(p, mean, atol=1e-6) for p in gathered(sync.flat.data))
