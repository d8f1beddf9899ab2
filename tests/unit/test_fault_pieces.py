"""The fault handling's pieces on one process: the finiteness check, how OS and HDF5 errors
become one line, the stop-signal note, the new settings, old checkpoints' sync state, and a
checkpoint folder that cannot be written (read-only: no root tmpfs needed)."""

from __future__ import annotations

import errno
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mpi4py import MPI
from torch import nn

from psops_mpi import NonFiniteStop, PASync, SSGDSync
from psops_mpi.checkpoint.parts import check_state
from psops_mpi.checkpoint.saver import Checkpointer, describe_os_error
from psops_mpi.config import TrainConfig
from psops_mpi.errors import UsageError
from psops_mpi.flat import all_finite
from psops_mpi.stall import StallWatch
from psops_mpi.stop import STOP_SIGNALS, StopRequest, signal_name


@pytest.mark.parametrize(("values", "finite"), [
    ([1.0, -2.0, 300.0], True), ([1.0, float("nan")], False), ([float("-inf"), 1.0], False),
    ([float("inf"), float("-inf")], False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite(values: list[float], finite: bool, dtype: torch.dtype) -> None:
    assert all_finite(torch.tensor(values, dtype=dtype)) is finite


def test_all_finite_sums_half_precision_in_float32() -> None:
    """60,000 + 60,000 overflows float16; the values are finite all the same."""
    assert all_finite(torch.full((4,), 60000.0, dtype=torch.float16))


def test_a_long_hdf5_message_is_worded_by_its_errno(tmp_path: Path) -> None:
    h5py_style = OSError(28, "Can't synchronously write data (file write failed: ... a "
                             "whole paragraph ...)")
    described = describe_os_error(h5py_style, tmp_path / "f")
    assert described == f"{tmp_path / 'f'}: No space left on device"


@pytest.fixture
def stop_request() -> Iterator[StopRequest]:
    """An installed StopRequest whose end is recorded, not carried out; the process's
    handlers and wakeup fd are put back after."""
    saved = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    stop = StopRequest(timeout_s=0)
    stop.ended = []  # type: ignore[attr-defined]
    stop.end = stop.ended.append  # type: ignore[attr-defined]
    try:
        yield stop
    finally:
        stop.finished()
        signal.set_wakeup_fd(-1)
        StopRequest.active = None
        for signum, handler in saved.items():
            signal.signal(signum, handler)


def test_a_stop_signal_is_noted_and_its_launchers_echo_changes_nothing(
        stop_request: StopRequest) -> None:
    stop_request.install()
    os.kill(os.getpid(), signal.SIGUSR1)
    os.kill(os.getpid(), signal.SIGTERM)  # within milliseconds: the launcher's echo
    time.sleep(0.3)
    assert stop_request.requested and signal_name(stop_request.signum) == "SIGUSR1"
    assert stop_request.ended == []  # type: ignore[attr-defined]


def test_a_stop_that_does_not_end_in_time_ends_the_job_with_one_line(
        stop_request: StopRequest, capsys: pytest.CaptureFixture[str]) -> None:
    stop_request.timeout_s = 0.3
    stop_request.resume_note = lambda: "the same command continues from ckpt/step-00000004"
    stop_request.install()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(1.0)
    assert stop_request.ended == [128 + signal.SIGTERM]  # type: ignore[attr-defined]
    assert capsys.readouterr().err.strip() == (
        "psops_mpi: error: stopped by SIGTERM: the ranks did not stop within 0.3 s "
        "(--stop-timeout-s); no new checkpoint was written; the same command continues from "
        "ckpt/step-00000004 (exit code 143)")


def test_an_agreed_stop_gets_its_bound_again_and_a_finished_one_nothing(
        stop_request: StopRequest) -> None:
    stop_request.timeout_s = 0.6
    stop_request.install()
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.4)
    stop_request.agreed()  # the stop's checkpoint: 0.6 s from now
    time.sleep(0.4)
    assert stop_request.ended == []  # type: ignore[attr-defined]
    stop_request.finished()
    time.sleep(0.5)
    assert stop_request.ended == []  # type: ignore[attr-defined]


def test_a_second_signal_ends_the_job_at_once(stop_request: StopRequest) -> None:
    stop_request.install()  # no bound: only the second signal can end it
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.7)  # more than the launcher's echo takes
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.3)
    assert stop_request.ended == [128 + signal.SIGINT]  # type: ignore[attr-defined]


@pytest.mark.parametrize(("flag", "value"), [("max_nonfinite", 0), ("stall_report_s", -1.0),
                                             ("stall_abort_s", float("nan"))])
