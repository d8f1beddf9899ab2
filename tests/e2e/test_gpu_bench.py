"""bench/gpu_bench.py end to end, on the CPU at a small size: it launches its cases, writes
CIFAR-shaped files that the cifar10 loader reads, and reports psops_mpi beside the plain loop.
(Its figures are measured on a GPU; here only that it runs and reports what it measured.)"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from tests.e2e.test_bench_sweep import run_script


def test_gpu_bench_reports_psops_beside_the_plain_loop_on_the_cpu(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    res = run_script(["bench/gpu_bench.py", "--device", "cpu", "--model", "lenet", "--ranks",
                      "1,2", "--algos", "pso-ps", "--precisions", "fp32", "--epochs", "2",
                      "--repeats", "2", "--train-samples", "512", "--test-samples", "128",
                      "--batch-size", "64", "--variants", "noaug,channels_last", "--json",
                      str(out)], timeout=240)
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["ranks"], r["algo"], r["precision"]) for r in rows] == [
        (1, "pso-ps", "fp32"), (2, "pso-ps", "fp32")]
    for row in rows:
        repeats = row["repeats"]
        assert len(repeats) == 2
        assert list(repeats[0])[1:3] == ["psops_mpi", "plain"]  # the order alternates
        assert list(repeats[1])[-2:] == ["plain", "psops_mpi"]
        assert row["ratio"] == statistics.median(r["psops_mpi"] / r["plain"] for r in repeats)
        assert all(r["psops_mpi"] > 0 and r["plain"] > 0 for r in repeats)
    assert "plain+noaug" in rows[0] and "psops_mpi+noaug" not in rows[0]  # plain loop only
    both = [r["psops_mpi+channels_last"] / r["plain+channels_last"] for r in rows[0]["repeats"]]
    assert rows[0]["ratio+channels_last"] == statistics.median(both)
    assert "plain+noaug" not in rows[1]  # variants are measured at one rank
    table = [line.split() for line in res.stdout.splitlines()[2:]]
    assert [line[:3] for line in table] == [["1", "pso-ps", "fp32"], ["2", "pso-ps", "fp32"]]
    assert float(table[0][5]) == round(rows[0]["ratio"], 3)
    assert table[0][7:10] == ["noaug", "plain", f"{rows[0]['plain+noaug']:.0f}"]
    assert table[0][10:] == ["channels_last", f"{rows[0]['psops_mpi+channels_last']:.0f}/"
                             f"{rows[0]['plain+channels_last']:.0f}",
                             f"{rows[0]['ratio+channels_last']:.3f}"]
