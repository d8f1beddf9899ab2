"""Models for the checkpoint tests (`--model tests.helpers.checkpoint_models:bn_net`)."""

from __future__ import annotations

import math
import os

from torch import nn


def bn_net(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """A small net with BatchNorm (float and integer buffers); its hidden width comes from
    CKPT_TEST_WIDTH (default 16), so a test can change the parameter count under one name."""
    width = int(os.environ.get("CKPT_TEST_WIDTH", "16"))
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width),
                         nn.BatchNorm1d(width), nn.ReLU(), nn.Linear(width, num_classes))
