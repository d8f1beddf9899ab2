"""A cost model of every algorithm and exchange, fitted on runs measured here, validated
against them, and projected to 16-1024 ranks on 1-400 Gbit/s links.

The round of each algorithm and exchange, on a link of latency alpha and time per byte beta,
is :mod:`psops_mpi.costmodel` (the model ``--exchange auto`` uses at start). Time per epoch =
steps x compute per step + rounds x round.

Usage::

    python bench/scaling_model.py project [--ms-per-mparam 0.2]  # tables, 16-1024 ranks
    python bench/scaling_model.py measure OUT [--links 1gbit,10gbit] [--ranks 2,4,8]
    python bench/scaling_model.py fit OUT/1gbit                 # alpha, beta from its JSON
    python bench/scaling_model.py validate OUT/1gbit RUNS --link 1gbit  # predicted vs measured
    python bench/scaling_model.py hierarchy                     # node-aware vs flat, 256 ranks

On a cluster, ``measure OUT --links here --launcher 'srun --mpi=pmi2 -n'`` inside an
allocation of a few nodes measures its real links, and ``fit OUT/here`` gives their alpha
and beta.

``fit`` reads ``bench/exchange_bench.py --json`` files measured on one link at several rank
counts; ``validate`` reads sweep records (``bench/sweep.py``'s runs.jsonl) of that link.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # jobs, netem

from psops_mpi.costmodel import (
    FLOAT,
    LINKS,
    METHODS,
    Link,
    allgather,
    allgather_forms,
    allreduce,
    allreduce_forms,
    bcast,
    choose_exchange,
    memory_bytes,
    pso_method,
    round_time,
)


def epoch_time(method: str, n_params: int, p: int, link: Link, *, samples: int,
               batch: int, sync_every: int, step_s: float) -> float:
    """Seconds per epoch: every rank's steps plus the rounds (one forced at the epoch's end
    when the period does not divide the steps, as the training loop does)."""
    steps = samples // p // batch
    rounds = steps if method == "ssgd" else math.ceil(steps / sync_every)
    return steps * step_s + rounds * round_time(method, n_params, p, link)


def project(ms_per_mparam: float, samples: int, batch: int, sync_every: int,
            links: dict[str, Link] = LINKS) -> list[str]:
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
        for key, link in links.items():
            for p in (16, 64, 256, 1024):
                times = {m: epoch_time(m, n_params, p, link, samples=samples, batch=batch,
                                       sync_every=sync_every, step_s=step_s) for m in METHODS}
                cells = [f"{t:.3g} s ({times['ssgd'] / t:.2g}×)" for t in times.values()]
                buffer = p * (n_params + 1) * FLOAT / 1e9
                lines.append(f"| {key} | {p} | " + " | ".join(cells) + f" | {buffer:.3g} GB |")
        lines.append("")
    lines += ["Memory per rank beyond the model, its gradient and the local momentum, GB "
              "(`psops_mpi.costmodel.memory_bytes`; the allgather's grows with the ranks):", "",
              "| parameters | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for n_params in (1_000_000, 25_000_000, 100_000_000):
        cells = [f"{memory_bytes(m, n_params, 1024) / 1e9:.3g}"
                 + (" at 1024 ranks" if m == "pso-allgather" else "") for m in METHODS]
        lines.append(f"| {n_params / 1e6:g}M | " + " | ".join(cells) + " |")
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
    return pso_method(choose_exchange(particles, n_params, needs_mean=True), needs_mean=True)


# ---- measuring, fitting and validating

def measure(out: Path, links: list[str], ranks: list[int], sizes: str, repeats: int,
            launcher: list[str]) -> None:
    """Run ``bench/exchange_bench.py`` at each rank count on each link, writing
    ``OUT/<link>/p<P>.json`` (``here``: the links the launcher gives, e.g. srun across
    nodes; a rate such as ``1gbit``: this machine's loopback shaped to it, needs root)."""
    import jobs
    import netem

    emulated = netem.EmulatedLink() if any(netem.is_emulated(k) and k != "here"
                                           for k in links) else None
    if emulated is not None:
        emulated.setup()
    try:
        for key in links:
            folder = out / key
            folder.mkdir(parents=True, exist_ok=True)
            for p in ranks:
                cmd = [*launcher, str(p), sys.executable, str(jobs.REPO / "bench" /
                       "exchange_bench.py"), "--sizes", sizes, "--repeats", str(repeats),
                       "--json", str(folder / f"p{p}.json")]
                if key != "here" and emulated is not None:
                    emulated.set_rate(key)
                    cmd = emulated.wrap(cmd)
                env = {**os.environ, "PYTHONPATH": str(jobs.REPO), "OMP_NUM_THREADS": "1"}
                started = time.monotonic()
                done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                      timeout=1800)
                if done.returncode != 0:
                    raise SystemExit(f"scaling_model: {key} at {p} ranks failed: "
                                     f"{' '.join(done.stderr.split())[-300:]}")
                print(f"{key} p={p}: {time.monotonic() - started:.0f}s -> "
                      f"{folder / f'p{p}.json'}", flush=True)
    finally:
        if emulated is not None:
            emulated.close()



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


