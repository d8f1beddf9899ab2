"""Every training setting as a validated dataclass, plus TOML loading.

The command line only maps ``--kebab-case`` flags onto :class:`TrainConfig` (see
:func:`build_parser`); a TOML file given with ``--config`` supplies values first and flags
override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


class UsageError(ValueError):
    """Bad input from the user: reported as one line on stderr, exit code 2, on every rank."""


ALGOS = ("pso-ps", "pa", "ssgd")
DATASETS = ("mnist1d", "mnist", "fashion-mnist", "cifar10", "synthetic")
FITNESS_MODES = ("train", "holdout")
EXCHANGES = ("allgather", "best")
GBEST_MEMORIES = ("round", "all")
LR_SCHEDULES = ("cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
PSO_KERNELS = ("fused", "reference")
CUDA_AWARE = ("auto", "on", "off")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"unknown {name} {value!r}; choose one of: {', '.join(choices)}")


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UsageError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass(kw_only=True)
class PSOConfig:
    """Coefficients of the particle-swarm step applied at every PSO-PS round."""

    w: float = 0.5
    """Inertia: the share of the previous velocity a particle keeps."""
    c1: float = 0.0
    """Cognitive coefficient: pull towards the particle's own best position. Off by default:
    on MNIST-1D every c1 > 0 we tried lowered accuracy (README, "Choosing the defaults")."""
    c2: float = 1.0
    """Social coefficient: pull towards the swarm's global best position."""
    c3: float = 0.0
    """After the move, pull each particle this share of the way to the swarm's mean position
    (the allgather brings every particle anyway); 0 disables it, 1 puts every particle at the
    mean. Needs ``exchange='allgather'``."""
    vmax: float | None = None
    """Clamp every velocity component to [-vmax, vmax]; None disables the clamp."""
    fitness: str = "train"
    """'train': mean training loss over the last sync period; 'holdout': loss on one fixed
    batch that is the same on every rank."""
    exchange: str = "allgather"
    """'allgather': every rank receives every particle (O(P*N) bytes); 'best': MINLOC of the
    fitness then a broadcast of the best particle (O(N) bytes)."""
    gbest_memory: str = "round"
    """'round': the global best is this round's best particle; 'all': the best ever seen."""
    reset_momentum: bool = False
    """Clear the local optimizer's state (momentum) after every round."""
    pso_kernel: str = "fused"
    """'fused': the one-pass custom op (psops_mpi.kernels); 'reference': plain torch ops."""

    def __post_init__(self) -> None:
        for name in ("w", "c1", "c2", "c3"):
            _non_negative(f"--{name}", getattr(self, name))
        if self.c3 > 1:
            raise UsageError(f"--c3 must be between 0 and 1, got {self.c3!r}")
        if self.vmax is not None:
            _positive("--vmax", self.vmax)
        _choice("fitness mode", self.fitness, FITNESS_MODES)
        _choice("exchange", self.exchange, EXCHANGES)
        if self.c3 > 0 and self.exchange != "allgather":
            raise UsageError("--c3 needs --exchange allgather: the swarm's mean needs every "
                             "particle")
        _choice("gbest memory", self.gbest_memory, GBEST_MEMORIES)
        _choice("pso kernel", self.pso_kernel, PSO_KERNELS)


