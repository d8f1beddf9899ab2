"""How a round left in flight moves while the ranks compute: the choice behind ``--overlap``.

MPI moves a non-blocking collective's data only while a rank is inside an MPI call (MPICH's
default: no progress thread). This measures one exchange of mlp-wide's size (an Iallreduce
of 1.1M floats, 4 ranks) left in flight over the 16 training steps of mlp-wide that follow,
on an emulated link, four ways:

* ``block``: a blocking Allreduce, then the steps (what a blocking round costs);
* ``none``: Iallreduce, the steps, then Wait (MPI moves the data only in the Wait);
* ``test``: Iallreduce, one ``Test`` after every step, then Wait (what psops_mpi does: it
  tests after every backward pass and every step);
* ``thread``: Iallreduce, and a Python thread that tests it every ``--poll-ms`` while the
  steps run (MPI_THREAD_MULTIPLE).

Printed per way: the seconds of the whole run, of waiting (in Allreduce or Wait) and of the
steps, over ``--rounds`` rounds, the mean over the ranks. Run as root (the emulated link)::

    python bench/progress_bench.py --link 1gbit
    python bench/progress_bench.py --link 100mbit --numel 290000 --steps 64

(the second: an int8 round's bytes at 100 Mbit/s, a round every 64 steps). A rank's side of
it runs with ``--rank-side`` under mpiexec, inside the link.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

MODES = ("block", "none", "test", "thread")


def rank_side(mode: str, numel: int, steps: int, rounds: int, poll_s: float) -> None:
    """One rank: ``rounds`` rounds of an exchange and ``steps`` steps of mlp-wide."""
    import numpy as np
    import torch
    from mpi4py import MPI

    torch.set_num_threads(1)
    comm = MPI.COMM_WORLD
    model = torch.nn.Sequential(torch.nn.Linear(40, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 1024), torch.nn.ReLU(),
                                torch.nn.Linear(1024, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 40), torch.randint(0, 10, (32,))

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    send, recv = np.ones(numel, dtype=np.float32), np.empty(numel, dtype=np.float32)
    for _ in range(5):
        step()
    comm.Barrier()
    began, waited, computed = time.perf_counter(), 0.0, 0.0
    for _ in range(rounds):
        if mode == "block":
            t = time.perf_counter()
            comm.Allreduce(send, recv)
            waited += time.perf_counter() - t
        else:
            request = comm.Iallreduce(send, recv)
            poller = None
            if mode == "thread":
                def poll(req: MPI.Request = request) -> None:
                    while not req.Test():
                        time.sleep(poll_s)
                poller = threading.Thread(target=poll, daemon=True)
                poller.start()
        for _ in range(steps):
            t = time.perf_counter()
            step()
            computed += time.perf_counter() - t
            if mode == "test":
                request.Test()
        if mode != "block":
            t = time.perf_counter()
            if poller is not None:
                poller.join()
            else:
                request.Wait()
            waited += time.perf_counter() - t
    total = time.perf_counter() - began
    means = np.array(comm.gather((total, waited, computed)) or [[0, 0, 0]]).mean(0)
    if comm.Get_rank() == 0:
        print(f"{mode:6s} total {means[0]:6.2f} s  waiting {means[1]:6.2f} s  steps "
              f"{means[2]:6.2f} s  ({means[1] / rounds * 1e3:.0f} ms waited a round)",
              flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--link", default="1gbit", help="an emulated rate (1gbit, 100mbit, ...)")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--numel", type=int, default=1_100_000, help="floats exchanged a round")
    p.add_argument("--steps", type=int, default=16, help="steps between two rounds")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--poll-ms", type=float, default=1.0, help="the thread's pause")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--rank-side", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rank_side:
        rank_side(args.rank_side, args.numel, args.steps, args.rounds, args.poll_ms / 1e3)
        return 0
    import jobs
    import netem

    print(f"{args.numel:,} floats a round, {args.steps} steps of mlp-wide between rounds, "
          f"{args.rounds} rounds, {args.ranks} ranks, {args.link} (emulated)", flush=True)
    try:
        with netem.EmulatedLink() as link:
            link.set_rate(args.link)
            for mode in args.modes.split(","):
                cmd = [*jobs.mpiexec_prefix(), str(args.ranks), sys.executable, __file__,
                       "--rank-side", mode, "--numel", str(args.numel), "--steps",
                       str(args.steps), "--rounds", str(args.rounds), "--poll-ms",
                       str(args.poll_ms)]
                subprocess.run(link.wrap(cmd), timeout=600, check=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    except netem.LinkSetupError as exc:
        print(f"progress_bench: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
