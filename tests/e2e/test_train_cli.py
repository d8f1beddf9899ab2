"""End to end: `mpiexec -n P python -m psops_mpi.train` as a user runs it."""

from __future__ import annotations

import gzip
import json
import math
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.helpers import user_models
from tests.helpers.formats import write_cifar_py, write_file, write_idx_set
from tests.helpers.launch import launch

FINAL_KEYS = {"event", "test_acc", "test_loss", "wall_s", "comm_bytes_per_rank", "comm_s",
              "steps", "world_size", "config"}


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_default_run_learns_mnist1d_and_writes_final_metrics(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    res = launch(["--epochs", "10", "--metrics-out", str(metrics)], ranks=2)
    assert res.returncode == 0, res.stderr
    events = read_metrics(metrics)
    assert events[0]["event"] == "start" and events[0]["world_size"] == 2
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(1, 11))
    final = events[-1]
    assert final["event"] == "final" and set(final) >= FINAL_KEYS
    assert final["test_acc"] > 0.7  # chance is 0.1
    assert final["config"]["algo"] == "pso-ps" and final["config"]["model"] == "cnn1d"
    assert final["world_size"] == 2 and final["comm_bytes_per_rank"] > 0
    assert "final: test acc" in res.stdout
    assert "exchange allgather (auto: the cheaper for this swarm)" in res.stdout


def read_shards(folder: Path, *names: str) -> list[dict[str, np.ndarray]]:
    """The datasets ``names`` of every rank's shard of a checkpoint folder, rank by rank."""
    meta = json.loads((folder / "metadata.json").read_text())
    arrays = []
    for entry in meta["shards"]:
        with h5py.File(folder / entry["file"], "r") as fh:
            arrays.append({name: fh[name][()] for name in names})
    return arrays


def final_checkpoint(root: Path) -> Path:
    folders = sorted(root.glob("step-*/metadata.json"))
    assert folders, f"no checkpoint in {root}"
    return folders[-1].parent


@pytest.mark.parametrize("algo", ["ssgd", "pso-ps"])
def test_four_ranks_end_on_one_model_having_sent_what_the_manual_says(tmp_path: Path,
                                                                      algo: str) -> None:
    """SSGD and the default PSO-PS (its rule moves the swarm as one) at four ranks: one model
    at the end, and each rank sent what the manual says its algorithm sends. (PA at four
    ranks: the MPI tier and the killed runs; its bytes are SSGD's per round, plus a flag.)"""
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    res = launch(["--algo", algo, "--dataset", "synthetic", "--epochs", "3", "--quiet",
                  "--exchange", "best", "--metrics-out", str(metrics),
                  "--checkpoint-dir", str(ckpt)], ranks=4)
    assert res.returncode == 0, res.stderr
    final = read_metrics(metrics)[-1]
    assert final["world_size"] == 4 and final["config"]["algo"] == algo
    assert final["test_acc"] > 0.5
    name = "model/position"
    models = [shard[name] for shard in read_shards(final_checkpoint(ckpt), name)]
    for rank, weights in enumerate(models[1:], start=1):
        np.testing.assert_allclose(weights, models[0], rtol=1e-6, atol=1e-7,
                                   err_msg=f"rank {rank} ends on another model than rank 0")
    # The synthetic mlp has no BatchNorm: only weights (or gradients) travel. 4 ranks:
    # an allreduce sends 2(P-1)/P*4N = 6N bytes per rank (PA: N+1 floats, the weights and
    # their finite flag); PSO-PS's centre rule with 'best': the allreduce of [x ; 1] for the
    # mean, MINLOC (16 bytes) and the broadcast of the best particle (4N) per round.
    n = final["num_params"]
    assert n == 32 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    expected = {"ssgd": final["steps"] * 6 * n, "pa": final["rounds"] * 6 * (n + 1),
                "pso-ps": final["rounds"] * (6 * (n + 1) + 16 + 4 * n)}[algo]
    assert final["rounds"] >= 3 and final["comm_bytes_per_rank"] == expected
    if algo == "ssgd":  # a round is one Allreduce of the gradient: one per step
        assert final["rounds"] == final["steps"]


