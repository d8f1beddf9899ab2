"""psops_mpi's cache folder, for what is slow to make and the same every time: the compiled CPU
kernel (:mod:`psops_mpi.kernels.pso_cpu`) and the generated MNIST-1D set
(:mod:`psops_mpi.data.formats`).

Files are written atomically (a temporary file in the same folder, then a rename), so ranks
that start together and all make the same file never read a half-written one.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """``$PSOPS_CACHE`` (formerly ``$PSOPS_KERNEL_CACHE``) or ``~/.cache/psops_mpi``
    (``$XDG_CACHE_HOME`` honoured). Where that cannot be written (a read-only home, as on some
    compute nodes): ``psops_mpi-UID`` under the system's temporary directory if this user owns
    it and nobody else can write it, else a new private folder. Never raises: a folder that
    cannot be written only makes every write fail, and the callers then do without."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "psops_mpi"
    chosen = os.environ.get("PSOPS_CACHE") or os.environ.get("PSOPS_KERNEL_CACHE")
    preferred = Path(chosen) if chosen else default
    try:
        preferred.mkdir(parents=True, exist_ok=True)
        if os.access(preferred, os.W_OK):
            return preferred
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"psops_mpi-{os.getuid()}"
    try:
        fallback.mkdir(mode=0o700, exist_ok=True)
        if _private(fallback):
            return fallback
        return Path(tempfile.mkdtemp(prefix="psops_mpi-"))  # somebody else's: not trusted
    except OSError:
        return fallback


def _private(folder: Path) -> bool:
    """A real folder of this user that no one else can write (a compiled library is loaded
    from it)."""
    info = folder.lstat()
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.getuid()
            and not info.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def write_atomically(target: Path, write: Callable[[Path], None]) -> None:
    """``write(path)`` into a temporary file next to ``target``, then rename it to ``target``.

    Raises:
        OSError: the folder cannot be written; no partial file is left behind.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
