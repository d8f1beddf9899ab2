"""The training sweep: PSO-PS against PA, SlowMo, SSGD and PyTorch DDP, on real data and an
emulated 1 Gbit/s link.

What it measures. Every run is one real training job, ``mpiexec -n P python -m
psops_mpi.train ... --metrics-out F`` (or ``bench/ddp_ssgd.py``, the same SSGD training through
``DistributedDataParallel`` with gloo), and from its JSON-lines metrics it keeps: final test
accuracy, time per epoch, the accuracy curve against wall-clock (for the time to reach a target
accuracy), bytes sent per rank, and the share of the run spent inside MPI. Every method gets
the same model, optimizer (the defaults: SGD, lr 0.1, momentum 0.9, weight decay 5e-4, cosine
schedule), batch size (32 per rank), data shards and number of samples; ``--threads 1``.

The methods (``--algos`` picks some by name): ``ssgd``; ``ddp`` (link grid only); ``pa``;
``slowmo`` (its defaults); ``pso-paper`` (``--pso-preset paper``, psops_mpi 0.1's default);
``pso`` (PSO-PS's default preset, named explicitly); and on MNIST-1D the PSO-PS variants
explored by ``bench/coef_scan.py --group rules`` (``VARIANTS`` below).

The plan (``--quick`` shrinks it to a few minutes):

* accuracy grid, on the machine as it is (``shm``): method x ``--sync-every`` {4, 16, 64}
  x dataset {mnist1d (cnn1d, 60 epochs), fashion-mnist (lenet, 10 epochs; real files)} x
  ranks {4, 8, 16}, per seed. The ranks share the machine's cores, so times there are not
  reported; final accuracy does not depend on how ranks share cores (each rank's arithmetic
  is the same whatever the scheduling: see the report);
* link grid, 4 ranks, ``--sync-every 16``, emulated 1 Gbit/s (bench/netem.py, needs root):
  {ssgd, ddp, pa, slowmo, pso-paper, pso} on a communication-heavy model (``mlp-wide``, 1.1M
  parameters, on mnist1d, 12 epochs) and on LeNet (fashion-mnist, 10 epochs): time to reach
  SSGD's final accuracy minus 1 point;
* scaling grid (only when asked: ``--groups scaling``), the cost model's validation: SSGD,
  PA and PSO-PS with each exchange, mlp-wide on mnist1d for 3 epochs, ``--sync-every 2``,
  at 2, 4 and 8 ranks on shm and emulated 1 and 10 Gbit/s links (root); see
  ``bench/scaling_model.py validate``.

Seeds are done one after the other (``--seeds``); within a seed the runs are shuffled with a
fixed seed so load from other jobs on the machine spreads evenly over the configurations,
except that each psops_mpi SSGD run and its DDP twin stay next to each other. Each run is
appended to ``OUT/runs.jsonl`` as soon as it ends, so a partial sweep can be reported, and
``--resume`` skips runs already there and adds to them (for instance another seed or dataset:
``--resume --seeds 2 --datasets mnist1d``); each invocation's command, machine and duration
are kept in ``OUT/sweep.json``. ``--groups accuracy`` or ``--groups link`` runs one grid.

Run it (not under MPI itself: it starts one job per run)::

    nohup python bench/sweep.py --out bench/results/raw > sweep.log 2>&1 &
    python bench/sweep.py --quick --out /tmp/quick && python bench/report.py /tmp/quick
    python bench/sweep.py --launcher srun ...   # inside an allocation: `srun -n P --mpi=pmi2`

With ``--launcher srun`` each job is started by ``srun -n P --mpi=pmi2`` (MPICH; give
``--srun-mpi pmix`` for Open MPI) inside the current allocation; emulated links need
``mpiexec`` (Slurm starts its tasks outside the namespace) and real links need no emulation.
bench/results/REPORT.md states each invocation's measured duration.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jobs
import netem

REPO = jobs.REPO
SYNC_PERIODS = (4, 16, 64)
# dataset -> (model, epochs) of the accuracy grid
ACCURACY_SETUPS = {"mnist1d": ("cnn1d", 60), "fashion-mnist": ("lenet", 10)}
ACCURACY_RANKS = (4, 8, 16)
# (dataset, model, epochs) of the link grid at 4 ranks, --sync-every 16, 1 Gbit/s
LINK_SETUPS = (("mnist1d", "mlp-wide", 12), ("fashion-mnist", "lenet", 10))
LINK_RANKS, LINK_SYNC, LINK = 4, 16, "1gbit"
# The cost model's validation grid (bench/scaling_model.py validate): a communication-heavy
# model with a round every 2 steps, at 2, 4 and 8 ranks on every link; PSO-PS with each
# exchange named (SlowMo's round is PA's).
SCALING_SETUP = ("mnist1d", "mlp-wide", 3)
SCALING_RANKS, SCALING_SYNC, SCALING_LINKS = (2, 4, 8), 2, ("shm", "1gbit", "10gbit")
SCALING_METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "pso-allgather": ("pso-ps", "centre allgather",
                      ("--pso-preset", "centre", "--exchange", "allgather")),
    "pso-best": ("pso-ps", "centre best", ("--pso-preset", "centre", "--exchange", "best")),
}
# method -> (--algo, variant label, extra flags); PSO-PS always names its preset
METHODS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "ssgd": ("ssgd", "", ()),
    "ddp": ("ddp", "", ()),
    "pa": ("pa", "", ()),
    "slowmo": ("slowmo", "", ()),
    "pso-paper": ("pso-ps", "paper", ("--pso-preset", "paper")),
    "pso": ("pso-ps", "centre", ("--pso-preset", "centre")),
    "pso-search": ("pso-ps", "search", ("--pso-preset", "search")),
    "elastic": ("pso-ps", "elastic", ("--pso-preset", "elastic")),
    "elastic-0.25": ("pso-ps", "elastic rho=0.25", ("--pso-preset", "elastic", "--rho", "0.25")),
}
# The swarm's own grid (--groups search): at 8 ranks, --sync-every 16, from four learning
# rates, the averaging peers beside the PSO-PS default, its learning-rate search and the
# elastic swarm.
SEARCH_METHODS = ("pa", "slowmo", "pso", "pso-search", "elastic", "elastic-0.25")
SEARCH_RANKS, SEARCH_SYNC, SEARCH_LRS = 8, 16, ("0.01", "0.03", "0.1", "0.3")
ACCURACY_METHODS = ("ssgd", "pa", "slowmo", "pso-paper", "pso")
# The exchange grid (--groups exchange): each periodic method blocking in fp32, with its
# rounds left in flight (--overlap), and in flight encoded in bf16 and int8, on emulated
# links, with SSGD and DDP beside them. Cells: (link, ranks, sync period); mlp-wide also at
# 2 ranks, where each rank has a core of its own.
EXCHANGE_SETUPS = {"mnist1d": ("mlp-wide", 12), "fashion-mnist": ("lenet", 10)}
EXCHANGE_CELLS = (("1gbit", 4, 16), ("100mbit", 4, 16), ("100mbit", 4, 64))
EXCHANGE_MORE_CELLS = {"mnist1d": (("1gbit", 2, 16),)}
EXCHANGE_METHODS = ("ssgd", "ddp", "pa", "slowmo", "pso")
EXCHANGE_MODES: dict[str, tuple[str, ...]] = {
    "": (), "overlap": ("--overlap",),
    "overlap bf16": ("--overlap", "--exchange-dtype", "bf16"),
    "overlap int8": ("--overlap", "--exchange-dtype", "int8")}
# Below 1 Gbit/s also int8 rounds that land at the next round (K = the period), which hides
# the most and delays the most.
SLOW_LINK_MODE = "overlap int8 K=n"
# SSGD and DDP below 1 Gbit/s: seed 0 for two epochs. Their arithmetic is that of the
# 1 Gbit/s runs (the link changes no number), so only their time per epoch is new; the
# report scales the 1 Gbit/s runs' accuracy curves by it (bench/exchange_report.py).
SLOW_SSGD_EPOCHS = 2
# The landing step's scan (--groups overlap-k): mlp-wide on the machine as it is, 4 ranks,
# sync 16, int8 rounds landing K steps after they start, against blocking fp32.
OVERLAP_KS = (1, 2, 4, 8, 16)
# The PSO-PS variants explored on MNIST-1D (bench/results/rules), in the accuracy grid there.
VARIANTS: dict[str, tuple[str, ...]] = {
    "paper c3=0.5": ("--pso-preset", "paper", "--c3", "0.5"),
    "paper answer=mean": ("--pso-preset", "paper", "--answer", "mean"),
    "centre c2=0": ("--pso-preset", "centre", "--c2", "0"),
}


@dataclass(frozen=True)
class Spec:
    """One training job of the sweep."""

    group: str  # "accuracy", "link" or "scaling"
    link: str  # "shm" or a rate such as "1gbit"
    dataset: str
    model: str
    epochs: int
    ranks: int
    algo: str  # ssgd, ddp (SSGD through DistributedDataParallel), pa, pso-ps
    sync_every: int
    seed: int
    max_steps: int = 0
    variant: str = ""  # PSO-PS: its preset, and the options changed from it
    extra: tuple[str, ...] = ()  # the flags of that change
    flags: tuple[str, ...] = ()  # training flags of the whole sweep (--flags), or the grid's

    @property
    def key(self) -> str:
        algo = f"{self.algo}[{self.variant}]" if self.variant else self.algo
        flags = f"/f{' '.join(self.flags)}" if self.flags else ""
        return (f"{self.link}/{self.dataset}/{self.model}/e{self.epochs}/p{self.ranks}/"
                f"{algo}/n{self.sync_every}/s{self.seed}/m{self.max_steps}{flags}")

    def train_args(self) -> list[str]:
        args = ["--dataset", self.dataset, "--model", self.model, "--epochs", str(self.epochs),
                "--seed", str(self.seed), "--threads", "1", "--quiet"]
        if self.algo != "ddp":
            args += ["--algo", self.algo, "--sync-every", str(self.sync_every)]
        if self.max_steps:
            args += ["--max-steps", str(self.max_steps)]
        return [*args, *self.extra, *self.flags]


@dataclass
class Plan:
    specs: list[Spec] = field(default_factory=list)

    def add(self, **kw: object) -> None:
        spec = Spec(**kw)  # type: ignore[arg-type]
        if spec not in self.specs:
            self.specs.append(spec)


def method_runs(methods: tuple[str, ...], syncs: tuple[int, ...]) -> list[dict]:
    """Spec fields per (method, sync period): SSGD and DDP synchronise every step, so they
    run once (as sync period 1)."""
    runs = []
    for name in methods:
        algo, variant, extra = METHODS[name]
        for n in (1,) if algo in ("ssgd", "ddp") else syncs:
            runs.append({"algo": algo, "variant": variant, "extra": extra, "sync_every": n})
    return runs


def variant_runs(syncs: tuple[int, ...]) -> list[dict]:
    return [{"algo": "pso-ps", "variant": name, "extra": extra, "sync_every": n}
            for name, extra in VARIANTS.items() for n in syncs]


def build_plan(args: argparse.Namespace) -> list[list[Spec]]:
    """The runs, one list per seed, each list in its interleaved order."""
    methods = tuple(args.algos.split(","))
    passes = []
    for seed in args.seeds:
        plan = Plan()
        (_quick if args.quick else _full)(plan, seed, methods, args)
        wanted = [s for s in plan.specs
                  if args.datasets is None or s.dataset in args.datasets.split(",")]
        if args.ranks:
            wanted = at_ranks(wanted, args.ranks)
        passes.append(interleave(wanted, seed))
    return passes


def _full(plan: Plan, seed: int, methods: tuple[str, ...], args: argparse.Namespace) -> None:
    common = {"seed": seed, "max_steps": args.max_steps, "flags": tuple(args.flags.split())}
    groups = args.groups.split(",")
    if "search" in groups:
        for dataset, (model, epochs) in ACCURACY_SETUPS.items():
            for lr in SEARCH_LRS:
                for run in method_runs(tuple(m for m in methods if m in SEARCH_METHODS),
                                       (SEARCH_SYNC,)):
                    plan.add(group="search", link="shm", dataset=dataset, model=model,
                             epochs=epochs, ranks=SEARCH_RANKS, **run,
                             **{**common, "flags": (*common["flags"], "--lr", lr)})
    if "accuracy" in groups:
        for dataset, (model, epochs) in ACCURACY_SETUPS.items():
            runs = method_runs(tuple(m for m in methods if m in ACCURACY_METHODS),
                               SYNC_PERIODS)
            if dataset == "mnist1d" and "variants" in methods:
                runs += variant_runs(SYNC_PERIODS)
            for ranks in ACCURACY_RANKS:
                for run in runs:
                    if not in_cells(args.cells, ranks, run["sync_every"]):
                        continue
                    plan.add(group="accuracy", link="shm", dataset=dataset, model=model,
                             epochs=epochs, ranks=ranks, **run, **common)
    if "link" in groups:
        for dataset, model, epochs in LINK_SETUPS:
            for run in method_runs(tuple(m for m in methods if m in METHODS), (LINK_SYNC,)):
                plan.add(group="link", link=LINK, dataset=dataset, model=model,
                         epochs=epochs, ranks=LINK_RANKS, **run, **common)
    if "exchange" in groups:
        _exchange_grid(plan, methods, common)
    if "overlap-k" in groups:
        runs = [{"algo": algo, "variant": variant, "extra": extra, "sync_every": 16}
                for algo, variant, extra in (METHODS[m] for m in ("pa", "slowmo", "pso"))]
        for run in runs:
            plan.add(group="overlap-k", link="shm", dataset="mnist1d", model="mlp-wide",
                     epochs=12, ranks=4, **run, **common)
            for k in OVERLAP_KS:
                mode = ("--overlap", "--overlap-steps", str(k), "--exchange-dtype", "int8")
                plan.add(group="overlap-k", link="shm", dataset="mnist1d", model="mlp-wide",
                         epochs=12, ranks=4, **{**run, "variant": _join(run["variant"],
                                                                        f"int8 K={k}"),
                                                "extra": (*run["extra"], *mode)}, **common)
    if "scaling" in groups:
        dataset, model, epochs = SCALING_SETUP
        runs = method_runs(("ssgd", "pa"), (SCALING_SYNC,))
        runs += [{"algo": algo, "variant": variant, "extra": extra, "sync_every": SCALING_SYNC}
                 for algo, variant, extra in SCALING_METHODS.values()]
        for link in SCALING_LINKS:
            for ranks in SCALING_RANKS:
                for run in runs:
                    plan.add(group="scaling", link=link, dataset=dataset, model=model,
                             epochs=epochs, ranks=ranks, **run, **common)


def _join(*words: str) -> str:
    return " ".join(w for w in words if w)


def _exchange_grid(plan: Plan, methods: tuple[str, ...], common: dict) -> None:
    """The exchange grid: see EXCHANGE_CELLS."""
    wanted = [m for m in EXCHANGE_METHODS if m in methods]
    for dataset, (model, epochs) in EXCHANGE_SETUPS.items():
        for link, ranks, sync in (*EXCHANGE_CELLS, *EXCHANGE_MORE_CELLS.get(dataset, ())):
            for run in method_runs(tuple(wanted), (sync,)):
                base = {"group": "exchange", "link": link, "dataset": dataset, "model": model,
                        "epochs": epochs, "ranks": ranks}
                if run["algo"] in ("ssgd", "ddp"):
                    if link == "1gbit":
                        plan.add(**base, **run, **common)
                    elif common["seed"] == 0:  # the time per epoch: see SLOW_SSGD_EPOCHS
                        steps = SLOW_SSGD_EPOCHS * steps_per_epoch(dataset, ranks)
                        plan.add(**base, **run, **{**common, "max_steps": steps})
                    continue
                modes = dict(EXCHANGE_MODES)
                if link != "1gbit":
                    modes[SLOW_LINK_MODE] = ("--overlap", "--overlap-steps", str(sync),
                                             "--exchange-dtype", "int8")
                for mode, flags in modes.items():
                    plan.add(**base, **{**run, "variant": _join(run["variant"], mode),
                                        "extra": (*run["extra"], *flags)}, **common)


def steps_per_epoch(dataset: str, ranks: int, batch: int = 32) -> int:
    """Steps of an epoch of a built-in set's training split at the default batch size."""
    return {"mnist1d": 4000, "fashion-mnist": 60000}[dataset] // (ranks * batch)


