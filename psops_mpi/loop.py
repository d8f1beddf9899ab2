"""The training loop: the loop state, one step, the end of an epoch, the whole run.

Step: batch -> forward (under ``--precision``'s autocast) -> backward (fp16: scaled, then
unscaled) -> ``sync.after_backward()`` -> ``optimizer.step()`` (unless every rank skips the
step, or fp16's scaler finds this rank's gradient not finite) -> ``sync.after_step(loss)``
-> sums on the device -> every few steps the ranks agree on a timed checkpoint and on stop
signals (:class:`StopPoll`) -> checkpoint when due, and stop after it if a signal asked.
Epoch end: ``sync.flush()`` -> evaluate ``sync.consensus()`` -> one JSON line and one
printed line.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.checkpoint.saver import Checkpointer
from psops_mpi.config import TrainConfig
from psops_mpi.data import Batch, BatchSource
from psops_mpi.metrics import MetricsWriter, Progress
from psops_mpi.precision import Precision
from psops_mpi.recipe import clip_gradients, learning_rate
from psops_mpi.stall import StallWatch
from psops_mpi.stop import Stopped, StopRequest
from psops_mpi.sync import ResizePlan, Synchronizer
from psops_mpi.tasks import Task
from psops_mpi.world import World

LOG_EVERY = 20  # steps between progress-bar updates (each costs a device-to-host sync)
POLL_TARGET_S = 1.0  # the ranks agree on stop signals about this often...
POLL_MAX_STEPS = 100  # ...and at least this often, should the steps' time change


@dataclass
class Run:
    """Everything a training run is made of, built and checked before the first step
    (:func:`psops_mpi.run.build_run`)."""

    config: TrainConfig
    world: World
    batches: BatchSource
    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    sync: Synchronizer
    metrics: MetricsWriter
    precision: Precision

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch: the batch source's batches, --grad-accum-steps each."""
        return self.batches.batches_per_epoch // self.config.grad_accum_steps


