"""The recipe (no MPI beyond COMM_SELF): the schedule with a warmup, AdamW's parameter groups,
accumulation that equals one large batch, clipping where each algorithm clips, and what
happens to the optimizer's state at a round and at a restart."""

from __future__ import annotations

import math
import re
from types import SimpleNamespace

import pytest
import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.cli import parse_config
from psops_mpi.config import TrainConfig
from psops_mpi.errors import UsageError
from psops_mpi.loop import LoopState, optimizer_steps, train_step
from psops_mpi.precision import Precision
from psops_mpi.recipe import learning_rate, make_optimizer, parameter_groups
from psops_mpi.run import check_steps
from psops_mpi.sync import PASync, PSOSync, SlowMoSync, SSGDSync
from psops_mpi.tasks import Classification

CPU = torch.device("cpu")


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4))


def data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def run_of(sync_cls: type, config: TrainConfig, **kwargs: object) -> SimpleNamespace:
    model = net()
    optimizer = make_optimizer(model, config)
    sync = sync_cls(model, optimizer, MPI.COMM_SELF, **kwargs)
    return SimpleNamespace(model=model, optimizer=optimizer, sync=sync, config=config,
                           precision=Precision(config.precision, CPU), task=Classification())


# ---- the schedule

@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_the_warmup_rises_linearly_then_the_schedule_takes_over(schedule: str) -> None:
    cfg = TrainConfig(lr=0.4, warmup_steps=4, lr_schedule=schedule)
    rates = [learning_rate(cfg, s, 104) for s in range(104)]
    assert rates[:4] == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert rates[4] == pytest.approx(0.4)  # the peak, where the decay starts
    if schedule == "constant":
        assert set(rates[4:]) == {0.4}
    else:
        middle = 0.2 if schedule == "linear" else 0.4 * 0.5 * (1 + math.cos(math.pi / 2))
        assert rates[54] == pytest.approx(middle)
        assert rates[-1] < 0.01 and learning_rate(cfg, 104, 104) == pytest.approx(0.0)
    assert learning_rate(TrainConfig(lr=0.4), 0, 100) == 0.4  # no warmup: as before


# ---- the optimizer

def test_adamw_exempts_biases_and_normalisation_weights_from_weight_decay() -> None:
    model = net()
    decayed, exempt = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in decayed["params"]] == ["0.weight", "3.weight"]
    assert [names[id(p)] for p in exempt["params"]] == ["0.bias", "1.weight", "1.bias",
                                                        "3.bias"]
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    adamw = make_optimizer(model, TrainConfig(optimizer="adamw", betas=(0.8, 0.95), eps=1e-6))
    assert isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.01, 0.0]  # AdamW's default
    assert adamw.defaults["betas"] == (0.8, 0.95) and adamw.defaults["eps"] == 1e-6
    sgd = make_optimizer(model, TrainConfig())
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["weight_decay"] == 5e-4


# ---- accumulation

@pytest.mark.parametrize(("sync_cls", "kwargs"), [(PASync, {"sync_every": 2}),
                                                  (SSGDSync, {})])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_four_micro_batches_of_8_step_as_one_batch_of_32(sync_cls: type, kwargs: dict,
                                                         optimizer: str) -> None:
    x, y = data(32)
    whole = run_of(sync_cls, TrainConfig(optimizer=optimizer), **kwargs)
    parts = run_of(sync_cls, TrainConfig(optimizer=optimizer, grad_accum_steps=4), **kwargs)
    for _ in range(3):
        train_step(whole, LoopState(10, CPU), [(x, y)], lr=0.05)
        train_step(parts, LoopState(10, CPU), [(x[k:k + 8], y[k:k + 8])
                                               for k in range(0, 32, 8)], lr=0.05)
    for a, b in zip(whole.model.parameters(), parts.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert whole.sync.metrics().steps == parts.sync.metrics().steps == 3
    assert whole.sync.metrics().rounds == parts.sync.metrics().rounds  # SSGD: once a step


def test_micro_batches_are_grouped_per_optimizer_step_and_a_short_group_dropped() -> None:
    groups = list(optimizer_steps(iter(range(10)), 3))
    assert groups == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


# ---- clipping

def test_a_local_step_clips_the_local_gradient_and_reports_its_norm() -> None:
    cfg = TrainConfig(clip_grad_norm=0.01, momentum=0.0, weight_decay=0.0)
    run = run_of(PASync, cfg, sync_every=4)
    before = [p.detach().clone() for p in run.model.parameters()]
    state = LoopState(10, CPU)
    train_step(run, state, [data()], lr=1.0)
    moved = torch.cat([(p.detach() - b).flatten()
                       for p, b in zip(run.model.parameters(), before, strict=True)])
    assert float(moved.norm()) == pytest.approx(0.01, rel=1e-4)  # lr 1 x the clipped norm
    figures = state.norm_figures(MPI.COMM_SELF)
    assert figures["grad_norm"] > 0.01 and figures["clipped_steps"] == 1


def test_under_fp16_the_norm_is_taken_after_unscaling() -> None:
    norms = {}
    for precision in ("fp32", "fp16"):
        cfg = TrainConfig(clip_grad_norm=100.0, precision=precision)
        run = run_of(PASync, cfg, sync_every=4)
        state = LoopState(10, CPU)
        train_step(run, state, [data()], lr=0.1)
        norms[precision] = state.norm_figures(MPI.COMM_SELF)["grad_norm"]
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.05)  # not 65536 times it


