"""The fused PSO update as a Triton kernel, registered as ``torch.ops.psops.pso_update_triton_``.

One program handles BLOCK consecutive elements: it reads x, v, p, g once, makes r1, r2 in
registers with ``tl.philox`` (Philox4x32-10, the numbers of ``philox.uniform_pair``), and
writes v and x once: 24 bytes per float32 element, the least this update can move. Registered
through ``torch.library.triton_op`` so ``torch.compile`` sees the kernel itself. With
``TRITON_INTERPRET=1`` (set before this module is imported) it runs on CPU tensors, which is
how the tests check its logic on machines without a GPU.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from psops_mpi.kernels.checks import check_inputs

BLOCK = 1024


@triton.jit(do_not_specialize=["key"])
def _pso_update_kernel(
    x_ptr, v_ptr, p_ptr, g_ptr,  # (N,) float32 each; x and v are updated in place
    n,  # number of elements
    w, c1, c2, vmax,  # coefficients (vmax unused unless CLAMP)
    key,  # 63-bit Philox key: swarm.rng_key(seed, round, rank)
    CLAMP: tl.constexpr, RANDOM: tl.constexpr, BLOCK: tl.constexpr,
):
    offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    v = tl.load(v_ptr + offsets, mask=mask)
    pull_p = tl.load(p_ptr + offsets, mask=mask) - x
    pull_g = tl.load(g_ptr + offsets, mask=mask) - x
    if RANDOM:
        # One Philox block per element pair: words 0, 1 for the even element, 2, 3 for the odd.
        # The 64-bit pair index is split into two uint32 counter words here rather than left
        # to tl.randint4x, whose handling of 64-bit offsets differs between Triton releases.
        pair = offsets >> 1
        lo = (pair & 0xFFFFFFFF).to(tl.uint32)
        zero = lo * 0
        u0, u1, u2, u3 = tl.philox(key, lo, (pair >> 32).to(tl.uint32), zero, zero)
        odd = (offsets & 1) == 1
        r1 = (tl.where(odd, u2, u0) >> 8).to(tl.float32) * (1.0 / 16777216.0)
        r2 = (tl.where(odd, u3, u1) >> 8).to(tl.float32) * (1.0 / 16777216.0)
        pull_p = r1 * pull_p
        pull_g = r2 * pull_g
    v = v * w + c1 * pull_p
    v = v + c2 * pull_g
    if CLAMP:
        v = tl.where(v > vmax, vmax, tl.where(v < -vmax, -vmax, v))  # NaN stays NaN
    tl.store(v_ptr + offsets, v, mask=mask)
    tl.store(x_ptr + offsets, x + v, mask=mask)


def launch(x: torch.Tensor, v: torch.Tensor, pbest: torch.Tensor, gbest: torch.Tensor,
           w: float, c1: float, c2: float, vmax: float | None, key: int,
           deterministic: bool, kernel: Any = _pso_update_kernel) -> None:
    """Launch the kernel on inputs already checked (:func:`check_inputs`), with no operator
    dispatch around it: eager code calls this directly (``op.pso_update_fused_``); the
    operator below passes the kernel wrapped for ``torch.compile``."""
    n = x.numel()
    if n == 0:
        return
    kernel[(triton.cdiv(n, BLOCK),)](
        x, v, pbest, gbest, n, w, c1, c2, 0.0 if vmax is None else vmax, key,
        CLAMP=vmax is not None, RANDOM=not deterministic, BLOCK=BLOCK,
    )


@triton_op("psops::pso_update_triton_", mutates_args=("x", "v"))
def pso_update_triton_(x: torch.Tensor, v: torch.Tensor, pbest: torch.Tensor,
                       gbest: torch.Tensor, w: float, c1: float, c2: float,
                       vmax: float | None, key: int, deterministic: bool) -> None:
    """The PSO step of ``swarm.pso_update_`` in one Triton kernel launch, as an operator that
    ``torch.compile`` traces into (``wrap_triton``)."""
    check_inputs(x, v, pbest, gbest, key)
    launch(x, v, pbest, gbest, w, c1, c2, vmax, key, deterministic,
           kernel=wrap_triton(_pso_update_kernel))
