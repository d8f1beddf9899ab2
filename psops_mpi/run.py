"""A training run put together: built and checked before the first step (:class:`Run`), its
stateful parts handed to the checkpoint, its resume, and what it tells the user at start and
end."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import torch
from mpi4py import MPI
from torch import nn

from psops_mpi import data, models, recipe
from psops_mpi.checkpoint.parts import ModelPart, OptimizerPart, RNGPart, Stateful
from psops_mpi.checkpoint.resume import Loaded, resume
from psops_mpi.checkpoint.saver import Checkpointer
from psops_mpi.checkpoint.store import complete_checkpoints
from psops_mpi.cli import parse_config
from psops_mpi.config import IDENTITY_SETTINGS, LAUNCH_SETTINGS, TrainConfig
from psops_mpi.errors import (
    EXIT_CHECKPOINT,
    EXIT_NONFINITE,
    EXIT_OK,
    EXIT_STOPPED,
    UsageError,
)
from psops_mpi.loop import LoopState, Run, total_steps
from psops_mpi.metrics import (
    MetricsWriter,
    check_tensorboard,
    check_writable,
    describe_version,
    environment,
)
from psops_mpi.precision import Precision
from psops_mpi.stall import StallWatch
from psops_mpi.stop import Stopped, signal_name
from psops_mpi.sync import NonFiniteStop, make_sync
from psops_mpi.tasks import Task, make_task
from psops_mpi.world import NodeLocal, agree, data_workers, init_world, print0

HOLDOUT_MIN, HOLDOUT_MAX = 256, 1024  # samples in the fixed holdout batch: see holdout_size
AUTO_WARMUP_MAX = 200  # --warmup-steps by default: a tenth of the run, at most this
OWN_PARTS = ("optimizer", "rng")  # what a rank that joins a resized run starts afresh


def prepare(argv: list[str] | None, comm: MPI.Comm, local: NodeLocal) -> dict[str, Any]:
    """Parse, validate and build everything but the synchroniser; bad input raises
    UsageError here. No collectives: this may fail on some ranks only."""
    config = parse_config(argv)
    if config.model == "auto":  # store the resolved name with the results
        config.model = models.DEFAULT_MODELS[config.dataset]
    if config.metrics_out:
        check_writable(config.metrics_out)
    world = init_world(comm, local, config.device, config.threads, config.allow_gpu_sharing,
                       config.cuda_aware)
    if config.tensorboard:
        check_tensorboard(config.tensorboard, writer=world.is_root)
    precision = Precision(config.precision, world.device)
    if config.dataset not in data.BUILT_IN_SETS:  # resolved for the results, as auto below
        config.data_workers = data_workers(config.data_workers, world.local_size)
    batches = data.open_source(config.dataset, config.data_dir, rank=world.rank,
                               world_size=world.world_size, batch_size=config.batch_size,
                               seed=config.seed, device=world.device,
                               workers=config.data_workers or 0, image_size=config.image_size)
    task = make_task(batches.task)
    if config.ensemble_eval and not (task.ensembles and batches.whole_test):
        why = (f"is a {task.name} task" if not task.ensembles
               else "has a test set each rank reads a part of")
        raise UsageError(f"--ensemble-eval averages classifiers' predictions over the whole "
                         f"test set; {config.dataset} {why}")
    torch.manual_seed(config.seed)
    model = models.build_model(config.model, batches.input_shape, batches.num_classes,
                               config.dataset, task).to(world.device)
    channels_last = models.apply_speed_settings(model, config.channels_last, config.compile,
                                                batches.input_shape, world.device,
                                                config.precision)
    config.channels_last = "on" if channels_last else "off"  # auto, resolved for the results
    optimizer = recipe.make_optimizer(model, config)
    config.weight_decay = recipe.weight_decay(config)  # none, resolved for the results
    metrics = MetricsWriter(config.metrics_out if world.is_root else None,
                            config.tensorboard if world.is_root else None)
    return {"config": config, "world": world, "batches": batches, "task": task,
            "model": model, "optimizer": optimizer, "metrics": metrics, "precision": precision}


def check_steps(config: TrainConfig, batches: data.BatchSource) -> None:
    """What the run's length allows: an optimizer step in every epoch, and a warmup that
    ends before the run does (the default one resolved here, from the run's length)."""
    accum = config.grad_accum_steps
    if batches.batches_per_epoch < accum:
        raise UsageError(f"--grad-accum-steps {accum} needs {accum} batches per optimizer "
                         f"step; an epoch has {batches.batches_per_epoch} batches of "
                         f"{config.batch_size} per rank, no optimizer step: use fewer "
                         "accumulation steps or a smaller --batch-size")
    steps = total_steps(config, batches.batches_per_epoch // accum)
    if config.warmup_steps is None:  # resolved for the results, as the other defaults
        config.warmup_steps = min(AUTO_WARMUP_MAX, steps // 10)
    elif config.warmup_steps >= steps:
        raise UsageError(f"--warmup-steps {config.warmup_steps} is not shorter than the run "
                         f"({steps} optimizer steps): use a shorter warmup")


def holdout_size(config: TrainConfig) -> int:
    """Samples in the fixed holdout batch (``--fitness holdout``, the learning-rate search):
    as many as a particle trains on between rounds, within [256, 1024]. One forward pass over
    them then costs about a third of a round's forward and backward passes; a fixed 1,024 cost
    more than the round itself at 16 steps of 32 samples (the search ran 2x SlowMo's time)."""
    per_round = config.sync_every * config.grad_accum_steps * config.batch_size
    return min(HOLDOUT_MAX, max(HOLDOUT_MIN, per_round))


def holdout_loss(model: nn.Module, task: Task, x: torch.Tensor,
                 y: torch.Tensor) -> torch.Tensor:
    """Loss on the fixed holdout batch, in eval mode (no BatchNorm statistics updated)."""
    return task.loss(models.eval_forward(model, x), y)


def build_run(argv: list[str] | None, comm: MPI.Comm, local: NodeLocal) -> Run:
    """Every rank agrees the input is good, then the synchroniser starts every rank from rank
    0's weights (the first collective on tensors)."""
    built = agree(comm, lambda: prepare(argv, comm, local))
    config, model, batches = built["config"], built["model"], built["batches"]
    infos = comm.allgather(batches.shard_info()) if comm.Get_size() > 1 else [
        batches.shard_info()]
    agree(comm, lambda: (batches.agree_shards(infos), check_steps(config, batches)),
          "the agreement on the steps of an epoch")
    StallWatch.of(comm).configure(config.stall_report_s, config.stall_abort_s)
    world = built["world"]
    if world.world_size > 1:  # every node's note, for rank 0's one line at start
        notes = dict.fromkeys(n for n in comm.allgather(world.gpu_sharing) if n)
        world.gpu_sharing = "; ".join(notes)
    fitness_fn = None
    if config.algo == "pso-ps" and (config.pso.fitness == "holdout" or config.pso.lr_spread > 1):
        holdout = agree(comm, lambda: batches.holdout(holdout_size(config), config.seed),
                        "the holdout batch")
        fitness_fn = lambda: holdout_loss(model, built["task"], *holdout)  # noqa: E731
    precision = built["precision"]
    steps = batches.batches_per_epoch // config.grad_accum_steps
    sync = make_sync(config, model, built["optimizer"], comm, fitness_fn,
                     cuda_aware=built["world"].cuda_aware.direct,
                     loss_scale=precision.scale if precision.scaled else None,
                     rounds_per_epoch=max(1, steps // config.sync_every))
    return Run(**built, sync=sync)


# ---- checkpoints

def checkpointer(run: Run, state: LoopState) -> Checkpointer:
    """The run's checkpointer over its stateful parts (nothing is written without a folder)."""
    cfg = run.config
    parts: dict[str, Stateful] = {
        "model": ModelPart(run.model, run.sync.flat, run.sync.buffers),
        "optimizer": OptimizerPart(run.optimizer, run.sync.flat.params), "sync": run.sync,
        "loop": state,
        "rng": RNGPart(run.world.device), "precision": run.precision, "data": run.batches}
    root = Path(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
    return Checkpointer(root, run.world.comm, parts, lambda: metadata(run, state, parts),
                        run.sync.rank_summary, every=cfg.checkpoint_every,
                        every_min=cfg.checkpoint_every_min, keep_last=cfg.keep_last)


def metadata(run: Run, state: LoopState, parts: dict[str, Stateful]) -> dict[str, Any]:
    """What a checkpoint says about the run, beside the shards (rank 0)."""
    cfg, sync = run.config, run.sync
    rank, key = sync.consensus_source()
    model_part = parts["model"]
    assert isinstance(model_part, ModelPart)
    return {
        "progress": state.progress, "epoch": state.epoch, "step_in_epoch": state.step_in_epoch,
        "steps_per_epoch": state.steps_per_epoch, "evaluated": state.evaluated,
        "round": sync.metrics().rounds, **{k: getattr(cfg, k) for k in IDENTITY_SETTINGS},
        "input_shape": list(run.batches.input_shape), "num_classes": run.batches.num_classes,
        "task": run.task.name,
        "num_params": sync.flat.numel,
        "dtype": str(sync.flat.data.dtype).removeprefix("torch."),
        "layout": model_part.layout(), "sync": sync.summary(), "legend": sync.legend(),
        "answer": {"rank": rank, "array": "model/position" if key is None else f"sync/{key}"},
        "config": cfg.to_dict(), "versions": {"torch": torch.__version__},
    }


def check_checkpoint(run: Run, meta: dict[str, Any], folder: Path) -> None:
    """Refuse a checkpoint this run cannot continue meaningfully."""
    cfg = run.config
    mine = {k: getattr(cfg, k) for k in IDENTITY_SETTINGS}
    theirs = {k: meta.get(k) for k in IDENTITY_SETTINGS}
    if mine != theirs:
        raise UsageError(
            f"checkpoint {folder} is from a {theirs['algo']} run on {theirs['dataset']} with "
            f"model {theirs['model']}; this run is {mine['algo']} on {mine['dataset']} with "
            f"{mine['model']}: use the same settings, --resume none or another --checkpoint-dir")
    if meta.get("num_params") != run.sync.flat.numel:
        raise UsageError(f"checkpoint {folder} holds {meta.get('num_params')} parameters per "
                         f"particle (rank); model {cfg.model} here has {run.sync.flat.numel:,}")
    params = ModelPart(run.model, run.sync.flat, run.sync.buffers).layout()["params"]
    if [list(p) for p in meta.get("layout", {}).get("params", [])] != [list(p) for p in params]:
        raise UsageError(f"checkpoint {folder}: the model's parameter names or shapes differ "
                         f"from those of {cfg.model} here")
    if not isinstance(meta.get("epoch"), int) or meta["epoch"] >= cfg.epochs:
        raise UsageError(f"checkpoint {folder} is in epoch {meta.get('epoch', 0) + 1}; --epochs "
                         f"{cfg.epochs} ends before it")
    check_rounds(cfg, meta, folder)
    if meta["world_size"] != run.world.world_size and cfg.resume_strict:
        raise UsageError(f"checkpoint {folder} was written by {meta['world_size']} rank(s), "
                         f"this job has {run.world.world_size}; --resume-strict refuses to "
                         "resume at another world size")


def check_rounds(cfg: TrainConfig, meta: dict[str, Any], folder: Path) -> None:
    """Refuse what a change of --overlap or --exchange-dtype cannot continue: a round left
    in flight without --overlap to land it; PA starting to keep its centre from within a
    period, where the ranks' weights differ and no centre was kept."""
    sync, before = meta.get("sync") or {}, meta.get("config") or {}
    if sync.get("in_flight") and not cfg.overlap:
        raise UsageError(f"checkpoint {folder} holds a round in flight (written with "
                         "--overlap): resume it with --overlap, which lands it")
    kept = before.get("overlap") or before.get("exchange_dtype", "fp32") != "fp32"
    keeps = cfg.overlap or cfg.exchange_dtype != "fp32"
    if cfg.algo == "pa" and keeps and not kept and sync.get("steps_since_round"):
        raise UsageError(f"checkpoint {folder} was written {sync['steps_since_round']} step(s) "
                         "into a period by PA without --overlap or --exchange-dtype, so it "
                         "holds no centre to continue them from: resume it as written, or "
                         "from a checkpoint at a round")


def resume_run(run: Run, state: LoopState, checkpoints: Checkpointer) -> Loaded | None:
    """Resume as the config says (a collective); None for a fresh start."""
    cfg, world, sync = run.config, run.world, run.sync

    def plan(meta: dict[str, Any]) -> Any:
        summaries = [s.get("summary", {}) for s in meta["shards"]]
        return sync.plan_resize(summaries, meta.get("sync") or {}, world.world_size)

    loaded = resume(world.comm, cfg.resume, cfg.checkpoint_dir, checkpoints.parts,
                    lambda meta, folder: check_checkpoint(run, meta, folder), plan, OWN_PARTS)
    if loaded is None:
        return None
    if loaded.resized:
        sync.on_resize(loaded.plan)
        state.on_resize(loaded.plan, world.rank)
        run.precision.on_resize(loaded.plan.sources[world.rank] is None)
    elif state.resumed_from == (state.step_in_epoch, state.steps_per_epoch):
        checkpoints.mark_saved(state.step)  # nothing changed: the final one is on disk
    for line in resume_lines(run, loaded, state):
        print0(world, line)
    return loaded


def resume_lines(run: Run, loaded: Loaded, state: LoopState) -> list[str]:
    """What the resume did, for rank 0 to print (quiet runs: only what a resize changed)."""
    meta, resized = loaded.meta, loaded.meta["world_size"] != run.world.world_size
    lines = [f"psops_mpi: resuming from {loaded.folder} at step {meta['step']} (epoch "
             f"{meta['epoch'] + 1}, step {meta['step_in_epoch']} of {meta['steps_per_epoch']})"]
    changed = changed_settings(meta["config"], run.config.to_dict())
    if changed:
        lines.append("psops_mpi: settings changed since the checkpoint: " + ", ".join(changed))
    if resized:
        lines.append(f"psops_mpi: the checkpoint has {meta['world_size']} rank(s), this job "
                     f"{run.world.world_size}: {loaded.plan.note}")
        if state.resumed_from and state.resumed_from[0] != state.step_in_epoch:
            lines.append(f"psops_mpi: data order continues in epoch {state.epoch + 1} at step "
                         f"{state.step_in_epoch} of {state.steps_per_epoch} (the same "
                         "fraction)")
    if run.config.quiet:
        return lines[1:] if resized else []
    return lines


def changed_settings(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """``name old -> new`` for every setting but those of one launch that differs."""
    pso_before = before.get("pso")
    flat_before = {**before, **(pso_before if isinstance(pso_before, dict) else {})}
    flat_now = {**now, **now["pso"]}
    return [f"{k} {flat_before.get(k)!r} -> {v!r}" for k, v in flat_now.items()
            if k != "pso" and k not in LAUNCH_SETTINGS and flat_before.get(k) != v]


# ---- what the user sees

def describe(run: Run) -> str:
    cfg, world = run.config, run.world
    rule = "every step" if cfg.algo == "ssgd" else f"every {cfg.sync_every} steps"
    if cfg.local_after_steps:
        rule += f" after {cfg.local_after_steps} steps of SSGD"
    batch = (f"{cfg.grad_accum_steps} x {cfg.batch_size}" if cfg.grad_accum_steps > 1
             else str(cfg.batch_size))
    mixed = "" if cfg.precision == "fp32" else f" in {cfg.precision} (autocast)"
    speed = ("channels-last, " if cfg.channels_last == "on" else "") + (
        "compiled, " if cfg.compile else "")
    return (f"psops_mpi: {cfg.algo} ({rule}) on {cfg.dataset}, model {cfg.model} with "
            f"{run.sync.flat.numel:,} parameters, {world.world_size} rank(s) on "
            f"{world.device.type}{mixed}, {speed}{run.steps_per_epoch} steps/epoch of {batch} "
            "per rank")


def announce(run: Run, loaded: Loaded | None) -> None:
    """The start lines on rank 0 and the ``start`` metrics event."""
    env = environment(git=run.world.is_root)  # rank 0 prints and writes it
    if not run.config.quiet:
        print0(run.world, describe(run))
        print0(run.world, f"psops_mpi: {describe_version(env)}; {env['mpi_library']} (mpi4py "
                          f"{env['mpi4py']}); {run.world.cuda_aware.describe()}")
        if run.world.gpu_sharing:
            print0(run.world, f"psops_mpi: fewer GPUs than ranks, sharing them "
                              f"(--device {run.config.device}): {run.world.gpu_sharing}")
        for part in (run.batches, run.sync):
            if part.describe():
                print0(run.world, f"psops_mpi: {part.describe()}")
    if loaded is not None:  # a checkpoint taken after its epoch's evaluation reports it once
        run.metrics.rewrite_from = loaded.meta["step"] + bool(loaded.meta.get("evaluated"))
    run.metrics.write("start", config=run.config.to_dict(), world_size=run.world.world_size,
                      num_params=run.sync.flat.numel, environment=env,
                      cuda_aware=run.world.cuda_aware.describe(), sync=run.sync.describe(),
                      exchange=run.sync.round_collective(),
                      gpu_sharing=run.world.gpu_sharing or None,
                      resumed_from=loaded and str(loaded.folder))


def finish(run: Run, final: dict[str, Any]) -> int:
    """The ``final`` metrics event and line; returns the exit code.

    ``ok`` in the event is True only for exit code 0. A final test loss that is not finite
    (every rank's model destroyed) is a failure, not a result: no ``final:`` line, an error
    line instead, exit code 3. A final checkpoint that could not be written leaves the
    results as they are (the saver printed why) and exit code 4.
    """
    checkpoint_error = final.pop("checkpoint_error", None)
    problems, code = [], EXIT_OK
    if not math.isfinite(final["test_loss"]):
        problems.append(f"the final test loss is not finite ({final['test_loss']})")
        code = EXIT_NONFINITE
    if checkpoint_error:
        problems.append(f"the final {checkpoint_error}")
        code = code or EXIT_CHECKPOINT
    final = {**final, "ok": not problems, "exit_code": code,
             **({"error": "; ".join(problems)} if problems else {}),
             "world_size": run.world.world_size, "num_params": run.sync.flat.numel,
             "config": run.config.to_dict()}
    run.metrics.write("final", **final)
    run.metrics.close()
    metric = run.task.metric
    results = (f"test {metric} {final[f'test_{metric}']:.4f}  test loss "
               f"{final['test_loss']:.4f}  {final['wall_s']:.1f}s  {final['steps']} steps")
    if code == EXIT_NONFINITE:
        print0(run.world, f"psops_mpi: error: training ended with a non-finite test loss "
                          f"after {final['steps']} steps ({results}); exit code {code}",
               file=sys.stderr)
    else:
        print0(run.world, f"final: {results}")
    return code


def newest_checkpoint(run: Run) -> str:
    """Where the run can be resumed from, in words, for the lines below."""
    return newest_in(run.config.checkpoint_dir)


def newest_in(root: str | None) -> str:
    """Where a run writing checkpoints into ``root`` can be resumed from, in words."""
    newest = newest_complete(root)
    return (f"the newest complete checkpoint is {newest}" if newest
            else "there is no checkpoint" if not root else "there is no complete checkpoint")


def relaunch_note(root: str | None) -> str:
    """What the same command would continue from, for a stop that ends the job at once."""
    newest = newest_complete(root)
    if newest:
        return f"the same command continues from {newest}"
    if root:
        return f"no complete checkpoint in {root}: the same command starts afresh"
    return "no --checkpoint-dir: this run cannot be continued"


def newest_complete(root: str | None) -> Path | None:
    complete = complete_checkpoints(Path(root)) if root else []
    return complete[-1][1] if complete else None


def stopped_by_signal(run: Run, stopped: Stopped) -> int:
    """The line, the ``stopped`` event and the exit code of a run stopped by a signal."""
    name = signal_name(stopped.signum)
    where = f"stopped by {name} at step {stopped.step}"
    if stopped.checkpoint is not None:
        code = EXIT_STOPPED
        line = (f"psops_mpi: {where}: checkpoint {stopped.checkpoint} written; run the same "
                f"command to continue (exit code {code})")
    elif stopped.error is not None:
        code = EXIT_CHECKPOINT
        line = (f"psops_mpi: error: {where}, but its checkpoint was not written; "
                f"{newest_checkpoint(run)} (exit code {code})")
    else:  # no --checkpoint-dir: as a signal would have ended it, but cleanly
        code = 128 + stopped.signum
        line = (f"psops_mpi: {where} with no checkpoint (no --checkpoint-dir): this run "
                f"cannot be continued (exit code {code})")
    _stopped_event(run, name, stopped.step, code, line,
                   checkpoint=stopped.checkpoint and str(stopped.checkpoint))
    return code


def stopped_by_nonfinite(run: Run, exc: NonFiniteStop) -> int:
    """The line, the ``stopped`` event and the exit code of a run that no rank could keep
    finite."""
    limit = f" (--max-nonfinite {run.config.max_nonfinite})" if exc.at_limit else ""
    line = (f"psops_mpi: error: stopped at step {exc.step}: {exc.reason}{limit}; "
            f"{newest_checkpoint(run)}; lower --lr or look for bad data (exit code "
            f"{EXIT_NONFINITE})")
    _stopped_event(run, "non-finite", exc.step, EXIT_NONFINITE, line)
    return EXIT_NONFINITE


def _stopped_event(run: Run, reason: str, step: int, code: int, line: str,
                   **extra: Any) -> None:
    print0(run.world, line, file=sys.stderr)
    run.metrics.write("stopped", reason=reason, step=step, exit_code=code,
                      message=line.removeprefix("psops_mpi: ").removeprefix("error: "),
                      **extra)
    run.metrics.close()
