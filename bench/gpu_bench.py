"""psops_mpi's training throughput against a plain PyTorch loop, side by side in one run.

What it compares, per case (a number of ranks, an algorithm, a precision):

* ``psops_mpi``: the library's own training loop (:func:`psops_mpi.loop.train`) on a run that
  :func:`psops_mpi.run.build_run` builds from the command-line flags a user would give
  (``--dataset cifar10 --model resnet20 --batch-size 256 --precision P --algo A``), with the
  synchroniser's rounds, the stop-signal agreements and the per-epoch evaluation included;
* ``plain``: the loop one would write by hand with the same model factory, the same data on the
  device, the same augmented batches (``ShardedBatches``: one shuffle, the crops and flips drawn
  on the device), the same SGD and the same autocast (and GradScaler for fp16), evaluating the
  test set after every epoch, and no communication at all. With P ranks, P such loops run at
  once on their own shards (the ranks that share one GPU share it here too).

Variants at one rank (``--variants``): ``noaug``, the plain loop without augmentation (what
the augmentation costs); ``channels_last``, both sides in channels-last memory format
(psops_mpi's ``--channels-last on``: the batches only, as its weights are views of the flat
buffer; the plain loop: model and batches, the usual recipe); ``compile``, both sides with
``torch.compile`` of the model (psops_mpi's ``--compile``). The plain side of the base case
and psops_mpi's are contiguous and not compiled (``--channels-last off``).

Throughput is steady state: samples trained from the end of the first epoch (warm-up:
cuDNN's choices, allocator growth, compilation) to the end of the last, divided by the wall
time between them, evaluation included, summed over ranks. ``ratio`` = psops_mpi / plain,
measured in the same repeat; the figure is the median over ``--repeats``, and the two sides'
order alternates from one repeat to the next. The data are CIFAR-shaped (50,000 + 10,000
images, 3x32x32, random pixels and labels: throughput does not depend on what they show),
written once as CIFAR-10 binary files into a temporary folder, so the ``--dataset cifar10``
loader reads them like the real set.

Run it (it starts its own ``mpiexec`` launches; rank counts from ``--ranks``)::

    python bench/gpu_bench.py --json bench/results/gpu_h200.json
    python bench/gpu_bench.py --ranks 1 --precisions fp32 --epochs 2 --repeats 1 --device cpu \
        --train-samples 2048 --test-samples 512 --batch-size 64     # a quick look on a CPU

On one GPU, ``--ranks 2`` means two ranks sharing it (``--device auto`` shares, and says so).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import gc
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ALGOS = ("ssgd", "pa", "slowmo", "pso-ps")
VARIANTS = ("noaug", "channels_last", "compile")
# psops_mpi's flags in the base case and in each variant that it has too.
PSOPS_FLAGS = {"": ["--channels-last", "off"], "channels_last": ["--channels-last", "on"],
               "compile": ["--channels-last", "off", "--compile"]}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2", help="rank counts, comma-separated (1,2)")
    parser.add_argument("--algos", default=",".join(ALGOS),
                        help="algorithms at more than one rank (at 1 rank: pso-ps only, as "
                             "every algorithm is then local SGD)")
    parser.add_argument("--precisions", default="fp32,bf16", help="fp32, bf16, fp16")
    parser.add_argument("--variants", default="",
                        help=f"extra variants at 1 rank: {', '.join(VARIANTS)}")
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--batch-size", type=int, default=256, help="per rank")
    parser.add_argument("--sync-every", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help="the first is warm-up")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--train-samples", type=int, default=50_000)
    parser.add_argument("--test-samples", type=int, default=10_000)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--algo", default="pso-ps", help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be at least 2: the first one is warm-up")
    unknown = set(_split(args.variants)) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown --variants {', '.join(sorted(unknown))}; "
                     f"choose from {', '.join(VARIANTS)}")
    return args


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# ---- the data

def write_cifar_shaped(folder: Path, train: int, test: int, seed: int = 0) -> Path:
    """CIFAR-10 binary files (``data_batch_1.bin`` … ``_5``, ``test_batch.bin``) of random
    pixels and labels: 1 label byte and 3072 pixel bytes per image."""
    out = folder / "cifar-10-batches-bin"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    per_file = -(-train // 5)
    sizes = [min(per_file, train - i * per_file) for i in range(5)] + [test]
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name, size in zip(names, sizes, strict=True):
        records = rng.integers(0, 256, (max(size, 1), 3073), dtype=np.uint8)
        records[:, 0] %= 10
        (out / name).write_bytes(records.tobytes())
    return out


# ---- one rank's side of a case (runs under mpiexec)

def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def psops_side(args: argparse.Namespace, variant: str = "") -> tuple[int, float]:
    """Train with psops_mpi's loop; (samples this rank trained after epoch 1, seconds)."""
    import torch
    from mpi4py import MPI

    from psops_mpi.loop import LoopState, train
    from psops_mpi.run import build_run, checkpointer
    from psops_mpi.world import node_local

    comm = MPI.COMM_WORLD
    with tempfile.TemporaryDirectory() as tmp:
        metrics = Path(tmp) / "m.jsonl"
        argv = ["--dataset", "cifar10", "--data-dir", args.data_dir, "--model", args.model,
                "--algo", args.algo, "--precision", args.precision, "--device", args.device,
                "--batch-size", str(args.batch_size), "--sync-every", str(args.sync_every),
                "--epochs", str(args.epochs), "--quiet", "--metrics-out", str(metrics),
                *PSOPS_FLAGS[variant]]
        if variant == "compile":
            torch._dynamo.reset()  # as the plain side: compiled afresh in every repeat
        if args.device == "cuda":
            argv.append("--allow-gpu-sharing")  # as the plain side: ranks may share a GPU
        run = build_run(argv, comm, node_local(comm))
        state = LoopState(run.steps_per_epoch, run.world.device)
        train(run, state, checkpointer(run, state))
        run.metrics.close()
        epochs = []
        if comm.rank == 0:
            lines = metrics.read_text().splitlines()
            epochs = [e for e in map(json.loads, lines) if e.get("event") == "epoch"]
        first, last = comm.bcast((epochs[0], epochs[-1]) if epochs else None)
    samples = (last["step"] - first["step"]) * args.batch_size
    return samples, last["wall_s"] - first["wall_s"]


