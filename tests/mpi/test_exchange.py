"""Collectives on flat tensors; expected values are computed locally on every rank."""

from __future__ import annotations

import math

import pytest
import torch
from mpi4py import MPI

from psops_mpi.exchange import Exchange

pytestmark = pytest.mark.mpi(min_size=2)


@pytest.fixture
def ex() -> Exchange:
    return Exchange(MPI.COMM_WORLD)


def test_allreduce_mean(ex: Exchange) -> None:
    size, rank = ex.world_size, ex.rank
    buf = torch.arange(1001, dtype=torch.float32) * (rank + 1)
    ex.allreduce_mean_(buf)
    expected = torch.arange(1001, dtype=torch.float32) * (size + 1) / 2  # mean of 1..size
    assert torch.allclose(buf, expected)
    assert ex.bytes_sent == int(1001 * 4 * 2 * (size - 1) / size) and ex.calls == 1


def test_allgather_rows(ex: Exchange) -> None:
    send = torch.full((7,), float(ex.rank))
    recv = torch.empty((ex.world_size, 7))
    ex.allgather(send, recv)
    for row in range(ex.world_size):
        assert torch.all(recv[row] == row)
    assert ex.bytes_sent == 7 * 4 * (ex.world_size - 1)


def test_bcast_from_last_rank(ex: Exchange) -> None:
    root = ex.world_size - 1
    buf = torch.full((5,), float(ex.rank))
    ex.bcast_(buf, root)
    assert torch.all(buf == root)


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
