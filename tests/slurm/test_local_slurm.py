"""Why a local Slurm cannot start is said in one line a user can act on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.slurm import local_slurm


def test_not_root_is_the_reason_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert local_slurm.why_not() == "a local Slurm needs root (slurmd and munged run as root here)"


def test_missing_programs_are_named_with_the_install_command(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no client programs on PATH
    reason = local_slurm.why_not()
    assert reason is not None and "srun" in reason and local_slurm.INSTALL in reason


def test_start_refuses_with_the_same_reason(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(local_slurm.SlurmUnavailable, match="needs root"):
        local_slurm.start(tmp_path / "slurm")
    assert not (tmp_path / "slurm").exists()  # nothing was set up


def _start_fails(root: Path) -> local_slurm.LocalSlurm:
    raise local_slurm.SlurmUnavailable("slurmd did not come up within 30s")


def test_installed_but_not_starting_fails_under_ci_and_skips_elsewhere(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(local_slurm, "why_not", lambda: None)  # everything is installed
    monkeypatch.setattr(local_slurm, "start", _start_fails)
    with pytest.raises(pytest.fail.Exception, match="slurmd did not come up") as failed:
        local_slurm.start_for_tests(tmp_path, {"CI": "true"})
    assert "CI=true" in str(failed.value)
    with pytest.raises(pytest.skip.Exception, match="local Slurm did not start: slurmd"):
        local_slurm.start_for_tests(tmp_path, {})


def test_a_missing_prerequisite_skips_even_under_ci(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        local_slurm.start_for_tests(tmp_path, {"CI": "true"})
