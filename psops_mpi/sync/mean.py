"""The mean of the ranks' positions at a round, over the ranks whose position is finite: the
exchange PA, SlowMo and PSO-PS's centre rule share, in each codec and mode.

- fp32, blocking: one Allreduce of ``[x ; flag]`` (:meth:`Exchange.allreduce_finite_mean_`),
  in the sent buffer itself or in a buffer of its own;
- fp32, in flight: the same Allreduce left running on the round's snapshot;
- bf16 or int8: what travels is the difference from the centre every rank holds (the last
  round's), plus what rounding dropped from this rank's difference last time (error
  feedback), encoded; the ranks' pieces are summed in fp32 and the sum encoded again, with
  error feedback of its own (:class:`~psops_mpi.inflight.QuantizedMean`). Every rank decodes
  the same bytes, so every rank's mean is the same bit for bit. With ``with_best`` the same
  two collectives also carry every rank's fitness and the best rank's difference (PSO-PS's
  best particle: no MINLOC, no broadcast).

The residuals are state: checkpointed, restored by an exact resume, zeroed by a resize (a
round's rounding error, once). The encoded path's buffers live on the CPU (a GPU's
positions are copied there once a round).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from psops_mpi import codec
from psops_mpi.exchange import Exchange
from psops_mpi.flat import flat_buffer, load_into
from psops_mpi.inflight import Done, MeanSpace, Pending


class RankMean:
    """One round's mean of the ranks' positions, started, then read once it is done.

    Args:
        exchange: the collectives.
        numel: N, the length of a position.
        like: a tensor of the positions' dtype and device.
        dtype: what travels: fp32, bf16 or int8 (one rank: always fp32, nothing travels).
        in_flight: rounds are left in flight (fp32: an Iallreduce on the snapshot).
        own_buffer: fp32 blocking: average in a buffer of its own, not in the sent one.
        with_best: bf16 and int8: also bring every rank's fitness and the best position.
    """

    def __init__(self, exchange: Exchange, numel: int, like: torch.Tensor, dtype: str,
                 in_flight: bool, own_buffer: bool, with_best: bool = False) -> None:
        self.exchange, self.numel = exchange, numel
        self.dtype = dtype if exchange.world_size > 1 else "fp32"
        self.in_flight = in_flight
        self.count = 0
        self._sent: torch.Tensor | None = None
        self._pending: Pending = Done()
        self.buf: torch.Tensor | None = None  # [mean ; count], fp32 outside the sent buffer
        if self.dtype == "fp32":
            if in_flight or own_buffer:
                self.buf = flat_buffer(numel + 1, like.dtype, like.device)
            return
        length = codec.padded(numel, exchange.world_size)
        self.space = MeanSpace(exchange.world_size, length, self.dtype, with_best)
        # the values sent, then the decoded mean difference (the codec is done with them)
        self.work = flat_buffer(length, torch.float32, "cpu")
        self.residual = flat_buffer(length, torch.float32, "cpu")
        self.sum_residual = torch.zeros(self.space.chunk, dtype=torch.float32)
        self.best_diff = flat_buffer(length, torch.float32, "cpu") if with_best else None
        self.fitness = np.full(exchange.world_size, np.inf, dtype=np.float32)
        self._device = like.device
        self._mean = (flat_buffer(numel, torch.float32, like.device)
                      if like.device.type != "cpu" else None)

    def start(self, sent: torch.Tensor, finite: bool, centre: torch.Tensor | None,
              fitness: float = float("inf")) -> Pending:
        """Begin the mean of ``sent[:-1]`` (``sent`` is ``[x ; one spare slot]``, which the
        fp32 exchange overwrites with its flag); ``centre``: the position every rank agreed on
        last round (needed by bf16 and int8); ``fitness``: this rank's (with_best)."""
        n = self.numel
        if self.dtype != "fp32":
            assert centre is not None, "an encoded exchange sends differences from the centre"
            work = self.work
            if not finite:  # left out: zeros, and nothing owed from earlier rounds
                work.zero_()
                self.residual.zero_()
            elif sent.device.type == "cpu":
                torch.sub(sent[:n], centre, out=work[:n]).add_(self.residual[:n])
            else:
                work[:n].copy_(sent[:n] - centre).add_(self.residual[:n])
            self._pending = self.exchange.start_quantized_mean(
                self.space, work, float(finite), fitness if finite else float("inf"),
                self.residual, self.sum_residual, work, self.best_diff)
        elif self.in_flight:
            assert self.buf is not None
            self._pending = self.exchange.start_finite_mean(sent, self.buf, finite)
        elif self.buf is not None:
            if finite:
                self.buf[:n].copy_(sent[:n])
            self.count = self.exchange.allreduce_finite_mean_(self.buf, finite)
            self._pending = Done()
        else:  # in place: the sent buffer (the model's own) becomes the mean
            self.count = self.exchange.allreduce_finite_mean_(sent, finite)
            self._sent = sent
            self._pending = Done()
        return self._pending

    def result(self, centre: torch.Tensor | None) -> torch.Tensor | None:
        """The mean (a view of this object's buffers, or of the sent buffer when averaged in
        place), or None when no rank's position was finite; once, after the round is done.
        Also sets :attr:`count` (and :attr:`fitness`, with_best)."""
        n = self.numel
        if self.dtype != "fp32":
            self.count = int(self._pending.count)
            if self._pending.fitness is not None:
                self.fitness = self._pending.fitness
            if not self.count:
                return None
            return self._add_centre(self.work[:n], centre)
        if self.in_flight:
            assert self.buf is not None
            self.count = int(self.buf[n].item())
        mean = self.buf[:n] if self.buf is not None else self._sent[:n]  # type: ignore[index]
        return mean if self.count else None

    def best(self, centre: torch.Tensor, out: torch.Tensor) -> None:
        """The best rank's position (with_best; after :meth:`result`) into ``out``."""
        assert self.best_diff is not None
        diff = self.best_diff[: self.numel]
        torch.add(centre, diff if out.device == diff.device else diff.to(out.device), out=out)

    def _add_centre(self, diff: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
        if self._mean is None:
            return diff.add_(centre)
        return torch.add(centre, diff.to(self._device), out=self._mean)

    def reset_feedback(self) -> None:
        """Forget what rounding dropped (a resize: the chunks belong to other ranks now)."""
        if self.dtype != "fp32":
            self.residual.zero_()
            self.sum_residual.zero_()

    # ---- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The residuals of error feedback (nothing for fp32)."""
        if self.dtype == "fp32":
            return {}
        return {"residual": self.residual, "sum_residual": self.sum_residual}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the residuals; absent (a run that sent fp32, or another world size's
        padding): start them at zero."""
        if self.dtype == "fp32":
            return
        residual, sums = state.get("residual"), state.get("sum_residual")
        if (residual is None or sums is None or len(residual) != self.residual.numel()
                or len(sums) != self.sum_residual.numel()):
            self.reset_feedback()
            return
        load_into(self.residual, residual)
        load_into(self.sum_residual, sums)

    def landed_state(self) -> dict[str, Any]:
        """A finished round's mean, before it is read: what a checkpoint keeps of a round in
        flight (the decoded mean difference, the count, the fitnesses and the best's
        difference; or fp32's ``[mean ; count]``)."""
        if self.dtype == "fp32":
            assert self.buf is not None
            return {"mean": self.buf}
        fitness = self._pending.fitness
        state = {"mean": self.work, "count": int(self._pending.count),
                 "fitness": fitness if fitness is not None else self.fitness}
        if self.best_diff is not None:
            state["best"] = self.best_diff
        return state

    def load_landed_state(self, state: dict[str, Any]) -> None:
        """A round in flight, finished, as :meth:`landed_state` gave it."""
        if self.dtype == "fp32":
            assert self.buf is not None
            load_into(self.buf, state["mean"])
            self._pending = Done()
            return
        load_into(self.work, state["mean"])
        if self.best_diff is not None:
            load_into(self.best_diff, state["best"])
        self._pending = Done(int(state["count"]), np.array(state["fitness"], dtype=np.float32))