def plain_side(args: argparse.Namespace, variant: str = "") -> tuple[int, float]:
    """The hand-written loop on this rank's shard; (samples after epoch 1, seconds)."""
    import torch
    import torch.nn.functional as F
    from mpi4py import MPI

    from psops_mpi import data, models
    from psops_mpi.config import TrainConfig
    from psops_mpi.precision import DTYPES
    from psops_mpi.recipe import make_optimizer
    from psops_mpi.world import choose_gpu, node_local

    comm = MPI.COMM_WORLD
    device = choose_gpu(args.device, node_local(comm), allow_sharing=True)[0]
    dataset = data.load_dataset("cifar10", args.data_dir, device)
    if variant == "noaug":
        dataset = dataclasses.replace(dataset, augment=False)
    batches = data.ShardedBatches(dataset, comm.rank, comm.size, args.batch_size, seed=0)
    test_x, test_y = data.eval_shard(dataset, comm.rank, comm.size)
    torch.manual_seed(0)
    model = models.build_model(args.model, dataset.input_shape, dataset.num_classes).to(device)
    fmt = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=fmt)
    if variant == "compile":
        torch._dynamo.reset()  # each repeat compiles afresh, never past the recompile limit
    forward: Callable[[torch.Tensor], torch.Tensor] = (
        torch.compile(model) if variant == "compile" else model)
    # psops_mpi's default recipe (SGD, its settings), as the psops_mpi side builds it
    optimizer = make_optimizer(model, TrainConfig())
    dtype = DTYPES[args.precision]
    scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "fp16")

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def evaluate() -> float:  # as psops_mpi.loop.evaluate: fp32, loss and accuracy
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=device)
        with torch.no_grad():
            for start in range(0, len(test_x), 1024):
                out = forward(test_x[start:start + 1024].contiguous(memory_format=fmt))
                target = test_y[start:start + 1024]
                totals[0] += F.cross_entropy(out, target, reduction="sum")
                totals[1] += (out.argmax(1) == target).sum()
        model.train()
        return float(totals[1]) / len(test_x)

    comm.Barrier()
    ends = []
    for epoch in range(args.epochs):
        for x, y in batches.epoch(epoch):
            with autocast():
                loss = F.cross_entropy(forward(x.contiguous(memory_format=fmt)), y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        evaluate()
        _sync(device)
        comm.Barrier()  # the ranks' windows coincide, as psops_mpi's rounds keep them
        ends.append(time.perf_counter())
    return (args.epochs - 1) * batches.batches_per_epoch * args.batch_size, ends[-1] - ends[0]


def worker(args: argparse.Namespace) -> None:
    """Rank side of one case: the sides in an order that alternates over the repeats; rank 0
    prints one JSON line per repeat."""
    import torch
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    sides: list[tuple[str, Callable[[], tuple[int, float]]]] = [
        ("psops_mpi", lambda: psops_side(args)), ("plain", lambda: plain_side(args))]
    for v in _split(args.variants) if comm.size == 1 else []:
        if v in PSOPS_FLAGS:
            sides.append((f"psops_mpi+{v}", lambda v=v: psops_side(args, v)))
        sides.append((f"plain+{v}", lambda v=v: plain_side(args, v)))
    for repeat in range(args.repeats):
        order = sides if repeat % 2 == 0 else sides[::-1]
        result = {"repeat": repeat}
        for name, side in order:
            samples, seconds = side()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            totals = comm.gather((samples, seconds))
            if comm.rank == 0:  # every rank trained for the whole time: the slowest one counts
                result[name] = sum(s for s, _ in totals) / max(t for _, t in totals)
        if comm.rank == 0:
            print("RESULT " + json.dumps(result), flush=True)


# ---- the driver: one mpiexec launch per case

def launch_case(args: argparse.Namespace, ranks: int, algo: str, precision: str,
                data_dir: Path) -> list[dict[str, Any]]:
    """Start one case under mpiexec; its per-repeat results."""
    cmd = ["mpiexec", "-n", str(ranks), sys.executable, __file__, "--worker", "--algo", algo,
           "--precision", precision, "--data-dir", str(data_dir), "--model", args.model,
           "--batch-size", str(args.batch_size), "--sync-every", str(args.sync_every),
           "--epochs", str(args.epochs), "--repeats", str(args.repeats), "--device", args.device,
           "--variants", args.variants if ranks == 1 else ""]
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [repo, *filter(None, [os.environ.get("PYTHONPATH")])])}
    # A session of its own: on a timeout, or when this script is stopped, every rank goes too.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        out, err = "", f"no result within --timeout {args.timeout} s"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    if proc.returncode != 0:
        tail = "\n".join(err.strip().splitlines()[-5:])
        raise SystemExit(f"gpu_bench: {ranks} rank(s) {algo} {precision} failed "
                         f"(exit {proc.returncode}):\n{tail}")
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines()
            if line.startswith("RESULT ")]


