"""Cost of one psops_mpi exchange round against the bare mpi4py collective, side by side.

What it measures, for flat float32 buffers of N floats (``--sizes``) on the P ranks that
``mpiexec`` starts (P >= 2):

* ``allgather`` -- a PSO-PS round's exchange: ``Exchange.allgather(flat.packed, gathered)``
  with ``flat`` a real :class:`~psops_mpi.flat.FlatParams` (``extra=1``) over a model of
  exactly N parameters, so ``packed`` holds N+1 floats [weights ; fitness] and ``gathered``
  is a (P, N+1) float32 tensor. Raw: ``comm.Allgather(send, recv)`` on numpy float32 arrays
  of the same shapes.
* ``allreduce`` -- a periodic-averaging round: ``Exchange.allreduce_mean_(flat.data)``,
  divide by P included. Raw: ``comm.Allreduce(MPI.IN_PLACE, arr)`` then ``arr /= P`` in
  numpy (the same work); a second raw baseline, ``raw-nodiv``, is the Allreduce alone, so
  the divide's share of the round can be read off.

Method (as mpi4py's osu_* demos): ``--warmup`` iterations are run and discarded; every timed
iteration starts after ``comm.Barrier()``; an iteration's time is the largest over the ranks
(a collective is as slow as its slowest rank); the reported figure is the median over
``--repeats`` iterations (the same count for every size). The variants are interleaved
within each iteration and their order rotates from one iteration to the next (ours, raw /
raw, ours / ...), so a burst of background load hits all of them alike. Before timing, each
variant's result is checked once against the mean and the rows computed independently on
every rank; the run stops with a message if one differs.

Throughput is payload / median time with payload = N * 4 bytes per rank for every variant
(MB = 10**6 bytes). ``ratio`` = ours throughput / raw throughput = raw time / ours time:
1.0 means the library adds nothing to the bare collective, 0.9 means a round costs about
11 % more than the bare call (the target is ratio >= 0.9). Compare ratios, not absolute
figures: on a shared machine those move with the load, while both sides of a ratio are
measured in the same iterations. Every variant has buffers of its own, so none finds its
data in cache because another variant just touched it. At a few MB and up the ratio also
reflects how the memory is backed: numpy asks the kernel for transparent huge pages on
arrays of 4 MiB and more, PyTorch's CPU allocator only when ``THP_MEM_ALLOC_ENABLE=1`` is
set; the header line shows both settings (see bench/README.md for what this does to the
figures). With a few ms per round, a 1M-float row needs a quiet machine (or many more
``--repeats``) before its ratio means anything.

A second table measures what the fault handling adds (docs/troubleshooting.md), in
the same interleaved way: ``pa-guarded`` is a PA round as ``PASync`` runs it (the ranks meet
at the stall watch's barrier, check their weights are finite with one reduction, and average
``[x ; flag]`` in one Allreduce over the finite ranks) beside ``pa-bare``, the round before
that guard (``Exchange.allreduce_mean_``); ``ssgd-guarded`` / ``ssgd-bare`` the same for an
SSGD step's gradient (barrier, Allreduce, finiteness of the mean); and the parts alone:
``arrive`` (the watched barrier), ``agreement`` (one ``StopPoll`` agreement on stop signals
and timed checkpoints: a non-blocking Allreduce of three integers) and ``finite-check`` (the
reduction over N floats). Each is shown as a share of ``pa-bare``.

PyTorch threads are set as a training run sets them (``psops_mpi.world.init_world``: this
rank's fair share of the cores, or ``--threads``), since the divide in ``allreduce_mean_``
runs on them.

Run it (rank 0 prints the table; ``--json PATH`` also writes the results)::

    timeout 600 mpiexec -n 2 python bench/exchange_bench.py --sizes 1e6,1e7
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from mpi4py import MPI
from torch import nn

from psops_mpi.exchange import Exchange
from psops_mpi.flat import FlatParams, all_finite, flat_buffer
from psops_mpi.loop import StopPoll
from psops_mpi.metrics import environment as training_environment
from psops_mpi.stop import StopRequest
from psops_mpi.world import init_world, node_local

Op = Callable[[], None]
MB = 1e6
FLOAT_BYTES = 4


@dataclass
class Row:
    """One operation at one size: median times (ms), throughputs (MB/s) and the ratio."""

    op: str
    n: int
    ours_ms: float
    raw_ms: float
    ours_mb_s: float
    raw_mb_s: float
    ratio: float
    raw_nodiv_ms: float | None = None
    raw_nodiv_mb_s: float | None = None
    samples_ms: dict[str, list[float]] = field(default_factory=dict)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1e6,1e7",
                        help="comma-separated buffer sizes in floats, e.g. 1e6,1e7")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per variant")
    parser.add_argument("--repeats", type=int, default=20, help="timed iterations per variant")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per rank (default: as training, the fair share)")
    parser.add_argument("--json", metavar="PATH", default=None,
                        help="also write the environment, settings and rows as JSON here")
    args = parser.parse_args(argv)
    args.sizes = [int(float(s)) for s in args.sizes.split(",") if s.strip()]
    if not args.sizes or min(args.sizes) < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("sizes must be positive, repeats >= 1 and warmup >= 0")
    return args


class Blob(nn.Module):
    """A model with exactly ``n`` trainable parameters: one Linear layer whose weight and
    bias hold ``rows * 1024`` of them, plus a vector for the remainder."""

    def __init__(self, n: int) -> None:
        super().__init__()
        rows, rest = divmod(n, 1024)
        self.layer = nn.Linear(1023, rows) if rows else None
        self.rest = nn.Parameter(torch.zeros(rest)) if rest else None


def flat_params(n: int) -> FlatParams:
    flat = FlatParams(Blob(n), extra=1)
    assert flat.numel == n and flat.packed.numel() == n + 1, "model size mismatch"
    return flat


def rank_values(rank: int, n: int) -> np.ndarray:
    """The float32 values rank ``rank`` contributes in the correctness check (N+1 of them)."""
    return np.random.default_rng(1000 + rank).standard_normal(n + 1).astype(np.float32)


def time_round(comm: MPI.Comm, op: Op) -> float:
    """Seconds one call of ``op`` takes on the slowest rank, after a barrier."""
    comm.Barrier()
    start = MPI.Wtime()
    op()
    elapsed = MPI.Wtime() - start
    return comm.allreduce(elapsed, op=MPI.MAX)


def interleaved(comm: MPI.Comm, ops: dict[str, Op], warmup: int,
                repeats: int) -> dict[str, list[float]]:
    """Per-iteration times (s) of every variant, run in a rotating interleaved order."""
    names = list(ops)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            t = time_round(comm, ops[name])
            if i >= warmup:
                times[name].append(t)
    return times


def fail(comm: MPI.Comm, ok: bool, what: str) -> None:
    """Stop every rank with a message if ``ok`` is False on any rank."""
    if comm.allreduce(bool(ok), op=MPI.LAND):
        return
    if comm.Get_rank() == 0:
        print(f"exchange_bench: correctness check failed: {what}", file=sys.stderr, flush=True)
    comm.Barrier()
    raise SystemExit(1)


def check_allgather(comm: MPI.Comm, ex: Exchange, n: int) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    expected = np.stack([rank_values(r, n) for r in range(p)])
    flat = flat_params(n)
    flat.packed.copy_(torch.from_numpy(rank_values(rank, n)))
    ours = torch.empty((p, n + 1), dtype=torch.float32)
    ex.allgather(flat.packed, ours)
    fail(comm, np.array_equal(ours.numpy(), expected), f"ours allgather N={n}")
    raw = np.empty((p, n + 1), dtype=np.float32)
    comm.Allgather(rank_values(rank, n), raw)
    fail(comm, np.array_equal(raw, expected), f"raw Allgather N={n}")


def check_allreduce(comm: MPI.Comm, ex: Exchange, n: int) -> None:
    p, rank = comm.Get_size(), comm.Get_rank()
    mean = np.mean([rank_values(r, n)[:n].astype(np.float64) for r in range(p)], axis=0)
    flat = flat_params(n)
    flat.data.copy_(torch.from_numpy(rank_values(rank, n)[:n]))
    ex.allreduce_mean_(flat.data)
    fail(comm, np.allclose(flat.data.numpy(), mean, rtol=1e-5, atol=1e-6),
         f"ours allreduce_mean_ N={n}")
    raw = rank_values(rank, n)[:n].copy()
    comm.Allreduce(MPI.IN_PLACE, raw)
    raw /= p
    fail(comm, np.allclose(raw, mean, rtol=1e-5, atol=1e-6), f"raw Allreduce + divide N={n}")
    fail(comm, np.array_equal(raw, flat.data.numpy()), f"ours != raw allreduce mean N={n}")


def bench_allgather(comm: MPI.Comm, ex: Exchange, n: int, warmup: int, repeats: int) -> Row:
    p = comm.Get_size()
    flat = flat_params(n)
    flat.packed.fill_(comm.Get_rank() + 1.0)
    # Allocated as PSOSync allocates it, so the page size matches a real round.
    gathered = flat_buffer(p * (n + 1), torch.float32, "cpu").view(p, n + 1)
    send = np.full(n + 1, comm.Get_rank() + 1.0, dtype=np.float32)
    recv = np.empty((p, n + 1), dtype=np.float32)
    ops: dict[str, Op] = {
        "ours": lambda: ex.allgather(flat.packed, gathered),
        "raw": lambda: comm.Allgather(send, recv),
    }
    return make_row("allgather", n, interleaved(comm, ops, warmup, repeats))


def bench_allreduce(comm: MPI.Comm, ex: Exchange, n: int, warmup: int, repeats: int) -> Row:
    p = comm.Get_size()
    flat = flat_params(n)
    flat.data.fill_(comm.Get_rank() + 1.0)
    arr = np.full(n, comm.Get_rank() + 1.0, dtype=np.float32)
    # Summed without a divide, these grow by P per iteration: P**(warmup+repeats) must stay
    # finite in float32 (it does for the defaults up to P ~ 40).
    nodiv = np.full(n, 1.0, dtype=np.float32)

    def raw() -> None:
        comm.Allreduce(MPI.IN_PLACE, arr)
        np.divide(arr, p, out=arr)  # arr /= p (a closure cannot rebind arr)

    ops: dict[str, Op] = {
        "ours": lambda: ex.allreduce_mean_(flat.data),
        "raw": raw,
        "raw-nodiv": lambda: comm.Allreduce(MPI.IN_PLACE, nodiv),
    }
    return make_row("allreduce", n, interleaved(comm, ops, warmup, repeats))


@dataclass
class FaultRow:
    """One part of the fault handling at one size: median ms and its share of a bare round;
    for the guarded rounds also the paired cost: the median over iterations of (guarded −
    bare) in the same iteration, which a burst of background load shifts far less than it
    shifts either median."""

    op: str
    n: int
    ms: float
    share_of_round: float  # of pa-bare, the PA round without the guard
    paired_extra_ms: float | None = None
    samples_ms: list[float] = field(default_factory=list)


def bench_faults(comm: MPI.Comm, ex: Exchange, n: int, warmup: int,
                 repeats: int) -> list[FaultRow]:
    flat = flat_params(n)
    flat.data.fill_(comm.Get_rank() + 1.0)
    flat.grad.fill_(comm.Get_rank() + 1.0)
    bare = flat_params(n)
    bare.data.fill_(comm.Get_rank() + 1.0)
    poll = StopPoll(comm, StopRequest(), lambda: False, max_interval=1)
    step = iter(range(1, 1 << 40))

    def pa_guarded() -> None:
        ex.arrive("bench")
        ex.allreduce_finite_mean_(flat.packed, all_finite(flat.data))

    def ssgd_guarded() -> None:
        ex.arrive("bench")
        ex.allreduce_mean_(flat.grad)
        all_finite(flat.grad)

    ops: dict[str, Op] = {
        "pa-guarded": pa_guarded,
        "pa-bare": lambda: ex.allreduce_mean_(bare.data),
        "ssgd-guarded": ssgd_guarded,
        "ssgd-bare": lambda: ex.allreduce_mean_(bare.grad),
        "arrive": lambda: ex.arrive("bench"),
        "agreement": lambda: poll(next(step)) and None,
        "finite-check": lambda: all_finite(flat.data) and None,
    }
    times = interleaved(comm, ops, warmup, repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    pairs = {"pa-guarded": "pa-bare", "ssgd-guarded": "ssgd-bare"}
    rows = []
    for name, t in med.items():
        bare = pairs.get(name)
        extra = (statistics.median(g - b for g, b in zip(times[name], times[bare],
                                                           strict=True)) * 1e3
                 if bare else None)
        rows.append(FaultRow(name, n, t * 1e3, t / med["pa-bare"], extra,
                             [round(x * 1e3, 4) for x in times[name]]))
    return rows


def check_finite_mean(comm: MPI.Comm, ex: Exchange, n: int) -> None:
    """The guarded PA round gives the plain mean when every rank is finite."""
    p, rank = comm.Get_size(), comm.Get_rank()
    mean = np.mean([rank_values(r, n)[:n].astype(np.float64) for r in range(p)], axis=0)
    flat = flat_params(n)
    flat.data.copy_(torch.from_numpy(rank_values(rank, n)[:n]))
    count = ex.allreduce_finite_mean_(flat.packed, all_finite(flat.data))
    fail(comm, count == p and np.allclose(flat.data.numpy(), mean, rtol=1e-5, atol=1e-6),
         f"ours allreduce_finite_mean_ N={n}")


def make_row(op: str, n: int, times: dict[str, list[float]]) -> Row:
    payload = n * FLOAT_BYTES
    med = {name: statistics.median(ts) for name, ts in times.items()}
    nodiv = med.get("raw-nodiv")
    return Row(
        op=op, n=n,
        ours_ms=med["ours"] * 1e3, raw_ms=med["raw"] * 1e3,
        ours_mb_s=payload / med["ours"] / MB, raw_mb_s=payload / med["raw"] / MB,
        ratio=med["raw"] / med["ours"],
        raw_nodiv_ms=None if nodiv is None else nodiv * 1e3,
        raw_nodiv_mb_s=None if nodiv is None else payload / nodiv / MB,
        samples_ms={name: [round(t * 1e3, 4) for t in ts] for name, ts in times.items()},
    )


def transparent_hugepages() -> dict[str, object]:
    """Huge-page settings that change the figures at 10M floats: numpy asks the kernel for
    transparent huge pages on its large arrays (the raw side), PyTorch's CPU allocator only
    when THP_MEM_ALLOC_ENABLE=1 (ours)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            mode = fh.read().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        mode = None
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    getter = getattr(getattr(core, "multiarray", None), "_get_madvise_hugepage", None)
    return {"thp_mode": mode, "numpy_madvise_hugepage": getter() if getter else None,
            "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE")}


