"""--exchange auto: the cheaper PSO-PS exchange, by the cost model's round times."""

from __future__ import annotations

import pytest

from psops_mpi.costmodel import choose_exchange


@pytest.mark.parametrize(
    ("ranks", "numel", "needs_mean", "expected"),
    [
        # 4 ranks, 1M floats, 10 Gbit/s and 20 us: allgather 3 (20 us + 3.2 ms) = 9.66 ms;
        # best: MINLOC 2 x 20 us + broadcast 5 x 20 us + 1.5 x 3.2 ms = 4.94 ms
        (4, 1_000_000, False, "best"),
        # ... plus the mean's allreduce, 4 x 20 us + 4.8 ms: 9.86 ms > 9.66 ms
        (4, 1_000_000, True, "allgather"),
        (2, 1_000_000, False, "allgather"),  # one message each way against two collectives
        (64, 8_010, False, "best"),  # 63 latencies against about 6 + 69
        (2, 200_000_000, False, "best"),  # the receive buffer would be 1.6 GB > 1 GiB
        (1, 10, True, "allgather"),  # one particle: nothing is sent either way
    ],
)
def test_auto_picks_the_cheaper_exchange(ranks: int, numel: int, needs_mean: bool,
                                         expected: str) -> None:
    assert choose_exchange(ranks, numel, needs_mean) == expected
