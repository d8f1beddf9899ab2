"""The swarm's own grid (``bench/sweep.py --groups search``): PA, SlowMo, the PSO-PS default,
PSO-PS searching the learning rate and the elastic swarm, 8 ranks, ``--sync-every 16``, from
four starting learning rates, seeds paired. Writes the report (Markdown, to stdout) and the
plot of the searched learning rates beside it::

    python bench/search_report.py bench/results/search > bench/results/search/REPORT.md

Each cell is the median final test accuracy over seeds with its range; a run that stopped
(every particle diverged) or ended at chance counts at chance, and is counted. The targets of
the grid are checked against the same numbers; "the spread" of a cell is SlowMo's range over
seeds there (max - min), the yardstick a single run would have to beat.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

CHANCE = 0.1
QUIET_LOAD = 10.0  # 8 ranks on 2 cores: a load average above this had other work beside it
QUIET_RUNS = 3  # a method timed alone fewer times than this gets no figure
LRS = ("0.01", "0.03", "0.1", "0.3")
# (label in the report, method key of bench/sweep.py's records)
METHODS = (("PA", "pa"), ("SlowMo", "slowmo"), ("PSO-PS default (centre)", "pso-ps[centre]"),
           ("PSO-PS lr search", "pso-ps[search]"),
           ("lr search, holdout of 1,024", "pso-ps[search, holdout 1024]"),
           ("lr search, before the warmup hold", "pso-ps[search, no hold]"),
           ("elastic rho=0.5", "pso-ps[elastic]"),
           ("elastic rho=0.25", "pso-ps[elastic rho=0.25]"))
DATASETS = (("mnist1d", "MNIST-1D, cnn1d, 60 epochs"),
            ("fashion-mnist", "Fashion-MNIST, LeNet, 10 epochs"))
Cell = dict[int, dict]  # seed -> run record


# The search's runs under its earlier rules, kept beside the grid for the comparison: the
# same commands. First (psops_mpi 0.2.0 as first measured) it did not wait out the warmup;
# then its holdout batch held 1,024 samples, whatever a round trained on.
EARLIER = (("runs-search-no-hold.jsonl", ", no hold"),
           ("runs-search-holdout-1024.jsonl", ", holdout 1024"))


def load(folder: Path) -> dict[tuple[str, str, str], Cell]:
    """(dataset, method key, starting lr) -> {seed: record} of the grid's finished runs."""
    out: dict[tuple[str, str, str], Cell] = {}
    for name, suffix in (("runs.jsonl", ""), *EARLIER):
        path = folder / name
        for line in path.read_text().splitlines() if path.exists() else []:
            r = json.loads(line)
            if r.get("group") != "search":
                continue
            flags = r.get("flags") or []
            lr = flags[flags.index("--lr") + 1]
            method = r["algo"] + (f"[{r['variant']}{suffix}]" if r.get("variant") else "")
            out.setdefault((r["dataset"], method, lr), {})[r["seed"]] = r
    return out


def acc(record: dict, key: str = "test_acc") -> float:
    """The run's accuracy; a run that stopped counts at chance."""
    value = record.get(key)
    return CHANCE if value is None or record.get("rc") not in (0, None) else float(value)


def failed(record: dict) -> bool:
    return record.get("test_acc") is None or bool(record.get("diverged")) or \
        acc(record) <= CHANCE + 1e-9


def med(cell: Cell, key: str = "test_acc") -> float:
    return statistics.median(acc(r, key) for r in cell.values())


def spread(cell: Cell) -> float:
    values = [acc(r) for r in cell.values()]
    return max(values) - min(values)


def shown(cell: Cell | None, key: str = "test_acc") -> str:
    if not cell or any(r.get(key) is None and not failed(r) for r in cell.values()):
        return "-"
    values = [acc(r, key) for r in cell.values()]
    fails = sum(failed(r) for r in cell.values())
    note = f", {fails} failed" if fails else ""
    return (f"{statistics.median(values):.4f} ({min(values):.3f}-{max(values):.3f}, "
            f"n={len(values)}{note})")


