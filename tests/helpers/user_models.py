"""User-model factories that tests load through ``--model package.module:function``."""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def tiny_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A valid user model: flatten then one linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes))


def returns_int(input_shape: tuple[int, ...], num_classes: int) -> int:
    """A broken factory: returns something that is not a module."""
    return 3


def raises(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A broken factory: fails when called."""
    raise RuntimeError("boom")


NOT_CALLABLE = 42
"""An attribute that exists but cannot be called."""


def fixed_input(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A model that ignores ``input_shape``: only 5 features fit it."""
    return nn.Sequential(nn.Flatten(), nn.Linear(5, num_classes))


def wrong_output(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A model with one logit too many."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_classes + 1))


def _world_rank() -> int:
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank()


def fails_on_rank_one(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A factory that fails on rank 1 only: every rank must still stop with one message."""
    if _world_rank() == 1:
        raise RuntimeError("no model for rank 1")
    return tiny_mlp(input_shape, num_classes)


class _ExplodesLater(nn.Module):
    """Trains normally, then raises on rank 1 at its 20th training forward pass."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == 20 and _world_rank() == 1:
                raise RuntimeError("simulated failure in the middle of training")
        return self.inner(x)


def explodes_on_rank_one(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _ExplodesLater(tiny_mlp(input_shape, num_classes))


class _NanOnRankZero(nn.Module):
    """Outputs NaN on rank 0 while training: its fitness must never become the global best."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        if self.training and _world_rank() == 0:
            return out * float("nan")
        return out


def nan_on_rank_zero(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _NanOnRankZero(tiny_mlp(input_shape, num_classes))


class _UnitGrad(torch.autograd.Function):
    """Identity on ``x``; the gradient it hands ``clock`` is 1 whatever the data and loss."""

    @staticmethod
    def forward(ctx, x, clock):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, torch.ones(1, dtype=grad.dtype, device=grad.device)


class _LrClock(nn.Module):
    """A model with one extra parameter, ``clock``, whose gradient is exactly 1 at every
    training step: under plain SGD (no momentum, no weight decay) it moves by -lr per step,
    so ``-clock`` is the sum of the learning rates used so far."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.clock = nn.Parameter(torch.zeros(1))
        self.inner = inner

    def forward(self, x):
        if self.training:
            x = _UnitGrad.apply(x, self.clock)
        return self.inner(x)


def lr_clock(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _LrClock(tiny_mlp(input_shape, num_classes))


class _ConstantInEval(nn.Module):
    """Trains normally; in eval mode outputs zero logits, so any loss evaluated there (the
    holdout fitness, the test loss) is ln(num_classes) exactly."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out if self.training else torch.zeros_like(out)


def constant_in_eval(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _ConstantInEval(tiny_mlp(input_shape, num_classes))


class _AugmentationProbe(nn.Module):
    """Counts training batches, and those holding an exact 0.0: a standardised CIFAR pixel is
    never exactly 0 (the channel means times 255 are not integers), only the zero padding
    of a random crop is, so with augmentation on nearly every batch has some."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("batches", torch.zeros((), dtype=torch.long))
        self.register_buffer("padded", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.batches += 1
            self.padded += int(bool((x == 0).any()))
        return x


def resnet20_with_probe(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The built-in resnet20 behind an :class:`_AugmentationProbe` (no parameters of its own)."""
    from psops_mpi.models import build_model

    return nn.Sequential(_AugmentationProbe(), build_model("resnet20", input_shape, num_classes))


# ---- faults, for tests/e2e/test_faults.py: real NaNs, sleeping ranks, rank pids

class _Faulty(nn.Module):
    """Trains ``inner``; ``fault(call)`` runs at every training forward pass (numbered from
    1 on this rank) and may return a factor for the output (NaN: a real non-finite loss)."""

    def __init__(self, inner: nn.Module, fault) -> None:
        super().__init__()
        self.inner, self.fault, self.calls = inner, fault, 0

    def forward(self, x):
        out = self.inner(x)
        if self.training:
            self.calls += 1
            factor = self.fault(self.calls)
            if factor is not None:
                return out * factor
        return out


def nan_once_on_rank_one(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Rank 1's 10th training batch gives NaN logits, once: a single bad batch."""
    return _Faulty(tiny_mlp(input_shape, num_classes),
                   lambda call: float("nan") if call == 10 and _world_rank() == 1 else None)


def nan_from_step_five(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Every rank's training batches give NaN logits from the 5th on: nothing can recover."""
    return _Faulty(tiny_mlp(input_shape, num_classes),
                   lambda call: float("nan") if call >= 5 else None)


class _NanInEval(nn.Module):
    """Trains normally; NaN logits in eval mode, so the test loss is NaN."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        out = self.inner(x)
        return out if self.training else out * float("nan")


def nan_in_eval(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _NanInEval(tiny_mlp(input_shape, num_classes))


PID_DIR_ENV = "PSOPS_TEST_PID_DIR"


def _slow_with_pid(call: int) -> None:
    """Each rank writes its pid to ``$PSOPS_TEST_PID_DIR/rank-R.pid`` at its first training
    batch (so a test can signal one rank), and every batch takes 20 ms longer (so a test
    can signal it in the middle of training)."""
    if call == 1:
        import os
        from pathlib import Path

        folder = Path(os.environ[PID_DIR_ENV])
        part = folder / f"rank-{_world_rank()}.pid.part"
        part.write_text(str(os.getpid()))
        part.rename(part.with_suffix(""))
    time.sleep(0.02)


def slow_with_pid(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return _Faulty(tiny_mlp(input_shape, num_classes), _slow_with_pid)


def _mark_stuck() -> None:
    """Tell a test that this rank is now stuck: the file PSOPS_TEST_STUCK_MARK names."""
    mark = os.environ.get("PSOPS_TEST_STUCK_MARK")
    if mark:
        Path(mark).touch()


def _sleep_on_rank_one(seconds: float, rank: int = 1):
    def fault(call: int) -> None:
        if call == 6 and _world_rank() == rank:
            _mark_stuck()
            time.sleep(seconds)

    return fault


def sleeps_on_rank_zero(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Rank 0 spends 2 s in its 6th training batch (the others tell it they wait)."""
    return _Faulty(tiny_mlp(input_shape, num_classes), _sleep_on_rank_one(2.0, rank=0))


def sleeps_on_rank_one(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Rank 1 spends 3.5 s in its 6th training batch (user code that stalls, then goes on)."""
    return _Faulty(tiny_mlp(input_shape, num_classes), _sleep_on_rank_one(3.5))


def hangs_on_rank_one(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Rank 1 hangs in its 6th training batch (for ten minutes: a job must not wait it out)."""
    return _Faulty(tiny_mlp(input_shape, num_classes), _sleep_on_rank_one(600))


def factory_hangs_on_rank_one(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Rank 1 hangs in the model factory itself (a hung import, a file system that does not
    answer), for ten minutes."""
    if _world_rank() == 1:
        _mark_stuck()
        time.sleep(600)
    return tiny_mlp(input_shape, num_classes)


class _ViewFlatten(nn.Module):
    """A small CNN that flattens with ``.view``, as many hand-written models do: it works on
    contiguous batches only."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.fc = nn.LazyLinear(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        return self.fc(x.view(x.size(0), -1))


def view_flatten_cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    model = _ViewFlatten(input_shape[0], num_classes)
    model(torch.zeros(1, *input_shape))  # materialise the lazy layer
    return model


class _Pooled(nn.Module):
    """uint8 or float (C, H, W) images, average-pooled to 8x8, then one linear layer."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(channels * 64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255 if not x.is_floating_point() else x
        return self.linear(F.adaptive_avg_pool2d(x, 8).flatten(1))


def pooled(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Cheap on large images: see _Pooled."""
    return _Pooled(input_shape[0], num_classes)
