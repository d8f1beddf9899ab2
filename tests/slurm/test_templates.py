"""The sbatch templates, read as Slurm and bash read them (no Slurm needed)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.launch import REPO

sys.path.insert(0, str(REPO / "bench"))
import sweep

TEMPLATES = sorted((REPO / "slurm").glob("*.sbatch"))


def directives(path: Path) -> tuple[list[str], list[str]]:
    """The #SBATCH lines sbatch reads (those before the first command) and any after it."""
    read, ignored, in_header = [], [], True
    for line in path.read_text().splitlines()[1:]:
        stripped = line.strip()
        if in_header and stripped and not stripped.startswith("#"):
            in_header = False
        if line.startswith("#SBATCH"):
            (read if in_header else ignored).append(line)
    return read, ignored


def test_the_three_templates_exist() -> None:
    assert [p.name for p in TEMPLATES] == ["scaling.sbatch", "train_cpu.sbatch",
                                           "train_gpu.sbatch"]


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.name)
def test_template_is_valid_bash_with_every_directive_in_the_header(path: Path) -> None:
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    read, ignored = directives(path)
    assert ignored == [], f"sbatch ignores #SBATCH lines after the first command: {ignored}"
    names = {line.split()[1].split("=")[0] for line in read}
    assert {"--job-name", "--nodes", "--ntasks-per-node", "--time", "--output"} <= names


@pytest.mark.parametrize("name", ["train_cpu.sbatch", "train_gpu.sbatch"])
def test_training_templates_launch_with_matching_pmi_and_end_on_a_failed_rank(name: str) -> None:
    text = (REPO / "slurm" / name).read_text()
    assert 'srun --mpi="$PSOPS_MPI" --kill-on-bad-exit=1' in text
    assert "-m psops_mpi.train" in text and "PSOPS_MPI=${PSOPS_MPI:-pmi2}" in text


def test_gpu_template_asks_one_gpu_per_rank() -> None:
    read, _ = directives(REPO / "slurm" / "train_gpu.sbatch")
    assert "#SBATCH --gpus-per-task=1" in [line.split("  ")[0] for line in read]


def test_scaling_template_runs_the_sweep_once_per_node_count_that_fits() -> None:
    # Run the job script's body as Slurm would on a 2-node allocation of 4 tasks per node,
    # with `echo` in place of python so it prints the sweep commands instead of running them.
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS_PER_NODE": "4",
           "SLURM_CPUS_PER_TASK": "8", "PSOPS_NODE_COUNTS": "1 2 4", "PSOPS_PYTHON": "echo",
           "PSOPS_SWEEP_ARGS": "--quick --seeds 1"}
    res = subprocess.run(["bash", str(REPO / "slurm" / "scaling.sbatch")], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    sweeps = [line for line in res.stdout.splitlines() if line.startswith("bench/sweep.py")]
    common = "--launcher srun --srun-mpi pmi2 --links shm --out results/scaling-local"
    assert sweeps == [f"bench/sweep.py --ranks 4 {common}/nodes-1 --quick --seeds 1",
                      f"bench/sweep.py --ranks 8 {common}/nodes-2 --quick --seeds 1"]
    # and the sweep takes those flags: it plans the runs at those sizes
    args = sweep.parse_args(sweeps[1].split()[1:])
    assert {spec.ranks for runs in sweep.build_plan(args) for spec in runs} == {8}
    assert "skipping 4 nodes: the job has only 2" in res.stderr


FAKE_SRUN = """#!/bin/bash
# stands for srun and the training: stops with 75 on USR1 or TERM, as psops_mpi.train does
echo "srun $$ started"
trap 'echo "srun got USR1"; exit 75' USR1
trap 'echo "srun got TERM"; exit 75' TERM
for i in $(seq 300); do sleep 0.1; done
"""


@pytest.mark.parametrize("name", ["train_cpu.sbatch", "train_gpu.sbatch"])
@pytest.mark.parametrize(("signal_name", "requeued"), [("USR1", True), ("TERM", False)])
def test_training_templates_forward_stop_signals_and_requeue_after_usr1(
        tmp_path: Path, name: str, signal_name: str, requeued: bool) -> None:
    """`--signal=B:USR1@120` reaches the batch script only: it must pass the signal to srun,
    wait for the training's own exit code (75: stopped after a checkpoint), and requeue the
    job after USR1 (the time limit is near); after TERM (scancel, preemption) it does not.
    srun and scontrol are stand-ins that say what they got."""
    read, _ = directives(REPO / "slurm" / name)
    assert {"#SBATCH --signal=B:USR1@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"} \
        <= {line.split("  ")[0] for line in read}
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text('#!/bin/bash\necho "scontrol $*"\n')
    for tool in fake.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "2",
           "SLURM_JOB_NUM_NODES": "1", "SLURM_JOB_NODELIST": "node1",
           "PSOPS_RESULTS": str(tmp_path / "results")}
    script = subprocess.Popen(["bash", str(REPO / "slurm" / name)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert script.stdout is not None
        for line in script.stdout:  # the stand-in is running, its traps are set
            if "srun" in line and "started" in line:
                break
        time.sleep(0.3)
        script.send_signal(getattr(signal, f"SIG{signal_name}"))
        out, err = script.communicate(timeout=30)
    finally:
        script.kill()
    assert script.returncode == 75, (out, err)
    assert f"srun got {signal_name}" in out
    assert ("scontrol requeue 77" in out) == requeued, out
