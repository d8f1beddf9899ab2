"""--precision: autocast, fp16's loss scaler in the real training step, the non-finite limit
under fp16, and the scaler's checkpoint state. One rank (COMM_SELF), CPU."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.config import TrainConfig
from psops_mpi.errors import UsageError
from psops_mpi.loop import LoopState, train_step
from psops_mpi.precision import Precision, check_supported
from psops_mpi.sync import NonFiniteStop, PASync, SSGDSync
from psops_mpi.tasks import Classification

CPU = torch.device("cpu")


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batch(nan: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(1))
    if nan:
        x[0, 0] = float("nan")
    return x, torch.arange(32) % 4


def _run(algo: str, precision: Precision, max_nonfinite: int = 10) -> SimpleNamespace:
    """What train_step uses of a Run: model, optimizer, synchroniser, precision, task."""
    model = _net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if algo == "ssgd":
        sync = SSGDSync(model, opt, MPI.COMM_SELF, max_nonfinite=max_nonfinite,
                        loss_scale=precision.scale if precision.scaled else None)
    else:
        sync = PASync(model, opt, MPI.COMM_SELF, 4, max_nonfinite=max_nonfinite)
    return SimpleNamespace(model=model, optimizer=opt, sync=sync, precision=precision,
                           task=Classification(), config=TrainConfig())


def _set_scale(precision: Precision, scale: float, growth_tracker: int = 0) -> None:
    state = precision.state_dict()
    state["scaler"].update(scale=scale, _growth_tracker=growth_tracker)
    precision.load_state_dict(state)


def _growth_tracker(precision: Precision) -> int:
    return precision.state_dict()["scaler"]["_growth_tracker"]


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_every_precision_is_supported_on_this_cpu(name: str) -> None:
    check_supported(name, CPU)  # torch 2.13 autocasts to bf16 and fp16 on the CPU


def test_a_device_without_autocast_is_one_line() -> None:
    with pytest.raises(UsageError) as info:
        Precision("bf16", torch.device("meta"))
    assert "--precision bf16" in str(info.value) and "\n" not in str(info.value)
    Precision("fp32", torch.device("meta"))  # fp32 needs nothing


def test_bf16_autocasts_activations_and_keeps_weights_and_gradients_fp32() -> None:
    precision = Precision("bf16", CPU)
    run = _run("pa", precision)
    before = run.sync.flat.data.clone()
    x, y = _batch()
    with precision.autocast():
        assert run.model(x).dtype == torch.bfloat16
    train_step(run, LoopState(10, CPU), [(x, y)], lr=0.1)
    assert not precision.scaled and precision.counts() == {} and precision.state_dict() == {}
    assert all(p.dtype == torch.float32 for p in run.model.parameters())
    assert run.sync.flat.data.dtype == run.sync.flat.grad.dtype == torch.float32
    assert not torch.equal(before, run.sync.flat.data)  # a step was taken


def test_fp16_overflow_is_skipped_and_counted_and_the_scale_backs_off() -> None:
    """At a scale of 2^100 every fp16 gradient overflows: the steps are skipped (weights
    and momentum unchanged), counted, and the scale halves until steps are taken."""
    precision = Precision("fp16", CPU)
    _set_scale(precision, 2.0 ** 100, growth_tracker=7)
    run = _run("pa", precision, max_nonfinite=1)
    state, x, y = LoopState(1000, CPU), *_batch()
    start = run.sync.flat.data.clone()
    train_step(run, state, [(x, y)], lr=0.1)
    assert torch.equal(run.sync.flat.data, start) and not run.optimizer.state
    assert precision.scale() == 2.0 ** 99 and precision.counts() == {"scaler_skips": 1}
    assert _growth_tracker(precision) == 0
    for _ in range(120):
        train_step(run, state, [(x, y)], lr=0.1)
    skips = precision.counts()["scaler_skips"]
    assert 70 < skips < 100 and precision.scale() < 2.0 ** 30  # it found a scale that fits
    assert not torch.equal(run.sync.flat.data, start) and torch.isfinite(run.sync.flat.data).all()


def test_ssgd_fp16_overflow_does_not_count_towards_the_limit() -> None:
    """SSGD with --max-nonfinite 1: 20 overflows in a row at a scale above 1 do not stop
    it; they are skipped steps, and training goes on once the scale fits."""
    precision = Precision("fp16", CPU)
    _set_scale(precision, 2.0 ** 40)
    run = _run("ssgd", precision, max_nonfinite=1)
    state, x, y = LoopState(1000, CPU), *_batch()
    for _ in range(40):
        train_step(run, state, [(x, y)], lr=0.1)
    metrics = run.sync.metrics()
    assert 20 <= metrics.shared_counts["skipped_steps"] < 40
    assert run.sync.consecutive_skipped == 0 and precision.scale() < 2.0 ** 20


def test_ssgd_fp16_real_nan_stops_once_the_scale_is_one() -> None:
    """A NaN in every batch: skips at scale 4 and 2 are the scaler's; at 1 and 0.5 they
    count, and --max-nonfinite 2 stops the job at the fourth step."""
    precision = Precision("fp16", CPU)
    _set_scale(precision, 4.0, growth_tracker=7)
    run = _run("ssgd", precision, max_nonfinite=2)
    state, (x, y) = LoopState(1000, CPU), _batch(nan=True)
    train_step(run, state, [(x, y)], lr=0.1)
    # Backed off as the scaler's own skip would: half the scale, growth counter reset.
    assert precision.scale() == 2.0 and _growth_tracker(precision) == 0
    for _ in range(2):
        train_step(run, state, [(x, y)], lr=0.1)
    assert precision.scale() == 0.5 and run.sync.consecutive_skipped == 1
    assert precision.counts() == {"scaler_skips": 0}  # SSGD's skips are the sync's
    with pytest.raises(NonFiniteStop) as info:
        train_step(run, state, [(x, y)], lr=0.1)
    assert info.value.step == 4 and info.value.at_limit


def test_fp32_ssgd_nan_counts_at_once() -> None:
    run = _run("ssgd", Precision("fp32", CPU), max_nonfinite=2)
    state, (x, y) = LoopState(1000, CPU), _batch(nan=True)
    train_step(run, state, [(x, y)], lr=0.1)
    with pytest.raises(NonFiniteStop):
        train_step(run, state, [(x, y)], lr=0.1)


def test_scaler_state_round_trips_and_other_states_start_it_afresh() -> None:
    trained = Precision("fp16", CPU)
    _set_scale(trained, 2.0 ** 100)
    run = _run("pa", trained)
    for _ in range(3):
        train_step(run, LoopState(10, CPU), [_batch()], lr=0.1)
    saved = trained.state_dict()
    assert saved["scaler"]["scale"] == 2.0 ** 97 and saved["skips"] == 3
    resumed = Precision("fp16", CPU)
    resumed.check_state(saved, "here")
    resumed.load_state_dict(saved)
    assert resumed.state_dict() == saved and resumed.counts() == {"scaler_skips": 3}
    for other in ({}, Precision("bf16", CPU).state_dict()):  # a bf16 or fp32 checkpoint
        fresh = Precision("fp16", CPU)
        fresh.check_state(other, "here")
        fresh.load_state_dict(other)
        assert fresh.scale() == 2.0 ** 16  # the scaler's own start
    plain = Precision("fp32", CPU)
    plain.load_state_dict(saved)  # an fp16 checkpoint resumed in fp32: nothing to load
    assert plain.state_dict() == {}
    with pytest.raises(UsageError, match="loss scaler's state is incomplete"):
        resumed.check_state({"scaler": {"scale": 1.0}}, "here")
