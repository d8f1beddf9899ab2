"""Command-line training: ``python -m psops_mpi.train`` (or ``psops-train``) under MPI.

    mpiexec -n 4 python -m psops_mpi.train --algo pso-ps --sync-every 8
    srun -n 16 --mpi=pmi2 python -m psops_mpi.train --dataset cifar10 --data-dir DATA

parse -> config -> world -> data, model, synchroniser -> train loop -> final metrics.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from mpi4py import MPI
from torch import nn

from psops_mpi import data as datasets
from psops_mpi import models
from psops_mpi.checkpoint import Checkpointer, ResumePoint, resume_run
from psops_mpi.config import TrainConfig, parse_config
from psops_mpi.metrics import MetricsWriter, Progress, check_writable, environment
from psops_mpi.sync import Synchronizer, make_sync
from psops_mpi.world import NodeLocal, World, abort_on_error, agree, init_world, node_local

HOLDOUT_SIZE = 1024  # samples in the fixed batch of --fitness holdout
EVAL_BATCH = 1024
LOG_EVERY = 20  # steps between progress-bar updates (each costs a device-to-host sync)


@dataclass
class Run:
    """Everything a training run is made of, built and checked before the first step."""

    config: TrainConfig
    world: World
    dataset: datasets.Dataset
    batches: datasets.ShardedBatches
    model: nn.Module
    optimizer: torch.optim.Optimizer
    fitness_fn: Callable[[], torch.Tensor] | None
    metrics: MetricsWriter
    sync: Synchronizer | None = None  # made once every rank agreed that the input is good
    start_at: ResumePoint | None = None  # where a resumed run continues


def prepare(argv: list[str] | None, comm: MPI.Comm, local: NodeLocal) -> Run:
    """Parse, validate and build everything but the synchroniser; bad input raises
    UsageError here. No collectives: this may fail on some ranks only."""
    config = parse_config(argv)
    if config.model == "auto":  # store the resolved name with the results
        config.model = models.DEFAULT_MODELS[config.dataset]
    if config.metrics_out:
        check_writable(config.metrics_out)
    world = init_world(comm, local, config.device, config.threads, config.allow_gpu_sharing,
                       config.cuda_aware)
    dataset = datasets.load_dataset(config.dataset, config.data_dir, world.device)
    batches = datasets.ShardedBatches(dataset, world.rank, world.world_size, config.batch_size,
                                      config.seed)
    torch.manual_seed(config.seed)
    model = models.build_model(config.model, dataset.input_shape, dataset.num_classes,
                               config.dataset).to(world.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum,
                                weight_decay=config.weight_decay)
    fitness_fn = None
    if config.pso.fitness == "holdout":
        holdout = datasets.holdout_batch(dataset, HOLDOUT_SIZE, config.seed)
        fitness_fn = lambda: holdout_loss(model, *holdout)  # noqa: E731
    metrics = MetricsWriter(config.metrics_out if world.is_root else None)
    return Run(config, world, dataset, batches, model, optimizer, fitness_fn, metrics)


@torch.no_grad()
def holdout_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Loss on the fixed holdout batch, in eval mode (no BatchNorm statistics updated)."""
    was_training = model.training
    model.eval()
    loss = F.cross_entropy(model(x), y)
    model.train(was_training)
    return loss


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, comm: MPI.Comm) -> tuple:
    """Mean loss and accuracy over the whole test set, each rank taking its own part."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=x.device)  # loss sum, correct, count
    for start in range(0, len(x), EVAL_BATCH):
        out = model(x[start : start + EVAL_BATCH])
        target = y[start : start + EVAL_BATCH]
        totals[0] += F.cross_entropy(out, target, reduction="sum")
        totals[1] += (out.argmax(1) == target).sum()
        totals[2] += len(target)
    model.train()
    summed = reduce_sum(totals.cpu().numpy(), comm)
    return summed[0] / summed[2], summed[1] / summed[2]


def reduce_sum(values: np.ndarray, comm: MPI.Comm) -> np.ndarray:
    """Sum a few float64 numbers over ranks (metrics only: not counted as training traffic)."""
    out = np.array(values, dtype=np.float64)
    if comm.Get_size() > 1:
        comm.Allreduce(MPI.IN_PLACE, out)
    return out


def learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.lr_schedule == "constant":
        return config.lr
    return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step / total_steps, 1.0)))


def train(run: Run) -> dict[str, Any]:
    """The training loop; returns the final metrics (the same on every rank)."""
    cfg, world, model, optimizer, sync = run.config, run.world, run.model, run.optimizer, run.sync
    total_steps = run.batches.steps_per_epoch * cfg.epochs
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    test_x, test_y = datasets.eval_shard(run.dataset, world.rank, world.world_size)
    progress = Progress(total_steps, world.is_root, cfg.quiet)
    at = run.start_at or ResumePoint()
    checkpoints = Checkpointer(run, total_steps, at)
    start, step = time.perf_counter() - at.elapsed_s, at.step
    for epoch in range(at.epoch, cfg.epochs):
        first = epoch == at.epoch  # a resumed run continues inside this epoch
        sums = torch.zeros(3, dtype=torch.float64, device=world.device)  # loss, correct, count
        if first and at.epoch_sums is not None:
            sums = at.epoch_sums
        stepped = False
        for x, y in run.batches.epoch(epoch, at.start_step if first else 0):
            if step >= total_steps:  # also when resumed from the end of the run
                break
            stepped = True
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(cfg, step, total_steps)
            out = model(x)
            loss = F.cross_entropy(out, y)
            optimizer.zero_grad(set_to_none=False)  # keep grads as views of the flat buffer
            loss.backward()
            sync.after_backward()
            optimizer.step()
            sync.after_step(loss)
            sums[0] += loss.detach() * len(y)  # stays on the device: no host sync per step
            sums[1] += (out.argmax(1) == y).sum()
            sums[2] += len(y)
            step += 1
            checkpoints.after_step(step, epoch, sums, start)
            if progress.shown and (step % LOG_EVERY == 0 or step == total_steps):
                progress.update(step - progress.bar.n, loss=float(sums[0] / sums[2]),
                                acc=float(sums[1] / sums[2]),
                                samples_s=step * len(y) * world.world_size
                                / (time.perf_counter() - start))
        # Resumed from the checkpoint written after this epoch's evaluation: evaluate again
        # for the final line, but do not report the epoch twice.
        repeat = first and at.evaluated and not stepped
        record = end_of_epoch(run, epoch, sums, test_x, test_y, start, report=not repeat)
        if not repeat:
            progress.line(epoch_line(record, cfg.epochs))
        if step >= total_steps:
            break
    progress.close()
    checkpoints.final(step, epoch, sums, start)
    return {**record, "steps": step, "checkpoint_s": checkpoints.seconds}


def end_of_epoch(run: Run, epoch: int, sums: torch.Tensor, test_x: torch.Tensor,
                 test_y: torch.Tensor, start: float, report: bool = True) -> dict[str, Any]:
    """Synchronise, evaluate the swarm's consensus model, and write the epoch's metrics
    (``report=False``: evaluate only, for an epoch reported before the run was resumed)."""
    sync, comm = run.sync, run.world.comm
    sync.flush()
    with sync.consensus():
        test_loss, test_acc = evaluate(run.model, test_x, test_y, comm)
    train_sums = reduce_sum(sums.cpu().numpy(), comm)
    stats = sync.stats()
    totals = reduce_sum(np.array([stats["comm_bytes"], stats["comm_s"],
                                  stats.get("restarts", 0)]), comm)
    comm_mean = totals[:2] / run.world.world_size
    wall = time.perf_counter() - start
    record = {
        "epoch": epoch + 1, "train_loss": train_sums[0] / train_sums[2],
        "train_acc": train_sums[1] / train_sums[2], "test_loss": test_loss,
        "test_acc": test_acc, "wall_s": wall, "rounds": stats["rounds"],
        "comm_bytes_per_rank": int(comm_mean[0]), "comm_s": comm_mean[1],
        "samples_per_s": stats["steps"] * run.config.batch_size * run.world.world_size / wall,
    }
    if "gbest_fitness" in stats:
        record["gbest_fitness"] = stats["gbest_fitness"]
        record["restarts"] = int(totals[2])  # diverged particles restarted at g, all ranks
    if report:
        run.metrics.write("epoch", **record)
    return record


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    return (f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {record['train_acc']:.4f}  test loss {record['test_loss']:.4f} "
            f"acc {record['test_acc']:.4f}  {record['samples_per_s']:.0f} samples/s  "
            f"comm {record['comm_s']:.2f}s"
            + (f"  restarts {record['restarts']}" if record.get("restarts") else ""))


def describe(run: Run) -> str:
    cfg, world = run.config, run.world
    rule = "every step" if cfg.algo == "ssgd" else f"every {cfg.sync_every} steps"
    return (f"psops_mpi: {cfg.algo} ({rule}) on {cfg.dataset}, model {cfg.model} with "
            f"{run.sync.flat.numel:,} parameters, {world.world_size} rank(s) on "
            f"{world.device.type}, {run.batches.steps_per_epoch} steps/epoch of "
            f"{cfg.batch_size} per rank")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m psops_mpi.train`` and ``psops-train``."""
    comm = MPI.COMM_WORLD
    try:
        local = node_local(comm)
        run = agree(comm, lambda: prepare(argv, comm, local))
        run.sync = make_sync(run.config, run.model, run.optimizer, comm, run.fitness_fn,
                             cuda_aware=run.world.cuda_aware.direct)
        run.start_at = resume_run(run)
        run.metrics.append = run.start_at.folder is not None
        env = environment()
        if not run.config.quiet and run.world.is_root:
            print(describe(run), flush=True)
            print(f"psops_mpi: {env['mpi_library']} (mpi4py {env['mpi4py']}); "
                  f"{run.world.cuda_aware.describe()}", flush=True)
        run.metrics.write("start", config=run.config.to_dict(), world_size=comm.Get_size(),
                          num_params=run.sync.flat.numel, environment=env,
                          cuda_aware=run.world.cuda_aware.describe(),
                          resumed_from=run.start_at.folder and str(run.start_at.folder))
        final = train(run)
        final = {**final, "world_size": comm.Get_size(), "num_params": run.sync.flat.numel,
                 "config": run.config.to_dict()}
        run.metrics.write("final", **final)
        run.metrics.close()
        if run.world.is_root:
            print(f"final: test acc {final['test_acc']:.4f}  test loss {final['test_loss']:.4f}"
                  f"  {final['wall_s']:.1f}s  {final['steps']} steps", flush=True)
    except SystemExit:
        raise
    except BaseException as exc:
        abort_on_error(comm, exc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
