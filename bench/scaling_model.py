"""A cost model of every algorithm and exchange, fitted on runs measured here, validated
against them, and projected to 16-1024 ranks on 1-400 Gbit/s links.

The round of each algorithm and exchange, on a link of latency alpha and time per byte beta,
is :mod:`psops_mpi.costmodel` (the model ``--exchange auto`` uses at start). Time per epoch =
steps x compute per step + rounds x round.

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
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from psops_mpi.costmodel import (
    FLOAT,
    LINKS,
    METHODS,
    Link,
    allreduce,
    bcast,
    choose_exchange,
    log2_ceil,
    round_time,
)


def epoch_time(method: str, n_params: int, p: int, link: Link, *, samples: int,
               batch: int, sync_every: int, step_s: float) -> float:
    """Seconds per epoch: every rank's steps plus the rounds (one forced at the epoch's end
    when the period does not divide the steps, as the training loop does)."""
    steps = samples // p // batch
    rounds = steps if method == "ssgd" else math.ceil(steps / sync_every)
    return steps * step_s + rounds * round_time(method, n_params, p, link)


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


# ---- a node-aware exchange, evaluated

# Within a node: NVLink-class GPU links (per-GPU bandwidth of an NVLink 3/4 node, 150 GB/s
# each way, a few us per message).
NODE_LINK = Link("NVLink within a node", 3e-6, 150e9)


def hierarchical_round(method: str, n_params: int, p: int, per_node: int, link: Link,
                       node_link: Link = NODE_LINK) -> float:
    """One round where each node's ranks first average over the node's own link (a reduce
    to the node's leader, counted as an allreduce), the ``p / per_node`` leaders run
    ``method`` between the nodes, and each leader broadcasts the result to its node: what
    PyTorch's HierarchicalModelAverager does for PA. For PSO-PS a node becomes one particle."""
    n = n_params * FLOAT
    inside = allreduce(n, per_node, node_link) + bcast(n, per_node, node_link)
    return inside + round_time(method, n_params, p // per_node, link)


def hierarchy(p: int = 256, link_key: str = "100gbit", per_node: int = 8,
              ms_per_mparam: float = 0.2, sync_every: int = 16) -> list[str]:
    """Markdown: each algorithm's round and period (``sync_every`` steps of compute and one
    round) flat and node-aware. Flat puts every rank on the inter-node link, which favours
    the hierarchy (a flat job's ranks of one node also talk over NVLink). It assumes a
    node's network link carries no more than one rank's bytes: one NIC per GPU, or ring and
    scatter-allgather collectives over ranks placed node by node, whose ring enters and
    leaves each node once."""
    link = LINKS[link_key]
    lines = [f"{p} ranks, {per_node} per node ({p // per_node} nodes), {link.name} between "
             f"nodes, {NODE_LINK.name} ({NODE_LINK.bandwidth / 1e9:g} GB/s, "
             f"{NODE_LINK.alpha * 1e6:g} us) inside; compute {ms_per_mparam:g} ms per step per "
             f"million parameters; a period is `--sync-every {sync_every}` steps and a round "
             "(SSGD: one step and its allreduce). PSO-PS: the default rule, each side with the "
             "exchange auto picks for its swarm (P particles flat, one per node node-aware).",
             "", "| parameters | algorithm | round flat, ms | node-aware, ms | period flat / "
             "node-aware |", "|---|---|---|---|---|"]
    for n_params in (1_000_000, 25_000_000, 100_000_000):
        step = ms_per_mparam * n_params / 1e9
        for name in ("ssgd", "pa", "slowmo", "pso"):
            flat_method = tree_method = name
            if name == "pso":
                flat_method = _pso_method(p, n_params)
                tree_method = _pso_method(p // per_node, n_params)
            flat = round_time(flat_method, n_params, p, link)
            tree = hierarchical_round(tree_method, n_params, p, per_node, link)
            steps = 1 if name == "ssgd" else sync_every
            label = f"PSO-PS ({flat_method[4:]} / {tree_method[4:]})" if name == "pso" else name
            gain = (steps * step + flat) / (steps * step + tree)
            lines.append(f"| {n_params / 1e6:g}M | {label} | {flat * 1e3:.3g} | "
                         f"{tree * 1e3:.3g} | {gain:.2f}× |")
    return lines


def _pso_method(particles: int, n_params: int) -> str:
    """The default rule's round with the exchange auto picks for ``particles``."""
    exchange = choose_exchange(particles, n_params, needs_mean=True)
    return "pso-allgather" if exchange == "allgather" else "pso-best-mean"


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
    """Least-squares alpha and beta of one link from collective timings, in the forms the
    model takes for these sizes (allreduce: Rabenseifner's; allgather: ring)."""
    rows, times = [], []
    for op, p, n, seconds in samples:
        if op == "allreduce":
            rows.append([2 * log2_ceil(p), 2 * (p - 1) / p * n * FLOAT])
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
    sub.add_parser("hierarchy", help="a node-aware exchange against flat, 256 ranks")
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
    if args.command == "hierarchy":
        print("\n".join(hierarchy()))
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
