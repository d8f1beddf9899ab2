"""End to end: the benchmark sweep's quick mode, under an emulated 1 Gbit/s link, and its report.

Real jobs: psops_mpi SSGD and PSO-PS and the DDP-gloo baseline under ``mpiexec`` inside a
network namespace (root), then bench/report.py on what they wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import netem  # noqa: E402
import runs as sweep_runs  # noqa: E402


def run_script(args: list[str], timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.skipif(os.geteuid() != 0, reason="emulated links need root (ip netns, tc)")
def test_quick_sweep_over_emulated_link_and_report(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    res = run_script(["bench/sweep.py", "--quick", "--links", "1gbit", "--algos",
                      "ssgd,ddp,pso", "--max-steps", "20", "--out", str(raw)], timeout=240)
    assert res.returncode == 0, res.stderr
    runs = [json.loads(line) for line in (raw / "runs.jsonl").read_text().splitlines()]
    assert sorted(r["algo"] for r in runs) == ["ddp", "pso-ps", "ssgd"]
    for r in runs:
        assert r["rc"] == 0, r.get("error")
        assert r["link"] == "1gbit" and r["cmd"].startswith("ip netns exec psops-bench-")
        assert r["steps"] == 20 and r["curve"] and r["comm_bytes_per_rank"] > 0
    by_algo = {r["algo"]: r for r in runs}
    # the DDP baseline trains the very same SSGD: same data, model, optimizer and schedule
    assert by_algo["ddp"]["test_acc"] == pytest.approx(by_algo["ssgd"]["test_acc"], abs=0.02)
    assert by_algo["ddp"]["comm_bytes_per_rank"] == by_algo["ssgd"]["comm_bytes_per_rank"]
    namespace = runs[0]["cmd"].split()[3]  # ip netns exec NAME ...
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert namespace.startswith(netem.NS_PREFIX) and namespace not in listed.split()

    res = run_script(["bench/report.py", str(raw), "--out-dir", str(tmp_path)], timeout=120)
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "REPORT.md").read_text()
    assert "| 1gbit | mnist1d | cnn1d | 2 |" in text  # the SSGD / DDP throughput row
    assert "Intel" in text or "AMD" in text or "CPU:" in text
    assert "time to target" in text and "PSO-PS centre (default)" in text
    for png in ("time_to_accuracy.png",):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_link_setup_without_root_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    link = netem.EmulatedLink()
    with pytest.raises(netem.LinkSetupError, match="need root") as info, link:
        pass
    assert "\n" not in str(info.value) and not link.open


def test_bad_link_name_is_one_line_and_exit_2() -> None:
    res = run_script(["bench/sweep.py", "--links", "fast", "--out", "/tmp/unused"], timeout=60)
    assert res.returncode == 2
    assert "must be 'shm' or a rate" in res.stderr


def test_time_to_target_counts_unreached_seeds_as_infinite() -> None:
    curve_fast = [[1, 1.0, 0.5], [2, 2.0, 0.8]]
    curve_never = [[1, 1.0, 0.5], [2, 2.0, 0.6]]
    assert sweep_runs.time_to(curve_fast, 0.7) == 2.0
    assert sweep_runs.time_to(curve_never, 0.7) is None
    runs = [{"curve": curve_fast}, {"curve": curve_fast}, {"curve": curve_never}]
    assert sweep_runs.ttt(runs, 0.7) == (2.0, 2, 3)
    assert sweep_runs.ttt(runs[1:], 0.7) == (None, 1, 2)  # median over {2.0, inf} is inf
    assert sweep_runs.speedup(10.0, 2.0) == 5.0 and sweep_runs.speedup(10.0, None) is None
