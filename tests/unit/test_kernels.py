"""The fused PSO update (torch.ops.psops.pso_update_) on the CPU: same step as the plain-torch
reference, Philox draws that are uniform, independent and keyed, exact clamping, clear errors,
and no graph break under torch.compile."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from psops_mpi.config import PSOConfig
from psops_mpi.kernels import pso_cpu, pso_update_fused_, uniform_pair
from psops_mpi.kernels.philox import philox4x32
from psops_mpi.swarm import Swarm, pso_update_, rng_key

AWKWARD = {"w": 0.7301, "c1": 1.4962, "c2": 0.3333}
Update = Callable[..., None]


def torch_fallback(x, v, p, g, *, w, c1, c2, vmax, key, deterministic=False) -> None:
    pso_cpu.update_torch(x, v, p, g, w, c1, c2, vmax, key, deterministic)


IMPLEMENTATIONS = {"op": pso_update_fused_, "torch-fallback": torch_fallback}


def inputs(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, generator=gen) for _ in range(4))


def draws(update: Update, n: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The r1, r2 an implementation uses, read back exactly: with x = 0, v = 0, w = 0 and a
    unit pull on one term, the new velocity is r1 (or r2) with no rounding."""
    out = []
    for c1, c2 in ((1.0, 0.0), (0.0, 1.0)):
        x, v, ones = torch.zeros(n), torch.zeros(n), torch.ones(n)
        update(x, v, ones, ones, w=0.0, c1=c1, c2=c2, vmax=None, key=key)
        out.append(v)
    return out[0], out[1]


def test_c_kernel_builds_on_this_machine() -> None:
    assert pso_cpu.native_kernel() is not None
    assert pso_cpu.backend() == "native"


