"""The --cuda-aware decision: a pure function of the setting, the device, what the MPI library
reports and the environment; plus the real query of the loaded MPI library."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest
from mpi4py import MPI

from psops_mpi.cuda_aware import (
    OFF_SWITCHES,
    decide,
    loaded_mpi_libraries,
    query_library,
    resolve,
)


def test_cpu_tensors_need_no_decision() -> None:
    for setting in ("auto", "on", "off"):
        decision = decide(setting, "cpu", True, {})
        assert not decision.direct and not decision.needed
        assert decision.describe() == "CUDA-aware MPI not needed (tensors live on the cpu)"


def test_on_and_off_are_obeyed_whatever_the_library_says() -> None:
    assert decide("on", "cuda", None, {}).direct
    forced = decide("on", "cuda", False, {})
    assert forced.direct and "reports no CUDA support" in forced.reason  # said, not hidden
    assert not decide("off", "cuda", True, {"MV2_USE_CUDA": "1"}).direct


def test_auto_follows_the_library_report() -> None:
    yes = decide("auto", "cuda", True, {})
    assert yes.direct and yes.describe().startswith("CUDA buffers passed to MPI directly")
    no = decide("auto", "cuda", False, {})
    assert not no.direct
    assert no.describe() == ("CUDA buffers staged through one pinned host buffer "
                             "(auto: the MPI library reports no CUDA support)")


def test_auto_without_a_report_stages_unless_a_known_switch_is_on() -> None:
    assert not decide("auto", "cuda", None, {}).direct
    assert not decide("auto", "cuda", None, {"MV2_USE_CUDA": "no"}).direct
    mvapich = decide("auto", "cuda", None, {"MV2_USE_CUDA": "1"})
    assert mvapich.direct and "MV2_USE_CUDA=1" in mvapich.reason
    assert decide("auto", "cuda", None, {"MPICH_GPU_SUPPORT_ENABLED": "1"}).direct


@pytest.mark.parametrize("var", ["MPIR_CVAR_ENABLE_GPU", "MV2_USE_CUDA",
                                 "MPICH_GPU_SUPPORT_ENABLED"])
def test_a_switch_turning_gpu_support_off_beats_the_library_report(var: str) -> None:
    decision = decide("auto", "cuda", True, {var: "0"})
    assert not decision.direct and f"{var}=0" in decision.reason


def test_loaded_mpi_libraries_parses_proc_maps(tmp_path: Path) -> None:
    maps = tmp_path / "maps"
    maps.write_text(
        "7f00-7f01 r-xp 00000000 08:01 11 /opt/ompi/lib/libmpi.so.40.30.0\n"
        "7f01-7f02 r--p 00001000 08:01 11 /opt/ompi/lib/libmpi.so.40.30.0\n"
        "7f02-7f03 rw-p 00000000 00:00 0 \n"
        "7f03-7f04 r-xp 00000000 08:01 12 /opt/ompi/lib/libmpi_mpifh.so.40\n"
        "7f04-7f05 r-xp 00000000 08:01 13 /usr/lib/libmpichtest.a\n"
        "7f05-7f06 r-xp 00000000 08:01 14 /usr/lib/x86_64-linux-gnu/libc.so.6\n")
    assert loaded_mpi_libraries(str(maps)) == ["/opt/ompi/lib/libmpi.so.40.30.0",
                                               "/opt/ompi/lib/libmpi_mpifh.so.40"]
    assert loaded_mpi_libraries(str(tmp_path / "missing")) == []


def cuda_support_by_the_other_query(paths: list[str]) -> bool | None:
    """A second opinion: ``MPIX_Query_cuda_support()`` (MPICH >= 4, Open MPI >= 2) called
    directly, where the code under test asks ``MPIX_GPU_query_support`` first."""
    for path in paths:
        lib = ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
        fn = getattr(lib, "MPIX_Query_cuda_support", None)
        if fn is not None:
            fn.restype, fn.argtypes = ctypes.c_int, []
            return fn() == 1
    return None


PYPI_MPICH = "https://pypi.org/p/mpich/"  # in MPI_Get_library_version of the `mpich` wheel


def test_the_loaded_mpi_library_is_found_and_queried() -> None:
    paths = loaded_mpi_libraries()
    assert paths, "importing mpi4py.MPI loads an MPI library"
    assert all(Path(p).is_file() for p in paths)
    answer = query_library()
    assert answer == cuda_support_by_the_other_query(paths)
    version = MPI.Get_library_version()
    if PYPI_MPICH in version:  # the MPI of this project's machines and CI
        # The wheel is built without CUDA (no --with-cuda in its configure line): the query
        # exists (MPICH 5) and says no, so `auto` stages CUDA buffers through host memory.
        assert "--with-cuda" not in version
        assert answer is False
        if not any(os.environ.get(v) for v in OFF_SWITCHES):
            assert resolve("auto", "cuda") == decide("auto", "cuda", False, {})
            assert resolve("auto", "cuda").reason == "auto: the MPI library reports no CUDA support"


def test_libraries_without_the_query_give_no_answer() -> None:
    assert query_library(["/nonexistent/libmpi.so.12"]) is None  # not loaded: never loaded now
    maps = Path("/proc/self/maps").read_text().split()
    libc = next(path for path in maps if "/libc.so" in path or "/libc-" in path)
    assert query_library([libc]) is None  # loaded, but no MPIX_* functions in it
    assert query_library([]) is None


def test_resolve_asks_nothing_when_off_or_on_cpu() -> None:
    assert not resolve("off", "cuda").direct
    assert not resolve("auto", "cpu").needed