def in_cells(cells: str | None, ranks: int, sync_every: int) -> bool:
    """Whether an accuracy run belongs to ``--cells`` (RANKS/SYNC pairs; SSGD, which has no
    period, at any of their rank counts); every run without the option."""
    if not cells:
        return True
    pairs = [tuple(map(int, c.split("/"))) for c in cells.split(",")]
    return any(r == ranks and (n == sync_every or sync_every == 1) for r, n in pairs)


def _quick(plan: Plan, seed: int, methods: tuple[str, ...], args: argparse.Namespace) -> None:
    """A few minutes on 2 cores: MNIST-1D's CNN at 2 ranks, two sync periods, each link."""
    for link in args.links.split(","):
        syncs = (4, 16) if link == "shm" else (16,)
        for run in method_runs(tuple(m for m in methods if m in METHODS), syncs):
            plan.add(group="accuracy" if link == "shm" else "link", link=link,
                     dataset="mnist1d", model="cnn1d", epochs=3, ranks=2, seed=seed,
                     max_steps=args.max_steps, **run)


def interleave(specs: list[Spec], seed: int) -> list[Spec]:
    """Shuffle (fixed seed), keeping each SSGD run next to its DDP twin, in turn first."""
    ssgd = {s.key: s for s in specs if s.algo == "ssgd"}
    ddp = {s.key.replace("/ddp/", "/ssgd/"): s for s in specs if s.algo == "ddp"}
    units = [[s, ddp[s.key]] if s.key in ddp else [s] for s in specs if s.algo != "ddp"]
    units += [[d] for k, d in ddp.items() if k not in ssgd]  # DDP without its twin
    rng = random.Random(1000 + seed)
    rng.shuffle(units)
    out: list[Spec] = []
    for i, unit in enumerate(units):
        out.extend(unit if i % 2 == 0 else unit[::-1])
    return out


