"""Write bench/results/REPORT.md and its PNG plots from the raw JSON of a sweep (bench/sweep.py).

What it reads: ``DIR/runs.jsonl`` (one record per training run: settings, final metrics,
accuracy curve against wall-clock) and ``DIR/sweep.json`` (command, machine, links, duration).
What it writes, into ``--out-dir`` (default: DIR's parent):

* ``REPORT.md``: the environment; the targets (our SSGD's throughput against DDP-gloo; time to
  reach SSGD's final accuracy minus 1 point at 1 Gbit/s, 4 ranks, ``--sync-every 16``); PSO-PS
  against PA at every sync period with the spread over seeds; the link grid (time per epoch,
  bytes per rank, communication share); the PSO-PS options checked on Fashion-MNIST;
* ``acc_vs_sync.png`` (final accuracy against sync period per algorithm),
  ``speedup_vs_link.png`` (time-to-accuracy speedup over SSGD per link speed),
  ``time_to_accuracy.png`` (test accuracy against wall-clock at 1 Gbit/s).

Definitions: the target accuracy of a setting (link, dataset, model, ranks) is the mean final
test accuracy of psops_mpi's SSGD over the seeds, minus 0.01; a run's time to target is the
wall-clock (from the first step, evaluation included) at the end of the first epoch whose test
accuracy reaches it; speedup = SSGD's median time to target / the algorithm's. Timings are
medians over seeds; accuracies mean (min - max). A partial sweep is reported as far as it got.

    python bench/report.py bench/results/raw            # -> bench/results/REPORT.md + PNGs
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

TARGET_DROP = 0.01
LINK_ORDER = ("shm", "10gbit", "1gbit")
ALGO_LABEL = {"ssgd": "SSGD (psops_mpi)", "ddp": "SSGD (DDP-gloo)", "pa": "PA",
              "pso-ps": "PSO-PS"}
COLORS = {"ssgd": "tab:blue", "ddp": "tab:gray", "pa": "tab:orange", "pso-ps": "tab:green"}

Run = dict


def load(raw: Path) -> tuple[list[Run], dict]:
    runs = [json.loads(line) for line in (raw / "runs.jsonl").read_text().splitlines()
            if line.strip()]
    meta_path = raw / "sweep.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    return runs, meta


def ok(runs: Iterable[Run]) -> list[Run]:
    return [r for r in runs if r.get("rc") == 0 and "test_acc" in r]


def select(runs: list[Run], **want: object) -> list[Run]:
    return [r for r in runs if all(r.get(k) == v for k, v in want.items())]


def median(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.median(vals) if vals else None


def acc_cell(runs: list[Run]) -> str:
    accs = [r["test_acc"] for r in runs]
    if not accs:
        return "–"
    if len(accs) == 1:
        return f"{accs[0]:.4f} (n=1)"
    return f"{statistics.mean(accs):.4f} ({min(accs):.4f} – {max(accs):.4f})"


def fmt(value: float | None, spec: str = ".2f", none: str = "–") -> str:
    return none if value is None else format(value, spec)


def setting(r: Run) -> tuple:
    return (r["link"], r["dataset"], r["model"], r["ranks"])


# ---------------------------------------------------------------------------- time to target

def time_to(curve: list[list[float]], target: float) -> float | None:
    """Wall-clock at the end of the first epoch whose test accuracy reaches ``target``."""
    for _, wall, acc in curve:
        if acc >= target:
            return wall
    return None


def target_of(runs: list[Run], key: tuple) -> float | None:
    ssgd = [r["test_acc"] for r in runs if setting(r) == key and r["algo"] == "ssgd"
            and not r.get("variant")]
    return statistics.mean(ssgd) - TARGET_DROP if ssgd else None


def ttt(runs: list[Run], target: float | None) -> tuple[float | None, int, int]:
    """Median time to target over seeds, counting a seed that never reached it as infinite
    (None when the median is infinite), the number of seeds that reached it, and of runs."""
    if target is None or not runs:
        return None, 0, len(runs)
    times = [time_to(r["curve"], target) for r in runs]
    reached = sum(t is not None for t in times)
    mid = statistics.median([math.inf if t is None else t for t in times])
    return (mid if math.isfinite(mid) else None), reached, len(times)


def speedup(base: float | None, other: float | None) -> float | None:
    if base is None or other is None or other <= 0:
        return None
    return base / other


# ---------------------------------------------------------------------------- sections

def environment_section(meta: dict, runs: list[Run]) -> list[str]:
    m = meta.get("machine", {})
    planned = sum(x.get("planned_runs", 0) for x in [meta, *meta.get("resumed", [])]) or "?"
    loads = [r["load_avg"] for r in runs if "load_avg" in r]
    lines = [
        "## Environment",
        "",
        f"- Command: `{meta.get('command', '?')}`; started {meta.get('started', '?')}, "
        f"finished {meta.get('finished', 'not finished (partial sweep)')}; "
        f"duration {fmt(meta.get('duration_s'), '.0f')} s; "
        f"{len(runs)} of {planned} planned runs recorded (all invocations), "
        f"{len(ok(runs))} succeeded.",
        f"- CPU: {m.get('cpu_model', '?')}, {m.get('cores', '?')} cores; Python "
        f"{m.get('python', '?')}, torch {m.get('torch', '?')}, mpi4py {m.get('mpi4py', '?')}, "
        f"{m.get('mpi_library', '?')}; one torch thread per rank.",
        "- The machine was shared: other jobs ran on the same cores during the sweep "
        f"(1-minute load average at run launch: median {fmt(median(loads), '.1f')}, range "
        f"{fmt(min(loads, default=None), '.1f')} – {fmt(max(loads, default=None), '.1f')}). "
        "Absolute times move with that load; the comparisons are between runs interleaved in "
        "the same sweep.",
        "- Links:",
    ]
    lines += [f"  - {desc}" for desc in meta.get("links", {}).values()]
    for more in meta.get("resumed", []):
        lines.append(f"- Then resumed with `{more.get('command', '?')}`: started "
                     f"{more.get('started', '?')}, finished {more.get('finished', '?')}, "
                     f"{fmt(more.get('duration_s'), '.0f')} s, "
                     f"{more.get('planned_runs', '?')} runs planned.")
    return [*lines, ""]


def ddp_section(runs: list[Run]) -> list[str]:
    """Our SSGD's throughput against DDP-gloo, per setting, from twin runs of the same seed."""
    lines = ["## Target: our SSGD's throughput ≥ 0.95 × DDP-gloo's", "",
             "Same training (model, shards, optimizer, schedule, evaluation: the final "
             "accuracies are equal at 2 ranks and differ by float rounding at 4, where the two "
             "allreduces sum in different orders), psops_mpi's one flat `Allreduce` against "
             "`DistributedDataParallel` (gloo); samples/s over the whole run including "
             "per-epoch evaluation; each SSGD run was launched next to its DDP twin. Ratio = "
             "median over seeds of (ours / DDP) for the same seed.", "",
             "| link | dataset | model | ranks | ours samples/s | DDP samples/s | ratio per "
             "seed | **median ratio** | final acc ours / DDP |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = sorted({setting(r) for r in runs if r["algo"] == "ddp"},
                  key=lambda k: (LINK_ORDER.index(k[0]) if k[0] in LINK_ORDER else 9, k[1:]))
    for key in keys:
        ours = {r["seed"]: r for r in runs if setting(r) == key and r["algo"] == "ssgd"}
        ddp = {r["seed"]: r for r in runs if setting(r) == key and r["algo"] == "ddp"}
        seeds = sorted(set(ours) & set(ddp))
        ratios = [ours[s]["samples_per_s"] / ddp[s]["samples_per_s"] for s in seeds]
        accs = " / ".join(f"{ours[s]['test_acc']:.4f}={ddp[s]['test_acc']:.4f}"
                          if ours[s]["test_acc"] == ddp[s]["test_acc"]
                          else f"{ours[s]['test_acc']:.4f}≠{ddp[s]['test_acc']:.4f}"
                          for s in seeds)
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} "
            f"| {fmt(median(o['samples_per_s'] for o in ours.values()), '.0f')} "
            f"| {fmt(median(d['samples_per_s'] for d in ddp.values()), '.0f')} "
            f"| {', '.join(f'{x:.2f}' for x in ratios) or '–'} "
            f"| **{fmt(median(ratios), '.2f')}** | {accs or '–'} |")
    return [*lines, ""]


