"""--tensorboard: rank 0 writes the epoch metrics as TensorBoard scalars, read back here with
TensorBoard's own reader; without the package the flag fails before training."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.helpers.launch import REPO, launch
from tests.helpers.no_mpi import import_blocker

# Put first on PYTHONPATH, this makes `import tensorboard` fail as on a machine without it.
BLOCK_TENSORBOARD = import_blocker("tensorboard")


def test_scalars_match_the_json_metrics(tmp_path: Path) -> None:
    """And a run resumed from the checkpoint at step 48 into the same folder replaces the
    interrupted run's point at step 64 instead of adding a second one (TensorBoard purges
    on its own only when steps go backwards)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics, board = tmp_path / "m.jsonl", tmp_path / "runs" / "tb"
    args = ["--dataset", "synthetic", "--epochs", "2", "--algo", "ssgd", "--metrics-out",
            str(metrics), "--tensorboard", str(board), "--checkpoint-every", "16"]
    res = launch([*args, "--checkpoint-dir", str(tmp_path / "ckpt"), "--keep-last", "4"],
                 ranks=2)
    assert res.returncode == 0, res.stderr
    res = launch([*args, "--checkpoint-dir", str(tmp_path / "again"), "--resume",
                  str(tmp_path / "ckpt" / "step-00000048")], ranks=2)
    assert res.returncode == 0, res.stderr
    lines = [e for e in map(json.loads, metrics.read_text().splitlines())
             if e["event"] == "epoch"]
    # 2,048 samples / (2 ranks x 32 per batch); the resumed run reports epoch 2 again
    assert [e["step"] for e in lines] == [32, 64, 64]
    epochs = [lines[0], lines[2]]  # each step once, as the last run to reach it computed it
    assert len(list(board.glob("events.out.tfevents.*"))) == 2  # rank 0 alone, per launch

    events = EventAccumulator(str(board))
    events.Reload()
    numeric = {k for k, v in epochs[0].items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    assert {"train_loss", "test_acc", "test_loss", "samples_per_s", "comm_bytes_per_rank",
            "skipped_steps", "rounds"} <= numeric
    assert set(events.Tags()["scalars"]) == numeric
    for key in numeric:
        written = [(s.step, s.value) for s in events.Scalars(key)]
        assert [step for step, _ in written] == [e["step"] for e in epochs], key
        for (_, value), epoch in zip(written, epochs, strict=True):
            assert math.isclose(value, epoch[key], rel_tol=1e-6), (key, value, epoch[key])


def test_without_the_package_the_flag_is_one_line_and_exit_2(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(BLOCK_TENSORBOARD)
    res = launch(["--dataset", "synthetic", "--epochs", "1", "--tensorboard",
                  str(tmp_path / "tb")], ranks=2,
                 env={"PYTHONPATH": f"{tmp_path}:{REPO}"})
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "psops_mpi: error: --tensorboard needs the tensorboard package: "
        "pip install 'psops_mpi[tensorboard]'"], res.stderr
    assert not (tmp_path / "tb").exists() and "epoch" not in res.stdout
