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