@dataclass
class LoopState:
    """Where the loop is: a stateful part of every checkpoint, restored as one. (epoch,
    step_in_epoch) is also the position in the data order (:mod:`psops_mpi.data.source`).

    ``epoch_sums`` (the task's loss sum, hits and count of this epoch's training batches)
    stays on the device, so counting a step costs no host sync. ``evaluated`` is set once
    the epoch's end-of-epoch round and evaluation ran (the final checkpoint), and cleared by
    a step.
    """

    optional_state_keys: ClassVar[tuple[str, ...]] = ("norm_sums",)  # new since 0.2.0

    steps_per_epoch: int
    device: torch.device
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    evaluated: bool = False
    epoch_sums: torch.Tensor = field(init=False)
    norm_sums: torch.Tensor = field(init=False)
    """--clip-grad-norm: this epoch's sum of gradient norms, clipped steps, steps."""
    resumed_from: tuple[int, int] | None = field(default=None, init=False)
    """(step in epoch, steps per epoch) as the checkpoint had them, when resumed."""
    _started: float = field(default_factory=time.perf_counter, init=False)

    def __post_init__(self) -> None:
        self.epoch_sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        self.norm_sums = torch.zeros(3, dtype=torch.float64, device=self.device)

    @property
    def elapsed_s(self) -> float:
        """Training time, resumed runs included."""
        return time.perf_counter() - self._started

    @property
    def progress(self) -> float:
        """Epochs done, the current one's fraction included."""
        return self.epoch + self.step_in_epoch / self.steps_per_epoch

    def count_norm(self, norm: torch.Tensor, max_norm: float) -> None:
        """Add a step's gradient norm before clipping, and whether it was clipped; a norm
        that is not finite (a step about to be skipped) is left out, on the device."""
        ok = torch.isfinite(norm)
        self.norm_sums[0] += torch.where(ok, norm, 0.0)
        self.norm_sums[1] += ok & (norm > max_norm)
        self.norm_sums[2] += ok

    def norm_figures(self, comm: MPI.Comm) -> dict[str, float]:
        """The epoch's mean gradient norm and clipped steps over all ranks (``{}`` when no
        norm was taken: clipping is off)."""
        sums = reduce_sum(self.norm_sums.cpu().numpy(), comm)
        if not sums[2]:
            return {}
        return {"grad_norm": sums[0] / sums[2], "clipped_steps": int(sums[1])}

    def advance(self) -> None:
        """One optimizer step done (its batches counted already)."""
        self.step += 1
        self.step_in_epoch += 1
        self.evaluated = False

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        self.epoch_sums.zero_()
        self.norm_sums.zero_()
        self.evaluated = False

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
                "steps_per_epoch": self.steps_per_epoch, "evaluated": self.evaluated,
                "elapsed_s": self.elapsed_s, "epoch_sums": self.epoch_sums,
                "norm_sums": self.norm_sums}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the checkpoint stopped; with another number of steps per epoch (a
        resize), at the same fraction of the same epoch."""
        old_per_epoch, in_epoch = int(state["steps_per_epoch"]), int(state["step_in_epoch"])
        self.resumed_from = (in_epoch, old_per_epoch)
        if old_per_epoch != self.steps_per_epoch:
            in_epoch = min(self.steps_per_epoch,
                           round(in_epoch * self.steps_per_epoch / old_per_epoch))
        self.epoch, self.step_in_epoch = int(state["epoch"]), in_epoch
        self.step = self.epoch * self.steps_per_epoch + in_epoch
        self.evaluated = bool(state["evaluated"])
        self._started = time.perf_counter() - float(state["elapsed_s"])
        self.epoch_sums.copy_(torch.as_tensor(np.array(state["epoch_sums"])))
        if "norm_sums" in state:  # absent from checkpoints of psops_mpi 0.2.0
            self.norm_sums.copy_(torch.as_tensor(np.array(state["norm_sums"])))

    def on_resize(self, plan: ResizePlan, rank: int) -> None:
        """A rank that joins anew has trained no sample of this epoch yet."""
        if plan.sources[rank] is None:
            self.epoch_sums.zero_()
            self.norm_sums.zero_()


@torch.no_grad()
def evaluate(model: nn.Module, batches: BatchSource, task: Task,
             comm: MPI.Comm) -> dict[str, float]:
    """The task's figures (loss, and accuracy or perplexity) over the whole test set, each
    rank taking its own part."""
    model.eval()
    device = next(model.parameters()).device
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, hits, count
    for x, y in batches.test_batches():
        task.add_eval(totals, model(x), y)
    model.train()
    totals_np = totals.cpu().numpy()
    StallWatch.of(comm).arrive("the evaluation")  # a rank stuck in the model is named
    return task.figures(reduce_sum(totals_np, comm))


@torch.no_grad()
def ensemble_accuracy(model: nn.Module, batches: BatchSource, task: Task,
                      comm: MPI.Comm) -> float:
    """The accuracy of the ranks' own models together: their predicted probabilities
    summed over the whole test set, which every rank evaluates with its own weights (the
    ceiling any merge of PSO-PS's distinct particles could reach)."""
    model.eval()
    probs, labels = [], []
    for x, y in batches.test_batches(whole=True):
        probs.append(task.probabilities(model(x)).double().cpu())
        labels.append(y.cpu())
    model.train()
    summed = torch.cat(probs).numpy()
    StallWatch.of(comm).arrive("the ensemble's evaluation")
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, summed)
    return float((summed.argmax(1) == torch.cat(labels).numpy()).mean())


def reduce_sum(values: np.ndarray | list[float], comm: MPI.Comm) -> np.ndarray:
    """Sum a few float64 numbers over ranks (metrics only: not counted as training traffic)."""
    out = np.array(values, dtype=np.float64)
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, out)
    return out


