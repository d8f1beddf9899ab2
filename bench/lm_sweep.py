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
* ``pso``: PSO-PS's default preset.

at ``--sync-every`` 16, 64 and 256 and seeds 0-2. Each run is appended to ``OUT/runs.jsonl``
as soon as it ends; ``--resume`` skips the runs already there, so the sweep runs in pieces
(``--max-runs N`` stops after N new runs). ``--report`` prints the table (medians and ranges
over seeds) and the target: SlowMo or DiLoCo at ``--sync-every 64`` within 5% of SSGD's
perplexity with at least 20x fewer bytes.

    python bench/lm_sweep.py --out bench/results/lm --resume --max-runs 10
    python bench/lm_sweep.py --out bench/results/lm --report > bench/results/lm/REPORT.md
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
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--syncs", default="16,64,256")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--model", default="gpt-tiny")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of every run")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=100)
    p.add_argument("--resume", action="store_true", help="skip the runs already in OUT")
    p.add_argument("--max-runs", type=int, default=0, help="stop after this many new runs")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--report", action="store_true", help="print the table of OUT and exit")
    return p.parse_args(argv)


def plan(args: argparse.Namespace) -> list[dict]:
    """Every run: (method, sync period, seed), SSGD once per seed."""
    runs = []
    for seed in map(int, args.seeds.split(",")):
        for method in args.methods.split(","):
            syncs = [1] if method == "ssgd" else list(map(int, args.syncs.split(",")))
            runs += [{"method": method, "sync_every": n, "seed": seed} for n in syncs]
    return runs


def train_args(args: argparse.Namespace, run: dict) -> list[str]:
    return ["--dataset", "fortunes", "--model", args.model, "--optimizer", "adamw",
            "--lr", str(args.lr), "--warmup-steps", str(args.warmup_steps),
            "--clip-grad-norm", "1.0", "--batch-size", str(args.batch_size),
            "--epochs", "1000", "--max-steps", str(args.steps), "--seed", str(run["seed"]),
            "--sync-every", str(run["sync_every"]), "--threads", "1", "--quiet",
            *METHODS[run["method"]]]


def key(run: dict) -> str:
    return f"{run['method']}/n{run['sync_every']}/s{run['seed']}"


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
    runs = [r for r in read(args.out / "runs.jsonl") if r.get("test_ppl") is not None]
    failed = [r["key"] for r in read(args.out / "runs.jsonl") if r.get("test_ppl") is None]
    cells: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        cells.setdefault((r["method"], r["sync_every"]), []).append(r)
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
    if failed:
        print(f"\nRuns without a final line: {', '.join(failed)}")


if __name__ == "__main__":
    parsed = parse_args()
    report(parsed) if parsed.report else sweep(parsed)