# ---------------------------------------------------------------------------- one run

def summarise(spec: Spec, events: list[dict]) -> dict:
    """What the report needs from one run's metrics file."""
    final = events[-1]
    epochs = [e for e in events if e.get("event") == "epoch"]
    wall = final["wall_s"]
    comm_s = final.get("comm_s")
    return {
        "test_acc": final["test_acc"], "test_loss": final["test_loss"],
        "ensemble_acc": final.get("ensemble_acc"),
        "train_loss": final.get("train_loss"), "wall_s": wall,
        "epochs_run": len(epochs), "s_per_epoch": wall / max(len(epochs), 1),
        "samples_per_s": final["samples_per_s"], "steps": final["steps"],
        "comm_bytes_per_rank": final["comm_bytes_per_rank"], "comm_s": comm_s,
        "comm_share": comm_s / wall if comm_s is not None and wall > 0 else None,
        "num_params": final["num_params"],
        "exchange": events[0].get("exchange") if events[0].get("event") == "start" else None,
        # a particle that diverged leaves a non-finite training loss (null in JSON)
        "diverged": final.get("train_loss") is None,
        "rounds": final.get("rounds"),
        "curve": [[e["epoch"], round(e["wall_s"], 4), e["test_acc"]] for e in epochs],
        "lr_mults": lr_multipliers(epochs),
    }


