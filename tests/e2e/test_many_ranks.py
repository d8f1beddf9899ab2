"""Training at 8 ranks, as `srun -n 8` starts it (here oversubscribed on a small
machine), where `--exchange auto` picks the broadcast of the best particle: every rank ends on
one model, auto chose what the cost model says and said so, and every rank sent the bytes the
cost model counts for that exchange. (Auto's other choice, the allgather, is the default run's
at 2 ranks; the MPI tier runs both exchanges at 8 ranks.)

16 ranks run the same way (`mpiexec -n 16 python -m psops_mpi.train --epochs 6`, 41 s on a
2-core machine) but are not in the suite, which must stay under 15 minutes on 2 cores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from psops_mpi.costmodel import choose_exchange, pso_method, round_bytes
from tests.e2e.test_train_cli import final_checkpoint, read_metrics, read_shards
from tests.helpers.launch import launch

PARAMS = {"mlp-wide": 1_101_834}


def test_eight_ranks_where_auto_picks_the_broadcast_of_the_best(tmp_path: Path) -> None:
    # 4.4 MB particles: the allgather's 7 x 4.4 MB cost more than the mean's allreduce plus
    # MINLOC and a broadcast (at 2 ranks auto picks the allgather: the default run's test)
    model, exchange, epochs = "mlp-wide", "best", 2
    ranks, n_params = 8, PARAMS[model]
    assert choose_exchange(ranks, n_params, needs_mean=True) == exchange
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    res = launch(["--model", model, "--epochs", str(epochs), "--metrics-out", str(metrics),
                  "--checkpoint-dir", str(ckpt)], ranks=ranks, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"exchange {exchange} (auto: the cheaper for this swarm)" in res.stdout
    events = read_metrics(metrics)
    start, final = events[0], events[-1]
    assert start["world_size"] == ranks and start["exchange"] == exchange
    assert final["num_params"] == n_params and final["test_acc"] > 0.2  # chance: 0.1
    # The default rule needs the mean; the counters count whole bytes per collective.
    per_round = round_bytes(pso_method(exchange, needs_mean=True), n_params, ranks)
    assert final["comm_bytes_per_rank"] == pytest.approx(
        final["rounds"] * per_round, abs=final["rounds"])
    folder = final_checkpoint(ckpt)
    assert json.loads((folder / "metadata.json").read_text())["world_size"] == ranks
    models = [shard["model/position"] for shard in read_shards(folder, "model/position")]
    for rank, weights in enumerate(models[1:], start=1):  # the centre rule: one model
        np.testing.assert_allclose(weights, models[0], rtol=1e-6, atol=1e-7,
                                   err_msg=f"rank {rank} ends on another model than rank 0")
