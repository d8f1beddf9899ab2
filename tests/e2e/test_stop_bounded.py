"""A stop signal always ends the job (real mpiexec jobs, real signals, real stuck ranks):
within --stop-timeout-s when a rank cannot answer — stuck in its model factory, before a
round, inside a checkpoint write — and at once on a second signal, each with one line
naming the signal, the rank that did not answer and where, and what a relaunch continues
from, and exit code 128+N. (A job whose ranks all answer checkpoints and exits 75:
tests/e2e/test_faults.py.)"""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from psops_mpi.checkpoint import PAUSE_ENV
from tests.helpers.launch import Result, finish, start

BOUND = 3  # --stop-timeout-s of these tests
SLACK = 15  # seconds beyond it that a job may take to end (start-up of MPI_Abort, reaping)
MODELS = "tests.helpers.user_models:"


def stop_stuck_job(args: list[str], ready: Path, env: dict[str, str], signals: int = 1,
                   gap_s: float = 2.0) -> tuple[Result, float]:
    """Start a job, wait until ``ready`` exists (a rank is stuck), send SIGTERM to the
    launcher ``signals`` times ``gap_s`` apart; the result and the seconds from the first
    signal to the job's end."""
    started = time.monotonic()
    proc = start(args, ranks=2, env=env)
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() - started > 120:
            res = finish(proc, timeout=10, started=started)
            raise AssertionError(f"the job never got stuck: {res.stderr}")
        time.sleep(0.05)
    time.sleep(1.0)  # the other rank reaches its wait
    signalled = time.monotonic()
    for k in range(signals):
        if k:
            time.sleep(gap_s)
        os.kill(proc.pid, signal.SIGTERM)
    res = finish(proc, timeout=BOUND + 60)
    return res, time.monotonic() - signalled


def error_lines(res: Result) -> list[str]:
    return [line for line in res.stderr.splitlines() if line.startswith("psops_mpi: error:")]


@pytest.mark.parametrize(("case", "extra", "waited_at"), [
    ("model factory", ["--model", MODELS + "factory_hangs_on_rank_one"],
     r"waited for at the start-up checks\)"),
    ("before a round", ["--model", MODELS + "hangs_on_rank_one", "--sync-every", "4"],
     r"waited for at round 2 \(step 8\); last seen at "),
])
def test_a_stuck_rank_cannot_hold_a_stop_beyond_its_bound(tmp_path: Path, case: str,
                                                          extra: list[str],
                                                          waited_at: str) -> None:
    mark = tmp_path / "stuck"
    ckpt = tmp_path / "ckpt"
    args = ["--dataset", "synthetic", "--epochs", "3", "--stop-timeout-s", str(BOUND),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4", *extra]
    res, took = stop_stuck_job(args, mark, {"PSOPS_TEST_STUCK_MARK": str(mark)})
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert took < BOUND + SLACK, took
    lines = error_lines(res)
    assert len(lines) == 1, res.stderr
    assert re.match(rf"psops_mpi: error: stopped by SIGTERM: the ranks did not stop within "
                    rf"{BOUND} s \(--stop-timeout-s\); rank\(s\) 1 did not answer \("
                    rf"{waited_at}", lines[0]), lines[0]
    relaunch = ("no complete checkpoint in" if case == "model factory"
                else f"the same command continues from {ckpt}/step-00000004")
    assert f"; no new checkpoint was written; {relaunch}" in lines[0], lines[0]
    assert lines[0].endswith("(exit code 143)")


def test_a_rank_paused_inside_a_checkpoint_write_cannot_hold_a_stop(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    args = ["--dataset", "synthetic", "--epochs", "3", "--stop-timeout-s", str(BOUND),
            "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4"]
    ready = ckpt / ".tmp-step-00000008" / "paused-rank-1"
    res, took = stop_stuck_job(args, ready, {PAUSE_ENV: "8@1"})
    assert res.returncode == 143 and took < BOUND + SLACK, (took, res.stderr)
    lines = error_lines(res)
    assert len(lines) == 1 and "rank(s) 1 did not answer (waited for at checkpoint step 8, " \
        "after writing the shards" in lines[0], res.stderr
    assert f"the same command continues from {ckpt}/step-00000004" in lines[0]


def test_a_second_signal_ends_the_job_at_once(tmp_path: Path) -> None:
    """A bound of ten minutes, a rank hung in its model factory: the second SIGTERM, two
    seconds after the first, ends the job within seconds."""
    mark = tmp_path / "stuck"
    args = ["--dataset", "synthetic", "--stop-timeout-s", "600", "--model",
            MODELS + "factory_hangs_on_rank_one"]
    res, took = stop_stuck_job(args, mark, {"PSOPS_TEST_STUCK_MARK": str(mark)}, signals=2)
    assert res.returncode == 143 and took < 2 + SLACK, (took, res.stderr)
    lines = error_lines(res)
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("psops_mpi: error: stopped by SIGTERM: a second SIGTERM asked "
                               "to end the job now; ")
    assert lines[0].endswith("no new checkpoint was written; no --checkpoint-dir: this run "
                             "cannot be continued (exit code 143)")