@pytest.mark.parametrize("ranks", [0, 1], ids=["singleton", "mpiexec-n1"])
def test_single_process(tmp_path: Path, ranks: int) -> None:
    metrics = tmp_path / "m.jsonl"
    res = launch(["--dataset", "synthetic", "--max-steps", "30", "--metrics-out", str(metrics)],
                 ranks=ranks)
    assert res.returncode == 0, res.stderr
    final = read_metrics(metrics)[-1]
    assert final["steps"] == 30 and final["world_size"] == 1 and final["comm_bytes_per_rank"] == 0


def test_console_script_is_installed() -> None:
    exe = shutil.which("psops-train")
    assert exe is not None, "psops-train missing: install the package (pip install -e .)"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "--sync-every" in out.stdout


def mnist_dir(base: Path, num_train: int = 20, truncate: int = 0) -> Path:
    """MNIST files in base/mnist; ``truncate`` cuts bytes off the training images."""
    folder = base / "mnist"
    write_idx_set(folder, n_train=num_train, n_test=10)
    if truncate:
        images = folder / "train-images-idx3-ubyte.gz"
        with gzip.open(images) as fh:
            payload = fh.read()
        write_file(images.with_suffix(""), payload[:-truncate], gz=True)
    return folder


def test_cifar10_with_augmentation_and_batchnorm(tmp_path: Path) -> None:
    """PA trains resnet20 on CIFAR-10 files: every training batch was augmented (random
    crops leave zero padding, counted by a probe in front of the model), and the BatchNorm
    statistics were trained and end the same on both ranks. On the CPU its batches enter the
    model in channels-last format (``--channels-last auto``), as the start line says."""
    write_cifar_py(tmp_path / "cifar-10-batches-py", n=32)  # 160 train, 32 test images
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    res = launch(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--algo", "pa",
                  "--model", "tests.helpers.user_models:resnet20_with_probe",
                  "--epochs", "2", "--batch-size", "16", "--sync-every", "2",
                  "--metrics-out", str(metrics), "--checkpoint-dir", str(ckpt)], ranks=2)
    assert res.returncode == 0, res.stderr
    final = read_metrics(metrics)[-1]
    steps = 2 * (80 // 16)  # 2 epochs of 80 images per rank
    assert final["config"]["dataset"] == "cifar10" and final["steps"] == steps
    assert final["num_params"] == 269_722 and math.isfinite(final["test_loss"])
    on_cpu = not torch.cuda.is_available()  # --channels-last auto: on for CIFAR on the CPU
    assert final["config"]["channels_last"] == ("on" if on_cpu else "off")
    assert (", channels-last, " in res.stdout) is on_cpu
    shards = read_shards(final_checkpoint(ckpt), "model/other/0.batches",
                         "model/other/0.padded", "model/buffers")
    probes = [(int(s["model/other/0.batches"]), int(s["model/other/0.padded"])) for s in shards]
    buffers = [s["model/buffers"] for s in shards]
    assert probes == [(steps, steps)] * 2  # every batch of every rank held padding
    fresh = [b.detach().reshape(-1) for b in user_models.resnet20_with_probe(
        (3, 32, 32), 10).buffers() if b.is_floating_point()]
    assert not np.allclose(buffers[0], torch.cat(fresh).numpy())  # statistics were trained
    np.testing.assert_allclose(buffers[1], buffers[0], rtol=1e-6, atol=1e-7)


def test_lr_schedule_gives_every_step_its_learning_rate(tmp_path: Path) -> None:
    """The model's extra parameter gets gradient 1 at every step, so under plain SGD it sits
    at minus the sum of the learning rates so far; checkpoints every 5 of the 20 steps show
    a linear schedule after a warmup of 4 steps, by hand (each schedule's formula:
    tests/unit/test_recipe.py)."""
    lr, num_steps = 0.1, 20
    rates = {("linear", 4): [lr * (j + 1) / 4 for j in range(4)]
             + [lr * (1 - (j - 4) / (num_steps - 4)) for j in range(4, num_steps)]}
    for (schedule, warmup), rate in rates.items():
        ckpt = tmp_path / schedule
        res = launch(["--dataset", "synthetic", "--model", "tests.helpers.user_models:lr_clock",
                      "--algo", "pa", "--lr", str(lr), "--lr-schedule", schedule,
                      "--warmup-steps", str(warmup),
                      "--momentum", "0", "--weight-decay", "0", "--max-steps", str(num_steps),
                      "--checkpoint-dir", str(ckpt), "--checkpoint-every", "5",
                      "--keep-last", "10", "--quiet"], ranks=2)
        assert res.returncode == 0, res.stderr
        seen = []
        for meta_file in sorted(ckpt.glob("step-*/metadata.json")):
            meta = json.loads(meta_file.read_text())
            assert meta["layout"]["params"][0] == ["clock", [1]]  # first in model/position
            for shard in read_shards(meta_file.parent, "model/position"):
                clock = float(shard["model/position"][0])
                assert clock == pytest.approx(-sum(rate[: meta["step"]]), abs=1e-5), (
                    schedule, meta["step"])
            seen.append(meta["step"])
        assert seen == [5, 10, 15, 20]


def test_fitness_holdout_from_the_command_line(tmp_path: Path) -> None:
    """With --fitness holdout a particle's fitness is its loss on the holdout batch in eval
    mode; this model outputs zero logits there, so every fitness is ln(10) exactly, far
    from the training loss it would be with the default fitness."""
    metrics = tmp_path / "m.jsonl"
    res = launch(["--dataset", "synthetic", "--model",
                  "tests.helpers.user_models:constant_in_eval", "--fitness", "holdout",
                  "--sync-every", "4", "--max-steps", "16", "--quiet",
                  "--metrics-out", str(metrics)], ranks=2)
    assert res.returncode == 0, res.stderr
    events = read_metrics(metrics)
    epoch, final = [e for e in events if e["event"] == "epoch"][-1], events[-1]
    assert final["config"]["pso"]["fitness"] == "holdout" and epoch["rounds"] == 4
    assert epoch["gbest_fitness"] == pytest.approx(math.log(10), abs=1e-6)
    assert epoch["train_loss"] < math.log(10) - 0.5  # what the training loss would give


# A job's way from bad input to one line and exit code 2, for each kind of input: flags
# (argparse's and the settings' own checks; every setting's check is a unit test in
# tests/unit/test_config.py), files, data (every format's damage: tests/unit/test_data.py),
# a user's model.
BAD_INPUTS = {
    "unknown algo": (["--algo", "sgd"], "invalid choice: 'sgd'"),
    "model that does not import": (["--model", "nosuchpkg.mod:make"], "cannot import module"),
    "truncated idx": (["--dataset", "mnist", "--data-dir", "{truncated}"],
                      "train-images-idx3-ubyte"),
    "more ranks than samples": (["--dataset", "mnist", "--data-dir", "{one_sample}"],
                                "more ranks (2) than training samples (1)"),
    "int8 where it cannot go": (["--pso-preset", "paper", "--exchange-dtype", "int8"],
                                "the particle rule (--pso-preset paper) has none"),
    "model failing on one rank": (["--dataset", "synthetic", "--model",
                                   "tests.helpers.user_models:fails_on_rank_one"],
                                  "on rank 1: model"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    base = tmp_path_factory.mktemp("bad")
    return {
        "tmp": str(base),
        "truncated": str(mnist_dir(base / "truncated", truncate=100)),
        "one_sample": str(mnist_dir(base / "one_sample", num_train=1)),
    }


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gets_one_line_and_exit_code_2(case: str, bad_files: dict) -> None:
    args, needle = BAD_INPUTS[case]
    res = launch([a.format(**bad_files) for a in args], ranks=2, timeout=120)
    assert res.returncode == 2, (res.returncode, res.stderr)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, res.stderr  # one line for the whole job, no traceback
    assert lines[0].startswith("psops_mpi: error: ") and needle in lines[0], lines[0]


def test_launcher_and_mpi_mismatch_is_refused() -> None:
    res = launch(["--dataset", "synthetic"], ranks=0, env={"OMPI_COMM_WORLD_SIZE": "2"})
    assert res.returncode == 2
    assert "MPI sees a world of size 1" in res.stderr and "--mpi=pmi2" in res.stderr


@pytest.mark.parametrize("flags", [[], ["--overlap", "--overlap-steps", "8"]],
                         ids=["blocking", "round in flight"])
def test_failure_on_one_rank_ends_the_whole_job_quickly(flags: list[str]) -> None:
    """Rank 1 raises at its 20th step; with --overlap the round of step 16 is then in
    flight on rank 0, which must not wait for it forever."""
    res = launch(["--dataset", "synthetic", "--model",
                  "tests.helpers.user_models:explodes_on_rank_one", "--quiet", *flags],
                 ranks=2, timeout=120)
    assert res.returncode != 0
    assert "psops_mpi: rank 1 failed, aborting the job: RuntimeError: simulated failure" \
        in res.stderr
    assert res.seconds < 60


def test_nan_particle_never_becomes_gbest_and_restarts_there(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    res = launch(["--dataset", "synthetic", "--model",
                  "tests.helpers.user_models:nan_on_rank_zero", "--epochs", "2", "--quiet",
                  "--metrics-out", str(metrics)], ranks=2)
    assert res.returncode == 0, res.stderr
    epochs = [e for e in read_metrics(metrics) if e["event"] == "epoch"]
    assert all(e["gbest_fitness"] is not None for e in epochs)  # finite (NaN would be null)
    assert epochs[-1]["restarts"] >= epochs[-1]["rounds"] - 1  # every round after the first
    assert read_metrics(metrics)[-1]["test_acc"] > 0.3  # the swarm's answer is rank 1's model


def test_another_seed_gives_another_run(tmp_path: Path) -> None:
    """(The same seed gives the same run to the last bit: the killed and resumed runs of
    tests/e2e/test_checkpoint_resume.py end as separate launches never stopped.)"""

    def final(seed: int, name: str) -> dict:
        metrics = tmp_path / name
        res = launch(["--dataset", "synthetic", "--max-steps", "40", "--seed", str(seed),
                      "--quiet", "--metrics-out", str(metrics)], ranks=2)
        assert res.returncode == 0, res.stderr
        return read_metrics(metrics)[-1]

    first, other = final(3, "a.jsonl"), final(4, "b.jsonl")
    assert first["test_loss"] != other["test_loss"]


@pytest.mark.parametrize("precision", ["bf16"])
def test_mixed_precision_learns_on_the_cpu_and_keeps_fp32_state(tmp_path: Path,
                                                                 precision: str) -> None:
    """Five epochs of the default PSO-PS in bf16 autocast learn MNIST-1D (chance is 0.1; fp32
    reaches about 0.73 here), and the checkpoint holds fp32 weights and swarm. (fp16: the
    killed SSGD run in tests/e2e/test_checkpoint_resume.py keeps fp32 weights too.)"""
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    res = launch(["--epochs", "5", "--precision", precision, "--metrics-out", str(metrics),
                  "--checkpoint-dir", str(ckpt)], ranks=2)
    assert res.returncode == 0, res.stderr
    assert f"on cpu in {precision} (autocast)" in res.stdout
    final = read_metrics(metrics)[-1]
    assert final["config"]["precision"] == precision and final["test_acc"] > 0.6
    folder = final_checkpoint(ckpt)
    assert json.loads((folder / "metadata.json").read_text())["dtype"] == "float32"
    names = ("model/position", "sync/swarm/velocity", "sync/swarm/gbest",
             "optimizer/0/momentum_buffer")
    for shard in read_shards(folder, *names):
        assert all(array.dtype == np.float32 for array in shard.values())
