"""A cost model of every algorithm and exchange, fitted on runs measured here, validated
against them, and projected to 16-1024 ranks on 1-400 Gbit/s links.

The pieces (Hockney's model: a message of n bytes costs alpha + n * beta on a link with
latency alpha and time per byte beta; the MPI library picks the cheaper algorithm):

* allreduce: ring, 2(P-1) alpha + 2(P-1)/P n beta; or recursive doubling (tree),
  ceil(log2 P) (alpha + n beta);
* allgather (ring): (P-1) (alpha + n beta), n the block of one rank;
* broadcast: binomial tree, ceil(log2 P) (alpha + n beta); or scatter + allgather (MPICH's
  large-message broadcast), (ceil(log2 P) + P - 1) alpha + 2(P-1)/P n beta;
* MINLOC: an allreduce of 16 bytes.

A round of each method, for N float32 parameters (4N bytes) and P ranks: SSGD an allreduce
of the gradient every step; PA and SlowMo an allreduce of the weights every ``n`` steps;
PSO-PS ``allgather`` one allgather of N+1 floats; PSO-PS ``best`` MINLOC plus a broadcast
of the best particle, plus an allreduce of N+1 floats when the rule needs the swarm's mean
(the centre rule, or c3 > 0). Time per epoch = steps x compute per step + rounds x round.
Memory per rank beyond the model, its gradient and SGD's momentum: SlowMo 2 x 4N (anchor and
slow momentum), PSO-PS 3 x 4N (velocity, personal and global best) plus 4N for the centre
rule's anchor, plus P x 4(N+1) for the allgather's receive buffer.

Usage::

    python bench/scaling_model.py project [--ms-per-mparam 0.2]  # tables, 16-1024 ranks
    python bench/scaling_model.py fit DIR                       # alpha, beta from DIR/*.json
    python bench/scaling_model.py validate DIR                  # predicted vs measured epochs

``fit`` reads ``bench/exchange_bench.py --json`` files measured on one link at several rank
counts; ``validate`` reads sweep records (``bench/sweep.py``'s runs.jsonl) of that link.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FLOAT = 4  # bytes per parameter
MINLOC_BYTES = 16  # MPI.DOUBLE_INT, padded


@dataclass(frozen=True)
class Link:
    """Latency (s per message) and bandwidth (bytes per s) between two ranks."""

    name: str
    alpha: float
    bandwidth: float

    @property
    def beta(self) -> float:
        return 1.0 / self.bandwidth


def gbit(rate: float) -> float:
    return rate * 1e9 / 8


# Real links, as a cluster's fabric gives them (latency: typical MPI ping-pong over the
# network, not the emulated loopback, whose latency is that of TCP on one machine).
LINKS = {
    "1gbit": Link("1 Gbit/s Ethernet", 50e-6, gbit(1)),
    "10gbit": Link("10 Gbit/s Ethernet", 20e-6, gbit(10)),
    "100gbit": Link("100 Gbit/s InfiniBand", 2e-6, gbit(100)),
    "400gbit": Link("400 Gbit/s InfiniBand", 1.5e-6, gbit(400)),
}


def log2_ceil(p: int) -> int:
    return max(1, math.ceil(math.log2(p)))


def allreduce(n: float, p: int, link: Link) -> float:
    if p == 1:
        return 0.0
    ring = 2 * (p - 1) * link.alpha + 2 * (p - 1) / p * n * link.beta
    tree = log2_ceil(p) * (link.alpha + n * link.beta)
    return min(ring, tree)


def allgather(n_block: float, p: int, link: Link) -> float:
    return 0.0 if p == 1 else (p - 1) * (link.alpha + n_block * link.beta)


def bcast(n: float, p: int, link: Link) -> float:
    if p == 1:
        return 0.0
    tree = log2_ceil(p) * (link.alpha + n * link.beta)
    scatter_allgather = (log2_ceil(p) + p - 1) * link.alpha + 2 * (p - 1) / p * n * link.beta
    return min(tree, scatter_allgather)


def round_time(method: str, n_params: int, p: int, link: Link) -> float:
    """Seconds of one synchronisation round (SSGD: one step's allreduce)."""
    n = n_params * FLOAT
    if method in ("ssgd", "pa", "slowmo"):
        return allreduce(n, p, link)
    if method == "pso-allgather":
        return allgather(n + FLOAT, p, link)
    if method in ("pso-best", "pso-best-mean"):
        cost = allreduce(MINLOC_BYTES, p, link) + bcast(n, p, link)
        if method == "pso-best-mean":
            cost += allreduce(n + FLOAT, p, link)
        return cost
    raise ValueError(f"unknown method {method!r}")


def round_bytes(method: str, n_params: int, p: int) -> float:
    """Bytes one rank sends per round, as psops_mpi's counters count them."""
    n = n_params * FLOAT
    ring = 2 * (p - 1) / p
    return {"ssgd": ring * n, "pa": ring * n, "slowmo": ring * n,
            "pso-allgather": (p - 1) * (n + FLOAT), "pso-best": n + MINLOC_BYTES,
            "pso-best-mean": n + MINLOC_BYTES + ring * (n + FLOAT)}[method]


def memory_bytes(method: str, n_params: int, p: int) -> float:
    """Bytes per rank beyond the model, its gradient and the local momentum."""
    n = n_params * FLOAT
    return {"ssgd": 0.0, "pa": 0.0, "slowmo": 2 * n, "pso-allgather": 3 * n + p * (n + FLOAT),
            "pso-best": 3 * n, "pso-best-mean": 4 * n + (n + FLOAT)}[method]


def epoch_time(method: str, n_params: int, p: int, link: Link, *, samples: int,
               batch: int, sync_every: int, step_s: float) -> float:
    """Seconds per epoch: every rank's steps plus the rounds (one forced at the epoch's end
    when the period does not divide the steps, as the training loop does)."""
    steps = samples // p // batch
    rounds = steps if method == "ssgd" else math.ceil(steps / sync_every)
    return steps * step_s + rounds * round_time(method, n_params, p, link)


METHODS = ("ssgd", "pa", "slowmo", "pso-allgather", "pso-best", "pso-best-mean")


def project(ms_per_mparam: float, samples: int, batch: int, sync_every: int) -> list[str]:
    """Markdown tables: time per epoch and speedup over SSGD at P = 16 ... 1024."""
    lines = [f"An epoch of {samples:,} samples, {batch} per rank and step (so P ranks take "
             f"{samples:,} / ({batch} P) steps), `--sync-every {sync_every}`; compute "
             f"{ms_per_mparam:g} ms per step per million parameters; seconds per epoch "
             "(speedup over SSGD).", ""]
    for n_params in (1_000_000, 25_000_000, 100_000_000):
        step_s = ms_per_mparam * n_params / 1e9
        lines += [f"### {n_params / 1e6:g}M parameters", "",
                  "| link | ranks | " + " | ".join(METHODS) + " | allgather buffer / rank |",
                  "|---|---|" + "---|" * (len(METHODS) + 1)]
        for key, link in LINKS.items():
            for p in (16, 64, 256, 1024):
                times = {m: epoch_time(m, n_params, p, link, samples=samples, batch=batch,
                                       sync_every=sync_every, step_s=step_s) for m in METHODS}
                cells = [f"{t:.3g} s ({times['ssgd'] / t:.2g}×)" for t in times.values()]
                buffer = p * (n_params + 1) * FLOAT / 1e9
                lines.append(f"| {key} | {p} | " + " | ".join(cells) + f" | {buffer:.3g} GB |")
        lines.append("")
    return lines


# ---- fitting and validating on measured runs

def collective_samples(folder: Path) -> list[tuple[str, int, int, float]]:
    """(op, P, floats, seconds) of the bare MPI calls in ``bench/exchange_bench.py --json``
    files: the allgather of N+1 floats and the allreduce of N floats without the divide."""
    out = []
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        if "rows" not in data:
            continue
        p = int(data["environment"]["P"])
        for row in data["rows"]:
            ms = row["raw_nodiv_ms"] if row["op"] == "allreduce" else row["raw_ms"]
            if ms is not None:
                out.append((row["op"], p, int(row["n"]), ms / 1e3))
    return out


def fit_link(samples: list[tuple[str, int, int, float]], name: str) -> Link:
    """Least-squares alpha and beta of one link from collective timings (ring forms)."""
    rows, times = [], []
    for op, p, n, seconds in samples:
        if op == "allreduce":
            rows.append([2 * (p - 1), 2 * (p - 1) / p * n * FLOAT])
        else:  # allgather of n + 1 floats per rank
            rows.append([p - 1, (p - 1) * (n + 1) * FLOAT])
        times.append(seconds)
    (alpha, beta), *_ = np.linalg.lstsq(np.array(rows), np.array(times), rcond=None)
    return Link(name, max(float(alpha), 0.0), 1.0 / max(float(beta), 1e-15))


SWEEP_METHOD = {"ssgd": "ssgd", "pa": "pa", "slowmo": "slowmo",
                "pso-ps": "pso-allgather"}  # the exchange an explicit sweep run used


def validate(runs: list[dict], link: Link, link_key: str) -> list[str]:
    """Predicted against measured seconds per epoch on ``link_key``: the same run's compute
    comes from its twin on shared memory (same method, ranks, model), its rounds from the
    model; every measured point is shown, with its error."""
    lines = ["| method | ranks | model | measured s/epoch | predicted | error |",
             "|---|---|---|---|---|---|"]
    errors = []
    for r in sorted((r for r in runs if r.get("link") == link_key and "s_per_epoch" in r),
                    key=lambda r: (r["model"], r["ranks"], r["algo"])):
        twins = [t["s_per_epoch"] for t in runs if t.get("link") == "shm"
                 and (t["algo"], t["ranks"], t["model"], t.get("variant")) ==
                 (r["algo"], r["ranks"], r["model"], r.get("variant")) and "s_per_epoch" in t]
        method = SWEEP_METHOD.get(r["algo"])
        if not twins or method is None:
            continue
        method = r.get("exchange_method", method)
        steps = r["steps"] // max(r["epochs_run"], 1)
        rounds = steps if method == "ssgd" else math.ceil(steps / r["sync_every"])
        predicted = statistics.median(twins) + rounds * round_time(method, r["num_params"],
                                                                   r["ranks"], link)
        error = predicted / r["s_per_epoch"] - 1
        errors.append(abs(error))
        lines.append(f"| {r['algo']} | {r['ranks']} | {r['model']} | {r['s_per_epoch']:.3f} "
                     f"| {predicted:.3f} | {error:+.0%} |")
    if errors:
        lines.append(f"\n{len(errors)} points; median |error| {statistics.median(errors):.0%}, "
                     f"largest {max(errors):.0%} (target: within ±25% each).")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    proj = sub.add_parser("project", help="time per epoch for 16-1024 ranks")
    proj.add_argument("--ms-per-mparam", type=float, default=0.2,
                      help="compute ms per step per million parameters (see the README)")
    proj.add_argument("--samples", type=int, default=1_281_167, help="samples per epoch")
    proj.add_argument("--batch", type=int, default=32, help="samples per rank and step")
    proj.add_argument("--sync-every", type=int, default=16)
    fit = sub.add_parser("fit", help="alpha and beta of a link from exchange_bench JSON files")
    fit.add_argument("folder", type=Path)
    val = sub.add_parser("validate", help="predicted against measured epochs on a link")
    val.add_argument("folder", type=Path, help="exchange_bench JSON files of the link")
    val.add_argument("runs", type=Path, help="a sweep's runs.jsonl with shm and link runs")
    val.add_argument("--link", required=True, help="the link's name in the runs, e.g. 1gbit")
    args = parser.parse_args(argv)
    if args.command == "project":
        print("\n".join(project(args.ms_per_mparam, args.samples, args.batch,
                                 args.sync_every)))
        return 0
    link = fit_link(collective_samples(args.folder), str(args.folder))
    print(f"{link.name}: alpha {link.alpha * 1e6:.1f} us, bandwidth "
          f"{link.bandwidth * 8 / 1e9:.3f} Gbit/s")
    if args.command == "validate":
        runs = [json.loads(line) for line in args.runs.read_text().splitlines() if line]
        print("\n".join(validate(runs, link, args.link)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
