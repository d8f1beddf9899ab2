"""Exact resume after a real kill, and a kill during a checkpoint write (real mpiexec jobs).

A job is killed with SIGKILL while every rank is paused inside the write of one checkpoint
(the test hook PSOPS_MPI_TEST_PAUSE_IN_CHECKPOINT); ``--resume auto`` must then take the
checkpoint before it, and the resumed run must end with bit-identical weights, optimizer and
swarm state on every rank to a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from psops_mpi.checkpoint import PAUSE_ENV, complete_checkpoints
from tests.helpers.formats import write_cifar_py
from tests.helpers.launch import REPO, launch, mpiexec

RUN = ["--epochs", "2", "--quiet", "--sync-every", "8"]  # mnist1d: 62 steps/epoch at 2 ranks
EVERY, PAUSE_STEP, LAST_COMPLETE, FINAL = 18, 54, 36, 124  # 36 is mid-period and mid-epoch
SHORT_FINAL = 48  # --max-steps of the resume tests that need not run both epochs


def start_paused_job(args: list[str], pause_step: int) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           PAUSE_ENV: str(pause_step)}
    cmd = [mpiexec(), "-n", "2", sys.executable, "-m", "psops_mpi.train", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_when_paused(proc: subprocess.Popen, folder: Path, ranks: int = 2,
                     timeout: float = 180) -> None:
    """SIGKILL the whole job once every rank sits inside the checkpoint write."""
    deadline = time.monotonic() + timeout
    try:
        while len(list(folder.glob("paused-rank-*"))) < ranks:
            if proc.poll() is not None:
                raise AssertionError(f"job ended before pausing: {proc.communicate()}")
            if time.monotonic() > deadline:
                raise AssertionError("job never reached the checkpoint write")
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()


def final_state(folder: Path, rank: int) -> dict[str, np.ndarray]:
    with h5py.File(folder / f"rank-{rank:05d}.h5", "r") as fh:
        return {name: fh[name][()] for name in _datasets(fh)
                if name.startswith(("model/", "sync/", "optimizer/"))}


def scaler_attrs(folder: Path, rank: int) -> dict[str, float]:
    with h5py.File(folder / f"rank-{rank:05d}.h5", "r") as fh:
        return {k: float(v) for k, v in fh["precision/scaler"].attrs.items()}


def _datasets(fh: h5py.File) -> list[str]:
    names: list[str] = []
    fh.visititems(lambda n, o: names.append(n) if isinstance(o, h5py.Dataset) else None)
    return names


def last_event(metrics: Path) -> dict:
    return json.loads(metrics.read_text().splitlines()[-1])


FP16 = ("--precision", "fp16")
IN_FLIGHT = ("--overlap", "--overlap-steps", "8", "--local-after-steps", "24")


@pytest.mark.parametrize(("algo", "flags"), [("pso-ps", ()), ("ssgd", FP16),
                                             ("slowmo", IN_FLIGHT)])
def test_killed_run_resumes_bit_identically(tmp_path: Path, algo: str,
                                            flags: tuple[str, ...]) -> None:
    """Killed inside the write of step 54, resumed from step 36 (mid-epoch, mid-period): the
    end (step 124, across an epoch boundary) holds the same bytes as a run never stopped.
    In fp16 the loss scaler's scale and growth counter are in every shard and resume too,
    and the weights are kept in fp32 (PA resumes exactly: the CIFAR-10 test below);
    SlowMo takes its first 24 steps as SSGD's (--local-after-steps), then rounds every 8
    steps left in flight: the checkpoint of step 36 holds the round of step 32 in flight (its
    snapshot and result, saved unapplied), which the resumed run lands at step 40."""
    args = [*RUN, "--algo", algo, *flags]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    res = launch([*args, "--checkpoint-dir", str(whole), "--metrics-out",
                  str(tmp_path / "whole.jsonl")], ranks=2)
    assert res.returncode == 0, res.stderr

    killed_args = [*args, "--checkpoint-dir", str(broken), "--checkpoint-every", str(EVERY),
                   "--keep-last", "10"]
    proc = start_paused_job(killed_args, PAUSE_STEP)
    kill_when_paused(proc, broken / f".tmp-step-{PAUSE_STEP:08d}")
    # The interrupted write left a partial folder; only the earlier ones are complete.
    assert [s for s, _ in complete_checkpoints(broken)] == [EVERY, LAST_COMPLETE]
    assert list((broken / f".tmp-step-{PAUSE_STEP:08d}").glob("*.part"))

    res = launch([*killed_args, "--resume", "auto", "--metrics-out",
                  str(tmp_path / "resumed.jsonl")], ranks=2)
    assert res.returncode == 0, res.stderr
    for rank in range(2):
        want = final_state(whole / f"step-{FINAL:08d}", rank)
        got = final_state(broken / f"step-{FINAL:08d}", rank)
        assert sorted(got) == sorted(want) and "model/position" in got
        if algo in ("pso-ps", "slowmo"):  # the synchroniser's own tensors are compared too
            assert any(name.startswith("sync/") for name in got)
        for name, array in want.items():
            assert got[name].tobytes() == array.tobytes(), f"rank {rank}: {name} differs"
    whole_final, resumed_final = last_event(tmp_path / "whole.jsonl"), \
        last_event(tmp_path / "resumed.jsonl")
    for key in ("test_acc", "test_loss", "train_loss", "rounds", "steps"):
        assert resumed_final[key] == whole_final[key], key
    start = json.loads((tmp_path / "resumed.jsonl").read_text().splitlines()[0])
    assert start["resumed_from"] == str(broken / f"step-{LAST_COMPLETE:08d}")
    assert resumed_final["checkpoint_s"] > 0
    # Pruning after the resume removed the partial write.
    assert not list(broken.glob(".tmp-*"))
    if flags == FP16:
        meta = json.loads((whole / f"step-{FINAL:08d}" / "metadata.json").read_text())
        assert meta["dtype"] == "float32"
        for rank in range(2):
            want = scaler_attrs(whole / f"step-{FINAL:08d}", rank)
            assert want["scale"] >= 1 and want["_growth_tracker"] > 0
            assert scaler_attrs(broken / f"step-{FINAL:08d}", rank) == want
            mid = scaler_attrs(broken / f"step-{LAST_COMPLETE:08d}", rank)
            assert mid["_growth_tracker"] < want["_growth_tracker"]
    with h5py.File(broken / f"step-{LAST_COMPLETE:08d}" / "rank-00000.h5") as fh:
        assert ("sync/inflight/position" in fh) == (flags == IN_FLIGHT)
        if flags == IN_FLIGHT:
            assert fh["sync/inflight"].attrs["step"] == 32


def test_a_finished_run_launched_again_keeps_its_metrics_and_reports_no_epoch_twice(
        tmp_path: Path) -> None:
    """What a resubmitted batch job does: the same command after the run finished."""
    metrics = tmp_path / "m.jsonl"
    args = ["--dataset", "synthetic", "--epochs", "2", "--quiet", "--checkpoint-dir",
            str(tmp_path / "ckpt"), "--metrics-out", str(metrics)]
    for _ in range(2):
        res = launch(args, ranks=2)
        assert res.returncode == 0, res.stderr
    events = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [e["event"] for e in events] == ["start", "epoch", "epoch", "final", "start", "final"]
    first, again = events[3], events[5]
    assert events[4]["resumed_from"] and again["steps"] == first["steps"]
    assert again["test_acc"] == first["test_acc"]  # the same weights, evaluated again


def resume_matches_uninterrupted(tmp_path: Path, args: list[str], every: int, resume_at: int,
                                 final: int, ranks: int = 2) -> None:
    """Run ``args`` with a checkpoint every ``every`` steps, resume a second job from the
    checkpoint at step ``resume_at`` (mid-epoch) into another folder, and require the
    final shards of both to hold the same bytes."""
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    res = launch([*args, "--checkpoint-dir", str(whole), "--checkpoint-every", str(every),
                  "--keep-last", "20"], ranks=ranks, timeout=300)
    assert res.returncode == 0, res.stderr
    res = launch([*args, "--checkpoint-dir", str(resumed), "--resume",
                  str(whole / f"step-{resume_at:08d}")], ranks=ranks, timeout=300)
    assert res.returncode == 0, res.stderr
    for rank in range(ranks):
        want = final_state(whole / f"step-{final:08d}", rank)
        got = final_state(resumed / f"step-{final:08d}", rank)
        assert sorted(got) == sorted(want) and "model/position" in got
        for name, array in want.items():
            assert got[name].tobytes() == array.tobytes(), f"rank {rank}: {name} differs"


def test_a_round_in_flight_and_encoded_resumes_exactly_at_four_ranks_and_at_three(
        tmp_path: Path) -> None:
    """Rounds every 8 steps and at the end of an epoch (31 steps at 4 ranks), each landing 8
    steps later: the checkpoint of step 36 holds the round of step 31 in flight, its snapshot
    and result saved unapplied, and int8's residuals; the resumed run lands it as the
    uninterrupted run did, and both end with the same bytes (weights, momentum, centre,
    error feedback's residuals) on every rank. (At 2 ranks: the killed SlowMo run above.)
    Three ranks continue the same checkpoint: the round in flight is dropped (each rank's
    progress goes into the next one), the residuals start afresh, and the run ends on one
    model."""
    args = [*RUN, "--pso-preset", "centre", "--overlap", "--overlap-steps", "8",
            "--exchange-dtype", "int8", "--max-steps", str(SHORT_FINAL)]
    resume_matches_uninterrupted(tmp_path, args, every=EVERY, resume_at=LAST_COMPLETE,
                                 final=SHORT_FINAL, ranks=4)
    checkpoint = tmp_path / "whole" / f"step-{LAST_COMPLETE:08d}"
    with h5py.File(checkpoint / "rank-00000.h5") as fh:
        assert fh["sync/inflight"].attrs["step"] == 31
        assert "sync/inflight/position" in fh and "sync/codec/residual" in fh
    three = tmp_path / "three"
    res = launch([*args, "--checkpoint-dir", str(three), "--resume", str(checkpoint)], ranks=3)
    assert res.returncode == 0, res.stderr
    positions = []
    for rank in range(3):
        with h5py.File(three / f"step-{SHORT_FINAL:08d}" / f"rank-{rank:05d}.h5") as fh:
            assert "sync/inflight" not in fh
            positions.append(fh["model/position"][()])
    assert all(np.array_equal(p, positions[0]) for p in positions[1:])


def test_resume_mid_epoch_augments_as_an_uninterrupted_run(tmp_path: Path) -> None:
    """CIFAR-10 batches are cropped and flipped from draws of (seed, rank, epoch): a run
    resumed at step 7 of an epoch of 5 (epoch 2, step 2) trains on the same augmented
    batches and ends with the same bytes as one that never stopped (any other crop would
    change the weights)."""
    data = tmp_path / "data"
    write_cifar_py(data / "cifar-10-batches-py", n=32)  # 160 images: 80 per rank
    args = ["--dataset", "cifar10", "--data-dir", str(data), "--model", "cnn", "--algo", "pa",
            "--epochs", "3", "--batch-size", "16", "--sync-every", "2", "--quiet"]
    resume_matches_uninterrupted(tmp_path, args, every=7, resume_at=7, final=15)


def test_resume_in_another_precision_is_allowed_and_said(tmp_path: Path) -> None:
    """Weights are fp32 in every precision, so a checkpoint continues in another one; rank 0
    names the change, and fp16 starts its scaler afresh."""
    ckpt = tmp_path / "ckpt"
    args = ["--epochs", "2", "--checkpoint-dir", str(ckpt), "--checkpoint-every", str(EVERY)]
    res = launch([*args, "--max-steps", str(LAST_COMPLETE), "--quiet"], ranks=2)
    assert res.returncode == 0, res.stderr
    res = launch([*args, "--precision", "fp16", "--max-steps", str(SHORT_FINAL)], ranks=2)
    assert res.returncode == 0, res.stderr
    assert "settings changed since the checkpoint: " in res.stdout
    assert "precision 'fp32' -> 'fp16'" in res.stdout
    assert scaler_attrs(ckpt / f"step-{SHORT_FINAL:08d}", 0)["scale"] > 0
