"""Whether CUDA buffers may be handed to MPI directly (``--cuda-aware {auto,on,off}``).

Handing a CUDA pointer to an MPI library that cannot read device memory crashes the job (a
segmentation fault inside the collective); staging through host memory where the library
could have read it directly only costs time. So ``auto`` passes CUDA buffers directly only
when the library says it can, and stages them through one pinned host buffer otherwise.

What ``auto`` listens to, in this order:

1. switches in the environment that turn GPU support off (``MPIR_CVAR_ENABLE_GPU=0`` for
   MPICH, ``MV2_USE_CUDA=0`` for MVAPICH, ``MPICH_GPU_SUPPORT_ENABLED=0`` for Cray MPICH);
2. the library's own run-time answer, looked up by name in the loaded MPI library (never
   linked against, so a library without it is no error): ``MPIX_GPU_query_support`` (MPICH
   4 and later, and libraries built on it) or ``MPIX_Query_cuda_support`` (Open MPI 2 and
   later, MPICH 4 and later);
3. switches that turn it on for libraries that have no such query (``MV2_USE_CUDA=1`` for
   MVAPICH2, ``MPICH_GPU_SUPPORT_ENABLED=1`` for Cray MPICH).

Nothing said means staging.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MPIX_GPU_SUPPORT_CUDA = 0  # from MPICH's mpi.h: the gpu_type argument of MPIX_GPU_query_support

# Environment variables that disable GPU buffers when set to "0"; the library reading them
# then fails on a CUDA pointer whatever its query said at build time.
OFF_SWITCHES = {
    "MPIR_CVAR_ENABLE_GPU": "MPICH",
    "MV2_USE_CUDA": "MVAPICH2",
    "MPICH_GPU_SUPPORT_ENABLED": "Cray MPICH",
}
# Libraries without a run-time query whose users turn CUDA buffers on with these.
ON_SWITCHES = {
    "MV2_USE_CUDA": "MVAPICH2",
    "MPICH_GPU_SUPPORT_ENABLED": "Cray MPICH",
}


@dataclass(frozen=True)
class CudaAwareDecision:
    """What the exchange does with CUDA buffers, and why (printed once at start)."""

    direct: bool
    """True: CUDA buffers go to MPI as they are; False: staged through pinned host memory."""
    reason: str
    needed: bool = True
    """False when this rank's tensors are not on a CUDA device (nothing to decide)."""

    def describe(self) -> str:
        if not self.needed:
            return f"CUDA-aware MPI not needed ({self.reason})"
        how = "passed to MPI directly" if self.direct else "staged through one pinned host buffer"
        return f"CUDA buffers {how} ({self.reason})"


def _switch(environ: Mapping[str, str], names: Mapping[str, str], value: str) -> str | None:
    for name, library in names.items():
        if environ.get(name, "").strip().lower() == value:
            return f"{name}={value} ({library})"
    return None


def decide(setting: str, device_type: str, library_reports: bool | None,
           environ: Mapping[str, str]) -> CudaAwareDecision:
    """The decision for ``--cuda-aware setting`` (a pure function of what was found).

    Args:
        setting: 'auto', 'on' or 'off'.
        device_type: the type of this rank's device ('cuda', 'cpu', ...).
        library_reports: the MPI library's run-time answer (:func:`query_library`), or None
            when it has no query.
        environ: the environment the MPI library reads.
    """
    if device_type != "cuda":
        return CudaAwareDecision(False, f"tensors live on the {device_type}", needed=False)
    if setting == "on":
        warning = "; the MPI library reports no CUDA support" if library_reports is False else ""
        return CudaAwareDecision(True, f"--cuda-aware on{warning}")
    if setting == "off":
        return CudaAwareDecision(False, "--cuda-aware off")
    off = _switch(environ, OFF_SWITCHES, "0")
    if off:
        return CudaAwareDecision(False, f"auto: {off} turns GPU support off")
    if library_reports is not None:
        said = "reports CUDA support" if library_reports else "reports no CUDA support"
        return CudaAwareDecision(library_reports, f"auto: the MPI library {said}")
    on = _switch(environ, ON_SWITCHES, "1")
    if on:
        return CudaAwareDecision(True, f"auto: {on}")
    return CudaAwareDecision(False, "auto: the MPI library does not say it reads CUDA memory")


def loaded_mpi_libraries(maps: str = "/proc/self/maps") -> list[str]:
    """Paths of the MPI libraries this process has loaded (``libmpi*.so*``), in load order."""
    try:
        lines = Path(maps).read_text().splitlines()
    except OSError:  # not Linux: no query, so 'auto' stages
        return []
    paths: list[str] = []
    for line in lines:
        fields = line.split(maxsplit=5)
        path = fields[5] if len(fields) == 6 else ""  # anonymous mappings have no path
        name = os.path.basename(path)
        is_mpi = name.startswith(("libmpi.", "libmpi_", "libmpich.")) and ".so" in name
        if is_mpi and path not in paths:
            paths.append(path)
    return paths


def query_library(paths: list[str] | None = None) -> bool | None:
    """The loaded MPI library's own answer to "can you read CUDA memory?", or None.

    The functions are looked up by name in libraries already loaded (``RTLD_NOLOAD``): a
    library without them, or a platform where this cannot be done, gives None, never an
    error. Must be called after MPI_Init (importing ``mpi4py.MPI`` does that).
    """
    for path in loaded_mpi_libraries() if paths is None else paths:
        try:
            lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        except OSError:
            continue
        answer = _gpu_query_support(lib)
        if answer is None:
            answer = _query_cuda_support(lib)
        if answer is not None:
            return answer
    return None


def _gpu_query_support(lib: ctypes.CDLL) -> bool | None:
    fn = getattr(lib, "MPIX_GPU_query_support", None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    supported = ctypes.c_int(0)
    if fn(MPIX_GPU_SUPPORT_CUDA, ctypes.byref(supported)) != 0:  # not MPI_SUCCESS
        return None
    return bool(supported.value)


def _query_cuda_support(lib: ctypes.CDLL) -> bool | None:
    fn = getattr(lib, "MPIX_Query_cuda_support", None)
    if fn is None:
        return None
    fn.restype, fn.argtypes = ctypes.c_int, []
    return fn() == 1


def resolve(setting: str, device_type: str) -> CudaAwareDecision:
    """The decision for this process: asks the loaded MPI library only where it matters."""
    reports = query_library() if device_type == "cuda" and setting != "off" else None
    return decide(setting, device_type, reports, os.environ)