def link_rows(runs: list[Run], key: tuple) -> list[str]:
    target = target_of(runs, key)
    base, _, _ = ttt(select(runs, algo="ssgd", link=key[0], dataset=key[1], model=key[2],
                            ranks=key[3]), target)
    rows = []
    for algo in ("ssgd", "ddp", "pa", "pso-ps"):
        group = [r for r in runs if setting(r) == key and r["algo"] == algo
                 and not r.get("variant") and (algo in ("ssgd", "ddp") or r["sync_every"] == 16)]
        if not group:
            continue
        t, reached, n = ttt(group, target)
        comm = median(r.get("comm_share") for r in group)
        rows.append(
            f"| {key[0]} | {key[2]} ({key[1]}), {key[3]} ranks | {ALGO_LABEL[algo]} "
            f"| {acc_cell(group)} "
            f"| {fmt(median(r['s_per_epoch'] for r in group), '.2f')} "
            f"| {fmt(median(r['comm_bytes_per_rank'] for r in group) / 1e6, '.1f')} "
            f"| {fmt(None if comm is None else 100 * comm, '.0f')} "
            f"| {fmt(t, '.1f', 'not reached')} ({reached}/{n}) "
            f"| {fmt(speedup(base, t), '.2f')} |")
    return rows


def link_keys(runs: list[Run], links: tuple[str, ...] | None = None) -> list[tuple]:
    """Settings of the link grid (and their shm twins), models first, then link speed."""
    setups = {setting(r)[1:] for r in runs if r["group"] == "link"}
    keys = {setting(r) for r in runs if setting(r)[1:] in setups and r["algo"] == "ssgd"
            and (links is None or r["link"] in links)}
    return sorted(keys, key=lambda k: (k[2], k[1], LINK_ORDER.index(k[0])
                                       if k[0] in LINK_ORDER else 9))


