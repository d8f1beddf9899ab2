"""A user's own data through ``python -m psops_mpi.train`` under a real ``mpiexec``: an
iterable set's uneven shards, a set larger than the memory the ranks may use, a folder of
real PNGs, the example, and the ways it can go wrong (each one line; a dead worker ends the
job). Exact resume with DataLoader workers, and at another world size:
tests/e2e/test_recipe_cli.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from psops_mpi.checkpoint import complete_checkpoints
from psops_mpi.factories import torchvision_or_none
from psops_mpi.world import data_workers
from tests.helpers.formats import FASHION_MNIST, write_fashion_pngs
from tests.helpers.launch import REPO, job_command, launch, run_bounded
from tests.helpers.user_data import write_disk_samples

SPEC = "tests.helpers.user_data:"
BLOBS = ["--dataset", SPEC + "blobs", "--model", "mlp", "--batch-size", "32", "--quiet"]
needs_fashion = pytest.mark.skipif(not FASHION_MNIST.is_dir(),
                                   reason="Debian's dataset-fashion-mnist is not installed")


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("psops_mpi: error:")]


def test_an_iterable_set_with_uneven_shards_agrees_on_its_steps(tmp_path: Path) -> None:
    """Rank 0 holds 450 samples, rank 1 487: both run rank 0's 14 steps, and the start line
    counts what is dropped (937 - 2 x 14 x 32)."""
    metrics = tmp_path / "m.jsonl"
    res = launch(["--dataset", SPEC + "stream", "--model", "mlp", "--epochs", "2",
                  "--data-workers", "1", "--metrics-out", str(metrics)], ranks=2)
    assert res.returncode == 0, res.stderr
    assert "an iterable set read by a DataLoader, 1 worker(s) per rank; 41 training " \
           "samples beyond the agreed steps are dropped each epoch" in res.stdout, res.stdout
    final = json.loads(metrics.read_text().splitlines()[-1])
    assert final["steps"] == 2 * 14 and final["test_acc"] > 0.5  # 450 samples: 14 x 32


def test_a_set_three_times_larger_than_the_memory_limit_trains_to_its_end(
        tmp_path: Path) -> None:
    """1.5 GiB of samples on disk, read lazily by one worker per rank, while every process
    of the job (ranks and workers) may hold 512 MiB of data (RLIMIT_DATA, set by prlimit
    on the launcher and inherited). The same limit stops a read of the whole file: it
    binds."""
    limit = f"--data={512 << 20}"
    data = tmp_path / "disk"
    write_disk_samples(data, 6144, (1, 512, 512))  # 256 KiB each
    whole = subprocess.run(["prlimit", limit, sys.executable, "-c", "import numpy as np; "
                            f"np.fromfile('{data / 'samples.u8'}', np.uint8)"],
                           capture_output=True, text=True, timeout=60)
    assert whole.returncode != 0 and "Unable to allocate 1.50 GiB" in whole.stderr
    metrics = tmp_path / "m.jsonl"
    cmd, env = job_command(["--dataset", SPEC + "disk_samples", "--data-dir", str(data),
                            "--model", "tests.helpers.user_models:pooled", "--epochs", "1",
                            "--data-workers", "1", "--quiet", "--metrics-out", str(metrics)])
    res = run_bounded(["prlimit", limit, *cmd], 300, env)
    assert res.returncode == 0, res.stderr
    final = json.loads(metrics.read_text().splitlines()[-1])
    assert final["steps"] == 6144 // 2 // 32


@needs_fashion
def test_a_folder_of_real_pngs_trains_and_a_file_that_does_not_decode_is_named(
        tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_fashion_pngs(root, per_class=60, test_per_class=20)
    args = ["--dataset", "imagefolder", "--data-dir", str(root), "--model", "lenet",
            "--epochs", "4", "--quiet", "--metrics-out", str(tmp_path / "m.jsonl")]
    res = launch(args, ranks=2)
    assert res.returncode == 0, res.stderr
    final = json.loads((tmp_path / "m.jsonl").read_text().splitlines()[-1])
    assert final["test_acc"] > 0.3  # chance is 0.1; 600 images, 4 epochs
    # the default, resolved: 2 ranks on a 2-core machine get none
    assert final["config"]["data_workers"] == data_workers(None, local_size=2)

    bad = root / "train" / "class-3" / "broken.png"
    bad.write_bytes(b"not an image at all")
    res = launch(args, ranks=2)
    assert res.returncode == 2
    assert errors(res.stderr) == [f"psops_mpi: error: on rank {which}: imagefolder: {bad} is "
                                  "not an image Pillow can read (cannot identify image file "
                                  f"'{bad}')" for which in "01" if f"on rank {which}"
                                  in res.stderr]
    truncated = bad  # now a PNG's header, then nothing
    truncated.write_bytes(next((root / "test" / "class-3").glob("*.png")).read_bytes()[:60])
    res = launch([*args, "--data-workers", "1"], ranks=2)
    assert res.returncode == 1
    assert re.search(rf"rank \d failed, aborting the job: UsageError: imagefolder: cannot "
                     rf"decode {re.escape(str(truncated))} \(", res.stderr), res.stderr


def test_bad_input_is_one_line_and_exit_code_2_on_every_rank() -> None:
    res = launch(["--dataset", SPEC + "label_outside_listed", "--model", "mlp"], ranks=2)
    assert res.returncode == 2
    assert errors(res.stderr) == [
        "psops_mpi: error: sample 300 of 'tests.helpers.user_data:label_outside_listed' "
        "(training set) has label 12, outside the 10 classes (0..9)"]


def test_a_worker_that_dies_ends_the_job_naming_the_rank_and_keeps_the_checkpoint(
        tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    res = launch(["--dataset", SPEC + "kills_its_worker", "--model", "mlp", "--epochs", "3",
                  "--data-workers", "1", "--checkpoint-dir", str(ckpt), "--checkpoint-every",
                  "4", "--quiet"], ranks=2, env={"KILL_AFTER": "600"})
    assert res.returncode == 1, res.stderr
    lines = [line for line in res.stderr.splitlines() if "aborting the job" in line]
    assert lines and re.search(r"rank (\d) failed, aborting the job: RuntimeError: a "
                               r"DataLoader worker of rank \1 died \(pid \d+, killed by "
                               r"SIGKILL\) while reading epoch \d, batch \d+; ", lines[0]), \
        res.stderr[-3000:]
    steps = [s for s, _ in complete_checkpoints(ckpt)]
    assert steps and all(s % 4 == 0 for s in steps)


@needs_fashion
def test_the_example_trains_through_the_command_line(tmp_path: Path) -> None:
    """examples/own_data.py as its docstring runs it (fewer steps)."""
    data = tmp_path / "fashion-npy"
    res = run_bounded([sys.executable, "examples/own_data.py", "write", str(data)], 60,
                      {**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr
    metrics = tmp_path / "m.jsonl"
    res = launch(["--dataset", "examples.own_data:fashion_shards", "--model",
                  "examples.own_data:small_cnn", "--data-dir", str(data), "--epochs", "1",
                  "--max-steps", "150", "--metrics-out", str(metrics)], ranks=2)
    assert res.returncode == 0, res.stderr
    assert "examples.own_data:fashion_shards: a map-style set read by a DataLoader" in res.stdout
    final = json.loads(metrics.read_text().splitlines()[-1])
    assert final["steps"] == 150 and final["test_acc"] > 0.6  # chance is 0.1


@needs_fashion
@pytest.mark.skipif(torchvision_or_none() is None,
                    reason="torchvision does not import beside this torch build")
def test_a_torchvision_model_by_name_trains_on_a_folder(tmp_path: Path) -> None:
    root = tmp_path / "images"
    write_fashion_pngs(root, per_class=20, test_per_class=5)
    res = launch(["--dataset", "imagefolder", "--data-dir", str(root), "--model",
                  "torchvision:resnet18", "--image-size", "32", "--epochs", "1",
                  "--batch-size", "16"], ranks=2)
    assert res.returncode == 0, res.stderr
    assert "model torchvision:resnet18 with 11,181,642 parameters" in res.stdout
