"""Against another checkout: the same short runs in this checkout and in ``OTHER`` (an
earlier release, a commit before a refactoring), compared by the bytes of every rank's final
weights and synchroniser state; with ``--time R``, also the time per epoch of the blocking
rounds, side by side.

The runs cover every algorithm and PSO-PS preset and both exchanges, blocking, at 2 to 4
ranks (2 epochs of MNIST-1D's default CNN each). A setting added since ``OTHER`` is not
among them: this pins what both checkouts run. Prints one line per run and exits 1 if any
differs. ``--time R`` then runs PA, SlowMo and the PSO-PS default on mlp-wide (4 ranks,
``--sync-every 16``, 6 epochs) R times in each checkout, alternating, and prints the median
ratio of seconds per epoch (this checkout's / the other's) and its range::

    git clone . /tmp/before && git -C /tmp/before checkout v0.2.0
    python bench/identity_check.py /tmp/before --time 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobs

REPO = jobs.REPO
RUNS: list[tuple[int, list[str]]] = [
    (2, ["--algo", "pa", "--sync-every", "4"]),
    (4, ["--algo", "pa", "--sync-every", "8"]),
    (2, ["--algo", "slowmo", "--sync-every", "4"]),
    (4, ["--algo", "slowmo", "--outer-nesterov", "--outer-lr", "0.7", "--outer-momentum",
         "0.9"]),
    (4, ["--pso-preset", "centre", "--exchange", "allgather"]),
    (4, ["--pso-preset", "centre", "--exchange", "best"]),
    (4, ["--pso-preset", "elastic"]),
    (4, ["--pso-preset", "search"]),
    (4, ["--pso-preset", "paper", "--exchange", "allgather"]),
    (3, ["--pso-preset", "paper", "--exchange", "best", "--c3", "0.5"]),
    (2, ["--algo", "ssgd"]),
]


def train(checkout: Path, ranks: int, flags: list[str], folder: Path) -> None:
    cmd = [*jobs.mpiexec_prefix(), str(ranks), sys.executable, "-m", "psops_mpi.train",
           "--epochs", "2", "--quiet", "--threads", "1", "--checkpoint-dir", str(folder),
           *flags]
    subprocess.run(cmd, cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout),
                                           "OMP_NUM_THREADS": "1"},
                   stdin=subprocess.DEVNULL, capture_output=True, timeout=600, check=True)


TIMED = {"pa": ["--algo", "pa"], "slowmo": ["--algo", "slowmo"], "pso-ps": []}


def seconds_per_epoch(checkout: Path, flags: list[str], folder: Path) -> float:
    metrics = folder / "m.jsonl"
    train(checkout, 4, ["--model", "mlp-wide", "--epochs", "6", "--sync-every", "16",
                        "--metrics-out", str(metrics), *flags], folder)
    final = json.loads(metrics.read_text().splitlines()[-1])
    return final["wall_s"] / 6


def arrays(folder: Path) -> dict[str, bytes]:
    """Every rank's weights and synchroniser arrays in the run's final checkpoint."""
    final = sorted(folder.glob("step-*"))[-1]
    out: dict[str, bytes] = {}
    for shard in sorted(final.glob("rank-*.h5")):
        with h5py.File(shard, "r") as fh:
            def keep(name: str, obj: object, rank: str = shard.stem) -> None:
                if isinstance(obj, h5py.Dataset) and name.startswith(("model/", "sync/")):
                    out[f"{rank}:{name}"] = np.asarray(obj[()]).tobytes()
            fh.visititems(keep)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("other", type=Path, help="the other checkout")
    p.add_argument("--time", type=int, default=0, metavar="R",
                   help="also time the blocking rounds, R runs each")
    args = p.parse_args(argv)
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, (ranks, flags) in enumerate(RUNS):
            mine, theirs = Path(tmp) / f"mine{i}", Path(tmp) / f"theirs{i}"
            train(REPO, ranks, flags, mine)
            train(args.other, ranks, flags, theirs)
            a, b = arrays(mine), arrays(theirs)
            changed = sorted(k for k in b if a.get(k) != b[k])
            differ += bool(changed)
            print(f"{ranks} ranks {' '.join(flags)}: "
                  + ("identical" if not changed else f"DIFFERENT: {', '.join(changed[:4])}"),
                  flush=True)
        for name, flags in TIMED.items() if args.time else ():
            ratios = []
            for i in range(args.time):
                mine = seconds_per_epoch(REPO, flags, Path(tmp) / f"t{name}{i}a")
                theirs = seconds_per_epoch(args.other, flags, Path(tmp) / f"t{name}{i}b")
                ratios.append(mine / theirs)
            print(f"{name}: s/epoch this / other, median {statistics.median(ratios):.3f} "
                  f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(ratios)} pairs)",
                  flush=True)
    return 1 if differ else 0


if __name__ == "__main__":
    raise SystemExit(main())
