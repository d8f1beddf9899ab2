"""The default run at 8 and 16 ranks, as `srun -n 16` starts it (here oversubscribed on a
small machine): every rank ends on one model, `--exchange auto` chose what the cost model
says and said so, and every rank sent the bytes the cost model counts for that exchange."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from psops_mpi.costmodel import choose_exchange, pso_method, round_bytes
from tests.e2e.test_train_cli import final_checkpoint, read_metrics, read_shards
from tests.helpers.launch import launch

CNN1D_PARAMS = 8010


@pytest.mark.parametrize(("ranks", "exchange"), [(8, "allgather"), (16, "best")])
def test_default_run_at_many_ranks(tmp_path: Path, ranks: int, exchange: str) -> None:
    # 32 KB particles: at 8 ranks the allgather's 7 messages cost less than the mean's
    # allreduce plus MINLOC and a broadcast; at 16 its 15 messages cost more.
    assert choose_exchange(ranks, CNN1D_PARAMS, needs_mean=True) == exchange
    metrics, ckpt = tmp_path / "m.jsonl", tmp_path / "ckpt"
    res = launch(["--epochs", "6", "--metrics-out", str(metrics), "--checkpoint-dir",
                  str(ckpt)], ranks=ranks, timeout=300)
    assert res.returncode == 0, res.stderr
    assert f"exchange {exchange} (auto: the cheaper for this swarm)" in res.stdout
    events = read_metrics(metrics)
    start, final = events[0], events[-1]
    assert start["world_size"] == ranks and start["exchange"] == exchange
    assert final["num_params"] == CNN1D_PARAMS and final["test_acc"] > 0.2  # chance: 0.1
    # The default rule needs the mean; the counters count whole bytes per collective.
    per_round = round_bytes(pso_method(exchange, needs_mean=True), CNN1D_PARAMS, ranks)
    assert final["comm_bytes_per_rank"] == pytest.approx(
        final["rounds"] * per_round, abs=final["rounds"])
    folder = final_checkpoint(ckpt)
    assert json.loads((folder / "metadata.json").read_text())["world_size"] == ranks
    models = [shard["model/position"] for shard in read_shards(folder, "model/position")]
    for rank, weights in enumerate(models[1:], start=1):  # the centre rule: one model
        np.testing.assert_allclose(weights, models[0], rtol=1e-6, atol=1e-7,
                                   err_msg=f"rank {rank} ends on another model than rank 0")
