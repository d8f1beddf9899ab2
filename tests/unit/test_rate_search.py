"""The swarm's learning-rate search as pure math (psops_mpi.swarm.RateSearch): where the
multipliers start, how they move, the guard against short-horizon bias, the bounds, and a
resize; the size of the holdout batch that scores them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from psops_mpi.config import TrainConfig
from psops_mpi.run import holdout_size
from psops_mpi.swarm import RateSearch


def test_multipliers_start_spread_log_evenly_over_the_range() -> None:
    search = RateSearch(5, spread=3.0, period=2, seed=0)
    assert [search.multiplier(k) for k in range(5)] == pytest.approx(
        [1 / 3, 3 ** -0.5, 1.0, 3 ** 0.5, 3.0])
    assert RateSearch(1, spread=3.0, period=2, seed=0).multiplier(0) == 1.0


def test_they_move_once_a_period_towards_the_best_mean_score() -> None:
    search = RateSearch(4, spread=4.0, period=3, seed=1)
    before = search.h.copy()
    scores = np.array([1.0, 0.5, 0.8, 0.9])  # particle 1 is best
    search.observe(scores), search.observe(scores)
    assert np.array_equal(search.h, before) and search.steps == 0  # not within the period
    search.observe(scores)
    assert search.leader == 1 and search.steps == 1
    distance_before = np.abs(before - before[1])
    distance_after = np.abs(search.h - search.h[1])
    assert distance_after.sum() < distance_before.sum()  # drawn together, with noise


def _after_first_step(scores: list[float]) -> RateSearch:
    """A search whose first step followed ``scores``: with nothing to compare, the best
    score alone leads."""
    search = RateSearch(3, spread=3.0, period=1, seed=2)
    search.observe(np.array(scores))
    assert search.leader == int(np.argmin(scores))
    return search


def test_while_the_swarm_learns_near_ties_go_to_the_larger_rate() -> None:
    """Against short-horizon bias: while the best mean score falls by more than 1% a
    period, the largest multiplier within 1% of the best leads."""
    for second, leader in (([1.000, 1.005, 1.2], 1), ([1.000, 1.05, 1.2], 0)):  # tie, none
        search = _after_first_step([1.2, 1.3, 1.4])
        order = np.argsort(search.h)  # particles from the smallest multiplier up
        scores = np.empty(3)
        scores[order] = second
        search.observe(scores)
        assert search.leader == order[leader]


def test_a_near_tie_that_is_no_progress_says_nothing_about_the_rate() -> None:
    """When the best mean score did not fall by more than 1% (a plateau, or a swarm stuck at
    chance where every particle ties), the best score leads alone; tipping towards the
    larger rate there once drove whole swarms to the bound."""
    search = _after_first_step([1.0, 1.3, 1.4])
    order = np.argsort(search.h)
    scores = np.empty(3)
    scores[order] = [0.995, 0.999, 1.2]  # the best fell by 0.5%: no progress
    search.observe(scores)
    assert search.leader == order[0]
    stuck = RateSearch(8, spread=3.0, period=1, seed=6)
    chance = math.log(10)
    for step in range(40):  # every particle at chance, a hair apart
        stuck.observe(chance + 1e-4 * np.random.default_rng(step).random(8))
    assert stuck.h.max() < stuck.bound - math.log(2)  # nowhere near the bound


def test_a_particle_that_diverges_halves_its_rate_at_once() -> None:
    search = RateSearch(3, spread=2.0, period=5, seed=3)
    before = search.multiplier(2)
    search.observe(np.array([1.0, 1.5, math.inf]))
    assert search.multiplier(2) == pytest.approx(before / 2) and search.v[2] == 0.0
    assert search.multiplier(0) == pytest.approx(0.5) and search.steps == 0  # others wait


def test_a_non_finite_score_counts_as_the_worst_and_the_bound_holds() -> None:
    search = RateSearch(3, spread=2.0, period=1, seed=3)
    for _ in range(50):
        search.observe(np.array([3.0, 2.0, 1.0]))  # the largest rate always best
    assert search.leader == 2
    assert math.exp(search.bound) == pytest.approx(4.0)  # spread squared
    assert all(0.25 - 1e-9 <= search.multiplier(k) <= 4.0 + 1e-9 for k in range(3))
    assert search.multiplier(0) > 1.0  # from 1/2, drawn up towards the leader


def test_every_rank_computes_the_same_step_from_the_same_scores() -> None:
    a, b = RateSearch(6, 3.0, 2, seed=7), RateSearch(6, 3.0, 2, seed=7)
    rng = np.random.default_rng(0)
    for _ in range(10):
        scores = rng.random(6)
        a.observe(scores)
        b.observe(scores)
    assert np.array_equal(a.h, b.h) and np.array_equal(a.v, b.v)
    c = RateSearch(6, 3.0, 2, seed=7)
    c.load_state_dict({k: (np.array(v) if isinstance(v, np.ndarray) else v)
                       for k, v in a.state_dict().items()})
    scores = rng.random(6)
    a.observe(scores), a.observe(scores)
    c.observe(scores), c.observe(scores)
    assert np.array_equal(a.h, c.h)  # a restored search goes on identically


def test_a_resize_keeps_each_particles_multiplier_and_starts_new_ones_at_the_leaders() -> None:
    search = RateSearch(3, 3.0, 1, seed=4)
    search.observe(np.array([0.5, 1.0, 2.0]))
    leader, h = search.leader, search.h.copy()
    search.resize([2, 0, None, None])
    assert search.h.tolist() == [h[2], h[0], h[leader], h[leader]]
    assert search.v[2:].tolist() == [0.0, 0.0] and search.rounds == 0


def test_a_particle_blowing_up_is_an_outlier_and_halves_its_rate() -> None:
    """More than twice the best score and a nat above it: left out of the mean (by the
    synchroniser) and its multiplier halved at once, as a diverged one's. Twice a small best
    score alone is no sign of trouble."""
    search = RateSearch(3, spread=2.0, period=5, seed=5)
    assert not search.outliers(np.array([0.04, 0.09, 0.07])).any()
    scores = np.array([0.4, 1.9, 0.7])
    assert search.outliers(scores).tolist() == [False, True, False]
    before = search.multiplier(1)
    assert search.observe(scores).tolist() == [False, True, False]
    assert search.multiplier(1) == pytest.approx(before / 2)
    assert search.outliers(np.array([math.nan, math.nan])).tolist() == [True, True]


def test_nothing_moves_during_the_warmup_but_a_blow_up_still_halves() -> None:
    """During the schedule's warmup a larger multiplier looks better only because the
    warmup keeps the rate small: the scores of the first ``hold`` rounds do not count, and
    the first step comes a full period after the warmup."""
    search = RateSearch(3, spread=3.0, period=2, seed=8, hold=3)
    before = search.h.copy()
    rising = np.array([1.3, 1.2, 1.0])  # the largest rate best, as in a warmup
    search.observe(rising), search.observe(rising)
    assert np.array_equal(search.h, before) and search.steps == 0 and search.hold == 1
    search.observe(np.array([1.0, 1.2, math.inf]))  # blowing up in the warmup: halved
    assert search.multiplier(2) == pytest.approx(3.0 / 2) and search.hold == 0
    search.observe(np.array([1.0, 1.2, 1.3]))
    assert search.steps == 0  # one round of the period after the warmup
    search.observe(np.array([1.0, 1.2, 1.3]))
    assert search.steps == 1 and search.leader == 0  # judged on the rounds after it only
    restored = RateSearch(3, spread=3.0, period=2, seed=8, hold=3)
    restored.load_state_dict(search.state_dict())
    assert restored.hold == 0 and np.array_equal(restored.h, search.h)


def test_the_holdout_holds_a_rounds_samples_within_256_and_1024() -> None:
    """Scoring every particle costs about a third of a round, not more than the round."""
    assert holdout_size(TrainConfig(sync_every=16, batch_size=32)) == 512
    assert holdout_size(TrainConfig(sync_every=4, batch_size=16, grad_accum_steps=3)) == 256
    assert holdout_size(TrainConfig(sync_every=2, batch_size=8)) == 256
    assert holdout_size(TrainConfig(sync_every=64, batch_size=32)) == 1024