def test_philox_matches_the_published_known_answers() -> None:
    # Random123's kat_vectors for philox4x32-10: (counter, key) -> output.
    cases = [
        ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, 2**64 - 1, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), 0x299F31D0A4093822,
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, expected in cases:
        words = philox4x32(tuple(torch.tensor([c]) for c in counter), key)
        assert tuple(int(w) for w in words) == expected


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
@pytest.mark.parametrize("n", [1, 1023, 1025, 10**6 + 3])
@pytest.mark.parametrize("vmax", [None, 0.37])
def test_agrees_with_the_reference_with_unit_random_numbers(name: str, n: int,
                                                            vmax: float | None) -> None:
    x, v, p, g = inputs(n)
    fused, ref = [x.clone(), v.clone()], [x.clone(), v.clone()]
    IMPLEMENTATIONS[name](*fused, p, g, **AWKWARD, vmax=vmax, key=3, deterministic=True)
    pso_update_(*ref, p, g, **AWKWARD, vmax=vmax, key=3, deterministic=True)
    torch.testing.assert_close(fused[1], ref[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fused[0], ref[0], rtol=1e-6, atol=1e-6)
    assert not torch.equal(fused[0], x)  # something moved


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_random_step_is_the_formula_with_the_philox_draws(name: str) -> None:
    n, key = 10_007, rng_key(3, 4, 5)
    x, v, p, g = inputs(n, seed=1)
    x1, v1 = x.clone(), v.clone()
    IMPLEMENTATIONS[name](x1, v1, p, g, **AWKWARD, vmax=None, key=key)
    r1, r2 = uniform_pair(key, 0, n)
    v_expected = v * AWKWARD["w"] + AWKWARD["c1"] * r1 * (p - x) + AWKWARD["c2"] * r2 * (g - x)
    torch.testing.assert_close(v1, v_expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x1, x + v_expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_every_implementation_draws_the_same_numbers_bit_for_bit(name: str) -> None:
    for key in (0, 1, rng_key(7, 2, 1), 2**63 - 1):
        r1, r2 = draws(IMPLEMENTATIONS[name], 4099, key)
        e1, e2 = uniform_pair(key, 0, 4099)
        assert torch.equal(r1, e1) and torch.equal(r2, e2)


def test_a_chunk_of_draws_is_the_same_slice_of_the_whole() -> None:
    key = rng_key(1, 1, 1)
    whole = uniform_pair(key, 0, 3000)
    for start in (0, 1, 1024, 2047):  # even and odd starts
        part = uniform_pair(key, start, 500)
        assert all(torch.equal(a, b[start:start + 500]) for a, b in zip(part, whole, strict=True))


def chi_square_uniform(r: torch.Tensor, bins: int) -> float:
    counts = torch.bincount((r * bins).long(), minlength=bins).double()
    expected = r.numel() / bins
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_bound(dof: int) -> float:
    """A bound the statistic passes with probability ~1 - 1e-6 (normal approximation)."""
    return dof + 5 * math.sqrt(2 * dof)


def test_draws_are_in_unit_interval_and_uniform() -> None:
    n = 1 << 20
    for r in draws(pso_update_fused_, n, rng_key(11, 0, 0)):
        assert float(r.min()) >= 0.0 and float(r.max()) < 1.0
        assert float(r.max()) > 1 - 1e-4 and float(r.min()) < 1e-4  # the whole range is used
        assert chi_square_uniform(r, 1024) < chi_square_bound(1023)
        # Kolmogorov-Smirnov: sup |F_n - F| * sqrt(n) < 1.95 fails with probability 0.001.
        ecdf = torch.arange(1, n + 1, dtype=torch.float64) / n
        sorted_r = torch.sort(r.double()).values
        ks = float(torch.maximum(ecdf - sorted_r, sorted_r - (ecdf - 1 / n)).max())
        assert ks * math.sqrt(n) < 1.95


def joint_chi_square(a: torch.Tensor, b: torch.Tensor, bins: int = 32) -> float:
    """Chi-square of the pairs (a_i, b_i) against the uniform square: large if they depend."""
    cell = (a * bins).long() * bins + (b * bins).long()
    return chi_square_uniform((cell.double() + 0.5) / bins**2, bins**2)


def test_draws_are_independent_between_r1_r2_and_neighbouring_elements() -> None:
    r1, r2 = draws(pso_update_fused_, 1 << 20, rng_key(12, 0, 0))
    bound = chi_square_bound(32**2 - 1)
    assert joint_chi_square(r1, r2) < bound  # r1 and r2 of one element
    assert joint_chi_square(r1[0::2], r1[1::2]) < bound  # the pair that shares a Philox block
    assert joint_chi_square(r1[1:-1:2], r1[2::2]) < bound  # neighbours in different blocks
    assert joint_chi_square(r1[0::2], r2[1::2]) < bound
    for a, b in ((r1, r2), (r1[:-1], r1[1:]), (r2[:-1], r2[1:])):
        corr = float(torch.corrcoef(torch.stack([a, b]))[0, 1])
        assert abs(corr) < 5 / math.sqrt(a.numel())


def test_draws_repeat_for_a_key_and_differ_across_ranks_and_rounds() -> None:
    n = 10_000
    base = draws(pso_update_fused_, n, rng_key(0, 3, 1))
    assert all(torch.equal(a, b) for a, b in
               zip(base, draws(pso_update_fused_, n, rng_key(0, 3, 1)), strict=True))
    for other in (rng_key(0, 3, 2), rng_key(0, 4, 1), rng_key(1, 3, 1)):  # rank, round, seed
        for a, b in zip(base, draws(pso_update_fused_, n, other), strict=True):
            assert float((a == b).float().mean()) < 0.01
            assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 5 / math.sqrt(n)


@pytest.mark.parametrize("name", IMPLEMENTATIONS)
def test_vmax_clamps_exactly(name: str) -> None:
    update = IMPLEMENTATIONS[name]
    x, v = torch.zeros(4), torch.zeros(4)
    g = torch.tensor([10.0, -10.0, 0.05, -0.05])
    update(x, v, x.clone(), g, w=0.0, c1=0.0, c2=1.0, vmax=0.1, key=0, deterministic=True)
    assert torch.equal(v, torch.tensor([0.1, -0.1, 0.05, -0.05]))
    assert torch.equal(x, v)
    # With random draws: the clamped step is exactly the clamp of the free one.
    x, v, p, g = inputs(5000, seed=2)
    free, clamped = [x.clone(), v.clone()], [x.clone(), v.clone()]
    update(*free, p, g, **AWKWARD, vmax=None, key=9)
    update(*clamped, p, g, **AWKWARD, vmax=0.25, key=9)
    assert torch.equal(clamped[1], free[1].clamp(-0.25, 0.25))
    assert torch.equal(clamped[0], x + clamped[1])
    assert bool((free[1].abs() > 0.25).any())  # the clamp had work to do


def test_nan_propagates_like_the_reference() -> None:
    x, v, p, g = inputs(8)
    x[3] = math.nan
    pso_update_fused_(x, v, p, g, **AWKWARD, vmax=0.5, key=1)
    assert math.isnan(float(v[3])) and math.isnan(float(x[3]))
    assert bool(torch.isfinite(v[torch.arange(8) != 3]).all())


@pytest.mark.parametrize(("change", "error", "message"), [
    (lambda t: t.double(), TypeError, "v must be float32"),
    (lambda t: t[:-1], ValueError, "v has shape"),
    (lambda t: torch.randn(2 * t.numel())[::2], ValueError, "v must be contiguous"),
    (lambda t: t.to("meta"), ValueError, "v is on meta"),
])
def test_bad_inputs_get_a_clear_error(change, error, message) -> None:
    x, v, p, g = inputs(16)
    with pytest.raises(error, match=message):
        pso_update_fused_(x, change(v), p, g, **AWKWARD, vmax=None, key=1)


def test_a_negative_key_is_refused() -> None:
    x, v, p, g = inputs(4)
    with pytest.raises(ValueError, match=r"key must be in \[0, 2\^63\)"):
        pso_update_fused_(x, v, p, g, **AWKWARD, vmax=None, key=-1)


def test_works_inside_torch_compile_without_a_graph_break() -> None:
    def round_step(x, v, p, g):
        pso_update_fused_(x, v, p, g, **AWKWARD, vmax=0.5, key=77)
        return x.sum()

    compiled = torch.compile(round_step, fullgraph=True, backend="aot_eager")
    x, v, p, g = inputs(1000, seed=4)
    a, b = [x.clone(), v.clone()], [x.clone(), v.clone()]
    assert torch.equal(compiled(*a, p, g), round_step(*b, p, g))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], x)