def link_section(runs: list[Run]) -> tuple[list[str], list[str]]:
    """Time to accuracy and its speedup over SSGD at --sync-every 16, every link."""
    keys = link_keys(runs)
    header = ["| link | model (data) | algorithm | final test acc | s/epoch | MB sent/rank "
              "| comm % | time to target, s (seeds reached) | speedup vs SSGD |",
              "|---|---|---|---|---|---|---|---|---|"]
    target_lines = ["## Target: at 1 Gbit/s, 4 ranks, `--sync-every 16`, PSO-PS reaches SSGD's "
                    "final accuracy − 1 point ≥ 2× sooner than SSGD", ""]
    all_lines = ["## Links: time per epoch, traffic and time to accuracy (PA and PSO-PS at "
                 "`--sync-every 16`)", "", *header]
    one_g = [k for k in keys if k[0] == "1gbit"]
    for key in one_g:
        target = target_of(runs, key)
        target_lines.append(f"- **{key[2]}** on {key[1]} ({_params(runs, key)} parameters, "
                            f"{key[3]} ranks): "
                            f"target {fmt(target, '.4f')}; " + _headline(runs, key))
    target_lines += ["", "The 1 Gbit/s rows (all links: the table further down):", "", *header]
    for key in one_g:
        target_lines += link_rows(runs, key)
    for key in keys:
        all_lines += link_rows(runs, key)
    return [*target_lines, ""], [*all_lines, ""]


def _params(runs: list[Run], key: tuple) -> str:
    counts = {r["num_params"] for r in runs if setting(r) == key}
    return ", ".join(f"{c:,}" for c in sorted(counts)) or "?"


def _headline(runs: list[Run], key: tuple) -> str:
    target = target_of(runs, key)
    pick: Callable[[str], list[Run]] = lambda a: [  # noqa: E731
        r for r in runs if setting(r) == key and r["algo"] == a and not r.get("variant")
        and (a == "ssgd" or r["sync_every"] == 16)]
    base, _, _ = ttt(pick("ssgd"), target)
    pso, reached, n = ttt(pick("pso-ps"), target)
    pa, _, _ = ttt(pick("pa"), target)
    if pso is None:
        pa_text = ("did not reach it" if pa is None
                   else f"{pa:.1f} s ({fmt(speedup(base, pa), '.2f')}×)")
        return (f"PSO-PS did not reach it (in {reached} of {n} seeds); SSGD "
                f"{fmt(base, '.1f')} s, PA {pa_text}.")
    ratio = speedup(base, pso)
    verdict = "met" if ratio is not None and ratio >= 2 else "not met"
    return (f"PSO-PS {pso:.1f} s against SSGD {fmt(base, '.1f')} s: **{fmt(ratio, '.2f')}×** "
            f"(target ≥ 2×: {verdict}); PA {fmt(pa, '.1f', 'not reached')} "
            f"({fmt(speedup(base, pa), '.2f')}×).")