def test_no_norm_is_taken_without_clipping() -> None:
    run = run_of(PASync, TrainConfig(), sync_every=4)
    state = LoopState(10, CPU)
    train_step(run, state, [data()], lr=0.1)
    assert state.norm_figures(MPI.COMM_SELF) == {}


# ---- the optimizer's state at a round and at a restart

@pytest.mark.parametrize("sync_cls", [PSOSync, SlowMoSync])
@pytest.mark.parametrize("reset", [False, True])
def test_adamw_state_is_kept_at_a_round_or_cleared_with_reset_momentum(sync_cls: type,
                                                                      reset: bool) -> None:
    run = run_of(sync_cls, TrainConfig(optimizer="adamw"), sync_every=2,
                 reset_momentum=reset)
    for _ in range(2):
        train_step(run, LoopState(10, CPU), [data()], lr=0.01)
    assert run.sync.metrics().rounds == 1
    assert (len(run.optimizer.state) == 0) is reset
    if not reset:
        assert all(int(s["step"]) == 2 for s in run.optimizer.state.values())


def test_a_restart_starts_adamw_afresh() -> None:
    run = run_of(PASync, TrainConfig(optimizer="adamw"), sync_every=4)
    train_step(run, LoopState(10, CPU), [data()], lr=0.01)
    assert run.optimizer.state
    run.sync._restart()  # what a rank whose weights are not finite does at a round
    assert not run.optimizer.state and run.sync.restarts == 1


def test_slowmo_divides_by_the_mean_rate_of_its_period() -> None:
    """Under a warmup the rate grows within a period: the pseudo-gradient is the period's
    displacement over its mean rate (0.2 here), not over its last (0.3)."""
    cfg = TrainConfig(momentum=0.0, weight_decay=0.0)
    run = run_of(SlowMoSync, cfg, sync_every=3, outer_momentum=0.5)
    start = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    for lr in (0.1, 0.2, 0.3):
        train_step(run, LoopState(10, CPU), [data()], lr=lr)
    end = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    # one rank: the mean is its own weights; u = d, and the step adds -alpha*lr*beta*0
    torch.testing.assert_close(run.sync.momentum, (start - end) / 0.2)


# ---- bad input

@pytest.mark.parametrize(("argv", "message"), [
    (["--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0, got -1"),
    (["--grad-accum-steps", "0"], "--grad-accum-steps must be a positive integer, got 0"),
    (["--clip-grad-norm", "-1"], "--clip-grad-norm must be a finite number >= 0, got -1.0"),
    (["--clip-grad-norm", "much"], "argument --clip-grad-norm: invalid float value: 'much'"),
    (["--betas", "0.9", "1.5"], "--betas must be two numbers in [0, 1), got 0.9 1.5"),
    (["--betas", "0.9"], "argument --betas: expected 2 arguments"),
    (["--eps", "0"], "--eps must be a positive number, got 0.0"),
    (["--optimizer", "lamb"], "argument --optimizer: invalid choice: 'lamb'"),
])
def test_bad_recipe_settings_are_one_line(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse_config(argv)
    assert message in str(caught.value)


@pytest.mark.parametrize(("settings", "message"), [
    ({"warmup_steps": 62}, "--warmup-steps 62 is not shorter than the run (62 optimizer steps)"),
    ({"warmup_steps": 10, "max_steps": 10}, "not shorter than the run (10 optimizer steps)"),
    ({"grad_accum_steps": 100}, "--grad-accum-steps 100 needs 100 batches per optimizer step; "
                                "an epoch has 62 batches of 32 per rank, no optimizer step"),
])
def test_a_run_too_short_for_its_recipe_is_one_line(settings: dict, message: str) -> None:
    """Checked on every rank once the steps of an epoch are known (build_run agrees on it):
    62 batches an epoch here, one epoch."""
    batches = SimpleNamespace(batches_per_epoch=62)
    with pytest.raises(UsageError, match=re.escape(message)):
        check_steps(TrainConfig(epochs=1, **settings), batches)
    check_steps(TrainConfig(epochs=1, warmup_steps=61), batches)


def test_the_default_warmup_is_a_tenth_of_the_run_and_at_most_200_steps() -> None:
    batches = SimpleNamespace(batches_per_epoch=62)
    for epochs, want in ((1, 6), (10, 62), (60, 200)):
        config = TrainConfig(epochs=epochs)
        check_steps(config, batches)
        assert config.warmup_steps == want
    explicit = TrainConfig(epochs=60, warmup_steps=0)
    check_steps(explicit, batches)
    assert explicit.warmup_steps == 0
    check_steps(TrainConfig(epochs=1, grad_accum_steps=62), batches)
