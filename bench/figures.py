"""The report's PNG plots, from the runs of a sweep (see report.py for the definitions)."""

from __future__ import annotations

import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
from runs import COLORS, Run, label, method, select, setting, target_of

LINE_METHODS = ("pa", "slowmo", "pso-ps[paper]", "pso-ps[centre]")


def _save(fig, axes, ylabel: str, path: Path) -> bool:
    """Label, lay out and write one figure of panels; True: a plot was written."""
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def plot_acc_vs_sync(runs: list[Run], path: Path) -> bool:
    """Final accuracy against the sync period, one panel per dataset and rank count."""
    acc = [r for r in runs if r["group"] == "accuracy"]
    panels = sorted({(r["dataset"], r["model"], r["ranks"]) for r in acc})
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.6), squeeze=False)
    for ax, (dataset, model, ranks) in zip(axes[0], panels, strict=True):
        here = select(acc, dataset=dataset, ranks=ranks)
        for name in LINE_METHODS:
            mine = [r for r in here if method(r) == name]
            periods = sorted({r["sync_every"] for r in mine})
            if not periods:
                continue
            stats = [[r["test_acc"] for r in mine if r["sync_every"] == n] for n in periods]
            means = [statistics.mean(s) for s in stats]
            err = [[m - min(s) for m, s in zip(means, stats, strict=True)],
                   [max(s) - m for m, s in zip(means, stats, strict=True)]]
            ax.errorbar(periods, means, yerr=err, marker="o", capsize=3, color=COLORS[name],
                        label=label(name))
        ssgd = [r["test_acc"] for r in here if method(r) == "ssgd"]
        if ssgd:
            ax.axhline(statistics.mean(ssgd), ls="--", color=COLORS["ssgd"], label="SSGD")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("--sync-every (steps)")
        ax.set_title(f"{dataset} ({model}), {ranks} ranks", fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, axes, "final test accuracy (mean, min–max over seeds)", path)


def plot_time_to_accuracy(runs: list[Run], path: Path, link: str = "1gbit") -> bool:
    """Test accuracy against wall-clock on the emulated link, one panel per model."""
    keys = sorted({setting(r) for r in runs if r["group"] == "link" and r["link"] == link})
    if not keys:
        return False
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.6), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        _, dataset, model, ranks = key
        for name in ("ssgd", "ddp", *LINE_METHODS):
            group = sorted((r for r in runs if setting(r) == key and method(r) == name),
                           key=lambda r: r["seed"])
            for i, r in enumerate(group):
                walls = [0.0] + [c[1] for c in r["curve"]]
                accs = [0.1] + [c[2] for c in r["curve"]]  # chance before the first step
                ax.plot(walls, accs, color=COLORS[name], alpha=0.9 if i == 0 else 0.4,
                        label=label(name) if i == 0 else None)
        target = target_of(runs, key)
        if target is not None:
            ax.axhline(target, color="black", ls=":", lw=1, label="target")
        ax.set_xlabel("wall-clock (s)")
        ax.set_title(f"{model} ({dataset}), {link}, {ranks} ranks", fontsize=9)
        ax.grid(alpha=0.3)
    return _save(fig, axes, "test accuracy", path)