def pso_vs_pa_section(runs: list[Run]) -> list[str]:
    lines = ["## PSO-PS against PA (and SSGD) at each sync period", "",
             "Final test accuracy, mean (min – max) over seeds, on the machine as it is (shm). "
             "Δ = PSO-PS mean − PA mean. On MNIST-1D an epoch has 62 (2 ranks) or 31 (4 "
             "ranks) steps per rank and a round is forced at every epoch end (for "
             "evaluation), so `--sync-every 64` there means one round per epoch.", ""]
    acc = [r for r in runs if r["group"] == "accuracy"]
    for dataset, model in sorted({(r["dataset"], r["model"]) for r in acc}):
        lines += [f"### {dataset} ({model})", "",
                  "| ranks | sync every | PA | PSO-PS | Δ | PSO-PS runs with a diverged "
                  "particle |", "|---|---|---|---|---|---|"]
        for ranks in sorted({r["ranks"] for r in acc if r["dataset"] == dataset}):
            here = select(acc, dataset=dataset, ranks=ranks)
            for algo in ("ssgd", "ddp"):
                group = select(here, algo=algo)
                if group:
                    lines.append(f"| {ranks} | {ALGO_LABEL[algo]} | {acc_cell(group)} | | | |")
            for n in sorted({r["sync_every"] for r in here if r["algo"] in ("pa", "pso-ps")}):
                pa, pso = select(here, algo="pa", sync_every=n), select(here, algo="pso-ps",
                                                                         sync_every=n)
                delta = (statistics.mean(r["test_acc"] for r in pso)
                         - statistics.mean(r["test_acc"] for r in pa)) if pa and pso else None
                diverged = sum(bool(r.get("diverged")) for r in pso)
                lines.append(f"| {ranks} | {n} | {acc_cell(pa)} | {acc_cell(pso)} "
                             f"| {fmt(delta, '+.4f')} | {diverged}/{len(pso)} |")
        lines.append("")
    return lines


def defaults_section(runs: list[Run]) -> list[str]:
    variants = [r for r in runs if r["group"] == "defaults"]
    if not variants:
        return []
    first = variants[0]
    base = [r for r in runs if r["group"] == "accuracy" and r["algo"] == "pso-ps"
            and r["dataset"] == first["dataset"] and r["ranks"] == first["ranks"]
            and r["sync_every"] == first["sync_every"]]
    pa = [r for r in runs if r["group"] == "accuracy" and r["algo"] == "pa"
          and r["dataset"] == first["dataset"] and r["ranks"] == first["ranks"]
          and r["sync_every"] == first["sync_every"]]
    lines = [f"## PSO-PS options checked on {first['dataset']} ({first['model']}, "
             f"{first['ranks']} ranks, `--sync-every {first['sync_every']}`)", "",
             "One option changed at a time from the defaults (w=0.5, c1=0, c2=1, train-loss "
             "fitness, this round's best, momentum kept).", "",
             "| setting | final test acc | runs with a diverged particle |", "|---|---|---|",
             f"| PA (for reference) | {acc_cell(pa)} | |",
             f"| PSO-PS defaults | {acc_cell(base)} | "
             f"{sum(bool(r.get('diverged')) for r in base)}/{len(base)} |"]
    for name in sorted({r["variant"] for r in variants}):
        group = [r for r in variants if r["variant"] == name]
        lines.append(f"| PSO-PS {name} | {acc_cell(group)} | "
                     f"{sum(bool(r.get('diverged')) for r in group)}/{len(group)} |")
    return [*lines, ""]