def cases(args: argparse.Namespace) -> Iterator[tuple[int, str, str]]:
    for ranks in map(int, _split(args.ranks)):
        algos = ["pso-ps"] if ranks == 1 else _split(args.algos)
        for algo in algos:
            for precision in _split(args.precisions):
                yield ranks, algo, precision


def summarise(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over the repeats: samples/s of every side, and psops_mpi / plain in the base
    case (``ratio``) and in each variant both sides ran (``ratio+VARIANT``)."""
    names = [k for k in repeats[0] if k != "repeat"]
    row: dict[str, Any] = {k: statistics.median(r[k] for r in repeats) for k in names}
    for suffix in ["", *(n.removeprefix("psops_mpi") for n in names if n.startswith("psops_mpi+"))]:
        ratios = [r["psops_mpi" + suffix] / r["plain" + suffix] for r in repeats]
        row["ratio" + suffix] = statistics.median(ratios)
        row["ratio_range" + suffix] = (min(ratios), max(ratios))
    return row


def environment() -> dict[str, Any]:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__, "gpu": gpu, "cpus": os.cpu_count()}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    # SIGTERM (a step timeout, scancel) unwinds like Ctrl-C: the running launch is killed and
    # the data folder removed by the finally clauses.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    env = environment()
    print(f"gpu_bench: {env['gpu'] or 'no GPU'}, torch {env['torch']}, {args.model}, batch "
          f"{args.batch_size} per rank, {args.epochs} epochs (steady state from epoch 2), "
          f"median of {args.repeats}", flush=True)
    print(f"{'ranks':>5} {'algo':>7} {'prec':>5} {'psops/s':>9} {'plain/s':>9} "
          f"{'ratio':>6} {'range':>12}  variants (samples/s; psops_mpi / plain)", flush=True)
    rows: list[dict[str, Any]] = []
    folder = Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    try:
        data_dir = write_cifar_shaped(folder, args.train_samples, args.test_samples)
        for ranks, algo, precision in cases(args):
            row = {"ranks": ranks, "algo": algo, "precision": precision,
                   "repeats": launch_case(args, ranks, algo, precision, data_dir)}
            row.update(summarise(row["repeats"]))
            rows.append(row)
            print_row(row)
            if args.json:  # after every case: a run cut short keeps what it measured
                write_json(args, env, rows)
    except KeyboardInterrupt:
        raise SystemExit(f"gpu_bench: stopped after {len(rows)} case(s)"
                         + (f"; {args.json} holds them" if args.json and rows else "")) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def print_row(row: dict[str, Any]) -> None:
    extra = "  ".join(variant_text(row, k[6:]) for k in row if k.startswith("plain+"))
    low, high = row["ratio_range"]
    print(f"{row['ranks']:>5} {row['algo']:>7} {row['precision']:>5} {row['psops_mpi']:>9.0f} "
          f"{row['plain']:>9.0f} {row['ratio']:>6.3f} {low:>5.3f}-{high:.3f}  {extra}",
          flush=True)


def variant_text(row: dict[str, Any], variant: str) -> str:
    """``noaug plain 1234`` or ``compile 1200/1250 0.960``."""
    plain = row[f"plain+{variant}"]
    if f"psops_mpi+{variant}" not in row:
        return f"{variant} plain {plain:.0f}"
    return f"{variant} {row[f'psops_mpi+{variant}']:.0f}/{plain:.0f} {row[f'ratio+{variant}']:.3f}"


def write_json(args: argparse.Namespace, env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    settings = {k: v for k, v in vars(args).items()
                if k not in ("worker", "algo", "precision", "data_dir", "json")}
    Path(args.json).write_text(json.dumps({"environment": env, "settings": settings,
                                           "rows": rows}, indent=1) + "\n")

if __name__ == "__main__":
    main()
