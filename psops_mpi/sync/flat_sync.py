"""What psops_mpi's own synchronisers share: flat buffers, the exchange, step and round
counting, the non-finite guard's bookkeeping, a round in two halves, and the state every one
of them checkpoints.

A round is :meth:`FlatSynchronizer._start` (what this rank sends, and the exchange begun) then
:meth:`FlatSynchronizer._finish` (the exchange's result applied to the position). Blocking
(the default), the two follow each other at once on the model's own buffer. With
``overlap_steps`` K (``--overlap``) the round is left in flight: at the round the position x0
is copied into a snapshot, the exchange starts on it, and the rank trains on; every step lets
MPI move the data (:meth:`Exchange.poke`), and K steps later (at the latest at the next round)
the round *lands*: with x1 the position then, the position is set back to x0, the round's rule
applied as if blocking, and the rank's own progress x1 - x0 added on top (the delayed
correction of Overlap Local-SGD, Wang et al. 2020, and of Streaming DiLoCo's eager updates).
A rank whose x0 or progress is not finite restarts at the round's result instead.

At the end of an epoch (:meth:`flush` with ``final`` False) a round starts, as it does when
blocking, and is left in flight like any other; the ranks evaluate the centre of the round
that landed last. At the run's end (``final`` True) the round in flight lands and one
blocking round follows. A checkpoint taken with a round in flight waits for its exchange to
finish and saves the snapshot and the result, unapplied, so a resumed run lands it at the same
step as a run never stopped; a resize drops it (the ranks' progress stays in their positions
and goes into the next round).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.exchange import Exchange
from psops_mpi.flat import FlatBuffers, FlatParams, all_finite, flat_buffer, load_into
from psops_mpi.inflight import Done, Pending
from psops_mpi.sync.base import NonFiniteStop, ResizePlan, Synchronizer, SyncMetrics
from psops_mpi.sync.mean import RankMean

MAX_NONFINITE = 10  # default: consecutive syncs with no finite rank before the job stops


class FlatSynchronizer(Synchronizer):
    """Start every rank from rank 0's weights; count steps and rounds; run a round every
    ``sync_every`` steps. Subclasses implement :meth:`_round`.

    Args:
        model: the model this rank trains; its parameters become views of one flat buffer.
        optimizer: the local optimizer over ``model``'s parameters.
        comm: the communicator of the ranks that train together (default COMM_WORLD).
        sync_every: local steps between two rounds.
        cuda_aware: hand CUDA buffers to MPI directly (only if the MPI library supports it).
        max_nonfinite: raise :class:`NonFiniteStop` after this many consecutive syncs (rounds;
            SSGD: steps) skipped because no rank had finite values.
        overlap_steps: 0, blocking rounds; K > 0, a round is left in flight and lands K steps
            after it started (at most ``sync_every``).
        exchange_dtype: what travels, for the synchronisers that average positions: fp32,
            bf16 or int8 (differences from the centre, with error feedback).
        warm_steps: the first steps run as SSGD (the gradient averaged over the ranks after
            every backward pass: every rank takes the same step), the periodic rounds only
            after them (post-local SGD, Lin et al. 2020); 0: none.
        loss_scale: under fp16, the current loss scale (see :class:`SSGDSync`).
        average_state: at every round, replace each rank's optimizer state (momentum, Adam's
            moments) by the ranks' mean as well (one more Allreduce of its size).
    """

    extra_slots = 1  # slots after the weights in the flat buffer: the finite flag (PSO-PS:
    # the fitness)
    skipped_name = "skipped_rounds"  # the metric counting syncs that no rank could take part in
    nonfinite = "no rank had finite weights"  # why a sync was skipped, in words
    sync_unit = "rounds"
    # state keys that checkpoints of psops_mpi 0.2.0 lack; they load as 0
    optional_state_keys = ("restarts", "skipped", "consecutive_skipped", "inflight", "codec")
    # whether landing a round needs this rank's position from when it started (a rule that
    # moves each particle from its own position) besides the round's result
    needs_own_position = False

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                 comm: MPI.Comm | None = None, sync_every: int = 1,
                 cuda_aware: bool = False, *, max_nonfinite: int = MAX_NONFINITE,
                 overlap_steps: int = 0, exchange_dtype: str = "fp32", warm_steps: int = 0,
                 loss_scale: Callable[[], float] | None = None,
                 average_state: bool = False) -> None:
        if sync_every < 1:
            raise ValueError(f"sync_every must be a positive integer, got {sync_every}")
        if max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be a positive integer, got {max_nonfinite}")
        if warm_steps < 0:
            raise ValueError(f"warm_steps must be at least 0, got {warm_steps}")
        if not 0 <= overlap_steps <= sync_every:
            raise ValueError(f"overlap_steps must be in [0, sync_every={sync_every}], got "
                             f"{overlap_steps}")
        self.model = model
        self.optimizer = optimizer
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank = self.comm.Get_rank()
        self.world_size = self.comm.Get_size()
        self.sync_every = sync_every
        self.max_nonfinite = max_nonfinite
        self.overlap_steps = overlap_steps
        self.exchange_dtype = exchange_dtype
        self.warm_steps = warm_steps
        self.loss_scale = loss_scale
        self.average_state = average_state
        self._state_buffer: torch.Tensor | None = None
        self.flat = FlatParams(model, extra=self.extra_slots)
        self.buffers = FlatBuffers(model, extra=1)
        self.exchange = Exchange(self.comm, cuda_aware=cuda_aware,
                                 in_flight=bool(overlap_steps) or exchange_dtype != "fp32")
        self.exchange.reserve(self._largest_message(), self.flat.packed)
        self.steps = 0
        self.rounds = 0
        self.steps_since_round = 0
        self.restarts = 0  # rounds at which this rank's values were not finite (restarted)
        self.skipped = 0  # syncs skipped on every rank: no rank had finite values
        self.consecutive_skipped = 0
        self.mean: RankMean | None = None  # the ranks' mean, for those that exchange one
        self.anchor: torch.Tensor | None = None  # the last round's centre, for those with one
        self.inflight_step: int | None = None  # the step at which the round in flight began
        self._pending: Pending = Done()
        self.sent_finite = True  # whether the position sent at the last round was finite
        # the round's snapshot [x0 ; slots] while in flight, and x1 - x0 when it lands
        data = self.flat.data
        self._x0 = (flat_buffer(self.flat.packed.numel(), data.dtype, data.device)
                    if overlap_steps else None)
        self._delta = (flat_buffer(self.flat.numel, data.dtype, data.device)
                       if overlap_steps and self.needs_own_position else None)
        self._broadcast_initial_state()

    def _largest_message(self) -> int:
        """Elements in the largest buffer this synchroniser hands to the exchange."""
        return self.flat.packed.numel()

    def _broadcast_initial_state(self) -> None:
        """All ranks start from rank 0's weights; setup traffic is not counted as training."""
        self.exchange.bcast_(self.flat.data, root=0)
        if self.buffers.data is not None:
            self.exchange.bcast_(self.buffers.data, root=0)
        self.exchange.reset_counters()

    @property
    def warming_up(self) -> bool:
        """Whether the next step is one of the first ``warm_steps``: taken as SSGD's."""
        return self.steps < self.warm_steps

    def after_backward(self) -> bool:
        """During the warm start, average the gradient (SSGD's step); after it, nothing to do
        but let a round in flight move."""
        if self.warming_up:
            return self._average_gradient()
        if self.inflight_step is not None:
            self.exchange.poke(self._pending)
        return True

    def _average_gradient(self) -> bool:
        """The gradient averaged over the ranks (a round); False, with every gradient
        dropped so the optimizer skips the step, when the average is not finite."""
        self.flat.attach_grads()
        step = self.steps + 1
        self.exchange.arrive(lambda: f"step {step}")
        self.exchange.allreduce_mean_(self.flat.grad)
        self.rounds += 1
        finite = all_finite(self.flat.grad)
        if not finite:
            for param in self.flat.params:  # attach_grads() makes them views again next step
                param.grad = None
        if not finite and self.loss_scale is not None and self.loss_scale() > 1:
            self.skipped += 1  # the scaler's overflow: skipped, not a step towards the limit
        else:
            self._count_sync(finite)
        self._stop_if_stuck(step)
        return finite

    def after_step(self, loss: torch.Tensor | None = None) -> bool:
        if self.warming_up:
            self.steps += 1
            if not self.warming_up:  # the last warm step: the periods begin here
                self.average_buffers()
                self._begin_periods()
            return False
        self.steps += 1
        self.steps_since_round += 1
        self._observe(loss)
        if self.inflight_step is not None:
            if self.steps - self.inflight_step >= self.overlap_steps:
                self._land()
            else:
                self.exchange.poke(self._pending)
        if self._round_due():
            self.sync_round()
            return True
        return False

    def _round_due(self) -> bool:
        return self.steps_since_round >= self.sync_every

    def _begin_periods(self) -> None:
        """After the warm start every rank holds the same weights: the centre, where there
        is one, starts from them (the bests of PSO-PS, of infinite fitness still, give way
        at the first round)."""
        if self.anchor is not None:
            self.anchor.copy_(self.flat.data)

    def _observe(self, loss: torch.Tensor | None) -> None:
        """Hook for synchronisers that need the loss (PSO-PS fitness)."""

    def sync_round(self) -> None:
        """Run one synchronisation round now (every rank first waits for all to arrive); with
        overlap, a round in flight lands first and this one is left in flight, with no wait
        for the other ranks: they start it when they get there."""
        if self.overlap_steps:
            self._land()
            self._x0.copy_(self.flat.packed)  # type: ignore[union-attr]
            self._pending = self._start()
            self.inflight_step = self.steps
        else:
            self.exchange.arrive(self._where)
            self._round()
        self._count_round()

    def _where(self) -> str:
        return f"round {self.rounds + 1} (step {self.steps})"

    def _count_round(self) -> None:
        self.rounds += 1
        self.steps_since_round = 0
        self._stop_if_stuck(self.steps)

    def _round(self) -> None:
        """A whole round now: started and finished (with overlap, on the snapshot)."""
        if self._x0 is not None:
            self._x0.copy_(self.flat.packed)
        self.exchange.finish(self._start(), self._where)
        self._average_optimizer_state()
        self._finish()

    def _state_tensors(self) -> list[torch.Tensor]:
        """The optimizer's per-parameter tensors (momentum, Adam's moments), in a fixed
        order; none before the rank's first step, or after a restart."""
        state = self.optimizer.state
        return [value for param in self.flat.params for key, value in
                sorted(state.get(param, {}).items())
                if torch.is_tensor(value) and value.is_floating_point()
                and value.shape == param.shape]

    def _average_optimizer_state(self) -> None:
        """With ``average_state``: every rank's optimizer state becomes the mean over the
        ranks whose state is finite (before the round's result is applied, so a rank that
        restarts there still starts afresh). A rank without state yet sends zeros and keeps
        none: the optimizer makes its own at its next step."""
        if not self.average_state:
            return
        tensors = self._state_tensors()
        mine = sum(t.numel() for t in tensors)
        sizes = self.exchange.allgather_scalar(float(mine))
        total = int(sizes.max())
        if mine not in (0, total):
            raise RuntimeError(f"rank {self.rank}'s optimizer state holds {mine} values, "
                               f"another rank's {total}: it cannot be averaged")
        if total == 0:
            return
        if self._state_buffer is None or self._state_buffer.numel() != total + 1:
            data = self.flat.data
            self._state_buffer = flat_buffer(total + 1, data.dtype, data.device)
        packed = self._state_buffer
        if mine:
            torch.cat([t.reshape(-1) for t in tensors], out=packed[:total])
        finite = bool(mine) and all_finite(packed[:total])
        if self.exchange.allreduce_finite_mean_(packed, finite) and mine:
            offset = 0
            for t in tensors:
                t.copy_(packed[offset:offset + t.numel()].view_as(t))
                offset += t.numel()

    def _sent(self) -> torch.Tensor:
        """The packed position ``[x ; slots]`` this round sends: the model's own buffer, or
        with overlap the round's snapshot."""
        return self.flat.packed if self._x0 is None else self._x0

    def _start(self) -> Pending:
        """This rank's part of a round: what it sends, and the exchange begun (see the module
        docstring). The position is :meth:`_sent`."""
        raise NotImplementedError

    def _finish(self) -> None:
        """Apply the round's result (its exchange done) to the model's position, which holds
        the position sent."""
        raise NotImplementedError

    def _land(self) -> None:
        """Finish the round in flight, if any: the result applied to x0, plus x1 - x0."""
        step = self.inflight_step
        if step is None:
            return
        self.exchange.finish(self._pending, lambda: f"the landing of the round of step {step} "
                                                    f"(step {self.steps})")
        x, x0 = self.flat.data, self._x0[: self.flat.numel]  # type: ignore[index]
        if self._delta is not None:  # the rule reads x0 from the model: progress kept aside
            delta = torch.sub(x, x0, out=self._delta)
            x.copy_(x0)
        else:  # the rule overwrites the position whole: the snapshot holds the progress
            delta = torch.sub(x, x0, out=x0)
        restarts = self.restarts
        self._average_optimizer_state()
        self._finish()
        self.inflight_step = None
        if self.restarts != restarts:  # restarted at the result: its progress is lost too
            return
        if all_finite(delta):
            x.add_(delta)
        else:  # it diverged while the round was in flight
            self._restart()

    # ---- the non-finite guard (policy; the mechanism is Exchange.allreduce_finite_mean_)

    def _restart(self) -> None:
        """This rank's values were not finite and it took what the finite ranks agreed on:
        its optimizer state (momentum, no longer finite either) starts afresh."""
        self.restarts += 1
        self.optimizer.state.clear()

    def _count_sync(self, any_finite: bool) -> None:
        """Count a sync (round, or SSGD step) that every rank took or every rank skipped."""
        if any_finite:
            self.consecutive_skipped = 0
        else:
            self.skipped += 1
            self.consecutive_skipped += 1

    def _stop_if_stuck(self, step: int) -> None:
        if self.consecutive_skipped >= self.max_nonfinite:
            raise NonFiniteStop(step, f"{self.nonfinite} in {self.consecutive_skipped} "
                                      f"consecutive {self.sync_unit}, each skipped on every rank")

    def average_buffers(self) -> None:
        """Average floating-point buffers (BatchNorm statistics) over the ranks where they are
        finite; a rank whose statistics are not takes that mean (they stay as they are when
        no rank's are finite)."""
        packed, data = self.buffers.packed, self.buffers.data
        if packed is None or data is None:
            return
        finite = all_finite(data)
        saved = None if finite else data.clone()
        if self.exchange.allreduce_finite_mean_(packed, finite) == 0 and saved is not None:
            data.copy_(saved)

    def flush(self, final: bool = True) -> None:
        """A round if local steps were taken since the last one. With overlap, between
        epochs (``final`` False) that round is left in flight like any other (the ranks
        evaluate the centre of the round that landed last); at the run's end the round in
        flight lands and the round is a blocking one, so that every rank ends on it. During
        the warm start the weights are one model already: only BatchNorm's statistics are
        averaged, as SSGD does."""
        if self.warming_up:
            self.exchange.arrive(lambda: f"the BatchNorm averaging (step {self.steps})")
            self.average_buffers()
            return
        if not self.overlap_steps or not final:
            if self.steps_since_round:
                self.sync_round()
            return
        self._land()
        if self.steps_since_round:
            self.exchange.arrive(self._where)
            self._round()
            self._count_round()

    @contextmanager
    def consensus(self) -> Iterator[None]:
        """Evaluate :meth:`_consensus_weights` in place of this rank's position, then restore
        it (the model as it is when there is nothing else to evaluate)."""
        answer = None if self.warming_up else self._consensus_weights()
        if answer is None:
            yield
            return
        saved = self.flat.data.clone()
        self.flat.data.copy_(answer)
        try:
            yield
        finally:
            self.flat.data.copy_(saved)

    def _consensus_weights(self) -> torch.Tensor | None:
        """The weights every rank evaluates, when not its own (None)."""
        return None

    def consensus_source(self) -> tuple[int, str | None]:
        """During the warm start every rank's model is the one (what a synchroniser keeps
        of its rounds starts only after it); then :meth:`_answer_source`."""
        return (0, None) if self.warming_up else self._answer_source()

    def _answer_source(self) -> tuple[int, str | None]:
        return 0, None

    def summary(self) -> dict[str, Any]:
        """Whether a round is in flight, and the steps since the last one (a resume that
        starts keeping a centre needs a checkpoint taken at a round)."""
        return {"in_flight": self.inflight_step is not None,
                "steps_since_round": self.steps_since_round}

    def metrics(self) -> SyncMetrics:
        return SyncMetrics(self.steps, self.rounds, self.exchange.bytes_sent,
                           self.exchange.seconds, counts={"restarts": self.restarts},
                           shared_counts={self.skipped_name: self.skipped})

    def state_dict(self) -> dict[str, Any]:
        """Step and round counters, the non-finite guard's, and the MPI counters so that
        metrics continue where they stopped (the weights are the model's: saved as its own
        part); a round in flight, finished first (every rank checkpoints at the same step):
        its snapshot and its result, to be applied when it lands."""
        state = {"steps": self.steps, "rounds": self.rounds,
                 "steps_since_round": self.steps_since_round,
                 "comm_bytes": self.exchange.bytes_sent, "comm_s": self.exchange.seconds,
                 "comm_calls": self.exchange.calls, "restarts": self.restarts,
                 "skipped": self.skipped, "consecutive_skipped": self.consecutive_skipped,
                 "ranks": self.world_size}
        if self.inflight_step is not None:
            self.exchange.finish(self._pending, f"the checkpoint of step {self.steps}, finishing "
                                                f"the round of step {self.inflight_step}")
            state["inflight"] = {"step": self.inflight_step, "position": self._x0,
                                 "sent_finite": self.sent_finite, **self._landed_state()}
        codec_state = self._codec_state()
        if codec_state:
            state["codec"] = codec_state
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.rounds = int(state["rounds"])
        self.steps_since_round = int(state["steps_since_round"])
        self.exchange.bytes_sent = int(state["comm_bytes"])
        self.exchange.seconds = float(state["comm_s"])
        self.exchange.calls = int(state["comm_calls"])
        self.restarts = int(state.get("restarts", 0))
        self.skipped = int(state.get("skipped", 0))
        self.consecutive_skipped = int(state.get("consecutive_skipped", 0))
        self.inflight_step = None
        if int(state.get("ranks", self.world_size)) != self.world_size:
            return  # a resize: on_resize drops the round in flight and the residuals (sized
            # for the old number of ranks) anyway
        self._load_codec_state(state.get("codec", {}))
        inflight = state.get("inflight")
        if inflight is not None and self._x0 is not None:  # (run.py refuses one without)
            self.inflight_step = int(inflight["step"])
            load_into(self._x0, inflight["position"])
            self.sent_finite = bool(inflight["sent_finite"])
            self._load_landed_state(inflight)
            self._pending = Done()

    # ---- what a round in flight and the codec keep: by default, those of the ranks' mean

    def _landed_state(self) -> dict[str, Any]:
        """A finished round's result, before it is applied (its own buffers)."""
        return self.mean.landed_state() if self.mean is not None else {}

    def _load_landed_state(self, state: dict[str, Any]) -> None:
        if self.mean is not None:
            self.mean.load_landed_state(state)

    def _codec_state(self) -> dict[str, Any]:
        """The residuals of error feedback ({} when nothing is encoded)."""
        return self.mean.state_dict() if self.mean is not None else {}

    def _load_codec_state(self, state: dict[str, Any]) -> None:
        if self.mean is not None:
            self.mean.load_state_dict(state)

    def _reset_feedback(self) -> None:
        """Forget the residuals (a resize)."""
        if self.mean is not None:
            self.mean.reset_feedback()

    def on_resize(self, plan: ResizePlan) -> None:
        """A rank that joins anew counts its own traffic and restarts from zero. A round in
        flight is dropped: every rank's progress since it began is in its position and goes
        into the next round. What rounding dropped belongs to the old ranks' chunks:
        forgotten."""
        self.inflight_step = None
        self._pending = Done()
        self._reset_feedback()
        if plan.sources[self.rank] is None:
            self.exchange.reset_counters()
            self.restarts = 0
