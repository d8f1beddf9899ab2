"""Synchronous SGD through PyTorch ``DistributedDataParallel`` (gloo): the baseline a user would
pick instead of psops_mpi's ``--algo ssgd``.

What it measures: the same training as ``python -m psops_mpi.train --algo ssgd`` -- the same
flags, data shards (``psops_mpi.data.ShardedBatches``), model, SGD optimizer, learning-rate
schedule, evaluation and JSON-lines metrics, because it runs psops_mpi's own training loop
(``psops_mpi.loop.train``) -- with one change: the model is wrapped in
``torch.nn.parallel.DistributedDataParallel`` over a gloo process group, so DDP's bucketed
gradient allreduce (overlapped with ``backward()``) replaces psops_mpi's one flat Allreduce.
Comparing its ``samples_per_s`` with psops_mpi's SSGD on the same ranks gives our SSGD's
throughput against what PyTorch offers out of the box.

It is launched exactly like training; rank and world size come from mpi4py, and rank 0 opens
the gloo rendezvous (a ``TCPStore`` on a free port) and sends its address to the others over
MPI, so no ``MASTER_ADDR`` / ``torchrun`` is needed::

    timeout 600 mpiexec -n 4 python bench/ddp_ssgd.py --dataset mnist1d --epochs 10 \\
        --metrics-out ddp.jsonl
    srun -n 4 --mpi=pmi2 python bench/ddp_ssgd.py ...    # under Slurm, as psops_mpi.train

On one node the rendezvous and gloo use the loopback interface (``GLOO_SOCKET_IFNAME=lo``
unless set); across nodes rank 0's host name, or ``PSOPS_DDP_ADDR`` if set. gloo never uses
shared memory, so on one machine it pays for TCP where MPI does not; under an emulated link
(bench/netem.py) both go through the same rate-limited loopback.

Metrics: as ``--metrics-out`` of training, with ``"impl": "ddp-gloo"`` in the start and final
lines; ``comm_bytes_per_rank`` counts what a bandwidth-optimal allreduce of the gradients
sends (2(P-1)/P x 4N bytes per step, as for psops_mpi's SSGD); ``comm_s`` is null, because
DDP overlaps communication with the backward pass and does not expose its time.
"""

from __future__ import annotations

import math
import os
import socket
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from mpi4py import MPI
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout as well

from psops_mpi.errors import UsageError
from psops_mpi.flat import FlatBuffers, FlatParams
from psops_mpi.loop import LoopState, Run, train
from psops_mpi.metrics import environment
from psops_mpi.run import checkpointer, prepare
from psops_mpi.sync import Synchronizer, SyncMetrics
from psops_mpi.world import NodeLocal, abort_on_error, agree, node_local

IMPL = "ddp-gloo"
RENDEZVOUS_TIMEOUT = timedelta(seconds=120)


class DDPSync(Synchronizer):
    """psops_mpi's synchroniser contract for a model that DDP will wrap: DDP averages the
    gradients inside ``backward()``, so the loop's calls only count steps.

    Build it before wrapping the model: the parameters become views of one flat buffer, as
    with every synchroniser, so the checkpoint saves them the same way.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 comm: MPI.Comm) -> None:
        self.model, self.optimizer = model, optimizer
        self.rank, self.world_size = comm.Get_rank(), comm.Get_size()
        self.flat, self.buffers = FlatParams(model), FlatBuffers(model)
        self.steps = 0

    def after_backward(self) -> bool:
        """Nothing to do: DDP's hooks allreduced the gradients during backward(); every step
        is taken."""
        return True

    def after_step(self, loss: torch.Tensor | None = None) -> bool:
        self.steps += 1
        return False

    def flush(self, final: bool = True) -> None:
        """Nothing is pending: the replicas never differ."""

    def metrics(self) -> SyncMetrics:
        p, n = self.world_size, self.flat.numel
        per_step = 2 * (p - 1) / p * 4 * n if p > 1 else 0.0
        return SyncMetrics(self.steps, 0, int(self.steps * per_step), math.nan)

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])


def rendezvous(comm: MPI.Comm, single_node: bool) -> dist.TCPStore:
    """Rank 0 opens a TCPStore on a free port and sends (host, port) to every rank over MPI."""
    if single_node:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        host = "127.0.0.1"
    else:
        host = os.environ.get("PSOPS_DDP_ADDR") or socket.gethostname()
    rank, size = comm.Get_rank(), comm.Get_size()
    store = None
    if rank == 0:
        store = dist.TCPStore(host, 0, size, is_master=True, timeout=RENDEZVOUS_TIMEOUT,
                              wait_for_workers=False)  # they connect after the bcast
    host, port = comm.bcast((host, store.port if store else None), root=0)
    if rank != 0:
        store = dist.TCPStore(host, port, size, is_master=False, timeout=RENDEZVOUS_TIMEOUT)
    return store


def main(argv: list[str] | None = None) -> int:
    """Parse training flags, join a gloo group through MPI, train with DDP, write metrics."""
    comm = MPI.COMM_WORLD
    argv = sys.argv[1:] if argv is None else argv
    try:
        local = node_local(comm)
        built = agree(comm, lambda: _prepare_ssgd(argv, comm, local))
        store = rendezvous(comm, single_node=local.size == comm.Get_size())
        dist.init_process_group("gloo", store=store, rank=comm.Get_rank(),
                                world_size=comm.Get_size())
        sync = DDPSync(built["model"], built["optimizer"], comm)
        built["model"] = DistributedDataParallel(built["model"])  # broadcasts rank 0's weights
        run = Run(**built, sync=sync)
        state = LoopState(run.steps_per_epoch, run.world.device)
        run.metrics.write("start", impl=IMPL, config=run.config.to_dict(),
                          world_size=comm.Get_size(), num_params=sync.flat.numel,
                          environment=environment())
        final = train(run, state, checkpointer(run, state))
        run.metrics.write("final", **final, impl=IMPL, world_size=comm.Get_size(),
                          num_params=sync.flat.numel, config=run.config.to_dict())
        run.metrics.close()
        if run.world.is_root:
            print(f"final ({IMPL}): test acc {final['test_acc']:.4f}  {final['wall_s']:.1f}s  "
                  f"{final['samples_per_s']:.0f} samples/s", flush=True)
        dist.destroy_process_group()
    except SystemExit:
        raise
    except BaseException as exc:
        abort_on_error(comm, exc)
    return 0


def _prepare_ssgd(argv: list[str], comm: MPI.Comm, local: NodeLocal) -> dict[str, Any]:
    built = prepare(["--algo", "ssgd", *argv], comm, local)
    config = built["config"]
    if config.algo != "ssgd":
        raise UsageError(f"bench/ddp_ssgd.py runs SSGD only, got --algo {config.algo}")
    if config.device != "cpu" and built["world"].device.type != "cpu":
        raise UsageError("bench/ddp_ssgd.py uses the gloo backend: run it with --device cpu")
    if config.checkpoint_dir:
        raise UsageError("bench/ddp_ssgd.py measures training only: drop --checkpoint-dir")
    return built


if __name__ == "__main__":
    raise SystemExit(main())