def fit_link(samples: list[tuple[str, int, int, float]], name: str,
             shared: bool) -> Link:
    """Least-squares alpha and bandwidth of one link from collective timings, in the forms
    MPICH uses at these sizes (allreduce: Rabenseifner's; allgather: the ring). ``shared``:
    the ranks share one link (the emulated ones), so bytes count over all ranks."""
    rows, times = [], []
    for op, p, n, seconds in samples:
        if op == "allreduce":
            form = allreduce_forms(n * FLOAT, p)[0]
        else:  # allgather of n + 1 floats per rank
            form = allgather_forms((n + 1) * FLOAT, p)[0]
        rows.append([form.messages, form.total_bytes if shared else form.rank_bytes])
        times.append(seconds)
    a, b = np.array(rows), np.array(times)
    (alpha, beta), *_ = np.linalg.lstsq(a, b, rcond=None)
    if alpha < 0:  # no latency to be seen: fit the bandwidth alone
        alpha, (beta,) = 0.0, np.linalg.lstsq(a[:, 1:], b, rcond=None)[0]
    return Link(name, float(alpha), 1.0 / max(float(beta), 1e-15), shared)


def is_shared(link_key: str) -> bool:
    """``measure`` folders: emulated rates are one link for all ranks; ``here`` is not."""
    return link_key != "here"


def fit_errors(samples: list[tuple[str, int, int, float]], link: Link) -> list[str]:
    """Markdown: every timing against the fitted model's."""
    lines = ["| collective | ranks | floats | measured ms | model ms | error |",
             "|---|---|---|---|---|---|"]
    for op, p, n, seconds in sorted(samples, key=lambda s: (s[0], s[1], s[2])):
        model = (allreduce(n * FLOAT, p, link) if op == "allreduce"
                 else allgather((n + 1) * FLOAT, p, link))
        lines.append(f"| {op} | {p} | {n:,} | {seconds * 1e3:.3g} | {model * 1e3:.3g} | "
                     f"{model / seconds - 1:+.0%} |")
    return lines


def run_method(run: dict) -> str | None:
    """The cost model's method of a sweep record (PSO-PS: by the exchange it recorded)."""
    if run["algo"] in ("ssgd", "pa", "slowmo"):
        return run["algo"]
    if run["algo"] != "pso-ps" or run.get("exchange") not in ("allgather", "best"):
        return None
    return pso_method(run["exchange"], needs_mean=run.get("variant", "").startswith("centre"))


def _config(run: dict) -> tuple:
    return (run["algo"], run.get("variant"), run["ranks"], run["model"], run["sync_every"],
            run["epochs"])


