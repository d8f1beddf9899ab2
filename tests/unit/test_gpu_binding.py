"""One GPU per rank from its node-local rank (pure functions; no GPU needed)."""

from __future__ import annotations

import pytest
import torch

from psops_mpi.errors import UsageError
from psops_mpi.world import NodeLocal, assign_gpus, choose_gpu, init_world, pick_gpu

FOUR = ("GPU-a", "GPU-b", "GPU-c", "GPU-d")


def test_every_rank_sees_every_gpu_then_rank_r_takes_gpu_r() -> None:
    assert assign_gpus([FOUR] * 4) == [0, 1, 2, 3]
    assert assign_gpus([FOUR] * 2) == [0, 1]  # fewer ranks than GPUs: the first ones


def test_slurm_narrowed_one_gpu_per_task_gives_cuda0_each() -> None:
    # --gpus-per-task=1: each task sees only its own GPU, as its cuda:0.
    assert assign_gpus([(gpu,) for gpu in FOUR]) == [0, 0, 0, 0]


def test_narrowed_to_several_gpus_per_task() -> None:
    # --gpus-per-task=2 with two tasks: each uses the first of its own two.
    assert assign_gpus([("GPU-a", "GPU-b"), ("GPU-c", "GPU-d")]) == [0, 0]


def test_same_gpu_given_to_two_tasks_is_refused() -> None:
    # What a cgroup-less "CUDA_VISIBLE_DEVICES=0 for every task" looks like: one GPU twice.
    with pytest.raises(UsageError, match="--allow-gpu-sharing") as info:
        assign_gpus([("GPU-a",), ("GPU-a",)])
    assert "2 ranks on this node but only 1 GPU(s)" in str(info.value)
    assert "--ntasks-per-node=1 --gpus-per-task=1" in str(info.value)


def test_more_ranks_than_gpus_is_refused_unless_sharing_allowed() -> None:
    with pytest.raises(UsageError, match="only 2 GPU"):
        assign_gpus([("GPU-a", "GPU-b")] * 3)
    assert assign_gpus([("GPU-a", "GPU-b")] * 5, allow_sharing=True) == [0, 1, 0, 1, 0]
    assert assign_gpus([("GPU-a",)] * 2, allow_sharing=True) == [0, 0]


def test_sharing_allowed_but_not_needed_changes_nothing() -> None:
    assert assign_gpus([FOUR] * 4, allow_sharing=True) == [0, 1, 2, 3]


def test_a_rank_without_gpu_gets_none() -> None:
    assert assign_gpus([(), ("GPU-a",)]) == [None, 0]


def test_auto_shares_fewer_gpus_round_robin_and_says_so() -> None:
    two = [("GPU-a", "GPU-b")] * 5
    assert [pick_gpu("auto", two, r)[0] for r in range(5)] == [0, 1, 0, 1, 0]
    assert {pick_gpu("auto", two, r)[1] for r in range(5)} == {
        "5 ranks share 2 GPU(s) round-robin"}
    # Slurm gave the same single GPU to two tasks: auto shares it too.
    assert pick_gpu("auto", [("GPU-a",), ("GPU-a",)], 1) == (
        0, "2 ranks share 1 GPU(s) round-robin")


def test_cuda_refuses_to_share_unless_allowed() -> None:
    two = [("GPU-a", "GPU-b")] * 3
    with pytest.raises(UsageError, match="only 2 GPU") as info:
        pick_gpu("cuda", two, 0)
    assert "--allow-gpu-sharing or --device auto" in str(info.value)
    assert pick_gpu("cuda", two, 2, allow_sharing=True) == (
        0, "3 ranks share 2 GPU(s) round-robin")


@pytest.mark.parametrize("kind", ["auto", "cuda"])
def test_no_note_when_every_rank_has_its_own_gpu(kind: str) -> None:
    assert [pick_gpu(kind, [FOUR] * 4, r) for r in range(4)] == [
        (0, ""), (1, ""), (2, ""), (3, "")]
    narrowed = [(gpu,) for gpu in FOUR]
    assert [pick_gpu(kind, narrowed, r) for r in range(4)] == [(0, "")] * 4
    assert pick_gpu(kind, [(), ("GPU-a",)], 0) == (None, "")  # a rank without GPU shares none


def test_cpu_device_needs_no_gpu() -> None:
    assert choose_gpu("cpu", NodeLocal(3, 8))[0] == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only fallback")
def test_without_cuda_auto_is_cpu_and_cuda_is_an_error() -> None:
    assert choose_gpu("auto", NodeLocal(0, 2))[0] == torch.device("cpu")
    with pytest.raises(UsageError, match="torch sees no CUDA device"):
        choose_gpu("cuda", NodeLocal(0, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_a_gpu_node_ranks_get_their_own_gpu() -> None:
    count = torch.cuda.device_count()
    ids = tuple(f"GPU-{i}" for i in range(count))
    last = NodeLocal(count - 1, count, (ids,) * count)
    assert choose_gpu("auto", last)[0] == torch.device("cuda", count - 1)
    with pytest.raises(UsageError, match="--allow-gpu-sharing"):
        choose_gpu("cuda", NodeLocal(count, count + 1, (ids,) * (count + 1)))
    shared = NodeLocal(count, count + 1, (ids,) * (count + 1))
    assert choose_gpu("cuda", shared, allow_sharing=True)[0] == torch.device("cuda", 0)


def test_init_world_accepts_a_plain_local_pair() -> None:
    from mpi4py import MPI

    threads = torch.get_num_threads()
    try:
        world = init_world(MPI.COMM_SELF, (0, 1), device="cpu", threads=1)
    finally:
        torch.set_num_threads(threads)  # the other tests in this process keep theirs
    assert world.device.type == "cpu" and world.local_size == 1
    assert not world.cuda_aware.needed and not world.cuda_aware.direct
