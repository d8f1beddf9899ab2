"""Faults under MPI: non-finite values on some ranks, a rank that comes late, a stop signal that
reached one rank, a checkpoint write that fails on one rank. Every rank computes what it
expects from values it can see alone."""

from __future__ import annotations

import errno
import io
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from mpi4py import MPI
from torch import nn

from psops_mpi import NonFiniteStop, PASync, PSOSync, SlowMoSync, SSGDSync
from psops_mpi.checkpoint import store
from psops_mpi.checkpoint.saver import Checkpointer
from psops_mpi.loop import StopPoll
from psops_mpi.stall import StallWatch
from psops_mpi.stop import StopRequest

pytestmark = pytest.mark.mpi(min_size=2)
COMM = MPI.COMM_WORLD
RANK, SIZE = COMM.Get_rank(), COMM.Get_size()
LAST = SIZE - 1  # the rank that misbehaves


def net(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    if batchnorm:
        return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def step(model: nn.Module, opt: torch.optim.Optimizer, sync, seed: int,
         poison: bool = False) -> None:
    """One step of the loop's four calls on this rank's own batch; ``poison``: NaN logits."""
    gen = torch.Generator().manual_seed(100 * seed + RANK)
    x, y = torch.randn(4, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen)
    opt.zero_grad(set_to_none=False)
    out = model(x)
    loss = torch.nn.functional.cross_entropy(out * float("nan") if poison else out, y)
    loss.backward()
    if sync.after_backward():
        opt.step()
    sync.after_step(loss)


def gathered(t: torch.Tensor) -> list[np.ndarray]:
    return COMM.allgather(t.detach().clone().numpy())


@pytest.mark.parametrize("cls", [PASync, SlowMoSync])
def test_a_rank_with_non_finite_weights_is_left_out_and_restarts_from_the_mean(cls) -> None:
    """The last rank's weights are NaN at the round: the others' mean (SlowMo: the outer step
    from it) is where every rank continues; only the last rank counts a restart and loses
    its momentum."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kwargs = {"outer_momentum": 0.0} if cls is SlowMoSync else {}
    sync = cls(model, opt, COMM, 2, **kwargs)
    step(model, opt, sync, 0)
    step(model, opt, sync, 1, poison=RANK == LAST)  # the round follows this step
    weights = gathered(sync.flat.data)
    assert all(np.isfinite(w).all() for w in weights)
    assert all(np.array_equal(w, weights[0]) for w in weights)  # one model on every rank
    assert sync.metrics().counts["restarts"] == int(RANK == LAST)
    assert (len(opt.state) == 0) == (RANK == LAST)  # momentum cleared on the restarted rank
    assert sync.metrics().shared_counts["skipped_rounds"] == 0


def test_pa_mean_leaves_out_exactly_the_non_finite_rank() -> None:
    """Weights set by hand right before a round: the mean is over the finite ranks only."""
    model = net()
    sync = PASync(model, torch.optim.SGD(model.parameters(), lr=0.1), COMM, 1)
    with torch.no_grad():
        sync.flat.data.fill_(float(RANK + 1))
        if RANK == LAST:
            sync.flat.data[3] = float("inf")
    sync.sync_round()
    expected = np.mean([r + 1.0 for r in range(SIZE) if r != LAST])
    assert torch.all(sync.flat.data == torch.tensor(expected, dtype=torch.float32))


def test_pa_stops_when_no_rank_has_finite_weights() -> None:
    model = net()
    sync = PASync(model, torch.optim.SGD(model.parameters(), lr=0.1), COMM, 1)
    with torch.no_grad():
        sync.flat.data[0] = float("nan")
    with pytest.raises(NonFiniteStop) as stopped:
        sync.sync_round()
    assert not stopped.value.at_limit and "no earlier weights" in stopped.value.reason


def test_slowmo_skips_rounds_without_finite_weights_then_stops() -> None:
    """No rank finite: every rank goes back to the anchor, the slow momentum is kept; the
    second such round in a row (max_nonfinite 2) raises on every rank."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = SlowMoSync(model, opt, COMM, 1, max_nonfinite=2)
    step(model, opt, sync, 0)  # one good round: a momentum worth keeping
    anchor, momentum = sync.anchor.clone(), sync.momentum.clone()
    step(model, opt, sync, 1, poison=True)
    assert torch.equal(sync.flat.data, anchor) and torch.equal(sync.momentum, momentum)
    assert sync.metrics().shared_counts["skipped_rounds"] == 1
    with pytest.raises(NonFiniteStop) as stopped:
        step(model, opt, sync, 2, poison=True)
    assert stopped.value.step == 3 and "2 consecutive rounds" in stopped.value.reason


def test_pso_counts_a_round_with_no_finite_particle_as_skipped() -> None:
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = PSOSync(model, opt, COMM, 1, max_nonfinite=1)
    with pytest.raises(NonFiniteStop, match="no particle had a finite fitness"):
        step(model, opt, sync, 0, poison=True)
    assert sync.metrics().shared_counts["skipped_rounds"] == 1


def test_ssgd_skips_a_non_finite_step_on_every_rank() -> None:
    """The last rank's loss is NaN: the averaged gradient is NaN on every rank, and no rank's
    weights or momentum move; the next good step goes on; two bad steps in a row stop."""
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sync = SSGDSync(model, opt, COMM, max_nonfinite=2)
    step(model, opt, sync, 0)
    weights = sync.flat.data.clone()
    momentum = [s["momentum_buffer"].clone() for s in opt.state.values()]
    step(model, opt, sync, 1, poison=RANK == LAST)
    assert torch.equal(sync.flat.data, weights)  # weight decay and momentum did not act
    assert all(torch.equal(s["momentum_buffer"], m) for s, m in zip(opt.state.values(),
                                                                    momentum, strict=True))
    assert sync.metrics().shared_counts["skipped_steps"] == 1
    step(model, opt, sync, 2)
    assert not torch.equal(sync.flat.data, weights) and sync.consecutive_skipped == 0
    step(model, opt, sync, 3, poison=RANK == 0)
    with pytest.raises(NonFiniteStop) as stopped:
        step(model, opt, sync, 4, poison=RANK == 0)
    assert stopped.value.step == 5 and "2 consecutive steps" in stopped.value.reason


def test_batchnorm_statistics_of_a_non_finite_rank_are_left_out() -> None:
    model = net(batchnorm=True)
    sync = PASync(model, torch.optim.SGD(model.parameters(), lr=0.1), COMM, 1)
    running_mean = model[1].running_mean
    with torch.no_grad():
        running_mean.fill_(float(RANK))
        if RANK == LAST:
            running_mean[0] = float("nan")
    sync.average_buffers()
    expected = np.mean([float(r) for r in range(SIZE) if r != LAST])
    assert torch.all(running_mean == torch.tensor(expected, dtype=torch.float32))


@pytest.fixture
def watch() -> Iterator[StallWatch]:
    """The communicator's own watch (its wait numbers go on from the other tests' waits, as
    in a run), reporting into a string for a while."""
    shared = StallWatch.of(COMM)
    limits, stream = (shared.report_s, shared.abort_s), shared.stream
    shared.stream = io.StringIO()
    try:
        yield shared
    finally:
        shared.configure(*limits)
        shared.stream = stream


def test_a_late_rank_is_named_by_rank_zero_while_it_is_missing(watch: StallWatch) -> None:
    """The last rank arrives 1.3 s late; rank 0 reports every 0.4 s that it (and only it)
    has not arrived, then that every rank did."""
    watch.configure(report_s=0.4, abort_s=0)
    stream = watch.stream
    assert isinstance(stream, io.StringIO)
    count = watch.count
    if RANK == LAST:
        time.sleep(1.3)
    watch.arrive("round 7 (step 56)")
    lines = stream.getvalue().splitlines()
    if RANK == 0:
        assert len(lines) >= 2, lines
        assert all(line.endswith(f"at round 7 (step 56) for rank(s) {LAST}")
                   for line in lines[:-1]), lines
        assert lines[-1].startswith("psops_mpi: every rank arrived at round 7 (step 56) after")
    elif RANK != 1:
        assert lines == []
    COMM.Barrier()
    watch.arrive("a second wait")  # the notices of the first do not confuse it
    assert watch.count == count + 2


def test_rank_one_says_when_rank_zero_is_the_one_missing(watch: StallWatch) -> None:
    watch.configure(report_s=0.5, abort_s=0)
    stream = watch.stream
    assert isinstance(stream, io.StringIO)
    if RANK == 0:
        time.sleep(1.4)
    watch.arrive("the evaluation")
    lines = stream.getvalue().splitlines()
    if RANK == 1:
        assert lines and "rank 0 has not arrived" in lines[0], lines
    if RANK >= 2:
        assert lines == []
    COMM.Barrier()


def test_the_watch_notices_never_reach_a_users_own_receive(watch: StallWatch) -> None:
    """Rank 0 has a receive of any source and any tag posted on the communicator, as a
    library user's code might, while the last rank arrives late and the others send their
    notices: none of them matches it (they travel on the watch's own duplicate); the user's
    own message then does."""
    watch.configure(report_s=0.4, abort_s=0)
    buf = np.zeros(1, dtype=np.int64)
    request = COMM.Irecv(buf, source=MPI.ANY_SOURCE, tag=MPI.ANY_TAG) if RANK == 0 else None
    if RANK == LAST:
        time.sleep(1.2)
    watch.arrive("a wait with notices")
    if RANK == 0:
        assert request is not None and not request.Test()  # no notice took it
    COMM.Barrier()
    if RANK == LAST:
        COMM.Send(np.array([4711], dtype=np.int64), dest=0, tag=3)
    if RANK == 0:
        assert request is not None
        request.Wait()
        assert int(buf[0]) == 4711
    COMM.Barrier()


def test_a_stop_signal_on_one_rank_stops_every_rank_at_the_same_step() -> None:
    """Only the last rank got the signal, at its step 5; every rank learns it at the same
    agreement, within one interval (here at most 3 steps)."""
    stop = StopRequest()
    poll = StopPoll(COMM, stop, lambda: False, max_interval=3, target_s=1e-9)
    stopped_at = None
    for s in range(1, 20):
        if RANK == LAST and s == 5:
            stop.signum = 15
        _, signum = poll(s)
        if signum:
            stopped_at = s
            break
    steps = COMM.allgather(stopped_at)
    assert steps[0] is not None and 5 <= steps[0] <= 8 and len(set(steps)) == 1


def test_rank_zero_clock_decides_a_timed_checkpoint_for_every_rank() -> None:
    poll = StopPoll(COMM, StopRequest(), lambda: RANK == 0, max_interval=1)
    assert poll(1) == (True, 0)
    poll = StopPoll(COMM, StopRequest(), lambda: RANK != 0, max_interval=1)
    assert poll(1) == (False, 0)


class _Part:
    def __init__(self) -> None:
        self.value = torch.arange(4.0) + RANK

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = torch.as_tensor(state["value"])


def test_a_write_that_fails_on_one_rank_fails_on_every_rank(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """The last rank's shard write fails (ENOSPC): every rank gets None, the partial folder
    is gone, rank 0 names the file, the reason and the checkpoint still valid; the next
    save succeeds."""
    root = Path(COMM.bcast(str(tmp_path_factory.mktemp("ckpt")) if RANK == 0 else None))
    saver = Checkpointer(root, COMM, {"part": _Part()}, lambda: {"progress": 0.0},
                         lambda: {})
    assert saver.save(4) == root / "step-00000004"
    real = store.write_shard

    def full(path: Path, shard: store.Shard, step: int) -> tuple[str, int]:
        path.with_name(path.name + ".part").write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "Can't synchronously write data (a long HDF5 message)")

    monkeypatch.setattr(store, "write_shard", full if RANK == LAST else real)
    capsys.readouterr()
    assert saver.save(8) is None
    err = capsys.readouterr().err
    assert saver.last_error is not None and "No space left on device" in saver.last_error
    COMM.Barrier()
    assert not (root / ".tmp-step-00000008").exists() and not (root / "step-00000008").exists()
    if RANK == 0:
        shard = root / ".tmp-step-00000008" / f"rank-{LAST:05d}.h5"
        assert err.splitlines() == [
            f"psops_mpi: warning: checkpoint {root / 'step-00000008'} not written: {shard}: No "
            f"space left on device (rank {LAST}); partial files removed; the newest complete "
            f"checkpoint is {root / 'step-00000004'}; training goes on and the next checkpoint "
            "tries again"]
    monkeypatch.setattr(store, "write_shard", real)
    assert saver.save(12) == root / "step-00000012"