def table(grid: dict, dataset: str, key: str = "test_acc") -> list[str]:
    lines = ["| method | " + " | ".join(f"lr {lr}" for lr in LRS) + " |",
             "|---|" + "---|" * len(LRS)]
    for label, method in METHODS:
        cells = [shown(grid.get((dataset, method, lr)), key) for lr in LRS]
        if all(c == "-" for c in cells):  # not run (yet) on this dataset
            continue
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def paired(grid: dict, dataset: str, method: str, lr: str) -> tuple[float, float] | None:
    """(median over seeds of method - SlowMo at the same seed and lr, SlowMo's spread)."""
    ours, slowmo = grid.get((dataset, method, lr)), grid.get((dataset, "slowmo", lr))
    if not ours or not slowmo:
        return None
    seeds = sorted(set(ours) & set(slowmo))
    if not seeds:
        return None
    diffs = [acc(ours[s]) - acc(slowmo[s]) for s in seeds]
    return statistics.median(diffs), spread(slowmo)


def targets(grid: dict, dataset: str) -> list[str]:
    slowmo = {lr: grid[(dataset, "slowmo", lr)] for lr in LRS if (dataset, "slowmo", lr) in grid}
    if not slowmo:
        return ["(no SlowMo runs yet)"]
    best_lr = max(slowmo, key=lambda lr: med(slowmo[lr]))
    best = med(slowmo[best_lr])
    lines = [f"SlowMo's best starting learning rate: {best_lr} (median {best:.4f}).", "",
             "| start lr | lr search: median | within 1 point of SlowMo's best? | "
             "search - SlowMo, same lr and seed (median) | SlowMo's spread | above by more "
             "than the spread? | default - SlowMo (median) | default beyond the spread |",
             "|---|---|---|---|---|---|---|---|"]
    above = below = cells = 0
    for lr in LRS:
        search = grid.get((dataset, "pso-ps[search]", lr))
        s_pair = paired(grid, dataset, "pso-ps[search]", lr)
        d_pair = paired(grid, dataset, "pso-ps[centre]", lr)
        if search is None or s_pair is None or d_pair is None:
            lines.append(f"| {lr} | (not run yet) | | | | | | |")
            continue
        within = med(search) >= best - 0.01
        s_diff, s_spread = s_pair
        d_diff, d_spread = d_pair
        beyond = ("above" if d_diff > d_spread else "below" if d_diff < -d_spread else "level")
        cells += 1
        above += beyond == "above"
        below += beyond == "below"
        lines.append(f"| {lr} | {med(search):.4f} | {'yes' if within else 'no'} | "
                     f"{s_diff:+.4f} | {s_spread:.4f} | {'yes' if s_diff > s_spread else 'no'} "
                     f"| {d_diff:+.4f} | {beyond} |")
    lines += ["", f"The default above SlowMo by more than the spread in {above} of {cells} "
                  f"cell(s), below it in {below} (target: at least a third above, none below)."]
    return lines


def times(grid: dict, dataset: str) -> str:
    """The cost in time: each method's median training time per run, against SlowMo's, over
    the runs that had the machine to themselves (load average at their start at most
    ``QUIET_LOAD``: the run before them, nothing else)."""
    walls = {label: [r["wall_s"] for (d, m, _), cell in grid.items() if d == dataset and m == key
                     for r in cell.values()
                     if r.get("wall_s") and r.get("load_avg", 0) <= QUIET_LOAD]
             for label, key in METHODS}
    base = statistics.median(walls["SlowMo"]) if walls.get("SlowMo") else None
    shown = [f"{label} {statistics.median(w):.0f} s"
             + (f" ({statistics.median(w) / base:.2f}x)" if base else "")
             for label, w in walls.items() if len(w) >= QUIET_RUNS]
    return ("Training time per run, median over the runs that had the machine to "
            f"themselves (load average at their start at most {QUIET_LOAD}: 8 ranks on 2 cores; "
            f"a method with fewer than {QUIET_RUNS} such runs is left out): "
            + "; ".join(shown) + ". The search's extra time is its holdout batch, evaluated by "
            "every particle at every round: as many samples as a particle trains on between "
            "rounds (512 here), 1,024 under the earlier rules. Its extra bytes are P scalars "
            "a round.")