@dataclass(kw_only=True)
class TrainConfig:
    """One training run: algorithm, data, model, optimizer and output."""

    algo: str = "pso-ps"
    """Synchronisation algorithm: 'pso-ps', 'pa' (periodic averaging) or 'ssgd'."""
    sync_every: int = 8
    """Local steps between two rounds (PSO-PS and PA; SSGD synchronises every step)."""
    dataset: str = "mnist1d"
    """Dataset name; see data.py for the files each one reads."""
    data_dir: str | None = None
    """Folder holding the dataset files (mnist, fashion-mnist, cifar10)."""
    model: str = "auto"
    """A registered model name, 'auto' (the dataset's default) or 'package.module:function'."""
    epochs: int = 60
    """Passes over the training set."""
    batch_size: int = 32
    """Mini-batch size per rank."""
    lr: float = 0.1
    """Peak learning rate of the local SGD optimizer."""
    lr_schedule: str = "cosine"
    """'cosine' decays the learning rate to zero over the run; 'constant' keeps it."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay (L2)."""
    seed: int = 0
    """Seed for weights, data order and the swarm's random numbers."""
    pso: PSOConfig = field(default_factory=PSOConfig)
    """Particle-swarm settings (PSO-PS only)."""
    device: str = "auto"
    """'auto' (one GPU per rank when CUDA is present, else CPU), 'cpu' or 'cuda'."""
    threads: int = 0
    """CPU threads per rank; 0 shares the node's cores evenly between its ranks."""
    metrics_out: str | None = None
    """Write one JSON line per event (start, epoch, final) to this file (rank 0)."""
    quiet: bool = False
    """No progress bar and no per-epoch lines; errors and the final line only."""
    max_steps: int = 0
    """Stop after this many steps per rank (0: run all epochs); for quick checks."""
    checkpoint_dir: str | None = None
    """Folder of checkpoints (one sub-folder per checkpoint); None: no checkpoints."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: only the final one)."""
    checkpoint_every_min: float = 0.0
    """Also write one when this many minutes of wall-clock passed since the last (0: off)."""
    keep_last: int = 3
    """Keep this many most recent checkpoints; older ones are pruned."""
    resume: str = "auto"
    """'auto': the newest complete checkpoint in --checkpoint-dir, if any; 'none': start
    fresh; or the path of one checkpoint folder."""
    resume_strict: bool = False
    """Refuse to resume at a world size other than the checkpoint's."""
    cuda_aware: str = "auto"
    """Hand CUDA buffers to MPI directly ('on'), stage them through pinned host memory
    ('off'), or decide from what the MPI library reports ('auto')."""
    allow_gpu_sharing: bool = False
    """Allow more ranks on a node than it has GPUs (ranks then share GPUs round-robin)."""

    def __post_init__(self) -> None:
        if isinstance(self.pso, dict):
            self.pso = PSOConfig(**self.pso)
        _choice("algo", self.algo, ALGOS)
        _choice("dataset", self.dataset, DATASETS)
        _choice("lr schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("device", self.device, DEVICES)
        _choice("cuda-aware setting", self.cuda_aware, CUDA_AWARE)
        for name in ("sync_every", "batch_size", "epochs"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, "
                                 f"got {value!r}")
        _positive("--lr", self.lr)
        _non_negative("--momentum", self.momentum)
        _non_negative("--weight-decay", self.weight_decay)
        for name in ("threads", "max_steps", "checkpoint_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be an integer >= 0, "
                                 f"got {value!r}")
        if not self.model:
            raise UsageError("--model must not be empty")
        _non_negative("--checkpoint-every-min", self.checkpoint_every_min)
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise UsageError(f"--keep-last must be an integer >= 1, got {self.keep_last!r}")
        if not self.resume:
            raise UsageError("--resume must be 'auto', 'none' or a checkpoint folder")

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-ready values (stored with every result)."""
        return dataclasses.asdict(self)


def _field_names(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML config file into the flat key space of the command line.

    Keys may be written with '-' or '_'. PSO keys may sit at the top level or in a ``[pso]``
    table. Unknown keys are an error, so a typo never passes silently.
    """
    try:
        with Path(path).open("rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config file {path}: {exc}") from None
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "pso" and isinstance(value, dict):
            flat.update({k.replace("-", "_"): v for k, v in value.items()})
        else:
            flat[key.replace("-", "_")] = value
    known = (_field_names(TrainConfig) | _field_names(PSOConfig)) - {"pso"}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise UsageError(f"config file {path}: unknown setting(s) {', '.join(unknown)}")
    return flat


def build_config(values: dict[str, Any]) -> TrainConfig:
    """Make a validated TrainConfig from flat settings (TOML values overridden by flags)."""
    pso_names = _field_names(PSOConfig)
    pso = {k: v for k, v in values.items() if k in pso_names}
    top = {k: v for k, v in values.items() if k not in pso_names}
    try:
        return TrainConfig(**top, pso=PSOConfig(**pso))
    except TypeError as exc:  # a wrongly typed value from TOML, e.g. a string for an int
        raise UsageError(f"bad setting: {exc}") from None


# ---- command line: flags map one to one onto the fields above

class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line through the usual bad-input path, not usage text
        raise UsageError(message)

    def print_help(self, file=None) -> None:  # once per job, not once per rank
        from mpi4py import MPI  # only when asked: config stays importable without MPI

        if MPI.COMM_WORLD.Get_rank() == 0:
            super().print_help(file)


def build_parser() -> argparse.ArgumentParser:
    """Flags map one to one onto TrainConfig / PSOConfig fields; defaults live there."""
    d, pso = TrainConfig(), TrainConfig().pso
    p = _Parser(prog="psops_mpi.train", argument_default=argparse.SUPPRESS,
                description="Data-parallel training over MPI with PSO-PS, PA or SSGD.")
    add = p.add_argument
    add("--config", metavar="FILE.toml", help="settings file; flags given here override it")
    add("--algo", choices=ALGOS, help=f"synchronisation algorithm (default {d.algo})")
    add("--sync-every", type=int, metavar="N", help=f"local steps per round ({d.sync_every})")
    add("--dataset", choices=DATASETS, help=f"dataset (default {d.dataset})")
    add("--data-dir", metavar="DIR", help="folder holding the dataset files")
    add("--model", help="model name, 'auto' or package.module:function (default auto)")
    add("--epochs", type=int, help=f"passes over the training set ({d.epochs})")
    add("--batch-size", type=int, help=f"mini-batch size per rank ({d.batch_size})")
    add("--lr", type=float, help=f"peak learning rate ({d.lr})")
    add("--lr-schedule", choices=LR_SCHEDULES, help=f"learning-rate schedule ({d.lr_schedule})")
    add("--momentum", type=float, help=f"SGD momentum ({d.momentum})")
    add("--weight-decay", type=float, help=f"SGD weight decay ({d.weight_decay})")
    add("--seed", type=int, help=f"seed of weights, data order and swarm ({d.seed})")
    add("--w", type=float, help=f"PSO inertia ({pso.w})")
    add("--c1", type=float, help=f"PSO pull to the personal best ({pso.c1})")
    add("--c2", type=float, help=f"PSO pull to the global best ({pso.c2})")
    add("--c3", type=float, help=f"PSO pull to the swarm mean ({pso.c3})")
    add("--vmax", type=float, help="PSO velocity clamp (default none)")
    add("--fitness", choices=FITNESS_MODES, help=f"particle fitness ({pso.fitness})")
    add("--exchange", choices=EXCHANGES, help=f"PSO-PS exchange ({pso.exchange})")
    add("--gbest-memory", choices=GBEST_MEMORIES, help=f"global best memory ({pso.gbest_memory})")
    add("--reset-momentum", action="store_true", help="clear SGD momentum after each round")
    add("--pso-kernel", choices=PSO_KERNELS, help=f"PSO update kernel ({pso.pso_kernel})")
    add("--device", choices=DEVICES, help=f"device per rank ({d.device})")
    add("--threads", type=int, help="CPU threads per rank (default: share the node's cores)")
    add("--max-steps", type=int, metavar="N", help="stop after N steps per rank (0: no limit)")
    add("--metrics-out", metavar="PATH", help="write JSON-lines metrics here (rank 0)")
    add("--quiet", action="store_true", help="no progress bar or epoch lines")
    add("--checkpoint-dir", metavar="DIR", help="write checkpoints here (default: none)")
    add("--checkpoint-every", type=int, metavar="K",
        help="checkpoint every K steps (0: only at the end)")
    add("--checkpoint-every-min", type=float, metavar="MIN",
        help="also checkpoint every MIN minutes of wall-clock (0: off)")
    add("--keep-last", type=int, metavar="N", help=f"checkpoints kept ({d.keep_last})")
    add("--resume", metavar="{auto,none,PATH}",
        help=f"resume from the newest checkpoint, none, or one folder ({d.resume})")
    add("--resume-strict", action="store_true",
        help="refuse to resume at another world size")
    add("--cuda-aware", choices=CUDA_AWARE,
        help="CUDA buffers to MPI: on = directly, off = through pinned host memory, auto = "
             f"as the MPI library reports ({d.cuda_aware})")
    add("--allow-gpu-sharing", action="store_true",
        help="allow more ranks per node than GPUs (shared round-robin)")
    return p


def parse_config(argv: list[str] | None) -> TrainConfig:
    """Flags over the TOML file over the defaults, validated."""
    given = vars(build_parser().parse_args(argv))
    values = load_toml(given.pop("config")) if "config" in given else {}
    values.update(given)
    return build_config(values)