def validate(runs: list[dict], link: Link, link_key: str) -> list[str]:
    """Predicted against measured seconds per epoch on ``link_key``. A run's compute is its
    twin's on shared memory (same configuration, time in MPI taken out), its rounds cost
    what the model says; every measured point is shown, with its error."""
    lines = ["| method | ranks | model | measured s/epoch | predicted | error |",
             "|---|---|---|---|---|---|"]
    errors = []
    done = [r for r in runs if "s_per_epoch" in r and r.get("comm_s") is not None]
    for r in sorted((r for r in done if r.get("link") == link_key),
                    key=lambda r: (r["model"], r["ranks"], r["algo"], r.get("variant", ""))):
        twins = [(t["wall_s"] - t["comm_s"]) / t["epochs_run"] for t in done
                 if t.get("link") == "shm" and _config(t) == _config(r)]
        method = run_method(r)
        if not twins or method is None:
            continue
        steps = r["steps"] // max(r["epochs_run"], 1)
        rounds = steps if method == "ssgd" else math.ceil(steps / r["sync_every"])
        predicted = statistics.median(twins) + rounds * round_time(method, r["num_params"],
                                                                   r["ranks"], link)
        error = predicted / r["s_per_epoch"] - 1
        errors.append(abs(error))
        lines.append(f"| {method} | {r['ranks']} | {r['model']} | {r['s_per_epoch']:.3f} "
                     f"| {predicted:.3f} | {error:+.0%} |")
    if errors:
        within = sum(e <= 0.25 for e in errors)
        lines.append(f"\n{len(errors)} points; median |error| {statistics.median(errors):.0%}, "
                     f"largest {max(errors):.0%}; {within} within ±25% (the target).")
    return lines


PROJECT_DEFAULTS = {"ms_per_mparam": 0.2, "samples": 1_281_167, "batch": 32, "sync_every": 16}


