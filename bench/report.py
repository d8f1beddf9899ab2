"""Write bench/results/REPORT.md and its PNG plots from the raw JSON of a sweep (bench/sweep.py).

What it reads: ``DIR/runs.jsonl`` (one record per training run: settings, final metrics,
accuracy curve against wall-clock) and ``DIR/sweep.json`` (command, machine, links, duration).
What it writes, into ``--out-dir`` (default: DIR's parent):

* ``REPORT.md``: the environment; the accuracy grid (every method at every dataset, rank count
  and sync period) with PSO-PS's default against PA and against SlowMo, cell by cell; the
  PSO-PS variants; time to accuracy on the emulated 1 Gbit/s link; our SSGD's throughput
  against DDP-gloo; every run's setting;
* ``acc_vs_sync.png`` (final accuracy against the sync period per method) and
  ``time_to_accuracy.png`` (test accuracy against wall-clock at 1 Gbit/s).

Definitions. A cell's accuracy is the mean final test accuracy over seeds (min - max); its
spread is the larger standard deviation over seeds of the two methods compared. Δ = mean of
one minus mean of the other; "above" when Δ > spread, "level" when |Δ| <= spread, "below"
when Δ < -spread. The target accuracy of a link setting is the mean final test accuracy of
SSGD there minus 0.01; a run's time to target is the wall-clock (from the first step,
evaluation included) at the end of the first epoch whose test accuracy reaches it; speedup =
SSGD's median time to target / the method's, a seed that never reaches it counting as
infinitely slow. A partial sweep is reported as far as it got.

    python bench/report.py bench/results/raw            # -> bench/results/REPORT.md + PNGs
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import plot_acc_vs_sync, plot_time_to_accuracy
from runs import (
    DEFAULT_PSO,
    Run,
    acc_cell,
    fmt,
    label,
    load,
    median,
    method,
    ok,
    select,
    setting,
    speedup,
    spread,
    target_of,
    ttt,
)

GRID_METHODS = ("ssgd", "pa", "slowmo", "pso-ps[paper]", DEFAULT_PSO)
LINK_METHODS = ("ssgd", "ddp", "pa", "slowmo", "pso-ps[paper]", DEFAULT_PSO)


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
    keys = sorted({setting(r) for r in runs if r["algo"] == "ddp"})
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


def compare(mine: list[Run], other: list[Run]) -> tuple[float, float, str] | None:
    """(Δ of the means, spread, verdict) of two cells of seeds, or None if one is empty."""
    if not mine or not other:
        return None
    delta = (statistics.mean(r["test_acc"] for r in mine)
             - statistics.mean(r["test_acc"] for r in other))
    width = max(spread(mine), spread(other))
    verdict = "above" if delta > width else ("level" if delta >= -width else "below")
    return delta, width, verdict


def _cells(runs: list[Run]) -> list[tuple[str, str, int, int]]:
    acc = [r for r in runs if r["group"] == "accuracy"]
    return sorted({(r["dataset"], r["model"], r["ranks"], r["sync_every"]) for r in acc
                   if r["algo"] not in ("ssgd", "ddp")})


def _cell_runs(runs: list[Run], cell: tuple, name: str) -> list[Run]:
    dataset, _, ranks, sync = cell
    return [r for r in select(runs, group="accuracy", dataset=dataset, ranks=ranks)
            if method(r) == name and (r["algo"] in ("ssgd", "ddp") or r["sync_every"] == sync)]


def _verdict_text(result: tuple[float, float, str] | None) -> str:
    if result is None:
        return "–"
    delta, width, verdict = result
    return f"{delta:+.4f} ± {width:.4f} **{verdict}**"


def accuracy_section(runs: list[Run]) -> list[str]:
    """Every method in every cell, and the default PSO-PS against PA and SlowMo."""
    lines = ["## Accuracy grid: every method, dataset, rank count and sync period", "",
             "Final test accuracy, mean (min – max) over seeds, on the machine as it is (the "
             "ranks share its cores, which changes no rank's arithmetic: see the note below). "
             "Δ columns: the default PSO-PS's mean minus the other's, ± the larger seed "
             "standard deviation of the two, and the verdict (above / level / below).", ""]
    for dataset, model in sorted({c[:2] for c in _cells(runs)}):
        lines += [f"### {dataset} ({model})", "",
                  "| ranks | sync every | " + " | ".join(label(m) for m in GRID_METHODS)
                  + " | PSO-PS default − PA | PSO-PS default − SlowMo |",
                  "|---|---|" + "---|" * (len(GRID_METHODS) + 2)]
        for cell in (c for c in _cells(runs) if c[:2] == (dataset, model)):
            groups = {m: _cell_runs(runs, cell, m) for m in GRID_METHODS}
            lines.append(
                f"| {cell[2]} | {cell[3]} | "
                + " | ".join(acc_cell(groups[m]) for m in GRID_METHODS)
                + f" | {_verdict_text(compare(groups[DEFAULT_PSO], groups['pa']))}"
                + f" | {_verdict_text(compare(groups[DEFAULT_PSO], groups['slowmo']))} |")
        lines.append("")
    return lines


def targets_section(runs: list[Run]) -> list[str]:
    """The accuracy targets, counted over the cells."""
    tally: dict[str, dict[str, int]] = {"pa": {}, "slowmo": {}, "pso-ps[paper]": {}}
    for cell in _cells(runs):
        mine = _cell_runs(runs, cell, DEFAULT_PSO)
        for other, counts in tally.items():
            result = compare(mine, _cell_runs(runs, cell, other))
            if result is not None:
                counts[result[2]] = counts.get(result[2], 0) + 1
    lines = ["## Targets: the default PSO-PS against PA, SlowMo and the paper's rule", "",
             "Over the cells of the accuracy grid (dataset × ranks × sync period):", ""]
    for other, counts in tally.items():
        total = sum(counts.values())
        lines.append(f"- against {label(other)}: above in {counts.get('above', 0)}, level in "
                     f"{counts.get('level', 0)}, below in {counts.get('below', 0)} of "
                     f"{total} cells.")
    pa = tally["pa"]
    total = sum(pa.values())
    if total:
        met_all = pa.get("below", 0) == 0
        met_third = pa.get("above", 0) * 3 >= total
        lines += ["", f"Target 1 (≥ PA within the spread in every cell): "
                      f"**{'met' if met_all else 'not met'}**; above PA by more than the "
                      f"spread in at least a third of the cells: "
                      f"**{'met' if met_third else 'not met'}** "
                      f"({pa.get('above', 0)} of {total})."]
    return [*lines, ""]


def variants_section(runs: list[Run]) -> list[str]:
    """The PSO-PS variants of the grid beside the default, per cell."""
    names = sorted({method(r) for r in runs if r["algo"] == "pso-ps"} - set(GRID_METHODS))
    if not names:
        return []
    lines = ["## PSO-PS variants explored", "",
             "Final test accuracy, mean (min – max) over seeds; the variants' flags are in "
             "`bench/sweep.py` (`VARIANTS`).", "",
             "| data | ranks | sync every | " + " | ".join(label(m) for m in
                                                         (DEFAULT_PSO, *names)) + " |",
             "|---|---|---|" + "---|" * (len(names) + 1)]
    for cell in _cells(runs):
        groups = [_cell_runs(runs, cell, m) for m in (DEFAULT_PSO, *names)]
        if any(groups[1:]):
            lines.append(f"| {cell[0]} | {cell[2]} | {cell[3]} | "
                         + " | ".join(acc_cell(g) for g in groups) + " |")
    return [*lines, ""]


def link_section(runs: list[Run]) -> list[str]:
    """Time to accuracy against SSGD on the emulated link."""
    keys = sorted({setting(r) for r in runs if r["group"] == "link"})
    lines = ["## Target: time to accuracy on an emulated 1 Gbit/s link, 4 ranks, "
             "`--sync-every 16`", "",
             "The default PSO-PS should reach SSGD's final accuracy − 1 point at least 2× sooner "
             "than SSGD, on mlp-wide and on LeNet.", "",
             "| model (data) | method | final test acc | s/epoch | MB sent/rank | comm % "
             "| time to target, s (seeds reached) | speedup vs SSGD |",
             "|---|---|---|---|---|---|---|---|"]
    for key in keys:
        target = target_of(runs, key)
        group_of = {m: [r for r in runs if setting(r) == key and method(r) == m]
                    for m in LINK_METHODS}
        base, _, _ = ttt(group_of["ssgd"], target)
        for name, group in group_of.items():
            if not group:
                continue
            t, reached, n = ttt(group, target)
            comm = median(r.get("comm_share") for r in group)
            lines.append(
                f"| {key[2]} ({key[1]}), target {fmt(target, '.4f')} | {label(name)} "
                f"| {acc_cell(group)} | {fmt(median(r['s_per_epoch'] for r in group), '.2f')} "
                f"| {fmt(median(r['comm_bytes_per_rank'] for r in group) / 1e6, '.1f')} "
                f"| {fmt(None if comm is None else 100 * comm, '.0f')} "
                f"| {fmt(t, '.1f', 'not reached')} ({reached}/{n}) "
                f"| **{fmt(speedup(base, t), '.2f')}** |")
    return [*lines, ""]


def all_settings_section(runs: list[Run]) -> list[str]:
    lines = ["## Every setting", "",
             "| link | data | model | ranks | method | sync every | seeds | final test acc "
             "| MB sent/rank |", "|---|---|---|---|---|---|---|---|---|"]
    groups: dict[tuple, list[Run]] = {}
    for r in runs:
        sync = 1 if r["algo"] in ("ssgd", "ddp") else r["sync_every"]
        groups.setdefault((*setting(r), method(r), sync), []).append(r)
    for key in sorted(groups):
        group = groups[key]
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {label(key[4])} "
            f"| {'every step' if key[5] == 1 else key[5]} | {len(group)} | {acc_cell(group)} "
            f"| {fmt(median(r['comm_bytes_per_rank'] for r in group) / 1e6, '.1f')} |")
    return [*lines, ""]


def failures_section(runs: list[Run]) -> list[str]:
    failed = [r for r in runs if r.get("rc") != 0]
    if not failed:
        return []
    lines = ["## Failed runs", ""]
    lines += [f"- `{r['key']}`: exit {r.get('rc')}: {r.get('error', '')[:200]}" for r in failed]
    return [*lines, ""]


# ---------------------------------------------------------------------------- main

def write_report(raw: Path, out_dir: Path) -> Path:
    """Read DIR/runs.jsonl and DIR/sweep.json; write REPORT.md and the PNGs into out_dir."""
    all_runs, meta = load(raw)
    runs = ok(all_runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "acc_vs_sync.png": plot_acc_vs_sync(runs, out_dir / "acc_vs_sync.png"),
        "time_to_accuracy.png": plot_time_to_accuracy(runs, out_dir / "time_to_accuracy.png"),
    }
    try:
        raw_rel = raw.resolve().relative_to(out_dir.resolve())
    except ValueError:
        raw_rel = raw
    lines = ["# Benchmarks: PSO-PS against PA, SlowMo, SSGD and DDP-gloo", "",
             f"Generated by `python bench/report.py {raw}` from `{raw_rel}/runs.jsonl` "
             "(one record per training run: settings, command, final metrics, accuracy per "
             "epoch against wall-clock). How the runs were made: `bench/sweep.py`'s "
             "docstring; definitions: `bench/report.py`'s.", "",
             *environment_section(meta, all_runs), *targets_section(runs),
             *accuracy_section(runs)]
    if plots["acc_vs_sync.png"]:
        lines += ["![acc_vs_sync.png](acc_vs_sync.png)", ""]
    lines += [*link_section(runs)]
    if plots["time_to_accuracy.png"]:
        lines += ["![time_to_accuracy.png](time_to_accuracy.png)", ""]
    lines += [*variants_section(runs), *ddp_section(runs), *all_settings_section(runs),
              *failures_section(all_runs)]
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