def environment(comm: MPI.Comm) -> dict[str, object]:
    """What training records (``psops_mpi.metrics.environment``) plus what this bench needs."""
    return {
        **training_environment(),
        "P": comm.Get_size(),
        "mpi_version": "{}.{}".format(*MPI.Get_version()),
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        **transparent_hugepages(),
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(env: dict[str, object], rows: Sequence[Row], repeats: int, warmup: int) -> str:
    """The report rank 0 prints."""
    lines = [
        f"# exchange_bench  P={env['P']}  {env['mpi_library']}  "
        f"torch {env['torch']}  mpi4py {env['mpi4py']}  torch threads/rank "
        f"{env['torch_threads']}  host {env['host']}  {env['date']}",
        f"# THP mode {env['thp_mode']}, numpy madvise hugepage "
        f"{env['numpy_madvise_hugepage']}, THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}",
        f"# median of {repeats} iterations (after {warmup} warm-up), each the max over ranks; "
        "MB/s = N*4 bytes / median; ratio = ours MB/s / raw MB/s",
        f"{'op':<10} {'N':>10} {'ours ms':>9} {'raw ms':>9} {'ours MB/s':>10} "
        f"{'raw MB/s':>10} {'ratio':>6} {'raw-nodiv ms':>13} {'raw-nodiv MB/s':>15}",
    ]
    for r in rows:
        lines.append(
            f"{r.op:<10} {r.n:>10} {r.ours_ms:>9.3f} {r.raw_ms:>9.3f} {r.ours_mb_s:>10.1f} "
            f"{r.raw_mb_s:>10.1f} {r.ratio:>6.3f} {fmt(r.raw_nodiv_ms, '.3f'):>13} "
            f"{fmt(r.raw_nodiv_mb_s, '.1f'):>15}"
        )
    return "\n".join(lines)


def fault_table(rows: Sequence[FaultRow]) -> str:
    lines = ["# what the fault handling adds, same method; share = median / median of pa-bare;",
             "# paired extra = median over iterations of (guarded - bare) in the same iteration",
             f"{'op':<13} {'N':>10} {'ms':>9} {'share of a PA round':>20} "
             f"{'paired extra ms':>16}"]
    lines += [f"{r.op:<13} {r.n:>10} {r.ms:>9.4f} {100 * r.share_of_round:>19.2f}% "
              f"{fmt(r.paired_extra_ms, '.4f'):>16}" for r in rows]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 2:
        print("exchange_bench: needs at least 2 ranks, e.g. mpiexec -n 2 python "
              "bench/exchange_bench.py", file=sys.stderr)
        return 2
    init_world(comm, node_local(comm), device="cpu", threads=args.threads)  # as in training
    ex = Exchange(comm)
    for n in args.sizes:
        check_allgather(comm, ex, n)
        check_allreduce(comm, ex, n)
        check_finite_mean(comm, ex, n)
    rows: list[Row] = []
    faults: list[FaultRow] = []
    for n in args.sizes:
        rows.append(bench_allgather(comm, ex, n, args.warmup, args.repeats))
        rows.append(bench_allreduce(comm, ex, n, args.warmup, args.repeats))
        faults.extend(bench_faults(comm, ex, n, args.warmup, args.repeats))
    env = environment(comm)
    if comm.Get_rank() == 0:
        print(table(env, rows, args.repeats, args.warmup), flush=True)
        print(fault_table(faults), flush=True)
        if args.json:
            settings = {"sizes": args.sizes, "warmup": args.warmup, "repeats": args.repeats,
                        "threads": args.threads, "argv": sys.argv}
            with open(args.json, "w") as fh:
                json.dump({"environment": env, "settings": settings,
                           "rows": [asdict(r) for r in rows],
                           "faults": [asdict(r) for r in faults]}, fh, indent=1)
                fh.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
