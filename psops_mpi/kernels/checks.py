"""Input checks shared by every implementation of the fused PSO update (and its fake)."""

from __future__ import annotations

import torch

NAMES = ("x", "v", "pbest", "gbest")


def check_inputs(x: torch.Tensor, v: torch.Tensor, pbest: torch.Tensor, gbest: torch.Tensor,
                 key: int) -> None:
    """Raise a one-sentence error unless all four are contiguous float32 tensors of one shape
    on one device and the key is a non-negative 64-bit integer."""
    for name, tensor in zip(NAMES, (x, v, pbest, gbest), strict=True):
        if tensor.dtype != torch.float32:
            raise TypeError(f"pso_update_: {name} must be float32, got {tensor.dtype}")
        if tensor.device != x.device:
            raise ValueError(f"pso_update_: {name} is on {tensor.device} but x is on {x.device}")
        if tensor.shape != x.shape:
            raise ValueError(f"pso_update_: {name} has shape {tuple(tensor.shape)} but x has "
                             f"shape {tuple(x.shape)}")
        if not tensor.is_contiguous():
            raise ValueError(f"pso_update_: {name} must be contiguous")
    if not 0 <= key < 2**63:
        raise ValueError(f"pso_update_: key must be in [0, 2^63), got {key}")
