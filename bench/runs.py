"""The runs of a sweep (bench/sweep.py's ``runs.jsonl``): loading, selecting, and the time
to reach a target accuracy. Shared by the report's tables (report.py) and its plots
(figures.py)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable
from pathlib import Path

TARGET_DROP = 0.01
LINK_ORDER = ("shm", "10gbit", "1gbit")
# The methods a sweep compares, in the order tables list them; PSO-PS runs name their preset.
DEFAULT_PSO = "pso-ps[centre]"  # PSO-PS's default preset (psops_mpi/config.py)
METHOD_LABEL = {"ssgd": "SSGD", "ddp": "SSGD (DDP-gloo)", "pa": "PA", "slowmo": "SlowMo",
                "pso-ps[paper]": "PSO-PS paper", "pso-ps[centre]": "PSO-PS centre (default)"}
COLORS = {"ssgd": "tab:blue", "ddp": "tab:gray", "pa": "tab:orange", "slowmo": "tab:purple",
          "pso-ps[paper]": "tab:olive", "pso-ps[centre]": "tab:green"}

Run = dict


def method(r: Run) -> str:
    """A run's method: its algorithm, with its PSO-PS variant in brackets."""
    return f"{r['algo']}[{r['variant']}]" if r.get("variant") else r["algo"]


def label(name: str) -> str:
    return METHOD_LABEL.get(name, name.replace("pso-ps[", "PSO-PS ").rstrip("]"))


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


def spread(runs: list[Run]) -> float:
    """The seed spread of a setting: the standard deviation of its final accuracies."""
    accs = [r["test_acc"] for r in runs]
    return statistics.stdev(accs) if len(accs) > 1 else 0.0


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


def time_to(curve: list[list[float]], target: float) -> float | None:
    """Wall-clock at the end of the first epoch whose test accuracy reaches ``target``."""
    for _, wall, acc in curve:
        if acc >= target:
            return wall
    return None


def target_of(runs: list[Run], key: tuple) -> float | None:
    ssgd = [r["test_acc"] for r in runs if setting(r) == key and r["algo"] == "ssgd"]
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