def total_steps(config: TrainConfig, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole run."""
    steps = steps_per_epoch * config.epochs
    return min(steps, config.max_steps) if config.max_steps else steps


def train_step(run: Run, state: LoopState, batches: Sequence[Batch], lr: float) -> None:
    """One optimizer step of this rank on ``--grad-accum-steps`` micro-batches: the local
    step plus whatever the synchroniser does around it."""
    model, optimizer, sync, precision = run.model, run.optimizer, run.sync, run.precision
    for group in optimizer.param_groups:
        group["lr"] = lr
    # Fresh gradients: autograd hands its results over as they are. Gradients kept as views
    # of the flat buffer would cost a zeroing and an accumulating kernel per parameter and
    # step (10% of ResNet-20's step on an H200); SSGD gathers them into its buffer in one copy.
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for x, y in batches:
        with precision.autocast():
            out = model(x)
            loss = run.task.loss(out, y)
        # A micro-batches of B sum to the gradient of one batch of A x B
        precision.backward(loss / len(batches) if len(batches) > 1 else loss)
        run.task.count(state.epoch_sums, loss, out, y)
        losses.append(loss.detach())
    precision.unscale_(optimizer)  # fp16: the synchroniser sees true gradients
    # False: every rank skips this step (non-finite gradient). A synchroniser written before
    # after_backward() returned anything returns None: its steps are taken.
    take = sync.after_backward() is not False
    if run.config.clip_grad_norm > 0 and take:  # the local gradient, or SSGD's averaged one
        state.count_norm(clip_gradients(optimizer, run.config.clip_grad_norm),
                         run.config.clip_grad_norm)
    precision.step(optimizer, take)  # fp16: also skipped on overflow
    sync.after_step(losses[0] if len(losses) == 1 else torch.stack(losses).mean())
    state.advance()


def optimizer_steps(micro_batches: Iterator[Batch], size: int) -> Iterator[list[Batch]]:
    """The micro-batches in groups of ``size``, one per optimizer step; a group cut short by
    the end of the epoch is dropped."""
    while True:
        group = list(itertools.islice(micro_batches, size))
        if len(group) < size:
            return
        yield group


class StopPoll:
    """Where the ranks agree on what only some of them know, without a collective at every
    step: that a stop signal reached some rank (:mod:`psops_mpi.stop`), and that rank 0's
    clock says a timed checkpoint is due (the ranks' clocks differ).

    An agreement is one small non-blocking Allreduce(MAX) of three integers (watched for
    missing ranks like every wait): [rank 0's clock says due, the signal, the steps to the
    next agreement]. Rank 0 picks that interval from the time its last steps took, so that
    agreements come about every ``target_s`` of training (and at least every
    ``max_interval`` steps): a signal is acted on within about a second plus one step, at the
    cost of one small message a second (tens of microseconds: ``bench/exchange_bench.py``).
    A fixed number of steps would not do: at a few seconds a step, one agreement per round
    could miss Slurm's 30 s between SIGTERM and SIGKILL; at a millisecond a step, it would
    cost a message every few milliseconds.

    Args:
        comm: the ranks that agree.
        stop: this rank's note of a stop signal.
        clock_due: whether a timed checkpoint is due by this rank's clock.
        max_interval: the most steps between two agreements (also the first ones, before
            rank 0 knows how long a step takes, come one step apart).
        target_s: seconds of training between two agreements, at most ``max_interval``.
    """

    def __init__(self, comm: MPI.Comm, stop: StopRequest, clock_due: Callable[[], bool],
                 max_interval: int = POLL_MAX_STEPS, target_s: float = POLL_TARGET_S) -> None:
        self.comm, self.stop, self.clock_due = comm, stop, clock_due
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.max_interval, self.target_s = max(1, max_interval), target_s
        self.watch = StallWatch.of(comm)
        self.next_step: int | None = None
        self._since: tuple[float, int] | None = None  # rank 0: (time, step) of the last one
        self.agreements = 0

    def __call__(self, step: int) -> tuple[bool, int]:
        """At ``step`` (every rank calls it after every step): (a timed checkpoint is due,
        the stop signal or 0), the same on every rank."""
        if self.world_size == 1:  # nothing to agree on: look at every step, for free
            return self.clock_due(), self.stop.signum
        if self.next_step is None:
            self.next_step = step
        if step < self.next_step:
            return False, 0
        mine = [int(self.clock_due()), self.stop.signum, self._interval(step)]
        if self.rank != 0:
            mine[0] = mine[2] = 0  # rank 0's clock decides, and the interval
        agreed = np.array(mine, dtype=np.int64)
        request = self.comm.Iallreduce(MPI.IN_PLACE, agreed, op=MPI.MAX)
        self.watch.wait(request, lambda: f"step {step} (the agreement on checkpoints and "
                                         "stop signals)")
        self.agreements += 1
        self.next_step = step + max(1, int(agreed[2]))
        return bool(agreed[0]), int(agreed[1])

    def _interval(self, step: int) -> int:
        """Rank 0: steps to the next agreement, from the time steps took since the last."""
        now = time.monotonic()
        since, self._since = self._since, (now, step)
        if since is None or step <= since[1]:
            return 1
        step_s = (now - since[0]) / (step - since[1])
        return int(min(self.max_interval, max(1, self.target_s // max(step_s, 1e-9))))


def train(run: Run, state: LoopState, checkpoints: Checkpointer,
          stop: StopRequest | None = None) -> dict[str, Any]:
    """The training loop from ``state`` on; returns the final metrics (the same on every
    rank), with ``checkpoint_error`` set when the final checkpoint could not be written.

    Raises:
        Stopped: on every rank, after the checkpoint at the step where the ranks agreed to
            stop because a stop signal reached some of them.
        NonFiniteStop: on every rank, from the synchroniser.
    """
    cfg, world = run.config, run.world
    last = total_steps(cfg, state.steps_per_epoch)
    poll = StopPoll(world.comm, stop or StopRequest(), checkpoints.clock_due)
    progress = Progress(last, world.is_root, cfg.quiet)
    checkpoints.report = progress.line  # a line per checkpoint, silenced as the epoch lines are
    # Resumed from the checkpoint written after its epoch's evaluation: evaluate again for the
    # final line, but do not report the epoch twice.
    reported = state.evaluated
    try:
        while True:
            stepped = False
            accum = cfg.grad_accum_steps
            micro = run.batches.epoch(state.epoch, state.step_in_epoch * accum)
            for batches in optimizer_steps(micro, accum):
                if state.step >= last:  # also when resumed from the end of the run
                    break
                stepped = True
                rate = learning_rate(cfg, state.step, last) * run.sync.lr_scale()
                train_step(run, state, batches, rate)
                if state.step < last:  # the last step's checkpoint is the final one
                    after_step(state.step, poll, checkpoints)
                if progress.shown and (state.step % LOG_EVERY == 0 or state.step == last):
                    figures = run.task.figures(state.epoch_sums.cpu().numpy())
                    progress.update(state.step - progress.bar.n, **figures,
                                    samples_s=state.step * cfg.batch_size * accum
                                    * world.world_size / state.elapsed_s)
            repeat = reported and not stepped
            reported = False
            ends = state.step >= last or state.epoch + 1 >= cfg.epochs
            record, counted = end_of_epoch(run, state, report=not repeat, final=ends)
            if not repeat:
                progress.line(epoch_line(record, cfg.epochs, counted, run.task.metric))
            if ends:
                break
            state.next_epoch()
    finally:
        progress.close()
    saved = checkpoints.final(state.step)
    if cfg.ensemble_eval:  # checked at the start: a classifier, a test set every rank has
        record["ensemble_acc"] = ensemble_accuracy(run.model, run.batches, run.task, world.comm)
    return {**record, "steps": state.step, "checkpoint_s": checkpoints.seconds,
            "checkpoint_error": None if saved else checkpoints.last_error}


def after_step(step: int, poll: StopPoll, checkpoints: Checkpointer) -> None:
    """A checkpoint when due (by steps, or by rank 0's clock as the ranks agreed), and the
    stop, after a checkpoint of this very step, when a signal asked for one."""
    timed, signum = poll(step)
    if not signum:
        checkpoints.after_step(step, timed)
        return
    poll.stop.agreed()  # the stop's checkpoint gets a bound of its own
    held = checkpoints.at_stop(step)
    error = None if held or checkpoints.root is None else checkpoints.last_error
    raise Stopped(signum, step, held, error)


def end_of_epoch(run: Run, state: LoopState, report: bool = True,
                 final: bool = True) -> tuple[dict[str, Any], list[str]]:
    """Synchronise (``final``: fully, the run ends here), evaluate the consensus model, and
    write the epoch's metrics (``report=False``: evaluate only, for an epoch reported before
    the run was resumed). Returns the record and the names of the synchroniser's counted
    events in it."""
    sync, comm = run.sync, run.world.comm
    sync.flush(final=final)
    with sync.consensus():
        test = evaluate(run.model, run.batches, run.task, comm)
    train = run.task.figures(reduce_sum(state.epoch_sums.cpu().numpy(), comm))
    metrics = sync.metrics()
    counts = {**metrics.counts, **run.precision.counts()}
    summed = sorted(counts)
    totals = reduce_sum([metrics.comm_bytes, metrics.comm_s,
                         *(counts[k] for k in summed)], comm)
    wall = state.elapsed_s
    record = {
        "epoch": state.epoch + 1, "step": state.step,
        **{f"train_{k}": v for k, v in train.items()}, **{f"test_{k}": v for k, v in test.items()},
        "wall_s": wall, "rounds": metrics.rounds,
        "comm_bytes_per_rank": int(totals[0] / run.world.world_size),
        "comm_s": totals[1] / run.world.world_size,
        "samples_per_s": metrics.steps * run.config.batch_size * run.config.grad_accum_steps
        * run.world.world_size / wall,
        **state.norm_figures(comm),
        **metrics.values,
        **{k: int(total) for k, total in zip(summed, totals[2:], strict=True)},  # all ranks
        **metrics.shared_counts,  # the same on every rank: once
    }
    counted = sorted([*summed, *metrics.shared_counts])
    state.evaluated = True
    if report:
        run.metrics.write("epoch", **record)
    return record, counted


def epoch_line(record: dict[str, Any], epochs: int, counted: Iterable[str] = (),
               metric: str = "acc") -> str:
    events = "".join(f"  {k} {record[k]}" for k in counted if record.get(k))
    return (f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f} "
            f"{metric} {record[f'train_{metric}']:.4f}  test loss {record['test_loss']:.4f} "
            f"{metric} {record[f'test_{metric}']:.4f}  {record['samples_per_s']:.0f} "
            f"samples/s  comm {record['comm_s']:.2f}s" + events)
