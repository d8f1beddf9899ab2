"""The recipe from the command line (real mpiexec jobs): a language model trained with
AdamW, a warmup and clipping; an exact resume with a user's data, DataLoader workers, AdamW
and accumulation, and a resize. (A run too short for its recipe: tests/unit/test_recipe.py.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.e2e.test_checkpoint_resume import resume_matches_uninterrupted
from tests.helpers.launch import launch

FORTUNES = Path("/usr/share/games/fortunes")
RECIPE = ["--optimizer", "adamw", "--lr", "0.003", "--warmup-steps", "10",
          "--clip-grad-norm", "1.0"]


@pytest.mark.skipif(not (FORTUNES / "fortunes").is_file(),
                    reason="Debian's fortunes package is not installed")
def test_a_language_model_learns_english_text_with_adamw_warmup_and_clipping(
        tmp_path: Path) -> None:
    metrics = tmp_path / "m.jsonl"
    res = launch(["--dataset", "fortunes", "--model", "gpt-tiny", *RECIPE, "--algo", "slowmo",
                  "--epochs", "1", "--max-steps", "50", "--batch-size", "16", "--metrics-out",
                  str(metrics)], ranks=2, timeout=300)
    assert res.returncode == 0, res.stderr
    final = json.loads(metrics.read_text().splitlines()[-1])
    assert "ppl" in res.stdout and "test_acc" not in final
    # an untrained byte model's loss is ln(256) = 5.55 per byte
    assert final["test_loss"] < 0.8 * math.log(256)
    assert final["test_ppl"] == pytest.approx(math.exp(final["test_loss"]))
    assert final["grad_norm"] > 0 and final["config"]["weight_decay"] == 0.01


def test_own_data_with_workers_and_the_modern_recipe_resume_exactly_and_resize(
        tmp_path: Path) -> None:
    """A user's map-style set (noise drawn as each sample is read) through two DataLoader
    workers per rank, SlowMo (its period's rates are state too) with AdamW (its moments
    averaged at every round), a warmup, clipping and accumulation: 16 batches an epoch at 2
    ranks, 8 optimizer steps of 2.
    Killed and resumed at step 3 (mid-epoch, mid-period, mid-warmup), it ends bit-identical
    to a run never stopped. The same checkpoint continues on 3 ranks: the new rank's AdamW
    state starts fresh, and the data order continues at the same fraction of the epoch."""
    args = ["--dataset", "tests.helpers.user_data:blobs", "--model", "mlp", "--algo", "slowmo",
            "--sync-every", "2", "--average-optimizer-state", *RECIPE, "--grad-accum-steps", "2",
            "--epochs", "3", "--batch-size", "32", "--data-workers", "2", "--quiet"]
    resume_matches_uninterrupted(tmp_path, args, every=3, resume_at=3, final=24)
    res = launch([*args, "--checkpoint-dir", str(tmp_path / "three"), "--resume",
                  str(tmp_path / "whole" / "step-00000003")], ranks=3)
    assert res.returncode == 0, res.stderr
    assert "the checkpoint has 2 rank(s), this job 3" in res.stdout
    assert "data order continues in epoch 1 at step 2 of 5 (the same fraction)" in res.stdout
