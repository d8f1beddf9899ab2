"""SlowMo (Wang et al., ICLR 2020): periodic averaging, then a slow (outer) momentum step.

Every ``sync_every`` steps, with ``a`` the weights every rank started the period from (the
anchor), ``m`` the mean of the ranks' weights (one Allreduce: PA's bytes) and ``lr`` the mean
local learning rate of the period's steps:

    d = (a - m) / lr                     the period's pseudo-gradient
    u = beta * u + d                     slow momentum
    a = a - alpha * lr * u               heavy ball, or with Nesterov:
    a = a - alpha * lr * (d + beta * u)  (DiLoCo's outer Nesterov)

and every rank continues from the new anchor. Dividing by ``lr`` keeps ``u`` in the units of
a step per unit rate while a schedule changes the rate, as the paper does: gradients under
SGD, and under AdamW its normalised update (``m / (sqrt(v) + eps)`` plus the decay), whose
displacement over a period is also the rate times that. The mean rate of the period, not its
last step's (the paper's rate is constant within a period): during a warmup the rate grows
within a period, and dividing by its last value would shrink ``d`` (by half in a period at
the warmup's start). alpha = 1 with beta = 0 is PA exactly (the new weights are computed as
``m + (1 - alpha) * lr * d - alpha * lr * beta * u``, so that case adds zeros to the mean).

A rank whose weights are not finite is left out of the mean (a flag in a slot after the
weights, in the same Allreduce) and continues from the new anchor like every rank, with fresh
optimizer state (``restarts``). When no rank's weights are finite, the round is skipped
(``skipped_rounds``): every rank goes back to the anchor and the slow momentum is kept.

With overlap the anchor is also what the ranks evaluate between epochs; an encoded exchange
sends differences from it (:mod:`psops_mpi.sync.mean`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.flat import all_finite, flat_buffer, load_into
from psops_mpi.inflight import Pending
from psops_mpi.sync.flat_sync import MAX_NONFINITE, FlatSynchronizer
from psops_mpi.sync.mean import RankMean


class SlowMoSync(FlatSynchronizer):
    """Periodic averaging with an outer momentum step on the averaged pseudo-gradient.

    The model, optimizer, communicator, ``sync_every``, ``cuda_aware``, ``overlap_steps`` and
    ``exchange_dtype`` are as for :class:`FlatSynchronizer`.

    Args:
        outer_lr: alpha, the slow learning rate (1: the full outer step).
        outer_momentum: beta, the slow momentum (0: plain PA at ``outer_lr`` 1).
        outer_nesterov: Nesterov's form of the outer step instead of heavy ball.
        reset_momentum: clear the local optimizer's state (momentum) after every round.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 comm: MPI.Comm | None = None, sync_every: int = 8, *,
                 outer_lr: float = 1.0, outer_momentum: float = 0.4,
                 outer_nesterov: bool = False, reset_momentum: bool = False,
                 cuda_aware: bool = False, max_nonfinite: int = MAX_NONFINITE,
                 overlap_steps: int = 0, exchange_dtype: str = "fp32", warm_steps: int = 0,
                 loss_scale: Callable[[], float] | None = None,
                 average_state: bool = False) -> None:
        super().__init__(model, optimizer, comm, sync_every, cuda_aware,
                         max_nonfinite=max_nonfinite, overlap_steps=overlap_steps,
                         exchange_dtype=exchange_dtype, warm_steps=warm_steps,
                         loss_scale=loss_scale, average_state=average_state)
        self.outer_lr, self.outer_momentum = outer_lr, outer_momentum
        self.outer_nesterov, self.reset_momentum = outer_nesterov, reset_momentum
        data = self.flat.data
        self.anchor = flat_buffer(data.numel(), data.dtype, data.device).copy_(data)
        self.momentum = flat_buffer(data.numel(), data.dtype, data.device)
        self.mean = RankMean(self.exchange, self.flat.numel, data, exchange_dtype,
                             in_flight=bool(overlap_steps), own_buffer=False)
        self.lr_sum = 0.0  # the local learning rates of this period's steps, summed
        self.period_lr = 0.0  # the mean rate of the period of the round last started
        self._unknown_rates = 0  # steps of the period whose rates a 0.2.0 checkpoint lacks

    def _observe(self, loss: torch.Tensor | None) -> None:
        self.lr_sum += float(self.optimizer.param_groups[0]["lr"])  # a Python float: no sync

    def _start(self) -> Pending:
        if self._unknown_rates:  # as 0.2.0 did: the rate of the period's last step for them
            self.lr_sum += self._unknown_rates * float(self.optimizer.param_groups[0]["lr"])
            self._unknown_rates = 0
        self.period_lr = self.lr_sum / max(self.steps_since_round, 1)
        self.lr_sum = 0.0
        sent = self._sent()
        self.sent_finite = all_finite(sent[: self.flat.numel])
        return self.mean.start(sent, self.sent_finite, self.anchor)

    def _finish(self) -> None:
        x, alpha, beta, lr = self.flat.data, self.outer_lr, self.outer_momentum, self.period_lr
        mean = self.mean.result(self.anchor)
        if not self.sent_finite:
            self._restart()
        self._count_sync(mean is not None)
        if mean is None:  # no mean to step towards: back to the anchor, momentum kept
            x.copy_(self.anchor)
            self.average_buffers()
            return
        if mean.data_ptr() != x.data_ptr():
            x.copy_(mean)
        # x is now the mean m
        if lr > 0:
            delta = self.anchor.sub_(x).div_(lr)  # d, in the anchor's memory
            if self.outer_nesterov:
                self.momentum.mul_(beta).add_(delta)
                x.add_(delta, alpha=(1 - alpha) * lr).add_(self.momentum, alpha=-alpha * lr * beta)
            else:
                x.add_(delta, alpha=(1 - alpha) * lr).add_(self.momentum, alpha=-alpha * lr * beta)
                self.momentum.mul_(beta).add_(delta)
        self.anchor.copy_(x)
        self.average_buffers()
        if self.reset_momentum:
            self.optimizer.state.clear()

    def _consensus_weights(self) -> torch.Tensor | None:
        return self.anchor if self.overlap_steps else None

    def _answer_source(self) -> tuple[int, str | None]:
        return (0, "anchor") if self.overlap_steps else (0, None)

    optional_state_keys = (*FlatSynchronizer.optional_state_keys, "lr_sum", "period_lr")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "anchor": self.anchor, "momentum": self.momentum,
                "lr_sum": self.lr_sum, "period_lr": self.period_lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        load_into(self.anchor, state["anchor"])
        load_into(self.momentum, state["momentum"])
        self.lr_sum = float(state.get("lr_sum", 0.0))
        self.period_lr = float(state.get("period_lr", 0.0))
        self._unknown_rates = 0 if "lr_sum" in state else self.steps_since_round
