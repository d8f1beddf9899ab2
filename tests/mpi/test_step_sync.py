"""A local training step waits for nothing: no host synchronisation, no host-to-device copy.

The run is built as ``python -m psops_mpi.train`` builds it, and the steps are the loop's own
(the next batch, :func:`psops_mpi.loop.train_step` and :func:`psops_mpi.loop.after_step`:
the synchroniser's calls, the sums on the device, the agreement on stop signals and
checkpoints). Between two
rounds of PA, SlowMo and PSO-PS nothing may make the host wait for the device:

* everywhere, the profiler must record none of the operators that read a device value on the
  host (``.item()``, ``float(t)``, ``bool(t)``: ``aten::_local_scalar_dense``; ``nonzero``,
  ``masked_select``, whose output size needs the host);
* on CUDA, additionally, ``torch.cuda.set_sync_debug_mode("error")`` makes any synchronising
  call raise, and the profiler's CUDA trace must hold no host-to-device copy.

Rounds do wait, by design: MPI reads host memory unless it is CUDA-aware, and the fitness
reaches the swarm through it. SSGD exchanges its gradient, so it waits every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
from mpi4py import MPI
from torch.profiler import ProfilerActivity, profile

from psops_mpi.loop import LoopState, StopPoll, after_step, train_step
from psops_mpi.run import build_run, checkpointer
from psops_mpi.stop import StopRequest
from psops_mpi.world import node_local

pytestmark = pytest.mark.mpi(min_size=2)
COMM = MPI.COMM_WORLD
SYNCING_OPS = ("aten::_local_scalar_dense", "aten::item", "aten::nonzero",
               "aten::masked_select")
SYNC_EVERY = 50  # the steps watched below all fall between two rounds


@contextlib.contextmanager
def cuda_sync_errors(device: torch.device) -> Iterator[None]:
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("algo", ["pa", "slowmo", "pso-ps"])
def test_local_steps_never_wait_for_the_device(algo: str, precision: str) -> None:
    run = build_run(["--algo", algo, "--precision", precision, "--sync-every",
                     str(SYNC_EVERY), "--quiet"], COMM, node_local(COMM))
    state = LoopState(run.steps_per_epoch, run.world.device)
    checkpoints = checkpointer(run, state)
    poll = StopPoll(COMM, StopRequest(), checkpoints.clock_due)
    batches = run.batches.epoch(0)  # the epoch's shuffle: once, before the first batch

    def steps(count: int) -> None:  # the loop's own: the next batch, the step, the agreement
        for _ in range(count):
            x, y = next(batches)
            train_step(run, state, [(x, y)], lr=0.05)
            after_step(state.step, poll, checkpoints)

    steps(3)  # warm-up; the first round is at step 50
    activities = [ProfilerActivity.CPU]
    if run.world.device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof, cuda_sync_errors(run.world.device):
        steps(10)
    names = [event.name for event in prof.events()]
    assert state.step == 13 and run.sync.metrics().rounds == 0
    assert "aten::convolution" in names  # the profiler saw the steps
    assert [n for n in names if n in SYNCING_OPS] == []
    assert [n for n in names if "HtoD" in n] == []
