"""The language-model sweep: SSGD, PA, SlowMo, DiLoCo's outer Nesterov and PSO-PS training
the byte-level GPT on English text (``--dataset fortunes``) with the modern recipe, side by
side: final test perplexity and bytes sent per rank.

Every run is one real job, ``mpiexec -n 4 python -m psops_mpi.train --dataset fortunes
--model M --optimizer adamw --lr LR --warmup-steps W --clip-grad-norm 1 ...``, with the same
model, data order, recipe and number of optimizer steps (``--max-steps``); the methods:

* ``ssgd``: one gradient Allreduce per step (run once per seed: it has no period);
* ``pa``: periodic averaging every ``--sync-every`` steps;
* ``slowmo``: PA then SlowMo's heavy-ball outer step (psops_mpi's defaults: alpha 1, beta 0.4);
* ``diloco``: DiLoCo's outer Nesterov step (alpha 0.7, beta 0.9; Douillard et al. 2023);
* ``pso``: PSO-PS's default preset;
* ``pso-search``, ``elastic``, ``elastic-0.25``: PSO-PS searching the learning rate, and the
  elastic swarm at rho 0.5 and 0.25 (the swarm's own grid, with ``--lrs``);
* ``pa-int8``, ``slowmo-int8``, ``diloco-int8``, ``pso-int8``: those methods with their rounds
  in flight (``--overlap``) and encoded in int8;
* ``pa-avg`` ... ``pso-avg``: with the ranks' AdamW moments averaged at every round
  (``--average-optimizer-state``); ``pa-warm`` ... ``pso-warm``: with the first 100 steps
  taken as SSGD's (``--local-after-steps 100``).

By default (``--methods``) the first five.

at ``--sync-every`` 16, 64 and 256 and seeds 0-2, at ``--lr`` or at each of ``--lrs``. Each
run is appended to ``OUT/runs.jsonl`` as soon as it ends; ``--resume`` skips the runs already
there, so the sweep runs in pieces (``--max-runs N`` stops after N new runs). ``--report``
prints the table (medians and ranges over seeds) and the target: SlowMo or DiLoCo at
``--sync-every 64`` within 5% of SSGD's perplexity with at least 20x fewer bytes; for several
starting rates, a column per rate and the search against SlowMo.

    python bench/lm_sweep.py --out bench/results/lm --resume --max-runs 10
    python bench/lm_sweep.py --out bench/results/lm --report > bench/results/lm/REPORT.md

Rounds in flight and in int8 against blocking fp32 (the blocking runs are bench/results/lm's):

    python bench/lm_sweep.py --out bench/results/lm --methods pa-int8,slowmo-int8,diloco-int8,\
pso-int8 --syncs 16,64 --resume

The swarm's own grid on the language model:

    python bench/lm_sweep.py --out bench/results/lm-search --methods pa,slowmo,pso,pso-search,\
elastic,elastic-0.25 --syncs 16 --lrs 0.001,0.003,0.01,0.03 --resume
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobs  # bench/ is on the path now

METHODS: dict[str, list[str]] = {
    "ssgd": ["--algo", "ssgd"],
    "pa": ["--algo", "pa"],
    "slowmo": ["--algo", "slowmo"],
    "diloco": ["--algo", "slowmo", "--outer-nesterov", "--outer-lr", "0.7",
               "--outer-momentum", "0.9"],
    "pso": ["--algo", "pso-ps"],
    "pso-search": ["--algo", "pso-ps", "--pso-preset", "search"],
    "elastic": ["--algo", "pso-ps", "--pso-preset", "elastic"],
    "elastic-0.25": ["--algo", "pso-ps", "--pso-preset", "elastic", "--rho", "0.25"],
}
# The same methods with their rounds in flight and encoded in int8 (the exchange's issue):
# against their blocking fp32 runs, perplexity at equal steps.
INT8 = ["--overlap", "--exchange-dtype", "int8"]
METHODS.update({f"{m}-int8": [*METHODS[m], *INT8] for m in ("pa", "slowmo", "diloco", "pso")})
# The language model's own options (its issue): the ranks' AdamW moments averaged at every
# round, and the first 100 steps (the warmup's) taken as SSGD's (post-local SGD).
OPTIONS = {"avg": ["--average-optimizer-state"], "warm": ["--local-after-steps", "100"]}
METHODS.update({f"{m}-{o}": [*METHODS[m], *flags] for o, flags in OPTIONS.items()
                for m in ("pa", "slowmo", "diloco", "pso")})
BASE = "ssgd,pa,slowmo,diloco,pso"  # the default --methods
DEFAULT_LR = 3e-3  # runs at this rate keep the keys they had before --lrs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default=BASE)
    p.add_argument("--syncs", default="16,64,256")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--model", default="gpt-tiny")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of every run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=DEFAULT_LR)
    p.add_argument("--lrs", default="", help="starting rates, comma-separated (default: --lr)")
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="skip the runs already in OUT")
    p.add_argument("--max-runs", type=int, default=0, help="stop after this many new runs")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--report", action="store_true", help="print the table of OUT and exit")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[dict]:
    """Every run: (method, sync period, starting rate, seed), SSGD once per seed and rate."""
    runs = []
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else [args.lr]
    for seed in map(int, args.seeds.split(",")):
        for lr in lrs:
            for method in args.methods.split(","):
                syncs = [1] if method == "ssgd" else list(map(int, args.syncs.split(",")))
                runs += [{"method": method, "sync_every": n, "seed": seed, "lr": lr}
                         for n in syncs]
    return runs


def train_args(args: argparse.Namespace, run: dict) -> list[str]:
    return ["--dataset", "fortunes", "--model", args.model, "--optimizer", "adamw",
            "--lr", str(run["lr"]), "--warmup-steps", str(args.warmup_steps),
            "--clip-grad-norm", "1.0", "--batch-size", str(args.batch_size),
            "--epochs", "1000", "--max-steps", str(args.steps), "--seed", str(run["seed"]),
            "--sync-every", str(run["sync_every"]), "--threads", "1", "--quiet",
            *METHODS[run["method"]]]


def key(run: dict) -> str:
    lr = run.get("lr", DEFAULT_LR)
    return f"{run['method']}/n{run['sync_every']}/s{run['seed']}" + (
        "" if lr == DEFAULT_LR else f"/lr{lr:g}")


def sweep(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "runs.jsonl"
    done = {r["key"] for r in read(results)} if args.resume and results.exists() else set()
    if not args.resume:
        results.unlink(missing_ok=True)
    (args.out / "settings.json").write_text(json.dumps(vars(args), default=str, indent=1))
    todo = [r for r in plan(args) if key(r) not in done]
    for count, run in enumerate(todo[:args.max_runs or None], 1):
        job = jobs.run_job(train_args(args, run), args.ranks, timeout=args.timeout)
        record = {**run, "key": key(run), "cmd": jobs.shown(job.cmd), "rc": job.rc,
                  "launch_s": round(job.seconds, 1), "started": jobs.now()}
        final = job.final
        if final is not None:
            record.update({k: final.get(k) for k in (
                "test_loss", "test_ppl", "train_loss", "steps", "wall_s",
                "comm_bytes_per_rank", "comm_s", "grad_norm", "restarts")})
        else:
            record["error"] = job.error
        with results.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        print(f"[{count}/{len(todo)}] {record['key']}: ppl {record.get('test_ppl')} "
              f"bytes {record.get('comm_bytes_per_rank')} ({record['launch_s']} s)",
              flush=True)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def report(args: argparse.Namespace) -> None:
    """The table of OUT: per period against SSGD, or, for several starting rates, the swarm's
    grid (a column per rate)."""
    rows = read(args.out / "runs.jsonl")
    cells: dict[tuple[str, int, float], list[dict]] = {}
    for r in rows:
        if r.get("test_ppl") is not None:
            cells.setdefault((r["method"], r["sync_every"], r.get("lr", DEFAULT_LR)), []).append(r)
    if len({lr for _, _, lr in cells}) > 1:
        swarm_grid(cells)
    else:
        against_ssgd({(m, n): c for (m, n, _), c in cells.items()})
    failed = [r["key"] for r in rows if r.get("test_ppl") is None]
    if failed:
        print(f"\nRuns without a final line: {', '.join(failed)}")


def against_ssgd(cells: dict[tuple[str, int], list[dict]]) -> None:
    ssgd = cells.get(("ssgd", 1), [])
    base_ppl = statistics.median(r["test_ppl"] for r in ssgd) if ssgd else None
    base_bytes = statistics.median(r["comm_bytes_per_rank"] for r in ssgd) if ssgd else None
    print("| method | --sync-every | seeds | test perplexity, median (range) | vs SSGD | "
          "bytes per rank | SSGD's bytes / these |")
    print("|---|---|---|---|---|---|---|")
    for (method, n), rows in sorted(cells.items(), key=lambda c: (list(METHODS).index(c[0][0]),
                                                                   c[0][1])):
        ppl = [r["test_ppl"] for r in rows]
        sent = statistics.median(r["comm_bytes_per_rank"] for r in rows)
        vs = f"{statistics.median(ppl) / base_ppl - 1:+.1%}" if base_ppl else ""
        fewer = f"{base_bytes / sent:.0f}x" if base_bytes and sent else ""
        print(f"| {method} | {n if method != 'ssgd' else 'every step'} | {len(rows)} | "
              f"{statistics.median(ppl):.3f} ({min(ppl):.3f}-{max(ppl):.3f}) | {vs} | "
              f"{sent:,.0f} | {fewer} |")
    for method in ("slowmo", "diloco"):
        rows = cells.get((method, 64), [])
        if rows and base_ppl and base_bytes:
            ppl = statistics.median(r["test_ppl"] for r in rows)
            ratio = base_bytes / statistics.median(r["comm_bytes_per_rank"] for r in rows)
            met = ppl <= 1.05 * base_ppl and ratio >= 20
            print(f"\nTarget, {method} at --sync-every 64: perplexity {ppl:.3f} against SSGD's "
                  f"{base_ppl:.3f} ({ppl / base_ppl - 1:+.1%}; within 5%: "
                  f"{'yes' if ppl <= 1.05 * base_ppl else 'no'}), {ratio:.0f}x fewer bytes "
                  f"(at least 20x: {'yes' if ratio >= 20 else 'no'}): "
                  f"{'met' if met else 'not met'}")
    int8_against_fp32(cells)


def int8_against_fp32(cells: dict[tuple[str, int], list[dict]]) -> None:
    """Each method in flight and in int8 against itself blocking in fp32, at equal steps:
    the paired change in perplexity (same seed), and whether the medians differ by more than
    the larger of the two ranges over seeds (the target: within the spread)."""
    pairs = [(m, n) for (m, n) in cells if m.endswith("-int8") and (m[:-5], n) in cells]
    if not pairs:
        return
    print("\nIn flight and in int8 (`--overlap --exchange-dtype int8`) against blocking fp32, "
          "the same steps and seeds (`python bench/lm_sweep.py --out bench/results/lm "
          "--methods pa-int8,slowmo-int8,diloco-int8,pso-int8 --syncs 16,64 --resume`):\n")
    print("| method | --sync-every | fp32, median (range) | int8 in flight, median (range) | "
          "paired change, median (range) | within the spread | bytes, int8 / fp32 |")
    print("|---|---|---|---|---|---|---|")
    for method, n in sorted(pairs, key=lambda c: (list(METHODS).index(c[0]), c[1])):
        fp32, int8 = cells[(method[:-5], n)], cells[(method, n)]
        by_seed = {r["seed"]: r["test_ppl"] for r in fp32}
        change = [r["test_ppl"] / by_seed[r["seed"]] - 1 for r in int8 if r["seed"] in by_seed]
        a, b = [r["test_ppl"] for r in fp32], [r["test_ppl"] for r in int8]
        spread = max(max(a) - min(a), max(b) - min(b))
        within = ("one seed" if min(len(a), len(b)) < 2 else
                  "yes" if abs(statistics.median(b) - statistics.median(a)) <= spread else "no")
        ratio = (statistics.median(r["comm_bytes_per_rank"] for r in int8)
                 / statistics.median(r["comm_bytes_per_rank"] for r in fp32))
        print(f"| {method[:-5]} | {n} | {statistics.median(a):.3f} ({min(a):.3f}-{max(a):.3f}) "
              f"| {statistics.median(b):.3f} ({min(b):.3f}-{max(b):.3f}) | "
              f"{statistics.median(change):+.1%} ({min(change):+.1%} to {max(change):+.1%}) | "
              f"{within} | {ratio:.2f} |")


def swarm_grid(cells: dict[tuple[str, int, float], list[dict]]) -> None:
    """Median test perplexity (range, seeds) per method and starting rate; then the search
    against SlowMo: at SlowMo's best rate, and at the same rate and seed."""
    lrs = sorted({lr for _, _, lr in cells})
    for n in sorted({n for _, n, _ in cells}):
        print(f"--sync-every {n}: test perplexity, median (range, seeds)\n")
        print("| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |")
        print("|---|" + "---|" * len(lrs))
        for method in (m for m in METHODS if any(k[:2] == (m, n) for k in cells)):
            shown = []
            for lr in lrs:
                ppl = [r["test_ppl"] for r in cells.get((method, n, lr), [])]
                shown.append(f"{statistics.median(ppl):.3f} ({min(ppl):.3f}-{max(ppl):.3f}, "
                             f"{len(ppl)})" if ppl else "-")
            print(f"| {method} | " + " | ".join(shown) + " |")
        print()
        search_against_slowmo(cells, n, lrs)


