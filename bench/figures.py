"""The report's PNG plots, from the runs of a sweep (see report.py for the definitions)."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from runs import (
    ALGO_LABEL,
    COLORS,
    Run,
    link_keys,
    select,
    setting,
    speedup,
    target_of,
    ttt,
)


def _save(fig, axes, ylabel: str, path: Path) -> bool:
    """Label, lay out and write one figure of panels; True: a plot was written."""
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_acc_vs_sync(runs: list[Run], path: Path) -> bool:
    acc = [r for r in runs if r["group"] == "accuracy"]
    panels = sorted({(r["dataset"], r["model"], r["ranks"]) for r in acc})
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.6), squeeze=False)
    for ax, (dataset, model, ranks) in zip(axes[0], panels, strict=True):
        here = select(acc, dataset=dataset, ranks=ranks)
        for algo in ("pa", "pso-ps"):
            periods = sorted({r["sync_every"] for r in select(here, algo=algo)})
            stats = [[r["test_acc"] for r in select(here, algo=algo, sync_every=n)]
                     for n in periods]
            means = [statistics.mean(s) for s in stats]
            err = [[m - min(s) for m, s in zip(means, stats, strict=True)],
                   [max(s) - m for m, s in zip(means, stats, strict=True)]]
            ax.errorbar(periods, means, yerr=err, marker="o", capsize=3, color=COLORS[algo],
                        label=ALGO_LABEL[algo])
        for algo, style in (("ssgd", "--"), ("ddp", ":")):
            group = select(here, algo=algo)
            if group:
                ax.axhline(statistics.mean(r["test_acc"] for r in group), ls=style,
                           color=COLORS[algo], label=ALGO_LABEL[algo])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("--sync-every (steps)")
        ax.set_title(f"{dataset} ({model}), {ranks} ranks", fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, axes, "final test accuracy (mean, min–max over seeds)", path)


def plot_speedup_vs_link(runs: list[Run], path: Path) -> bool:
    setups = sorted({k[1:] for k in link_keys(runs)}, key=lambda s: (s[1], s[0]))
    if not setups:
        return False
    fig, axes = plt.subplots(1, len(setups), figsize=(4 * len(setups), 3.6), squeeze=False)
    algos = ("ddp", "pa", "pso-ps")
    for ax, (dataset, model, ranks) in zip(axes[0], setups, strict=True):
        links = [k[0] for k in link_keys(runs) if k[1:] == (dataset, model, ranks)]
        for i, algo in enumerate(algos):
            values = []
            for link in links:
                key = (link, dataset, model, ranks)
                target = target_of(runs, key)
                base, _, _ = ttt([r for r in runs if setting(r) == key and r["algo"] == "ssgd"],
                                 target)
                group = [r for r in runs if setting(r) == key and r["algo"] == algo
                         and not r.get("variant") and (algo == "ddp" or r["sync_every"] == 16)]
                values.append(speedup(base, ttt(group, target)[0]) if group else -1.0)
            xs = [x + (i - 1) * 0.27 for x in range(len(links))]
            ax.bar(xs, [max(v or 0.0, 0.0) for v in values], width=0.27, color=COLORS[algo],
                   label=ALGO_LABEL[algo])
            for x, v in zip(xs, values, strict=True):
                if v is None:  # ran, but never reached the target
                    ax.text(x, 0.05, "not reached", rotation=90, ha="center", va="bottom",
                            fontsize=7, color=COLORS[algo])
        ax.axhline(1, color=COLORS["ssgd"], ls="--", lw=1)
        ax.axhline(2, color="black", ls=":", lw=1)
        ax.set_xticks(range(len(links)), links)
        ax.set_title(f"{model} ({dataset}), {ranks} ranks, sync 16", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
    return _save(fig, axes, "time-to-target speedup vs SSGD", path)


def plot_time_to_accuracy(runs: list[Run], path: Path, link: str = "1gbit") -> bool:
    keys = link_keys(runs, (link,))
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        _, dataset, model, ranks = key
        for algo in ("ssgd", "ddp", "pa", "pso-ps"):
            group = [r for r in runs if setting(r) == key and r["algo"] == algo
                     and (algo in ("ssgd", "ddp") or r["sync_every"] == 16)]
            for i, r in enumerate(sorted(group, key=lambda r: r["seed"])):
                walls = [0.0] + [c[1] for c in r["curve"]]
                accs = [0.1] + [c[2] for c in r["curve"]]  # chance before the first step
                ax.plot(walls, accs, color=COLORS[algo], alpha=0.9 if i == 0 else 0.4,
                        label=ALGO_LABEL[algo] if i == 0 else None)
        target = target_of(runs, key)
        if target is not None:
            ax.axhline(target, color="black", ls=":", lw=1, label="target")
        ax.set_xlabel("wall-clock (s)")
        ax.set_title(f"{model} ({dataset}), {link}, {ranks} ranks", fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, axes, "test accuracy", path)
