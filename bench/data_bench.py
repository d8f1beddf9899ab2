"""The DataLoader path against the in-memory path: the same Fashion-MNIST training, side by
side in one run.

* ``memory``: ``--dataset fashion-mnist``, the built-in set held whole on the device (the
  fast path);
* ``loader/W``: ``--dataset examples.own_data:fashion_shards``, the same images and labels as
  ``.npy`` shards on disk, memory-mapped and read per batch by a DataLoader with W worker
  processes per rank (``--data-workers W``), pinned memory and copies that do not block on a
  GPU.

Both train the same model from the same seed on the same data order (the loader path reads
exactly the in-memory path's batches, so the accuracies agree to the bit on the CPU: a check
of the path, printed). Each case is one ``mpiexec`` launch of ``python -m psops_mpi.train``;
throughput is steady state, from the end of the first epoch to the end of the last (the
first holds the workers' start), evaluation included; ``ratio`` = loader / memory in the
same repeat, and the figure is the median over ``--repeats``, the cases' order alternating.

    python bench/data_bench.py --json bench/results/data/loader_cpu.json
    python bench/data_bench.py --ranks 1 --workers 0,2,4 --model resnet20 ...   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from examples.own_data import write  # noqa: E402 - the repository's root is on the path now


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--workers", default="0,1,2", help="DataLoader workers per rank, each a case")
    p.add_argument("--model", default="lenet")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--fashion-dir", default="/usr/share/datasets/fashion-mnist",
                   help="Fashion-MNIST's four .gz files (Debian's dataset-fashion-mnist)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    p.add_argument("--json", metavar="PATH", help="also write the results")
    return p.parse_args(argv)


def launch(args: argparse.Namespace, case: str, shards: Path, out: Path) -> dict[str, Any]:
    """One training run; its steady-state samples/s and final test accuracy."""
    flags = ["--dataset", "fashion-mnist", "--data-dir", args.fashion_dir]
    if case != "memory":
        flags = ["--dataset", "examples.own_data:fashion_shards", "--data-dir", str(shards),
                 "--data-workers", case.split("/")[1]]
    metrics = out / f"{case.replace('/', '-')}.jsonl"
    metrics.unlink(missing_ok=True)
    cmd = ["mpiexec", "-n", str(args.ranks), sys.executable, "-m", "psops_mpi.train", *flags,
           "--model", args.model, "--batch-size", str(args.batch_size), "--epochs",
           str(args.epochs), "--device", args.device, "--quiet", "--metrics-out", str(metrics)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=args.timeout)
    if res.returncode != 0:
        raise SystemExit(f"{case} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch"]
    first, last = epochs[0], epochs[-1]
    samples = (last["step"] - first["step"]) * args.batch_size * args.ranks
    return {"samples_per_s": samples / (last["wall_s"] - first["wall_s"]),
            "test_acc": events[-1]["test_acc"]}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cases = ["memory", *(f"loader/{w}" for w in args.workers.split(","))]
    repeats: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = Path(tmp) / "fashion-npy"
        write(str(shards), args.fashion_dir)
        for repeat in range(args.repeats):
            order = cases if repeat % 2 == 0 else cases[::-1]
            row = {case: launch(args, case, shards, Path(tmp)) for case in order}
            repeats.append(row)
            print(f"repeat {repeat}: " + "  ".join(
                f"{c} {row[c]['samples_per_s']:.0f}/s acc {row[c]['test_acc']:.4f}"
                for c in cases), flush=True)
    summary = summarise(cases, repeats)
    print(f"\nmedian samples/s over {args.repeats} repeats ({args.ranks} rank(s), "
          f"{args.model}, batch {args.batch_size} per rank, {args.device})")
    for case in cases:
        s = summary[case]
        ratio = "" if case == "memory" else (
            f"  loader/memory {s['ratio']:.3f} ({s['ratio_range'][0]:.3f}-"
            f"{s['ratio_range'][1]:.3f})")
        print(f"{case:>10} {s['samples_per_s']:9.0f}{ratio}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "settings": vars(args), "date": dt.date.today().isoformat(),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
            "repeats": repeats, "summary": summary}, indent=1) + "\n")


def summarise(cases: list[str], repeats: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case in cases:
        rates = [r[case]["samples_per_s"] for r in repeats]
        row: dict[str, Any] = {"samples_per_s": statistics.median(rates)}
        if case != "memory":
            ratios = [r[case]["samples_per_s"] / r["memory"]["samples_per_s"] for r in repeats]
            row |= {"ratio": statistics.median(ratios), "ratio_range": [min(ratios),
                                                                        max(ratios)]}
        row["same_accuracy"] = all(r[case]["test_acc"] == r["memory"]["test_acc"]
                                   for r in repeats)
        out[case] = row
    return out


if __name__ == "__main__":
    main()
