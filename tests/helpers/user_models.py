"""User-model factories that tests load through ``--model package.module:function``."""

from __future__ import annotations

import math

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
