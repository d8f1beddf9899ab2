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
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from figures import plot_acc_vs_sync, plot_speedup_vs_link, plot_time_to_accuracy
from runs import (
    ALGO_LABEL,
    LINK_ORDER,
    Run,
    acc_cell,
    fmt,
    link_keys,
    load,
    median,
    ok,
    select,
    setting,
    speedup,
    target_of,
    ttt,
)

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
