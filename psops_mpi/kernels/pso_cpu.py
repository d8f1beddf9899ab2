"""The fused PSO update on the CPU: a small C kernel (``pso_cpu.c``) loaded with ctypes.

The C file has no torch headers, so compiling it takes well under a second; the shared library
is cached in :func:`psops_mpi.cache.cache_dir` (``~/.cache/psops_mpi``), keyed by the source,
the compiler flags and this CPU's feature flags (it is built with ``-march=native``), and
written atomically so ranks starting together cannot see a half-written file. Where no C
compiler works, the update runs on :func:`update_torch` (the same numbers, about 100 times
slower: Philox in int64 tensor ops) after one warning. ``PSOPS_CPU_KERNEL=torch`` forces that path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path

import torch

from psops_mpi.cache import cache_dir, write_atomically
from psops_mpi.kernels.philox import uniform_pair

SOURCE = Path(__file__).with_name("pso_cpu.c")
# Tried in order: the fastest build first, then builds for compilers that lack a flag.
FLAG_SETS = (
    ("-O3", "-march=native", "-fopenmp"),
    ("-O3", "-fopenmp"),
    ("-O3",),
)
CHUNK = 1 << 16  # elements per step of the torch fallback: its temporaries stay in cache


def _cpu_flags() -> str:
    """This CPU's feature flags: a library built with -march=native may not run elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


class _BuildError(Exception):
    """The compiler failed; the message is its error text."""


def _compile(compiler: str, flags: tuple[str, ...], target: Path) -> str | None:
    """Build the library at ``target`` atomically; the compiler's error text, or None."""

    def build(tmp: Path) -> None:
        cmd = [compiler, *flags, "-shared", "-fPIC", str(SOURCE), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise _BuildError(done.stderr.strip() or f"exit code {done.returncode}")

    try:
        write_atomically(target, build)
        return None
    except (_BuildError, OSError, subprocess.SubprocessError) as err:
        return str(err)


def _bind(path: Path) -> ctypes._CFuncPtr:
    fn = ctypes.CDLL(str(path)).psops_pso_update_f32
    fn.argtypes = [ctypes.c_void_p] * 4 + [
        ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float,
        ctypes.c_int, ctypes.c_uint64, ctypes.c_int, ctypes.c_int,
    ]
    fn.restype = None
    return fn


@cache
def native_kernel() -> ctypes._CFuncPtr | None:
    """The compiled C kernel (built on first use), or None after one warning saying why."""
    if os.environ.get("PSOPS_CPU_KERNEL", "native") == "torch":
        return None
    name = os.environ.get("CC") or "cc"
    compiler = shutil.which(name) or (shutil.which("gcc") if name == "cc" else None)
    if compiler is None:
        _warn(f"no C compiler {name!r} found (install gcc, or set CC to one)")
        return None
    errors = []
    for flags in FLAG_SETS:
        digest = hashlib.sha256(
            "\0".join([SOURCE.read_text(), compiler, *flags, _cpu_flags(), sys.platform])
            .encode()).hexdigest()[:16]
        target = cache_dir() / f"pso_cpu_{digest}.so"
        error = None if target.exists() else _compile(compiler, flags, target)
        if error is None:
            try:
                return _bind(target)
            except OSError as err:
                error = str(err)
        errors.append(f"{' '.join(flags)}: {error.splitlines()[-1] if error else '?'}")
    _warn(f"{compiler} could not build {SOURCE.name} ({'; '.join(errors)})")
    return None


def _warn(reason: str) -> None:
    print(f"psops_mpi: the fast CPU PSO kernel is unavailable: {reason}; the fused update runs "
          "as torch ops instead (same numbers, ~100x slower than the C kernel, ~3x slower than "
          "--pso-kernel reference)", file=sys.stderr)


def backend() -> str:
    """'native' when the C kernel is in use on the CPU, else 'torch'."""
    return "native" if native_kernel() is not None else "torch"


def update_native(fn: ctypes._CFuncPtr, x: torch.Tensor, v: torch.Tensor, pbest: torch.Tensor,
                  gbest: torch.Tensor, w: float, c1: float, c2: float, vmax: float | None,
                  key: int, deterministic: bool) -> None:
    """One call of the C kernel on contiguous float32 CPU tensors (checked by the caller)."""
    fn(x.data_ptr(), v.data_ptr(), pbest.data_ptr(), gbest.data_ptr(), x.numel(), w, c1, c2,
       0.0 if vmax is None else vmax, vmax is not None, key, not deterministic,
       torch.get_num_threads())


def update_torch(x: torch.Tensor, v: torch.Tensor, pbest: torch.Tensor, gbest: torch.Tensor,
                 w: float, c1: float, c2: float, vmax: float | None, key: int,
                 deterministic: bool) -> None:
    """The fused op's arithmetic and draws in torch, chunk by chunk (the C kernel's fallback)."""
    flat = [t.view(-1) for t in (x, v, pbest, gbest)]
    for start in range(0, x.numel(), CHUNK):
        xs, vs, ps, gs = (t[start:start + CHUNK] for t in flat)
        pull_p, pull_g = ps - xs, gs - xs
        if not deterministic:
            r1, r2 = uniform_pair(key, start, xs.numel(), device=xs.device)
            pull_p.mul_(r1)
            pull_g.mul_(r2)
        vs.mul_(w).add_(pull_p, alpha=c1).add_(pull_g, alpha=c2)
        if vmax is not None:
            vs.clamp_(-vmax, vmax)
        xs.add_(vs)