def all_settings_section(runs: list[Run]) -> list[str]:
    """Every setting of the sweep: accuracy, time per epoch, traffic, comm share, time to
    the setting's target."""
    lines = ["## Every setting", "",
             "Medians over seeds except accuracy (mean, min – max). Time to target: SSGD's "
             "mean final accuracy − 0.01 in the same setting (link, data, model, ranks).", "",
             "| link | data | model | ranks | algorithm | sync every | seeds | final test acc "
             "| s/epoch | MB sent/rank | comm % | time to target, s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        name = f"{ALGO_LABEL[r['algo']]}" + (f" [{r['variant']}]" if r.get("variant") else "")
        sync = "every step" if r["algo"] in ("ssgd", "ddp") else str(r["sync_every"])
        groups.setdefault((*setting(r), name, sync), []).append(r)

    def order(k: tuple) -> tuple:
        link_rank = LINK_ORDER.index(k[0]) if k[0] in LINK_ORDER else 9
        return (k[1], k[2], k[3], link_rank, k[4], int(k[5]) if k[5].isdigit() else 0)

    for key in sorted(groups, key=order):
        group = groups[key]
        t, reached, n = ttt(group, target_of(runs, key[:4]))
        comm = median(r.get("comm_share") for r in group)
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {key[5]} | {len(group)} "
            f"| {acc_cell(group)} | {fmt(median(r['s_per_epoch'] for r in group), '.2f')} "
            f"| {fmt(median(r['comm_bytes_per_rank'] for r in group) / 1e6, '.1f')} "
            f"| {fmt(None if comm is None else 100 * comm, '.0f')} "
            f"| {fmt(t, '.1f', 'not reached')} ({reached}/{n}) |")
    return [*lines, ""]


def failures_section(runs: list[Run]) -> list[str]:
    failed = [r for r in runs if r.get("rc") != 0]
    if not failed:
        return []
    lines = ["## Failed runs", ""]
    lines += [f"- `{r['key']}`: exit {r.get('rc')}: {r.get('error', '')[:200]}" for r in failed]
    return [*lines, ""]


# ---------------------------------------------------------------------------- plots

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


# ---------------------------------------------------------------------------- main

def write_report(raw: Path, out_dir: Path) -> Path:
    """Read DIR/runs.jsonl and DIR/sweep.json; write REPORT.md and the PNGs into out_dir."""
    all_runs, meta = load(raw)
    runs = ok(all_runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "acc_vs_sync.png": plot_acc_vs_sync(runs, out_dir / "acc_vs_sync.png"),
        "speedup_vs_link.png": plot_speedup_vs_link(runs, out_dir / "speedup_vs_link.png"),
        "time_to_accuracy.png": plot_time_to_accuracy(runs, out_dir / "time_to_accuracy.png"),
    }
    target_lines, link_lines = link_section(runs)
    try:
        raw_rel = raw.resolve().relative_to(out_dir.resolve())
    except ValueError:
        raw_rel = raw
    lines = ["# Benchmarks: PSO-PS against PA, SSGD and DDP-gloo", "",
             f"Generated by `python bench/report.py {raw}` from `{raw_rel}/runs.jsonl` "
             "(one record per training run: settings, command, final metrics, accuracy per "
             "epoch against wall-clock). How the runs were made: `bench/sweep.py`'s "
             "docstring. Definitions: `bench/report.py`'s docstring (target = SSGD's mean "
             "final accuracy − 0.01; time to target = wall-clock at the end of the first "
             "epoch reaching it; medians over seeds for times).", "",
             *environment_section(meta, all_runs), *ddp_section(runs), *target_lines]
    for name, made in plots.items():
        if made:
            lines += [f"![{name}]({name})", ""]
    lines += [*pso_vs_pa_section(runs), *link_lines, *defaults_section(runs),
              *all_settings_section(runs), *failures_section(all_runs)]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", type=Path, help="the sweep's --out folder (runs.jsonl, sweep.json)")
    p.add_argument("--out-dir", type=Path, help="where REPORT.md and PNGs go (default: "
                   "the raw folder's parent)")
    args = p.parse_args(argv)
    if not (args.raw / "runs.jsonl").is_file():
        print(f"report: error: {args.raw / 'runs.jsonl'} not found; run bench/sweep.py "
              f"--out {args.raw} first", file=sys.stderr)
        return 2
    print(write_report(args.raw, args.out_dir or args.raw.resolve().parent))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