def lr_multipliers(epochs: list[dict]) -> list[list] | None:
    """[epoch, [each particle's learning-rate multiplier]] per epoch, for a run that searched
    the learning rate (``--lr-spread``); None for the others."""
    names = sorted((k for k in (epochs[-1] if epochs else {}) if k.startswith("lr_mult_r")),
                   key=lambda k: int(k.removeprefix("lr_mult_r")))
    if not names:
        return None
    return [[e["epoch"], [round(e[k], 5) for k in names]] for e in epochs]


def run_one(spec: Spec, link: netem.EmulatedLink | None, launcher: list[str],
            timeout: float) -> dict:
    """Launch one job (inside the emulated link if any) and return its record."""
    wrap = None
    if link is not None:
        link.set_rate(spec.link)
        wrap = link.wrap
    record: dict = {**asdict(spec), "key": spec.key, "load_avg": os.getloadavg()[0],
                    "started": jobs.now()}
    script = str(REPO / "bench" / "ddp_ssgd.py") if spec.algo == "ddp" else None
    job = jobs.run_job(spec.train_args(), spec.ranks, launcher=launcher, script=script,
                       timeout=timeout, wrap=wrap)
    record.update(cmd=jobs.shown(job.cmd), launch_s=round(job.seconds, 3), rc=job.rc)
    if job.final is not None:
        record.update(summarise(spec, job.events))
    else:
        record["error"] = job.error
    return record


