"""``torch.ops.psops.pso_update_``: the fused PSO update as one custom op on any device.

It mutates x and v in place and has a fake implementation (shape and input checks only), so
``torch.compile(fullgraph=True)`` keeps it in the graph without a break. CUDA tensors go to the
Triton kernel (``pso_triton.py``), CPU tensors to the C kernel (``pso_cpu.py``); every path
draws the same Philox numbers (``philox.py``) for the same key.
"""

from __future__ import annotations

from types import ModuleType

import torch

from psops_mpi.kernels import pso_cpu
from psops_mpi.kernels.checks import check_inputs


@torch.library.custom_op("psops::pso_update_", mutates_args=("x", "v"))
def _pso_update_op(x: torch.Tensor, v: torch.Tensor, pbest: torch.Tensor, gbest: torch.Tensor,
                   w: float, c1: float, c2: float, vmax: float | None, key: int,
                   deterministic: bool) -> None:
    check_inputs(x, v, pbest, gbest, key)
    args = (w, c1, c2, vmax, key, deterministic)
    if x.device.type == "cuda":
        _triton().pso_update_triton_(x, v, pbest, gbest, *args)
        return
    native = pso_cpu.native_kernel() if x.device.type == "cpu" else None
    if native is not None:
        pso_cpu.update_native(native, x, v, pbest, gbest, *args)
    else:
        pso_cpu.update_torch(x, v, pbest, gbest, *args)


@_pso_update_op.register_fake
def _pso_update_fake(x: torch.Tensor, v: torch.Tensor, pbest: torch.Tensor,
                     gbest: torch.Tensor, w: float, c1: float, c2: float, vmax: float | None,
                     key: int, deterministic: bool) -> None:
    check_inputs(x, v, pbest, gbest, key)


def _triton() -> ModuleType:
    """The Triton kernel's module (imported on first use: CPU-only runs never need Triton)."""
    try:
        from psops_mpi.kernels import pso_triton
    except ImportError as err:
        raise RuntimeError("the fused PSO update on CUDA needs Triton (pip install triton); "
                           "--pso-kernel reference avoids it") from err
    return pso_triton


def pso_update_fused_(x: torch.Tensor, v: torch.Tensor, pbest: torch.Tensor,
                      gbest: torch.Tensor, *, w: float, c1: float, c2: float,
                      vmax: float | None, key: int, deterministic: bool = False) -> None:
    """One PSO step on x and v in place, in one pass (``swarm.pso_update_``'s signature).

    Args:
        x, v, pbest, gbest: contiguous float32 tensors of one shape on one device. # (N,)
        w, c1, c2: inertia, cognitive and social coefficients.
        vmax: clamp for every velocity component, or None.
        key: 63-bit seed of the Philox draws (``swarm.rng_key(seed, round, rank)``).
        deterministic: use r1 = r2 = 1 (to compare implementations exactly).

    Eager calls on CUDA launch the Triton kernel directly, without the two operator
    dispatches on the way (this op, then the Triton op) and the second input check: below
    10^8 floats the cost per call, not memory, limits the update on a GPU
    (``bench/kernel_bench.py`` times both routes). Under ``torch.compile`` it stays the op.
    """
    args = (float(w), float(c1), float(c2), None if vmax is None else float(vmax), int(key),
            bool(deterministic))
    if x.device.type == "cuda" and not torch.compiler.is_compiling():
        check_inputs(x, v, pbest, gbest, key)
        _triton().launch(x, v, pbest, gbest, *args)
        return
    torch.ops.psops.pso_update_(x, v, pbest, gbest, *args)
