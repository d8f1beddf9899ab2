"""Real faults in real ``mpiexec`` jobs, each bounded by a timeout: a NaN from a model, a full
file system, stop signals (to the launcher and to one rank), a rank that sleeps or hangs.

What each asserts is what the manual's "When things go wrong" (docs/troubleshooting.md)
tells a user they will see.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest

from psops_mpi.checkpoint import complete_checkpoints
from tests.e2e.test_checkpoint_resume import final_state
from tests.helpers.launch import Result, finish, launch, start
from tests.helpers.user_models import PID_DIR_ENV

MODELS = "tests.helpers.user_models:"
SYNTHETIC = ["--dataset", "synthetic", "--quiet"]  # 32 steps per epoch at 2 ranks


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def no_traceback(res: Result) -> None:
    assert "Traceback" not in res.stderr and "MPI_Abort" not in res.stderr, res.stderr


# ---- non-finite values

@pytest.mark.parametrize(("algo", "counted"), [("pa", "restarts"), ("ssgd", "skipped_steps")])
def test_one_nan_batch_on_one_rank_does_not_reach_the_others(tmp_path: Path, algo: str,
                                                             counted: str) -> None:
    """Rank 1's 10th batch gives NaN logits: PA leaves rank 1 out of the round's mean and
    restarts it there (SlowMo does the same: tests/mpi/test_faults.py), SSGD skips that step
    on every rank; the run ends like a healthy one, and the epoch line and metrics count the
    event."""
    metrics = tmp_path / "m.jsonl"
    res = launch(["--dataset", "synthetic", "--epochs", "2", "--algo", algo, "--model",
                  MODELS + "nan_once_on_rank_one", "--metrics-out", str(metrics)], ranks=2)
    assert res.returncode == 0, res.stderr
    final = events(metrics)[-1]
    assert final["event"] == "final" and final["ok"] is True and final["exit_code"] == 0
    assert math.isfinite(final["test_loss"]) and final["test_acc"] > 0.9  # chance: 0.1
    epochs = [e for e in events(metrics) if e["event"] == "epoch"]
    assert [e[counted] for e in epochs] == [1, 1]  # so far, summed over the ranks
    assert f"  {counted} 1" in res.stdout.splitlines()[2]  # the first epoch's line
    assert "final: test acc" in res.stdout


@pytest.mark.parametrize(("algo", "step", "reason"), [
    ("ssgd", 7, "the averaged gradient was not finite in 3 consecutive steps"),
    ("pa", 8, "every rank's weights are non-finite")])
def test_nan_on_every_rank_stops_the_job_with_one_line(tmp_path: Path, algo: str, step: int,
                                                      reason: str) -> None:
    """From the 5th batch on every rank's logits are NaN: SSGD skips steps 5, 6, 7 and stops
    at the third (--max-nonfinite 3); PA has no earlier weights to go back to and stops at
    its first round. One line, exit code 3, no final line."""
    metrics = tmp_path / "m.jsonl"
    res = launch([*SYNTHETIC, "--epochs", "2", "--algo", algo, "--max-nonfinite", "3",
                  "--model", MODELS + "nan_from_step_five", "--metrics-out", str(metrics)],
                 ranks=2)
    assert res.returncode == 3, res.stderr
    no_traceback(res)
    lines = [line for line in res.stderr.splitlines() if line.startswith("psops_mpi:")]
    assert len(lines) == 1 and lines[0].startswith(f"psops_mpi: error: stopped at step {step}: ")
    assert reason in lines[0] and "exit code 3" in lines[0]
    last = events(metrics)[-1]
    assert last["event"] == "stopped" and last["reason"] == "non-finite"
    assert last["step"] == step and last["exit_code"] == 3
    assert "final:" not in res.stdout


def test_a_non_finite_final_test_loss_is_a_failure(tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    res = launch([*SYNTHETIC, "--epochs", "1", "--model", MODELS + "nan_in_eval",
                  "--metrics-out", str(metrics)], ranks=2)
    assert res.returncode == 3, res.stderr
    final = events(metrics)[-1]
    assert final["event"] == "final" and final["ok"] is False and final["exit_code"] == 3
    assert final["test_loss"] is None and "not finite" in final["error"]
    assert "final:" not in res.stdout
    assert "psops_mpi: error: training ended with a non-finite test loss" in res.stderr


# ---- a full file system

@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 192 KiB tmpfs: room for about two checkpoints of the tiny model at 2 ranks."""
    if os.geteuid() != 0:
        pytest.skip("a full file system is made by mounting a small tmpfs, which needs root")
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=192k", "tmpfs", str(folder)],
                             capture_output=True, text=True, timeout=30)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, timeout=30)