@pytest.mark.parametrize("kernel", ["fused", "reference"])
def test_swarm_move_uses_the_configured_kernel(kernel: str) -> None:
    n, seed, rank = 3001, 5, 2
    x, v, p, g = inputs(n, seed=5)
    cfg = PSOConfig(**AWKWARD, rule="particle", pso_kernel=kernel)
    swarm = Swarm(x.clone(), cfg, seed=seed, rank=rank)
    swarm.v.copy_(v)
    swarm.pbest.copy_(p)
    swarm.set_global(g, 1.0, owner=0)
    swarm.round = 4
    swarm.move()
    expected_x, expected_v = x.clone(), v.clone()
    update = pso_update_fused_ if kernel == "fused" else pso_update_
    update(expected_x, expected_v, p, g, **AWKWARD, vmax=None, key=rng_key(seed, 4, rank))
    assert torch.equal(swarm.x, expected_x) and torch.equal(swarm.v, expected_v)
    assert PSOConfig().pso_kernel == "fused"


@pytest.mark.parametrize(("compiler", "reason"), [
    ("no-such-cc", "no C compiler 'no-such-cc' found"),
    ("false", "false could not build pso_cpu.c"),  # a compiler that fails
])
def test_without_a_working_compiler_the_torch_path_runs_after_one_message(
        tmp_path, compiler: str, reason: str) -> None:
    code = (
        "import torch\n"
        "from psops_mpi.kernels import pso_update_fused_, cpu_backend, uniform_pair\n"
        "x, v, ones = torch.zeros(100), torch.zeros(100), torch.ones(100)\n"
        "for _ in range(2):\n"
        "    x.zero_(); v.zero_(); pso_update_fused_(x, v, ones, ones, w=0.0, c1=1.0, c2=0.0,"
        " vmax=None, key=5)\n"
        "assert cpu_backend() == 'torch'\n"
        "assert torch.equal(v, uniform_pair(5, 0, 100)[0])\n"
    )
    env = {**os.environ, "CC": compiler, "PSOPS_CACHE": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stderr.splitlines() if "CPU PSO kernel is unavailable" in line]
    assert len(lines) == 1 and reason in lines[0]


def test_an_unwritable_cache_folder_still_gets_the_c_kernel(tmp_path) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # a folder cannot be made below a file, even by root
    code = ("from psops_mpi.kernels import cpu_backend\n"
            "assert cpu_backend() == 'native', cpu_backend()\n")
    env = {**os.environ, "PSOPS_CACHE": str(blocked / "cache"), "TMPDIR": str(tmp_path),
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and "unavailable" not in done.stderr, done.stderr
    assert list(tmp_path.glob(f"psops_mpi-{os.getuid()}/pso_cpu_*.so"))


def test_a_swarm_of_other_dtype_needs_the_reference_kernel() -> None:
    with pytest.raises(ValueError, match="fused PSO kernel updates float32 parameters"):
        Swarm(torch.zeros(3, dtype=torch.float64), PSOConfig(), seed=0, rank=0)
    swarm = Swarm(torch.zeros(3, dtype=torch.float64), PSOConfig(pso_kernel="reference"),
                  seed=0, rank=0)
    swarm.set_global(torch.ones(3, dtype=torch.float64), 1.0, owner=0)
    swarm.move()
    assert bool((swarm.x > 0).all())
