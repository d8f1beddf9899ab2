"""The training recipe, built from the config in one place: the inner optimizer (SGD or
AdamW, with its parameter groups), the learning-rate schedule (a warmup, then cosine, linear
or constant) as a function of the global optimizer step, and gradient clipping.

Where each piece sits relative to a synchroniser's exchange is the synchroniser's business,
not the recipe's: the loop clips after ``sync.after_backward()``, which is the local gradient
for PA, SlowMo and PSO-PS (their ``after_backward`` does nothing) and the averaged gradient
for SSGD (it averages there), so that every SSGD rank clips alike.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from psops_mpi.config import TrainConfig

DEFAULT_WEIGHT_DECAY = {"sgd": 5e-4, "adamw": 0.01}


def weight_decay(config: TrainConfig) -> float:
    """``--weight-decay``, or the optimizer's default (SGD 5e-4, AdamW 0.01)."""
    if config.weight_decay is not None:
        return config.weight_decay
    return DEFAULT_WEIGHT_DECAY[config.optimizer]


def parameter_groups(model: nn.Module, decay: float) -> list[dict]:
    """AdamW's two groups, as nanoGPT and torchtitan make them: weight decay on the weights
    of at least two dimensions (linear and convolution weights, embeddings); none on those of
    fewer (biases, normalisation weights and shifts). Checkpoints number the optimizer's state
    in the model's parameter order all the same (:class:`~psops_mpi.checkpoint.parts.
    OptimizerPart`)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """The inner optimizer: SGD with momentum and L2 weight decay on every parameter (the
    recipe psops_mpi's baselines were measured with), or AdamW with decoupled weight decay
    on the weights of two or more dimensions only."""
    decay = weight_decay(config)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(parameter_groups(model, decay), lr=config.lr,
                                 betas=config.betas, eps=config.eps)
    return torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                           weight_decay=decay)


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    """The rate of global optimizer step ``step`` (0-based) of ``total_steps``: linear from
    ``lr / warmup`` to ``lr`` over the first ``--warmup-steps`` steps, then the schedule
    over the rest (cosine or linear to 0, or constant). A function of the step alone, so a
    resumed or resized run takes the rate it would have had."""
    warmup = config.warmup_steps or 0  # (None only before build_run resolves it)
    if step < warmup:
        return config.lr * (step + 1) / warmup
    if config.lr_schedule == "constant":
        return config.lr
    done = min((step - warmup) / max(total_steps - warmup, 1), 1.0)
    if config.lr_schedule == "linear":
        return config.lr * (1.0 - done)
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * done))


def clip_gradients(optimizer: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Scale the gradients of the optimizer's parameters to a total 2-norm of at most
    ``max_norm``; the norm before clipping, on the device (no host sync)."""
    params = [p for group in optimizer.param_groups for p in group["params"]
              if p.grad is not None]
    return torch.nn.utils.clip_grad_norm_(params, max_norm)
