"""--average-optimizer-state: the ranks' optimizer state averaged at every round."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mpi4py import MPI

from tests.helpers.training import local_step, step_before_the_round
from tests.mpi.test_overlap import agreed, make, mlp

pytestmark = pytest.mark.mpi(min_size=2)
COMM = MPI.COMM_WORLD
EVERY = 3


def moments(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [state[key].clone() for state in opt.state.values()
            for key in ("exp_avg", "exp_avg_sq")]


def step_until_the_round(model, opt, sync, step: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The round's step up to (not including) the synchroniser's after_step: the moments
    every rank then holds, averaged over the ranks by hand, and the step's loss."""
    loss = step_before_the_round(model, opt, sync, step)
    return [torch.stack(COMM.allgather(t)).mean(0) for t in moments(opt)], loss


@pytest.mark.parametrize("kind", ["pa", "slowmo", "centre"])
@pytest.mark.parametrize("overlap", [0, EVERY])
def test_every_rank_continues_with_the_mean_of_the_moments(kind: str, overlap: int) -> None:
    """AdamW's moments differ between ranks after local steps; the round (blocking, or
    landing K steps later) replaces them by their mean on every rank, and counts its bytes:
    2(P-1)/P of (2N + 1) floats more, and 8 bytes a rank to agree on the size."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sync = make(kind, model, opt, EVERY, average_state=True, overlap_steps=overlap)
    plain_model = mlp()
    plain_opt = torch.optim.AdamW(plain_model.parameters(), lr=0.01)
    plain = make(kind, plain_model, plain_opt, EVERY, overlap_steps=overlap)
    last = 2 * EVERY - 1 if overlap else EVERY - 1  # the step at which the mean is taken
    for step in range(last):
        local_step(model, opt, sync, step)
        local_step(plain_model, plain_opt, plain, step)
    assert not all(agreed(t) for t in moments(opt))
    want, loss = step_until_the_round(model, opt, sync, last)
    sync.after_step(loss)
    local_step(plain_model, plain_opt, plain, last)
    for got, mean in zip(moments(opt), want, strict=True):
        assert agreed(got)
        torch.testing.assert_close(got, mean, rtol=1e-6, atol=1e-9)
    n, size = sync.flat.numel, COMM.Get_size()
    assert sync.exchange.bytes_sent - plain.exchange.bytes_sent == pytest.approx(
        4 * (2 * n + 1) * 2 * (size - 1) / size + 8 * (size - 1), abs=2)


def test_a_rank_without_state_sends_nothing_and_the_others_agree() -> None:
    """Rank 1 has taken no step yet (its optimizer holds no state): the others average their
    own, rank 1 keeps none and makes its own at its next step."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sync = make("slowmo", model, opt, EVERY, average_state=True)
    if COMM.Get_rank() != 1:
        for step in range(EVERY - 1):
            gen = torch.Generator().manual_seed(100 * step + COMM.Get_rank())
            x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    sync.steps_since_round = EVERY - 1
    sync.after_step(torch.tensor(1.0))
    if COMM.Get_rank() == 1:
        assert not opt.state
    others = COMM.Split(0 if COMM.Get_rank() != 1 else MPI.UNDEFINED, COMM.Get_rank())
    if others != MPI.COMM_NULL:
        for t in moments(opt):
            mine = t.numpy().tobytes()
            assert all(o == mine for o in others.allgather(mine))
        others.Free()


def test_a_rank_whose_state_is_not_finite_is_left_out_and_takes_the_mean() -> None:
    """Rank 1's moments hold a NaN at the round (its weights are finite, so it does not
    restart): the mean is the other ranks', and rank 1 takes it."""
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sync = make("slowmo", model, opt, EVERY, average_state=True)
    for step in range(EVERY - 1):
        local_step(model, opt, sync, step)
    _, loss = step_until_the_round(model, opt, sync, EVERY - 1)
    mine = moments(opt)
    if COMM.Get_rank() == 1:
        next(iter(opt.state.values()))["exp_avg"].view(-1)[0] = float("nan")
    others = [g for r, g in enumerate(COMM.allgather(mine)) if r != 1]
    want = [torch.stack([g[i] for g in others]).mean(0) for i in range(len(mine))]
    sync.after_step(loss)
    assert sync.restarts == 0
    for got, mean in zip(moments(opt), want, strict=True):
        assert agreed(got)
        torch.testing.assert_close(got, mean, rtol=1e-6, atol=1e-9)
