"""Which old particle each rank of a swarm continues when a checkpoint resumes at another
world size (PSO-PS's :meth:`~psops_mpi.sync.base.Synchronizer.plan_resize`): decided from the
checkpoint's summaries alone, before anything is loaded."""

from __future__ import annotations

import math
from typing import Any

from psops_mpi.sync.base import ResizePlan


def plan_swarm_resize(rank_summaries: list[dict[str, Any]], summary: dict[str, Any],
                      new_size: int, centre: bool) -> ResizePlan:
    """Fewer ranks keep the particles with the best personal fitness; more ranks start new
    particles from the global best's owner's shard (at the centre, under the centre rule:
    ``centre``)."""
    fits = [_fitness(s.get("pbest_fitness")) for s in rank_summaries]
    sources = keep_best_particles(fits, new_size)
    old_size, owner = len(fits), summary.get("gbest_owner", -1)
    has_gbest = isinstance(owner, int) and 0 <= owner < old_size
    if new_size < old_size:
        kept = ", ".join(f"{r} ({fits[r]:.4g})" for r in sources if r is not None)
        dropped = ", ".join(str(r) for r in range(old_size) if r not in sources)
        note = (f"kept the particles with the best personal fitness, old rank(s) {kept}; "
                f"dropped old rank(s) {dropped}")
    else:
        new = ", ".join(str(r) for r, s in enumerate(sources) if s is None)
        where = ("the swarm's centre (the centre rule)" if centre else
                 f"the global best (fitness {_fitness(summary.get('gbest_fitness')):.4g})"
                 if has_gbest else "particle 0's position (no round yet)")
        note = (f"rank(s) {new} start new particles at {where} with zero velocity and "
                "fresh optimizer state")
    return ResizePlan(sources, owner if has_gbest else 0, note)


def _fitness(value: object) -> float:
    """A fitness from a checkpoint's JSON summary: null (none yet) or non-finite is +inf."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return math.inf


def keep_best_particles(fitness: list[float], new_size: int) -> list[int | None]:
    """For each rank of a job of ``new_size``, the old particle it continues (None: a new
    one): all of them and new ones after, or the ``new_size`` with the lowest fitness (ties
    to the lower rank), in old rank order."""
    old_size = len(fitness)
    if new_size >= old_size:
        return [*range(old_size), *([None] * (new_size - old_size))]
    ranked = sorted(range(old_size), key=lambda r: (fitness[r], r))
    return sorted(ranked[:new_size])
