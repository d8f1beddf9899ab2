"""--compile and --channels-last change how fast the model runs, not what it learns: a run with
either setting ends where the same run without it ends (to float rounding), and writes the
same checkpoints. On the CPU, whose ``auto`` rule these tests read; on a GPU the two settings
are measured by ``bench/gpu_bench.py --variants channels_last,compile``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.e2e.test_train_cli import read_metrics, read_shards
from tests.helpers.formats import write_cifar_py
from tests.helpers.launch import launch


def positions(folder: Path) -> list[np.ndarray]:
    return [s["model/position"] for s in read_shards(folder, "model/position")]


def assert_same_training(with_it: Path, without: Path, step: int, earlier: int,
                         atol: float = 1e-4) -> None:
    """At ``step`` both runs' weights agree to float rounding on every rank, and they moved
    since ``earlier`` by far more than that."""
    name = f"step-{step:08d}"
    pairs = zip(positions(with_it / name), positions(without / name),
                positions(with_it / f"step-{earlier:08d}"), strict=True)
    for rank, (a, b, before) in enumerate(pairs):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=atol, err_msg=f"rank {rank}")
        assert np.abs(a - before).max() > 10 * np.abs(a - b).max(), f"rank {rank}"
    losses = [read_metrics(root / "m.jsonl")[-1]["test_loss"] for root in (with_it, without)]
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)


def run_pair(tmp_path: Path, args: list[str], first: list[str],
             second: list[str]) -> tuple[Path, Path, str]:
    """The same run with the ``first`` and ``second`` settings added; their checkpoint
    folders and the first one's output."""
    roots = tmp_path / "first", tmp_path / "second"
    outputs = []
    for root, extra in zip(roots, (first, second), strict=True):
        res = launch([*args, *extra, "--checkpoint-dir", str(root),
                      "--metrics-out", str(root / "m.jsonl")], ranks=2, timeout=300)
        assert res.returncode == 0, res.stderr
        outputs.append(res.stdout)
    return *roots, outputs[0]


def test_compiled_pso_ps_learns_as_the_eager_model_and_resumes_without_compile(
        tmp_path: Path) -> None:
    """PSO-PS rewrites the weights in place at every round, outside the compiled graph: the
    compiled model must read them anew at every step. Its checkpoint holds the same
    parameter names, so a run without --compile continues it."""
    args = ["--device", "cpu", "--max-steps", "24", "--sync-every", "8",
            "--checkpoint-every", "8"]
    compiled, eager, out = run_pair(tmp_path, args, ["--compile"], [])
    assert ", compiled, " in out
    assert_same_training(compiled, eager, step=24, earlier=8)
    res = launch(["--device", "cpu", "--max-steps", "32", "--checkpoint-dir", str(compiled)],
                 ranks=2)
    assert res.returncode == 0, res.stderr
    assert "resuming from" in res.stdout and "final: test acc" in res.stdout
    changed = next(line for line in res.stdout.splitlines() if "settings changed" in line)
    assert "max_steps 24 -> 32" in changed and "compile" not in changed


def test_channels_last_batches_train_as_contiguous_ones(tmp_path: Path) -> None:
    """ResNet-20 on CIFAR-10 files, where ``auto`` means channels-last on the CPU (recorded
    as the resolved choice): the same weights as ``--channels-last off`` after a round. (Only
    one: ResNet-20's fp32 gradients on a batch of 16 are 1e-3 from their float64 values in
    either layout, and those roundings grow step by step.)"""
    write_cifar_py(tmp_path / "data" / "cifar-10-batches-py", n=32)  # 160 train images
    args = ["--device", "cpu", "--dataset", "cifar10", "--data-dir", str(tmp_path / "data"),
            "--algo", "pa", "--batch-size", "16", "--sync-every", "2", "--max-steps", "2",
            "--checkpoint-every", "1"]
    auto, off, out = run_pair(tmp_path, args, [], ["--channels-last", "off"])
    assert ", channels-last, " in out
    settings = [read_metrics(root / "m.jsonl")[0]["config"]["channels_last"]
                for root in (auto, off)]
    assert settings == ["on", "off"]
    assert_same_training(auto, off, step=2, earlier=1, atol=1e-3)
