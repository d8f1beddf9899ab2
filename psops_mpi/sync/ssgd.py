"""Synchronous SGD: one Allreduce of the flat gradient every step."""

from __future__ import annotations

from typing import Any

from psops_mpi.sync.flat_sync import FlatSynchronizer


class SSGDSync(FlatSynchronizer):
    """Average gradients over all ranks after every backward pass (``sync_every`` is unused:
    weights never diverge, so only BatchNorm statistics are averaged, at :meth:`flush`).

    A round is one Allreduce of the gradient, so ``rounds`` counts steps, skipped ones
    included (their gradient travelled too); the BatchNorm averaging at :meth:`flush` is
    not a round.

    A NaN or inf in any rank's gradient reaches the average on every rank alike, so every
    rank sees that the average is not finite without another message (one local reduction
    over the gradient) and skips the step: the gradients are set to None, and
    ``optimizer.step()`` leaves weights and momentum as they were (``skipped_steps``).

    The other arguments are as for :class:`FlatSynchronizer`.

    Args:
        loss_scale: under fp16 (:mod:`psops_mpi.precision`), the current loss scale, the same
            on every rank. A step skipped while it is above 1 is the scaler's overflow: it
            counts in ``skipped_steps`` but not towards ``max_nonfinite`` (the scaler halves
            and the next step retries), so the scaler's search for its scale at the start
            of a run cannot stop the job.
    """

    extra_slots = 0
    skipped_name = "skipped_steps"
    nonfinite = "the averaged gradient was not finite"
    sync_unit = "steps"

    def after_backward(self) -> bool:
        return self._average_gradient()

    def _round_due(self) -> bool:
        return False  # the gradient was averaged in after_backward(): that was the round

    def sync_round(self) -> None:
        """Average the BatchNorm statistics (at :meth:`flush`, before evaluation, so that every
        rank holds the same model). Not a round: SSGD's rounds are its gradient Allreduces."""
        self.exchange.arrive(lambda: f"the BatchNorm averaging (step {self.steps})")
        self.average_buffers()
        self.steps_since_round = 0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        # Every step is a round. Older checkpoints counted the BatchNorm averaging instead.
        self.rounds = self.steps