def plot_projection(path: Path, n_params: int = 25_000_000) -> None:
    """Speedup over SSGD against ranks, one panel per link, a line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = PROJECT_DEFAULTS
    ranks = [16, 32, 64, 128, 256, 512, 1024]
    fig, axes = plt.subplots(1, len(LINKS), figsize=(3.4 * len(LINKS), 3.4), sharey=True)
    for ax, (key, link) in zip(axes, LINKS.items(), strict=True):
        for method in METHODS[1:]:
            speedup = []
            for p in ranks:
                kw = {"samples": d["samples"], "batch": d["batch"],
                      "sync_every": d["sync_every"],
                      "step_s": d["ms_per_mparam"] * n_params / 1e9}
                speedup.append(epoch_time("ssgd", n_params, p, link, **kw)
                               / epoch_time(method, n_params, p, link, **kw))
            ax.plot(ranks, speedup, marker=".", label=method)
        ax.set(xscale="log", yscale="log", title=key, xlabel="ranks")
    axes[0].set_ylabel(f"speedup over SSGD, {n_params / 1e6:g}M parameters")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def report(out: Path) -> Path:
    """OUT/SCALING.md and OUT/projection.png from ``measure OUT`` and a sweep's
    ``--groups scaling --out OUT``: each link's fit, the validation, the projection and the
    node-aware evaluation."""
    runs_path = out / "runs.jsonl"
    runs = ([json.loads(line) for line in runs_path.read_text().splitlines() if line]
            if runs_path.exists() else [])
    lines = ["# The cost model, fitted, validated and projected", "",
             "Generated by `python bench/scaling_model.py report " + str(out) + "`.", "",
             "## Fit and validation on this machine's emulated links", ""]
    for folder in sorted(f for f in out.iterdir() if f.is_dir()):
        samples = collective_samples(folder)
        if not samples:
            continue
        link = fit_link(samples, folder.name, is_shared(folder.name))
        ranks = sorted({p for _, p, _, _ in samples})
        shared = " shared by all ranks" if link.shared else " per rank"
        lines += [f"### {folder.name}", "",
                  f"Fitted on `bench/exchange_bench.py` at {', '.join(map(str, ranks))} ranks "
                  f"({len(samples)} timings): alpha {link.alpha * 1e6:.1f} us, bandwidth "
                  f"{link.bandwidth * 8 / 1e9:.3f} Gbit/s{shared}.", "",
                  *fit_errors(samples, link), "",
                  "Training on it, time per epoch predicted against measured:", "",
                  *validate(runs, link, folder.name), ""]
    d = PROJECT_DEFAULTS
    plot_projection(out / "projection.png")
    lines += ["## Projection to 16-1024 ranks", "",
              "Assumptions: the links below (latency typical of MPI over that fabric, "
              "bandwidth nominal); one rank per GPU, each with the full link bandwidth; "
              "the MPI library's collectives as modelled in `psops_mpi/costmodel.py`; "
              "compute time per step proportional to the parameters; no overlap of "
              "communication with compute (psops_mpi does not overlap rounds).", "",
              *project(**d), "", "![speedup over SSGD](projection.png)", "",
              "## A node-aware exchange", "", *hierarchy(), ""]
    path = out / "SCALING.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    proj = sub.add_parser("project", help="time per epoch for 16-1024 ranks")
    proj.add_argument("--ms-per-mparam", type=float, default=0.2,
                      help="compute ms per step per million parameters (see docs/performance.md)")
    proj.add_argument("--samples", type=int, default=1_281_167, help="samples per epoch")
    proj.add_argument("--batch", type=int, default=32, help="samples per rank and step")
    proj.add_argument("--sync-every", type=int, default=16)
    proj.add_argument("--link", metavar="ALPHA_US,GBITS", default=None,
                      help="your fabric (from fit): latency in us and Gbit/s per rank, "
                           "projected instead of the four typical links")
    sub.add_parser("hierarchy", help="a node-aware exchange against flat, 256 ranks")
    meas = sub.add_parser("measure", help="exchange_bench at several rank counts per link")
    meas.add_argument("out", type=Path, help="writes OUT/<link>/p<P>.json")
    meas.add_argument("--links", default="1gbit,10gbit",
                      help="comma-separated: 'here' (the launcher's own links) or emulated "
                           "rates such as 1gbit (root)")
    meas.add_argument("--ranks", default="2,4,8", help="comma-separated rank counts")
    meas.add_argument("--sizes", default="1e4,1e5,1e6", help="floats per rank")
    meas.add_argument("--repeats", type=int, default=10, help="timed iterations per size")
    meas.add_argument("--launcher", default="mpiexec -n",
                      help="the command before the rank count, e.g. 'srun --mpi=pmi2 -n'")
    rep = sub.add_parser("report", help="OUT/SCALING.md: fit, validation, projection")
    rep.add_argument("out", type=Path, help="the folder of measure and of the scaling sweep")
    fit = sub.add_parser("fit", help="alpha and beta of a link from exchange_bench JSON files")
    fit.add_argument("folder", type=Path)
    val = sub.add_parser("validate", help="predicted against measured epochs on a link")
    val.add_argument("folder", type=Path, help="exchange_bench JSON files of the link")
    val.add_argument("runs", type=Path, help="a sweep's runs.jsonl with shm and link runs")
    val.add_argument("--link", required=True, help="the link's name in the runs, e.g. 1gbit")
    args = parser.parse_args(argv)
    if args.command == "project":
        links = LINKS
        if args.link:
            alpha_us, rate = (float(v) for v in args.link.split(","))
            links = {"yours": Link("your fabric", alpha_us * 1e-6, rate * 1e9 / 8)}
        print("\n".join(project(args.ms_per_mparam, args.samples, args.batch,
                                 args.sync_every, links)))
        return 0
    if args.command == "hierarchy":
        print("\n".join(hierarchy()))
        return 0
    if args.command == "report":
        print(report(args.out))
        return 0
    if args.command == "measure":
        measure(args.out, args.links.split(","), [int(p) for p in args.ranks.split(",")],
                args.sizes, args.repeats, args.launcher.split())
        return 0
    link = fit_link(collective_samples(args.folder), args.folder.name,
                    is_shared(args.folder.name))
    print(f"{link.name}: alpha {link.alpha * 1e6:.1f} us, bandwidth "
          f"{link.bandwidth * 8 / 1e9:.3f} Gbit/s")
    if args.command == "validate":
        runs = [json.loads(line) for line in args.runs.read_text().splitlines() if line]
        print("\n".join(validate(runs, link, args.link)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
