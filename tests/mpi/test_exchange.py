"""Collectives on flat tensors; expected values are computed locally on every rank."""

from __future__ import annotations

import math

import pytest
import torch
from mpi4py import MPI

from psops_mpi.exchange import Exchange

pytestmark = pytest.mark.mpi(min_size=2)


DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")),
]


@pytest.fixture
def ex() -> Exchange:
    return Exchange(MPI.COMM_WORLD)


@pytest.mark.parametrize("device", DEVICES)
def test_allreduce_mean(ex: Exchange, device: str) -> None:
    size, rank = ex.world_size, ex.rank
    buf = torch.arange(1001, dtype=torch.float32, device=device) * (rank + 1)
    ex.allreduce_mean_(buf)
    expected = torch.arange(1001, dtype=torch.float32) * (size + 1) / 2  # mean of 1..size
    assert torch.allclose(buf.cpu(), expected)
    assert ex.bytes_sent == int(1001 * 4 * 2 * (size - 1) / size) and ex.calls == 1


@pytest.mark.parametrize("device", DEVICES)
def test_allgather_rows(ex: Exchange, device: str) -> None:
    send = torch.full((7,), float(ex.rank), device=device)
    recv = torch.empty((ex.world_size, 7), device=device)
    ex.allgather(send, recv)
    for row in range(ex.world_size):
        assert torch.all(recv[row] == row)
    assert ex.bytes_sent == 7 * 4 * (ex.world_size - 1)


@pytest.mark.parametrize("device", DEVICES)
def test_bcast_from_last_rank(ex: Exchange, device: str) -> None:
    root = ex.world_size - 1
    buf = torch.full((5,), float(ex.rank), device=device)
    ex.bcast_(buf, root)
    assert torch.all(buf == root)
    # Counted as one buffer on every rank (the root sends it, each relay passes it on).
    assert ex.bytes_sent == 5 * 4 and ex.calls == 1


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (lambda r: 5.0 - (r % 2), lambda p: (4.0, 1)),  # tie among odd ranks: lowest wins
        (lambda r: math.inf, lambda p: (math.inf, 0)),
        (lambda r: float(r), lambda p: (0.0, 0)),
        (lambda r: -float(r), lambda p: (-(p - 1.0), p - 1)),
    ],
)
def test_minloc(ex: Exchange, values, expected) -> None:
    assert ex.minloc(values(ex.rank)) == expected(ex.world_size)
    # One C struct {double; int}: 8 + 4 bytes, padded to 16 (docs/algorithms.md: "+ 16 bytes").
    assert ex.bytes_sent == 16 and ex.calls == 1
