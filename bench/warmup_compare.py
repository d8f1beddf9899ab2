"""Fashion-MNIST's LeNet cells where runs stopped learning, with and without a warmup, side
by side: final test accuracy per seed, and the runs that stayed at chance (accuracy 0.1) or
diverged (no final line, or a non-finite training loss).

    python bench/warmup_compare.py bench/results/raw bench/results/warmup > \\
        bench/results/warmup/REPORT.md

The first folder holds the runs without a warmup (``bench/sweep.py --groups accuracy``), the
second those of ``bench/sweep.py --cells 4/64,8/16 --flags "--warmup-steps 200"``.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

CELLS = ((4, 64), (8, 16))
CHANCE = 0.1


def runs(folder: Path) -> dict[tuple[int, str, int], dict[int, float | None]]:
    """(ranks, method, sync period) -> {seed: final test accuracy, None if it diverged}."""
    out: dict[tuple[int, str, int], dict[int, float | None]] = {}
    for line in (folder / "runs.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("dataset") != "fashion-mnist" or r.get("group") != "accuracy":
            continue
        cell = (r["ranks"], r["sync_every"])
        if cell not in CELLS and not (r["algo"] == "ssgd" and r["ranks"] in dict(CELLS)):
            continue
        method = r["algo"] + (f"[{r['variant']}]" if r.get("variant") else "")
        diverged = r.get("test_acc") is None or r.get("diverged")
        out.setdefault((r["ranks"], method, r["sync_every"]), {})[r["seed"]] = (
            None if diverged else r["test_acc"])
    return out


def shown(accs: dict[int, float | None]) -> str:
    return ", ".join("diverged" if a is None else f"{a:.4f}" for _, a in sorted(accs.items()))


def failures(accs: dict[int, float | None]) -> int:
    return sum(a is None or a <= CHANCE + 1e-9 for a in accs.values())


def main() -> None:
    before, after = runs(Path(sys.argv[1])), runs(Path(sys.argv[2]))
    print("| ranks / --sync-every | method | no warmup: test acc per seed | --warmup-steps 200 "
          "| median change | failed runs (before -> after) |")
    print("|---|---|---|---|---|---|")
    for key in sorted(after):
        ranks, method, sync = key
        old, new = before.get(key, {}), after[key]
        good_old = [a for a in old.values() if a is not None and a > CHANCE]
        good_new = [a for a in new.values() if a is not None and a > CHANCE]
        change = (f"{statistics.median(good_new) - statistics.median(good_old):+.4f}"
                  if good_old and good_new else "")
        cell = f"{ranks} / {'every step' if method == 'ssgd' else sync}"
        print(f"| {cell} | {method} | {shown(old)} | {shown(new)} | {change} | "
              f"{failures(old)} -> {failures(new)} |")
    print(f"\nFailed runs in these cells: {sum(failures(v) for v in before.values())} of "
          f"{sum(len(v) for v in before.values())} without a warmup, "
          f"{sum(failures(v) for v in after.values())} of {sum(len(v) for v in after.values())}"
          " with it. Median change: over the runs that learned in both.")


if __name__ == "__main__":
    main()
