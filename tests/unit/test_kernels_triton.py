"""The Triton PSO kernel: on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``, set
by tests/run.sh for this file alone, small sizes), or on a real GPU where there is one.

Triton decides at import time whether kernels are interpreted, so this file cannot switch the
interpreter on by itself: without it and without CUDA every test here skips.
"""

from __future__ import annotations

import os

import pytest
import torch

from psops_mpi.kernels import uniform_pair
from psops_mpi.swarm import pso_update_, rng_key

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda"
pytestmark = pytest.mark.skipif(
    not INTERPRETED and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (tests/run.sh sets it for this file) or a CUDA GPU")
AWKWARD = {"w": 0.7301, "c1": 1.4962, "c2": 0.3333}


def triton_update(x, v, p, g, *, w, c1, c2, vmax, key, deterministic=False,
                  path="op") -> None:
    """Through the operator (as torch.compile calls it) or the bare launch (eager CUDA)."""
    from psops_mpi.kernels import pso_triton  # registers the op

    if path == "launch":
        pso_triton.launch(x, v, p, g, w, c1, c2, vmax, key, deterministic)
    else:
        torch.ops.psops.pso_update_triton_(x, v, p, g, w, c1, c2, vmax, key, deterministic)


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, generator=gen).to(DEVICE) for _ in range(4))


@pytest.mark.parametrize("path", ["op", "launch"])
@pytest.mark.parametrize("n", [1, 1023, 1025, 10**6 + 3 if not INTERPRETED else 70_001])
@pytest.mark.parametrize("vmax", [None, 0.37])
def test_agrees_with_the_reference_with_unit_random_numbers(n: int, vmax: float | None,
                                                            path: str) -> None:
    x, v, p, g = inputs(n)
    fused, ref = [x.clone(), v.clone()], [x.clone(), v.clone()]
    triton_update(*fused, p, g, **AWKWARD, vmax=vmax, key=3, deterministic=True, path=path)
    pso_update_(*ref, p, g, **AWKWARD, vmax=vmax, key=3, deterministic=True)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["op", "launch"])
@pytest.mark.parametrize("key", [0, 1, rng_key(7, 2, 1), 2**63 - 1])
def test_draws_are_the_philox_numbers_of_the_cpu_paths_bit_for_bit(key: int, path: str) -> None:
    n = 3001
    for c1, c2, which in ((1.0, 0.0, 0), (0.0, 1.0, 1)):
        x, v, ones = (torch.zeros(n, device=DEVICE), torch.zeros(n, device=DEVICE),
                      torch.ones(n, device=DEVICE))
        triton_update(x, v, ones, ones, w=0.0, c1=c1, c2=c2, vmax=None, key=key, path=path)
        assert torch.equal(v.cpu(), uniform_pair(key, 0, n)[which])


def test_vmax_clamps_exactly_and_random_step_follows_the_formula() -> None:
    n, key = 5000, rng_key(1, 2, 3)
    x, v, p, g = inputs(n, seed=2)
    free, clamped = [x.clone(), v.clone()], [x.clone(), v.clone()]
    triton_update(*free, p, g, **AWKWARD, vmax=None, key=key)
    triton_update(*clamped, p, g, **AWKWARD, vmax=0.25, key=key)
    assert torch.equal(clamped[1], free[1].clamp(-0.25, 0.25))
    assert torch.equal(clamped[0], x + clamped[1])
    r1, r2 = (r.to(DEVICE) for r in uniform_pair(key, 0, n))
    v_expected = v * AWKWARD["w"] + AWKWARD["c1"] * r1 * (p - x) + AWKWARD["c2"] * r2 * (g - x)
    torch.testing.assert_close(free[1], v_expected, rtol=1e-6, atol=1e-6)


def test_bad_inputs_get_a_clear_error() -> None:
    x, v, p, g = inputs(16)
    with pytest.raises(TypeError, match="pbest must be float32"):
        triton_update(x, v, p.double(), g, **AWKWARD, vmax=None, key=1)
    with pytest.raises(ValueError, match="gbest has shape"):
        triton_update(x, v, p, g[:3], **AWKWARD, vmax=None, key=1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_public_op_on_cuda_runs_the_kernel_and_compiles_without_a_graph_break() -> None:
    from psops_mpi.kernels import pso_update_fused_

    x, v, p, g = inputs(100_003, seed=3)
    a, b = [x.clone(), v.clone()], [x.cpu(), v.cpu()]
    pso_update_fused_(*a, p, g, **AWKWARD, vmax=0.5, key=99)
    pso_update_fused_(*b, p.cpu(), g.cpu(), **AWKWARD, vmax=0.5, key=99)  # the C kernel
    torch.testing.assert_close(a[1].cpu(), b[1], rtol=1e-6, atol=1e-6)

    def round_step(x, v, p, g):
        pso_update_fused_(x, v, p, g, **AWKWARD, vmax=0.5, key=99)
        return x.sum()

    c = [x.clone(), v.clone()]
    torch.compile(round_step, fullgraph=True)(*c, p, g)
    assert torch.equal(c[0], a[0]) and torch.equal(c[1], a[1])
    with pytest.raises(TypeError, match="pbest must be float32"):  # eager: checked, then launched
        pso_update_fused_(x, v, p.double(), g, **AWKWARD, vmax=None, key=1)
