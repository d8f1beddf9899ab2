"""The warm start (``--local-after-steps``): the first steps are SSGD's, the periods after."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from psops_mpi import SSGDSync
from tests.helpers.training import local_step
from tests.mpi.test_overlap import agreed, make, mlp

pytestmark = pytest.mark.mpi(min_size=2)
COMM = MPI.COMM_WORLD
WARM, EVERY = 5, 3


@pytest.mark.parametrize("kind", ["pa", "slowmo", "centre", "paper"])
@pytest.mark.parametrize("overlap", [0, 2])
def test_the_warm_steps_are_ssgds_and_the_periods_start_from_them(kind: str,
                                                                 overlap: int) -> None:
    """Five warm steps give the bytes SSGD's five steps give (the same averaged gradients,
    the same AdamW state on every rank); then the centre starts from them and the rounds of
    every 3 steps follow (with or without rounds in flight), every rank still on one centre."""
    reference = mlp()
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=0.01)
    ssgd = SSGDSync(reference, ref_opt, COMM, 1)
    ssgd_weights = []
    for step in range(WARM):
        local_step(reference, ref_opt, ssgd, step)
        ssgd_weights.append(ssgd.flat.data.clone())

    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    sync = make(kind, model, opt, EVERY, warm_steps=WARM, overlap_steps=overlap)
    for step in range(WARM):
        assert sync.warming_up and sync.lr_scale() == 1.0
        local_step(model, opt, sync, step)
        if step == 1:  # between epochs inside the warm start: the model itself is evaluated
            sync.flush(final=False)
            assert sync.consensus_source() == (0, None) and sync.inflight_step is None
            with sync.consensus():
                assert torch.equal(sync.flat.data, ssgd_weights[step])
    assert not sync.warming_up and sync.rounds == WARM and sync.steps_since_round == 0
    assert torch.equal(sync.flat.data, ssgd.flat.data) and agreed(sync.flat.data)
    for name in ("exp_avg", "exp_avg_sq"):
        for mine, theirs in zip(opt.state.values(), ref_opt.state.values(), strict=True):
            assert torch.equal(mine[name], theirs[name]), name
    centre = getattr(sync, "anchor", None)
    if centre is not None:
        assert torch.equal(centre, sync.flat.data)
    for step in range(WARM, WARM + 3 * EVERY - 1):
        local_step(model, opt, sync, step)
    assert not agreed(sync.flat.data)  # local steps again, mid-period
    local_step(model, opt, sync, WARM + 3 * EVERY - 1)
    assert sync.rounds == WARM + 3
    sync.flush()
    with sync.consensus():
        assert agreed(sync.flat.data) or kind == "paper"


def test_a_nan_gradient_in_the_warm_start_is_skipped_on_every_rank() -> None:
    """Rank 1's loss is NaN at the second warm step: the averaged gradient is NaN on every
    rank, every rank skips that step (as SSGD does), and the ranks stay on one model."""
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = make("pa", model, opt, EVERY, warm_steps=WARM)
    for step in range(WARM):
        gen = torch.Generator().manual_seed(100 * step + COMM.Get_rank())
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if step == 1 and COMM.Get_rank() == 1:
            loss = loss * float("nan")
        loss.backward()
        before = sync.flat.data.clone()
        take = sync.after_backward()
        if take:
            opt.step()
        sync.after_step(loss)
        assert take == (step != 1)
        assert torch.equal(sync.flat.data, before) == (step == 1)
        assert agreed(sync.flat.data)
    assert sync.skipped == 1 and sync.consecutive_skipped == 0
