"""Training on GPUs end to end: ranks sharing one GPU through the staged path, and the clear
refusal when more ranks than GPUs start without --allow-gpu-sharing. Skipped without CUDA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.launch import launch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_two_ranks_share_one_gpu_through_the_staged_path(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    res = launch(["--device", "cuda", "--allow-gpu-sharing", "--cuda-aware", "off",
                  "--epochs", "5", "--metrics-out", str(metrics)], ranks=2, timeout=300,
                 env={"CUDA_VISIBLE_DEVICES": "0"})
    assert res.returncode == 0, res.stderr
    assert "CUDA buffers staged through one pinned host buffer (--cuda-aware off)" in res.stdout
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert events[0]["cuda_aware"].startswith("CUDA buffers staged")
    final = events[-1]
    assert final["world_size"] == 2 and final["comm_bytes_per_rank"] > 0
    assert final["test_acc"] > 0.5  # chance is 0.1


def test_auto_shares_one_gpu_between_two_ranks_and_says_so(tmp_path: Path) -> None:
    res = launch(["--device", "auto", "--epochs", "1"], ranks=2, timeout=300,
                 env={"CUDA_VISIBLE_DEVICES": "0"})
    assert res.returncode == 0, res.stderr
    lines = [line for line in res.stdout.splitlines() if "sharing them" in line]
    assert len(lines) == 1 and "2 ranks share 1 GPU(s) round-robin" in lines[0]
    assert "rank(s) on cuda" in res.stdout


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_on_a_gpu(tmp_path: Path, precision: str) -> None:
    metrics = tmp_path / "m.jsonl"
    res = launch(["--device", "auto", "--precision", precision, "--epochs", "5",
                  "--metrics-out", str(metrics)], ranks=2, timeout=300,
                 env={"CUDA_VISIBLE_DEVICES": "0"})
    assert res.returncode == 0, res.stderr
    assert f"on cuda in {precision} (autocast)" in res.stdout
    final = [json.loads(line) for line in metrics.read_text().splitlines()][-1]
    assert final["test_acc"] > 0.5  # chance is 0.1


def test_more_ranks_than_gpus_stops_with_the_way_out(tmp_path: Path) -> None:
    res = launch(["--device", "cuda", "--epochs", "1"], ranks=2, timeout=180,
                 env={"CUDA_VISIBLE_DEVICES": "0"})
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("psops_mpi: error:")]
    assert len(errors) == 1 and "only 1 GPU(s)" in errors[0]
    assert "--allow-gpu-sharing" in errors[0]