def test_checkpoints_on_a_full_file_system(small_tmpfs: Path, tmp_path: Path) -> None:
    """Checkpoints every 4 steps, none pruned, onto a file system that fills after about
    two: each failed one is one warning naming the file, the reason and the newest complete
    checkpoint, training goes on, no partial folder stays; the final one fails too, and the
    job still writes its final metrics line, then exits with 4."""
    ckpt, metrics = small_tmpfs / "ckpt", tmp_path / "m.jsonl"
    res = launch([*SYNTHETIC, "--epochs", "1", "--model", MODELS + "tiny_mlp",
                  "--checkpoint-dir", str(ckpt), "--checkpoint-every", "4", "--keep-last", "100",
                  "--metrics-out", str(metrics)], ranks=2)
    assert res.returncode == 4, res.stderr
    no_traceback(res)
    complete = [step for step, _ in complete_checkpoints(ckpt)]
    assert complete and complete == [4 * (i + 1) for i in range(len(complete))]
    newest = ckpt / f"step-{complete[-1]:08d}"
    warnings = [line for line in res.stderr.splitlines() if "warning: checkpoint" in line]
    failed_steps = [4 * i for i in range(len(complete) + 1, 8)]  # 32 is the final one
    assert len(warnings) == len(failed_steps) >= 2, res.stderr
    for line, step in zip(warnings, failed_steps, strict=True):
        assert line.startswith(f"psops_mpi: warning: checkpoint {ckpt / f'step-{step:08d}'} "
                               "not written: ")
        assert "No space left on device" in line and f"is {newest};" in line
        assert str(small_tmpfs) in line.split("not written: ")[1]  # the file that failed
    errors = [line for line in res.stderr.splitlines() if line.startswith("psops_mpi: error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"psops_mpi: error: the final checkpoint {ckpt / 'step-00000032'} not written: ")
    assert not [p for p in ckpt.iterdir() if p.name.startswith(".tmp-")]  # partial files gone
    final = events(metrics)[-1]
    assert final["event"] == "final" and final["ok"] is False and final["exit_code"] == 4
    assert final["steps"] == 32 and final["test_acc"] > 0.9
    assert "final: test acc" in res.stdout  # the results themselves are good


# ---- stop signals

SIGNALLED = ["--dataset", "synthetic", "--epochs", "3", "--quiet", "--algo", "pso-ps",
             "--sync-every", "8", "--model", MODELS + "slow_with_pid"]  # 96 steps of >= 20 ms
LAST_STEP = 96


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    """The final checkpoint of the run that signalled runs with ``flags`` must reproduce."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(flags: tuple[str, ...]) -> Path:
        if flags not in runs:
            root = tmp_path_factory.mktemp("uninterrupted")
            res = launch([*SIGNALLED, *flags, "--checkpoint-dir", str(root / "ckpt")], ranks=2,
                         env={PID_DIR_ENV: str(root)})
            assert res.returncode == 0, res.stderr
            runs[flags] = root / "ckpt" / f"step-{LAST_STEP:08d}"
        return runs[flags]

    return run


def signal_mid_training(args: list[str], pid_dir: Path, target: str, signum: int) -> Result:
    """Start a job, wait until both ranks are training (their pid files), then send
    ``signum`` to the launcher (mpiexec) or to rank 1 only."""
    started = time.monotonic()
    proc = start(args, ranks=2, env={PID_DIR_ENV: str(pid_dir)})
    pid_files = [pid_dir / f"rank-{rank}.pid" for rank in range(2)]
    while not all(path.exists() for path in pid_files):
        if proc.poll() is not None or time.monotonic() - started > 120:
            res = finish(proc, timeout=10, started=started)
            raise AssertionError(f"the job never started training: {res.stderr}")
        time.sleep(0.05)
    os.kill(proc.pid if target == "launcher" else int(pid_files[1].read_text()), signum)
    return finish(proc, timeout=120, started=started)


@pytest.mark.parametrize(("target", "signum", "flags"), [
    ("launcher", signal.SIGTERM, ()),
    ("rank 1", signal.SIGUSR1, ("--overlap", "--overlap-steps", "8", "--exchange-dtype",
                                "int8", "--local-after-steps", "8",
                                "--average-optimizer-state"))])
def test_a_stop_signal_checkpoints_and_the_run_resumes_bit_identically(
        tmp_path: Path, uninterrupted, target: str, signum: int,
        flags: tuple[str, ...]) -> None:
    """SIGTERM to mpiexec (which forwards it to every rank), or SIGUSR1 to rank 1 alone:
    every rank stops at one agreed step within about a second (the ranks agree about once a
    second: here every 40 to 50 steps), after a checkpoint of that step, exit code 75; the
    same command then continues to the end, and every rank's weights, momentum and swarm
    end bit for bit as in the run that was never signalled. With --overlap a round is in
    flight at every step after the first round (here at step 16, after 8 warm steps of
    SSGD's, each round averaging the momentum too): the checkpoint keeps it."""
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    args = [*SIGNALLED, *flags, "--checkpoint-dir", str(ckpt), "--metrics-out", str(metrics)]
    res = signal_mid_training(args, tmp_path, target, signum)
    assert res.returncode == 75, res.stderr
    no_traceback(res)
    stopped = events(metrics)[-1]
    step = stopped["step"]
    assert stopped["event"] == "stopped" and stopped["reason"] == signal.Signals(signum).name
    assert 1 <= step < LAST_STEP
    assert [s for s, _ in complete_checkpoints(ckpt)] == [step]
    assert stopped["checkpoint"] == str(ckpt / f"step-{step:08d}")
    assert (f"psops_mpi: stopped by {signal.Signals(signum).name} at step {step}: checkpoint "
            f"{ckpt / f'step-{step:08d}'} written; run the same command to continue (exit "
            "code 75)") in res.stderr.splitlines()

    resumed = launch(args, ranks=2, env={PID_DIR_ENV: str(tmp_path)})
    assert resumed.returncode == 0, resumed.stderr
    start_event = [e for e in events(metrics) if e["event"] == "start"][-1]
    assert start_event["resumed_from"] == stopped["checkpoint"]
    if flags:  # a round starts every 8 steps and lands 8 steps later, when the next starts
        with h5py.File(ckpt / f"step-{step:08d}" / "rank-00000.h5") as fh:
            assert ("sync/inflight" in fh) == (step >= 16)
    for rank in range(2):
        want = final_state(uninterrupted(flags), rank)
        got = final_state(ckpt / f"step-{LAST_STEP:08d}", rank)
        assert sorted(got) == sorted(want) and "sync/swarm/gbest" in got
        for name, array in want.items():
            assert got[name].tobytes() == array.tobytes(), f"rank {rank}: {name} differs"


# ---- a rank that does not come

def test_a_sleeping_rank_is_named_while_the_others_wait() -> None:
    """Rank 1 sleeps 3.5 s in its 6th batch: rank 0 names it every second while it waits
    (--stall-report-s 1), then says when every rank arrived; the run ends normally."""
    res = launch([*SYNTHETIC, "--epochs", "1", "--algo", "pa", "--model",
                  MODELS + "sleeps_on_rank_one", "--stall-report-s", "1"], ranks=2)
    assert res.returncode == 0, res.stderr
    waiting = [line for line in res.stderr.splitlines() if line.startswith("psops_mpi: waiting")]
    assert len(waiting) >= 2, res.stderr
    for seconds, line in enumerate(waiting, start=1):
        assert line.startswith(f"psops_mpi: waiting {seconds} s at ") and line.endswith(
            " for rank(s) 1"), line
    # where rank 0 waits: the round after rank 1's 6th step, or an agreement in between
    assert " at round 1 (step 8) " in waiting[0] or " at step 6 (" in waiting[0], waiting[0]
    assert any(line.startswith("psops_mpi: every rank arrived at ") for line in
               res.stderr.splitlines())


def test_a_late_rank_zero_leaves_no_message_behind_and_the_run_exits_0() -> None:
    """Rank 0 sleeps 2 s in the run's last step: ranks 1 and 2 wait for it at the last round
    and send it notices that it never reads in that wait (it is not waiting). MPICH ends a
    job that finalizes with unread messages with exit code 9 (this test failed so before the
    watch received them at exit)."""
    res = launch([*SYNTHETIC, "--epochs", "1", "--algo", "pa", "--model",
                  MODELS + "sleeps_on_rank_zero", "--max-steps", "6", "--stall-report-s", "4"],
                 ranks=3)
    assert res.returncode == 0, res.stderr
    assert "final: test acc" in res.stdout


def test_a_hung_rank_ends_the_job_after_the_abort_limit() -> None:
    """Rank 1 hangs for ten minutes: with --stall-abort-s 3 the job ends with one error line
    naming it, exit code 5, within seconds."""
    res = launch([*SYNTHETIC, "--epochs", "1", "--algo", "pa", "--model",
                  MODELS + "hangs_on_rank_one", "--stall-report-s", "1", "--stall-abort-s", "3"],
                 ranks=2, timeout=120)
    assert res.returncode == 5, res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("psops_mpi: error:")]
    assert len(errors) == 1 and errors[0].startswith("psops_mpi: error: rank(s) 1 did not "
                                                     "arrive at ")
    assert "within 3 s (--stall-abort-s 3): aborting the job" in errors[0]
    assert res.seconds < 60
