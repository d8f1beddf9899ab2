"""Both ways CUDA buffers reach MPI: staged through one pinned host buffer, and handed over
directly where the MPI library says it reads CUDA memory. Skipped without a GPU."""

from __future__ import annotations

import pytest
import torch
from mpi4py import MPI

from psops_mpi.cuda_aware import resolve
from psops_mpi.exchange import Exchange
from psops_mpi.world import choose_gpu, node_local

pytestmark = [
    pytest.mark.mpi(min_size=2),
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def library_reads_cuda() -> bool:
    return resolve("auto", "cuda").direct


PATHS = [
    pytest.param(False, id="staged"),
    pytest.param(True, id="direct", marks=pytest.mark.skipif(
        torch.cuda.is_available() and not library_reads_cuda(),
        reason="the MPI library does not report CUDA support")),
]


@pytest.fixture(scope="module")
def device() -> torch.device:
    # Ranks share the GPUs round-robin when there are fewer GPUs than ranks (one-GPU machines).
    return choose_gpu("cuda", node_local(MPI.COMM_WORLD), allow_sharing=True)[0]


def run_collectives(ex: Exchange, device: torch.device) -> None:
    """Allreduce, allgather and broadcast of CUDA tensors; expected values computed locally."""
    size, rank = ex.world_size, ex.rank
    buf = torch.arange(100_003, dtype=torch.float32, device=device) * (rank + 1)
    ex.allreduce_mean_(buf)
    expected = torch.arange(100_003, dtype=torch.float32) * (size + 1) / 2
    assert buf.device == device and torch.allclose(buf.cpu(), expected)

    send = torch.full((1025,), float(rank), device=device)
    recv = torch.empty((size, 1025), device=device)
    ex.allgather(send, recv)
    rows = torch.arange(size, dtype=torch.float32)[:, None].expand(-1, 1025)
    assert torch.equal(recv.cpu(), rows)

    root = size - 1
    small = torch.full((7,), float(rank), device=device)
    ex.bcast_(small, root)
    assert torch.all(small.cpu() == root)


@pytest.mark.parametrize("direct", PATHS)
def test_collectives_on_cuda_tensors(device: torch.device, direct: bool) -> None:
    ex = Exchange(MPI.COMM_WORLD, cuda_aware=direct)
    run_collectives(ex, device)
    if direct:
        assert ex._staging is None  # nothing went through host memory
    else:
        assert ex._staging is not None and ex._staging.is_pinned()


def test_staging_buffer_is_allocated_once(device: torch.device) -> None:
    ex = Exchange(MPI.COMM_WORLD, cuda_aware=False)
    big = torch.ones(1 << 20, device=device)
    ex.allreduce_mean_(big)
    first = ex._staging.data_ptr()
    for _ in range(3):  # smaller and equal messages reuse the same pinned buffer
        ex.allreduce_mean_(torch.ones(1000, device=device))
        ex.bcast_(big, root=0)
    assert ex._staging.data_ptr() == first and ex._staging.is_pinned()
    assert torch.all(big == 1)


def test_pso_ps_stages_through_one_buffer_sized_up_front(device: torch.device) -> None:
    """The initial broadcast and the larger staged allgather of a round share one buffer."""
    from psops_mpi.sync import PSOSync

    model = torch.nn.Linear(32, 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sync = PSOSync(model, optimizer, MPI.COMM_WORLD, sync_every=1)
    first = sync.exchange._staging.data_ptr()
    for _ in range(3):
        model(torch.ones(4, 32, device=device)).sum().backward()
        sync.after_backward()
        optimizer.step()
        sync.after_step(torch.tensor(1.0, device=device))
    assert sync.rounds == 3
    assert sync.exchange._staging.data_ptr() == first
