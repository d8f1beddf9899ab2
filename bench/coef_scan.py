"""Scan PSO-PS coefficients (w, c1, c2) on MNIST-1D beside SSGD and PA; the evidence for the
defaults in ``psops_mpi/config.py``.

What it measures: final test accuracy of the default training run (cnn1d on mnist1d, 60 epochs,
batch 32 per rank, SGD lr 0.1 momentum 0.9, cosine schedule, --sync-every 8) for each
coefficient triple and seed, plus SSGD and PA on the same run, at the given rank counts.
Each run is one ``mpiexec -n P python -m psops_mpi.train`` launch, so this script itself is
not started under MPI:

    python bench/coef_scan.py --ranks 2,4 --seeds 0,1,2 --out bench/results/coef_scan.md
    python bench/coef_scan.py --variants --ranks 2,4 --out bench/results/pso_variants.md

``--variants`` keeps the default coefficients and changes one PSO-PS option at a time
(momentum reset, holdout fitness, all-time global best, best-only exchange).

Takes about 10 s per run on a 2-core machine (a full default scan: ~30 runs, ~6 minutes).
Prints a table of mean and min/max accuracy over seeds per setting; ``--out`` saves it with
the command, date and versions.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobs

DEFAULT_TRIPLES = "0,0,1;0.5,0,1;0.5,0.2,1;0.2,0.2,1.2;0,0.5,1.5;0.5,0.5,1;0.729,1.49,1.49"
COMMON = ["--epochs", "60", "--lr", "0.1", "--sync-every", "8", "--quiet"]


def run_one(ranks: int, args: list[str], seed: int, timeout: float) -> float | None:
    """One training launch; its final test accuracy (None if it failed)."""
    job = jobs.run_job([*COMMON, *args, "--seed", str(seed)], ranks, timeout=timeout)
    if job.final is None:
        print(f"  failed: {jobs.shown(job.cmd)}: {job.error}", file=sys.stderr)
        return None
    return job.final["test_acc"]


VARIANTS = {
    "pso-ps defaults": [],
    "pso-ps --reset-momentum": ["--reset-momentum"],
    "pso-ps --fitness holdout": ["--fitness", "holdout"],
    "pso-ps --gbest-memory all": ["--gbest-memory", "all"],
    "pso-ps --exchange best": ["--exchange", "best"],
}


def settings(triples: str, variants: bool) -> list[tuple[str, list[str]]]:
    out = [("ssgd", ["--algo", "ssgd"]), ("pa", ["--algo", "pa"])]
    if variants:  # the default coefficients with one option changed at a time
        return out + [(name, ["--algo", "pso-ps", *extra]) for name, extra in VARIANTS.items()]
    for triple in triples.split(";"):
        w, c1, c2 = triple.split(",")
        out.append((f"pso-ps w={w} c1={c1} c2={c2}",
                    ["--algo", "pso-ps", "--w", w, "--c1", c1, "--c2", c2]))
    return out


def row(name: str, ranks: int, accs: list[float | None]) -> str:
    ok = [a for a in accs if a is not None]
    if not ok:
        return f"| {ranks} | {name} | failed | | {len(accs)} |"
    return (f"| {ranks} | {name} | {statistics.mean(ok):.4f} | {min(ok):.4f} – {max(ok):.4f} "
            f"| {len(ok)}/{len(accs)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", default="2,4", help="comma-separated rank counts")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--triples", default=DEFAULT_TRIPLES, help="'w,c1,c2;w,c1,c2;...'")
    parser.add_argument("--variants", action="store_true",
                        help="scan the PSO-PS options at the default coefficients instead")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per run")
    parser.add_argument("--out", help="write the table (markdown) here")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = ["| ranks | setting | mean test acc | min – max | runs |", "|---|---|---|---|---|"]
    for ranks in (int(r) for r in args.ranks.split(",")):
        for name, extra in settings(args.triples, args.variants):
            accs = [run_one(ranks, extra, seed, args.timeout) for seed in seeds]
            lines.append(row(name, ranks, accs))
            print(lines[-1], flush=True)
    if args.out:
        title = "options" if args.variants else "coefficient"
        header = (f"# PSO-PS {title} scan on MNIST-1D\n\nMeasured {datetime.date.today()} "
                  f"with `python bench/coef_scan.py {' '.join(sys.argv[1:])}`; every run: "
                  f"`{' '.join(COMMON)}` (cnn1d, batch 32 per rank), seeds {args.seeds}. "
                  "A run that crashed counts as failed; one that diverged stays in with its "
                  "chance-level accuracy (about 0.10).\n\n")
        Path(args.out).write_text(header + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
