"""Loading damaged or mismatched checkpoints: one line, exit code 2 on every rank, no h5py
traceback and no hang (real 2-rank jobs on files this test damages; each kind of damage a
shard reader or a state check refuses, truncation, garbage, a missing file, a wrong shape,
is a unit test in tests/unit/test_checkpoint.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import h5py
import pytest

from tests.helpers.launch import launch
from tests.helpers.shards import flip_in_dataset

MODEL = "tests.helpers.checkpoint_models:bn_net"
RUN = ["--dataset", "synthetic", "--model", MODEL, "--epochs", "1", "--sync-every", "4",
       "--quiet"]


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("good")
    res = launch([*RUN, "--checkpoint-dir", str(root), "--max-steps", "12"], ranks=2)
    assert res.returncode == 0, res.stderr
    return root / "step-00000012"


def rewrite_metadata(folder: Path, rank: int) -> None:
    """Make the metadata agree with a replaced shard, so the damage gets past the checksum."""
    meta = json.loads((folder / "metadata.json").read_text())
    data = (folder / f"rank-{rank:05d}.h5").read_bytes()
    meta["shards"][rank].update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    (folder / "metadata.json").write_text(json.dumps(meta))


def flip_byte(folder: Path) -> None:
    """One weight changed inside the data: a valid HDF5 file that only the checksum refuses."""
    flip_in_dataset(folder / "rank-00001.h5", "model/position", index=5)


def wrong_dtype(folder: Path) -> None:
    path = folder / "rank-00000.h5"
    with h5py.File(path, "a") as fh:
        position = fh["model/position"][()]
        del fh["model/position"]
        fh["model/position"] = position.astype("float64")
    rewrite_metadata(folder, 0)


def garbage_metadata(folder: Path) -> None:
    (folder / "metadata.json").write_text("{not json")


def nothing(folder: Path) -> None:
    pass


CASES: dict[str, tuple[Callable[[Path], None], list[str], dict[str, str], str]] = {
    "checksum": (flip_byte, [], {}, "does not match its checksum"),
    "dtype": (wrong_dtype, [], {}, "'model/position' is (730,) float64"),
    "metadata": (garbage_metadata, [], {}, "cannot read"),
    "param-count": (nothing, [], {"CKPT_TEST_WIDTH": "24"}, "parameters per particle"),
    "other-algo": (nothing, ["--algo", "pa"], {}, "is from a pso-ps run"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_gets_one_line_and_exit_code_2(good_checkpoint: Path, tmp_path: Path,
                                                      case: str) -> None:
    damage, extra, env, expected = CASES[case]
    folder = Path(shutil.copytree(good_checkpoint, tmp_path / good_checkpoint.name))
    damage(folder)
    res = launch([*RUN, *extra, "--resume", str(folder)], ranks=2, timeout=120, env=env)
    assert res.returncode == 2, (res.stdout, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("psops_mpi: error: "), res.stderr
    assert expected in lines[0]
    assert "Traceback" not in res.stdout + res.stderr
