"""The recipe from the command line (real mpiexec jobs): a language model trained with
AdamW, a warmup and clipping; an exact resume and a resize with AdamW and accumulation; and
one line for a run too short for its warmup or its accumulation."""

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


def test_adamw_warmup_clipping_and_accumulation_resume_bit_identically_and_resize(
        tmp_path: Path) -> None:
    """SlowMo (its period's rates are state too) on 2 ranks: 16 batches an epoch, 8
    optimizer steps of 2; resumed at step 3, mid-period and mid-warmup. Then the same
    checkpoint continues on 3 ranks, the new rank's AdamW state fresh."""
    args = ["--dataset", "synthetic", "--algo", "slowmo", "--sync-every", "2", *RECIPE,
            "--grad-accum-steps", "2", "--epochs", "3", "--batch-size", "64", "--quiet"]
    resume_matches_uninterrupted(tmp_path, args, every=3, resume_at=3, final=24)
    res = launch([*args, "--checkpoint-dir", str(tmp_path / "three"), "--resume",
                  str(tmp_path / "whole" / "step-00000003")], ranks=3)
    assert res.returncode == 0, res.stderr
    assert "the checkpoint has 2 rank(s), this job 3" in res.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--warmup-steps", "62", "--epochs", "1"],
     "--warmup-steps 62 is not shorter than the run (62 optimizer steps)"),
    (["--grad-accum-steps", "100", "--epochs", "1"],
     "--grad-accum-steps 100 needs 100 batches per optimizer step; an epoch has 62 batches"),
])
def test_a_run_too_short_for_its_recipe_is_one_line(args: list[str], message: str) -> None:
    res = launch(args, ranks=2)
    assert res.returncode == 2
    errors = [line for line in res.stderr.splitlines() if line.startswith("psops_mpi: error")]
    assert len(errors) == 1 and message in errors[0], res.stderr
