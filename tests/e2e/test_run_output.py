"""What a run tells its user at start and while it writes checkpoints: the version line and
its record in the metrics, a note when PSO-PS has one particle, a line per checkpoint."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

from psops_mpi import __version__
from tests.helpers.launch import REPO, launch

CHECKPOINT_LINE = re.compile(r"^psops_mpi: checkpoint (\S+) written: ([0-9.e+-]+) MB in "
                             r"([0-9.]+) s$", re.MULTILINE)
ONE_PARTICLE = "note: PSO-PS on one rank is one particle and no swarm"
QUICK = ["--dataset", "synthetic", "--max-steps", "30", "--checkpoint-every", "10",
         "--keep-last", "5"]


def expected_git() -> dict | None:
    """The checkout's commit as git itself tells it (None where this is no git checkout)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                              check=True).stdout.strip()

    return {"commit": git("rev-parse", "--short", "HEAD"),
            "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def test_two_ranks_print_version_and_one_line_per_checkpoint(tmp_path: Path) -> None:
    ckpt, metrics = tmp_path / "ckpt", tmp_path / "m.jsonl"
    res = launch([*QUICK, "--checkpoint-dir", str(ckpt), "--metrics-out", str(metrics)],
                 ranks=2)
    assert res.returncode == 0, res.stderr
    # rank 0 alone prints: one line for each of the steps 10, 20 and 30 (the final one)
    lines = CHECKPOINT_LINE.findall(res.stdout)
    assert [Path(folder) for folder, _, _ in lines] == [
        ckpt / f"step-{step:08d}" for step in (10, 20, 30)]
    for folder, megabytes, seconds in lines:
        meta = json.loads((Path(folder) / "metadata.json").read_text())
        shards = sum(entry["bytes"] for entry in meta["shards"])
        assert abs(float(megabytes) - shards / 1e6) <= 0.05 * shards / 1e6, (megabytes, shards)
        assert 0 <= float(seconds) < 60
    assert ONE_PARTICLE not in res.stdout  # two particles: a swarm
    start = json.loads(metrics.read_text().splitlines()[0])
    env = start["environment"]
    assert env["psops_mpi"] == __version__ and env["git"] == expected_git()
    shown = f"psops_mpi: version {__version__}"
    if env["git"]:
        shown += f" (git {env['git']['commit']}"
    assert res.stdout.count(shown) == 1, res.stdout


def test_one_rank_of_pso_ps_says_it_is_no_swarm(tmp_path: Path) -> None:
    res = launch(["--dataset", "synthetic", "--max-steps", "16"], ranks=1)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(ONE_PARTICLE) == 1
    assert "as SlowMo on one rank" in res.stdout  # the default preset, the centre rule
    res = launch(["--dataset", "synthetic", "--max-steps", "16", "--pso-preset", "paper"],
                 ranks=1)
    assert res.returncode == 0, res.stderr
    assert f"{ONE_PARTICLE}: plain local SGD;" in res.stdout


def test_quiet_prints_neither_the_note_nor_checkpoint_lines(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    res = launch([*QUICK, "--checkpoint-dir", str(ckpt), "--quiet"], ranks=1)
    assert res.returncode == 0, res.stderr
    assert len(list(ckpt.glob("step-*"))) == 3  # written, only not announced
    assert not CHECKPOINT_LINE.search(res.stdout) and ONE_PARTICLE not in res.stdout
    assert res.stdout.startswith("final: test acc"), res.stdout
