"""The swarm that searches its learning rate, from the command line (real mpiexec jobs):
every particle's multiplier in the epoch metrics, an exact resume, and a resize."""

from __future__ import annotations

import json
from pathlib import Path

from tests.e2e.test_checkpoint_resume import resume_matches_uninterrupted
from tests.helpers.launch import launch

# synthetic at 2 ranks: 32 steps an epoch, 8 rounds of 4; the multipliers move every 3 rounds
SEARCH = ["--dataset", "synthetic", "--pso-preset", "search", "--sync-every", "4",
          "--lr-period", "3", "--epochs", "2", "--quiet"]


def test_the_search_resumes_exactly_and_its_multipliers_are_in_the_metrics(
        tmp_path: Path) -> None:
    """Resumed at step 38 (mid-period of the rounds and of the search), it ends
    bit-identical, multipliers included (sync/rate/ in the shards). Then the checkpoint
    continues on 3 ranks: the new particle takes the leader's multiplier."""
    resume_matches_uninterrupted(tmp_path, SEARCH, every=19, resume_at=38, final=64)
    metrics = tmp_path / "m.jsonl"
    res = launch([*SEARCH, "--checkpoint-dir", str(tmp_path / "three"), "--resume",
                  str(tmp_path / "whole" / "step-00000038"), "--metrics-out", str(metrics)],
                 ranks=3)
    assert res.returncode == 0, res.stderr
    epochs = [e for e in map(json.loads, metrics.read_text().splitlines())
              if e["event"] == "epoch"]
    assert epochs and all(f"lr_mult_r{k}" in epochs[-1] for k in range(3))
    assert len({round(epochs[-1][f"lr_mult_r{k}"], 9) for k in range(3)}) > 1  # still a search


def test_the_search_waits_out_the_warmup_and_says_so() -> None:
    """The default warmup of a 64-step run is 6 steps: 2 rounds of 4 that the search waits
    out (their scores would judge the warmup, not the rate)."""
    res = launch([a for a in SEARCH if a != "--quiet"], ranks=2)
    assert res.returncode == 0, res.stderr
    assert "the search waits out the warmup (2 rounds)" in res.stdout


def test_the_ensemble_of_identical_models_is_the_model_and_of_distinct_ones_is_reported(
        tmp_path: Path) -> None:
    """PA ends with one model on every rank: the ensemble's accuracy is the model's. The
    elastic swarm's particles stay distinct: their ensemble is measured beside its centre."""
    for algo, extra in (("pa", []), ("pso-ps", ["--pso-preset", "elastic", "--rho", "0.25"])):
        metrics = tmp_path / f"{algo}.jsonl"
        res = launch(["--dataset", "synthetic", "--algo", algo, *extra, "--epochs", "1",
                      "--ensemble-eval", "--quiet", "--metrics-out", str(metrics)], ranks=2)
        assert res.returncode == 0, res.stderr
        final = json.loads(metrics.read_text().splitlines()[-1])
        assert 0.0 <= final["ensemble_acc"] <= 1.0
        if algo == "pa":
            assert final["ensemble_acc"] == final["test_acc"]
