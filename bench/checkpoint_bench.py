"""What a checkpoint costs: write and read seconds and MB/s beside one training epoch's time.

Claim measured: for a ~10M-parameter model trained by PSO-PS on P ranks, writing one
checkpoint (every rank's shard, fsynced, checksummed, metadata committed and pruned) and
reading it back (checksum verified, checked against the model, restored into the run) take
a small fraction of one training epoch.

Setup: the real training run (``psops_mpi.run.build_run``) on MNIST-1D with
``wide_mlp`` below (40 -> 3136 -> 3136 -> 10, 9,997,578 parameters), batch 32 per rank,
PSO-PS every 8 steps. A shard holds position, velocity, personal and global best and the
SGD momentum: 5 x 4N bytes, about 200 MB per rank.

Method: first one epoch of training is timed (``loop.train`` with ``--epochs 1``, evaluation
included, no checkpoints). Then ``--repeats`` checkpoints are written with the same
``Checkpointer.save`` a run uses, each after a ``Barrier``, and read back with the same
``run.resume_run`` a resumed run uses (read, verify, check, restore), both warm (the files
still in the page cache, as right after a write) and cold (the shard files dropped from the
page cache with ``posix_fadvise(DONTNEED)`` first; this needs no root and touches no other file). An
iteration's time is the slowest rank's; figures are medians. MB/s = bytes of all shards /
seconds (MB = 10**6 bytes), i.e. the job's aggregate rate.

Run it (rank 0 prints the table; ``--json`` also writes the results)::

    timeout 900 mpiexec -n 2 python bench/checkpoint_bench.py --repeats 5 --dir /tmp/ckbench \\
        --json bench/results/checkpoint_run1.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from mpi4py import MPI
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from psops_mpi.loop import LoopState, train
from psops_mpi.metrics import environment
from psops_mpi.run import build_run, checkpointer, resume_run
from psops_mpi.world import node_local

HIDDEN = 3136


def wide_mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """About 10M parameters on MNIST-1D's (1, 40) inputs."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), HIDDEN), nn.ReLU(),
                         nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, num_classes))


def slowest(comm: MPI.Comm, fn: Callable[[], object]) -> float:
    """Seconds of ``fn`` on the slowest rank, all ranks starting together."""
    comm.Barrier()
    began = time.perf_counter()
    fn()
    return comm.allreduce(time.perf_counter() - began, op=MPI.MAX)


def drop_from_page_cache(folder: Path) -> None:
    for path in folder.glob("*.h5"):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default="/tmp/psops_checkpoint_bench")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    comm = MPI.COMM_WORLD
    root = Path(args.dir)
    if comm.Get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)
    argv = ["--model", "checkpoint_bench:wide_mlp", "--epochs", "1", "--quiet"]
    run = build_run(argv, comm, node_local(comm))
    state = LoopState(run.steps_per_epoch, run.world.device)
    epoch_s = slowest(comm, lambda: train(run, state, checkpointer(run, state)))

    run.config.checkpoint_dir = str(root)
    saver = checkpointer(run, state)
    folders: list[Path] = []
    writes, warm, cold = [], [], []
    for i in range(args.repeats):
        step = state.step + i  # a new folder each time
        writes.append(slowest(comm, lambda s=step: folders.append(saver.save(s))))
        run.config.resume = str(folders[-1])
        warm.append(slowest(comm, lambda: resume_run(run, state, saver)))
        if comm.Get_rank() == 0:
            drop_from_page_cache(folders[-1])
        cold.append(slowest(comm, lambda: resume_run(run, state, saver)))
    meta = json.loads((folders[-1] / "metadata.json").read_text())
    report(comm, meta, epoch_s, writes, warm, cold, args)
    if comm.Get_rank() == 0:
        shutil.rmtree(root, ignore_errors=True)


def report(comm: MPI.Comm, meta: dict, epoch_s: float, writes: list[float],
           warm: list[float], cold: list[float], args: argparse.Namespace) -> None:
    if comm.Get_rank() != 0:
        return
    total = sum(s["bytes"] for s in meta["shards"])
    rows = {"write": writes, "read (page cache)": warm, "read (cold)": cold}
    print(f"checkpoint of {meta['num_params']:,} parameters x {meta['world_size']} ranks: "
          f"{total / 1e6:.1f} MB in all; one training epoch {epoch_s:.2f} s "
          f"(median of {args.repeats} per row; slowest rank)")
    print(f"{'':<18} {'seconds':>8} {'MB/s':>8} {'of an epoch':>12}")
    for name, times in rows.items():
        med = statistics.median(times)
        print(f"{name:<18} {med:8.3f} {total / 1e6 / med:8.0f} {med / epoch_s:11.1%}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "environment": environment(),
            "world_size": meta["world_size"], "num_params": meta["num_params"],
            "bytes_all_shards": total, "epoch_s": epoch_s,
            "write_s": writes, "read_warm_s": warm, "read_cold_s": cold}, indent=1) + "\n")


if __name__ == "__main__":
    main()