def plot(grid: dict, out: Path) -> bool:
    """Each particle's learning rate (start x multiplier) per epoch, seed 0, one panel per
    dataset and starting rate; the swarm's geometric mean for every seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = {(d, lr): cell for (d, m, lr), cell in grid.items() if m == "pso-ps[search]"}
    datasets = [d for d, _ in DATASETS if any(k[0] == d for k in runs)]
    if not datasets:
        return False
    fig, axes = plt.subplots(len(datasets), len(LRS), squeeze=False, sharey=True,
                             figsize=(3.2 * len(LRS), 2.8 * len(datasets)))
    for row, dataset in enumerate(datasets):
        for col, lr in enumerate(LRS):
            ax = axes[row][col]
            ax.set_title(f"{dataset}, start lr {lr}", fontsize=9)
            ax.set_yscale("log")
            for seed, record in sorted(runs.get((dataset, lr), {}).items()):
                traj = record.get("lr_mults") or []
                if not traj:
                    continue
                epochs = [e for e, _ in traj]
                if seed == min(runs[(dataset, lr)]):
                    for k in range(len(traj[0][1])):
                        ax.plot(epochs, [float(lr) * m[k] for _, m in traj], color="0.75",
                                lw=0.6)
                gmean = [float(lr) * statistics.geometric_mean(m) for _, m in traj]
                ax.plot(epochs, gmean, lw=1.2, label=f"seed {seed}")
            ax.set_xlabel("epoch", fontsize=8)
        axes[row][0].set_ylabel("learning rate (peak of schedule)", fontsize=8)
    axes[0][-1].legend(fontsize=6)
    fig.suptitle("PSO-PS searching the learning rate: grey, each particle (first seed); "
                 "colours, the swarm's geometric mean per seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return True


def main() -> None:
    folder = Path(sys.argv[1])
    grid = load(folder)
    has_plot = plot(grid, folder / "lr_search.png")
    seeds = sorted({s for cell in grid.values() for s in cell})
    print("# The swarm's own grid: learning-rate search and the elastic swarm\n")
    print("Generated by `python bench/search_report.py bench/results/search` from the runs of")
    print("`python bench/sweep.py --groups search --datasets D --algos pa,slowmo,pso,pso-search,"
          "elastic,elastic-0.25 --seeds S --flags=--ensemble-eval --out bench/results/search "
          "--resume`")
    print(f"(8 ranks sharing 2 cores, `--sync-every 16`, seeds {seeds}, the same seeds for "
          "every method; the recipe's defaults otherwise, warmup included).\n")
    for dataset, title in DATASETS:
        if not any(k[0] == dataset for k in grid):
            print(f"## {title}\n\nNot run yet.\n")
            continue
        print(f"## {title}\n")
        print("Final test accuracy, median over seeds (range, runs; failed: ended at chance "
              "or stopped with every particle diverged, counted at chance).\n")
        print("\n".join(table(grid, dataset)) + "\n")
        print("The ensemble of the 8 final particles (predictions averaged): the ceiling of any "
              "merge of them.\n")
        print("\n".join(table(grid, dataset, "ensemble_acc")) + "\n")
        print(times(grid, dataset) + "\n")
        print("### The targets\n")
        print("\n".join(targets(grid, dataset)) + "\n")
    if has_plot:
        print("![the searched learning rates](lr_search.png)\n")


if __name__ == "__main__":
    main()
