"""The fused PSO update: one pass over memory, random numbers made where they are used.

``pso_update_fused_`` calls the custom op ``torch.ops.psops.pso_update_`` (Triton kernel on
CUDA, C kernel on the CPU); ``psops_mpi.swarm.pso_update_`` is the plain-torch reference.
"""

from psops_mpi.kernels.op import pso_update_fused_
from psops_mpi.kernels.philox import uniform_pair
from psops_mpi.kernels.pso_cpu import backend as cpu_backend

__all__ = ["cpu_backend", "pso_update_fused_", "uniform_pair"]
