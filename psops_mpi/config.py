"""Every training setting, once: a validated dataclass field with its type, default and
docstring. The command line, its help and the manual's flag table are derived from these
fields (:mod:`psops_mpi.cli`); a field typed ``Literal[...]`` lists its own choices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from psops_mpi.errors import UsageError

# Settings that make a checkpoint another run: resuming across a change means nothing.
IDENTITY_SETTINGS = ("algo", "dataset", "model")
# Settings of one launch only: a resume that changes them is expected, not worth a note.
LAUNCH_SETTINGS = frozenset({
    "resume", "resume_strict", "checkpoint_dir", "metrics_out", "tensorboard", "quiet",
    "threads", "device", "cuda_aware", "allow_gpu_sharing", "data_dir", "max_nonfinite",
    "stall_report_s", "stall_abort_s", "channels_last", "compile", "data_workers",
    "stop_timeout_s", "ensemble_eval"})


# The built-in sets, held whole on the device; beside them --dataset takes imagefolder and
# package.module:function (psops_mpi.data.user).
DATASETS: tuple[str, ...] = ("mnist1d", "mnist", "fashion-mnist", "cifar10", "synthetic",
                             "fortunes")

# Named PSO-PS settings (--pso-preset); flags given beside a preset override it. The field
# defaults below are the default preset's values (a test checks).
PSO_PRESETS: dict[str, dict[str, Any]] = {
    # The swarm moves as one from its centre, inertia as slow momentum, pulled to the best
    # particle. w and c2 chosen on MNIST-1D at 4 ranks, sync every 4, 16 and 64 (bench/results/
    # rules/README.md): the best PSO-PS setting there, above PA at every period.
    "centre": {"rule": "centre", "w": 0.4, "c1": 0.0, "c2": 0.1, "c3": 0.0, "rho": 1.0,
               "lr_spread": 1.0, "answer": "gbest", "fitness": "train",
               "gbest_memory": "round"},
    # EASGD's elastic swarm (Zhang, Choromanska, LeCun 2015): the centre moves by the slow
    # momentum step on the swarm's mean, each particle only part of the way towards it, so
    # the particles stay distinct; the centre is the answer. No pull to the best particle:
    # one Allreduce of the weights a round, PA's bytes.
    "elastic": {"rule": "centre", "w": 0.4, "c1": 0.0, "c2": 0.0, "c3": 0.0, "rho": 0.5,
                "lr_spread": 1.0, "answer": "gbest", "fitness": "train",
                "gbest_memory": "round"},
    # The centre rule whose particles also search the learning rate: each trains with its own
    # multiplier of the schedule's rate, started over [1/3, 3] and moved towards the best
    # by a PSO step on its logarithm once an epoch (psops_mpi.swarm.RateSearch).
    "search": {"rule": "centre", "w": 0.4, "c1": 0.0, "c2": 0.1, "c3": 0.0, "rho": 1.0,
               "lr_spread": 3.0, "answer": "gbest", "fitness": "train",
               "gbest_memory": "round"},
    # Ye et al.'s rule: each particle moves on its own towards the round's best particle, and
    # the best particle is the answer; coefficients chosen on MNIST-1D (bench/results/
    # coef_scan.md). The default of psops_mpi 0.1.
    "paper": {"rule": "particle", "w": 0.5, "c1": 0.0, "c2": 1.0, "c3": 0.0, "rho": 1.0,
              "lr_spread": 1.0, "answer": "gbest", "fitness": "train",
              "gbest_memory": "round"},
}


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise UsageError(f"{name} must be a positive number, got {value!r}")


def _non_negative(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise UsageError(f"{name} must be a finite number >= 0, got {value!r}")


def _integer(name: str, value: object, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise UsageError(f"{name} must be {kind}, got {value!r}")


def flag(name: str) -> str:
    """The command-line flag of a field: ``sync_every`` -> ``--sync-every``."""
    return "--" + name.replace("_", "-")


def check_choices(obj: object) -> None:
    """Every ``Literal[...]`` field of a config dataclass holds one of its choices."""
    for name, kind in typing.get_type_hints(type(obj)).items():
        if typing.get_origin(kind) is Literal:
            value, choices = getattr(obj, name), typing.get_args(kind)
            if value not in choices:
                raise UsageError(f"unknown {name.replace('_', ' ')} {value!r}; choose one of: "
                                 f"{', '.join(choices)}")


@dataclass(kw_only=True)
class PSOConfig:
    """Coefficients of the particle-swarm step applied at every PSO-PS round."""

    pso_preset: Literal["centre", "elastic", "search", "paper"] = "centre"
    """Named PSO-PS settings that the PSO flags given beside it override: centre (the swarm
    moves as one), elastic (the centre moves, each particle part of the way: EASGD's
    elastic pull), search (centre, and the particles search the learning rate) or paper
    (each particle moves on its own, Ye et al.'s rule, the default of psops_mpi 0.1); see
    "PSO-PS presets"."""
    w: float = 0.4
    """PSO inertia: the share of the previous velocity a particle keeps."""
    c1: float = 0.0
    """PSO pull towards the particle's personal best. Off by default: on MNIST-1D every
    c1 > 0 we tried lowered accuracy (see "Choosing the defaults")."""
    c2: float = 0.1
    """PSO pull towards the global best."""
    c3: float = 0.0
    """After the move, pull each particle this share of the way to the swarm's mean (see
    bench/results/mean_pull.md); 1 puts every particle at the mean."""
    rho: float = 1.0
    """Centre rule: the share of the way each particle moves to the new centre at a round
    (EASGD's elastic pull; 1: every particle at the centre, which is the answer)."""
    lr_spread: float = field(default=1.0, metadata={"metavar": "S"})
    """Learning-rate search: particles train with multipliers of the schedule's rate spread
    log-evenly over [1/S, S], moved towards the best one (by the holdout loss of each
    particle's own weights, averaged over --lr-period rounds) by a PSO step on their
    logarithms, within [1/S^2, S^2] (1: off)."""
    lr_period: int = field(default=0, metadata={"metavar": "R"})
    """Learning-rate search: rounds between two steps of the multipliers (0: an epoch's
    worth)."""
    vmax: float | None = field(default=None, metadata={"metavar": "V"})
    """Clamp every velocity component to [-vmax, vmax]; none: no clamp."""
    fitness: Literal["train", "holdout"] = "train"
    """Particle fitness: mean training loss over the last sync period, or the loss on one fixed
    holdout batch that is the same on every rank."""
    exchange: Literal["auto", "allgather", "best"] = "auto"
    """PSO-PS exchange: every rank receives every particle (O(P*N) bytes), MINLOC of the
    fitness then a broadcast of the best particle (O(N) bytes, plus an allreduce when the rule
    needs the swarm's mean), or auto: the cheaper of the two by the cost model (printed at
    start)."""
    gbest_memory: Literal["round", "all"] = "round"
    """Global best: this round's best particle, or the best ever seen."""
    rule: Literal["particle", "centre"] = "centre"
    """PSO-PS move: every particle moves on its own (the paper's), or the swarm moves as one
    from its centre, with inertia w as a slow momentum and a pull c2 to the best particle."""
    answer: Literal["gbest", "mean"] = "gbest"
    """What evaluation and export use: the global best particle, or the mean of the particles
    (the centre rule has one answer: its centre)."""
    pso_kernel: Literal["fused", "reference"] = "fused"
    """PSO update: the one-pass custom op (psops_mpi.kernels), or plain torch ops."""

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PSOConfig:
        """The settings of preset ``name`` with ``overrides`` applied."""
        if name not in PSO_PRESETS:
            raise UsageError(f"unknown pso preset {name!r}; choose one of: "
                             f"{', '.join(PSO_PRESETS)}")
        return cls(**{**PSO_PRESETS[name], **overrides, "pso_preset": name})

    def __post_init__(self) -> None:
        check_choices(self)
        for name in ("w", "c1", "c2", "c3"):
            _non_negative(flag(name), getattr(self, name))
        if self.c3 > 1:
            raise UsageError(f"--c3 must be between 0 and 1, got {self.c3!r}")
        if self.vmax is not None:
            _positive("--vmax", self.vmax)
        if self.rule == "centre" and (self.c1 > 0 or self.c3 > 0):
            raise UsageError("--rule centre moves the swarm as one: it takes no --c1 (personal "
                             "bests) and no --c3 (every particle is at the centre already)")
        if not (isinstance(self.lr_spread, (int, float)) and math.isfinite(self.lr_spread)
                and self.lr_spread >= 1):
            raise UsageError(f"--lr-spread must be a number >= 1 (1: no search), got "
                             f"{self.lr_spread!r}")
        _integer("--lr-period", self.lr_period, 0)
        if not (isinstance(self.rho, (int, float)) and 0 < self.rho <= 1):
            raise UsageError(f"--rho must be in (0, 1], got {self.rho!r}")
        if self.rho < 1 and self.rule != "centre":
            raise UsageError("--rho pulls particles towards the centre of --rule centre; the "
                             "particle rule has no centre")


@dataclass(kw_only=True)
class TrainConfig:
    """One training run: algorithm, data, model, optimizer and output."""

    algo: Literal["pso-ps", "pa", "slowmo", "ssgd"] = "pso-ps"
    """Synchronisation algorithm: PSO-PS, periodic averaging (PA), SlowMo (PA plus a slow
    momentum step) or synchronous SGD."""
    sync_every: int = field(default=8, metadata={"metavar": "N"})
    """Local steps per round (PSO-PS, PA, SlowMo; SSGD synchronises every step)."""
    dataset: str = field(default="mnist1d", metadata={"metavar": "NAME"})
    """A built-in set (mnist1d, mnist, fashion-mnist, cifar10, synthetic, fortunes; see
    Data), imagefolder (class folders under --data-dir) or package.module:function (your
    own; see "Your own data")."""
    data_dir: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Folder holding the dataset files (mnist, fashion-mnist, cifar10, fortunes,
    imagefolder; given to your own dataset's function)."""
    data_workers: int | None = field(default=None, metadata={"metavar": "N"})
    """DataLoader worker processes per rank for imagefolder and your own datasets (0: read
    in the training process; none: one less than each rank's share of the cores, at most 4,
    and 0 for a rank of one or two cores); the built-in sets are on the device already."""
    image_size: int = field(default=0, metadata={"metavar": "N"})
    """imagefolder: the side images are brought to (0: the first training image's shorter
    side)."""
    model: str = field(default="auto", metadata={"metavar": "NAME"})
    """A registered model (see Models), auto (the dataset's default) or package.module:function."""
    epochs: int = field(default=60, metadata={"metavar": "N"})
    """Passes over the training set."""
    batch_size: int = field(default=32, metadata={"metavar": "N"})
    """Mini-batch size per rank."""
    lr: float = 0.1
    """Peak learning rate of the local optimizer."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """The local optimizer: SGD with momentum and L2 weight decay on every parameter, or
    AdamW with decoupled weight decay on the weights of two or more dimensions (none on
    biases and normalisation weights)."""
    warmup_steps: int | None = field(default=None, metadata={"metavar": "K"})
    """Raise the learning rate linearly from lr/K to lr over the first K optimizer steps,
    then follow --lr-schedule over the rest (0: no warmup; none: a tenth of the run, at
    most 200 steps, which removed every run that stopped learning at lr 0.1 in the
    Fashion-MNIST cells measured; see "The training recipe")."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """After the warmup: cosine or linear decay of the learning rate to 0 at the end of the
    run, or constant."""
    momentum: float = field(default=0.9, metadata={"metavar": "M"})
    """SGD momentum."""
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"metavar": ("B1", "B2")})
    """AdamW's decay rates of its first and second moment estimates."""
    eps: float = field(default=1e-8, metadata={"metavar": "E"})
    """AdamW's term added to the denominator."""
    weight_decay: float | None = field(default=None, metadata={"metavar": "WD"})
    """Weight decay: L2 under SGD, decoupled under AdamW; none: 5e-4 for SGD, 0.01 for
    AdamW."""
    clip_grad_norm: float = field(default=0.0, metadata={"metavar": "C"})
    """Clip the gradient to a 2-norm of at most C before the local step: this rank's
    gradient (PA, SlowMo, PSO-PS), the averaged one (SSGD); after unscaling under fp16; the
    epoch's mean norm is reported as grad_norm (0: off)."""
    grad_accum_steps: int = field(default=1, metadata={"metavar": "A"})
    """Micro-batches of --batch-size per optimizer step (SSGD averages once per step); steps,
    rounds, --sync-every, warmup and checkpoints count optimizer steps."""
    reset_momentum: bool = False
    """Clear the local optimizer's state (momentum) after every round (PSO-PS, SlowMo)."""
    seed: int = field(default=0, metadata={"metavar": "S"})
    """Seed of initial weights, data order, augmentation and swarm."""
    pso: PSOConfig = field(default_factory=PSOConfig)
    """Particle-swarm settings (PSO-PS only); their flags are listed with the others."""
    outer_lr: float = 1.0
    """SlowMo: the slow learning rate alpha of the outer step (1: the full step)."""
    outer_momentum: float = 0.4
    """SlowMo: the slow momentum beta (0 with --outer-lr 1: plain PA). 0.4: the best of 0.2 -
    0.5 on MNIST-1D; 0.6 and above diverged there at --sync-every 4 (bench/results/rules)."""
    outer_nesterov: bool = False
    """SlowMo: Nesterov's form of the outer step (DiLoCo's) instead of heavy ball."""
    overlap: bool = False
    """Leave each round's exchange in flight while the ranks train on (PA, SlowMo, PSO-PS):
    it lands --overlap-steps later, as the round's result plus each rank's own progress
    since it began (see "Overlapped and encoded rounds")."""
    overlap_steps: int = field(default=0, metadata={"metavar": "K"})
    """With --overlap: the steps after a round starts at which its result is applied, at
    most --sync-every (0: a quarter of --sync-every, rounded up: on MNIST-1D's mlp-wide
    K up to a quarter of the period kept the blocking accuracy, half of it lost about a
    point, a whole period two to three)."""
    local_after_steps: int = field(default=0, metadata={"metavar": "K"})
    """PA, SlowMo and PSO-PS: take the first K steps as SSGD does (the gradient averaged over
    the ranks at every step, so every rank takes the same step and keeps the same optimizer
    state), and the periodic rounds only after them (post-local SGD); 0: from the start."""
    average_optimizer_state: bool = False
    """PA, SlowMo and PSO-PS: at every round, average the ranks' optimizer state too
    (momentum; AdamW's moments), so that every rank continues with the moments of all the
    gradients, not only its own; one more Allreduce of the state's size (2N values for
    AdamW)."""
    exchange_dtype: Literal["fp32", "bf16", "int8"] = "fp32"
    """What a round of PA, SlowMo or PSO-PS's centre rules sends: the weights in fp32, or
    their difference from the last round's centre in bf16 or int8 (a scale per 128 values),
    with error feedback; sums are formed in fp32 and every rank gets the same centre."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: one GPU per rank (from its node-local rank; see "Slurm and GPUs") when CUDA is
    present, shared round-robin when a node has fewer GPUs than ranks (rank 0 says so), else
    CPU; cuda: a GPU of its own for every rank (see --allow-gpu-sharing); cpu."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast of the forward pass and loss (the backward follows it): fp32 (none), bf16 or
    fp16 with a loss scaler. Weights, gradients, optimizer and PSO state and every exchange
    stay fp32 (see "Slurm and GPUs")."""
    channels_last: Literal["auto", "on", "off"] = "auto"
    """Batches in channels-last memory format at the model's entrance (images only; the
    weights keep theirs). auto: on for a model with 2-D convolutions that accepts such
    batches, on images of more than one channel, on CPUs and at fp32 on GPUs, where it
    measured faster (not under bf16 on an H200; see "Slurm and GPUs")."""
    compile: bool = False
    """torch.compile the model; its first steps wait for the compiler (about a minute for
    ResNet-20 on 2 CPU cores, cached for later runs)."""
    threads: int = field(default=0, metadata={"metavar": "N"})
    """CPU threads per rank; 0: OMP_NUM_THREADS, or the node's cores shared evenly among its
    ranks."""
    ensemble_eval: bool = False
    """At the end, also evaluate the ranks' final models together (their predictions
    averaged over the whole test set, which every rank evaluates): ensemble_acc in the
    final metrics; for classifiers."""
    metrics_out: str | None = field(default=None, metadata={"metavar": "PATH"})
    """JSON-lines metrics (one line per start, epoch and final), written by rank 0."""
    tensorboard: str | None = field(default=None, metadata={"metavar": "DIR"})
    """TensorBoard logs in this folder: every number of each epoch's metrics as a scalar at the
    global step, written by rank 0 (pip install 'psops_mpi[tensorboard]')."""
    quiet: bool = False
    """No progress bar and no per-epoch lines; errors and the final line only."""
    max_steps: int = field(default=0, metadata={"metavar": "N"})
    """Stop after this many steps per rank (0: run all epochs); for quick checks."""
    checkpoint_dir: str | None = field(default=None, metadata={"metavar": "DIR"})
    """Write checkpoints into this folder (one sub-folder per checkpoint)."""
    checkpoint_every: int = field(default=0, metadata={"metavar": "K"})
    """Write a checkpoint every K steps (0: only the final one)."""
    checkpoint_every_min: float = field(default=0.0, metadata={"metavar": "MIN"})
    """Also write one when this many minutes of wall-clock passed since the last (0: off)."""
    keep_last: int = field(default=3, metadata={"metavar": "N"})
    """Checkpoints kept; older ones are pruned."""
    resume: str = field(default="auto", metadata={"metavar": "{auto,none,PATH}"})
    """The newest complete checkpoint in --checkpoint-dir (auto), a fresh start (none), or one
    checkpoint folder."""
    resume_strict: bool = False
    """Refuse to resume at a world size other than the checkpoint's."""
    cuda_aware: Literal["auto", "on", "off"] = "auto"
    """Hand CUDA buffers to MPI directly (on), stage them through pinned host memory (off), or
    decide from what the MPI library reports (auto)."""
    allow_gpu_sharing: bool = False
    """With --device cuda, allow more ranks per node than GPUs (they share them round-robin;
    --device auto always does)."""
    max_nonfinite: int = field(default=10, metadata={"metavar": "K"})
    """Stop the job (exit code 3) after K consecutive syncs (SSGD: steps; others: rounds)
    skipped because no rank had a finite gradient or finite weights."""
    stall_report_s: float = field(default=120.0, metadata={"metavar": "S"})
    """When ranks have waited S seconds for others at a round, step or agreement, rank 0
    names the ranks that have not arrived, and again every S seconds (0: off)."""
    stall_abort_s: float = field(default=0.0, metadata={"metavar": "S"})
    """End the job (exit code 5) when ranks have waited S seconds for others (0: never)."""
    stop_timeout_s: float = field(default=60.0, metadata={"metavar": "S"})
    """After a stop signal (SIGTERM, SIGUSR1, SIGINT), end the job at once with exit code
    128+N if its ranks have not stopped within S seconds (a rank stuck in user code cannot
    answer); the checkpoint of an agreed stop gets S seconds more. A second signal ends the
    job at once (0: no bound)."""

    def __post_init__(self) -> None:
        if isinstance(self.pso, dict):
            self.pso = PSOConfig(**self.pso)
        check_choices(self)
        for name in ("sync_every", "batch_size", "epochs"):
            _integer(flag(name), getattr(self, name), 1)
        for name in ("threads", "max_steps", "checkpoint_every", "image_size"):
            _integer(flag(name), getattr(self, name), 0)
        if self.data_workers is not None:
            _integer("--data-workers", self.data_workers, 0)
        _integer("--keep-last", self.keep_last, 1)
        _integer("--max-nonfinite", self.max_nonfinite, 1)
        _non_negative("--stall-report-s", self.stall_report_s)
        _non_negative("--stall-abort-s", self.stall_abort_s)
        _non_negative("--stop-timeout-s", self.stop_timeout_s)
        _positive("--lr", self.lr)
        _non_negative("--momentum", self.momentum)
        if self.weight_decay is not None:
            _non_negative("--weight-decay", self.weight_decay)
        if not (isinstance(self.betas, (list, tuple)) and len(self.betas) == 2 and all(
                isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)):
            shown = (" ".join(map(str, self.betas)) if isinstance(self.betas, (list, tuple))
                     else repr(self.betas))
            raise UsageError(f"--betas must be two numbers in [0, 1), got {shown}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))  # a list from TOML
        _positive("--eps", self.eps)
        _non_negative("--clip-grad-norm", self.clip_grad_norm)
        if self.warmup_steps is not None:
            _integer("--warmup-steps", self.warmup_steps, 0)
        _integer("--grad-accum-steps", self.grad_accum_steps, 1)
        _non_negative("--checkpoint-every-min", self.checkpoint_every_min)
        _positive("--outer-lr", self.outer_lr)
        _non_negative("--outer-momentum", self.outer_momentum)
        if self.outer_momentum >= 1:
            raise UsageError(f"--outer-momentum must be below 1, got {self.outer_momentum!r}")
        self._check_exchange()
        if not self.model:
            raise UsageError("--model must not be empty")
        if self.dataset not in (*DATASETS, "imagefolder") and ":" not in self.dataset:
            raise UsageError(f"unknown dataset {self.dataset!r}; choose one of: "
                             f"{', '.join(DATASETS)}, imagefolder, or give your own as "
                             "'package.module:function'")
        if not self.resume:
            raise UsageError("--resume must be 'auto', 'none' or a checkpoint folder")

    def _check_exchange(self) -> None:
        """--overlap, --overlap-steps, --exchange-dtype and --local-after-steps fit the
        algorithm."""
        _integer("--overlap-steps", self.overlap_steps, 0)
        if self.overlap_steps and not self.overlap:
            raise UsageError("--overlap-steps sets when a round left in flight lands: add "
                             "--overlap")
        if self.overlap_steps > self.sync_every:
            raise UsageError(f"--overlap-steps {self.overlap_steps} is beyond the next round "
                             f"(--sync-every {self.sync_every}): a round lands by the next one")
        _integer("--local-after-steps", self.local_after_steps, 0)
        if self.algo == "ssgd" and self.average_optimizer_state:
            raise UsageError("--average-optimizer-state is for pa, slowmo and pso-ps: SSGD's "
                             "ranks hold one optimizer state already")
        if self.average_optimizer_state and self.reset_momentum:
            raise UsageError("--average-optimizer-state and --reset-momentum both set what the "
                             "optimizer keeps at a round: choose one")
        if self.algo == "ssgd" and self.local_after_steps:
            raise UsageError("--local-after-steps starts PA, SlowMo or PSO-PS with SSGD's "
                             "steps; SSGD takes them all along")
        if self.algo == "ssgd" and (self.overlap or self.exchange_dtype != "fp32"):
            raise UsageError("SSGD averages every step's gradient in fp32: --overlap and "
                             "--exchange-dtype are for pa, slowmo and pso-ps")
        if self.exchange_dtype == "fp32" or self.algo != "pso-ps":
            return
        if self.pso.rule != "centre":
            raise UsageError(f"--exchange-dtype {self.exchange_dtype} sends differences from "
                             "the swarm's centre; the particle rule (--pso-preset paper) has "
                             "none: use fp32, or a preset of the centre rule")
        if self.pso.exchange == "allgather":
            raise UsageError(f"--exchange-dtype {self.exchange_dtype} sends the swarm's mean "
                             "and its best particle, not every particle: use --exchange best "
                             "or auto")

    @property
    def landing_steps(self) -> int:
        """With --overlap, the steps from a round's start to its landing (else 0)."""
        if not self.overlap:
            return 0
        return self.overlap_steps or -(-self.sync_every // 4)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain JSON-ready values (stored with every result): as a
        checkpoint's metadata gives it back, so the two compare (``betas`` as a list)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))