def test_fault_settings_are_validated(flag: str, value: float) -> None:
    with pytest.raises(UsageError, match=flag.replace("_", "-")):
        TrainConfig(**{flag: value})


def test_stall_watch_is_off_on_one_rank_and_shared_per_communicator() -> None:
    watch = StallWatch.of(MPI.COMM_SELF)
    assert watch is StallWatch.of(MPI.COMM_SELF) and not watch.enabled
    watch.arrive("nothing to wait for")  # returns at once
    assert watch.count == 0


def test_a_checkpoint_of_release_0_2_0_without_the_fault_counters_loads() -> None:
    model = nn.Linear(3, 2)
    sync = PASync(model, torch.optim.SGD(model.parameters(), lr=0.1), MPI.COMM_SELF, 2)
    old = {k: v for k, v in sync.state_dict().items()
           if k not in ("restarts", "skipped", "consecutive_skipped")}
    check_state("sync", sync, old, "ckpt")
    sync.load_state_dict(old)
    assert (sync.restarts, sync.skipped, sync.consecutive_skipped) == (0, 0, 0)
    with pytest.raises(UsageError, match="'sync/rounds' is missing"):
        check_state("sync", sync, {k: v for k, v in old.items() if k != "rounds"}, "ckpt")


def test_an_older_ssgd_checkpoint_counts_every_step_as_a_round() -> None:
    """Before every gradient Allreduce counted as a round, SSGD counted its BatchNorm
    averagings (one per epoch)."""
    model = nn.Linear(3, 2)
    sync = SSGDSync(model, torch.optim.SGD(model.parameters(), lr=0.1), MPI.COMM_SELF)
    sync.load_state_dict({**sync.state_dict(), "steps": 124, "rounds": 2})
    assert sync.metrics().rounds == 124


def test_one_process_skips_a_non_finite_step_and_stops_at_the_limit() -> None:
    model = nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sync = SSGDSync(model, opt, MPI.COMM_SELF, max_nonfinite=2)
    weights = sync.flat.data.clone()
    for expect_stop in (False, True):
        opt.zero_grad(set_to_none=False)
        (model(torch.ones(1, 3)).sum() * float("nan")).backward()
        if expect_stop:
            with pytest.raises(NonFiniteStop) as stopped:
                sync.after_backward()
            assert stopped.value.step == 2 and stopped.value.at_limit
        else:
            assert sync.after_backward() is False
            assert all(p.grad is None for p in model.parameters())
            opt.step()  # a loop that calls it anyway changes nothing
            sync.after_step()
    assert torch.equal(sync.flat.data, weights) and not opt.state


class _Part:
    def state_dict(self) -> dict:
        return {"value": torch.arange(3.0)}

    def load_state_dict(self, state: dict) -> None:
        pass


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_checkpoint_folder_fails_with_one_line(tmp_path: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    tmp_path.chmod(0o500)
    try:
        saver = Checkpointer(tmp_path / "ckpt", MPI.COMM_SELF, {"part": _Part()},
                             lambda: {"progress": 0.0}, lambda: {})
        assert saver.save(3, required="final") is None
    finally:
        tmp_path.chmod(0o700)
    assert capsys.readouterr().err.splitlines() == [
        f"psops_mpi: error: the final checkpoint {tmp_path / 'ckpt' / 'step-00000003'} not "
        f"written: {tmp_path / 'ckpt'}: Permission denied; partial files removed; there is no "
        "complete checkpoint"]


def test_a_failed_write_leaves_no_partial_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture) -> None:
    from psops_mpi.checkpoint import store

    def full(path: Path, shard: store.Shard, step: int) -> tuple[str, int]:
        path.with_name(path.name + ".part").write_bytes(b"half a shard")
        raise OSError(errno.EDQUOT, "quota")

    saver = Checkpointer(tmp_path, MPI.COMM_SELF, {"part": _Part()}, lambda: {"progress": 0.0},
                         lambda: {})
    assert saver.save(1) == tmp_path / "step-00000001"
    monkeypatch.setattr(store, "write_shard", full)
    assert saver.save(2) is None and saver.failures == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000001"]
    line = capsys.readouterr().err.strip()
    assert line.startswith(f"psops_mpi: warning: checkpoint {tmp_path / 'step-00000002'} not "
                           f"written: {tmp_path / '.tmp-step-00000002' / 'rank-00000.h5'}: ")
    assert os.strerror(errno.EDQUOT) in line and f"is {tmp_path / 'step-00000001'};" in line
