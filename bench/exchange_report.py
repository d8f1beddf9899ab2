"""Write the exchange grid's report (REPORT.md and exchange.png) from its runs
(``python bench/sweep.py --groups exchange --out DIR``).

What it shows, per cell (model and data, emulated link, ranks, sync period): every periodic
method blocking in fp32, with its rounds in flight (``--overlap``), and in flight encoded in
bf16 and int8, beside SSGD and DDP-gloo: final test accuracy (mean, min - max over seeds),
seconds per epoch, the share of the time spent in communication that the ranks see (every
MPI call, poke and wait of the exchange and its encoding: not the time the bytes are under
way), bytes sent per rank, the time to SSGD's final accuracy less 1 point, the speedup
against SSGD and the share of the communication-free ceiling; then the targets, and the cost
model's round time against the measured one.

Definitions (as bench/report.py's): the target is SSGD's mean final accuracy (at 1 Gbit/s:
the link changes none of its arithmetic) less 0.01; a run's time to target is the wall-clock
at the end of the first epoch that reaches it; medians over seeds, a seed that never
reaches it counting as infinitely slow; speedup = SSGD's median time to target / the
method's. The communication-free ceiling is 1 / (1 - SSGD's share of time in
communication): the speedup of a method that computed as SSGD does and never waited.
Below 1 Gbit/s SSGD and DDP run two epochs of seed 0 (bench/sweep.py: SLOW_SSGD_EPOCHS):
their time to target there is the 1 Gbit/s runs' times scaled by the ratio of the seconds
per epoch, said so in the table.

The cost model's check: a round's exposed time predicted by
:func:`psops_mpi.costmodel.exposed_round_time` (the round's time on the link, less the
steps it is left in flight times the run's own time per step) against the run's measured
seconds in communication per round; its error is given as a share of the whole round's
predicted time, so that a round predicted to be hidden and measured at a few milliseconds
counts as the small error it is.

    python bench/exchange_report.py bench/results/exchange --landing bench/results/overlap-k
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from runs import (
    TARGET_DROP,
    Run,
    acc_cell,
    fmt,
    load,
    median,
    ok,
    spread,
    ttt,
)

from psops_mpi.costmodel import Link, exposed_round_time, gbit, pso_method, round_time

MODES = ("", "overlap", "overlap bf16", "overlap int8", "overlap int8 K=n")
PERIODIC = ("pa", "slowmo", "pso-ps")
NAMES = {"pa": "PA", "slowmo": "SlowMo", "pso-ps": "PSO-PS centre"}
LINKS = {"1gbit": Link("1gbit", 50e-6, gbit(1), shared=True),
         "100mbit": Link("100mbit", 50e-6, gbit(0.1), shared=True)}
FAST = "1gbit"  # where SSGD runs whole


def mode_of(r: Run) -> str:
    """'' (blocking fp32), 'overlap', 'overlap bf16' or 'overlap int8'."""
    return r.get("variant", "").removeprefix("centre").strip()


def row_name(algo: str, mode: str) -> str:
    return f"{NAMES[algo]}{', ' + mode if mode else ' (blocking fp32)'}"


def cells(runs: list[Run]) -> list[tuple]:
    keys = {(r["dataset"], r["model"], r["link"], r["ranks"], r["sync_every"])
            for r in runs if r["algo"] in PERIODIC}
    return sorted(keys, key=lambda k: (k[0], k[2] != FAST, k[3], k[4]))


def of(runs: list[Run], cell: tuple, algo: str, mode: str | None = None) -> list[Run]:
    dataset, model, link, ranks, sync = cell
    return [r for r in runs if (r["dataset"], r["model"], r["link"], r["ranks"]) ==
            (dataset, model, link, ranks) and r["algo"] == algo
            and (algo in ("ssgd", "ddp") or r["sync_every"] == sync)
            and (mode is None or mode_of(r) == mode)]


class Baseline:
    """SSGD (or DDP) in one cell: its target, time to target and share in communication."""

    def __init__(self, runs: list[Run], cell: tuple, algo: str = "ssgd") -> None:
        dataset, model, link, ranks, sync = cell
        fast = [r for r in of(runs, (dataset, model, FAST, ranks, sync), algo)
                if not r.get("max_steps")]
        self.note = ""
        self.target = (statistics.mean(r["test_acc"] for r in fast) - TARGET_DROP
                       if fast else None)
        if algo == "ddp":  # the target is SSGD's
            ssgd = Baseline(runs, cell)
            self.target = ssgd.target
        here = of(runs, cell, algo)
        self.runs = fast
        if link == FAST:
            self.time, self.reached, self.n = ttt(fast, self.target)
            self.s_epoch = median(r["s_per_epoch"] for r in fast)
            self.share = median(r.get("comm_share") for r in fast)
            return
        slow = [r for r in here if r.get("max_steps")]
        fast_epoch = median(r["s_per_epoch"] for r in fast)
        self.s_epoch = median(r["s_per_epoch"] for r in slow)
        self.share = median(r.get("comm_share") for r in slow)
        time, self.reached, self.n = ttt(fast, self.target)
        scale = None if self.s_epoch is None or not fast_epoch else self.s_epoch / fast_epoch
        self.time = None if time is None or scale is None else time * scale
        if scale is not None:
            self.note = (f" (time: the {FAST} runs' x {scale:.2f}, the ratio of s/epoch; "
                         f"{len(slow)} run(s) of {slow[0]['max_steps']} steps here)")

    @property
    def ceiling(self) -> float | None:
        return None if self.share is None or self.share >= 1 else 1 / (1 - self.share)


def cell_table(runs: list[Run], cell: tuple) -> list[str]:
    dataset, model, link, ranks, sync = cell
    ssgd, ddp = Baseline(runs, cell), Baseline(runs, cell, "ddp")
    lines = [f"### {model} ({dataset}), {link}, {ranks} ranks, `--sync-every {sync}`", "",
             f"Target {fmt(ssgd.target, '.4f')}; SSGD spends {fmt(pct(ssgd.share), '.0f')}% "
             f"of its time in communication, so the communication-free ceiling is "
             f"{fmt(ssgd.ceiling, '.2f')}x{ssgd.note}.", "",
             "| method | final test acc | s/epoch | comm % (exposed) | MB sent/rank "
             "| time to target, s (seeds) | speedup vs SSGD | share of ceiling |",
             "|---|---|---|---|---|---|---|---|"]
    for name, base in (("SSGD", ssgd), ("SSGD (DDP-gloo)", ddp)):
        if base.runs:
            speed = None if name == "SSGD" else _speed(ssgd.time, base.time)
            megabytes = median(r["comm_bytes_per_rank"] for r in base.runs) / 1e6
            lines.append(f"| {name} | {acc_cell(base.runs)} | {fmt(base.s_epoch)} "
                         f"| {fmt(pct(base.share), '.0f')} | {fmt(megabytes, '.1f')} "
                         f"| {fmt(base.time, '.1f', 'not reached')} ({base.reached}/{base.n}) "
                         f"| {fmt(speed if name != 'SSGD' else 1.0)} | – |")
    for algo in PERIODIC:
        for mode in MODES:
            group = of(runs, cell, algo, mode)
            if not group:
                continue
            time, reached, n = ttt(group, ssgd.target)
            speed = _speed(ssgd.time, time)
            ceiling = None if speed is None or ssgd.ceiling is None else speed / ssgd.ceiling
            lines.append(
                f"| {row_name(algo, mode)} | {acc_cell(group)} "
                f"| {fmt(median(r['s_per_epoch'] for r in group))} "
                f"| {fmt(pct(median(r.get('comm_share') for r in group)), '.0f')} "
                f"| {fmt(median(r['comm_bytes_per_rank'] for r in group) / 1e6, '.1f')} "
                f"| {fmt(time, '.1f', 'not reached')} ({reached}/{n}) "
                f"| **{fmt(speed)}** | {fmt(pct(ceiling), '.0f')}% |")
    return [*lines, ""]


def pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _speed(base: float | None, other: float | None) -> float | None:
    return None if base is None or other is None or other <= 0 else base / other


# ---------------------------------------------------------------------------- targets

def targets_section(runs: list[Run]) -> list[str]:
    lines = ["## Targets", ""]
    # 4 ranks, and 2 where each rank has a core of its own (4 share 2 cores here)
    mlp = [c for c in cells(runs) if c[1] == "mlp-wide" and c[2] == FAST and c[4] == 16]
    for cell in sorted(mlp, key=lambda c: -c[3]):
        ssgd = Baseline(runs, cell)
        for algo in ("slowmo", "pso-ps"):
            blocking = of(runs, cell, algo, "")
            for mode in MODES[1:]:
                group = of(runs, cell, algo, mode)
                if not group or not blocking:
                    continue
                share = _speed(ssgd.time, ttt(group, ssgd.target)[0])
                ceiling = None if share is None or not ssgd.ceiling else share / ssgd.ceiling
                comm = median(r.get("comm_share") for r in group)
                gap, level = accuracy_gap(group, blocking)
                met = (ceiling is not None and ceiling >= 0.95 and comm is not None
                       and comm <= 0.05 and level is True)
                lines.append(
                    f"- mlp-wide at 1 Gbit/s, {cell[3]} ranks, {row_name(algo, mode)}: "
                    f"{fmt(pct(ceiling), '.0f')}% of the ceiling (target >= 95%), exposed "
                    f"communication {fmt(pct(comm), '.1f')}% (target <= 5%), final accuracy "
                    f"{gap:+.4f} against blocking fp32 ({LEVEL[level]}): "
                    f"**{'met' if met else 'not met'}**.")
    slow = [c for c in cells(runs) if c[2] == "100mbit"]
    best: dict[str, tuple[float, str]] = {}
    for cell in slow:
        ssgd = Baseline(runs, cell)
        for algo in PERIODIC:
            for mode in MODES:
                group = of(runs, cell, algo, mode)
                speed = _speed(ssgd.time, ttt(group, ssgd.target)[0]) if group else None
                if speed is None or not ssgd.ceiling:
                    continue
                share = speed / ssgd.ceiling
                where = f"{row_name(algo, mode)}, `--sync-every {cell[4]}`"
                if share > best.get(cell[1], (-1.0, ""))[0]:
                    best[cell[1]] = (share, where)
    for model, (share, where) in sorted(best.items()):
        lines.append(f"- {model} at 100 Mbit/s: best {fmt(pct(share), '.0f')}% of the ceiling "
                     f"({where}; target >= 90%): **{'met' if share >= 0.9 else 'not met'}**.")
    lines += int8_target(runs)
    return [*lines, ""]


LEVEL = {True: "within the seed spread", False: "outside the seed spread",
         None: "one seed: no spread to judge by"}


def accuracy_gap(mine: list[Run], base: list[Run]) -> tuple[float, bool | None]:
    """Mean final accuracy of ``mine`` less ``base``'s, and whether that is within the larger
    seed standard deviation of the two (None with fewer than two seeds on either side)."""
    gap = (statistics.mean(r["test_acc"] for r in mine)
           - statistics.mean(r["test_acc"] for r in base))
    if min(len(mine), len(base)) < 2:
        return gap, None
    return gap, abs(gap) <= max(spread(mine), spread(base))


def int8_target(runs: list[Run]) -> list[str]:
    """int8 against fp32, both in flight: bytes and final accuracy, cell by cell."""
    ratios, outside, judged = [], [], 0
    for cell in cells(runs):
        for algo in PERIODIC:
            fp32, int8 = of(runs, cell, algo, "overlap"), of(runs, cell, algo, "overlap int8")
            if not fp32 or not int8:
                continue
            ratio = (median(r["comm_bytes_per_rank"] for r in int8)
                     / median(r["comm_bytes_per_rank"] for r in fp32))
            ratios.append((ratio, f"{NAMES[algo]} in {cell[1]} {cell[2]} p{cell[3]}"))
            gap, level = accuracy_gap(int8, fp32)
            judged += level is not None
            if level is False:
                outside.append(f"{NAMES[algo]} in {cell[1]} {cell[2]} p{cell[3]} n{cell[4]} "
                               f"({gap:+.4f})")
    if not ratios:
        return []
    high = [f"{where} ({ratio:.3f}x)" for ratio, where in ratios if ratio > 0.3]
    met = not high and not outside and judged == len(ratios)
    return [f"- int8 against fp32 (both in flight), {len(ratios)} method-cells: bytes per rank "
            f"{min(r for r, _ in ratios):.3f}x to {max(r for r, _ in ratios):.3f}x (target "
            f"<= 0.3x" + (f"; above it: {'; '.join(high)}" if high else "") + "); final "
            f"accuracy outside the seed spread in {len(outside)} of the {judged} with two "
            "seeds or more" + (f": {'; '.join(outside)}" if outside else "") + ": **"
            + ("met" if met else "not met") + "**."]


# ---------------------------------------------------------------------------- cost model

def landing_steps(r: Run) -> int:
    """The steps a run's rounds were left in flight (0: blocking)."""
    extra = list(r.get("extra", []))
    if "--overlap" not in extra:
        return 0
    if "--overlap-steps" in extra:
        return int(extra[extra.index("--overlap-steps") + 1])
    return -(-r["sync_every"] // 4)


def model_method(r: Run) -> str:
    if r["algo"] != "pso-ps":
        return r["algo"]
    return pso_method(r.get("exchange") or "best", needs_mean=True)


def rounds_of(r: Run) -> int:
    """Rounds of a run: its record's, or counted as the loop makes them (blocking: one
    more at each epoch's end that the period does not divide)."""
    if r.get("rounds"):
        return int(r["rounds"])
    steps, epochs = r["steps"], max(r["epochs_run"], 1)
    if landing_steps(r):
        return steps // r["sync_every"] + 1
    return epochs * math.ceil(steps / epochs / r["sync_every"])


def costmodel_section(runs: list[Run]) -> list[str]:
    """Predicted against measured exposed time a round. A round in flight also costs its
    rank some work of its own (the snapshot, encoding and decoding, the progress tests,
    the landing's arithmetic): one constant per parameter, fitted on the 2-rank settings
    (where every rank has a core, so no rank waits for one that is descheduled) and added to
    every in-flight prediction."""
    settings: dict[tuple, list[Run]] = {}
    for r in runs:
        if r["algo"] in PERIODIC and r.get("comm_s") is not None and r["link"] in LINKS:
            settings.setdefault((r["model"], r["link"], r["ranks"], r["sync_every"],
                                 r["algo"], mode_of(r)), []).append(r)
    rows = []
    for key in sorted(settings):
        group = settings[key]
        link, ranks, mode, r0 = key[1], key[2], key[5], group[0]
        dtype = "int8" if "int8" in mode else "bf16" if "bf16" in mode else "fp32"
        k = landing_steps(r0)
        predicted, measured = [], []
        for r in group:
            step_s = (r["wall_s"] - r["comm_s"]) / max(r["steps"], 1)
            predicted.append(exposed_round_time(model_method(r), r["num_params"], ranks,
                                                LINKS[link], dtype, k * step_s))
            measured.append(r["comm_s"] / rounds_of(r))
        whole = round_time(model_method(r0), r0["num_params"], ranks, LINKS[link], dtype)
        rows.append((key, k, whole, statistics.median(predicted), statistics.median(measured),
                     r0["num_params"]))
    own = [(meas - pred) / n for key, k, _, pred, meas, n in rows if k and key[2] == 2]
    per_param = statistics.median(own) if own else 0.0
    lines = ["## The cost model's round against the measured one", "",
             f"A round in flight costs its rank {per_param * 1e9:.1f} ns a parameter of its own "
             f"work (fitted on the {len(own)} in-flight settings at 2 ranks), added below to "
             "the link's share; the error is a share of the whole round's predicted time.", "",
             "| model | link | ranks | sync | method | lands after | predicted round, ms "
             "| predicted exposed, ms | measured exposed, ms | error (share of the round) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    errors: dict[int, list[float]] = {}
    for key, k, whole, pred, meas, n in rows:
        model, link, ranks, sync, algo, mode = key
        pred += per_param * n if k else 0.0
        error = (pred - meas) / whole if whole else 0.0
        errors.setdefault(ranks, []).append(abs(error))
        lines.append(f"| {model} | {link} | {ranks} | {sync} | {row_name(algo, mode)} "
                     f"| {k or 'blocking'} | {whole * 1e3:.0f} | {pred * 1e3:.0f} "
                     f"| {meas * 1e3:.0f} | {error:+.0%} |")
    lines.append("")
    for ranks, errs in sorted(errors.items()):
        within = sum(e <= 0.25 for e in errs)
        lines.append(f"- {ranks} ranks: {len(errs)} settings, median |error| "
                     f"{statistics.median(errs):.0%}, largest {max(errs):.0%}; {within} within "
                     "±25% (the target).")
    return [*lines, ""]


# ---------------------------------------------------------------------------- the landing step

def landing_section(raw: Path) -> list[str]:
    """Final accuracy against K, the steps a round is in flight (``--groups overlap-k``)."""
    runs = [r for r in ok(load(raw)[0]) if r.get("group") == "overlap-k"]
    if not runs:
        return []
    ks = sorted({landing_steps(r) for r in runs})
    lines = ["## The landing step", "",
             f"mlp-wide on MNIST-1D, 4 ranks, `--sync-every 16`, 12 epochs, on the machine as it "
             f"is (no emulated link), int8 rounds landing K steps after they start, against "
             f"blocking fp32; final test accuracy, mean (min – max) over "
             f"{len({r['seed'] for r in runs})} seeds (`python bench/sweep.py --groups "
             f"overlap-k --seeds 0,1,2 --out {raw}`).", "",
             "| method | blocking fp32 | " + " | ".join(f"K = {k}" for k in ks if k) + " |",
             "|---|---|" + "---|" * len([k for k in ks if k])]
    for algo in PERIODIC:
        mine = [r for r in runs if r["algo"] == algo]
        cells_ = [acc_cell([r for r in mine if landing_steps(r) == k]) for k in ks]
        lines.append(f"| {NAMES[algo]} | " + " | ".join(cells_) + " |")
    return [*lines, ""]


# ---------------------------------------------------------------------------- plot

def plot(runs: list[Run], path: Path) -> bool:
    """Test accuracy against wall-clock, a panel per cell: SSGD, and each method blocking
    (dashed) and in flight in int8 (solid); seed 0."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = cells(runs)
    if not keys:
        return False
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.3 * rows), squeeze=False)
    colors = {"pa": "tab:orange", "slowmo": "tab:purple", "pso-ps": "tab:green"}
    for ax, cell in zip(axes.flat, keys, strict=False):
        ssgd = Baseline(runs, cell)
        scale = 1.0 if ssgd.time is None or not ssgd.runs else (
            ssgd.time / (ttt(ssgd.runs, ssgd.target)[0] or ssgd.time))
        for r in [r for r in ssgd.runs if r["seed"] == 0]:
            ax.plot([c[1] * scale for c in r["curve"]], [c[2] for c in r["curve"]],
                    color="tab:blue", label="SSGD")
        for algo in PERIODIC:
            for mode, style in (("", "--"), ("overlap int8", "-")):
                for r in [r for r in of(runs, cell, algo, mode) if r["seed"] == 0]:
                    ax.plot([c[1] for c in r["curve"]], [c[2] for c in r["curve"]], style,
                            color=colors[algo], label=row_name(algo, mode))
        if ssgd.target is not None:
            ax.axhline(ssgd.target, color="black", ls=":", lw=1)
        ax.set_xscale("log")
        ax.set_title(f"{cell[1]}, {cell[2]}, p{cell[3]}, n{cell[4]}", fontsize=9)
        ax.set_xlabel("wall-clock (s)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes[0][0].set_ylabel("test accuracy")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


# ---------------------------------------------------------------------------- main

def write_report(raw: Path, out_dir: Path, landing: Path | None = None) -> Path:
    all_runs, meta = load(raw)
    runs = [r for r in ok(all_runs) if r.get("group") == "exchange"]
    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["# Hiding and shrinking the exchange: rounds in flight, bf16 and int8", "",
             f"Generated by `python bench/exchange_report.py {raw}` from its runs.jsonl; how "
             "the runs were made: `bench/sweep.py --groups exchange`; definitions: this "
             "script's docstring.", ""]
    invocations = [meta, *meta.get("resumed", [])] if meta else []
    for inv in invocations:
        lines.append(f"- `{inv.get('command', '?')}`: started {inv.get('started', '?')}, "
                     f"{inv.get('duration_s', 'not finished')} s.")
    machine = meta.get("machine", {}) if meta else {}
    lines += ["", f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cores', '?')} "
              f"cores; links: {', '.join(meta.get('links', {})) if meta else '?'} (emulated: "
              "one shared link for all ranks, bench/netem.py). "
              f"{len(runs)} runs, {len({r['seed'] for r in runs})} seed(s); the median "
              "1-minute load at their start "
              f"{fmt(median(r.get('load_avg') for r in runs), '.1f')}.", ""]
    lines += targets_section(runs)
    lines += ["## Every cell", ""]
    for cell in cells(runs):
        lines += cell_table(runs, cell)
    if plot(runs, out_dir / "exchange.png"):
        lines += ["![exchange.png](exchange.png)", ""]
    lines += costmodel_section(runs)
    if landing is not None:
        lines += landing_section(landing)
    failed = [r for r in all_runs if r.get("rc") != 0]
    if failed:
        lines += ["## Failed runs", ""] + [f"- `{r['key']}`: exit {r.get('rc')}" for r in failed]
    report = out_dir / "REPORT.md"
    report.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("raw", type=Path, help="the sweep's --out folder (runs.jsonl, sweep.json)")
    p.add_argument("--out-dir", type=Path, help="where REPORT.md goes (default: raw)")
    p.add_argument("--landing", type=Path, help="a sweep of --groups overlap-k, reported too")
    args = p.parse_args(argv)
    if not (args.raw / "runs.jsonl").is_file():
        print(f"exchange_report: error: {args.raw / 'runs.jsonl'} not found; run "
              f"bench/sweep.py --groups exchange --out {args.raw} first", file=sys.stderr)
        return 2
    print(write_report(args.raw, args.out_dir or args.raw, args.landing))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