def search_against_slowmo(cells: dict, n: int, lrs: list[float]) -> None:
    def med(method: str, lr: float) -> float | None:
        rows = cells.get((method, n, lr), [])
        return statistics.median(r["test_ppl"] for r in rows) if rows else None
    slowmo = {lr: m for lr in lrs if (m := med("slowmo", lr)) is not None}
    if not slowmo:
        return
    best_lr = min(slowmo, key=lambda lr: slowmo[lr])
    print(f"SlowMo's best starting rate: {best_lr:g} (perplexity {slowmo[best_lr]:.3f}).\n")
    for lr in lrs:
        search = med("pso-search", lr)
        if search is None or lr not in slowmo:
            continue
        by_seed = {r["seed"]: r["test_ppl"] for r in cells[("slowmo", n, lr)]}
        gaps = [r["test_ppl"] - by_seed[r["seed"]] for r in cells[("pso-search", n, lr)]
                if r["seed"] in by_seed]
        spread = max(by_seed.values()) - min(by_seed.values())
        print(f"- from lr {lr:g}: the search {search:.3f}, {search / slowmo[best_lr] - 1:+.1%} "
              f"against SlowMo's best; against SlowMo from the same rate and seed "
              f"{statistics.median(gaps):+.3f} (SlowMo's spread there {spread:.3f})")
    print()


if __name__ == "__main__":
    parsed = parse_args()
    report(parsed) if parsed.report else sweep(parsed)
