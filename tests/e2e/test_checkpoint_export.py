"""Taking the result out: `python -m psops_mpi.checkpoint export|inspect` on a real checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from psops_mpi.checkpoint import complete_checkpoints
from psops_mpi.models import build_model
from tests.helpers.launch import REPO, launch
from tests.helpers.no_mpi import run_module_without_mpi

MODEL = "tests.helpers.checkpoint_models:bn_net"


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psops_mpi.checkpoint", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("run")
    # The paper's rule: each particle keeps its own weights, so the answer is one rank's g.
    res = launch(["--dataset", "synthetic", "--model", MODEL, "--epochs", "1", "--quiet",
                  "--pso-preset", "paper", "--sync-every", "4", "--max-steps", "20",
                  "--checkpoint-dir", str(root),
                  "--checkpoint-every-min", "0.00001", "--keep-last", "2"], ranks=2)
    assert res.returncode == 0, res.stderr
    return root


def test_timed_checkpoints_are_pruned_to_keep_last(run_dir: Path) -> None:
    steps = [step for step, _ in complete_checkpoints(run_dir)]
    assert len(steps) == 2 and steps[0] < steps[1] == 20  # a timed one, then the final one
    assert sorted(p.name for p in run_dir.iterdir()) == [f"step-{s:08d}" for s in steps]


def test_export_writes_the_global_best_as_a_loadable_state_dict(run_dir: Path,
                                                                tmp_path: Path) -> None:
    out = tmp_path / "best.pt"
    res = cli("export", str(run_dir), str(out))  # the directory: its newest checkpoint
    assert res.returncode == 0, res.stderr
    folder = run_dir / "step-00000020"
    meta = json.loads((folder / "metadata.json").read_text())
    owner = meta["sync"]["gbest_owner"]
    assert owner in (0, 1)
    assert meta["answer"] == {"rank": owner, "array": "sync/swarm/gbest"}

    model = build_model(MODEL, tuple(meta["input_shape"]), meta["num_classes"])
    model.load_state_dict(torch.load(out, weights_only=True), strict=True)
    with h5py.File(folder / f"rank-{owner:05d}.h5", "r") as fh:
        gbest = torch.from_numpy(fh["sync/swarm/gbest"][()])
        position = torch.from_numpy(fh["model/position"][()])
        buffers = torch.from_numpy(fh["model/buffers"][()])
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    assert torch.equal(weights, gbest) and not torch.equal(weights, position)
    bn = model[2]
    assert torch.equal(torch.cat([bn.running_mean, bn.running_var]), buffers)
    assert int(bn.num_batches_tracked) == 20  # an integer buffer, stored as it is


def test_inspect_summarises_and_flags_a_damaged_shard(run_dir: Path, tmp_path: Path) -> None:
    folder = run_dir / "step-00000020"
    res = cli("inspect", str(folder))
    assert res.returncode == 0, res.stderr
    assert "step 20" in res.stdout and "2 rank(s)" in res.stdout
    assert "gbest_fitness" in res.stdout and "the last round's best" in res.stdout
    # g is said to be the last round's best, at the round and step the metadata records
    meta = json.loads((folder / "metadata.json").read_text())
    assert meta["round"] == 5  # every 4 steps, 20 steps
    owner = meta["sync"]["gbest_owner"]
    assert (f"gbest_fitness: g, the lowest fitness among the particles at the last round "
            f"(round 5, step 20), rank {owner}'s; not the best ever seen") in res.stdout
    assert "pbest_fitness: the lowest fitness of this particle over all its rounds" in res.stdout
    assert "fitness: a particle's fitness is its mean training loss over the steps" in res.stdout
    assert f"answer       sync/swarm/gbest of rank {owner} (what export writes)" in res.stdout
    assert res.stdout.count(" ok") == 2
    assert "algo = 'pso-ps'" in res.stdout

    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for f in folder.iterdir():
        data = f.read_bytes()
        if f.name == "rank-00001.h5":
            data = data[:100] + bytes([data[100] ^ 1]) + data[101:]
        (damaged / f.name).write_bytes(data)
    res = cli("inspect", str(damaged))
    assert res.returncode == 1 and "DAMAGED OR MISSING" in res.stdout


def test_export_and_inspect_need_no_mpi(run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "best.pt"
    res = run_module_without_mpi("psops_mpi.checkpoint", "export", str(run_dir), str(out))
    assert res.returncode == 0, res.stderr
    assert torch.load(out, weights_only=True).keys() == cli_state_dict_keys(run_dir, tmp_path)
    res = run_module_without_mpi("psops_mpi.checkpoint", "inspect", str(run_dir))
    assert res.returncode == 0 and "step 20" in res.stdout, res.stderr


def cli_state_dict_keys(run_dir: Path, tmp_path: Path) -> set:
    """The keys of the state_dict that export writes with MPI importable."""
    out = tmp_path / "with_mpi.pt"
    assert cli("export", str(run_dir), str(out)).returncode == 0
    return torch.load(out, weights_only=True).keys()


@pytest.mark.parametrize("args", [["export", "/nonexistent", "x.pt"], ["inspect", "/nowhere"],
                                  ["frobnicate"]])
def test_bad_cli_input_is_one_line(args: list[str]) -> None:
    res = cli(*args)
    assert res.returncode == 2 and res.stderr.startswith("psops_mpi: error: ")
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
