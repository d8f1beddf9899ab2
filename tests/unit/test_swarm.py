"""The PSO rule and best selection, checked against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from psops_mpi.config import PSOConfig
from psops_mpi.swarm import Swarm, pso_update_, rng_key, select_best


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def test_rule_by_hand_with_unit_random_numbers() -> None:
    x, v = t(1.0, -2.0, 0.0), t(0.5, 0.0, -1.0)
    p, g = t(2.0, -2.0, 1.0), t(0.0, 1.0, 3.0)
    pso_update_(x, v, p, g, w=0.5, c1=1.0, c2=2.0, vmax=None, key=0, deterministic=True)
    # v = 0.5*v + 1*(p-x) + 2*(g-x):  [0.25+1-2, 0+0+6, -0.5+1+6]
    assert torch.allclose(v, t(-0.75, 6.0, 6.5))
    assert torch.allclose(x, t(0.25, 4.0, 6.5))


def test_rule_with_random_numbers_matches_the_formula() -> None:
    n, key = 1000, rng_key(3, 4, 5)
    x, v, p, g = (torch.randn(n) for _ in range(4))
    x0, v0 = x.clone(), v.clone()
    pso_update_(x, v, p, g, w=0.7, c1=1.5, c2=0.5, vmax=None, key=key)
    gen = torch.Generator().manual_seed(key)
    r1, r2 = torch.rand((2, n), generator=gen)
    v_expected = 0.7 * v0 + 1.5 * r1 * (p - x0) + 0.5 * r2 * (g - x0)
    assert torch.allclose(v, v_expected, atol=1e-6)
    assert torch.allclose(x, x0 + v_expected, atol=1e-6)


def test_same_key_same_step_other_key_other_step() -> None:
    def step(key: int) -> torch.Tensor:
        x, v = torch.zeros(64), torch.zeros(64)
        pso_update_(x, v, torch.ones(64), -torch.ones(64), w=0.5, c1=1.0, c2=1.0, vmax=None,
                    key=key)
        return x

    assert torch.equal(step(rng_key(0, 3, 1)), step(rng_key(0, 3, 1)))
    assert not torch.equal(step(rng_key(0, 3, 1)), step(rng_key(0, 3, 2)))  # other rank
    assert not torch.equal(step(rng_key(0, 3, 1)), step(rng_key(0, 4, 1)))  # other round


def test_vmax_clamps_every_component_exactly() -> None:
    x, v = torch.zeros(4), torch.zeros(4)
    g = t(10.0, -10.0, 0.05, -0.05)
    pso_update_(x, v, x.clone(), g, w=0.0, c1=0.0, c2=1.0, vmax=0.1, key=0, deterministic=True)
    assert torch.equal(v, t(0.1, -0.1, 0.05, -0.05))
    assert torch.equal(x, v)


def test_keys_differ_by_seed_round_and_rank_and_repeat() -> None:
    keys = {rng_key(s, r, k) for s in range(3) for r in range(3) for k in range(3)}
    assert len(keys) == 27
    assert rng_key(1, 2, 3) == rng_key(1, 2, 3)
    assert all(0 <= key < 2**63 for key in keys)


def test_select_best_ties_go_to_lowest_rank_and_nan_never_wins() -> None:
    assert select_best(t(3.0, 1.0, 1.0, 2.0)) == (1, 1.0)
    assert select_best(t(math.nan, 5.0, -math.inf, 4.0)) == (3, 4.0)
    index, value = select_best(t(math.nan, math.inf))
    assert value == math.inf and index == 0


def make_swarm(memory: str = "round") -> Swarm:
    return Swarm(torch.zeros(3), PSOConfig(gbest_memory=memory), seed=0, rank=0)


def test_personal_best_only_improves_and_ignores_non_finite() -> None:
    swarm = make_swarm()
    swarm.x.fill_(1.0)
    swarm.offer_personal(2.0)
    swarm.x.fill_(5.0)
    swarm.offer_personal(3.0)
    swarm.offer_personal(math.nan)
    assert swarm.pbest_fitness == 2.0 and torch.all(swarm.pbest == 1.0)


@pytest.mark.parametrize(("memory", "expected"), [("round", True), ("all", False)])
def test_gbest_memory(memory: str, expected: bool) -> None:
    swarm = make_swarm(memory)
    swarm.set_global(torch.ones(3), 1.0, owner=2)
    assert swarm.accepts_global(1.5) is expected
    assert swarm.accepts_global(0.5)
    assert not swarm.accepts_global(math.nan)
    assert not swarm.accepts_global(math.inf)


def test_move_waits_for_a_global_best_then_moves() -> None:
    swarm = make_swarm()
    swarm.move()
    assert torch.equal(swarm.x, torch.zeros(3)) and swarm.round == 1
    swarm.set_global(torch.ones(3), 1.0, owner=1)
    swarm.move(deterministic=True)  # v = c2 * (g - x) with x = 0, g = 1
    assert torch.allclose(swarm.x, torch.full((3,), PSOConfig().c2))
