"""Periodic averaging (local SGD): one Allreduce of the flat weights every ``sync_every`` steps."""

from __future__ import annotations

from typing import Any

import torch

from psops_mpi.flat import all_finite, flat_buffer, load_into
from psops_mpi.inflight import Pending
from psops_mpi.sync.base import NonFiniteStop
from psops_mpi.sync.flat_sync import FlatSynchronizer
from psops_mpi.sync.mean import RankMean


class PASync(FlatSynchronizer):
    """Replace every rank's weights by their mean over all ranks once per period.

    A rank whose weights are not finite (one NaN batch is enough) is left out of the mean and
    takes it, with fresh optimizer state (counted in ``restarts``); the flag that says so
    travels in a slot after the weights, in the same Allreduce. PA keeps no earlier weights,
    so a round at which no rank's weights are finite has nothing to go back to: it raises
    :class:`NonFiniteStop` at once.

    With overlap or an encoded exchange PA keeps the last round's mean (``anchor``): what an
    encoded exchange sends differences from, and what the ranks evaluate between epochs while
    their own positions carry their progress since a round in flight began.

    The arguments are as for :class:`FlatSynchronizer`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        data = self.flat.data
        self.mean = RankMean(self.exchange, self.flat.numel, data, self.exchange_dtype,
                             in_flight=bool(self.overlap_steps), own_buffer=False)
        if self.overlap_steps or self.mean.dtype != "fp32":
            self.anchor = flat_buffer(data.numel(), data.dtype, data.device).copy_(data)

    def _start(self) -> Pending:
        sent = self._sent()
        self.sent_finite = all_finite(sent[: self.flat.numel])
        return self.mean.start(sent, self.sent_finite, self.anchor)

    def _finish(self) -> None:
        x = self.flat.data
        mean = self.mean.result(self.anchor)
        if mean is None:
            raise NonFiniteStop(self.steps, "every rank's weights are non-finite, and periodic "
                                            "averaging keeps no earlier weights to go back to",
                                 at_limit=False)
        if mean.data_ptr() != x.data_ptr():
            x.copy_(mean)
        if self.anchor is not None:
            self.anchor.copy_(x)
        if not self.sent_finite:
            self._restart()
        self._count_sync(True)
        self.average_buffers()

    def _answer_source(self) -> tuple[int, str | None]:
        return (0, "anchor") if self.overlap_steps else (0, None)

    def _consensus_weights(self) -> torch.Tensor | None:
        return self.anchor if self.overlap_steps else None

    # ---- checkpoints

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.anchor is not None:
            state["anchor"] = self.anchor
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.anchor is not None:  # a blocking fp32 run's has none: at a round's end
            # (run.py refuses one from within a period) every rank holds the mean
            load_into(self.anchor, state.get("anchor", self.flat.data))

    optional_state_keys = (*FlatSynchronizer.optional_state_keys, "anchor")