# ---------------------------------------------------------------------------- the sweep

def machine() -> dict:
    """Facts about the machine and software, stored once per sweep."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    sys.path.insert(0, str(REPO))
    from psops_mpi.metrics import environment  # torch + mpi4py: only once the args are fine

    return {**environment(), "cpu_model": cpu, "cores": os.cpu_count(),
            "mpiexec": shutil.which("mpiexec")}


def previous_sweeps(path: Path) -> list[dict]:
    """The invocations recorded so far: the first one, then any that resumed it."""
    if not path.exists():
        return []
    meta = json.loads(path.read_text())
    return [{k: v for k, v in meta.items() if k != "resumed"}, *meta.get("resumed", [])]


def write_meta(path: Path, meta: dict, earlier: list[dict]) -> None:
    """sweep.json: the first invocation at the top level, later ones under "resumed"."""
    if earlier:
        meta = {**earlier[0], "resumed": [*earlier[1:], meta]}
    path.write_text(json.dumps(meta, indent=1))


def done_keys(path: Path) -> set[str]:
    if not path.exists():
        return set()
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["key"] for r in records if "test_acc" in r}  # finished with a final line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="bench/results/raw", help="folder for runs.jsonl, sweep.json")
    p.add_argument("--quick", action="store_true", help="a few minutes: see the docstring")
    p.add_argument("--seeds", default=None, help="comma-separated (default 0,1; quick: 0)")
    p.add_argument("--links", default="shm,1gbit",
                   help="--quick only: comma-separated shm and/or rates (emulated rates need "
                        "root)")
    p.add_argument("--groups", default="accuracy,link", help="comma-separated grids to run")
    p.add_argument("--algos", default=",".join([*METHODS, "variants"]),
                   help="comma-separated methods (and 'variants': the explored PSO-PS rules)")
    p.add_argument("--datasets", default=None, help="comma-separated subset (default: all)")
    p.add_argument("--ranks", default=None,
                   help="comma-separated world sizes that replace every run's own (scaling "
                        "jobs: e.g. the ranks of 1, 2 and 4 nodes)")
    p.add_argument("--max-steps", type=int, default=0, help="cap every run (tests)")
    p.add_argument("--cells", default=None,
                   help="accuracy grid: only these RANKS/SYNC cells, e.g. 4/64,8/16")
    p.add_argument("--flags", default="",
                   help="training flags added to every run (part of its key), e.g. "
                        "'--warmup-steps 200'")
    p.add_argument("--launcher", choices=("mpiexec", "srun"), default="mpiexec")
    p.add_argument("--srun-mpi", default="pmi2", help="srun --mpi value (pmi2 for MPICH)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per run")
    p.add_argument("--resume", action="store_true", help="skip runs already in runs.jsonl")
    args = p.parse_args(argv)
    args.seeds = _int_list(p, "--seeds", args.seeds or ("0" if args.quick else "0,1,2"))
    args.ranks = _int_list(p, "--ranks", args.ranks) if args.ranks else None
    unknown = set(args.algos.split(",")) - {*METHODS, "variants"}
    if unknown:
        p.error(f"--algos: unknown method(s) {', '.join(sorted(unknown))}; choose from "
                f"{', '.join([*METHODS, 'variants'])}")
    try:
        for link in args.links.split(","):
            netem.check_link_name(link)
    except ValueError as exc:
        p.error(str(exc))
    if not args.quick:  # the full plan's links are its own
        groups = args.groups.split(",")
        links = ["shm", *([LINK] if "link" in groups else []),
                 *(SCALING_LINKS if "scaling" in groups else []),
                 *((c[0] for c in EXCHANGE_CELLS) if "exchange" in groups else [])]
        args.links = ",".join(dict.fromkeys(links))
    if args.launcher == "srun" and any(map(netem.is_emulated, args.links.split(","))):
        p.error("emulated links need --launcher mpiexec (srun starts tasks outside the "
                "namespace); use --links shm under srun")
    return args


def _int_list(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        p.error(f"{flag} takes comma-separated integers, got {text!r}")
    if flag == "--ranks" and min(values) < 1:
        p.error(f"{flag} must be positive, got {text!r}")
    return values


def at_ranks(specs: list[Spec], ranks: list[int]) -> list[Spec]:
    """Every configuration at the given world sizes instead of its own (scaling runs)."""
    out: dict[str, Spec] = {}
    for spec in specs:
        for size in ranks:
            moved = replace(spec, ranks=size)
            out.setdefault(moved.key, moved)
    return list(out.values())


def launcher_prefix(args: argparse.Namespace) -> list[str]:
    if args.launcher == "srun":
        return ["srun", f"--mpi={args.srun_mpi}", "-n"]
    return jobs.mpiexec_prefix()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs_path = out / "runs.jsonl"
    if not args.resume and runs_path.exists():
        runs_path.unlink()
    passes = build_plan(args)
    skip = done_keys(runs_path) if args.resume else set()
    total = sum(len(p) for p in passes)
    emulated = any(netem.is_emulated(s.link) for p in passes for s in p)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below
    link = netem.EmulatedLink() if emulated else None
    try:
        if link is not None:
            link.setup()
    except netem.LinkSetupError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    meta = {"command": "python bench/sweep.py " + " ".join(sys.argv[1:] if argv is None
                                                           else argv),
            "started": jobs.now(), "planned_runs": total, "seeds": args.seeds,
            "links": {lk: netem.describe(lk) for lk in args.links.split(",")},
            "machine": machine(), "load_avg_start": os.getloadavg()}
    earlier = previous_sweeps(out / "sweep.json") if args.resume else []
    write_meta(out / "sweep.json", meta, earlier)
    start, count = time.monotonic(), 0
    try:
        with runs_path.open("a", encoding="utf-8") as fh:
            for plan in passes:
                for spec in plan:
                    count += 1
                    if spec.key in skip:
                        continue
                    record = run_one(spec, link if netem.is_emulated(spec.link) else None,
                                     launcher_prefix(args), args.timeout)
                    fh.write(json.dumps(record) + "\n")
                    fh.flush()
                    status = (f"acc {record['test_acc']:.4f} {record['wall_s']:.1f}s"
                              if "test_acc" in record else f"FAILED rc={record['rc']}")
                    print(f"[{count}/{total} {time.monotonic() - start:7.0f}s] {spec.key}: "
                          f"{status}", flush=True)
    finally:
        if link is not None:
            link.close()
    meta.update(finished=jobs.now(), duration_s=round(time.monotonic() - start, 1),
                load_avg_end=os.getloadavg())
    write_meta(out / "sweep.json", meta, earlier)
    print(f"sweep: {count} runs in {meta['duration_s']:.0f}s -> {runs_path}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
